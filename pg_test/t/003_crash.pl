# 003_crash.pl -- kill -9 during a write load loses no committed row.
#
# pgbench runs on tde_heap tables (default_table_access_method) while a
# second session inserts numbered rows one transaction at a time and records
# each acknowledged commit.  The postmaster is killed with SIGKILL mid-load.
# After restart every acknowledged row is there, and amcheck finds the
# encrypted heaps and btree indexes intact.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use TdeTest;

my $node = new_node('crash', conf => "default_table_access_method = 'tde_heap'\ncheckpoint_timeout = 30s");
$node->start;
configure_keys($node);
$node->safe_psql('postgres', 'CREATE EXTENSION amcheck');
$node->command_ok([ 'pgbench', '-i', '-s', '2', '-p', $node->port, '-h', $node->host, 'postgres' ], 'pgbench -i');
is($node->safe_psql('postgres', "SELECT tde_is_encrypted('pgbench_accounts')"), 't', 'pgbench tables are encrypted');
$node->safe_psql('postgres', 'CREATE TABLE ledger (id int PRIMARY KEY, payload text)');

# Write load in the background.
my ($out, $err) = ('', '');
my $bench = IPC::Run::start(
	[ 'pgbench', '-c', '4', '-T', '60', '-n', '-p', $node->port, '-h', $node->host, 'postgres' ],
	'>', \$out, '2>', \$err);

# Acknowledged commits, one per transaction.
my $session = $node->background_psql('postgres', on_error_stop => 0);
my $acked = 0;
my $deadline = time() + 3;
while (time() < $deadline)
{
	my $n = $acked + 1;
	my $res = $session->query("INSERT INTO ledger VALUES ($n, repeat('row$n', 20)) RETURNING id");
	last unless defined $res && $res =~ /^$n$/m;
	$acked = $n;
}
ok($acked > 10, "acknowledged $acked commits before the crash");

$node->kill9;
eval { $session->quit };
$bench->kill_kill;
restart_after_kill9($node);

is($node->safe_psql('postgres', "SELECT count(*) FROM ledger WHERE id <= $acked"), $acked,
	'every acknowledged row is back');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM pg_class c
	 WHERE c.relname LIKE 'pgbench_%' AND c.relkind = 'r'
	   AND EXISTS (SELECT 1 FROM verify_heapam(c.oid))}), '0', 'verify_heapam is clean');
is($node->safe_psql('postgres', q{
	SELECT count(bt_index_check(c.oid, true)) FROM pg_class c JOIN pg_am a ON a.oid = c.relam
	 WHERE a.amname = 'btree' AND c.relkind = 'i'
	   AND (c.relname LIKE 'pgbench_%' OR c.relname LIKE 'ledger%')}), '4', 'bt_index_check passes on 4 indexes');
is($node->safe_psql('postgres', "SELECT sum(abalance) = (SELECT sum(delta) FROM pgbench_history) FROM pgbench_accounts"),
	't', 'pgbench balances match its history');
$node->stop;
done_testing();
