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
//! bounce buffer is allocated once per process; the page path allocates
//! nothing.  All-zero pages (file extension) pass through unchanged.
//!
//! The page format itself (which bytes are encrypted, the tweak, data
//! checksums) is in `page.rs`.

mod page;

use std::cell::RefCell;
use std::ffi::{c_int, c_void};

use pgrx::pg_sys;
use pgrx::prelude::*;
use tde_core::keystore::FileId;
use tde_core::page::PAGE_SIZE;

use crate::keys::{self, local::Lookup};

type BlockNumber = pg_sys::BlockNumber;
type ForkNumber = pg_sys::ForkNumber::Type;
type SMgrRelation = pg_sys::SMgrRelation;

// md.c's entry points (storage/md.h, exported by the server binary).
extern "C-unwind" {
    fn mdinit();
    fn mdopen(reln: SMgrRelation);
    fn mdclose(reln: SMgrRelation, forknum: ForkNumber);
    fn mdcreate(reln: SMgrRelation, forknum: ForkNumber, is_redo: bool);
    fn mdexists(reln: SMgrRelation, forknum: ForkNumber) -> bool;
    fn mdunlink(rlocator: pg_sys::RelFileLocatorBackend, forknum: ForkNumber, is_redo: bool);
    fn mdextend(
        reln: SMgrRelation,
        forknum: ForkNumber,
        blocknum: BlockNumber,
        buffer: *const c_void,
        skip_fsync: bool,
    );
    fn mdzeroextend(reln: SMgrRelation, forknum: ForkNumber, blocknum: BlockNumber, nblocks: c_int, skip_fsync: bool);
    fn mdprefetch(reln: SMgrRelation, forknum: ForkNumber, blocknum: BlockNumber, nblocks: c_int) -> bool;
    fn mdreadv(
        reln: SMgrRelation,
        forknum: ForkNumber,
        blocknum: BlockNumber,
        buffers: *mut *mut c_void,
        nblocks: BlockNumber,
    );
    fn mdwritev(
        reln: SMgrRelation,
        forknum: ForkNumber,
        blocknum: BlockNumber,
        buffers: *mut *const c_void,
        nblocks: BlockNumber,
        skip_fsync: bool,
    );
    fn mdwriteback(reln: SMgrRelation, forknum: ForkNumber, blocknum: BlockNumber, nblocks: BlockNumber);
    fn mdnblocks(reln: SMgrRelation, forknum: ForkNumber) -> BlockNumber;
    fn mdtruncate(reln: SMgrRelation, forknum: ForkNumber, old_blocks: BlockNumber, nblocks: BlockNumber);
    fn mdimmedsync(reln: SMgrRelation, forknum: ForkNumber);
    fn mdregistersync(reln: SMgrRelation, forknum: ForkNumber);
}

/// Our table: md.c everywhere, except where page contents move.
static TDE_SMGR: pg_sys::f_smgr = pg_sys::f_smgr {
    smgr_init: Some(mdinit),
    smgr_shutdown: None,
    smgr_open: Some(mdopen),
    smgr_close: Some(mdclose),
    smgr_create: Some(mdcreate),
    smgr_exists: Some(mdexists),
    smgr_unlink: Some(tde_unlink),
    smgr_extend: Some(tde_extend),
    smgr_zeroextend: Some(mdzeroextend),
    smgr_prefetch: Some(mdprefetch),
    smgr_readv: Some(tde_readv),
    smgr_writev: Some(tde_writev),
    smgr_writeback: Some(mdwriteback),
    smgr_nblocks: Some(mdnblocks),
    smgr_truncate: Some(mdtruncate),
    smgr_immedsync: Some(mdimmedsync),
    smgr_registersync: Some(mdregistersync),
};

/// Registers the storage manager and makes it the one every relation uses.
pub fn init() {
    // SAFETY: called from _PG_init during shared_preload_libraries, the only
    // time smgr_register allows; smgr_register copies the table.
    unsafe {
        let id = pg_sys::smgr_register(&TDE_SMGR);
        pg_sys::storage_manager_id = id;
    }
}

/// Pages encrypted per md.c call; larger writes are split.
const BOUNCE_PAGES: usize = 16;

#[derive(Clone)]
#[repr(C, align(4096))]
struct AlignedPage([u8; PAGE_SIZE]);

thread_local! {
    /// Private pages that encrypted data is written from (aligned for
    /// direct I/O).  Allocated on first use, kept for the process's life.
    static BOUNCE: RefCell<Vec<AlignedPage>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this process's bounce pages, allocating them on first use.
fn with_bounce<R>(f: impl FnOnce(&mut [AlignedPage]) -> R) -> R {
    BOUNCE.with(|b| {
        let mut bounce = b.borrow_mut();
        if bounce.is_empty() {
            bounce.resize(BOUNCE_PAGES, AlignedPage([0; PAGE_SIZE]));
        }
        f(&mut bounce)
    })
}

struct Target {
    file: FileId,
    temp: bool,
}

unsafe fn target(reln: SMgrRelation) -> Target {
    // SAFETY (caller): reln is a valid SMgrRelation from smgr.c.
    let rel = unsafe { (*reln).smgr_rlocator };
    Target { file: keys::file_id(&rel.locator), temp: rel.backend != pg_sys::INVALID_PROC_NUMBER }
}

fn unavailable(t: &Target, fork: ForkNumber, action: &str) -> ! {
    let (_, why) = keys::shmem::state();
    let why = if why.is_empty() { "the key could not be unwrapped".to_string() } else { why };
    crate::error::report(
        PgLogLevel::ERROR,
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!(
            "tde: cannot {action} encrypted relation file {}/{}/{} (fork {fork}): its key is unavailable: {why}",
            t.file.spc, t.file.db, t.file.rel
        ),
        Some("Make the master key available and restart the server. Nothing was written."),
    );
    unreachable!()
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_readv(
    reln: SMgrRelation,
    forknum: ForkNumber,
    blocknum: BlockNumber,
    buffers: *mut *mut c_void,
    nblocks: BlockNumber,
) {
    // SAFETY: forwarding smgr.c's arguments unchanged.
    unsafe { mdreadv(reln, forknum, blocknum, buffers, nblocks) };
    // SAFETY: reln is valid for the duration of the call.
    let t = unsafe { target(reln) };
    keys::local::with_cipher(&t.file, t.temp, |lookup| match lookup {
        Lookup::Plain => {}
        Lookup::Unavailable => unavailable(&t, forknum, "read"),
        Lookup::Cipher(cipher) => {
            for i in 0..nblocks as usize {
                // SAFETY: md.c filled nblocks buffers of BLCKSZ bytes each;
                // they are the caller's private destination.
                let page = unsafe { &mut *(*buffers.add(i) as *mut [u8; PAGE_SIZE]) };
                page::decrypt(cipher, t.file.rel, forknum, blocknum + i as u32, page);
            }
        }
    })
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
    keys::local::with_cipher(&t.file, t.temp, |lookup| match lookup {
        // SAFETY: forwarding smgr.c's arguments unchanged.
        Lookup::Plain => unsafe { mdwritev(reln, forknum, blocknum, buffers, nblocks, skip_fsync) },
        Lookup::Unavailable => unavailable(&t, forknum, "write"),
        Lookup::Cipher(cipher) => with_bounce(|bounce| {
            let mut ptrs = [std::ptr::null::<c_void>(); BOUNCE_PAGES];
            let mut done = 0usize;
            while done < nblocks as usize {
                let n = (nblocks as usize - done).min(BOUNCE_PAGES);
                for i in 0..n {
                    let blk = blocknum + (done + i) as u32;
                    // SAFETY: smgr.c passes nblocks readable pages of BLCKSZ.
                    let src = unsafe { &*(*buffers.add(done + i) as *const [u8; PAGE_SIZE]) };
                    page::encrypt(cipher, t.file.rel, forknum, blk, src, &mut bounce[i].0);
                    ptrs[i] = bounce[i].0.as_ptr() as *const c_void;
                }
                // SAFETY: ptrs[..n] point at our bounce pages, alive until
                // mdwritev returns.
                unsafe { mdwritev(reln, forknum, blocknum + done as u32, ptrs.as_mut_ptr(), n as u32, skip_fsync) };
                done += n;
            }
        }),
    })
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
    keys::local::with_cipher(&t.file, t.temp, |lookup| match lookup {
        // SAFETY: forwarding smgr.c's arguments unchanged.
        Lookup::Plain => unsafe { mdextend(reln, forknum, blocknum, buffer, skip_fsync) },
        Lookup::Unavailable => unavailable(&t, forknum, "extend"),
        Lookup::Cipher(cipher) => with_bounce(|bounce| {
            // SAFETY: smgr.c passes one readable page of BLCKSZ bytes.
            let src = unsafe { &*(buffer as *const [u8; PAGE_SIZE]) };
            page::encrypt(cipher, t.file.rel, forknum, blocknum, src, &mut bounce[0].0);
            // SAFETY: our bounce page is alive until mdextend returns.
            unsafe { mdextend(reln, forknum, blocknum, bounce[0].0.as_ptr() as *const c_void, skip_fsync) };
        }),
    })
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_unlink(rlocator: pg_sys::RelFileLocatorBackend, forknum: ForkNumber, is_redo: bool) {
    // SAFETY: forwarding smgr.c's arguments unchanged.
    unsafe { mdunlink(rlocator, forknum, is_redo) };
    // smgrdounlinkall unlinks fork by fork, main first; InvalidForkNumber
    // means all forks.  Once the main fork is gone the key has no use.
    if forknum == pg_sys::ForkNumber::MAIN_FORKNUM || forknum == pg_sys::ForkNumber::InvalidForkNumber {
        keys::forget(&rlocator.locator, rlocator.backend != pg_sys::INVALID_PROC_NUMBER);
    }
}
