# 011_key_store_rollback.pl -- recovery refuses a key store that is older
# than the WAL, missing, or another cluster's, instead of running with fewer
# keys; with the right file it recovers and reads everything back.
#
# Every online checkpoint writes, after its redo pointer, the key store
# generation it vouches for; each key change carries its generation too.
# (Shutdown and end-of-recovery checkpoints cannot write it: a crash before
# the next online checkpoint replays no marker, docs/keys.md says so.)
use strict;
use warnings FATAL => 'all';
use File::Copy;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeTest;

my $node = new_node('rb');
$node->start;
configure_keys($node);
my $store = $node->data_dir . '/tde/keystore';
$node->safe_psql('postgres', q{
	CREATE TABLE a (id int PRIMARY KEY, v text) USING tde_heap;
	INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 100) g;
	CHECKPOINT;
});
copy($store, "$store.old") or die;
$node->safe_psql('postgres', q{
	CREATE TABLE b (id int PRIMARY KEY, v text) USING tde_heap;
	INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 100) g;
	CHECKPOINT;
	INSERT INTO b SELECT g, 'b' || g FROM generate_series(101, 200) g;
});
$node->stop('immediate');
copy($store, "$store.good") or die;

sub refused
{
	my ($name, $re) = @_;
	my $logstart = -s $node->logfile;
	ok(!$node->start(fail_ok => 1), "$name: recovery refuses to go on");
	like(slurp_file($node->logfile, $logstart), $re, "$name: the log says why");
}

sub recovers
{
	my ($name) = @_;
	copy("$store.good", $store) or die;
	$node->start;
	is($node->safe_psql('postgres', 'SELECT (SELECT count(*) FROM a) || ' . "'/'" . ' || (SELECT count(*) FROM b)'),
		'100/200', "$name: with the right key store it recovers and reads back");
	# Recovery ended with an end-of-recovery checkpoint, which writes no
	# marker; the next online checkpoint does (docs/keys.md).
	$node->safe_psql('postgres', 'CHECKPOINT');
	$node->stop('immediate');
}

# An older key store (restored by hand from before table b existed).
copy("$store.old", $store) or die;
refused('older key store', qr/key store file ".*keystore" is older than the WAL: it has generation \d+, the WAL needs \d+/);
recovers('older key store');

# No key store at all.
unlink $store or die;
refused('missing key store', qr/key store file ".*keystore" is missing, but the WAL needs it at generation \d+/);
recovers('missing key store');

# Another cluster's key store.
my $other = new_node('other');
$other->start;
configure_keys($other);
$other->stop;
copy($other->data_dir . '/tde/keystore', $store) or die;
refused('foreign key store', qr/key store file ".*keystore" belongs to another cluster/);
recovers('foreign key store');

$node->start;
$node->stop;
done_testing();
