# 010_backup_during_ddl.pl -- a base backup taken while encrypted tables are
# being created restores, and every table it holds reads back.
#
# The key store lives outside shared buffers: a key created just before the
# backup's checkpoint must be in the copied key store file or in the WAL the
# restore replays (tde holds checkpoints off between logging a key and
# saving the file).
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeTest;

my $node = new_node('bk', init => { allows_streaming => 1 });
$node->start;
configure_keys($node);

my $bg = $node->background_psql('postgres', on_error_stop => 1);
$bg->query_until(qr/started/, q{
	\echo started
	DO $$
	BEGIN
		FOR i IN 1..400 LOOP
			EXECUTE format('CREATE TABLE bk_%s (id int PRIMARY KEY, v text) USING tde_heap', i);
			EXECUTE format('INSERT INTO bk_%s VALUES (1, repeat(%L, 3000))', i, 'BK-SECRET-' || i);
			COMMIT;
		END LOOP;
	END $$;
	\echo finished
});
# Let some tables exist before the backup starts.
$node->poll_query_until('postgres', q{SELECT count(*) >= 20 FROM pg_class WHERE relname ~ '^bk_\d+$'})
  or die 'tables are not being created';
$node->backup('during');
$bg->query_until(qr/finished/, '');
$bg->quit;
my $total = $node->safe_psql('postgres', q{SELECT count(*) FROM pg_class WHERE relname ~ '^bk_\d+$'});
is($total, '400', 'the primary created all 400 tables');

my $restored = PostgreSQL::Test::Cluster->new('restored');
$restored->init_from_backup($node, 'during');
$restored->start;
my $n = $restored->safe_psql('postgres', q{SELECT count(*) FROM pg_class WHERE relname ~ '^bk_\d+$'});
ok($n >= 20, "the backup holds the tables created before it ($n of 400)");
my $bad = $restored->safe_psql('postgres', q{
	CREATE TEMP TABLE bad (t text);
	DO $$
	DECLARE r record; c int;
	BEGIN
		FOR r IN SELECT relname FROM pg_class WHERE relname ~ '^bk_\d+$' LOOP
			EXECUTE format('SELECT count(*) FROM %I WHERE v LIKE %L', r.relname, 'BK-SECRET-%') INTO c;
			IF c <> 1 OR NOT tde_is_encrypted(r.relname::regclass) THEN
				INSERT INTO bad VALUES (r.relname);
			END IF;
		END LOOP;
	END $$;
	SELECT count(*) FROM bad;
});
is($bad, '0', 'every table in the restored backup is encrypted and reads back');
$restored->safe_psql('postgres', 'CHECKPOINT');
is(scalar(files_containing($restored, 'BK-SECRET-')), 0, 'the restored files hold no plaintext');
$restored->stop;
$node->stop;
done_testing();
