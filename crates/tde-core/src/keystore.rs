//! The key store: what `$PGDATA/tde/keystore` holds, and how changes apply.
//!
//! Why it is built this way: the checkpointer, the background writer and the
//! startup process must find table keys without a database connection, so the
//! authoritative list lives in a file, not a catalog.  Every change is a
//! [`Change`] value: the server WAL-logs the change, then applies it to the
//! file, and crash recovery or a standby applies the same value on redo.
//! Applying a change is idempotent, so replaying a change the file already
//! holds is harmless.
//!
//! Key hierarchy (documented in docs/keys.md): a master key (MEK) in a
//! provider wraps one key-encryption key (KEK) per cluster; the KEK wraps
//! each table key (TEK) and, through a derived key, authenticates the file.
//! Start-up and master-key rotation therefore cost one provider call however
//! many tables there are.
//!
//! The file format (an authenticated append-only log of these changes,
//! compacted into a snapshot) is in [`crate::storefile`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The only page cipher so far.
pub const ALGORITHM_XTS: &str = "AES-256-XTS";

/// Identifies a relation file: PostgreSQL's RelFileLocator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileId {
    pub spc: u32,
    pub db: u32,
    pub rel: u32,
}

/// `spc/db/rel`, as PostgreSQL prints a relation file's location.
impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.spc, self.db, self.rel)
    }
}

/// A configured master-key provider.  Options never hold secrets (a path,
/// an environment variable's name).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProviderEntry {
    pub name: String,
    pub kind: String,
    pub options: serde_json::Value,
}

/// The current master key and the KEK it wraps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Principal {
    pub provider: String,
    pub key_name: String,
    /// KEK wrapped by the master key (nonce || ciphertext || tag), base64.
    pub wrapped_kek: String,
}

/// Where a file stands between plain and encrypted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Every page is encrypted (or all zeros).
    #[default]
    Encrypted,
    /// tde_encrypt_table is running: pages are written encrypted, and pages
    /// not yet rewritten are read as plain (unmarked pages are legal).
    Encrypting,
    /// tde_decrypt_table is running: pages are written plain, and pages not
    /// yet rewritten are decrypted (marked pages are read with the key).
    Decrypting,
}

impl Phase {
    pub fn is_encrypted(&self) -> bool {
        *self == Phase::Encrypted
    }
}

/// One table key, wrapped by the KEK: its current version, and the versions
/// before it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyEntry {
    pub file: FileId,
    pub key_id: u64,
    pub version: u32,
    /// Unix seconds.
    pub created: i64,
    pub algorithm: String,
    /// TEK wrapped by the KEK (nonce || ciphertext || tag), base64.
    pub wrapped: String,
    /// The version before `version` while pages may still use it (a
    /// rotation in progress): the second live version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<OldVersion>,
    /// Versions no page uses any more, kept wrapped for older backups and
    /// archived WAL.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<OldVersion>,
    /// Between plain and encrypted (tde_encrypt_table, tde_decrypt_table).
    #[serde(default, skip_serializing_if = "Phase::is_encrypted")]
    pub phase: Phase,
}

/// An earlier version of a table key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OldVersion {
    pub version: u32,
    /// Unix seconds.
    pub created: i64,
    /// TEK wrapped by the KEK, base64 (associated data names this version).
    pub wrapped: String,
    /// Unix seconds; set once retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<i64>,
    /// Unix seconds; set once destroyed (`wrapped` is then empty: the
    /// version can never be unwrapped again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed_at: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyStore {
    /// Random, fixed at creation; bound into the KEK's associated data.
    pub store_id: String,
    pub providers: Vec<ProviderEntry>,
    pub principal: Option<Principal>,
    pub next_key_id: u64,
    /// Table keys by file (stored as a JSON list), so that replaying a
    /// long log costs O(log n) per change.
    #[serde(with = "keys_as_list")]
    pub keys: BTreeMap<FileId, KeyEntry>,
    /// How many changes the store has taken (see [`Record`]): 1 after Init.
    #[serde(default)]
    pub generation: u64,
    /// The audit trail's HMAC key, wrapped by the KEK, base64
    /// ([`crate::audit`]); set with the first audit record after a master key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_key: Option<String>,
    /// The audit trail's last record: the log must reach it.
    #[serde(default, skip_serializing_if = "AuditHead::is_empty")]
    pub audit_head: AuditHead,
}

/// The sequence number and chain value (hex) of the audit trail's last
/// record, kept here because this file is authenticated: a log cut short no
/// longer reaches it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditHead {
    pub seq: u64,
    pub chain: String,
}

impl AuditHead {
    pub fn is_empty(&self) -> bool {
        self.seq == 0
    }

    fn advance(&mut self, e: &crate::audit::Entry) {
        if e.seq > self.seq {
            self.seq = e.seq;
            self.chain = e.chain.clone();
        }
    }
}

/// A change to the key store.  This is also the payload of the WAL record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// Creates the store (first tde_set_master_key) or is a no-op.
    Init {
        store_id: String,
    },
    AddProvider(ProviderEntry),
    SetPrincipal(Principal),
    AddKey(KeyEntry),
    RemoveKey {
        file: FileId,
    },
    /// A new version of a file's key (tde_rotate_key): the current version
    /// becomes the previous one, still live until retired.
    RotateKey {
        file: FileId,
        version: u32,
        created: i64,
        wrapped: String,
    },
    /// No page uses the previous `version` any more (the re-encryption pass
    /// ended and a checkpoint wrote every page): it is retired.
    RetireKeyVersion {
        file: FileId,
        version: u32,
        retired_at: i64,
    },
    /// Master-key rotation (tde_rotate_master_key): a new master key wraps a
    /// new KEK, and every table key version is re-wrapped under it.
    Rekey {
        principal: Principal,
        keys: Vec<Rewrapped>,
        /// The audit key re-wrapped under the new KEK.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        audit_key: Option<String>,
        /// The rotation's own audit record.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        audit: Option<crate::audit::Entry>,
    },
    /// A file enters or leaves a phase of tde_encrypt_table /
    /// tde_decrypt_table.
    SetPhase {
        file: FileId,
        phase: Phase,
    },
    /// A retired version is destroyed (tde_destroy_retired_keys): its
    /// wrapped bytes are erased, the record of it stays.
    DestroyKeyVersion {
        file: FileId,
        version: u32,
        destroyed_at: i64,
    },
    /// The audit trail's HMAC key, wrapped by the KEK (base64).
    SetAuditKey {
        wrapped: String,
    },
    /// One audit record, sealed (sequence number and chain value set).  The
    /// store keeps only the head; the record itself goes to the audit log.
    Audit {
        entry: crate::audit::Entry,
    },
    /// Changes nothing: written at each checkpoint, it says which store (and,
    /// in its [`Record`], which generation) the checkpoint vouches for.
    Checkpoint {
        store_id: String,
    },
}

/// A table key version re-wrapped under a new KEK.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rewrapped {
    pub file: FileId,
    pub version: u32,
    pub wrapped: String,
}

/// One WAL record of the tde resource manager: a change, and the store
/// generation it brings the store to.
///
/// Generations count changes: the store that `Init` creates is generation 1,
/// and each further change adds one, on the primary and in redo alike, so a
/// store file says exactly which changes it holds.  A `Checkpoint` record
/// carries the generation the store had when the checkpoint began; a store
/// that recovery finds below it, or missing, lacks keys the data files need.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub generation: u64,
    pub change: Change,
}

/// What redo must do with a record, given the generation of the store file
/// (`None`: there is no store file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedoStep {
    /// Apply the change and move the store to the record's generation.
    Apply,
    /// The file already holds it (it was saved before a crash): nothing to do.
    Done,
    /// The file is older than the WAL: it has generation `have` where the WAL
    /// needs at least `need`.
    Behind { have: u64, need: u64 },
    /// There is no store file, but the WAL needs generation `need`.
    Missing { need: u64 },
}

/// Decides a redo step.  Pure, so that every case is tested without a server.
pub fn redo_step(have: Option<u64>, rec: &Record) -> RedoStep {
    let need = rec.generation;
    match (&rec.change, have) {
        (Change::Init { .. }, None) => RedoStep::Apply,
        (Change::Checkpoint { .. }, None) if need == 0 => RedoStep::Done,
        (_, None) => RedoStep::Missing { need },
        (Change::Checkpoint { .. }, Some(have)) if have >= need => RedoStep::Done,
        (Change::Checkpoint { .. }, Some(have)) => RedoStep::Behind { have, need },
        (_, Some(have)) if have >= need => RedoStep::Done,
        (_, Some(have)) if have + 1 == need => RedoStep::Apply,
        (_, Some(have)) => RedoStep::Behind { have, need: need - 1 },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key store file \"{path}\" is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("could not {what} key store file \"{path}\": {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key provider \"{0}\" already exists")]
    ProviderExists(String),
    #[error("key store has not been initialised")]
    NotInitialised,
    #[error("relation file {0} has no key")]
    NoSuchKey(FileId),
    #[error("relation file {0}: a key rotation must follow the current version, with no other in progress")]
    BadRotation(FileId),
}

impl KeyStore {
    pub fn new(store_id: String) -> KeyStore {
        KeyStore {
            store_id,
            providers: Vec::new(),
            principal: None,
            next_key_id: 1,
            keys: BTreeMap::new(),
            generation: 0,
            audit_key: None,
            audit_head: AuditHead::default(),
        }
    }

    pub fn provider(&self, name: &str) -> Option<&ProviderEntry> {
        self.providers.iter().find(|p| p.name == name)
    }

    pub fn key(&self, file: &FileId) -> Option<&KeyEntry> {
        self.keys.get(file)
    }

    /// Applies a change.  Idempotent: applying the same change twice leaves
    /// the same store, which is what redo needs.
    pub fn apply(&mut self, change: &Change) -> Result<(), StoreError> {
        match change {
            Change::Init { .. } => {}
            Change::AddProvider(p) => match self.providers.iter_mut().find(|e| e.name == p.name) {
                Some(existing) if existing == p => {}
                Some(_) => return Err(StoreError::ProviderExists(p.name.clone())),
                None => self.providers.push(p.clone()),
            },
            Change::SetPrincipal(p) => self.principal = Some(p.clone()),
            Change::AddKey(k) => {
                self.next_key_id = self.next_key_id.max(k.key_id + 1);
                self.keys.insert(k.file, k.clone());
            }
            Change::RemoveKey { file } => {
                self.keys.remove(file);
            }
            Change::RotateKey { file, version, created, wrapped } => {
                let e = self.keys.get_mut(file).ok_or(StoreError::NoSuchKey(*file))?;
                if e.version >= *version {
                    return Ok(()); // applied already
                }
                if e.previous.is_some() || *version != e.version + 1 {
                    return Err(StoreError::BadRotation(*file));
                }
                let old = OldVersion {
                    version: e.version,
                    created: e.created,
                    wrapped: e.wrapped.clone(),
                    retired_at: None,
                    destroyed_at: None,
                };
                e.previous = Some(old);
                e.version = *version;
                e.created = *created;
                e.wrapped = wrapped.clone();
            }
            Change::Rekey { principal, keys, audit_key, audit } => {
                self.principal = Some(principal.clone());
                if audit_key.is_some() {
                    self.audit_key = audit_key.clone();
                }
                if let Some(e) = audit {
                    self.audit_head.advance(e);
                }
                for r in keys {
                    let Some(e) = self.keys.get_mut(&r.file) else { continue };
                    if e.version == r.version {
                        e.wrapped = r.wrapped.clone();
                    } else if let Some(p) = e.previous.as_mut().filter(|p| p.version == r.version) {
                        p.wrapped = r.wrapped.clone();
                    } else if let Some(o) =
                        e.retired.iter_mut().find(|o| o.version == r.version && o.destroyed_at.is_none())
                    {
                        o.wrapped = r.wrapped.clone();
                    }
                }
            }
            Change::SetPhase { file, phase } => {
                self.keys.get_mut(file).ok_or(StoreError::NoSuchKey(*file))?.phase = *phase;
            }
            Change::DestroyKeyVersion { file, version, destroyed_at } => {
                if let Some(e) = self.keys.get_mut(file) {
                    if let Some(old) = e.retired.iter_mut().find(|o| o.version == *version && o.destroyed_at.is_none())
                    {
                        old.wrapped.clear();
                        old.destroyed_at = Some(*destroyed_at);
                    }
                }
            }
            Change::RetireKeyVersion { file, version, retired_at } => {
                // The file may be gone since; nothing to retire then.
                if let Some(e) = self.keys.get_mut(file) {
                    if e.previous.as_ref().is_some_and(|p| p.version == *version) {
                        let mut old = e.previous.take().expect("checked");
                        old.retired_at = Some(*retired_at);
                        e.retired.push(old);
                    }
                }
            }
            Change::SetAuditKey { wrapped } => self.audit_key = Some(wrapped.clone()),
            Change::Audit { entry } => self.audit_head.advance(entry),
            Change::Checkpoint { .. } => {}
        }
        Ok(())
    }
}

mod keys_as_list {
    use super::{BTreeMap, FileId, KeyEntry};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(keys: &BTreeMap<FileId, KeyEntry>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(keys.values())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<FileId, KeyEntry>, D::Error> {
        let list = Vec::<KeyEntry>::deserialize(d)?;
        let n = list.len();
        let map: BTreeMap<FileId, KeyEntry> = list.into_iter().map(|k| (k.file, k)).collect();
        if map.len() != n {
            return Err(serde::de::Error::custom("two keys for one relation file"));
        }
        Ok(map)
    }
}

/// Associated data binding a wrapped TEK to the file it protects, so a
/// wrapped key copied onto another relation fails to unwrap.
pub fn tek_aad(store_id: &str, file: &FileId, key_id: u64, version: u32) -> Vec<u8> {
    let mut aad = b"tde-tek-v1".to_vec();
    aad.extend_from_slice(store_id.as_bytes());
    for v in [file.spc, file.db, file.rel] {
        aad.extend_from_slice(&v.to_le_bytes());
    }
    aad.extend_from_slice(&key_id.to_le_bytes());
    aad.extend_from_slice(&version.to_le_bytes());
    aad
}

/// Associated data binding the wrapped KEK to this store and master key.
pub fn kek_aad(store_id: &str, provider: &str, key_name: &str) -> Vec<u8> {
    let mut aad = b"tde-kek-v1".to_vec();
    for part in [store_id, provider, key_name] {
        aad.extend_from_slice(&(part.len() as u32).to_le_bytes());
        aad.extend_from_slice(part.as_bytes());
    }
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> KeyStore {
        let mut ks = KeyStore::new("0123456789abcdef".into());
        ks.apply(&Change::AddProvider(ProviderEntry {
            name: "local".into(),
            kind: "file".into(),
            options: serde_json::json!({"path": "/tmp/k"}),
        }))
        .unwrap();
        ks.apply(&Change::AddKey(KeyEntry {
            file: FileId { spc: 1663, db: 5, rel: 16384 },
            key_id: 7,
            version: 1,
            created: 1_700_000_000,
            algorithm: ALGORITHM_XTS.into(),
            wrapped: "AAAA".into(),
            previous: None,
            retired: Vec::new(),
            phase: Phase::Encrypted,
        }))
        .unwrap();
        ks
    }

    #[test]
    fn apply_is_idempotent() {
        let mut ks = sample();
        let before = ks.clone();
        let first = before.keys.values().next().unwrap().clone();
        let change = Change::AddKey(first.clone());
        ks.apply(&change).unwrap();
        ks.apply(&change).unwrap();
        assert_eq!(ks, before);
        let rm = Change::RemoveKey { file: first.file };
        ks.apply(&rm).unwrap();
        ks.apply(&rm).unwrap();
        assert!(ks.keys.is_empty());
    }

    #[test]
    fn conflicting_provider_is_refused() {
        let mut ks = sample();
        let err = ks
            .apply(&Change::AddProvider(ProviderEntry {
                name: "local".into(),
                kind: "env".into(),
                options: serde_json::json!({"variable": "X"}),
            }))
            .unwrap_err();
        assert!(matches!(err, StoreError::ProviderExists(_)));
    }

    #[test]
    fn rotation_keeps_two_live_versions_and_retires_the_old_one() {
        let mut ks = sample();
        let file = FileId { spc: 1663, db: 5, rel: 16384 };
        let rotate = Change::RotateKey { file, version: 2, created: 9, wrapped: "BBBB".into() };
        ks.apply(&rotate).unwrap();
        ks.apply(&rotate).unwrap(); // idempotent
        let e = ks.key(&file).unwrap();
        assert_eq!((e.version, e.wrapped.as_str()), (2, "BBBB"));
        assert_eq!(e.previous.as_ref().map(|p| (p.version, p.wrapped.as_str())), Some((1, "AAAA")));
        // A third live version is refused: retire the previous one first.
        let third = Change::RotateKey { file, version: 3, created: 10, wrapped: "CCCC".into() };
        assert!(matches!(ks.apply(&third), Err(StoreError::BadRotation(_))));
        let retire = Change::RetireKeyVersion { file, version: 1, retired_at: 11 };
        ks.apply(&retire).unwrap();
        ks.apply(&retire).unwrap(); // idempotent
        let e = ks.key(&file).unwrap();
        assert!(e.previous.is_none());
        assert_eq!(e.retired.len(), 1);
        assert_eq!(e.retired[0].retired_at, Some(11));
        ks.apply(&third).unwrap();
        assert_eq!(ks.key(&file).unwrap().version, 3);
        // Destroying a retired version erases its wrapped bytes, keeps the record.
        let destroy = Change::DestroyKeyVersion { file, version: 1, destroyed_at: 12 };
        ks.apply(&destroy).unwrap();
        ks.apply(&destroy).unwrap();
        let old = &ks.key(&file).unwrap().retired[0];
        assert_eq!((old.version, old.wrapped.as_str(), old.destroyed_at), (1, "", Some(12)));
        // A live version is never destroyed: only retired ones are candidates.
        ks.apply(&Change::DestroyKeyVersion { file, version: 2, destroyed_at: 13 }).unwrap();
        assert_eq!(ks.key(&file).unwrap().previous.as_ref().unwrap().wrapped, "BBBB");
        // Rotating a file that has no key is an error; retiring one is not.
        let other = FileId { spc: 1, db: 1, rel: 1 };
        assert!(ks.apply(&Change::RotateKey { file: other, version: 2, created: 0, wrapped: String::new() }).is_err());
        ks.apply(&Change::RetireKeyVersion { file: other, version: 1, retired_at: 0 }).unwrap();
        // The versions survive JSON.
        let back: KeyStore = serde_json::from_value(serde_json::to_value(&ks).unwrap()).unwrap();
        assert_eq!(back, ks);
    }

    #[test]
    fn keys_are_a_list_in_json_and_duplicates_are_refused() {
        let ks = sample();
        let v = serde_json::to_value(&ks).unwrap();
        assert!(v["keys"].is_array());
        assert_eq!(serde_json::from_value::<KeyStore>(v.clone()).unwrap(), ks);
        let mut dup = v;
        let k = dup["keys"][0].clone();
        dup["keys"].as_array_mut().unwrap().push(k);
        assert!(serde_json::from_value::<KeyStore>(dup).is_err());
    }

    #[test]
    fn change_round_trips_through_json() {
        let c = Change::RemoveKey { file: FileId { spc: 1, db: 2, rel: 3 } };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Change>(&s).unwrap(), c);
    }

    fn rec(generation: u64, change: Change) -> Record {
        Record { generation, change }
    }

    #[test]
    fn redo_steps() {
        let init = || Change::Init { store_id: "s".into() };
        let add = || Change::RemoveKey { file: FileId { spc: 1, db: 2, rel: 3 } };
        let ckpt = || Change::Checkpoint { store_id: "s".into() };
        // A new store comes from Init; any other record needs the file.
        assert_eq!(redo_step(None, &rec(1, init())), RedoStep::Apply);
        assert_eq!(redo_step(None, &rec(5, add())), RedoStep::Missing { need: 5 });
        assert_eq!(redo_step(None, &rec(5, ckpt())), RedoStep::Missing { need: 5 });
        // In order: apply; already in the file: nothing; a gap: the file is older.
        assert_eq!(redo_step(Some(4), &rec(5, add())), RedoStep::Apply);
        assert_eq!(redo_step(Some(5), &rec(5, add())), RedoStep::Done);
        assert_eq!(redo_step(Some(9), &rec(5, add())), RedoStep::Done);
        assert_eq!(redo_step(Some(2), &rec(5, add())), RedoStep::Behind { have: 2, need: 4 });
        assert_eq!(redo_step(Some(1), &rec(1, init())), RedoStep::Done);
        // A checkpoint vouches for a generation the file must have reached.
        assert_eq!(redo_step(Some(5), &rec(5, ckpt())), RedoStep::Done);
        assert_eq!(redo_step(Some(7), &rec(5, ckpt())), RedoStep::Done);
        assert_eq!(redo_step(Some(4), &rec(5, ckpt())), RedoStep::Behind { have: 4, need: 5 });
    }

    #[test]
    fn record_round_trips_through_json() {
        let r = rec(7, Change::Checkpoint { store_id: "abc".into() });
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Record>(&s).unwrap(), r);
    }

    #[test]
    fn aad_differs_per_file() {
        let a = tek_aad("s", &FileId { spc: 1, db: 2, rel: 3 }, 1, 1);
        let b = tek_aad("s", &FileId { spc: 1, db: 2, rel: 4 }, 1, 1);
        assert_ne!(a, b);
    }
}
