# 013_rotate_key.pl -- tde_rotate_key(): a new key version for every file of
# a table, every page re-encrypted online.
#
# - Under pgbench load on the table itself: no client error, every row reads
#   back, amcheck is clean.
# - Raw files: after the rotation and a checkpoint, every non-zero page of
#   every file and fork of the table carries the new version's mark (the
#   parity bit 0x4000 of pd_flags), so none is under the old version.
# - tde_status shows the new version; a second rotation goes on to the next.
# - A streaming standby reads the table during and after the rotation, also
#   after a restart, and after promotion.
# - kill -9 during a rotation: everything reads back, and calling it again
#   finishes it.
# - background => true: a worker does the pass, throttled by
#   tde.reencrypt_cost_delay/limit; tde_reencryption_progress shows it;
#   tde_reencrypt_pause stops it between two pages and _resume goes on.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeTest;

# The scheduler (018_scheduler.pl) would finish interrupted passes on its
# own; here they are finished by calling the function again.
my $node = new_node('rk', init => { allows_streaming => 1 }, conf => "wal_keep_size = 1GB\ntde.scheduler_naptime = '1h'\n");
$node->start;
configure_keys($node);
$node->safe_psql('postgres', q{
	CREATE EXTENSION amcheck;
	CREATE TABLE t (id serial PRIMARY KEY, k int, v text) USING tde_heap;
	ALTER TABLE t ALTER COLUMN v SET STORAGE EXTERNAL;
	CREATE INDEX t_k ON t (k);
	INSERT INTO t (k, v) SELECT g % 100, 'ROTATE-SECRET-' || g || repeat('x', CASE WHEN g % 50 = 0 THEN 3000 ELSE 50 END)
	  FROM generate_series(1, 20000) g;
	VACUUM t;
	CHECKPOINT;
});
$node->backup('b');
my $standby = PostgreSQL::Test::Cluster->new('rk_standby');
$standby->init_from_backup($node, 'b', has_streaming => 1);
system('cp', TdeTest::keyring_path($node), TdeTest::keyring_path($standby)) == 0 or die;
chmod 0600, TdeTest::keyring_path($standby);
$standby->start;

sub files_of { return relation_files($_[0], 't') }

my @files = files_of($node);
cmp_ok(scalar(@files), '>=', 6, 'the files of t: heap, TOAST, indexes, sequence, FSM and VM: ' . scalar(@files));
my $before = page_marks(@files);
ok($before->[0] == 0 && $before->[1] > 0 && $before->[2] == 0, "before: every page under version 1 (@$before)");

# ---- Rotation under load ------------------------------------------------------
my ($bench, $outr, $errr) = start_load($node, 12, <<'SQL');
\set id random(1, 20000)
UPDATE t SET k = k + 1 WHERE id = :id;
SELECT v FROM t WHERE id = :id;
INSERT INTO t (k, v) VALUES (:id % 100, 'ROTATE-SECRET-new-' || :id);
SQL
sleep 2;
my $version = $node->safe_psql('postgres', "SELECT tde_rotate_key('t')");
is($version, '2', 'tde_rotate_key returns the new version');
is($standby->safe_psql('postgres', 'SELECT count(*) > 0 FROM t'), 't', 'the standby reads the table meanwhile');
$bench->finish;
is($bench->result(0), 0, 'pgbench ran through the rotation without an error');
unlike($$errr, qr/ERROR|aborted/, 'no client saw an error') or diag($$errr);
my ($tx) = $$outr =~ /number of transactions actually processed: (\d+)/;
ok(($tx // 0) > 100, "pgbench committed $tx transactions meanwhile");

my $rows = $node->safe_psql('postgres', 'SELECT count(*) FROM t');
cmp_ok($rows, '>', 20000, "every row reads back ($rows)");
is($node->safe_psql('postgres', "SELECT count(*) FROM t WHERE v LIKE 'ROTATE-SECRET-%'"), $rows, 'and decrypts');
is($node->safe_psql('postgres', "SELECT count(*) FROM verify_heapam('t')"), '0', 'verify_heapam is clean');
$node->safe_psql('postgres', "SELECT bt_index_check('t_pkey', true), bt_index_check('t_k', true)");
pass('bt_index_check passes on both indexes');
is($node->safe_psql('postgres', "SELECT min(key_version) || '/' || max(key_version) FROM tde_status WHERE relation::text IN ('t', 't_pkey', 't_k', 't_id_seq')"),
	'2/2', 'tde_status shows version 2 for every file');

$node->safe_psql('postgres', 'CHECKPOINT');
@files = files_of($node);
my $after = page_marks(@files);
ok($after->[0] > 0 && $after->[1] == 0 && $after->[2] == 0,
	"after the rotation and a checkpoint every page is under version 2, none under version 1 (@$after)");
is(scalar(files_containing($node, 'ROTATE-SECRET-')), 0, 'no plaintext on disk');

# ---- The standby ------------------------------------------------------------
$node->wait_for_catchup($standby);
is($standby->safe_psql('postgres', 'SELECT count(*) FROM t'), $rows, 'the standby reads every row after the rotation');
$standby->safe_psql('postgres', 'CHECKPOINT');
$standby->restart;
is($standby->safe_psql('postgres', "SELECT count(*) FROM t WHERE v LIKE 'ROTATE-SECRET-%'"), $rows,
	'and after a restart');

# ---- Again ---------------------------------------------------------------------
is($node->safe_psql('postgres', "SELECT tde_rotate_key('t')"), '3', 'a second rotation gives version 3');
$node->safe_psql('postgres', 'CHECKPOINT');
my $third = page_marks(files_of($node));
ok($third->[0] == 0 && $third->[1] > 0 && $third->[2] == 0, "every page is under version 3 (@$third)");
is($node->safe_psql('postgres', 'SELECT count(*) FROM t'), $rows, 'everything reads back');

# ---- Refusals ------------------------------------------------------------------
$node->safe_psql('postgres', 'CREATE TABLE plain_t (i int)');
my ($rc, $o, $e) = $node->psql('postgres', "SELECT tde_rotate_key('plain_t')");
like($e, qr/"plain_t" is not encrypted/, 'a plain table is refused');

# ---- kill -9 during a rotation ----------------------------------------------
$node->safe_psql('postgres', q{
	CREATE TABLE big (id int PRIMARY KEY, v text) USING tde_heap;
	INSERT INTO big SELECT g, 'BIG-SECRET-' || g || repeat('y', 200) FROM generate_series(1, 150000) g;
	CHECKPOINT;
});
# Throttled (10 ms per 50 pages, about 1 s for the table), so that the kill
# lands half-way on any machine: it comes once the pass has rewritten pages.
my $rot = IPC::Run::start([ 'psql', '-X', '-d', $node->connstr('postgres'),
		'-c', 'SET tde.reencrypt_cost_delay = 10', '-c', 'SET tde.reencrypt_cost_limit = 50',
		'-c', "SELECT tde_rotate_key('big')" ],
	'>', \my $rout, '2>', \my $rerr);
my $deadline = time() + 30;
my $midway = q{SELECT count(*) FROM tde_reencryption_progress WHERE "table" = 'big'::regclass AND blocks_done > 0};
select(undef, undef, undef, 0.05) while time() < $deadline && $node->safe_psql('postgres', $midway) eq '0';
$node->kill9;
$rot->kill_kill;
restart_after_kill9($node);
is($node->safe_psql('postgres', "SELECT count(*) FROM big WHERE v LIKE 'BIG-SECRET-%'"), '150000',
	'after kill -9 during a rotation every row reads back');
is($node->safe_psql('postgres', "SELECT tde_rotate_key('big')"), '2', 'calling it again finishes the rotation at version 2');
$node->safe_psql('postgres', 'CHECKPOINT');
is($node->safe_psql('postgres', "SELECT count(*) FROM verify_heapam('big')"), '0', 'verify_heapam is clean');
is($node->safe_psql('postgres', "SELECT count(*) FROM big"), '150000', 'and everything reads back');

# ---- In the background, throttled, paused and resumed --------------------------
# Throttled hard (20 ms per 50 pages), so the pass can be watched.
my $bg = $node->safe_psql('postgres', q{
	SET tde.reencrypt_cost_delay = 20;
	SET tde.reencrypt_cost_limit = 50;
	SELECT tde_rotate_key('big', background => true);
});
is($bg, '3', 'background => true returns the new version at once');
my $progress = q{SELECT relation || ' ' || fork || ' ' || target_version || ' ' || state || ' ' || blocks_done || ' ' || blocks_total
	FROM tde_reencryption_progress WHERE "table" = 'big'::regclass AND relation = 'big'::regclass};
my $row = '';
$deadline = time() + 30;
while (time() < $deadline)
{
	$row = $node->safe_psql('postgres', $progress);
	last if $row =~ /running/;
	select(undef, undef, undef, 0.1);
}
like($row, qr/^big main 3 running \d+ \d+$/, "tde_reencryption_progress shows the pass ($row)");
my ($total) = $row =~ / (\d+)$/;
cmp_ok($total, '>', 1000, 'with the block count of the table');
$node->safe_psql('postgres', "SELECT tde_reencrypt_pause('big')");
$deadline = time() + 10;
$row = $node->safe_psql('postgres', $progress) until $row =~ /paused/ || time() > $deadline;
like($row, qr/paused/, 'tde_reencrypt_pause pauses it');
my ($done1) = $row =~ / (\d+) \d+$/;
sleep 1;
my ($done2) = $node->safe_psql('postgres', $progress) =~ / (\d+) \d+$/;
is($done2, $done1, "no page is rewritten while paused ($done1 of $total)");
is($node->safe_psql('postgres', "SELECT reencryption FROM tde_status WHERE relation = 'big'::regclass"), 'paused',
	'tde_status shows the re-encryption state');
$node->safe_psql('postgres', q{INSERT INTO big VALUES (200001, 'BIG-SECRET-during-pause')});
is($node->safe_psql('postgres', "SELECT count(*) FROM big"), '150001', 'the table is read and written while paused');
$node->safe_psql('postgres', "SELECT tde_reencrypt_resume('big')");
$deadline = time() + 120;
sleep 0.2 while time() < $deadline
  && $node->safe_psql('postgres', q{SELECT count(*) FROM tde_reencryption_progress WHERE "table" = 'big'::regclass}) ne '0';
is($node->safe_psql('postgres', q{SELECT count(*) FROM tde_reencryption_progress WHERE "table" = 'big'::regclass}), '0',
	'after tde_reencrypt_resume the pass ends');
is($node->safe_psql('postgres', "SELECT min(key_version) || '/' || max(key_version) FROM tde_status WHERE relation::text IN ('big', 'big_pkey')"),
	'3/3', 'every file of big is at version 3');
my ($prc, $pout, $perr) = $node->psql('postgres', "SELECT tde_reencrypt_pause('big')");
like($perr, qr/no re-encryption of relation "big" is running/, 'pausing when nothing runs is an error');
is($node->safe_psql('postgres', "SELECT count(*) FROM big WHERE v LIKE 'BIG-SECRET-%'"), '150001', 'everything reads back');

# ---- Promotion ---------------------------------------------------------------
$node->wait_for_catchup($standby);
$standby->promote;
is($standby->safe_psql('postgres', 'SELECT count(*) FROM big'), '150001', 'the promoted standby reads the rotated table');
$standby->safe_psql('postgres', q{INSERT INTO t (k, v) VALUES (1, 'ROTATE-SECRET-after-promotion')});
is($standby->safe_psql('postgres', "SELECT tde_rotate_key('t')"), '4', 'and can rotate it again');

$standby->stop;
$node->stop;
done_testing();
