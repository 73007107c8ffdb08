//! `pkcs11`: master keys in an HSM (or SoftHSM2), through its PKCS#11 module.
//!
//! The master key is an AES-256 secret key object on the token, labelled
//! with the key's name, created by `ensure_key` as
//! `CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`, not `CKA_EXTRACTABLE`, with
//! only `CKA_ENCRYPT`/`CKA_DECRYPT` allowed: it never leaves the token.
//! Wrap is `C_Encrypt` with `CKM_AES_GCM` (a fresh random 12-byte IV from the
//! OS, the associated data as GCM's AAD, a 128-bit tag); unwrap is
//! `C_Decrypt`.  The blob:
//!
//! ```text
//! +---------+-------------+--------------------------------------+
//! | 0x01    | IV          | ciphertext (32) || GCM tag (16)       |
//! | 1 byte  | 12 bytes    | 48 bytes                             |
//! +---------+-------------+--------------------------------------+
//! ```
//!
//! (61 bytes; the version byte lets a later format be told apart.)  Random
//! IVs are safe here: a master key wraps a handful of KEKs over its life,
//! far below GCM's 2^32 random-IV limit.
//!
//! Options:
//!
//! ```json
//! {"library": "/usr/lib/softhsm/libsofthsm2.so",   // required, absolute
//!  "token_label": "tde",   or   "slot": 2089123607, // exactly one
//!  "pin_env": "TDE_HSM_PIN", or "pin_file": "/etc/tde/hsm-pin"}  // exactly one
//! ```
//!
//! Sessions: `C_Initialize` is per process, so each module is loaded and
//! initialised once (`CKF_OS_LOCKING_OK`) and kept for the life of the
//! process (never finalised: modules that spawn threads do not all survive
//! being unloaded).  Each provider keeps one read-write session, logged in
//! as the user, opened on first use and reopened, once per call, when the
//! token says the session is gone (`CKR_SESSION_HANDLE_INVALID`,
//! `CKR_SESSION_CLOSED`, `CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`,
//! `CKR_USER_NOT_LOGGED_IN`, ...).
//!
//! Deadlines: PKCS#11 has no timeouts of its own and its calls cannot be
//! interrupted, so each operation runs on the runtime's blocking pool and
//! the caller waits at most `timeout_ms`; a call that hangs (a network HSM
//! gone quiet) keeps its thread and the session until it returns, and the
//! calls after it wait for the session, each as long as its own deadline.
//!
//! Key material: the KEK is copied into the module's input buffer by the
//! module itself; the decrypted KEK comes back in a buffer that is wiped
//! once it is copied into a `WrapKey`.  The PIN is held as cryptoki's
//! `AuthPin` (a zeroizing `SecretString`).

use crate::options::{bad, Opts};
use crate::rt::{self, remote};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tde_core::provider::{Failure, MasterKeyProvider, ProviderError};
use tde_core::secret::{WrapKey, WRAP_KEY_LEN};
use zeroize::{Zeroize, Zeroizing};

pub(crate) const KIND: &str = "pkcs11";

const KNOWN: [&str; 5] = ["library", "token_label", "slot", "pin_env", "pin_file"];

/// The blob's format version.
const BLOB_VERSION: u8 = 1;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
const BLOB_LEN: usize = 1 + IV_LEN + WRAP_KEY_LEN + TAG_LEN;

/// Every module loaded in this process, by path (see the module docs).
static MODULES: Mutex<Vec<(PathBuf, Pkcs11)>> = Mutex::new(Vec::new());

#[derive(Clone)]
enum TokenSel {
    Label(String),
    Slot(u64),
}

pub struct Pkcs11Provider {
    shared: Arc<Shared>,
    limit: Duration,
}

/// What a running operation needs, shared with the blocking thread it runs on.
struct Shared {
    library: PathBuf,
    ctx: Pkcs11,
    token: TokenSel,
    pin: AuthPin,
    session: Mutex<Option<Session>>,
}

/// An operation's failure: from the module, or one we name ourselves.
enum OpError {
    P11(P11Error),
    Ours(ProviderError),
}

impl From<P11Error> for OpError {
    fn from(e: P11Error) -> OpError {
        OpError::P11(e)
    }
}

impl Pkcs11Provider {
    pub fn from_options(options: &Value, limit: Duration) -> Result<Pkcs11Provider, ProviderError> {
        let o = Opts::new(KIND, options, &KNOWN)?;
        let library = o.path("library")?.ok_or_else(|| o.bad("missing \"library\""))?;
        o.one_of("token_label", "slot")?;
        let token = match (o.string("token_label")?, o.integer("slot")?) {
            (Some(label), None) => TokenSel::Label(label.to_string()),
            (None, Some(slot)) => TokenSel::Slot(slot),
            _ => return Err(o.bad("give one of \"token_label\" and \"slot\"")),
        };
        let pin = o.secret("pin")?;
        let pin = AuthPin::from(pin.as_str());
        let ctx = module(&library)?;
        Ok(Pkcs11Provider { shared: Arc::new(Shared { library, ctx, token, pin, session: Mutex::new(None) }), limit })
    }

    /// Runs `op` with the session on the blocking pool, within the deadline.
    fn run<T, F>(&self, op: F) -> Result<T, ProviderError>
    where
        T: Send + 'static,
        F: Fn(&Session) -> Result<T, OpError> + Send + 'static,
    {
        let shared = self.shared.clone();
        let joined = rt::block_on(KIND, self.limit, async move {
            tokio::task::spawn_blocking(move || shared.with_session(&op)).await
        })?;
        joined.unwrap_or_else(|_| Err(remote(KIND, Failure::Other, "the PKCS#11 call panicked")))
    }
}

impl Shared {
    /// Runs `op` with the session, opening it first if need be, and once more
    /// with a new session if the token says the old one is gone.
    fn with_session<T>(&self, op: &dyn Fn(&Session) -> Result<T, OpError>) -> Result<T, ProviderError> {
        let mut guard = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let mut retried = false;
        loop {
            let session = match guard.take() {
                Some(s) => s,
                None => self.open()?,
            };
            match op(&session) {
                Ok(v) => {
                    *guard = Some(session);
                    return Ok(v);
                }
                Err(OpError::P11(e)) if session_lost(&e) => {
                    drop(session);
                    if retried {
                        return Err(map_error(&e, &self.library));
                    }
                    retried = true;
                }
                Err(OpError::P11(e)) => {
                    *guard = Some(session);
                    return Err(map_error(&e, &self.library));
                }
                Err(OpError::Ours(e)) => {
                    *guard = Some(session);
                    return Err(e);
                }
            }
        }
    }

    /// A new read-write session on our token, logged in as the user.
    fn open(&self) -> Result<Session, ProviderError> {
        // Someone in the process may have called C_Finalize.
        if let Err(P11Error::Pkcs11(RvError::CryptokiNotInitialized, _)) = self.ctx.get_library_info() {
            initialize(&self.ctx, &self.library)?;
        }
        let slot = self.slot()?;
        let session = self.ctx.open_rw_session(slot).map_err(|e| map_error(&e, &self.library))?;
        match session.login(UserType::User, Some(&self.pin)) {
            // The login state is the token's, shared by all our sessions.
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e) => Err(map_error(&e, &self.library)),
        }
    }

    /// Our token's slot.  A token that is missing, or a slot list that
    /// fails, may be the module's stale view: some modules (SoftHSM2) do not
    /// see a token that came back (an HSM reconnected, a token directory
    /// restored) until they are initialised again.  So once, the module is
    /// finalised and initialised again and the slots are listed afresh; our
    /// other sessions on it are then lost, and reopened by `with_session`.
    fn slot(&self) -> Result<Slot, ProviderError> {
        match self.find_slot() {
            Ok(s) => Ok(s),
            Err(_) => {
                let _ = self.ctx.clone().finalize();
                initialize(&self.ctx, &self.library)?;
                self.find_slot()
            }
        }
    }

    fn find_slot(&self) -> Result<Slot, ProviderError> {
        let slots = self.ctx.get_slots_with_token().map_err(|e| map_error(&e, &self.library))?;
        let mut seen = Vec::new();
        for slot in slots {
            match &self.token {
                TokenSel::Slot(id) if slot.id() == *id => return Ok(slot),
                TokenSel::Slot(_) => seen.push(slot.id().to_string()),
                TokenSel::Label(label) => {
                    let info = self.ctx.get_token_info(slot).map_err(|e| map_error(&e, &self.library))?;
                    let have = info.label().trim_end();
                    if have == label {
                        return Ok(slot);
                    }
                    seen.push(format!("\"{have}\""));
                }
            }
        }
        let wanted = match &self.token {
            TokenSel::Label(l) => format!("no token labelled \"{l}\""),
            TokenSel::Slot(id) => format!("no token in slot {id}"),
        };
        let seen = if seen.is_empty() { "none".to_string() } else { seen.join(", ") };
        Err(remote(
            KIND,
            Failure::Unreachable,
            format!("{wanted} in \"{}\" (tokens present: {seen})", self.library.display()),
        ))
    }
}

/// The module at `path`, loaded and initialised once per process.
fn module(path: &Path) -> Result<Pkcs11, ProviderError> {
    let mut modules = MODULES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, ctx)) = modules.iter().find(|(p, _)| p == path) {
        return Ok(ctx.clone());
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(bad(KIND, format!("PKCS#11 library \"{}\" is not a regular file", path.display()))),
        Err(e) => return Err(bad(KIND, format!("could not load PKCS#11 library \"{}\": {e}", path.display()))),
    }
    let ctx = Pkcs11::new(path)
        .map_err(|e| bad(KIND, format!("could not load PKCS#11 library \"{}\": {e}", path.display())))?;
    initialize(&ctx, path)?;
    modules.push((path.to_path_buf(), ctx.clone()));
    Ok(ctx)
}

fn initialize(ctx: &Pkcs11, path: &Path) -> Result<(), ProviderError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(map_error(&e, path)),
    }
}

/// The one secret-key object labelled `name`, if any.
fn find_key(s: &Session, name: &str) -> Result<Option<ObjectHandle>, OpError> {
    let template = [Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Label(name.as_bytes().to_vec())];
    let found = s.find_objects(&template)?;
    match found.as_slice() {
        // Private objects are invisible to a session that lost its login
        // (another session of ours logged out): that is a lost session, not
        // a missing key.
        [] if !logged_in(s)? => Err(P11Error::Pkcs11(RvError::UserNotLoggedIn, Function::FindObjects).into()),
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        many => Err(OpError::Ours(remote(
            KIND,
            Failure::Other,
            format!(
                "{} secret keys are labelled \"{name}\" on the token; a master key's label must be unique",
                many.len()
            ),
        ))),
    }
}

fn logged_in(s: &Session) -> Result<bool, OpError> {
    Ok(matches!(s.get_session_info()?.session_state(), SessionState::RwUser | SessionState::RoUser))
}

fn need_key(s: &Session, name: &str) -> Result<ObjectHandle, OpError> {
    find_key(s, name)?.ok_or_else(|| {
        OpError::Ours(remote(KIND, Failure::KeyNotFound, format!("no secret key labelled \"{name}\" on the token")))
    })
}

/// Refuses a key that is not an AES-256 key allowed to encrypt and decrypt.
fn check_key(s: &Session, key: ObjectHandle, name: &str) -> Result<(), OpError> {
    let attrs = s.get_attributes(
        key,
        &[AttributeType::KeyType, AttributeType::ValueLen, AttributeType::Encrypt, AttributeType::Decrypt],
    )?;
    let (mut aes, mut len, mut enc, mut dec) = (false, 0u64, false, false);
    for a in attrs {
        match a {
            Attribute::KeyType(t) => aes = t == KeyType::AES,
            Attribute::ValueLen(l) => len = u64::from(l),
            Attribute::Encrypt(b) => enc = b,
            Attribute::Decrypt(b) => dec = b,
            _ => {}
        }
    }
    if aes && len == WRAP_KEY_LEN as u64 && enc && dec {
        Ok(())
    } else {
        Err(OpError::Ours(remote(
            KIND,
            Failure::Other,
            format!("the key labelled \"{name}\" is not an AES-256 key allowed to encrypt and decrypt (AES: {aes}, {len} bytes, CKA_ENCRYPT {enc}, CKA_DECRYPT {dec})"),
        )))
    }
}

fn key_template(name: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen((WRAP_KEY_LEN as u64).into()),
        Attribute::Label(name.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ]
}

/// Splits a blob into IV and ciphertext-with-tag, or `None` if it is not one.
pub(crate) fn parse_blob(blob: &[u8]) -> Option<([u8; IV_LEN], &[u8])> {
    if blob.len() != BLOB_LEN || blob[0] != BLOB_VERSION {
        return None;
    }
    let mut iv = [0u8; IV_LEN];
    iv.copy_from_slice(&blob[1..1 + IV_LEN]);
    Some((iv, &blob[1 + IV_LEN..]))
}

pub(crate) fn make_blob(iv: &[u8; IV_LEN], ct: &[u8]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(BLOB_LEN);
    blob.push(BLOB_VERSION);
    blob.extend_from_slice(iv);
    blob.extend_from_slice(ct);
    blob
}

impl MasterKeyProvider for Pkcs11Provider {
    fn probe(&self) -> Result<(), ProviderError> {
        self.run(|s| match logged_in(s)? {
            true => Ok(()),
            false => Err(P11Error::Pkcs11(RvError::UserNotLoggedIn, Function::GetSessionInfo).into()),
        })
    }

    fn ensure_key(&self, key_name: &str) -> Result<(), ProviderError> {
        let name = key_name.to_string();
        self.run(move |s| {
            let key = match find_key(s, &name)? {
                Some(k) => k,
                None => s.generate_key(&Mechanism::AesKeyGen, &key_template(&name))?,
            };
            check_key(s, key, &name)
        })
    }

    fn wrap(&self, key_name: &str, kek: &WrapKey, aad: &[u8]) -> Result<Vec<u8>, ProviderError> {
        let name = key_name.to_string();
        let plain = Zeroizing::new(*kek.expose());
        let aad = aad.to_vec();
        self.run(move |s| {
            let key = need_key(s, &name)?;
            let mut iv = [0u8; IV_LEN];
            getrandom::fill(&mut iv).map_err(|e| {
                OpError::Ours(remote(KIND, Failure::Other, format!("the OS random generator failed: {e}")))
            })?;
            let ct = {
                let params = GcmParams::new(&mut iv, &aad, ((TAG_LEN * 8) as u64).into())?;
                s.encrypt(&Mechanism::AesGcm(params), key, &plain[..])?
            };
            if ct.len() != WRAP_KEY_LEN + TAG_LEN {
                return Err(OpError::Ours(remote(
                    KIND,
                    Failure::Other,
                    format!("C_Encrypt returned {} bytes, expected {}", ct.len(), WRAP_KEY_LEN + TAG_LEN),
                )));
            }
            // the IV as the token used it (some tokens write their own)
            Ok(make_blob(&iv, &ct))
        })
    }

    fn unwrap(&self, key_name: &str, blob: &[u8], aad: &[u8]) -> Result<WrapKey, ProviderError> {
        let Some((iv, ct)) = parse_blob(blob) else {
            return Err(ProviderError::WrongKey { key: key_name.to_string() });
        };
        let (name, ct, aad) = (key_name.to_string(), ct.to_vec(), aad.to_vec());
        self.run(move |s| {
            let key = need_key(s, &name)?;
            let mut iv = iv;
            let params = GcmParams::new(&mut iv, &aad, ((TAG_LEN * 8) as u64).into())?;
            let mut plain = s.decrypt(&Mechanism::AesGcm(params), key, &ct)?;
            let k = WrapKey::from_bytes(&plain);
            plain.zeroize();
            k.map_err(|_| OpError::Ours(ProviderError::WrongKey { key: name.clone() }))
        })
    }
}

/// The token no longer knows our session (or its login).
fn session_lost(e: &P11Error) -> bool {
    matches!(
        e,
        P11Error::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::CryptokiNotInitialized
                | RvError::UserNotLoggedIn,
            _
        )
    )
}

/// `CKR_AEAD_DECRYPT_FAILED` (PKCS#11 3.0), which cryptoki does not name.
const CKR_AEAD_DECRYPT_FAILED: u64 = 0x35;

/// The failure a return value of `func` stands for.
pub(crate) fn failure_for_rv(rv: &RvError, func: Function) -> Failure {
    use RvError::*;
    match rv {
        // A failed GCM tag check: CKR_ENCRYPTED_DATA_INVALID per the
        // standard, CKR_AEAD_DECRYPT_FAILED in 3.0, and CKR_GENERAL_ERROR or
        // CKR_FUNCTION_FAILED from SoftHSM2 2.6 and some HSMs.  C_Decrypt is
        // only ever called with AES-GCM, whose only expected failure that is.
        GeneralError | FunctionFailed if matches!(func, Function::Decrypt) => Failure::WrongKey,
        UnknownErrorCode(CKR_AEAD_DECRYPT_FAILED) => Failure::WrongKey,
        PinIncorrect | PinInvalid | PinLenRange | PinExpired | PinLocked | UserPinNotInitialized | UserNotLoggedIn => {
            Failure::Credentials
        }
        EncryptedDataInvalid | EncryptedDataLenRange => Failure::WrongKey,
        KeyFunctionNotPermitted | ActionProhibited => Failure::PermissionDenied,
        SessionHandleInvalid
        | SessionClosed
        | DeviceRemoved
        | DeviceError
        | TokenNotPresent
        | TokenNotRecognized
        | CryptokiNotInitialized
        | SlotIdInvalid => Failure::Unreachable,
        _ => Failure::Other,
    }
}

/// `PinIncorrect` -> `CKR_PIN_INCORRECT`.
fn ckr_name(rv: &RvError) -> String {
    let mut out = String::from("CKR");
    for c in format!("{rv:?}").chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The one place PKCS#11 errors become ours.
pub(crate) fn map_error(e: &P11Error, library: &Path) -> ProviderError {
    match e {
        P11Error::Pkcs11(rv, func) => {
            let text = rv.to_string();
            let first = text.split(".  ").next().unwrap_or(&text).trim_end_matches('.');
            let name = format!("{func}").replace("Function::", "C_");
            remote(KIND, failure_for_rv(rv, *func), format!("{name} returned {}: {first}.", ckr_name(rv)))
        }
        P11Error::LibraryLoading(err) => {
            bad(KIND, format!("could not load PKCS#11 library \"{}\": {err}", library.display()))
        }
        other => remote(KIND, Failure::Other, other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        crate::options::refused(Pkcs11Provider::from_options(&v, Duration::from_secs(1)), &v)
    }

    #[test]
    fn options_are_checked() {
        std::env::set_var("TDE_KMS_UNIT_PIN", "1234");
        let pin = "TDE_KMS_UNIT_PIN";
        assert!(err(json!({"token_label": "t", "pin_env": pin})).contains("missing \"library\""));
        assert!(err(json!({"library": "libsofthsm2.so", "token_label": "t", "pin_env": pin})).contains("absolute"));
        assert!(err(json!({"library": "/x.so", "pin_env": pin})).contains("give one of \"token_label\" and \"slot\""));
        assert!(err(json!({"library": "/x.so", "token_label": "t", "slot": 1, "pin_env": pin})).contains("only one of"));
        assert!(err(json!({"library": "/x.so", "slot": "1", "pin_env": pin})).contains("integer"));
        assert!(err(json!({"library": "/x.so", "slot": -1, "pin_env": pin})).contains("integer"));
        assert!(
            err(json!({"library": "/x.so", "token_label": "t"})).contains("give one of \"pin_env\" and \"pin_file\"")
        );
        assert!(err(json!({"library": "/x.so", "token_label": "t", "pin_env": pin, "pin_file": "/p"}))
            .contains("only one of"));
        assert!(err(json!({"library": "/x.so", "token_label": "t", "pin_env": pin, "so_pin": "1"}))
            .contains("unknown option"));
        // a library that is not there, or not a PKCS#11 module: the path is named
        let e = err(json!({"library": "/nonexistent/libpkcs11.so", "token_label": "t", "pin_env": pin}));
        assert!(e.contains("could not load PKCS#11 library \"/nonexistent/libpkcs11.so\""), "{e}");
        let e = err(json!({"library": "/etc/hostname", "token_label": "t", "pin_env": pin}));
        assert!(e.contains("\"/etc/hostname\""), "{e}");
        let e = err(json!({"library": "/etc", "token_label": "t", "pin_env": pin}));
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn blob_format() {
        let iv = [7u8; IV_LEN];
        let ct = [9u8; WRAP_KEY_LEN + TAG_LEN];
        let blob = make_blob(&iv, &ct);
        assert_eq!(blob.len(), 61);
        assert_eq!(blob[0], 1);
        let (iv2, ct2) = parse_blob(&blob).unwrap();
        assert_eq!((iv2, ct2), (iv, &ct[..]));
        let mut v2 = blob.clone();
        v2[0] = 2;
        assert!(parse_blob(&v2).is_none());
        assert!(parse_blob(&blob[..60]).is_none());
        assert!(parse_blob(&[blob.clone(), vec![0]].concat()).is_none());
        assert!(parse_blob(&[]).is_none());
    }

    #[test]
    fn return_values_map_onto_failures() {
        let cases = [
            (RvError::PinIncorrect, Failure::Credentials),
            (RvError::PinLocked, Failure::Credentials),
            (RvError::EncryptedDataInvalid, Failure::WrongKey),
            (RvError::EncryptedDataLenRange, Failure::WrongKey),
            (RvError::DeviceRemoved, Failure::Unreachable),
            (RvError::SessionHandleInvalid, Failure::Unreachable),
            (RvError::KeyFunctionNotPermitted, Failure::PermissionDenied),
            (RvError::GeneralError, Failure::Other),
        ];
        for (rv, f) in cases {
            assert_eq!(failure_for_rv(&rv, Function::Encrypt), f, "{rv:?}");
        }
        assert_eq!(failure_for_rv(&RvError::GeneralError, Function::Decrypt), Failure::WrongKey);
        assert_eq!(failure_for_rv(&RvError::UnknownErrorCode(0x35), Function::Decrypt), Failure::WrongKey);
        assert_eq!(ckr_name(&RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        let e = map_error(&P11Error::Pkcs11(RvError::PinIncorrect, Function::Login), Path::new("/l.so"));
        assert_eq!(
            e.to_string(),
            "pkcs11 provider: credentials refused: C_Login returned CKR_PIN_INCORRECT: The specified PIN is incorrect, i.e., does not match the PIN stored on the token."
        );
        assert!(session_lost(&P11Error::Pkcs11(RvError::SessionHandleInvalid, Function::Encrypt)));
        assert!(!session_lost(&P11Error::Pkcs11(RvError::PinIncorrect, Function::Login)));
    }
}
