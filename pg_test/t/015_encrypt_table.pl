# 015_encrypt_table.pl -- tde_encrypt_table / tde_decrypt_table: a populated
# table with indexes and TOAST turns encrypted (and back) online.
#
# - Under pgbench load on the table: no client error; afterwards the table
#   uses tde_heap, every file has a key, every page is marked encrypted, and
#   the plaintext marker is in none of its files; VACUUM FULL keeps it
#   encrypted; amcheck is clean.
# - tde_decrypt_table: back to heap, every page plain, rows read back; it is
#   refused while tde.enforce_encryption is on.
# - In the background, and after kill -9 in the middle (calling it again
#   finishes it).
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeTest;

# The scheduler (018_scheduler.pl) would finish interrupted passes on its
# own; here they are finished by calling the function again.
my $node = new_node('et', conf => "tde.scheduler_naptime = '1h'\n");
$node->start;
configure_keys($node);
$node->safe_psql('postgres', q{
	CREATE EXTENSION amcheck;
	CREATE TABLE p (id serial PRIMARY KEY, k int, v text);
	ALTER TABLE p ALTER COLUMN v SET STORAGE EXTERNAL;
	CREATE INDEX p_v ON p (left(v, 60));
	INSERT INTO p (k, v) SELECT g % 10, 'PLAIN-SECRET-' || g || repeat('z', CASE WHEN g % 40 = 0 THEN 3000 ELSE 40 END)
	  FROM generate_series(1, 20000) g;
	VACUUM p;
	CHECKPOINT;
});
cmp_ok(scalar(files_containing($node, 'PLAIN-SECRET-')), '>=', 3, 'before: the marker is on disk in the heap, TOAST and index files');
is($node->safe_psql('postgres', "SELECT tde_is_encrypted('p')"), 'f', 'p is plain');

my ($bench, $outr, $errr) = start_load($node, 10, <<'SQL');
\set id random(1, 20000)
UPDATE p SET k = k + 1 WHERE id = :id;
SELECT v FROM p WHERE id = :id;
INSERT INTO p (k, v) VALUES (:id % 10, 'PLAIN-SECRET-new-' || :id);
SQL
sleep 2;
$node->safe_psql('postgres', "SELECT tde_encrypt_table('p')");
$bench->finish;
is($bench->result(0), 0, 'pgbench ran through the encryption without an error');
unlike($$errr, qr/ERROR|aborted/, 'no client saw an error') or diag($$errr);
my ($tx) = $$outr =~ /number of transactions actually processed: (\d+)/;
ok(($tx // 0) > 100, "pgbench committed $tx transactions meanwhile");

is($node->safe_psql('postgres', "SELECT tde_is_encrypted('p')"), 't', 'tde_is_encrypted is true');
is($node->safe_psql('postgres', "SELECT amname FROM pg_class c JOIN pg_am a ON a.oid = c.relam WHERE relname = 'p'"),
	'tde_heap', 'the table now uses tde_heap');
my $am_dep = q{SELECT count(*) FROM pg_depend WHERE classid = 'pg_class'::regclass AND objid = 'p'::regclass
	AND refclassid = 'pg_am'::regclass AND refobjid = (SELECT oid FROM pg_am WHERE amname = 'tde_heap')};
is($node->safe_psql('postgres', $am_dep), '1', 'and depends on it in pg_depend, as after ALTER TABLE ... SET ACCESS METHOD');
my ($drc, $dout, $derr) = $node->psql('postgres', 'DROP EXTENSION tde');
like($derr, qr/table p depends on access method tde_heap/, 'so DROP EXTENSION tde is refused while it is encrypted');
is($node->safe_psql('postgres', "SELECT bool_and(tde_is_encrypted(r)) FROM unnest(ARRAY['p', 'p_pkey', 'p_v', 'p_id_seq']::regclass[]) r"),
	't', 'its indexes and its sequence are encrypted');
my $rows = $node->safe_psql('postgres', 'SELECT count(*) FROM p');
is($node->safe_psql('postgres', "SELECT count(*) FROM p WHERE v LIKE 'PLAIN-SECRET-%'"), $rows, "every row reads back ($rows)");
$node->safe_psql('postgres', 'CHECKPOINT');
my $marks = page_marks(relation_files($node, 'p'));
ok($marks->[1] > 0 && $marks->[2] == 0, "every page of every file is marked encrypted (@$marks)");
is(scalar(grep { !m{/pg_wal/} } files_containing($node, 'PLAIN-SECRET-')), 0, 'the marker is in none of its files');
is($node->safe_psql('postgres', "SELECT count(*) FROM verify_heapam('p')"), '0', 'verify_heapam is clean');
$node->safe_psql('postgres', "SELECT bt_index_check('p_pkey', true), bt_index_check('p_v', true)");
pass('bt_index_check passes');
$node->safe_psql('postgres', 'VACUUM FULL p; CHECKPOINT');
is($node->safe_psql('postgres', "SELECT bool_and(tde_is_encrypted(r)) FROM unnest(ARRAY['p', 'p_pkey', 'p_v']::regclass[]) r"),
	't', 'VACUUM FULL keeps it encrypted');
is(scalar(grep { !m{/pg_wal/} } files_containing($node, 'PLAIN-SECRET-')), 0, 'and writes no plaintext');

# ---- Decryption --------------------------------------------------------------
$node->safe_psql('postgres', "ALTER SYSTEM SET tde.enforce_encryption = on; SELECT pg_reload_conf()");
my ($rc, $o, $e) = $node->psql('postgres', "SELECT tde_decrypt_table('p')");
like($e, qr/tde.enforce_encryption is on: tde_decrypt_table would store "p" unencrypted/, 'tde_decrypt_table is refused under tde.enforce_encryption');
$node->safe_psql('postgres', "ALTER SYSTEM RESET tde.enforce_encryption; SELECT pg_reload_conf()");
$node->safe_psql('postgres', "SELECT tde_decrypt_table('p')");
is($node->safe_psql('postgres', "SELECT amname || ' ' || tde_is_encrypted('p') FROM pg_class c JOIN pg_am a ON a.oid = c.relam WHERE relname = 'p'"),
	'heap false', 'tde_decrypt_table: heap and plain again');
is($node->safe_psql('postgres', $am_dep), '0', 'and its dependency on tde_heap is gone');
$node->safe_psql('postgres', 'CHECKPOINT');
$marks = page_marks(relation_files($node, 'p'));
ok($marks->[0] == 0 && $marks->[1] == 0 && $marks->[2] > 0, "every page is plain (@$marks)");
is($node->safe_psql('postgres', "SELECT count(*) FROM p WHERE v LIKE 'PLAIN-SECRET-%'"), $rows, 'every row reads back');
is($node->safe_psql('postgres', "SELECT count(*) FROM verify_heapam('p')"), '0', 'verify_heapam is clean');

# ---- Background, and kill -9 -------------------------------------------------
$node->safe_psql('postgres', "SET tde.reencrypt_cost_delay = 10; SET tde.reencrypt_cost_limit = 20; SELECT tde_encrypt_table('p', background => true)");
my $deadline = time() + 10;
my $seen = '0';
while (time() < $deadline && $seen eq '0')
{
	$seen = $node->safe_psql('postgres', q{SELECT count(*) FROM tde_reencryption_progress WHERE "table" = 'p'::regclass});
	select(undef, undef, undef, 0.05);
}
is($seen > 0 ? 1 : 0, 1, 'the background encryption shows in tde_reencryption_progress');
is($node->safe_psql('postgres', "SELECT count(*) FROM p WHERE v LIKE 'PLAIN-SECRET-%'"), $rows, 'the table reads while it runs');
$node->kill9;
restart_after_kill9($node);
is($node->safe_psql('postgres', "SELECT count(*) FROM p WHERE v LIKE 'PLAIN-SECRET-%'"), $rows,
	'after kill -9 in the middle every row reads back (pages plain and encrypted side by side)');
$node->safe_psql('postgres', "SELECT tde_encrypt_table('p')");
is($node->safe_psql('postgres', "SELECT amname || ' ' || tde_is_encrypted('p') FROM pg_class c JOIN pg_am a ON a.oid = c.relam WHERE relname = 'p'"),
	'tde_heap true', 'calling it again finishes it');
$node->safe_psql('postgres', 'CHECKPOINT');
$marks = page_marks(relation_files($node, 'p'));
ok($marks->[1] > 0 && $marks->[2] == 0, "every page is encrypted (@$marks)");
is(scalar(grep { !m{/pg_wal/} } files_containing($node, 'PLAIN-SECRET-')), 0, 'no plaintext on disk');
is($node->safe_psql('postgres', "SELECT count(*) FROM p"), $rows, 'and every row reads back');

$node->stop;
done_testing();
