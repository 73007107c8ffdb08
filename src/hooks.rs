//! Adapters that gather, from the catalog and the core patch's hook
//! arguments, the inputs of the encryption policy for new relation files
//! outside the table AM.  The rule itself (a table is encrypted iff it uses
//! tde_heap; an index iff its table is; an owned sequence iff its owner is;
//! a copy of an encrypted file is encrypted) is tde-core's `policy`, tested
//! without a server.  Nothing is decided from guesses about what the
//! backend is doing.
//!
//! - `RelationCreateStorage_hook` (core patch): before any index or sequence
//!   file is created by REINDEX, TRUNCATE, VACUUM FULL, CLUSTER, SET
//!   TABLESPACE, ALTER TABLE rewrites, or CREATE DATABASE (WAL_LOG).
//! - `object_access_hook`, post-create: a brand-new index's file exists but
//!   is empty, and its pg_index row has just been written; nothing writes a
//!   page until index_build, which runs after this hook.  Also enforces
//!   `tde.enforce_encryption`.
//! - `ProcessUtility_hook`: a serial or identity sequence that a CREATE TABLE
//!   or ALTER TABLE of a tde_heap table creates is encrypted from its first
//!   page; after OWNED BY or SET ACCESS METHOD, an owned sequence is
//!   rewritten into a new file if its encryption must still change;
//!   CREATE DATABASE (FILE_COPY) and DROP DATABASE copy or drop keys for
//!   files PostgreSQL copies or removes without the storage manager.

use std::ffi::{c_char, c_int, c_void, CStr};

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgList;

use tde_core::policy::{self, Created, Decision, Kind, NewFile};

use crate::am::{tde_heap_oid, uses_tde_heap};
use crate::error::{OrRaise, TdeError};
use crate::gucs;
use crate::keys;

thread_local! {
    /// The statement running is a CREATE TABLE or ALTER TABLE whose table
    /// uses (or will use) tde_heap.  Set at the entry of every utility
    /// statement but the CREATE SEQUENCE subcommands it spawns (see
    /// `owned_sequence_to_be`), so it never outlives its statement's turn.
    static TABLE_STATEMENT_TDE_HEAP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// A CREATE SEQUENCE subcommand of such a statement is running: the
    /// sequence it creates (serial, identity) is about to be owned by a
    /// tde_heap table.
    static SEQUENCE_FOR_TDE_HEAP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

static mut PREV_CREATE_STORAGE: pg_sys::RelationCreateStorage_hook_type = None;
static mut PREV_OBJECT_ACCESS: pg_sys::object_access_hook_type = None;
static mut PREV_UTILITY: pg_sys::ProcessUtility_hook_type = None;

pub fn init() {
    // SAFETY: installing hooks from _PG_init, saving the previous ones to chain.
    unsafe {
        PREV_CREATE_STORAGE = pg_sys::RelationCreateStorage_hook;
        pg_sys::RelationCreateStorage_hook = Some(create_storage);
        PREV_OBJECT_ACCESS = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(object_access);
        PREV_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(utility);
    }
}

/// The table a sequence belongs to (serial: AUTO, identity: INTERNAL).
fn sequence_owner(seqid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    for deptype in [pg_sys::DependencyType::DEPENDENCY_AUTO, pg_sys::DependencyType::DEPENDENCY_INTERNAL] {
        let mut table = pg_sys::InvalidOid;
        let mut col: i32 = 0;
        // SAFETY: catalog lookup inside a transaction.
        if unsafe { pg_sys::sequenceIsOwned(seqid, deptype as c_char, &mut table, &mut col) } {
            return Some(table);
        }
    }
    None
}

/// The policy's view of relation `rel` (tde-core's `policy::Kind`).
unsafe fn kind_of(rel: pg_sys::Relation) -> Kind {
    // SAFETY: rel is a valid relcache entry (caller); rd_rel is its pg_class row.
    let form = unsafe { &*(*rel).rd_rel };
    match form.relkind as u8 {
        k if k == pg_sys::RELKIND_INDEX => {
            // SAFETY: rd_index is NULL or the index's pg_index row.
            let index = unsafe { (*rel).rd_index };
            // A brand-new index has no rd_index yet: the policy says "later".
            // SAFETY: index is non-NULL here and points at the pg_index row.
            Kind::Index { table_tde_heap: (!index.is_null()).then(|| uses_tde_heap(unsafe { (*index).indrelid })) }
        }
        k if k == pg_sys::RELKIND_SEQUENCE => {
            // SAFETY: rel is valid.
            let owner = sequence_owner(unsafe { (*rel).rd_id }).map(uses_tde_heap);
            // A serial or identity sequence is created before its table and
            // owned by it only after: it is encrypted from its first page,
            // so no page of it is ever on disk in plaintext.  (If the guess
            // is wrong -- it comes from the statement, not the catalog --
            // the OWNED BY that follows rewrites it, sync_sequence.)
            let to_be = SEQUENCE_FOR_TDE_HEAP.with(|c| c.get());
            Kind::Sequence { owner_tde_heap: owner.or(to_be.then_some(true)) }
        }
        _ => Kind::Other,
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn create_storage(
    rlocator: pg_sys::RelFileLocator,
    persistence: c_char,
    rel: pg_sys::Relation,
    source: *const pg_sys::RelFileLocator,
) {
    // SAFETY: chaining to the previous hook with our own arguments.
    if let Some(prev) = unsafe { PREV_CREATE_STORAGE } {
        // SAFETY: the hook that was installed before ours, with our own arguments.
        unsafe { prev(rlocator, persistence, rel, source) };
    }
    let temp = persistence as u8 == pg_sys::RELPERSISTENCE_TEMP;
    // SAFETY: rel is NULL or valid (core patch).
    let kind = if rel.is_null() { Kind::Other } else { unsafe { kind_of(rel) } };
    // SAFETY: source is non-NULL (checked) and valid for the call (core patch).
    let source_encrypted = (!source.is_null()).then(|| keys::is_encrypted(unsafe { &*source }, temp));
    if policy::decide(&NewFile { kind, source_encrypted }) == Decision::Encrypt {
        keys::create_key(&rlocator, persistence as u8).or_raise();
    }
}

/// The table of a just-created index, read from pg_index with SnapshotSelf:
/// the row was inserted by the current command, before the post-create hook.
fn new_index_table(indexid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    // SAFETY: a catalog scan inside a transaction, with the standard
    // open/scan/close sequence; the tuple is read before the scan ends.
    unsafe {
        let pg_index = pg_sys::table_open(pg_sys::IndexRelationId, pg_sys::AccessShareLock as _);
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut key,
            pg_sys::Anum_pg_index_indexrelid as _,
            pg_sys::BTEqualStrategyNumber as _,
            pg_sys::F_OIDEQ.into(),
            pg_sys::Datum::from(indexid),
        );
        let snapshot = std::ptr::addr_of_mut!(pg_sys::SnapshotSelfData);
        let scan = pg_sys::systable_beginscan(
            pg_index,
            pg_sys::Oid::from(pg_sys::IndexRelidIndexId),
            true,
            snapshot,
            1,
            &mut key,
        );
        let tuple = pg_sys::systable_getnext(scan);
        let table = if tuple.is_null() {
            None
        } else {
            let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_index>(tuple);
            Some((*form).indrelid)
        };
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(pg_index, pg_sys::AccessShareLock as _);
        table
    }
}

/// Whether a new table is make_new_heap's transient copy for rewriting an
/// existing table in place (VACUUM FULL, CLUSTER, ALTER TABLE rewrites,
/// REFRESH MATERIALIZED VIEW) with the access method it already has: named
/// `pg_temp_<OID of the old table>`, with the old table locked by this
/// transaction and using the same access method.  A name alone proves
/// nothing: anyone may call a table `pg_temp_x`.
fn is_rewrite_transient(name: &str, relam: pg_sys::Oid) -> bool {
    let Some(old) = name.strip_prefix("pg_temp_").and_then(|n| n.parse::<u32>().ok()) else {
        return false;
    };
    let old = pg_sys::Oid::from(old);
    // SAFETY: a lookup in this backend's local lock table.
    let locked = unsafe { pg_sys::CheckRelationOidLockedByMe(old, pg_sys::ExclusiveLock as _, true) };
    locked && crate::am::access_method_of(old) == Some(relam)
}

/// ALTER TABLE ... SET ACCESS METHOD to anything but tde_heap, while
/// tde.enforce_encryption is on, would decrypt the table (or, on a
/// partitioned table, make its future partitions plain): refused up front.
unsafe fn refuse_decrypting_set_access_method(stmt: *mut pg_sys::AlterTableStmt) {
    if !gucs::ENFORCE_ENCRYPTION.get() {
        return;
    }
    // SAFETY: the statement's list of AlterTableCmd nodes (caller: a valid AlterTableStmt).
    let cmds = unsafe { PgList::<pg_sys::AlterTableCmd>::from_pg((*stmt).cmds) };
    for cmd in cmds.iter_ptr() {
        // SAFETY: a list cell of an AlterTableStmt.
        let (subtype, name) = unsafe { ((*cmd).subtype, (*cmd).name) };
        if subtype != pg_sys::AlterTableType::AT_SetAccessMethod {
            continue;
        }
        // NULL means SET ACCESS METHOD DEFAULT.
        let target = if name.is_null() {
            // SAFETY: the GUC's current value, a NUL-terminated string.
            unsafe { CStr::from_ptr(pg_sys::default_table_access_method) }.to_string_lossy().into_owned()
        } else {
            // SAFETY: a NUL-terminated identifier from the parser.
            unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
        };
        if !policy::set_access_method_allowed(&target) {
            let why = format!("SET ACCESS METHOD {target} would store the table unencrypted");
            // SAFETY: the statement's relation, a RangeVar from the parser.
            let object = unsafe { relation_label((*stmt).relation) };
            crate::audit::refused(&object, &why);
            TdeError::Enforced(why).raise();
        }
    }
}

/// `schema.name` (or `name`) of a statement's RangeVar, for audit records.
unsafe fn relation_label(rv: *mut pg_sys::RangeVar) -> String {
    if rv.is_null() {
        return String::new();
    }
    let part = |p: *const c_char| {
        // SAFETY: NULL or a NUL-terminated identifier from the parser.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    // SAFETY: a valid RangeVar (caller).
    let (ns, name) = unsafe { (part((*rv).schemaname), part((*rv).relname)) };
    match (ns, name) {
        (Some(ns), Some(n)) => format!("{ns}.{n}"),
        (None, Some(n)) => n,
        _ => String::new(),
    }
}

unsafe fn post_create_relation(relid: pg_sys::Oid) {
    // SAFETY: the relcache knows relations created by the current command.
    let rel = unsafe { pg_sys::RelationIdGetRelation(relid) };
    if rel.is_null() {
        return;
    }
    // SAFETY: rel is a valid, pinned relcache entry until RelationClose.
    let (relkind, persistence, locator, relam, namespace) = unsafe {
        let f = &*(*rel).rd_rel;
        (f.relkind as u8, f.relpersistence as u8, (*rel).rd_locator, f.relam, f.relnamespace)
    };
    // SAFETY: rel is still pinned; relname is a NUL-terminated NameData.
    let name = unsafe { CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()) }.to_string_lossy().into_owned();
    // SAFETY: releases the reference taken by RelationIdGetRelation above.
    unsafe { pg_sys::RelationClose(rel) };

    let temp = persistence == pg_sys::RELPERSISTENCE_TEMP;
    // One pg_index lookup for both rules below.
    let index_table = if relkind == pg_sys::RELKIND_INDEX { new_index_table(relid) } else { None };
    if !temp
        && !keys::is_encrypted(&locator, false)
        && crate::statistics::is_encrypted_copy(relkind, &name, index_table)
    {
        keys::create_key(&locator, persistence).or_raise();
    }
    if relkind == pg_sys::RELKIND_INDEX && !keys::is_encrypted(&locator, temp) {
        let kind = Kind::Index { table_tde_heap: index_table.map(uses_tde_heap) };
        if policy::decide(&NewFile { kind, source_encrypted: None }) == Decision::Encrypt {
            keys::create_key(&locator, persistence).or_raise();
        }
    }

    let user_table = relkind == pg_sys::RELKIND_RELATION || relkind == pg_sys::RELKIND_MATVIEW;
    // SAFETY: plain catalog predicates on an OID.
    let system = unsafe { pg_sys::IsCatalogNamespace(namespace) || pg_sys::IsToastNamespace(namespace) };
    if gucs::ENFORCE_ENCRYPTION.get() {
        let tde_heap = Some(relam) == tde_heap_oid();
        // The catalog lookups of is_rewrite_transient only when they matter.
        let rewrite_keeping_am = user_table && !system && !tde_heap && is_rewrite_transient(&name, relam);
        if !policy::allowed_under_enforcement(&Created { user_table, system, tde_heap, rewrite_keeping_am }) {
            let why = format!("table \"{name}\" would not be encrypted");
            crate::audit::refused(&crate::audit::relation_name(relid), &why);
            TdeError::Enforced(why).raise();
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn object_access(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: c_int,
    arg: *mut c_void,
) {
    // SAFETY: chaining to the previous hook with our own arguments.
    if let Some(prev) = unsafe { PREV_OBJECT_ACCESS } {
        // SAFETY: the hook that was installed before ours, with our own arguments.
        unsafe { prev(access, class_id, object_id, sub_id, arg) };
    }
    if access == pg_sys::ObjectAccessType::OAT_POST_CREATE && class_id == pg_sys::RelationRelationId && sub_id == 0 {
        // SAFETY: object_id is the relation just created.
        unsafe { post_create_relation(object_id) };
    }
}

/// Rewrites `seqid` into a new file if its encryption should change.
fn sync_sequence(seqid: pg_sys::Oid) {
    // SAFETY: relcache lookup; entry released below.
    let (locator, persistence) = unsafe {
        let rel = pg_sys::RelationIdGetRelation(seqid);
        if rel.is_null() {
            return;
        }
        let out = ((*rel).rd_locator, (*(*rel).rd_rel).relpersistence);
        pg_sys::RelationClose(rel);
        out
    };
    let Some(owner) = sequence_owner(seqid) else { return };
    let temp = persistence as u8 == pg_sys::RELPERSISTENCE_TEMP;
    let kind = Kind::Sequence { owner_tde_heap: Some(uses_tde_heap(owner)) };
    let should = policy::decide(&NewFile { kind, source_encrypted: None }) == Decision::Encrypt;
    if should != keys::is_encrypted(&locator, temp) {
        // SAFETY: rewrites the sequence into a new relfilenumber with the
        // same persistence; create_storage decides the new file's key.
        unsafe { crate::pg::SequenceChangePersistence(seqid, persistence) };
    }
}

fn database_oid(name: *const c_char) -> Option<pg_sys::Oid> {
    if name.is_null() {
        return None;
    }
    // SAFETY: catalog lookup; missing_ok = true.
    let oid = unsafe { pg_sys::get_database_oid(name, true) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

fn default_tablespace(db: pg_sys::Oid) -> Option<u32> {
    Spi::get_one_with_args::<pg_sys::Oid>("SELECT dattablespace FROM pg_database WHERE oid = $1", &[db.into()])
        .ok()
        .flatten()
        .map(u32::from)
}

/// The template named in CREATE DATABASE's options (default template1).
unsafe fn createdb_template(stmt: *mut pg_sys::CreatedbStmt) -> Option<pg_sys::Oid> {
    // SAFETY: the statement's list of DefElem options (caller: a valid CreatedbStmt).
    let options = unsafe { PgList::<pg_sys::DefElem>::from_pg((*stmt).options) };
    for opt in options.iter_ptr() {
        // SAFETY: list cells are DefElem nodes.
        unsafe {
            if CStr::from_ptr((*opt).defname) == c"template" {
                return database_oid(pg_sys::defGetString(opt));
            }
        }
    }
    database_oid(c"template1".as_ptr())
}

/// ALTER DATABASE ... SET TABLESPACE moves files byte for byte to new
/// locations, where their keys would not be found.  Until keys move with
/// them, refuse it for databases that hold encrypted relations.
unsafe fn refuse_moving_encrypted_database(stmt: *mut pg_sys::AlterDatabaseStmt) {
    // SAFETY: the statement's list of DefElem options (caller: a valid AlterDatabaseStmt).
    let options = unsafe { PgList::<pg_sys::DefElem>::from_pg((*stmt).options) };
    // SAFETY: list cells are DefElem nodes with a NUL-terminated defname.
    let moves = options.iter_ptr().any(|opt| unsafe { CStr::from_ptr((*opt).defname) } == c"tablespace");
    if !moves {
        return;
    }
    // SAFETY: dbname of a valid AlterDatabaseStmt: a NUL-terminated string.
    let Some(db) = database_oid(unsafe { (*stmt).dbname }) else { return };
    let db = u32::from(db);
    if keys::database_has_keys(db) {
        TdeError::MoveEncryptedDatabase.raise();
    }
}

fn is_tde_heap_name(name: *const c_char) -> bool {
    // SAFETY: a NUL-terminated identifier from the parser or a GUC.
    !name.is_null() && unsafe { CStr::from_ptr(name) }.to_bytes() == b"tde_heap"
}

/// Whether the table a CREATE TABLE or ALTER TABLE statement creates or
/// alters uses tde_heap, as far as the statement itself says: its USING
/// clause or default_table_access_method for a new table (partitions and
/// partitioned tables: not known here), the catalog for an existing one.
unsafe fn table_statement_tde_heap(node: *mut pg_sys::Node) -> bool {
    // SAFETY: node is a valid utility statement (caller).
    match unsafe { (*node).type_ } {
        pg_sys::NodeTag::T_CreateStmt => {
            let stmt = node as *mut pg_sys::CreateStmt;
            // SAFETY: node is a CreateStmt (tag checked).
            let (am, partbound, partspec) = unsafe { ((*stmt).accessMethod, (*stmt).partbound, (*stmt).partspec) };
            if !partbound.is_null() || !partspec.is_null() {
                return false;
            }
            // SAFETY: the GUC's current value.
            is_tde_heap_name(if am.is_null() { unsafe { pg_sys::default_table_access_method } } else { am })
        }
        pg_sys::NodeTag::T_AlterTableStmt => {
            // SAFETY: node is an AlterTableStmt (tag checked).
            let rv = unsafe { (*(node as *mut pg_sys::AlterTableStmt)).relation };
            relid_of(rv).is_some_and(uses_tde_heap)
        }
        _ => false,
    }
}

/// Called at the entry of every utility statement: remembers whether a
/// CREATE SEQUENCE subcommand about to run belongs to a tde_heap table's
/// CREATE TABLE or ALTER TABLE (serial and identity columns).  No guard is
/// needed on error: the next statement sets both again.
unsafe fn owned_sequence_to_be(node: *mut pg_sys::Node, context: pg_sys::ProcessUtilityContext::Type) {
    // SAFETY: node is a valid utility statement (caller).
    let tag = unsafe { (*node).type_ };
    if tag == pg_sys::NodeTag::T_CreateSeqStmt && context == pg_sys::ProcessUtilityContext::PROCESS_UTILITY_SUBCOMMAND {
        SEQUENCE_FOR_TDE_HEAP.with(|c| c.set(TABLE_STATEMENT_TDE_HEAP.with(|t| t.get())));
    } else {
        // SAFETY: as above.
        let yes = unsafe { table_statement_tde_heap(node) };
        TABLE_STATEMENT_TDE_HEAP.with(|t| t.set(yes));
        SEQUENCE_FOR_TDE_HEAP.with(|c| c.set(false));
    }
}

/// The relation a just-run statement named, with the statement's own
/// catalog changes (a new OWNED BY, a new access method) made visible.
fn relid_after_statement(rv: *mut pg_sys::RangeVar) -> Option<pg_sys::Oid> {
    // SAFETY: we are in the statement's transaction.
    unsafe { pg_sys::CommandCounterIncrement() };
    relid_of(rv)
}

/// The relation `rv` names, if it exists (no lock taken).
fn relid_of(rv: *mut pg_sys::RangeVar) -> Option<pg_sys::Oid> {
    // SAFETY: a name lookup with RVR_MISSING_OK and no lock, inside the
    // statement's transaction.
    let oid = unsafe {
        pg_sys::RangeVarGetRelidExtended(
            rv,
            pg_sys::NoLock as _,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        )
    };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

#[allow(clippy::too_many_arguments)]
#[pg_guard]
unsafe extern "C-unwind" fn utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: pstmt is the statement being executed.
    let node = unsafe { (*pstmt).utilityStmt };
    // SAFETY: utilityStmt of a utility PlannedStmt is a valid Node.
    let tag = unsafe { (*node).type_ };

    if tag == pg_sys::NodeTag::T_AlterTableStmt {
        // SAFETY: node is an AlterTableStmt.
        unsafe { refuse_decrypting_set_access_method(node as *mut pg_sys::AlterTableStmt) };
    }
    // SAFETY: node is the statement's valid utility node.
    unsafe { owned_sequence_to_be(node, context) };
    if tag == pg_sys::NodeTag::T_AlterDatabaseStmt {
        // SAFETY: node is an AlterDatabaseStmt.
        unsafe { refuse_moving_encrypted_database(node as *mut pg_sys::AlterDatabaseStmt) };
    }

    // What must be known before the statement runs.
    let dropped_db = if tag == pg_sys::NodeTag::T_DropdbStmt {
        // SAFETY: node is a DropdbStmt (tag checked).
        database_oid(unsafe { (*(node as *mut pg_sys::DropdbStmt)).dbname })
    } else {
        None
    };

    // SAFETY: the standard hook chain with our own arguments.  Both calls
    // are unguarded (src/pg/): an ERROR of the statement propagates untouched,
    // with its position, CONTEXT and QUERY, and nothing of ours with a
    // destructor is alive here.
    unsafe {
        match PREV_UTILITY {
            Some(prev) => prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
            None => crate::pg::standard_ProcessUtility(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
    }

    crate::statistics::after_statement();
    match tag {
        pg_sys::NodeTag::T_CreateSeqStmt | pg_sys::NodeTag::T_AlterSeqStmt => {
            let rv = if tag == pg_sys::NodeTag::T_CreateSeqStmt {
                // SAFETY: node is a CreateSeqStmt (tag checked).
                unsafe { (*(node as *mut pg_sys::CreateSeqStmt)).sequence }
            } else {
                // SAFETY: node is an AlterSeqStmt (tag checked).
                unsafe { (*(node as *mut pg_sys::AlterSeqStmt)).sequence }
            };
            if let Some(seqid) = relid_after_statement(rv) {
                sync_sequence(seqid);
            }
        }
        pg_sys::NodeTag::T_AlterTableStmt => {
            // SAFETY: node is an AlterTableStmt (tag checked).
            let rv = unsafe { (*(node as *mut pg_sys::AlterTableStmt)).relation };
            if let Some(relid) = relid_after_statement(rv) {
                // SAFETY: returns a palloc'd list of sequence OIDs.
                let seqs = unsafe { PgList::<c_void>::from_pg(pg_sys::getOwnedSequences(relid)) };
                for i in 0..seqs.len() {
                    if let Some(oid) = seqs.get_oid(i) {
                        sync_sequence(oid);
                    }
                }
            }
        }
        pg_sys::NodeTag::T_CreatedbStmt => {
            let stmt = node as *mut pg_sys::CreatedbStmt;
            // SAFETY: node is a CreatedbStmt (tag checked); dbname is a NUL-terminated string.
            let dst = database_oid(unsafe { (*stmt).dbname });
            // SAFETY: stmt is a valid CreatedbStmt.
            let src = unsafe { createdb_template(stmt) };
            if let (Some(src), Some(dst)) = (src, dst) {
                if let (Some(src_spc), Some(dst_spc)) = (default_tablespace(src), default_tablespace(dst)) {
                    keys::copy_database_keys(src.into(), dst.into(), src_spc, dst_spc).or_raise();
                }
            }
        }
        pg_sys::NodeTag::T_DropdbStmt => {
            if let Some(db) = dropped_db {
                // SAFETY: node is a DropdbStmt (tag checked).
                if database_oid(unsafe { (*(node as *mut pg_sys::DropdbStmt)).dbname }).is_none() {
                    keys::forget_database(db.into());
                }
            }
        }
        _ => {}
    }
}
