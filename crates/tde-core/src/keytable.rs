//! The shared key table's algorithm, over slots the caller provides.
//!
//! Why this exists: the server keeps every unwrapped table key in one region
//! of shared memory (src/keys/shmem.rs), which all processes read and which
//! must never tell "no key" for a file that has one.  The hashing, probing,
//! insertion and removal are plain computation over a slice of slots, so
//! they live here, where `cargo test` checks them without a server; the
//! server side keeps only the shared memory, the lock and `mlock`.
//!
//! Layout: open addressing with linear probing and tombstones.  A slot whose
//! bytes are all zero is free, so a zero-filled region is an empty table.
//! The table holds at most `max` entries and is given more slots than that
//! (the server uses twice as many), so a probe always reaches a free slot.
//! Removal zeroes the key and leaves a tombstone, which insertion reuses.
//!
//! A [`Slot`] holds an unwrapped key: it is neither `Clone` nor `Copy`, and
//! its key leaves only through [`KeyTable::key`] into a zeroizing buffer.

use zeroize::{Zeroize, Zeroizing};

use crate::keystore::FileId;
use crate::secret::TABLE_KEY_LEN;

const FREE: u8 = 0;
const USED: u8 = 1;
const DELETED: u8 = 2;

/// One entry, `repr(C)` because it lives in shared memory.
#[repr(C)]
pub struct Slot {
    state: u8,
    has_key: u8,
    file: [u32; 3],
    key_id: u64,
    version: u32,
    created: i64,
    tek: [u8; TABLE_KEY_LEN],
}

impl Slot {
    /// A free slot (all zero bytes), for building a table outside shared memory.
    pub const FREE: Slot =
        Slot { state: FREE, has_key: 0, file: [0; 3], key_id: 0, version: 0, created: 0, tek: [0; TABLE_KEY_LEN] };

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
    /// Whether the unwrapped key is present (false: known, but locked or
    /// failed to unwrap).
    pub usable: bool,
}

/// What a lookup found.
pub enum Found {
    NotEncrypted,
    Key(Zeroizing<[u8; TABLE_KEY_LEN]>),
    /// Encrypted, but the key cannot be used (store locked, bad wrap).
    Unavailable,
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

    pub fn find(&self, f: &FileId) -> Found {
        match self.probe(f) {
            None => Found::NotEncrypted,
            Some(i) if self.slots[i].has_key == 1 => Found::Key(Zeroizing::new(self.slots[i].tek)),
            Some(_) => Found::Unavailable,
        }
    }

    /// The unwrapped key of `f`, if present and usable.
    pub fn key(&self, f: &FileId) -> Option<Zeroizing<[u8; TABLE_KEY_LEN]>> {
        match self.find(f) {
            Found::Key(k) => Some(k),
            _ => None,
        }
    }

    /// Inserts or replaces the entry of `info.file`, with its key if given.
    pub fn insert(&mut self, info: &KeyInfo, tek: Option<&[u8; TABLE_KEY_LEN]>) -> Result<(), TableFull> {
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
        s.file = [info.file.spc, info.file.db, info.file.rel];
        s.key_id = info.key_id;
        s.version = info.version;
        s.created = info.created;
        match tek {
            Some(k) => {
                s.tek.copy_from_slice(k);
                s.has_key = 1;
            }
            None => {
                s.tek.zeroize();
                s.has_key = 0;
            }
        }
        Ok(())
    }

    /// Removes the entry of `f`, zeroing its key.  Returns whether it was there.
    pub fn remove(&mut self, f: &FileId) -> bool {
        let Some(i) = self.probe(f) else { return false };
        let s = &mut self.slots[i];
        s.tek.zeroize();
        s.has_key = 0;
        s.state = DELETED;
        *self.used -= 1;
        true
    }

    /// Empties the table, zeroing every key.
    pub fn clear(&mut self) {
        for s in self.slots.iter_mut() {
            s.tek.zeroize();
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
                usable: s.has_key == 1,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(n: usize) -> Vec<Slot> {
        (0..n).map(|_| Slot::FREE).collect()
    }

    fn info(rel: u32) -> KeyInfo {
        KeyInfo { file: FileId { spc: 1663, db: 5, rel }, key_id: u64::from(rel), version: 1, created: 7, usable: true }
    }

    fn key(b: u8) -> [u8; TABLE_KEY_LEN] {
        [b; TABLE_KEY_LEN]
    }

    #[test]
    fn insert_find_remove() {
        let (mut s, mut used) = (slots(32), 0);
        let mut t = KeyTable::new(&mut s, &mut used, 16);
        assert!(matches!(t.find(&info(1).file), Found::NotEncrypted));
        t.insert(&info(1), Some(&key(1))).unwrap();
        t.insert(&info(2), None).unwrap();
        assert!(matches!(t.find(&info(1).file), Found::Key(k) if *k == key(1)));
        assert!(matches!(t.find(&info(2).file), Found::Unavailable), "a known file without its key is never plain");
        assert_eq!(t.used(), 2);
        // Replacing keeps the count.
        t.insert(&info(1), Some(&key(9))).unwrap();
        assert_eq!(t.used(), 2);
        assert_eq!(*t.key(&info(1).file).unwrap(), key(9));
        assert!(t.remove(&info(1).file));
        assert!(!t.remove(&info(1).file));
        assert!(!t.contains(&info(1).file));
        assert!(t.contains(&info(2).file));
        assert_eq!(t.used(), 1);
    }

    #[test]
    fn full_table_refuses_and_keeps_everything() {
        let (mut s, mut used) = (slots(32), 0);
        let mut t = KeyTable::new(&mut s, &mut used, 16);
        for rel in 0..16 {
            t.insert(&info(rel), Some(&key(rel as u8))).unwrap();
        }
        assert_eq!(t.insert(&info(99), None), Err(TableFull(16)));
        for rel in 0..16 {
            assert_eq!(*t.key(&info(rel).file).unwrap(), key(rel as u8), "entry {rel} survived");
        }
        // Replacing an existing entry is still possible when full.
        t.insert(&info(3), None).unwrap();
    }

    #[test]
    fn tombstones_are_reused_and_do_not_hide_entries() {
        let (mut s, mut used) = (slots(8), 0);
        let mut t = KeyTable::new(&mut s, &mut used, 7);
        // Many rounds of insert/remove on a small table: probes must still find
        // every live entry behind tombstones, and never loop.
        for round in 0..200u32 {
            for rel in 0..5 {
                t.insert(&info(round * 10 + rel), Some(&key(rel as u8))).unwrap();
            }
            for rel in 0..5 {
                assert!(t.contains(&info(round * 10 + rel).file));
            }
            for rel in 0..5 {
                assert!(t.remove(&info(round * 10 + rel).file));
            }
            assert_eq!(t.used(), 0);
        }
    }

    #[test]
    fn removed_and_cleared_keys_are_zeroed() {
        let (mut s, mut used) = (slots(32), 0);
        {
            let mut t = KeyTable::new(&mut s, &mut used, 16);
            t.insert(&info(1), Some(&key(0xAA))).unwrap();
            t.insert(&info(2), Some(&key(0xBB))).unwrap();
            t.remove(&info(1).file);
        }
        assert!(s.iter().all(|slot| !slot.tek.contains(&0xAA)), "a removed key leaves no bytes behind");
        {
            let mut t = KeyTable::new(&mut s, &mut used, 16);
            t.clear();
            assert!(t.list().is_empty());
        }
        assert!(s.iter().all(|slot| slot.tek.iter().all(|&b| b == 0)));
    }

    #[test]
    fn list_shows_metadata_only() {
        let (mut s, mut used) = (slots(32), 0);
        let mut t = KeyTable::new(&mut s, &mut used, 16);
        t.insert(&info(5), Some(&key(1))).unwrap();
        t.insert(&info(6), None).unwrap();
        let mut l = t.list();
        l.sort_by_key(|k| k.file);
        assert_eq!(l, vec![info(5), KeyInfo { usable: false, ..info(6) }]);
    }

    #[test]
    fn zeroed_memory_is_an_empty_table() {
        assert_eq!(std::mem::size_of::<Slot>() % 8, 0);
        let (mut s, mut used) = (slots(4), 0);
        let t = KeyTable::new(&mut s, &mut used, 3);
        assert!(t.list().is_empty());
        assert!(!t.contains(&FileId { spc: 0, db: 0, rel: 0 }), "an all-zero slot is free, not file 0/0/0");
    }
}
