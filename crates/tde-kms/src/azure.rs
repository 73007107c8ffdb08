//! `azure-keyvault`: master keys in Azure Key Vault (or a Managed HSM).
//!
//! The master key is an RSA key in Key Vault (RSA 3072, created by
//! `ensure_key` with key_ops wrapKey/unwrapKey), and it never leaves Key
//! Vault.  Key Vault's `wrapKey`/`unwrapKey` on RSA keys (the only key kind
//! a standard vault wraps with) take no associated data, so tde binds its
//! associated data itself, with an envelope:
//!
//! - wrap: a fresh random 32-byte data key D; `wrapKey` D with RSA-OAEP-256
//!   under the master key; the KEK sealed under D with AES-256-GCM (random
//!   12-byte IV, tde's associated data as the GCM AAD), by tde-core's
//!   `wrap_wrap_key`, the primitive the file provider uses;
//! - the blob: `0x01 ‖ u16 BE len ‖ wrapped D ‖ u16 BE len ‖ key version
//!   (UTF-8) ‖ IV ‖ ciphertext ‖ tag`.  The key version is the one Key
//!   Vault used (from the result's `kid`), so unwrap asks for that version
//!   even after the key was rotated in Key Vault;
//! - unwrap: `unwrapKey` D under that version, then open the sealed KEK
//!   with the associated data.  Other associated data, another key, or a
//!   changed blob fail as `WrongKey`.  D is wiped once used.
//!
//! Options:
//!
//! ```json
//! {"vault_url": "https://myvault.vault.azure.net",  // required, https
//!  "tenant_id": "<directory (tenant) id>",          // with a client secret
//!  "client_id": "<application (client) id>",
//!  "client_secret_file": "/etc/tde/azure-secret",   // exactly one of these two
//!  "client_secret_env": "AZURE_CLIENT_SECRET",      //   (a file, mode 0600)
//!    or "credentials": "default",                   // workload or managed identity
//!  "authority_host": "https://login.microsoftonline.com", // optional
//!  "ca_file": "/etc/tde/ca.pem"}                    // optional extra trust root
//! ```
//!
//! `"credentials": "default"` takes the identity of the machine: an AKS
//! workload identity when `AZURE_FEDERATED_TOKEN_FILE` is set in the
//! server's environment (tenant and client from the options or from
//! `AZURE_TENANT_ID`/`AZURE_CLIENT_ID`), else the managed identity of the VM
//! or App Service (`client_id`, if given, picks a user-assigned one).
//! azure_identity 1.0 has no `DefaultAzureCredential`; the developer tools
//! (Azure CLI, azd) are left out on purpose: a database server should not
//! run `az`.
//!
//! Key names are Key Vault key names (letters, digits, '-'), optionally
//! `name/version` to pin a key version.
//!
//! Clients: azure_security_keyvault_keys's `KeyClient` and azure_identity's
//! credentials, over our own reqwest client (rustls with ring, the system's
//! roots plus `ca_file`, our timeouts), given to both as their transport;
//! `authority_host` is azure_core's custom cloud configuration.  Tokens:
//! the Key Vault client learns the token's scope from the vault's 401
//! challenge and checks, by default, that the vault's host is under the
//! challenge's resource (`*.vault.azure.net`); that check cannot pass for
//! a vault on another host name, so we turn it off and check the scope
//! ourselves instead, more strictly: a token is only ever requested for the
//! Key Vault resource of the vault's cloud, whatever a challenge asks for.
//! The challenge's `authorization` (authority) is never followed: tokens
//! come from `authority_host` only.
//!
//! Key material: D goes to Key Vault in the wrapKey request and comes back
//! from unwrapKey; our copies are wiped, the SDK's and reqwest's request and
//! response buffers are not.  The client secret is read into a zeroizing
//! buffer, but azure_identity keeps its own copy (a `Secret`, not wiped on
//! drop) for the provider's life, and sends it in each token request.

use crate::options::{bad, Opts};
use crate::rt::{self, error_chain, remote, transport_failure};
use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{AccessToken, Secret, TokenCredential, TokenRequestOptions};
use azure_core::error::ErrorKind;
use azure_core::http::{
    AsyncRawResponse, ClientOptions, ExponentialRetryOptions, HttpClient, Request, RequestContent, RetryOptions,
    Transport,
};
use azure_identity::{
    ClientSecretCredential, ClientSecretCredentialOptions, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use azure_security_keyvault_keys::models::{
    CreateKeyParameters, EncryptionAlgorithm, Key, KeyOperation, KeyOperationParameters, KeyType,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions, ResourceId};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tde_core::provider::{Failure, MasterKeyProvider, ProviderError};
use tde_core::secret::WrapKey;
use tde_core::wrap::{unwrap_wrap_key, wrap_wrap_key, WRAPPED_WRAP_KEY_LEN};
use zeroize::{Zeroize, Zeroizing};

pub(crate) const KIND: &str = "azure-keyvault";

const KNOWN: [&str; 8] = [
    "vault_url",
    "tenant_id",
    "client_id",
    "client_secret_file",
    "client_secret_env",
    "credentials",
    "authority_host",
    "ca_file",
];

/// The blob's format version.
const BLOB_VERSION: u8 = 1;
/// The size of the RSA keys `ensure_key` creates.
const RSA_BITS: i32 = 3072;

pub struct AzureKeyVault {
    client: KeyClient,
    credential: Arc<VaultScoped>,
    refusals: Refusals,
    limit: Duration,
}

/// The token endpoint's last refusal (status, body), see [`Http`].
type Refusals = Arc<Mutex<Option<(u16, Vec<u8>)>>>;

/// Which request failed, for the error mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    Token,
    GetKey,
    CreateKey,
    Wrap,
    Unwrap,
}

/// A master key name: a Key Vault key name, perhaps with a version.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct KeyRef<'a> {
    pub(crate) name: &'a str,
    pub(crate) version: Option<&'a str>,
}

impl AzureKeyVault {
    pub fn from_options(options: &Value, limit: Duration) -> Result<AzureKeyVault, ProviderError> {
        let o = Opts::new(KIND, options, &KNOWN)?;
        let vault_url = https_url(&o, "vault_url", o.required("vault_url")?)?;
        let authority = o.string("authority_host")?.map(|a| https_url(&o, "authority_host", a)).transpose()?;
        let tenant = o.string("tenant_id")?;
        let client_id = o.string("client_id")?;
        if let Some(t) = tenant {
            if !is_tenant_id(t) {
                return Err(o.bad(format!("\"tenant_id\" is not a tenant id or domain (got \"{t}\")")));
            }
        }
        if let Some(c) = client_id {
            if !is_client_id(c) {
                return Err(o.bad(format!("\"client_id\" is not an application (client) id (got \"{c}\")")));
            }
        }
        let ca = o.ca_file("ca_file")?;

        let inner = rt::inner_limit(limit);
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(crate::tls::client_builder(KIND, ca.as_deref())?.with_no_client_auth())
            .connect_timeout(inner)
            .timeout(inner)
            // Key Vault and Entra ID do not redirect; a redirect is not followed.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| bad(KIND, format!("could not build the HTTP client: {}", error_chain(&e))))?;
        let refusals = Refusals::default();
        let mut client_options = ClientOptions {
            transport: Some(Transport::new(Arc::new(Http { client: http, refusals: refusals.clone() }))),
            // A few quick retries of what azure_core deems transient
            // (connection resets, 429, 5xx), all within our deadline.
            retry: RetryOptions::exponential(ExponentialRetryOptions {
                initial_delay: azure_core::time::Duration::milliseconds(200),
                max_retries: 2,
                max_total_elapsed: azure_core::time::Duration::milliseconds(inner.as_millis() as i64),
                max_delay: azure_core::time::Duration::seconds(1),
            }),
            ..Default::default()
        };
        if let Some(a) = &authority {
            let mut custom = CustomConfiguration::default();
            custom.authority_host = a.trim_end_matches('/').to_string();
            client_options.cloud = Some(Arc::new(CloudConfiguration::Custom(custom)));
        }

        let credential: Arc<dyn TokenCredential> = match o.string("credentials")? {
            Some("default") => {
                if o.secret_opt("client_secret")?.is_some() {
                    return Err(o.bad("give either \"credentials\": \"default\" or a client secret, not both"));
                }
                default_credential(tenant, client_id, client_options.clone())?
            }
            Some(other) => return Err(o.bad(format!("\"credentials\" must be \"default\" (got \"{other}\")"))),
            None => {
                let (Some(tenant), Some(client_id)) = (tenant, client_id) else {
                    return Err(o.bad(
                        "give \"tenant_id\", \"client_id\" and a client secret, or \"credentials\": \"default\"",
                    ));
                };
                let secret = o.secret("client_secret")?;
                let options = ClientSecretCredentialOptions { client_options: client_options.clone() };
                ClientSecretCredential::new(
                    tenant,
                    client_id.to_string(),
                    Secret::new(secret.as_str().to_string()),
                    Some(options),
                )
                .map_err(|e| o.bad(format!("client secret credential: {}", one_line(&error_chain(&e)))))?
            }
        };
        let credential = Arc::new(VaultScoped { inner: credential, scope: vault_scope(&vault_url) });

        let kv_options = KeyClientOptions {
            client_options,
            // Checked by VaultScoped instead (see the module's documentation).
            verify_challenge_resource: Some(false),
            ..Default::default()
        };
        let client = KeyClient::new(&vault_url, credential.clone(), Some(kv_options))
            .map_err(|e| o.bad(format!("\"vault_url\": {}", one_line(&error_chain(&e)))))?;
        Ok(AzureKeyVault { client, credential, refusals, limit })
    }

    fn run<F: std::future::Future>(&self, fut: F) -> Result<F::Output, ProviderError> {
        *lock(&self.refusals) = None;
        rt::block_on(KIND, self.limit, fut)
    }

    fn map(&self, e: &azure_core::Error, call: Call) -> ProviderError {
        let refusal = lock(&self.refusals).take();
        map_error(e, call, refusal.as_ref().map(|(s, b)| (*s, b.as_slice())))
    }

    async fn get(&self, key: &KeyRef<'_>) -> azure_core::Result<Key> {
        let options = azure_security_keyvault_keys::models::KeyClientGetKeyOptions {
            key_version: key.version.map(str::to_string),
            ..Default::default()
        };
        self.client.get_key(key.name, Some(options)).await?.into_model()
    }

    async fn create(&self, name: &str) -> azure_core::Result<Key> {
        let params = CreateKeyParameters {
            kty: Some(KeyType::Rsa),
            key_size: Some(RSA_BITS),
            key_ops: Some(vec![KeyOperation::WrapKey, KeyOperation::UnwrapKey]),
            ..Default::default()
        };
        self.client.create_key(name, params.try_into()?, None).await?.into_model()
    }

    /// `wrapKey` of `d`: the wrapped bytes and the key version used.
    async fn wrap_d(&self, key: &KeyRef<'_>, d: &WrapKey) -> Result<(Vec<u8>, String), ProviderError> {
        let body = operation_body(d.expose())?;
        let options = azure_security_keyvault_keys::models::KeyClientWrapKeyOptions {
            key_version: key.version.map(str::to_string),
            ..Default::default()
        };
        let out = self
            .client
            .wrap_key(key.name, body, Some(options))
            .await
            .and_then(|r| r.into_model())
            .map_err(|e| self.map(&e, Call::Wrap))?;
        let wrapped = out.result.filter(|r| !r.is_empty());
        let Some(wrapped) = wrapped else { return Err(remote(KIND, Failure::Other, "wrapKey returned no result")) };
        let version = out.kid.as_deref().and_then(|kid| kid.parse::<ResourceId>().ok()).and_then(|id| id.version);
        match version {
            Some(v) if is_key_version(&v) && key.version.is_none_or(|want| want == v) => Ok((wrapped, v)),
            _ => Err(remote(
                KIND,
                Failure::Other,
                format!("wrapKey returned no usable key id (kid {:?})", out.kid.as_deref().unwrap_or("")),
            )),
        }
    }

    /// `unwrapKey` of `wrapped` under `version` of key `name` (master key
    /// `key_name`, for the errors).
    async fn unwrap_d(
        &self,
        key_name: &str,
        name: &str,
        version: &str,
        wrapped: &[u8],
    ) -> Result<WrapKey, ProviderError> {
        let body = operation_body(wrapped)?;
        let mut out = self
            .client
            .unwrap_key(name, version, body, None)
            .await
            .and_then(|r| r.into_model())
            .map_err(|e| self.map(&e, Call::Unwrap))?;
        let mut plain = Zeroizing::new(out.result.take().unwrap_or_default());
        let d = WrapKey::from_bytes(&plain).map_err(|_| ProviderError::WrongKey { key: key_name.to_string() });
        plain.zeroize();
        d
    }
}

/// The JSON body of wrapKey/unwrapKey with RSA-OAEP-256, built in a buffer
/// we wipe (the SDK's copy of the body is not).
fn operation_body<T>(value: &[u8]) -> Result<RequestContent<T>, ProviderError> {
    let mut params = KeyOperationParameters {
        algorithm: Some(EncryptionAlgorithm::RsaOaep256),
        value: Some(value.to_vec()),
        ..Default::default()
    };
    let json = serde_json::to_vec(&params).map(Zeroizing::new);
    if let Some(v) = params.value.as_mut() {
        v.zeroize();
    }
    let json = json.map_err(|e| remote(KIND, Failure::Other, format!("could not encode the request: {e}")))?;
    Ok(RequestContent::from_slice(&json))
}

impl MasterKeyProvider for AzureKeyVault {
    fn probe(&self) -> Result<(), ProviderError> {
        let scope = self.credential.scope.as_str();
        let r = self.run(self.credential.get_token(&[scope], None))?;
        r.map(|_| ()).map_err(|e| self.map(&e, Call::Token))
    }

    fn ensure_key(&self, key_name: &str) -> Result<(), ProviderError> {
        let key = parse_key_name(key_name)?;
        self.run(async {
            let k = match self.get(&key).await {
                Ok(k) => k,
                Err(e) if is_not_found(&e) && key.version.is_none() => match self.create(key.name).await {
                    Ok(k) => k,
                    Err(e) => return Err(self.map(&e, Call::CreateKey)),
                },
                Err(e) => return Err(self.map(&e, Call::GetKey)),
            };
            check_key(&k, key_name)
        })?
    }

    fn wrap(&self, key_name: &str, kek: &WrapKey, aad: &[u8]) -> Result<Vec<u8>, ProviderError> {
        let key = parse_key_name(key_name)?;
        let d = WrapKey::generate().map_err(|_| ProviderError::Crypto)?;
        let (wrapped, version) = self.run(self.wrap_d(&key, &d))??;
        seal(&d, kek, aad, &wrapped, &version)
    }

    fn unwrap(&self, key_name: &str, blob: &[u8], aad: &[u8]) -> Result<WrapKey, ProviderError> {
        let key = parse_key_name(key_name)?;
        let wrong = || ProviderError::WrongKey { key: key_name.to_string() };
        let parts = parse_blob(blob).ok_or_else(wrong)?;
        let d = self.run(self.unwrap_d(key_name, key.name, parts.version, parts.wrapped_d))??;
        open(&d, &parts, aad).ok_or_else(wrong)
    }
}

// ---- The envelope -----------------------------------------------------------

/// The parts of a blob.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Blob<'a> {
    pub(crate) wrapped_d: &'a [u8],
    pub(crate) version: &'a str,
    pub(crate) sealed: &'a [u8; WRAPPED_WRAP_KEY_LEN],
}

/// The blob of `kek` sealed under `d` with `aad`, `d` being wrapped by Key
/// Vault as `wrapped_d` under key version `version`.
pub(crate) fn seal(
    d: &WrapKey,
    kek: &WrapKey,
    aad: &[u8],
    wrapped_d: &[u8],
    version: &str,
) -> Result<Vec<u8>, ProviderError> {
    let too_long = |what: &str| remote(KIND, Failure::Other, format!("{what} is too long for the blob"));
    let wlen = u16::try_from(wrapped_d.len()).map_err(|_| too_long("the wrapped data key"))?;
    let vlen = u16::try_from(version.len()).map_err(|_| too_long("the key version"))?;
    let sealed = wrap_wrap_key(d, kek, aad).map_err(|_| ProviderError::Crypto)?;
    let mut blob = Vec::with_capacity(1 + 2 + wrapped_d.len() + 2 + version.len() + sealed.len());
    blob.push(BLOB_VERSION);
    blob.extend_from_slice(&wlen.to_be_bytes());
    blob.extend_from_slice(wrapped_d);
    blob.extend_from_slice(&vlen.to_be_bytes());
    blob.extend_from_slice(version.as_bytes());
    blob.extend_from_slice(&sealed);
    Ok(blob)
}

/// Splits a blob; `None` if it is not one of ours.
pub(crate) fn parse_blob(blob: &[u8]) -> Option<Blob<'_>> {
    fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if rest.len() < n {
            return None;
        }
        let (head, tail) = rest.split_at(n);
        *rest = tail;
        Some(head)
    }
    fn take_u16(rest: &mut &[u8]) -> Option<usize> {
        take(rest, 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    let mut rest = blob;
    if take(&mut rest, 1)? != [BLOB_VERSION] {
        return None;
    }
    let n = take_u16(&mut rest)?;
    let wrapped_d = take(&mut rest, n)?;
    let n = take_u16(&mut rest)?;
    let version = std::str::from_utf8(take(&mut rest, n)?).ok()?;
    let sealed: &[u8; WRAPPED_WRAP_KEY_LEN] = rest.try_into().ok()?;
    if wrapped_d.is_empty() || !is_key_version(version) {
        return None;
    }
    Some(Blob { wrapped_d, version, sealed })
}

/// The KEK of a parsed blob, given its data key; `None` if it does not open.
pub(crate) fn open(d: &WrapKey, blob: &Blob<'_>, aad: &[u8]) -> Option<WrapKey> {
    unwrap_wrap_key(d, blob.sealed, aad).ok()
}

// ---- Names, URLs, credentials -----------------------------------------------

/// `name` or `name/version`.
pub(crate) fn parse_key_name(key: &str) -> Result<KeyRef<'_>, ProviderError> {
    let (name, version) = match key.split_once('/') {
        Some((n, v)) => (n, Some(v)),
        None => (key, None),
    };
    let name_ok = !name.is_empty() && name.len() <= 127 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if name_ok && version.is_none_or(is_key_version) {
        Ok(KeyRef { name, version })
    } else {
        Err(bad(
            KIND,
            format!("master key name \"{key}\" is not a Key Vault key name (letters, digits, '-'), optionally followed by /VERSION"),
        ))
    }
}

/// Key Vault's key versions are 32 hex digits; anything alphanumeric is
/// taken (it goes into a URL path).
fn is_key_version(v: &str) -> bool {
    !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn is_tenant_id(t: &str) -> bool {
    t.len() <= 256 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn is_client_id(c: &str) -> bool {
    c.len() <= 256 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// An https:// URL with a host and no path, query or credentials, as
/// `https://host[:port]/`.
fn https_url(o: &Opts<'_>, option: &str, url: &str) -> Result<String, ProviderError> {
    let u = reqwest::Url::parse(url).map_err(|e| o.bad(format!("\"{option}\" is not a URL ({e}): \"{url}\"")))?;
    if u.scheme() != "https" || u.host_str().is_none() {
        return Err(o.bad(format!("\"{option}\" must be an https:// URL (got \"{url}\")")));
    }
    if u.path() != "/"
        || u.query().is_some()
        || u.fragment().is_some()
        || !u.username().is_empty()
        || u.password().is_some()
    {
        return Err(o.bad(format!("\"{option}\" must be only https://HOST[:PORT], with no path (got \"{url}\")")));
    }
    Ok(u.to_string())
}

/// The token scope of the vault's cloud: Key Vault's resource for vaults
/// in the public cloud, China and US Government, Managed HSM's for HSMs;
/// the public Key Vault resource for any other host (private DNS names,
/// stand-ins).
pub(crate) fn vault_scope(vault_url: &str) -> String {
    let host = reqwest::Url::parse(vault_url).ok().and_then(|u| u.host_str().map(str::to_ascii_lowercase));
    let host = host.unwrap_or_default();
    const RESOURCES: [&str; 6] = [
        "vault.azure.net",
        "vault.azure.cn",
        "vault.usgovcloudapi.net",
        "managedhsm.azure.net",
        "managedhsm.azure.cn",
        "managedhsm.usgovcloudapi.net",
    ];
    let resource = RESOURCES.iter().find(|r| host.ends_with(&format!(".{r}"))).unwrap_or(&RESOURCES[0]);
    format!("https://{resource}/.default")
}

/// `"credentials": "default"`: workload identity where its token file is
/// set, else managed identity.
fn default_credential(
    tenant: Option<&str>,
    client_id: Option<&str>,
    client_options: ClientOptions,
) -> Result<Arc<dyn TokenCredential>, ProviderError> {
    let fail = |what: &str, e: azure_core::Error| bad(KIND, format!("{what}: {}", one_line(&error_chain(&e))));
    if std::env::var_os("AZURE_FEDERATED_TOKEN_FILE").is_some_and(|v| !v.is_empty()) {
        let mut options = WorkloadIdentityCredentialOptions::default();
        options.credential_options.client_options = client_options;
        options.tenant_id = tenant.map(str::to_string);
        options.client_id = client_id.map(str::to_string);
        let c = WorkloadIdentityCredential::new(Some(options)).map_err(|e| fail("workload identity", e))?;
        Ok(c)
    } else {
        let options = ManagedIdentityCredentialOptions {
            user_assigned_id: client_id.map(|c| UserAssignedId::ClientId(c.to_string())),
            client_options,
        };
        let c = ManagedIdentityCredential::new(Some(options)).map_err(|e| fail("managed identity", e))?;
        Ok(c)
    }
}

/// A credential that hands out tokens for one scope only: the vault's.
#[derive(Debug)]
pub(crate) struct VaultScoped {
    inner: Arc<dyn TokenCredential>,
    scope: String,
}

#[async_trait::async_trait]
impl TokenCredential for VaultScoped {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        if scopes != [self.scope.as_str()] {
            return Err(azure_core::Error::with_message(
                ErrorKind::Other,
                format!(
                    "the vault asked for a token for {scopes:?}; tde asks for tokens for \"{}\" only (is \"vault_url\" a Key Vault?)",
                    self.scope
                ),
            ));
        }
        self.inner.get_token(scopes, options).await
    }
}

/// Our reqwest client as the SDK's transport.  It keeps the token
/// endpoint's last refusal, status and body, for the error mapping:
/// azure_identity 1.0 reads Entra ID's error as a borrowed `&str`
/// `error_description`, which fails on any JSON escape, and Entra ID's
/// descriptions always have some ("...\r\nTrace ID: ..."); the error it
/// then returns has lost the status and the service's words.
#[derive(Debug)]
struct Http {
    client: reqwest::Client,
    refusals: Refusals,
}

#[async_trait::async_trait]
impl HttpClient for Http {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let response = HttpClient::execute_request(&self.client, request).await?;
        if response.status().is_success() || !request.url().path().ends_with("/oauth2/v2.0/token") {
            return Ok(response);
        }
        let (status, headers, body) = response.deconstruct();
        let body = body.collect().await?;
        *lock(&self.refusals) = Some((u16::from(status), body.to_vec()));
        Ok(AsyncRawResponse::from_bytes(status, headers, body))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A master key must be an enabled RSA key that may wrap and unwrap.
fn check_key(k: &Key, key_name: &str) -> Result<(), ProviderError> {
    let Some(jwk) = &k.key else {
        return Err(remote(KIND, Failure::Other, format!("Key Vault returned no key for \"{key_name}\"")));
    };
    if !matches!(jwk.kty, Some(KeyType::Rsa) | Some(KeyType::RsaHsm)) {
        return Err(remote(
            KIND,
            Failure::Other,
            format!("key \"{key_name}\" is a {:?} key; a master key must be an RSA key (RSA or RSA-HSM)", jwk.kty),
        ));
    }
    if let Some(ops) = &jwk.key_ops {
        for op in ["wrapKey", "unwrapKey"] {
            if !ops.iter().any(|o| o == op) {
                return Err(remote(
                    KIND,
                    Failure::PermissionDenied,
                    format!("key \"{key_name}\" does not allow {op} (its key_ops: {})", ops.join(", ")),
                ));
            }
        }
    }
    if k.attributes.as_ref().and_then(|a| a.enabled) == Some(false) {
        return Err(remote(KIND, Failure::PermissionDenied, format!("key \"{key_name}\" is disabled")));
    }
    Ok(())
}

// ---- Errors -----------------------------------------------------------------

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The azure_core errors in `e`'s chain, outermost first.
fn azure_errors(e: &azure_core::Error) -> Vec<&azure_core::Error> {
    let mut out = vec![e];
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = cur {
        if let Some(a) = err.downcast_ref::<azure_core::Error>() {
            out.push(a);
        }
        cur = err.source();
    }
    out
}

fn is_not_found(e: &azure_core::Error) -> bool {
    let chain = azure_errors(e);
    !chain.iter().any(|a| matches!(a.kind(), ErrorKind::Credential))
        && chain.iter().any(|a| matches!(a.kind(), ErrorKind::HttpResponse { status, .. } if u16::from(*status) == 404))
}

/// The failure a response of `status` (with the service's `code` and
/// `message`) to `call` stands for.  `token`: the token endpoint answered.
pub(crate) fn failure_for(status: u16, code: &str, message: &str, call: Call, token: bool) -> Failure {
    if token || call == Call::Token {
        // AADSTS7000215 (invalid secret), AADSTS700016 (unknown application),
        // AADSTS90002 (unknown tenant) and their like are 400 or 401.
        return match status {
            400 | 401 => Failure::Credentials,
            403 => Failure::PermissionDenied,
            _ => Failure::Other,
        };
    }
    match status {
        401 => Failure::Credentials,
        // Forbidden (access policy or RBAC), ForbiddenByPolicy (firewall), a
        // disabled key.
        403 => Failure::PermissionDenied,
        404 if code == "KeyNotFound" || message.contains("was not found") => Failure::KeyNotFound,
        400 if call == Call::Unwrap
            && (code == "BadParameter" || message.to_ascii_lowercase().contains("ciphertext")) =>
        {
            Failure::WrongKey
        }
        _ => Failure::Other,
    }
}

/// Entra ID's refusal of a token request: `{"error": "invalid_client",
/// "error_description": "AADSTS7000215: ...\r\nTrace ID: ..."}`.
fn token_refused(status: u16, body: &[u8], call: Call) -> ProviderError {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    let field = |k: &str| v.as_ref().and_then(|v| v.get(k)).and_then(Value::as_str).unwrap_or("").to_string();
    let error = field("error");
    // The first line: the trace and correlation ids and the time follow.
    let description = field("error_description").lines().next().unwrap_or("").trim().to_string();
    let description = if description.is_empty() {
        let text = one_line(&String::from_utf8_lossy(body));
        if text.is_empty() {
            "no message".to_string()
        } else {
            text.chars().take(200).collect()
        }
    } else {
        description
    };
    let failure = failure_for(status, &error, &description, call, true);
    let code = if error.is_empty() { String::new() } else { format!("{error}, ") };
    remote(KIND, failure, format!("token request refused: {description} ({code}HTTP {status})"))
}

/// The one place Key Vault and Entra ID errors become ours.  `refusal`:
/// what the token endpoint said, if it refused a token during the call.
pub(crate) fn map_error(e: &azure_core::Error, call: Call, refusal: Option<(u16, &[u8])>) -> ProviderError {
    let chain = azure_errors(e);
    let token = chain.iter().any(|a| matches!(a.kind(), ErrorKind::Credential));
    if let (true, Some((status, body))) = (token || call == Call::Token, refusal) {
        return token_refused(status, body, call);
    }
    let http = chain.iter().find_map(|a| match a.kind() {
        ErrorKind::HttpResponse { status, error_code, raw_response } => {
            Some((u16::from(*status), error_code.clone(), raw_response.as_deref(), a.to_string()))
        }
        _ => None,
    });
    if let Some((status, error_code, raw, text)) = http {
        if token || call == Call::Token {
            let body = raw.map(|r| r.body().as_ref()).unwrap_or(text.as_bytes());
            return token_refused(status, body, call);
        }
        // Key Vault: {"error": {"code": "KeyNotFound", "message": "..."}}
        let body: Option<Value> = raw.and_then(|r| serde_json::from_slice(r.body().as_ref()).ok());
        let err = body.as_ref().and_then(|b| b.get("error"));
        let code = err
            .and_then(|e| e.get("code"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .or(error_code)
            .unwrap_or_default();
        let inner = err.and_then(|e| e.pointer("/innererror/code")).and_then(Value::as_str);
        let message = err.and_then(|e| e.get("message")).and_then(Value::as_str).map(one_line);
        let message = message.filter(|m| !m.is_empty()).unwrap_or_else(|| one_line(&text));
        let failure = failure_for(status, &code, &message, call, false);
        let code = match (code.as_str(), inner) {
            ("", _) => String::new(),
            (c, Some(i)) => format!("{c}/{i}, "),
            (c, None) => format!("{c}, "),
        };
        return remote(KIND, failure, format!("{message} ({code}HTTP {status})"));
    }
    let mut failure = transport_failure(e);
    if failure == Failure::Other && chain.iter().any(|a| matches!(a.kind(), ErrorKind::Connection)) {
        failure = Failure::Unreachable;
    }
    remote(KIND, failure, tidy(&error_chain(e)))
}

/// One line, without azure_identity's links to its troubleshooting guide.
fn tidy(text: &str) -> String {
    let mut words = Vec::new();
    let mut it = text.split_whitespace().peekable();
    while let Some(w) = it.next() {
        if w == "To" && it.peek() == Some(&"troubleshoot,") {
            it.next(); // "troubleshoot,"
            it.next(); // "visit"
            it.next(); // the link
            continue;
        }
        words.push(w);
    }
    words.join(" ").replace(" :", ":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        crate::options::refused(AzureKeyVault::from_options(&v, Duration::from_secs(1)), &v)
    }

    const VAULT: &str = "https://tde-test.vault.azure.net";
    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const CLIENT: &str = "00000000-1111-2222-3333-444444444444";

    #[test]
    fn options_are_checked() {
        std::env::set_var("TDE_KMS_UNIT_AZURE_SECRET", "s3cret-value");
        let base = json!({"vault_url": VAULT, "tenant_id": TENANT, "client_id": CLIENT,
                          "client_secret_env": "TDE_KMS_UNIT_AZURE_SECRET"});
        AzureKeyVault::from_options(&base, Duration::from_secs(1)).unwrap();
        let with = |k: &str, v: Value| {
            let mut o = base.clone();
            o[k] = v;
            o
        };
        let without = |k: &str| {
            let mut o = base.clone();
            o.as_object_mut().unwrap().remove(k);
            o
        };
        AzureKeyVault::from_options(&with("authority_host", json!("https://127.0.0.1:8443")), Duration::from_secs(1))
            .unwrap();
        AzureKeyVault::from_options(&with("vault_url", json!("https://127.0.0.1:8443/")), Duration::from_secs(1))
            .unwrap();

        assert!(err(without("vault_url")).contains("missing \"vault_url\""));
        assert!(err(with("vault_url", json!("http://tde.vault.azure.net"))).contains("https://"));
        assert!(err(with("vault_url", json!("https://tde.vault.azure.net/keys"))).contains("no path"));
        assert!(err(with("vault_url", json!("tde.vault.azure.net"))).contains("not a URL"));
        assert!(err(with("authority_host", json!("http://login.example"))).contains("https://"));
        assert!(err(with("tenant_id", json!("a/b"))).contains("tenant"));
        assert!(err(with("client_id", json!("x y"))).contains("client"));
        assert!(err(without("tenant_id")).contains("\"credentials\": \"default\""));
        assert!(
            err(without("client_secret_env")).contains("give one of \"client_secret_env\" and \"client_secret_file\"")
        );
        let both = err(with("client_secret_file", json!("/etc/tde/secret")));
        assert!(both.contains("only one of"), "{both}");
        assert!(err(with("client_secret_file", json!("secret"))).contains("absolute"));
        assert!(err(with("credentials", json!("default"))).contains("not both"));
        assert!(err(with("credentials", json!("cli"))).contains("must be \"default\""));
        assert!(err(with("ca_file", json!("/nonexistent/ca.pem"))).contains("could not open"));
        let unknown = err(with("client_secret", json!("inline")));
        assert!(unknown.contains("unknown option \"client_secret\""), "{unknown}");
        assert!(!unknown.contains("s3cret-value"));
        // a secret file readable by others is refused, and its content never shown
        let dir = std::env::temp_dir().join(format!("tde-kms-azure-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("secret");
        std::fs::write(&f, "file-s3cret\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = err(with("client_secret_file", json!(f))
            .as_object()
            .map(|m| {
                let mut m = m.clone();
                m.remove("client_secret_env");
                Value::Object(m)
            })
            .unwrap());
        assert!(e.contains("chmod 600") && !e.contains("file-s3cret"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_names() {
        assert_eq!(parse_key_name("tde-mek").unwrap(), KeyRef { name: "tde-mek", version: None });
        let v = "0123456789abcdef0123456789abcdef";
        assert_eq!(parse_key_name(&format!("tde-mek/{v}")).unwrap(), KeyRef { name: "tde-mek", version: Some(v) });
        for badname in ["", "a_b", "a.b", "a/", "/v", "a/b/c", "a/v-1", "ä", &"k".repeat(128)] {
            assert!(parse_key_name(badname).is_err(), "{badname}");
        }
    }

    #[test]
    fn scopes_follow_the_vaults_cloud() {
        assert_eq!(vault_scope("https://x.vault.azure.net/"), "https://vault.azure.net/.default");
        assert_eq!(vault_scope("https://x.VAULT.azure.cn/"), "https://vault.azure.cn/.default");
        assert_eq!(vault_scope("https://x.vault.usgovcloudapi.net/"), "https://vault.usgovcloudapi.net/.default");
        assert_eq!(vault_scope("https://h.managedhsm.azure.net/"), "https://managedhsm.azure.net/.default");
        assert_eq!(vault_scope("https://127.0.0.1:8443/"), "https://vault.azure.net/.default");
        assert_eq!(vault_scope("https://evilvault.azure.net/"), "https://vault.azure.net/.default");
    }

    /// A stand-in for Key Vault's RSA wrap: XOR with a key-specific pad.
    fn fake_wrap(pad: u8, d: &[u8]) -> Vec<u8> {
        let mut out: Vec<u8> = d.iter().map(|b| b ^ pad).collect();
        out.extend_from_slice(&[pad; 352]); // RSA 3072 gives 384 bytes
        out
    }

    fn fake_unwrap(pad: u8, wrapped: &[u8]) -> WrapKey {
        let plain: Vec<u8> = wrapped[..32].iter().map(|b| b ^ pad).collect();
        WrapKey::from_bytes(&plain).unwrap()
    }

    #[test]
    fn blob_round_trip() {
        let version = "0123456789abcdef0123456789abcdef";
        let kek = WrapKey::generate().unwrap();
        let d = WrapKey::generate().unwrap();
        let wrapped = fake_wrap(0x5a, d.expose());
        let blob = seal(&d, &kek, b"aad", &wrapped, version).unwrap();
        assert_eq!(blob.len(), 1 + 2 + 384 + 2 + 32 + 12 + 32 + 16);
        assert_eq!(blob[0], 1);
        assert_eq!(&blob[1..3], &384u16.to_be_bytes());
        assert_eq!(&blob[3 + 384..5 + 384], &32u16.to_be_bytes());
        assert_eq!(&blob[5 + 384..5 + 384 + 32], version.as_bytes());
        let parts = parse_blob(&blob).unwrap();
        assert_eq!((parts.wrapped_d, parts.version), (&wrapped[..], version));
        let d2 = fake_unwrap(0x5a, parts.wrapped_d);
        assert_eq!(open(&d2, &parts, b"aad").unwrap().expose(), kek.expose());
        // the KEK is nowhere in the blob
        assert!(!blob.windows(32).any(|w| w == kek.expose()));
        // two wraps of the same KEK differ (fresh D, fresh IV)
        let d3 = WrapKey::generate().unwrap();
        let blob2 = seal(&d3, &kek, b"aad", &fake_wrap(0x5a, d3.expose()), version).unwrap();
        assert_ne!(blob, blob2);
    }

    #[test]
    fn tampering_is_detected() {
        let version = "v1";
        let kek = WrapKey::generate().unwrap();
        let d = WrapKey::generate().unwrap();
        let blob = seal(&d, &kek, b"aad", &fake_wrap(7, d.expose()), version).unwrap();
        let opens = |blob: &[u8], aad: &[u8], pad: u8| -> bool {
            match parse_blob(blob) {
                Some(p) => open(&fake_unwrap(pad, p.wrapped_d), &p, aad).is_some(),
                None => false,
            }
        };
        assert!(opens(&blob, b"aad", 7));
        assert!(!opens(&blob, b"other aad", 7), "other associated data");
        assert!(!opens(&blob, b"aad", 8), "another master key");
        // every byte of the wrapped D and of the sealed KEK matters; the header is checked
        let header = 1 + 2;
        let sealed_from = blob.len() - WRAPPED_WRAP_KEY_LEN;
        for i in (0..32).map(|i| header + i).chain(sealed_from..blob.len()) {
            let mut t = blob.clone();
            t[i] ^= 1;
            assert!(!opens(&t, b"aad", 7), "flipped byte {i}");
        }
        let mut t = blob.clone();
        t[0] = 2;
        assert!(parse_blob(&t).is_none(), "unknown format version");
        assert!(parse_blob(&blob[..blob.len() - 1]).is_none(), "truncated");
        assert!(parse_blob(&[blob.clone(), vec![0]].concat()).is_none(), "trailing byte");
        assert!(parse_blob(&[]).is_none());
        // a key version that could leave the URL path
        let d = WrapKey::generate().unwrap();
        let evil = seal(&d, &kek, b"aad", &fake_wrap(7, d.expose()), "../x").unwrap();
        assert!(parse_blob(&evil).is_none());
        // a Transit or KMS blob is not ours
        assert!(parse_blob(b"vault:v1:abcdef").is_none());
    }

    #[test]
    fn errors_map_onto_failures() {
        use Call::*;
        assert_eq!(
            failure_for(401, "invalid_client", "AADSTS7000215: Invalid client secret provided.", Token, true),
            Failure::Credentials
        );
        assert_eq!(
            failure_for(400, "unauthorized_client", "AADSTS700016: Application not found", Wrap, true),
            Failure::Credentials
        );
        assert_eq!(
            failure_for(400, "invalid_request", "AADSTS90002: Tenant not found", Token, true),
            Failure::Credentials
        );
        assert_eq!(failure_for(500, "", "", Token, true), Failure::Other);
        assert_eq!(failure_for(401, "Unauthorized", "", GetKey, false), Failure::Credentials);
        assert_eq!(
            failure_for(403, "Forbidden", "does not have keys wrapKey permission", Wrap, false),
            Failure::PermissionDenied
        );
        assert_eq!(failure_for(403, "ForbiddenByPolicy", "", Unwrap, false), Failure::PermissionDenied);
        assert_eq!(
            failure_for(404, "KeyNotFound", "A key with (name/id) x was not found in this key vault.", GetKey, false),
            Failure::KeyNotFound
        );
        assert_eq!(failure_for(404, "", "Not Found", GetKey, false), Failure::Other);
        assert_eq!(failure_for(400, "BadParameter", "Invalid ciphertext", Unwrap, false), Failure::WrongKey);
        assert_eq!(failure_for(400, "BadParameter", "bad key size", CreateKey, false), Failure::Other);
        assert_eq!(failure_for(429, "Throttled", "", Wrap, false), Failure::Other);
    }

    #[test]
    fn sdk_errors_are_mapped() {
        use azure_core::http::{headers::Headers, RawResponse, StatusCode};
        let vault_error = |status: StatusCode, code: &str, body: &str| {
            let raw = RawResponse::from_bytes(status, Headers::new(), body.as_bytes().to_vec());
            azure_core::Error::with_message(
                ErrorKind::HttpResponse { status, error_code: Some(code.into()), raw_response: Some(Box::new(raw)) },
                "message",
            )
        };
        let e = vault_error(
            StatusCode::NotFound,
            "KeyNotFound",
            r#"{"error":{"code":"KeyNotFound","message":"A key with (name/id) k/0 was not found in this key vault."}}"#,
        );
        assert!(is_not_found(&e));
        let p = map_error(&e, Call::GetKey, None);
        assert_eq!(Failure::of(&p), Failure::KeyNotFound);
        assert_eq!(
            p.to_string(),
            "azure-keyvault provider: master key not found: A key with (name/id) k/0 was not found in this key vault. (KeyNotFound, HTTP 404)"
        );
        let e = vault_error(
            StatusCode::Forbidden,
            "Forbidden",
            r#"{"error":{"code":"Forbidden","message":"Caller is not authorized.","innererror":{"code":"ForbiddenByRbac"}}}"#,
        );
        let p = map_error(&e, Call::Wrap, None);
        assert_eq!(
            p.to_string(),
            "azure-keyvault provider: permission denied: Caller is not authorized. (Forbidden/ForbiddenByRbac, HTTP 403)"
        );
        let e =
            vault_error(StatusCode::BadRequest, "BadParameter", r#"{"error":{"code":"BadParameter","message":"x"}}"#);
        assert_eq!(Failure::of(&map_error(&e, Call::Unwrap, None)), Failure::WrongKey);

        // A token refused, as azure_identity 1.0 reports it when it cannot
        // parse Entra ID's answer: no status left, only our record of it.
        let body = concat!(
            r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."#,
            r#"\r\nTrace ID: 0\r\nCorrelation ID: 1","error_codes":[7000215]}"#
        );
        let parse = azure_core::Error::with_message(ErrorKind::DataConversion, "invalid type: string");
        let e = azure_core::Error::with_error(
            ErrorKind::Credential,
            parse,
            "ClientSecretCredential authentication failed.",
        );
        assert!(!is_not_found(&e));
        for call in [Call::Token, Call::Wrap] {
            let p = map_error(&e, call, Some((401, body.as_bytes())));
            assert_eq!(
                p.to_string(),
                "azure-keyvault provider: credentials refused: token request refused: AADSTS7000215: Invalid client secret provided. (invalid_client, HTTP 401)"
            );
        }
        // a token endpoint that is not Entra ID
        let p = map_error(&e, Call::Token, Some((502, b"<html>Bad Gateway</html>")));
        assert_eq!(Failure::of(&p), Failure::Other);
        assert!(p.to_string().contains("<html>Bad Gateway</html> (HTTP 502)"), "{p}");
        // a connection refused inside the credential
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let conn = azure_core::Error::with_error(ErrorKind::Connection, io, "failed to execute request");
        let e =
            azure_core::Error::with_error(ErrorKind::Credential, conn, "ClientSecretCredential authentication failed.");
        assert_eq!(Failure::of(&map_error(&e, Call::Token, None)), Failure::Unreachable);
    }

    #[test]
    fn the_default_credential_needs_no_secret() {
        let opts = json!({"vault_url": VAULT, "credentials": "default", "client_id": CLIENT});
        AzureKeyVault::from_options(&opts, Duration::from_secs(1)).unwrap();
    }
}
