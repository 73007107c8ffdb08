//! The tde WAL resource manager: key store changes in the WAL.
//!
//! Why it exists: crash recovery, streaming standbys and point-in-time
//! recovery must see the same keys as the primary, in the same order as the
//! pages they protect.  Each key store change (keys/store.rs) is one WAL
//! record of this resource manager; its redo applies the change again.
//!
//! Resource manager id 163 (`TDE_RMGR_ID`): custom ids are 128..=255, 128 is
//! for experiments, and PostgreSQL's wiki page CustomWALResourceManagers lists
//! 129..=140 and 241 as taken (140 is Percona's pg_tde).  docs/wal.md has the
//! record format and the id's registration.
//!
//! Record payload: a `Record` (the change and the store generation it leads
//! to) as JSON.  It holds wrapped keys only (AES-GCM under the KEK or the
//! master key), never key material in plain form.
//!
//! Besides changes, the checkpointer writes one `Checkpoint` record per
//! online checkpoint (the core patch's CheckPoint_hook, keys/store.rs), so
//! that recovery from that checkpoint can refuse an older or missing store.

use std::ffi::{c_char, CStr};

use pgrx::pg_sys;
use tde_core::keystore::{Change, Record};

use crate::error::TdeError;

pub const TDE_RMGR_ID: u8 = 163;
const XLOG_TDE_CHANGE: u8 = 0x10;

struct Rmgr(pg_sys::RmgrData);
// SAFETY: the table is immutable after construction and only read by
// PostgreSQL (single-threaded processes).
unsafe impl Sync for Rmgr {}

static RMGR: Rmgr = Rmgr(pg_sys::RmgrData {
    rm_name: c"tde".as_ptr(),
    rm_redo: Some(redo),
    rm_desc: Some(desc),
    rm_identify: Some(identify),
    rm_startup: None,
    rm_cleanup: None,
    rm_mask: None,
    rm_decode: None,
});

static mut PREV_CHECKPOINT: pg_sys::CheckPoint_hook_type = None;

pub fn init() {
    // SAFETY: called from _PG_init while shared_preload_libraries load, as
    // RegisterCustomRmgr requires; RMGR lives for the whole process.  The
    // checkpoint hook (core patch 0002) is chained.
    unsafe {
        pg_sys::RegisterCustomRmgr(TDE_RMGR_ID as _, &RMGR.0);
        PREV_CHECKPOINT = pg_sys::CheckPoint_hook;
        pg_sys::CheckPoint_hook = Some(checkpoint);
    }
}

fn insert(rec: &Record, unimportant: bool) -> pg_sys::XLogRecPtr {
    // Serialising plain data with string keys cannot fail; if it ever did,
    // an empty record would lose the change, so stop instead.
    let payload = match serde_json::to_vec(rec) {
        Ok(p) => p,
        Err(e) => TdeError::Internal(format!("could not encode a key store change for the WAL: {e}")).raise(),
    };
    // SAFETY: the standard XLogBeginInsert/XLogRegisterData/XLogInsert
    // sequence; `payload` outlives XLogInsert, which copies it.
    unsafe {
        pg_sys::XLogBeginInsert();
        if unimportant {
            pg_sys::XLogSetRecordFlags(pg_sys::XLOG_MARK_UNIMPORTANT as u8);
        }
        pg_sys::XLogRegisterData(payload.as_ptr() as *mut c_char, payload.len() as u32);
        pg_sys::XLogInsert(TDE_RMGR_ID as _, XLOG_TDE_CHANGE)
    }
}

/// Writes `records` to the WAL (no flush: keys/store.rs decides when) and
/// returns the end of the last one.
pub fn log_records(records: &[Record]) -> pg_sys::XLogRecPtr {
    let mut lsn = 0;
    for r in records {
        lsn = insert(r, false);
    }
    lsn
}

/// CheckPoint_hook: every checkpoint and restartpoint makes the key store
/// file durable (keys/store.rs).  Online checkpoints (not restartpoints, not
/// shutdown or end-of-recovery checkpoints, which may not insert WAL) then
/// write a record of the store generation they vouch for.  Marked
/// unimportant, so an idle server still skips its idle checkpoints.  No
/// flush: the checkpoint record that follows is flushed.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn checkpoint(redo: pg_sys::XLogRecPtr, flags: std::ffi::c_int) {
    // SAFETY: chaining to the previous hook with our own arguments.
    if let Some(prev) = unsafe { PREV_CHECKPOINT } {
        // SAFETY: the hook that was installed before ours, with our own arguments.
        unsafe { prev(redo, flags) };
    }
    let rec = crate::keys::checkpoint();
    let no_wal = (pg_sys::CHECKPOINT_IS_SHUTDOWN | pg_sys::CHECKPOINT_END_OF_RECOVERY) as std::ffi::c_int;
    // SAFETY: plain call.
    if flags & no_wal != 0 || unsafe { pg_sys::RecoveryInProgress() } {
        return;
    }
    if let Some(rec) = rec {
        insert(&rec, true);
    }
}

/// The record carried by a WAL record of ours.
unsafe fn record_change(record: *mut pg_sys::XLogReaderState) -> Option<Record> {
    // SAFETY: `record` is the decoded record PostgreSQL hands to redo/desc
    // (caller); main_data holds main_data_len bytes.
    let decoded = unsafe { (*record).record };
    // SAFETY: its `record` field is the decoded record, valid for this call.
    let (ptr, len) = unsafe { ((*decoded).main_data, (*decoded).main_data_len as usize) };
    if ptr.is_null() || len == 0 {
        return None; // from_raw_parts must not see NULL
    }
    // SAFETY: main_data holds main_data_len bytes, checked non-NULL above.
    let data = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
    serde_json::from_slice(data).ok()
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn redo(record: *mut pg_sys::XLogReaderState) {
    // SAFETY: called by the startup process with a valid record.
    match unsafe { record_change(record) } {
        Some(rec) => crate::keys::redo(&rec),
        None => TdeError::Internal("malformed WAL record".into()).raise(),
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn desc(buf: pg_sys::StringInfo, record: *mut pg_sys::XLogReaderState) {
    // SAFETY: valid record and StringInfo from pg_waldump / redo debugging.
    let text = match unsafe { record_change(record) } {
        Some(rec) => {
            let what = match rec.change {
                Change::Init { .. } => "init".to_string(),
                Change::AddProvider(p) => format!("add provider \"{}\" kind {}", p.name, p.kind),
                Change::SetPrincipal(p) => format!("set master key \"{}\" of provider \"{}\"", p.key_name, p.provider),
                Change::AddKey(k) => format!("add key {} for {}", k.key_id, k.file),
                Change::RemoveKey { file } => format!("remove key of {file}"),
                Change::RotateKey { file, version, .. } => format!("rotate key of {file} to version {version}"),
                Change::RetireKeyVersion { file, version, .. } => format!("retire key version {version} of {file}"),
                Change::DestroyKeyVersion { file, version, .. } => format!("destroy key version {version} of {file}"),
                Change::SetPhase { file, phase } => format!("{file} is now {phase:?}"),
                Change::SetAuditKey { .. } => "set audit key".to_string(),
                Change::Audit { entry } => format!("audit record {}: {} {}", entry.seq, entry.op, entry.result),
                Change::Rekey { principal, keys, .. } => format!(
                    "new master key \"{}\" of provider \"{}\" and KEK, {} key versions re-wrapped",
                    principal.key_name,
                    principal.provider,
                    keys.len()
                ),
                Change::Checkpoint { .. } => "checkpoint".to_string(),
            };
            format!("generation {}: {what}", rec.generation)
        }
        None => "malformed".to_string(),
    };
    let c = std::ffi::CString::new(text).unwrap_or_default();
    // SAFETY: appends a NUL-terminated string to a valid StringInfo.
    unsafe { pg_sys::appendStringInfoString(buf, c.as_ptr()) };
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn identify(_info: u8) -> *const c_char {
    const NAME: &CStr = c"CHANGE";
    NAME.as_ptr()
}
