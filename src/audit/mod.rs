//! The audit trail, as the server writes it: who did what to which key.
//!
//! Why this file exists: every key operation must leave a record that
//! nobody can quietly edit (docs/audit.md).  The records themselves, their
//! chain and their verification are tde-core's `audit`, tested without a
//! server; the key store (keys/store.rs) seals each record into the chain
//! under its lock, WAL-logs it with the change it describes -- in the same
//! WAL record, so the two cannot part -- and appends it to
//! `$PGDATA/tde/audit.log` once that WAL is flushed.  Standbys replay the
//! same records.  Each record also goes to the server log as a line that
//! starts with `tde audit: `.
//!
//! This file builds records from the backend's context (time, role,
//! database), records the operations that change no key (a pause, a denial,
//! a refusal, a failure), and finds permission denials before PostgreSQL's
//! own privilege check raises them (`post_parse_analyze_hook`).
//!
//! Where no record can enter the trail -- a standby or recovery, which
//! cannot write WAL; a cluster without a key store yet; a locked key store,
//! whose audit key is what could not be unwrapped -- the event still goes
//! to the server log, marked `seq=none`.

mod denials;

use pgrx::pg_sys;
pub use tde_core::audit::{Entry, Op, Outcome};
use tde_core::keystore::FileId;

use crate::error::TdeError;
use crate::keys;

pub use denials::init;

fn now_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

fn cstr(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: a NUL-terminated string from PostgreSQL.
        unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// The current role and database, by name.  Catalog lookups: only in a
/// backend (or a background worker) inside a transaction.
fn who() -> (String, String) {
    // SAFETY: plain reads of process globals, and syscache lookups that
    // return NULL (noerr) or palloc'd names.
    unsafe {
        let role = if pg_sys::IsTransactionState() {
            cstr(pg_sys::GetUserNameFromId(pg_sys::GetUserId(), true))
        } else {
            String::new()
        };
        let db = if pg_sys::IsTransactionState() && pg_sys::MyDatabaseId != pg_sys::InvalidOid {
            cstr(pg_sys::get_database_name(pg_sys::MyDatabaseId))
        } else {
            String::new()
        };
        (role, db)
    }
}

/// A record of `op` on `object` by the current role, not yet sealed.
pub fn entry(op: Op, object: &str, result: Outcome) -> Entry {
    let (role, db) = who();
    Entry::new(now_micros(), &role, &db, op, object, result)
}

/// A record of `op` on version `version` of the key of `file`.
pub fn key_entry(op: Op, object: &str, file: FileId, key_id: u64, version: u32) -> Entry {
    let mut e = entry(op, object, Outcome::Ok);
    e.file = file.to_string();
    e.key_id = Some(key_id);
    e.key_version = Some(version);
    e
}

/// Enters records that come with no key change (a pause, a denial, a
/// refusal, a failure) into the trail.  Where the trail cannot take them
/// (or refuses them: a locked store), they go to the server log only.
pub fn record(entries: Vec<Entry>) {
    // SAFETY: plain call.
    let recovery = unsafe { pg_sys::RecoveryInProgress() };
    if !recovery && keys::store_exists() {
        match keys::record_audit(entries.clone()) {
            Ok(()) => return,
            Err(why) => pgrx::log!("tde: could not enter {} record(s) into the audit trail: {why}", entries.len()),
        }
    }
    entries.iter().for_each(log_only);
}

/// Records that `op` on `object` failed with `err`, and returns `err`.  A
/// key that did not unwrap (a locked store, a master key that does not
/// open the KEK) is recorded as `unwrap_failed`.
pub fn failed(op: Op, object: &str, err: TdeError) -> TdeError {
    let unwrap = matches!(err, TdeError::Locked(_));
    let mut e = entry(if unwrap { Op::UnwrapFailed } else { op }, object, Outcome::Failed);
    e.detail = if unwrap { format!("{}: {err}", op.as_str()) } else { err.to_string() };
    record(vec![e]);
    err
}

/// An event that cannot enter the trail (the server is starting, the key
/// store is locked): the server log only.
pub fn log_only(e: &Entry) {
    pgrx::log!("tde audit: seq=none {}", e.to_log().split_once(' ').map(|(_, r)| r).unwrap_or(""));
}

/// Records a refusal under tde.enforce_encryption.
pub fn refused(object: &str, why: &str) {
    let mut e = entry(Op::EnforcementRefused, object, Outcome::Refused);
    e.detail = why.to_string();
    record(vec![e]);
}

/// A relation's name as `schema.name` (or its OID if it is gone).
pub fn relation_name(relid: pg_sys::Oid) -> String {
    // SAFETY: syscache lookups returning NULL or palloc'd names.
    let (ns, name) = unsafe {
        let name = pg_sys::get_rel_name(relid);
        let ns = if name.is_null() {
            std::ptr::null_mut()
        } else {
            pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid))
        };
        (cstr(ns), cstr(name))
    };
    if name.is_empty() {
        format!("OID {}", u32::from(relid))
    } else {
        format!("{ns}.{name}")
    }
}
