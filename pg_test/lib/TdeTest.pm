# TdeTest.pm -- shared set-up for tde's TAP tests.
#
# new_node() makes a PostgreSQL::Test::Cluster with tde preloaded and (by
# default) data checksums on, and configure_keys() gives it a file keyring
# and a master key.  files_containing() is the on-disk check: it scans every
# file under the data directory (optionally skipping pg_wal) for a byte
# string, and returns the files that hold it.
package TdeTest;

use strict;
use warnings FATAL => 'all';
use Exporter 'import';
use File::Find;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Digest::SHA qw(sha256 hmac_sha256);
use JSON::PP;

our @EXPORT = qw(new_node configure_keys files_containing restart_after_kill9
  keystore_frames keystore_key_rels keystore_write_unkeyed);

sub new_node
{
	my ($name, %opts) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	my @extra = $opts{no_checksums} ? () : ('--data-checksums');
	$node->init(extra => \@extra, %{ $opts{init} // {} });
	$node->append_conf('postgresql.conf', "shared_preload_libraries = 'tde'");
	$node->append_conf('postgresql.conf', $opts{conf}) if $opts{conf};
	return $node;
}

# Keyring outside the data directory, as a real deployment would keep it.
sub keyring_path
{
	my ($node) = @_;
	return $node->basedir . '/keyring';
}

sub configure_keys
{
	my ($node, $db) = @_;
	$db //= 'postgres';
	my $ring = keyring_path($node);
	$node->safe_psql($db, qq{
		CREATE EXTENSION IF NOT EXISTS tde;
		SELECT tde_add_key_provider('local', 'file', '{"path": "$ring"}');
		SELECT tde_set_master_key('local', 'mek-1');
	});
	return $ring;
}

# Files under the data directory whose bytes contain $needle.
sub files_containing
{
	my ($node, $needle, %opts) = @_;
	my @hits;
	my $root = $opts{dir} // $node->data_dir;
	find(
		{
			no_chdir => 1,
			wanted => sub {
				return unless -f $_;
				return if !$opts{include_wal} && $File::Find::name =~ m{/pg_wal/};
				open(my $fh, '<:raw', $_) or return;
				local $/;
				my $bytes = <$fh>;
				close $fh;
				push @hits, $File::Find::name if index($bytes, $needle) >= 0;
			}
		},
		$root);
	return @hits;
}

# After kill9 the old postmaster may not be gone yet (the kernel reaps it
# asynchronously, and its children exit when they notice): retry start.
sub restart_after_kill9
{
	my ($node) = @_;
	for my $attempt (1 .. 60)
	{
		# A failed start records the stale pid file's PID; forget it.
		$node->{_pid} = undef;
		return if $node->start(fail_ok => 1);
		sleep 1;
	}
	die "could not restart " . $node->name . " after kill9";
}

# ---- The key store file (format: crates/tde-core/src/storefile.rs) ---------
#
# keystore_frames(PATH): the frames of a key store file, as hashes with
# kind ('snapshot' or 'change'), keyed (0/1), generation and body (decoded
# JSON).  Tags are not checked here: the server does that.
sub keystore_frames
{
	my ($path) = @_;
	open(my $fh, '<:raw', $path) or die "open $path: $!";
	local $/;
	my $bytes = <$fh>;
	close $fh;
	die "$path: not a version 2 key store" unless substr($bytes, 0, 12) eq "PGTDEKS\0" . pack('V', 2);
	my ($pos, @frames) = (16);
	while ($pos + 45 <= length($bytes))
	{
		my ($len, $kind, $gen) = unpack('V C Q<', substr($bytes, $pos, 13));
		last if $pos + 45 + $len > length($bytes);
		push @frames, {
			kind => (($kind & 0x7f) == 1 ? 'snapshot' : 'change'),
			keyed => ($kind & 0x80 ? 1 : 0),
			generation => $gen,
			body => decode_json(substr($bytes, $pos + 13, $len)) };
		$pos += 45 + $len;
	}
	return @frames;
}

# keystore_key_rels(PATH): the relfilenumbers that have a key in the file,
# after replaying its frames.
sub keystore_key_rels
{
	my ($path) = @_;
	my %rels;
	for my $f (keystore_frames($path))
	{
		my $b = $f->{body};
		if ($f->{kind} eq 'snapshot')
		{
			$rels{ $_->{file}{rel} } = 1 for @{ $b->{keys} };
		}
		elsif ($b->{op} eq 'add_key') { $rels{ $b->{file}{rel} } = 1 }
		elsif ($b->{op} eq 'remove_key') { delete $rels{ $b->{file}{rel} } }
	}
	return sort { $a <=> $b } keys %rels;
}

# keystore_write_unkeyed(PATH, STORE): what an attacker who can write the
# file but has no master key can do: write STORE (a snapshot hash) as an
# unkeyed frame, whose tag uses the public constant.
sub keystore_write_unkeyed
{
	my ($path, $store) = @_;
	my $header = "PGTDEKS\0" . pack('V', 2) . pack('V', 0);
	my $body = JSON::PP->new->canonical->encode($store);
	my $head = pack('V C Q<', length($body), 1, $store->{generation});
	my $key = sha256('tde key store: unauthenticated frame');
	my $tag = hmac_sha256(sha256($header) . pack('C Q< V', 1, $store->{generation}, length($body)) . $body, $key);
	open(my $fh, '>:raw', $path) or die;
	print $fh $header . $head . $body . $tag;
	close $fh;
}

1;

