//! All of tde's settings (postgresql.conf `tde.*`), in one place.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// When on, creating a table or materialized view that is not tde_heap is an error.
pub static ENFORCE_ENCRYPTION: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Capacity of the shared key table (one entry per encrypted relation file).
pub static MAX_RELATION_KEYS: GucSetting<i32> = GucSetting::<i32>::new(16384);

/// Unwrapped table keys kept in shared memory (the key cache).
pub static KEY_CACHE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(4096);

/// Cryptoperiod of table keys, in seconds (0: off).
pub static KEY_MAX_AGE: GucSetting<i32> = GucSetting::<i32>::new(0);

/// Rotate keys older than tde.key_max_age automatically (the scheduler).
pub static AUTO_ROTATE: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Seconds between two rounds of the re-encryption scheduler.
pub static SCHEDULER_NAPTIME: GucSetting<i32> = GucSetting::<i32>::new(60);

/// Re-encryption throttling, in the style of vacuum_cost_delay/limit.
pub static REENCRYPT_COST_DELAY: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static REENCRYPT_COST_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(200);

/// How long a request to the key worker (a wrap or unwrap through a key
/// provider) may take, in milliseconds.
pub static PROVIDER_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// A JSON file of per-provider option overrides, read by the key worker
/// (src/kms/overrides.rs).
pub static PROVIDER_OVERRIDES: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(None);

pub fn init() {
    GucRegistry::define_string_guc(
        c"tde.provider_overrides",
        c"JSON file of key provider options that this server uses instead of the stored ones.",
        c"For a standby or a restored backup that reaches its key provider differently (another region, a replica key, another endpoint or credential file): {\"provider name\": {\"option\": value}}. A null value removes the option. The key store and the WAL keep the primary's options.",
        &PROVIDER_OVERRIDES,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"tde.provider_timeout",
        c"How long a wrap or unwrap through a key provider may take before it fails.",
        c"Requests go to the key worker, the only process that talks to key providers; one that gets no answer in this time fails with an error naming the provider. The key worker also gives each provider call this long.",
        &PROVIDER_TIMEOUT,
        100,
        600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"tde.enforce_encryption",
        c"Refuse to create tables that are not encrypted.",
        c"When on, CREATE TABLE, CREATE TABLE AS, CREATE MATERIALIZED VIEW and ALTER TABLE ... SET ACCESS METHOD fail unless the result uses tde_heap. System catalogs are exempt.",
        &ENFORCE_ENCRYPTION,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"tde.max_relation_keys",
        c"Maximum number of encrypted relation files (keys held in shared memory).",
        c"Each encrypted table, index, TOAST table and sequence file needs one entry, which holds its key wrapped (never in plain form). Costs about 270 bytes of shared memory each.",
        &MAX_RELATION_KEYS,
        16,
        16 * 1024 * 1024,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"tde.key_max_age",
        c"Cryptoperiod of table keys: a current key version older than this is flagged overdue in tde_keys (0: off).",
        c"For example '365d'. tde_rotate_key gives a table's files a new version.",
        &KEY_MAX_AGE,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"tde.auto_rotate",
        c"Rotate table keys older than tde.key_max_age automatically.",
        c"The re-encryption scheduler runs tde_rotate_key on each table with an overdue key, one table at a time, throttled by tde.reencrypt_cost_delay and tde.reencrypt_cost_limit.",
        &AUTO_ROTATE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"tde.scheduler_naptime",
        c"Time between two rounds of the re-encryption scheduler.",
        c"Each round finishes interrupted re-encryption passes, warns about overdue keys (once a day each) and, with tde.auto_rotate, rotates them.",
        &SCHEDULER_NAPTIME,
        1,
        86400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"tde.reencrypt_cost_delay",
        c"Sleep of a re-encryption pass after every tde.reencrypt_cost_limit pages, in milliseconds (0: none).",
        c"Throttles tde_rotate_key the way vacuum_cost_delay throttles VACUUM; a background pass takes the value of the session that started it.",
        &REENCRYPT_COST_DELAY,
        0,
        1000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"tde.reencrypt_cost_limit",
        c"Pages a re-encryption pass rewrites between two sleeps of tde.reencrypt_cost_delay.",
        c"",
        &REENCRYPT_COST_LIMIT,
        1,
        100000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"tde.key_cache_size",
        c"Number of unwrapped table keys kept in shared memory.",
        c"A key not in the cache is unwrapped from the key table when a page of its file is read or written, and evicts the least recently used one. Each costs about 90 bytes of locked memory.",
        &KEY_CACHE_SIZE,
        1,
        16 * 1024 * 1024,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

pub fn max_relation_keys() -> u32 {
    MAX_RELATION_KEYS.get().max(16) as u32
}

pub fn key_cache_size() -> u32 {
    KEY_CACHE_SIZE.get().max(1) as u32
}

/// tde.provider_timeout as a Duration.
pub fn provider_timeout() -> std::time::Duration {
    std::time::Duration::from_millis(PROVIDER_TIMEOUT.get().max(100) as u64)
}

/// tde.provider_overrides, if set.
pub fn provider_overrides() -> Option<String> {
    PROVIDER_OVERRIDES.get().map(|c| c.to_string_lossy().into_owned()).filter(|s| !s.is_empty())
}
