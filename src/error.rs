//! Errors of the extension, and their one conversion into a PostgreSQL
//! error with a SQLSTATE.  Messages name relations, files and providers,
//! never key material: the inner errors from tde-core are written that way.

use pgrx::prelude::*;
use tde_core::keystore::StoreError;
use tde_core::provider::ProviderError;

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
            TdeError::Provider(_) => ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
            TdeError::UnknownProvider(_) => ERRCODE_UNDEFINED_OBJECT,
            TdeError::TableFull(_) | TdeError::StoreTooLarge { .. } => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            TdeError::InRecovery => ERRCODE_READ_ONLY_SQL_TRANSACTION,
            TdeError::BinaryUpgrade => ERRCODE_FEATURE_NOT_SUPPORTED,
            TdeError::Crypto => ERRCODE_INTERNAL_ERROR,
        }
    }

    pub fn hint(&self) -> Option<&'static str> {
        match self {
            TdeError::NoMasterKey => Some("Call tde_add_key_provider() and tde_set_master_key() first."),
            TdeError::BinaryUpgrade => Some(
                "Their files are encrypted under the old cluster's keys. Move them with pg_dump and pg_restore, or decrypt them (ALTER TABLE ... SET ACCESS METHOD heap) before pg_upgrade.",
            ),
            TdeError::Locked(_) => {
                Some("Make the master key available (keyring file, environment variable) and restart the server.")
            }
            TdeError::TableFull(_) | TdeError::StoreTooLarge { .. } => {
                Some("Raise tde.max_relation_keys and restart the server.")
            }
            _ => None,
        }
    }

    /// Raises this error as a PostgreSQL ERROR.  Never returns.
    pub fn raise(&self) -> ! {
        report(PgLogLevel::ERROR, self.code(), format!("tde: {self}"), self.hint());
        unreachable!("ereport(ERROR) returned")
    }
}

/// ereport with an optional HINT (pgrx's ereport! macro only sets DETAIL).
/// Returns only for levels below ERROR.
pub fn report(level: PgLogLevel, code: PgSqlErrorCode, message: String, hint: Option<&str>) {
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
