# 006_bad_input.pl -- bad input gets a clear error and changes nothing.
#
# Malformed provider options, an unknown provider or kind, a keyring file
# readable by others, a wrong or missing master key at start-up, and a
# truncated or corrupted key store.  After each start-up failure, putting the
# right file back and restarting reads everything back.
use strict;
use warnings FATAL => 'all';
use File::Copy;
use JSON::PP ();
use MIME::Base64 ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeTest;

my $node = new_node('bad');
$node->start;

sub fails_like
{
	my ($sql, $re, $name) = @_;
	my ($rc, $out, $err) = $node->psql('postgres', $sql);
	isnt($rc, 0, "$name: fails");
	like($err, $re, "$name: says why");
}

$node->safe_psql('postgres', 'CREATE EXTENSION tde');
fails_like(q{SELECT tde_add_key_provider('p', 'file', '{"pathh": "/x"}')},
	qr/invalid options for key provider kind "file": unknown option "pathh"/, 'misspelled option');
fails_like(q{SELECT tde_add_key_provider('p', 'file', '{"path": "relative"}')},
	qr/"path" must be absolute/, 'relative path');
fails_like(q{SELECT tde_add_key_provider('p', 'file', '[1, 2]')},
	qr/options must be a JSON object/, 'options not an object');
fails_like(q[SELECT tde_add_key_provider('p', 'file', '{"path": ')],
	qr/invalid input syntax for type json/, 'malformed JSON');
fails_like(q{SELECT tde_add_key_provider('p', 'vault', '{}')},
	qr/unknown key provider kind "vault"/, 'unknown kind');
fails_like(q{SELECT tde_set_master_key('nope', 'k')},
	qr/key provider "nope" does not exist/, 'unknown provider');
fails_like(q{CREATE TABLE early (i int) USING tde_heap},
	qr/no master key is set/, 'encrypted table before a master key');
is($node->safe_psql('postgres', 'SELECT state FROM tde_key_store_state()'), 'empty', 'nothing was set up by the failures');

# A keyring readable by others is refused, and nothing changes.
my $ring = $node->basedir . '/keyring';
open(my $fh, '>', $ring) or die;
print $fh '{"version": 1, "keys": {}}';
close $fh;
chmod 0644, $ring;
$node->safe_psql('postgres', qq{SELECT tde_add_key_provider('local', 'file', '{"path": "$ring"}')});
fails_like(q{SELECT tde_set_master_key('local', 'mek-1')},
	qr/keyring file ".*keyring" is accessible by group or others \(mode 0644\); run chmod 600/, 'insecure keyring');
is($node->safe_psql('postgres', 'SELECT state FROM tde_key_store_state()'), 'empty', 'no master key was set');
chmod 0600, $ring;
$node->safe_psql('postgres', q{SELECT tde_set_master_key('local', 'mek-1')});
is($node->safe_psql('postgres', 'SELECT state FROM tde_key_store_state()'), 'unlocked', 'after chmod 600 it works');

fails_like(qq{SELECT tde_add_key_provider('local', 'file', '{"path": "/elsewhere"}')},
	qr/key provider "local" already exists/, 'redefining a provider');

$node->safe_psql('postgres', q{
	CREATE TABLE secret (id int PRIMARY KEY, v text) USING tde_heap;
	INSERT INTO secret SELECT g, 'v' || g FROM generate_series(1, 100) g;
	CHECKPOINT;
});
my $check = 'SELECT count(*) FROM secret';
is($node->safe_psql('postgres', $check), '100', 'encrypted table is readable');
$node->stop;

# Wrong master key at start-up: the server starts, the encrypted table fails
# with a clear error, and the server stays up.
copy($ring, "$ring.good") or die;
open($fh, '>', $ring) or die;
print $fh '{"version": 1, "keys": {"mek-1": "' . ('QUFB' x 10) . 'QUFBQUE="}}';
close $fh;
chmod 0600, $ring;
$node->start;
is($node->safe_psql('postgres', 'SELECT state FROM tde_key_store_state()'), 'locked', 'wrong master key: store is locked');
fails_like($check, qr/its key is unavailable: .*master key "mek-1" of provider "local"/, 'wrong master key: reading says why');
fails_like(q{INSERT INTO secret VALUES (1000, 'x')}, qr/key is unavailable|cannot (read|write)/, 'wrong master key: writing fails too');
is($node->safe_psql('postgres', 'SELECT 1'), '1', 'the server stays up');
$node->stop('immediate');
copy("$ring.good", $ring) or die;
$node->start;
is($node->safe_psql('postgres', $check), '100', 'right master key again: everything reads back');

# Crash recovery that must replay a key store change needs the master key:
# the change cannot be appended to the authenticated key store without it.
# With a wrong one recovery stops with a clear error; with the right one it
# goes on, and nothing is lost.
$node->safe_psql('postgres', q{CREATE TABLE after_start (i int) USING tde_heap; INSERT INTO after_start VALUES (1)});
$node->stop('immediate');
open($fh, '>', $ring) or die;
print $fh '{"version": 1, "keys": {"mek-1": "' . ('QUFB' x 10) . 'QUFBQUE="}}';
close $fh;
chmod 0600, $ring;
my $logstart0 = -s $node->logfile;
ok(!$node->start(fail_ok => 1), 'recovery with a key change to replay and a wrong master key: refuses to go on');
like(slurp_file($node->logfile, $logstart0), qr/cannot replay a key store change while the key store is locked/,
	'the log says why');
copy("$ring.good", $ring) or die;
$node->start;
is($node->safe_psql('postgres', 'SELECT count(*) FROM after_start'), '1', 'with the right master key recovery goes on');
$node->stop;

# Missing keyring at start-up.
unlink $ring;
$node->start;
fails_like($check, qr/its key is unavailable: .*keyring/, 'missing keyring: clear error');
$node->stop('immediate');
copy("$ring.good", $ring) or die;
chmod 0600, $ring;

# A truncated or corrupted key store stops the server with a clear message,
# and it starts once the file is restored.
my $store = $node->data_dir . '/tde/keystore';
copy($store, "$store.good") or die;
for my $case ([ 'truncated', sub { truncate($store, 30) or die } ],
	[ 'corrupted', sub {
		open(my $f, '+<:raw', $store) or die; seek($f, 70, 0); print $f 'X'; close $f; } ])
{
	my ($name, $damage) = @$case;
	$damage->();
	my $logstart = -s $node->logfile;
	ok(!$node->start(fail_ok => 1), "$name key store: the server refuses to start");
	like(slurp_file($node->logfile, $logstart), qr/key store file ".*keystore" is corrupt/, "$name key store: the log says why");
	copy("$store.good", $store) or die;
	$node->start;
	is($node->safe_psql('postgres', $check), '100', "$name key store restored: everything reads back");
	$node->stop;
}

# Master-key rotation survives a restart: start-up unwraps with the new key,
# and the old key is no longer needed.
$node->start;
$node->safe_psql('postgres', q{SELECT tde_set_master_key('local', 'mek-2')});
$node->restart;
is($node->safe_psql('postgres', 'SELECT state FROM tde_key_store_state()'), 'unlocked', 'after rotation and restart: unlocked');
is($node->safe_psql('postgres', $check), '100', 'after rotation and restart: reads back');
$node->stop;
open($fh, '<', $ring) or die;
my $json = do { local $/; <$fh> };
close $fh;
my $doc = JSON::PP::decode_json($json);
delete $doc->{keys}{'mek-1'} or die 'no mek-1 in the keyring';   # destroy the old key
$json = JSON::PP::encode_json($doc);
open($fh, '>', $ring) or die;
print $fh $json;
close $fh;
$node->start;
is($node->safe_psql('postgres', $check), '100', 'the old master key is not needed any more');

# The env provider: a missing variable is a clear error.
$node->safe_psql('postgres', q{SELECT tde_add_key_provider('env', 'env', '{"variable": "TDE_TEST_NO_SUCH_VAR"}')});
fails_like(q{SELECT tde_set_master_key('env', 'k')}, qr/environment variable "TDE_TEST_NO_SUCH_VAR" is not set/, 'env provider without its variable');
is($node->safe_psql('postgres', $check), '100', 'still readable with the file master key');

# An env provider's variable is taken out of the server's environment at
# start-up: programs the server runs do not inherit the master key.
my $mek = MIME::Base64::encode_base64('E' x 32, '');
$ENV{TDE_TEST_ENV_MEK} = $mek;
$node->restart;
$node->safe_psql('postgres', q{
	SELECT tde_add_key_provider('envp', 'env', '{"variable": "TDE_TEST_ENV_MEK"}');
	SELECT tde_set_master_key('envp', 'k');
});
$node->restart;
my $envfile = $node->basedir . '/program_env.txt';
# The program reads its input first: one that exits before COPY has
# written makes COPY fail with a broken pipe.
$node->safe_psql('postgres', "COPY (SELECT 1) TO PROGRAM 'cat > /dev/null; env > $envfile'");
ok(-s $envfile, 'COPY ... TO PROGRAM ran');
unlike(slurp_file($envfile), qr/TDE_TEST_ENV_MEK|\Q$mek\E/, 'its environment holds neither the variable nor the key');
is($node->safe_psql('postgres', 'SELECT state FROM tde_key_store_state()'), 'unlocked', 'the env master key unlocked the store');
is($node->safe_psql('postgres', $check), '100', 'and the data reads back');
$node->stop;
done_testing();
