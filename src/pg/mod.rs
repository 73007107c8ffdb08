//! Declarations of PostgreSQL functions that pgrx's bindings do not give us
//! in the form we need, in one place.
//!
//! Why this file exists: pgrx wraps every function of `pg_sys` in an FFI
//! guard that catches a PostgreSQL ERROR (a longjmp) and turns it into a Rust
//! panic, which pgrx raises again as a *new* ERROR when it reaches the next
//! `#[pg_guard]` boundary.  That is right for calls made in the middle of
//! tde's own logic, where Rust values must be dropped on the way out.  It is
//! wrong for the calls tde only passes through -- md.c's I/O under the
//! storage manager, standard_ProcessUtility under the utility hook -- because
//! the re-raised copy loses the cursor position, CONTEXT and QUERY of the
//! original, and PostgreSQL must behave as if tde were not there.
//!
//! So the functions below are declared *without* a guard, and the rule for
//! calling them is the C one: an ERROR raised inside them propagates
//! untouched, straight through the caller's frames.  Therefore
//!
//! - a caller holds no `RefCell` borrow, no lock guard and no value with a
//!   destructor across the call (the frames in between must be "plain old
//!   frames", which a longjmp may skip);
//! - any state the caller needs is set up before the call and finished after
//!   it returns.
//!
//! Every call site says so in its `// SAFETY:` comment.

use std::ffi::{c_char, c_int, c_void};

use pgrx::pg_sys;

pub type BlockNumber = pg_sys::BlockNumber;
pub type ForkNumber = pg_sys::ForkNumber::Type;
pub type SMgrRelation = pg_sys::SMgrRelation;

// md.c's entry points (storage/md.h, exported by the server binary).
extern "C-unwind" {
    pub fn mdopen(reln: SMgrRelation);
    pub fn mdclose(reln: SMgrRelation, forknum: ForkNumber);
    pub fn mdcreate(reln: SMgrRelation, forknum: ForkNumber, is_redo: bool);
    pub fn mdexists(reln: SMgrRelation, forknum: ForkNumber) -> bool;
    pub fn mdunlink(rlocator: pg_sys::RelFileLocatorBackend, forknum: ForkNumber, is_redo: bool);
    pub fn mdextend(
        reln: SMgrRelation,
        forknum: ForkNumber,
        blocknum: BlockNumber,
        buffer: *const c_void,
        skip_fsync: bool,
    );
    pub fn mdzeroextend(
        reln: SMgrRelation,
        forknum: ForkNumber,
        blocknum: BlockNumber,
        nblocks: c_int,
        skip_fsync: bool,
    );
    pub fn mdprefetch(reln: SMgrRelation, forknum: ForkNumber, blocknum: BlockNumber, nblocks: c_int) -> bool;
    pub fn mdreadv(
        reln: SMgrRelation,
        forknum: ForkNumber,
        blocknum: BlockNumber,
        buffers: *mut *mut c_void,
        nblocks: BlockNumber,
    );
    pub fn mdwritev(
        reln: SMgrRelation,
        forknum: ForkNumber,
        blocknum: BlockNumber,
        buffers: *mut *const c_void,
        nblocks: BlockNumber,
        skip_fsync: bool,
    );
    pub fn mdwriteback(reln: SMgrRelation, forknum: ForkNumber, blocknum: BlockNumber, nblocks: BlockNumber);
    pub fn mdnblocks(reln: SMgrRelation, forknum: ForkNumber) -> BlockNumber;
    pub fn mdtruncate(reln: SMgrRelation, forknum: ForkNumber, old_blocks: BlockNumber, nblocks: BlockNumber);
    pub fn mdimmedsync(reln: SMgrRelation, forknum: ForkNumber);
    pub fn mdregistersync(reln: SMgrRelation, forknum: ForkNumber);
}

// storage/checksum.h: pure computation, never raises an ERROR.
extern "C-unwind" {
    pub fn pg_checksum_page(page: *mut c_char, blkno: BlockNumber) -> u16;
}

// commands/sequence.h: rewrites a sequence into a new file.
extern "C-unwind" {
    pub fn SequenceChangePersistence(relid: pg_sys::Oid, newrelpersistence: c_char);
}

// tcop/utility.h: the utility hook passes statements through to this.
extern "C-unwind" {
    pub fn standard_ProcessUtility(
        pstmt: *mut pg_sys::PlannedStmt,
        query_string: *const c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        query_env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
}

/// `AddinShmemInitLock`, a macro in C (`&MainLWLockArray[21].lock`, from the
/// generated lwlocknames.h).  The index is checked against the lock's name
/// on every call, so a PostgreSQL that renumbered its locks is refused
/// instead of silently taking the wrong lock.
pub fn addin_shmem_init_lock() -> *mut pg_sys::LWLock {
    const ADDIN_SHMEM_INIT_LOCK: usize = 21;
    // SAFETY: GetLWLockIdentifier returns a static string for a main-tranche
    // id; MainLWLockArray is set up before any shmem_startup_hook runs and
    // has NUM_INDIVIDUAL_LWLOCKS > 21 entries (checked by the name).
    unsafe {
        let name = pg_sys::GetLWLockIdentifier(pg_sys::PG_WAIT_LWLOCK, ADDIN_SHMEM_INIT_LOCK as u16);
        let ok = !name.is_null() && std::ffi::CStr::from_ptr(name) == c"AddinShmemInit";
        if !ok {
            crate::error::TdeError::Internal(
                "this PostgreSQL build does not have AddinShmemInitLock at MainLWLockArray[21]".into(),
            )
            .raise();
        }
        &raw mut (*pg_sys::MainLWLockArray.add(ADDIN_SHMEM_INIT_LOCK)).lock
    }
}

// postmaster/bgwriter.h, which pgrx's bindings leave out.
extern "C-unwind" {
    fn RequestCheckpoint(flags: c_int);
}

/// Requests an immediate checkpoint and waits for it to complete (what
/// CHECKPOINT does).  Guarded: an ERROR becomes a Rust panic, so callers may
/// hold values with destructors.
pub fn request_checkpoint_and_wait() {
    let flags = (pg_sys::CHECKPOINT_IMMEDIATE | pg_sys::CHECKPOINT_FORCE | pg_sys::CHECKPOINT_WAIT) as c_int;
    // SAFETY: RequestCheckpoint may be called by any backend; the guard
    // converts an ERROR into a Rust panic.
    unsafe { pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| RequestCheckpoint(flags)) }
}
