//! Statistics of encrypted tables: why pg_statistic is encrypted too.
//!
//! ANALYZE copies column values of the rows it samples -- most common
//! values, histogram bounds, extended statistics' MCV lists -- into
//! `pg_statistic` and `pg_statistic_ext_data`, ordinary catalog tables of
//! the database.  Left plain, they would put an encrypted table's most
//! frequent values on disk in plaintext (open_pg_tde and Percona's pg_tde
//! leak them this way).
//!
//! The rule (docs/threat-model.md): in a database with encrypted tables,
//! both catalogs -- with their TOAST tables and indexes -- are encrypted.
//! They get their keys the first time any relation of the database gets
//! one: at the end of the utility statement that created it (CREATE TABLE,
//! CREATE TEMP TABLE, ALTER TABLE ... SET ACCESS METHOD, ...) and before
//! tde_encrypt_table's pass, so before any ANALYZE of the new table can
//! write a value.  The existing pages are rewritten encrypted online by the
//! same pass as tde_encrypt_table (ANALYZE elsewhere goes on).  The
//! catalogs keep the heap access method (PostgreSQL requires it of system
//! catalogs), so a VACUUM FULL or CLUSTER of them gets its new files
//! encrypted here instead: the transient copy, its TOAST table and that
//! TOAST table's index get keys when they are created, before any page of
//! them is written (`is_encrypted_copy`, from hooks.rs); the catalogs' own
//! indexes are rebuilt from their encrypted files, which the core patch
//! tells the storage manager.  `pg_stats`, `pg_stats_ext` and the planner
//! read them through the storage manager as before.
//!
//! A database without encrypted tables is left alone: its statistics
//! describe plain tables only.
//!
//! While the key store is locked (the master key's provider did not answer
//! at start-up) encrypted statistics cannot be read.  The planner then
//! plans with its default estimates, as for a table never analyzed,
//! instead of failing (`get_relation_stats_hook`, `get_index_stats_hook`,
//! `get_attavgwidth_hook`), so plain tables of the database stay usable;
//! `pg_stats` and ANALYZE fail with the key store's error until it
//! unlocks.

use std::cell::Cell;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::keys;
use crate::reencrypt::{self, Pass, Throttle};

/// `pg_statistic_ext_data`'s OID (catalog/pg_statistic_ext_data.h), which
/// pgrx does not export.
const STATISTIC_EXT_DATA_RELATION_ID: pg_sys::Oid = pg_sys::Oid::from_u32(3429);

/// The catalogs that hold values of the tables they describe.
const CATALOGS: [pg_sys::Oid; 2] = [pg_sys::StatisticRelationId, STATISTIC_EXT_DATA_RELATION_ID];

thread_local! {
    /// A relation file of this database got a key since the last check.
    static KEY_CREATED: Cell<bool> = const { Cell::new(false) };
    /// ensure_encrypted is running (its own pass creates keys).
    static RUNNING: Cell<bool> = const { Cell::new(false) };
}

/// Called by keys::create_key for a new key of a file of database `db`.
pub fn note_key_created(db: u32) {
    // SAFETY: plain read of a process global.
    if db == u32::from(unsafe { pg_sys::MyDatabaseId }) {
        KEY_CREATED.with(|c| c.set(true));
    }
}

/// At the end of a utility statement: makes sure the statistics catalogs
/// are encrypted if the statement gave a relation a key.
pub fn after_statement() {
    // A statement that failed after creating a key leaves the flag set; the
    // next statement may then be a COMMIT or ROLLBACK, with no transaction
    // to work in (and the failed statement's relation rolled back anyway).
    // SAFETY: a plain read of the transaction state.
    if KEY_CREATED.with(|c| c.replace(false)) && unsafe { pg_sys::IsTransactionState() } {
        ensure_encrypted();
    }
}

/// Encrypts pg_statistic and pg_statistic_ext_data of the current database
/// unless they already have keys.  A pass someone else started (or a crash
/// interrupted, which the scheduler finishes) is left to run: while a file
/// is being encrypted every page written to it is encrypted already.
pub fn ensure_encrypted() {
    if RUNNING.with(|r| r.replace(true)) {
        return;
    }
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            RUNNING.with(|r| r.set(false));
        }
    }
    let _reset = Reset;
    // Without the extension in this database no table of it uses tde_heap.
    if crate::am::tde_heap_oid().is_none() {
        return;
    }
    for catalog in CATALOGS {
        if keys::phase_of(&keys::file_id(&locator_of(catalog))).is_none() {
            reencrypt::encrypt(catalog, Pass::Encrypt, Throttle::none());
        }
    }
}

/// Whether the relation just created by the current command is part of a
/// copy of an encrypted statistics catalog that VACUUM FULL or CLUSTER is
/// making: the transient table `pg_temp_<catalog OID>` (the catalog locked
/// by this transaction), its TOAST table `pg_toast_<transient OID>`, or the
/// index of that TOAST table (`index_table`: the table of a new index).  A
/// name alone proves nothing; the lock and the catalog's key do.
pub fn is_encrypted_copy(relkind: u8, name: &str, index_table: Option<pg_sys::Oid>) -> bool {
    match relkind {
        pg_sys::RELKIND_RELATION => is_transient_copy(name),
        pg_sys::RELKIND_TOASTVALUE => toast_owner(name).is_some_and(|owner| is_transient_copy(&rel_name(owner))),
        pg_sys::RELKIND_INDEX => {
            index_table.is_some_and(|table| is_encrypted_copy(pg_sys::RELKIND_TOASTVALUE, &rel_name(table), None))
        }
        _ => false,
    }
}

fn is_transient_copy(name: &str) -> bool {
    let Some(old) = name.strip_prefix("pg_temp_").and_then(|n| n.parse::<u32>().ok()) else {
        return false;
    };
    let old = pg_sys::Oid::from(old);
    // SAFETY: a lookup in this backend's local lock table.
    let locked = unsafe { pg_sys::CheckRelationOidLockedByMe(old, pg_sys::ExclusiveLock as _, true) };
    CATALOGS.contains(&old) && locked && keys::is_encrypted(&locator_of(old), false)
}

/// The owner's OID in a TOAST table's name, `pg_toast_<OID>`.
fn toast_owner(name: &str) -> Option<pg_sys::Oid> {
    name.strip_prefix("pg_toast_").and_then(|n| n.parse::<u32>().ok()).map(pg_sys::Oid::from)
}

fn rel_name(relid: pg_sys::Oid) -> String {
    // SAFETY: returns a palloc'd name or NULL.
    let p = unsafe { pg_sys::get_rel_name(relid) };
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: a NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// The relation file of `relid`.
fn locator_of(relid: pg_sys::Oid) -> pg_sys::RelFileLocator {
    // SAFETY: the catalogs always exist; relation_open raises an ERROR
    // otherwise.  rd_locator is copied out before the relation is closed.
    unsafe {
        let rel = pg_sys::relation_open(relid, pg_sys::AccessShareLock as _);
        let loc = (*rel).rd_locator;
        pg_sys::relation_close(rel, pg_sys::AccessShareLock as _);
        loc
    }
}

static mut PREV_RELATION_STATS: pg_sys::get_relation_stats_hook_type = None;
static mut PREV_INDEX_STATS: pg_sys::get_index_stats_hook_type = None;
static mut PREV_ATTAVGWIDTH: pg_sys::get_attavgwidth_hook_type = None;

/// Installs the planner's statistics hooks (from _PG_init).
pub fn init() {
    // SAFETY: _PG_init runs once per process, before any planning; each
    // previous hook is kept and called first.
    unsafe {
        PREV_RELATION_STATS = pg_sys::get_relation_stats_hook;
        pg_sys::get_relation_stats_hook = Some(relation_stats);
        PREV_INDEX_STATS = pg_sys::get_index_stats_hook;
        pg_sys::get_index_stats_hook = Some(index_stats);
        PREV_ATTAVGWIDTH = pg_sys::get_attavgwidth_hook;
        pg_sys::get_attavgwidth_hook = Some(attavgwidth);
    }
}

/// The statistics of this database are encrypted and cannot be read now.
/// Cheap when the store is unlocked: one volatile read.
fn unreadable() -> bool {
    if !keys::store_locked_hint() {
        return false;
    }
    // SAFETY: a relcache lookup of a catalog that always exists; the
    // reference is released before returning.
    let loc = unsafe {
        let rel = pg_sys::RelationIdGetRelation(pg_sys::StatisticRelationId);
        if rel.is_null() {
            return false;
        }
        let loc = (*rel).rd_locator;
        pg_sys::RelationClose(rel);
        loc
    };
    keys::is_encrypted(&loc, false)
}

/// "No statistics" for the planner: it then uses its defaults.
unsafe fn no_stats(vardata: *mut pg_sys::VariableStatData) -> bool {
    // SAFETY: vardata is the planner's, valid for the call (caller).
    unsafe {
        (*vardata).statsTuple = std::ptr::null_mut();
        (*vardata).freefunc = None;
    }
    true
}

#[pg_guard]
unsafe extern "C-unwind" fn relation_stats(
    root: *mut pg_sys::PlannerInfo,
    rte: *mut pg_sys::RangeTblEntry,
    attnum: pg_sys::AttrNumber,
    vardata: *mut pg_sys::VariableStatData,
) -> bool {
    // SAFETY: chaining to the previous hook with the planner's arguments.
    if let Some(prev) = unsafe { PREV_RELATION_STATS } {
        // SAFETY: as above.
        if unsafe { prev(root, rte, attnum, vardata) } {
            return true;
        }
    }
    // SAFETY: vardata is valid for the call.
    unreadable() && unsafe { no_stats(vardata) }
}

#[pg_guard]
unsafe extern "C-unwind" fn index_stats(
    root: *mut pg_sys::PlannerInfo,
    index: pg_sys::Oid,
    attnum: pg_sys::AttrNumber,
    vardata: *mut pg_sys::VariableStatData,
) -> bool {
    // SAFETY: chaining to the previous hook with the planner's arguments.
    if let Some(prev) = unsafe { PREV_INDEX_STATS } {
        // SAFETY: as above.
        if unsafe { prev(root, index, attnum, vardata) } {
            return true;
        }
    }
    // SAFETY: vardata is valid for the call.
    unreadable() && unsafe { no_stats(vardata) }
}

/// The width the planner would assume without statistics: the type's
/// typical width (get_attavgwidth's callers fall back to the same).
#[pg_guard]
unsafe extern "C-unwind" fn attavgwidth(relid: pg_sys::Oid, attnum: pg_sys::AttrNumber) -> i32 {
    // SAFETY: chaining to the previous hook with the caller's arguments.
    if let Some(prev) = unsafe { PREV_ATTAVGWIDTH } {
        // SAFETY: as above.
        let w = unsafe { prev(relid, attnum) };
        if w > 0 {
            return w;
        }
    }
    if !unreadable() {
        return 0;
    }
    let (mut typid, mut typmod, mut coll) = (pg_sys::InvalidOid, -1, pg_sys::InvalidOid);
    // SAFETY: syscache lookups of pg_attribute and pg_type (not encrypted
    // here: only the statistics catalogs are); an ERROR for a missing
    // attribute propagates as in get_attavgwidth's callers.
    unsafe {
        pg_sys::get_atttypetypmodcoll(relid, attnum, &mut typid, &mut typmod, &mut coll);
        pg_sys::get_typavgwidth(typid, typmod).max(1)
    }
}
