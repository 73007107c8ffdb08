//! `kmip` against PyKMIP's server on loopback, with mutual TLS.  Run by hand:
//!
//! ```sh
//! # a CA, a server certificate for IP 127.0.0.1 (serverAuth), a client
//! # certificate (clientAuth) from the same CA, and one from another CA
//! pykmip-server -f server.conf &     # port 15696, auth_suite=TLS1.2, enable_tls_client_auth=True
//! TDE_KMS_TEST_KMIP_PORT=15696 TDE_KMS_TEST_KMIP_CA=ca.pem \
//! TDE_KMS_TEST_KMIP_CERT=client.pem TDE_KMS_TEST_KMIP_KEY=client.key \
//! TDE_KMS_TEST_KMIP_ROGUE_CERT=rogue.pem TDE_KMS_TEST_KMIP_ROGUE_KEY=rogue.key \
//!   cargo test -p tde-kms --test kmip -- --ignored --test-threads 1
//! ```

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use tde_core::provider::{verify, Failure, MasterKeyProvider};
use tde_core::secret::WrapKey;
use tde_kms::kmip::Kmip;

const T: Duration = Duration::from_secs(10);

fn options() -> Option<Value> {
    Some(json!({
        "host": "127.0.0.1",
        "port": env("TDE_KMS_TEST_KMIP_PORT")?.parse::<u16>().unwrap(),
        "ca_file": env("TDE_KMS_TEST_KMIP_CA")?,
        "cert_file": env("TDE_KMS_TEST_KMIP_CERT")?,
        "key_file": env("TDE_KMS_TEST_KMIP_KEY")?,
    }))
}

#[test]
#[ignore]
fn round_trip_aad_and_keys() {
    let Some(opts) = options() else { return };
    let p = Kmip::from_options(&opts, T).unwrap();
    p.probe().unwrap();
    let name = unique("tde-test");
    p.ensure_key(&name).unwrap();
    p.ensure_key(&name).unwrap();
    verify(&p, &name).unwrap();

    let kek = WrapKey::generate().unwrap();
    let blob = p.wrap(&name, &kek, b"cluster 1 kek").unwrap();
    assert_eq!((blob.len(), blob[0]), (61, 1));
    assert_eq!(p.unwrap(&name, &blob, b"cluster 1 kek").unwrap().expose(), kek.expose());
    let msg = assert_failure(p.unwrap(&name, &blob, b"cluster 2 kek"), Failure::WrongKey);
    eprintln!("other aad: {msg}");
    let other = unique("tde-test-other");
    p.ensure_key(&other).unwrap();
    assert_failure(p.unwrap(&other, &blob, b"cluster 1 kek"), Failure::WrongKey);
    for i in [1, 20, 50] {
        let mut bad = blob.clone();
        bad[i] ^= 1;
        assert_failure(p.unwrap(&name, &bad, b"cluster 1 kek"), Failure::WrongKey);
    }
    assert_failure(p.unwrap(&name, &blob[1..], b"cluster 1 kek"), Failure::WrongKey);
}

#[test]
#[ignore]
fn missing_keys() {
    let Some(opts) = options() else { return };
    let p = Kmip::from_options(&opts, T).unwrap();
    let kek = WrapKey::generate().unwrap();
    let msg = assert_failure(p.wrap("tde-never-made", &kek, b"a"), Failure::KeyNotFound);
    eprintln!("{msg}");
    assert_failure(p.unwrap("tde-never-made", &[1u8; 61], b"a"), Failure::KeyNotFound);
}

#[test]
#[ignore]
fn refused_and_untrusted_certificates() {
    let Some(opts) = options() else { return };
    let (Some(cert), Some(key)) = (env("TDE_KMS_TEST_KMIP_ROGUE_CERT"), env("TDE_KMS_TEST_KMIP_ROGUE_KEY")) else {
        return;
    };
    let mut rogue = opts.clone();
    rogue["cert_file"] = json!(cert);
    rogue["key_file"] = json!(key);
    let p = Kmip::from_options(&rogue, T).unwrap();
    let msg = assert_failure(p.probe(), Failure::Credentials);
    eprintln!("client certificate from another CA: {msg}");
    // without the CA, the server's certificate is not trusted
    let mut untrusting = opts.clone();
    untrusting.as_object_mut().unwrap().remove("ca_file");
    let p = Kmip::from_options(&untrusting, T).unwrap();
    let msg = assert_failure(p.probe(), Failure::Unreachable);
    eprintln!("{msg}");
    // a key file others can read is refused
    let dir = std::env::temp_dir().join(unique("tde-kms-kmip"));
    std::fs::create_dir_all(&dir).unwrap();
    let loose = dir.join("client.key");
    std::fs::copy(opts["key_file"].as_str().unwrap(), &loose).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut o = opts.clone();
    o["key_file"] = json!(loose);
    let e = Kmip::from_options(&o, T).err().unwrap();
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[ignore]
fn unreachable_and_silent_servers() {
    let Some(mut opts) = options() else { return };
    opts["port"] = json!(closed_port());
    let p = Kmip::from_options(&opts, T).unwrap();
    let msg = within(T, || assert_failure(p.probe(), Failure::Unreachable));
    eprintln!("{msg}");
    let (_l, port) = silent_port();
    opts["port"] = json!(port);
    let limit = Duration::from_secs(2);
    let p = Kmip::from_options(&opts, limit).unwrap();
    let msg = within(limit, || assert_failure(p.probe(), Failure::TimedOut));
    eprintln!("{msg}");
}

#[test]
#[ignore]
fn through_the_c_abi() {
    let Some(opts) = options() else { return };
    let key = unique("tde-ffi");
    let aad = B64.encode(b"ffi aad");
    let req = |op: &str, aad: &str| {
        json!({"op": op, "kind": "kmip", "options": opts, "key": key, "aad": aad, "timeout_ms": 10000}).to_string()
    };
    let (rc, _, msg) = ffi_call(&json!({"op": "probe", "kind": "kmip", "options": opts}).to_string(), &[]);
    assert_eq!(rc, 0, "{msg}");
    let (rc, _, msg) = ffi_call(&req("ensure", &aad), &[]);
    assert_eq!(rc, 0, "{msg}");
    let kek = [0x77u8; 32];
    let (rc, blob, msg) = ffi_call(&req("wrap", &aad), &kek);
    assert_eq!((rc, blob.len()), (0, 61), "{msg}");
    let (rc, back, msg) = ffi_call(&req("unwrap", &aad), &blob);
    assert_eq!((rc, back.as_slice()), (0, &kek[..]), "{msg}");
    let (rc, _, msg) = ffi_call(&req("unwrap", &B64.encode(b"x")), &blob);
    assert_eq!(rc, Failure::WrongKey.code(), "{msg}");
    assert!(msg.starts_with("kmip provider: "), "{msg}");
}
