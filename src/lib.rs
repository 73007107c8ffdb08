//! `tde`: Transparent Data Encryption for PostgreSQL.
//!
//! Where to look:
//! - `_PG_init` below: refuses to load unless preloaded, then starts each module.
//! - `src/sql/`: the SQL-facing functions, a thin layer over the rest (views
//!   and grants are plain SQL in the top-level `sql/`).
//! - `crates/tde-core`: ciphers, key wrapping and formats, free of PostgreSQL.
//! - `src/smgr/`: where a page gets encrypted (`src/spill.rs`: where a
//!   logical decoding spill file does); `src/reencrypt.rs`: where a
//!   table's pages are re-encrypted under a new key version (tde_rotate_key).
//! - `src/keys/`: where a key comes from (the key store, shared memory).
//! - `src/kms/`: the key worker, the only process that talks to a key
//!   provider (KMS, HSM); the remote providers are crates/tde-kms.
//!
//! The library must be in `shared_preload_libraries`: it registers a storage
//! manager, shared memory and a WAL resource manager, all of which exist only
//! when set up in the postmaster before any backend starts.

// Every unsafe block says why it is sound (checked by the lint layer).
#![warn(clippy::undocumented_unsafe_blocks)]

use pgrx::prelude::*;

mod am;
mod audit;
mod error;
mod gucs;
mod hooks;
mod keys;
mod kms;
mod pg;
mod reencrypt;
mod smgr;
mod spill;
mod sql;
mod statistics;
mod wal;

::pgrx::pg_module_magic!(name, version);

/// Called by PostgreSQL when the library is loaded.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain read of a PostgreSQL global set by the postmaster while
    // it processes shared_preload_libraries; we are on the main thread.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    if !preloading {
        error::TdeError::NotPreloaded.raise();
    }
    gucs::init();
    // SAFETY: installing shared memory hooks from _PG_init, chaining the
    // previous ones.
    unsafe {
        PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
    wal::init();
    smgr::init();
    hooks::init();
    statistics::init();
    spill::init();
    audit::init();
    reencrypt::scheduler::register();
    kms::register();
}

static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;

#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: chaining to the previous hook.
    if let Some(prev) = unsafe { PREV_SHMEM_REQUEST } {
        // SAFETY: the hook that was installed before ours, called as PostgreSQL would.
        unsafe { prev() };
    }
    keys::request_shmem(gucs::max_relation_keys(), gucs::key_cache_size());
    reencrypt::progress::request();
    kms::request_shmem();
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: chaining to the previous hook.
    if let Some(prev) = unsafe { PREV_SHMEM_STARTUP } {
        // SAFETY: the hook that was installed before ours, called as PostgreSQL would.
        unsafe { prev() };
    }
    // Every preloaded library has run its _PG_init by now.
    smgr::check_still_selected();
    // The key worker's slots first: loading the key store resets its state.
    kms::attach_shmem();
    // The postmaster creates the table and loads the key store into it (also
    // after a crash restart); children inherit it.
    keys::attach_shmem(gucs::max_relation_keys(), gucs::key_cache_size());
    reencrypt::progress::attach();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn version_matches_the_crate() {
        let v = Spi::get_one::<String>("SELECT tde_version()").unwrap();
        assert_eq!(v.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    }

    /// Sets up a file keyring (idempotent: key store changes are not
    /// transactional, and every test shares the cluster).
    fn keys() {
        Spi::run(
            "SELECT tde_add_key_provider('t', 'file', '{\"path\": \"/tmp/tde_pgrx_test_keyring\"}');
             SELECT tde_set_master_key('t', 'mek-1')",
        )
        .unwrap();
    }

    /// Bytes of the relation's first segment, read back from disk.
    fn file_contains(rel: &str, needle: &str) -> bool {
        Spi::run("CHECKPOINT").unwrap();
        Spi::get_one::<bool>(&format!(
            "SELECT position(convert_to('{needle}', 'UTF8') IN pg_read_binary_file(pg_relation_filepath('{rel}'))) > 0"
        ))
        .unwrap()
        .unwrap()
    }

    #[pg_test]
    fn encrypted_pages_on_disk_hold_no_plaintext() {
        keys();
        Spi::run(
            "CREATE TABLE enc_t (v text) USING tde_heap;
             INSERT INTO enc_t SELECT 'PGTEST-ENC-' || g FROM generate_series(1, 100) g;
             CREATE TABLE plain_t (v text);
             INSERT INTO plain_t SELECT 'PGTEST-PLAIN-' || g FROM generate_series(1, 100) g;",
        )
        .unwrap();
        assert!(!file_contains("enc_t", "PGTEST-ENC-"), "plaintext in an encrypted file");
        assert!(file_contains("plain_t", "PGTEST-PLAIN-"), "control: the plain file shows its rows");
        let n = Spi::get_one::<i64>("SELECT count(*) FROM enc_t WHERE v LIKE 'PGTEST-ENC-%'").unwrap();
        assert_eq!(n, Some(100));
        assert_eq!(Spi::get_one::<bool>("SELECT tde_is_encrypted('enc_t')").unwrap(), Some(true));
        assert_eq!(Spi::get_one::<bool>("SELECT tde_is_encrypted('plain_t')").unwrap(), Some(false));
    }

    #[pg_test(error = "tde: key provider \"missing\" does not exist")]
    fn unknown_provider_is_an_error() {
        Spi::run("SELECT tde_set_master_key('missing', 'k')").unwrap();
    }

    #[pg_test]
    fn library_is_preloaded() {
        let v = Spi::get_one::<String>("SHOW shared_preload_libraries").unwrap();
        assert!(v.unwrap_or_default().split(',').any(|l| l.trim() == "tde"));
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'tde'"]
    }
}
