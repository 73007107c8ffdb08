-- The SQL API: providers, master key, encrypted tables, status, grants.
-- scripts/test starts the server with TDE_REGRESS_MEK set (base64, 32 bytes).

-- Nothing is set up yet.
SELECT state FROM tde_key_store_state();
CREATE TABLE too_early (i int) USING tde_heap;

-- Provider validation.
SELECT tde_add_key_provider('bad', 'file', '{"path": "relative/path"}');
SELECT tde_add_key_provider('bad', 'file', '{"path": "/x", "mode": 1}');
SELECT tde_add_key_provider('bad', 'env', '{}');
SELECT tde_add_key_provider('bad', 'aws', '{}');
SELECT tde_add_key_provider('', 'env', '{"variable": "X"}');
SELECT tde_set_master_key('nope', 'k');

-- A working provider and master key.
SELECT tde_add_key_provider('envkey', 'env', '{"variable": "TDE_REGRESS_MEK"}');
SELECT tde_add_key_provider('envkey', 'env', '{"variable": "TDE_REGRESS_MEK"}');  -- same again: fine
SELECT tde_add_key_provider('envkey', 'env', '{"variable": "OTHER"}');           -- different: error
SELECT tde_set_master_key('envkey', 'mek-1');
SELECT state FROM tde_key_store_state();

-- Encrypted tables and what they bring along.
CREATE TABLE people (id serial PRIMARY KEY, name text UNIQUE, notes text) USING tde_heap;
INSERT INTO people (name, notes) VALUES ('ada', repeat('x', 5000)), ('grace', 'y');
SELECT id, name, length(notes) FROM people ORDER BY id;
SELECT r AS relation, tde_is_encrypted(r)
  FROM unnest(ARRAY['people', 'people_pkey', 'people_name_key', 'people_id_seq']::regclass[]) r;
SELECT tde_is_encrypted(reltoastrelid::regclass) AS toast_encrypted FROM pg_class WHERE relname = 'people';
CREATE TABLE plain (i int);
SELECT tde_is_encrypted('plain');
SELECT relation, key_version, algorithm, usable, created > now() - interval '1 hour' AS recent
  FROM tde_status WHERE relation::text LIKE 'people%' ORDER BY relation::text;

-- Rotating the master key re-wraps, the data stays readable.
SELECT tde_set_master_key('envkey', 'mek-2');
SELECT count(*) FROM people;

-- Grants: nothing for PUBLIC.
CREATE ROLE tde_nobody;
SET ROLE tde_nobody;
SELECT tde_add_key_provider('x', 'env', '{"variable": "X"}');
SELECT * FROM tde_status;
SELECT tde_is_encrypted('plain');
RESET ROLE;
DROP ROLE tde_nobody;

-- Dropping a table drops its keys once committed.
SELECT count(*) AS keys_before FROM tde_keys() k WHERE k.dboid = (SELECT oid FROM pg_database WHERE datname = current_database()) \gset
DROP TABLE people;
SELECT :keys_before - count(*) AS keys_removed FROM tde_keys() k WHERE k.dboid = (SELECT oid FROM pg_database WHERE datname = current_database());
