//! Logical decoding's spill files: WHERE A SPILLED CHANGE GETS ENCRYPTED.
//!
//! Why this exists: a transaction being decoded that outgrows
//! `logical_decoding_work_mem` is written out, change by change -- whole
//! old and new tuples -- to `pg_replslot/<slot>/xid-*.spill`, and read back
//! at its commit.  Rows of encrypted tables would reach disk there in
//! plaintext.  The core patch (patches/pg17/0003) calls our hook on the
//! bytes of each change just before they are written and just after they
//! are read back, with the file and the offset, and when a file is removed.
//!
//! Every spill file is encrypted, whatever table its rows come from: a file
//! mixes the changes of every table a transaction touched.
//!
//! - The key: one AES-256-CTR key per process (tde-core's `stream`,
//!   OpenSSL EVP),
//!   generated at its first spill, never written anywhere.  Spill files
//!   are private to the process that writes them (each decoding session
//!   starts by removing its slot's old ones), so no other process ever
//!   needs it, and a crash leaves files nobody can read, which the next
//!   session removes.
//! - The nonce: one per file *incarnation*, from a per-process counter: a
//!   write at offset 0 creates (or, after a removal, re-creates) the file
//!   and takes a fresh nonce, so no (key, counter) pair ever covers two
//!   different contents, even when a transaction is spilled, restored,
//!   removed and spilled again under the same file name.
//! - Fail closed: reading a file this process holds no nonce for is an
//!   ERROR, never a plaintext read.
//!
//! The map of live files is bounded by the files on disk: an entry goes
//! with its file's removal.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, CStr};

use pgrx::pg_sys;
use pgrx::prelude::*;
use tde_core::stream::StreamKey;

use crate::error::TdeError;

struct Spill {
    key: StreamKey,
    next_nonce: u64,
    files: HashMap<Vec<u8>, u64>,
}

thread_local! {
    static SPILL: RefCell<Option<Spill>> = const { RefCell::new(None) };
}

/// Installs the hook (from _PG_init).
pub fn init() {
    // SAFETY: _PG_init runs once per process, before any decoding.  The
    // hook is ours alone: a second library encrypting the same bytes would
    // corrupt them, so a hook already set is an error, not a chain.
    unsafe {
        let installed = pg_sys::ReorderBufferSpill_hook;
        if installed.is_some() {
            TdeError::Internal("another library already set ReorderBufferSpill_hook".into()).raise();
        }
        pg_sys::ReorderBufferSpill_hook = Some(spill_hook);
    }
}

/// What the hook does, without raising: Err names the file to refuse.
fn transform(
    op: pg_sys::ReorderBufferSpillOp::Type,
    path: &[u8],
    offset: u64,
    data: &mut [u8],
) -> Result<(), TdeError> {
    use pg_sys::ReorderBufferSpillOp::*;
    SPILL.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            if op != REORDER_BUFFER_SPILL_WRITE {
                return if op == REORDER_BUFFER_SPILL_READ {
                    Err(TdeError::UnknownSpillFile(String::from_utf8_lossy(path).into_owned()))
                } else {
                    Ok(())
                };
            }
            let key = StreamKey::generate().map_err(|_| TdeError::Crypto)?;
            *cell = Some(Spill { key, next_nonce: 1, files: HashMap::new() });
        }
        let s = cell.as_mut().expect("set above");
        let nonce = match op {
            REORDER_BUFFER_SPILL_REMOVE => {
                s.files.remove(path);
                return Ok(());
            }
            REORDER_BUFFER_SPILL_WRITE if offset == 0 => {
                let n = s.next_nonce;
                s.next_nonce += 1;
                s.files.insert(path.to_vec(), n);
                n
            }
            _ => *s
                .files
                .get(path)
                .ok_or_else(|| TdeError::UnknownSpillFile(String::from_utf8_lossy(path).into_owned()))?,
        };
        s.key.apply(nonce, offset, data).map_err(|_| TdeError::Crypto)
    })
}

#[pg_guard]
unsafe extern "C-unwind" fn spill_hook(
    op: pg_sys::ReorderBufferSpillOp::Type,
    path: *const c_char,
    offset: pg_sys::off_t,
    data: *mut c_char,
    len: pg_sys::Size,
) {
    // SAFETY: path is the NUL-terminated path of the spill file (core patch).
    let path = unsafe { CStr::from_ptr(path) }.to_bytes();
    let data: &mut [u8] = if data.is_null() || len == 0 {
        &mut []
    } else {
        // SAFETY: data points at len bytes of the reorder buffer's own
        // buffer, ours to transform in place for the call (core patch).
        unsafe { std::slice::from_raw_parts_mut(data as *mut u8, len) }
    };
    // The ERROR is raised after every borrow above has ended.
    if let Err(e) = transform(op, path, offset.max(0) as u64, data) {
        e.raise();
    }
}
