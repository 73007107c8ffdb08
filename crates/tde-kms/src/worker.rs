//! One request from the key worker: parse it, find or build the provider,
//! run the operation.  Everything here is safe Rust; `ffi` only moves bytes
//! across the C boundary.
//!
//! Providers are cached per (kind, timeout, options text), so repeated calls
//! reuse a client's connections or a PKCS#11 session; changed options build a
//! new one.  A provider whose call failed as `Unreachable`, `TimedOut` or
//! `Credentials` is dropped from the cache, so the next call reconnects and
//! re-reads its secret (a rotated token file is picked up that way).
//! The local kinds (`file`, `env`) are built afresh on each call: they are
//! cheap, and the keyring is re-read anyway.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{Map, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tde_core::provider::{Failure, MasterKeyProvider, ProviderError};
use tde_core::secret::{WrapKey, WRAP_KEY_LEN};

/// A built remote provider, shared between the cache and a running call.
pub type SharedProvider = Arc<dyn MasterKeyProvider + Send + Sync>;

/// Providers kept at most (one per configured provider is the normal case).
const CACHE_MAX: usize = 8;
/// The longest `timeout_ms` accepted: one hour.
const TIMEOUT_MAX_MS: u64 = 3_600_000;

/// Most recently used last.
static CACHE: Mutex<Vec<(String, SharedProvider)>> = Mutex::new(Vec::new());

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Wrap,
    Unwrap,
    Ensure,
    Probe,
}

/// What a call hands back.
pub enum Output {
    Empty,
    Blob(Vec<u8>),
    Key(WrapKey),
}

impl Output {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Output::Empty => &[],
            Output::Blob(b) => b,
            Output::Key(k) => k.expose(),
        }
    }
}

struct Request {
    op: Op,
    kind: String,
    options: Value,
    key: Option<String>,
    aad: Option<Vec<u8>>,
    timeout: Duration,
}

fn bad_request(kind: &str, why: impl Into<String>) -> ProviderError {
    ProviderError::BadOptions {
        kind: kind.to_string(),
        why: format!("bad request from the key worker: {}", why.into()),
    }
}

fn parse_request(req: &[u8]) -> Result<Request, ProviderError> {
    let v: Value = serde_json::from_slice(req).map_err(|e| bad_request("?", format!("not JSON: {e}")))?;
    let obj: &Map<String, Value> = v.as_object().ok_or_else(|| bad_request("?", "not a JSON object"))?;
    let kind = match obj.get("kind") {
        Some(Value::String(k)) => k.clone(),
        _ => return Err(bad_request("?", "\"kind\" must be a string")),
    };
    let bad = |why: String| bad_request(&kind, why);
    const KNOWN: [&str; 6] = ["op", "kind", "options", "key", "aad", "timeout_ms"];
    if let Some(extra) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(bad(format!("unknown field \"{extra}\"")));
    }
    let op = match obj.get("op").and_then(Value::as_str) {
        Some("wrap") => Op::Wrap,
        Some("unwrap") => Op::Unwrap,
        Some("ensure") => Op::Ensure,
        Some("probe") => Op::Probe,
        _ => return Err(bad("\"op\" must be \"wrap\", \"unwrap\", \"ensure\" or \"probe\"".into())),
    };
    let options = obj.get("options").cloned().unwrap_or_else(|| Value::Object(Map::new()));
    let key = match obj.get("key") {
        None => None,
        Some(Value::String(k)) if !k.is_empty() => Some(k.clone()),
        Some(_) => return Err(bad("\"key\" must be a non-empty string".into())),
    };
    if key.is_none() && op != Op::Probe {
        return Err(bad("\"key\" is missing".into()));
    }
    let aad = match obj.get("aad") {
        None => None,
        Some(Value::String(a)) => Some(B64.decode(a).map_err(|_| bad("\"aad\" is not base64".into()))?),
        Some(_) => return Err(bad("\"aad\" must be a base64 string".into())),
    };
    if aad.is_none() && matches!(op, Op::Wrap | Op::Unwrap) {
        return Err(bad("\"aad\" is missing".into()));
    }
    let timeout_ms = match obj.get("timeout_ms") {
        None => crate::DEFAULT_TIMEOUT.as_millis() as u64,
        Some(t) => match t.as_u64() {
            Some(ms) if (1..=TIMEOUT_MAX_MS).contains(&ms) => ms,
            _ => return Err(bad(format!("\"timeout_ms\" must be an integer from 1 to {TIMEOUT_MAX_MS}"))),
        },
    };
    Ok(Request { op, kind, options, key, aad, timeout: Duration::from_millis(timeout_ms) })
}

/// Runs one request.  `input` is the KEK for wrap, the blob for unwrap.
pub fn call(req: &[u8], input: &[u8]) -> Result<Output, ProviderError> {
    let r = parse_request(req)?;
    #[cfg(test)]
    if r.kind == "tde-kms-test-panic" {
        panic!("a provider panicked");
    }
    if !crate::REMOTE_KINDS.contains(&r.kind.as_str()) {
        let prov = tde_core::provider::from_config(&r.kind, &r.options)?;
        return run(&*prov, &r, input);
    }
    // serde_json's map is ordered by key, so equal options give equal text.
    let cache_key = format!("{}\n{}\n{}", r.kind, r.timeout.as_millis(), r.options);
    let prov = match cached(&cache_key) {
        Some(p) => p,
        None => {
            let p: SharedProvider = Arc::from(crate::build_remote(&r.kind, &r.options, r.timeout)?);
            insert(cache_key.clone(), p.clone());
            p
        }
    };
    let result = run(&*prov, &r, input);
    if let Err(e) = &result {
        if matches!(Failure::of(e), Failure::Unreachable | Failure::TimedOut | Failure::Credentials) {
            forget(&cache_key);
        }
    }
    result
}

fn run(prov: &dyn MasterKeyProvider, r: &Request, input: &[u8]) -> Result<Output, ProviderError> {
    let key = r.key.as_deref().unwrap_or("");
    let aad = r.aad.as_deref().unwrap_or(&[]);
    match r.op {
        Op::Probe => prov.probe().map(|()| Output::Empty),
        Op::Ensure => prov.ensure_key(key).map(|()| Output::Empty),
        Op::Wrap => {
            let kek = WrapKey::from_bytes(input).map_err(|_| {
                bad_request(&r.kind, format!("wrap takes a {WRAP_KEY_LEN}-byte key, got {} bytes", input.len()))
            })?;
            prov.wrap(key, &kek, aad).map(Output::Blob)
        }
        Op::Unwrap => prov.unwrap(key, input, aad).map(Output::Key),
    }
}

fn lock() -> std::sync::MutexGuard<'static, Vec<(String, SharedProvider)>> {
    // A panic while the lock was held left the list itself consistent.
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

fn cached(key: &str) -> Option<SharedProvider> {
    let mut c = lock();
    let i = c.iter().position(|(k, _)| k == key)?;
    let entry = c.remove(i);
    let p = entry.1.clone();
    c.push(entry);
    Some(p)
}

fn insert(key: String, p: SharedProvider) {
    let mut c = lock();
    c.retain(|(k, _)| *k != key);
    if c.len() >= CACHE_MAX {
        c.remove(0);
    }
    c.push((key, p));
}

fn forget(key: &str) {
    lock().retain(|(k, _)| k != key);
}

/// How many providers are cached (for tests).
pub fn cached_count() -> usize {
    lock().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req_err(text: &str) -> String {
        match parse_request(text.as_bytes()) {
            Ok(_) => panic!("{text} accepted"),
            Err(e) => {
                assert_eq!(Failure::of(&e), Failure::BadOptions, "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn requests_are_checked() {
        let r = parse_request(br#"{"op":"wrap","kind":"aws-kms","options":{},"key":"k","aad":"YWFk","timeout_ms":5}"#)
            .unwrap();
        assert_eq!(r.op, Op::Wrap);
        assert_eq!(r.aad.as_deref(), Some(&b"aad"[..]));
        assert_eq!(r.timeout, Duration::from_millis(5));
        let r = parse_request(br#"{"op":"probe","kind":"vault-transit","options":{"url":"x"}}"#).unwrap();
        assert_eq!((r.op, r.timeout), (Op::Probe, crate::DEFAULT_TIMEOUT));

        assert!(req_err("not json").contains("not JSON"));
        assert!(req_err("[1]").contains("not a JSON object"));
        assert!(req_err(r#"{"op":"wrap"}"#).contains("\"kind\""));
        assert!(req_err(r#"{"op":"sign","kind":"k"}"#).contains("\"op\""));
        assert!(req_err(r#"{"op":"wrap","kind":"k","aad":""}"#).contains("\"key\" is missing"));
        assert!(req_err(r#"{"op":"unwrap","kind":"k","key":"k"}"#).contains("\"aad\" is missing"));
        assert!(req_err(r#"{"op":"wrap","kind":"k","key":"k","aad":"!!"}"#).contains("base64"));
        assert!(req_err(r#"{"op":"probe","kind":"k","timeout_ms":0}"#).contains("timeout_ms"));
        assert!(req_err(r#"{"op":"probe","kind":"k","timeout_ms":"5"}"#).contains("timeout_ms"));
        assert!(req_err(r#"{"op":"probe","kind":"k","secret":"x"}"#).contains("unknown field \"secret\""));
    }

    #[test]
    fn local_kinds_run_uncached() {
        std::env::set_var("TDE_KMS_UNIT_ENV_KEY", B64.encode([7u8; 32]));
        let kek = [9u8; 32];
        let req = |op: &str| {
            format!(
                r#"{{"op":"{op}","kind":"env","options":{{"variable":"TDE_KMS_UNIT_ENV_KEY"}},"key":"k","aad":"YQ=="}}"#
            )
        };
        let blob = match call(req("wrap").as_bytes(), &kek).unwrap() {
            Output::Blob(b) => b,
            _ => panic!("wrap gave no blob"),
        };
        let back = call(req("unwrap").as_bytes(), &blob).unwrap();
        assert_eq!(back.bytes(), &kek);
        let e = call(req("wrap").as_bytes(), &kek[..31]).err().unwrap();
        assert!(e.to_string().contains("32-byte key"), "{e}");
        let e = call(br#"{"op":"probe","kind":"nope"}"#, &[]).err().unwrap();
        assert!(matches!(e, ProviderError::UnknownKind(_)), "{e}");
    }
}
