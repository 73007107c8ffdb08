//! `azure-keyvault` against an Azure Key Vault over HTTPS, in practice the
//! Azure Key Vault stand-in of pg_test/lib/TdeKms.pm (`azure_keyvault()`, a
//! stand-in, not an emulator: it implements only the documented calls tde
//! makes).  TAP test 025 runs the same scenarios through PostgreSQL; these
//! are `#[ignore]`d and run by hand, against a server named by:
//!
//! ```sh
//! TDE_KMS_TEST_AZURE_VAULT_URL=https://127.0.0.1:PORT   # also the authority host
//! TDE_KMS_TEST_AZURE_CA_FILE=/path/ca.crt
//! TDE_KMS_TEST_AZURE_TENANT=<tenant id>
//! TDE_KMS_TEST_AZURE_CLIENT_ID=<client with get/create/wrapKey/unwrapKey>
//! TDE_KMS_TEST_AZURE_SECRET_FILE=/path/secret           # mode 0600
//! TDE_KMS_TEST_AZURE_READER_ID=<client with get only>
//! TDE_KMS_TEST_AZURE_READER_SECRET_FILE=/path/reader-secret
//!   cargo test -p tde-kms --test azure -- --ignored --test-threads 1
//! ```
//!
//! To run the stand-in by hand: save `$AZURE_STANDIN` of TdeKms.pm as
//! standin.py and run it with the venv's python (`cryptography`) as
//! `python standin.py config.json`, config.json being `{"port": 18443,
//! "tenant": T, "signing_key": "<hex>", "state_file": "/abs/state.json",
//! "cert_file": ..., "key_file": ... (SAN 127.0.0.1), "clients": {ID:
//! {"secret": S, "permissions": ["get", "create", "wrapKey", "unwrapKey"]},
//! READER_ID: {"secret": R, "permissions": ["get"]}}}`.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use tde_core::provider::{verify, Failure, MasterKeyProvider};
use tde_core::secret::WrapKey;
use tde_kms::azure::AzureKeyVault;

const T: Duration = Duration::from_secs(5);

fn opts() -> Option<Value> {
    let url = env("TDE_KMS_TEST_AZURE_VAULT_URL")?;
    Some(json!({
        "vault_url": url, "authority_host": url,
        "ca_file": env("TDE_KMS_TEST_AZURE_CA_FILE")?,
        "tenant_id": env("TDE_KMS_TEST_AZURE_TENANT")?,
        "client_id": env("TDE_KMS_TEST_AZURE_CLIENT_ID")?,
        "client_secret_file": env("TDE_KMS_TEST_AZURE_SECRET_FILE")?,
    }))
}

#[test]
#[ignore]
fn round_trip_aad_and_versions() {
    let Some(opts) = opts() else { return };
    let p = AzureKeyVault::from_options(&opts, T).unwrap();
    p.probe().unwrap();
    let name = unique("tde");
    p.ensure_key(&name).unwrap();
    p.ensure_key(&name).unwrap();
    verify(&p, &name).unwrap();

    let kek = WrapKey::generate().unwrap();
    let blob = p.wrap(&name, &kek, b"cluster 1 kek").unwrap();
    assert_eq!(blob[0], 1);
    assert_eq!(p.unwrap(&name, &blob, b"cluster 1 kek").unwrap().expose(), kek.expose());
    let msg = assert_failure(p.unwrap(&name, &blob, b"cluster 2 kek"), Failure::WrongKey);
    eprintln!("other aad: {msg}");
    // another master key: the blob's key version is not one of its versions
    let other = unique("tde-other");
    p.ensure_key(&other).unwrap();
    let msg = assert_failure(p.unwrap(&other, &blob, b"cluster 1 kek"), Failure::KeyNotFound);
    eprintln!("other key: {msg}");
    assert_failure(p.unwrap(&name, b"garbage", b"cluster 1 kek"), Failure::WrongKey);
    let mut t = blob.clone();
    t[10] ^= 1; // inside the RSA-wrapped data key
    let msg = assert_failure(p.unwrap(&name, &t, b"cluster 1 kek"), Failure::WrongKey);
    eprintln!("tampered: {msg}");

    // a pinned version, from the blob (u16 length of the wrapped key, then the version)
    let wlen = u16::from_be_bytes([blob[1], blob[2]]) as usize;
    let vlen = u16::from_be_bytes([blob[3 + wlen], blob[4 + wlen]]) as usize;
    let version = std::str::from_utf8(&blob[5 + wlen..5 + wlen + vlen]).unwrap().to_string();
    let pinned = format!("{name}/{version}");
    p.ensure_key(&pinned).unwrap();
    verify(&p, &pinned).unwrap();
    assert_eq!(p.unwrap(&pinned, &blob, b"cluster 1 kek").unwrap().expose(), kek.expose());
    let missing = format!("{name}/00000000000000000000000000000000");
    let msg = assert_failure(p.ensure_key(&missing), Failure::KeyNotFound);
    eprintln!("missing version: {msg}");
    assert!(msg.contains("KeyNotFound"), "{msg}");
}

#[test]
#[ignore]
fn credentials_and_permissions() {
    let Some(opts) = opts() else { return };
    let dir = std::env::temp_dir().join(unique("tde-azure"));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad-secret");
    std::fs::write(&bad, "not-the-secret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut o = opts.clone();
    o["client_secret_file"] = json!(bad);
    let p = AzureKeyVault::from_options(&o, T).unwrap();
    let msg = assert_failure(p.probe(), Failure::Credentials);
    eprintln!("bad secret: {msg}");
    assert!(msg.contains("AADSTS7000215") && !msg.contains("not-the-secret"), "{msg}");
    assert_failure(p.ensure_key("tde-x"), Failure::Credentials);
    let mut o = opts.clone();
    o["client_id"] = json!("99999999-9999-9999-9999-999999999999");
    let msg = assert_failure(AzureKeyVault::from_options(&o, T).unwrap().probe(), Failure::Credentials);
    eprintln!("unknown client: {msg}");
    let mut o = opts.clone();
    o["tenant_id"] = json!("00000000-0000-0000-0000-000000000000");
    let msg = assert_failure(AzureKeyVault::from_options(&o, T).unwrap().probe(), Failure::Credentials);
    eprintln!("unknown tenant: {msg}");
    std::fs::remove_dir_all(&dir).unwrap();

    // a client that may only read keys
    let (Some(reader), Some(reader_secret)) =
        (env("TDE_KMS_TEST_AZURE_READER_ID"), env("TDE_KMS_TEST_AZURE_READER_SECRET_FILE"))
    else {
        return;
    };
    let full = AzureKeyVault::from_options(&opts, T).unwrap();
    let name = unique("tde-ro");
    full.ensure_key(&name).unwrap();
    let mut o = opts.clone();
    o["client_id"] = json!(reader);
    o["client_secret_file"] = json!(reader_secret);
    let r = AzureKeyVault::from_options(&o, T).unwrap();
    r.probe().unwrap();
    r.ensure_key(&name).unwrap();
    let kek = WrapKey::generate().unwrap();
    let msg = assert_failure(r.wrap(&name, &kek, b"a"), Failure::PermissionDenied);
    eprintln!("reader wraps: {msg}");
    let msg = assert_failure(r.ensure_key(&unique("tde-new")), Failure::PermissionDenied);
    eprintln!("reader creates: {msg}");
}

#[test]
#[ignore]
fn unreachable_and_silent_servers() {
    let Some(mut opts) = opts() else { return };
    let url = format!("https://127.0.0.1:{}", closed_port());
    opts["vault_url"] = json!(url);
    opts["authority_host"] = json!(url);
    let p = AzureKeyVault::from_options(&opts, T).unwrap();
    let msg = within(T, || assert_failure(p.probe(), Failure::Unreachable));
    eprintln!("{msg}");
    let msg = within(T, || assert_failure(p.ensure_key("tde-x"), Failure::Unreachable));
    eprintln!("{msg}");
    let (_l, port) = silent_port();
    let url = format!("https://127.0.0.1:{port}");
    opts["vault_url"] = json!(url);
    opts["authority_host"] = json!(url);
    let limit = Duration::from_secs(2);
    let p = AzureKeyVault::from_options(&opts, limit).unwrap();
    let msg = within(limit, || assert_failure(p.probe(), Failure::TimedOut));
    eprintln!("{msg}");
}

#[test]
#[ignore]
fn a_server_of_another_ca_is_unreachable() {
    let Some(mut opts) = opts() else { return };
    opts.as_object_mut().unwrap().remove("ca_file");
    let p = AzureKeyVault::from_options(&opts, T).unwrap();
    let msg = assert_failure(p.probe(), Failure::Unreachable);
    eprintln!("{msg}");
    assert!(msg.to_ascii_lowercase().contains("certificate"), "{msg}");
}

#[test]
#[ignore]
fn through_the_c_abi() {
    let Some(opts) = opts() else { return };
    let aad = B64.encode(b"ffi aad");
    let key = unique("tde-ffi");
    let req = |op: &str, aad: &str| {
        json!({"op": op, "kind": "azure-keyvault", "options": opts, "key": key, "aad": aad, "timeout_ms": 5000})
            .to_string()
    };
    let (rc, _, msg) = ffi_call(&json!({"op": "probe", "kind": "azure-keyvault", "options": opts}).to_string(), &[]);
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
    // the envelope's own check (AES-GCM with the AAD), after Key Vault unwrapped the data key
    assert!(msg.contains(&format!("master key \"{key}\" could not unwrap")), "{msg}");
}
