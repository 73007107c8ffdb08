//! `vault-transit` against a real OpenBao (or Vault) dev server on loopback.
//! Run by hand:
//!
//! ```sh
//! bao server -dev -dev-root-token-id=root -dev-listen-address=127.0.0.1:18210 &
//! TDE_KMS_TEST_BAO_ADDR=http://127.0.0.1:18210 TDE_KMS_TEST_BAO_ROOT_TOKEN=root \
//!   cargo test -p tde-kms --test vault -- --ignored --test-threads 1
//! ```
//!
//! Each test enables a Transit engine of its own at a fresh mount.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use tde_core::provider::{verify, Failure, MasterKeyProvider};
use tde_core::secret::WrapKey;
use tde_kms::vault::VaultTransit;

const T: Duration = Duration::from_secs(5);

struct Bao {
    addr: String,
    root: String,
    mount: String,
}

impl Bao {
    fn new() -> Option<Bao> {
        let addr = env("TDE_KMS_TEST_BAO_ADDR")?;
        let root = env("TDE_KMS_TEST_BAO_ROOT_TOKEN")?;
        let mount = unique("tde-test");
        let bao = Bao { addr, root, mount };
        let (status, body) = bao.api("POST", &format!("sys/mounts/{}", bao.mount), &json!({"type": "transit"}));
        assert!(status == 204 || status == 200, "enable transit: {status} {body}");
        Some(bao)
    }

    fn api(&self, method: &str, path: &str, body: &Value) -> (u16, String) {
        let headers = [("X-Vault-Token", self.root.as_str()), ("Content-Type", "application/json")];
        http(&self.addr, method, &format!("/v1/{path}"), &headers, &body.to_string())
    }

    /// A token with only the `default` policy (lookup-self, no Transit).
    fn weak_token(&self) -> String {
        let (status, body) = self.api("POST", "auth/token/create", &json!({"policies": ["default"], "ttl": "10m"}));
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["auth"]["client_token"].as_str().unwrap().to_string()
    }

    fn options_with(&self, var: &str, token: &str) -> Value {
        std::env::set_var(var, token);
        json!({"url": self.addr, "mount": self.mount, "token_env": var})
    }

    fn provider(&self) -> VaultTransit {
        VaultTransit::from_options(&self.options_with("TDE_KMS_TEST_BAO_TOKEN", &self.root), T).unwrap()
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.api("DELETE", &format!("sys/mounts/{}", self.mount), &json!({}));
    }
}

#[test]
#[ignore]
fn round_trip_aad_and_keys() {
    let Some(bao) = Bao::new() else { return };
    let p = bao.provider();
    p.probe().unwrap();
    p.ensure_key("tde-master").unwrap();
    p.ensure_key("tde-master").unwrap();
    verify(&p, "tde-master").unwrap();
    let (status, body) = bao.api("GET", &format!("{}/keys/tde-master", bao.mount), &json!({}));
    assert!(
        status == 200 && body.contains("\"type\":\"aes256-gcm96\"") && body.contains("\"derived\":false"),
        "{body}"
    );

    let kek = WrapKey::generate().unwrap();
    let blob = p.wrap("tde-master", &kek, b"cluster 1 kek").unwrap();
    assert!(blob.starts_with(b"vault:v1:"));
    assert_eq!(p.unwrap("tde-master", &blob, b"cluster 1 kek").unwrap().expose(), kek.expose());

    let msg = assert_failure(p.unwrap("tde-master", &blob, b"cluster 2 kek"), Failure::WrongKey);
    eprintln!("other aad: {msg}");
    p.ensure_key("tde-other").unwrap();
    let msg = assert_failure(p.unwrap("tde-other", &blob, b"cluster 1 kek"), Failure::WrongKey);
    eprintln!("other key: {msg}");
    // a flipped bit in the base64 body, a foreign string, garbage base64
    let mut bad = blob.clone();
    let n = bad.len();
    bad[n - 3] = if bad[n - 3] == b'A' { b'B' } else { b'A' };
    let msg = assert_failure(p.unwrap("tde-master", &bad, b"cluster 1 kek"), Failure::WrongKey);
    eprintln!("tampered: {msg}");
    assert_failure(p.unwrap("tde-master", b"not a transit blob", b"cluster 1 kek"), Failure::WrongKey);
    let msg = assert_failure(p.unwrap("tde-master", b"vault:v1:!!!!", b"cluster 1 kek"), Failure::WrongKey);
    eprintln!("garbage: {msg}");
    let msg = assert_failure(p.unwrap("tde-master", b"vault:v9:AAAA", b"cluster 1 kek"), Failure::WrongKey);
    eprintln!("future version: {msg}");
}

#[test]
#[ignore]
fn missing_keys_are_not_created_by_wrap() {
    let Some(bao) = Bao::new() else { return };
    let p = bao.provider();
    let kek = WrapKey::generate().unwrap();
    let msg = assert_failure(p.wrap("never-made", &kek, b"a"), Failure::KeyNotFound);
    eprintln!("{msg}");
    let (status, _) = bao.api("GET", &format!("{}/keys/never-made", bao.mount), &json!({}));
    assert_eq!(status, 404, "wrap created the key");
    p.ensure_key("made").unwrap();
    let blob = p.wrap("made", &kek, b"a").unwrap();
    let msg = assert_failure(p.unwrap("never-made", &blob, b"a"), Failure::KeyNotFound);
    eprintln!("{msg}");
    // a mount that is not there
    let opts = json!({"url": bao.addr, "mount": "no-such-mount", "token_env": "TDE_KMS_TEST_BAO_TOKEN"});
    let q = VaultTransit::from_options(&opts, T).unwrap();
    let msg = assert_failure(q.ensure_key("k"), Failure::Other);
    assert!(msg.contains("no handler for route"), "{msg}");
}

#[test]
#[ignore]
fn refused_tokens_and_missing_permissions() {
    let Some(bao) = Bao::new() else { return };
    bao.provider().ensure_key("k").unwrap();
    let bad = VaultTransit::from_options(&bao.options_with("TDE_KMS_TEST_BAO_BAD", "s.not-a-token"), T).unwrap();
    let msg = assert_failure(bad.probe(), Failure::Credentials);
    eprintln!("{msg}");
    let kek = WrapKey::generate().unwrap();
    assert_failure(bad.wrap("k", &kek, b"a"), Failure::Credentials);
    assert!(!msg.contains("s.not-a-token"));

    let weak = VaultTransit::from_options(&bao.options_with("TDE_KMS_TEST_BAO_WEAK", &bao.weak_token()), T).unwrap();
    weak.probe().unwrap();
    let msg = assert_failure(weak.wrap("k", &kek, b"a"), Failure::PermissionDenied);
    eprintln!("{msg}");
    assert_failure(weak.ensure_key("k2"), Failure::PermissionDenied);
}

#[test]
#[ignore]
fn token_file_and_derived_keys() {
    let Some(bao) = Bao::new() else { return };
    let dir = std::env::temp_dir().join(unique("tde-kms-bao"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, format!("{}\n", bao.root)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let opts = json!({"url": bao.addr, "mount": bao.mount, "token_file": file});
    let p = VaultTransit::from_options(&opts, T).unwrap();
    p.ensure_key("k").unwrap();
    verify(&p, "k").unwrap();

    let (status, body) = bao.api("POST", &format!("{}/keys/derived", bao.mount), &json!({"derived": true}));
    assert!(status == 200 || status == 204, "{body}");
    let msg = assert_failure(p.ensure_key("derived"), Failure::Other);
    assert!(msg.contains("derived"), "{msg}");
    let (status, body) = bao.api("POST", &format!("{}/keys/signing", bao.mount), &json!({"type": "ed25519"}));
    assert!(status == 200 || status == 204, "{body}");
    let msg = assert_failure(p.ensure_key("signing"), Failure::Other);
    eprintln!("{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[ignore]
fn unreachable_and_silent_servers() {
    std::env::set_var("TDE_KMS_TEST_BAO_ANY", "t");
    let opts = json!({"url": format!("http://127.0.0.1:{}", closed_port()), "token_env": "TDE_KMS_TEST_BAO_ANY"});
    let p = VaultTransit::from_options(&opts, T).unwrap();
    let msg = within(T, || assert_failure(p.probe(), Failure::Unreachable));
    eprintln!("{msg}");
    let (_l, port) = silent_port();
    let opts = json!({"url": format!("http://127.0.0.1:{port}"), "token_env": "TDE_KMS_TEST_BAO_ANY"});
    let limit = Duration::from_secs(2);
    let p = VaultTransit::from_options(&opts, limit).unwrap();
    let msg = within(limit, || assert_failure(p.probe(), Failure::TimedOut));
    eprintln!("{msg}");
}

#[test]
#[ignore]
fn through_the_c_abi() {
    let Some(bao) = Bao::new() else { return };
    let opts = bao.options_with("TDE_KMS_TEST_BAO_TOKEN", &bao.root);
    let aad = B64.encode(b"ffi aad");
    let req = |op: &str, aad: &str| {
        json!({"op": op, "kind": "vault-transit", "options": opts, "key": "ffi", "aad": aad, "timeout_ms": 5000})
            .to_string()
    };
    let (rc, _, msg) = ffi_call(&json!({"op": "probe", "kind": "vault-transit", "options": opts}).to_string(), &[]);
    assert_eq!(rc, 0, "{msg}");
    let (rc, _, msg) = ffi_call(&req("ensure", &aad), &[]);
    assert_eq!(rc, 0, "{msg}");
    let kek = [0xa5u8; 32];
    let (rc, blob, msg) = ffi_call(&req("wrap", &aad), &kek);
    assert_eq!(rc, 0, "{msg}");
    let (rc, back, msg) = ffi_call(&req("unwrap", &aad), &blob);
    assert_eq!((rc, back.as_slice()), (0, &kek[..]), "{msg}");
    let (rc, _, msg) = ffi_call(&req("unwrap", &B64.encode(b"x")), &blob);
    assert_eq!(rc, Failure::WrongKey.code(), "{msg}");
    assert!(msg.starts_with("vault-transit provider: "), "{msg}");
    let bad = bao.options_with("TDE_KMS_TEST_BAO_BAD", "s.bad");
    let (rc, _, msg) = ffi_call(&json!({"op": "probe", "kind": "vault-transit", "options": bad}).to_string(), &[]);
    assert_eq!(rc, Failure::Credentials.code(), "{msg}");
}

#[test]
#[ignore]
fn tls_with_an_extra_trust_root() {
    // bao server -dev -dev-tls -dev-tls-cert-dir=DIR -dev-root-token-id=root
    //   -dev-listen-address=127.0.0.1:18230; DIR/vault-ca.pem is the CA.
    let (Some(addr), Some(ca)) = (env("TDE_KMS_TEST_BAO_TLS_ADDR"), env("TDE_KMS_TEST_BAO_CA_FILE")) else { return };
    let root = env("TDE_KMS_TEST_BAO_ROOT_TOKEN").unwrap_or_else(|| "root".into());
    std::env::set_var("TDE_KMS_TEST_BAO_TLS_TOKEN", root);
    let mut opts = json!({"url": addr, "token_env": "TDE_KMS_TEST_BAO_TLS_TOKEN"});
    let p = VaultTransit::from_options(&opts, T).unwrap();
    let msg = assert_failure(p.probe(), Failure::Unreachable);
    eprintln!("{msg}");
    opts["ca_file"] = json!(ca);
    VaultTransit::from_options(&opts, T).unwrap().probe().unwrap();
}

#[test]
#[ignore]
fn namespaces() {
    // OpenBao 2.3+ and Vault Enterprise have namespaces.
    let Some(bao) = Bao::new() else { return };
    let ns = unique("tdens");
    let (status, body) = bao.api("POST", &format!("sys/namespaces/{ns}"), &json!({}));
    if status == 404 || status == 405 {
        eprintln!("no namespaces on this server ({status}); skipping");
        return;
    }
    assert_eq!(status, 200, "{body}");
    let headers = [("X-Vault-Token", bao.root.as_str()), ("X-Vault-Namespace", ns.as_str())];
    let (status, body) = http(&bao.addr, "POST", "/v1/sys/mounts/transit", &headers, r#"{"type":"transit"}"#);
    assert!(status == 204 || status == 200, "{body}");
    let mut opts = bao.options_with("TDE_KMS_TEST_BAO_TOKEN", &bao.root);
    opts["mount"] = json!("transit");
    opts["namespace"] = json!(ns);
    let p = VaultTransit::from_options(&opts, T).unwrap();
    p.ensure_key("nskey").unwrap();
    verify(&p, "nskey").unwrap();
    // the key is in the namespace, not at the root
    let (status, _) = bao.api("GET", "transit/keys/nskey", &json!({}));
    assert_ne!(status, 200);
    let (status, _) = http(&bao.addr, "GET", "/v1/transit/keys/nskey", &headers, "");
    assert_eq!(status, 200);
}
