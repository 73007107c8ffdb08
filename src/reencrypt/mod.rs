//! Online re-encryption: `tde_rotate_key(rel)` gives every file of a table a
//! new key version and rewrites every page under it, while the table is in
//! use; `tde_encrypt_table(rel)` and `tde_decrypt_table(rel)` turn a plain
//! table encrypted, or back, the same way.  Where a page gets *re*-encrypted.
//!
//! How (../shared/DESIGN.md, "Online re-encryption"):
//!
//! 1. Lock each relation (the table, its TOAST table and TOAST index, its
//!    indexes, its owned sequences) with ShareUpdateExclusiveLock: reads and
//!    writes go on; VACUUM, DDL and another rotation of the same table wait.
//! 2. Give each file a new key version (one key store change, WAL-logged).
//!    From then on every page written is encrypted under it and marked with
//!    its parity (pd_flags bit 0x4000); pages still under the previous
//!    version are read with it.  Each page says which version it uses, so
//!    nothing depends on how far the pass got.
//! 3. Walk every block of every fork: read the buffer, lock it exclusively,
//!    mark it dirty and WAL-log a full-page image (`log_newpage_buffer`),
//!    as online checksum enabling does.  The next write-out encrypts it
//!    under the new version; a torn write is repaired from WAL like any
//!    other, and the new LSN changes the XTS tweak.
//! 4. A checkpoint writes every page; then the previous version is retired
//!    (one more key store change).  It stays wrapped in the key store.
//!
//! A crash at any point loses nothing: both versions stay live until step 4,
//! and calling `tde_rotate_key` again finishes the pass (a file already
//! mid-rotation keeps its new version and is walked again).
//!
//! Encryption and decryption are the same pass with another step 2 and 4:
//! the file gets a key in the *encrypting* phase (written encrypted, and
//! unmarked pages -- not yet rewritten -- read as plain), or enters the
//! *decrypting* phase (written plain, marked pages still decrypted); at the
//! end the phase ends (or the key goes), and the table's access method
//! becomes tde_heap (or heap), so that later rewrites keep the result.

pub mod progress;
pub mod scheduler;
mod worker;

use pgrx::pg_sys;
use pgrx::PgList;

use tde_core::keystore::FileId;

use crate::audit::{self, Op};
use crate::error::{OrRaise, TdeError};
use crate::keys;

/// Vacuum-style throttling of a pass: after every `limit` pages, sleep
/// `delay_ms` (0: no sleep).  From tde.reencrypt_cost_delay and
/// tde.reencrypt_cost_limit of the session that asked for the pass.
#[derive(Clone, Copy)]
pub struct Throttle {
    pub delay_ms: u32,
    pub limit: u32,
}

impl Throttle {
    /// No throttling (the statistics catalogs, encrypted inside the
    /// statement that needs them).
    pub fn none() -> Throttle {
        Throttle { delay_ms: 0, limit: 1 }
    }

    pub fn from_gucs() -> Throttle {
        Throttle {
            delay_ms: crate::gucs::REENCRYPT_COST_DELAY.get().max(0) as u32,
            limit: crate::gucs::REENCRYPT_COST_LIMIT.get().max(1) as u32,
        }
    }
}

/// Sleeps `ms` milliseconds on the process latch, waking for interrupts
/// and postmaster death.
fn sleep_ms(ms: u32) {
    // SAFETY: the standard latch wait of a backend or background worker.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms as _,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
}

/// The relations whose files share a table's encryption: the table, its
/// TOAST table and TOAST index, its indexes and its owned sequences.
fn relations_of(relid: pg_sys::Oid) -> Vec<pg_sys::Oid> {
    let mut out = vec![relid];
    // SAFETY: catalog lookups inside a transaction, on a relation the caller
    // has locked; the relcache entries are closed before returning.
    unsafe {
        let rel = pg_sys::relation_open(relid, pg_sys::NoLock as _);
        let toast = (*(*rel).rd_rel).reltoastrelid;
        out.extend(PgList::<std::ffi::c_void>::from_pg(pg_sys::RelationGetIndexList(rel)).iter_oid());
        pg_sys::relation_close(rel, pg_sys::NoLock as _);
        if toast != pg_sys::InvalidOid {
            out.push(toast);
            let trel = pg_sys::relation_open(toast, pg_sys::ShareUpdateExclusiveLock as _);
            out.extend(PgList::<std::ffi::c_void>::from_pg(pg_sys::RelationGetIndexList(trel)).iter_oid());
            pg_sys::relation_close(trel, pg_sys::NoLock as _);
        }
        out.extend(PgList::<std::ffi::c_void>::from_pg(pg_sys::getOwnedSequences(relid)).iter_oid());
    }
    out
}

/// Opens `relid` with ShareUpdateExclusiveLock (held to the end of the
/// transaction) and returns its file and whether it is WAL-logged, refusing
/// relations a pass cannot work on (and plain ones if `need_encrypted`).
fn lock_file(relid: pg_sys::Oid, need_encrypted: bool) -> (FileId, bool) {
    // SAFETY: relation_open raises an ERROR for a missing relation (a Rust
    // panic through pgrx's guard); rd_rel is the pg_class row.
    unsafe {
        let rel = pg_sys::relation_open(relid, pg_sys::ShareUpdateExclusiveLock as _);
        let form = &*(*rel).rd_rel;
        let name = std::ffi::CStr::from_ptr(form.relname.data.as_ptr()).to_string_lossy().into_owned();
        let persistence = form.relpersistence as u8;
        let has_storage = !matches!(
            form.relkind as u8,
            pg_sys::RELKIND_VIEW
                | pg_sys::RELKIND_COMPOSITE_TYPE
                | pg_sys::RELKIND_FOREIGN_TABLE
                | pg_sys::RELKIND_PARTITIONED_TABLE
                | pg_sys::RELKIND_PARTITIONED_INDEX
        );
        let loc = (*rel).rd_locator;
        pg_sys::relation_close(rel, pg_sys::NoLock as _);
        if !has_storage {
            TdeError::Invalid(format!("\"{name}\" has no storage of its own; rotate the keys of its partitions"))
                .raise();
        }
        if persistence == pg_sys::RELPERSISTENCE_TEMP {
            TdeError::Invalid(format!("\"{name}\" is a temporary table: its keys live only in its session")).raise();
        }
        if need_encrypted && !keys::is_encrypted(&loc, false) {
            TdeError::Invalid(format!("\"{name}\" is not encrypted")).raise();
        }
        (keys::file_id(&loc), persistence == pg_sys::RELPERSISTENCE_PERMANENT)
    }
}

/// Rewrites every page of every fork of `relid` (step 3), reporting
/// progress in `slot`, throttled, and waiting while paused.
fn rewrite_pages(relid: pg_sys::Oid, permanent: bool, slot: Option<usize>, throttle: Throttle, budget: &mut u32) {
    use pg_sys::ForkNumber::*;
    // SAFETY: the standard buffer protocol on a relation we hold locked:
    // read, lock exclusively, dirty and WAL-log inside a critical section
    // (as log_newpage_buffer requires), unlock and release.  pgrx's guards
    // turn an ERROR into a Rust panic; nothing of ours needs unwinding here.
    unsafe {
        let rel = pg_sys::relation_open(relid, pg_sys::NoLock as _);
        let smgr = pg_sys::smgropen((*rel).rd_locator, (*rel).rd_backend);
        for fork in [MAIN_FORKNUM, FSM_FORKNUM, VISIBILITYMAP_FORKNUM, INIT_FORKNUM] {
            if !pg_sys::smgrexists(smgr, fork) {
                continue;
            }
            // Pages added after this are written under the new version anyway.
            let nblocks = pg_sys::RelationGetNumberOfBlocksInFork(rel, fork);
            // An unlogged relation's main fork has no WAL (and no standby
            // copy); its init fork does, like every fork of a logged one.
            let wal = permanent || fork == INIT_FORKNUM;
            for block in 0..nblocks {
                pgrx::check_for_interrupts!();
                if block % 64 == 0 {
                    while progress::report(slot, fork, block.into(), nblocks.into()) {
                        sleep_ms(100);
                    }
                }
                if throttle.delay_ms > 0 {
                    *budget += 1;
                    if *budget >= throttle.limit {
                        *budget = 0;
                        sleep_ms(throttle.delay_ms);
                    }
                }
                let buf = pg_sys::ReadBufferExtended(
                    rel,
                    fork,
                    block,
                    pg_sys::ReadBufferMode::RBM_NORMAL,
                    std::ptr::null_mut(),
                );
                pg_sys::LockBuffer(buf, pg_sys::BUFFER_LOCK_EXCLUSIVE as _);
                if !pg_sys::PageIsNew(pg_sys::BufferGetPage(buf)) {
                    pg_sys::CritSectionCount += 1;
                    pg_sys::MarkBufferDirty(buf);
                    if wal {
                        // Not page_std: FSM and VM pages keep their data past pd_lower.
                        pg_sys::log_newpage_buffer(buf, false);
                    }
                    pg_sys::CritSectionCount -= 1;
                }
                pg_sys::UnlockReleaseBuffer(buf);
            }
            progress::report(slot, fork, nblocks.into(), nblocks.into());
        }
        pg_sys::relation_close(rel, pg_sys::NoLock as _);
    }
}

/// What a pass does to a table's files.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Pass {
    /// tde_rotate_key: a new key version.
    Rotate,
    /// tde_encrypt_table: plain files become encrypted.
    Encrypt,
    /// tde_decrypt_table: encrypted files become plain.
    Decrypt,
}

impl Pass {
    fn code(self) -> u32 {
        self as u32
    }

    fn from_code(c: u32) -> Option<Pass> {
        [Pass::Rotate, Pass::Encrypt, Pass::Decrypt].into_iter().find(|p| p.code() == c)
    }
}

type Rels = Vec<(pg_sys::Oid, FileId, bool)>;

/// Steps 1 and 2: locks every relation of the table and sets up its files
/// for the pass: a new key version (rotation), a key in the encrypting phase
/// (encryption), the decrypting phase (decryption).  Each is kept as it is
/// when an interrupted pass of the same kind left it.
fn begin(relid: pg_sys::Oid, pass: Pass) -> (FileId, Rels) {
    let object = audit::relation_name(relid);
    if pass == Pass::Decrypt && crate::gucs::ENFORCE_ENCRYPTION.get() {
        let why = format!("tde_decrypt_table would store {} unencrypted", relname(relid));
        audit::refused(&object, &why);
        TdeError::Enforced(why).raise();
    }
    let need_encrypted = pass != Pass::Encrypt;
    let (table_file, _) = lock_file(relid, need_encrypted);
    let rels: Rels = relations_of(relid)
        .into_iter()
        .map(|oid| {
            let (file, permanent) = lock_file(oid, need_encrypted);
            (oid, file, permanent)
        })
        .collect();
    let files: Vec<FileId> = rels.iter().map(|r| r.1).collect();
    let started = vec![pass_entry(Op::ReencryptionStarted, &object, pass, files.len())];
    match pass {
        Pass::Rotate => keys::begin_rotation(&files, &object, started),
        Pass::Encrypt => keys::begin_encryption(&files, &object, started),
        Pass::Decrypt => keys::set_phase(&files, tde_core::keystore::Phase::Decrypting, started),
    }
    .map_err(|e| audit::failed(Op::ReencryptionStarted, &object, e))
    .or_raise();
    (table_file, rels)
}

thread_local! {
    /// Why the scheduler runs the current pass (empty: a user asked).
    static SCHEDULED: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// The audit record of a pass starting or finishing.
fn pass_entry(op: Op, object: &str, pass: Pass, nfiles: usize) -> audit::Entry {
    let mut e = audit::entry(op, object, audit::Outcome::Ok);
    let what = match pass {
        Pass::Rotate => "tde_rotate_key",
        Pass::Encrypt => "tde_encrypt_table",
        Pass::Decrypt => "tde_decrypt_table",
    };
    let why = SCHEDULED.with(|s| s.borrow().clone());
    e.detail = if why.is_empty() {
        format!("{what}, {nfiles} relation file(s)")
    } else {
        format!("{what}, {nfiles} relation file(s), by the scheduler: {why}")
    };
    e
}

/// A pass the scheduler runs (scheduler.rs), with the reason it gives in
/// the audit trail.
fn run_scheduled(relid: pg_sys::Oid, pass: Pass, throttle: Throttle, why: &str) {
    SCHEDULED.with(|s| *s.borrow_mut() = why.to_string());
    run(relid, pass, throttle);
    SCHEDULED.with(|s| s.borrow_mut().clear());
}

/// Steps 3 and 4: rewrites every page, then, after a checkpoint, ends the
/// pass (retire the previous version; leave the encrypting phase; drop
/// the keys) and, for encryption and decryption, switches the access
/// method.
fn run(relid: pg_sys::Oid, pass: Pass, throttle: Throttle) -> u32 {
    let (table_file, rels) = begin(relid, pass);
    let targets: Vec<(pg_sys::Oid, u32)> = rels
        .iter()
        .map(|(oid, file, _)| (*oid, if pass == Pass::Decrypt { 0 } else { keys::current_version(file).unwrap_or(0) }))
        .collect();
    // SAFETY: plain read of a process global.
    let slots = progress::begin(unsafe { pg_sys::MyDatabaseId }, relid, &targets);
    let mut budget = 0;
    for (n, (oid, _, permanent)) in rels.iter().enumerate() {
        rewrite_pages(*oid, *permanent, slots.slot(n), throttle, &mut budget);
    }
    // Every page is dirty in its new form or written so: a checkpoint makes
    // that durable, then no page is in the old form any more.
    crate::pg::request_checkpoint_and_wait();
    let files: Vec<FileId> = rels.iter().map(|r| r.1).collect();
    let object = audit::relation_name(relid);
    let finished = vec![pass_entry(Op::ReencryptionFinished, &object, pass, files.len())];
    match pass {
        Pass::Rotate => keys::finish_rotation(&files, &object, finished),
        Pass::Encrypt => keys::set_phase(&files, tde_core::keystore::Phase::Encrypted, finished),
        Pass::Decrypt => keys::remove_keys(&files, &object, finished),
    }
    .map_err(|e| audit::failed(Op::ReencryptionFinished, &object, e))
    .or_raise();
    match pass {
        Pass::Rotate => {}
        // System catalogs (the statistics, src/statistics.rs) keep heap,
        // as PostgreSQL requires; their rewrites are encrypted by hooks.rs.
        // SAFETY: a plain predicate on an OID.
        _ if unsafe { pg_sys::IsCatalogRelationOid(relid) } => {}
        Pass::Encrypt => use_tde_heap(relid),
        Pass::Decrypt => set_access_method(relid, pg_sys::HEAP_TABLE_AM_OID),
    }
    drop(slots);
    keys::current_version(&table_file).unwrap_or(0)
}

/// Makes the table (and its TOAST table) use tde_heap.
fn use_tde_heap(relid: pg_sys::Oid) {
    set_access_method(relid, crate::am::tde_heap_oid().unwrap_or(pg_sys::InvalidOid))
}

/// Makes the table (and its TOAST table) use access method `am`, so that
/// later rewrites stay encrypted (tde_heap) or plain (heap).  A catalog
/// update as the bootstrap superuser: tde_admin may run the pass without
/// the right to write pg_class.  The table's dependency on its access
/// method moves with it, as ALTER TABLE ... SET ACCESS METHOD does, so
/// DROP EXTENSION tde is refused while a table uses tde_heap.
fn set_access_method(relid: pg_sys::Oid, am: pg_sys::Oid) {
    if am == pg_sys::InvalidOid {
        TdeError::Internal("access method tde_heap is missing".into()).raise();
    }
    let old_am = crate::am::access_method_of(relid).unwrap_or(pg_sys::InvalidOid);
    let sql = format!(
        "UPDATE pg_catalog.pg_class SET relam = {am} WHERE oid = {rel} OR oid = (SELECT reltoastrelid FROM pg_catalog.pg_class WHERE oid = {rel})",
        am = u32::from(am),
        rel = u32::from(relid)
    );
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: switches to the bootstrap superuser for one catalog update,
    // as PostgreSQL's own maintenance code does; an ERROR aborts the
    // transaction, which restores the user and security context.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            pg_sys::BOOTSTRAP_SUPERUSERID.into(),
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
    }
    pgrx::spi::Spi::run(&sql)
        .unwrap_or_else(|e| TdeError::Internal(format!("could not switch the access method: {e}")).raise());
    // SAFETY: restores what GetUserIdAndSecContext returned.
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
    if old_am != am && old_am != pg_sys::InvalidOid {
        // SAFETY: a pg_depend update inside the transaction that changed
        // relam; changeDependencyFor handles a pinned old or new access
        // method (heap) as ALTER TABLE ... SET ACCESS METHOD relies on.
        unsafe {
            pg_sys::changeDependencyFor(pg_sys::RelationRelationId, relid, pg_sys::AccessMethodRelationId, old_am, am);
            pg_sys::CommandCounterIncrement();
        }
    }
}

/// tde_rotate_key(rel): returns the table's new key version.
pub fn rotate(relid: pg_sys::Oid, throttle: Throttle) -> u32 {
    run(relid, Pass::Rotate, throttle)
}

/// tde_encrypt_table(rel) / tde_decrypt_table(rel), synchronously.
pub fn encrypt(relid: pg_sys::Oid, pass: Pass, throttle: Throttle) {
    run(relid, pass, throttle);
}

/// Any pass in the background: steps 1 and 2 here, so what the pass does
/// is decided (and the new version known, returned at once); a background
/// worker does the rest (it takes the locks again once this transaction
/// ends).
pub fn in_background(relid: pg_sys::Oid, pass: Pass) -> u32 {
    let (table_file, _) = begin(relid, pass);
    // SAFETY: plain read of a process global.
    progress::claim(unsafe { pg_sys::MyDatabaseId }, relid);
    worker::launch(relid, pass, Throttle::from_gucs());
    keys::current_version(&table_file).unwrap_or(0)
}

/// What a background worker runs.
fn run_in_worker(relid: pg_sys::Oid, pass_code: u32, throttle: Throttle) -> u32 {
    let pass = Pass::from_code(pass_code)
        .unwrap_or_else(|| TdeError::Internal(format!("unknown re-encryption pass {pass_code}")).raise());
    run(relid, pass, throttle)
}

/// tde_reencrypt_pause(rel) / tde_reencrypt_resume(rel).
pub fn set_paused(relid: pg_sys::Oid, pause: bool) {
    // SAFETY: plain read of a process global.
    if progress::set_paused(unsafe { pg_sys::MyDatabaseId }, relid, pause) == 0 {
        TdeError::Invalid(format!("no re-encryption of relation {} is running", relname(relid))).raise();
    }
    let op = if pause { Op::ReencryptionPaused } else { Op::ReencryptionResumed };
    audit::record(vec![audit::entry(op, &audit::relation_name(relid), audit::Outcome::Ok)]);
}

fn relname(relid: pg_sys::Oid) -> String {
    // SAFETY: returns a palloc'd name or NULL.
    let p = unsafe { pg_sys::get_rel_name(relid) };
    if p.is_null() {
        format!("with OID {}", u32::from(relid))
    } else {
        // SAFETY: a NUL-terminated string.
        format!("\"{}\"", unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy())
    }
}
