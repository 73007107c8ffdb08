-- sql/tde_objects.sql: the table access method, views and grants of tde.
-- Loaded last by CREATE EXTENSION (pgrx "finalize"), after every function.

CREATE FUNCTION tde_heap_handler(internal) RETURNS table_am_handler
    AS 'MODULE_PATHNAME', 'tde_heap_handler' LANGUAGE C STRICT;
CREATE ACCESS METHOD tde_heap TYPE TABLE HANDLER tde_heap_handler;
COMMENT ON ACCESS METHOD tde_heap IS 'heap with every page encrypted (AES-256-XTS, per-table keys)';

-- One row per encrypted relation file of the current database (plus shared
-- relations), with the relation it belongs to, its current key version, and
-- the state of a re-encryption pass working on it, if any.
CREATE VIEW tde_status AS
SELECT s.relation,
       s.key_id,
       s.key_version,
       s.algorithm,
       s.created,
       s.usable,
       -- waiting, running or paused while a re-encryption pass works on it
       (SELECT p.state FROM tde_reencryption_progress_rows() p
         WHERE p.relation_oid = s.relation::oid LIMIT 1) AS reencryption
  FROM (SELECT pg_filenode_relation(
                   CASE WHEN k.spcoid = d.dattablespace THEN 0 ELSE k.spcoid END,
                   k.relfilenode) AS relation,
               k.*
          FROM tde_keys() k
          JOIN pg_database d ON d.datname = current_database()
         WHERE k.dboid = d.oid OR k.dboid = 0) s;

-- The key inventory: one row per key version of every encrypted relation
-- file, with its state (active, retired, destroyed), the master key that
-- wraps it, its age, and whether it is older than tde.key_max_age.
CREATE VIEW tde_keys AS
SELECT k.key_id,
       CASE WHEN k.dboid = d.oid OR k.dboid = 0 THEN
         pg_filenode_relation(CASE WHEN k.spcoid = d.dattablespace THEN 0 ELSE k.spcoid END, k.relfilenode)
       END AS relation,
       k.spcoid,
       k.dboid,
       k.relfilenode,
       k.version,
       k.state,
       k.algorithm,
       k.master_key,
       k.created_at,
       k.retired_at,
       k.destroyed_at,
       now() - k.created_at AS age,
       k.overdue
  FROM tde_key_inventory() k
  JOIN pg_database d ON d.datname = current_database();

-- Re-encryption passes running in the current database, in the spirit of
-- pg_stat_progress_*: one row per relation file of a pass.
CREATE VIEW tde_reencryption_progress AS
SELECT p.table_oid::regclass AS "table",
       p.relation_oid::regclass AS relation,
       p.fork,
       p.target_version,
       p.blocks_done,
       p.blocks_total,
       p.state,
       p.started_at,
       p.pid
  FROM tde_reencryption_progress_rows() p;

-- The audit trail: one row per key operation, oldest first.  The chain
-- column lets anyone re-check a copy; tde_verify_audit_log() checks it all.
CREATE VIEW tde_audit_log AS
SELECT a.seq,
       a.logged_at,
       a.role,
       a.database,
       a.operation,
       a.object,
       a.file,
       a.key_id,
       a.key_version,
       a.result,
       a.detail,
       a.keyed,
       a.chain
  FROM tde_audit_log_rows() a;

REVOKE ALL ON FUNCTION tde_add_key_provider(text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_set_master_key(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_rotate_master_key() FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_is_encrypted(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_keys() FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_key_store_state() FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_key_cache() FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_key_providers() FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_key_worker() FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_rotate_key(regclass, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_reencrypt_pause(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_encrypt_table(regclass, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_decrypt_table(regclass, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_reencrypt_resume(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_reencryption_progress_rows() FROM PUBLIC;
REVOKE ALL ON tde_reencryption_progress FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_key_inventory() FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_destroy_retired_keys(interval) FROM PUBLIC;
REVOKE ALL ON tde_keys FROM PUBLIC;
REVOKE ALL ON tde_status FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_audit_log_rows() FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_verify_audit_log() FROM PUBLIC;
REVOKE ALL ON FUNCTION tde_verify_key() FROM PUBLIC;
REVOKE ALL ON tde_audit_log FROM PUBLIC;

-- tde_admin: may rotate table keys, destroy retired ones, watch and pause
-- re-encryption, and read the key inventory, status and audit trail.  Providers and the
-- master key stay with superusers (they name server files and variables).
-- Roles are cluster-wide, so a second database's CREATE EXTENSION reuses it.
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'tde_admin') THEN
    CREATE ROLE tde_admin NOLOGIN;
  END IF;
END
$$;
GRANT EXECUTE ON FUNCTION tde_is_encrypted(regclass), tde_keys(), tde_key_store_state(), tde_key_cache(), tde_key_providers(), tde_key_worker(),
    tde_rotate_key(regclass, boolean), tde_reencrypt_pause(regclass), tde_reencrypt_resume(regclass),
    tde_encrypt_table(regclass, boolean), tde_decrypt_table(regclass, boolean),
    tde_reencryption_progress_rows(), tde_key_inventory(), tde_destroy_retired_keys(interval),
    tde_audit_log_rows(), tde_verify_audit_log(), tde_verify_key()
  TO tde_admin;
GRANT SELECT ON tde_status, tde_keys, tde_reencryption_progress, tde_audit_log TO tde_admin;
