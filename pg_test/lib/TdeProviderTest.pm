# TdeProviderTest.pm -- the scenario every key provider's TAP test runs
# against its real server on loopback (TdeKms.pm starts it).
#
# provider_suite(%a) checks, for one provider kind:
#   - bad credentials are refused at tde_add_key_provider, with the
#     provider's own error mapped to "credentials refused" (or what
#     $a{bad_re} says), and nothing is saved;
#   - a missing master key is refused at tde_set_master_key ("master key
#     not found"), nothing saved;
#   - with the right options: encrypted tables hold only ciphertext on
#     disk, and after a restart read back through the provider (the log
#     says how long the unlock took);
#   - tde_verify_key() is true; no backend has a TCP connection to the
#     provider, and the key worker is the process that had one;
#   - a master-key rotation (tde_rotate_master_key(), or a switch with
#     tde_set_master_key to $a{key2}), then a restart, reads back;
#   - with outage => 1: the provider stopped mid-run: tde_verify_key()
#     fails cleanly (unreachable / timed out) while reads and writes go
#     on (the KEK is unwrapped already); a restart while it is down starts
#     locked with an error naming the provider; once it is back, service
#     resumes by itself, every row there.
#
# %a: name, kind, options (hashref), key, key2 (optional), bad_options,
#     bad_re, missing_key (optional: providers that create any missing key
#     have none), missing_re, server (a TdeKms object), port, outage,
#     down_re, env (hashref, set before the node starts).
package TdeProviderTest;

use strict;
use warnings FATAL => 'all';
use Exporter 'import';
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use TdeTest;

our @EXPORT = qw(provider_suite);

sub provider_suite
{
	my (%a) = @_;
	my $kind = $a{kind};
	local @ENV{ keys %{ $a{env} // {} } } = values %{ $a{env} // {} };
	my $node = new_node($a{name}, conf => "tde.provider_timeout = '15s'");
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION tde');
	my $json = sub { my $o = JSON::PP->new->canonical->encode($_[0]); $o =~ s/'/''/g; return $o };
	my $q = sub { $node->psql('postgres', $_[0]) };

	# ---- Refusals: nothing is saved ----
	my ($rc, $out, $err) = $q->("SELECT tde_add_key_provider('bad', '$kind', '" . $json->($a{bad_options}) . "')");
	isnt($rc, 0, "$kind: a provider with bad credentials is refused");
	like($err, $a{bad_re} // qr/$kind provider: credentials refused/, "$kind: ... with the provider's error, mapped");
	is($node->safe_psql('postgres', 'SELECT count(*) FROM tde_key_providers()'), '0', "$kind: ... and nothing is saved");

	$node->safe_psql('postgres', "SELECT tde_add_key_provider('kms', '$kind', '" . $json->($a{options}) . "')");
	if (defined $a{missing_key})
	{
		($rc, $out, $err) = $q->("SELECT tde_set_master_key('kms', '$a{missing_key}')");
		isnt($rc, 0, "$kind: a master key that does not exist is refused");
		like($err, $a{missing_re} // qr/$kind provider: master key not found/, "$kind: ... saying so");
		is($node->safe_psql('postgres', 'SELECT state FROM tde_key_store_state()'), 'empty', "$kind: ... and no master key is set");
	}

	# ---- Encrypted tables through the provider ----
	$node->safe_psql('postgres', "SELECT tde_set_master_key('kms', '$a{key}')");
	my $marker = 'PROV-SECRET-' . uc($kind =~ s/-//gr);
	$node->safe_psql('postgres', join("\n", map {
		"CREATE TABLE p_$_ (id int PRIMARY KEY, v text) USING tde_heap;
		 INSERT INTO p_$_ SELECT g, '$marker-' || g FROM generate_series(1, 100) g;"
	} 1 .. 3));
	$node->safe_psql('postgres', 'CHECKPOINT');
	is(scalar(files_containing($node, $marker)), 0, "$kind: no plaintext on disk");
	my $rows = sub { $node->safe_psql('postgres', 'SELECT (SELECT count(*) FROM p_1) + (SELECT count(*) FROM p_2) + (SELECT count(*) FROM p_3)') };
	my $logpos = -s $node->logfile;
	$node->restart;
	is($rows->(), '300', "$kind: after a restart, every row reads back through the provider");
	my ($ms) = slurp_file($node->logfile, $logpos) =~ /key store unlocked in (\d+) ms/;
	ok(defined $ms, "$kind: the key worker unlocked the key store at start (" . ($ms // '?') . ' ms)');
	is($node->safe_psql('postgres', 'SELECT tde_verify_key()'), 't', "$kind: tde_verify_key() is true");

	# ---- Who holds a connection to the provider ----
	my $bg = $node->background_psql('postgres');
	my $backend = $bg->query_safe('SELECT pg_backend_pid()');
	$bg->query_safe('SELECT tde_verify_key(), count(*) FROM p_1');
	my $worker = child_pid($node, 'tde key worker');
	my @backend_peers = grep { $_ == $a{port} } tcp_peer_ports($backend);
	is(scalar @backend_peers, 0, "$kind: a backend that used the provider has no connection to it");
	my $threads = () = glob("/proc/$backend/task/*");
	is($threads, 1, "$kind: ... and one thread");
	my $maps = slurp_file("/proc/$backend/maps");
	unlike($maps, qr/tde_kms\.so|libsofthsm/, "$kind: ... and maps no provider library");
	like(slurp_file("/proc/$worker/maps"), qr/tde_kms\.so/, "$kind: the key worker is the process that loaded it");
	$bg->quit;

	# ---- Master-key rotation ----
	if ($a{key2})
	{
		$node->safe_psql('postgres', "SELECT tde_set_master_key('kms', '$a{key2}')");
	}
	else
	{
		$node->safe_psql('postgres', 'SELECT tde_rotate_master_key()');
	}
	my $mk = $node->safe_psql('postgres', 'SELECT DISTINCT master_key FROM tde_keys');
	isnt($mk, "kms/$a{key}", "$kind: the master key changed ($mk)");
	$node->restart;
	is($rows->(), '300', "$kind: after the rotation and a restart, every row reads back");
	is($node->safe_psql('postgres', 'SELECT tde_verify_key()'), 't', "$kind: the new master key verifies");

	# ---- The provider stopped mid-run, then back ----
	if ($a{outage})
	{
		$a{server}->stop;
		($rc, $out, $err) = $q->(q{SET tde.provider_timeout = '3s'; SELECT tde_verify_key()});
		is($out, 'f', "$kind: with the provider down, tde_verify_key() is false");
		like($err, $a{down_re} // qr/$kind provider: (unreachable|timed out)|did not answer/, "$kind: ... and says why");
		is($rows->(), '300', "$kind: reads go on (the KEK is unwrapped already)");
		$node->safe_psql('postgres', "INSERT INTO p_1 VALUES (1000, '$marker-new')");
		$logpos = -s $node->logfile;
		$node->restart;
		is($node->safe_psql('postgres', 'SELECT state FROM tde_key_store_state()'), 'locked', "$kind: restarted while it is down, the server starts locked");
		($rc, $out, $err) = $q->('SELECT count(*) FROM p_2');
		isnt($rc, 0, "$kind: an encrypted table cannot be read");
		like($err, qr/its key is unavailable: the key store is locked: master key "[^"]+" of provider "kms": $kind provider/,
			"$kind: the error names the master key, the provider and the reason");
		$a{server}->start;
		my $t0 = time;
		ok($node->poll_query_until('postgres', 'SELECT count(*) = 101 FROM p_1'), "$kind: once the provider is back, service resumes without a restart");
		note(sprintf('%s: back after %.1f s', $kind, time - $t0));
		is($rows->(), '301', "$kind: nothing was lost");
		is($node->safe_psql('postgres', 'SELECT tde_verify_key()'), 't', "$kind: the key verifies again");
	}
	$node->stop;
	return $node;
}

1;
