//! `gcp-kms`: master keys in Google Cloud KMS.
//!
//! The master key stays in Cloud KMS: wrap is `Encrypt` of the 32-byte KEK
//! under a CryptoKey of purpose `ENCRYPT_DECRYPT`, unwrap is `Decrypt`; the
//! associated data is Cloud KMS's own `additional_authenticated_data`, which
//! `Decrypt` must be given again, byte for byte.  The blob is Cloud KMS's
//! ciphertext, unchanged (it names the key version that made it, so key
//! rotation in Cloud KMS needs nothing from us).
//!
//! Options:
//!
//! ```json
//! {"key_ring": "projects/P/locations/L/keyRings/R",   // required
//!  "endpoint": "https://cloudkms.googleapis.com",     // optional (emulators)
//!  "credentials": "default"                           // Application Default Credentials
//!    or "credentials": "anonymous"                    // no authentication (emulators only)
//!    or "credentials_file": "/etc/tde/gcp-sa.json"}   // a service account (or authorized
//!                                                     // user) JSON key, mode 0600
//! ```
//!
//! Key names are CryptoKey ids in `key_ring` (`ensure_key` creates a missing
//! one, software protection level, Google's default symmetric algorithm) or
//! full CryptoKey resource names (`projects/.../cryptoKeys/K`).
//!
//! TLS: Google's client (reqwest, rustls) uses rustls's process default
//! provider, which this library sets to ring on first use; the roots are
//! the system's.  There is no `ca_file`: Google's client takes no extra root.
//!
//! Key material: the KEK goes to Google's client as the request's `plaintext`
//! (its request buffers are not wiped) and comes back as the response's
//! `plaintext`, which is wiped once copied.  A service-account key read from
//! `credentials_file` is held by Google's client, not by us.

use crate::options::{bad, secret_from_file, Opts};
use crate::rt::{self, error_chain, remote, transport_failure};
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::retry_policy::{Aip194Strict, RetryPolicyExt as _};
use google_cloud_kms_v1::client::KeyManagementService;
use google_cloud_kms_v1::model::crypto_key::CryptoKeyPurpose;
use google_cloud_kms_v1::model::CryptoKey;
use serde_json::Value;
use std::time::Duration;
use tde_core::provider::{Failure, MasterKeyProvider, ProviderError};
use tde_core::secret::WrapKey;
use zeroize::Zeroize;

pub(crate) const KIND: &str = "gcp-kms";

const KNOWN: [&str; 4] = ["key_ring", "endpoint", "credentials", "credentials_file"];

pub struct GcpKms {
    client: KeyManagementService,
    key_ring: String,
    limit: Duration,
}

/// Which request failed, for the error mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    GetKeyRing,
    GetKey,
    CreateKey,
    Encrypt,
    Decrypt,
}

impl GcpKms {
    pub fn from_options(options: &Value, limit: Duration) -> Result<GcpKms, ProviderError> {
        let o = Opts::new(KIND, options, &KNOWN)?;
        let key_ring = o.required("key_ring")?.trim_end_matches('/').to_string();
        if !is_key_ring_name(&key_ring) {
            return Err(o.bad(format!(
                "\"key_ring\" must be a key ring's resource name, projects/PROJECT/locations/LOCATION/keyRings/RING (got \"{key_ring}\")"
            )));
        }
        let endpoint = match o.string("endpoint")? {
            Some(e) if e.starts_with("http://") || e.starts_with("https://") => {
                Some(e.trim_end_matches('/').to_string())
            }
            Some(e) => return Err(o.bad(format!("\"endpoint\" must be an http:// or https:// URL (got \"{e}\")"))),
            None => None,
        };
        o.one_of("credentials", "credentials_file")?;
        let credentials = match (o.string("credentials")?, o.path("credentials_file")?) {
            (Some("default"), None) => google_cloud_auth::credentials::Builder::default()
                .build()
                .map_err(|e| o.bad(format!("Application Default Credentials: {}", error_chain(&e))))?,
            (Some("anonymous"), None) => google_cloud_auth::credentials::anonymous::Builder::new().build(),
            (Some(other), None) => {
                return Err(o.bad(format!("\"credentials\" must be \"default\" or \"anonymous\" (got \"{other}\")")))
            }
            (_, Some(path)) => {
                let text = secret_from_file(KIND, &path)?;
                let json: Value = serde_json::from_str(&text)
                    .map_err(|_| o.bad(format!("\"{}\" is not a JSON credentials file", path.display())))?;
                let built = match json.get("type").and_then(Value::as_str) {
                    Some("service_account") => google_cloud_auth::credentials::service_account::Builder::new(json).build(),
                    Some("authorized_user") => google_cloud_auth::credentials::user_account::Builder::new(json).build(),
                    other => {
                        return Err(o.bad(format!(
                            "\"{}\" is a credentials file of type {other:?}; use a service_account or authorized_user file, or \"credentials\": \"default\"",
                            path.display()
                        )))
                    }
                };
                built.map_err(|e| o.bad(format!("\"{}\": {}", path.display(), error_chain(&e))))?
            }
            (None, None) => return Err(o.bad("give one of \"credentials\" and \"credentials_file\"")),
        };
        install_ring();
        let inner = rt::inner_limit(limit);
        let mut builder = KeyManagementService::builder()
            .with_credentials(credentials)
            .with_attempt_timeout(inner)
            .with_retry_policy(Aip194Strict.with_time_limit(inner));
        if let Some(e) = endpoint {
            builder = builder.with_endpoint(e);
        }
        let client = rt::block_on(KIND, limit, builder.build())?
            .map_err(|e| bad(KIND, format!("could not build the Cloud KMS client: {}", error_chain(&e))))?;
        Ok(GcpKms { client, key_ring, limit })
    }

    fn run<F: std::future::Future>(&self, fut: F) -> Result<F::Output, ProviderError> {
        rt::block_on(KIND, self.limit, fut)
    }

    /// The full resource name of `key` (an id in our ring, or a full name).
    fn resource(&self, key: &str) -> Result<String, ProviderError> {
        if key.starts_with("projects/") {
            if key.split('/').count() == 8 && key.contains("/cryptoKeys/") && !key.ends_with('/') {
                return Ok(key.to_string());
            }
        } else if is_key_id(key) {
            return Ok(format!("{}/cryptoKeys/{key}", self.key_ring));
        }
        Err(bad(
            KIND,
            format!("master key name \"{key}\" is neither a CryptoKey id (letters, digits, '-', '_') nor a CryptoKey's resource name"),
        ))
    }
}

fn is_key_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn is_key_ring_name(s: &str) -> bool {
    let p: Vec<&str> = s.split('/').collect();
    p.len() == 6 && p[0] == "projects" && p[2] == "locations" && p[4] == "keyRings" && p.iter().all(|x| !x.is_empty())
}

/// Google's client takes rustls's process default provider: ring, as the
/// rest of this library.  Someone else's choice, made first, stands.
fn install_ring() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl MasterKeyProvider for GcpKms {
    fn probe(&self) -> Result<(), ProviderError> {
        let r = self.run(self.client.get_key_ring().set_name(&self.key_ring).send())?;
        r.map(|_| ()).map_err(|e| map_error(&e, Call::GetKeyRing))
    }

    fn ensure_key(&self, key_name: &str) -> Result<(), ProviderError> {
        let name = self.resource(key_name)?;
        self.run(async {
            let key = match self.client.get_crypto_key().set_name(&name).send().await {
                Ok(k) => k,
                Err(e) if is_code(&e, Code::NotFound) && !key_name.starts_with("projects/") => {
                    let created = self
                        .client
                        .create_crypto_key()
                        .set_parent(&self.key_ring)
                        .set_crypto_key_id(key_name)
                        .set_crypto_key(CryptoKey::new().set_purpose(CryptoKeyPurpose::EncryptDecrypt))
                        .send()
                        .await;
                    match created {
                        Ok(k) => k,
                        // created meanwhile by someone else: read theirs
                        Err(e) if is_code(&e, Code::AlreadyExists) => self
                            .client
                            .get_crypto_key()
                            .set_name(&name)
                            .send()
                            .await
                            .map_err(|e| map_error(&e, Call::GetKey))?,
                        Err(e) => return Err(map_error(&e, Call::CreateKey)),
                    }
                }
                Err(e) => return Err(map_error(&e, Call::GetKey)),
            };
            if key.purpose != CryptoKeyPurpose::EncryptDecrypt {
                return Err(remote(
                    KIND,
                    Failure::Other,
                    format!("\"{name}\" has purpose {:?}; a master key must be an ENCRYPT_DECRYPT key", key.purpose),
                ));
            }
            Ok(())
        })?
    }

    fn wrap(&self, key_name: &str, kek: &WrapKey, aad: &[u8]) -> Result<Vec<u8>, ProviderError> {
        let name = self.resource(key_name)?;
        let req = self
            .client
            .encrypt()
            .set_name(&name)
            .set_plaintext(bytes::Bytes::copy_from_slice(kek.expose()))
            .set_additional_authenticated_data(bytes::Bytes::copy_from_slice(aad));
        let out = self.run(req.send())?.map_err(|e| map_error(&e, Call::Encrypt))?;
        if out.ciphertext.is_empty() {
            return Err(remote(KIND, Failure::Other, "Encrypt returned no ciphertext"));
        }
        Ok(out.ciphertext.to_vec())
    }

    fn unwrap(&self, key_name: &str, blob: &[u8], aad: &[u8]) -> Result<WrapKey, ProviderError> {
        let name = self.resource(key_name)?;
        let req = self
            .client
            .decrypt()
            .set_name(&name)
            .set_ciphertext(bytes::Bytes::copy_from_slice(blob))
            .set_additional_authenticated_data(bytes::Bytes::copy_from_slice(aad));
        let out = self.run(req.send())?.map_err(|e| map_error(&e, Call::Decrypt))?;
        let mut plain = out.plaintext.to_vec();
        let key = WrapKey::from_bytes(&plain).map_err(|_| ProviderError::WrongKey { key: key_name.to_string() });
        plain.zeroize();
        // `out.plaintext` is a shared `Bytes`, which cannot be wiped in place.
        key
    }
}

fn is_code(e: &google_cloud_gax::error::Error, code: Code) -> bool {
    e.status().is_some_and(|s| s.code == code)
}

/// The failure a status code of `call` stands for.
pub(crate) fn failure_for_code(code: Code, call: Call) -> Failure {
    match code {
        Code::Unauthenticated => Failure::Credentials,
        Code::PermissionDenied => Failure::PermissionDenied,
        Code::NotFound => Failure::KeyNotFound,
        // "Decryption failed: the ciphertext is invalid." (wrong key or AAD)
        Code::InvalidArgument if call == Call::Decrypt => Failure::WrongKey,
        // "... is not enabled, current state is: DISABLED."
        Code::FailedPrecondition => Failure::PermissionDenied,
        Code::DeadlineExceeded => Failure::TimedOut,
        Code::Unavailable => Failure::Unreachable,
        _ => Failure::Other,
    }
}

/// The one place Cloud KMS errors become ours.
pub(crate) fn map_error(e: &google_cloud_gax::error::Error, call: Call) -> ProviderError {
    if let Some(s) = e.status() {
        let failure = failure_for_code(s.code, call);
        let message = if s.message.is_empty() { "no message" } else { s.message.as_str() };
        let detail = if s.code == Code::FailedPrecondition && message.contains("DISABLED") {
            format!("key disabled: {message} ({})", s.code.name())
        } else {
            format!("{message} ({})", s.code.name())
        };
        return remote(KIND, failure, detail);
    }
    let failure = if e.is_authentication() {
        Failure::Credentials
    } else if e.is_timeout() {
        Failure::TimedOut
    } else if e.is_connect() || e.is_io() {
        Failure::Unreachable
    } else {
        match (e.http_status_code(), transport_failure(e)) {
            (Some(401), _) => Failure::Credentials,
            (Some(403), _) => Failure::PermissionDenied,
            (Some(404), _) => Failure::KeyNotFound,
            (_, f) => f,
        }
    };
    remote(KIND, failure, error_chain(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        crate::options::refused(GcpKms::from_options(&v, Duration::from_secs(1)), &v)
    }

    const RING: &str = "projects/p/locations/global/keyRings/r";

    #[test]
    fn options_are_checked() {
        let ok = json!({"key_ring": RING, "endpoint": "http://127.0.0.1:1", "credentials": "anonymous"});
        let p = GcpKms::from_options(&ok, Duration::from_secs(1)).unwrap();
        assert_eq!(p.resource("k1").unwrap(), format!("{RING}/cryptoKeys/k1"));
        let full = "projects/q/locations/eu/keyRings/s/cryptoKeys/k2";
        assert_eq!(p.resource(full).unwrap(), full);
        for badname in
            ["", "a/b", "k.1", "projects/q/locations/eu/keyRings/s", "projects/q/x/eu/keyRings/s/cryptoKeys/"]
        {
            assert!(p.resource(badname).is_err(), "{badname}");
        }

        assert!(err(json!({"credentials": "anonymous"})).contains("missing \"key_ring\""));
        assert!(err(json!({"key_ring": "p/r", "credentials": "anonymous"})).contains("resource name"));
        assert!(err(json!({"key_ring": RING})).contains("give one of"));
        assert!(
            err(json!({"key_ring": RING, "credentials": "default", "credentials_file": "/x"})).contains("only one of")
        );
        assert!(err(json!({"key_ring": RING, "credentials": "mine"})).contains("\"default\" or \"anonymous\""));
        assert!(err(json!({"key_ring": RING, "credentials_file": "sa.json"})).contains("absolute"));
        assert!(err(json!({"key_ring": RING, "credentials_file": "/nonexistent/sa.json"})).contains("could not open"));
        assert!(
            err(json!({"key_ring": RING, "credentials": "anonymous", "endpoint": "localhost:9"})).contains("http://")
        );
        assert!(err(json!({"key_ring": RING, "credentials": "anonymous", "project": "p"})).contains("unknown option"));
        // a credentials file of a kind we do not take, or not JSON, or readable by others
        let dir = std::env::temp_dir().join(format!("tde-kms-gcp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("creds.json");
        use std::os::unix::fs::PermissionsExt;
        for (text, mode, want) in [
            (r#"{"type": "external_account"}"#, 0o600, "of type Some(\"external_account\")"),
            ("not json", 0o600, "not a JSON credentials file"),
            (r#"{"type": "service_account"}"#, 0o644, "chmod 600"),
        ] {
            std::fs::write(&f, text).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = err(json!({"key_ring": RING, "credentials_file": f}));
            assert!(e.contains(want), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn status_codes_map_onto_failures() {
        assert_eq!(failure_for_code(Code::Unauthenticated, Call::Encrypt), Failure::Credentials);
        assert_eq!(failure_for_code(Code::PermissionDenied, Call::Encrypt), Failure::PermissionDenied);
        assert_eq!(failure_for_code(Code::NotFound, Call::GetKey), Failure::KeyNotFound);
        assert_eq!(failure_for_code(Code::InvalidArgument, Call::Decrypt), Failure::WrongKey);
        assert_eq!(failure_for_code(Code::InvalidArgument, Call::Encrypt), Failure::Other);
        assert_eq!(failure_for_code(Code::FailedPrecondition, Call::Decrypt), Failure::PermissionDenied);
        assert_eq!(failure_for_code(Code::Unavailable, Call::GetKeyRing), Failure::Unreachable);
        assert_eq!(failure_for_code(Code::Internal, Call::GetKeyRing), Failure::Other);
        let status = google_cloud_gax::error::rpc::Status::default()
            .set_code(Code::FailedPrecondition)
            .set_message("projects/p/.../cryptoKeyVersions/1 is not enabled, current state is: DISABLED.");
        let e = map_error(&google_cloud_gax::error::Error::service(status), Call::Decrypt);
        assert_eq!(
            e.to_string(),
            "gcp-kms provider: permission denied: key disabled: projects/p/.../cryptoKeyVersions/1 is not enabled, current state is: DISABLED. (FAILED_PRECONDITION)"
        );
    }
}
