# 021_provider_vault.pl -- the vault-transit provider against a real OpenBao
# server on loopback (raft storage, TLS with a test CA), through a token
# whose policy allows only what tde needs on transit keys named tde-*.
# See TdeProviderTest.pm for the scenario.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeKms qw(:all);
use TdeProviderTest;
use TdeTest;

my $bao = openbao(tls => 1);
# tde's policy: read and create tde-* keys, encrypt and decrypt with them.
my $r = $bao->run_cli({ stdin => <<'HCL' }, 'policy', 'write', 'tde-provider', '-');
path "transit/keys/tde-*"    { capabilities = ["read", "create", "update"] }
path "transit/encrypt/tde-*" { capabilities = ["update"] }
path "transit/decrypt/tde-*" { capabilities = ["update"] }
HCL
die "policy: $r->{err}" unless $r->{ok};
my $token = $bao->cli('token', 'create', '-policy=tde-provider', '-field=token');
chomp $token;
my $dir = PostgreSQL::Test::Utils::tempdir();
my $token_file = "$dir/tde-token";
my $bad_file = "$dir/bad-token";
for ([ $token_file, $token ], [ $bad_file, 's.notavalidtoken0000000000' ])
{
	open(my $fh, '>', $_->[0]) or die;
	print $fh "$_->[1]\n";
	close $fh;
	chmod 0600, $_->[0];
}
my %base = (url => $bao->{addr}, ca_file => $bao->{ca_file});

provider_suite(
	name => 'vault',
	kind => 'vault-transit',
	server => $bao,
	port => $bao->{port},
	options => { %base, token_file => $token_file },
	bad_options => { %base, token_file => $bad_file },
	key => 'tde-mek',
	# Outside the policy: a key tde may neither read nor create.
	missing_key => 'other-mek',
	missing_re => qr/vault-transit provider: permission denied/,
	outage => 1);

done_testing();
