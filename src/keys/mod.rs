//! Keys: where a table key comes from, and where it goes.
//!
//! - A new encrypted relation file gets a fresh random table key (TEK) in
//!   `create_key`, wrapped by the cluster's key-encryption key (KEK).
//! - The KEK is wrapped by the master key (MEK) of a provider
//!   (tde-core/src/provider.rs); `set_master_key` creates or rotates it.
//! - `store.rs` makes each change durable (WAL, `$PGDATA/tde/keystore`),
//!   `shmem.rs` holds the unwrapped keys for every process, and `local.rs`
//!   caches ready ciphers per process for the storage manager.
//!
//! Temp relations get keys that live only in their backend.
//!
//! This file is the only door into `shmem` and `store`: the rest of the
//! extension uses the functions below (and `local` for the page path).

pub mod local;
mod shmem;
mod store;

pub use shmem::CacheStats;
pub use shmem::{KeyInfo, StoreState};
pub use store::{checkpoint, redo, try_unlock};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use pgrx::pg_sys;
use tde_core::keystore::{
    kek_aad, tek_aad, Change, FileId, KeyEntry, OldVersion, Phase, Principal, ProviderEntry, ALGORITHM_XTS,
};
use tde_core::provider::{self, MasterKeyProvider as _};
use tde_core::secret::{TableKey, WrapKey};
use tde_core::wrap::{wrap_table_key, WRAPPED_TABLE_KEY_LEN};

use crate::audit::{self, Entry, Op};
use crate::error::TdeError;
use store::Secret;

/// An audit record as a change of its batch (sealed by the store).
fn audited(entry: Entry) -> (Change, Secret) {
    (Change::Audit { entry }, Secret::None)
}

/// The files of `files` that have a key, with their key's table entry.
fn with_keys(files: &[FileId]) -> impl Iterator<Item = (FileId, shmem::EntryInfo)> + '_ {
    files.iter().filter_map(|f| shmem::entry(f).map(|e| (*f, e)))
}

/// Whether the cluster has a key store (and so an audit trail) yet.
pub fn store_exists() -> bool {
    shmem::is_attached() && shmem::with_store_lock(|s| shmem::meta(s).exists)
}

/// Audit records that come with no key change, in one batch.
pub fn record_audit(entries: Vec<Entry>) -> Result<(), TdeError> {
    store::commit(|_| Ok(entries.into_iter().map(audited).collect()))
}

/// The audit log file, the head the key store holds and the audit key,
/// with every queued record appended first (for tde_audit_log and
/// tde_verify_audit_log).
pub fn audit_log() -> Result<(Vec<u8>, tde_core::audit::Head, Option<tde_core::audit::AuditKey>), TdeError> {
    store::read_audit_log()
}

pub fn file_id(loc: &pg_sys::RelFileLocator) -> FileId {
    FileId { spc: loc.spcOid.into(), db: loc.dbOid.into(), rel: loc.relNumber.into() }
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Version `version` of key `key_id` of `file`, wrapped by the KEK (base64).
fn wrap_version(
    store_id: &str,
    kek: &WrapKey,
    file: FileId,
    key_id: u64,
    version: u32,
    tek: &TableKey,
) -> Result<String, TdeError> {
    let wrapped: [u8; WRAPPED_TABLE_KEY_LEN] =
        wrap_table_key(kek, tek, &tek_aad(store_id, &file, key_id, version)).map_err(|_| TdeError::Crypto)?;
    Ok(B64.encode(wrapped))
}

/// The store entry of `file` with live keys `keys` (a new key: version 1
/// only; a copy: the versions of the original).
fn wrap_entry(store_id: &str, kek: &WrapKey, file: FileId, key_id: u64, keys: &NewKeys) -> Result<KeyEntry, TdeError> {
    let (version, tek) = &keys.current;
    let previous = match &keys.previous {
        Some((v, k)) => Some(OldVersion {
            version: *v,
            created: now(),
            wrapped: wrap_version(store_id, kek, file, key_id, *v, k)?,
            retired_at: None,
            destroyed_at: None,
        }),
        None => None,
    };
    Ok(KeyEntry {
        file,
        key_id,
        version: *version,
        created: now(),
        algorithm: ALGORITHM_XTS.to_string(),
        wrapped: wrap_version(store_id, kek, file, key_id, *version, tek)?,
        previous,
        retired: Vec::new(),
        phase: tde_core::keystore::Phase::Encrypted,
    })
}

type NewKeys = shmem::Keys;

/// The KEK, or why there is none (locked, or no master key yet).
fn current_kek() -> Result<WrapKey, TdeError> {
    shmem::kek().ok_or_else(|| match shmem::state() {
        (shmem::StoreState::Locked, why) => TdeError::Locked(why),
        _ => TdeError::NoMasterKey,
    })
}

/// Gives the relation file `loc` a new random key.  Called before the file
/// is created, so no page of it is ever written in plaintext.
pub fn create_key(loc: &pg_sys::RelFileLocator, persistence: u8) -> Result<(), TdeError> {
    // pg_upgrade restores the schema with the old relfilenumbers and then
    // copies the old files, which are under the old cluster's keys: a new
    // key here would make them unreadable.  Refuse while the schema is
    // restored, before pg_upgrade copies anything.
    // SAFETY: plain read of a global set at process start.
    if unsafe { pg_sys::IsBinaryUpgrade } {
        return Err(TdeError::BinaryUpgrade);
    }
    let file = file_id(loc);
    let tek = TableKey::generate().map_err(|_| TdeError::Crypto)?;
    crate::statistics::note_key_created(loc.dbOid.into());
    if persistence == pg_sys::RELPERSISTENCE_TEMP {
        return local::add_temp_key(file, &tek).map_err(|_| TdeError::Crypto);
    }
    install_keys(vec![(file, NewKeys { current: (1, tek), previous: None, phase: 0 })], "", "")
}

/// Records each set of keys as the keys of its file (new keys, or copies of
/// existing ones), in one key store change.
fn install_keys(keys: Vec<(FileId, NewKeys)>, object: &str, detail: &str) -> Result<(), TdeError> {
    if keys.is_empty() {
        return Ok(());
    }
    store::commit(|ks| {
        let kek = current_kek()?;
        let mut changes = Vec::with_capacity(2 * keys.len());
        for ((file, keys), key_id) in keys.into_iter().zip(ks.next_key_id..) {
            let mut entry = wrap_entry(&ks.store_id, &kek, file, key_id, &keys)?;
            entry.phase = match keys.phase {
                1 => Phase::Encrypting,
                2 => Phase::Decrypting,
                _ => Phase::Encrypted,
            };
            let mut rec = audit::key_entry(Op::KeyCreated, object, file, key_id, entry.version);
            rec.detail = detail.to_string();
            changes.push((Change::AddKey(entry), Secret::TableKey(keys.current.1)));
            changes.push(audited(rec));
        }
        Ok(changes)
    })
}

/// Starts a key rotation of `files`: each gets a new current key version,
/// its current one staying live as the previous version, in one key store
/// change.  A file already mid-rotation keeps its versions (the pass that
/// follows finishes it).
pub fn begin_rotation(files: &[FileId], object: &str, extra: Vec<Entry>) -> Result<(), TdeError> {
    store::commit(|view| {
        let kek = current_kek()?;
        let mut changes: Vec<(Change, Secret)> = extra.into_iter().map(audited).collect();
        for file in files {
            let e = shmem::entry(file).ok_or(TdeError::Store(tde_core::keystore::StoreError::NoSuchKey(*file)))?;
            if e.previous.is_some() {
                continue;
            }
            let version = e.version + 1;
            let tek = TableKey::generate().map_err(|_| TdeError::Crypto)?;
            let wrapped = wrap_version(&view.store_id, &kek, *file, e.key_id, version, &tek)?;
            changes.push((Change::RotateKey { file: *file, version, created: now(), wrapped }, Secret::TableKey(tek)));
            changes.push(audited(audit::key_entry(Op::KeyRotated, object, *file, e.key_id, version)));
        }
        Ok(changes)
    })
}

/// Starts encrypting `files` in place: each file without a key gets one in
/// the encrypting phase (its plain pages stay readable until rewritten); a
/// file left decrypting by an interrupted tde_decrypt_table goes back to
/// encrypting.  One key store change.
pub fn begin_encryption(files: &[FileId], object: &str, extra: Vec<Entry>) -> Result<(), TdeError> {
    store::commit(|view| {
        let kek = current_kek()?;
        let mut changes: Vec<(Change, Secret)> = extra.into_iter().map(audited).collect();
        let mut key_id = view.next_key_id;
        for file in files {
            match shmem::entry(file) {
                Some(e) if e.phase == 2 => {
                    changes.push((Change::SetPhase { file: *file, phase: Phase::Encrypting }, Secret::None))
                }
                Some(_) => {}
                None => {
                    let keys = NewKeys {
                        current: (1, TableKey::generate().map_err(|_| TdeError::Crypto)?),
                        previous: None,
                        phase: 1,
                    };
                    let mut entry = wrap_entry(&view.store_id, &kek, *file, key_id, &keys)?;
                    entry.phase = Phase::Encrypting;
                    changes.push((Change::AddKey(entry), Secret::TableKey(keys.current.1)));
                    changes.push(audited(audit::key_entry(Op::KeyCreated, object, *file, key_id, 1)));
                    key_id += 1;
                }
            }
        }
        Ok(changes)
    })
}

/// Moves every file of `files` that has a key to `phase`.
pub fn set_phase(files: &[FileId], phase: Phase, extra: Vec<Entry>) -> Result<(), TdeError> {
    store::commit(|_| {
        let mut changes: Vec<(Change, Secret)> = files
            .iter()
            .filter(|f| shmem::entry(f).is_some_and(|e| e.phase != store::phase_code(phase)))
            .map(|f| (Change::SetPhase { file: *f, phase }, Secret::None))
            .collect();
        changes.extend(extra.into_iter().map(audited));
        Ok(changes)
    })
}

/// Drops the keys of `files` (tde_decrypt_table, once every page is plain),
/// WAL-logged.
pub fn remove_keys(files: &[FileId], object: &str, extra: Vec<Entry>) -> Result<(), TdeError> {
    store::commit(|_| {
        let mut changes = Vec::new();
        for (file, e) in with_keys(files) {
            changes.push((Change::RemoveKey { file }, Secret::None));
            changes.push(audited(audit::key_entry(Op::KeyRemoved, object, file, e.key_id, e.version)));
        }
        changes.extend(extra.into_iter().map(audited));
        Ok(changes)
    })
}

/// Ends a key rotation of `files` once no page uses their previous
/// versions: retires them (they stay wrapped in the key store).
pub fn finish_rotation(files: &[FileId], object: &str, extra: Vec<Entry>) -> Result<(), TdeError> {
    store::commit(|_| {
        let mut changes = Vec::new();
        for (file, e) in with_keys(files) {
            let Some(version) = e.previous else { continue };
            changes.push((Change::RetireKeyVersion { file, version, retired_at: now() }, Secret::None));
            changes.push(audited(audit::key_entry(Op::KeyRetired, object, file, e.key_id, version)));
        }
        changes.extend(extra.into_iter().map(audited));
        Ok(changes)
    })
}

/// One key version, as the key inventory (view tde_keys) shows it.
pub struct InventoryRow {
    pub file: FileId,
    pub key_id: u64,
    pub version: u32,
    /// active (current or previous live version), retired or destroyed.
    pub state: &'static str,
    pub algorithm: String,
    /// provider/key name of the master key that wraps the KEK.
    pub master_key: Option<String>,
    pub created: i64,
    pub retired_at: Option<i64>,
    pub destroyed_at: Option<i64>,
    /// The current version is older than tde.key_max_age.
    pub overdue: bool,
}

/// Every key version of the key store (no key material).
pub fn inventory(max_age_secs: i64) -> Result<Vec<InventoryRow>, TdeError> {
    let Some(ks) = store::read_current()? else { return Ok(Vec::new()) };
    let master = ks.principal.as_ref().map(|p| format!("{}/{}", p.provider, p.key_name));
    let now = now();
    let mut rows = Vec::new();
    for e in ks.keys.values() {
        let row = |version, state, created, retired_at, destroyed_at, overdue| InventoryRow {
            file: e.file,
            key_id: e.key_id,
            version,
            state,
            algorithm: e.algorithm.clone(),
            master_key: master.clone(),
            created,
            retired_at,
            destroyed_at,
            overdue,
        };
        let overdue = max_age_secs > 0 && now - e.created > max_age_secs;
        rows.push(row(e.version, "active", e.created, None, None, overdue));
        if let Some(p) = &e.previous {
            rows.push(row(p.version, "active", p.created, None, None, false));
        }
        for o in &e.retired {
            let state = if o.destroyed_at.is_some() { "destroyed" } else { "retired" };
            rows.push(row(o.version, state, o.created, o.retired_at, o.destroyed_at, false));
        }
    }
    Ok(rows)
}

/// tde_destroy_retired_keys(older_than): erases every key version retired
/// at least `older_than_secs` ago (its record stays, state destroyed), then
/// compacts the key store file so the wrapped bytes leave it.  Returns how
/// many were destroyed.  Live versions are never candidates.
pub fn destroy_retired(older_than_secs: i64) -> Result<usize, TdeError> {
    let Some(ks) = store::read_current()? else { return Ok(0) };
    let cutoff = now() - older_than_secs.max(0);
    let doomed: Vec<(FileId, u64, u32)> = ks
        .keys
        .values()
        .flat_map(|e| e.retired.iter().map(move |o| (e.file, e.key_id, o)))
        .filter(|(_, _, o)| o.destroyed_at.is_none() && o.retired_at.is_some_and(|t| t <= cutoff))
        .map(|(f, id, o)| (f, id, o.version))
        .collect();
    let n = doomed.len();
    if n == 0 {
        return Ok(0);
    }
    let at = now();
    store::commit(|_| {
        let mut changes = Vec::with_capacity(2 * doomed.len());
        for &(file, key_id, version) in &doomed {
            changes.push((Change::DestroyKeyVersion { file, version, destroyed_at: at }, Secret::None));
            changes.push(audited(audit::key_entry(Op::KeyDestroyed, "", file, key_id, version)));
        }
        Ok(changes)
    })?;
    store::compact_now()?;
    Ok(n)
}

/// The current key version of `file`.
pub fn current_version(file: &FileId) -> Option<u32> {
    shmem::entry(file).map(|e| e.version)
}

/// Where `file` stands between plain and encrypted; None if it has no key.
pub fn phase_of(file: &FileId) -> Option<Phase> {
    shmem::entry(file).map(|e| match e.phase {
        1 => Phase::Encrypting,
        2 => Phase::Decrypting,
        _ => Phase::Encrypted,
    })
}

/// Whether `loc` (a temp relation's if `temp`) has a key.
pub fn is_encrypted(loc: &pg_sys::RelFileLocator, temp: bool) -> bool {
    let file = file_id(loc);
    if temp {
        local::has_temp_key(&file)
    } else {
        shmem::is_attached() && shmem::contains(&file)
    }
}

/// Shared memory for the key table and cache (shmem_request_hook).
pub use shmem::protect_region;

pub fn request_shmem(max_keys: u32, cache_size: u32) {
    shmem::request(max_keys, cache_size)
}

/// Attaches the key table (shmem_startup_hook); the process that creates it
/// (the postmaster, also after a crash restart) loads the key store into it.
pub fn attach_shmem(max_keys: u32, cache_size: u32) {
    if shmem::attach(max_keys, cache_size) {
        store::load_at_startup();
    }
}

/// Every key of the shared table with its rotation and phase state, for
/// the re-encryption scheduler (database `db` only, if given).
pub fn key_states(db: Option<u32>) -> Vec<tde_core::schedule::KeyState> {
    shmem::list()
        .into_iter()
        .filter(|k| db.is_none_or(|d| k.file.db == d))
        .filter_map(|k| {
            shmem::entry(&k.file).map(|e| tde_core::schedule::KeyState {
                file: k.file,
                key_id: k.key_id,
                version: k.version,
                created: k.created,
                previous_live: e.previous.is_some(),
                phase: e.phase,
            })
        })
        .collect()
}

/// The key cache's size and counters.
pub fn cache_stats() -> CacheStats {
    shmem::cache_stats()
}

/// Metadata of every key in the shared table (no key material).
pub fn list() -> Vec<KeyInfo> {
    shmem::list()
}

/// Whether the key store is locked (a lock-free hint, see shmem).
pub fn store_locked_hint() -> bool {
    shmem::is_locked_hint()
}

/// The key store's state and, when locked, why.
pub fn state() -> (StoreState, String) {
    shmem::state()
}

/// Each provider of the key store: name, kind, options, and whether it
/// holds the current master key.
pub fn providers() -> Result<Vec<(String, String, serde_json::Value, bool)>, TdeError> {
    let Some(ks) = store::read()? else { return Ok(Vec::new()) };
    let current = ks.principal.as_ref().map(|p| p.provider.clone());
    Ok(ks
        .providers
        .iter()
        .map(|p| (p.name.clone(), p.kind.clone(), p.options.clone(), current.as_deref() == Some(p.name.as_str())))
        .collect())
}

/// How many relation files have a key.
pub fn key_count() -> u32 {
    shmem::used()
}

/// Whether database `db` has any encrypted relation file.
pub fn database_has_keys(db: u32) -> bool {
    shmem::list().iter().any(|k| k.file.db == db)
}

/// Why an encrypted file's key cannot be used, for error messages.
pub fn unavailable_reason() -> String {
    let (_, why) = shmem::state();
    if why.is_empty() {
        "the key could not be unwrapped".to_string()
    } else {
        why
    }
}

/// Called when a relation file is unlinked (drop committed, create aborted,
/// or their redo).  Removes its key.
pub fn forget(loc: &pg_sys::RelFileLocator, temp: bool) {
    let file = file_id(loc);
    if temp {
        local::remove_temp_key(&file)
    } else {
        store::remove_quietly(&[file])
    }
}

/// CREATE DATABASE ... STRATEGY FILE_COPY copies files byte for byte into a
/// new database: each encrypted file of the template gets its key recorded
/// again under the new location (same key, since the bytes are the same;
/// the page tweak does not depend on the database or tablespace).
pub fn copy_database_keys(
    src_db: u32,
    dst_db: u32,
    src_default_spc: u32,
    dst_default_spc: u32,
) -> Result<usize, TdeError> {
    let todo: Vec<FileId> = shmem::list().into_iter().filter(|k| k.file.db == src_db).map(|k| k.file).collect();
    let mut copies = Vec::new();
    for src in todo {
        let spc = if src.spc == src_default_spc { dst_default_spc } else { src.spc };
        let dst = FileId { spc, db: dst_db, rel: src.rel };
        if shmem::contains(&dst) {
            continue; // STRATEGY WAL_LOG already gave the copy its own key
        }
        let keys = shmem::keys_of(&src)
            .ok_or_else(|| TdeError::Locked(format!("the key of relation file {src} is not available")))?;
        copies.push((dst, keys));
    }
    let n = copies.len();
    install_keys(copies, "", &format!("copy for CREATE DATABASE of database {src_db}"))?;
    Ok(n)
}

/// Forgets every key of a dropped database.  DROP DATABASE removes its
/// directory without going through the storage manager, and its redo does
/// the same on standbys, so the removal is WAL-logged: standbys and PITR
/// drop the keys too.  The database is already gone when this runs, so a
/// failure is a WARNING (orphan keys are harmless), never an ERROR.
pub fn forget_database(db: u32) {
    let files: Vec<FileId> = shmem::list().into_iter().filter(|k| k.file.db == db).map(|k| k.file).collect();
    if files.is_empty() {
        return;
    }
    let logged = store::commit(|_| {
        let mut changes = Vec::new();
        for (file, e) in with_keys(&files) {
            changes.push((Change::RemoveKey { file }, Secret::None));
            let mut rec = audit::key_entry(Op::KeyRemoved, "", file, e.key_id, e.version);
            rec.detail = format!("DROP DATABASE of database {db}");
            changes.push(audited(rec));
        }
        Ok(changes)
    });
    if let Err(e) = logged {
        pgrx::warning!("tde: could not log the removal of {} key(s) of dropped database {db}: {e}", files.len());
        store::remove_quietly(&files);
    }
}

/// The next key name of a master-key rotation: `name-r<unix seconds>`,
/// replacing an earlier such suffix.
fn rotated_name(name: &str) -> String {
    let base = match name.rsplit_once("-r") {
        Some((b, ts)) if !ts.is_empty() && ts.bytes().all(|c| c.is_ascii_digit()) => b,
        _ => name,
    };
    let mut candidate = format!("{base}-r{}", now());
    if candidate == name {
        candidate.push('b');
    }
    candidate
}

/// tde_rotate_master_key(): a new master key in the current provider (the
/// file provider creates it), a new KEK wrapped by it, and every table key
/// version re-wrapped under the new KEK, locally -- two provider calls,
/// however many tables.  Atomic: one WAL record and one new key store file.
/// Returns the new master key's name.
pub fn rotate_master_key() -> Result<String, TdeError> {
    let mut new_name = String::new();
    store::rekey(|ks| {
        let p = ks.principal.clone().ok_or(TdeError::NoMasterKey)?;
        let entry = ks.provider(&p.provider).ok_or_else(|| TdeError::UnknownProvider(p.provider.clone()))?;
        let prov = crate::kms::provider(&entry.name, &entry.kind, &entry.options)?;
        let old_kek = shmem::kek().ok_or_else(|| TdeError::Locked(shmem::state().1))?;
        let new_kek = WrapKey::generate().map_err(|_| TdeError::Crypto)?;
        let name = rotated_name(&p.key_name);
        prov.ensure_key(&name)?;
        provider::verify(&prov, &name)?;
        let wrapped_kek = prov.wrap(&name, &new_kek, &kek_aad(&ks.store_id, &p.provider, &name))?;
        let mut keys = Vec::new();
        for e in ks.keys.values() {
            let versions = std::iter::once((e.version, &e.wrapped))
                .chain(e.previous.iter().map(|o| (o.version, &o.wrapped)))
                .chain(e.retired.iter().filter(|o| o.destroyed_at.is_none()).map(|o| (o.version, &o.wrapped)));
            for (version, wrapped) in versions {
                let aad = tek_aad(&ks.store_id, &e.file, e.key_id, version);
                let blob = B64.decode(wrapped).map_err(|_| TdeError::Invalid("wrapped key is not base64".into()))?;
                let tek = tde_core::wrap::unwrap_table_key(&old_kek, &blob, &aad).map_err(|_| {
                    TdeError::Locked(format!("the key version {version} of relation file {} does not unwrap", e.file))
                })?;
                let rewrapped = wrap_table_key(&new_kek, &tek, &aad).map_err(|_| TdeError::Crypto)?;
                keys.push(tde_core::keystore::Rewrapped { file: e.file, version, wrapped: B64.encode(rewrapped) });
            }
        }
        new_name = name.clone();
        let mut rec = audit::entry(Op::MasterKeyRotated, &format!("{}/{name}", p.provider), audit::Outcome::Ok);
        rec.detail = format!("from {}/{}; {} key versions re-wrapped", p.provider, p.key_name, keys.len());
        let principal = Principal { provider: p.provider, key_name: name, wrapped_kek: B64.encode(wrapped_kek) };
        Ok((Change::Rekey { principal, keys, audit_key: None, audit: Some(rec) }, new_kek))
    })?;
    Ok(new_name)
}

/// tde_verify_key(): the current master key works right now -- a fresh key
/// wrapped and unwrapped through its provider -- and is this store's: it
/// unwraps the stored KEK to the KEK in use.  Returns the master key's
/// `provider/key name`.
pub fn verify_master_key() -> Result<String, TdeError> {
    let ks = store::read()?.ok_or(TdeError::NoMasterKey)?;
    let p = ks.principal.as_ref().ok_or(TdeError::NoMasterKey)?;
    let name = format!("{}/{}", p.provider, p.key_name);
    let entry = ks.provider(&p.provider).ok_or_else(|| TdeError::UnknownProvider(p.provider.clone()))?;
    let prov = crate::kms::provider(&entry.name, &entry.kind, &entry.options)?;
    provider::verify(&prov, &p.key_name)?;
    let blob = B64.decode(&p.wrapped_kek).map_err(|_| TdeError::Invalid("wrapped KEK is not base64".into()))?;
    let kek = prov.unwrap(&p.key_name, &blob, &kek_aad(&ks.store_id, &p.provider, &p.key_name))?;
    match shmem::kek() {
        Some(k) if k.expose() == kek.expose() => Ok(name),
        Some(_) => {
            Err(TdeError::Locked(format!("master key {name} unwraps a key-encryption key other than the one in use")))
        }
        None => Err(TdeError::Locked(shmem::state().1)),
    }
}

/// tde_add_key_provider(): validates and records a provider.
pub fn add_provider(name: &str, kind: &str, options: serde_json::Value) -> Result<(), TdeError> {
    if name.is_empty() || name.len() > 63 {
        return Err(TdeError::Invalid("provider name must be 1 to 63 characters".into()));
    }
    // The key worker builds the provider (checking its options) and checks
    // that it answers and accepts its credentials; nothing is saved if not.
    crate::kms::provider(name, kind, &options)?.probe()?;
    let entry = ProviderEntry { name: name.to_string(), kind: kind.to_string(), options };
    store::commit(|_| match store::read()?.as_ref().and_then(|ks| ks.provider(name)) {
        Some(p) if *p != entry => {
            Err(TdeError::Store(tde_core::keystore::StoreError::ProviderExists(name.to_string())))
        }
        _ => {
            let mut rec = audit::entry(Op::ProviderAdded, name, audit::Outcome::Ok);
            rec.detail = format!("kind {kind}");
            Ok(vec![(Change::AddProvider(entry), Secret::None), audited(rec)])
        }
    })
}

/// tde_set_master_key(): makes `key_name` of `provider_name` the master key,
/// creating it if the provider can.  The first call creates the KEK; later
/// calls re-wrap the same KEK (master-key rotation: one provider call, no
/// table key changes).  The KEK is chosen under the store lock, so two
/// concurrent first calls cannot make two KEKs.
pub fn set_master_key(provider_name: &str, key_name: &str) -> Result<(), TdeError> {
    if key_name.is_empty() || key_name.len() > 255 {
        return Err(TdeError::Invalid("key name must be 1 to 255 characters".into()));
    }
    let ks = store::read()?;
    let entry = ks
        .as_ref()
        .and_then(|ks| ks.provider(provider_name).cloned())
        .ok_or_else(|| TdeError::UnknownProvider(provider_name.to_string()))?;
    let prov = crate::kms::provider(&entry.name, &entry.kind, &entry.options)?;
    store::commit(|ks| {
        // Provider calls happen here: under the store lock, which serialises
        // key store changes, but not the table lock that lookups need.
        prov.ensure_key(key_name)?;
        provider::verify(&prov, key_name)?;
        let kek = match (shmem::state().0, shmem::kek()) {
            (_, Some(k)) => k,
            (shmem::StoreState::Locked, None) => return Err(TdeError::Locked(shmem::state().1)),
            (_, None) => WrapKey::generate().map_err(|_| TdeError::Crypto)?,
        };
        let wrapped = prov.wrap(key_name, &kek, &kek_aad(&ks.store_id, provider_name, key_name))?;
        let principal = Principal {
            provider: provider_name.to_string(),
            key_name: key_name.to_string(),
            wrapped_kek: B64.encode(wrapped),
        };
        let rec = audit::entry(Op::MasterKeySet, &format!("{provider_name}/{key_name}"), audit::Outcome::Ok);
        Ok(vec![(Change::SetPrincipal(principal), Secret::Kek(kek)), audited(rec)])
    })
}
