# 018_scheduler.pl -- the re-encryption scheduler: a pass interrupted by
# kill -9 or by a standby's promotion is finished without anyone calling
# the function again; overdue keys get a WARNING, and with tde.auto_rotate
# they are rotated, throttled and audited.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use TdeTest;

my $node = new_node('sched', init => { allows_streaming => 1 }, conf => "tde.scheduler_naptime = 1\n");
$node->start;
configure_keys($node);
$node->safe_psql('postgres', q{
	CREATE TABLE t (id int PRIMARY KEY, v text) USING tde_heap;
	INSERT INTO t SELECT g, repeat('SCHED-SECRET-' || g, 20) FROM generate_series(1, 20000) g;
	CHECKPOINT;
});
my $versions = q{SELECT string_agg(version || ':' || state, ',' ORDER BY version) FROM tde_keys WHERE relation = 't'::regclass};

# Wait until $sql returns $want (or time out), returning the last value.
sub wait_for
{
	my ($n, $sql, $want, $secs) = @_;
	my $got = '';
	for (1 .. ($secs // 60) * 5)
	{
		$got = $n->safe_psql('postgres', $sql);
		return $got if $got eq $want;
		usleep(200_000);
	}
	return $got;
}

# ---- kill -9 in the middle of a background rotation -------------------------------
$node->safe_psql('postgres', q{
	SET tde.reencrypt_cost_delay = 100; SET tde.reencrypt_cost_limit = 10;
	SELECT tde_rotate_key('t', background => true);
});
is(wait_for($node, q{SELECT count(*) > 0 FROM tde_reencryption_progress WHERE blocks_done > 0 AND state = 'running'}, 't'), 't',
	'a throttled background rotation is running');
is($node->safe_psql('postgres', $versions), '1:active,2:active', 'both versions are live while it runs');
$node->kill9;
restart_after_kill9($node);
is(wait_for($node, $versions, '1:retired,2:active'), '1:retired,2:active', 'the scheduler finishes it on its own');
is($node->safe_psql('postgres', "SELECT count(*) FROM t WHERE v LIKE 'SCHED-SECRET-%'"), '20000', 'every row reads back');
$node->safe_psql('postgres', 'CREATE EXTENSION IF NOT EXISTS amcheck');
is($node->safe_psql('postgres', "SELECT count(*) FROM verify_heapam('t')"), '0', 'verify_heapam is clean');
is($node->safe_psql('postgres', "SELECT count(*) FROM tde_audit_log WHERE operation = 'reencryption_finished' AND object = 'public.t' AND detail LIKE '%by the scheduler: finishing an interrupted key rotation%'"),
	'1', 'the audit trail says the scheduler finished it after the restart, and why');

# ---- overdue keys ---------------------------------------------------------------
my $log_offset = -s $node->logfile;
$node->safe_psql('postgres', "ALTER SYSTEM SET tde.key_max_age = '2s'; SELECT pg_reload_conf()");
ok($node->wait_for_log(qr/WARNING:  tde: the key of relation file \S+ \(version 2\) is older than tde.key_max_age; rotate it/, $log_offset),
	'an overdue key gets a WARNING in the server log');
sleep 2;
is($node->safe_psql('postgres', $versions), '1:retired,2:active', 'without tde.auto_rotate nothing is rotated');
my $warned = () = slurp_file($node->logfile, $log_offset) =~ /\(version 2\) is older than tde.key_max_age/g;
my $t_files = $node->safe_psql('postgres', "SELECT count(DISTINCT relfilenode) FROM tde_keys WHERE state = 'active' AND overdue");
cmp_ok($warned, '<=', $t_files, "and each overdue key is warned about once (not every round): $warned for $t_files keys");

$node->safe_psql('postgres', "ALTER SYSTEM SET tde.auto_rotate = on; SELECT pg_reload_conf()");
is(wait_for($node, q{SELECT max(version) >= 3 FROM tde_keys WHERE relation = 't'::regclass AND state = 'active'}, 't'), 't',
	'with tde.auto_rotate the overdue key is rotated');
$node->safe_psql('postgres', "ALTER SYSTEM RESET tde.auto_rotate; ALTER SYSTEM RESET tde.key_max_age; SELECT pg_reload_conf()");
is(wait_for($node, q{SELECT count(*) FROM tde_keys WHERE relation = 't'::regclass AND state = 'active'}, '1'), '1', 'the rotation finishes');
is($node->safe_psql('postgres', "SELECT count(*) > 0 FROM tde_audit_log WHERE operation = 'reencryption_started' AND detail LIKE '%older than tde.key_max_age (tde.auto_rotate)%'"),
	't', 'the audit trail records the automatic rotation and why');
is($node->safe_psql('postgres', "SELECT count(*) FROM t WHERE v LIKE 'SCHED-SECRET-%'"), '20000', 'every row reads back');
is($node->safe_psql('postgres', 'SELECT tde_verify_audit_log()'), 't', 'the audit trail verifies');

# ---- a cancelled pass ----------------------------------------------------------
my $finished = q{SELECT count(*) FROM tde_audit_log WHERE operation = 'reencryption_finished' AND detail LIKE '%by the scheduler: finishing an interrupted key rotation%'};
my $n_fin = $node->safe_psql('postgres', $finished);
my $vc = $node->safe_psql('postgres', "SELECT max(version) FROM tde_keys WHERE relation = 't'::regclass");
my $bg = $node->background_psql('postgres', on_error_stop => 0);
$bg->query_until(qr/go/, q{\echo go
SET tde.reencrypt_cost_delay = 100; SET tde.reencrypt_cost_limit = 10;
SELECT tde_rotate_key('t');
});
is(wait_for($node, q{SELECT count(*) > 0 FROM tde_reencryption_progress WHERE blocks_done > 0 AND pid IS NOT NULL}, 't'), 't',
	'a throttled rotation runs in a session');
$node->safe_psql('postgres', 'SELECT pg_cancel_backend(pid) FROM tde_reencryption_progress LIMIT 1');
$bg->quit;
my $vn = $vc + 1;
is(wait_for($node, "SELECT string_agg(version || ':' || state, ',' ORDER BY version) FROM tde_keys WHERE relation = 't'::regclass AND version >= $vc", "$vc:retired,$vn:active"),
	"$vc:retired,$vn:active", 'cancelled half-way, it is finished by the scheduler');
is($node->safe_psql('postgres', $finished), $n_fin + 1, 'which says so in the audit trail');

# ---- promotion in the middle of a pass ---------------------------------------------
$node->backup('b1');
my $standby = PostgreSQL::Test::Cluster->new('sched_standby');
$standby->init_from_backup($node, 'b1', has_streaming => 1);
$standby->start;
my $v0 = $node->safe_psql('postgres', "SELECT max(version) FROM tde_keys WHERE relation = 't'::regclass");
$node->safe_psql('postgres', q{
	SET tde.reencrypt_cost_delay = 100; SET tde.reencrypt_cost_limit = 10;
	SELECT tde_rotate_key('t', background => true);
});
is(wait_for($node, q{SELECT count(*) > 0 FROM tde_reencryption_progress WHERE blocks_done > 0}, 't'), 't', 'a rotation is running on the primary');
$node->safe_psql('postgres', "SELECT tde_reencrypt_pause('t')");
sleep 2;
is($node->safe_psql('postgres', "SELECT count(*) FROM tde_keys WHERE relation = 't'::regclass AND state = 'active'"), '2',
	'paused, it stays unfinished: the scheduler leaves a pass that is under way alone');

# A base backup taken now, half-way through the rotation, restores, reads
# back, and finishes the rotation by itself.
$node->backup('mid');
my $restored = PostgreSQL::Test::Cluster->new('sched_restored');
$restored->init_from_backup($node, 'mid');
$restored->start;
is($restored->safe_psql('postgres', "SELECT count(*) FROM t WHERE v LIKE 'SCHED-SECRET-%'"), '20000',
	'a base backup taken mid-rotation restores and reads every row');
my $vr = $v0 + 1;
is(wait_for($restored, q{SELECT string_agg(version || ':' || state, ',' ORDER BY version) FROM tde_keys WHERE relation = 't'::regclass AND state <> 'destroyed' AND version >= } . $v0, "$v0:retired,$vr:active"),
	"$v0:retired,$vr:active", 'and finishes the rotation on its own');
$restored->safe_psql('postgres', 'CREATE EXTENSION IF NOT EXISTS amcheck');
is($restored->safe_psql('postgres', "SELECT count(*) FROM verify_heapam('t')"), '0', 'verify_heapam is clean there');
$restored->stop;

$node->wait_for_catchup($standby);
$node->stop('immediate');
$standby->promote;
my $v1 = $v0 + 1;
is(wait_for($standby, q{SELECT string_agg(version || ':' || state, ',' ORDER BY version) FROM tde_keys WHERE relation = 't'::regclass AND state <> 'destroyed' AND version >= } . $v0, "$v0:retired,$v1:active"),
	"$v0:retired,$v1:active", 'after promotion the new primary finishes the rotation');
is($standby->safe_psql('postgres', "SELECT count(*) FROM t WHERE v LIKE 'SCHED-SECRET-%'"), '20000', 'and reads every row');
is($standby->safe_psql('postgres', 'SELECT tde_verify_audit_log()'), 't', 'its audit trail verifies');
$standby->stop;

done_testing();
