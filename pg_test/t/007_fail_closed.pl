# 007_fail_closed.pl -- tde fails closed: it never writes plaintext for a
# file that should be encrypted, and never hands garbage to the executor.
#
# - Capacity: filling the shared key table, refused creates leave no orphan
#   keys, drop + create + restart keeps every table encrypted, and a server
#   whose tde.max_relation_keys is too small for its key store refuses to
#   start instead of treating files as plain.
# - The key store is authenticated under the master key: a file rewritten
#   without it, or edited, stops the server.  Encrypted pages are marked on
#   disk: a key store that lost a key (an older one put back) makes reads
#   fail with a clear error, and nothing is written in plaintext.
# - Another library that replaces tde's storage manager stops the server.
# - tde.enforce_encryption cannot be bypassed with a pg_temp_ name or with
#   ALTER TABLE ... SET ACCESS METHOD heap.
use strict;
use warnings FATAL => 'all';
use File::Copy;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeTest;

my $node = new_node('fc', conf => 'tde.max_relation_keys = 64');
$node->start;
configure_keys($node);

sub psql_err
{
	my ($sql, $db) = @_;
	my ($rc, $out, $err) = $node->psql($db // 'postgres', $sql);
	return ($rc, $err);
}

# ---- Capacity -------------------------------------------------------------
# Tables of one int column: one key each (no TOAST, no index).
my $made = 0;
for my $i (1 .. 80)
{
	my ($rc, $err) = psql_err("CREATE TABLE cap_$i (i int) USING tde_heap");
	last if $rc != 0;
	$made++;
}
my $keys = $node->safe_psql('postgres', 'SELECT count(*) FROM tde_keys()');
ok($made > 0 && $keys == 64, "tables are created until the key table is full ($made tables, $keys keys)");
my $refused = 0;
for my $i (1 .. 10)
{
	my ($rc, $err) = psql_err("CREATE TABLE over_$i (i int) USING tde_heap");
	$refused++ if $rc != 0 && $err =~ /too many encrypted relation files \(tde.max_relation_keys = 64\)/;
}
is($refused, 10, 'ten more creates are refused with a clear error');

# The refused creates left nothing behind in the key store file.
sub store_key_count
{
	$node->safe_psql('postgres', 'CHECKPOINT');    # the file catches up with the queue
	my @rels = keystore_key_rels($node->data_dir . '/tde/keystore');
	return scalar @rels;
}
is(store_key_count(), 64, 'no orphan keys in the key store file');

$node->safe_psql('postgres', 'DROP TABLE cap_1, cap_2, cap_3');
$node->safe_psql('postgres', q{
	CREATE TABLE newt (v text) USING tde_heap;
	INSERT INTO newt SELECT 'NEWT-SECRET-' || g FROM generate_series(1, 200) g;
});
$node->restart;
is($node->safe_psql('postgres', "SELECT tde_is_encrypted('newt')"), 't', 'after drop, create and restart: newt is encrypted');
$node->safe_psql('postgres', q{INSERT INTO newt SELECT 'NEWT-SECRET-' || g FROM generate_series(201, 400) g; CHECKPOINT});
is($node->safe_psql('postgres', 'SELECT count(*) FROM newt'), '400', 'and reads back');
is(scalar(files_containing($node, 'NEWT-SECRET-')), 0, 'no plaintext of newt on disk');
is($node->safe_psql('postgres', "SELECT count(*) FROM cap_$made"), '0', 'the last table before the limit still reads');

# A smaller tde.max_relation_keys than the key store needs: refuse to start.
$node->stop;
$node->append_conf('postgresql.conf', 'tde.max_relation_keys = 16');
my $logstart = -s $node->logfile;
ok(!$node->start(fail_ok => 1), 'tde.max_relation_keys too small for the key store: the server refuses to start');
like(slurp_file($node->logfile, $logstart), qr/the key store holds 64 keys, more than tde.max_relation_keys = 16/,
	'the log says why');
$node->append_conf('postgresql.conf', 'tde.max_relation_keys = 64');
$node->start;
is($node->safe_psql('postgres', 'SELECT count(*) FROM newt'), '400', 'with the limit restored everything reads back');

# ---- The key store is authenticated; marked pages -------------------------
my $store = $node->data_dir . '/tde/keystore';
$node->safe_psql('postgres', 'DROP TABLE ' . join(', ', map { "cap_$_" } 4 .. 30) . '; CHECKPOINT');
$node->stop;
copy($store, "$store.before_lost") or die;
$node->start;
$node->safe_psql('postgres', q{
	CREATE TABLE lost (id int, v text) USING tde_heap;
	INSERT INTO lost SELECT g, 'LOST-SECRET-' || g FROM generate_series(1, 500) g;
	CHECKPOINT;
});
my $lost_file = $node->safe_psql('postgres',
	"SELECT relfilenode FROM pg_class WHERE relname = 'lost'");
$node->stop;
copy($store, "$store.good") or die;
ok((grep { $_ == $lost_file } keystore_key_rels($store)), 'the key store file lists the key of lost');

# The state the file describes, replayed from its frames.
sub store_state
{
	my ($state, @frames) = (undef, keystore_frames($store));
	for my $f (@frames)
	{
		my $b = $f->{body};
		if ($f->{kind} eq 'snapshot') { $state = $b; next }
		$state->{generation} = $f->{generation};
		if ($b->{op} eq 'add_key') { push @{ $state->{keys} }, { %$b{qw(file key_id version created algorithm wrapped)} } }
		elsif ($b->{op} eq 'remove_key') { $state->{keys} = [ grep { $_->{file}{rel} != $b->{file}{rel} } @{ $state->{keys} } ] }
		elsif ($b->{op} eq 'set_principal') { $state->{principal} = { %$b{qw(provider key_name wrapped_kek)} } }
		elsif ($b->{op} eq 'add_provider') { push @{ $state->{providers} }, { %$b{qw(name kind options)} } }
	}
	return $state;
}

# An attacker without the master key removes lost's key and rewrites the
# file with the public checksum constant (as the old unkeyed SHA-256 allowed).
{
	my $ks = store_state();
	my $before = @{ $ks->{keys} };
	$ks->{keys} = [ grep { $_->{file}{rel} != $lost_file } @{ $ks->{keys} } ];
	die "no key for $lost_file" if @{ $ks->{keys} } != $before - 1;
	keystore_write_unkeyed($store, $ks);
}
my $logstart2 = -s $node->logfile;
ok(!$node->start(fail_ok => 1), 'a key store rewritten without the master key: the server refuses to start');
like(slurp_file($node->logfile, $logstart2), qr/key store file ".*keystore" is corrupt: frame 1 is unauthenticated but sets a master key or table keys/,
	'the log says why');

# Editing an authenticated frame (a digit of a timestamp: still valid JSON).
copy("$store.good", $store) or die;
{
	open(my $fh, '+<:raw', $store) or die;
	local $/;
	my $bytes = <$fh>;
	my $at = rindex($bytes, '"created":') + length('"created":');
	substr($bytes, $at, 1) = substr($bytes, $at, 1) eq '1' ? '2' : '1';
	seek($fh, 0, 0);
	print $fh $bytes;
	close $fh;
}
$logstart2 = -s $node->logfile;
ok(!$node->start(fail_ok => 1), 'an edited key store: the server refuses to start');
like(slurp_file($node->logfile, $logstart2), qr/key store file ".*keystore" is corrupt: authentication failed at keyed frame \d+/,
	'the log says the key store failed authentication');

# An older, authentic key store put back in a cleanly stopped cluster (no
# recovery runs, so no WAL generation can catch it; docs/keys.md): the key
# of lost is missing, and its pages say on disk that they are encrypted.
copy("$store.before_lost", $store) or die;
$node->start;
my ($rc, $err) = psql_err('SELECT count(*) FROM lost');
isnt($rc, 0, 'a table whose key is gone from the key store cannot be read');
like($err, qr/block 0 of relation file \d+\/\d+\/$lost_file \(fork 0\) is encrypted on disk, but the key store has no key/,
	'the error names the file and says why (not "invalid page", not garbage)');
($rc, $err) = psql_err(q{INSERT INTO lost VALUES (1000, 'LOST-NEW-ROW')});
isnt($rc, 0, 'writing into it fails as well');
$node->safe_psql('postgres', 'CHECKPOINT');
is(scalar(files_containing($node, 'LOST-NEW-ROW')), 0, 'nothing of the failed write is on disk in plaintext');
is(scalar(files_containing($node, 'LOST-SECRET-')), 0, 'the old rows are still only ciphertext');
is($node->safe_psql('postgres', 'SELECT count(*) FROM newt'), '400', 'other encrypted tables keep working');
$node->stop;
copy("$store.good", $store) or die;
$node->start;
is($node->safe_psql('postgres', 'SELECT count(*) FROM lost'), '500', 'with the right key store, lost reads back');
$node->safe_psql('postgres', 'DROP TABLE lost');

# ---- Another storage manager after tde ------------------------------------
my $pg_config = $ENV{PG_CONFIG} // 'pg_config';
my $incdir = `$pg_config --includedir-server`;
chomp $incdir;
my $evil = $node->basedir . '/other_smgr';
mkdir $evil;
open(my $c, '>', "$evil/other_smgr.c") or die;
print $c <<'C';
#include "postgres.h"
#include "fmgr.h"
#include "storage/smgr.h"
PG_MODULE_MAGIC;
void _PG_init(void);
/* Route every relation back to md.c, bypassing whatever came before. */
void _PG_init(void) { storage_manager_id = 0; }
C
close $c;
system('cc', '-shared', '-fPIC', "-I$incdir", '-o', "$evil/other_smgr.so", "$evil/other_smgr.c") == 0
  or die 'could not build the test library';
$node->stop;
$node->append_conf('postgresql.conf', "shared_preload_libraries = 'tde, $evil/other_smgr.so'");
$logstart = -s $node->logfile;
ok(!$node->start(fail_ok => 1), 'a library that replaces the storage manager after tde: the server refuses to start');
like(slurp_file($node->logfile, $logstart), qr/another library replaced tde's storage manager/, 'the log says why');
$node->append_conf('postgresql.conf', "shared_preload_libraries = 'tde'");
$node->start;
is($node->safe_psql('postgres', 'SELECT count(*) FROM newt'), '400', 'without it the server starts and reads back');

# ---- tde.enforce_encryption ------------------------------------------------
$node->safe_psql('postgres', q{
	CREATE TABLE old_plain (i int);
	INSERT INTO old_plain SELECT generate_series(1, 100);
	CREATE ROLE alice LOGIN;
	GRANT CREATE ON SCHEMA public TO alice;
	ALTER SYSTEM SET tde.enforce_encryption = on;
	SELECT pg_reload_conf();
});
($rc, $err) = psql_err('CREATE TABLE pg_temp_x (i int) USING heap');
like($err, qr/tde.enforce_encryption is on: table "pg_temp_x" would not be encrypted/, 'enforce: a pg_temp_ name is no way around it');
my $newt_oid = $node->safe_psql('postgres', "SELECT 'newt'::regclass::oid");
($rc, $err) = psql_err("CREATE TABLE pg_temp_$newt_oid (i int) USING heap");
like($err, qr/would not be encrypted/, 'enforce: nor is the name of a real transient table');
($rc, $err) = psql_err('ALTER TABLE newt SET ACCESS METHOD heap');
like($err, qr/tde.enforce_encryption is on: SET ACCESS METHOD heap would store the table unencrypted/,
	'enforce: SET ACCESS METHOD heap is refused');
is($node->safe_psql('postgres', "SELECT tde_is_encrypted('newt')"), 't', 'newt is still encrypted');
($rc, $err) = psql_err('SET default_table_access_method = heap; ALTER TABLE newt SET ACCESS METHOD DEFAULT');
like($err, qr/SET ACCESS METHOD heap would store/, 'enforce: SET ACCESS METHOD DEFAULT (= heap) is refused');
$node->safe_psql('postgres', 'VACUUM FULL newt');
is($node->safe_psql('postgres', 'SELECT count(*) FROM newt'), '400', 'enforce: VACUUM FULL of an encrypted table still works');
$node->safe_psql('postgres', 'VACUUM FULL old_plain');
is($node->safe_psql('postgres', 'SELECT count(*) FROM old_plain'), '100',
	'enforce: VACUUM FULL of a table that was plain before still works');
my ($arc, $aout, $aerr) = $node->psql('postgres', 'SET tde.enforce_encryption = off', extra_params => [ '-U', 'alice' ]);
like($aerr, qr/permission denied to set parameter "tde.enforce_encryption"/, 'enforce: only a superuser may turn it off');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET tde.enforce_encryption; SELECT pg_reload_conf()');

$node->stop;
done_testing();
