//! The key worker: the one process that talks to key providers.
//!
//! Why it exists: a master key lives in a KMS or an HSM, reached through an
//! SDK, a TLS stack, credentials and sometimes an HSM session.  None of that
//! belongs in every backend.  So one background worker (worker.rs), started
//! with the postmaster and running during crash recovery and on standbys,
//! makes every provider call; everyone else asks it through shared memory
//! (queue.rs) and waits on its latch, at most `tde.provider_timeout`.  The
//! remote providers' code is a separate library that only the worker loads
//! (library.rs, crates/tde-kms).
//!
//! What goes through it:
//!
//! - unlocking the key store: the KEK is unwrapped once, by the worker, when
//!   the server starts (the startup process waits for that first attempt,
//!   smgr/), and again whenever the store is locked and someone needs a key
//!   (`wait_for_unlock`) or every few seconds -- so a server started while
//!   its provider was down recovers by itself;
//! - every other provider call (`provider`): adding a provider, setting or
//!   rotating the master key, tde_verify_key(), and redo of a master-key
//!   change on a standby.
//!
//! Table keys never go through it: they are unwrapped locally with the KEK
//! (keys/), so the number of provider calls does not grow with the number
//! of tables.  Once unlocked, a provider outage affects only the operations
//! above, not reads and writes.

pub mod library;
mod overrides;
pub mod queue;
pub mod worker;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use pgrx::pg_sys;
use serde_json::{json, Value};
use tde_core::provider::{self, Failure, MasterKeyProvider, ProviderError, LOCAL_KINDS};
use tde_core::secret::WrapKey;
use zeroize::Zeroizing;

use crate::gucs;

/// Every provider kind tde knows (the remote ones are in crates/tde-kms).
pub const KINDS: [&str; 8] = ["file", "env", "aws-kms", "vault-transit", "gcp-kms", "azure-keyvault", "pkcs11", "kmip"];

/// Whether this process makes provider calls itself: the key worker, and a
/// server without a postmaster (single-user mode), where no worker runs.
fn in_process() -> bool {
    // SAFETY: plain read of a process global set at process start.
    worker::is_key_worker() || unsafe { !pg_sys::IsPostmasterEnvironment }
}

/// A provider as a backend sees it: each call goes to the key worker (or,
/// in the key worker, to the provider itself).
pub struct Relay {
    name: String,
    kind: String,
    options: Value,
}

/// Provider `name` of `kind` with `options` (as the key store holds them).
/// Builds nothing and checks nothing but the kind: the options are checked
/// where the provider is built, in the key worker, on the first call, after
/// this server's overrides (overrides.rs) are applied.
pub fn provider(name: &str, kind: &str, options: &Value) -> Result<Relay, ProviderError> {
    if !KINDS.contains(&kind) {
        return Err(ProviderError::UnknownKind(kind.to_string()));
    }
    Ok(Relay { name: name.to_string(), kind: kind.to_string(), options: options.clone() })
}

#[derive(Clone, Copy)]
enum Op {
    Probe,
    Ensure,
    Wrap,
    Unwrap,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Probe => "probe",
            Op::Ensure => "ensure",
            Op::Wrap => "wrap",
            Op::Unwrap => "unwrap",
        }
    }

    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "probe" => Op::Probe,
            "ensure" => Op::Ensure,
            "wrap" => Op::Wrap,
            "unwrap" => Op::Unwrap,
            _ => return None,
        })
    }
}

/// A request as it crosses to the worker and into the library: no key
/// material (that travels beside it).
fn request_json(op: Op, name: &str, kind: &str, options: &Value, key: &str, aad: &[u8]) -> Vec<u8> {
    let timeout_ms = gucs::provider_timeout().as_millis() as u64;
    json!({"op": op.name(), "name": name, "kind": kind, "options": options, "key": key, "aad": B64.encode(aad), "timeout_ms": timeout_ms})
        .to_string()
        .into_bytes()
}

impl Relay {
    fn run(&self, op: Op, key: &str, aad: &[u8], input: &[u8]) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        if in_process() {
            return execute(op, &self.name, &self.kind, &self.options, key, aad, input, gucs::provider_timeout());
        }
        let req = request_json(op, &self.name, &self.kind, &self.options, key, aad);
        queue::call(&req, input, gucs::provider_timeout()).map_err(|(failure, message)| ProviderError::Relayed {
            failure,
            message: if failure == Failure::TimedOut { format!("{} provider: {message}", self.kind) } else { message },
        })
    }
}

impl MasterKeyProvider for Relay {
    fn probe(&self) -> Result<(), ProviderError> {
        self.run(Op::Probe, "", b"", b"").map(|_| ())
    }

    fn ensure_key(&self, key_name: &str) -> Result<(), ProviderError> {
        self.run(Op::Ensure, key_name, b"", b"").map(|_| ())
    }

    fn wrap(&self, key_name: &str, kek: &WrapKey, aad: &[u8]) -> Result<Vec<u8>, ProviderError> {
        self.run(Op::Wrap, key_name, aad, kek.expose()).map(|b| b.to_vec())
    }

    fn unwrap(&self, key_name: &str, blob: &[u8], aad: &[u8]) -> Result<WrapKey, ProviderError> {
        let out = self.run(Op::Unwrap, key_name, aad, blob)?;
        WrapKey::from_bytes(&out).map_err(|_| ProviderError::Relayed {
            failure: Failure::Other,
            message: format!("{} provider: unwrap gave {} bytes, not a 32-byte key", self.kind, out.len()),
        })
    }
}

/// Runs one provider call in this process: `file` and `env` here, the
/// remote kinds in the library.
#[allow(clippy::too_many_arguments)]
fn execute(
    op: Op,
    name: &str,
    kind: &str,
    stored: &Value,
    key: &str,
    aad: &[u8],
    input: &[u8],
    timeout: std::time::Duration,
) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
    let merged = overrides::apply(name, stored)?;
    let options = &merged;
    if LOCAL_KINDS.contains(&kind) {
        let p = provider::from_config(kind, options)?;
        return match op {
            Op::Probe => p.probe().map(|_| Zeroizing::new(Vec::new())),
            Op::Ensure => p.ensure_key(key).map(|_| Zeroizing::new(Vec::new())),
            Op::Wrap => {
                let kek = WrapKey::from_bytes(input).map_err(|_| ProviderError::Crypto)?;
                p.wrap(key, &kek, aad).map(Zeroizing::new)
            }
            Op::Unwrap => p.unwrap(key, input, aad).map(|k| Zeroizing::new(k.expose().to_vec())),
        };
    }
    let mut req: Value =
        serde_json::from_slice(&request_json(op, name, kind, options, key, aad)).unwrap_or(Value::Null);
    req["timeout_ms"] = json!(timeout.as_millis() as u64);
    // The library needs no provider name (the options are merged already),
    // and takes no key name or associated data where the operation has none.
    if let Some(o) = req.as_object_mut() {
        o.remove("name");
        if key.is_empty() {
            o.remove("key");
        }
        if matches!(op, Op::Probe | Op::Ensure) {
            o.remove("aad");
        }
    }
    library::call(req.to_string().as_bytes(), input)
        .map_err(|(failure, message)| ProviderError::Relayed { failure, message })
}

/// The key worker: runs a request taken from a slot.
fn serve(request: &[u8], input: &[u8], timeout: std::time::Duration) -> queue::Reply {
    let bad = |why: &str| (Failure::Other, format!("malformed request to the key worker: {why}"));
    let req: Value = serde_json::from_slice(request).map_err(|_| bad("not JSON"))?;
    let s = |k: &str| req.get(k).and_then(Value::as_str).unwrap_or("");
    let op = Op::parse(s("op")).ok_or_else(|| bad("unknown op"))?;
    let aad = B64.decode(s("aad")).map_err(|_| bad("aad is not base64"))?;
    let options = req.get("options").cloned().unwrap_or(Value::Null);
    execute(op, s("name"), s("kind"), &options, s("key"), &aad, input, timeout)
        .map_err(|e| (Failure::of(&e), e.to_string()))
}

/// The key store is locked and a key is needed now: asks the key worker to
/// try again, and waits for that attempt (at most tde.provider_timeout).
/// True if the store is unlocked afterwards.  Returns false at once if an
/// attempt failed less than a second ago (a flood of statements against a
/// dead provider costs one attempt a second, not one each), inside a
/// critical section, and in the key worker itself.
pub fn wait_for_unlock() -> bool {
    use crate::keys::StoreState;
    if crate::keys::state().0 != StoreState::Locked || worker::is_key_worker() || in_critical_section() {
        return crate::keys::state().0 == StoreState::Unlocked;
    }
    let (attempts, result, ago_ms) = queue::unlock_status();
    if result == queue::UnlockResult::Refused || (result != queue::UnlockResult::Pending && ago_ms < 1000) {
        return false;
    }
    queue::want_unlock();
    queue::wait_unlock_attempt(attempts, gucs::provider_timeout());
    crate::keys::state().0 == StoreState::Unlocked
}

fn in_critical_section() -> bool {
    // SAFETY: plain read of a process global.
    unsafe { pg_sys::CritSectionCount > 0 }
}

/// The startup process, before it replays anything: waits for the key
/// worker's first unlock attempt, so recovery starts with the keys.  A key
/// store that is not authentic under the master key stops the server here,
/// as it did when the postmaster unwrapped the KEK itself.  A provider that
/// does not answer leaves the store locked (the server starts, encrypted
/// relations are unreadable until it answers).
pub fn startup_wait() {
    use crate::keys::StoreState;
    // SAFETY: plain read of a process global.
    if unsafe { pg_sys::MyBackendType } != pg_sys::BackendType::B_STARTUP
        || crate::keys::state().0 != StoreState::Locked
    {
        return;
    }
    let (attempts, result, _) = queue::unlock_status();
    if result == queue::UnlockResult::Pending {
        queue::want_unlock();
        // The worker is forked right after this process: allow it to start.
        let patience = gucs::provider_timeout() + std::time::Duration::from_secs(5);
        if !queue::wait_unlock_attempt(attempts, patience) {
            pgrx::warning!(
                "tde: the key worker did not unlock the key store within tde.provider_timeout; recovery goes on with the key store locked"
            );
            return;
        }
    }
    if queue::unlock_status().1 == queue::UnlockResult::Refused {
        crate::error::TdeError::StoreRefused(crate::keys::state().1).raise_at(pgrx::PgLogLevel::FATAL);
    }
}

pub fn register() {
    worker::register();
}

pub fn request_shmem() {
    queue::request();
}

pub fn attach_shmem() {
    queue::attach();
}
