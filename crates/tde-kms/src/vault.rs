//! `vault-transit`: master keys in the Transit secrets engine of HashiCorp
//! Vault or OpenBao.
//!
//! The master key stays in Transit: wrap is `transit/encrypt/KEY` of the
//! 32-byte KEK, unwrap is `transit/decrypt/KEY`.  The associated data is
//! bound with Transit's own `associated_data` parameter (the AAD of its
//! AES-GCM / ChaCha20-Poly1305 keys), which every OpenBao 2.x and Vault since
//! 1.11 takes; decrypting with other associated data fails with "cipher:
//! message authentication failed".  So keys are plain (not `derived`) AEAD
//! keys, created as `aes256-gcm96`; a derived key would need a `context` on
//! every call instead, and is refused.  The blob is Transit's ciphertext
//! string (`vault:v1:...`) as bytes, so `bao write transit/decrypt/KEY` can
//! open it too.
//!
//! Wrap reads the key first: Transit's encrypt creates a missing key on the
//! fly ("upsert"), and a mistyped key name must fail as `KeyNotFound`, not
//! quietly wrap under a new key.  Master keys are created only by
//! `ensure_key`.
//!
//! Options:
//!
//! ```json
//! {"url": "https://bao.example:8200",     // required
//!  "mount": "transit",                    // optional, default "transit"
//!  "token_env": "BAO_TOKEN",              // exactly one of these two
//!  "token_file": "/etc/tde/bao-token",    //   (a file, mode 0600)
//!  "namespace": "team-a",                 // optional (X-Vault-Namespace)
//!  "ca_file": "/etc/tde/ca.pem"}          // optional extra trust root
//! ```
//!
//! Vault answers 403 "permission denied" both to a bad token and to a good
//! token without the policy; on a 403 we ask `auth/token/lookup-self` (which
//! every valid token may call) and report `Credentials` if that is refused
//! too, else `PermissionDenied`.
//!
//! Key material: the KEK goes to Transit base64-encoded in the request body
//! and comes back the same way; our copies are wiped, vaultrs's and reqwest's
//! request buffers are not.  The token is held by vaultrs in two `String`s,
//! which are wiped when the provider is dropped.

use crate::options::{bad, Opts};
use crate::rt::{self, error_chain, remote, transport_failure};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::Value;
use std::time::Duration;
use tde_core::provider::{Failure, MasterKeyProvider, ProviderError};
use tde_core::secret::WrapKey;
use vaultrs::api::transit::requests::{CreateKeyRequest, DecryptDataRequest, EncryptDataRequest};
use vaultrs::api::transit::KeyType;
use vaultrs::client::{VaultClient, VaultClientSettings};
use vaultrs::error::ClientError;
use zeroize::Zeroize;

pub(crate) const KIND: &str = "vault-transit";

const KNOWN: [&str; 6] = ["url", "mount", "token_env", "token_file", "namespace", "ca_file"];

pub struct VaultTransit {
    client: VaultClient,
    mount: String,
    limit: Duration,
}

impl Drop for VaultTransit {
    fn drop(&mut self) {
        self.client.settings.token.zeroize();
        self.client.middle.token.zeroize();
    }
}

impl VaultTransit {
    pub fn from_options(options: &Value, limit: Duration) -> Result<VaultTransit, ProviderError> {
        let o = Opts::new(KIND, options, &KNOWN)?;
        let url = o.required("url")?;
        let address = reqwest::Url::parse(url).map_err(|e| o.bad(format!("\"url\" is not a URL ({e}): \"{url}\"")))?;
        if !matches!(address.scheme(), "http" | "https") || address.host_str().is_none() {
            return Err(o.bad(format!("\"url\" must be an http:// or https:// URL (got \"{url}\")")));
        }
        let mount = o.string("mount")?.unwrap_or("transit").trim_matches('/').to_string();
        if mount.is_empty() || mount.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
            return Err(o.bad(format!("\"mount\" is not a mount path: \"{mount}\"")));
        }
        let namespace = o.string("namespace")?.map(str::to_string);
        let ca = o.ca_file("ca_file")?;
        let token = o.secret("token")?;

        let inner = rt::inner_limit(limit);
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(crate::tls::client_builder(KIND, ca.as_deref())?.with_no_client_auth())
            .connect_timeout(inner)
            .timeout(inner)
            .build()
            .map_err(|e| bad(KIND, format!("could not build the HTTP client: {}", error_chain(&e))))?;
        let settings = VaultClientSettings {
            address: address.clone(),
            ca_certs: Vec::new(),
            identity: None,
            timeout: Some(inner),
            token: token.as_str().to_string(),
            verify: true,
            version: 1,
            wrapping: false,
            namespace: namespace.clone(),
            proxy: None,
        };
        let middle = vaultrs::api::EndpointMiddleware {
            token: token.as_str().to_string(),
            version: "v1".to_string(),
            wrap: None,
            namespace,
        };
        // Our own HTTP client (vaultrs's would pick its TLS provider, its
        // roots and its timeouts by itself).
        let client =
            VaultClient { http: rustify::clients::reqwest::Client::new(address.as_str(), http), middle, settings };
        Ok(VaultTransit { client, mount, limit })
    }

    fn run<F: std::future::Future>(&self, fut: F) -> Result<F::Output, ProviderError> {
        rt::block_on(KIND, self.limit, fut)
    }

    /// Maps `e`, asking lookup-self whether a 403 was about the token.
    async fn map(&self, e: ClientError) -> ProviderError {
        let token_refused = if status_of(&e) == Some(403) {
            let lookup = vaultrs::token::lookup_self(&self.client).await;
            Some(matches!(&lookup, Err(l) if status_of(l) == Some(403)))
        } else {
            None
        };
        map_error(&e, token_refused)
    }

    /// Reads `key` and checks that it can wrap with associated data.
    /// `Ok(false)`: no such key.
    async fn check_key(&self, key: &str) -> Result<bool, ProviderError> {
        match vaultrs::transit::key::read(&self.client, &self.mount, key).await {
            Ok(k) => {
                let aead =
                    matches!(k.key_type, KeyType::Aes128Gcm96 | KeyType::Aes256Gcm96 | KeyType::Chacha20Poly1305);
                if !aead || !k.supports_encryption || !k.supports_decryption {
                    return Err(remote(
                        KIND,
                        Failure::Other,
                        format!(
                            "key \"{key}\" is a {:?} key; a master key must be aes256-gcm96 (or another AEAD type)",
                            k.key_type
                        ),
                    ));
                }
                if k.derived {
                    return Err(remote(
                        KIND,
                        Failure::Other,
                        format!("key \"{key}\" is a derived key; tde binds its associated data with associated_data and needs a key created without derived=true"),
                    ));
                }
                Ok(true)
            }
            Err(e) if status_of(&e) == Some(404) && !is_no_route(&e) => Ok(false),
            Err(e) => Err(self.map(e).await),
        }
    }
}

impl MasterKeyProvider for VaultTransit {
    fn probe(&self) -> Result<(), ProviderError> {
        self.run(async {
            match vaultrs::token::lookup_self(&self.client).await {
                Ok(_) => Ok(()),
                // lookup-self is open to every valid token
                Err(e) => Err(map_error(&e, Some(status_of(&e) == Some(403)))),
            }
        })?
    }

    fn ensure_key(&self, key_name: &str) -> Result<(), ProviderError> {
        check_key_name(key_name)?;
        self.run(async {
            if self.check_key(key_name).await? {
                return Ok(());
            }
            let mut opts = CreateKeyRequest::builder();
            opts.key_type(KeyType::Aes256Gcm96).derived(false).exportable(false);
            if let Err(e) = vaultrs::transit::key::create(&self.client, &self.mount, key_name, Some(&mut opts)).await {
                return Err(self.map(e).await);
            }
            // created, or someone else's key of the same name: check it either way
            match self.check_key(key_name).await? {
                true => Ok(()),
                false => {
                    Err(remote(KIND, Failure::Other, format!("key \"{key_name}\" was created but cannot be read back")))
                }
            }
        })?
    }

    fn wrap(&self, key_name: &str, kek: &WrapKey, aad: &[u8]) -> Result<Vec<u8>, ProviderError> {
        check_key_name(key_name)?;
        self.run(async {
            if !self.check_key(key_name).await? {
                return Err(not_found(key_name, &self.mount));
            }
            let mut plaintext = zeroize::Zeroizing::new(B64.encode(kek.expose()));
            let mut opts = EncryptDataRequest::builder();
            opts.associated_data(B64.encode(aad));
            let r =
                vaultrs::transit::data::encrypt(&self.client, &self.mount, key_name, &plaintext, Some(&mut opts)).await;
            plaintext.zeroize();
            match r {
                Ok(out) if out.ciphertext.starts_with("vault:v") => Ok(out.ciphertext.into_bytes()),
                Ok(_) => Err(remote(KIND, Failure::Other, "encrypt returned no ciphertext")),
                Err(e) => Err(self.map(e).await),
            }
        })?
    }

    fn unwrap(&self, key_name: &str, blob: &[u8], aad: &[u8]) -> Result<WrapKey, ProviderError> {
        check_key_name(key_name)?;
        let wrong = || ProviderError::WrongKey { key: key_name.to_string() };
        let Ok(ciphertext) = std::str::from_utf8(blob) else { return Err(wrong()) };
        if !ciphertext.starts_with("vault:v") {
            return Err(wrong());
        }
        self.run(async {
            let mut opts = DecryptDataRequest::builder();
            opts.associated_data(B64.encode(aad));
            match vaultrs::transit::data::decrypt(&self.client, &self.mount, key_name, ciphertext, Some(&mut opts))
                .await
            {
                Ok(mut out) => {
                    let mut plain = zeroize::Zeroizing::new(B64.decode(&out.plaintext).unwrap_or_default());
                    out.plaintext.zeroize();
                    let key = WrapKey::from_bytes(&plain).map_err(|_| wrong());
                    plain.zeroize();
                    key
                }
                Err(e) => Err(self.map(e).await),
            }
        })?
    }
}

/// Transit key names go into the URL path: keep them to what Transit names
/// are made of.
fn check_key_name(key: &str) -> Result<(), ProviderError> {
    let ok = !key.is_empty()
        && key.len() <= 256
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && key != "."
        && key != "..";
    if ok {
        Ok(())
    } else {
        Err(bad(KIND, format!("master key name \"{key}\" is not a Transit key name (letters, digits, '-', '_', '.')")))
    }
}

fn not_found(key: &str, mount: &str) -> ProviderError {
    remote(KIND, Failure::KeyNotFound, format!("no key \"{key}\" in the Transit engine at \"{mount}\""))
}

fn status_of(e: &ClientError) -> Option<u16> {
    match e {
        ClientError::APIError { code, .. } => Some(*code),
        ClientError::RestClientError { source: rustify::errors::ClientError::ServerResponseError { code, .. } } => {
            Some(*code)
        }
        _ => None,
    }
}

/// A 404 for a mount that does not exist, not for a missing key.
fn is_no_route(e: &ClientError) -> bool {
    matches!(e, ClientError::APIError { errors, .. } if errors.iter().any(|m| m.contains("no handler for route")))
}

/// The one place Vault errors become ours.  `token_refused` says, for a 403,
/// whether lookup-self was refused too.
pub(crate) fn map_error(e: &ClientError, token_refused: Option<bool>) -> ProviderError {
    match e {
        ClientError::APIError { code, errors } => {
            // Vault's messages can be multi-line ("1 error occurred:\n\t* ...").
            let text = errors.iter().map(|m| m.split_whitespace().collect::<Vec<_>>().join(" ")).collect::<Vec<_>>();
            let text = if text.is_empty() { "no message".to_string() } else { text.join("; ") };
            let has = |s: &str| errors.iter().any(|m| m.contains(s));
            let failure = match code {
                400 if has("message authentication failed")
                    || has("invalid ciphertext")
                    || has("unable to decode")
                    || has("invalid key version") =>
                {
                    Failure::WrongKey
                }
                400 if has("encryption key not found") => Failure::KeyNotFound,
                401 => Failure::Credentials,
                403 if has("invalid token") || token_refused == Some(true) => Failure::Credentials,
                403 => Failure::PermissionDenied,
                404 if has("no handler for route") => Failure::Other,
                404 => Failure::KeyNotFound,
                _ => Failure::Other,
            };
            remote(KIND, failure, format!("{text} (HTTP {code})"))
        }
        other => {
            let failure = transport_failure(other);
            remote(KIND, failure, error_chain(other))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        crate::options::refused(VaultTransit::from_options(&v, Duration::from_secs(1)), &v)
    }

    #[test]
    fn options_are_checked() {
        std::env::set_var("TDE_KMS_UNIT_BAO_TOKEN", "s.t0ken");
        let ok = json!({"url": "http://127.0.0.1:8200", "token_env": "TDE_KMS_UNIT_BAO_TOKEN"});
        let p = VaultTransit::from_options(&ok, Duration::from_secs(1)).unwrap();
        assert_eq!(p.mount, "transit");
        let ok = json!({"url": "https://bao:8200", "mount": "/kv/transit-a/", "namespace": "ns1",
                        "token_env": "TDE_KMS_UNIT_BAO_TOKEN"});
        assert_eq!(VaultTransit::from_options(&ok, Duration::from_secs(1)).unwrap().mount, "kv/transit-a");

        assert!(err(json!({"token_env": "X"})).contains("missing \"url\""));
        assert!(err(json!({"url": "http://h", "token_env": "X", "role": "r"})).contains("unknown option \"role\""));
        assert!(err(json!({"url": "http://h"})).contains("give one of \"token_env\" and \"token_file\""));
        assert!(err(json!({"url": "http://h", "token_env": "X", "token_file": "/x"})).contains("only one of"));
        assert!(err(json!({"url": "http://h", "token_file": "rel/token"})).contains("absolute"));
        assert!(err(json!({"url": "ftp://h", "token_env": "TDE_KMS_UNIT_BAO_TOKEN"})).contains("http://"));
        assert!(err(json!({"url": "not a url", "token_env": "TDE_KMS_UNIT_BAO_TOKEN"})).contains("not a URL"));
        assert!(
            err(json!({"url": "http://h", "mount": "a//b", "token_env": "TDE_KMS_UNIT_BAO_TOKEN"})).contains("mount")
        );
        assert!(err(json!({"url": "http://h", "mount": "..", "token_env": "TDE_KMS_UNIT_BAO_TOKEN"})).contains("mount"));
        assert!(err(json!({"url": "http://h", "token_env": "TDE_KMS_UNIT_NOT_SET"})).contains("is not set"));
        assert!(err(json!({"url": "http://h", "token_env": "TDE_KMS_UNIT_BAO_TOKEN", "ca_file": "ca.pem"}))
            .contains("absolute"));
    }

    #[test]
    fn key_names_stay_in_the_path() {
        for good in ["tde", "tde-master_1.v2"] {
            assert!(check_key_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a/b", "..", "k?x=1", "k#", "a b", "é"] {
            assert!(matches!(check_key_name(bad), Err(ProviderError::BadOptions { .. })), "{bad}");
        }
    }

    #[test]
    fn errors_map_onto_failures() {
        let api = |code: u16, msg: &str| ClientError::APIError {
            code,
            errors: if msg.is_empty() { vec![] } else { vec![msg.to_string()] },
        };
        let f = |e: ClientError, t: Option<bool>| Failure::of(&map_error(&e, t));
        assert_eq!(f(api(400, "cipher: message authentication failed"), None), Failure::WrongKey);
        assert_eq!(f(api(400, "invalid ciphertext: no prefix"), None), Failure::WrongKey);
        assert_eq!(f(api(400, "encryption key not found"), None), Failure::KeyNotFound);
        assert_eq!(f(api(403, "permission denied"), Some(true)), Failure::Credentials);
        assert_eq!(f(api(403, "permission denied"), Some(false)), Failure::PermissionDenied);
        assert_eq!(f(api(403, "invalid token"), None), Failure::Credentials);
        assert_eq!(f(api(404, ""), None), Failure::KeyNotFound);
        assert_eq!(f(api(404, "no handler for route \"x/keys/k\". route entry not found."), None), Failure::Other);
        assert_eq!(f(api(503, "Vault is sealed"), None), Failure::Other);
        assert_eq!(
            map_error(&api(403, "permission denied"), Some(true)).to_string(),
            "vault-transit provider: credentials refused: permission denied (HTTP 403)"
        );
        assert_eq!(
            map_error(&api(404, ""), None).to_string(),
            "vault-transit provider: master key not found: no message (HTTP 404)"
        );
    }
}
