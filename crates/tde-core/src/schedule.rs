//! What the re-encryption scheduler does with each key, decided without a
//! server: finish a pass a crash or a promotion interrupted, rotate a key
//! older than its cryptoperiod (`tde.auto_rotate`), and warn once a day
//! about each overdue key.
//!
//! Why here: the rules are the part worth testing on their own; the
//! server's scheduler (src/reencrypt/scheduler.rs) only gathers the key
//! states, maps files to tables, and runs the passes.

use std::collections::HashMap;

use crate::keystore::FileId;

/// A key as the scheduler sees it (the shared key table's view).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyState {
    pub file: FileId,
    pub key_id: u64,
    pub version: u32,
    /// Unix seconds: when the current version was made.
    pub created: i64,
    /// A rotation is under way: the previous version is still live.
    pub previous_live: bool,
    /// 0 encrypted, 1 encrypting, 2 decrypting (the key table's codes).
    pub phase: u8,
}

/// Work for a file's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Todo {
    /// Finish an interrupted tde_rotate_key.
    FinishRotation,
    /// Finish an interrupted tde_encrypt_table.
    FinishEncryption,
    /// Finish an interrupted tde_decrypt_table.
    FinishDecryption,
    /// The current version is older than tde.key_max_age (tde.auto_rotate).
    RotateOverdue,
}

impl Todo {
    pub fn reason(&self) -> &'static str {
        match self {
            Todo::FinishRotation => "finishing an interrupted key rotation",
            Todo::FinishEncryption => "finishing an interrupted tde_encrypt_table",
            Todo::FinishDecryption => "finishing an interrupted tde_decrypt_table",
            Todo::RotateOverdue => "the key is older than tde.key_max_age (tde.auto_rotate)",
        }
    }
}

/// Whether the current version is past its cryptoperiod (`max_age`
/// seconds; 0 is off).
pub fn overdue(k: &KeyState, now: i64, max_age: i64) -> bool {
    max_age > 0 && now - k.created > max_age
}

/// What to do about `k`, if anything.  An interrupted pass is always
/// finished (someone asked for it); an overdue key is rotated only with
/// `auto_rotate`, and never while another pass is under way on it.
pub fn todo(k: &KeyState, now: i64, max_age: i64, auto_rotate: bool) -> Option<Todo> {
    match (k.previous_live, k.phase) {
        (true, _) => Some(Todo::FinishRotation),
        (false, 1) => Some(Todo::FinishEncryption),
        (false, 2) => Some(Todo::FinishDecryption),
        _ if auto_rotate && overdue(k, now, max_age) => Some(Todo::RotateOverdue),
        _ => None,
    }
}

/// For a table whose files want different things: finishing a pass comes
/// first (the earliest in [`Todo`]'s order).
pub fn merge(a: Option<Todo>, b: Option<Todo>) -> Option<Todo> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Seconds between two warnings about the same overdue key.
pub const WARN_EVERY: i64 = 24 * 3600;

/// Remembers when each overdue key was last warned about.
#[derive(Default)]
pub struct Warnings {
    last: HashMap<(FileId, u32), i64>,
}

impl Warnings {
    /// Whether to warn about version `version` of `file` now: the first
    /// time, then once every [`WARN_EVERY`].
    pub fn due(&mut self, file: FileId, version: u32, now: i64) -> bool {
        match self.last.get(&(file, version)) {
            Some(&t) if now - t < WARN_EVERY => false,
            _ => {
                self.last.insert((file, version), now);
                true
            }
        }
    }

    /// Forgets keys that are no longer overdue (rotated, dropped).
    pub fn retain(&mut self, overdue: &[(FileId, u32)]) {
        self.last.retain(|k, _| overdue.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(created: i64, previous_live: bool, phase: u8) -> KeyState {
        KeyState { file: FileId { spc: 1663, db: 5, rel: 16384 }, key_id: 1, version: 1, created, previous_live, phase }
    }

    #[test]
    fn interrupted_passes_are_always_finished() {
        assert_eq!(todo(&key(1000, true, 0), 1000, 0, false), Some(Todo::FinishRotation));
        assert_eq!(todo(&key(1000, false, 1), 1000, 0, false), Some(Todo::FinishEncryption));
        assert_eq!(todo(&key(1000, false, 2), 1000, 0, false), Some(Todo::FinishDecryption));
        // Mid-rotation and overdue: finish first, no second rotation.
        assert_eq!(todo(&key(0, true, 0), 1000, 10, true), Some(Todo::FinishRotation));
    }

    #[test]
    fn overdue_keys_rotate_only_with_auto_rotate() {
        let k = key(0, false, 0);
        assert!(overdue(&k, 11, 10));
        assert!(!overdue(&k, 10, 10));
        assert!(!overdue(&k, 1_000_000, 0), "0 is off");
        assert_eq!(todo(&k, 11, 10, false), None);
        assert_eq!(todo(&k, 11, 10, true), Some(Todo::RotateOverdue));
        assert_eq!(todo(&k, 5, 10, true), None);
    }

    #[test]
    fn a_table_finishes_before_it_rotates() {
        assert_eq!(merge(Some(Todo::RotateOverdue), Some(Todo::FinishRotation)), Some(Todo::FinishRotation));
        assert_eq!(merge(None, Some(Todo::RotateOverdue)), Some(Todo::RotateOverdue));
        assert_eq!(merge(None, None), None);
    }

    #[test]
    fn warnings_once_a_day_per_version() {
        let f = FileId { spc: 1, db: 2, rel: 3 };
        let mut w = Warnings::default();
        assert!(w.due(f, 1, 100));
        assert!(!w.due(f, 1, 100 + WARN_EVERY - 1));
        assert!(w.due(f, 1, 100 + WARN_EVERY));
        assert!(w.due(f, 2, 100), "a new version is a new key");
        w.retain(&[(f, 2)]);
        assert!(w.due(f, 1, 200), "forgotten once no longer overdue");
    }
}
