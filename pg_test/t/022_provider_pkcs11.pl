# 022_provider_pkcs11.pl -- the pkcs11 provider against SoftHSM2: the master
# key is a non-extractable AES key on the token, created by tde.  The
# server finds the token through SOFTHSM2_CONF in its environment.  "Down"
# is the token's directory moved away (an HSM unplugged), then back.
# See TdeProviderTest.pm for the scenario.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeKms qw(:all);
use TdeProviderTest;
use TdeTest;

my $hsm = softhsm();
my $dir = PostgreSQL::Test::Utils::tempdir();
my $bad_pin = "$dir/bad-pin";
open(my $fh, '>', $bad_pin) or die;
print $fh "000000\n";
close $fh;
chmod 0600, $bad_pin;
my %base = (library => $hsm->{library}, token_label => $hsm->{token_label});

my $node = provider_suite(
	name => 'hsm',
	kind => 'pkcs11',
	env => { SOFTHSM2_CONF => $hsm->{conf} },
	server => $hsm,
	port => 0,
	options => { %base, pin_file => $hsm->{pin_file} },
	bad_options => { %base, pin_file => $bad_pin },
	key => 'tde-mek',
	down_re => qr/pkcs11 provider: /,
	outage => 1);

# The key tde made is on the token, and cannot be read out of it.
my $py = <<'PY';
import sys, pkcs11
from pkcs11 import Attribute, ObjectClass
lib = pkcs11.lib(sys.argv[1])
tok = lib.get_token(token_label=sys.argv[2])
with tok.open(user_pin=open(sys.argv[3]).read().strip()) as s:
    for k in s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
        print(k.label, k[Attribute.SENSITIVE], k[Attribute.EXTRACTABLE])
PY
local $ENV{SOFTHSM2_CONF} = $hsm->{conf};
my ($rc, $out, $err) = kms_python($py, $hsm->{library}, $hsm->{token_label}, $hsm->{pin_file});
is($rc, 0, 'the token can be listed') or diag($err);
like($out, qr/^tde-mek True False$/m, 'the master key tde created is on the token: sensitive, not extractable');

done_testing();
