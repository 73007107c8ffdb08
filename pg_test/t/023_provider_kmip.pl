# 023_provider_kmip.pl -- the kmip provider against PyKMIP's server on
# loopback: mutual TLS with test certificates, the master key an AES key
# created by tde on the server, wrap and unwrap the server's own Encrypt and
# Decrypt (the key is never fetched).  A client certificate from another CA
# is refused.  See TdeProviderTest.pm for the scenario.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeKms qw(:all);
use TdeProviderTest;
use TdeTest;

my $kmip = pykmip();
my $other = cert_authority(PostgreSQL::Test::Utils::tempdir() . '/other-ca', cn => 'not the server CA');
my $stranger = $other->leaf('tde-client', usage => 'client');
my %base = (host => $kmip->{host}, port => $kmip->{port} + 0, ca_file => $kmip->{ca_file});

provider_suite(
	name => 'kmip',
	kind => 'kmip',
	server => $kmip,
	port => $kmip->{port},
	options => { %base, cert_file => $kmip->{cert_file}, key_file => $kmip->{key_file} },
	bad_options => { %base, cert_file => $stranger->{cert_file}, key_file => $stranger->{key_file} },
	bad_re => qr/kmip provider: credentials refused: TLS handshake/,
	key => 'tde-mek',
	outage => 1);

done_testing();
