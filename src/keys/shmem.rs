//! The shared key table and key cache, in shared memory.
//!
//! Why it exists: every process that reads or writes pages (backends, the
//! checkpointer, the background writer, the startup process) needs the key
//! of an encrypted relation file, and none of them may depend on a database
//! connection.  The region holds:
//!
//! - the **key table**: every key of the key store, *wrapped* by the KEK --
//!   the store's image, complete by construction (a store that does not fit
//!   is refused, keys/store.rs), so "not in the table" means "plain";
//! - the **key cache**: at most `tde.key_cache_size` *unwrapped* keys,
//!   evicted by a clock hand and zeroized on eviction.  A miss unwraps the
//!   table's copy with the KEK; it never means "plain";
//! - the KEK and the key store's authentication key while unlocked, and the
//!   key store file's position (generation, last tag, length), which only
//!   the holder of the store lock uses.
//!
//! Locking: two LWLocks of the named tranche "tde".
//!
//! - The *table lock* protects the table, the cache and the state.  Lookups
//!   take it shared (a cache miss, exclusively, for one unwrap); updates take
//!   it exclusively, and only for the few instructions that change the table
//!   -- never across WAL inserts, file writes or provider calls, so a slow
//!   disk or KMS does not stall the lookups of every process.
//! - The *store lock* serialises changes to the key store (keys/store.rs):
//!   it is held from reading the file position to updating the table, so the
//!   file, the WAL and the table change in one order.  Order: store lock,
//!   then table lock; never the other way.
//!
//! `generation` is atomic so that backends can check their private cipher
//! caches (keys/local.rs) without any lock; writers bump it after a change
//! that could make a cached answer wrong (a key added or removed, a state
//! change).  Cache evictions do not bump it: an evicted key is unchanged.
//!
//! The region is `mlock`ed and marked `MADV_DONTDUMP`, so unwrapped keys are
//! neither swapped out nor written into core dumps.
//!
//! Layout: header, table slots, cache slots.  The algorithms over those
//! slots are tde-core's `keytable`, tested without a server; this file only
//! finds the memory, takes the locks, unwraps on a miss and counts.

use std::ffi::CStr;
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::pg_sys;
use tde_core::audit::{AuditKey, Head, CHAIN_LEN};
use tde_core::keystore::{tek_aad, FileId};
use tde_core::keytable::{CacheSlot, Entry, KeyCache, KeyCacheView, KeyTable, Slot, Version};
use tde_core::secret::{TableKey, WrapKey};
use tde_core::storefile::{AuthKey, TAG_LEN};
use tde_core::wrap::{unwrap_table_key, WRAPPED_TABLE_KEY_LEN};
use zeroize::Zeroize;

const TRANCHE: &CStr = c"tde";
const REASON_LEN: usize = 512;
const STORE_ID_LEN: usize = 64;

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

/// Where the key store file stands.  Read and written only under the store
/// lock (and copied out, never borrowed).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct StoreMeta {
    pub exists: bool,
    pub has_principal: bool,
    /// Appended since the last fsync (the checkpoint makes it durable).
    pub dirty: bool,
    pub generation: u64,
    pub next_key_id: u64,
    store_id: [u8; STORE_ID_LEN],
    /// Tag of the last frame in the file: the next frame chains to it.
    pub last_tag: [u8; TAG_LEN],
    pub file_len: u64,
    pub snapshot_len: u64,
    /// Frames waiting in the queue (`pending`), and the end of their WAL.
    pub pending_len: u64,
    pub pending_lsn: u64,
    /// The audit trail: whether the store has an audit key, the head (last
    /// record sealed), the last record in the audit log file, and the lines
    /// waiting in the audit queue (appended with the frames).
    pub has_audit_key: bool,
    pub audit_seq: u64,
    pub audit_chain: [u8; CHAIN_LEN],
    pub audit_file_seq: u64,
    pub audit_pending_len: u64,
    /// How often the file was replaced whole (compaction, master-key
    /// rotation): a compaction planned before a replacement is abandoned.
    pub rewrites: u64,
}

impl StoreMeta {
    pub const NONE: StoreMeta = StoreMeta {
        exists: false,
        has_principal: false,
        dirty: false,
        generation: 0,
        next_key_id: 1,
        store_id: [0; STORE_ID_LEN],
        last_tag: [0; TAG_LEN],
        file_len: 0,
        snapshot_len: 0,
        pending_len: 0,
        pending_lsn: 0,
        has_audit_key: false,
        audit_seq: 0,
        audit_chain: [0; CHAIN_LEN],
        audit_file_seq: 0,
        audit_pending_len: 0,
        rewrites: 0,
    };

    pub fn audit_head(&self) -> Head {
        Head { seq: self.audit_seq, chain: self.audit_chain }
    }

    pub fn store_id(&self) -> String {
        let end = self.store_id.iter().position(|&b| b == 0).unwrap_or(STORE_ID_LEN);
        String::from_utf8_lossy(&self.store_id[..end]).into_owned()
    }

    pub fn set_store_id(&mut self, id: &str) {
        self.store_id = [0; STORE_ID_LEN];
        let n = id.len().min(STORE_ID_LEN);
        self.store_id[..n].copy_from_slice(&id.as_bytes()[..n]);
    }
}

#[repr(C)]
struct Header {
    generation: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    state: u32,
    nslots: u32,
    used: u32,
    max_keys: u32,
    ncache: u32,
    hand: u32,
    kek: [u8; 32],
    auth: [u8; 32],
    /// The audit trail's HMAC key while unlocked (all zeros: none).
    audit: [u8; 32],
    has_audit: u32,
    reason: [u8; REASON_LEN],
    /// Copy of the store id readable under the table lock (for unwrapping).
    store_id: [u8; STORE_ID_LEN],
    meta: StoreMeta,
}

pub use tde_core::keytable::{KeyInfo, TableFull};

/// What a lookup found.
pub enum Found {
    NotEncrypted,
    Keys(Keys),
    /// Encrypted, but the key cannot be used (store locked, bad wrap).
    Unavailable,
}

/// The live versions of a file's key: the current one, which encrypts, and
/// the previous one while a rotation is in progress.
pub struct Keys {
    pub current: (u32, TableKey),
    pub previous: Option<(u32, TableKey)>,
    /// 0: encrypted; 1: encrypting; 2: decrypting (keystore::Phase).
    pub phase: u8,
}

/// A key table entry without key material.
pub struct EntryInfo {
    pub key_id: u64,
    pub version: u32,
    pub previous: Option<u32>,
    pub phase: u8,
}

/// Cache counters, for `tde_key_cache()`.
pub struct CacheStats {
    pub size: u32,
    pub used: u32,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

static mut HEADER: *mut Header = std::ptr::null_mut();
static mut LOCK: *mut pg_sys::LWLock = std::ptr::null_mut();
static mut STORE_LOCK: *mut pg_sys::LWLock = std::ptr::null_mut();

fn nslots_for(max_keys: u32) -> u32 {
    max_keys.saturating_mul(2).max(16)
}

fn table_offset() -> usize {
    size_of::<Header>().next_multiple_of(8)
}

fn cache_offset(max_keys: u32) -> usize {
    table_offset() + nslots_for(max_keys) as usize * size_of::<Slot>()
}

/// Bytes of frames that wait for their WAL to be flushed before they are
/// appended to the key store file (keys/store.rs).
pub const QUEUE_BYTES: usize = 256 * 1024;

fn queue_offset(max_keys: u32, cache_size: u32) -> usize {
    cache_offset(max_keys) + cache_size.max(1) as usize * size_of::<CacheSlot>()
}

/// Bytes of audit log lines that wait, with the frames, for their WAL.
pub const AUDIT_QUEUE_BYTES: usize = 128 * 1024;

/// Bytes of shared memory needed, for RequestAddinShmemSpace.
pub fn size(max_keys: u32, cache_size: u32) -> usize {
    queue_offset(max_keys, cache_size) + QUEUE_BYTES + AUDIT_QUEUE_BYTES
}

/// Called from the shmem_request hook.
pub fn request(max_keys: u32, cache_size: u32) {
    // SAFETY: called in the postmaster's shmem_request_hook, where these two
    // requests are allowed.
    unsafe {
        pg_sys::RequestAddinShmemSpace(size(max_keys, cache_size));
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 2);
    }
}

/// Called from the shmem_startup hook (postmaster, and again after a crash
/// restart).  Returns true if the region was just created and must be filled.
pub fn attach(max_keys: u32, cache_size: u32) -> bool {
    let mut found = false;
    let bytes = size(max_keys, cache_size);
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
            (*ptr).ncache = cache_size.max(1);
            (*ptr).meta = StoreMeta::NONE;
            protect_region(ptr as *mut u8, bytes, "the key table");
        }
        HEADER = ptr;
        pg_sys::LWLockRelease(addin_lock);
    }
    !found
}

/// Keeps a region that holds keys out of swap and core dumps.  Failure to
/// mlock (a low RLIMIT_MEMLOCK) is reported once, when the region is made,
/// and is not fatal.
///
/// # Safety
/// `ptr..ptr + len` lies in PostgreSQL's shared memory mapping.
pub unsafe fn protect_region(ptr: *mut u8, len: usize, what: &str) {
    let page = 4096usize;
    let start = (ptr as usize) & !(page - 1);
    let end = (ptr as usize + len + page - 1) & !(page - 1);
    // SAFETY: [start, end) covers our own shared memory struct, rounded out
    // to page boundaries inside PostgreSQL's shared memory mapping.
    let rc_dump = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTDUMP) };
    // SAFETY: as above.
    let rc_lock = unsafe { libc::mlock(start as *const libc::c_void, end - start) };
    if rc_dump != 0 || rc_lock != 0 {
        pgrx::log!(
            "tde: could not mlock/madvise {what} ({} bytes, RLIMIT_MEMLOCK?); keys may reach swap or core dumps",
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

/// `with_store_lock`, if the store lock is free right now.
pub fn try_with_store_lock<R>(f: impl FnOnce(&StoreLock) -> R) -> Option<R> {
    // SAFETY: plain read of a pointer set once in attach(); a conditional
    // acquire that returns whether it got the lock.
    let lock = unsafe { STORE_LOCK };
    // SAFETY: as above.
    if !unsafe { pg_sys::LWLockConditionalAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE) } {
        return None;
    }
    let s = StoreLock(Guard(lock));
    Some(f(&s))
}

/// The header.  Callers hold the table lock for every field but the
/// atomics, and the store lock for `meta`.
fn h() -> *mut Header {
    // SAFETY: plain read of a pointer set once in attach(), in the
    // postmaster, before any child was forked.
    unsafe { HEADER }
}

pub fn is_attached() -> bool {
    !h().is_null()
}

/// The table over this region's slots.  Caller holds the table lock
/// (exclusively to change anything).
fn table() -> KeyTable<'static> {
    // SAFETY: HEADER points at our region (set in attach()); the slots follow
    // the header, nslots of them, inside the region sized by size().  The
    // table lock, which the caller holds, serialises every access to the
    // slots and `used`.
    unsafe {
        let h = h();
        let first = (h as *mut u8).add(table_offset()) as *mut Slot;
        let slots = std::slice::from_raw_parts_mut(first, (*h).nslots as usize);
        KeyTable::new(slots, &mut (*h).used, (*h).max_keys)
    }
}

fn cache_slots() -> *mut CacheSlot {
    // SAFETY: the cache slots follow the table slots inside the region
    // sized by size() (attach() stored max_keys and ncache).
    unsafe { (h() as *mut u8).add(cache_offset((*h()).max_keys)) as *mut CacheSlot }
}

/// Read access to the cache; caller holds the table lock (shared is enough:
/// hits only set atomic reference bits).
fn cache_view() -> KeyCacheView<'static> {
    // SAFETY: ncache slots at cache_slots(), inside our region; writers hold
    // the table lock exclusively, which excludes this shared reader.
    unsafe { KeyCacheView::new(std::slice::from_raw_parts(cache_slots(), (*h()).ncache as usize)) }
}

/// Write access to the cache; caller holds the table lock exclusively.
fn cache(_x: &Exclusive) -> KeyCache<'static> {
    // SAFETY: as in cache_view(), with the lock held exclusively.
    unsafe {
        let slots = std::slice::from_raw_parts_mut(cache_slots(), (*h()).ncache as usize);
        KeyCache::new(slots, &mut (*h()).hand)
    }
}

#[derive(Clone, Copy)]
enum Counter {
    Generation,
    Hits,
    Misses,
    Evictions,
}

/// One of the header's atomics; they need no lock.
fn counter(c: Counter) -> &'static AtomicU64 {
    let hd = h();
    // SAFETY: the atomics live in our shared region for the life of the
    // process; only a raw place is formed, never a reference to the header.
    unsafe {
        &*match c {
            Counter::Generation => &raw const (*hd).generation,
            Counter::Hits => &raw const (*hd).hits,
            Counter::Misses => &raw const (*hd).misses,
            Counter::Evictions => &raw const (*hd).evictions,
        }
    }
}

pub fn generation() -> u64 {
    counter(Counter::Generation).load(Ordering::Acquire)
}

fn bump() {
    counter(Counter::Generation).fetch_add(1, Ordering::AcqRel);
}

/// Whether the key store is locked, read without the table lock: a hint
/// for the planner's statistics hooks (statistics.rs), where a stale answer
/// costs one plan with default estimates or one clear error.
pub fn is_locked_hint() -> bool {
    if !is_attached() {
        return false;
    }
    // SAFETY: the header lives as long as the server; a volatile read of an
    // aligned u32 field cannot tear.
    unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*h()).state)) == 2 }
}

fn state_locked() -> StoreState {
    // SAFETY: caller holds the table lock.
    match unsafe { (*h()).state } {
        1 => StoreState::Unlocked,
        2 => StoreState::Locked,
        _ => StoreState::Empty,
    }
}

fn store_id_locked() -> String {
    // SAFETY: caller holds the table lock.
    let id = unsafe { &(*h()).store_id };
    let end = id.iter().position(|&b| b == 0).unwrap_or(STORE_ID_LEN);
    String::from_utf8_lossy(&id[..end]).into_owned()
}

fn kek_inner() -> Option<WrapKey> {
    if state_locked() != StoreState::Unlocked {
        return None;
    }
    // SAFETY: caller holds the table lock; the KEK is written only under it.
    WrapKey::from_bytes(unsafe { &(*h()).kek }).ok()
}

fn cached(f: &FileId, key_id: u64, v: &Version) -> Option<(u32, TableKey)> {
    let k = v.cache.and_then(|c| cache_view().get(c, f, key_id, v.version))?;
    TableKey::from_bytes(&k[..]).ok().map(|k| (v.version, k))
}

/// What the table and the cache say about `f` (caller holds the table lock,
/// either mode); None: a cache miss on a usable key.
fn lookup(f: &FileId) -> Option<Found> {
    let Some(e) = table().get(f) else { return Some(Found::NotEncrypted) };
    if e.bad || state_locked() != StoreState::Unlocked {
        return Some(Found::Unavailable);
    }
    let current = cached(f, e.key_id, &e.current)?;
    let previous = match &e.previous {
        Some(p) => Some(cached(f, e.key_id, p)?),
        None => None,
    };
    counter(Counter::Hits).fetch_add(1, Ordering::Relaxed);
    Some(Found::Keys(Keys { current, previous, phase: e.phase }))
}

/// Version `v` of `e`'s key, from the cache or unwrapped into it.  Caller
/// holds the table lock exclusively.
fn load_version(x: &Exclusive, f: &FileId, e: &Entry, v: &Version, kek: &WrapKey) -> Option<(u32, TableKey)> {
    if let Some(k) = cached(f, e.key_id, v) {
        return Some(k);
    }
    let aad = tek_aad(&store_id_locked(), f, e.key_id, v.version);
    let tek = unwrap_table_key(kek, &v.wrapped, &aad).ok()?;
    counter(Counter::Misses).fetch_add(1, Ordering::Relaxed);
    let (i, evicted) = cache(x).insert(f, e.key_id, v.version, tek.expose());
    if evicted {
        counter(Counter::Evictions).fetch_add(1, Ordering::Relaxed);
    }
    table().set_cache(e.slot, v.version, i);
    Some((v.version, tek))
}

/// Looks a relation file up: absent from the table means plain; present
/// means its live keys, from the cache or unwrapped into it, or Unavailable.
pub fn find(f: &FileId) -> Found {
    if let Some(found) = {
        let _g = Guard::new(false);
        lookup(f)
    } {
        return found;
    }
    with_exclusive(|x| {
        // Again: it may have changed, or another process cached it, meanwhile.
        if let Some(found) = lookup(f) {
            return found;
        }
        let Some(e) = table().get(f) else { return Found::NotEncrypted };
        let Some(kek) = kek_inner() else { return Found::Unavailable };
        let current = load_version(x, f, &e, &e.current, &kek);
        let previous = e.previous.as_ref().map(|p| load_version(x, f, &e, p, &kek));
        match (current, previous) {
            (Some(current), None) => Found::Keys(Keys { current, previous: None, phase: e.phase }),
            (Some(current), Some(Some(p))) => Found::Keys(Keys { current, previous: Some(p), phase: e.phase }),
            _ => {
                table().mark_bad(e.slot);
                pgrx::warning!("tde: the key of relation file {f} does not unwrap (tampered key store?)");
                Found::Unavailable
            }
        }
    })
}

/// The key table's entry of `f` (no key material), for rotation.
pub fn entry(f: &FileId) -> Option<EntryInfo> {
    let _g = Guard::new(false);
    table().get(f).map(|e| EntryInfo {
        key_id: e.key_id,
        version: e.version(),
        previous: e.previous.map(|p| p.version),
        phase: e.phase,
    })
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

/// How many entries are in use (stable while the store lock is held: the
/// table changes only under it).
pub fn used() -> u32 {
    let _g = Guard::new(false);
    table().used()
}

/// Inserts or replaces an entry, and caches its key if given (a key just
/// made is about to be used).  Caller holds the lock exclusively.
pub fn insert(
    x: &Exclusive,
    info: &KeyInfo,
    wrapped: &[u8; WRAPPED_TABLE_KEY_LEN],
    previous: Option<(u32, &[u8; WRAPPED_TABLE_KEY_LEN])>,
    tek: Option<&TableKey>,
) -> Result<(), TableFull> {
    let mut t = table();
    if let Some(e) = t.get(&info.file) {
        // Zeroize the cached keys of what is replaced.
        for c in [e.current.cache, e.previous.and_then(|p| p.cache)].into_iter().flatten() {
            cache(x).forget(c, &info.file);
        }
    }
    t.insert(info, wrapped, previous)?;
    if let (Some(tek), Some(e)) = (tek, t.get(&info.file)) {
        let (i, evicted) = cache(x).insert(&info.file, info.key_id, info.version, tek.expose());
        if evicted {
            counter(Counter::Evictions).fetch_add(1, Ordering::Relaxed);
        }
        t.set_cache(e.slot, info.version, i);
    }
    bump();
    Ok(())
}

/// A new current version of `f`'s key; the current one becomes the
/// previous (still live).  Caller holds the lock exclusively.
pub fn rotate(
    x: &Exclusive,
    f: &FileId,
    version: u32,
    created: i64,
    wrapped: &[u8; WRAPPED_TABLE_KEY_LEN],
    tek: Option<&TableKey>,
) {
    let Some(e) = table().get(f) else { return };
    if e.version() >= version {
        return; // replayed already
    }
    let info = KeyInfo { file: *f, key_id: e.key_id, version, created, usable: true };
    let old = e.current;
    // Replacing an entry in place cannot overflow the table.
    let _ = insert(x, &info, wrapped, Some((old.version, &old.wrapped)), tek);
    table().set_phase(e.slot, e.phase);
}

/// Sets the phase of `f` (0 encrypted, 1 encrypting, 2 decrypting).
/// Caller holds the lock exclusively.
pub fn set_phase(_x: &Exclusive, f: &FileId, phase: u8) {
    if let Some(e) = table().get(f) {
        table().set_phase(e.slot, phase);
        bump();
    }
}

/// Retires the previous version of `f`'s key, if it is `version`.  Caller
/// holds the lock exclusively.
pub fn retire(x: &Exclusive, f: &FileId, version: u32) {
    let Some(e) = table().get(f) else { return };
    if e.previous.map(|p| p.version) != Some(version) {
        return;
    }
    if let Some(c) = e.previous.and_then(|p| p.cache) {
        cache(x).forget(c, f);
    }
    let info = KeyInfo { file: *f, key_id: e.key_id, version: e.version(), created: e.created, usable: true };
    let current = e.current;
    let _ = table().insert(&info, &current.wrapped, None);
    if let Some(c) = current.cache {
        table().set_cache(e.slot, current.version, c);
    }
    table().set_phase(e.slot, e.phase);
    bump();
}

/// Removes an entry if present, zeroizing its cached key.  Caller holds the
/// lock exclusively.
pub fn remove(x: &Exclusive, f: &FileId) {
    if let Some(hints) = table().remove(f) {
        for i in hints.into_iter().flatten() {
            cache(x).forget(i, f);
        }
        bump();
    }
}

/// Empties the table and the cache (before a reload).  Caller holds the
/// lock exclusively.
pub fn clear(x: &Exclusive) {
    table().clear();
    cache(x).clear();
    bump();
}

fn set_state(state: StoreState, reason: &str) {
    // SAFETY: callers hold the table lock exclusively (an `Exclusive`).
    let hd = unsafe { &mut *h() };
    hd.state = state as u32;
    hd.reason.zeroize();
    let n = reason.len().min(REASON_LEN - 1);
    hd.reason[..n].copy_from_slice(&reason.as_bytes()[..n]);
}

/// The KEK is available: keys can be unwrapped, and the key store's
/// authentication key (derived from it) is kept beside it.
pub fn set_unlocked(_x: &Exclusive, kek: &WrapKey, store_id: &str) {
    let auth = AuthKey::derive(kek, store_id);
    // SAFETY: the caller holds the table lock exclusively.
    let hd = unsafe { &mut *h() };
    hd.kek.copy_from_slice(kek.expose());
    hd.auth.copy_from_slice(auth.expose());
    set_state(StoreState::Unlocked, "");
    bump();
}

/// The audit trail's key, unwrapped (keys/store.rs).
pub fn set_audit_key(_x: &Exclusive, key: &AuditKey) {
    // SAFETY: the caller holds the table lock exclusively.
    let hd = unsafe { &mut *h() };
    hd.audit.copy_from_slice(key.expose());
    hd.has_audit = 1;
}

fn forget_secrets(hd: &mut Header) {
    hd.kek.zeroize();
    hd.auth.zeroize();
    hd.audit.zeroize();
    hd.has_audit = 0;
}

pub fn set_locked(x: &Exclusive, reason: &str) {
    // SAFETY: the caller holds the table lock exclusively.
    let hd = unsafe { &mut *h() };
    forget_secrets(hd);
    cache(x).clear();
    set_state(StoreState::Locked, reason);
    bump();
}

pub fn set_empty(x: &Exclusive) {
    // SAFETY: the caller holds the table lock exclusively.
    let hd = unsafe { &mut *h() };
    forget_secrets(hd);
    cache(x).clear();
    set_state(StoreState::Empty, "");
    bump();
}

/// The key store file's position.  Only the store lock holder uses it.
pub fn meta(_s: &StoreLock) -> StoreMeta {
    // SAFETY: `meta` is read and written only under the store lock, held.
    unsafe { (*h()).meta }
}

/// Records the key store file's position (after a write or a load); the
/// store id is also copied where lookups read it.
pub fn set_meta(_s: &StoreLock, m: &StoreMeta) {
    with_exclusive(|_x| {
        // SAFETY: store lock and table lock held, as readers of either need.
        let hd = unsafe { &mut *h() };
        hd.meta = *m;
        hd.store_id = m.store_id;
    });
}

/// The two queues of bytes waiting for their WAL to be flushed
/// (keys/store.rs): key store frames, and audit log lines.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    Frames,
    Audit,
}

/// Where a queue starts, and its size.
fn queue_region(q: Queue) -> (*mut u8, usize) {
    // SAFETY: the frame queue (QUEUE_BYTES) then the audit queue
    // (AUDIT_QUEUE_BYTES) lie at queue_offset() inside our region (size()).
    unsafe {
        let frames = (h() as *mut u8).add(queue_offset((*h()).max_keys, (*h()).ncache));
        match q {
            Queue::Frames => (frames, QUEUE_BYTES),
            Queue::Audit => (frames.add(QUEUE_BYTES), AUDIT_QUEUE_BYTES),
        }
    }
}

/// Copies `bytes` into queue `q` at offset `at`.  Only the store lock
/// holder uses the queues.
pub fn queue_write(_s: &StoreLock, q: Queue, at: usize, bytes: &[u8]) {
    let (ptr, len) = queue_region(q);
    assert!(at + bytes.len() <= len, "key store queue overflow");
    // SAFETY: in bounds (checked above); the store lock, held, serialises
    // every access to the queue; `bytes` is not in the queue.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr.add(at), bytes.len()) };
}

/// The first `n` bytes of queue `q`.
pub fn queue_read(_s: &StoreLock, q: Queue, n: usize) -> Vec<u8> {
    let (ptr, len) = queue_region(q);
    assert!(n <= len, "key store queue overflow");
    // SAFETY: in bounds; the store lock, held, serialises access.
    unsafe { std::slice::from_raw_parts(ptr, n) }.to_vec()
}

/// The audit trail's key, if the store is unlocked and has one.
pub fn audit_key() -> Option<AuditKey> {
    let _g = Guard::new(false);
    // SAFETY: the table lock is held; `audit` is written only under it.
    let hd = unsafe { &*h() };
    (state_locked() == StoreState::Unlocked && hd.has_audit == 1).then(|| AuditKey::from_bytes(&hd.audit))
}

/// The key store's authentication key, if unlocked.
pub fn auth_key() -> Option<AuthKey> {
    let _g = Guard::new(false);
    if state_locked() != StoreState::Unlocked {
        return None;
    }
    // SAFETY: the table lock is held; `auth` is written only under it.
    Some(AuthKey::from_bytes(unsafe { &(*h()).auth }))
}

/// The state and, when locked, why.
pub fn state() -> (StoreState, String) {
    let _g = Guard::new(false);
    // SAFETY: the table lock is held.
    let reason = unsafe { &(*h()).reason };
    let end = reason.iter().position(|&b| b == 0).unwrap_or(REASON_LEN);
    (state_locked(), String::from_utf8_lossy(&reason[..end]).into_owned())
}

/// A copy of the KEK if the store is unlocked.
pub fn kek() -> Option<WrapKey> {
    let _g = Guard::new(false);
    kek_inner()
}

/// Metadata of every key (for the SQL views); a key is usable if the store
/// is unlocked and the key is not known to be bad.
pub fn list() -> Vec<KeyInfo> {
    let _g = Guard::new(false);
    let unlocked = state_locked() == StoreState::Unlocked;
    let mut l = table().list();
    for k in l.iter_mut() {
        k.usable &= unlocked;
    }
    l
}

/// The live keys of `f`, for re-wrapping (CREATE DATABASE FILE_COPY).
pub fn keys_of(f: &FileId) -> Option<Keys> {
    match find(f) {
        Found::Keys(k) => Some(k),
        _ => None,
    }
}

/// The key cache's size and counters.
pub fn cache_stats() -> CacheStats {
    let _g = Guard::new(false);
    // SAFETY: the table lock is held.
    let size = unsafe { (*h()).ncache };
    CacheStats {
        size,
        used: cache_view().used() as u32,
        hits: counter(Counter::Hits).load(Ordering::Relaxed),
        misses: counter(Counter::Misses).load(Ordering::Relaxed),
        evictions: counter(Counter::Evictions).load(Ordering::Relaxed),
    }
}
