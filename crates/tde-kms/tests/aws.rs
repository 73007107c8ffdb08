//! `aws-kms` against a real KMS API on loopback (moto).  Run by hand:
//!
//! ```sh
//! moto_server -H 127.0.0.1 -p 15001 &
//! INITIAL_NO_AUTH_ACTION_COUNT=0 moto_server -H 127.0.0.1 -p 15002 &   # checks credentials
//! TDE_KMS_TEST_AWS_ENDPOINT=http://127.0.0.1:15001 \
//! TDE_KMS_TEST_AWS_AUTH_ENDPOINT=http://127.0.0.1:15002 \
//!   cargo test -p tde-kms --test aws -- --ignored --test-threads 1
//! ```

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use tde_core::provider::{verify, Failure, MasterKeyProvider};
use tde_core::secret::WrapKey;
use tde_kms::aws::AwsKms;

const T: Duration = Duration::from_secs(5);

fn options(endpoint: &str) -> Value {
    std::env::set_var("TDE_KMS_TEST_AWS_SECRET", "moto-secret");
    json!({"region": "us-east-1", "endpoint": endpoint, "access_key_id": "AKIDMOTOTEST",
           "secret_access_key_env": "TDE_KMS_TEST_AWS_SECRET"})
}

fn provider(endpoint: &str) -> AwsKms {
    AwsKms::from_options(&options(endpoint), T).unwrap()
}

#[test]
#[ignore]
fn round_trip_aad_and_keys() {
    let Some(ep) = env("TDE_KMS_TEST_AWS_ENDPOINT") else { return };
    let p = provider(&ep);
    p.probe().unwrap();
    let alias = format!("alias/{}", unique("tde-test"));
    // a missing alias is created, once
    p.ensure_key(&alias).unwrap();
    p.ensure_key(&alias).unwrap();
    verify(&p, &alias).unwrap();

    let kek = WrapKey::generate().unwrap();
    let blob = p.wrap(&alias, &kek, b"cluster 1 kek").unwrap();
    assert!(!blob.windows(8).any(|w| kek.expose().windows(8).any(|k| k == w)), "the blob holds the key");
    assert_eq!(p.unwrap(&alias, &blob, b"cluster 1 kek").unwrap().expose(), kek.expose());

    // other associated data, another key, a tampered blob
    assert_failure(p.unwrap(&alias, &blob, b"cluster 2 kek"), Failure::WrongKey);
    let other = format!("alias/{}", unique("tde-test-other"));
    p.ensure_key(&other).unwrap();
    // KMS says IncorrectKeyException (WrongKey); moto says AccessDeniedException.
    let e = p.unwrap(&other, &blob, b"cluster 1 kek").err().unwrap();
    assert!(matches!(failure(&e), Failure::WrongKey | Failure::PermissionDenied), "{e}");
    let mut bad = blob.clone();
    let n = bad.len();
    bad[n - 5] ^= 1;
    assert_failure(p.unwrap(&alias, &bad, b"cluster 1 kek"), Failure::WrongKey);
}

#[test]
#[ignore]
fn missing_keys() {
    let Some(ep) = env("TDE_KMS_TEST_AWS_ENDPOINT") else { return };
    let p = provider(&ep);
    // a key id is never created
    let msg = assert_failure(p.ensure_key("0b3f1e6a-0000-4000-8000-000000000000"), Failure::KeyNotFound);
    eprintln!("{msg}");
    let kek = WrapKey::generate().unwrap();
    assert_failure(p.wrap("alias/tde-never-created", &kek, b"a"), Failure::KeyNotFound);
}

#[test]
#[ignore]
fn bad_credentials() {
    let Some(ep) = env("TDE_KMS_TEST_AWS_AUTH_ENDPOINT") else { return };
    let p = provider(&ep);
    let msg = assert_failure(p.probe(), Failure::Credentials);
    assert!(!msg.contains("moto-secret"), "{msg}");
    eprintln!("{msg}");
}

#[test]
#[ignore]
fn unreachable_and_silent_servers() {
    let p = provider(&format!("http://127.0.0.1:{}", closed_port()));
    let msg = within(T, || assert_failure(p.probe(), Failure::Unreachable));
    eprintln!("{msg}");
    let (_l, port) = silent_port();
    let p = AwsKms::from_options(&options(&format!("http://127.0.0.1:{port}")), Duration::from_secs(2)).unwrap();
    let msg = within(Duration::from_secs(2), || assert_failure(p.probe(), Failure::TimedOut));
    eprintln!("{msg}");
}

#[test]
#[ignore]
fn through_the_c_abi() {
    let Some(ep) = env("TDE_KMS_TEST_AWS_ENDPOINT") else { return };
    let opts = options(&ep);
    let key = format!("alias/{}", unique("tde-ffi"));
    let aad = B64.encode(b"ffi aad");
    let req = |op: &str, aad: &str| {
        json!({"op": op, "kind": "aws-kms", "options": opts, "key": key, "aad": aad, "timeout_ms": 5000}).to_string()
    };
    let (rc, _, msg) = ffi_call(&json!({"op": "probe", "kind": "aws-kms", "options": opts}).to_string(), &[]);
    assert_eq!(rc, 0, "{msg}");
    let (rc, _, msg) = ffi_call(&req("ensure", &aad), &[]);
    assert_eq!(rc, 0, "{msg}");
    let kek = [0x5au8; 32];
    let (rc, blob, msg) = ffi_call(&req("wrap", &aad), &kek);
    assert_eq!(rc, 0, "{msg}");
    let (rc, back, msg) = ffi_call(&req("unwrap", &aad), &blob);
    assert_eq!((rc, back.as_slice()), (0, &kek[..]), "{msg}");
    let (rc, back, msg) = ffi_call(&req("unwrap", &B64.encode(b"other")), &blob);
    assert_eq!(rc, Failure::WrongKey.code(), "{msg}");
    assert!(back.is_empty() && msg.starts_with("aws-kms provider: "), "{msg}");

    // an unreachable endpoint: code 5, and the cached client is dropped
    let dead = json!({"region": "us-east-1", "endpoint": format!("http://127.0.0.1:{}", closed_port()),
                      "access_key_id": "A", "secret_access_key_env": "TDE_KMS_TEST_AWS_SECRET"});
    let before = tde_kms::worker::cached_count();
    let (rc, _, msg) =
        ffi_call(&json!({"op": "probe", "kind": "aws-kms", "options": dead, "timeout_ms": 3000}).to_string(), &[]);
    assert_eq!(rc, Failure::Unreachable.code(), "{msg}");
    assert_eq!(tde_kms::worker::cached_count(), before, "the failed client stayed cached");
    let (rc, _, msg) =
        ffi_call(&json!({"op": "probe", "kind": "aws-kms", "options": {"region": "r", "bogus": 1}}).to_string(), &[]);
    assert_eq!(rc, Failure::BadOptions.code(), "{msg}");
}

#[test]
#[ignore]
fn tls_with_an_extra_trust_root() {
    // moto_server -H 127.0.0.1 -p 15003 -s -c server.pem -k server.key, with
    // server.pem issued for IP 127.0.0.1 by the CA in TDE_KMS_TEST_CA_FILE.
    let (Some(ep), Some(ca)) = (env("TDE_KMS_TEST_AWS_TLS_ENDPOINT"), env("TDE_KMS_TEST_CA_FILE")) else { return };
    let mut opts = options(&ep);
    // without the CA the server is not trusted
    let p = AwsKms::from_options(&opts, T).unwrap();
    let msg = assert_failure(p.probe(), Failure::Unreachable);
    eprintln!("{msg}");
    opts["ca_file"] = json!(ca);
    let p = AwsKms::from_options(&opts, T).unwrap();
    p.probe().unwrap();
    let key = format!("alias/{}", unique("tde-tls"));
    p.ensure_key(&key).unwrap();
    verify(&p, &key).unwrap();
}
