# 012_key_cache.pl -- the key cache is bounded and the key store is the truth;
# the key store file is an append-only log that checkpoints compact.
#
# - With tde.key_cache_size far below the number of encrypted files, every
#   table still reads back and stays encrypted on disk, through evictions
#   and a restart; tde_key_cache() shows the evictions and a cache that never
#   holds more than its size.
# - A key change appends one frame (the file does not grow with the store);
#   a checkpoint makes the log durable and, once it outgrows the snapshot,
#   compacts it into one authenticated snapshot.
# - Keys created after the last checkpoint survive kill -9 (they are
#   replayed from the WAL), and a torn tail left by a crash while appending
#   is dropped with a LOG line.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeTest;

my $node = new_node('kc', conf => "tde.key_cache_size = 8\ncheckpoint_timeout = 1h");
$node->start;
configure_keys($node);
my $store = $node->data_dir . '/tde/keystore';

# ---- A small cache ------------------------------------------------------------
$node->safe_psql('postgres', join("\n", map {
	"CREATE TABLE c_$_ (id int PRIMARY KEY, v text) USING tde_heap;
	 INSERT INTO c_$_ SELECT g, 'CACHE-SECRET-$_-' || g FROM generate_series(1, 50) g;"
} 1 .. 30));
my $keys = $node->safe_psql('postgres', 'SELECT count(*) FROM tde_keys()');
cmp_ok($keys, '>=', 90, "30 tables with an index and TOAST: $keys keys, the cache holds 8");

sub read_all
{
	return $node->safe_psql('postgres', join(' || \',\' || ', map { "(SELECT count(*) FROM c_$_)" } 1 .. 30)
		  =~ s/^/SELECT /r);
}
my $want = join(',', (50) x 30);
is(read_all(), $want, 'every table reads back through a cache of 8 keys');
my ($size, $used, $hits, $misses, $evictions) =
  split /\|/, $node->safe_psql('postgres', 'SELECT size, used, hits, misses, evictions FROM tde_key_cache()');
is($size, 8, 'tde_key_cache() reports the size');
cmp_ok($used, '<=', 8, "the cache never holds more than its size ($used)");
cmp_ok($evictions, '>', 0, "keys were evicted ($evictions)");
$node->safe_psql('postgres', 'CHECKPOINT');
is(scalar(files_containing($node, 'CACHE-SECRET-')), 0, 'no plaintext on disk after the evictions');

$node->restart;
is(read_all(), $want, 'after a restart (every page read from disk) every table reads back');
($size, $used, $hits, $misses, $evictions) =
  split /\|/, $node->safe_psql('postgres', 'SELECT size, used, hits, misses, evictions FROM tde_key_cache()');
cmp_ok($misses, '>=', 30, "each table's key was unwrapped from the key table on a miss ($misses misses)");
cmp_ok($evictions, '>', 0, "and evicted again ($evictions evictions, $used used)");
$node->safe_psql('postgres', 'UPDATE c_1 SET v = v || \'-CACHE-UPDATED\'; UPDATE c_30 SET v = v || \'-CACHE-UPDATED\'; CHECKPOINT');
is(scalar(files_containing($node, 'CACHE-')), 0, 'writes after evictions are encrypted too');
is($node->safe_psql('postgres', "SELECT count(*) FROM tde_keys() WHERE NOT usable"), '0', 'every key is usable');

# ---- The file is an append-only log, compacted at checkpoints ---------------
$node->safe_psql('postgres', 'CHECKPOINT');
my @frames = keystore_frames($store);
my $size0 = -s $store;
$node->safe_psql('postgres', 'CREATE TABLE one (i int) USING tde_heap; CHECKPOINT');
my $grew = (-s $store) - $size0;
ok($grew > 0 && $grew < 1000, "one new key appends one frame ($grew bytes), not a rewrite of the store ($size0 bytes)");
@frames = keystore_frames($store);
my ($first_keyed) = grep { $frames[$_]{keyed} } 0 .. $#frames;
my @late_unkeyed = grep { !$frames[$_]{keyed} } $first_keyed .. $#frames;
ok(!@late_unkeyed && ($frames[$first_keyed]{kind} eq 'snapshot' || $frames[$first_keyed]{body}{op} eq 'set_principal'),
	"every frame from the first master key on is authenticated ($first_keyed unauthenticated frames before it, of "
	  . scalar(@frames) . ')');

$node->safe_psql('postgres', join("\n", map { "CREATE TABLE many_$_ (i int) USING tde_heap;" } 1 .. 400));
$node->safe_psql('postgres', 'CHECKPOINT');
@frames = keystore_frames($store);
is(scalar(@frames), 1, 'a log larger than the snapshot is compacted into one snapshot at a checkpoint');
ok($frames[0]{kind} eq 'snapshot' && $frames[0]{keyed}, 'the snapshot is authenticated');
my @rels = keystore_key_rels($store);
is(scalar(@rels), $node->safe_psql('postgres', 'SELECT count(*) FROM tde_keys()'), 'the snapshot holds every key');

# ---- Compaction while keys keep changing ---------------------------------------
# Compaction writes the new snapshot without the store lock; frames appended
# meanwhile are re-chained after it.  Tables are created (and dropped) by two
# clients while checkpoints compact.
my $logpos = -s $node->logfile;
my ($h, $out, $err) = start_load($node, 30,
	"CREATE TABLE IF NOT EXISTS churn_:client_id (i int) USING tde_heap;\nDROP TABLE IF EXISTS churn_:client_id;\n");
my $rounds = 0;
while ($rounds < 12 && $h->pumpable)
{
	$node->safe_psql('postgres', join("\n", map { "CREATE TABLE bulk_${rounds}_$_ (i int) USING tde_heap;" } 1 .. 100) . "\nCHECKPOINT");
	$rounds++;
	$h->pump_nb;
}
my $load_ran = $h->pumpable;
$h->kill_kill;
is($rounds, 12, 'twelve checkpoints ran while two clients created and dropped encrypted tables');
ok($load_ran, 'and the load was still running after the last one') or diag($$err);
unlike(slurp_file($node->logfile, $logpos), qr/compaction skipped|PANIC/, 'no compaction was skipped or failed');
my $n_keys = $node->safe_psql('postgres', 'SELECT count(*) FROM tde_keys()');
$node->restart;
is($node->safe_psql('postgres', 'SELECT count(*) FROM tde_keys()'), $n_keys, 'after a restart the store holds every key (authenticated, re-chained frames)');
my @all = keystore_key_rels($store);
is(scalar(@all), $n_keys, 'and the file lists them all');

# ---- kill -9 after new keys, no checkpoint in between --------------------------
$node->safe_psql('postgres', q{
	CREATE TABLE late (id int PRIMARY KEY, v text) USING tde_heap;
	INSERT INTO late SELECT g, 'LATE-SECRET-' || g FROM generate_series(1, 300) g;
	DROP TABLE many_1, many_2, many_3;
});
my $late = $node->safe_psql('postgres', "SELECT relfilenode FROM pg_class WHERE relname = 'late'");
ok(!(grep { $_ == $late } keystore_key_rels($store)), 'before the checkpoint, the new key is in the WAL but not yet in the file');
$node->stop('immediate');
$node->start;
is($node->safe_psql('postgres', 'SELECT count(*) FROM late'), '300', 'after kill -9 the table created after the checkpoint reads back');
is($node->safe_psql('postgres', "SELECT tde_is_encrypted('late')"), 't', 'and is still encrypted');
$node->safe_psql('postgres', 'CHECKPOINT');
ok((grep { $_ == $late } keystore_key_rels($store)), 'recovery appended its key to the file');
is(scalar(files_containing($node, 'LATE-SECRET-')), 0, 'no plaintext of it on disk');

# ---- A torn tail -------------------------------------------------------------
$node->stop('immediate');
{
	open(my $fh, '>>:raw', $store) or die;
	print $fh "\x40\x01\x00\x00\x82" . ("\x00" x 20);    # a frame cut short
	close $fh;
}
my $logstart = -s $node->logfile;
$node->start;
like(slurp_file($node->logfile, $logstart), qr/key store file ".*keystore": dropping a torn tail of 25 bytes/,
	'a torn tail is dropped, with a LOG line');
is($node->safe_psql('postgres', 'SELECT count(*) FROM late'), '300', 'and everything reads back');
$node->safe_psql('postgres', 'CREATE TABLE after_torn (i int) USING tde_heap; INSERT INTO after_torn VALUES (1); CHECKPOINT');
$node->restart;
is($node->safe_psql('postgres', 'SELECT count(*) FROM after_torn'), '1', 'frames appended after the cut are read back');

$node->stop;
done_testing();
