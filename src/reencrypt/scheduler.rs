//! The re-encryption scheduler: re-encryption work nobody has to ask for
//! twice.
//!
//! Why it exists: a pass interrupted by a crash, a restart or a standby's
//! promotion must finish without someone noticing and calling the function
//! again; keys past their cryptoperiod (`tde.key_max_age`) must be reported,
//! and with `tde.auto_rotate = on` rotated -- MariaDB's
//! `innodb_encryption_rotate_key_age`, throttled and audited.
//!
//! Two kinds of background worker, in the style of autovacuum:
//!
//! - the **launcher** (`tde scheduler`, one per cluster, started once
//!   recovery has finished -- on a standby, at promotion) wakes every
//!   `tde.scheduler_naptime`, reads the shared key table (no database
//!   connection), logs one WARNING a day per overdue key, and starts a
//!   worker for each database with work, one at a time per database;
//! - a **database worker** (`tde scheduler worker`) maps that database's
//!   files to their tables and runs the pass each needs, one table at a
//!   time, each in its own transaction, throttled by
//!   tde.reencrypt_cost_delay/limit.  A table another pass is working on is
//!   skipped (its progress slot, then a conditional lock), and the need is
//!   checked again under the lock.
//!
//! What each key needs is decided in tde-core's `schedule`.  Neither worker
//! talks to a key provider.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::pg_sys;
use tde_core::keystore::FileId;
use tde_core::schedule::{self, Todo, Warnings};

use super::{progress, Pass, Throttle};
use crate::error::TdeError;
use crate::gucs;
use crate::keys;

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn max_age() -> i64 {
    gucs::KEY_MAX_AGE.get().max(0) as i64
}

/// Registers the launcher (from _PG_init, while preloading).
pub fn register() {
    BackgroundWorkerBuilder::new("tde scheduler")
        .set_type("tde scheduler")
        .set_library("tde")
        .set_function("tde_scheduler_main")
        .enable_shmem_access(None)
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(10)))
        .load();
}

/// The launcher's entry point.
#[pgrx::pg_guard]
#[no_mangle]
pub extern "C-unwind" fn tde_scheduler_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // The first round comes one naptime after start (as autovacuum's),
    // not at once: the latch is set when the process starts.
    // SAFETY: this process's own latch.
    unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
    let mut warnings = Warnings::default();
    let mut workers: HashMap<u32, DynamicBackgroundWorker> = HashMap::new();
    while BackgroundWorker::wait_latch(Some(Duration::from_secs(gucs::SCHEDULER_NAPTIME.get().max(1) as u64))) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloads postgresql.conf, as every process does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        round(&mut warnings, &mut workers);
    }
}

/// One round of the launcher.
fn round(warnings: &mut Warnings, workers: &mut HashMap<u32, DynamicBackgroundWorker>) {
    let (now, max_age, auto) = (now(), max_age(), gucs::AUTO_ROTATE.get());
    let states = keys::key_states(None);
    let overdue: Vec<(FileId, u32)> =
        states.iter().filter(|k| schedule::overdue(k, now, max_age)).map(|k| (k.file, k.version)).collect();
    warnings.retain(&overdue);
    for (file, version) in &overdue {
        if warnings.due(*file, *version, now) {
            pgrx::warning!(
                "tde: the key of relation file {file} (version {version}) is older than tde.key_max_age{}",
                if auto {
                    "; tde.auto_rotate will rotate it"
                } else {
                    "; rotate it with tde_rotate_key (see the view tde_keys)"
                }
            );
        }
    }
    workers.retain(|_, w| w.pid().is_ok());
    let mut dbs: Vec<u32> = states
        .iter()
        .filter(|k| k.file.db != 0 && schedule::todo(k, now, max_age, auto).is_some())
        .map(|k| k.file.db)
        .collect();
    dbs.sort_unstable();
    dbs.dedup();
    for db in dbs {
        if workers.contains_key(&db) {
            continue;
        }
        match BackgroundWorkerBuilder::new("tde scheduler worker")
            .set_type("tde scheduler worker")
            .set_library("tde")
            .set_function("tde_scheduler_worker_main")
            .enable_spi_access()
            .set_start_time(BgWorkerStartTime::RecoveryFinished)
            .set_restart_time(None)
            .set_extra(&db.to_string())
            .load_dynamic()
        {
            Ok(w) => {
                workers.insert(db, w);
            }
            Err(_) => pgrx::log!(
                "tde: could not start a scheduler worker for database {db} (max_worker_processes?); next round"
            ),
        }
    }
}

/// A database worker's entry point: the database OID is the extra.
#[pgrx::pg_guard]
#[no_mangle]
pub extern "C-unwind" fn tde_scheduler_worker_main(_arg: pg_sys::Datum) {
    let Ok(db) = BackgroundWorker::get_extra().parse::<u32>() else {
        TdeError::Internal("malformed scheduler worker argument".into()).raise()
    };
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db.into()), Some(pg_sys::BOOTSTRAP_SUPERUSERID.into()));
    let tables = BackgroundWorker::transaction(move || tables_with_work(db));
    for (table, todo) in tables {
        if BackgroundWorker::sigterm_received() {
            break;
        }
        BackgroundWorker::transaction(move || run_one(db, table, todo));
    }
}

/// This database's tables with work, each with what its files need.
fn tables_with_work(db: u32) -> Vec<(u32, Todo)> {
    let (now, max_age, auto) = (now(), max_age(), gucs::AUTO_ROTATE.get());
    let mut tables: BTreeMap<u32, Todo> = BTreeMap::new();
    for k in keys::key_states(Some(db)) {
        let Some(t) = schedule::todo(&k, now, max_age, auto) else { continue };
        let Some(table) = table_of(k.file) else { continue };
        let merged = schedule::merge(tables.get(&table).copied(), Some(t));
        tables.insert(table, merged.unwrap_or(t));
    }
    tables.into_iter().collect()
}

/// The table a relation file belongs to: itself, the table of an index or
/// TOAST relation, the owner of a sequence.  None if it is not (or no
/// longer) a relation of this database.
fn table_of(file: FileId) -> Option<u32> {
    let sql = format!(
        "SELECT CASE c.relkind
                  WHEN 'i' THEN (SELECT CASE WHEN tc.relkind = 't'
                                        THEN (SELECT o.oid FROM pg_catalog.pg_class o WHERE o.reltoastrelid = tc.oid)
                                        ELSE tc.oid END
                                   FROM pg_catalog.pg_index x JOIN pg_catalog.pg_class tc ON tc.oid = x.indrelid
                                  WHERE x.indexrelid = c.oid)
                  WHEN 't' THEN (SELECT o.oid FROM pg_catalog.pg_class o WHERE o.reltoastrelid = c.oid)
                  WHEN 'S' THEN (SELECT d.refobjid FROM pg_catalog.pg_depend d
                                  WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
                                    AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.deptype IN ('a', 'i') LIMIT 1)
                  ELSE c.oid END::oid
           FROM pg_catalog.pg_class c
          WHERE c.oid = pg_catalog.pg_filenode_relation(
                  CASE WHEN {spc} = (SELECT dattablespace FROM pg_catalog.pg_database WHERE oid = {db}) THEN 0 ELSE {spc} END,
                  {rel})",
        spc = file.spc,
        db = file.db,
        rel = file.rel
    );
    pgrx::spi::Spi::get_one::<pg_sys::Oid>(&sql).ok().flatten().map(u32::from)
}

/// Runs the pass `todo` asks for over `table`, unless another pass is on
/// it or, under the lock, the need is gone.
fn run_one(db: u32, table: u32, todo: Todo) {
    let relid = pg_sys::Oid::from(table);
    if progress::list().iter().any(|r| u32::from(r.db) == db && r.table == relid) {
        return;
    }
    // SAFETY: takes the lock the pass takes, without waiting; held to the
    // end of this transaction.
    let locked =
        unsafe { pg_sys::ConditionalLockRelationOid(relid, pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE) };
    if !locked {
        return;
    }
    let again = tables_with_work(db).into_iter().find(|(t, _)| *t == table).map(|(_, t)| t);
    if again != Some(todo) {
        return;
    }
    let pass = match todo {
        Todo::FinishRotation | Todo::RotateOverdue => Pass::Rotate,
        Todo::FinishEncryption => Pass::Encrypt,
        Todo::FinishDecryption => Pass::Decrypt,
    };
    pgrx::log!("tde: scheduler: {} of {}", todo.reason(), crate::audit::relation_name(relid));
    super::run_scheduled(relid, pass, Throttle::from_gucs(), todo.reason());
}
