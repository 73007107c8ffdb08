//! The shared key table: unwrapped table keys in shared memory.
//!
//! Why it exists: every process that reads or writes pages (backends, the
//! checkpointer, the background writer, the startup process) needs the key
//! of an encrypted relation file, and none of them may depend on a database
//! connection.  The postmaster loads the key store into this table at start;
//! changes (new keys, drops, redo) update it under the lock.
//!
//! Locking: two LWLocks of the named tranche "tde".
//!
//! - The *table lock* protects every field of the region except
//!   `generation`.  Lookups take it shared; updates take it exclusively, and
//!   only for the few instructions that change the table -- never across
//!   WAL flushes, fsyncs or provider calls, so a slow disk or KMS does not
//!   stall the lookups of every process.
//! - The *store lock* serialises changes to the key store (keys/store.rs):
//!   it is held, exclusively, from reading the key store file to updating
//!   the table, so the file, the WAL and the table change in one order.
//!   Order: store lock, then table lock; never the other way.
//!
//! `generation` is atomic so that backends can check their private cipher
//! caches (keys/local.rs) without any lock; writers bump it after each
//! change, holding the table lock exclusively.
//!
//! The region is `mlock`ed and marked `MADV_DONTDUMP`, so unwrapped keys are
//! neither swapped out nor written into core dumps.
//!
//! Layout: a header followed by `nslots` slots.  The table algorithm over
//! those slots (open addressing, linear probing, tombstones) is tde-core's
//! `keytable`, tested without a server; this file only finds the memory,
//! takes the lock and bumps `generation`.

use std::ffi::CStr;
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::pg_sys;
use tde_core::keystore::FileId;
use tde_core::keytable::{KeyTable, Slot};
use tde_core::secret::{TableKey, WrapKey};
use zeroize::Zeroize;

const TRANCHE: &CStr = c"tde";
const REASON_LEN: usize = 512;

/// The key store's state as this server sees it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum StoreState {
    /// No key store yet (no master key was ever set).
    Empty = 0,
    /// The KEK is unwrapped; keys are usable.
    Unlocked = 1,
    /// The master key could not unwrap the KEK; encrypted relations are
    /// known but unreadable.
    Locked = 2,
}

#[repr(C)]
struct Header {
    generation: AtomicU64,
    state: u32,
    nslots: u32,
    used: u32,
    max_keys: u32,
    kek: [u8; 32],
    reason: [u8; REASON_LEN],
    /// Generation and id of the key store file as last saved or loaded
    /// (keys/store.rs); read by the checkpointer.
    store_generation: u64,
    store_id: [u8; STORE_ID_LEN],
}

const STORE_ID_LEN: usize = 64;

pub use tde_core::keytable::{Found, KeyInfo, TableFull};

static mut HEADER: *mut Header = std::ptr::null_mut();
static mut LOCK: *mut pg_sys::LWLock = std::ptr::null_mut();
static mut STORE_LOCK: *mut pg_sys::LWLock = std::ptr::null_mut();

fn nslots_for(max_keys: u32) -> u32 {
    max_keys.saturating_mul(2).max(16)
}

/// Bytes of shared memory needed, for RequestAddinShmemSpace.
pub fn size(max_keys: u32) -> usize {
    size_of::<Header>() + nslots_for(max_keys) as usize * size_of::<Slot>()
}

/// Called from the shmem_request hook.
pub fn request(max_keys: u32) {
    // SAFETY: called in the postmaster's shmem_request_hook, where these two
    // requests are allowed.
    unsafe {
        pg_sys::RequestAddinShmemSpace(size(max_keys));
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 2);
    }
}

/// Called from the shmem_startup hook (postmaster, and again after a crash
/// restart).  Returns true if the table was just created and must be filled.
pub fn attach(max_keys: u32) -> bool {
    let mut found = false;
    let bytes = size(max_keys);
    // SAFETY: ShmemInitStruct and GetNamedLWLockTranche are called with
    // AddinShmemInitLock held, as PostgreSQL requires; the region has the
    // size we requested in `request`.
    unsafe {
        let addin_lock = crate::pg::addin_shmem_init_lock();
        pg_sys::LWLockAcquire(addin_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let ptr = pg_sys::ShmemInitStruct(c"tde key table".as_ptr(), bytes, &mut found) as *mut Header;
        let locks = pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr());
        LOCK = &raw mut (*locks).lock;
        STORE_LOCK = &raw mut (*locks.add(1)).lock;
        if !found {
            std::ptr::write_bytes(ptr as *mut u8, 0, bytes);
            (*ptr).nslots = nslots_for(max_keys);
            (*ptr).max_keys = max_keys;
            protect_region(ptr as *mut u8, bytes);
        }
        HEADER = ptr;
        pg_sys::LWLockRelease(addin_lock);
    }
    !found
}

/// Keeps the key region out of swap and core dumps.  Failure to mlock (a
/// low RLIMIT_MEMLOCK) is reported, not fatal.
unsafe fn protect_region(ptr: *mut u8, len: usize) {
    let page = 4096usize;
    let start = (ptr as usize) & !(page - 1);
    let end = (ptr as usize + len + page - 1) & !(page - 1);
    // SAFETY: [start, end) covers our own shared memory struct, rounded out
    // to page boundaries inside PostgreSQL's shared memory mapping.
    let rc_dump = libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTDUMP);
    let rc_lock = libc::mlock(start as *const libc::c_void, end - start);
    if rc_dump != 0 || rc_lock != 0 {
        pgrx::log!(
            "tde: could not mlock/madvise the key table ({} bytes); keys may reach swap or core dumps",
            end - start
        );
    }
}

/// A held LWLock; released on drop (and by PostgreSQL on error).
struct Guard(*mut pg_sys::LWLock);

impl Guard {
    fn acquire(lock: *mut pg_sys::LWLock, exclusive: bool) -> Guard {
        let mode = if exclusive { pg_sys::LWLockMode::LW_EXCLUSIVE } else { pg_sys::LWLockMode::LW_SHARED };
        // SAFETY: the locks were set in attach(), before any process could call us.
        unsafe { pg_sys::LWLockAcquire(lock, mode) };
        Guard(lock)
    }

    fn new(exclusive: bool) -> Guard {
        // SAFETY: plain read of a pointer set once in attach().
        Guard::acquire(unsafe { LOCK }, exclusive)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: we acquired it in acquire().  pgrx turns a PostgreSQL ERROR
        // into a Rust unwind, so this runs before the transaction abort's
        // LWLockReleaseAll and releases the lock exactly once.
        unsafe { pg_sys::LWLockRelease(self.0) };
    }
}

/// Holds the table lock exclusively, for a short update of the table.
/// See `with_exclusive`.
pub struct Exclusive(#[allow(dead_code)] Guard);

pub fn with_exclusive<R>(f: impl FnOnce(&Exclusive) -> R) -> R {
    let x = Exclusive(Guard::new(true));
    f(&x)
}

/// Holds the store lock: changes to the key store are made one at a time.
/// See `with_store_lock`.
pub struct StoreLock(#[allow(dead_code)] Guard);

/// Runs `f` with the store lock held exclusively.  `f` may take the table
/// lock (`with_exclusive`) inside, never the other way round.
pub fn with_store_lock<R>(f: impl FnOnce(&StoreLock) -> R) -> R {
    // SAFETY: plain read of a pointer set once in attach().
    let s = StoreLock(Guard::acquire(unsafe { STORE_LOCK }, true));
    f(&s)
}

fn header() -> &'static mut Header {
    // SAFETY: HEADER is set in attach() in the postmaster before any child is
    // forked; callers hold the lock for all fields but `generation`.
    unsafe { &mut *HEADER }
}

pub fn is_attached() -> bool {
    // SAFETY: plain read of a pointer set once in the postmaster.
    unsafe { !HEADER.is_null() }
}

/// The table over this region's slots.
fn table() -> KeyTable<'static> {
    // SAFETY: HEADER points at our region (set in attach(), before any child
    // was forked); the slots follow the header, nslots of them, inside the
    // region sized by size().  Callers hold the lock (exclusively to change
    // anything), which serialises every access to the slots and `used`.
    unsafe {
        let h = HEADER;
        let first = (h as *mut u8).add(size_of::<Header>()) as *mut Slot;
        let slots = std::slice::from_raw_parts_mut(first, (*h).nslots as usize);
        KeyTable::new(slots, &mut (*h).used, (*h).max_keys)
    }
}

pub fn generation() -> u64 {
    header().generation.load(Ordering::Acquire)
}

fn bump() {
    header().generation.fetch_add(1, Ordering::AcqRel);
}

/// Looks a relation file up.  Takes the lock in shared mode.
pub fn find(f: &FileId) -> Found {
    let _g = Guard::new(false);
    table().find(f)
}

/// True if the file has an entry (usable or not).
pub fn contains(f: &FileId) -> bool {
    let _g = Guard::new(false);
    table().contains(f)
}

/// How many entries the table can hold (tde.max_relation_keys).
pub fn capacity() -> u32 {
    let _g = Guard::new(false);
    table().capacity()
}

/// Same as `capacity` for a caller that holds the table lock.
pub fn capacity_locked(_x: &Exclusive) -> u32 {
    table().capacity()
}

/// How many entries are in use (stable while the store lock is held: the
/// table changes only under it).
pub fn used() -> u32 {
    let _g = Guard::new(false);
    table().used()
}

/// Inserts or replaces an entry.  Caller holds the lock exclusively.
pub fn insert(_x: &Exclusive, info: &KeyInfo, tek: Option<&TableKey>) -> Result<(), TableFull> {
    table().insert(info, tek.map(TableKey::expose))?;
    bump();
    Ok(())
}

/// Removes an entry if present.  Caller holds the lock exclusively.
pub fn remove(_x: &Exclusive, f: &FileId) {
    if table().remove(f) {
        bump();
    }
}

/// Empties the table (before a reload).  Caller holds the lock exclusively.
pub fn clear(_x: &Exclusive) {
    table().clear();
    bump();
}

pub fn set_unlocked(_x: &Exclusive, kek: &WrapKey) {
    let h = header();
    h.kek.copy_from_slice(kek.expose());
    h.state = StoreState::Unlocked as u32;
    h.reason.zeroize();
    bump();
}

pub fn set_locked(_x: &Exclusive, reason: &str) {
    let h = header();
    h.kek.zeroize();
    h.state = StoreState::Locked as u32;
    h.reason.zeroize();
    let n = reason.len().min(REASON_LEN - 1);
    h.reason[..n].copy_from_slice(&reason.as_bytes()[..n]);
    bump();
}

pub fn set_empty(_x: &Exclusive) {
    let h = header();
    h.kek.zeroize();
    h.state = StoreState::Empty as u32;
    h.reason.zeroize();
    bump();
}

/// Records the key store file's generation and id.  Caller holds the lock
/// exclusively, and has saved (or loaded) the file.
pub fn set_store_version(_x: &Exclusive, generation: u64, store_id: &str) {
    let h = header();
    h.store_generation = generation;
    h.store_id = [0; STORE_ID_LEN];
    let n = store_id.len().min(STORE_ID_LEN);
    h.store_id[..n].copy_from_slice(&store_id.as_bytes()[..n]);
}

/// The key store file's generation and id (0 and "" before it exists).
pub fn store_version() -> (u64, String) {
    let _g = Guard::new(false);
    let h = header();
    let end = h.store_id.iter().position(|&b| b == 0).unwrap_or(STORE_ID_LEN);
    (h.store_generation, String::from_utf8_lossy(&h.store_id[..end]).into_owned())
}

/// The state and, when locked, why.
pub fn state() -> (StoreState, String) {
    let _g = Guard::new(false);
    state_inner()
}

fn state_inner() -> (StoreState, String) {
    let h = header();
    let st = match h.state {
        1 => StoreState::Unlocked,
        2 => StoreState::Locked,
        _ => StoreState::Empty,
    };
    let end = h.reason.iter().position(|&b| b == 0).unwrap_or(REASON_LEN);
    (st, String::from_utf8_lossy(&h.reason[..end]).into_owned())
}

/// A copy of the KEK if the store is unlocked.
pub fn kek() -> Option<WrapKey> {
    let _g = Guard::new(false);
    let h = header();
    if h.state != StoreState::Unlocked as u32 {
        return None;
    }
    WrapKey::from_bytes(&h.kek).ok()
}

/// Same as `kek` for a caller that already holds the lock.
pub fn kek_locked(_x: &Exclusive) -> Option<WrapKey> {
    let h = header();
    if h.state != StoreState::Unlocked as u32 {
        return None;
    }
    WrapKey::from_bytes(&h.kek).ok()
}

/// Metadata of every key (for the SQL views).
pub fn list() -> Vec<KeyInfo> {
    let _g = Guard::new(false);
    table().list()
}

/// The unwrapped key of `f`, for re-wrapping (CREATE DATABASE FILE_COPY).
pub fn key_of(_x: &Exclusive, f: &FileId) -> Option<TableKey> {
    let k = table().key(f)?;
    TableKey::from_bytes(&k[..]).ok()
}
