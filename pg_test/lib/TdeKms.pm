# TdeKms.pm -- real key servers on loopback for tde's provider TAP tests.
#
# Each function below starts one server (or, for SoftHSM2, one private
# token) under a fresh temporary directory of the test, on a free
# 127.0.0.1 port (PostgreSQL::Test::Cluster::get_free_port, so it does not
# collide with nodes or other tests), waits until it answers, registers it
# for clean-up at END, and returns an object: a hash of what a client needs,
# with methods
#
#   $s->stop / $s->start     stop the server; start it again on the SAME
#                            port.  $s->{persistent} says whether its state
#                            (keys, tokens, objects) survives: 1 for moto,
#                            openbao, pykmip, softhsm and the Azure Key
#                            Vault stand-in, 0 for drongo.
#   $s->pause / $s->resume   SIGSTOP / SIGCONT the server's process group:
#                            connections are accepted by the kernel and then
#                            hang (a timeout test).  State survives.
#   $s->is_running
#   $s->{dir}, $s->{log}     its directory and log file (kept when a test fails)
#
# At END every server still running is stopped.  A test process killed by a
# signal runs no END: its servers then get SIGTERM from the kernel (Linux
# parent-death signal), which a paused server only sees once continued.
#
# Servers (keys of the returned hash in brackets):
#
#   moto(tls => 0|1, services => ['kms'])    AWS KMS, moto_server
#     [endpoint host port region access_key_id secret_access_key
#      secret_access_key_file account_id ca_file(tls only) state_file]
#     moto accepts any credentials; the secret is in a 0600 file.  stop/start:
#     moto keeps state in memory (its request recorder replays requests,
#     which would make new key material), so the server runs under a small
#     launcher that pickles the backends of `services` at SIGTERM and loads
#     them at start: keys, aliases and old ciphertexts survive.
#
#   openbao(tls => 1|0, keys => [...])       OpenBao (Vault API), transit
#     [addr host port ca_file root_token root_token_file token token_file
#      unseal_key_file transit_mount policy]
#     Not dev mode: raft storage under the test dir, initialised with one
#     unseal key (kept in the test dir) and unsealed by start().  Transit is
#     enabled at transit/; `token` is a limited token whose policy
#     (tde-transit) allows only update on transit/encrypt/tde-* and
#     transit/decrypt/tde-* (no key creation: make keys with `keys => [...]`
#     or $bao->cli('write', '-f', 'transit/keys/tde-x')).  TLS (default) with
#     a test CA: clients need ca_file.  State and both tokens survive
#     stop/start.  $bao->cli(@args) runs the bao CLI with the root token and
#     returns its stdout (dies on failure); $bao->run_cli({token => ...,
#     stdin => ...}, @args) returns { ok, out, err }.
#
#   softhsm()                                SoftHSM2 (PKCS#11), no process
#     [library token_label pin pin_file so_pin_file conf token_dir slot env]
#     A private SOFTHSM2_CONF and token directory; token label `tde`.  The
#     library reads SOFTHSM2_CONF from the environment of the process that
#     loads it: set $ENV{SOFTHSM2_CONF} = $hsm->{conf} (or call
#     $hsm->export_env) BEFORE $node->start; PostgreSQL::Test::Cluster's
#     start inherits %ENV.  stop() renames the token's directory away,
#     start() renames it back (pause/resume do the same).  Observed with
#     SoftHSM 2.6.1 in a process that has the library loaded and a session
#     open: while away, operations on an existing key handle fail with
#     CKR_OBJECT_HANDLE_INVALID, searches find nothing and C_GetSlotList
#     fails (CKR_GENERAL_ERROR); after start() that process does NOT see the
#     token again until it calls C_Finalize and C_Initialize; a new process
#     sees the token and its keys.  $hsm->generate_aes_key($label, $bits)
#     makes a token AES key (CKA_TOKEN, encrypt/decrypt/wrap/unwrap).
#
#   pykmip()                                 PyKMIP server, mutual TLS 1.2
#     [host port ca_file cert_file key_file server_cert_file db_file ca]
#     cert_file/key_file are the client's (CN tde-client, clientAuth); a
#     connection without a client certificate is refused in the handshake.
#     Objects are in an sqlite file: they survive stop/start.  Keys are EC
#     P-256 (PyKMIP's TLS 1.2 suite offers GCM only with ECDSA).  Created
#     objects belong to the client certificate's CN.
#     $kmip->create_symmetric_key($name, $bits) creates and activates an AES
#     key and returns its unique identifier.
#
#   drongo()                                 Google Cloud KMS REST stand-in
#     [endpoint host port project location]
#     drongo's standalone server (plain HTTP, no auth checks).  Its "ciphertext"
#     is a reversible encoding that embeds the plaintext (base64 of JSON), not
#     encryption.  State is in memory: stop/start loses it (persistent = 0);
#     pause/resume keeps it.
#
#   azure_keyvault()                         Azure Key Vault stand-in, HTTPS
#     [vault_url authority_host host port tenant_id client_id client_secret
#      client_secret_file reader_client_id reader_client_secret_file ca_file
#      state_file ca]
#     A STAND-IN, NOT AN EMULATOR: our own small Python server (the
#     `cryptography` package of the venv), which implements only the
#     documented calls tde makes, from Microsoft's REST reference: Entra ID's
#     client-credentials token request (POST /{tenant}/oauth2/v2.0/token,
#     AADSTS-style refusals: 7000215 bad secret, 700016 unknown client, 90002
#     unknown tenant) and Key Vault's get-key, create-key (RSA), wrap-key and
#     unwrap-key (real RSA-OAEP-256), api-version 7.4 to 2025-07-01, with
#     Key Vault's 401 challenge (WWW-Authenticate: Bearer authorization=...,
#     resource="https://vault.azure.net") and its error shape
#     ({"error": {"code": "KeyNotFound", ...}}).  One port serves both, so
#     vault_url and authority_host are the same https://127.0.0.1:PORT; its
#     certificate is from a test CA (ca_file; SAN 127.0.0.1 and localhost).
#     client_id may get, create, wrapKey and unwrapKey; reader_client_id may
#     only get (403 Forbidden on the rest).  Tokens are HMAC-signed, keys are
#     PEM in state_file: both survive stop/start (persistent = 1).
#     $az->rest($method, $path, $body) calls the vault as client_id and
#     returns ($status, $decoded_json); $az->new_key_version($name) makes a
#     new version of a key (a rotation in Key Vault) and returns its id.
#
#   cert_authority($dir, cn => ...)          a test CA (EC P-256, openssl CLI)
#     [dir ca_file ca_key_file]; $ca->leaf($name, usage => 'server'|'client'|
#     'both', dns => [...], ip => [...], cn => ..., key => 'ec'|'rsa')
#     returns { name cert_file key_file bundle_file(cert+key) }; server
#     leaves default to dns localhost, ip 127.0.0.1.
#
#   kms_python($code, @args)  runs $code with the venv's python (boto3,
#     pykmip, pkcs11 importable); returns ($exit_code, $stdout, $stderr).
#   kms_tools()               the installed paths (TDE_KMS_VENV, TDE_KMS_BAO, ...)
#   kms_available()           (1) or (0, reason), for a skip_all
#
# Where the servers are: $ENV{TDE_KMS_VENV} (scripts/test passes it; the
# venv holds tde-kms.env with every path), else the output of
# "$ENV{TDE_SOURCE_DIR}/scripts/kms-servers env".  scripts/kms-servers install
# (run by scripts/setup) installs them.
package TdeKms;

use strict;
use warnings FATAL => 'all';
use Carp;
use Cwd qw(abs_path);
use Exporter 'import';
use Fcntl qw(O_WRONLY O_CREAT O_TRUNC);
use File::Basename qw(dirname basename);
use File::Path qw(make_path);
use IO::Socket::INET;
use IPC::Run;
use JSON::PP;
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;

our @EXPORT_OK = qw(moto openbao softhsm pykmip drongo azure_keyvault
  cert_authority kms_python kms_tools kms_available);
our %EXPORT_TAGS = (all => \@EXPORT_OK);

my %tools;
my @servers;    # every server started, stopped at END

# ---- Installed tools --------------------------------------------------------

sub kms_tools
{
	return \%tools if %tools;
	my $text;
	if ($ENV{TDE_KMS_VENV})
	{
		$text = slurp_file("$ENV{TDE_KMS_VENV}/tde-kms.env");
	}
	elsif ($ENV{TDE_SOURCE_DIR})
	{
		my $script = "$ENV{TDE_SOURCE_DIR}/scripts/kms-servers";
		my ($out, $err) = ('', '');
		IPC::Run::run([ 'bash', $script, 'env' ], '>', \$out, '2>', \$err)
		  or croak "$script env failed: $err";
		$text = $out;
	}
	else
	{
		croak 'TdeKms: set TDE_KMS_VENV (scripts/test does) or TDE_SOURCE_DIR';
	}
	for my $line (split /\n/, $text)
	{
		$tools{$1} = $2 if $line =~ /^(TDE_KMS_\w+)='([^']*)'$/;
	}
	croak "TdeKms: no TDE_KMS_VENV in the key servers' env" unless $tools{TDE_KMS_VENV};
	return \%tools;
}

sub kms_available
{
	my $ok = eval { kms_tools(); 1 };
	return $ok ? (1) : (0, $@);
}

# ---- Small helpers ----------------------------------------------------------

sub _random_hex
{
	my ($bytes) = @_;
	open(my $fh, '<:raw', '/dev/urandom') or die "/dev/urandom: $!";
	read($fh, my $buf, $bytes) == $bytes or die "short read from /dev/urandom";
	close $fh;
	return unpack('H*', $buf);
}

# A file only its owner can read.
sub _write_private
{
	my ($path, $content) = @_;
	sysopen(my $fh, $path, O_WRONLY | O_CREAT | O_TRUNC, 0600) or die "$path: $!";
	chmod 0600, $path;
	print $fh $content;
	close $fh or die "$path: $!";
	return $path;
}

sub _write_file
{
	my ($path, $content) = @_;
	open(my $fh, '>', $path) or die "$path: $!";
	print $fh $content;
	close $fh or die "$path: $!";
	return $path;
}

sub _dir
{
	my ($kind) = @_;
	my $d = abs_path(PostgreSQL::Test::Utils::tempdir("kms_$kind"));
	chmod 0700, $d;
	return $d;
}

sub _run
{
	my ($cmd, %o) = @_;
	my ($out, $err) = ('', '');
	my $in = $o{stdin} // '';
	local %ENV = (%ENV, %{ $o{env} // {} });
	my $ok = IPC::Run::run($cmd, '<', \$in, '>', \$out, '2>', \$err);
	croak "@$cmd failed: $err$out" if !$ok && !$o{fail_ok};
	return wantarray ? ($ok ? 0 : ($? >> 8 || 1), $out, $err) : $out;
}

sub kms_python
{
	my ($code, @args) = @_;
	my $t = kms_tools();
	my ($out, $err) = ('', '');
	local $ENV{PYTHONWARNINGS} = 'ignore';
	local $ENV{AWS_EC2_METADATA_DISABLED} = 'true';
	local $ENV{AWS_CONFIG_FILE} = '/dev/null';
	local $ENV{AWS_SHARED_CREDENTIALS_FILE} = '/dev/null';
	IPC::Run::run([ $t->{TDE_KMS_PYTHON}, '-c', $code, @args ], '<', \'', '>', \$out, '2>', \$err);
	return ($? >> 8, $out, $err);
}

sub _tail
{
	my ($file, $n) = @_;
	return '' unless -e $file;
	my @lines = split /\n/, slurp_file($file);
	splice(@lines, 0, @lines - $n) if @lines > $n;
	return join("\n", @lines);
}

# ---- Test certificate authority --------------------------------------------

sub cert_authority
{
	my ($dir, %o) = @_;
	make_path($dir);
	$dir = abs_path($dir);
	my $ca = bless { dir => $dir, ca_file => "$dir/ca.crt", ca_key_file => "$dir/ca.key" }, 'TdeKms::CA';
	_run([ 'openssl', 'req', '-x509', _newkey($o{key}), '-nodes',
		'-keyout', $ca->{ca_key_file}, '-out', $ca->{ca_file}, '-days', $o{days} // 30,
		'-subj', '/CN=' . ($o{cn} // 'tde test CA'),
		'-addext', 'basicConstraints=critical,CA:TRUE',
		'-addext', 'keyUsage=critical,keyCertSign,cRLSign' ]);
	chmod 0600, $ca->{ca_key_file};
	return $ca;
}

sub _newkey
{
	my ($key) = @_;
	return ('-newkey', 'rsa:2048') if ($key // 'ec') eq 'rsa';
	return ('-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256');
}

package TdeKms::CA;

use strict;
use warnings FATAL => 'all';
use Carp;

sub leaf
{
	my ($ca, $name, %o) = @_;
	croak "bad certificate name '$name'" unless $name =~ /^[\w.-]+$/;
	my $usage = $o{usage} // 'server';
	my $dir = $ca->{dir};
	my ($key, $csr, $crt, $ext) = map { "$dir/$name.$_" } qw(key csr crt ext);
	my %eku = (server => 'serverAuth', client => 'clientAuth', both => 'serverAuth,clientAuth');
	croak "usage must be server, client or both" unless $eku{$usage};
	my @dns = @{ $o{dns} // ($usage eq 'client' ? [] : ['localhost']) };
	my @ip = @{ $o{ip} // ($usage eq 'client' ? [] : ['127.0.0.1']) };
	my @san = ((map { "DNS:$_" } @dns), (map { "IP:$_" } @ip));
	TdeKms::_write_file($ext, join('', "basicConstraints=CA:FALSE\n",
		"keyUsage=critical,digitalSignature,keyEncipherment\n",
		"extendedKeyUsage=$eku{$usage}\n",
		(@san ? 'subjectAltName=' . join(',', @san) . "\n" : '')));
	TdeKms::_run([ 'openssl', 'req', TdeKms::_newkey($o{key}), '-nodes', '-keyout', $key,
		'-out', $csr, '-subj', '/CN=' . ($o{cn} // $name) ]);
	chmod 0600, $key;
	TdeKms::_run([ 'openssl', 'x509', '-req', '-in', $csr, '-CA', $ca->{ca_file},
		'-CAkey', $ca->{ca_key_file}, '-set_serial', '0x' . TdeKms::_random_hex(16),
		'-days', $o{days} // 30, '-out', $crt, '-extfile', $ext ]);
	my $bundle = "$dir/$name.pem";
	TdeKms::_write_private($bundle, PostgreSQL::Test::Utils::slurp_file($crt)
		  . PostgreSQL::Test::Utils::slurp_file($key));
	return { name => $name, cert_file => $crt, key_file => $key, bundle_file => $bundle };
}

# ---- A server process -------------------------------------------------------

package TdeKms::Server;

use strict;
use warnings FATAL => 'all';
use Carp;
use Config;
use IO::Socket::INET;
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);

sub new
{
	my ($class, %f) = @_;
	my $s = bless { persistent => 1, env => {}, %f }, $class;
	$s->{log} //= "$s->{dir}/$s->{kind}.log";
	push @servers, $s;
	return $s;
}

sub is_running { return defined $_[0]->{pid}; }

sub start
{
	my ($s) = @_;
	croak "$s->{kind} is already running" if $s->{pid};
	open(my $log, '>>', $s->{log}) or die "$s->{log}: $!";
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		# The child: its own process group (so stop/pause reach its children
		# too), output to the server's log, then the server.  Never returns
		# to the test's code (no END blocks run here).
		eval {
			POSIX::setsid();
			# Linux: the server gets SIGTERM if the test process dies without
			# running END (killed by a signal).  prctl(PR_SET_PDEATHSIG).
			my $prctl = { 'x86_64-linux' => 157, 'aarch64-linux' => 167 }->{ $Config::Config{archname} =~ s/-gnu.*|-thread.*//r };
			syscall($prctl, 1, 15) if $prctl;
			open(my $null, '<', '/dev/null') or die;
			POSIX::dup2(fileno($null), 0);
			POSIX::dup2(fileno($log), 1);
			POSIX::dup2(fileno($log), 2);
			$ENV{$_} = $s->{env}{$_} for keys %{ $s->{env} };
			chdir $s->{dir};
			no warnings;
			exec { $s->{cmd}[0] } @{ $s->{cmd} };
		};
		POSIX::_exit(127);
	}
	close $log;
	$s->{pid} = $pid;
	$s->{paused} = 0;
	$s->_wait_port($_) for @{ $s->{ports} };
	$s->{after_start}->($s) if $s->{after_start};
	return $s;
}

sub _fail
{
	my ($s, $why) = @_;
	my $tail = TdeKms::_tail($s->{log}, 40);
	$s->stop if $s->{pid};
	croak "$s->{kind}: $why; last lines of $s->{log}:\n$tail";
}

sub _wait_port
{
	my ($s, $port) = @_;
	my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
	while (time < $deadline)
	{
		if (waitpid($s->{pid}, WNOHANG) == $s->{pid})
		{
			my $st = $?;
			$s->{pid} = undef;
			$s->_fail("exited (status $st) before it listened on port $port");
		}
		my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
			Proto => 'tcp', Timeout => 1);
		if ($sock) { close $sock; return; }
		sleep 0.1;
	}
	$s->_fail("did not listen on port $port");
}

# Waits for the group's leader; then makes sure no member is left.
sub _wait_gone
{
	my ($s, $secs) = @_;
	my $deadline = time + $secs;
	while (time < $deadline)
	{
		return 1 if waitpid($s->{pid}, WNOHANG) == $s->{pid};
		sleep 0.05;
	}
	return 0;
}

sub stop
{
	my ($s) = @_;
	return $s unless $s->{pid};
	my $pgid = $s->{pid};
	kill 'CONT', -$pgid if $s->{paused};
	# The leader first (its clean shutdown stops its helpers), the group if
	# it takes too long.
	kill $s->{stop_signal} // 'TERM', $pgid;
	if (!$s->_wait_gone(30))
	{
		kill 'KILL', -$pgid;
		$s->_wait_gone(10);
	}
	# Children that outlived the leader (PyKMIP's multiprocessing manager).
	my $deadline = time + 10;
	while (kill(0, -$pgid) && time < $deadline)
	{
		kill 'KILL', -$pgid if time > $deadline - 8;
		sleep 0.05;
	}
	$s->{pid} = undef;
	$s->{paused} = 0;
	return $s;
}

sub pause
{
	my ($s) = @_;
	croak "$s->{kind} is not running" unless $s->{pid};
	kill 'STOP', -$s->{pid};
	$s->{paused} = 1;
	return $s;
}

sub resume
{
	my ($s) = @_;
	croak "$s->{kind} is not running" unless $s->{pid};
	kill 'CONT', -$s->{pid};
	$s->{paused} = 0;
	return $s;
}

package TdeKms;

END
{
	local $?;
	for my $s (reverse @servers)
	{
		eval { $s->stop; 1 } or warn "stopping $s->{kind}: $@";
	}
}

# ---- moto (AWS KMS) ---------------------------------------------------------

# moto_server under a launcher whose state outlives the process: the
# backends of SERVICES are loaded from STATE before the server starts and
# saved there when it stops (SIGTERM/SIGINT make moto's main exit).
my $MOTO_LAUNCHER = <<'PY';
import io, os, pickle, sys
state, services, argv = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
from cryptography.hazmat.primitives import serialization
from moto.backends import get_backend
import moto.server

def _load_private_key(der):
    return serialization.load_der_private_key(der, None)

class _Pickler(pickle.Pickler):
    # cryptography's key objects (moto makes one per KMS key) do not pickle;
    # carry them as PKCS#8 DER.
    def reducer_override(self, obj):
        if hasattr(obj, "private_bytes") and hasattr(obj, "public_key"):
            der = obj.private_bytes(serialization.Encoding.DER,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            return _load_private_key, (der,)
        return NotImplemented

def load():
    if not os.path.exists(state):
        return
    with open(state, "rb") as f:
        saved = pickle.load(f)
    for service, accounts in saved.items():
        backends = get_backend(service)
        for account, regions in accounts.items():
            for region, backend in regions.items():
                backends[account][region] = backend
    print("tde moto launcher: loaded " + state, flush=True)

def save():
    saved = {}
    for service in services:
        backends = get_backend(service)
        saved[service] = {a: dict(backends[a].items()) for a in list(backends.keys())}
    buf = io.BytesIO()
    _Pickler(buf).dump(saved)
    tmp = state + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state)
    print("tde moto launcher: saved " + state, flush=True)

load()
try:
    moto.server.main(argv)
finally:
    save()
PY

sub moto
{
	my (%o) = @_;
	my $t = kms_tools();
	my $dir = _dir('moto');
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	my @services = @{ $o{services} // ['kms'] };
	my $launcher = _write_file("$dir/moto_launcher.py", $MOTO_LAUNCHER);
	my (@tls, $ca);
	if ($o{tls})
	{
		$ca = cert_authority("$dir/ca", cn => 'tde test CA (moto)');
		my $leaf = $ca->leaf('moto', usage => 'server');
		@tls = ('-c', $leaf->{cert_file}, '-k', $leaf->{key_file});
	}
	my $secret = _random_hex(20);
	push @services, 'iam' if $o{auth} && !grep { $_ eq 'iam' } @services;
	my $s = TdeKms::Server->new(
		kind => 'moto',
		dir => $dir,
		cmd => [ $t->{TDE_KMS_PYTHON}, $launcher, "$dir/state.pickle", join(',', @services),
			'-H', '127.0.0.1', '-p', $port, @tls ],
		env => { PYTHONWARNINGS => 'ignore', PYTHONUNBUFFERED => '1',
			# auth: moto checks signatures and IAM policies after the first
			# requests, which create the users below (again after a restart:
			# then they exist already, and the script only counts down).
			($o{auth} ? (INITIAL_NO_AUTH_ACTION_COUNT => '6') : ()) },
		($o{auth} ? (after_start => \&_moto_users) : ()),
		ports => [$port],
		host => '127.0.0.1',
		port => $port,
		endpoint => ($o{tls} ? 'https' : 'http') . "://127.0.0.1:$port",
		region => 'us-east-1',
		account_id => '123456789012',
		access_key_id => 'AKIATDETEST' . uc(_random_hex(4)),
		secret_access_key => $secret,
		secret_access_key_file => _write_private("$dir/secret_access_key", "$secret\n"),
		state_file => "$dir/state.pickle",
		($ca ? (ca_file => $ca->{ca_file}, ca => $ca) : ()));
	return $s->start;
}

# moto(auth => 1): two IAM users made with moto's unauthenticated first
# requests, `tde` (kms:*) and `tde-denied` (kms:ListKeys only); their keys
# replace access_key_id / secret_access_key(_file), and the second's are
# denied_access_key_id / denied_secret_access_key_file.
my $MOTO_USERS = <<'PY';
import boto3, json, sys
ep = sys.argv[1]
iam = boto3.client("iam", endpoint_url=ep, region_name="us-east-1",
                   aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap", verify=False)
def user(name, actions):
    try:
        iam.create_user(UserName=name)
    except iam.exceptions.EntityAlreadyExistsException:
        print("exists"); return
    iam.put_user_policy(UserName=name, PolicyName="kms", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
    k = iam.create_access_key(UserName=name)["AccessKey"]
    print(k["AccessKeyId"], k["SecretAccessKey"])
user("tde", "kms:*")
user("tde-denied", "kms:ListKeys")
PY

sub _moto_users
{
	my ($s) = @_;
	my ($rc, $out, $err) = kms_python($MOTO_USERS, $s->{endpoint});
	die "moto users: $err" if $rc;
	return if $out =~ /exists/;
	my @l = split /\n/, $out;
	my ($id, $secret) = split / /, $l[0];
	my ($did, $dsecret) = split / /, $l[1];
	$s->{access_key_id} = $id;
	$s->{secret_access_key} = $secret;
	_write_private($s->{secret_access_key_file}, "$secret\n");
	$s->{denied_access_key_id} = $did;
	$s->{denied_secret_access_key_file} = _write_private("$s->{dir}/denied_secret_access_key", "$dsecret\n");
	return;
}

# ---- OpenBao (transit) ------------------------------------------------------

sub openbao
{
	my (%o) = @_;
	my $t = kms_tools();
	my $dir = _dir('openbao');
	my $tls = $o{tls} // 1;
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	my $cport = PostgreSQL::Test::Cluster::get_free_port();
	my $scheme = $tls ? 'https' : 'http';
	my ($ca, $leaf);
	my $listener_tls = "  tls_disable = true\n";
	if ($tls)
	{
		$ca = cert_authority("$dir/ca", cn => 'tde test CA (openbao)');
		$leaf = $ca->leaf('openbao', usage => 'server');
		$listener_tls = "  tls_cert_file = \"$leaf->{cert_file}\"\n  tls_key_file = \"$leaf->{key_file}\"\n";
	}
	make_path("$dir/raft");
	_write_file("$dir/bao.hcl", <<HCL);
storage "raft" {
  path = "$dir/raft"
  node_id = "tde-test"
}
listener "tcp" {
  address = "127.0.0.1:$port"
  cluster_address = "127.0.0.1:$cport"
$listener_tls}
api_addr = "$scheme://127.0.0.1:$port"
cluster_addr = "https://127.0.0.1:$cport"
ui = false
HCL
	my $s = TdeKms::OpenBao->new(
		kind => 'openbao',
		dir => $dir,
		cmd => [ $t->{TDE_KMS_BAO}, 'server', "-config=$dir/bao.hcl" ],
		ports => [$port],
		host => '127.0.0.1',
		port => $port,
		addr => "$scheme://127.0.0.1:$port",
		transit_mount => 'transit',
		policy => 'tde-transit',
		root_token_file => "$dir/root_token",
		token_file => "$dir/token",
		unseal_key_file => "$dir/unseal_key",
		initial_keys => $o{keys} // [],
		($ca ? (ca_file => $ca->{ca_file}, ca => $ca) : ()),
		after_start => \&TdeKms::OpenBao::_after_start);
	return $s->start;
}

package TdeKms::OpenBao;

use strict;
use warnings FATAL => 'all';
use Carp;
use JSON::PP;
use Time::HiRes qw(time sleep);
our @ISA = ('TdeKms::Server');

sub run_cli
{
	my ($s, $o, @args) = @_;
	my $t = TdeKms::kms_tools();
	my %env = (BAO_ADDR => $s->{addr}, BAO_CLIENT_TIMEOUT => $o->{timeout} // '30');
	$env{BAO_CACERT} = $s->{ca_file} if $s->{ca_file};
	my $token = exists $o->{token} ? $o->{token} : $s->{root_token};
	$env{BAO_TOKEN} = $token if defined $token;
	local %ENV = %ENV;
	delete $ENV{$_} for grep { /^(BAO|VAULT)_/ } keys %ENV;
	my ($rc, $out, $err) = TdeKms::_run([ $t->{TDE_KMS_BAO}, @args ],
		env => \%env, stdin => $o->{stdin}, fail_ok => 1);
	return { ok => $rc == 0, out => $out, err => $err };
}

sub cli
{
	my ($s, @args) = @_;
	my $r = $s->run_cli({}, @args);
	croak "bao @args: $r->{err}$r->{out}" unless $r->{ok};
	return $r->{out};
}

sub _after_start
{
	my ($s) = @_;
	my $first = !-e "$s->{dir}/init.json";
	if ($first)
	{
		my $r = $s->run_cli({ token => undef }, 'operator', 'init', '-key-shares=1',
			'-key-threshold=1', '-format=json');
		$s->_fail("operator init: $r->{err}") unless $r->{ok};
		TdeKms::_write_private("$s->{dir}/init.json", $r->{out});
		my $init = decode_json($r->{out});
		TdeKms::_write_private($s->{unseal_key_file}, $init->{unseal_keys_b64}[0] . "\n");
		TdeKms::_write_private($s->{root_token_file}, $init->{root_token} . "\n");
		$s->{root_token} = $init->{root_token};
	}
	my ($key) = split /\n/, PostgreSQL::Test::Utils::slurp_file($s->{unseal_key_file});
	my $r = $s->run_cli({ token => undef }, 'operator', 'unseal', $key);
	$s->_fail("operator unseal: $r->{err}") unless $r->{ok};
	# Raft elects the (only) node; until then requests fail.
	my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
	while (!($r = $s->run_cli({ timeout => 5 }, 'token', 'lookup'))->{ok})
	{
		$s->_fail("not active after unseal: $r->{err}") if time > $deadline;
		sleep 0.2;
	}
	return unless $first;
	$s->cli('secrets', 'enable', 'transit');
	my $r2 = $s->run_cli({ stdin => <<'POLICY' }, 'policy', 'write', $s->{policy}, '-');
path "transit/encrypt/tde-*" { capabilities = ["update"] }
path "transit/decrypt/tde-*" { capabilities = ["update"] }
POLICY
	croak "policy write: $r2->{err}" unless $r2->{ok};
	my $token = $s->cli('token', 'create', "-policy=$s->{policy}", '-field=token');
	chomp $token;
	TdeKms::_write_private($s->{token_file}, "$token\n");
	$s->{token} = $token;
	$s->cli('write', '-f', "transit/keys/$_") for @{ $s->{initial_keys} };
	return;
}

package TdeKms;

# ---- SoftHSM2 (PKCS#11) -----------------------------------------------------

sub softhsm
{
	my (%o) = @_;
	my $t = kms_tools();
	my $dir = _dir('softhsm');
	make_path("$dir/tokens", "$dir/away");
	chmod 0700, "$dir/tokens", "$dir/away";
	my $conf = _write_file("$dir/softhsm2.conf", <<CONF);
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = INFO
slots.removable = false
CONF
	my $label = $o{label} // 'tde';
	my $pin = _random_hex(8);
	my $so_pin = _random_hex(8);
	my $out = _run([ $t->{TDE_KMS_SOFTHSM2_UTIL}, '--init-token', '--free', '--label', $label,
		'--so-pin', $so_pin, '--pin', $pin ], env => { SOFTHSM2_CONF => $conf });
	my ($slot) = $out =~ /reassigned to slot (\d+)/;
	opendir(my $dh, "$dir/tokens") or die;
	my ($uuid) = grep { !/^\./ } readdir $dh;
	closedir $dh;
	return bless {
		kind => 'softhsm',
		dir => $dir,
		log => undef,
		persistent => 1,
		library => $t->{TDE_KMS_SOFTHSM2_LIB},
		token_label => $label,
		pin => $pin,
		pin_file => _write_private("$dir/pin", "$pin\n"),
		so_pin_file => _write_private("$dir/so_pin", "$so_pin\n"),
		conf => $conf,
		token_dir => "$dir/tokens/$uuid",
		slot => $slot,
		env => { SOFTHSM2_CONF => $conf },
		away => 0,
	}, 'TdeKms::SoftHSM';
}

package TdeKms::SoftHSM;

use strict;
use warnings FATAL => 'all';
use Carp;
use File::Basename qw(basename);

sub export_env { my ($h) = @_; $ENV{SOFTHSM2_CONF} = $h->{conf}; return $h; }
sub is_running { return !$_[0]->{away}; }

sub _away_path { my ($h) = @_; return "$h->{dir}/away/" . basename($h->{token_dir}); }

sub stop
{
	my ($h) = @_;
	return $h if $h->{away};
	rename($h->{token_dir}, $h->_away_path) or croak "rename $h->{token_dir}: $!";
	$h->{away} = 1;
	return $h;
}

sub start
{
	my ($h) = @_;
	return $h unless $h->{away};
	rename($h->_away_path, $h->{token_dir}) or croak "rename back to $h->{token_dir}: $!";
	$h->{away} = 0;
	return $h;
}

sub pause { return $_[0]->stop; }
sub resume { return $_[0]->start; }

sub generate_aes_key
{
	my ($h, $label, $bits) = @_;
	local $ENV{SOFTHSM2_CONF} = $h->{conf};
	my ($rc, $out, $err) = TdeKms::kms_python(<<'PY', $h->{library}, $h->{token_label}, $h->{pin}, $label, $bits // 256);
import sys, pkcs11
from pkcs11 import KeyType, Attribute
lib, token, pin, label, bits = sys.argv[1:]
t = pkcs11.lib(lib).get_token(token_label=token)
with t.open(user_pin=pin, rw=True) as s:
    s.generate_key(KeyType.AES, int(bits), label=label, store=True,
                   template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
PY
	croak "generate_aes_key $label: $err" if $rc;
	return $label;
}

package TdeKms;

# ---- PyKMIP -----------------------------------------------------------------

sub pykmip
{
	my (%o) = @_;
	my $t = kms_tools();
	my $dir = _dir('pykmip');
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	my $ca = cert_authority("$dir/ca", cn => 'tde test CA (pykmip)');
	my $server = $ca->leaf('pykmip-server', usage => 'server');
	my $client = $ca->leaf('tde-client', usage => 'client');
	make_path("$dir/policies");
	_write_file("$dir/server.conf", <<CONF);
[server]
hostname=127.0.0.1
port=$port
certificate_path=$server->{cert_file}
key_path=$server->{key_file}
ca_path=$ca->{ca_file}
auth_suite=TLS1.2
policy_path=$dir/policies
enable_tls_client_auth=True
logging_level=INFO
database_path=$dir/pykmip.db
CONF
	my $s = TdeKms::PyKMIP->new(
		kind => 'pykmip',
		dir => $dir,
		cmd => [ $t->{TDE_KMS_PYKMIP_SERVER}, '-f', "$dir/server.conf", '-l', "$dir/pykmip-server.log" ],
		env => { PYTHONWARNINGS => 'ignore' },
		# Its SIGTERM handler waits for accept() to time out (10 s); SIGINT
		# interrupts it.
		stop_signal => 'INT',
		ports => [$port],
		host => '127.0.0.1',
		port => $port,
		ca_file => $ca->{ca_file},
		cert_file => $client->{cert_file},
		key_file => $client->{key_file},
		server_cert_file => $server->{cert_file},
		db_file => "$dir/pykmip.db",
		ca => $ca);
	return $s->start;
}

package TdeKms::PyKMIP;

use strict;
use warnings FATAL => 'all';
use Carp;
our @ISA = ('TdeKms::Server');

sub create_symmetric_key
{
	my ($s, $name, $bits) = @_;
	my ($rc, $out, $err) = TdeKms::kms_python(<<'PY', @$s{qw(host port cert_file key_file ca_file)}, $name, $bits // 256);
import sys
from kmip.pie.client import ProxyKmipClient
from kmip.core import enums
host, port, cert, key, ca, name, bits = sys.argv[1:]
c = ProxyKmipClient(hostname=host, port=int(port), cert=cert, key=key, ca=ca, config_file="/dev/null")
with c:
    uid = c.create(enums.CryptographicAlgorithm.AES, int(bits), name=name)
    c.activate(uid)
    print(uid)
PY
	croak "create_symmetric_key $name: $err" if $rc;
	chomp $out;
	return $out;
}

package TdeKms;

# ---- drongo (Google Cloud KMS REST) -----------------------------------------

sub drongo
{
	my (%o) = @_;
	my $t = kms_tools();
	my $dir = _dir('drongo');
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	my $s = TdeKms::Server->new(
		kind => 'drongo',
		dir => $dir,
		cmd => [ $t->{TDE_KMS_DRONGO}, 'server', '--host', '127.0.0.1', '--port', $port ],
		env => { PYTHONWARNINGS => 'ignore', PYTHONUNBUFFERED => '1' },
		ports => [$port],
		persistent => 0,
		host => '127.0.0.1',
		port => $port,
		endpoint => "http://127.0.0.1:$port",
		project => 'tde-test',
		location => 'global');
	return $s->start;
}

# ---- Azure Key Vault stand-in (not an emulator) ----------------------------

my $AZURE_STANDIN = <<'PY';
# tde's Azure Key Vault stand-in: a STAND-IN, NOT AN EMULATOR.  It
# implements only the documented calls tde makes, as Microsoft's REST
# reference describes them (Entra ID's client-credentials token request;
# Key Vault's get-key, create-key, wrap-key and unwrap-key), over HTTPS on
# one port: enough to test tde's client, not a model of Azure.
import base64, hashlib, hmac, json, os, socket, ssl, sys, threading, time, uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

CONFIG = json.load(open(sys.argv[1]))
PORT = CONFIG["port"]
TENANT = CONFIG["tenant"]
VAULT = f"https://127.0.0.1:{PORT}"
RESOURCE = "https://vault.azure.net"
SCOPE = RESOURCE + "/.default"
API_VERSIONS = {"7.4", "7.5", "7.6", "2025-07-01"}
SIGNING_KEY = bytes.fromhex(CONFIG["signing_key"])
STATE_FILE = CONFIG["state_file"]
LOCK = threading.Lock()
ALGS = {
    "RSA-OAEP-256": lambda: padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
    "RSA-OAEP": lambda: padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
}


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def unb64url(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


# ---- State: keys (PEM) in a JSON file, rewritten atomically on each change --

def load():
    if os.path.exists(STATE_FILE):
        with open(STATE_FILE) as f:
            return json.load(f)
    return {"keys": {}}


STATE = load()


def save():
    tmp = STATE_FILE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(STATE, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, STATE_FILE)


def private_key(version):
    return serialization.load_pem_private_key(version["pem"].encode(), None)


def bundle(name, ver_id, v):
    pub = private_key(v).public_key().public_numbers()
    size = (pub.n.bit_length() + 7) // 8
    return {
        "key": {
            "kid": f"{VAULT}/keys/{name}/{ver_id}",
            "kty": "RSA",
            "key_ops": v["key_ops"],
            "n": b64url(pub.n.to_bytes(size, "big")),
            "e": b64url(pub.e.to_bytes((pub.e.bit_length() + 7) // 8, "big")),
        },
        "attributes": {
            "enabled": v["enabled"],
            "created": v["created"],
            "updated": v["created"],
            "recoveryLevel": "Recoverable+Purgeable",
            "recoverableDays": 90,
        },
    }


# ---- Tokens: HMAC-signed, so they outlive a restart as Entra ID's do --------

def issue_token(client_id):
    claims = {"appid": client_id, "tid": TENANT, "aud": RESOURCE, "exp": int(time.time()) + 3599}
    body = b64url(json.dumps(claims).encode())
    sig = b64url(hmac.new(SIGNING_KEY, body.encode(), hashlib.sha256).digest())
    return f"standin.{body}.{sig}"


def check_token(header):
    if not header or not header.startswith("Bearer "):
        return None
    parts = header[len("Bearer "):].strip().split(".")
    if len(parts) != 3 or parts[0] != "standin":
        return None
    want = b64url(hmac.new(SIGNING_KEY, parts[1].encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(want, parts[2]):
        return None
    claims = json.loads(unb64url(parts[1]))
    if claims.get("exp", 0) < time.time() or claims.get("aud") != RESOURCE:
        return None
    return claims["appid"] if claims["appid"] in CONFIG["clients"] else None


class Refused(Exception):
    def __init__(self, status, code, message, headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def aad_error(status, error, code, description):
    now = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    trace = str(uuid.uuid4())
    return status, {
        "error": error,
        "error_description": f"AADSTS{code}: {description}\r\nTrace ID: {trace}\r\nCorrelation ID: {uuid.uuid4()}\r\nTimestamp: {now}",
        "error_codes": [code],
        "timestamp": now,
        "trace_id": trace,
        "correlation_id": str(uuid.uuid4()),
    }


# ---- Entra ID: POST /{tenant}/oauth2/v2.0/token ----------------------------

def token(tenant, form):
    if tenant != TENANT:
        return aad_error(400, "invalid_request", 90002,
                         f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.")
    if form.get("grant_type") != "client_credentials":
        return aad_error(400, "unsupported_grant_type", 70003,
                         "The app requested an unsupported grant type (this stand-in knows client_credentials only).")
    client_id = form.get("client_id", "")
    client = CONFIG["clients"].get(client_id)
    if client is None:
        return aad_error(400, "unauthorized_client", 700016,
                         f"Application with identifier '{client_id}' was not found in the directory '{tenant}'.")
    if not hmac.compare_digest(form.get("client_secret", "").encode(), client["secret"].encode()):
        return aad_error(401, "invalid_client", 7000215,
                         f"Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'.")
    if form.get("scope") != SCOPE:
        return aad_error(400, "invalid_scope", 70011,
                         f"The provided value for the input parameter 'scope' is not valid. The scope {form.get('scope')} is not valid.")
    return 200, {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": issue_token(client_id)}


# ---- Key Vault --------------------------------------------------------------

def not_found(name, version):
    ident = f"{name}/{version}" if version else name
    raise Refused(404, "KeyNotFound",
                  f"A key with (name/id) {ident} was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command.")


def find(name, version):
    k = STATE["keys"].get(name)
    if k is None:
        not_found(name, version)
    ver = version or k["current"]
    v = k["versions"].get(ver)
    if v is None:
        not_found(name, version)
    return ver, v


def allow(client_id, permission):
    if permission not in CONFIG["clients"][client_id]["permissions"]:
        raise Refused(403, "Forbidden",
                      f"The user, group or application 'appid={client_id};iss=https://sts.windows.net/{TENANT}/' does not have keys {permission} permission on key vault 'tde-standin;location=local'.")


def create(name, body):
    kty = body.get("kty")
    if kty not in ("RSA", "RSA-HSM"):
        raise Refused(400, "BadParameter", f"This stand-in creates RSA keys only (got kty {kty!r}).")
    size = body.get("key_size", 2048)
    if size not in (2048, 3072, 4096):
        raise Refused(400, "BadParameter", f"Invalid key size {size}.")
    key = rsa.generate_private_key(public_exponent=65537, key_size=size)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    ops = body.get("key_ops") or ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
    ver = uuid.uuid4().hex
    v = {"pem": pem, "key_ops": ops, "enabled": body.get("attributes", {}).get("enabled", True),
         "created": int(time.time())}
    k = STATE["keys"].setdefault(name, {"versions": {}})
    k["versions"][ver] = v
    k["current"] = ver
    save()
    return bundle(name, ver, v)


def operation(name, version, op, body):
    ver, v = find(name, version)
    if op not in v["key_ops"]:
        raise Refused(403, "Forbidden", f"Operation {op} is not permitted on this key.")
    if not v["enabled"]:
        raise Refused(403, "Forbidden", f"Operation {op} is not allowed on a disabled key.")
    alg = body.get("alg")
    if alg not in ALGS:
        raise Refused(400, "BadParameter", f"Algorithm {alg!r} is not supported by this stand-in (RSA-OAEP-256, RSA-OAEP).")
    try:
        value = unb64url(body["value"])
    except Exception:
        raise Refused(400, "BadParameter", "Property 'value' is missing or not base64url.")
    key = private_key(v)
    if op == "wrapKey":
        out = key.public_key().encrypt(value, ALGS[alg]())
    else:
        try:
            out = key.decrypt(value, ALGS[alg]())
        except Exception:
            raise Refused(400, "BadParameter", "Invalid ciphertext: the value does not decrypt under this key.")
    return {"kid": f"{VAULT}/keys/{name}/{ver}", "value": b64url(out)}


def vault(method, segments, client_id, body):
    # segments after "keys": [name], [name, version], [name, "create"],
    # [name, version, "wrapkey"|"unwrapkey"]; an empty version is the latest.
    if method == "GET" and len(segments) in (1, 2):
        allow(client_id, "get")
        name, version = segments[0], (segments[1] if len(segments) == 2 else "")
        ver, v = find(name, version)
        return 200, bundle(name, ver, v)
    if method == "POST" and len(segments) == 2 and segments[1] == "create":
        allow(client_id, "create")
        return 200, create(segments[0], body)
    if method == "POST" and len(segments) == 3 and segments[2] in ("wrapkey", "unwrapkey"):
        op = "wrapKey" if segments[2] == "wrapkey" else "unwrapKey"
        allow(client_id, op)
        return 200, operation(segments[0], segments[1], op, body)
    raise Refused(400, "BadParameter", f"{method} /keys/{'/'.join(segments)} is not implemented by this stand-in.")


CHALLENGE = f'Bearer authorization="https://127.0.0.1:{PORT}/{TENANT}", resource="{RESOURCE}"'


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server_version = "tde-azure-keyvault-standin"

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (time.strftime("%H:%M:%S"), fmt % args))

    def reply(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, val in (headers or {}).items():
            self.send_header(k, val)
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def handle_any(self, method):
        url = urlsplit(self.path)
        segments = url.path.split("/")[1:]
        raw = self.body()
        with LOCK:
            try:
                if method == "POST" and len(segments) == 4 and segments[1:] == ["oauth2", "v2.0", "token"]:
                    form = {k: v[0] for k, v in parse_qs(raw.decode(), keep_blank_values=True).items()}
                    return self.reply(*token(segments[0], form))
                if not segments or segments[0] != "keys":
                    raise Refused(404, "NotFound", f"{url.path} is not implemented by this stand-in.")
                api = parse_qs(url.query).get("api-version", [""])[0]
                if api not in API_VERSIONS:
                    raise Refused(400, "BadParameter", f"The specified version ({api}) is not recognized.")
                client_id = check_token(self.headers.get("Authorization"))
                if client_id is None:
                    msg = "AKV10000: Request is missing a Bearer or PoP token." if not self.headers.get(
                        "Authorization") else "AKV10022: Invalid token (this stand-in did not issue it, or it expired)."
                    raise Refused(401, "Unauthorized", msg, {"WWW-Authenticate": CHALLENGE})
                body = json.loads(raw) if raw else {}
                return self.reply(*vault(method, segments[1:], client_id, body))
            except Refused as r:
                return self.reply(r.status, {"error": {"code": r.code, "message": r.message}}, r.headers)
            except Exception as e:  # a bug here, said as Key Vault would
                return self.reply(500, {"error": {"code": "InternalError", "message": f"stand-in error: {e!r}"}})

    def do_GET(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")


TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
TLS.minimum_version = ssl.TLSVersion.TLSv1_2
TLS.load_cert_chain(CONFIG["cert_file"], CONFIG["key_file"])


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    # The TLS handshake in the connection's thread, not in accept's.
    def finish_request(self, request, client_address):
        request.settimeout(30)
        try:
            conn = TLS.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            sys.stderr.write(f"TLS handshake with {client_address[0]}:{client_address[1]} failed: {e}\n")
            return
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            try:
                conn.close()
            except OSError:
                pass


print(f"Azure Key Vault stand-in (not an emulator) on {VAULT}, tenant {TENANT}", flush=True)
Server(("127.0.0.1", PORT), Handler).serve_forever()
PY

sub _uuid
{
	my $h = _random_hex(16);
	return join('-', substr($h, 0, 8), substr($h, 8, 4), substr($h, 12, 4), substr($h, 16, 4), substr($h, 20));
}

sub azure_keyvault
{
	my (%o) = @_;
	my $t = kms_tools();
	my $dir = _dir('azure');
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	my $ca = cert_authority("$dir/ca", cn => 'tde test CA (Azure Key Vault stand-in)');
	my $leaf = $ca->leaf('azure-keyvault-standin', usage => 'server');
	my ($client, $secret) = (_uuid(), _random_hex(20));
	my ($reader, $reader_secret) = (_uuid(), _random_hex(20));
	my $tenant = _uuid();
	_write_private("$dir/config.json", JSON::PP->new->canonical->pretty->encode({
		port => $port + 0,
		tenant => $tenant,
		signing_key => _random_hex(32),
		state_file => "$dir/state.json",
		cert_file => $leaf->{cert_file},
		key_file => $leaf->{key_file},
		clients => {
			$client => { secret => $secret, permissions => [qw(get create wrapKey unwrapKey)] },
			$reader => { secret => $reader_secret, permissions => ['get'] },
		} }));
	my $script = _write_file("$dir/azure_keyvault_standin.py", $AZURE_STANDIN);
	my $s = TdeKms::AzureKeyVault->new(
		kind => 'azure-keyvault-standin',
		dir => $dir,
		cmd => [ $t->{TDE_KMS_PYTHON}, $script, "$dir/config.json" ],
		env => { PYTHONWARNINGS => 'ignore', PYTHONUNBUFFERED => '1' },
		ports => [$port],
		host => '127.0.0.1',
		port => $port,
		vault_url => "https://127.0.0.1:$port",
		authority_host => "https://127.0.0.1:$port",
		tenant_id => $tenant,
		client_id => $client,
		client_secret => $secret,
		client_secret_file => _write_private("$dir/client_secret", "$secret\n"),
		reader_client_id => $reader,
		reader_client_secret_file => _write_private("$dir/reader_client_secret", "$reader_secret\n"),
		ca_file => $ca->{ca_file},
		state_file => "$dir/state.json",
		ca => $ca);
	return $s->start;
}

package TdeKms::AzureKeyVault;

use strict;
use warnings FATAL => 'all';
use Carp;
use JSON::PP;
our @ISA = ('TdeKms::Server');

# A call to the vault as client_id (a token first, as any client would).
my $AZURE_REST = <<'PY';
import json, ssl, sys, urllib.error, urllib.parse, urllib.request
url, ca, tenant, client, secret, method, path, body = sys.argv[1:9]
ctx = ssl.create_default_context(cafile=ca)
form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": client,
                               "client_secret": secret, "scope": "https://vault.azure.net/.default"}).encode()
tok = json.load(urllib.request.urlopen(f"{url}/{tenant}/oauth2/v2.0/token", form, context=ctx))["access_token"]
req = urllib.request.Request(f"{url}{path}?api-version=7.5", data=body.encode() if body else None, method=method,
                             headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"})
try:
    r = urllib.request.urlopen(req, context=ctx)
    status, text = r.status, r.read().decode()
except urllib.error.HTTPError as e:
    status, text = e.code, e.read().decode()
print(status)
print(text)
PY

sub rest
{
	my ($s, $method, $path, $body) = @_;
	my ($rc, $out, $err) = TdeKms::kms_python($AZURE_REST, @$s{qw(vault_url ca_file tenant_id client_id client_secret)},
		$method, $path, defined $body ? encode_json($body) : '');
	croak "Azure Key Vault stand-in: $method $path: $err" if $rc;
	my ($status, $text) = split /\n/, $out, 2;
	return ($status, $text =~ /\S/ ? decode_json($text) : undef);
}

sub new_key_version
{
	my ($s, $name) = @_;
	my ($status, $r) = $s->rest('POST', "/keys/$name/create",
		{ kty => 'RSA', key_size => 3072, key_ops => [ 'wrapKey', 'unwrapKey' ] });
	croak "new version of $name: HTTP $status" unless $status == 200;
	my ($version) = $r->{key}{kid} =~ m{/keys/[^/]+/([^/]+)$};
	return $version;
}

package TdeKms;

1;
