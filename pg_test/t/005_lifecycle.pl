# 005_lifecycle.pl -- every operation that gives a relation a new file keeps
# an encrypted table (heap, TOAST, all six index types, owned sequence)
# encrypted and readable: TRUNCATE, VACUUM FULL, CLUSTER, REINDEX (also
# CONCURRENTLY), ALTER TABLE rewrites, SET TABLESPACE, CREATE DATABASE (both
# strategies), temp, unlogged and partitioned tables, materialized views,
# SET ACCESS METHOD both ways, DROP/ROLLBACK, and tde.enforce_encryption.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeTest;

my $node = new_node('lifecycle', conf => "temp_buffers = 100\nautovacuum = off");
$node->start;
configure_keys($node);

my $marker = 'LIFEMARK-c0ffee';
my $rows = 200;

sub create_table
{
	my ($db, $t, $am) = @_;
	$am //= 'tde_heap';
	$node->safe_psql($db, qq{
		CREATE TABLE $t (id serial PRIMARY KEY, tag text, big text, arr text[], pt point) USING $am;
		ALTER TABLE $t ALTER big SET STORAGE EXTERNAL;
		CREATE INDEX ${t}_btree ON $t (tag);
		CREATE INDEX ${t}_hash ON $t USING hash (tag);
		CREATE INDEX ${t}_gin ON $t USING gin (arr);
		CREATE INDEX ${t}_gist ON $t USING gist (pt);
		CREATE INDEX ${t}_spgist ON $t USING spgist (tag);
		CREATE INDEX ${t}_brin ON $t USING brin (id);
	});
	fill($db, $t);
}

sub fill
{
	my ($db, $t) = @_;
	$node->safe_psql($db, qq{
		INSERT INTO $t (tag, big, arr, pt)
		SELECT '$marker' || g, repeat('$marker', 300), ARRAY['$marker' || g], point(g, g)
		  FROM generate_series(1, $rows) g;
	});
}

# Relations whose files must be encrypted: the table, its TOAST table and
# TOAST index, its indexes and its owned sequences.
sub parts
{
	my ($db, $t) = @_;
	return split /\n/, $node->safe_psql($db, qq{
		SELECT c.oid::regclass::text FROM pg_class c WHERE c.oid = '$t'::regclass
		UNION ALL SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = '$t'::regclass AND reltoastrelid <> 0
		UNION ALL SELECT i.indexrelid::regclass::text FROM pg_index i
		    WHERE i.indrelid = '$t'::regclass
		       OR i.indrelid = (SELECT reltoastrelid FROM pg_class WHERE oid = '$t'::regclass)
		UNION ALL SELECT s::regclass::text FROM pg_get_serial_sequence('$t', 'id') s WHERE s IS NOT NULL
		ORDER BY 1});
}

sub check_encrypted
{
	my ($what, $db, $t, %o) = @_;
	$db //= 'postgres';
	my $expect = $o{rows} // $rows;
	$node->safe_psql($db, 'CHECKPOINT');
	my @p = parts($db, $t);
	my @plain = grep {
		$node->safe_psql($db, "SELECT tde_is_encrypted('$_')") ne 't'
	} @p;
	is_deeply(\@plain, [], "$what: all " . scalar(@p) . " relations of $t are encrypted");
	my @leaks = grep { !m{/pg_wal/} } files_containing($node, $marker);
	push @leaks, files_containing($node, $marker, dir => $o{tsdir}) if $o{tsdir};
	is_deeply(\@leaks, [], "$what: no plaintext on disk");
	is($node->safe_psql($db, qq{
		SET enable_seqscan = off;
		SELECT count(*) FROM $t WHERE tag LIKE '$marker%' AND length(big) = 300 * length('$marker')}),
		$expect, "$what: $expect rows read back");
}

create_table('postgres', 't');
check_encrypted('CREATE TABLE', 'postgres', 't');

# Each of these gives the table, its TOAST table and/or its indexes new files.
for my $op (
	[ 'TRUNCATE', 'TRUNCATE t' ],
	[ 'VACUUM FULL', 'VACUUM FULL t' ],
	[ 'CLUSTER', 'CLUSTER t USING t_pkey' ],
	[ 'REINDEX', 'REINDEX TABLE t' ],
	[ 'REINDEX CONCURRENTLY', 'REINDEX TABLE CONCURRENTLY t' ],
	[ 'ALTER TABLE rewrite', 'ALTER TABLE t ALTER COLUMN id TYPE bigint' ])
{
	my ($what, $sql) = @$op;
	$node->safe_psql('postgres', $sql);
	fill('postgres', 't') if $what eq 'TRUNCATE';
	check_encrypted($what, 'postgres', 't');
}

my $tsdir = PostgreSQL::Test::Utils::tempdir();
$node->safe_psql('postgres', "CREATE TABLESPACE ts LOCATION '$tsdir'");
$node->safe_psql('postgres', 'ALTER TABLE t SET TABLESPACE ts');
$node->safe_psql('postgres', 'ALTER INDEX t_btree SET TABLESPACE ts');
$node->safe_psql('postgres', 'ALTER INDEX t_gin SET TABLESPACE ts');
check_encrypted('SET TABLESPACE', 'postgres', 't', tsdir => $tsdir);

# CREATE DATABASE copies the template's files, with both strategies.
$node->safe_psql('postgres', 'CREATE DATABASE src');
configure_keys($node, 'src');
create_table('src', 's');
for my $strategy (qw(wal_log file_copy))
{
	$node->safe_psql('postgres', "CREATE DATABASE copy_$strategy TEMPLATE src STRATEGY $strategy");
	check_encrypted("CREATE DATABASE STRATEGY $strategy", "copy_$strategy", 's');
	$node->safe_psql("copy_$strategy", 'INSERT INTO s (tag) VALUES (NULL)');
	is($node->safe_psql("copy_$strategy", 'SELECT count(*) FROM s'), $rows + 1, "$strategy copy accepts writes");
}
# Moving a whole database would move files away from their keys: refused.
my ($rc0, $out0, $err0) = $node->psql('postgres', 'ALTER DATABASE copy_wal_log SET TABLESPACE ts');
like($err0, qr/ALTER DATABASE \.\.\. SET TABLESPACE is not supported for a database with encrypted relations/,
	'ALTER DATABASE SET TABLESPACE is refused for a database with encrypted relations');
is($node->safe_psql('copy_wal_log', 'SELECT count(*) FROM s'), $rows + 1, 'and the database is untouched');
my $keys_before = $node->safe_psql('postgres', 'SELECT count(*) FROM tde_keys()');
$node->safe_psql('postgres', 'DROP DATABASE copy_file_copy');
ok($node->safe_psql('postgres', 'SELECT count(*) FROM tde_keys()') < $keys_before, 'DROP DATABASE removes its keys');

# Partitions inherit the access method of the partitioned table.
$node->safe_psql('postgres', q{
	CREATE TABLE p (id int, tag text, big text) PARTITION BY RANGE (id) USING tde_heap;
	CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (100000);
	CREATE INDEX p_tag ON p (tag);
});
$node->safe_psql('postgres', "INSERT INTO p SELECT g, '$marker' || g, repeat('$marker', 300) FROM generate_series(1, $rows) g");
check_encrypted('partition', 'postgres', 'p1');

# Materialized views, and their refresh.
$node->safe_psql('postgres', "CREATE MATERIALIZED VIEW mv USING tde_heap AS SELECT id, tag, big FROM t");
$node->safe_psql('postgres', 'CREATE UNIQUE INDEX mv_id ON mv (id)');
check_encrypted('materialized view', 'postgres', 'mv');
$node->safe_psql('postgres', 'REFRESH MATERIALIZED VIEW mv');
check_encrypted('REFRESH MATERIALIZED VIEW', 'postgres', 'mv');
$node->safe_psql('postgres', 'REFRESH MATERIALIZED VIEW CONCURRENTLY mv');
check_encrypted('REFRESH MATERIALIZED VIEW CONCURRENTLY', 'postgres', 'mv');

# SET ACCESS METHOD encrypts an existing table, and decrypts it again.
create_table('postgres', 'h', 'heap');
$node->safe_psql('postgres', 'CHECKPOINT');
ok(scalar(files_containing($node, $marker)) > 0, 'plain table h shows the marker');
$node->safe_psql('postgres', 'ALTER TABLE h SET ACCESS METHOD tde_heap');
check_encrypted('SET ACCESS METHOD tde_heap', 'postgres', 'h');
$node->safe_psql('postgres', 'ALTER TABLE h SET ACCESS METHOD heap');
$node->safe_psql('postgres', 'CHECKPOINT');
is($node->safe_psql('postgres', "SELECT bool_or(tde_is_encrypted(r)) FROM unnest(ARRAY['h', 'h_btree', 'h_id_seq']::regclass[]) r"),
	'f', 'SET ACCESS METHOD heap decrypts the table, its indexes and sequence');
is($node->safe_psql('postgres', 'SELECT count(*) FROM h'), $rows, 'decrypted table reads back');
$node->safe_psql('postgres', 'DROP TABLE h');

# default_table_access_method.
$node->safe_psql('postgres', q{
	SET default_table_access_method = tde_heap;
	CREATE TABLE d (id serial PRIMARY KEY, tag text, big text, arr text[], pt point);
});
is($node->safe_psql('postgres', "SELECT tde_is_encrypted('d')"), 't', 'default_table_access_method = tde_heap encrypts');

# Unlogged tables: encrypted, and empty but usable after a crash (the init
# fork is copied over the main fork byte for byte).
$node->safe_psql('postgres', "CREATE UNLOGGED TABLE u (id int PRIMARY KEY, tag text) USING tde_heap");
$node->safe_psql('postgres', "INSERT INTO u SELECT g, '$marker' || g FROM generate_series(1, $rows) g");
$node->safe_psql('postgres', 'CHECKPOINT');
is_deeply([ grep { !m{/pg_wal/} } files_containing($node, $marker) ], [], 'unlogged table: no plaintext');
$node->kill9;
restart_after_kill9($node);
$node->safe_psql('postgres', 'INSERT INTO u VALUES (1, NULL)');
is($node->safe_psql('postgres', 'SET enable_seqscan = off; SELECT count(*) FROM u WHERE id = 1'), '1',
	'unlogged table after crash restart: empty, its index works');

# Temp tables spill to disk through local buffers (temp_buffers = 100).
my $s = $node->background_psql('postgres');
$s->query_safe(qq{
	CREATE TEMP TABLE tt (id int, tag text) USING tde_heap;
	CREATE INDEX tt_tag ON tt (tag);
	INSERT INTO tt SELECT g, '$marker' || g FROM generate_series(1, 20000) g;
});
is($s->query_safe("SELECT tde_is_encrypted('tt'), tde_is_encrypted('tt_tag')"), 't|t', 'temp table and index are encrypted');
is_deeply([ grep { !m{/pg_wal/} } files_containing($node, $marker) ], [], 'temp table: no plaintext on disk');
is($s->query_safe("SELECT count(*) FROM tt WHERE tag = '${marker}777'"), '1', 'temp table reads back');
$s->quit;

# A DROP that rolls back keeps the key; a committed one removes it.
my $k0 = $node->safe_psql('postgres', 'SELECT count(*) FROM tde_keys()');
$node->safe_psql('postgres', 'BEGIN; DROP TABLE t CASCADE; ROLLBACK;');
is($node->safe_psql('postgres', 'SELECT count(*) FROM t'), $rows, 'rolled-back DROP keeps the table readable');
is($node->safe_psql('postgres', 'SELECT count(*) FROM tde_keys()'), $k0, 'and its keys');
$node->safe_psql('postgres', 'DROP TABLE t CASCADE');
my $k1 = $node->safe_psql('postgres', 'SELECT count(*) FROM tde_keys()');
ok($k1 < $k0 - 8, "committed DROP removes the keys ($k0 -> $k1)");

# tde.enforce_encryption.
$node->safe_psql('postgres', 'ALTER SYSTEM SET tde.enforce_encryption = on; SELECT pg_reload_conf()');
my ($rc, $out, $err) = $node->psql('postgres', 'CREATE TABLE nope (i int) USING heap');
like($err, qr/tde.enforce_encryption is on: table "nope" would not be encrypted/, 'enforce: plain CREATE TABLE fails');
($rc, $out, $err) = $node->psql('postgres', 'CREATE TABLE nope2 AS SELECT 1 AS i');
like($err, qr/would not be encrypted/, 'enforce: CREATE TABLE AS with heap fails');
$node->safe_psql('postgres', 'CREATE TABLE yes (i int) USING tde_heap');
is($node->safe_psql('postgres', "SELECT tde_is_encrypted('yes')"), 't', 'enforce: tde_heap is allowed');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET tde.enforce_encryption; SELECT pg_reload_conf()');

$node->stop;
done_testing();
