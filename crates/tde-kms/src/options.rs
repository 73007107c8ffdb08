//! Reading a provider's options: one JSON object per provider, every key
//! known, every path absolute, every secret named (an environment variable or
//! a file), never given inline.
//!
//! Why inline secrets are not accepted: the options are stored in the key
//! store's configuration and travel in every request to this library; the
//! secret itself stays where the operator put it, and is read once, when a
//! client is built, into a zeroizing buffer.

use serde_json::{Map, Value};
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tde_core::provider::ProviderError;
use zeroize::{Zeroize, Zeroizing};

/// Largest secret or certificate file read.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// A provider's options, checked against the keys its kind knows.
pub(crate) struct Opts<'a> {
    kind: &'static str,
    map: &'a Map<String, Value>,
}

/// `BadOptions` for `kind`.
pub(crate) fn bad(kind: &str, why: impl Into<String>) -> ProviderError {
    ProviderError::BadOptions { kind: kind.to_string(), why: why.into() }
}

impl<'a> Opts<'a> {
    /// Refuses anything but an object whose keys are all in `known`.
    pub(crate) fn new(kind: &'static str, options: &'a Value, known: &[&str]) -> Result<Opts<'a>, ProviderError> {
        let map = options.as_object().ok_or_else(|| bad(kind, "options must be a JSON object"))?;
        if let Some(extra) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(bad(kind, format!("unknown option \"{extra}\" (known: {})", known.join(", "))));
        }
        Ok(Opts { kind, map })
    }

    pub(crate) fn bad(&self, why: impl Into<String>) -> ProviderError {
        bad(self.kind, why)
    }

    /// A non-empty string option, if present.
    pub(crate) fn string(&self, name: &str) -> Result<Option<&'a str>, ProviderError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.as_str())),
            Some(_) => Err(self.bad(format!("\"{name}\" must be a non-empty string"))),
        }
    }

    pub(crate) fn required(&self, name: &str) -> Result<&'a str, ProviderError> {
        self.string(name)?.ok_or_else(|| self.bad(format!("missing \"{name}\"")))
    }

    /// A non-negative integer option, if present.
    pub(crate) fn integer(&self, name: &str) -> Result<Option<u64>, ProviderError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().map(Some).ok_or_else(|| self.bad(format!("\"{name}\" must be a non-negative integer")))
            }
        }
    }

    /// An absolute path option, if present.
    pub(crate) fn path(&self, name: &str) -> Result<Option<PathBuf>, ProviderError> {
        match self.string(name)? {
            None => Ok(None),
            Some(s) if Path::new(s).is_absolute() => Ok(Some(PathBuf::from(s))),
            Some(s) => Err(self.bad(format!("\"{name}\" must be an absolute path (got \"{s}\")"))),
        }
    }

    /// Exactly one of two options.
    pub(crate) fn one_of(&self, a: &str, b: &str) -> Result<(), ProviderError> {
        match (self.map.contains_key(a), self.map.contains_key(b)) {
            (true, false) | (false, true) => Ok(()),
            (true, true) => Err(self.bad(format!("give only one of \"{a}\" and \"{b}\""))),
            (false, false) => Err(self.bad(format!("give one of \"{a}\" and \"{b}\""))),
        }
    }

    /// The secret named by exactly one of `<base>_env` / `<base>_file`.
    pub(crate) fn secret(&self, base: &str) -> Result<Zeroizing<String>, ProviderError> {
        self.secret_opt(base)?.ok_or_else(|| self.bad(format!("give one of \"{base}_env\" and \"{base}_file\"")))
    }

    /// The secret named by at most one of `<base>_env` / `<base>_file`.
    pub(crate) fn secret_opt(&self, base: &str) -> Result<Option<Zeroizing<String>>, ProviderError> {
        let (env, file) = (format!("{base}_env"), format!("{base}_file"));
        match (self.string(&env)?, self.path(&file)?) {
            (Some(_), Some(_)) => Err(self.bad(format!("give only one of \"{env}\" and \"{file}\""))),
            (Some(var), None) => secret_from_env(self.kind, &env, var).map(Some),
            (None, Some(path)) => secret_from_file(self.kind, &path).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The PEM file named by `name`, checked to hold at least one certificate.
    pub(crate) fn ca_file(&self, name: &str) -> Result<Option<Vec<u8>>, ProviderError> {
        let Some(path) = self.path(name)? else { return Ok(None) };
        let pem = read_limited(self.kind, &path, false)?;
        let mut count = 0;
        for cert in <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::pem_slice_iter(&pem) {
            let cert =
                cert.map_err(|e| self.bad(format!("\"{}\" is not a PEM certificate file: {e}", path.display())))?;
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(cert)
                .map_err(|e| self.bad(format!("a certificate in \"{}\" is unusable: {e}", path.display())))?;
            count += 1;
        }
        if count == 0 {
            return Err(self.bad(format!("\"{}\" holds no PEM certificate", path.display())));
        }
        Ok(Some(pem.to_vec()))
    }
}

/// Tests: the options error `r` gives for options `v` (which must be refused
/// as bad options).
#[cfg(test)]
pub(crate) fn refused<T>(r: Result<T, ProviderError>, v: &serde_json::Value) -> String {
    match r {
        Ok(_) => panic!("{v} accepted"),
        Err(e) => {
            assert!(matches!(e, ProviderError::BadOptions { .. }), "{e}");
            e.to_string()
        }
    }
}

fn secret_from_env(kind: &str, option: &str, var: &str) -> Result<Zeroizing<String>, ProviderError> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(Zeroizing::new(v)),
        Ok(_) => Err(bad(kind, format!("environment variable \"{var}\" (named by \"{option}\") is empty"))),
        Err(std::env::VarError::NotPresent) => {
            Err(bad(kind, format!("environment variable \"{var}\" (named by \"{option}\") is not set")))
        }
        Err(std::env::VarError::NotUnicode(mut raw)) => {
            raw.zeroize_os();
            Err(bad(kind, format!("environment variable \"{var}\" (named by \"{option}\") is not UTF-8")))
        }
    }
}

/// Wipes an `OsString` we are about to drop.
trait ZeroizeOs {
    fn zeroize_os(&mut self);
}

impl ZeroizeOs for std::ffi::OsString {
    fn zeroize_os(&mut self) {
        let mut bytes = std::mem::take(self).into_encoded_bytes();
        bytes.zeroize();
    }
}

/// Reads a secret file: a regular file with no group or other permission
/// bits, its content taken whole less a trailing line end.
pub(crate) fn secret_from_file(kind: &str, path: &Path) -> Result<Zeroizing<String>, ProviderError> {
    let mut bytes = read_limited(kind, path, true)?;
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(bad(kind, format!("secret file \"{}\" is empty", path.display())));
    }
    match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(s) => Ok(Zeroizing::new(s)),
        Err(e) => {
            e.into_bytes().zeroize();
            Err(bad(kind, format!("secret file \"{}\" is not UTF-8", path.display())))
        }
    }
}

/// A secret file's bytes (a private key in PEM), held to mode 0600.
pub(crate) fn secret_file_bytes(kind: &str, path: &Path) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
    read_limited(kind, path, true)
}

/// Reads a whole file of at most `MAX_FILE_BYTES` into a zeroizing buffer
/// sized up front.  A `secret` file must have no group or other permission
/// bits (certificates are public).
fn read_limited(kind: &str, path: &Path, secret: bool) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
    let io = |what: &str, e: std::io::Error| bad(kind, format!("could not {what} \"{}\": {e}", path.display()));
    // O_NONBLOCK: a FIFO planted at the path must not make us hang in open.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| io("open", e))?;
    let meta = f.metadata().map_err(|e| io("stat", e))?;
    if !meta.is_file() {
        return Err(bad(kind, format!("\"{}\" is not a regular file", path.display())));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(bad(kind, format!("\"{}\" is larger than {MAX_FILE_BYTES} bytes", path.display())));
    }
    let mode = meta.permissions().mode();
    if secret && mode & 0o077 != 0 {
        return Err(bad(
            kind,
            format!(
                "\"{}\" is accessible by group or others (mode {:04o}); run chmod 600 on it",
                path.display(),
                mode & 0o7777
            ),
        ));
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
    f.by_ref().take(MAX_FILE_BYTES).read_to_end(&mut buf).map_err(|e| io("read", e))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::fs;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tde-kms-options-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn write(path: &Path, text: &str, mode: u32) {
        fs::write(path, text).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn secret_files() {
        let d = tmpdir("secret");
        let f = d.join("token");
        let opts = json!({"token_file": f});
        let o = Opts::new("k", &opts, &["token_file", "token_env"]).unwrap();
        write(&f, "s3cret\r\n", 0o600);
        assert_eq!(o.secret("token").unwrap().as_str(), "s3cret");
        write(&f, "s3cret\n", 0o640);
        let e = o.secret("token").err().unwrap().to_string();
        assert!(e.contains("chmod 600") && e.contains("0640") && !e.contains("s3cret"), "{e}");
        write(&f, "\n", 0o600);
        assert!(o.secret("token").err().unwrap().to_string().contains("is empty"));
        fs::write(&f, [0xffu8, 0xfe]).unwrap();
        assert!(o.secret("token").err().unwrap().to_string().contains("not UTF-8"));
        fs::remove_file(&f).unwrap();
        assert!(o.secret("token").err().unwrap().to_string().contains("could not open"));
        // a FIFO is refused, not waited on
        let fifo = d.join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        fs::set_permissions(&fifo, fs::Permissions::from_mode(0o600)).unwrap();
        let opts = json!({"token_file": fifo});
        let o = Opts::new("k", &opts, &["token_file"]).unwrap();
        assert!(o.secret("token").err().unwrap().to_string().contains("not a regular file"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn secret_from_the_environment() {
        std::env::set_var("TDE_KMS_UNIT_TOKEN", "t0ken");
        std::env::set_var("TDE_KMS_UNIT_EMPTY", "");
        let known = ["token_env", "token_file"];
        let get = |v: Value| Opts::new("k", &v, &known).and_then(|o| o.secret("token")).map(|s| s.as_str().to_string());
        assert_eq!(get(json!({"token_env": "TDE_KMS_UNIT_TOKEN"})).unwrap(), "t0ken");
        assert!(get(json!({"token_env": "TDE_KMS_UNIT_EMPTY"})).unwrap_err().to_string().contains("is empty"));
        assert!(get(json!({})).unwrap_err().to_string().contains("give one of"));
        let both = get(json!({"token_env": "TDE_KMS_UNIT_TOKEN", "token_file": "/x"})).unwrap_err().to_string();
        assert!(both.contains("only one of"), "{both}");
        assert!(get(json!({"token_file": "x"})).unwrap_err().to_string().contains("absolute"));
        assert!(get(json!({"token_env": ""})).unwrap_err().to_string().contains("non-empty"));
    }

    #[test]
    fn ca_files() {
        let d = tmpdir("ca");
        let f = d.join("ca.pem");
        let opts = json!({"ca_file": f});
        let o = Opts::new("k", &opts, &["ca_file"]).unwrap();
        write(&f, "not a certificate\n", 0o644);
        assert!(o.ca_file("ca_file").err().unwrap().to_string().contains("holds no PEM certificate"));
        write(&f, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", 0o644);
        let e = o.ca_file("ca_file").err().unwrap().to_string();
        assert!(e.contains("unusable") || e.contains("not a PEM"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn integers_and_one_of() {
        let v = json!({"slot": 3, "neg": -1, "a": "x"});
        let o = Opts::new("k", &v, &["slot", "neg", "a", "b"]).unwrap();
        assert_eq!(o.integer("slot").unwrap(), Some(3));
        assert_eq!(o.integer("b").unwrap(), None);
        assert!(o.integer("neg").is_err() && o.integer("a").is_err());
        assert!(o.one_of("a", "b").is_ok() && o.one_of("a", "slot").is_err() && o.one_of("b", "c").is_err());
    }
}
