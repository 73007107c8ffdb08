//! The shared key table and key cache algorithms, over slots the caller provides.
//!
//! Why this exists: the server keeps, in shared memory (src/keys/shmem.rs),
//!
//! - the *key table*: one entry per encrypted relation file, with its table
//!   key **wrapped** by the KEK -- the key store's image, which must never
//!   say "no key" for a file that has one; and
//! - the *key cache*: a bounded number of **unwrapped** table keys
//!   (`tde.key_cache_size`), evicted by the clock algorithm PostgreSQL's
//!   buffer manager uses (an approximation of least-recently-used).
//!
//! A lookup finds the file in the table (absent: the file is plain), then
//! its key in the cache; a cache miss unwraps the table's copy with the KEK
//! and caches it, evicting (and zeroizing) another key.  So how many keys
//! are unwrapped at once is bounded, but whether a file is encrypted is
//! never decided by the cache.
//!
//! The hashing, probing, insertion, removal and eviction are plain
//! computation over slices, so they live here, where `cargo test` checks
//! them without a server; the server keeps only the memory, the locks and
//! `mlock`.
//!
//! Table layout: open addressing with linear probing and tombstones.  A slot
//! whose bytes are all zero is free, so a zero-filled region is an empty
//! table.  The table holds at most `max` entries and is given more slots than
//! that (the server uses twice as many), so a probe always reaches a free
//! slot.  Removal leaves a tombstone, which insertion reuses.
//!
//! A [`CacheSlot`] holds an unwrapped key: it is neither `Clone` nor `Copy`,
//! and its key leaves only through [`KeyCacheView::get`] into a zeroizing
//! buffer.

use std::sync::atomic::{AtomicU8, Ordering};

use zeroize::{Zeroize, Zeroizing};

use crate::keystore::FileId;
use crate::secret::TABLE_KEY_LEN;
use crate::wrap::WRAPPED_TABLE_KEY_LEN;

const FREE: u8 = 0;
const USED: u8 = 1;
const DELETED: u8 = 2;

/// One table entry, `repr(C)` because it lives in shared memory.  Holds a
/// wrapped key only.
#[repr(C)]
pub struct Slot {
    state: u8,
    /// The wrapped key failed to unwrap (tampered or foreign entry).
    bad: u8,
    /// 0: encrypted; 1: encrypting; 2: decrypting (keystore::Phase).
    phase: u8,
    _pad: [u8; 1],
    /// 1 + index of the cache slot that last held this key (0: none).  Only
    /// a hint: the cache slot says whose key it holds.
    cache: u32,
    file: [u32; 3],
    version: u32,
    key_id: u64,
    created: i64,
    wrapped: [u8; WRAPPED_TABLE_KEY_LEN],
    /// The previous live version (0: none), its wrapped key and cache hint.
    prev_version: u32,
    prev_cache: u32,
    prev_wrapped: [u8; WRAPPED_TABLE_KEY_LEN],
}

impl Slot {
    /// A free slot (all zero bytes), for building a table outside shared memory.
    pub const FREE: Slot = Slot {
        state: FREE,
        bad: 0,
        phase: 0,
        _pad: [0; 1],
        cache: 0,
        file: [0; 3],
        version: 0,
        key_id: 0,
        created: 0,
        wrapped: [0; WRAPPED_TABLE_KEY_LEN],
        prev_version: 0,
        prev_cache: 0,
        prev_wrapped: [0; WRAPPED_TABLE_KEY_LEN],
    };

    fn file(&self) -> FileId {
        FileId { spc: self.file[0], db: self.file[1], rel: self.file[2] }
    }
}

/// Metadata of one key, as the SQL views show it (never the key itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub file: FileId,
    pub key_id: u64,
    pub version: u32,
    pub created: i64,
    /// False if the key is known to be unusable (it failed to unwrap).
    pub usable: bool,
}

/// One live version of an entry's key, as a lookup sees it.
#[derive(Clone, Copy)]
pub struct Version {
    pub version: u32,
    /// The cache slot that may hold the unwrapped key.
    pub cache: Option<u32>,
    pub wrapped: [u8; WRAPPED_TABLE_KEY_LEN],
}

/// A table entry as a lookup sees it.
pub struct Entry {
    /// Index of the table slot, for [`KeyTable::set_cache`] and friends.
    pub slot: usize,
    pub key_id: u64,
    pub created: i64,
    pub bad: bool,
    /// 0: encrypted; 1: encrypting; 2: decrypting.
    pub phase: u8,
    pub current: Version,
    /// The previous version, while a rotation is in progress.
    pub previous: Option<Version>,
}

impl Entry {
    pub fn version(&self) -> u32 {
        self.current.version
    }
}

/// The table is full: it holds `0` entries already.
#[derive(Debug, PartialEq, Eq)]
pub struct TableFull(pub u32);

/// A view of the table: its slots and its count of used entries.
pub struct KeyTable<'a> {
    slots: &'a mut [Slot],
    used: &'a mut u32,
    max: u32,
}

fn hash(f: &FileId) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for v in [f.spc, f.db, f.rel] {
        h = (h ^ u64::from(v)).wrapping_mul(0x0100_0000_01b3);
        h ^= h >> 29;
    }
    h
}

impl<'a> KeyTable<'a> {
    /// `slots` must be more than `max` (so probes end); `used` is the count
    /// kept beside them.
    pub fn new(slots: &'a mut [Slot], used: &'a mut u32, max: u32) -> KeyTable<'a> {
        assert!(slots.len() > max as usize, "a key table needs more slots than entries");
        KeyTable { slots, used, max }
    }

    fn start(&self, f: &FileId) -> usize {
        (hash(f) % self.slots.len() as u64) as usize
    }

    fn probe(&self, f: &FileId) -> Option<usize> {
        let n = self.slots.len();
        let mut i = self.start(f);
        for _ in 0..n {
            match self.slots[i].state {
                FREE => return None,
                USED if self.slots[i].file() == *f => return Some(i),
                _ => i = (i + 1) % n,
            }
        }
        None
    }

    pub fn capacity(&self) -> u32 {
        self.max
    }

    pub fn used(&self) -> u32 {
        *self.used
    }

    pub fn contains(&self, f: &FileId) -> bool {
        self.probe(f).is_some()
    }

    /// The entry of `f`; None means the file is not encrypted.
    pub fn get(&self, f: &FileId) -> Option<Entry> {
        let i = self.probe(f)?;
        let s = &self.slots[i];
        Some(Entry {
            slot: i,
            key_id: s.key_id,
            created: s.created,
            bad: s.bad != 0,
            phase: s.phase,
            current: Version { version: s.version, cache: s.cache.checked_sub(1), wrapped: s.wrapped },
            previous: (s.prev_version != 0).then(|| Version {
                version: s.prev_version,
                cache: s.prev_cache.checked_sub(1),
                wrapped: s.prev_wrapped,
            }),
        })
    }

    /// Remembers which cache slot holds version `version` of the key of
    /// table slot `slot`.
    pub fn set_cache(&mut self, slot: usize, version: u32, cache: u32) {
        let s = &mut self.slots[slot];
        if s.version == version {
            s.cache = cache + 1;
        } else if s.prev_version == version {
            s.prev_cache = cache + 1;
        }
    }

    /// Sets the phase of table slot `slot` (0 encrypted, 1 encrypting, 2
    /// decrypting); `insert` resets it to 0.
    pub fn set_phase(&mut self, slot: usize, phase: u8) {
        self.slots[slot].phase = phase;
    }

    /// Marks the key of table slot `slot` as failing to unwrap.
    pub fn mark_bad(&mut self, slot: usize) {
        self.slots[slot].bad = 1;
    }

    /// Inserts or replaces the entry of `info.file` (version `info.version`,
    /// and the previous live version if given).  A replaced entry forgets
    /// its cache slots, so an old key is never served for it.
    pub fn insert(
        &mut self,
        info: &KeyInfo,
        wrapped: &[u8; WRAPPED_TABLE_KEY_LEN],
        previous: Option<(u32, &[u8; WRAPPED_TABLE_KEY_LEN])>,
    ) -> Result<(), TableFull> {
        let idx = match self.probe(&info.file) {
            Some(i) => i,
            None => {
                if *self.used >= self.max {
                    return Err(TableFull(self.max));
                }
                let n = self.slots.len();
                let mut i = self.start(&info.file);
                while self.slots[i].state == USED {
                    i = (i + 1) % n;
                }
                *self.used += 1;
                i
            }
        };
        let s = &mut self.slots[idx];
        s.state = USED;
        s.bad = 0;
        s.phase = 0;
        s.cache = 0;
        s.file = [info.file.spc, info.file.db, info.file.rel];
        s.key_id = info.key_id;
        s.version = info.version;
        s.created = info.created;
        s.wrapped.copy_from_slice(wrapped);
        s.prev_cache = 0;
        match previous {
            Some((v, w)) => {
                s.prev_version = v;
                s.prev_wrapped.copy_from_slice(w);
            }
            None => {
                s.prev_version = 0;
                s.prev_wrapped.zeroize();
            }
        }
        Ok(())
    }

    /// Removes the entry of `f`.  Returns its cache slot hints (current and
    /// previous version) if it was there.
    pub fn remove(&mut self, f: &FileId) -> Option<[Option<u32>; 2]> {
        let i = self.probe(f)?;
        let s = &mut self.slots[i];
        let hints = [s.cache.checked_sub(1), s.prev_cache.checked_sub(1)];
        *s = Slot::FREE;
        s.state = DELETED;
        *self.used -= 1;
        Some(hints)
    }

    /// Empties the table.
    pub fn clear(&mut self) {
        for s in self.slots.iter_mut() {
            *s = Slot::FREE;
        }
        *self.used = 0;
    }

    /// Metadata of every entry.
    pub fn list(&self) -> Vec<KeyInfo> {
        self.slots
            .iter()
            .filter(|s| s.state == USED)
            .map(|s| KeyInfo {
                file: s.file(),
                key_id: s.key_id,
                version: s.version,
                created: s.created,
                usable: s.bad == 0,
            })
            .collect()
    }
}

/// One cached unwrapped key, `repr(C)` because it lives in shared memory.
#[repr(C)]
pub struct CacheSlot {
    used: u8,
    /// Set by every hit (under a shared lock, hence atomic), cleared by the
    /// clock hand: a key used since the hand last passed gets another round.
    referenced: AtomicU8,
    _pad: [u8; 2],
    file: [u32; 3],
    version: u32,
    key_id: u64,
    tek: [u8; TABLE_KEY_LEN],
}

impl CacheSlot {
    /// A free slot (all zero bytes), for building a cache outside shared memory.
    pub fn free() -> CacheSlot {
        CacheSlot {
            used: 0,
            referenced: AtomicU8::new(0),
            _pad: [0; 2],
            file: [0; 3],
            version: 0,
            key_id: 0,
            tek: [0; TABLE_KEY_LEN],
        }
    }

    fn holds(&self, f: &FileId, key_id: u64, version: u32) -> bool {
        self.used == 1 && self.file == [f.spc, f.db, f.rel] && self.key_id == key_id && self.version == version
    }

    fn wipe(&mut self) {
        self.tek.zeroize();
        self.used = 0;
        self.file = [0; 3];
        self.key_id = 0;
        self.version = 0;
        self.referenced.store(0, Ordering::Relaxed);
    }
}

/// Read access to the cache (a shared lock is enough).
pub struct KeyCacheView<'a> {
    slots: &'a [CacheSlot],
}

impl<'a> KeyCacheView<'a> {
    pub fn new(slots: &'a [CacheSlot]) -> KeyCacheView<'a> {
        KeyCacheView { slots }
    }

    /// Version `version` of key `key_id` of `f`, if cache slot `i` holds it;
    /// marks it referenced.
    pub fn get(&self, i: u32, f: &FileId, key_id: u64, version: u32) -> Option<Zeroizing<[u8; TABLE_KEY_LEN]>> {
        let s = self.slots.get(i as usize)?;
        if !s.holds(f, key_id, version) {
            return None;
        }
        s.referenced.store(1, Ordering::Relaxed);
        Some(Zeroizing::new(s.tek))
    }

    /// How many slots hold a key.
    pub fn used(&self) -> usize {
        self.slots.iter().filter(|s| s.used == 1).count()
    }
}

/// Write access to the cache (the lock held exclusively).
pub struct KeyCache<'a> {
    slots: &'a mut [CacheSlot],
    hand: &'a mut u32,
}

impl<'a> KeyCache<'a> {
    pub fn new(slots: &'a mut [CacheSlot], hand: &'a mut u32) -> KeyCache<'a> {
        assert!(!slots.is_empty(), "a key cache needs at least one slot");
        KeyCache { slots, hand }
    }

    /// Caches `tek` as the key of `f`; returns the slot used and whether
    /// another key was evicted (and zeroized) to make room.
    pub fn insert(&mut self, f: &FileId, key_id: u64, version: u32, tek: &[u8; TABLE_KEY_LEN]) -> (u32, bool) {
        let n = self.slots.len() as u32;
        // Two turns of the hand always find a victim: the first clears every
        // reference bit it passes.
        let mut victim = *self.hand % n;
        for _ in 0..2 * n {
            let i = *self.hand % n;
            *self.hand = (i + 1) % n;
            let s = &self.slots[i as usize];
            if s.used == 0 || s.referenced.swap(0, Ordering::Relaxed) == 0 {
                victim = i;
                break;
            }
        }
        let s = &mut self.slots[victim as usize];
        let evicted = s.used == 1;
        s.wipe();
        s.used = 1;
        s.file = [f.spc, f.db, f.rel];
        s.key_id = key_id;
        s.version = version;
        s.tek.copy_from_slice(tek);
        s.referenced.store(1, Ordering::Relaxed);
        (victim, evicted)
    }

    /// Zeroizes slot `i` if it holds the key of `f` (the file was dropped).
    pub fn forget(&mut self, i: u32, f: &FileId) {
        if let Some(s) = self.slots.get_mut(i as usize) {
            if s.used == 1 && s.file == [f.spc, f.db, f.rel] {
                s.wipe();
            }
        }
    }

    /// Zeroizes every slot (the store was locked or reloaded).
    pub fn clear(&mut self) {
        for s in self.slots.iter_mut() {
            s.wipe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(n: usize) -> Vec<Slot> {
        (0..n).map(|_| Slot::FREE).collect()
    }

    fn cslots(n: usize) -> Vec<CacheSlot> {
        (0..n).map(|_| CacheSlot::free()).collect()
    }

    fn info(rel: u32) -> KeyInfo {
        KeyInfo { file: FileId { spc: 1663, db: 5, rel }, key_id: u64::from(rel), version: 1, created: 7, usable: true }
    }

    fn wrapped(b: u8) -> [u8; WRAPPED_TABLE_KEY_LEN] {
        [b; WRAPPED_TABLE_KEY_LEN]
    }

    fn key(b: u8) -> [u8; TABLE_KEY_LEN] {
        [b; TABLE_KEY_LEN]
    }

    #[test]
    fn insert_get_remove() {
        let (mut s, mut used) = (slots(32), 0);
        let mut t = KeyTable::new(&mut s, &mut used, 16);
        assert!(t.get(&info(1).file).is_none());
        t.insert(&info(1), &wrapped(1), None).unwrap();
        t.insert(&info(2), &wrapped(2), None).unwrap();
        let e = t.get(&info(1).file).unwrap();
        assert_eq!((e.key_id, e.current.wrapped, e.bad, e.current.cache), (1, wrapped(1), false, None));
        assert!(e.previous.is_none());
        t.mark_bad(t.get(&info(2).file).unwrap().slot);
        assert!(t.get(&info(2).file).unwrap().bad, "a key that failed to unwrap stays known, never plain");
        assert_eq!(t.used(), 2);
        // Replacing keeps the count and forgets the cache hint.
        let slot = t.get(&info(1).file).unwrap().slot;
        t.set_cache(slot, 1, 3);
        assert_eq!(t.get(&info(1).file).unwrap().current.cache, Some(3));
        t.insert(&info(1), &wrapped(9), None).unwrap();
        assert_eq!(t.used(), 2);
        let e = t.get(&info(1).file).unwrap();
        assert_eq!((e.current.wrapped, e.current.cache), (wrapped(9), None));
        assert_eq!(t.remove(&info(1).file), Some([None, None]));
        assert_eq!(t.remove(&info(1).file), None);
        assert!(!t.contains(&info(1).file));
        assert!(t.contains(&info(2).file));
        assert_eq!(t.used(), 1);
    }

    #[test]
    fn two_live_versions() {
        let (mut s, mut used) = (slots(32), 0);
        let mut t = KeyTable::new(&mut s, &mut used, 16);
        let v2 = KeyInfo { version: 2, ..info(1) };
        t.insert(&v2, &wrapped(2), Some((1, &wrapped(1)))).unwrap();
        let e = t.get(&info(1).file).unwrap();
        assert_eq!((e.version(), e.current.wrapped), (2, wrapped(2)));
        let p = e.previous.unwrap();
        assert_eq!((p.version, p.wrapped, p.cache), (1, wrapped(1), None));
        t.set_cache(e.slot, 1, 5);
        t.set_cache(e.slot, 2, 6);
        let e = t.get(&info(1).file).unwrap();
        assert_eq!((e.current.cache, e.previous.unwrap().cache), (Some(6), Some(5)));
        t.set_cache(e.slot, 7, 9); // no such version: ignored
        t.set_phase(e.slot, 2);
        assert_eq!(t.get(&info(1).file).unwrap().phase, 2);
        // Retiring: the entry again with one version.
        t.insert(&v2, &wrapped(2), None).unwrap();
        let e = t.get(&info(1).file).unwrap();
        assert!(e.previous.is_none());
        assert_eq!(e.current.cache, None, "a replaced entry forgets its cache slots");
        assert_eq!(t.remove(&info(1).file), Some([None, None]));
    }

    #[test]
    fn full_table_refuses_and_keeps_everything() {
        let (mut s, mut used) = (slots(32), 0);
        let mut t = KeyTable::new(&mut s, &mut used, 16);
        for rel in 0..16 {
            t.insert(&info(rel), &wrapped(rel as u8), None).unwrap();
        }
        assert_eq!(t.insert(&info(99), &wrapped(0), None), Err(TableFull(16)));
        for rel in 0..16 {
            assert_eq!(t.get(&info(rel).file).unwrap().current.wrapped, wrapped(rel as u8), "entry {rel} survived");
        }
        // Replacing an existing entry is still possible when full.
        t.insert(&info(3), &wrapped(0), None).unwrap();
    }

    #[test]
    fn tombstones_are_reused_and_do_not_hide_entries() {
        let (mut s, mut used) = (slots(8), 0);
        let mut t = KeyTable::new(&mut s, &mut used, 7);
        // Many rounds of insert/remove on a small table: probes must still find
        // every live entry behind tombstones, and never loop.
        for round in 0..200u32 {
            for rel in 0..5 {
                t.insert(&info(round * 10 + rel), &wrapped(rel as u8), None).unwrap();
            }
            for rel in 0..5 {
                assert!(t.contains(&info(round * 10 + rel).file));
            }
            for rel in 0..5 {
                assert!(t.remove(&info(round * 10 + rel).file).is_some());
            }
            assert_eq!(t.used(), 0);
        }
    }

    #[test]
    fn list_shows_metadata_only() {
        let (mut s, mut used) = (slots(32), 0);
        let mut t = KeyTable::new(&mut s, &mut used, 16);
        t.insert(&info(5), &wrapped(1), None).unwrap();
        t.insert(&info(6), &wrapped(2), None).unwrap();
        t.mark_bad(t.get(&info(6).file).unwrap().slot);
        let mut l = t.list();
        l.sort_by_key(|k| k.file);
        assert_eq!(l, vec![info(5), KeyInfo { usable: false, ..info(6) }]);
    }

    #[test]
    fn zeroed_memory_is_an_empty_table_and_cache() {
        assert_eq!(std::mem::size_of::<Slot>() % 8, 0);
        assert_eq!(std::mem::size_of::<CacheSlot>() % 8, 0);
        let (mut s, mut used) = (slots(4), 0);
        let t = KeyTable::new(&mut s, &mut used, 3);
        assert!(t.list().is_empty());
        assert!(!t.contains(&FileId { spc: 0, db: 0, rel: 0 }), "an all-zero slot is free, not file 0/0/0");
        let c = cslots(4);
        let v = KeyCacheView::new(&c);
        assert!(v.get(0, &FileId { spc: 0, db: 0, rel: 0 }, 0, 0).is_none(), "an all-zero cache slot holds no key");
        assert_eq!(v.used(), 0);
    }

    #[test]
    fn cache_hits_its_own_key_only() {
        let (mut c, mut hand) = (cslots(4), 0);
        let f = info(1).file;
        let (i, evicted) = KeyCache::new(&mut c, &mut hand).insert(&f, 1, 1, &key(0xAA));
        assert!(!evicted);
        let v = KeyCacheView::new(&c);
        assert_eq!(*v.get(i, &f, 1, 1).unwrap(), key(0xAA));
        assert!(v.get(i, &f, 2, 1).is_none(), "another key version is a miss");
        assert!(v.get(i, &info(2).file, 1, 1).is_none(), "another file is a miss");
        assert!(v.get(99, &f, 1, 1).is_none());
    }

    #[test]
    fn clock_evicts_unreferenced_keys_and_zeroizes_them() {
        let (mut c, mut hand) = (cslots(3), 0);
        let mut at = Vec::new();
        for rel in 0..3u32 {
            let (i, ev) =
                KeyCache::new(&mut c, &mut hand).insert(&info(rel).file, u64::from(rel), 1, &key(rel as u8 + 1));
            assert!(!ev);
            at.push(i);
        }
        // All three are referenced (just inserted): the hand clears them in
        // one turn and evicts the first it reaches on the second.
        let (i, ev) = KeyCache::new(&mut c, &mut hand).insert(&info(10).file, 10, 1, &key(0x10));
        assert!(ev);
        assert_eq!(i, at[0]);
        // Touch file 2, so file 1 is the next victim.
        assert!(KeyCacheView::new(&c).get(at[2], &info(2).file, 2, 1).is_some());
        let (i, ev) = KeyCache::new(&mut c, &mut hand).insert(&info(11).file, 11, 1, &key(0x11));
        assert!(ev);
        assert_eq!(i, at[1], "the unreferenced key is evicted, the recently used one kept");
        let v = KeyCacheView::new(&c);
        assert!(v.get(at[2], &info(2).file, 2, 1).is_some());
        assert_eq!(v.used(), 3);
        assert!(c.iter().all(|s| !s.tek.contains(&1) && !s.tek.contains(&2)), "evicted keys leave no bytes");
    }

    #[test]
    fn forget_and_clear_zeroize() {
        let (mut c, mut hand) = (cslots(4), 0);
        let (i, _) = KeyCache::new(&mut c, &mut hand).insert(&info(1).file, 1, 1, &key(0xAA));
        let (j, _) = KeyCache::new(&mut c, &mut hand).insert(&info(2).file, 2, 1, &key(0xBB));
        KeyCache::new(&mut c, &mut hand).forget(i, &info(3).file);
        assert!(KeyCacheView::new(&c).get(i, &info(1).file, 1, 1).is_some(), "forget checks the owner");
        KeyCache::new(&mut c, &mut hand).forget(i, &info(1).file);
        assert!(c.iter().all(|s| !s.tek.contains(&0xAA)));
        KeyCache::new(&mut c, &mut hand).clear();
        assert!(KeyCacheView::new(&c).get(j, &info(2).file, 2, 1).is_none());
        assert!(c.iter().all(|s| s.tek.iter().all(|&b| b == 0)));
    }
}
