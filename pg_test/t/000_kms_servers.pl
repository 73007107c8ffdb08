# 000_kms_servers.pl -- the key servers of TdeKms.pm start, answer real
# requests, and keep their state across stop/start (or pause/resume) where
# TdeKms.pm says they do.  No PostgreSQL: this checks the test machinery
# that the provider tests stand on (scripts/kms-servers install).
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Utils;
use Test::More;
use HTTP::Tiny;
use JSON::PP;
use MIME::Base64;
use TdeKms qw(:all);

my ($available, $why) = kms_available();
ok($available, 'the key servers are installed (scripts/kms-servers install)') or diag($why);
BAIL_OUT('no key servers') unless $available;

# python: runs CODE with the venv's python; returns its stdout, or undef
# when it exits non-zero (its stderr goes to the test's log).
sub python
{
	my ($code, @args) = @_;
	my ($rc, $out, $err) = kms_python($code, @args);
	return $out if $rc == 0;
	note("python exited $rc: $err");
	return undef;
}

# ---- certificate authority ---------------------------------------------------

my $ca = cert_authority(PostgreSQL::Test::Utils::tempdir('kms_ca'));
my $leaf = $ca->leaf('svc', usage => 'both', dns => ['svc.test'], ip => ['127.0.0.1']);
is(system('openssl', 'verify', '-CAfile', $ca->{ca_file}, '-purpose', 'sslserver', $leaf->{cert_file}) >> 8, 0, 'a leaf certificate verifies against the test CA');
is((stat $leaf->{key_file})[2] & 07777, 0600, 'leaf private key is 0600');

# ---- moto: AWS KMS -----------------------------------------------------------

my $AWS = <<'PY';
import sys, base64, boto3
from botocore.config import Config
endpoint, region, akid, secret, verify, op = sys.argv[1:7]
args = sys.argv[7:]
kms = boto3.client("kms", endpoint_url=endpoint, region_name=region,
                   aws_access_key_id=akid, aws_secret_access_key=secret,
                   verify=(verify if verify != "-" else None),
                   config=Config(connect_timeout=2, read_timeout=3, retries={"total_max_attempts": 1}))
if op == "create":
    key = kms.create_key(Description="tde smoke")["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName=args[0], TargetKeyId=key)
    print(key)
elif op == "encrypt":
    ct = kms.encrypt(KeyId=args[0], Plaintext=args[1].encode())["CiphertextBlob"]
    print(base64.b64encode(ct).decode())
elif op == "decrypt":
    r = kms.decrypt(CiphertextBlob=base64.b64decode(args[0]))
    print(r["Plaintext"].decode(), r["KeyId"].split("/")[-1])
PY

my $moto = moto();
like($moto->{endpoint}, qr{^http://127\.0\.0\.1:\d+$}, 'moto endpoint');
is((stat $moto->{secret_access_key_file})[2] & 07777, 0600, 'moto secret file is 0600');
my @aws = ($moto->{endpoint}, $moto->{region}, $moto->{access_key_id}, $moto->{secret_access_key}, '-');
my $key_id = python($AWS, @aws, 'create', 'alias/tde-smoke');
chomp($key_id //= '');
like($key_id, qr/^[0-9a-f-]{36}$/, 'moto: CreateKey + CreateAlias');
my $ct = python($AWS, @aws, 'encrypt', 'alias/tde-smoke', 'moto-secret');
chomp($ct //= '');
ok(length $ct > 20, 'moto: Encrypt');
is(python($AWS, @aws, 'decrypt', $ct), "moto-secret $key_id\n", 'moto: Decrypt');

$moto->pause;
is(python($AWS, @aws, 'encrypt', 'alias/tde-smoke', 'x'), undef, 'moto paused: a request times out');
$moto->resume;
is(python($AWS, @aws, 'decrypt', $ct), "moto-secret $key_id\n", 'moto resumed: Decrypt');

$moto->stop;
is(python($AWS, @aws, 'encrypt', 'alias/tde-smoke', 'x'), undef, 'moto stopped: a request fails');
$moto->start;
is(python($AWS, @aws, 'decrypt', $ct), "moto-secret $key_id\n",
	'moto restarted on the same port: the old ciphertext decrypts (key material survived)');
ok(defined python($AWS, @aws, 'encrypt', 'alias/tde-smoke', 'y'), 'moto restarted: the alias survived');

my $moto_tls = moto(tls => 1);
like($moto_tls->{endpoint}, qr{^https://}, 'moto with TLS');
my @aws_tls = ($moto_tls->{endpoint}, $moto_tls->{region}, $moto_tls->{access_key_id},
	$moto_tls->{secret_access_key}, $moto_tls->{ca_file});
my $tls_key = python($AWS, @aws_tls, 'create', 'alias/tde-tls');
ok(defined $tls_key, 'moto over TLS, verified against ca_file: CreateKey');
$moto_tls->stop;

# ---- OpenBao: transit ------------------------------------------------------

my $bao = openbao(keys => ['tde-smoke']);
like($bao->{addr}, qr{^https://127\.0\.0\.1:\d+$}, 'openbao address (TLS)');
for my $f (qw(root_token_file token_file unseal_key_file))
{
	is((stat $bao->{$f})[2] & 07777, 0600, "openbao $f is 0600");
}
my $lim = { token => $bao->{token} };
my $r = $bao->run_cli($lim, 'write', '-field=ciphertext', 'transit/encrypt/tde-smoke',
	'plaintext=' . MIME::Base64::encode_base64('bao-secret', ''));
ok($r->{ok}, 'openbao: the limited token encrypts with transit/tde-smoke') or diag($r->{err});
(my $bao_ct = $r->{out}) =~ s/\s+$//;
like($bao_ct, qr/^vault:v1:/, 'openbao: a transit ciphertext');
my $bao_decrypt = sub {
	my $r = $bao->run_cli({ %$lim, timeout => 3 }, 'write', '-field=plaintext', 'transit/decrypt/tde-smoke',
		"ciphertext=$bao_ct");
	return $r->{ok} ? MIME::Base64::decode_base64($r->{out}) : undef;
};
is($bao_decrypt->(), 'bao-secret', 'openbao: the limited token decrypts');
$bao->cli('write', '-f', 'transit/keys/other');
ok(!$bao->run_cli($lim, 'write', 'transit/encrypt/other', 'plaintext=eA==')->{ok},
	'openbao: the limited token cannot use a key outside tde-*');
ok(!$bao->run_cli($lim, 'write', '-f', 'transit/keys/tde-new')->{ok},
	'openbao: the limited token cannot create keys');
ok(!$bao->run_cli({ token => undef }, 'read', 'transit/keys/tde-smoke')->{ok},
	'openbao: no token, no access');

$bao->pause;
is($bao_decrypt->(), undef, 'openbao paused: a request times out');
$bao->resume;
is($bao_decrypt->(), 'bao-secret', 'openbao resumed: decrypts');
$bao->stop;
is($bao_decrypt->(), undef, 'openbao stopped: a request fails');
$bao->start;
is($bao_decrypt->(), 'bao-secret',
	'openbao restarted and unsealed on the same port: the limited token and the key survived');

# ---- SoftHSM2 -----------------------------------------------------------------

my $hsm = softhsm();
my $slots = sub {
	local $ENV{SOFTHSM2_CONF} = $hsm->{conf};
	my $t = kms_tools();
	return scalar `$t->{TDE_KMS_SOFTHSM2_UTIL} --show-slots 2>&1`;
};
like($slots->(), qr/Label:\s+tde\s/, 'softhsm2-util --show-slots shows token tde');
is((stat $hsm->{pin_file})[2] & 07777, 0600, 'softhsm pin file is 0600');
$hsm->generate_aes_key('tde-smoke');
my $P11 = <<'PY';
import sys, pkcs11
lib, token, pin, op, arg = sys.argv[1:]
t = pkcs11.lib(lib).get_token(token_label=token)
iv = bytes(16)
with t.open(user_pin=pin) as s:
    k = s.get_key(label="tde-smoke")
    if op == "encrypt":
        print(k.encrypt(arg.encode(), mechanism_param=iv).hex())
    else:
        print(k.decrypt(bytes.fromhex(arg), mechanism_param=iv).decode())
PY
my $p11 = sub {
	local $ENV{SOFTHSM2_CONF} = $hsm->{conf};
	my $out = python($P11, $hsm->{library}, $hsm->{token_label}, $hsm->{pin}, @_);
	chomp $out if defined $out;
	return $out;
};
my $hsm_ct = $p11->('encrypt', 'hsm-secret');
ok(defined $hsm_ct && length $hsm_ct == 32, 'softhsm: AES key on the token encrypts');
is($p11->('decrypt', $hsm_ct), 'hsm-secret', 'softhsm: and decrypts');
$hsm->stop;
unlike($slots->(), qr/Label:\s+tde\s/, 'softhsm stopped: the token is gone');
is($p11->('decrypt', $hsm_ct), undef, 'softhsm stopped: no key to decrypt with');
$hsm->start;
is($p11->('decrypt', $hsm_ct), 'hsm-secret', 'softhsm started: the token and its key are back');

# ---- PyKMIP ---------------------------------------------------------------------

my $kmip = pykmip();
my $KMIP = <<'PY';
import sys
from kmip.pie.client import ProxyKmipClient
from kmip.core import enums
host, port, cert, key, ca, op, uid, arg = sys.argv[1:]
params = {"cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
          "block_cipher_mode": enums.BlockCipherMode.CBC,
          "padding_method": enums.PaddingMethod.PKCS5}
c = ProxyKmipClient(hostname=host, port=int(port), cert=cert, key=key, ca=ca, config_file="/dev/null")
with c:
    if op == "encrypt":
        ct, _ = c.encrypt(arg.encode(), uid=uid, cryptographic_parameters=params, iv_counter_nonce=bytes(16))
        print(ct.hex())
    else:
        print(c.decrypt(bytes.fromhex(arg), uid=uid, cryptographic_parameters=params, iv_counter_nonce=bytes(16)).decode())
PY
my @kmip = @$kmip{qw(host port cert_file key_file ca_file)};
my $uid = $kmip->create_symmetric_key('tde-smoke');
like($uid, qr/^\S+$/, "pykmip: Create + Activate (uid $uid)");
my $kmip_ct = python($KMIP, @kmip, 'encrypt', $uid, 'kmip-secret');
chomp($kmip_ct //= '');
ok(length $kmip_ct == 32, 'pykmip: Encrypt');
is(python($KMIP, @kmip, 'decrypt', $uid, $kmip_ct), "kmip-secret\n", 'pykmip: Decrypt');
my $HANDSHAKE = <<'PY';
import sys, socket, ssl
host, port, ca, cert, key = sys.argv[1:]
ctx = ssl.create_default_context(cafile=ca)
if cert != "-":
    ctx.load_cert_chain(cert, key)
with socket.create_connection((host, int(port)), timeout=3) as sock:
    with ctx.wrap_socket(sock, server_hostname=host) as tls:
        print(tls.version())
PY
is(python($HANDSHAKE, $kmip->{host}, $kmip->{port}, $kmip->{ca_file}, $kmip->{cert_file}, $kmip->{key_file}),
	"TLSv1.2\n", 'pykmip: TLS 1.2 handshake with the client certificate');
is(python($HANDSHAKE, $kmip->{host}, $kmip->{port}, $kmip->{ca_file}, '-', '-'), undef,
	'pykmip: a handshake without a client certificate is refused');
$kmip->stop;
is(python($KMIP, @kmip, 'decrypt', $uid, $kmip_ct), undef, 'pykmip stopped: a request fails');
$kmip->start;
is(python($KMIP, @kmip, 'decrypt', $uid, $kmip_ct), "kmip-secret\n",
	'pykmip restarted on the same port: the key survived (sqlite)');
$kmip->pause;
is(python($HANDSHAKE, $kmip->{host}, $kmip->{port}, $kmip->{ca_file}, $kmip->{cert_file}, $kmip->{key_file}), undef,
	'pykmip paused: the handshake times out');
$kmip->resume;
is(python($KMIP, @kmip, 'decrypt', $uid, $kmip_ct), "kmip-secret\n", 'pykmip resumed: decrypts');

# ---- drongo: Google Cloud KMS REST -----------------------------------------

my $gcp = drongo();
my $http = HTTP::Tiny->new(timeout => 5);
my $base = "$gcp->{endpoint}/v1/projects/$gcp->{project}/locations/$gcp->{location}";
my $json = { headers => { 'Content-Type' => 'application/json' } };
ok($http->post("$base/keyRings?keyRingId=tde", { %$json, content => '{}' })->{success}, 'drongo: create key ring');
ok($http->post("$base/keyRings/tde/cryptoKeys?cryptoKeyId=smoke",
		{ %$json, content => '{"purpose": "ENCRYPT_DECRYPT"}' })->{success}, 'drongo: create crypto key');
my $enc = $http->post("$base/keyRings/tde/cryptoKeys/smoke:encrypt",
	{ %$json, content => JSON::PP::encode_json({ plaintext => MIME::Base64::encode_base64('gcp-secret', '') }) });
ok($enc->{success}, 'drongo: encrypt') or diag($enc->{content});
my $gcp_ct = JSON::PP::decode_json($enc->{content})->{ciphertext};
my $dec = $http->post("$base/keyRings/tde/cryptoKeys/smoke:decrypt",
	{ %$json, content => JSON::PP::encode_json({ ciphertext => $gcp_ct }) });
is(MIME::Base64::decode_base64(JSON::PP::decode_json($dec->{content})->{plaintext}), 'gcp-secret', 'drongo: decrypt');
is($gcp->{persistent}, 0, 'drongo keeps its state only in memory');

done_testing();
