//! `gcp-kms` against drongo, a Google Cloud KMS REST stand-in, on loopback.
//! Run by hand:
//!
//! ```sh
//! pip install drongo==0.8.0 google-crc32c==1.9.0
//! drongo server --host 127.0.0.1 --port 15080 &
//! TDE_KMS_TEST_GCP_ENDPOINT=http://127.0.0.1:15080 \
//!   cargo test -p tde-kms --test gcp -- --ignored --test-threads 1
//! ```
//!
//! drongo checks the key and the associated data on decrypt but its
//! "ciphertext" is an encoding, not encryption, and it checks no
//! credentials: the credentials test needs a real Cloud KMS and is not here.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use tde_core::provider::{verify, Failure, MasterKeyProvider};
use tde_core::secret::WrapKey;
use tde_kms::gcp::GcpKms;

const T: Duration = Duration::from_secs(5);

/// A fresh key ring on the server, and options naming it.
fn setup() -> Option<Value> {
    let ep = env("TDE_KMS_TEST_GCP_ENDPOINT")?;
    let ring = unique("r");
    let (status, body) = http(
        &ep,
        "POST",
        &format!("/v1/projects/tde-test/locations/global/keyRings?keyRingId={ring}"),
        &[("Content-Type", "application/json")],
        "{}",
    );
    assert_eq!(status, 200, "{body}");
    Some(json!({"key_ring": format!("projects/tde-test/locations/global/keyRings/{ring}"),
                "endpoint": ep, "credentials": "anonymous"}))
}

#[test]
#[ignore]
fn round_trip_aad_and_keys() {
    let Some(opts) = setup() else { return };
    let p = GcpKms::from_options(&opts, T).unwrap();
    p.probe().unwrap();
    p.ensure_key("tde-master").unwrap();
    p.ensure_key("tde-master").unwrap();
    verify(&p, "tde-master").unwrap();
    let full = format!("{}/cryptoKeys/tde-master", opts["key_ring"].as_str().unwrap());
    verify(&p, &full).unwrap();

    let kek = WrapKey::generate().unwrap();
    let blob = p.wrap("tde-master", &kek, b"cluster 1 kek").unwrap();
    assert_eq!(p.unwrap("tde-master", &blob, b"cluster 1 kek").unwrap().expose(), kek.expose());
    let msg = assert_failure(p.unwrap("tde-master", &blob, b"cluster 2 kek"), Failure::WrongKey);
    eprintln!("other aad: {msg}");
    p.ensure_key("tde-other").unwrap();
    let msg = assert_failure(p.unwrap("tde-other", &blob, b"cluster 1 kek"), Failure::WrongKey);
    eprintln!("other key: {msg}");
    assert_failure(p.unwrap("tde-master", b"garbage", b"cluster 1 kek"), Failure::WrongKey);
}

#[test]
#[ignore]
fn missing_keys_and_rings() {
    let Some(opts) = setup() else { return };
    let p = GcpKms::from_options(&opts, T).unwrap();
    let kek = WrapKey::generate().unwrap();
    let msg = assert_failure(p.wrap("tde-never-made", &kek, b"a"), Failure::KeyNotFound);
    eprintln!("{msg}");
    // a full name is never created
    let other = "projects/tde-test/locations/global/keyRings/none/cryptoKeys/k";
    assert_failure(p.ensure_key(other), Failure::KeyNotFound);
    let mut o = opts.clone();
    o["key_ring"] = json!("projects/tde-test/locations/global/keyRings/no-such-ring");
    let q = GcpKms::from_options(&o, T).unwrap();
    let msg = assert_failure(q.probe(), Failure::KeyNotFound);
    eprintln!("{msg}");
}

#[test]
#[ignore]
fn unreachable_and_silent_servers() {
    let ring = "projects/p/locations/global/keyRings/r";
    let opts = json!({"key_ring": ring, "endpoint": format!("http://127.0.0.1:{}", closed_port()), "credentials": "anonymous"});
    let p = GcpKms::from_options(&opts, T).unwrap();
    let msg = within(T, || assert_failure(p.probe(), Failure::Unreachable));
    eprintln!("{msg}");
    let (_l, port) = silent_port();
    let limit = Duration::from_secs(2);
    let opts = json!({"key_ring": ring, "endpoint": format!("http://127.0.0.1:{port}"), "credentials": "anonymous"});
    let p = GcpKms::from_options(&opts, limit).unwrap();
    let msg = within(limit, || assert_failure(p.probe(), Failure::TimedOut));
    eprintln!("{msg}");
}

#[test]
#[ignore]
fn through_the_c_abi() {
    let Some(opts) = setup() else { return };
    let aad = B64.encode(b"ffi aad");
    let req = |op: &str, aad: &str| {
        json!({"op": op, "kind": "gcp-kms", "options": opts, "key": "ffi", "aad": aad, "timeout_ms": 5000}).to_string()
    };
    let (rc, _, msg) = ffi_call(&json!({"op": "probe", "kind": "gcp-kms", "options": opts}).to_string(), &[]);
    assert_eq!(rc, 0, "{msg}");
    let (rc, _, msg) = ffi_call(&req("ensure", &aad), &[]);
    assert_eq!(rc, 0, "{msg}");
    let kek = [0x42u8; 32];
    let (rc, blob, msg) = ffi_call(&req("wrap", &aad), &kek);
    assert_eq!(rc, 0, "{msg}");
    let (rc, back, msg) = ffi_call(&req("unwrap", &aad), &blob);
    assert_eq!((rc, back.as_slice()), (0, &kek[..]), "{msg}");
    let (rc, _, msg) = ffi_call(&req("unwrap", &B64.encode(b"x")), &blob);
    assert_eq!(rc, Failure::WrongKey.code(), "{msg}");
    assert!(msg.starts_with("gcp-kms provider: "), "{msg}");
}
