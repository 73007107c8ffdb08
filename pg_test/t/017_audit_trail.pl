# 017_audit_trail.pl -- the audit trail: every key operation leaves one
# record, in order, chained; the records survive kill -9 and reach a
# standby; denials and refusals are recorded; tde_verify_audit_log() and the
# offline checker (tde-audit-check) both find an edited, deleted, swapped or
# truncated record.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeTest;

my $checker = $ENV{TDE_AUDIT_CHECK} or die 'TDE_AUDIT_CHECK (the tde-audit-check binary) is not set (scripts/test sets it)';

my $primary = new_node('primary', init => { allows_streaming => 1 }, conf => 'checkpoint_timeout = 1h');
$primary->start;
configure_keys($primary);
my $log_file = $primary->data_dir . '/tde/audit.log';
my $me = $primary->safe_psql('postgres', 'SELECT current_user');

sub ops
{
	my ($node, $where) = @_;
	$where //= 'true';
	return $node->safe_psql('postgres', "SELECT string_agg(operation || ':' || result, ',' ORDER BY seq) FROM tde_audit_log WHERE $where");
}

is(ops($primary), 'provider_added:ok,master_key_set:ok', 'configuring keys: a provider, then a master key');
is($primary->safe_psql('postgres', 'SELECT string_agg(keyed::text, \',\' ORDER BY seq) FROM tde_audit_log'), 'false,true',
	'the record before any master key is unkeyed, the rest are keyed (HMAC under the audit key)');

$primary->backup('b1');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'b1', has_streaming => 1);
$standby->start;

# Key operations of every kind.
$primary->safe_psql('postgres', q{
	CREATE TABLE t (id int PRIMARY KEY, v text) USING tde_heap;
	INSERT INTO t SELECT g, 'AUDIT-SECRET-' || g FROM generate_series(1, 500) g;
	CREATE TABLE p (id int) USING heap;
	INSERT INTO p SELECT generate_series(1, 100);
});
my $n0 = $primary->safe_psql('postgres', 'SELECT max(seq) FROM tde_audit_log');
$primary->safe_psql('postgres', "SELECT tde_rotate_key('t')");
# The heap, its TOAST table and TOAST index, and the primary key.
my $t_files = $primary->safe_psql('postgres', "SELECT count(DISTINCT file) FROM tde_audit_log WHERE seq > $n0 AND operation = 'key_rotated'");
is($t_files, '4', 'the rotation gave each of the four files of t a new version');
is(ops($primary, "seq > $n0"),
	'reencryption_started:ok' . (',key_rotated:ok' x $t_files) . (',key_retired:ok' x $t_files) . ',reencryption_finished:ok',
	"tde_rotate_key: started, one new version per file ($t_files), one retired version per file, finished");
is($primary->safe_psql('postgres', "SELECT count(*) FROM tde_audit_log WHERE seq > $n0 AND operation IN ('key_rotated', 'key_retired') AND object = 'public.t' AND file IS NOT NULL AND key_id IS NOT NULL AND key_version IS NOT NULL"),
	2 * $t_files, 'key records name the table, the file, the key id and the version');
is($primary->safe_psql('postgres', "SELECT string_agg(DISTINCT key_version::text, ',') FROM tde_audit_log WHERE seq > $n0 AND operation = 'key_rotated'"), '2', 'rotated to version 2');
is($primary->safe_psql('postgres', "SELECT string_agg(DISTINCT key_version::text, ',') FROM tde_audit_log WHERE seq > $n0 AND operation = 'key_retired'"), '1', 'version 1 retired');

$n0 = $primary->safe_psql('postgres', 'SELECT max(seq) FROM tde_audit_log');
$primary->safe_psql('postgres', "SELECT tde_encrypt_table('p')");
like(ops($primary, "seq > $n0"), qr/^reencryption_started:ok,key_created:ok,reencryption_finished:ok$/, 'tde_encrypt_table: started, a key created, finished');
$primary->safe_psql('postgres', "SELECT tde_destroy_retired_keys('0 s')");
is($primary->safe_psql('postgres', "SELECT count(*) FROM tde_audit_log WHERE operation = 'key_destroyed' AND key_version = 1"), $t_files, 'each destroyed version is recorded');
my $new_mek = $primary->safe_psql('postgres', 'SELECT tde_rotate_master_key()');
is($primary->safe_psql('postgres', "SELECT object FROM tde_audit_log WHERE operation = 'master_key_rotated'"), "local/$new_mek", 'master-key rotation is recorded with the new key');

# Denials and refusals.
$primary->safe_psql('postgres', 'CREATE ROLE alice LOGIN');
for my $case ([ "SELECT tde_rotate_key('t')", 'function tde_rotate_key' ], [ 'SELECT * FROM tde_audit_log', 'view tde_audit_log' ],
	[ 'SELECT tde_verify_audit_log()', 'function tde_verify_audit_log' ])
{
	my ($sql, $object) = @$case;
	my ($rc, $out, $err) = $primary->psql('postgres', $sql, extra_params => [ '-U', 'alice' ]);
	like($err, qr/ERROR:  permission denied for \Q$object\E$/m, "alice is denied with PostgreSQL's own message: $sql");
	is($primary->safe_psql('postgres', "SELECT role || ' ' || result FROM tde_audit_log WHERE operation = 'permission_denied' AND object = '$object' ORDER BY seq DESC LIMIT 1"),
		'alice denied', "and the denial is in the audit trail ($object)");
}
my ($rc, $out, $err) = $primary->psql('postgres', 'SET tde.enforce_encryption = on; CREATE TABLE plain_one (i int) USING heap');
like($err, qr/tde.enforce_encryption is on/, 'enforcement refuses a plain table');
is($primary->safe_psql('postgres', "SELECT count(*) FROM tde_audit_log WHERE operation = 'enforcement_refused' AND result = 'refused' AND detail LIKE '%plain_one%'"),
	'1', 'and the refusal is in the audit trail');

# Failures are recorded too.
($rc, $out, $err) = $primary->psql('postgres', "SELECT tde_set_master_key('nosuch', 'k')");
like($err, qr/does not exist/, 'a master key of an unknown provider fails');
is($primary->safe_psql('postgres', "SELECT result FROM tde_audit_log WHERE operation = 'master_key_set' ORDER BY seq DESC LIMIT 1"), 'failed', 'and the failure is recorded');

# Order and integrity.
my $n = $primary->safe_psql('postgres', 'SELECT count(*) FROM tde_audit_log');
is($primary->safe_psql('postgres', 'SELECT min(seq) || \'-\' || max(seq) FROM tde_audit_log'), "1-$n", 'sequence numbers are 1..n without gaps');
is($primary->safe_psql('postgres', 'SELECT tde_verify_audit_log()'), 't', 'tde_verify_audit_log() is true');
is($primary->safe_psql('postgres', "SELECT count(*) FROM tde_audit_log WHERE role = '$me' AND database = 'postgres'"), $n - 3, 'records name the role and database (all but the three denials are ours)');
my $server_log = slurp_file($primary->logfile);
my @lines = ($server_log =~ /LOG:  tde audit: seq=(\d+) /g);
cmp_ok(scalar(@lines), '>=', $n - 1, 'each record also went to the server log with the prefix "tde audit: "');
unlike(slurp_file($log_file), qr/AUDIT-SECRET|"wrapped"/, 'the log holds no row data and no wrapped keys');

# The standby has the same trail.
$primary->wait_for_catchup($standby);
my $trail = 'SELECT string_agg(seq || operation || chain, \',\' ORDER BY seq) FROM tde_audit_log';
is($standby->safe_psql('postgres', $trail), $primary->safe_psql('postgres', $trail), 'the standby has the same audit trail');
is($standby->safe_psql('postgres', 'SELECT tde_verify_audit_log()'), 't', 'and it verifies there');
my $inventory = q{SELECT string_agg(key_id::text || ':' || version || state, ',' ORDER BY key_id, version) FROM tde_keys};
is($standby->safe_psql('postgres', $inventory), $primary->safe_psql('postgres', $inventory), 'and the same key inventory');
$standby->stop;

# kill -9: records still queued (appended to the log only after their WAL
# is flushed, at the latest by the next checkpoint) come back from the WAL.
my $before = $primary->safe_psql('postgres', $trail);
$primary->safe_psql('postgres', 'CREATE TABLE after_crash_1 (i int) USING tde_heap; CREATE TABLE after_crash_2 (i int) USING tde_heap');
my $on_disk = () = slurp_file($log_file) =~ /\n/g;
is($on_disk, $n, 'the two new records are still queued, not yet in the log file');
$primary->kill9;
restart_after_kill9($primary);
is($primary->safe_psql('postgres', "SELECT string_agg(seq || operation || chain, ',' ORDER BY seq) FROM tde_audit_log WHERE seq <= $n"), $before,
	'after kill -9 the trail is whole');
is($primary->safe_psql('postgres', "SELECT string_agg(operation, ',' ORDER BY seq) FROM tde_audit_log WHERE seq > $n"), 'key_created,key_created',
	'with the two queued records, replayed from the WAL');
is($primary->safe_psql('postgres', 'SELECT tde_verify_audit_log()'), 't', 'and verifies');

# ---- Tampering ------------------------------------------------------------------
$primary->stop;
my $ring = $primary->basedir . '/keyring';
sub offline
{
	my ($out, $err) = ('', '');
	my $ok = IPC::Run::run([ $checker, $primary->data_dir ], '>', \$out, '2>', \$err);
	return ($? >> 8, $out . $err);
}
my ($code, $report) = offline();
is($code, 0, "the offline check finds the stopped cluster's trail intact") or diag($report);
my $orig = slurp_file($log_file);
my @rec = split /(?<=\n)/, $orig;
my %tamper = (
	'a record is edited' => sub { my @r = @rec; $r[5] =~ s/"role":"[^"]*"/"role":"mallory"/; join '', @r },
	'a record is deleted' => sub { my @r = @rec; splice(@r, 4, 1); join '', @r },
	'two records are swapped' => sub { my @r = @rec; @r[3, 4] = @r[4, 3]; join '', @r },
	'the tail is truncated' => sub { join '', @rec[ 0 .. $#rec - 2 ] },
	'the last record is garbled' => sub { my @r = @rec; $r[-1] = "not a record\n"; join '', @r },
);
for my $what (sort keys %tamper)
{
	my $bad = $tamper{$what}->();
	isnt($bad, $orig, "tampered: $what");
	open(my $fh, '>:raw', $log_file) or die "$log_file: $!";
	print $fh $bad;
	close $fh;
	($code, $report) = offline();
	is($code, 1, "the offline check detects it: $what") or diag($report);
	$primary->start;
	my ($r, $o, $e) = $primary->psql('postgres', 'SELECT tde_verify_audit_log()');
	is($o, 'f', "tde_verify_audit_log() is false: $what");
	like($e, qr/WARNING:  tde: audit trail: /, 'and says why');
	$primary->stop;
	open($fh, '>:raw', $log_file) or die "$log_file: $!";
	print $fh $orig;
	close $fh;
}
($code, $report) = offline();
is($code, 0, 'restored: intact again') or diag($report);
my $moved = $primary->basedir . '/keyring-moved';
rename($ring, $moved) or die "rename: $!";
my ($out2, $err2) = ('', '');
IPC::Run::run([ $checker, $primary->data_dir ], '>', \$out2, '2>', \$err2);
is($? >> 8, 2, 'without the master key the offline check cannot vouch for anything');
IPC::Run::run([ $checker, $primary->data_dir, '--provider-options', qq({"path": "$moved"}) ], '>', \$out2, '2>', \$err2);
is($? >> 8, 0, 'given the moved keyring, it can') or diag($out2 . $err2);
rename($moved, $ring) or die "rename: $!";

# tde_verify_key(): the master key works right now, or says why not.
$primary->start;
is($primary->safe_psql('postgres', 'SELECT tde_verify_key()'), 't', 'tde_verify_key() is true with the keyring in place');
rename($ring, $moved) or die "rename: $!";
my ($r, $o, $e) = $primary->psql('postgres', 'SELECT tde_verify_key()');
is($o, 'f', 'false with the keyring gone');
like($e, qr/WARNING:  tde: the master key cannot be used: /, 'with a WARNING saying why');
is($primary->safe_psql('postgres', "SELECT result FROM tde_audit_log WHERE operation = 'unwrap_failed' ORDER BY seq DESC LIMIT 1"), 'failed',
	'and an unwrap_failed record in the audit trail');
rename($moved, $ring) or die "rename: $!";
is($primary->safe_psql('postgres', 'SELECT tde_verify_key()'), 't', 'true again once the keyring is back');
is($primary->safe_psql('postgres', 'SELECT tde_verify_audit_log()'), 't', 'and the trail verifies');
$primary->stop;

done_testing();
