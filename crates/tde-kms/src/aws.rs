//! `aws-kms`: master keys in AWS Key Management Service (or anything that
//! speaks its API, such as moto for tests).
//!
//! The master key never leaves KMS: wrap is `Encrypt` of the 32-byte KEK,
//! unwrap is `Decrypt`.  The associated data is bound as the encryption
//! context `{"tde": base64(aad)}`, which KMS authenticates with the
//! ciphertext and requires again, byte for byte, on `Decrypt`.  `Decrypt`
//! also names the key (`KeyId`), so a blob made under another key is refused
//! (`IncorrectKeyException`) rather than opened.  The blob is KMS's
//! `CiphertextBlob`, unchanged, so `aws kms decrypt` can open it too.
//!
//! Options:
//!
//! ```json
//! {"region": "eu-west-1",                        // required
//!  "endpoint": "http://127.0.0.1:15001",         // optional
//!  "access_key_id": "AKIA...",                   // with exactly one of:
//!  "secret_access_key_env": "AWS_SECRET",        //   an environment variable
//!  "secret_access_key_file": "/etc/tde/aws",     //   a file, mode 0600
//!  "session_token_env": "...", "session_token_file": "...",   // optional
//!  "ca_file": "/etc/tde/ca.pem"}                 // optional extra trust root
//! ```
//!
//! or `"credentials": "default"` (without the four above) for the SDK's
//! default chain (environment, shared config and credentials files, web
//! identity, ECS, EC2 instance metadata; no SSO and no `credential_process`,
//! which are built out).  Key names are key ids, key ARNs or `alias/NAME`.
//!
//! TLS is rustls with the ring provider (not the SDK's default aws-lc-rs:
//! smaller, and no C toolchain beyond what ring needs); trust roots are the
//! system's plus `ca_file`.
//!
//! Key material: the KEK is handed to the SDK as the `Plaintext` blob of
//! `Encrypt`, and comes back as the `Plaintext` of `Decrypt`.  Our copies are
//! wiped; the SDK's request body (base64 JSON) and response buffers are not,
//! and cannot be from out here.

use crate::options::{bad, Opts};
use crate::rt::{self, remote};
use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region, SharedHttpClient};
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeySpec, KeyState, KeyUsageType};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode, TlsContext, TrustStore};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::Value;
use std::time::Duration;
use tde_core::provider::{Failure, MasterKeyProvider, ProviderError};
use tde_core::secret::WrapKey;
use zeroize::Zeroize;

pub(crate) const KIND: &str = "aws-kms";

const KNOWN: [&str; 9] = [
    "region",
    "endpoint",
    "credentials",
    "access_key_id",
    "secret_access_key_env",
    "secret_access_key_file",
    "session_token_env",
    "session_token_file",
    "ca_file",
];

/// The encryption context key that carries the associated data.
const CONTEXT_KEY: &str = "tde";

pub struct AwsKms {
    client: aws_sdk_kms::Client,
    limit: Duration,
}

/// Where the credentials come from.
enum Creds {
    Static(Credentials),
    Default,
}

impl AwsKms {
    pub fn from_options(options: &Value, limit: Duration) -> Result<AwsKms, ProviderError> {
        let o = Opts::new(KIND, options, &KNOWN)?;
        let region = o.required("region")?.to_string();
        let endpoint = match o.string("endpoint")? {
            Some(e) => Some(check_endpoint(e)?),
            None => None,
        };
        let creds = match o.string("credentials")? {
            Some("default") => {
                let given = ["access_key_id", "secret_access_key_env", "secret_access_key_file"]
                    .into_iter()
                    .chain(["session_token_env", "session_token_file"])
                    .find(|k| o.string(k).ok().flatten().is_some());
                if let Some(k) = given {
                    return Err(o.bad(format!("\"{k}\" cannot be combined with \"credentials\": \"default\"")));
                }
                Creds::Default
            }
            Some(other) => {
                return Err(o.bad(format!(
                    "\"credentials\" must be \"default\" (got \"{other}\"); or give \"access_key_id\" and a secret"
                )))
            }
            None => {
                let akid = o.string("access_key_id")?.ok_or_else(|| {
                    o.bad("give \"access_key_id\" with \"secret_access_key_env\" or \"secret_access_key_file\", or \"credentials\": \"default\"")
                })?;
                let secret = o.secret("secret_access_key")?;
                let token = o.secret_opt("session_token")?;
                // Credentials keeps both secrets in zeroizing strings of its own.
                let token = token.map(|t| t.as_str().to_string());
                Creds::Static(Credentials::new(akid, secret.as_str(), token, None, "tde-kms options"))
            }
        };
        let mut trust = TrustStore::default();
        if let Some(pem) = o.ca_file("ca_file")? {
            trust = trust.with_pem_certificate(pem);
        }
        let tls = TlsContext::builder().with_trust_store(trust).build().map_err(|e| bad(KIND, e.to_string()))?;
        let http: SharedHttpClient = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .tls_context(tls)
            .build_https();

        let inner = rt::inner_limit(limit);
        let timeouts = TimeoutConfig::builder().connect_timeout(inner).operation_timeout(inner).build();
        // Retries (of throttling and dropped connections) stay inside the
        // operation timeout.
        let retry = RetryConfig::standard().with_max_attempts(3);
        let config = match creds {
            Creds::Static(c) => {
                let mut b = aws_sdk_kms::Config::builder()
                    .behavior_version(BehaviorVersion::latest())
                    .region(Region::new(region))
                    .http_client(http)
                    .timeout_config(timeouts)
                    .retry_config(retry)
                    .credentials_provider(c);
                if let Some(e) = endpoint {
                    b = b.endpoint_url(e);
                }
                b.build()
            }
            Creds::Default => {
                let loader = aws_config::defaults(BehaviorVersion::latest())
                    .region(Region::new(region))
                    .http_client(http)
                    .timeout_config(timeouts)
                    .retry_config(retry);
                let loader = match endpoint {
                    Some(e) => loader.endpoint_url(e),
                    None => loader,
                };
                let shared = rt::block_on(KIND, limit, loader.load())?;
                aws_sdk_kms::config::Builder::from(&shared).build()
            }
        };
        Ok(AwsKms { client: aws_sdk_kms::Client::from_conf(config), limit })
    }

    fn run<F: std::future::Future>(&self, fut: F) -> Result<F::Output, ProviderError> {
        rt::block_on(KIND, self.limit, fut)
    }

    /// Checks that `key` exists and is a usable symmetric encryption key.
    async fn describe(&self, key: &str) -> Result<(), ProviderError> {
        let out = self.client.describe_key().key_id(key).send().await.map_err(map_sdk_error)?;
        let Some(meta) = out.key_metadata() else {
            return Err(remote(KIND, Failure::Other, format!("DescribeKey of \"{key}\" returned no key metadata")));
        };
        if meta.key_usage() != Some(&KeyUsageType::EncryptDecrypt)
            || meta.key_spec() != Some(&KeySpec::SymmetricDefault)
        {
            return Err(remote(
                KIND,
                Failure::Other,
                format!(
                    "\"{key}\" is not a symmetric encryption key (KeySpec {:?}, KeyUsage {:?}); a master key must be SYMMETRIC_DEFAULT / ENCRYPT_DECRYPT",
                    meta.key_spec().map(|s| s.as_str()),
                    meta.key_usage().map(|u| u.as_str())
                ),
            ));
        }
        match meta.key_state() {
            Some(KeyState::Enabled) | None => Ok(()),
            Some(KeyState::Disabled) => {
                Err(remote(KIND, Failure::PermissionDenied, format!("key disabled: \"{key}\"")))
            }
            Some(state) => Err(remote(KIND, Failure::Other, format!("key \"{key}\" is in state {}", state.as_str()))),
        }
    }

    async fn create_alias_key(&self, alias: &str) -> Result<(), ProviderError> {
        let created = self
            .client
            .create_key()
            .key_spec(KeySpec::SymmetricDefault)
            .key_usage(KeyUsageType::EncryptDecrypt)
            .description("tde master key")
            .send()
            .await
            .map_err(map_sdk_error)?;
        let Some(key_id) = created.key_metadata().map(|m| m.key_id().to_string()) else {
            return Err(remote(KIND, Failure::Other, "CreateKey returned no key metadata"));
        };
        match self.client.create_alias().alias_name(alias).target_key_id(&key_id).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("AlreadyExistsException") => {
                // Someone else created the alias meanwhile: theirs wins; ours,
                // never used, is scheduled for deletion (best effort).
                let _ = self.client.schedule_key_deletion().key_id(&key_id).pending_window_in_days(7).send().await;
                self.describe(alias).await
            }
            Err(e) => Err(map_sdk_error(e)),
        }
    }
}

impl MasterKeyProvider for AwsKms {
    fn probe(&self) -> Result<(), ProviderError> {
        self.run(self.client.list_keys().limit(1).send())?.map(|_| ()).map_err(map_sdk_error)
    }

    fn ensure_key(&self, key_name: &str) -> Result<(), ProviderError> {
        self.run(async {
            match self.describe(key_name).await {
                Err(ProviderError::Remote { failure: Failure::KeyNotFound, .. }) if key_name.starts_with("alias/") => {
                    self.create_alias_key(key_name).await
                }
                other => other,
            }
        })?
    }

    fn wrap(&self, key_name: &str, kek: &WrapKey, aad: &[u8]) -> Result<Vec<u8>, ProviderError> {
        let out = self.run(
            self.client
                .encrypt()
                .key_id(key_name)
                .plaintext(Blob::new(kek.expose().to_vec()))
                .encryption_context(CONTEXT_KEY, B64.encode(aad))
                .send(),
        )?;
        let out = out.map_err(map_sdk_error)?;
        match out.ciphertext_blob {
            Some(blob) if !blob.as_ref().is_empty() => Ok(blob.into_inner()),
            _ => Err(remote(KIND, Failure::Other, "Encrypt returned no ciphertext")),
        }
    }

    fn unwrap(&self, key_name: &str, blob: &[u8], aad: &[u8]) -> Result<WrapKey, ProviderError> {
        let out = self.run(
            self.client
                .decrypt()
                .key_id(key_name)
                .ciphertext_blob(Blob::new(blob.to_vec()))
                .encryption_context(CONTEXT_KEY, B64.encode(aad))
                .send(),
        )?;
        let mut out = out.map_err(map_sdk_error)?;
        let Some(plain) = out.plaintext.take() else {
            return Err(remote(KIND, Failure::Other, "Decrypt returned no plaintext"));
        };
        let mut plain = plain.into_inner();
        let key = WrapKey::from_bytes(&plain);
        plain.zeroize();
        key.map_err(|_| ProviderError::WrongKey { key: key_name.to_string() })
    }
}

/// `endpoint` must be an http(s) URL with a host.
fn check_endpoint(e: &str) -> Result<String, ProviderError> {
    let rest = e.strip_prefix("https://").or_else(|| e.strip_prefix("http://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') => Ok(e.to_string()),
        _ => Err(bad(KIND, format!("\"endpoint\" must be an http:// or https:// URL (got \"{e}\")"))),
    }
}

/// The failure an AWS error code stands for.
pub(crate) fn failure_for_code(code: &str) -> Failure {
    match code {
        "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "ExpiredToken"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "MissingAuthenticationTokenException"
        | "InvalidAccessKeyId" => Failure::Credentials,
        "NotFoundException" => Failure::KeyNotFound,
        "AccessDeniedException" | "AccessDenied" | "DisabledException" => Failure::PermissionDenied,
        "InvalidCiphertextException" | "IncorrectKeyException" => Failure::WrongKey,
        "DependencyTimeoutException" => Failure::TimedOut,
        _ => Failure::Other,
    }
}

/// What an error response looked like, when its error has no code (a proxy,
/// or a KMS look-alike, answering in XML or HTML).
pub(crate) trait RawResponse {
    fn status(&self) -> u16;
    fn body(&self) -> Option<&[u8]>;
}

impl RawResponse for aws_sdk_kms::config::http::HttpResponse {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
    fn body(&self) -> Option<&[u8]> {
        self.body().bytes()
    }
}

/// The one place AWS errors become ours.  `detail` is the vendor's message
/// and code (a KMS error never holds key material).
pub(crate) fn map_sdk_error<E, R>(e: SdkError<E, R>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: RawResponse + std::fmt::Debug + 'static,
{
    match &e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            let (code, message) = match err.code() {
                Some(code) => (code.to_string(), err.message().unwrap_or("").to_string()),
                None => code_from_body(s.raw()),
            };
            let failure = match failure_for_code(&code) {
                Failure::Other if code.is_empty() => failure_for_status(s.raw().status()),
                f => f,
            };
            let code = if code.is_empty() { format!("HTTP {}", s.raw().status()) } else { code };
            // KMS gives some errors (InvalidCiphertextException) no message.
            let detail = match (code == "DisabledException", message.is_empty()) {
                (true, _) => format!("key disabled: {message} ({code})"),
                (false, true) => code,
                (false, false) => format!("{message} ({code})"),
            };
            remote(KIND, failure, detail)
        }
        SdkError::TimeoutError(_) => remote(KIND, Failure::TimedOut, crate::rt::error_chain(&e)),
        SdkError::DispatchFailure(d) => {
            let failure = if d.is_timeout() {
                Failure::TimedOut
            } else if d.is_io() {
                Failure::Unreachable
            } else if is_credentials_failure(&e) {
                Failure::Credentials
            } else {
                Failure::Other
            };
            remote(KIND, failure, crate::rt::error_chain(&e))
        }
        _ => {
            let failure = if is_credentials_failure(&e) { Failure::Credentials } else { Failure::Other };
            remote(KIND, failure, crate::rt::error_chain(&e))
        }
    }
}

/// An error response with no code the SDK could parse: 401 is about the
/// credentials, 403 about permissions.
fn failure_for_status(status: u16) -> Failure {
    match status {
        401 => Failure::Credentials,
        403 => Failure::PermissionDenied,
        _ => Failure::Other,
    }
}

/// `<Code>` and `<Message>` of an XML error body (the query protocol's
/// shape, which some KMS look-alikes answer with), or a short prefix of the
/// body as the message.
fn code_from_body(raw: &impl RawResponse) -> (String, String) {
    let text = raw.body().map(String::from_utf8_lossy).unwrap_or_default();
    let tag = |name: &str| {
        let (open, close) = (format!("<{name}>"), format!("</{name}>"));
        let start = text.find(&open)? + open.len();
        let len = text[start..].find(&close)?;
        Some(text[start..start + len].trim().to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(code), message) => (code, message.unwrap_or_default()),
        (None, _) => (String::new(), text.chars().take(200).collect::<String>().trim().to_string()),
    }
}

/// The credentials could not be had (the default chain found none, or a
/// provider in it failed): a `CredentialsError` somewhere in the chain.
fn is_credentials_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<aws_credential_types::provider::error::CredentialsError>().is_some() {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        crate::options::refused(AwsKms::from_options(&v, Duration::from_secs(1)), &v)
    }

    #[test]
    fn options_are_checked() {
        std::env::set_var("TDE_KMS_UNIT_AWS_SECRET", "s3cr3t-value");
        let ok =
            json!({"region": "us-east-1", "access_key_id": "AKID", "secret_access_key_env": "TDE_KMS_UNIT_AWS_SECRET"});
        assert!(AwsKms::from_options(&ok, Duration::from_secs(1)).is_ok());
        let ok2 = json!({"region": "us-east-1", "endpoint": "http://127.0.0.1:1", "access_key_id": "AKID",
                         "secret_access_key_env": "TDE_KMS_UNIT_AWS_SECRET", "session_token_env": "TDE_KMS_UNIT_AWS_SECRET"});
        assert!(AwsKms::from_options(&ok2, Duration::from_secs(1)).is_ok());

        assert!(err(json!({"region": "r", "acces_key_id": "x"})).contains("unknown option \"acces_key_id\""));
        assert!(err(json!({"access_key_id": "A", "secret_access_key_env": "X"})).contains("missing \"region\""));
        assert!(err(json!({"region": "r", "access_key_id": "A"})).contains("give one of"));
        let both = err(
            json!({"region": "r", "access_key_id": "A", "secret_access_key_env": "X", "secret_access_key_file": "/x"}),
        );
        assert!(both.contains("only one of"), "{both}");
        assert!(err(json!({"region": "r", "secret_access_key_env": "X"})).contains("access_key_id"));
        let rel = err(json!({"region": "r", "access_key_id": "A", "secret_access_key_file": "secret"}));
        assert!(rel.contains("absolute"), "{rel}");
        assert!(err(json!({"region": "r", "access_key_id": "A", "secret_access_key_env": "TDE_KMS_UNIT_NOT_SET"}))
            .contains("is not set"));
        assert!(
            err(json!({"region": "r", "credentials": "default", "access_key_id": "A"})).contains("cannot be combined")
        );
        assert!(err(json!({"region": "r", "credentials": "mine"})).contains("must be \"default\""));
        assert!(err(json!({"region": "r", "endpoint": "127.0.0.1:80", "credentials": "default"})).contains("http://"));
        assert!(err(json!({"region": "r", "credentials": "default", "ca_file": "ca.pem"})).contains("absolute"));
        assert!(err(json!(["region"])).contains("JSON object"));
        assert!(err(json!({"region": 5})).contains("non-empty string"));
        // the secret never shows in an error
        let e = err(
            json!({"region": "r", "access_key_id": "A", "secret_access_key_env": "TDE_KMS_UNIT_AWS_SECRET", "x": 1}),
        );
        assert!(!e.contains("s3cr3t"), "{e}");
    }

    #[test]
    fn error_codes_map_onto_failures() {
        let cases = [
            ("UnrecognizedClientException", Failure::Credentials),
            ("InvalidSignatureException", Failure::Credentials),
            ("ExpiredTokenException", Failure::Credentials),
            ("NotFoundException", Failure::KeyNotFound),
            ("AccessDeniedException", Failure::PermissionDenied),
            ("DisabledException", Failure::PermissionDenied),
            ("InvalidCiphertextException", Failure::WrongKey),
            ("IncorrectKeyException", Failure::WrongKey),
            ("KMSInternalException", Failure::Other),
            ("ThrottlingException", Failure::Other),
        ];
        for (code, failure) in cases {
            assert_eq!(failure_for_code(code), failure, "{code}");
        }
    }

    #[test]
    fn service_errors_carry_the_vendors_message() {
        use aws_sdk_kms::error::ErrorMetadata;
        use aws_sdk_kms::operation::decrypt::DecryptError;
        let meta = ErrorMetadata::builder().code("DisabledException").message("arn:aws:kms:k is disabled.").build();
        let e: SdkError<DecryptError, Raw> = SdkError::service_error(DecryptError::generic(meta), Raw(400, ""));
        let e = map_sdk_error(e);
        assert_eq!(
            e.to_string(),
            "aws-kms provider: permission denied: key disabled: arn:aws:kms:k is disabled. (DisabledException)"
        );
        let meta = ErrorMetadata::builder()
            .code("UnrecognizedClientException")
            .message("The security token included in the request is invalid.")
            .build();
        let e: SdkError<DecryptError, Raw> = SdkError::service_error(DecryptError::generic(meta), Raw(400, ""));
        assert!(matches!(map_sdk_error(e), ProviderError::Remote { failure: Failure::Credentials, .. }));
    }

    #[derive(Debug)]
    struct Raw(u16, &'static str);

    impl RawResponse for Raw {
        fn status(&self) -> u16 {
            self.0
        }
        fn body(&self) -> Option<&[u8]> {
            Some(self.1.as_bytes())
        }
    }

    #[test]
    fn uncoded_errors_fall_back_on_the_body_and_status() {
        use aws_sdk_kms::error::ErrorMetadata;
        use aws_sdk_kms::operation::list_keys::ListKeysError;
        let map = |raw: Raw| {
            let e: SdkError<ListKeysError, Raw> =
                SdkError::service_error(ListKeysError::generic(ErrorMetadata::builder().build()), raw);
            map_sdk_error(e)
        };
        let xml = "<ErrorResponse><Errors><Error><Code>InvalidClientTokenId</Code>\
                   <Message>The security token included in the request is invalid.</Message></Error></Errors></ErrorResponse>";
        let e = map(Raw(403, xml));
        assert_eq!(Failure::of(&e), Failure::Credentials);
        assert_eq!(
            e.to_string(),
            "aws-kms provider: credentials refused: The security token included in the request is invalid. (InvalidClientTokenId)"
        );
        let e = map(Raw(403, "<html>Forbidden by proxy</html>"));
        assert_eq!(Failure::of(&e), Failure::PermissionDenied);
        assert!(e.to_string().contains("Forbidden by proxy") && e.to_string().contains("HTTP 403"), "{e}");
        assert_eq!(Failure::of(&map(Raw(401, ""))), Failure::Credentials);
        assert_eq!(Failure::of(&map(Raw(500, ""))), Failure::Other);
    }
}
