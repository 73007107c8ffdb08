# 024_provider_gcp.pl -- the gcp-kms provider against drongo, a Google Cloud
# KMS REST stand-in on loopback.  drongo does NO real cryptography (its
# "ciphertext" is an encoding that embeds the plaintext) and checks no
# credentials: this test shows tde's client speaks Cloud KMS's REST API
# (key rings, CryptoKeys, Encrypt/Decrypt with additional authenticated
# data) and handles a key that does not exist, a malformed credentials
# file, and a provider that stops answering -- not that Google's
# cryptography or IAM work.  drongo keeps its state in memory, so "down" is
# the server paused (requests hang until tde.provider_timeout), not
# stopped.  See TdeProviderTest.pm for the scenario.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeKms qw(:all);
use TdeProviderTest;
use TdeTest;

my $gcp = drongo();
my $ring = "projects/$gcp->{project}/locations/$gcp->{location}/keyRings/tde";
my ($rc, $out, $err) = kms_python(<<'PY', $gcp->{endpoint}, $gcp->{project}, $gcp->{location});
import sys, urllib.request
ep, project, location = sys.argv[1:4]
req = urllib.request.Request(f"{ep}/v1/projects/{project}/locations/{location}/keyRings?keyRingId=tde",
                             data=b"{}", method="POST", headers={"Content-Type": "application/json"})
print(urllib.request.urlopen(req).status)
PY
die "key ring: $err" if $rc;

my $dir = PostgreSQL::Test::Utils::tempdir();
open(my $fh, '>', "$dir/sa.json") or die;
print $fh "not a service account key\n";
close $fh;
chmod 0600, "$dir/sa.json";

# "Stopped" = paused: drongo would lose its keys if it were stopped.
{
	package Paused;
	sub new { my ($c, $s) = @_; return bless { s => $s }, $c }
	sub stop { $_[0]{s}->pause }
	sub start { $_[0]{s}->resume }
}

my %base = (key_ring => $ring, endpoint => $gcp->{endpoint});
provider_suite(
	name => 'gcp',
	kind => 'gcp-kms',
	server => Paused->new($gcp),
	port => $gcp->{port},
	options => { %base, credentials => 'anonymous' },
	bad_options => { %base, credentials_file => "$dir/sa.json" },
	bad_re => qr/invalid options for key provider kind "gcp-kms"|gcp-kms provider: invalid options/,
	key => 'tde-mek',
	missing_key => "projects/$gcp->{project}/locations/$gcp->{location}/keyRings/none/cryptoKeys/k",
	down_re => qr/gcp-kms provider: timed out|did not answer/,
	outage => 1);

done_testing();
