//! Master-key providers: where a master key (MEK) comes from.
//!
//! Why it is built this way: every provider, local or remote, does the same
//! two things for us, wrap and unwrap the cluster's key-encryption key (KEK).
//! A KMS or HSM never hands out the master key; the local providers below
//! (`file`, `env`) hold it in this process only for the length of one call.
//! Later providers (AWS KMS, Vault Transit, PKCS#11, KMIP) implement the same
//! trait, one file each.
//!
//! - `file`: `{"path": "/abs/keyring"}`, a JSON keyring of named 32-byte keys
//!   (`{"version": 1, "keys": {"name": "<base64>"}}`), mode 0600.  A key is
//!   created with random bytes on first use.
//! - `env`: `{"variable": "NAME"}`, the variable holds a base64 32-byte key;
//!   the key name is only a label.
//!
//! # What the `file` provider guarantees
//!
//! The keyring holds every master key in clear, so whoever can read it, or
//! swap it, or make us write it somewhere else, owns the data.  Hence:
//!
//! - **One open, then checks on what was opened.**  The keyring's directory is
//!   opened once, and every file beside it is reached relative to that open
//!   directory (`openat`, `renameat`), so the directory checked is the one
//!   used.  The keyring itself is opened once with `O_NOFOLLOW | O_NONBLOCK |
//!   O_CLOEXEC`; the checks below are made with `fstat` on that descriptor,
//!   and the contents are read from the same descriptor (no stat-then-reopen
//!   race).  A symbolic link at the keyring's path is refused, not followed;
//!   so is anything but a regular file (a FIFO cannot make us hang).
//! - **Owner and mode.**  The keyring must be owned by the server's effective
//!   uid and have no group or other permission bits (`mode & 0o077 == 0`).
//! - **Directory rule.**  The keyring's parent directory must not be writable
//!   by group or others (`mode & 0o022 == 0`) unless it has the sticky bit
//!   (`mode & 0o1000`, like `/tmp`), where others can create names but cannot
//!   remove or rename ours.  Only the immediate parent is checked; the
//!   directories above it are the operator's to keep safe (they should be
//!   owned by the server's user or root).
//! - **Rewrites are atomic and never leak.**  A new keyring is written to
//!   `<path>.tmp`, created with `O_CREAT | O_EXCL | O_NOFOLLOW` and mode 0600,
//!   then fsynced, renamed over the keyring, and the directory fsynced.  If
//!   `<path>.tmp` already exists (a crash left it, or someone planted a file or
//!   a link there) nothing is written: the error names it for the operator to
//!   check and remove.  It is never followed nor deleted by us.
//! - **Concurrent creators do not lose keys.**  `ensure_key` takes an exclusive
//!   `flock` on `<path>.lock` (created 0600, `O_NOFOLLOW`, kept afterwards:
//!   removing a lock file races with its next user) for the whole
//!   read-modify-write.  Readers take no lock: the keyring is only ever
//!   replaced whole, by rename.
//! - **No silent loss.**  A keyring that cannot be parsed, or one of whose keys
//!   is not base64 for 32 bytes, is refused (never replaced by `ensure_key`);
//!   an encoding failure is an error, never an empty or short keyring.
//! - **Key material in memory.**  The file's bytes, the base64 values and the
//!   encoded new keyring live only in zeroizing buffers sized up front (no
//!   reallocation leaves copies behind).  What remains: serde_json decodes a
//!   string that contains escape sequences (`\u0041`, `\/`) through a scratch
//!   buffer it does not wipe; our writer never escapes base64, so only a
//!   hand-edited keyring hits this.  The kernel's page cache and the freed
//!   pages of earlier keyring versions are out of our reach.
//! - **Errors** name paths, key names and OS errors, never key material.

use crate::secret::WrapKey;
use crate::wrap::{unwrap_wrap_key, wrap_wrap_key};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("invalid options for key provider kind \"{kind}\": {why}")]
    BadOptions { kind: String, why: String },
    #[error("unknown key provider kind \"{0}\" (supported: file, env, aws-kms, vault-transit, gcp-kms, azure-keyvault, pkcs11, kmip)")]
    UnknownKind(String),
    /// A remote provider (KMS, HSM) failed; `failure` is the vendor's error
    /// mapped onto a few cases a DBA can act on, `detail` the vendor's words
    /// (never key material).
    #[error("{kind} provider: {failure}: {detail}")]
    Remote { kind: String, failure: Failure, detail: String },
    /// A provider's error as the key worker relayed it: its text, verbatim.
    #[error("{message}")]
    Relayed { failure: Failure, message: String },
    #[error("keyring file \"{path}\" is accessible by group or others (mode {mode:04o}); run chmod 600 on it")]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("could not {what} keyring file \"{path}\": {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("keyring file \"{path}\" is malformed: {why}")]
    Malformed { path: PathBuf, why: String },
    #[error("master key \"{key}\" not found in {place}")]
    KeyNotFound { key: String, place: String },
    #[error("environment variable \"{0}\" is not set")]
    EnvMissing(String),
    #[error("environment variable \"{0}\" does not hold a base64-encoded 32-byte key")]
    EnvMalformed(String),
    #[error("master key \"{key}\" could not unwrap the key-encryption key (wrong master key, or the key store was tampered with)")]
    WrongKey { key: String },
    #[error("internal cryptographic error")]
    Crypto,
    /// An I/O error on a file beside the keyring (its directory, `.tmp` or `.lock`).
    #[error("could not {what} \"{path}\": {source}")]
    FileIo {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("\"{path}\" is a symbolic link; refusing to follow it (point the provider's \"path\" at the real file, or remove the link)")]
    Symlink { path: PathBuf },
    #[error("\"{path}\" is not a regular file; refusing to use it")]
    NotRegular { path: PathBuf },
    #[error("\"{path}\" is owned by uid {owner}, but the server runs as uid {euid}; refusing to use it (chown it to uid {euid})")]
    WrongOwner { path: PathBuf, owner: u32, euid: u32 },
    #[error("directory \"{path}\" of the keyring file is writable by group or others and not sticky (mode {mode:04o}); run chmod go-w on it")]
    InsecureDirectory { path: PathBuf, mode: u32 },
    #[error("temporary keyring file \"{path}\" already exists (left by a crash, being written by another process, or planted): nothing was written; check it, do not trust its contents, remove it and retry")]
    TempExists { path: PathBuf },
    #[error("could not encode keyring file \"{path}\": {why}; the keyring was not changed")]
    Encode { path: PathBuf, why: String },
}

/// How a remote provider call failed, mapped per vendor onto the cases an
/// operator acts on differently.  The numbers cross the key worker's
/// library boundary (`tde_kms_call`), so they never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Options that do not make a client (also a missing credential file).
    BadOptions = 1,
    /// The provider refused the credentials (bad token, bad PIN, bad secret).
    Credentials = 2,
    /// No such master key.
    KeyNotFound = 3,
    /// Credentials accepted, but this operation on this key is not allowed.
    PermissionDenied = 4,
    /// Could not connect (refused, DNS, TLS handshake).
    Unreachable = 5,
    /// No answer within `tde.provider_timeout`.
    TimedOut = 6,
    /// The provider answered, but the blob does not unwrap under this key
    /// with this associated data (wrong key, or tampering).
    WrongKey = 7,
    /// Anything else the provider said.
    Other = 8,
}

impl Failure {
    pub fn code(self) -> i32 {
        self as i32
    }

    pub fn from_code(code: i32) -> Failure {
        match code {
            1 => Failure::BadOptions,
            2 => Failure::Credentials,
            3 => Failure::KeyNotFound,
            4 => Failure::PermissionDenied,
            5 => Failure::Unreachable,
            6 => Failure::TimedOut,
            7 => Failure::WrongKey,
            _ => Failure::Other,
        }
    }

    /// The case a local provider's error falls under.
    pub fn of(e: &ProviderError) -> Failure {
        match e {
            ProviderError::Remote { failure, .. } | ProviderError::Relayed { failure, .. } => *failure,
            ProviderError::BadOptions { .. } | ProviderError::UnknownKind(_) => Failure::BadOptions,
            ProviderError::KeyNotFound { .. } | ProviderError::EnvMissing(_) => Failure::KeyNotFound,
            ProviderError::WrongKey { .. } => Failure::WrongKey,
            ProviderError::InsecurePermissions { .. }
            | ProviderError::WrongOwner { .. }
            | ProviderError::InsecureDirectory { .. }
            | ProviderError::Symlink { .. } => Failure::PermissionDenied,
            _ => Failure::Other,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Failure::BadOptions => "invalid options",
            Failure::Credentials => "credentials refused",
            Failure::KeyNotFound => "master key not found",
            Failure::PermissionDenied => "permission denied",
            Failure::Unreachable => "unreachable",
            Failure::TimedOut => "timed out",
            Failure::WrongKey => "the key does not unwrap (wrong master key, or tampered)",
            Failure::Other => "failed",
        })
    }
}

/// The kinds this crate implements in-process; the others live in the key
/// worker's provider library (crates/tde-kms).
pub const LOCAL_KINDS: [&str; 2] = ["file", "env"];

/// What every master-key provider does.
pub trait MasterKeyProvider {
    /// Checks that the provider is reachable and accepts our credentials,
    /// without a key (used when a provider is added).  Local providers have
    /// nothing to reach.
    fn probe(&self) -> Result<(), ProviderError> {
        Ok(())
    }
    /// Makes sure `key_name` exists, creating it if the provider can.
    fn ensure_key(&self, key_name: &str) -> Result<(), ProviderError>;
    /// Wraps `kek` under master key `key_name` with associated data `aad`.
    fn wrap(&self, key_name: &str, kek: &WrapKey, aad: &[u8]) -> Result<Vec<u8>, ProviderError>;
    /// Unwraps what `wrap` produced.
    fn unwrap(&self, key_name: &str, blob: &[u8], aad: &[u8]) -> Result<WrapKey, ProviderError>;
}

/// Proves that master key `key_name` of `prov` works right now: a fresh
/// random key wrapped and unwrapped again, with associated data that no
/// real KEK uses, must come back the same.  Costs a wrap and an unwrap.
pub fn verify(prov: &dyn MasterKeyProvider, key_name: &str) -> Result<(), ProviderError> {
    let probe = WrapKey::generate().map_err(|_| ProviderError::Crypto)?;
    let aad = b"tde provider check v1";
    let blob = prov.wrap(key_name, &probe, aad)?;
    let back = prov.unwrap(key_name, &blob, aad)?;
    if back.expose() != probe.expose() {
        return Err(ProviderError::WrongKey { key: key_name.to_string() });
    }
    Ok(())
}

/// Validates a provider's kind and options and builds it.
pub fn from_config(kind: &str, options: &Value) -> Result<Box<dyn MasterKeyProvider>, ProviderError> {
    match kind {
        "file" => Ok(Box::new(FileProvider::from_options(options)?)),
        "env" => Ok(Box::new(EnvProvider::from_options(options)?)),
        other => Err(ProviderError::UnknownKind(other.to_string())),
    }
}

/// Reads the one string option `name` from `options`, refusing any other key.
fn single_string_option(kind: &str, options: &Value, name: &str) -> Result<String, ProviderError> {
    let bad = |why: String| ProviderError::BadOptions { kind: kind.into(), why };
    let obj: &Map<String, Value> = options.as_object().ok_or_else(|| bad("options must be a JSON object".into()))?;
    if let Some(extra) = obj.keys().find(|k| k.as_str() != name) {
        return Err(bad(format!("unknown option \"{extra}\" (expected only \"{name}\")")));
    }
    match obj.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(_) => Err(bad(format!("\"{name}\" must be a non-empty string"))),
        None => Err(bad(format!("missing \"{name}\""))),
    }
}

fn local_wrap(mek: &WrapKey, kek: &WrapKey, aad: &[u8]) -> Result<Vec<u8>, ProviderError> {
    wrap_wrap_key(mek, kek, aad).map(|b| b.to_vec()).map_err(|_| ProviderError::Crypto)
}

fn local_unwrap(mek: &WrapKey, key_name: &str, blob: &[u8], aad: &[u8]) -> Result<WrapKey, ProviderError> {
    unwrap_wrap_key(mek, blob, aad).map_err(|_| ProviderError::WrongKey { key: key_name.to_string() })
}

/// Largest keyring file read (one key is about 60 bytes plus its name).
const MAX_KEYRING_BYTES: u64 = 16 << 20;

/// The server's effective uid, the only owner a keyring (or its lock) may have.
fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// What `open(O_NOFOLLOW)` fails with on a symbolic link: `ELOOP` (Linux,
/// POSIX), `EMLINK` (FreeBSD).
fn is_symlink_errno(e: Errno) -> bool {
    e == Errno::LOOP || e == Errno::MLINK
}

/// Refuses anything but a regular file owned by the effective uid.
fn check_owned_regular(meta: &std::fs::Metadata, path: &Path) -> Result<(), ProviderError> {
    if !meta.file_type().is_file() {
        return Err(ProviderError::NotRegular { path: path.to_path_buf() });
    }
    let euid = euid();
    if meta.uid() != euid {
        return Err(ProviderError::WrongOwner { path: path.to_path_buf(), owner: meta.uid(), euid });
    }
    Ok(())
}

/// The `file` provider: a keyring of named keys in one JSON file.
///
/// See the module documentation for what it checks and guarantees.
pub struct FileProvider {
    path: PathBuf,
    /// `path`'s parent directory and file name: every file operation is made
    /// relative to the opened, checked directory.
    dir: PathBuf,
    name: OsString,
}

impl FileProvider {
    pub fn from_options(options: &Value) -> Result<FileProvider, ProviderError> {
        let bad = |why: &str| ProviderError::BadOptions { kind: "file".into(), why: why.into() };
        let path = PathBuf::from(single_string_option("file", options, "path")?);
        if !path.is_absolute() {
            return Err(bad("\"path\" must be absolute"));
        }
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(bad("\"path\" must name a file"));
        };
        let (dir, name) = (dir.to_path_buf(), name.to_os_string());
        Ok(FileProvider { path, dir, name })
    }

    /// `<name><suffix>` beside the keyring, as a name in its directory and as a path.
    fn sibling(&self, suffix: &str) -> (OsString, PathBuf) {
        let mut name = self.name.clone();
        name.push(suffix);
        let path = self.dir.join(&name);
        (name, path)
    }

    fn dir_error(&self, what: &'static str, source: std::io::Error) -> ProviderError {
        ProviderError::FileIo { what, path: self.dir.clone(), source }
    }

    /// Opens the keyring's directory and checks its mode: not writable by
    /// group or others, unless sticky.  `None` if it does not exist.
    fn open_dir(&self) -> Result<Option<File>, ProviderError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let dir = match rustix::fs::open(&self.dir, flags, Mode::empty()) {
            Ok(fd) => File::from(fd),
            Err(e) if e == Errno::NOENT => return Ok(None),
            Err(e) => return Err(self.dir_error("open the keyring's directory", e.into())),
        };
        let meta = dir.metadata().map_err(|e| self.dir_error("stat the keyring's directory", e))?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(ProviderError::InsecureDirectory { path: self.dir.clone(), mode });
        }
        Ok(Some(dir))
    }

    /// Like `open_dir`, but a missing directory is an error.
    fn open_existing_dir(&self) -> Result<File, ProviderError> {
        self.open_dir()?
            .ok_or_else(|| self.dir_error("open the keyring's directory", std::io::ErrorKind::NotFound.into()))
    }

    /// Reads the keyring; a missing file (or directory) is an empty keyring.
    fn read(&self) -> Result<Keyring, ProviderError> {
        match self.open_dir()? {
            Some(dir) => self.read_in(&dir),
            None => Ok(Keyring::default()),
        }
    }

    /// Opens the keyring in `dir` once, checks the opened file (regular, ours,
    /// mode 0600 or stricter) and reads it from the same descriptor.
    fn read_in(&self, dir: &File) -> Result<Keyring, ProviderError> {
        let io = |what, source| ProviderError::Io { what, path: self.path.clone(), source };
        // NONBLOCK: opening a FIFO must not hang (it is then refused as not regular).
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        let file = match rustix::fs::openat(dir, &self.name, flags, Mode::empty()) {
            Ok(fd) => File::from(fd),
            Err(e) if e == Errno::NOENT => return Ok(Keyring::default()),
            Err(e) if is_symlink_errno(e) => return Err(ProviderError::Symlink { path: self.path.clone() }),
            Err(e) => return Err(io("open", e.into())),
        };
        let meta = file.metadata().map_err(|e| io("stat", e))?;
        check_owned_regular(&meta, &self.path)?;
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ProviderError::InsecurePermissions { path: self.path.clone(), mode });
        }
        let text = self.read_all(&file, meta.size())?;
        Keyring::parse(&text, &self.path)
    }

    /// All of `file` (`size` bytes by fstat) into one zeroizing buffer
    /// allocated once.  The keyring is never written in place, so a size
    /// change while reading is refused rather than followed.
    fn read_all(&self, mut file: &File, size: u64) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        let malformed = |why: &str| ProviderError::Malformed { path: self.path.clone(), why: why.into() };
        if size > MAX_KEYRING_BYTES {
            return Err(malformed("larger than 16 MiB"));
        }
        let mut buf = Zeroizing::new(vec![0u8; size as usize + 1]);
        let mut n = 0;
        loop {
            match file.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => {
                    n += k;
                    if n == buf.len() {
                        return Err(malformed("it grew while being read"));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ProviderError::Io { what: "read", path: self.path.clone(), source: e }),
            }
        }
        buf.truncate(n);
        Ok(buf)
    }

    /// Takes the exclusive lock for a read-modify-write of the keyring:
    /// `flock(LOCK_EX)` on `<path>.lock`, held until the returned file is
    /// dropped.  The lock file is created 0600, never followed if it is a
    /// link, and never removed.
    fn lock_in(&self, dir: &File) -> Result<File, ProviderError> {
        let (name, path) = self.sibling(".lock");
        let flags = OFlags::RDONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let file = match rustix::fs::openat(dir, &name, flags, Mode::RUSR | Mode::WUSR) {
            Ok(fd) => File::from(fd),
            Err(e) if is_symlink_errno(e) => return Err(ProviderError::Symlink { path }),
            Err(e) => return Err(ProviderError::FileIo { what: "open the lock file", path, source: e.into() }),
        };
        let meta = file.metadata().map_err(|e| ProviderError::FileIo {
            what: "stat the lock file",
            path: path.clone(),
            source: e,
        })?;
        check_owned_regular(&meta, &path)?;
        loop {
            match rustix::fs::flock(&file, FlockOperation::LockExclusive) {
                Ok(()) => return Ok(file),
                Err(e) if e == Errno::INTR => {}
                Err(e) => return Err(ProviderError::FileIo { what: "lock", path, source: e.into() }),
            }
        }
    }

    /// Replaces the keyring in `dir` with `bytes`: `<path>.tmp` created
    /// exclusively (never an existing file, never through a link) with mode
    /// 0600, written, fsynced, renamed over the keyring; then the directory
    /// is fsynced.  The caller holds the lock.
    fn write_in(&self, dir: &File, bytes: &[u8]) -> Result<(), ProviderError> {
        let (tmp_name, tmp_path) = self.sibling(".tmp");
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut tmp = match rustix::fs::openat(dir, &tmp_name, flags, Mode::RUSR | Mode::WUSR) {
            Ok(fd) => File::from(fd),
            Err(e) if e == Errno::EXIST || is_symlink_errno(e) => {
                return Err(ProviderError::TempExists { path: tmp_path });
            }
            Err(e) => {
                return Err(ProviderError::FileIo {
                    what: "create the temporary keyring file",
                    path: tmp_path,
                    source: e.into(),
                })
            }
        };
        let tmp_error = |what, source| ProviderError::FileIo { what, path: tmp_path.clone(), source };
        let written = tmp
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| tmp_error("set the mode of", e))
            .and_then(|()| tmp.write_all(bytes).map_err(|e| tmp_error("write", e)))
            .and_then(|()| tmp.sync_all().map_err(|e| tmp_error("fsync", e)));
        drop(tmp);
        let renamed = written.and_then(|()| {
            rustix::fs::renameat(dir, &tmp_name, dir, &self.name).map_err(|e| ProviderError::Io {
                what: "rename the new version over",
                path: self.path.clone(),
                source: e.into(),
            })
        });
        if let Err(e) = renamed {
            // We created this file exclusively and the directory admits no
            // one else's renames (see `open_dir`): it is still ours to remove.
            let _ = rustix::fs::unlinkat(dir, &tmp_name, AtFlags::empty());
            return Err(e);
        }
        dir.sync_all().map_err(|e| self.dir_error("fsync the keyring's directory", e))
    }

    fn key(&self, key_name: &str) -> Result<WrapKey, ProviderError> {
        self.read()?.get(key_name).ok_or_else(|| ProviderError::KeyNotFound {
            key: key_name.into(),
            place: format!("keyring file \"{}\"", self.path.display()),
        })
    }
}

impl MasterKeyProvider for FileProvider {
    fn ensure_key(&self, key_name: &str) -> Result<(), ProviderError> {
        let dir = self.open_existing_dir()?;
        // Without the lock first: most calls find the key.
        if self.read_in(&dir)?.contains(key_name) {
            return Ok(());
        }
        let _lock = self.lock_in(&dir)?;
        // Again under the lock: another process may have written meanwhile.
        let mut ring = self.read_in(&dir)?;
        if ring.contains(key_name) {
            return Ok(());
        }
        let key = WrapKey::generate().map_err(|_| ProviderError::Crypto)?;
        ring.keys.insert(key_name.to_string(), Zeroizing::new(B64.encode(key.expose())));
        let bytes = ring.encode(&self.path)?;
        self.write_in(&dir, &bytes)
    }

    fn wrap(&self, key_name: &str, kek: &WrapKey, aad: &[u8]) -> Result<Vec<u8>, ProviderError> {
        local_wrap(&self.key(key_name)?, kek, aad)
    }

    fn unwrap(&self, key_name: &str, blob: &[u8], aad: &[u8]) -> Result<WrapKey, ProviderError> {
        local_unwrap(&self.key(key_name)?, key_name, blob, aad)
    }
}

/// Decodes one keyring value; `None` unless it is base64 for exactly 32
/// bytes.  Decodes into a zeroizing stack buffer, not the heap.
fn decode_key(b64: &str) -> Option<WrapKey> {
    if b64.len() > 64 {
        return None;
    }
    let mut raw = Zeroizing::new([0u8; 48]);
    let n = B64.decode_slice(b64.as_bytes(), &mut raw[..]).ok()?;
    WrapKey::from_bytes(&raw[..n]).ok()
}

/// `{"version": 1, "keys": {"name": "<base64 32 bytes>", ...}}`
///
/// Parsed with serde straight into `Zeroizing<String>` values (no
/// `serde_json::Value` in between), encoded by hand into one zeroizing
/// buffer; see the module documentation for what may remain in memory.
#[derive(Default, PartialEq)]
struct Keyring {
    keys: BTreeMap<String, Zeroizing<String>>,
}

/// The file as serde reads it.  Unknown fields are ignored; `version`, when
/// present, must be 1.
#[derive(serde::Deserialize)]
struct KeyringDoc {
    #[serde(default)]
    version: Option<u64>,
    keys: KeyMap,
}

/// The `keys` object.  A repeated name is recorded, not a serde error, so
/// that the message is ours (serde's may quote a value).
#[derive(Default)]
struct KeyMap {
    keys: BTreeMap<String, Zeroizing<String>>,
    duplicate: Option<String>,
}

impl<'de> Deserialize<'de> for KeyMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<KeyMap, D::Error> {
        struct KeyMapVisitor;
        impl<'de> Visitor<'de> for KeyMapVisitor {
            type Value = KeyMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of named base64 keys")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<KeyMap, A::Error> {
                let mut map = KeyMap::default();
                while let Some(name) = access.next_key::<String>()? {
                    let SecretString(value) = access.next_value()?;
                    match map.keys.entry(name) {
                        Entry::Vacant(slot) => {
                            slot.insert(value);
                        }
                        Entry::Occupied(seen) => {
                            map.duplicate.get_or_insert_with(|| seen.key().clone());
                        }
                    }
                }
                Ok(map)
            }
        }
        deserializer.deserialize_map(KeyMapVisitor)
    }
}

/// A JSON string copied once, at its exact length, into a `Zeroizing<String>`.
struct SecretString(Zeroizing<String>);

impl<'de> Deserialize<'de> for SecretString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SecretString, D::Error> {
        struct SecretVisitor;
        impl Visitor<'_> for SecretVisitor {
            type Value = SecretString;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a base64 string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SecretString, E> {
                Ok(SecretString(Zeroizing::new(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<SecretString, E> {
                Ok(SecretString(Zeroizing::new(v)))
            }
        }
        deserializer.deserialize_str(SecretVisitor)
    }
}

impl Keyring {
    fn parse(text: &[u8], path: &Path) -> Result<Keyring, ProviderError> {
        let bad = |why: String| ProviderError::Malformed { path: path.to_path_buf(), why };
        // serde_json's messages may quote the offending value, which could be
        // key material: say only what kind of error and where.
        let doc: KeyringDoc = serde_json::from_slice(text).map_err(|e| {
            let what = match e.classify() {
                serde_json::error::Category::Data => {
                    "it is not of the form {\"version\": 1, \"keys\": {\"name\": \"<base64>\", ...}}"
                }
                serde_json::error::Category::Eof => "it ends early (not valid JSON)",
                _ => "not valid JSON",
            };
            bad(format!("{what} (line {}, column {})", e.line(), e.column()))
        })?;
        if let Some(v) = doc.version.filter(|&v| v != 1) {
            return Err(bad(format!("unsupported version {v} (expected 1)")));
        }
        if let Some(name) = &doc.keys.duplicate {
            return Err(bad(format!("key {name:?} appears more than once")));
        }
        if let Some(name) = doc.keys.keys.iter().find(|(_, v)| decode_key(v).is_none()).map(|(k, _)| k) {
            return Err(bad(format!("key {name:?} is not a base64-encoded 32-byte key")));
        }
        Ok(Keyring { keys: doc.keys.keys })
    }

    fn contains(&self, name: &str) -> bool {
        self.keys.contains_key(name)
    }

    fn get(&self, name: &str) -> Option<WrapKey> {
        decode_key(self.keys.get(name)?)
    }

    /// The file's bytes, in one zeroizing buffer allocated once at its final
    /// size.  Refuses (rather than writing a short or empty keyring) a value
    /// that is not a base64 32-byte key, and checks that the result reads
    /// back as exactly this keyring.
    fn encode(&self, path: &Path) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        const HEAD: &[u8] = b"{\n  \"version\": 1,\n  \"keys\": {";
        const FIRST: &[u8] = b"\n    ";
        const NEXT: &[u8] = b",\n    ";
        const TAIL: &[u8] = b"\n  }\n}\n";
        const EMPTY_TAIL: &[u8] = b"}\n}\n";
        let bad = |why: String| ProviderError::Encode { path: path.to_path_buf(), why };
        let is_b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=';
        // Names are not secret: escape them first, into ordinary buffers.
        let mut names = Vec::with_capacity(self.keys.len());
        let mut len = HEAD.len() + TAIL.len();
        for (name, value) in &self.keys {
            if !value.bytes().all(is_b64) || decode_key(value).is_none() {
                return Err(bad(format!("key {name:?} is not a base64-encoded 32-byte key")));
            }
            let escaped = serde_json::to_vec(name).map_err(|_| bad(format!("key name {name:?} cannot be encoded")))?;
            len += NEXT.len() + escaped.len() + b": \"".len() + value.len() + 1;
            names.push(escaped);
        }
        let mut out = Zeroizing::new(Vec::with_capacity(len));
        let (start, capacity) = (out.as_ptr(), out.capacity());
        out.extend_from_slice(HEAD);
        for (i, (value, name)) in self.keys.values().zip(&names).enumerate() {
            out.extend_from_slice(if i == 0 { FIRST } else { NEXT });
            out.extend_from_slice(name);
            out.extend_from_slice(b": \"");
            out.extend_from_slice(value.as_bytes());
            out.push(b'"');
        }
        out.extend_from_slice(if self.keys.is_empty() { EMPTY_TAIL } else { TAIL });
        if out.as_ptr() != start || out.capacity() != capacity {
            return Err(bad("internal error: the buffer was reallocated".into()));
        }
        match Keyring::parse(&out, path) {
            Ok(back) if back == *self => Ok(out),
            _ => Err(bad("internal error: the encoded keyring does not read back the same".into())),
        }
    }
}

/// The `env` provider: one key in an environment variable of the server.
pub struct EnvProvider {
    variable: String,
}

impl EnvProvider {
    pub fn from_options(options: &Value) -> Result<EnvProvider, ProviderError> {
        Ok(EnvProvider { variable: single_string_option("env", options, "variable")? })
    }

    fn key(&self) -> Result<WrapKey, ProviderError> {
        let captured = captured_env(&self.variable);
        let val = match captured {
            Some(v) => v,
            None => Zeroizing::new(
                std::env::var(&self.variable).map_err(|_| ProviderError::EnvMissing(self.variable.clone()))?,
            ),
        };
        let raw = Zeroizing::new(
            B64.decode(val.trim().as_bytes()).map_err(|_| ProviderError::EnvMalformed(self.variable.clone()))?,
        );
        WrapKey::from_bytes(&raw).map_err(|_| ProviderError::EnvMalformed(self.variable.clone()))
    }
}

/// Values of `env` provider variables taken out of the process environment
/// by [`capture_env_variable`].
static CAPTURED_ENV: std::sync::Mutex<BTreeMap<String, Zeroizing<String>>> = std::sync::Mutex::new(BTreeMap::new());

fn captured_env(name: &str) -> Option<Zeroizing<String>> {
    let map = CAPTURED_ENV.lock().unwrap_or_else(|p| p.into_inner());
    map.get(name).map(|v| Zeroizing::new(v.as_str().to_string()))
}

/// Moves the variable `name` from the process environment into this
/// process's memory, where [`EnvProvider`] finds it.  Called by the server's
/// first process (the postmaster) at start-up for every `env` provider it
/// knows: its children inherit the memory, but programs it or they start
/// (`archive_command`, `COPY ... TO PROGRAM`) no longer inherit the master
/// key.  Returns whether the variable was there.
pub fn capture_env_variable(name: &str) -> bool {
    let Ok(value) = std::env::var(name) else {
        return captured_env(name).is_some();
    };
    CAPTURED_ENV.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), Zeroizing::new(value));
    std::env::remove_var(name);
    true
}

impl MasterKeyProvider for EnvProvider {
    fn ensure_key(&self, _key_name: &str) -> Result<(), ProviderError> {
        self.key().map(|_| ())
    }

    fn wrap(&self, _key_name: &str, kek: &WrapKey, aad: &[u8]) -> Result<Vec<u8>, ProviderError> {
        local_wrap(&self.key()?, kek, aad)
    }

    fn unwrap(&self, key_name: &str, blob: &[u8], aad: &[u8]) -> Result<WrapKey, ProviderError> {
        local_unwrap(&self.key()?, key_name, blob, aad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;
    use std::fs;
    use std::os::unix::fs::OpenOptionsExt;

    /// A provider whose unwrap returns another key: `verify` must notice.
    struct Forgetful;
    impl MasterKeyProvider for Forgetful {
        fn ensure_key(&self, _: &str) -> Result<(), ProviderError> {
            Ok(())
        }
        fn wrap(&self, _: &str, _: &WrapKey, _: &[u8]) -> Result<Vec<u8>, ProviderError> {
            Ok(vec![0u8; 60])
        }
        fn unwrap(&self, _: &str, _: &[u8], _: &[u8]) -> Result<WrapKey, ProviderError> {
            WrapKey::from_bytes(&[1u8; 32]).map_err(|_| ProviderError::Crypto)
        }
    }

    #[test]
    fn verify_needs_a_real_round_trip() {
        assert!(matches!(verify(&Forgetful, "k"), Err(ProviderError::WrongKey { .. })));
        let d = tmpdir("verify");
        let p = provider(&d.join("ring"));
        assert!(verify(&p, "mek").is_err(), "a key the keyring does not have");
        p.ensure_key("mek").unwrap();
        verify(&p, "mek").unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    /// A private (0700) directory for one test, under the sticky temp dir.
    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tde-prov-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        d
    }

    fn provider(path: &Path) -> FileProvider {
        FileProvider::from_options(&json!({ "path": path })).unwrap()
    }

    fn write_file(path: &Path, bytes: &[u8], mode: u32) {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).unwrap();
        f.write_all(bytes).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn b64_key(byte: u8) -> String {
        B64.encode([byte; 32])
    }

    #[test]
    fn file_provider_creates_keyring_0600_and_round_trips() {
        let d = tmpdir("create");
        let path = d.join("keyring");
        let p = FileProvider::from_options(&json!({"path": path})).unwrap();
        p.ensure_key("mek-1").unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let kek = WrapKey::generate().unwrap();
        let blob = p.wrap("mek-1", &kek, b"aad").unwrap();
        let back = p.unwrap("mek-1", &blob, b"aad").unwrap();
        assert_eq!(back.expose(), kek.expose());
        // ensure_key is idempotent: the key is not replaced.
        p.ensure_key("mek-1").unwrap();
        assert!(p.unwrap("mek-1", &blob, b"aad").is_ok());
        // a second key does not disturb the first
        p.ensure_key("mek-2").unwrap();
        assert!(p.unwrap("mek-1", &blob, b"aad").is_ok());
        assert!(matches!(p.unwrap("mek-2", &blob, b"aad"), Err(ProviderError::WrongKey { .. })));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn file_provider_refuses_group_readable_keyring() {
        let d = tmpdir("perm");
        let path = d.join("keyring");
        let p = FileProvider::from_options(&json!({"path": path})).unwrap();
        p.ensure_key("k").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = p.ensure_key("k").unwrap_err();
        assert!(matches!(err, ProviderError::InsecurePermissions { mode: 0o640, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_key_and_wrong_aad() {
        let d = tmpdir("missing");
        let p = FileProvider::from_options(&json!({"path": d.join("ring")})).unwrap();
        let kek = WrapKey::generate().unwrap();
        assert!(matches!(p.wrap("nope", &kek, b""), Err(ProviderError::KeyNotFound { .. })));
        p.ensure_key("k").unwrap();
        let blob = p.wrap("k", &kek, b"one").unwrap();
        assert!(matches!(p.unwrap("k", &blob, b"two"), Err(ProviderError::WrongKey { .. })));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn options_are_validated() {
        for (kind, opts) in [
            ("file", json!("x")),
            ("file", json!({})),
            ("file", json!({"path": "relative"})),
            ("file", json!({"path": "/x", "extra": 1})),
            ("file", json!({"path": 5})),
            ("env", json!({"path": "/x"})),
            ("env", json!({"variable": ""})),
        ] {
            assert!(matches!(from_config(kind, &opts), Err(ProviderError::BadOptions { .. })), "{kind} {opts}");
        }
        assert!(matches!(from_config("kms", &json!({})), Err(ProviderError::UnknownKind(_))));
    }

    #[test]
    fn env_provider() {
        let var = format!("TDE_TEST_MEK_{}", std::process::id());
        let p = EnvProvider::from_options(&json!({"variable": var})).unwrap();
        assert!(matches!(p.ensure_key("x"), Err(ProviderError::EnvMissing(_))));
        std::env::set_var(&var, "not base64!");
        assert!(matches!(p.ensure_key("x"), Err(ProviderError::EnvMalformed(_))));
        std::env::set_var(&var, B64.encode([7u8; 16]));
        assert!(matches!(p.ensure_key("x"), Err(ProviderError::EnvMalformed(_))));
        std::env::set_var(&var, B64.encode([7u8; 32]));
        p.ensure_key("x").unwrap();
        let kek = WrapKey::generate().unwrap();
        let blob = p.wrap("x", &kek, b"a").unwrap();
        assert_eq!(p.unwrap("x", &blob, b"a").unwrap().expose(), kek.expose());
        std::env::remove_var(&var);
    }

    #[test]
    fn captured_variable_leaves_the_environment_and_still_serves() {
        let var = format!("TDE_TEST_MEK_CAPTURE_{}", std::process::id());
        std::env::set_var(&var, B64.encode([9u8; 32]));
        let p = EnvProvider::from_options(&json!({"variable": var})).unwrap();
        let kek = WrapKey::generate().unwrap();
        let blob = p.wrap("x", &kek, b"a").unwrap();
        assert!(capture_env_variable(&var));
        assert!(std::env::var(&var).is_err(), "child programs must not inherit the master key");
        assert_eq!(p.unwrap("x", &blob, b"a").unwrap().expose(), kek.expose());
        assert!(capture_env_variable(&var), "capturing twice keeps the value");
        assert!(!capture_env_variable("TDE_TEST_NO_SUCH_VARIABLE_AT_ALL"));
    }

    #[test]
    fn errors_never_contain_key_bytes() {
        let var = format!("TDE_TEST_MEK2_{}", std::process::id());
        let secret = B64.encode([0x41u8; 20]);
        std::env::set_var(&var, &secret);
        let p = EnvProvider::from_options(&json!({"variable": var})).unwrap();
        let msg = p.ensure_key("x").unwrap_err().to_string();
        assert!(!msg.contains(&secret), "{msg}");
        std::env::remove_var(&var);
    }

    #[test]
    fn keyring_symlink_is_refused_not_followed() {
        let d = tmpdir("symlink");
        let real = d.join("real");
        provider(&real).ensure_key("k").unwrap();
        let link = d.join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let p = provider(&link);
        let kek = WrapKey::generate().unwrap();
        let err = p.wrap("k", &kek, b"").unwrap_err();
        assert!(matches!(&err, ProviderError::Symlink { path } if *path == link), "{err}");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(matches!(p.ensure_key("k2"), Err(ProviderError::Symlink { .. })));
        // the link is still a link to the untouched real keyring
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert!(!provider(&real).read().unwrap().contains("k2"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn keyring_must_be_a_regular_file() {
        let d = tmpdir("notreg");
        let as_dir = d.join("dir");
        fs::create_dir(&as_dir).unwrap();
        fs::set_permissions(&as_dir, fs::Permissions::from_mode(0o700)).unwrap();
        let err = provider(&as_dir).ensure_key("k").unwrap_err();
        assert!(matches!(err, ProviderError::NotRegular { .. }), "{err}");
        // A FIFO (mode 0600, ours) is refused at once instead of blocking the open.
        let fifo = d.join("fifo");
        rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, Mode::RUSR | Mode::WUSR, 0).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let fifo2 = fifo.clone();
        std::thread::spawn(move || {
            let kek = WrapKey::generate().unwrap();
            let _ = tx.send(provider(&fifo2).wrap("k", &kek, b"").map(|_| ()));
        });
        let res = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("opening a FIFO keyring hung");
        assert!(matches!(res, Err(ProviderError::NotRegular { .. })), "{res:?}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn keyring_owned_by_another_uid_is_refused() {
        if euid() != 0 {
            eprintln!("skipped: only root can give a file to another uid");
            return;
        }
        let d = tmpdir("owner");
        let path = d.join("keyring");
        let p = provider(&path);
        p.ensure_key("k").unwrap();
        std::os::unix::fs::chown(&path, Some(54321), None).unwrap();
        let kek = WrapKey::generate().unwrap();
        let err = p.wrap("k", &kek, b"").unwrap_err();
        assert!(matches!(err, ProviderError::WrongOwner { owner: 54321, euid: 0, .. }), "{err}");
        assert!(matches!(p.ensure_key("k"), Err(ProviderError::WrongOwner { .. })));
        // the lock file, too, must be ours
        std::os::unix::fs::chown(&path, Some(0), None).unwrap();
        let lock = d.join("keyring.lock");
        std::os::unix::fs::chown(&lock, Some(54321), None).unwrap();
        let err = p.ensure_key("k2").unwrap_err();
        assert!(matches!(&err, ProviderError::WrongOwner { path, .. } if *path == lock), "{err}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn parent_directory_writable_by_others_is_refused_unless_sticky() {
        let d = tmpdir("dirmode");
        let path = d.join("keyring");
        let p = provider(&path);
        p.ensure_key("k").unwrap();
        let kek = WrapKey::generate().unwrap();
        for mode in [0o770, 0o707, 0o777] {
            fs::set_permissions(&d, fs::Permissions::from_mode(mode)).unwrap();
            let err = p.wrap("k", &kek, b"").unwrap_err();
            assert!(
                matches!(&err, ProviderError::InsecureDirectory { path, mode: m } if *path == d && *m == mode),
                "{err}"
            );
            assert!(matches!(p.ensure_key("k2"), Err(ProviderError::InsecureDirectory { .. })));
        }
        // sticky, like /tmp: allowed
        fs::set_permissions(&d, fs::Permissions::from_mode(0o1777)).unwrap();
        p.wrap("k", &kek, b"").unwrap();
        p.ensure_key("k2").unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        p.wrap("k2", &kek, b"").unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn planted_temp_symlink_receives_no_key() {
        let d = tmpdir("tmplink");
        let path = d.join("keyring");
        let p = provider(&path);
        p.ensure_key("old").unwrap();
        let before = fs::read(&path).unwrap();
        let victim = d.join("victim");
        write_file(&victim, b"", 0o644);
        let tmp = d.join("keyring.tmp");
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let err = p.ensure_key("new").unwrap_err();
        assert!(matches!(&err, ProviderError::TempExists { path } if *path == tmp), "{err}");
        assert!(err.to_string().contains(&*tmp.to_string_lossy()), "{err}");
        assert_eq!(fs::read(&victim).unwrap(), b"", "key bytes were written through the planted link");
        assert!(fs::symlink_metadata(&tmp).unwrap().file_type().is_symlink(), "the planted link was removed");
        assert_eq!(fs::read(&path).unwrap(), before, "the keyring changed");
        // A planted regular file is refused the same way, and left alone.
        fs::remove_file(&tmp).unwrap();
        write_file(&tmp, b"planted", 0o666);
        assert!(matches!(p.ensure_key("new"), Err(ProviderError::TempExists { .. })));
        assert_eq!(fs::read(&tmp).unwrap(), b"planted");
        // Once the operator removes it, all is well.
        fs::remove_file(&tmp).unwrap();
        p.ensure_key("new").unwrap();
        assert!(!tmp.exists());
        let ring = p.read().unwrap();
        assert!(ring.contains("old") && ring.contains("new"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn planted_lock_symlink_is_refused() {
        let d = tmpdir("locklink");
        let path = d.join("keyring");
        let victim = d.join("victim");
        std::os::unix::fs::symlink(&victim, d.join("keyring.lock")).unwrap();
        let err = provider(&path).ensure_key("k").unwrap_err();
        assert!(matches!(err, ProviderError::Symlink { .. }), "{err}");
        assert!(!victim.exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn concurrent_ensure_key_loses_no_key() {
        const THREADS: usize = 8;
        const KEYS_EACH: usize = 4;
        let d = tmpdir("concurrent");
        let path = d.join("keyring");
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    // Each thread its own provider: only the file is shared.
                    let p = provider(&path);
                    barrier.wait();
                    for k in 0..KEYS_EACH {
                        p.ensure_key(&format!("mek-{t}-{k}")).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let ring = provider(&path).read().unwrap();
        for t in 0..THREADS {
            for k in 0..KEYS_EACH {
                assert!(ring.contains(&format!("mek-{t}-{k}")), "mek-{t}-{k} was lost");
            }
        }
        assert_eq!(ring.keys.len(), THREADS * KEYS_EACH);
        assert!(!d.join("keyring.tmp").exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn keyring_round_trips_several_keys_and_odd_names() {
        let path = Path::new("/nonexistent/keyring");
        let odd = "we\"ird \\ name \u{e9}\u{1F511} \n\t\u{0}/";
        let mut ring = Keyring::default();
        for (i, name) in ["a", "b", "mek-1", "", odd].into_iter().enumerate() {
            ring.keys.insert(name.to_string(), Zeroizing::new(b64_key(i as u8 + 1)));
        }
        let bytes = ring.encode(path).unwrap();
        let back = Keyring::parse(&bytes, path).unwrap();
        assert!(back == ring);
        assert_eq!(back.get(odd).unwrap().expose(), &[5u8; 32]);
        assert_eq!(back.get("").unwrap().expose(), &[4u8; 32]);
        // the output is plain JSON that another reader understands
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["keys"][odd], b64_key(5));
        assert_eq!(v["keys"].as_object().unwrap().len(), 5);
        // the empty keyring, too
        let empty = Keyring::default().encode(path).unwrap();
        assert!(Keyring::parse(&empty, path).unwrap().keys.is_empty());
        // and through the provider, on disk
        let d = tmpdir("oddnames");
        let p = provider(&d.join("keyring"));
        let kek = WrapKey::generate().unwrap();
        p.ensure_key(odd).unwrap();
        p.ensure_key("plain").unwrap();
        let blob = p.wrap(odd, &kek, b"aad").unwrap();
        assert_eq!(provider(&d.join("keyring")).unwrap(odd, &blob, b"aad").unwrap().expose(), kek.expose());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn reads_keyrings_written_by_earlier_versions() {
        // serde_json's pretty form (what this provider wrote before), compact
        // form, escaped base64, no "version", extra fields.
        let k1 = b64_key(1);
        let escaped = k1.replace('A', "\\u0041");
        for text in [
            serde_json::to_string_pretty(&json!({"version": 1, "keys": {"a": k1}})).unwrap(),
            format!(r#"{{"version":1,"keys":{{"a":"{k1}"}}}}"#),
            format!(r#"{{"keys": {{"a": "{escaped}"}}, "comment": ["x", 1]}}"#),
        ] {
            let ring = Keyring::parse(text.as_bytes(), Path::new("/k")).unwrap();
            assert_eq!(ring.get("a").unwrap().expose(), &[1u8; 32], "{text}");
        }
    }

    #[test]
    fn malformed_keyring_is_refused_not_replaced() {
        let d = tmpdir("malformed");
        let path = d.join("keyring");
        let p = provider(&path);
        let short = B64.encode(b"short");
        let cases = [
            format!(r#"{{"version":1,"keys":{{"k":"{short}"}}}}"#),
            r#"{"version":1,"keys":{"k":"not base64!"}}"#.to_string(),
            r#"{"version":1,"keys":{"k":5}}"#.to_string(),
            format!(r#"{{"version":2,"keys":{{"k":"{}"}}}}"#, b64_key(1)),
            r#"{"version":1}"#.to_string(),
            r#"{"version":1,"keys":{"k":"#.to_string(),
            String::new(),
        ];
        for text in cases {
            let _ = fs::remove_file(&path);
            write_file(&path, text.as_bytes(), 0o600);
            let err = p.ensure_key("k").unwrap_err();
            assert!(matches!(err, ProviderError::Malformed { .. }), "{text}: {err}");
            assert!(matches!(p.ensure_key("other"), Err(ProviderError::Malformed { .. })), "{text}");
            assert_eq!(fs::read(&path).unwrap(), text.as_bytes(), "the keyring was rewritten");
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn parse_errors_name_no_key_material() {
        let (k1, k2) = (b64_key(0x41), b64_key(0x42));
        let path = Path::new("/k");
        let cases = [
            format!(r#"{{"version":1,"keys":{{"dup":"{k1}","dup":"{k2}"}}}}"#),
            format!(r#"{{"version":"{k1}","keys":{{}}}}"#),
            format!(r#"{{"version":1,"keys":["{k1}"]}}"#),
            format!(r#"{{"version":1,"keys":{{"k":"{k1}" "{k2}"}}}}"#),
            format!(r#"{{"version":1,"keys":{{"k":"{}"}}}}"#, &k1[..40]),
        ];
        for text in cases {
            let err = Keyring::parse(text.as_bytes(), path).err().unwrap_or_else(|| panic!("{text} parsed"));
            let msg = err.to_string();
            assert!(matches!(err, ProviderError::Malformed { .. }), "{msg}");
            assert!(!msg.contains(&k1[..20]) && !msg.contains(&k2[..20]), "{msg}");
        }
        let msg = Keyring::parse(format!(r#"{{"version":1,"keys":{{"dup":"{k1}","dup":"{k2}"}}}}"#).as_bytes(), path)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("\"dup\" appears more than once"), "{msg}");
    }

    #[test]
    fn encode_refuses_bad_values_instead_of_writing_empty() {
        let path = Path::new("/k");
        for bad in ["with \"quote", "c2hvcnQ=", ""] {
            let mut ring = Keyring::default();
            ring.keys.insert("good".into(), Zeroizing::new(b64_key(1)));
            ring.keys.insert("bad".into(), Zeroizing::new(bad.to_string()));
            let err = ring.encode(path).err().unwrap_or_else(|| panic!("{bad:?} encoded"));
            assert!(matches!(err, ProviderError::Encode { .. }), "{err}");
            assert!(err.to_string().contains("\"bad\""), "{err}");
            assert!(!err.to_string().contains(&b64_key(1)), "{err}");
        }
    }
}
