//! Per-process cache of ready page ciphers, and the keys of temp tables.
//!
//! Why it exists: the storage manager asks "is this file encrypted, and with
//! what?" for every page it reads or writes.  Asking the shared table means a
//! lock and a key-schedule expansion each time; this cache answers from
//! process memory.  It is keyed by relation file and remembers negative
//! answers too, so a plain relation costs one hash lookup per page.
//!
//! Invalidation: the shared table's `generation` changes whenever a key is
//! added or removed.  One atomic load per lookup compares it with ours and
//! empties the cache on change, so a dropped or re-keyed file is never served
//! a stale key.
//!
//! Temp tables live only in this backend (local buffers), so their keys
//! live only here too, and are never written anywhere.

use std::cell::RefCell;
use std::num::NonZeroUsize;

use lru::LruCache;
use tde_core::keystore::FileId;
use tde_core::secret::TableKey;
use tde_core::xts::PageCipher;

use super::shmem::{self, Found};

/// How many relation files' answers one process keeps.
const CAPACITY: usize = 1024;

enum Entry {
    Plain,
    Cipher(Box<Ciphers>),
    Unavailable,
}

/// The ready ciphers of a file's live key versions.
pub struct Ciphers {
    /// Encrypts every page written, and decrypts the pages it wrote.
    pub current: PageCipher,
    /// Whether pages under `current` carry PD_TDE_KEY_ALT (its parity).
    pub current_alt: bool,
    /// The previous version while a rotation is in progress; decrypts the
    /// pages not yet re-encrypted (the other parity).
    pub previous: Option<PageCipher>,
    /// tde_encrypt_table or tde_decrypt_table is running: unmarked pages
    /// (not yet rewritten) are legal and read as plain.
    pub accept_plain: bool,
    /// tde_decrypt_table is running: pages are written plain.
    pub write_plain: bool,
}

impl Ciphers {
    fn new(
        current: (u32, &TableKey),
        previous: Option<&TableKey>,
        phase: u8,
    ) -> Result<Ciphers, tde_core::secret::Error> {
        Ok(Ciphers {
            current: PageCipher::new(current.1)?,
            current_alt: tde_core::page::alt_for_version(current.0),
            previous: previous.map(PageCipher::new).transpose()?,
            accept_plain: phase != 0,
            write_plain: phase == 2,
        })
    }

    /// The cipher for a stored page whose PD_TDE_KEY_ALT bit is `alt`; None
    /// if no live version has that parity.
    pub fn for_alt(&mut self, alt: bool) -> Option<&mut PageCipher> {
        if alt == self.current_alt {
            Some(&mut self.current)
        } else {
            self.previous.as_mut()
        }
    }
}

/// What a relation file is, as `with_cipher` found it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Plain,
    Encrypted,
    /// Encrypted, but this server cannot use the key right now.
    Unavailable,
}

struct Cache {
    generation: u64,
    shared: LruCache<FileId, Entry>,
    temp: std::collections::HashMap<FileId, Box<Ciphers>>,
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache {
        generation: u64::MAX,
        shared: LruCache::new(NonZeroUsize::new(CAPACITY).unwrap_or(NonZeroUsize::MIN)),
        temp: std::collections::HashMap::new(),
    });
}

fn load(file: &FileId) -> Entry {
    match shmem::find(file) {
        Found::NotEncrypted => Entry::Plain,
        Found::Unavailable => Entry::Unavailable,
        Found::Keys(keys) => {
            let current = (keys.current.0, &keys.current.1);
            match Ciphers::new(current, keys.previous.as_ref().map(|p| &p.1), keys.phase) {
                Ok(c) => Entry::Cipher(Box::new(c)),
                Err(_) => Entry::Unavailable,
            }
        }
    }
}

/// Calls `f` with the ciphers of `file` (a temp relation's if `temp`) if
/// the file is encrypted and its key usable, and says what the file is.
///
/// The cache is borrowed while `f` runs: `f` must not call into PostgreSQL
/// code that can raise an ERROR by longjmp (an ERROR raised from Rust, which
/// unwinds, is fine).  The storage manager calls md.c only after this returns.
///
/// If the key is unavailable because the key store is locked (its master
/// key's provider was down), the key worker is asked to try again first,
/// outside the cache borrow (`kms::wait_for_unlock`, bounded by
/// tde.provider_timeout), so service comes back by itself.
pub fn with_cipher(file: &FileId, temp: bool, f: impl FnOnce(&mut Ciphers)) -> Kind {
    let mut f = Some(f);
    match with_cipher_once(file, temp, &mut f) {
        Kind::Unavailable if crate::kms::wait_for_unlock() => with_cipher_once(file, temp, &mut f),
        k => k,
    }
}

fn with_cipher_once<F: FnOnce(&mut Ciphers)>(file: &FileId, temp: bool, f: &mut Option<F>) -> Kind {
    let mut call = |cipher: &mut Ciphers| {
        if let Some(f) = f.take() {
            f(cipher)
        }
    };
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if temp {
            return match c.temp.get_mut(file) {
                Some(cipher) => {
                    call(cipher);
                    Kind::Encrypted
                }
                None => Kind::Plain,
            };
        }
        if !shmem::is_attached() {
            return Kind::Plain;
        }
        let generation = shmem::generation();
        if generation != c.generation {
            c.shared.clear();
            c.generation = generation;
        }
        match c.shared.get_or_insert_mut(*file, || load(file)) {
            Entry::Plain => Kind::Plain,
            Entry::Cipher(cipher) => {
                call(cipher);
                Kind::Encrypted
            }
            Entry::Unavailable => Kind::Unavailable,
        }
    })
}

pub fn add_temp_key(file: FileId, key: &TableKey) -> Result<(), tde_core::secret::Error> {
    let ciphers = Ciphers::new((1, key), None, 0)?;
    CACHE.with(|c| c.borrow_mut().temp.insert(file, Box::new(ciphers)));
    Ok(())
}

pub fn remove_temp_key(file: &FileId) {
    CACHE.with(|c| c.borrow_mut().temp.remove(file));
}

pub fn has_temp_key(file: &FileId) -> bool {
    CACHE.with(|c| c.borrow().temp.contains_key(file))
}
