//! The tde storage manager: WHERE A PAGE GETS ENCRYPTED.
//!
//! The core patch (patches/pg17/0001) lets us put an `f_smgr` table in front
//! of md.c for every relation.  Each callback forwards to md.c; the three
//! that move page contents do more, for files that have a key:
//!
//! - `tde_readv`: md.c reads into the caller's buffers, we decrypt in place
//!   (the buffers are the caller's private destination).
//! - `tde_writev` / `tde_extend`: we encrypt into a private bounce buffer and
//!   hand that to md.c.  A shared buffer is never encrypted in place: other
//!   backends may be reading it.
//!
//! Plain files cost one cached hash lookup per call (keys/local.rs).  The
//! bounce buffer is allocated once per process, on its first encrypted
//! write; the page path allocates nothing.  All-zero pages (file
//! extension) pass through unchanged.
//!
//! Fail closed: an encrypted page is marked on disk (tde-core's `page`
//! module), so a page read from a file that has no key, but carries the mark,
//! is an error naming the file, never garbage handed to the executor.
//!
//! md.c may raise an ERROR (ENOSPC, EIO).  It is called with no borrow, lock
//! or destructor-bearing value alive in these frames, so the ERROR reaches
//! PostgreSQL untouched and nothing of ours is left half-borrowed (src/pg/).
//!
//! The page format itself (which bytes are encrypted, the tweak, data
//! checksums) is in `page.rs`.

mod page;

use std::cell::RefCell;
use std::ffi::c_void;

use pgrx::pg_sys;
use pgrx::prelude::*;
use tde_core::keystore::FileId;
use tde_core::page::PAGE_SIZE;

use crate::error::TdeError;
use crate::keys::{self, local::Kind};
use crate::pg::{self, BlockNumber, ForkNumber, SMgrRelation};

/// Our table: md.c everywhere, except where page contents move.  md.c is
/// entry 0 of the table, so smgrinit() already runs mdinit(); ours only
/// makes the startup process wait for the keys (kms::startup_wait).
static TDE_SMGR: pg_sys::f_smgr = pg_sys::f_smgr {
    smgr_init: Some(tde_init),
    smgr_shutdown: None,
    smgr_open: Some(pg::mdopen),
    smgr_close: Some(pg::mdclose),
    smgr_create: Some(pg::mdcreate),
    smgr_exists: Some(pg::mdexists),
    smgr_unlink: Some(tde_unlink),
    smgr_extend: Some(tde_extend),
    smgr_zeroextend: Some(pg::mdzeroextend),
    smgr_prefetch: Some(pg::mdprefetch),
    smgr_readv: Some(tde_readv),
    smgr_writev: Some(tde_writev),
    smgr_writeback: Some(pg::mdwriteback),
    smgr_nblocks: Some(pg::mdnblocks),
    smgr_truncate: Some(pg::mdtruncate),
    smgr_immedsync: Some(pg::mdimmedsync),
    smgr_registersync: Some(pg::mdregistersync),
};

static mut TDE_SMGR_ID: pg_sys::SMgrId = 0;

/// Registers the storage manager and makes it the one every relation uses.
pub fn init() {
    // SAFETY: called from _PG_init during shared_preload_libraries, the only
    // time smgr_register allows; smgr_register copies the table.
    unsafe {
        let id = pg_sys::smgr_register(&TDE_SMGR);
        pg_sys::storage_manager_id = id;
        TDE_SMGR_ID = id;
    }
}

/// Refuses to run when another library, loaded after tde, has made its own
/// storage manager the default: relations would then bypass encryption.
/// Called once every library has been loaded (shmem_startup_hook).
pub fn check_still_selected() {
    // SAFETY: plain reads of globals written only during library loading.
    let (current, ours) = unsafe { (pg_sys::storage_manager_id, TDE_SMGR_ID) };
    if current != ours {
        TdeError::StorageManagerReplaced { current, ours }.raise_at(PgLogLevel::FATAL);
    }
}

/// Pages encrypted per md.c call; larger writes are split.
const BOUNCE_PAGES: usize = 16;

#[derive(Clone)]
#[repr(C, align(4096))]
struct AlignedPage([u8; PAGE_SIZE]);

thread_local! {
    /// Private pages that encrypted data is written from (aligned for
    /// direct I/O).  Allocated on first use and never reallocated, so
    /// pointers into it stay valid after the borrow ends.
    static BOUNCE: RefCell<Vec<AlignedPage>> = const { RefCell::new(Vec::new()) };
}

/// Encrypts `srcs` (at most BOUNCE_PAGES pages, blocks `first`...) into the
/// bounce buffer.  Returns what the file is and, if encrypted, pointers to
/// the encrypted pages.  No borrow outlives this call.
fn encrypt_into_bounce(
    t: &Target,
    fork: ForkNumber,
    first: BlockNumber,
    srcs: &[*const c_void],
) -> (Kind, [*const c_void; BOUNCE_PAGES]) {
    let mut ptrs = [std::ptr::null::<c_void>(); BOUNCE_PAGES];
    let kind = BOUNCE.with(|b| {
        let mut bounce = b.borrow_mut();
        let mut plain = false;
        let kind = keys::local::with_cipher(&t.file, t.temp, |cipher| {
            if cipher.write_plain {
                // tde_decrypt_table is running: pages go out plain.
                plain = true;
                return;
            }
            // Only encrypted files need it: a process that writes plain
            // relations only never allocates it.
            if bounce.is_empty() {
                bounce.resize(BOUNCE_PAGES, AlignedPage([0; PAGE_SIZE]));
            }
            for (i, src) in srcs.iter().enumerate() {
                // SAFETY: smgr.c passes readable pages of BLCKSZ bytes.
                let src = unsafe { &*(*src as *const [u8; PAGE_SIZE]) };
                page::encrypt(cipher, t.file.rel, fork, first + i as u32, src, &mut bounce[i].0);
                ptrs[i] = bounce[i].0.as_ptr() as *const c_void;
            }
        });
        if plain {
            Kind::Plain
        } else {
            kind
        }
    });
    (kind, ptrs)
}

struct Target {
    file: FileId,
    temp: bool,
}

unsafe fn target(reln: SMgrRelation) -> Target {
    // SAFETY: reln is a valid SMgrRelation from smgr.c (caller).
    let rel = unsafe { (*reln).smgr_rlocator };
    Target { file: keys::file_id(&rel.locator), temp: rel.backend != pg_sys::INVALID_PROC_NUMBER }
}

fn unavailable(t: &Target, fork: ForkNumber, action: &'static str) -> ! {
    TdeError::KeyUnavailable { action, file: t.file, fork, why: keys::unavailable_reason() }.raise()
}

fn marked_without_key(t: &Target, fork: ForkNumber, block: BlockNumber) -> ! {
    TdeError::MarkedWithoutKey { file: t.file, fork, block }.raise()
}

/// smgrinit(), in every process once it is attached to shared memory.
#[pg_guard]
unsafe extern "C-unwind" fn tde_init() {
    crate::kms::startup_wait();
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_readv(
    reln: SMgrRelation,
    forknum: ForkNumber,
    blocknum: BlockNumber,
    buffers: *mut *mut c_void,
    nblocks: BlockNumber,
) {
    // SAFETY: forwarding smgr.c's arguments unchanged; nothing of ours is
    // alive yet, so an ERROR from md.c propagates untouched (src/pg/).
    unsafe { pg::mdreadv(reln, forknum, blocknum, buffers, nblocks) };
    // SAFETY: reln is valid for the duration of the call.
    let t = unsafe { target(reln) };
    // SAFETY: md.c filled nblocks buffers of BLCKSZ bytes each; they are the
    // caller's private destination.
    let page_at = |i: usize| unsafe { &mut *(*buffers.add(i) as *mut [u8; PAGE_SIZE]) };
    let kind = keys::local::with_cipher(&t.file, t.temp, |cipher| {
        for i in 0..nblocks as usize {
            let block = blocknum + i as u32;
            // Raised as Rust panics: the borrow is released on the way out.
            match page::decrypt(cipher, t.file.rel, forknum, block, page_at(i)) {
                page::Decrypted::Done => {}
                page::Decrypted::NotMarked => TdeError::NotMarked { file: t.file, fork: forknum, block }.raise(),
                // The free space map is a hint that PostgreSQL itself zeroes
                // when a page is bad (RBM_ZERO_ON_ERROR); a standby may keep
                // FSM pages the primary's rotation never rewrote.
                page::Decrypted::NoVersion if forknum == pg_sys::ForkNumber::FSM_FORKNUM => page_at(i).fill(0),
                page::Decrypted::NoVersion => {
                    TdeError::VersionUnavailable { file: t.file, fork: forknum, block }.raise()
                }
            }
        }
    });
    match kind {
        Kind::Encrypted => {}
        Kind::Unavailable => unavailable(&t, forknum, "read"),
        Kind::Plain => {
            for i in 0..nblocks as usize {
                if page::is_marked(page_at(i)) {
                    // As for a key version that is not live: the FSM is a
                    // hint PostgreSQL zeroes when bad (a standby may keep
                    // FSM pages that tde_decrypt_table never rewrote).
                    if forknum == pg_sys::ForkNumber::FSM_FORKNUM {
                        page_at(i).fill(0);
                        continue;
                    }
                    marked_without_key(&t, forknum, blocknum + i as u32);
                }
            }
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_writev(
    reln: SMgrRelation,
    forknum: ForkNumber,
    blocknum: BlockNumber,
    buffers: *mut *const c_void,
    nblocks: BlockNumber,
    skip_fsync: bool,
) {
    // SAFETY: reln is valid for the duration of the call.
    let t = unsafe { target(reln) };
    // SAFETY: smgr.c passes nblocks page pointers.
    let srcs = unsafe { std::slice::from_raw_parts(buffers as *const *const c_void, nblocks as usize) };
    let mut done = 0usize;
    while done < srcs.len() {
        let n = (srcs.len() - done).min(BOUNCE_PAGES);
        let first = blocknum + done as u32;
        let (kind, mut ptrs) = encrypt_into_bounce(&t, forknum, first, &srcs[done..done + n]);
        match kind {
            // SAFETY: forwarding smgr.c's arguments unchanged, with nothing of
            // ours alive (src/pg/).
            Kind::Plain => return unsafe { pg::mdwritev(reln, forknum, blocknum, buffers, nblocks, skip_fsync) },
            Kind::Unavailable => unavailable(&t, forknum, "write"),
            // SAFETY: ptrs[..n] point at our bounce pages, which stay valid
            // and untouched until mdwritev returns; no borrow is held.
            Kind::Encrypted => unsafe { pg::mdwritev(reln, forknum, first, ptrs.as_mut_ptr(), n as u32, skip_fsync) },
        }
        done += n;
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_extend(
    reln: SMgrRelation,
    forknum: ForkNumber,
    blocknum: BlockNumber,
    buffer: *const c_void,
    skip_fsync: bool,
) {
    // SAFETY: reln is valid for the duration of the call.
    let t = unsafe { target(reln) };
    let (kind, ptrs) = encrypt_into_bounce(&t, forknum, blocknum, &[buffer]);
    match kind {
        // SAFETY: forwarding smgr.c's arguments unchanged (src/pg/).
        Kind::Plain => unsafe { pg::mdextend(reln, forknum, blocknum, buffer, skip_fsync) },
        Kind::Unavailable => unavailable(&t, forknum, "extend"),
        // SAFETY: our bounce page stays valid until mdextend returns.
        Kind::Encrypted => unsafe { pg::mdextend(reln, forknum, blocknum, ptrs[0], skip_fsync) },
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_unlink(rlocator: pg_sys::RelFileLocatorBackend, forknum: ForkNumber, is_redo: bool) {
    // SAFETY: forwarding smgr.c's arguments unchanged (src/pg/).
    unsafe { pg::mdunlink(rlocator, forknum, is_redo) };
    // smgrdounlinkall unlinks fork by fork, main first; InvalidForkNumber
    // means all forks.  Once the main fork is gone the key has no use.
    if forknum == pg_sys::ForkNumber::MAIN_FORKNUM || forknum == pg_sys::ForkNumber::InvalidForkNumber {
        keys::forget(&rlocator.locator, rlocator.backend != pg_sys::INVALID_PROC_NUMBER);
    }
}
