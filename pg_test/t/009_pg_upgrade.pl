# 009_pg_upgrade.pl -- pg_upgrade of a cluster with encrypted relations is
# refused with a clear error before any file is copied, and the old cluster
# is left as it was.
#
# (Restoring the schema would give the preserved relfilenumbers new random
# keys while the copied files stay under the old ones: unreadable data.)
use strict;
use warnings FATAL => 'all';
use File::Find;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeTest;

my $old = new_node('old');
$old->start;
configure_keys($old);
$old->safe_psql('postgres', q{
	CREATE TABLE secret (id int PRIMARY KEY, v text) USING tde_heap;
	INSERT INTO secret SELECT g, 'v' || g FROM generate_series(1, 100) g;
});
my $secret_file = $old->safe_psql('postgres', "SELECT relfilenode FROM pg_class WHERE relname = 'secret'");
$old->stop;

my $new = new_node('new');
my $bindir = $old->config_data('--bindir');
my $workdir = $new->basedir . '/upgrade';
mkdir $workdir;
chdir $workdir;
my ($stdout, $stderr);
my $ok = IPC::Run::run(
	[ 'pg_upgrade', '--no-sync', '-d', $old->data_dir, '-D', $new->data_dir,
	  '-b', $bindir, '-B', $bindir, '-s', $new->host, '-p', $old->port, '-P', $new->port ],
	'>', \$stdout, '2>', \$stderr);
ok(!$ok, 'pg_upgrade of a cluster with encrypted tables fails');
like($stdout, qr/Restoring database schemas in the new cluster/, 'it fails while restoring the schema');
unlike($stdout, qr/Copying user relation files/, 'before copying any relation file');

my @logs;
find(sub { push @logs, $File::Find::name if /\.log$/ }, $new->data_dir . '/pg_upgrade_output.d');
my $all = join('', map { slurp_file($_) } @logs);
like($all, qr/pg_upgrade cannot carry encrypted relations to a new cluster/, 'the log says why');
like($all, qr/pg_dump and pg_restore/, 'and what to do instead');
ok(!-e $new->data_dir . "/base/5/$secret_file", 'the encrypted file was not copied into the new cluster');

$old->start;
is($old->safe_psql('postgres', 'SELECT count(*) FROM secret'), '100', 'the old cluster still starts and reads back');
$old->stop;
done_testing();
