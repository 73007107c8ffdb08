# 014_key_inventory.pl -- the key inventory (view tde_keys), retired and
# destroyed key versions, the cryptoperiod (tde.key_max_age), and who may
# manage keys (role tde_admin; everyone else is denied).
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TdeTest;

my $node = new_node('inv');
$node->start;
configure_keys($node);
my $store = $node->data_dir . '/tde/keystore';
$node->safe_psql('postgres', q{
	CREATE TABLE t (id int PRIMARY KEY, v text) USING tde_heap;
	INSERT INTO t SELECT g, 'INV-SECRET-' || g FROM generate_series(1, 1000) g;
});
my $versions = q{SELECT string_agg(version || ':' || state, ',' ORDER BY version) FROM tde_keys WHERE relation = 't'::regclass};
is($node->safe_psql('postgres', $versions), '1:active', 'a new table: one active version');
is($node->safe_psql('postgres', "SELECT master_key FROM tde_keys WHERE relation = 't'::regclass"), 'local/mek-1',
	'the inventory names the master key that wraps it');
$node->safe_psql('postgres', "SELECT tde_rotate_key('t'); SELECT tde_rotate_key('t')");
is($node->safe_psql('postgres', $versions), '1:retired,2:retired,3:active', 'after two rotations: two retired versions, one active');
is($node->safe_psql('postgres', "SELECT count(*) FROM tde_keys WHERE relation = 't'::regclass AND state = 'retired' AND retired_at IS NOT NULL AND retired_at >= created_at"),
	'2', 'retired versions say when');
is($node->safe_psql('postgres', "SELECT bool_and(age >= '0'::interval) FROM tde_keys"), 't', 'every row has an age');

# The cryptoperiod.
is($node->safe_psql('postgres', 'SELECT count(*) FROM tde_keys WHERE overdue'), '0', 'nothing is overdue with tde.key_max_age off');
$node->safe_psql('postgres', "ALTER SYSTEM SET tde.key_max_age = '1s'; SELECT pg_reload_conf()");
sleep 2;
is($node->safe_psql('postgres', "SELECT bool_and(overdue) FROM tde_keys WHERE state = 'active' AND relation IN ('t'::regclass, 't_pkey'::regclass)"),
	't', 'with tde.key_max_age = 1s the active versions are overdue');
is($node->safe_psql('postgres', "SELECT count(*) FROM tde_keys WHERE overdue AND state <> 'active'"), '0', 'retired versions never are');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET tde.key_max_age; SELECT pg_reload_conf()');

# Destroying retired versions erases their wrapped bytes from the key store.
# Every wrapped key the file has ever held, and those still live.
sub wrapped_keys
{
	my ($live_only) = @_;
	my %w;
	for my $f (keystore_frames($store))
	{
		my $b = $f->{body};
		if ($f->{kind} eq 'snapshot')
		{
			for my $k (@{ $b->{keys} })
			{
				$w{ $k->{wrapped} } = 1;
				$w{ $k->{previous}{wrapped} } = 1 if $k->{previous};
				next if $live_only;
				$w{ $_->{wrapped} } = 1 for @{ $k->{retired} // [] };
			}
		}
		elsif (!$live_only && $b->{op} =~ /^(add_key|rotate_key)$/) { $w{ $b->{wrapped} } = 1 }
	}
	delete $w{''};
	return %w;
}
$node->safe_psql('postgres', 'CHECKPOINT');
my %ever = wrapped_keys(0);
is($node->safe_psql('postgres', "SELECT tde_destroy_retired_keys('1 hour')"), '0', 'nothing was retired an hour ago');
my $n_retired = $node->safe_psql('postgres', "SELECT count(*) FROM tde_keys WHERE state = 'retired'");
is($node->safe_psql('postgres', "SELECT tde_destroy_retired_keys('0 seconds')"), $n_retired, "every retired version is destroyed ($n_retired)");
is($node->safe_psql('postgres', $versions), '1:destroyed,2:destroyed,3:active', 'their records stay, as destroyed');
my %live = wrapped_keys(1);
my $bytes = slurp_file($store);
my @gone = grep { !$live{$_} } keys %ever;
cmp_ok(scalar(@gone), '>=', 2 * 2, 'the destroyed versions had wrapped keys in the key store file (' . scalar(@gone) . ')');
is(scalar(grep { index($bytes, $_) >= 0 } @gone), 0, 'none of their wrapped bytes is left in the key store file');
is($node->safe_psql('postgres', "SELECT count(*) FROM t WHERE v LIKE 'INV-SECRET-%'"), '1000', 'the table reads back');
$node->restart;
is($node->safe_psql('postgres', "SELECT count(*) FROM t WHERE v LIKE 'INV-SECRET-%'"), '1000', 'also after a restart');
is($node->safe_psql('postgres', $versions), '1:destroyed,2:destroyed,3:active', 'and the inventory is the same');

# ---- Privileges ---------------------------------------------------------------
$node->safe_psql('postgres', q{
	CREATE ROLE alice LOGIN;
	CREATE ROLE bob LOGIN IN ROLE tde_admin;
});
for my $sql ("SELECT tde_rotate_key('t')", 'SELECT count(*) FROM tde_keys', 'SELECT count(*) FROM tde_status',
	"SELECT tde_destroy_retired_keys('0 s')", "SELECT tde_set_master_key('local', 'x')")
{
	my ($rc, $out, $err) = $node->psql('postgres', $sql, extra_params => [ '-U', 'alice' ]);
	like($err, qr/permission denied/, "a role without tde_admin is denied: $sql");
}
is($node->safe_psql('postgres', "SELECT tde_rotate_key('t')", extra_params => [ '-U', 'bob' ]), '4', 'tde_admin may rotate a key');
is($node->safe_psql('postgres', "SELECT count(*) > 0 FROM tde_keys", extra_params => [ '-U', 'bob' ]), 't', 'and read the inventory');
my ($rc, $out, $err) = $node->psql('postgres', "SELECT tde_set_master_key('local', 'x')", extra_params => [ '-U', 'bob' ]);
like($err, qr/permission denied/, 'but not set the master key (superuser only)');

$node->stop;
done_testing();
