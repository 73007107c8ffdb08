//! The background worker of `tde_rotate_key(rel, background => true)`: a
//! dynamic background worker, connected to the caller's database as the
//! caller's role, that runs the same pass as the synchronous call.
//!
//! It does not talk to any key provider: the table keys are unwrapped with
//! the KEK in shared memory, as for any backend.  It is not restarted after
//! a crash; calling tde_rotate_key again finishes an interrupted pass.

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::pg_sys;

use super::{Pass, Throttle};
use crate::error::TdeError;

/// Starts a worker for a pass over `relid`; an ERROR if none can start
/// (max_worker_processes).
pub fn launch(relid: pg_sys::Oid, pass: Pass, throttle: Throttle) {
    // SAFETY: plain reads of process globals.
    let (db, user) = unsafe { (pg_sys::MyDatabaseId, pg_sys::GetUserId()) };
    let extra = format!(
        "{} {} {} {} {} {}",
        u32::from(db),
        u32::from(relid),
        u32::from(user),
        throttle.delay_ms,
        throttle.limit,
        pass.code()
    );
    let started = BackgroundWorkerBuilder::new("tde re-encryption")
        .set_type("tde re-encryption")
        .set_library("tde")
        .set_function("tde_reencrypt_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .set_extra(&extra)
        .load_dynamic();
    if started.is_err() {
        TdeError::Internal(
            "could not start a background worker for the re-encryption (max_worker_processes?); the pass is set up, call the function again without background to do it".into(),
        )
        .raise();
    }
}

/// The worker's entry point (bgw_function_name).
#[pgrx::pg_guard]
#[no_mangle]
pub extern "C-unwind" fn tde_reencrypt_worker_main(_arg: pg_sys::Datum) {
    let nums: Vec<u32> = BackgroundWorker::get_extra().split(' ').filter_map(|n| n.parse().ok()).collect();
    let [db, rel, user, delay_ms, limit, pass] = nums[..] else {
        TdeError::Internal("malformed re-encryption worker arguments".into()).raise()
    };
    // SAFETY: the default signal handlers (SIGTERM ends the worker at the
    // next interrupt check), unblocked as every background worker must.
    unsafe { pg_sys::BackgroundWorkerUnblockSignals() };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db.into()), Some(user.into()));
    let throttle = Throttle { delay_ms, limit: limit.max(1) };
    BackgroundWorker::transaction(move || {
        let version = super::run_in_worker(rel.into(), pass, throttle);
        pgrx::log!("tde: background pass {pass} over relation {rel} finished (key version {version})");
    });
}
