# 027_logical_spill.pl -- logical decoding's spill files hold no plaintext.
#
# A transaction that outgrows logical_decoding_work_mem (64kB here) is
# spilled by the decoding process to pg_replslot/<slot>/xid-*.spill, whole
# tuples included.  With tde the files are encrypted (src/spill.rs): while a
# large transaction on an encrypted table is still open and a walsender
# (pg_recvlogical) has spilled it, no spill file holds its marker, and after
# the commit every row is decoded.  The SQL decoding functions spill, read
# back and re-create the same files twice in one backend and decode every
# row both times.  Control: the same run on a server without tde finds the
# marker in the spill files.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use TdeTest;

my $conf = "wal_level = logical\nmax_wal_senders = 4\nlogical_decoding_work_mem = 64kB\nmax_replication_slots = 4\n";

sub bytes_of
{
	my ($path) = @_;
	open(my $fh, '<:raw', $path) or return '';
	local $/;
	return <$fh> // '';
}

# Runs the scenario; returns the spill files seen while the transaction was
# open, how many of them hold the marker, and how many decoded rows carry it.
sub spill_run
{
	my ($node, $am, $m) = @_;
	$node->safe_psql('postgres', qq{
		CREATE TABLE big (id int, v text) USING $am;
		SELECT pg_create_logical_replication_slot('s', 'test_decoding');
	});
	my $out = $node->basedir . '/recv.out';
	my $recv = IPC::Run::start(
		[ 'pg_recvlogical', '-d', $node->connstr('postgres'), '-S', 's', '--start', '-f', $out, '-F', '1', '-s', '1', '--no-loop' ],
		'2>', \my $rerr);
	my $bg = $node->background_psql('postgres');
	$bg->query_safe("BEGIN");
	$bg->query_safe("INSERT INTO big SELECT g, '$m-' || g || repeat('z', 100) FROM generate_series(1, 5000) g");
	my $dir = $node->data_dir . '/pg_replslot/s';
	my @files;
	my $deadline = time() + 60;
	while (time() < $deadline)
	{
		# The WAL writer flushes the open transaction's WAL within
		# wal_writer_delay; the walsender then decodes and spills it.
		@files = glob("$dir/*.spill");
		my $size = 0;
		$size += -s $_ for @files;
		last if $size > 400_000;
		usleep(100_000);
	}
	my @hits = grep { index(bytes_of($_), $m) >= 0 } @files;
	my $size = 0;
	$size += -s $_ for @files;
	$bg->query_safe('COMMIT');
	$bg->quit;
	my $decoded = 0;
	$deadline = time() + 60;
	while (time() < $deadline)
	{
		$decoded = () = bytes_of($out) =~ /\Q$m\E-\d+z/g;
		last if $decoded >= 5000;
		usleep(100_000);
	}
	$recv->signal('INT');
	$recv->finish;
	return (scalar(@files), $size, scalar(@hits), $decoded);
}

# ---- Control: without tde the spill files show the rows ------------------------
my $ctl = PostgreSQL::Test::Cluster->new('spill_ctl');
$ctl->init;
$ctl->append_conf('postgresql.conf', $conf);
$ctl->start;
my $cm = 'SPILLMARK-CTL-' . join('', map { sprintf '%02x', int rand 256 } 1 .. 6);
my ($cfiles, $csize, $chits, $cdecoded) = spill_run($ctl, 'heap', $cm);
ok($cfiles > 0, "control: the open transaction was spilled ($cfiles files, $csize bytes)");
ok($chits > 0, "control: without tde the spill files hold the rows ($chits of $cfiles)");
is($cdecoded, 5000, 'control: and every row is decoded after the commit');
$ctl->stop;

# ---- With tde ------------------------------------------------------------------
my $node = new_node('spill', conf => $conf);
$node->start;
configure_keys($node);
my $m = 'SPILLMARK-ENC-' . join('', map { sprintf '%02x', int rand 256 } 1 .. 6);
my ($files, $size, $hits, $decoded) = spill_run($node, 'tde_heap', $m);
ok($files > 0 && $size > 400_000, "the open transaction was spilled ($files files, $size bytes)");
is($hits, 0, 'no spill file holds a row of it');
is($decoded, 5000, 'after the commit pg_recvlogical decodes every row (5000)');

# SQL decoding: each call builds a reorder buffer, spills, reads back and
# removes the files; the second call re-creates them under the same names in
# the same backend (a fresh nonce for each incarnation).
$node->safe_psql('postgres', "SELECT pg_create_logical_replication_slot('s2', 'test_decoding')");
$node->safe_psql('postgres', "INSERT INTO big SELECT g, '$m-' || g || repeat('z', 100) FROM generate_series(5001, 10000) g");
my $peek = qq{SELECT count(*) FROM pg_logical_slot_peek_changes('s2', NULL, NULL) WHERE data LIKE '%$m-%'};
is($node->safe_psql('postgres', "$peek; $peek"), "5000\n5000",
	'peeking twice in one backend decodes every row both times');
cmp_ok($node->safe_psql('postgres', "SELECT spill_txns FROM pg_stat_replication_slots WHERE slot_name = 's2'"),
	'>', 0, 'and it did spill');
is($node->safe_psql('postgres', qq{SELECT count(*) FROM pg_logical_slot_get_changes('s2', NULL, NULL) WHERE data LIKE '%$m-%'}),
	'5000', 'pg_logical_slot_get_changes too');
my @left = grep { index(bytes_of($_), $m) >= 0 } glob($node->data_dir . '/pg_replslot/*/*');
is_deeply(\@left, [], 'nothing under pg_replslot holds a row');

done_testing();
