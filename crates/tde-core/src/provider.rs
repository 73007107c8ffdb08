//! Master-key providers: where a master key (MEK) comes from.
//!
//! Why it is built this way: every provider, local or remote, does the same
//! two things for us, wrap and unwrap the cluster's key-encryption key (KEK).
//! A KMS or HSM never hands out the master key; the local providers below
//! (`file`, `env`) hold it in this process only for the length of one call.
//! Later providers (AWS KMS, Vault Transit, PKCS#11, KMIP) implement the same
//! trait, one file each.
//!
//! - `file`: `{"path": "/abs/keyring"}`, a JSON keyring of named 32-byte keys,
//!   mode 0600.  A key is created with random bytes on first use.  A keyring
//!   readable by group or others is refused.
//! - `env`: `{"variable": "NAME"}`, the variable holds a base64 32-byte key;
//!   the key name is only a label.

use crate::secret::WrapKey;
use crate::wrap::{unwrap_wrap_key, wrap_wrap_key};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("invalid options for key provider kind \"{kind}\": {why}")]
    BadOptions { kind: String, why: String },
    #[error("unknown key provider kind \"{0}\" (supported: file, env)")]
    UnknownKind(String),
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
}

/// What every master-key provider does.
pub trait MasterKeyProvider {
    /// Makes sure `key_name` exists, creating it if the provider can.
    fn ensure_key(&self, key_name: &str) -> Result<(), ProviderError>;
    /// Wraps `kek` under master key `key_name` with associated data `aad`.
    fn wrap(&self, key_name: &str, kek: &WrapKey, aad: &[u8]) -> Result<Vec<u8>, ProviderError>;
    /// Unwraps what `wrap` produced.
    fn unwrap(&self, key_name: &str, blob: &[u8], aad: &[u8]) -> Result<WrapKey, ProviderError>;
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

/// The `file` provider: a keyring of named keys in one JSON file.
pub struct FileProvider {
    path: PathBuf,
}

impl FileProvider {
    pub fn from_options(options: &Value) -> Result<FileProvider, ProviderError> {
        let path = PathBuf::from(single_string_option("file", options, "path")?);
        if !path.is_absolute() {
            return Err(ProviderError::BadOptions { kind: "file".into(), why: "\"path\" must be absolute".into() });
        }
        Ok(FileProvider { path })
    }

    /// Reads the keyring; a missing file is an empty keyring.
    fn read(&self) -> Result<Keyring, ProviderError> {
        let io = |what, source| ProviderError::Io { what, path: self.path.clone(), source };
        let meta = match fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Keyring::default()),
            Err(e) => return Err(io("stat", e)),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ProviderError::InsecurePermissions { path: self.path.clone(), mode });
        }
        let text = Zeroizing::new(fs::read(&self.path).map_err(|e| io("read", e))?);
        Keyring::parse(&text, &self.path)
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
        let mut ring = self.read()?;
        if ring.get(key_name).is_some() {
            return Ok(());
        }
        let key = WrapKey::generate().map_err(|_| ProviderError::Crypto)?;
        ring.keys.insert(key_name.to_string(), Zeroizing::new(B64.encode(key.expose())));
        let bytes = ring.encode();
        crate::keystore::write_atomically(&self.path, &bytes, 0o600)
            .map_err(|(what, source)| ProviderError::Io { what, path: self.path.clone(), source })
    }

    fn wrap(&self, key_name: &str, kek: &WrapKey, aad: &[u8]) -> Result<Vec<u8>, ProviderError> {
        local_wrap(&self.key(key_name)?, kek, aad)
    }

    fn unwrap(&self, key_name: &str, blob: &[u8], aad: &[u8]) -> Result<WrapKey, ProviderError> {
        local_unwrap(&self.key(key_name)?, key_name, blob, aad)
    }
}

/// `{"version": 1, "keys": {"name": "<base64 32 bytes>", ...}}`
#[derive(Default)]
struct Keyring {
    keys: BTreeMap<String, Zeroizing<String>>,
}

impl Keyring {
    fn parse(text: &[u8], path: &Path) -> Result<Keyring, ProviderError> {
        let bad = |why: &str| ProviderError::Malformed { path: path.to_path_buf(), why: why.to_string() };
        let v: Value = serde_json::from_slice(text).map_err(|_| bad("not valid JSON"))?;
        let keys = v.get("keys").and_then(Value::as_object).ok_or_else(|| bad("no \"keys\" object"))?;
        let mut ring = Keyring::default();
        for (name, val) in keys {
            let s = val.as_str().ok_or_else(|| bad("a key is not a string"))?;
            ring.keys.insert(name.clone(), Zeroizing::new(s.to_string()));
        }
        Ok(ring)
    }

    fn get(&self, name: &str) -> Option<WrapKey> {
        let b64 = self.keys.get(name)?;
        let raw = Zeroizing::new(B64.decode(b64.as_bytes()).ok()?);
        WrapKey::from_bytes(&raw).ok()
    }

    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let keys: Map<String, Value> =
            self.keys.iter().map(|(k, v)| (k.clone(), Value::String(v.as_str().to_string()))).collect();
        let doc = serde_json::json!({"version": 1, "keys": keys});
        Zeroizing::new(serde_json::to_vec_pretty(&doc).unwrap_or_default())
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
        let val = Zeroizing::new(std::env::var(&self.variable).map_err(|_| ProviderError::EnvMissing(self.variable.clone()))?);
        let raw = Zeroizing::new(
            B64.decode(val.trim().as_bytes()).map_err(|_| ProviderError::EnvMalformed(self.variable.clone()))?,
        );
        WrapKey::from_bytes(&raw).map_err(|_| ProviderError::EnvMalformed(self.variable.clone()))
    }
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

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tde-prov-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
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
    fn errors_never_contain_key_bytes() {
        let var = format!("TDE_TEST_MEK2_{}", std::process::id());
        let secret = B64.encode([0x41u8; 20]);
        std::env::set_var(&var, &secret);
        let p = EnvProvider::from_options(&json!({"variable": var})).unwrap();
        let msg = p.ensure_key("x").unwrap_err().to_string();
        assert!(!msg.contains(&secret), "{msg}");
        std::env::remove_var(&var);
    }
}
