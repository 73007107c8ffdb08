# 004_standby.pl -- a streaming standby reads encrypted tables, including
# ones created after it started (keys arrive through the WAL), is promoted,
# and accepts writes and new encrypted tables.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeTest;

my $primary = new_node('primary', init => { allows_streaming => 1 });
$primary->start;
configure_keys($primary);
$primary->safe_psql('postgres', q{
	CREATE TABLE before_backup (id int PRIMARY KEY, v text) USING tde_heap;
	INSERT INTO before_backup SELECT g, 'v' || g FROM generate_series(1, 1000) g;
});
$primary->backup('b1');

my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'b1', has_streaming => 1);
$standby->start;

$primary->safe_psql('postgres', q{
	INSERT INTO before_backup SELECT g, 'v' || g FROM generate_series(1001, 2000) g;
	CREATE TABLE after_backup (id serial PRIMARY KEY, v text) USING tde_heap;
	INSERT INTO after_backup (v) SELECT 'w' || g FROM generate_series(1, 500) g;
	CHECKPOINT;
});
$primary->wait_for_catchup($standby);

is($standby->safe_psql('postgres', 'SELECT count(*) FROM before_backup'), '2000', 'standby reads a table from the backup');
is($standby->safe_psql('postgres', 'SELECT count(*) FROM after_backup'), '500', 'standby reads a table created after the backup');
is($standby->safe_psql('postgres', "SELECT tde_is_encrypted('after_backup')"), 't', 'its key came through the WAL');
$standby->safe_psql('postgres', 'CHECKPOINT');
my @leaks = files_containing($standby, 'w499');
is_deeply([ grep { !m{/pg_wal/} } @leaks ], [], 'standby files hold no plaintext');

# DROP DATABASE removes the database's directory without the storage
# manager; its keys must go on the standby too (through the WAL).
$primary->safe_psql('postgres', 'CREATE DATABASE gone');
$primary->safe_psql('gone', q{
	CREATE EXTENSION tde;
	CREATE TABLE t (id int PRIMARY KEY, v text) USING tde_heap;
	INSERT INTO t SELECT g, 'x' FROM generate_series(1, 10) g;
});
my $gone_oid = $primary->safe_psql('postgres', "SELECT oid FROM pg_database WHERE datname = 'gone'");
$primary->wait_for_catchup($standby);
my $keys_of_gone = "SELECT count(*) FROM tde_keys() WHERE dboid = $gone_oid";
ok($standby->safe_psql('postgres', $keys_of_gone) >= 2, 'the standby has the keys of a new database');
$primary->safe_psql('postgres', 'DROP DATABASE gone');
$primary->wait_for_catchup($standby);
is($primary->safe_psql('postgres', $keys_of_gone), '0', 'DROP DATABASE removes its keys on the primary');
is($standby->safe_psql('postgres', $keys_of_gone), '0', 'and on the standby');
$standby->restart;
is($standby->safe_psql('postgres', $keys_of_gone), '0', 'and they stay gone after the standby restarts');

$primary->stop;
$standby->promote;
$standby->safe_psql('postgres', q{
	INSERT INTO after_backup (v) VALUES ('after promotion');
	CREATE TABLE on_new_primary (id int) USING tde_heap;
	INSERT INTO on_new_primary SELECT generate_series(1, 10);
});
is($standby->safe_psql('postgres', 'SELECT count(*) FROM after_backup'), '501', 'promoted standby accepts writes');
is($standby->safe_psql('postgres', "SELECT tde_is_encrypted('on_new_primary'), count(*) FROM on_new_primary"),
	't|10', 'promoted standby creates encrypted tables');
$standby->restart;
is($standby->safe_psql('postgres', 'SELECT count(*) FROM on_new_primary'), '10', 'and reads them after a restart');
$standby->stop;
done_testing();
