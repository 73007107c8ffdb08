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

our @EXPORT = qw(new_node configure_keys files_containing restart_after_kill9);

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

1;
