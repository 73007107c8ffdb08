//! SQL-facing functions: a thin `#[pg_extern]` layer over plain Rust.
//! Each function converts arguments, calls into the module that does the
//! work, and turns errors into ereports with a SQLSTATE (error.rs).
//! Grants: sql/tde_objects.sql (loaded last, "finalize") revokes all of these from PUBLIC.

use pgrx::prelude::*;
use pgrx::JsonB;

use crate::audit::{self, Op};
use crate::error::OrRaise;
use crate::keys;

/// The extension's version, as built.
#[pg_extern]
fn tde_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Adds a master-key provider: kind 'file' ({"path": ...}) or 'env'
/// ({"variable": ...}).
#[pg_extern(volatile)]
fn tde_add_key_provider(name: &str, kind: &str, options: JsonB) {
    keys::add_provider(name, kind, options.0).map_err(|e| audit::failed(Op::ProviderAdded, name, e)).or_raise()
}

/// Makes `key_name` of `provider` the master key (creating it in a file
/// keyring if needed); re-wraps the cluster's key-encryption key.
#[pg_extern(volatile)]
fn tde_set_master_key(provider: &str, key_name: &str) {
    keys::set_master_key(provider, key_name)
        .map_err(|e| audit::failed(Op::MasterKeySet, &format!("{provider}/{key_name}"), e))
        .or_raise()
}

/// Moves to a new master key of the current provider (the file provider
/// creates it in its keyring), with a new key-encryption key under which
/// every table key is re-wrapped; data pages are not touched.  Returns the
/// new master key's name.
#[pg_extern(volatile)]
fn tde_rotate_master_key() -> String {
    keys::rotate_master_key().map_err(|e| audit::failed(Op::MasterKeyRotated, "", e)).or_raise()
}

/// Checks that the current master key works right now (a wrap and an
/// unwrap through its provider) and unwraps this cluster's key-encryption
/// key.  False, with a WARNING saying why (and an unwrap_failed record in
/// the audit trail), if not.
#[pg_extern(volatile)]
fn tde_verify_key() -> bool {
    match keys::verify_master_key() {
        Ok(_) => true,
        Err(e) => {
            let e = audit::failed(Op::UnwrapFailed, "", e);
            pgrx::warning!("tde: the master key cannot be used: {e}");
            false
        }
    }
}

/// Whether the relation's data is encrypted.  Relations without storage
/// (partitioned tables) report whether they use tde_heap.
#[pg_extern(
    stable,
    sql = "CREATE FUNCTION tde_is_encrypted(rel regclass) RETURNS bool STRICT STABLE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';"
)]
fn tde_is_encrypted(rel: pg_sys::Oid) -> bool {
    // SAFETY: relcache lookup of an existing relation, released below.
    unsafe {
        let r = pg_sys::RelationIdGetRelation(rel);
        if r.is_null() {
            crate::error::TdeError::NoSuchRelation(u32::from(rel)).raise();
        }
        let form = &*(*r).rd_rel;
        let has_storage = !matches!(form.relkind as u8, b'p' | b'I' | b'v' | b'f' | b'c');
        let out = if has_storage {
            keys::is_encrypted(&(*r).rd_locator, form.relpersistence as u8 == b't')
        } else {
            crate::am::uses_tde_heap(rel)
        };
        pg_sys::RelationClose(r);
        out
    }
}

/// Every key in the key store (no key material): one row per relation file.
// pgrx reads the column names from the signature, so the type stays spelled out.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile)]
fn tde_keys() -> TableIterator<
    'static,
    (
        name!(spcoid, pg_sys::Oid),
        name!(dboid, pg_sys::Oid),
        name!(relfilenode, pg_sys::Oid),
        name!(key_id, i64),
        name!(key_version, i32),
        name!(algorithm, &'static str),
        name!(created, TimestampWithTimeZone),
        name!(usable, bool),
    ),
> {
    let rows: Vec<_> = keys::list()
        .into_iter()
        .map(|k| {
            let created = to_timestamp(k.created as f64);
            (
                pg_sys::Oid::from(k.file.spc),
                pg_sys::Oid::from(k.file.db),
                pg_sys::Oid::from(k.file.rel),
                k.key_id as i64,
                k.version as i32,
                tde_core::keystore::ALGORITHM_XTS,
                created,
                k.usable,
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Gives every file of the table (heap, TOAST, indexes, owned sequences) a
/// new key version and re-encrypts every page under it, online: reads and
/// writes go on.  Returns the table's new key version.  With `background`,
/// returns at once and a background worker does the pass.  Running it
/// again after a crash finishes an interrupted rotation.
#[pg_extern(
    volatile,
    sql = "CREATE FUNCTION tde_rotate_key(rel regclass, background boolean DEFAULT false) RETURNS int STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';"
)]
fn tde_rotate_key(rel: pg_sys::Oid, background: bool) -> i32 {
    if background {
        crate::reencrypt::in_background(rel, crate::reencrypt::Pass::Rotate) as i32
    } else {
        crate::reencrypt::rotate(rel, crate::reencrypt::Throttle::from_gucs()) as i32
    }
}

/// Encrypts a plain table online: every file (heap, TOAST, indexes, owned
/// sequences) gets a key, every page is rewritten encrypted while the table
/// stays in use, and the table then uses tde_heap, so later rewrites stay
/// encrypted.
#[pg_extern(
    volatile,
    sql = "CREATE FUNCTION tde_encrypt_table(rel regclass, background boolean DEFAULT false) RETURNS void STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';"
)]
fn tde_encrypt_table(rel: pg_sys::Oid, background: bool) {
    pass(rel, crate::reencrypt::Pass::Encrypt, background)
}

/// Decrypts an encrypted table online (the reverse of tde_encrypt_table);
/// refused while tde.enforce_encryption is on.
#[pg_extern(
    volatile,
    sql = "CREATE FUNCTION tde_decrypt_table(rel regclass, background boolean DEFAULT false) RETURNS void STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';"
)]
fn tde_decrypt_table(rel: pg_sys::Oid, background: bool) {
    pass(rel, crate::reencrypt::Pass::Decrypt, background)
}

fn pass(rel: pg_sys::Oid, pass: crate::reencrypt::Pass, background: bool) {
    // SAFETY: a plain predicate on an OID.
    if unsafe { pg_sys::IsCatalogRelationOid(rel) } {
        crate::error::TdeError::Invalid(
            "system catalogs cannot be encrypted or decrypted one by one; the statistics catalogs are encrypted with the first encrypted table of their database".into(),
        )
        .raise();
    }
    if pass == crate::reencrypt::Pass::Encrypt {
        crate::statistics::ensure_encrypted();
    }
    if background {
        crate::reencrypt::in_background(rel, pass);
    } else {
        crate::reencrypt::encrypt(rel, pass, crate::reencrypt::Throttle::from_gucs());
    }
}

/// Pauses the running re-encryption pass over the table (it waits between
/// two pages until resumed).
#[pg_extern(
    volatile,
    sql = "CREATE FUNCTION tde_reencrypt_pause(rel regclass) RETURNS void STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';"
)]
fn tde_reencrypt_pause(rel: pg_sys::Oid) {
    crate::reencrypt::set_paused(rel, true)
}

/// Resumes a paused re-encryption pass over the table.
#[pg_extern(
    volatile,
    sql = "CREATE FUNCTION tde_reencrypt_resume(rel regclass) RETURNS void STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';"
)]
fn tde_reencrypt_resume(rel: pg_sys::Oid) {
    crate::reencrypt::set_paused(rel, false)
}

/// The running re-encryption passes of the current database, one row per
/// relation file (the view tde_reencryption_progress).
// The row type is pgrx's named-column tuple, as for tde_keys().
#[allow(clippy::type_complexity)]
#[pg_extern(volatile)]
fn tde_reencryption_progress_rows() -> TableIterator<
    'static,
    (
        name!(table_oid, pg_sys::Oid),
        name!(relation_oid, pg_sys::Oid),
        name!(fork, &'static str),
        name!(target_version, i32),
        name!(blocks_done, i64),
        name!(blocks_total, i64),
        name!(state, &'static str),
        name!(started_at, TimestampWithTimeZone),
        name!(pid, Option<i32>),
    ),
> {
    // SAFETY: plain read of a process global.
    let db = unsafe { pg_sys::MyDatabaseId };
    let rows: Vec<_> = crate::reencrypt::progress::list()
        .into_iter()
        .filter(|r| r.db == db)
        .map(|r| {
            let fork = match r.fork {
                1 => "fsm",
                2 => "vm",
                3 => "init",
                _ => "main",
            };
            let started = TimestampWithTimeZone::try_from(r.started_at).unwrap_or_else(|_| to_timestamp(0.0));
            (
                r.table,
                r.rel,
                fork,
                r.target_version as i32,
                r.blocks_done as i64,
                r.blocks_total as i64,
                r.state.name(),
                started,
                // None: a background pass asked for, its worker not yet running.
                (r.pid != 0).then_some(r.pid),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Every key version of the key store: the rows under the view tde_keys.
// The row type is pgrx's named-column tuple, as for tde_keys().
#[allow(clippy::type_complexity)]
#[pg_extern(volatile)]
fn tde_key_inventory() -> TableIterator<
    'static,
    (
        name!(spcoid, pg_sys::Oid),
        name!(dboid, pg_sys::Oid),
        name!(relfilenode, pg_sys::Oid),
        name!(key_id, i64),
        name!(version, i32),
        name!(state, &'static str),
        name!(algorithm, String),
        name!(master_key, Option<String>),
        name!(created_at, TimestampWithTimeZone),
        name!(retired_at, Option<TimestampWithTimeZone>),
        name!(destroyed_at, Option<TimestampWithTimeZone>),
        name!(overdue, bool),
    ),
> {
    let rows: Vec<_> = keys::inventory(crate::gucs::KEY_MAX_AGE.get() as i64)
        .or_raise()
        .into_iter()
        .map(|r| {
            (
                pg_sys::Oid::from(r.file.spc),
                pg_sys::Oid::from(r.file.db),
                pg_sys::Oid::from(r.file.rel),
                r.key_id as i64,
                r.version as i32,
                r.state,
                r.algorithm,
                r.master_key,
                to_timestamp(r.created as f64),
                r.retired_at.map(|t| to_timestamp(t as f64)),
                r.destroyed_at.map(|t| to_timestamp(t as f64)),
                r.overdue,
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Destroys every key version retired at least `older_than` ago: its
/// wrapped bytes are erased from the key store (the record stays, state
/// 'destroyed').  Returns how many were destroyed.
#[pg_extern(
    volatile,
    sql = "CREATE FUNCTION tde_destroy_retired_keys(older_than interval) RETURNS int STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';"
)]
fn tde_destroy_retired_keys(older_than: Interval) -> i32 {
    let secs = older_than.as_micros() / 1_000_000;
    keys::destroy_retired(secs.clamp(0, i64::MAX as i128) as i64)
        .map_err(|e| audit::failed(Op::KeyDestroyed, "", e))
        .or_raise() as i32
}

/// The audit trail, one row per record, oldest first (the view
/// tde_audit_log).  Records still queued are appended to the log first.
// The row type is pgrx's named-column tuple, as for tde_keys().
#[allow(clippy::type_complexity)]
#[pg_extern(volatile)]
fn tde_audit_log_rows() -> TableIterator<
    'static,
    (
        name!(seq, i64),
        name!(logged_at, TimestampWithTimeZone),
        name!(role, String),
        name!(database, String),
        name!(operation, String),
        name!(object, String),
        name!(file, Option<String>),
        name!(key_id, Option<i64>),
        name!(key_version, Option<i32>),
        name!(result, String),
        name!(detail, Option<String>),
        name!(keyed, bool),
        name!(chain, String),
    ),
> {
    let (bytes, _, _) = keys::audit_log().or_raise();
    let (lines, _) = tde_core::audit::split_lines(&bytes);
    let rows: Vec<_> = lines
        .iter()
        .filter_map(|l| serde_json::from_slice::<audit::Entry>(l).ok())
        .map(|e| {
            let nonempty = |s: String| (!s.is_empty()).then_some(s);
            (
                e.seq as i64,
                to_timestamp(e.time as f64 / 1e6),
                e.role,
                e.database,
                e.op,
                e.object,
                nonempty(e.file),
                e.key_id.map(|v| v as i64),
                e.key_version.map(|v| v as i32),
                e.result,
                nonempty(e.detail),
                e.keyed,
                e.chain,
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Verifies the whole audit trail: every record's chain value, their order,
/// and that the log reaches the head the key store holds.  Each problem is
/// reported as a WARNING; returns whether there was none.
#[pg_extern(volatile)]
fn tde_verify_audit_log() -> bool {
    if keys::state().0 == keys::StoreState::Locked {
        crate::error::TdeError::Locked(format!("cannot verify the audit trail: {}", keys::state().1)).raise();
    }
    let (bytes, head, key) = keys::audit_log().or_raise();
    let report = tde_core::audit::verify(&bytes, key.as_ref(), &head, true);
    for p in &report.problems {
        pgrx::warning!("tde: audit trail: {p}");
    }
    report.ok()
}

/// The key store's state: 'empty' (no master key yet), 'unlocked', or
/// 'locked' with the reason.
#[pg_extern(volatile)]
fn tde_key_store_state() -> TableIterator<'static, (name!(state, String), name!(reason, Option<String>))> {
    let (state, reason) = keys::state();
    let s = match state {
        keys::StoreState::Empty => "empty",
        keys::StoreState::Unlocked => "unlocked",
        keys::StoreState::Locked => "locked",
    };
    TableIterator::once((s.to_string(), (!reason.is_empty()).then_some(reason)))
}

/// The key providers the key store holds: name, kind, options (which name
/// where credentials are, never hold them), and whether the current master
/// key is in it.
#[pg_extern(volatile)]
fn tde_key_providers() -> TableIterator<
    'static,
    (name!(name, String), name!(kind, String), name!(options, pgrx::JsonB), name!(holds_master_key, bool)),
> {
    let rows = keys::providers().or_raise();
    TableIterator::new(rows.into_iter().map(|(n, k, o, m)| (n, k, pgrx::JsonB(o), m)))
}

/// The key worker: its pid (null if not running), requests waiting for it,
/// requests it is running, answers not yet collected, unlock attempts since
/// the key store was loaded and the last one's result.
#[pg_extern(volatile)]
fn tde_key_worker() -> TableIterator<
    'static,
    (
        name!(pid, Option<i32>),
        name!(waiting, i32),
        name!(running, i32),
        name!(uncollected, i32),
        name!(unlock_attempts, i64),
        name!(last_unlock, String),
    ),
> {
    let (pid, waiting, running, done) = crate::kms::queue::status();
    let (attempts, result, _) = crate::kms::queue::unlock_status();
    let last = match result {
        crate::kms::queue::UnlockResult::Pending => "none",
        crate::kms::queue::UnlockResult::Unlocked => "unlocked",
        crate::kms::queue::UnlockResult::Locked => "failed",
        crate::kms::queue::UnlockResult::Refused => "refused",
    };
    TableIterator::once((
        (pid != 0).then_some(pid),
        waiting as i32,
        running as i32,
        done as i32,
        attempts as i64,
        last.to_string(),
    ))
}

/// The shared key cache: its size (tde.key_cache_size), how many keys it
/// holds unwrapped, and its hits, misses (a key unwrapped from the key
/// table) and evictions since the server started.
#[pg_extern(volatile)]
fn tde_key_cache() -> TableIterator<
    'static,
    (name!(size, i32), name!(used, i32), name!(hits, i64), name!(misses, i64), name!(evictions, i64)),
> {
    let c = keys::cache_stats();
    TableIterator::once((c.size as i32, c.used as i32, c.hits as i64, c.misses as i64, c.evictions as i64))
}

fn to_timestamp(secs: f64) -> TimestampWithTimeZone {
    pgrx::datetime::to_timestamp(secs)
}

extension_sql_file!("../../sql/tde_objects.sql", name = "tde_objects", finalize);
