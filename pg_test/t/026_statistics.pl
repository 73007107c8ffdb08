# 026_statistics.pl -- ANALYZE of an encrypted table leaves no value of it on
# disk in plaintext.
#
# ANALYZE copies most common values and histogram bounds into pg_statistic,
# and extended statistics' MCV lists into pg_statistic_ext_data.  In a
# database with encrypted tables both catalogs are encrypted (src/statistics.rs):
# the column values below, repeated so that they become MCVs, are then in no
# file under the data directory, while pg_stats, pg_stats_ext and the planner
# see them as before.  Controls: the same statistics in a database without
# encrypted tables are found in its pg_statistic file, and statistics written
# before the first encrypted table are found there until it is created.
use strict;
use warnings FATAL => 'all';
use File::Copy;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeTest;

my $node = new_node('stats');
$node->start;
configure_keys($node);
$node->safe_psql('postgres', 'CREATE DATABASE plaindb');

sub marker { return $_[0] . '-' . join('', map { sprintf '%02x', int rand 256 } 1 .. 6) }
my $enc = marker('STATMARK-ENC');      # values of the encrypted table
my $early = marker('STATMARK-EARLY');  # a plain table's, analyzed before any key
my $ctl = marker('STATMARK-CTL');      # plaindb's: no encrypted table there

sub stat_file_has
{
	my ($db, $catalog, $needle) = @_;
	my $path = $node->data_dir . '/' . $node->safe_psql($db, "SELECT pg_relation_filepath('$catalog')");
	open(my $fh, '<:raw', $path) or die "$path: $!";
	local $/;
	my $bytes = <$fh>;
	return index($bytes, $needle) >= 0 ? 1 : 0;
}

sub load
{
	my ($db, $table, $am, $m) = @_;
	$node->safe_psql($db, qq{
		CREATE TABLE $table (id int, a text, b text) USING $am;
		INSERT INTO $table SELECT g, '$m-a' || (g % 4), '$m-b' || (g % 4) FROM generate_series(1, 20000) g;
		CREATE STATISTICS ${table}_ab (mcv, ndistinct) ON a, b FROM $table;
		ANALYZE $table;
		CHECKPOINT;
	});
}

# ---- Controls ------------------------------------------------------------------
load('plaindb', 'c', 'heap', $ctl);
is(stat_file_has('plaindb', 'pg_statistic', "$ctl-a1"), 1,
	'control: a database without encrypted tables has the MCVs in its pg_statistic file');
is(stat_file_has('plaindb', 'pg_statistic_ext_data', "$ctl-a1"), 1,
	'control: and the extended statistics in its pg_statistic_ext_data file');

load('postgres', 'early', 'heap', $early);
is(stat_file_has('postgres', 'pg_statistic', "$early-a1"), 1,
	'before the first encrypted table, a plain table\'s MCVs are in pg_statistic in plaintext');

# ---- The first encrypted table encrypts the statistics ------------------------
load('postgres', 't', 'tde_heap', $enc);
is( $node->safe_psql('postgres', q{SELECT string_agg(relation::text, ',' ORDER BY relation::text) FROM tde_status
		WHERE relation::text IN ('pg_statistic', 'pg_statistic_ext_data', 'pg_toast.pg_toast_2619', 'pg_toast.pg_toast_3429')}),
	'pg_statistic,pg_statistic_ext_data,pg_toast.pg_toast_2619,pg_toast.pg_toast_3429',
	'the statistics catalogs and their TOAST tables have keys');
is( $node->safe_psql('postgres', q{SELECT count(*) FROM tde_status
		WHERE relation::text IN ('pg_statistic_relid_att_inh_index', 'pg_statistic_ext_data_stxoid_inh_index')}),
	'2', 'and their indexes');
my @leaks = files_containing($node, $enc);
is_deeply(\@leaks, [], 'after ANALYZE and CHECKPOINT no file under the data directory holds a value of the encrypted table');
is(stat_file_has('postgres', 'pg_statistic', "$early-a1"), 0,
	'the statistics written before were re-encrypted with the rest of pg_statistic');
$node->safe_psql('postgres', 'CREATE EXTENSION amcheck');
is($node->safe_psql('postgres', "SELECT count(*) FROM verify_heapam('pg_statistic')"), '0',
	'verify_heapam finds pg_statistic intact');

sub visible
{
	my ($db) = @_;
	return $node->safe_psql($db, qq{
		SELECT (SELECT array_to_string(most_common_vals, ',') FROM pg_stats WHERE tablename = 't' AND attname = 'a')
		 || ' | ' ||
		 (SELECT array_to_string(most_common_vals, ',') FROM pg_stats_ext WHERE statistics_name = 't_ab')});
}
like(visible('postgres'), qr/^(\Q$enc\E-a\d,?){4} \| .*\Q$enc\E-a1,\Q$enc\E-b1/, 'pg_stats and pg_stats_ext show the values');
sub estimate
{
	my ($db, $where) = @_;
	my $plan = $node->safe_psql($db, "EXPLAIN SELECT * FROM t WHERE $where");
	my ($rows) = $plan =~ /rows=(\d+)/;
	return $rows;
}
is(estimate('postgres', "a = '$enc-a1'"), '5000', 'the planner estimates from the MCVs (5000 rows)');
is(estimate('postgres', "a = '$enc-a1' AND b = '$enc-b1'"), '5000',
	'and from the extended statistics (5000, not 1250)');

is( $node->safe_psql('postgres', q{SELECT count(*) FROM tde_audit_log
		WHERE operation = 'reencryption_finished' AND object = 'pg_catalog.pg_statistic'}),
	'1', 'the audit trail records the encryption of pg_statistic');

# ---- Rewrites, restarts, copies -----------------------------------------------
my $before = $node->safe_psql('postgres', "SELECT pg_relation_filenode('pg_statistic')");
$node->safe_psql('postgres', 'VACUUM FULL pg_statistic; VACUUM FULL pg_statistic_ext_data; ANALYZE t; CHECKPOINT');
isnt($node->safe_psql('postgres', "SELECT pg_relation_filenode('pg_statistic')"), $before,
	'VACUUM FULL gave pg_statistic a new file');
@leaks = files_containing($node, $enc);
is_deeply(\@leaks, [], 'and it is encrypted too');

$node->restart;
like(visible('postgres'), qr/\Q$enc\E-a1/, 'after a restart the statistics read back');
is(estimate('postgres', "a = '$enc-a2'"), '5000', 'and the planner uses them');

$node->safe_psql('postgres', 'CREATE DATABASE copydb TEMPLATE postgres');
is(stat_file_has('copydb', 'pg_statistic', "$enc-a1"), 0, 'a database copied from it has encrypted statistics');
like(visible('copydb'), qr/\Q$enc\E-a1/, 'which it reads');
$node->safe_psql('copydb', 'ANALYZE t; CHECKPOINT');
@leaks = files_containing($node, $enc);
is_deeply(\@leaks, [], 'and ANALYZE there leaves no value on disk');

# ---- Started while the key store is locked ------------------------------------
# The planner then plans with default estimates instead of failing on the
# encrypted statistics, so plain tables stay usable; pg_stats says why.
$node->safe_psql('postgres',
	"CREATE TABLE plain_t AS SELECT g AS id, 'p' || (g % 3) AS v FROM generate_series(1, 1000) g; ANALYZE plain_t");
my $ring = $node->basedir . '/keyring';
$node->stop;
move($ring, "$ring.away") or die;
$node->start;
is($node->safe_psql('postgres', 'SELECT state FROM tde_key_store_state()'), 'locked', 'restarted without the master key: locked');
is($node->safe_psql('postgres', "SELECT count(*) FROM plain_t WHERE v = 'p1' AND id > 10"), '330',
	'a query on a plain table is planned and runs (default estimates, no read of the encrypted statistics)');
my ($lrc, $lout, $lerr) = $node->psql('postgres', "SELECT count(*) FROM pg_stats WHERE tablename = 'plain_t'");
like($lerr, qr/key store is locked/, 'pg_stats fails with the key store\'s error');
move("$ring.away", $ring) or die;
$node->poll_query_until('postgres', "SELECT state = 'unlocked' FROM tde_key_store_state()") or die 'not unlocked';
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_stats WHERE tablename = 'plain_t'"), '2',
	'with the key back, pg_stats reads again');

# ---- System catalogs one by one: refused ----------------------------------------
my ($rc, $out, $err) = $node->psql('postgres', "SELECT tde_decrypt_table('pg_statistic')");
like($err, qr/system catalogs cannot be encrypted or decrypted one by one/,
	'tde_decrypt_table refuses a system catalog');
is($node->safe_psql('postgres', "SELECT amname FROM pg_class c JOIN pg_am a ON a.oid = c.relam WHERE c.oid = 'pg_statistic'::regclass"),
	'heap', 'pg_statistic keeps the heap access method, as PostgreSQL requires of catalogs');

done_testing();
