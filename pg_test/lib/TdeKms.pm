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
#                            openbao, pykmip and softhsm, 0 for drongo.
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

our @EXPORT_OK = qw(moto openbao softhsm pykmip drongo cert_authority
  kms_python kms_tools kms_available);
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

1;
