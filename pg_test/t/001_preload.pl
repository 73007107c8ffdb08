# 001_preload.pl -- the library must be preloaded, and then it answers.
#
# A cluster with tde in shared_preload_libraries can CREATE EXTENSION and call
# tde_version(); a cluster without it gets a clear error naming
# shared_preload_libraries, both from CREATE EXTENSION and from LOAD.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('preloaded');
$node->init;
$node->append_conf('postgresql.conf', "shared_preload_libraries = 'tde'");
$node->start;

$node->safe_psql('postgres', 'CREATE EXTENSION tde');
like($node->safe_psql('postgres', 'SELECT tde_version()'),
	qr/^\d+\.\d+\.\d+$/, 'tde_version() answers when preloaded');
$node->stop;

my $plain = PostgreSQL::Test::Cluster->new('not_preloaded');
$plain->init;
$plain->start;
my ($rc, $out, $err) = $plain->psql('postgres', 'CREATE EXTENSION tde');
isnt($rc, 0, 'CREATE EXTENSION fails without preloading');
like($err, qr/tde: must be loaded via shared_preload_libraries/,
	'the error says the library must be preloaded');
($rc, $out, $err) = $plain->psql('postgres', "LOAD 'tde'");
like($err, qr/shared_preload_libraries/, 'LOAD says the same');
is($plain->safe_psql('postgres', 'SELECT 1'), '1', 'the server stays up');
$plain->stop;

done_testing();
