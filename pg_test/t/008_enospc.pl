# 008_enospc.pl -- an I/O error raised by md.c under tde's storage manager
# (here ENOSPC) reaches PostgreSQL untouched, and afterwards the same
# session, other sessions and the checkpointer keep working, on plain and
# encrypted tables alike.
#
# The tablespace lives on a 1 MB tmpfs that scripts/test mounts as root and
# names in TDE_TEST_TMPFS (the test itself runs unprivileged).  Without it
# the test fails rather than skips: a test that cannot fail is a defect.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeTest;

my $tmpfs = $ENV{TDE_TEST_TMPFS};
ok(defined $tmpfs && -d $tmpfs && -w $tmpfs, 'a small tmpfs for the tablespace is mounted (TDE_TEST_TMPFS)')
  or BAIL_OUT('TDE_TEST_TMPFS is not set: run through scripts/test as root');

my $node = new_node('enospc');
$node->start;
configure_keys($node);
mkdir "$tmpfs/ts";
$node->safe_psql('postgres', qq{
	CREATE TABLESPACE small LOCATION '$tmpfs/ts';
	CREATE TABLE other (i int);
	INSERT INTO other SELECT generate_series(1, 1000);
	CREATE TABLE other_enc (i int) USING tde_heap;
	INSERT INTO other_enc SELECT generate_series(1, 1000);
	-- about 3 MB each: more than the tablespace holds
	CREATE TABLE big (v text);
	INSERT INTO big SELECT repeat(md5(g::text), 3) FROM generate_series(1, 25000) g;
	CREATE TABLE big_enc (v text) USING tde_heap;
	INSERT INTO big_enc SELECT repeat(md5(g::text), 3) FROM generate_series(1, 25000) g;
});

for my $t ('big', 'big_enc')
{
	# One session: the failing statement, then more work in the same backend.
	my ($rc, $out, $err) = $node->psql('postgres', qq{
		ALTER TABLE $t SET TABLESPACE small;
		SELECT 'plain:' || count(*) FROM other;
		SELECT 'enc:' || count(*) FROM other_enc;
		CREATE TABLE after_$t (i int) USING tde_heap;
		INSERT INTO after_$t SELECT generate_series(1, 10);
		SELECT 'new:' || count(*) FROM after_$t;
		CREATE TABLE after_plain_$t (i int);
		SELECT 'done';
	}, on_error_stop => 0);
	like($err, qr/could not extend file .*: No space left on device/, "$t: SET TABLESPACE hits ENOSPC, with PostgreSQL's own message");
	unlike($err, qr/RefCell|already borrowed|panic/i, "$t: no Rust state was left behind");
	like($out, qr/plain:1000/, "$t: the same session then reads a plain table");
	like($out, qr/enc:1000/, "$t: and an encrypted table");
	like($out, qr/new:10/, "$t: and creates and fills a new encrypted table");
	like($out, qr/done/, "$t: and goes on to the end");
	is($node->safe_psql('postgres', 'CHECKPOINT; SELECT 1'), '1', "$t: the checkpointer still works");
	is($node->safe_psql('postgres', "SELECT count(*) FROM $t"), '25000', "$t: the table is intact in its old place");
}
is($node->safe_psql('postgres', 'SELECT count(*) FROM other_enc'), '1000', 'other sessions keep working');
$node->restart;
is($node->safe_psql('postgres', 'SELECT count(*) FROM big_enc'), '25000', 'after a restart everything reads back');
$node->stop;
done_testing();
