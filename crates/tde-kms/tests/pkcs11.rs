//! `pkcs11` against SoftHSM2.  Run by hand:
//!
//! ```sh
//! export SOFTHSM2_CONF=/tmp/softhsm/softhsm2.conf   # directories.tokendir = /tmp/softhsm/tokens
//! softhsm2-util --init-token --free --label tde --pin 1234 --so-pin 4321
//! softhsm2-util --init-token --free --label tde2 --pin 5678 --so-pin 4321  # only for the bad-PIN test
//! TDE_KMS_TEST_PKCS11_LIBRARY=/usr/lib/softhsm/libsofthsm2.so TDE_KMS_TEST_PKCS11_TOKEN=tde \
//! TDE_KMS_TEST_PKCS11_PIN=1234 TDE_KMS_TEST_PKCS11_OTHER_TOKEN=tde2 \
//!   cargo test -p tde-kms --test pkcs11 -- --ignored --test-threads 1
//! ```
//!
//! The bad-PIN test needs a token no other test logs into: the login state
//! of a token is shared by all sessions of a process, so a wrong PIN is only
//! noticed on a token this process is not logged into yet.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use serde_json::{json, Value};
use std::time::Duration;
use tde_core::provider::{verify, Failure, MasterKeyProvider};
use tde_core::secret::WrapKey;
use tde_kms::pkcs11::Pkcs11Provider;

const T: Duration = Duration::from_secs(5);

struct Hsm {
    library: String,
    token: String,
    pin: String,
}

fn hsm() -> Option<Hsm> {
    Some(Hsm {
        library: env("TDE_KMS_TEST_PKCS11_LIBRARY")?,
        token: env("TDE_KMS_TEST_PKCS11_TOKEN")?,
        pin: env("TDE_KMS_TEST_PKCS11_PIN")?,
    })
}

impl Hsm {
    fn options(&self) -> Value {
        std::env::set_var("TDE_KMS_TEST_PIN", &self.pin);
        json!({"library": self.library, "token_label": self.token, "pin_env": "TDE_KMS_TEST_PIN"})
    }

    fn provider(&self) -> Pkcs11Provider {
        Pkcs11Provider::from_options(&self.options(), T).unwrap()
    }

    /// A second context on the same module, as another part of the process
    /// (or the operator) would have: logged in, on our token.
    fn side_session(&self) -> (Pkcs11, cryptoki::session::Session) {
        let ctx = Pkcs11::new(&self.library).unwrap();
        let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
        let slot = ctx
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == self.token)
            .unwrap();
        let s = ctx.open_rw_session(slot).unwrap();
        let _ = s.login(UserType::User, Some(&AuthPin::from(self.pin.as_str())));
        (ctx, s)
    }
}

#[test]
#[ignore]
fn round_trip_aad_and_keys() {
    let Some(h) = hsm() else { return };
    let p = h.provider();
    p.probe().unwrap();
    let name = unique("tde-test");
    p.ensure_key(&name).unwrap();
    p.ensure_key(&name).unwrap();
    verify(&p, &name).unwrap();

    // exactly one key, AES-256, sensitive, never extractable
    let (_ctx, s) = h.side_session();
    let found = s
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Label(name.as_bytes().to_vec())])
        .unwrap();
    assert_eq!(found.len(), 1);
    let attrs = s
        .get_attributes(
            found[0],
            &[AttributeType::Sensitive, AttributeType::Extractable, AttributeType::Token, AttributeType::ValueLen],
        )
        .unwrap();
    for a in attrs {
        match a {
            Attribute::Sensitive(v) => assert!(v),
            Attribute::Extractable(v) => assert!(!v),
            Attribute::Token(v) => assert!(v),
            Attribute::ValueLen(l) => assert_eq!(u64::from(l), 32),
            other => panic!("{other:?}"),
        }
    }

    let kek = WrapKey::generate().unwrap();
    let blob = p.wrap(&name, &kek, b"cluster 1 kek").unwrap();
    assert_eq!((blob.len(), blob[0]), (61, 1));
    assert_ne!(p.wrap(&name, &kek, b"cluster 1 kek").unwrap(), blob, "the IV repeats");
    assert_eq!(p.unwrap(&name, &blob, b"cluster 1 kek").unwrap().expose(), kek.expose());

    let msg = assert_failure(p.unwrap(&name, &blob, b"cluster 2 kek"), Failure::WrongKey);
    eprintln!("other aad: {msg}");
    let other = unique("tde-test-other");
    p.ensure_key(&other).unwrap();
    assert_failure(p.unwrap(&other, &blob, b"cluster 1 kek"), Failure::WrongKey);
    for i in [1, 13, 40, 60] {
        let mut bad = blob.clone();
        bad[i] ^= 0x80;
        assert_failure(p.unwrap(&name, &bad, b"cluster 1 kek"), Failure::WrongKey);
    }
    let mut v2 = blob.clone();
    v2[0] = 2;
    assert_failure(p.unwrap(&name, &v2, b"cluster 1 kek"), Failure::WrongKey);
    assert_failure(p.unwrap(&name, &blob[..60], b"cluster 1 kek"), Failure::WrongKey);
}

#[test]
#[ignore]
fn missing_keys_and_tokens() {
    let Some(h) = hsm() else { return };
    let p = h.provider();
    let kek = WrapKey::generate().unwrap();
    let msg = assert_failure(p.wrap("tde-never-made", &kek, b"a"), Failure::KeyNotFound);
    eprintln!("{msg}");
    let blob = vec![1u8; 61];
    assert_failure(p.unwrap("tde-never-made", &blob, b"a"), Failure::KeyNotFound);

    let mut opts = h.options();
    opts["token_label"] = json!("no-such-token");
    let q = Pkcs11Provider::from_options(&opts, T).unwrap();
    let msg = assert_failure(q.probe(), Failure::Unreachable);
    assert!(msg.contains("no token labelled \"no-such-token\""), "{msg}");
    eprintln!("{msg}");
}

#[test]
#[ignore]
fn wrong_pin() {
    let (Some(h), Some(other)) = (hsm(), env("TDE_KMS_TEST_PKCS11_OTHER_TOKEN")) else { return };
    std::env::set_var("TDE_KMS_TEST_BAD_PIN", "0000");
    let opts = json!({"library": h.library, "token_label": other, "pin_env": "TDE_KMS_TEST_BAD_PIN"});
    let p = Pkcs11Provider::from_options(&opts, T).unwrap();
    let msg = assert_failure(p.probe(), Failure::Credentials);
    assert!(msg.contains("CKR_PIN_INCORRECT") && !msg.contains("0000"), "{msg}");
    eprintln!("{msg}");
    assert_failure(p.ensure_key("k"), Failure::Credentials);
}

#[test]
#[ignore]
fn sessions_are_reestablished() {
    let Some(h) = hsm() else { return };
    let p = h.provider();
    let name = unique("tde-test-reopen");
    p.ensure_key(&name).unwrap();
    let kek = WrapKey::generate().unwrap();
    let blob = p.wrap(&name, &kek, b"a").unwrap();

    // someone logs the token out: our session loses its login
    let (ctx, s) = h.side_session();
    s.logout().unwrap();
    assert_eq!(p.unwrap(&name, &blob, b"a").unwrap().expose(), kek.expose());

    // someone finalizes the module: every session is gone
    drop(s);
    ctx.finalize().unwrap();
    assert_eq!(p.unwrap(&name, &blob, b"a").unwrap().expose(), kek.expose());
    verify(&p, &name).unwrap();
}

#[test]
#[ignore]
fn slot_number_and_pin_file() {
    let Some(h) = hsm() else { return };
    let (ctx, s) = h.side_session();
    let slot = s.get_session_info().unwrap().slot_id().id();
    drop(s);
    drop(ctx);
    let dir = std::env::temp_dir().join(unique("tde-kms-pin"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pin");
    std::fs::write(&file, format!("{}\n", h.pin)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let opts = json!({"library": h.library, "slot": slot, "pin_file": file});
    let p = Pkcs11Provider::from_options(&opts, T).unwrap();
    let name = unique("tde-test-slot");
    p.ensure_key(&name).unwrap();
    verify(&p, &name).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[ignore]
fn through_the_c_abi() {
    let Some(h) = hsm() else { return };
    let opts = h.options();
    let key = unique("tde-ffi");
    let aad = B64.encode(b"ffi aad");
    let req = |op: &str, aad: &str| {
        json!({"op": op, "kind": "pkcs11", "options": opts, "key": key, "aad": aad, "timeout_ms": 5000}).to_string()
    };
    let (rc, _, msg) = ffi_call(&json!({"op": "probe", "kind": "pkcs11", "options": opts}).to_string(), &[]);
    assert_eq!(rc, 0, "{msg}");
    let (rc, _, msg) = ffi_call(&req("ensure", &aad), &[]);
    assert_eq!(rc, 0, "{msg}");
    let kek = [0x3cu8; 32];
    let (rc, blob, msg) = ffi_call(&req("wrap", &aad), &kek);
    assert_eq!((rc, blob.len()), (0, 61), "{msg}");
    let (rc, back, msg) = ffi_call(&req("unwrap", &aad), &blob);
    assert_eq!((rc, back.as_slice()), (0, &kek[..]), "{msg}");
    let (rc, _, msg) = ffi_call(&req("unwrap", &B64.encode(b"x")), &blob);
    assert_eq!(rc, Failure::WrongKey.code(), "{msg}");
    assert!(msg.starts_with("pkcs11 provider: "), "{msg}");
    let mut bad = opts.clone();
    bad["library"] = json!("/nonexistent/lib.so");
    let (rc, _, msg) = ffi_call(&json!({"op": "probe", "kind": "pkcs11", "options": bad}).to_string(), &[]);
    assert_eq!(rc, Failure::BadOptions.code(), "{msg}");
    assert!(msg.contains("/nonexistent/lib.so"), "{msg}");
}
