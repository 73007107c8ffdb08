//! `kmip`: master keys in a KMIP server (KMIP 1.4 over mutually
//! authenticated TLS), such as PyKMIP, Thales CipherTrust, Fortanix, HashiCorp
//! Vault Enterprise's KMIP engine.
//!
//! The master key is an AES-256 symmetric key object whose `Name` attribute is
//! the key's name, created by `ensure_key` (`Create`, then `Activate`) with
//! only the Encrypt and Decrypt usage bits.  Wrap is the server's `Encrypt`
//! operation with AES-GCM (a random 12-byte IV from us, the associated data
//! as "Authenticated Encryption Additional Data", a 16-byte tag), unwrap its
//! `Decrypt`: the key is never fetched (`Get` is never sent), so it need not
//! be exportable, and our certificate can be one the server lets encrypt and
//! decrypt only.  The blob has the `pkcs11` provider's layout:
//!
//! ```text
//! +---------+-------------+--------------------------------------+
//! | 0x01    | IV          | ciphertext (32) || GCM tag (16)       |
//! | 1 byte  | 12 bytes    | 48 bytes                             |
//! +---------+-------------+--------------------------------------+
//! ```
//!
//! Options:
//!
//! ```json
//! {"host": "kmip.example", "port": 5696,        // port optional, default 5696
//!  "cert_file": "/etc/tde/kmip-client.pem",      // our certificate (chain), PEM
//!  "key_file": "/etc/tde/kmip-client.key",       // its private key, PEM, mode 0600
//!  "ca_file": "/etc/tde/kmip-ca.pem"}            // optional extra trust root
//! ```
//!
//! Each call opens one TLS connection (rustls with ring, TLS 1.2 or 1.3) and
//! sends its requests on it, one batch item each; master-key calls are rare,
//! and a fresh connection has no state to go stale.  Connecting, the
//! handshake and every exchange are bounded by `timeout_ms`.  The codec is
//! ours ([`crate::ttlv`]; see there why).
//!
//! Key material: the KEK travels in the Encrypt request and the Decrypt
//! response; both messages are built and read in zeroizing buffers.
//! rustls's record buffers are not wiped.

use crate::options::{secret_file_bytes, Opts};
use crate::rt::{self, error_chain, remote};
use crate::ttlv::Item;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tde_core::provider::{Failure, MasterKeyProvider, ProviderError};
use tde_core::secret::{WrapKey, WRAP_KEY_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use zeroize::Zeroizing;

pub(crate) const KIND: &str = "kmip";

const KNOWN: [&str; 5] = ["host", "port", "cert_file", "key_file", "ca_file"];

/// Largest response accepted.
const MAX_MESSAGE: usize = 1 << 20;

const BLOB_VERSION: u8 = 1;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
const BLOB_LEN: usize = 1 + IV_LEN + WRAP_KEY_LEN + TAG_LEN;

/// KMIP tags (KMIP 1.4, section 9.1.3.1).
mod tag {
    pub const ATTRIBUTE: u32 = 0x420008;
    pub const ATTRIBUTE_NAME: u32 = 0x42000A;
    pub const ATTRIBUTE_VALUE: u32 = 0x42000B;
    pub const BATCH_COUNT: u32 = 0x42000D;
    pub const BATCH_ITEM: u32 = 0x42000F;
    pub const BLOCK_CIPHER_MODE: u32 = 0x420011;
    pub const CRYPTOGRAPHIC_ALGORITHM: u32 = 0x420028;
    pub const CRYPTOGRAPHIC_PARAMETERS: u32 = 0x42002B;
    pub const IV_COUNTER_NONCE: u32 = 0x42003D;
    pub const NAME_TYPE: u32 = 0x420054;
    pub const NAME_VALUE: u32 = 0x420055;
    pub const OBJECT_TYPE: u32 = 0x420057;
    pub const OPERATION: u32 = 0x42005C;
    pub const PROTOCOL_VERSION: u32 = 0x420069;
    pub const PROTOCOL_VERSION_MAJOR: u32 = 0x42006A;
    pub const PROTOCOL_VERSION_MINOR: u32 = 0x42006B;
    pub const REQUEST_HEADER: u32 = 0x420077;
    pub const REQUEST_MESSAGE: u32 = 0x420078;
    pub const REQUEST_PAYLOAD: u32 = 0x420079;
    pub const RESPONSE_MESSAGE: u32 = 0x42007B;
    pub const RESPONSE_PAYLOAD: u32 = 0x42007C;
    pub const RESULT_MESSAGE: u32 = 0x42007D;
    pub const RESULT_REASON: u32 = 0x42007E;
    pub const RESULT_STATUS: u32 = 0x42007F;
    pub const TEMPLATE_ATTRIBUTE: u32 = 0x420091;
    pub const UNIQUE_IDENTIFIER: u32 = 0x420094;
    pub const DATA: u32 = 0x4200C2;
    pub const TAG_LENGTH: u32 = 0x4200CE;
    pub const AEAD_ADDITIONAL_DATA: u32 = 0x4200FE;
    pub const AEAD_TAG: u32 = 0x4200FF;
}

/// Operations (section 9.1.3.2.27).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Op {
    Create = 0x01,
    Locate = 0x08,
    Activate = 0x12,
    DiscoverVersions = 0x1E,
    Encrypt = 0x1F,
    Decrypt = 0x20,
}

const OBJECT_TYPE_SYMMETRIC_KEY: u32 = 0x02;
const ALGORITHM_AES: u32 = 0x03;
const BLOCK_CIPHER_MODE_GCM: u32 = 0x09;
const NAME_TYPE_TEXT: u32 = 0x01;
const USAGE_ENCRYPT_DECRYPT: i32 = 0x04 | 0x08;
const RESULT_SUCCESS: u32 = 0x00;

pub struct Kmip {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    limit: Duration,
}

/// One connection to the server.
struct Conn {
    stream: TlsStream<TcpStream>,
}

impl Kmip {
    pub fn from_options(options: &Value, limit: Duration) -> Result<Kmip, ProviderError> {
        let o = Opts::new(KIND, options, &KNOWN)?;
        let host = o.required("host")?.to_string();
        let port = match o.integer("port")? {
            None => 5696,
            Some(p) if (1..=65535).contains(&p) => p as u16,
            Some(p) => return Err(o.bad(format!("\"port\" must be from 1 to 65535 (got {p})"))),
        };
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| o.bad(format!("\"host\" is not a host name or IP address: \"{host}\"")))?;
        let cert_path = o
            .path("cert_file")?
            .ok_or_else(|| o.bad("missing \"cert_file\" (KMIP authenticates clients by certificate)"))?;
        let key_path = o.path("key_file")?.ok_or_else(|| o.bad("missing \"key_file\""))?;
        let ca = o.ca_file("ca_file")?;

        let chain_pem =
            std::fs::read(&cert_path).map_err(|e| o.bad(format!("could not read \"{}\": {e}", cert_path.display())))?;
        let chain = CertificateDer::pem_slice_iter(&chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| o.bad(format!("\"{}\" is not a PEM certificate file: {e}", cert_path.display())))?;
        if chain.is_empty() {
            return Err(o.bad(format!("\"{}\" holds no PEM certificate", cert_path.display())));
        }
        let key_pem = secret_file_bytes(KIND, &key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|_| o.bad(format!("\"{}\" holds no PEM private key", key_path.display())))?;

        let tls = crate::tls::client_builder(KIND, ca.as_deref())?
            .with_client_auth_cert(chain, key)
            .map_err(|e| o.bad(format!("the client certificate and key do not make a TLS identity: {e}")))?;
        Ok(Kmip { host, port, server_name, tls: Arc::new(tls), limit })
    }

    /// Runs `f` on a new connection, within the deadline.
    fn run<T, F, Fut>(&self, f: F) -> Result<T, ProviderError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let inner = rt::inner_limit(self.limit);
        rt::block_on(KIND, self.limit, async {
            match tokio::time::timeout(inner, async { f(self.connect().await?).await }).await {
                Ok(r) => r,
                Err(_) => Err(rt::timed_out(KIND, inner)),
            }
        })?
    }

    async fn connect(&self) -> Result<Conn, ProviderError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await.map_err(|e| {
            remote(KIND, Failure::Unreachable, format!("could not connect to {}:{}: {e}", self.host, self.port))
        })?;
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let stream = connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| io_error(&e, &format!("TLS handshake with {}:{}", self.host, self.port)))?;
        Ok(Conn { stream })
    }
}

impl Conn {
    /// Sends one request and returns its response payload.
    async fn call(&mut self, op: Op, payload: Vec<Item>) -> Result<Item, ProviderError> {
        let msg = Item::structure(
            tag::REQUEST_MESSAGE,
            vec![
                Item::structure(
                    tag::REQUEST_HEADER,
                    vec![
                        Item::structure(
                            tag::PROTOCOL_VERSION,
                            vec![
                                Item::integer(tag::PROTOCOL_VERSION_MAJOR, 1),
                                Item::integer(tag::PROTOCOL_VERSION_MINOR, 4),
                            ],
                        ),
                        Item::integer(tag::BATCH_COUNT, 1),
                    ],
                ),
                Item::structure(
                    tag::BATCH_ITEM,
                    vec![Item::enumeration(tag::OPERATION, op as u32), Item::structure(tag::REQUEST_PAYLOAD, payload)],
                ),
            ],
        );
        let mut out = Zeroizing::new(Vec::with_capacity(512));
        msg.encode(&mut out);
        let what = format!("{op:?} request");
        self.stream.write_all(&out).await.map_err(|e| io_error(&e, &what))?;
        self.stream.flush().await.map_err(|e| io_error(&e, &what))?;

        let mut header = [0u8; 8];
        self.stream.read_exact(&mut header).await.map_err(|e| io_error(&e, &format!("{op:?} response")))?;
        let len = crate::ttlv::message_len(&header);
        if len > MAX_MESSAGE {
            return Err(remote(KIND, Failure::Other, format!("{op:?} response of {len} bytes is too large")));
        }
        let mut buf = Zeroizing::new(vec![0u8; len]);
        buf[..8].copy_from_slice(&header);
        self.stream.read_exact(&mut buf[8..]).await.map_err(|e| io_error(&e, &format!("{op:?} response")))?;
        let resp =
            Item::decode(&buf).map_err(|e| remote(KIND, Failure::Other, format!("malformed {op:?} response: {e}")))?;
        response_payload(resp, op)
    }

    /// The unique identifier of the one AES key named `name`, if any.
    async fn locate(&mut self, name: &str) -> Result<Option<String>, ProviderError> {
        let payload = vec![
            attribute("Object Type", Item::enumeration(tag::ATTRIBUTE_VALUE, OBJECT_TYPE_SYMMETRIC_KEY)),
            attribute("Name", name_value(tag::ATTRIBUTE_VALUE, name)),
        ];
        let resp = self.call(Op::Locate, payload).await?;
        let ids: Vec<&str> = resp.find_all(tag::UNIQUE_IDENTIFIER).filter_map(Item::as_text).collect();
        match ids.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one.to_string())),
            many => Err(remote(
                KIND,
                Failure::Other,
                format!(
                    "{} symmetric keys are named \"{name}\" on the server ({}); a master key's name must be unique",
                    many.len(),
                    many.join(", ")
                ),
            )),
        }
    }

    async fn need(&mut self, name: &str) -> Result<String, ProviderError> {
        self.locate(name).await?.ok_or_else(|| {
            remote(KIND, Failure::KeyNotFound, format!("no symmetric key named \"{name}\" on the server"))
        })
    }

    async fn create(&mut self, name: &str) -> Result<String, ProviderError> {
        let template = Item::structure(
            tag::TEMPLATE_ATTRIBUTE,
            vec![
                attribute("Cryptographic Algorithm", Item::enumeration(tag::ATTRIBUTE_VALUE, ALGORITHM_AES)),
                attribute("Cryptographic Length", Item::integer(tag::ATTRIBUTE_VALUE, 256)),
                attribute("Cryptographic Usage Mask", Item::integer(tag::ATTRIBUTE_VALUE, USAGE_ENCRYPT_DECRYPT)),
                attribute("Name", name_value(tag::ATTRIBUTE_VALUE, name)),
            ],
        );
        let payload = vec![Item::enumeration(tag::OBJECT_TYPE, OBJECT_TYPE_SYMMETRIC_KEY), template];
        let resp = self.call(Op::Create, payload).await?;
        let uid = resp.find(tag::UNIQUE_IDENTIFIER).and_then(Item::as_text).map(str::to_string);
        let uid = uid.ok_or_else(|| remote(KIND, Failure::Other, "Create returned no unique identifier"))?;
        self.call(Op::Activate, vec![Item::text(tag::UNIQUE_IDENTIFIER, &uid)]).await?;
        Ok(uid)
    }
}

fn attribute(name: &str, value: Item) -> Item {
    Item::structure(tag::ATTRIBUTE, vec![Item::text(tag::ATTRIBUTE_NAME, name), value])
}

fn name_value(t: u32, name: &str) -> Item {
    Item::structure(t, vec![Item::text(tag::NAME_VALUE, name), Item::enumeration(tag::NAME_TYPE, NAME_TYPE_TEXT)])
}

fn gcm_parameters() -> Item {
    Item::structure(
        tag::CRYPTOGRAPHIC_PARAMETERS,
        vec![
            Item::enumeration(tag::BLOCK_CIPHER_MODE, BLOCK_CIPHER_MODE_GCM),
            Item::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, ALGORITHM_AES),
            Item::integer(tag::TAG_LENGTH, TAG_LEN as i32),
        ],
    )
}

/// The payload of a successful response, or the server's reason mapped.
fn response_payload(resp: Item, op: Op) -> Result<Item, ProviderError> {
    if resp.tag != tag::RESPONSE_MESSAGE {
        return Err(remote(KIND, Failure::Other, format!("{op:?}: the answer is not a KMIP response message")));
    }
    let Some(batch) = resp.take(tag::BATCH_ITEM) else {
        return Err(remote(KIND, Failure::Other, format!("{op:?}: the response has no batch item")));
    };
    let status = batch.find(tag::RESULT_STATUS).and_then(Item::as_enum);
    if status == Some(RESULT_SUCCESS) {
        return Ok(batch.take(tag::RESPONSE_PAYLOAD).unwrap_or_else(|| Item::structure(tag::RESPONSE_PAYLOAD, vec![])));
    }
    let reason = batch.find(tag::RESULT_REASON).and_then(Item::as_enum);
    let message = batch.find(tag::RESULT_MESSAGE).and_then(Item::as_text).unwrap_or("no message");
    let failure = reason.map_or(Failure::Other, |r| failure_for_reason(r, op));
    let reason = reason.map_or("no reason".to_string(), reason_name);
    Err(remote(KIND, failure, format!("{op:?} failed: {message} ({reason})")))
}

/// The failure a KMIP Result Reason (section 9.1.3.2.29) stands for.
fn failure_for_reason(reason: u32, op: Op) -> Failure {
    match reason {
        0x01 | 0x37 => Failure::KeyNotFound,             // Item Not Found, Object Not Found
        0x03 | 0x25 => Failure::Credentials,             // Authentication Not Successful, Bad Password
        0x0C | 0x39 | 0x43 => Failure::PermissionDenied, // Permission Denied, Not Authorised, Wrong Key Lifecycle State
        // Cryptographic Failure; PyKMIP reports a failed tag check as General
        // Failure (its InvalidTag is not caught), and so may other servers:
        // on Decrypt of a key that was found, that is what it means.
        0x0A | 0x100 if op == Op::Decrypt => Failure::WrongKey,
        _ => Failure::Other,
    }
}

fn reason_name(reason: u32) -> String {
    let name = match reason {
        0x01 => "Item Not Found",
        0x03 => "Authentication Not Successful",
        0x04 => "Invalid Message",
        0x05 => "Operation Not Supported",
        0x06 => "Missing Data",
        0x07 => "Invalid Field",
        0x08 => "Feature Not Supported",
        0x0A => "Cryptographic Failure",
        0x0B => "Illegal Operation",
        0x0C => "Permission Denied",
        0x37 => "Object Not Found",
        0x39 => "Not Authorised",
        0x43 => "Wrong Key Lifecycle State",
        0x100 => "General Failure",
        _ => return format!("result reason {reason:#x}"),
    };
    name.to_string()
}

/// An I/O error of the connection: a refused client certificate is about
/// credentials, anything else about reaching the server.
fn io_error(e: &std::io::Error, during: &str) -> ProviderError {
    use rustls::AlertDescription as A;
    let tls = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let failure = match tls {
        Some(rustls::Error::AlertReceived(
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::UnsupportedCertificate
            | A::AccessDenied
            | A::CertificateRequired,
        )) => Failure::Credentials,
        _ if e.kind() == std::io::ErrorKind::TimedOut => Failure::TimedOut,
        _ => Failure::Unreachable,
    };
    let what = if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "the server closed the connection (it may have refused our certificate)".to_string()
    } else {
        error_chain(e)
    };
    remote(KIND, failure, format!("{during}: {what}"))
}

pub(crate) fn parse_blob(blob: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    if blob.len() != BLOB_LEN || blob[0] != BLOB_VERSION {
        return None;
    }
    let (iv, rest) = blob[1..].split_at(IV_LEN);
    let (ct, tag) = rest.split_at(WRAP_KEY_LEN);
    Some((iv, ct, tag))
}

impl MasterKeyProvider for Kmip {
    fn probe(&self) -> Result<(), ProviderError> {
        self.run(|mut c| async move { c.call(Op::DiscoverVersions, vec![]).await.map(|_| ()) })
    }

    fn ensure_key(&self, key_name: &str) -> Result<(), ProviderError> {
        self.run(|mut c| async move {
            if c.locate(key_name).await?.is_none() {
                c.create(key_name).await?;
            }
            Ok(())
        })
    }

    fn wrap(&self, key_name: &str, kek: &WrapKey, aad: &[u8]) -> Result<Vec<u8>, ProviderError> {
        let mut iv = [0u8; IV_LEN];
        getrandom::fill(&mut iv)
            .map_err(|e| remote(KIND, Failure::Other, format!("the OS random generator failed: {e}")))?;
        self.run(|mut c| async move {
            let uid = c.need(key_name).await?;
            let payload = vec![
                Item::text(tag::UNIQUE_IDENTIFIER, &uid),
                gcm_parameters(),
                Item::bytes(tag::DATA, kek.expose()),
                Item::bytes(tag::IV_COUNTER_NONCE, &iv),
                Item::bytes(tag::AEAD_ADDITIONAL_DATA, aad),
            ];
            let resp = c.call(Op::Encrypt, payload).await?;
            let ct = resp.find(tag::DATA).and_then(Item::as_bytes).unwrap_or_default();
            let tag_bytes = resp.find(tag::AEAD_TAG).and_then(Item::as_bytes).unwrap_or_default();
            // the IV the server used, if it says (some choose their own)
            let used_iv = resp.find(tag::IV_COUNTER_NONCE).and_then(Item::as_bytes).unwrap_or(&iv);
            if ct.len() != WRAP_KEY_LEN || tag_bytes.len() != TAG_LEN || used_iv.len() != IV_LEN {
                return Err(remote(
                    KIND,
                    Failure::Other,
                    format!(
                        "Encrypt returned {} bytes of ciphertext, a {}-byte tag and a {}-byte IV; expected {WRAP_KEY_LEN}, {TAG_LEN} and {IV_LEN}",
                        ct.len(),
                        tag_bytes.len(),
                        used_iv.len()
                    ),
                ));
            }
            let mut blob = Vec::with_capacity(BLOB_LEN);
            blob.push(BLOB_VERSION);
            blob.extend_from_slice(used_iv);
            blob.extend_from_slice(ct);
            blob.extend_from_slice(tag_bytes);
            Ok(blob)
        })
    }

    fn unwrap(&self, key_name: &str, blob: &[u8], aad: &[u8]) -> Result<WrapKey, ProviderError> {
        let wrong = || ProviderError::WrongKey { key: key_name.to_string() };
        let Some((iv, ct, tag_bytes)) = parse_blob(blob) else { return Err(wrong()) };
        self.run(|mut c| async move {
            let uid = c.need(key_name).await?;
            let payload = vec![
                Item::text(tag::UNIQUE_IDENTIFIER, &uid),
                gcm_parameters(),
                Item::bytes(tag::DATA, ct),
                Item::bytes(tag::IV_COUNTER_NONCE, iv),
                Item::bytes(tag::AEAD_ADDITIONAL_DATA, aad),
                Item::bytes(tag::AEAD_TAG, tag_bytes),
            ];
            let resp = c.call(Op::Decrypt, payload).await?;
            let plain = resp.find(tag::DATA).and_then(Item::as_bytes).unwrap_or_default();
            WrapKey::from_bytes(plain).map_err(|_| wrong())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        crate::options::refused(Kmip::from_options(&v, Duration::from_secs(1)), &v)
    }

    #[test]
    fn options_are_checked() {
        let (c, k) = ("/nonexistent/c.pem", "/nonexistent/k.pem");
        assert!(err(json!({"cert_file": c, "key_file": k})).contains("missing \"host\""));
        assert!(err(json!({"host": "h", "key_file": k})).contains("missing \"cert_file\""));
        assert!(err(json!({"host": "h", "cert_file": c})).contains("missing \"key_file\""));
        assert!(err(json!({"host": "h", "cert_file": "c.pem", "key_file": k})).contains("absolute"));
        assert!(err(json!({"host": "h", "port": 0, "cert_file": c, "key_file": k})).contains("\"port\""));
        assert!(err(json!({"host": "h", "port": 70000, "cert_file": c, "key_file": k})).contains("\"port\""));
        assert!(err(json!({"host": "h", "cert_file": c, "key_file": k, "username": "u"})).contains("unknown option"));
        assert!(err(json!({"host": "bad host!", "cert_file": c, "key_file": k})).contains("not a host name"));
        assert!(
            err(json!({"host": "h", "cert_file": c, "key_file": k})).contains("could not read \"/nonexistent/c.pem\"")
        );
    }

    #[test]
    fn reasons_map_onto_failures() {
        assert_eq!(failure_for_reason(0x01, Op::Encrypt), Failure::KeyNotFound);
        assert_eq!(failure_for_reason(0x0A, Op::Decrypt), Failure::WrongKey);
        assert_eq!(failure_for_reason(0x0A, Op::Encrypt), Failure::Other);
        assert_eq!(failure_for_reason(0x0C, Op::Locate), Failure::PermissionDenied);
        assert_eq!(failure_for_reason(0x03, Op::Locate), Failure::Credentials);
        assert_eq!(failure_for_reason(0x100, Op::Locate), Failure::Other);
        assert_eq!(failure_for_reason(0x100, Op::Decrypt), Failure::WrongKey);
        let failed = Item::structure(
            tag::RESPONSE_MESSAGE,
            vec![Item::structure(
                tag::BATCH_ITEM,
                vec![
                    Item::enumeration(tag::RESULT_STATUS, 1),
                    Item::enumeration(tag::RESULT_REASON, 0x0A),
                    Item::text(tag::RESULT_MESSAGE, "InvalidTag"),
                ],
            )],
        );
        let e = response_payload(failed, Op::Decrypt).err().unwrap();
        assert_eq!(
            e.to_string(),
            "kmip provider: the key does not unwrap (wrong master key, or tampered): Decrypt failed: InvalidTag (Cryptographic Failure)"
        );
    }

    #[test]
    fn blob_format() {
        let mut blob = vec![1u8];
        blob.extend_from_slice(&[2; IV_LEN]);
        blob.extend_from_slice(&[3; WRAP_KEY_LEN]);
        blob.extend_from_slice(&[4; TAG_LEN]);
        let (iv, ct, t) = parse_blob(&blob).unwrap();
        assert_eq!((iv, ct, t), (&[2u8; IV_LEN][..], &[3u8; WRAP_KEY_LEN][..], &[4u8; TAG_LEN][..]));
        blob[0] = 0;
        assert!(parse_blob(&blob).is_none());
        assert!(parse_blob(&blob[..60]).is_none());
    }
}
