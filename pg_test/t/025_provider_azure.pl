# 025_provider_azure.pl -- the azure-keyvault provider against the Azure Key
# Vault stand-in of TdeKms.pm (azure_keyvault()) on loopback, over HTTPS with
# a test CA.  The stand-in is NOT AN EMULATOR: a small server of ours that
# implements only the documented calls tde makes, from Microsoft's REST
# reference (Entra ID's client-credentials token request; Key Vault's
# get-key, create-key, wrap-key and unwrap-key, with its 401 challenge and
# its error shape).  Its RSA-OAEP-256 is real (Python's `cryptography`), and
# it checks client secrets and per-client permissions, so a wrong secret and
# a missing permission are real refusals -- of the stand-in, not of Azure:
# this test shows tde's client speaks Key Vault's and Entra ID's documented
# wire protocol and handles its refusals and outages, not that Azure
# behaves like the stand-in.  See TdeProviderTest.pm for the scenario.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use TdeKms qw(:all);
use TdeProviderTest;
use TdeTest;

my $az = azure_keyvault();
my $dir = PostgreSQL::Test::Utils::tempdir();
my $bad_file = "$dir/bad-secret";
open(my $fh, '>', $bad_file) or die;
print $fh "not-the-client-secret\n";
close $fh;
chmod 0600, $bad_file;

# The node trusts the stand-in's CA, and asks it (not Entra ID) for tokens.
my %base = (
	vault_url => $az->{vault_url},
	authority_host => $az->{authority_host},
	ca_file => $az->{ca_file},
	tenant_id => $az->{tenant_id});

my $node = provider_suite(
	name => 'azure',
	kind => 'azure-keyvault',
	server => $az,
	port => $az->{port},
	options => { %base, client_id => $az->{client_id}, client_secret_file => $az->{client_secret_file} },
	bad_options => { %base, client_id => $az->{client_id}, client_secret_file => $bad_file },
	key => 'tde-mek',
	# A key version that does not exist: never created (a version cannot be).
	missing_key => 'tde-mek/00000000000000000000000000000000',
	outage => 1);

# ---- A new key version in Key Vault (its own rotation) ----
# The blobs name the key version that wrapped them, so the KEK still
# unwraps after the key gets a newer version; new wraps use the newest.
$node->start;
my $mk = $node->safe_psql('postgres', 'SELECT DISTINCT master_key FROM tde_keys') =~ s{^kms/}{}r;
$node->stop;
my $version = $az->new_key_version($mk);
like($version, qr/^[0-9a-f]{32}$/, "azure-keyvault: Key Vault made a new version of $mk");
my $logpos = -s $az->{log};
$node->start;
is($node->safe_psql('postgres', 'SELECT (SELECT count(*) FROM p_1) + (SELECT count(*) FROM p_2) + (SELECT count(*) FROM p_3)'),
	'301', 'azure-keyvault: after a new key version in Key Vault, every row reads back');
is($node->safe_psql('postgres', 'SELECT tde_verify_key()'), 't', 'azure-keyvault: ... and the master key verifies (wrapping with the new version)');
my $log = slurp_file($az->{log}, $logpos);
my @unwrapped = $log =~ m{POST /keys/\Q$mk\E/([0-9a-f]{32})/unwrapkey}g;
ok((grep { $_ ne $version } @unwrapped), 'azure-keyvault: ... the KEK was unwrapped with the version that wrapped it');
ok((grep { $_ eq $version } @unwrapped), 'azure-keyvault: ... and the check wrapped with the new one');
$node->stop;

# ---- Credentials accepted, but only "get" on keys: permission denied ----
my $ro = new_node('azure_denied');
$ro->start;
$ro->safe_psql('postgres', 'CREATE EXTENSION tde');
my $json = JSON::PP->new->canonical->encode({ %base, client_id => $az->{reader_client_id},
	client_secret_file => $az->{reader_client_secret_file} });
$ro->safe_psql('postgres', "SELECT tde_add_key_provider('ro', 'azure-keyvault', '$json')");
my ($rc, $out, $err) = $ro->psql('postgres', q{SELECT tde_set_master_key('ro', 'tde-mek')});
isnt($rc, 0, 'azure-keyvault: a client that may only read keys cannot set a master key');
like($err, qr/azure-keyvault provider: permission denied: .*does not have keys wrapKey permission.*\(Forbidden, HTTP 403\)/,
	'... and the error says so, in Key Vault\'s words');
($rc, $out, $err) = $ro->psql('postgres', q{SELECT tde_set_master_key('ro', 'tde-new')});
like($err, qr/azure-keyvault provider: permission denied: .*keys create permission/, '... nor create a key');
is($ro->safe_psql('postgres', 'SELECT state FROM tde_key_store_state()'), 'empty', '... and no master key is set');
$ro->stop;

done_testing();
