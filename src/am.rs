//! The `tde_heap` table access method: PostgreSQL's heap, encrypted.
//!
//! Why it is built this way: a table AM is how a user says "this table is
//! encrypted" (`CREATE TABLE ... USING tde_heap`, `ALTER TABLE ... SET ACCESS
//! METHOD tde_heap`, `default_table_access_method`), and its callbacks are
//! where a table's new files are created.  Everything else is heap's own
//! code: we copy heap's routine table and replace three callbacks.
//!
//! - `relation_set_new_filelocator` (CREATE, TRUNCATE, rewrites): give the
//!   new file a key, then let heap create it.
//! - `relation_copy_data` (SET TABLESPACE): the same for the copy.
//! - `relation_toast_am`: TOAST tables of tde_heap tables are tde_heap too.
//!
//! Indexes, sequences and copies made outside these callbacks are handled
//! in hooks.rs.

use std::ffi::c_char;
use std::sync::OnceLock;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::OrRaise;
use crate::keys;

struct Routines {
    heap: pg_sys::TableAmRoutine,
    ours: pg_sys::TableAmRoutine,
}
// SAFETY: immutable after initialisation; PostgreSQL processes are single-threaded.
unsafe impl Sync for Routines {}
// SAFETY: as above: never mutated after initialisation.
unsafe impl Send for Routines {}

static ROUTINES: OnceLock<Routines> = OnceLock::new();

fn routines() -> &'static Routines {
    ROUTINES.get_or_init(|| {
        // SAFETY: GetHeapamTableAmRoutine returns a pointer to heap's static table.
        let heap = unsafe { *pg_sys::GetHeapamTableAmRoutine() };
        let mut ours = heap;
        ours.relation_set_new_filelocator = Some(set_new_filelocator);
        ours.relation_copy_data = Some(copy_data);
        ours.relation_toast_am = Some(toast_am);
        Routines { heap, ours }
    })
}

#[pg_guard]
unsafe extern "C-unwind" fn set_new_filelocator(
    rel: pg_sys::Relation,
    newrlocator: *const pg_sys::RelFileLocator,
    persistence: c_char,
    freeze_xid: *mut pg_sys::TransactionId,
    minmulti: *mut pg_sys::MultiXactId,
) {
    // SAFETY: newrlocator is valid for the call (table AM contract).
    keys::create_key(unsafe { &*newrlocator }, persistence as u8).or_raise();
    let heap = routines().heap.relation_set_new_filelocator.expect("heap callback");
    // SAFETY: heap's own callback with the arguments we were given.
    unsafe { heap(rel, newrlocator, persistence, freeze_xid, minmulti) }
}

#[pg_guard]
unsafe extern "C-unwind" fn copy_data(rel: pg_sys::Relation, newrlocator: *const pg_sys::RelFileLocator) {
    // SAFETY: rel and newrlocator are valid for the call.
    let persistence = unsafe { (*(*rel).rd_rel).relpersistence };
    // SAFETY: newrlocator is valid for the call (table AM contract).
    keys::create_key(unsafe { &*newrlocator }, persistence as u8).or_raise();
    let heap = routines().heap.relation_copy_data.expect("heap callback");
    // SAFETY: heap's own callback with the arguments we were given.
    unsafe { heap(rel, newrlocator) }
}

#[pg_guard]
unsafe extern "C-unwind" fn toast_am(rel: pg_sys::Relation) -> pg_sys::Oid {
    // SAFETY: rel is valid; its AM is tde_heap since we were called.
    unsafe { (*(*rel).rd_rel).relam }
}

/// The handler function behind `CREATE ACCESS METHOD tde_heap`.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn tde_heap_handler(_fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    pg_sys::Datum::from(&routines().ours as *const pg_sys::TableAmRoutine)
}

#[no_mangle]
pub extern "C" fn pg_finfo_tde_heap_handler() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// The OID of tde_heap in the current database, if the extension is there.
pub fn tde_heap_oid() -> Option<pg_sys::Oid> {
    // SAFETY: catalog lookup inside a transaction; missing_ok = true.
    let oid = unsafe { pg_sys::get_table_am_oid(c"tde_heap".as_ptr(), true) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// The access method of relation `relid`, if it exists.
pub fn access_method_of(relid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    // SAFETY: RelationIdGetRelation returns NULL or a pinned relcache entry
    // that we release below.
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(relid);
        if rel.is_null() {
            return None;
        }
        let am = (*(*rel).rd_rel).relam;
        pg_sys::RelationClose(rel);
        Some(am)
    }
}

/// Whether relation `relid` uses tde_heap.  Reads the relcache, which also
/// knows relations created earlier in the same command.
pub fn uses_tde_heap(relid: pg_sys::Oid) -> bool {
    let Some(am) = tde_heap_oid() else { return false };
    // SAFETY: RelationIdGetRelation returns NULL or a pinned relcache entry
    // that we release below.
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(relid);
        if rel.is_null() {
            return false;
        }
        let yes = (*(*rel).rd_rel).relam == am;
        pg_sys::RelationClose(rel);
        yes
    }
}
