//! Keeps `$PGDATA/tde/keystore`, the WAL and the shared key table in step.
//!
//! Every change follows one path, under the store lock (keys/shmem.rs), with
//! the table lock taken only for step 4:
//!
//! 1. read the key store file and apply the change in memory (validation,
//!    and the capacity check: nothing is logged that cannot be applied);
//! 2. WAL-log the change through the tde resource manager (src/wal/mod.rs);
//! 3. replace the file atomically (tmp, fsync, rename, fsync dir), with
//!    checkpoints held off from 2 to 3 (DELAY_CHKPT_START) and a PANIC if 3
//!    fails after 2 (`log_and_save`);
//! 4. update the shared key table.
//!
//! Redo (crash recovery, standbys, PITR) runs steps 1, 3 and 4 with the
//! change from the WAL record.  Changes are idempotent, so a file that is
//! already ahead of the WAL (crash between 3 and the next checkpoint) is fine.
//!
//! Key removal after a committed DROP is the one change that is not logged:
//! PostgreSQL's own commit/abort records unlink the files on redo, and the
//! storage manager's unlink callback removes the key then as well.

use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use pgrx::pg_sys;
use tde_core::keystore::{kek_aad, redo_step, tek_aad, Change, FileId, KeyEntry, KeyStore, Record, RedoStep};
use tde_core::provider;
use tde_core::secret::{TableKey, WrapKey};
use tde_core::wrap::unwrap_table_key;

use super::shmem::{self, Exclusive, KeyInfo};
use crate::error::TdeError;
use crate::wal;

pub fn path() -> PathBuf {
    // SAFETY: DataDir is set by the postmaster before libraries load, and
    // every process runs with its working directory there.
    let dir = unsafe {
        if pg_sys::DataDir.is_null() {
            PathBuf::from(".")
        } else {
            PathBuf::from(std::ffi::CStr::from_ptr(pg_sys::DataDir).to_string_lossy().into_owned())
        }
    };
    dir.join("tde").join("keystore")
}

fn ensure_dir() -> Result<(), TdeError> {
    let p = path();
    let dir = p.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|source| {
        TdeError::Store(tde_core::keystore::StoreError::Io { what: "create directory for", path: p.clone(), source })
    })?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    Ok(())
}

fn info_of(e: &KeyEntry) -> KeyInfo {
    KeyInfo { file: e.file, key_id: e.key_id, version: e.version, created: e.created, usable: true }
}

/// Unwraps the KEK with the store's current master key.
fn unlock(ks: &KeyStore) -> Result<WrapKey, TdeError> {
    let p = ks.principal.as_ref().ok_or(TdeError::NoMasterKey)?;
    let entry = ks.provider(&p.provider).ok_or_else(|| TdeError::UnknownProvider(p.provider.clone()))?;
    let prov = provider::from_config(&entry.kind, &entry.options)?;
    let blob = B64.decode(&p.wrapped_kek).map_err(|_| TdeError::Invalid("wrapped KEK is not base64".into()))?;
    let kek = prov
        .unwrap(&p.key_name, &blob, &kek_aad(&ks.store_id, &p.provider, &p.key_name))
        .map_err(|e| TdeError::Locked(format!("master key \"{}\" of provider \"{}\": {e}", p.key_name, p.provider)))?;
    Ok(kek)
}

fn unwrap_entry(ks: &KeyStore, kek: &WrapKey, e: &KeyEntry) -> Option<TableKey> {
    let blob = B64.decode(&e.wrapped).ok()?;
    unwrap_table_key(kek, &blob, &tek_aad(&ks.store_id, &e.file, e.key_id, e.version)).ok()
}

/// Fills the shared table from `ks`: unlock it with the master key, unwrap
/// every table key.  A key that fails to unwrap stays listed as unusable, so
/// its relation is never mistaken for a plain one.  A store with more keys
/// than the table holds is refused before anything changes: a key left out
/// would make its file look plain.
fn fill(x: &Exclusive, ks: &KeyStore) -> Result<(), TdeError> {
    let capacity = shmem::capacity_locked(x);
    if ks.keys.len() > capacity as usize {
        return Err(TdeError::StoreTooLarge { keys: ks.keys.len(), capacity });
    }
    shmem::clear(x);
    let kek = match ks.principal {
        None => {
            shmem::set_empty(x);
            None
        }
        Some(_) => match unlock(ks) {
            Ok(k) => {
                shmem::set_unlocked(x, &k);
                Some(k)
            }
            Err(e) => {
                pgrx::warning!("tde: cannot unlock the key store; encrypted relations are unreadable until the master key is available: {e}");
                shmem::set_locked(x, &e.to_string());
                None
            }
        },
    };
    for e in &ks.keys {
        let tek = kek.as_ref().and_then(|k| unwrap_entry(ks, k, e));
        if kek.is_some() && tek.is_none() {
            pgrx::warning!("tde: the key of relation file {} does not unwrap (tampered key store?)", e.file);
        }
        shmem::insert(x, &info_of(e), tek.as_ref()).map_err(|f| TdeError::TableFull(f.0))?;
    }
    Ok(())
}

/// Loads the key store into the shared table at server start.  A corrupt or
/// unreadable key store stops the server: starting without knowing which
/// files are encrypted could write plaintext into them.
pub fn load_at_startup() {
    let result = shmem::with_exclusive(|x| match KeyStore::load(&path()) {
        Ok(None) => {
            shmem::set_empty(x);
            Ok(())
        }
        Ok(Some(ks)) => {
            shmem::set_store_version(x, ks.generation, &ks.store_id);
            // Take env providers' master keys out of the postmaster's
            // environment: children inherit them in memory, but not the
            // programs they run (archive_command, COPY ... TO PROGRAM).
            for p in ks.providers.iter().filter(|p| p.kind == "env") {
                if let Some(var) = p.options.get("variable").and_then(|v| v.as_str()) {
                    provider::capture_env_variable(var);
                }
            }
            fill(x, &ks)
        }
        Err(e) => Err(TdeError::from(e)),
    });
    if let Err(e) = result {
        // Starting without knowing which files are encrypted could write
        // plaintext into them.
        e.raise_at(pgrx::PgLogLevel::FATAL);
    }
}

fn random_store_id() -> Result<String, TdeError> {
    let k = WrapKey::generate().map_err(|_| TdeError::Crypto)?;
    Ok(k.expose()[..16].iter().map(|b| format!("{b:02x}")).collect())
}

/// What a change brings along that must not be in the WAL or the file: it
/// goes only into the shared table.
pub enum Secret {
    None,
    TableKey(TableKey),
    Kek(WrapKey),
}

/// Makes a batch of changes durable: WAL, file (rewritten once) and shared
/// table, in that order, one batch at a time (the store lock).  `build` sees
/// the current store and returns the changes (so it can pick key ids), each
/// with the secret that goes with it.  It runs under the store lock but not
/// the table lock, so it may call a key provider without stalling lookups.
pub fn commit(build: impl FnOnce(&KeyStore) -> Result<Vec<(Change, Secret)>, TdeError>) -> Result<(), TdeError> {
    // SAFETY: plain call; true on a standby or during crash recovery.
    if unsafe { pg_sys::RecoveryInProgress() } {
        return Err(TdeError::InRecovery);
    }
    ensure_dir()?;
    shmem::with_store_lock(|_s| {
        let mut ks = match KeyStore::load(&path())? {
            Some(ks) => ks,
            None => {
                // Log and save the new store before anything else, so a
                // failing first change cannot leave the WAL with one store
                // id and a later attempt with another.
                let store_id = random_store_id()?;
                let mut ks = KeyStore::new(store_id.clone());
                ks.generation = 1;
                log_and_save(&ks, &[Record { generation: 1, change: Change::Init { store_id } }]);
                shmem::with_exclusive(|x| shmem::set_store_version(x, ks.generation, &ks.store_id));
                ks
            }
        };
        let (changes, secrets): (Vec<Change>, Vec<Secret>) = build(&ks)?.into_iter().unzip();
        let first = ks.generation + 1;
        let records: Vec<Record> =
            changes.into_iter().zip(first..).map(|(change, generation)| Record { generation, change }).collect();
        for r in &records {
            ks.apply(&r.change)?;
            ks.generation = r.generation;
        }
        // Refuse before anything is logged: a key that is in the WAL and the
        // file but not in the table would leave an orphan, or worse.  The
        // table changes only under the store lock, so the count is stable.
        let new_files =
            records.iter().filter(|r| matches!(&r.change, Change::AddKey(e) if !shmem::contains(&e.file))).count();
        if shmem::used() as usize + new_files > shmem::capacity() as usize {
            return Err(TdeError::TableFull(shmem::capacity()));
        }
        log_and_save(&ks, &records);
        shmem::with_exclusive(|x| {
            shmem::set_store_version(x, ks.generation, &ks.store_id);
            for (r, secret) in records.iter().zip(secrets) {
                match (&r.change, secret) {
                    (Change::AddKey(e), Secret::TableKey(tek)) => {
                        // Checked above; if it failed anyway, the file would
                        // have a key the table lacks, and look plain: restart
                        // and reload the table from the store.
                        if let Err(f) = shmem::insert(x, &info_of(e), Some(&tek)) {
                            TdeError::TableFull(f.0).raise_at(pgrx::PgLogLevel::PANIC);
                        }
                    }
                    (Change::SetPrincipal(_), Secret::Kek(kek)) => shmem::set_unlocked(x, &kek),
                    (change, _) => apply_to_table(x, &ks, change),
                }
            }
        });
        Ok(())
    })
}

/// Holds checkpoints off while set (PostgreSQL's DELAY_CHKPT_START, as used
/// for changes made outside shared buffers); cleared on drop, also when an
/// ERROR unwinds through.
struct DelayCheckpoint;

impl DelayCheckpoint {
    fn start() -> DelayCheckpoint {
        // SAFETY: MyProc is this backend's PGPROC; only this process writes
        // its delayChkptFlags, which the checkpointer reads.
        unsafe { (*pg_sys::MyProc).delayChkptFlags |= pg_sys::DELAY_CHKPT_START as i32 };
        DelayCheckpoint
    }
}

impl Drop for DelayCheckpoint {
    fn drop(&mut self) {
        // SAFETY: as in start().
        unsafe { (*pg_sys::MyProc).delayChkptFlags &= !(pg_sys::DELAY_CHKPT_START as i32) };
    }
}

/// WAL first, then the file, with checkpoints held off in between.  A
/// checkpoint whose redo point lies after our record waits until the file
/// holds the change, so any PGDATA recovery can start from -- after a crash,
/// from a base backup, on a standby -- has the change either in the file or
/// in the WAL it replays.  Once the record is flushed, failing to save the
/// file would leave the two apart for good: that is a PANIC, and crash
/// recovery then replays the change into the file.
fn log_and_save(ks: &KeyStore, records: &[Record]) {
    let _delay = DelayCheckpoint::start();
    wal::log_records(records);
    if let Err(e) = ks.save(&path()) {
        TdeError::SaveAfterLog(e).raise_at(pgrx::PgLogLevel::PANIC);
    }
}

/// Applies a change to the shared table when no secret came with it.
fn apply_to_table(x: &Exclusive, ks: &KeyStore, change: &Change) {
    match change {
        Change::AddKey(e) => {
            let tek = shmem::kek_locked(x).and_then(|k| unwrap_entry(ks, &k, e));
            // In redo (a standby with a smaller tde.max_relation_keys) this
            // stops recovery: going on would treat the file as plain.
            if let Err(f) = shmem::insert(x, &info_of(e), tek.as_ref()) {
                TdeError::TableFull(f.0).raise();
            }
        }
        Change::RemoveKey { file } => shmem::remove(x, file),
        // A new master key: retry unlocking if we are locked.
        Change::SetPrincipal(_) => {
            if shmem::kek_locked(x).is_none() {
                if let Err(e) = fill(x, ks) {
                    e.raise();
                }
            }
        }
        Change::Init { .. } | Change::AddProvider(_) | Change::Checkpoint { .. } => {}
    }
}

/// The record the checkpointer writes after the redo pointer of an online
/// checkpoint (wal/mod.rs): the store generation this checkpoint vouches
/// for.  Every change up to it is in the durable file (changes update the
/// shared generation only after saving), so recovery from this checkpoint
/// may refuse a store below it.  None before the store exists.
pub fn checkpoint_record() -> Option<Record> {
    if !shmem::is_attached() {
        return None;
    }
    let (generation, store_id) = shmem::store_version();
    (generation > 0).then_some(Record { generation, change: Change::Checkpoint { store_id } })
}

fn refuse_store(why: String) -> ! {
    TdeError::StoreRefused(why).raise()
}

/// Redo of a WAL record: the same change, applied to this server's file and
/// table, in generation order.  A store file that is missing, older than the
/// WAL, or another cluster's, stops recovery (an ERROR in the startup
/// process is FATAL): going on would treat some encrypted files as plain.
pub fn redo(rec: &Record) {
    if let Err(e) = ensure_dir() {
        e.raise();
    }
    let p = path();
    shmem::with_store_lock(|_s| {
        let loaded = match KeyStore::load(&p) {
            Ok(ks) => ks,
            Err(e) => TdeError::from(e).raise(),
        };
        let record_store = match &rec.change {
            Change::Init { store_id } | Change::Checkpoint { store_id } => Some(store_id),
            _ => None,
        };
        if let (Some(ks), Some(id)) = (&loaded, record_store) {
            if &ks.store_id != id {
                refuse_store(format!(
                    "key store file \"{}\" belongs to another cluster (store {}, the WAL has store {id})",
                    p.display(),
                    ks.store_id
                ));
            }
        }
        match redo_step(loaded.as_ref().map(|ks| ks.generation), rec) {
            RedoStep::Done => {}
            RedoStep::Missing { need } => refuse_store(format!(
                "key store file \"{}\" is missing, but the WAL needs it at generation {need}",
                p.display()
            )),
            RedoStep::Behind { have, need } => refuse_store(format!(
                "key store file \"{}\" is older than the WAL: it has generation {have}, the WAL needs {need}",
                p.display()
            )),
            RedoStep::Apply => {
                let mut ks = match (loaded, &rec.change) {
                    (Some(ks), _) => ks,
                    (None, Change::Init { store_id }) => KeyStore::new(store_id.clone()),
                    (None, _) => unreachable!("redo_step applies only Init without a file"),
                };
                if let Err(e) = ks.apply(&rec.change) {
                    TdeError::from(e).raise();
                }
                ks.generation = rec.generation;
                if let Err(e) = ks.save(&p) {
                    TdeError::from(e).raise();
                }
                shmem::with_exclusive(|x| {
                    shmem::set_store_version(x, ks.generation, &ks.store_id);
                    apply_to_table(x, &ks, &rec.change);
                });
            }
        }
    })
}

/// Removes the keys of dropped files, rewriting the file once.  Runs after
/// commit (or in redo), where an ERROR is not allowed: failures are logged
/// and leave orphan keys, which are harmless.
pub fn remove_quietly(files: &[FileId]) {
    if !shmem::is_attached() {
        return;
    }
    let files: Vec<FileId> = files.iter().filter(|f| shmem::contains(f)).copied().collect();
    if files.is_empty() {
        return;
    }
    shmem::with_store_lock(|_s| {
        let result = (|| -> Result<(), TdeError> {
            if let Some(mut ks) = KeyStore::load(&path())? {
                for file in &files {
                    ks.apply(&Change::RemoveKey { file: *file })?;
                }
                ks.save(&path())?;
            }
            Ok(())
        })();
        shmem::with_exclusive(|x| {
            for file in &files {
                shmem::remove(x, file);
            }
        });
        if let Err(e) = result {
            pgrx::warning!("tde: could not remove the keys of {} dropped file(s): {e}", files.len());
        }
    })
}

/// Reads the key store (for SQL functions that list providers).
pub fn read() -> Result<Option<KeyStore>, TdeError> {
    Ok(KeyStore::load(&path())?)
}
