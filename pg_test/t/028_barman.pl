# 028_barman.pl -- Barman backs up an encrypted cluster and recovers it to a
# point in time.
#
# Barman (PyPI, pinned in scripts/backup-tools.requirements) with
# backup_method = postgres (pg_basebackup) and streaming_archiver = on
# (pg_receivewal through a replication slot), as a DBA sets it up.  The
# cluster's tables are encrypted; its key store travels inside the data
# directory, the keyring stays outside it, where the recovered cluster finds
# it as the original does.  Barman's base backup holds no row of the
# encrypted table in plaintext.  Recovery to a named restore point gives
# exactly the rows committed before it, encrypted, and verify_heapam is
# clean.
#
# Not yet: WAL encryption (issue 11).  Until it lands Barman's WAL directory
# holds the rows in plaintext, as pg_wal does; the test checks that it does,
# so it notices when that changes.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use TdeTest;

my $barman = $ENV{TDE_BARMAN} or plan skip_all => 'TDE_BARMAN is not set (scripts/test sets it)';

my $node = new_node('bm', init => { allows_streaming => 1 }, conf => "max_replication_slots = 4\n");
$node->start;
configure_keys($node);
$node->safe_psql('postgres', 'CREATE EXTENSION amcheck');
my $m = 'BARMAN-SECRET-' . join('', map { sprintf '%02x', int rand 256 } 1 .. 6);
$node->safe_psql('postgres', qq{
	CREATE TABLE t (id int PRIMARY KEY, v text) USING tde_heap;
	INSERT INTO t SELECT g, '$m-' || g FROM generate_series(1, 1000) g;
});

# ---- Barman's configuration, as a DBA writes it --------------------------------
my $home = $node->basedir . '/barman';
mkdir $home or die;
my $conf = "$home/barman.conf";
my $host = $node->host;
my $port = $node->port;
my $user = getpwuid($<);
my $bindir = $node->config_data('--bindir');
open(my $fh, '>', $conf) or die;
print $fh <<"CONF";
[barman]
barman_home = $home
barman_user = $user
log_file = $home/barman.log
log_level = INFO
configuration_files_directory = $home/conf.d

[pg]
description = encrypted cluster
conninfo = host=$host port=$port dbname=postgres user=$user
streaming_conninfo = host=$host port=$port dbname=postgres user=$user
backup_method = postgres
streaming_archiver = on
slot_name = barman
path_prefix = $bindir
CONF
close $fh;
mkdir "$home/conf.d" or die;

sub barman
{
	my @args = @_;
	my ($stdout, $stderr);
	my $ok = IPC::Run::run([ $barman, '-c', $conf, '-q', @args ], '>', \$stdout, '2>', \$stderr);
	note("barman @args: $stdout$stderr");
	return ($ok, $stdout . $stderr);
}

my ($ok, $out) = barman('receive-wal', '--create-slot', 'pg');
ok($ok, 'barman creates its replication slot') or diag($out);
my $recv = IPC::Run::start([ $barman, '-c', $conf, 'receive-wal', 'pg' ], '>', \my $rout, '2>', \my $rerr);
# As `barman cron` would have it: pg_receivewal streaming before the switch.
$node->poll_query_until('postgres', "SELECT count(*) = 1 FROM pg_stat_replication WHERE state = 'streaming'")
  or die 'pg_receivewal did not connect';
($ok, $out) = barman('switch-wal', '--force', '--archive', '--archive-timeout', '60', 'pg');
ok($ok, 'pg_receivewal streams WAL to barman') or diag($out);
($ok, $out) = barman('check', 'pg');
ok($ok, 'barman check passes') or diag($out);

($ok, $out) = barman('backup', '--wait', '--wait-timeout', '120', 'pg');
ok($ok, 'barman backup (pg_basebackup) of the encrypted cluster') or diag($out);
my @base = glob("$home/pg/base/*/data");
is(scalar(@base), 1, 'one base backup');
my @leaks = grep { !m{/pg_wal/} } files_containing($node, $m, dir => $home . '/pg/base');
is_deeply(\@leaks, [], 'no file of the base backup holds a row in plaintext');
ok(-f "$base[0]/tde/keystore", 'the key store is in the backup');

# ---- A restore point between two batches of rows ------------------------------
$node->safe_psql('postgres', qq{
	INSERT INTO t SELECT g, '$m-' || g FROM generate_series(1001, 1500) g;
	SELECT pg_create_restore_point('before_batch_3');
	INSERT INTO t SELECT g, '$m-' || g FROM generate_series(1501, 2000) g;
});
($ok, $out) = barman('switch-wal', '--force', '--archive', '--archive-timeout', '60', 'pg');
ok($ok, 'the WAL with the restore point reaches barman') or diag($out);
my @wal_hits = files_containing($node, $m, dir => "$home/pg/wals");
ok(@wal_hits > 0, 'barman\'s WAL still holds rows in plaintext (WAL encryption is not built yet)');

# ---- Recovery to the restore point ---------------------------------------------
my $rec = PostgreSQL::Test::Cluster->new('bm_rec');
my $recdir = $rec->data_dir;
($ok, $out) = barman('recover', '--target-name', 'before_batch_3', '--target-action', 'promote', 'pg', 'latest', $recdir);
ok($ok, 'barman recover --target-name') or diag($out);
$rec->append_conf('postgresql.conf', "port = " . $rec->port . "\nunix_socket_directories = '" . $rec->host . "'\nlisten_addresses = ''\n");
$rec->start;
$rec->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()') or die 'recovery did not end';
is($rec->safe_psql('postgres', "SELECT count(*) || ' ' || max(id) FROM t WHERE v LIKE '$m-%'"), '1500 1500',
	'the recovered cluster has exactly the rows committed before the restore point');
is($rec->safe_psql('postgres', "SELECT tde_is_encrypted('t')"), 't', 'and its table is still encrypted');
is($rec->safe_psql('postgres', "SELECT count(*) FROM verify_heapam('t')"), '0', 'verify_heapam is clean');
$rec->safe_psql('postgres', 'CHECKPOINT');
# barman_wal/ is the WAL Barman copied for restore_command (plaintext, above).
@leaks = grep { !m{/barman_wal/} } files_containing($rec, $m);
is_deeply(\@leaks, [], 'no relation file of the recovered cluster holds a row in plaintext');
$rec->stop;

$recv->kill_kill;
done_testing();
