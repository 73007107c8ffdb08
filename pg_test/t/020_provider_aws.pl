# 020_provider_aws.pl -- the aws-kms provider against moto's KMS server on
# loopback, with moto's IAM authentication on (signatures and policies are
# checked), so wrong credentials and missing permissions are real refusals.
# See TdeProviderTest.pm for the scenario.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeKms qw(:all);
use TdeProviderTest;
use TdeTest;

my $moto = moto(auth => 1);
my %base = (region => $moto->{region}, endpoint => $moto->{endpoint});

provider_suite(
	name => 'aws',
	kind => 'aws-kms',
	server => $moto,
	port => $moto->{port},
	options => { %base, access_key_id => $moto->{access_key_id}, secret_access_key_file => $moto->{secret_access_key_file} },
	bad_options => { %base, access_key_id => 'AKIANOTAREALKEY00000', secret_access_key_file => $moto->{secret_access_key_file} },
	key => 'alias/tde-mek',
	missing_key => '11111111-2222-3333-4444-555555555555',
	outage => 1);

# Credentials accepted, but not allowed to use KMS keys: "permission denied".
my $node = new_node('aws_denied');
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION tde');
$node->safe_psql('postgres', qq{SELECT tde_add_key_provider('ro', 'aws-kms', '{"region": "$moto->{region}", "endpoint": "$moto->{endpoint}", "access_key_id": "$moto->{denied_access_key_id}", "secret_access_key_file": "$moto->{denied_secret_access_key_file}"}')});
my ($rc, $out, $err) = $node->psql('postgres', q{SELECT tde_set_master_key('ro', 'alias/tde-other')});
isnt($rc, 0, 'aws-kms: a credential without kms permissions cannot set a master key');
like($err, qr/aws-kms provider: permission denied/, '... and the error says so');
$node->stop;

done_testing();
