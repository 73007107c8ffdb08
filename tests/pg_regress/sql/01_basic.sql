-- The extension installs into a server that preloads it, and answers.
CREATE EXTENSION tde;
SELECT tde_version() ~ '^\d+\.\d+\.\d+$' AS version_looks_right;
SELECT extname, extrelocatable FROM pg_extension WHERE extname = 'tde';
SELECT amname, amtype FROM pg_am WHERE amname = 'tde_heap';
