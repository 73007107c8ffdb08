//! Online re-encryption: `tde_rotate_key(rel)` gives every file of a table a
//! new key version and rewrites every page under it, while the table is in
//! use.  Where a page gets *re*-encrypted.
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

pub mod progress;
mod worker;

use pgrx::pg_sys;
use pgrx::PgList;

use tde_core::keystore::FileId;

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
/// transaction) and returns its file, refusing relations tde cannot rotate.
fn lock_file(relid: pg_sys::Oid) -> (FileId, bool) {
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
        if !keys::is_encrypted(&loc, false) {
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

/// Steps 1 and 2: locks every relation of the table and gives its files a
/// new key version (or keeps the one of an interrupted rotation).
fn begin(relid: pg_sys::Oid) -> (FileId, Vec<(pg_sys::Oid, FileId, bool)>) {
    let (table_file, _) = lock_file(relid);
    let rels: Vec<(pg_sys::Oid, FileId, bool)> = relations_of(relid)
        .into_iter()
        .map(|oid| {
            let (file, permanent) = lock_file(oid);
            (oid, file, permanent)
        })
        .collect();
    let files: Vec<FileId> = rels.iter().map(|r| r.1).collect();
    keys::begin_rotation(&files).or_raise();
    (table_file, rels)
}

/// tde_rotate_key(rel): steps 1 to 4 above; returns the table's new key
/// version.
pub fn rotate(relid: pg_sys::Oid, throttle: Throttle) -> u32 {
    let (table_file, rels) = begin(relid);
    let targets: Vec<(pg_sys::Oid, u32)> =
        rels.iter().map(|(oid, file, _)| (*oid, keys::current_version(file).unwrap_or(0))).collect();
    // SAFETY: plain read of a process global.
    let slots = progress::begin(unsafe { pg_sys::MyDatabaseId }, relid, &targets);
    let mut budget = 0;
    for (n, (oid, _, permanent)) in rels.iter().enumerate() {
        rewrite_pages(*oid, *permanent, slots.slot(n), throttle, &mut budget);
    }
    // Every page is dirty under the new version or written with it: a
    // checkpoint makes that durable, then no page uses the previous one.
    crate::pg::request_checkpoint_and_wait();
    let files: Vec<FileId> = rels.iter().map(|r| r.1).collect();
    keys::finish_rotation(&files).or_raise();
    drop(slots);
    keys::current_version(&table_file).unwrap_or(0)
}

/// tde_rotate_key(rel, background => true): steps 1 and 2 here, so the new
/// version is known and returned at once; a background worker does the
/// pass (it takes the locks again once this transaction ends).
pub fn rotate_in_background(relid: pg_sys::Oid) -> u32 {
    let (table_file, _) = begin(relid);
    worker::launch(relid, Throttle::from_gucs());
    keys::current_version(&table_file).unwrap_or(0)
}

/// tde_reencrypt_pause(rel) / tde_reencrypt_resume(rel).
pub fn set_paused(relid: pg_sys::Oid, pause: bool) {
    // SAFETY: plain read of a process global.
    if progress::set_paused(unsafe { pg_sys::MyDatabaseId }, relid, pause) == 0 {
        TdeError::Invalid(format!("no re-encryption of relation {} is running", relname(relid))).raise();
    }
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
