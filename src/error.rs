//! Errors of the extension, and their one conversion into a PostgreSQL
//! error with a SQLSTATE and a HINT: every error tde raises is a `TdeError`,
//! and this file is the one table of codes and hints.  Messages name
//! relations, files and providers, never key material: the inner errors from
//! tde-core are written that way.
//!
//! (Errors raised *beneath* tde's hooks, by PostgreSQL itself, are not
//! converted at all: they propagate untouched, see src/pg/.)

use pgrx::prelude::*;
use tde_core::keystore::{FileId, StoreError};
use tde_core::provider::{Failure, ProviderError};

#[derive(Debug, thiserror::Error)]
pub enum TdeError {
    #[error("no master key is set")]
    NoMasterKey,
    #[error("the key store is locked: {0}")]
    Locked(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("key provider \"{0}\" does not exist")]
    UnknownProvider(String),
    #[error("too many encrypted relation files (tde.max_relation_keys = {0})")]
    TableFull(u32),
    #[error("the key store holds {keys} keys, more than tde.max_relation_keys = {capacity}")]
    StoreTooLarge { keys: usize, capacity: u32 },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot change keys during recovery")]
    InRecovery,
    #[error("pg_upgrade cannot carry encrypted relations to a new cluster")]
    BinaryUpgrade,
    #[error("internal cryptographic error")]
    Crypto,
    #[error("must be loaded via shared_preload_libraries")]
    NotPreloaded,
    #[error("another library replaced tde's storage manager (storage_manager_id is {current}, tde registered {ours})")]
    StorageManagerReplaced { current: i32, ours: i32 },
    #[error("cannot {action} encrypted relation file {file} (fork {fork}): its key is unavailable: {why}")]
    KeyUnavailable { action: &'static str, file: FileId, fork: i32, why: String },
    #[error(
        "block {block} of relation file {file} (fork {fork}) is encrypted on disk, but the key store has no key for this file"
    )]
    MarkedWithoutKey { file: FileId, fork: i32, block: u32 },
    #[error("block {block} of encrypted relation file {file} (fork {fork}) is not marked as encrypted on disk")]
    NotMarked { file: FileId, fork: i32, block: u32 },
    #[error("block {block} of relation file {file} (fork {fork}) is encrypted under a key version that is not live (retired, or newer than the key store)")]
    VersionUnavailable { file: FileId, fork: i32, block: u32 },
    #[error("page {0} failed in the cipher library; nothing was written")]
    Cipher(&'static str),
    #[error("tde.enforce_encryption is on: {0}")]
    Enforced(String),
    #[error("ALTER DATABASE ... SET TABLESPACE is not supported for a database with encrypted relations")]
    MoveEncryptedDatabase,
    #[error("{0}")]
    StoreRefused(String),
    #[error("{0}")]
    SaveAfterLog(StoreError),
    #[error("relation with OID {0} does not exist")]
    NoSuchRelation(u32),
    #[error("logical decoding spill file \"{0}\" was not written by this process, so it cannot be decrypted")]
    UnknownSpillFile(String),
    #[error("{0}")]
    Internal(String),
}

impl TdeError {
    pub fn code(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            TdeError::NoMasterKey | TdeError::Locked(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            TdeError::Store(StoreError::Corrupt { .. }) => ERRCODE_DATA_CORRUPTED,
            TdeError::Store(StoreError::Io { .. }) => ERRCODE_IO_ERROR,
            TdeError::Store(StoreError::ProviderExists(_)) => ERRCODE_DUPLICATE_OBJECT,
            TdeError::Store(StoreError::NotInitialised) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            TdeError::Store(StoreError::NoSuchKey(_)) => ERRCODE_UNDEFINED_OBJECT,
            TdeError::Store(StoreError::BadRotation(_)) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            TdeError::Provider(ProviderError::BadOptions { .. })
            | TdeError::Provider(ProviderError::UnknownKind(_))
            | TdeError::Invalid(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            TdeError::Provider(
                ProviderError::InsecurePermissions { .. }
                | ProviderError::WrongOwner { .. }
                | ProviderError::InsecureDirectory { .. }
                | ProviderError::Symlink { .. }
                | ProviderError::TempExists { .. },
            ) => ERRCODE_INSUFFICIENT_PRIVILEGE,
            TdeError::Provider(ProviderError::Relayed { failure, .. } | ProviderError::Remote { failure, .. }) => {
                match failure {
                    Failure::BadOptions => ERRCODE_INVALID_PARAMETER_VALUE,
                    Failure::Credentials => ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
                    Failure::PermissionDenied => ERRCODE_INSUFFICIENT_PRIVILEGE,
                    Failure::KeyNotFound => ERRCODE_UNDEFINED_OBJECT,
                    Failure::Unreachable | Failure::TimedOut => ERRCODE_CONNECTION_FAILURE,
                    Failure::WrongKey | Failure::Other => ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
                }
            }
            TdeError::Provider(_) => ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
            TdeError::UnknownProvider(_) => ERRCODE_UNDEFINED_OBJECT,
            TdeError::TableFull(_) | TdeError::StoreTooLarge { .. } => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            TdeError::InRecovery => ERRCODE_READ_ONLY_SQL_TRANSACTION,
            TdeError::BinaryUpgrade => ERRCODE_FEATURE_NOT_SUPPORTED,
            TdeError::Crypto | TdeError::Cipher(_) | TdeError::Internal(_) => ERRCODE_INTERNAL_ERROR,
            TdeError::NotPreloaded | TdeError::StorageManagerReplaced { .. } | TdeError::KeyUnavailable { .. } => {
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            TdeError::MarkedWithoutKey { .. }
            | TdeError::NotMarked { .. }
            | TdeError::VersionUnavailable { .. }
            | TdeError::StoreRefused(_)
            | TdeError::UnknownSpillFile(_) => ERRCODE_DATA_CORRUPTED,
            TdeError::SaveAfterLog(_) => ERRCODE_IO_ERROR,
            TdeError::Enforced(_) => ERRCODE_INSUFFICIENT_PRIVILEGE,
            TdeError::MoveEncryptedDatabase => ERRCODE_FEATURE_NOT_SUPPORTED,
            TdeError::NoSuchRelation(_) => ERRCODE_UNDEFINED_TABLE,
        }
    }

    pub fn hint(&self) -> Option<&'static str> {
        match self {
            TdeError::NoMasterKey => Some("Call tde_add_key_provider() and tde_set_master_key() first."),
            TdeError::BinaryUpgrade => Some(
                "Their files are encrypted under the old cluster's keys. Move them with pg_dump and pg_restore, or decrypt them (ALTER TABLE ... SET ACCESS METHOD heap) before pg_upgrade.",
            ),
            TdeError::Locked(_) => Some(
                "Make the master key available (keyring file, environment variable, key provider); the key worker retries every few seconds and on the next statement that needs a key.",
            ),
            TdeError::TableFull(_) | TdeError::StoreTooLarge { .. } => {
                Some("Raise tde.max_relation_keys and restart the server.")
            }
            TdeError::Store(StoreError::Corrupt { .. }) => Some(
                "Restore the key store file of the same backup as the data directory; the server cannot tell which relations are encrypted without it.",
            ),
            TdeError::NotPreloaded => {
                Some("Add tde to shared_preload_libraries in postgresql.conf and restart the server.")
            }
            TdeError::StorageManagerReplaced { .. } => Some(
                "Encrypted relations would be written in plaintext. Remove the other storage manager from shared_preload_libraries.",
            ),
            TdeError::KeyUnavailable { .. } => Some(
                "Make the master key available; the key worker retries by itself, no restart is needed. Nothing was written.",
            ),
            TdeError::MarkedWithoutKey { .. } => Some(
                "The key store does not match the data files (restored from another backup, or edited?). Restore the key store that belongs to this data directory.",
            ),
            TdeError::Enforced(_) => Some(
                "Use CREATE TABLE ... USING tde_heap or SET default_table_access_method = tde_heap; only a superuser can turn tde.enforce_encryption off.",
            ),
            TdeError::MoveEncryptedDatabase => Some(
                "Move the tables instead: ALTER TABLE ... SET TABLESPACE, or ALTER TABLE ALL IN TABLESPACE ... SET TABLESPACE.",
            ),
            TdeError::StoreRefused(_) => Some(
                "Restore tde/keystore from the same backup as the rest of the data directory. An older, missing or foreign key store lacks keys the data files need; recovery cannot go on without them.",
            ),
            TdeError::SaveAfterLog(_) => Some(
                "The change is in the WAL; crash recovery applies it to the key store once the file can be written.",
            ),
            _ => None,
        }
    }

    /// Raises this error as a PostgreSQL ERROR.  Never returns.
    pub fn raise(&self) -> ! {
        self.raise_at(PgLogLevel::ERROR)
    }

    /// Raises this error at `level` (ERROR, FATAL or PANIC).  Never returns.
    pub fn raise_at(&self, level: PgLogLevel) -> ! {
        report(level, self.code(), format!("tde: {self}"), self.hint());
        unreachable!("ereport({level:?}) returned")
    }
}

/// ereport with an optional HINT (pgrx's ereport! macro only sets DETAIL).
/// Returns only for levels below ERROR.
fn report(level: PgLogLevel, code: PgSqlErrorCode, message: String, hint: Option<&str>) {
    let mut r = pgrx::pg_sys::panic::ErrorReport::new(code, message, "tde");
    if let Some(h) = hint {
        r = r.set_hint(h);
    }
    r.report(level);
}

/// Unwraps a result at the SQL boundary, raising the error.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T, E: Into<TdeError>> OrRaise<T> for Result<T, E> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.into().raise(),
        }
    }
}
