# 016_master_key_rotation.pl -- tde_rotate_master_key(): a new master key, a
# new KEK, every table key version re-wrapped, no data page touched.
#
# - The file provider creates the new key; tde_keys names it; every table
#   reads back, also after a restart without the old master key.
# - No wrapped key of before is left in the key store (the KEK changed: an
#   old key store or WAL archive plus the old master key no longer opens
#   today's keys).
# - A standby without the new key stops at the rotation with a clear error;
#   with it, it replays the rotation; kill -9 right after one recovers.
use strict;
use warnings FATAL => 'all';
use File::Copy;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeTest;

my $node = new_node('mk', init => { allows_streaming => 1 });
$node->start;
my $ring = configure_keys($node);
$node->safe_psql('postgres', join("\n", map {
	"CREATE TABLE m_$_ (id int PRIMARY KEY, v text) USING tde_heap;
	 INSERT INTO m_$_ SELECT g, 'MK-SECRET-' || g FROM generate_series(1, 500) g;"
} 1 .. 5));
$node->safe_psql('postgres', "SELECT tde_rotate_key('m_1')");    # a retired version, re-wrapped too
$node->backup('b');
my $standby = PostgreSQL::Test::Cluster->new('mk_standby');
$standby->init_from_backup($node, 'b', has_streaming => 1);
$standby->start;
my $store = $node->data_dir . '/tde/keystore';

sub all_wrapped
{
	my %w;
	for my $f (keystore_frames($store))
	{
		my $b = $f->{body};
		for my $k ($f->{kind} eq 'snapshot' ? @{ $b->{keys} } : ())
		{
			$w{ $k->{wrapped} } = 1;
			$w{ $_->{wrapped} } = 1 for ($k->{previous} // ()), @{ $k->{retired} // [] };
		}
		$w{ $b->{wrapped} } = 1 if ($b->{op} // '') =~ /^(add_key|rotate_key)$/;
	}
	delete $w{''};
	return %w;
}
$node->safe_psql('postgres', 'CHECKPOINT');
my %before = all_wrapped();
my $check = 'SELECT ' . join(' + ', map { "(SELECT count(*) FROM m_$_ WHERE v LIKE 'MK-SECRET-%')" } 1 .. 5);

# The standby needs the new master key when it replays the rotation.
$standby->stop;
my $new = $node->safe_psql('postgres', 'SELECT tde_rotate_master_key()');
like($new, qr/^mek-1-r\d+$/, "tde_rotate_master_key returns the new key's name ($new)");
my $ring_json = decode_json(slurp_file($ring));
ok(exists $ring_json->{keys}{$new}, 'the file provider created it in the keyring');
is($node->safe_psql('postgres', "SELECT DISTINCT master_key FROM tde_keys"), "local/$new", 'every key is now wrapped under it');
is($node->safe_psql('postgres', $check), '2500', 'every table reads back');
my %after = all_wrapped();
cmp_ok(scalar(keys %before), '>=', 21, 'keys before: ' . scalar(keys %before));
is(scalar(grep { $after{$_} } keys %before), 0, 'no wrapped key of before is left: every version was re-wrapped under a new KEK');
is(scalar(keys %after), scalar(keys %before), 'and none was lost');

# Without it, the standby stops at the rotation with a clear error.  (In
# these tests both servers read the same keyring path, which the key store
# names: the standby sees the primary's keyring.)  Hide the new key for a
# moment: the running primary does not read the keyring.
my $full = slurp_file($ring);
{
	my %only_old = (version => $ring_json->{version}, keys => { 'mek-1' => $ring_json->{keys}{'mek-1'} });
	open(my $o, '>', $ring) or die;
	print $o encode_json(\%only_old);
	close $o;
}
my $logstart = -s $standby->logfile;
$standby->start(fail_ok => 1);
my $waited = 0;
$waited++, sleep 1 while $waited < 30 && slurp_file($standby->logfile, $logstart) !~ /cannot replay a master-key rotation/;
like(slurp_file($standby->logfile, $logstart),
	qr/cannot replay a master-key rotation: the new master key is not available on this server .*mek-1-r\d+/,
	'a standby without the new master key stops at the rotation, saying why');
$standby->stop('immediate', fail_ok => 1);
$standby->{_pid} = undef;
open(my $o, '>', $ring) or die;
print $o $full;
close $o;
chmod 0600, $ring;
$standby->start;
$node->wait_for_catchup($standby);
is($standby->safe_psql('postgres', $check), '2500', 'the standby replays the rotation and reads every table');

# Without the old master key.
$node->stop;
$standby->stop;
delete $ring_json->{keys}{'mek-1'};
open(my $fh, '>', $ring) or die;
print $fh encode_json($ring_json);
close $fh;
chmod 0600, $ring;
$node->start;
$standby->start;
is($node->safe_psql('postgres', 'SELECT state FROM tde_key_store_state()'), 'unlocked', 'after a restart without the old master key: unlocked');
is($node->safe_psql('postgres', $check), '2500', 'and every table reads back');
is($standby->safe_psql('postgres', $check), '2500', 'on the standby too');

# Again, then kill -9 at once.
my $third = $node->safe_psql('postgres', q{CREATE TABLE late (i int) USING tde_heap; INSERT INTO late VALUES (1); SELECT tde_rotate_master_key()});
isnt($third, $new, "a second rotation gives another key ($third)");
$node->kill9;
restart_after_kill9($node);
is($node->safe_psql('postgres', 'SELECT state FROM tde_key_store_state()'), 'unlocked', 'after kill -9 right after a rotation: unlocked');
is($node->safe_psql('postgres', "$check + (SELECT count(*) FROM late)"), '2501', 'and everything reads back');
is($node->safe_psql('postgres', "SELECT DISTINCT master_key FROM tde_keys"), "local/$third", 'under the newest master key');
$node->stop;
$standby->stop;
done_testing();
