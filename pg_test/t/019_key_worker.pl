# 019_key_worker.pl -- the key worker is the only process that talks to a
# key provider, and a provider outage fails cleanly and heals by itself.
#
# - A "tde key worker" runs on the primary and on a standby (during
#   recovery); backends, the checkpointer and the standby's startup process
#   have one thread each and never map the remote providers' library.
# - A worker that hangs makes requests fail after tde.provider_timeout with
#   an error that says so; a worker that exits is started again, and a
#   request that was waiting meanwhile is served by the new one.
# - Started while its master key is unavailable, the server comes up with
#   the key store locked: encrypted tables fail with an error naming the
#   file, the provider and the reason; plain tables work; nothing reaches
#   disk in plaintext.  Once the key is back, service resumes without a
#   restart.
use strict;
use warnings FATAL => 'all';
use File::Copy;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use TdeTest;

my $node = new_node('kw', init => { allows_streaming => 1 });
$node->start;
my $ring = configure_keys($node);
$node->safe_psql('postgres', q{
	CREATE TABLE enc (id int PRIMARY KEY, v text) USING tde_heap;
	INSERT INTO enc SELECT g, 'KW-SECRET-' || g FROM generate_series(1, 200) g;
	CREATE TABLE plain (id int);
	INSERT INTO plain SELECT generate_series(1, 10);
});
$node->backup('b');
my $standby = PostgreSQL::Test::Cluster->new('kw_standby');
$standby->init_from_backup($node, 'b', has_streaming => 1);
$standby->start;

sub threads { my @t = glob("/proc/$_[0]/task/*"); return scalar @t }

sub maps_kms_library
{
	open(my $fh, '<', "/proc/$_[0]/maps") or die "maps of $_[0]: $!";
	return scalar grep { /tde_kms\.so/ } <$fh>;
}

# ---- Who is who --------------------------------------------------------
my $worker = child_pid($node, 'tde key worker');
like($worker, qr/^\d+$/, 'the primary runs a tde key worker');
like(child_pid($standby, 'tde key worker'), qr/^\d+$/, 'so does the standby, during recovery');
my $startup = child_pid($standby, 'startup');
like($startup, qr/^\d+$/, 'the standby has a startup process');
is($standby->safe_psql('postgres', 'SELECT count(*) FROM enc'), '200', 'the standby reads the encrypted table');

my $bg = $node->background_psql('postgres');
my $backend = $bg->query_safe('SELECT pg_backend_pid()');
$bg->query_safe('SELECT count(*) FROM enc');
my $checkpointer = child_pid($node, 'checkpointer');
for ([ 'a backend', $backend ], [ 'the checkpointer', $checkpointer ], [ "the standby's startup process", $startup ])
{
	my ($what, $pid) = @$_;
	is(threads($pid), 1, "$what has one thread");
	is(maps_kms_library($pid), 0, "$what does not map tde_kms.so");
}

# ---- A hung worker: a clean timeout, then service again -------------------
kill 'STOP', $worker;
my $t0 = time;
my ($rc, $out, $err) = $node->psql('postgres', q{SET tde.provider_timeout = '1s'; SELECT tde_verify_key()});
my $took = time - $t0;
kill 'CONT', $worker;
is($out, 'f', 'tde_verify_key() is false while the key worker hangs');
like($err, qr/key worker did not take the request within tde\.provider_timeout/, 'the warning says the key worker did not answer in time');
ok($took < 20, sprintf('it gave up after the timeout, not later (%.1f s)', $took));
is($node->safe_psql('postgres', 'SELECT tde_verify_key()'), 't', 'once the worker runs again, the key verifies');

# ---- A worker that exits: restarted; a waiting request is served ---------
kill 'STOP', $worker;
my $waiting = $node->background_psql('postgres');
$waiting->query_until(qr/sent/, q{
	SET tde.provider_timeout = '60s';
	\echo sent
	SELECT 'verified:' || tde_verify_key();
});
usleep(300_000);
kill 'TERM', $worker;
kill 'CONT', $worker;
my $new_worker = '';
for (1 .. 100)
{
	$new_worker = child_pid($node, 'tde key worker');
	last if $new_worker && $new_worker != $worker;
	usleep(100_000);
}
ok($new_worker && $new_worker != $worker, "the postmaster started a new key worker ($worker, then $new_worker)");
my $served = $waiting->query_safe('SELECT 1');
like($served, qr/verified:true/, 'a request waiting while the worker exited is served by the new worker');
$waiting->quit;
like(slurp_file($node->logfile), qr/tde: key worker exiting/, 'the old worker said it was exiting');

# ---- A requester that dies while waiting does not hold its slot ----------
kill 'STOP', $new_worker;
my $doomed = $node->background_psql('postgres', on_error_stop => 0);
$doomed->query_until(qr/sent/, q{
	SET tde.provider_timeout = '60s';
	\echo sent
	SELECT tde_verify_key();
});
my $doomed_pid = $node->safe_psql('postgres', q{SELECT pid FROM pg_stat_activity WHERE query LIKE '%SELECT tde_verify_key()%' AND pid <> pg_backend_pid()});
$node->poll_query_until('postgres', 'SELECT waiting = 1 FROM tde_key_worker()') or die 'the request is not posted';
$node->safe_psql('postgres', "SELECT pg_terminate_backend($doomed_pid)");
kill 'CONT', $new_worker;
eval { $doomed->quit };    # its backend is gone
ok($node->poll_query_until('postgres', 'SELECT waiting + running + uncollected = 0 FROM tde_key_worker()'),
	'the answer to a backend terminated while it waited is freed by the key worker');
is($node->safe_psql('postgres', 'SELECT pid FROM tde_key_worker()'), $new_worker, 'tde_key_worker() shows the running worker');

# ---- A standby with its own provider options ----------------------------
# The stored options name the primary's keyring; tde.provider_overrides
# points this standby at its own copy, the primary untouched.
my $ring2 = $standby->basedir . '/ring2';
copy($ring, $ring2) or die;
chmod 0600, $ring2;
my $overrides = $standby->basedir . '/tde-overrides.json';
open(my $ofh, '>', $overrides) or die;
print $ofh qq({"local": {"path": "$ring2"}});
close $ofh;
$standby->append_conf('postgresql.conf', "tde.provider_overrides = '$overrides'");
move($ring, "$ring.away") or die;
$standby->restart;
is($standby->safe_psql('postgres', 'SELECT count(*) FROM enc'), '200',
	'with the primary\'s keyring gone, the standby unlocks through its own options (tde.provider_overrides)');
move("$ring.away", $ring) or die;

# ---- Started while the master key is unavailable --------------------------
$bg->quit;
$node->stop;
move($ring, "$ring.away") or die;
my $logstart = -s $node->logfile;
$node->start;
is($node->safe_psql('postgres', 'SELECT state FROM tde_key_store_state()'), 'locked', 'the server starts with the key store locked');
like(slurp_file($node->logfile, $logstart), qr/cannot unlock the key store.*master key "mek-1" of provider "local"/,
	'the log says why, once');
($rc, $out, $err) = $node->psql('postgres', 'SELECT count(*) FROM enc');
isnt($rc, 0, 'an encrypted table cannot be read');
like($err, qr/cannot read encrypted relation file \d+\/\d+\/\d+ \(fork 0\): its key is unavailable: the key store is locked: master key "mek-1" of provider "local": .*keyring/,
	'the error names the file, the master key, the provider and the reason');
is($node->safe_psql('postgres', 'SELECT count(*) FROM plain'), '10', 'plain tables work');
($rc, $out, $err) = $node->psql('postgres', q{INSERT INTO enc VALUES (1000, 'KW-NEW-ROW')});
isnt($rc, 0, 'writing into an encrypted table fails');
$node->safe_psql('postgres', 'CHECKPOINT');
is(scalar(files_containing($node, 'KW-NEW-ROW')), 0, 'nothing of it reached disk in plaintext');
($rc, $out, $err) = $node->psql('postgres', 'CREATE TABLE enc2 (i int) USING tde_heap');
isnt($rc, 0, 'a new encrypted table cannot be created either');
like($err, qr/key store is locked/, '... and the error says why');
my $log_now = slurp_file($node->logfile, $logstart);
my $reports = () = $log_now =~ /cannot unlock the key store/g;
is($reports, 1, 'retries do not repeat the warning');

move("$ring.away", $ring) or die;
$t0 = time;
$node->poll_query_until('postgres', 'SELECT count(*) = 200 FROM enc') or die 'not back';
ok(time - $t0 < 30, sprintf('with the key back, the table reads again without a restart (%.1f s)', time - $t0));
like(slurp_file($node->logfile, $logstart), qr/the key store is unlocked: the master key is available again/, 'the log says so');
is($node->safe_psql('postgres', 'SELECT unlock_attempts > 1, last_unlock FROM tde_key_worker()'), 't|unlocked',
	'tde_key_worker() counts the failed attempts and shows the last one unlocked');
$node->safe_psql('postgres', q{INSERT INTO enc VALUES (1000, 'KW-NEW-ROW'); CREATE TABLE enc2 (i int) USING tde_heap});
$node->safe_psql('postgres', 'CHECKPOINT');
is(scalar(files_containing($node, 'KW-NEW-ROW')), 0, 'the row written now is ciphertext on disk');
is($node->safe_psql('postgres', 'SELECT count(*) FROM enc'), '201', 'every row is there');

$standby->stop;
$node->stop;
done_testing();
