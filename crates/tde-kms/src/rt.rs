//! The one tokio runtime of the process, and the deadline on every remote call.
//!
//! Why a current-thread runtime, created on first use: the key worker is a
//! PostgreSQL process, single-threaded, with signal handlers of its own.  A
//! current-thread runtime runs our futures on the calling thread, inside
//! `block_on`, and starts no worker threads; the only threads it starts are
//! its blocking pool's (name resolution, file reads), which block every
//! signal from their first instruction (`on_thread_start`) and were spawned
//! by a caller that blocks them too (see `ffi::SignalMask`).  Nothing is
//! created when the library is loaded, so a worker that never talks to a
//! remote provider pays nothing.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;
use tde_core::provider::{Failure, ProviderError};

static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();

fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name("tde-kms-blocking")
                .on_thread_start(crate::ffi::block_all_signals_in_this_thread)
                .build()
                .map_err(|e| format!("could not start the I/O runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Runs `fut` to completion on the runtime, giving up after `limit`.
/// `kind` names the provider in the errors.
pub(crate) fn block_on<F: Future>(kind: &str, limit: Duration, fut: F) -> Result<F::Output, ProviderError> {
    let rt = runtime().map_err(|detail| remote(kind, Failure::Other, detail))?;
    rt.block_on(async { tokio::time::timeout(limit, fut).await }).map_err(|_| timed_out(kind, limit))
}

pub(crate) fn remote(kind: &str, failure: Failure, detail: impl Into<String>) -> ProviderError {
    ProviderError::Remote { kind: kind.to_string(), failure, detail: detail.into() }
}

pub(crate) fn timed_out(kind: &str, limit: Duration) -> ProviderError {
    remote(kind, Failure::TimedOut, format!("no answer within {} ms", limit.as_millis()))
}

/// The deadline given to a client's own connect and operation timeouts: a
/// little under `limit`, so the client's error (which says what it was
/// waiting for) is seen before our backstop fires.
pub(crate) fn inner_limit(limit: Duration) -> Duration {
    limit.mul_f64(0.9).max(Duration::from_millis(1))
}

/// An error and its sources, each once, joined by ": " (the SDKs' own
/// Display says only "dispatch failure"; the cause is further down).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// Connect failures and timeouts of reqwest-based clients, found among the
/// error's sources; `Other` if there are none.
pub(crate) fn transport_failure(e: &(dyn std::error::Error + 'static)) -> Failure {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<reqwest::Error>() {
            if r.is_timeout() {
                return Failure::TimedOut;
            }
            if r.is_connect() {
                return Failure::Unreachable;
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::TimedOut => return Failure::TimedOut,
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset => {
                    return Failure::Unreachable
                }
                _ => {}
            }
        }
        cur = err.source();
    }
    Failure::Other
}
