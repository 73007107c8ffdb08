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
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Digest::SHA qw(sha256 hmac_sha256);
use JSON::PP;

our @EXPORT = qw(new_node configure_keys files_containing restart_after_kill9 child_pid tcp_peer_ports
  keystore_frames keystore_key_rels keystore_write_unkeyed relation_files page_marks start_load);

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

# start_load(NODE, SECONDS, SCRIPT): pgbench with 2 clients running the
# custom SCRIPT for SECONDS in the background.  Returns the IPC::Run handle
# and references to its stdout and stderr; call ->finish on the handle.
sub start_load
{
	my ($n, $secs, $body) = @_;
	my $script = $n->basedir . '/load.sql';
	open(my $fh, '>', $script) or die "$script: $!";
	print $fh $body;
	close $fh;
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start(
		[ 'pgbench', '-n', '-c', '2', '-T', $secs, '-f', $script, '-p', $n->port, '-h', $n->host, 'postgres' ],
		'>', \$out, '2>', \$err);
	return ($h, \$out, \$err);
}

# ---- Raw pages ----------------------------------------------------------------
#
# relation_files(NODE, TABLE): every file of TABLE in database postgres:
# the table, its TOAST table and TOAST index, its indexes and owned
# sequences, with their FSM and VM forks and extra segments.
sub relation_files
{
	my ($n, $table) = @_;
	my @rels = split /\n/, $n->safe_psql('postgres', qq{
		WITH t AS (SELECT oid, reltoastrelid FROM pg_class WHERE oid = '$table'::regclass)
		SELECT pg_relation_filepath(c.oid) FROM pg_class c, t
		 WHERE c.oid = t.oid OR c.oid = t.reltoastrelid
		    OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid IN (t.oid, t.reltoastrelid))
		    OR c.oid IN (SELECT objid FROM pg_depend WHERE refobjid = t.oid AND classid = 'pg_class'::regclass
		                   AND deptype IN ('a', 'i') AND objid IN (SELECT oid FROM pg_class WHERE relkind = 'S'))
	});
	my @files;
	for my $r (@rels)
	{
		for my $suffix ('', '_fsm', '_vm')
		{
			my $p = $n->data_dir . "/$r$suffix";
			push @files, $p if -e $p;
			push @files, grep { -e } map { "$p.$_" } 1 .. 9;
		}
	}
	return @files;
}

# page_marks(FILES): the non-zero pages of FILES by their tde marks in
# pd_flags: [encrypted under an even key version (0x8000|0x4000), encrypted
# under an odd one (0x8000), not marked].
sub page_marks
{
	my @files = @_;
	my ($alt, $odd, $unmarked) = (0, 0, 0);
	for my $f (@files)
	{
		open(my $fh, '<:raw', $f) or die "$f: $!";
		my $page;
		while (read($fh, $page, 8192) == 8192)
		{
			next if $page =~ /^\0+$/;
			my $flags = unpack('v', substr($page, 10, 2));
			if (!($flags & 0x8000)) { $unmarked++ }
			elsif ($flags & 0x4000) { $alt++ }
			else { $odd++ }
		}
		close $fh;
	}
	return [ $alt, $odd, $unmarked ];
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

# A child of the node's postmaster, by its process title ("tde key worker",
# "checkpointer", "startup"); '' if none.  The key worker has no database
# connection, so pg_stat_activity does not list it.
sub child_pid
{
	my ($node, $title) = @_;
	my $pm = (split /\n/, slurp_file($node->data_dir . '/postmaster.pid'))[0];
	for my $stat (glob('/proc/[0-9]*/stat'))
	{
		open(my $fh, '<', $stat) or next;
		my $line = <$fh> // next;
		my ($pid, $ppid) = $line =~ /^(\d+) \(.*\) \S+ (\d+)/ or next;
		next unless $ppid == $pm;
		open(my $c, '<', "/proc/$pid/cmdline") or next;
		my $cmd = do { local $/; <$c> } // '';
		return $pid if $cmd =~ /^postgres: (?:\S+: )?\Q$title\E/;
	}
	return '';
}

# The remote ports of process $pid's TCP connections (IPv4 and IPv6).
sub tcp_peer_ports
{
	my ($pid) = @_;
	my %inodes;
	for my $fd (glob("/proc/$pid/fd/*"))
	{
		my $l = readlink($fd) // next;
		$inodes{$1} = 1 if $l =~ /^socket:\[(\d+)\]$/;
	}
	my @ports;
	for my $table ('/proc/net/tcp', '/proc/net/tcp6')
	{
		open(my $fh, '<', $table) or next;
		<$fh>;
		while (my $line = <$fh>)
		{
			my @f = split ' ', $line;
			my ($rem, $inode) = ($f[2], $f[9]);
			next unless $inodes{$inode};
			my ($port) = $rem =~ /:([0-9A-F]{4})$/;
			push @ports, hex($port) if hex($port);
		}
	}
	return @ports;
}

1;
