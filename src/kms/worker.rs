//! The key worker process (`tde key worker`).
//!
//! Registered at shared_preload_libraries time to start with the postmaster
//! (BgWorkerStart_PostmasterStart), so it also runs during crash recovery
//! and on standbys, where the startup process needs keys before any
//! database is open.  It needs no database connection.  If it exits, the
//! postmaster starts it again after a second; requests it had taken fail
//! cleanly (queue.rs), requests still waiting are served by the new one.
//!
//! Its loop: serve every posted request, one at a time (each bounded by
//! tde.provider_timeout in the provider client); while the key store is
//! locked, try to unlock it when someone asks, and every few seconds on its
//! own; then sleep on its latch.

use std::cell::Cell;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys;

use super::queue::{self, UnlockResult};
use crate::keys::{self, StoreState};

/// While locked, how often the worker tries to unlock on its own.
const RETRY: Duration = Duration::from_secs(5);

thread_local! {
    static IS_KEY_WORKER: Cell<bool> = const { Cell::new(false) };
}

/// Whether this process is the key worker.
pub fn is_key_worker() -> bool {
    IS_KEY_WORKER.with(Cell::get)
}

pub fn register() {
    BackgroundWorkerBuilder::new("tde key worker")
        .set_type("tde key worker")
        .set_library("tde")
        .set_function("tde_key_worker_main")
        .enable_shmem_access(None)
        .set_start_time(BgWorkerStartTime::PostmasterStart)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: i32, _arg: pg_sys::Datum) {
    queue::worker_exiting();
}

/// The key worker's entry point.
#[pgrx::pg_guard]
#[no_mangle]
pub extern "C-unwind" fn tde_key_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    IS_KEY_WORKER.with(|c| c.set(true));
    // SAFETY: plain read of a process global; registering an exit callback
    // as any process may.
    let pid = unsafe {
        pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0));
        pg_sys::MyProcPid
    };
    queue::worker_started(pid);
    pgrx::log!("tde: key worker started");
    let mut next_try = Instant::now();
    let mut last_reason = String::new();
    loop {
        while let Some(t) = queue::take(pid) {
            let reply = super::serve(&t.request, &t.input, t.timeout);
            queue::answer(t, reply);
        }
        queue::reap(Duration::from_secs(10));
        if keys::state().0 == StoreState::Locked && (queue::unlock_asked() || Instant::now() >= next_try) {
            let t0 = Instant::now();
            if let Some(r) = keys::try_unlock(&mut last_reason) {
                if r == UnlockResult::Unlocked {
                    pgrx::log!(
                        "tde: key store unlocked in {} ms ({} relation keys)",
                        t0.elapsed().as_millis(),
                        keys::key_count()
                    );
                }
                queue::unlock_done(r);
                if r == UnlockResult::Refused {
                    // An unauthentic key store must not be served: without
                    // it, no one can tell which files are encrypted.  The
                    // startup process stops on it when it sees it; later (a
                    // provider that answered only after start-up), the
                    // server is shut down, as a start would have failed.
                    pgrx::log!("tde: the key store is not authentic under its master key; shutting the server down");
                    // SAFETY: signals the postmaster (fast shutdown), as pg_ctl would.
                    unsafe { libc::kill(pg_sys::PostmasterPid, libc::SIGINT) };
                }
                next_try = Instant::now() + RETRY;
                if r == UnlockResult::Unlocked {
                    last_reason.clear();
                }
            } else {
                // Another process holds the store lock (it may be waiting
                // for us): serve the queue and come back.
                queue::want_unlock();
            }
        }
        let nap =
            if keys::state().0 == StoreState::Locked { Duration::from_millis(200) } else { Duration::from_secs(5) };
        if !BackgroundWorker::wait_latch(Some(nap)) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloads postgresql.conf, as every process does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
    pgrx::log!("tde: key worker exiting");
    // Exit code 1: the postmaster starts the worker again (code 0 would
    // mean "done for good"); at shutdown it does not.
    // SAFETY: ends the process the way PostgreSQL's own workers do.
    unsafe { pg_sys::proc_exit(1) };
}
