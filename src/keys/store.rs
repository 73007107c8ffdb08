//! Keeps `$PGDATA/tde/keystore`, the WAL and the shared key table in step.
//!
//! The file is an authenticated append-only log (tde-core's `storefile`).
//! Every change follows one path, under the store lock (keys/shmem.rs), with
//! the table lock taken only for step 3:
//!
//! 1. WAL-log the change through the tde resource manager (src/wal/mod.rs);
//! 2. append its frame to the file -- no fsync: the WAL has it, and redo
//!    appends it again if a crash loses it -- with checkpoints held off from
//!    1 to 2 (DELAY_CHKPT_START) and a PANIC if 2 fails after 1;
//! 3. update the shared key table.
//!
//! Each checkpoint (and restartpoint) then makes the file durable
//! (`checkpoint`): an fsync, or, once the log has grown past the snapshot,
//! a compaction into a new snapshot, replaced atomically.  So a change
//! costs one WAL record and one small write, whatever the store's size, and
//! any PGDATA that recovery can start from -- after a crash, from a base
//! backup, on a standby -- holds each change in the file or in the WAL it
//! replays.
//!
//! Redo (crash recovery, standbys, PITR) runs steps 2 and 3 with the change
//! from the WAL record, in generation order; a record the file already
//! holds is skipped.
//!
//! Removing the key of a file that is unlinked after a committed DROP is
//! the one change that is not WAL-logged: PostgreSQL's own commit/abort
//! records unlink the files on redo, and the storage manager's unlink
//! callback removes the key then as well.

use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use pgrx::pg_sys;
use tde_core::audit::{self as audit_log, AuditKey, Entry, Head, GENESIS};
use tde_core::keystore::{kek_aad, redo_step, Change, FileId, KeyEntry, KeyStore, Phase, Record, RedoStep};
use tde_core::provider::{self, MasterKeyProvider as _};
use tde_core::secret::{TableKey, WrapKey};
use tde_core::storefile::{self, AuthKey, Loaded};
use tde_core::wrap::WRAPPED_TABLE_KEY_LEN;

use super::shmem::{self, Exclusive, KeyInfo, Queue, StoreLock, StoreMeta};
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

/// The audit trail's log file (tde-core's `audit`), next to the key store.
pub fn audit_path() -> PathBuf {
    path().with_file_name("audit.log")
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

/// A wrapped key as the table holds it; a malformed one (which no server
/// writes) is kept as all zeros, which never unwraps, so the file stays
/// known as encrypted.
fn decode_wrapped(b64: &str) -> [u8; WRAPPED_TABLE_KEY_LEN] {
    let mut out = [0u8; WRAPPED_TABLE_KEY_LEN];
    if let Ok(b) = B64.decode(b64) {
        if b.len() == WRAPPED_TABLE_KEY_LEN {
            out.copy_from_slice(&b);
        }
    }
    out
}

fn wrapped_of(e: &KeyEntry) -> [u8; WRAPPED_TABLE_KEY_LEN] {
    decode_wrapped(&e.wrapped)
}

/// The table's encoding of a phase.
pub fn phase_code(p: Phase) -> u8 {
    match p {
        Phase::Encrypted => 0,
        Phase::Encrypting => 1,
        Phase::Decrypting => 2,
    }
}

/// Puts an entry of the store, with its live versions and phase, into the
/// table.
fn insert_entry(x: &Exclusive, e: &KeyEntry, tek: Option<&TableKey>) -> Result<(), shmem::TableFull> {
    let prev = e.previous.as_ref().map(|p| (p.version, decode_wrapped(&p.wrapped)));
    shmem::insert(x, &info_of(e), &wrapped_of(e), prev.as_ref().map(|(v, w)| (*v, w)), tek)?;
    if e.phase != Phase::Encrypted {
        shmem::set_phase(x, &e.file, phase_code(e.phase));
    }
    Ok(())
}

/// Unwraps the KEK with the store's current master key.
fn unlock(ks: &KeyStore) -> Result<WrapKey, TdeError> {
    let p = ks.principal.as_ref().ok_or(TdeError::NoMasterKey)?;
    let entry = ks.provider(&p.provider).ok_or_else(|| TdeError::UnknownProvider(p.provider.clone()))?;
    let prov = crate::kms::provider(&entry.name, &entry.kind, &entry.options)?;
    let blob = B64.decode(&p.wrapped_kek).map_err(|_| TdeError::Invalid("wrapped KEK is not base64".into()))?;
    let kek = prov
        .unwrap(&p.key_name, &blob, &kek_aad(&ks.store_id, &p.provider, &p.key_name))
        .map_err(|e| TdeError::Locked(format!("master key \"{}\" of provider \"{}\": {e}", p.key_name, p.provider)))?;
    Ok(kek)
}

fn meta_of(l: &Loaded) -> StoreMeta {
    let mut m = StoreMeta::NONE;
    m.exists = true;
    m.has_principal = l.state.principal.is_some();
    m.generation = l.state.generation;
    m.next_key_id = l.state.next_key_id;
    m.set_store_id(&l.state.store_id);
    m.last_tag = l.last_tag;
    m.file_len = l.valid_len;
    m.snapshot_len = l.snapshot_len;
    m.has_audit_key = l.state.audit_key.is_some();
    m.audit_seq = l.state.audit_head.seq;
    m.audit_chain = audit_log::from_hex(&l.state.audit_head.chain).unwrap_or(GENESIS);
    m
}

/// `meta_of` for a file this server just rewrote: the audit log's position
/// is unchanged.
fn meta_after_rewrite(l: &Loaded, before: &StoreMeta) -> StoreMeta {
    let mut m = meta_of(l);
    m.audit_file_seq = before.audit_file_seq;
    m.audit_pending_len = before.audit_pending_len;
    m.rewrites = before.rewrites + 1;
    m
}

/// The audit key of `ks`, unwrapped with its KEK.
fn unwrap_audit_key(ks: &KeyStore, kek: &WrapKey) -> Result<Option<AuditKey>, TdeError> {
    let Some(w) = &ks.audit_key else { return Ok(None) };
    let blob = B64.decode(w).map_err(|_| TdeError::Invalid("wrapped audit key is not base64".into()))?;
    AuditKey::unwrap(kek, &blob, &ks.store_id)
        .map(Some)
        .map_err(|_| TdeError::Locked("the audit key does not unwrap under the key-encryption key".into()))
}

/// Finds where the audit log ends (its last complete record), cutting off
/// a torn last line that a crash left: recovery appends that record again.
/// A last record that does not parse (an edit) does not stop the server:
/// `head` (the key store's) is taken instead, and verification reports it.
fn open_audit_log(head: u64) -> Result<u64, TdeError> {
    let p = audit_path();
    let io = |source| TdeError::Store(tde_core::keystore::StoreError::Io { what: "read", path: p.clone(), source });
    let (seq, end) = match audit_log::read_end(&p) {
        Ok(None) => return Ok(0),
        Ok(Some(x)) => x,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            pgrx::warning!(
                "tde: audit log \"{}\": the last record is unreadable ({e}); tde_verify_audit_log() will report it",
                p.display()
            );
            return Ok(head);
        }
        Err(e) => return Err(io(e)),
    };
    let len = std::fs::metadata(&p).map_err(io)?.len();
    if len > end {
        pgrx::log!("tde: audit log \"{}\": dropping a torn last line of {} bytes", p.display(), len - end);
        storefile::truncate(&p, end)?;
    }
    Ok(seq)
}

/// When `install` unwraps the KEK.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unlock {
    /// Not here: the postmaster, which never talks to a provider, installs
    /// the store locked; the key worker unlocks it (`try_unlock`).
    Defer,
    /// Now, through the provider (the key worker; single-user mode).
    /// `quiet`: the failure was reported already (a retry).
    Now { quiet: bool },
}

/// Reads, checks and authenticates the file, then fills the table from it.
/// A store with more keys than the table holds is refused before anything
/// changes: a key left out would make its file look plain.  If the master
/// key is unavailable the store cannot be authenticated: it is installed
/// locked, every file it lists unreadable, and says so.
fn install(s: &StoreLock, bytes: &[u8], mode: Unlock) -> Result<(), TdeError> {
    let p = path();
    let loaded = storefile::parse(bytes, &p)?;
    if loaded.torn_bytes > 0 {
        // A crash while appending: the WAL has what the tail held.
        pgrx::log!(
            "tde: key store file \"{}\": dropping a torn tail of {} bytes after generation {}",
            p.display(),
            loaded.torn_bytes,
            loaded.state.generation
        );
        storefile::truncate(&p, loaded.valid_len)?;
    }
    let ks = &loaded.state;
    let capacity = shmem::capacity();
    if ks.keys.len() > capacity as usize {
        return Err(TdeError::StoreTooLarge { keys: ks.keys.len(), capacity });
    }
    let kek = match ks.principal {
        None if loaded.needs_auth() => {
            return Err(TdeError::Store(tde_core::keystore::StoreError::Corrupt {
                path: p,
                why: "authenticated frames, but no master key".into(),
            }))
        }
        None => None,
        Some(_) if mode == Unlock::Defer => {
            Some(Err(TdeError::Locked("waiting for the key worker to unwrap the key-encryption key".into())))
        }
        Some(_) => match unlock(ks) {
            Ok(k) => {
                loaded.authenticate(&AuthKey::derive(&k, &ks.store_id), &p)?;
                Some(Ok(k))
            }
            Err(e) => Some(Err(e)),
        },
    };
    let mut m = meta_of(&loaded);
    m.audit_file_seq = open_audit_log(m.audit_seq)?;
    shmem::set_meta(s, &m);
    let audit_key = match &kek {
        Some(Ok(k)) => unwrap_audit_key(ks, k)?,
        _ => None,
    };
    shmem::with_exclusive(|x| -> Result<(), TdeError> {
        shmem::clear(x);
        match &kek {
            None => shmem::set_empty(x),
            Some(Ok(k)) => shmem::set_unlocked(x, k, &ks.store_id),
            Some(Err(e)) => shmem::set_locked(x, &e.to_string()),
        }
        if let Some(a) = &audit_key {
            shmem::set_audit_key(x, a);
        }
        for e in ks.keys.values() {
            insert_entry(x, e, None).map_err(|f| TdeError::TableFull(f.0))?;
        }
        Ok(())
    })?;
    if let (Some(Err(e)), Unlock::Now { quiet: false }) = (&kek, mode) {
        let p = ks.principal.as_ref().map(|p| format!("{}/{}", p.provider, p.key_name)).unwrap_or_default();
        let mut rec = crate::audit::entry(crate::audit::Op::UnwrapFailed, &p, crate::audit::Outcome::Failed);
        rec.detail = format!("server start: {e}");
        crate::audit::log_only(&rec);
        pgrx::warning!(
            "tde: cannot unlock the key store; encrypted relations are unreadable until the master key is available, and the key store is not authenticated until then: {e}"
        );
    }
    Ok(())
}

/// Loads the key store into the shared table at server start.  A corrupt,
/// unauthentic or unreadable key store stops the server: starting without
/// knowing which files are encrypted could write plaintext into them.
pub fn load_at_startup() {
    // SAFETY: plain read of a process global set at process start.
    let mode = if unsafe { pg_sys::IsPostmasterEnvironment } { Unlock::Defer } else { Unlock::Now { quiet: false } };
    crate::kms::queue::reset_unlock();
    let result = shmem::with_store_lock(|s| -> Result<(), TdeError> {
        match storefile::read(&path())? {
            None => {
                let mut m = StoreMeta::NONE;
                m.audit_file_seq = open_audit_log(0)?;
                shmem::set_meta(s, &m);
                shmem::with_exclusive(shmem::set_empty);
                Ok(())
            }
            Some(bytes) => {
                // Take env providers' master keys out of the postmaster's
                // environment: children inherit them in memory, but not the
                // programs they run (archive_command, COPY ... TO PROGRAM).
                if let Ok(l) = storefile::parse(&bytes, &path()) {
                    for p in l.state.providers.iter().filter(|p| p.kind == "env") {
                        if let Some(var) = p.options.get("variable").and_then(|v| v.as_str()) {
                            provider::capture_env_variable(var);
                        }
                    }
                }
                install(s, &bytes, mode)
            }
        }
    });
    if let Err(e) = result {
        e.raise_at(pgrx::PgLogLevel::FATAL);
    }
}

/// The key worker, while the store is locked: reads the file again and
/// installs it with the KEK unwrapped through the provider, authenticated.
/// `None` if another process holds the store lock (the caller retries: it
/// may be a process waiting for this worker).  `reported` is the failure
/// last logged, so a provider that stays down is reported once, not at
/// every retry.
pub fn try_unlock(reported: &mut String) -> Option<crate::kms::queue::UnlockResult> {
    use crate::kms::queue::UnlockResult;
    shmem::try_with_store_lock(|s| {
        if shmem::state().0 != shmem::StoreState::Locked {
            return UnlockResult::Unlocked;
        }
        let quiet = !reported.is_empty();
        let result = match storefile::read(&path()) {
            Ok(Some(bytes)) => install(s, &bytes, Unlock::Now { quiet }),
            Ok(None) => Err(TdeError::StoreRefused("the key store file disappeared".into())),
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(()) if shmem::state().0 == shmem::StoreState::Unlocked => {
                if quiet {
                    pgrx::log!("tde: the key store is unlocked: the master key is available again");
                }
                UnlockResult::Unlocked
            }
            Ok(()) => {
                *reported = shmem::state().1;
                UnlockResult::Locked
            }
            Err(e) => {
                let why = e.to_string();
                if *reported != why {
                    pgrx::warning!("tde: the key store is refused and stays locked: {why}");
                }
                shmem::with_exclusive(|x| shmem::set_locked(x, &why));
                *reported = why;
                UnlockResult::Refused
            }
        }
    })
}

fn random_store_id() -> Result<String, TdeError> {
    let k = WrapKey::generate().map_err(|_| TdeError::Crypto)?;
    Ok(k.expose()[..16].iter().map(|b| format!("{b:02x}")).collect())
}

/// What a change brings along that must not be in the WAL or the file: it
/// goes only into shared memory.
pub enum Secret {
    None,
    TableKey(TableKey),
    Kek(WrapKey),
    AuditKey(AuditKey),
}

/// What a change is built from: the store's id and counters (the file is
/// not read for a change).
pub struct View {
    pub store_id: String,
    pub next_key_id: u64,
}

/// Creates the file with an empty snapshot at generation 1 (the WAL's Init).
fn create_file(s: &StoreLock, store_id: &str) -> Result<StoreMeta, tde_core::keystore::StoreError> {
    let mut ks = KeyStore::new(store_id.to_string());
    ks.generation = 1;
    let (bytes, _) = storefile::encode_snapshot(&ks, None);
    storefile::replace(&path(), &bytes)?;
    let loaded = storefile::parse(&bytes, &path())?;
    let m = meta_after_rewrite(&loaded, &shmem::meta(s));
    shmem::set_meta(s, &m);
    Ok(m)
}

/// The frames of `records` after `m`, keyed once a master key is set
/// (`kek` is the new KEK if this batch sets the first master key); updates
/// `m` to what the file holds after them.
fn frames(m: &mut StoreMeta, records: &[Record], kek: Option<&WrapKey>) -> Result<Vec<u8>, TdeError> {
    let mut auth =
        if m.has_principal { Some(shmem::auth_key().ok_or_else(|| TdeError::Locked(shmem::state().1))?) } else { None };
    let mut out = Vec::new();
    for r in records {
        if matches!(r.change, Change::SetPrincipal(_)) && auth.is_none() {
            let k = kek.ok_or_else(|| TdeError::Internal("a first master key without its KEK".into()))?;
            auth = Some(AuthKey::derive(k, &m.store_id()));
            m.has_principal = true;
        }
        let (f, tag) = storefile::encode_change(&m.last_tag, r.generation, &r.change, auth.as_ref());
        out.extend_from_slice(&f);
        m.last_tag = tag;
        m.generation = r.generation;
        match &r.change {
            Change::AddKey(e) => m.next_key_id = m.next_key_id.max(e.key_id + 1),
            Change::SetAuditKey { .. } => m.has_audit_key = true,
            Change::Audit { entry } => advance_head(m, entry),
            _ => {}
        }
    }
    Ok(out)
}

fn advance_head(m: &mut StoreMeta, e: &Entry) {
    if e.seq > m.audit_seq {
        m.audit_seq = e.seq;
        m.audit_chain = e.chain_bytes().unwrap_or(GENESIS);
    }
}

/// Gives a batch's audit records their sequence numbers and chain values,
/// after the head in `m`.  The first record after a master key exists
/// brings the audit key along (a `SetAuditKey` change before it, wrapped by
/// the KEK) if the store has none yet.  `new_kek` is the KEK a `SetPrincipal`
/// of this batch brings.
fn seal_batch(
    m: &StoreMeta,
    batch: Vec<(Change, Secret)>,
    new_kek: Option<&WrapKey>,
) -> Result<Vec<(Change, Secret)>, TdeError> {
    let mut head = m.audit_head();
    let mut principal = m.has_principal;
    let mut key = if m.has_audit_key {
        Some(shmem::audit_key().ok_or_else(|| TdeError::Locked("the audit key is not available".into()))?)
    } else {
        None
    };
    let mut out = Vec::with_capacity(batch.len() + 1);
    for (change, secret) in batch {
        match change {
            Change::SetPrincipal(_) => {
                principal = true;
                out.push((change, secret));
            }
            Change::Audit { mut entry } => {
                if principal && key.is_none() {
                    let kek = match new_kek {
                        Some(k) => WrapKey::from_bytes(k.expose()).map_err(|_| TdeError::Crypto)?,
                        None => shmem::kek().ok_or_else(|| TdeError::Locked(shmem::state().1))?,
                    };
                    let k = AuditKey::generate().map_err(|_| TdeError::Crypto)?;
                    let wrapped = k.wrap(&kek, &m.store_id()).map_err(|_| TdeError::Crypto)?;
                    out.push((Change::SetAuditKey { wrapped: B64.encode(wrapped) }, Secret::None));
                    key = Some(k);
                }
                head = audit_log::seal(&mut entry, &head, key.as_ref());
                out.push((Change::Audit { entry }, Secret::None));
            }
            _ => out.push((change, secret)),
        }
    }
    // The new audit key goes into shared memory with the batch.
    if let (Some(k), false) = (key, m.has_audit_key) {
        let pos = out.iter().position(|(c, _)| matches!(c, Change::SetAuditKey { .. })).expect("added above");
        out[pos].1 = Secret::AuditKey(k);
    }
    Ok(out)
}

/// The audit log lines of a batch's records.
fn audit_lines(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        if let Some(e) = audit_entry(&r.change) {
            out.extend_from_slice(e.to_line().as_bytes());
        }
    }
    out
}

fn audit_entry(c: &Change) -> Option<&Entry> {
    match c {
        Change::Audit { entry } => Some(entry),
        Change::Rekey { audit, .. } => audit.as_ref(),
        _ => None,
    }
}

/// Each record also goes to the server log, with a fixed prefix.
fn log_audit(records: &[Record]) {
    for e in records.iter().filter_map(|r| audit_entry(&r.change)) {
        pgrx::log!("tde audit: {}", e.to_log());
    }
}

/// Makes a batch of changes durable: WAL, file (one append) and shared
/// table, in that order, one batch at a time (the store lock).  `build` sees
/// the store's id and counters and returns the changes, each with the secret
/// that goes with it.  It runs under the store lock but not the table lock,
/// so it may call a key provider without stalling lookups.
pub fn commit(build: impl FnOnce(&View) -> Result<Vec<(Change, Secret)>, TdeError>) -> Result<(), TdeError> {
    // SAFETY: plain call; true on a standby or during crash recovery.
    if unsafe { pg_sys::RecoveryInProgress() } {
        return Err(TdeError::InRecovery);
    }
    ensure_dir()?;
    // A locked store (its provider was down): one more try, before the
    // store lock, which the key worker's unlock needs.
    crate::kms::wait_for_unlock();
    shmem::with_store_lock(|s| {
        let mut m = shmem::meta(s);
        if !m.exists {
            // Log and create the new store before anything else, so a
            // failing first change cannot leave the WAL with one store id
            // and a later attempt with another.
            let store_id = random_store_id()?;
            let _delay = DelayCheckpoint::start();
            let lsn =
                wal::log_records(&[Record { generation: 1, change: Change::Init { store_id: store_id.clone() } }]);
            flush_wal(lsn);
            m = match create_file(s, &store_id) {
                Ok(m) => m,
                Err(e) => TdeError::SaveAfterLog(e).raise_at(pgrx::PgLogLevel::PANIC),
            };
        }
        let view = View { store_id: m.store_id(), next_key_id: m.next_key_id };
        let batch = build(&view)?;
        let new_kek = batch.iter().find_map(|(_, s)| match s {
            Secret::Kek(k) => WrapKey::from_bytes(k.expose()).ok(),
            _ => None,
        });
        let batch = seal_batch(&m, batch, new_kek.as_ref())?;
        let (changes, secrets): (Vec<Change>, Vec<Secret>) = batch.into_iter().unzip();
        let records: Vec<Record> = changes
            .into_iter()
            .zip(m.generation + 1..)
            .map(|(change, generation)| Record { generation, change })
            .collect();
        // Refuse before anything is logged: a key that is in the WAL and the
        // file but not in the table would make its file look plain.  The
        // table changes only under the store lock, so the count is stable.
        let new_files =
            records.iter().filter(|r| matches!(&r.change, Change::AddKey(e) if !shmem::contains(&e.file))).count();
        if shmem::used() as usize + new_files > shmem::capacity() as usize {
            return Err(TdeError::TableFull(shmem::capacity()));
        }
        let new_kek = secrets.iter().find_map(|s| match s {
            Secret::Kek(k) => Some(k),
            _ => None,
        });
        let mut after = m;
        let bytes = frames(&mut after, &records, new_kek)?;
        // Providers and master keys are rare and must be in the file at
        // once (read() sees them); table keys wait in the queue.
        let sync = records
            .iter()
            .any(|r| matches!(r.change, Change::Init { .. } | Change::AddProvider(_) | Change::SetPrincipal(_)));
        log_and_queue(s, &mut after, &records, &bytes, &audit_lines(&records), sync);
        shmem::set_meta(s, &after);
        shmem::with_exclusive(|x| {
            for (r, secret) in records.iter().zip(secrets) {
                match (&r.change, secret) {
                    (Change::AddKey(e), Secret::TableKey(tek)) => {
                        // Checked above; if it failed anyway, the file would
                        // have a key the table lacks, and look plain: restart
                        // and reload the table from the store.
                        if let Err(f) = insert_entry(x, e, Some(&tek)) {
                            TdeError::TableFull(f.0).raise_at(pgrx::PgLogLevel::PANIC);
                        }
                    }
                    (Change::SetPrincipal(_), Secret::Kek(kek)) => shmem::set_unlocked(x, &kek, &view.store_id),
                    (Change::SetAuditKey { .. }, Secret::AuditKey(k)) => shmem::set_audit_key(x, &k),
                    (Change::RotateKey { file, version, created, wrapped }, Secret::TableKey(tek)) => {
                        shmem::rotate(x, file, *version, *created, &decode_wrapped(wrapped), Some(&tek))
                    }
                    (change, _) => apply_to_table(x, change),
                }
            }
        });
        Ok(records)
    })
    .map(|records| log_audit(&records))
}

/// Master-key rotation: one change that replaces the KEK, made durable as a
/// new snapshot authenticated under the new KEK (frames keyed with the old
/// one cannot follow it).  `build` sees the whole current store (queued
/// frames appended first) and returns the change and the new KEK.
pub fn rekey(build: impl FnOnce(&KeyStore) -> Result<(Change, WrapKey), TdeError>) -> Result<(), TdeError> {
    // SAFETY: plain call.
    if unsafe { pg_sys::RecoveryInProgress() } {
        return Err(TdeError::InRecovery);
    }
    crate::kms::wait_for_unlock();
    shmem::with_store_lock(|s| {
        let mut m = shmem::meta(s);
        if !m.exists || !m.has_principal {
            return Err(TdeError::NoMasterKey);
        }
        drain(s, &mut m)?;
        shmem::set_meta(s, &m);
        let ks = authenticated_state(&m)?;
        let (mut change, new_kek) = build(&ks)?;
        // The audit key stays (the whole log stays verifiable) and is
        // re-wrapped under the new KEK; the rotation's record is sealed.
        let ak = match (shmem::audit_key(), m.has_audit_key) {
            (Some(k), _) => k,
            (None, false) => AuditKey::generate().map_err(|_| TdeError::Crypto)?,
            (None, true) => return Err(TdeError::Locked("the audit key is not available".into())),
        };
        if let Change::Rekey { audit_key, audit, .. } = &mut change {
            *audit_key = Some(B64.encode(ak.wrap(&new_kek, &ks.store_id).map_err(|_| TdeError::Crypto)?));
            if let Some(e) = audit.as_mut() {
                audit_log::seal(e, &m.audit_head(), Some(&ak));
            }
        }
        let rec = Record { generation: m.generation + 1, change };
        let _delay = DelayCheckpoint::start();
        let lsn = wal::log_records(std::slice::from_ref(&rec));
        flush_wal(lsn);
        if let Err(e) = write_rekeyed(s, ks, &rec, &new_kek, &ak) {
            e.raise_at(pgrx::PgLogLevel::PANIC);
        }
        Ok(rec)
    })
    .map(|rec| log_audit(std::slice::from_ref(&rec)))
}

/// The store as the file holds it, authenticated with the current key.
fn authenticated_state(m: &StoreMeta) -> Result<KeyStore, TdeError> {
    let p = path();
    let bytes = storefile::read(&p)?.ok_or_else(|| TdeError::Internal("the key store file disappeared".into()))?;
    let loaded = storefile::parse(&bytes, &p)?;
    if m.has_principal {
        let a = shmem::auth_key().ok_or_else(|| TdeError::Locked(shmem::state().1))?;
        loaded.authenticate(&a, &p)?;
    }
    Ok(loaded.state)
}

/// Applies a Rekey record to `ks`, writes the result as the new file (a
/// snapshot under the new KEK's authentication key) and puts the new KEK
/// and wrapped keys in shared memory.
fn write_rekeyed(
    s: &StoreLock,
    mut ks: KeyStore,
    rec: &Record,
    new_kek: &WrapKey,
    audit_key: &AuditKey,
) -> Result<(), TdeError> {
    let mut before = shmem::meta(s);
    if let Some(e) = audit_entry(&rec.change) {
        ensure_audit_line(&mut before, e)?;
    }
    ks.apply(&rec.change)?;
    ks.generation = rec.generation;
    let (bytes, _) = storefile::encode_snapshot(&ks, Some(&AuthKey::derive(new_kek, &ks.store_id)));
    storefile::replace(&path(), &bytes)?;
    shmem::set_meta(s, &meta_after_rewrite(&storefile::parse(&bytes, &path())?, &before));
    shmem::with_exclusive(|x| {
        shmem::set_unlocked(x, new_kek, &ks.store_id);
        shmem::set_audit_key(x, audit_key);
        for e in ks.keys.values() {
            // Replacing entries in place cannot overflow the table.
            let _ = insert_entry(x, e, None);
        }
    });
    Ok(())
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

/// WAL first, then the file, with checkpoints held off in between.
///
/// The file must never be ahead of the durable WAL: a frame whose record a
/// crash loses would give this server a change its standbys never see.  So
/// frames wait in a queue in shared memory until their WAL is flushed: the
/// next checkpoint, a full queue or a synchronous change flushes the WAL up
/// to them and appends them all (`drain`).  A checkpoint whose redo point
/// lies after our records waits (DELAY_CHKPT_START) until they are queued,
/// and its hook drains and fsyncs before it completes, so any PGDATA that
/// recovery can start from has each change either in the file or in the WAL
/// it replays.  Once the records are in the WAL, failing to queue or append
/// would leave the two apart: that is a PANIC, and crash recovery then
/// appends them.
///
/// So a new table key costs one WAL insert and a copy into the queue; the
/// WAL flush it waits for is usually its transaction's commit.
fn log_and_queue(s: &StoreLock, m: &mut StoreMeta, records: &[Record], frames: &[u8], lines: &[u8], sync: bool) {
    let _delay = DelayCheckpoint::start();
    let lsn = wal::log_records(records);
    if let Err(e) = queue_frames(s, m, frames, lines, lsn, sync) {
        TdeError::SaveAfterLog(e).raise_at(pgrx::PgLogLevel::PANIC);
    }
}

fn flush_wal(lsn: u64) {
    if lsn != 0 {
        // SAFETY: flushes WAL this server inserted (during recovery it only
        // advances minRecoveryPoint).
        unsafe { pg_sys::XLogFlush(lsn) };
    }
}

/// Queues (or, if `sync` or too large, appends) a batch's frames and its
/// audit log lines, which travel together: the lines are appended just
/// before the frames, after the WAL that holds both is flushed.
fn queue_frames(
    s: &StoreLock,
    m: &mut StoreMeta,
    frames: &[u8],
    lines: &[u8],
    lsn: u64,
    sync: bool,
) -> Result<(), tde_core::keystore::StoreError> {
    let too_large = frames.len() > shmem::QUEUE_BYTES || lines.len() > shmem::AUDIT_QUEUE_BYTES;
    if sync
        || m.pending_len as usize + frames.len() > shmem::QUEUE_BYTES
        || m.audit_pending_len as usize + lines.len() > shmem::AUDIT_QUEUE_BYTES
    {
        drain(s, m)?;
    }
    if sync || too_large {
        flush_wal(lsn);
        append_audit_lines(m, lines)?;
        storefile::append(&path(), frames)?;
        m.file_len += frames.len() as u64;
        m.dirty = true;
    } else {
        shmem::queue_write(s, Queue::Frames, m.pending_len as usize, frames);
        m.pending_len += frames.len() as u64;
        shmem::queue_write(s, Queue::Audit, m.audit_pending_len as usize, lines);
        m.audit_pending_len += lines.len() as u64;
        m.pending_lsn = m.pending_lsn.max(lsn);
    }
    Ok(())
}

/// Appends audit log lines that bring the log up to the head in `m`.
fn append_audit_lines(m: &mut StoreMeta, lines: &[u8]) -> Result<(), tde_core::keystore::StoreError> {
    if lines.is_empty() {
        return Ok(());
    }
    storefile::append_or_create(&audit_path(), lines)?;
    m.audit_file_seq = m.audit_seq;
    m.dirty = true;
    Ok(())
}

/// Appends `e` to the audit log unless the log has it already (redo after
/// a crash that kept it); a gap before it (records lost with the file) is
/// reported, and left for verification to find.
fn ensure_audit_line(m: &mut StoreMeta, e: &Entry) -> Result<(), tde_core::keystore::StoreError> {
    if e.seq <= m.audit_file_seq {
        return Ok(());
    }
    if e.seq != m.audit_file_seq + 1 {
        pgrx::warning!(
            "tde: audit log \"{}\" ends at record {}, but the next record to append is {}",
            audit_path().display(),
            m.audit_file_seq,
            e.seq
        );
    }
    storefile::append_or_create(&audit_path(), e.to_line().as_bytes())?;
    m.audit_file_seq = e.seq;
    m.dirty = true;
    Ok(())
}

/// Appends the queued audit lines and frames, after flushing the WAL that
/// holds them.
fn drain(s: &StoreLock, m: &mut StoreMeta) -> Result<(), tde_core::keystore::StoreError> {
    if m.pending_len == 0 && m.audit_pending_len == 0 {
        return Ok(());
    }
    flush_wal(m.pending_lsn);
    let lines = shmem::queue_read(s, Queue::Audit, m.audit_pending_len as usize);
    append_audit_lines(m, &lines)?;
    m.audit_pending_len = 0;
    let n = m.pending_len as usize;
    storefile::append(&path(), &shmem::queue_read(s, Queue::Frames, n))?;
    m.file_len += n as u64;
    m.pending_len = 0;
    m.pending_lsn = 0;
    m.dirty = true;
    Ok(())
}

/// Applies a change to the shared table when no secret came with it.
fn apply_to_table(x: &Exclusive, change: &Change) {
    match change {
        Change::AddKey(e) => {
            // In redo (a standby with a smaller tde.max_relation_keys) this
            // stops recovery: going on would treat the file as plain.
            if let Err(f) = insert_entry(x, e, None) {
                TdeError::TableFull(f.0).raise();
            }
        }
        Change::RemoveKey { file } => shmem::remove(x, file),
        Change::RotateKey { file, version, created, wrapped } => {
            shmem::rotate(x, file, *version, *created, &decode_wrapped(wrapped), None)
        }
        Change::RetireKeyVersion { file, version, .. } => shmem::retire(x, file, *version),
        Change::DestroyKeyVersion { .. } => {} // retired versions are not in the table
        Change::SetPhase { file, phase } => shmem::set_phase(x, file, phase_code(*phase)),
        Change::Rekey { .. } => {} // written by rekey / redo_rekey
        Change::Init { .. }
        | Change::AddProvider(_)
        | Change::SetPrincipal(_)
        | Change::SetAuditKey { .. }
        | Change::Audit { .. }
        | Change::Checkpoint { .. } => {}
    }
}

/// Whether the log part has grown enough to fold it into a new snapshot:
/// past the snapshot's own size (and 64 kB), so compaction's O(n) rewrite is
/// paid once per O(n) changes.
fn should_compact(m: &StoreMeta) -> bool {
    let log = m.file_len.saturating_sub(m.snapshot_len);
    log > m.snapshot_len.max(64 * 1024)
}

/// Rewrites the file as one snapshot (under the store lock).
fn compact(s: &StoreLock, m: &StoreMeta) -> Result<(), TdeError> {
    let p = path();
    debug_assert_eq!(m.pending_len, 0);
    let bytes = storefile::read(&p)?.ok_or_else(|| TdeError::Internal("the key store file disappeared".into()))?;
    let loaded = storefile::parse(&bytes, &p)?;
    let auth = if m.has_principal {
        let a = shmem::auth_key().ok_or_else(|| TdeError::Locked(shmem::state().1))?;
        loaded.authenticate(&a, &p)?;
        Some(a)
    } else {
        None
    };
    if loaded.state.generation != m.generation || loaded.valid_len != m.file_len {
        return Err(TdeError::Internal(format!(
            "key store file \"{}\" is not what this server wrote (generation {}, expected {})",
            p.display(),
            loaded.state.generation,
            m.generation
        )));
    }
    let (snapshot, _) = storefile::encode_snapshot(&loaded.state, auth.as_ref());
    storefile::replace(&p, &snapshot)?;
    let fresh = storefile::parse(&snapshot, &p)?;
    shmem::set_meta(s, &meta_after_rewrite(&fresh, m));
    Ok(())
}

/// CheckPoint_hook (every checkpoint and restartpoint, in the
/// checkpointer): makes every appended frame durable -- an fsync, or a
/// compaction -- and returns the record an online checkpoint writes after
/// its redo pointer: the generation it vouches for.  Every change up to it
/// is then durable in the file, so recovery from this checkpoint may refuse
/// a store below it.  None before the store exists.
///
/// A failed fsync is a PANIC, as for PostgreSQL's own data files: the
/// checkpoint must not complete as if the changes were durable.
pub fn checkpoint() -> Option<Record> {
    if !shmem::is_attached() {
        return None;
    }
    let (rec, plan) = shmem::with_store_lock(|s| {
        let mut m = shmem::meta(s);
        if !m.exists {
            return (None, None);
        }
        if let Err(e) = drain(s, &mut m) {
            TdeError::from(e).raise_at(pgrx::PgLogLevel::PANIC);
        }
        if m.dirty {
            for p in [Some(path()), (m.audit_file_seq > 0).then(audit_path)].into_iter().flatten() {
                if let Err(e) = storefile::sync(&p) {
                    TdeError::from(e).raise_at(pgrx::PgLogLevel::PANIC);
                }
            }
            m.dirty = false;
        }
        shmem::set_meta(s, &m);
        let auth = if m.has_principal { shmem::auth_key() } else { None };
        let plan = (should_compact(&m) && (auth.is_some() || !m.has_principal)).then(|| Compaction {
            cut: m.file_len,
            last_tag: m.last_tag,
            generation: m.generation,
            rewrites: m.rewrites,
            auth,
        });
        (Some(Record { generation: m.generation, change: Change::Checkpoint { store_id: m.store_id() } }), plan)
    });
    if let Some(plan) = plan {
        if let Err(e) = compact_online(plan) {
            pgrx::log!("tde: key store compaction skipped: {e}");
        }
    }
    rec
}

/// A compaction planned under the store lock: the file up to `cut` (frames
/// up to `generation`, the last with tag `last_tag`) becomes one snapshot.
struct Compaction {
    cut: u64,
    last_tag: [u8; storefile::TAG_LEN],
    generation: u64,
    rewrites: u64,
    auth: Option<AuthKey>,
}

/// Compaction without stalling key changes: the O(n) part -- reading,
/// authenticating and encoding the store, writing and fsyncing the new
/// snapshot -- runs without the store lock.  Under the lock again, the
/// frames appended meanwhile are re-chained after the new snapshot and
/// appended to it, and the new file replaces the old one.  Abandoned if the
/// file was rewritten meanwhile (master-key rotation, tde_destroy_retired_keys).
fn compact_online(plan: Compaction) -> Result<(), TdeError> {
    let p = path();
    let bytes = storefile::read(&p)?.ok_or_else(|| TdeError::Internal("the key store file disappeared".into()))?;
    let prefix =
        bytes.get(..plan.cut as usize).ok_or_else(|| TdeError::Internal("the key store file shrank".into()))?;
    let loaded = storefile::parse(prefix, &p)?;
    if let Some(a) = &plan.auth {
        loaded.authenticate(a, &p)?;
    }
    if loaded.state.generation != plan.generation || loaded.valid_len != plan.cut || loaded.last_tag != plan.last_tag {
        return Err(TdeError::Internal(format!(
            "key store file \"{}\" is not what this server wrote (generation {}, expected {})",
            p.display(),
            loaded.state.generation,
            plan.generation
        )));
    }
    let (snapshot, snapshot_tag) = storefile::encode_snapshot(&loaded.state, plan.auth.as_ref());
    drop(bytes);
    let tmp = storefile::temp_path(&p, "compact");
    storefile::write_new(&tmp, &snapshot)?;
    shmem::with_store_lock(|s| -> Result<(), TdeError> {
        let mut m = shmem::meta(s);
        if m.rewrites != plan.rewrites || !m.exists {
            let _ = std::fs::remove_file(&tmp);
            return Ok(());
        }
        if let Err(e) = drain(s, &mut m) {
            TdeError::from(e).raise_at(pgrx::PgLogLevel::PANIC);
        }
        shmem::set_meta(s, &m);
        let tail = storefile::read_range(&p, plan.cut, m.file_len)?;
        let (tail, last_tag) = storefile::rechain(&tail, &plan.last_tag, &snapshot_tag, plan.auth.as_ref())
            .map_err(|why| TdeError::Internal(format!("key store compaction: {why}")))?;
        if let Err(e) = storefile::finish_replace(&tmp, &p, &tail) {
            if tmp.exists() {
                return Err(e.into()); // not renamed: the old file stands
            }
            // Renamed, but not durably: the file and this server's idea of
            // it must not drift apart.
            TdeError::from(e).raise_at(pgrx::PgLogLevel::PANIC);
        }
        m.snapshot_len = snapshot.len() as u64;
        m.file_len = m.snapshot_len + tail.len() as u64;
        m.last_tag = last_tag;
        m.rewrites += 1;
        m.dirty = false;
        shmem::set_meta(s, &m);
        Ok(())
    })
}

fn refuse_store(why: String) -> ! {
    TdeError::StoreRefused(why).raise()
}

/// Redo of a WAL record: the same change, appended to this server's file
/// and applied to its table, in generation order.  A store file that is
/// missing, older than the WAL, or another cluster's, stops recovery (an
/// ERROR in the startup process is FATAL): going on would treat some
/// encrypted files as plain.  So does a locked store: a change cannot be
/// appended without the key that authenticates the file.
pub fn redo(rec: &Record) {
    if let Err(e) = ensure_dir() {
        e.raise();
    }
    let p = path();
    shmem::with_store_lock(|s| {
        let m = shmem::meta(s);
        let record_store = match &rec.change {
            Change::Init { store_id } | Change::Checkpoint { store_id } => Some(store_id),
            _ => None,
        };
        if let (true, Some(id)) = (m.exists, record_store) {
            if m.store_id() != *id {
                refuse_store(format!(
                    "key store file \"{}\" belongs to another cluster (store {}, the WAL has store {id})",
                    p.display(),
                    m.store_id()
                ));
            }
        }
        match redo_step(m.exists.then_some(m.generation), rec) {
            RedoStep::Done => {}
            RedoStep::Missing { need } => refuse_store(format!(
                "key store file \"{}\" is missing, but the WAL needs it at generation {need}",
                p.display()
            )),
            RedoStep::Behind { have, need } => refuse_store(format!(
                "key store file \"{}\" is older than the WAL: it has generation {have}, the WAL needs {need}",
                p.display()
            )),
            RedoStep::Apply => match &rec.change {
                Change::Init { store_id } => {
                    if let Err(e) = create_file(s, store_id) {
                        TdeError::from(e).raise();
                    }
                }
                change => redo_apply(s, m, rec, change),
            },
        }
        if let Some(e) = audit_entry(&rec.change) {
            let mut m = shmem::meta(s);
            if let Err(err) = ensure_audit_line(&mut m, e) {
                TdeError::from(err).raise();
            }
            shmem::set_meta(s, &m);
        }
    })
}

fn redo_apply(s: &StoreLock, m: StoreMeta, rec: &Record, change: &Change) {
    if let Change::Rekey { principal, .. } = change {
        return redo_rekey(s, m, rec, principal);
    }
    // A first master key on a standby: unwrap its KEK here, with this
    // server's provider configuration (the same keyring or variable).
    let mut new_kek = None;
    if let (Change::SetPrincipal(p), false) = (change, m.has_principal) {
        let ks = match read() {
            Ok(Some(mut ks)) => {
                ks.principal = Some(p.clone());
                ks
            }
            Ok(None) => refuse_store("the key store file disappeared".into()),
            Err(e) => e.raise(),
        };
        new_kek = Some(unlock(&ks).unwrap_or_else(|e| {
            refuse_store(format!("cannot replay the first master key of the key store on this server: {e}"))
        }));
    }
    if m.has_principal && shmem::auth_key().is_none() {
        refuse_store(format!(
            "cannot replay a key store change while the key store is locked (replaying needs the master key): {}",
            shmem::state().1
        ));
    }
    let mut after = m;
    let bytes = match frames(&mut after, std::slice::from_ref(rec), new_kek.as_ref()) {
        Ok(b) => b,
        Err(e) => e.raise(),
    };
    // The WAL being replayed is durable already: append at once.
    if let Err(e) = storefile::append(&path(), &bytes) {
        TdeError::from(e).raise();
    }
    after.file_len += bytes.len() as u64;
    after.dirty = true;
    let audit_key = match change {
        Change::SetAuditKey { wrapped } => {
            let kek = shmem::kek().unwrap_or_else(|| refuse_store(shmem::state().1));
            let blob = B64.decode(wrapped).unwrap_or_default();
            Some(AuditKey::unwrap(&kek, &blob, &m.store_id()).unwrap_or_else(|_| {
                refuse_store("the audit key in the WAL does not unwrap under this server's key-encryption key".into())
            }))
        }
        _ => None,
    };
    shmem::set_meta(s, &after);
    shmem::with_exclusive(|x| match (change, &new_kek, &audit_key) {
        (Change::SetPrincipal(_), Some(kek), _) => shmem::set_unlocked(x, kek, &m.store_id()),
        (Change::SetAuditKey { .. }, _, Some(k)) => shmem::set_audit_key(x, k),
        _ => apply_to_table(x, change),
    });
}

/// Redo of a master-key rotation: this server unwraps the new KEK with its
/// own provider configuration (the standby needs the new master key now)
/// and rewrites its file as the primary did.
fn redo_rekey(s: &StoreLock, m: StoreMeta, rec: &Record, principal: &tde_core::keystore::Principal) {
    let mut ks = match authenticated_state(&m) {
        Ok(ks) => ks,
        Err(e) => refuse_store(format!("cannot replay a master-key rotation: {e}")),
    };
    let mut probe = ks.clone();
    probe.principal = Some(principal.clone());
    let new_kek = unlock(&probe).unwrap_or_else(|e| {
        refuse_store(format!(
            "cannot replay a master-key rotation: the new master key is not available on this server (give it the new key and start it again): {e}"
        ))
    });
    let audit_key = match &rec.change {
        Change::Rekey { audit_key: Some(w), .. } => {
            let blob = B64.decode(w).unwrap_or_default();
            AuditKey::unwrap(&new_kek, &blob, &ks.store_id).unwrap_or_else(|_| {
                refuse_store("cannot replay a master-key rotation: its audit key does not unwrap".into())
            })
        }
        _ => match shmem::audit_key() {
            Some(k) => k,
            None => AuditKey::generate().unwrap_or_else(|_| TdeError::Crypto.raise()),
        },
    };
    ks.generation = m.generation;
    if let Err(e) = write_rekeyed(s, ks, rec, &new_kek, &audit_key) {
        e.raise();
    }
}

/// Removes the keys of dropped files with one append.  Runs after commit
/// (or in redo), where an ERROR is not allowed: failures are logged and
/// leave orphan keys in the file, which are harmless.
pub fn remove_quietly(files: &[FileId]) {
    if !shmem::is_attached() {
        return;
    }
    let files: Vec<FileId> = files.iter().filter(|f| shmem::contains(f)).copied().collect();
    if files.is_empty() {
        return;
    }
    shmem::with_store_lock(|s| {
        let m = shmem::meta(s);
        let result = (|| -> Result<StoreMeta, TdeError> {
            let auth = shmem::auth_key().ok_or_else(|| TdeError::Locked(shmem::state().1))?;
            let mut after = m;
            let mut bytes = Vec::new();
            for file in &files {
                // Same generation: this change is not in the WAL.
                let (f, tag) = storefile::encode_change(
                    &after.last_tag,
                    m.generation,
                    &Change::RemoveKey { file: *file },
                    Some(&auth),
                );
                bytes.extend_from_slice(&f);
                after.last_tag = tag;
            }
            queue_frames(s, &mut after, &bytes, &[], 0, false)?;
            Ok(after)
        })();
        match result {
            Ok(after) => shmem::set_meta(s, &after),
            Err(e) => pgrx::warning!("tde: could not remove the keys of {} dropped file(s): {e}", files.len()),
        }
        shmem::with_exclusive(|x| {
            for file in &files {
                shmem::remove(x, file);
            }
        });
    })
}

/// Rewrites the file as one snapshot now (after destroying key versions:
/// their wrapped bytes must leave the log, not wait for a checkpoint).
pub fn compact_now() -> Result<(), TdeError> {
    shmem::with_store_lock(|s| {
        let mut m = shmem::meta(s);
        if !m.exists {
            return Ok(());
        }
        drain(s, &mut m)?;
        shmem::set_meta(s, &m);
        compact(s, &m)?;
        let mut m = shmem::meta(s);
        m.dirty = false;
        shmem::set_meta(s, &m);
        Ok(())
    })
}

/// The whole key store as it stands, queued frames included (they are
/// appended first, after a WAL flush): for the key inventory.  O(n).
pub fn read_current() -> Result<Option<KeyStore>, TdeError> {
    if shmem::is_attached() {
        shmem::with_store_lock(|s| -> Result<(), TdeError> {
            let mut m = shmem::meta(s);
            if m.exists && m.pending_len > 0 {
                drain(s, &mut m)?;
                shmem::set_meta(s, &m);
            }
            Ok(())
        })?;
    }
    read()
}

/// The audit log as it stands (queued records appended first, after a WAL
/// flush), the head the key store holds, and the audit key if unlocked.
pub fn read_audit_log() -> Result<(Vec<u8>, Head, Option<AuditKey>), TdeError> {
    if !shmem::is_attached() {
        return Err(TdeError::NotPreloaded);
    }
    shmem::with_store_lock(|s| {
        let mut m = shmem::meta(s);
        if m.exists && (m.pending_len > 0 || m.audit_pending_len > 0) {
            drain(s, &mut m)?;
            shmem::set_meta(s, &m);
        }
        let bytes = storefile::read(&audit_path())?.unwrap_or_default();
        Ok((bytes, m.audit_head(), shmem::audit_key()))
    })
}

/// Reads the whole key store for its providers and master key, which are
/// written synchronously (queued table keys may be missing).  O(n), so never
/// on a per-table path.  Authenticated when the store is unlocked.
pub fn read() -> Result<Option<KeyStore>, TdeError> {
    let p = path();
    match storefile::read(&p)? {
        None => Ok(None),
        Some(bytes) => {
            let l = storefile::parse(&bytes, &p)?;
            if let (true, Some(a)) = (l.needs_auth(), shmem::auth_key()) {
                l.authenticate(&a, &p)?;
            }
            Ok(Some(l.state))
        }
    }
}
