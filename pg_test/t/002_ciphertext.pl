# 002_ciphertext.pl -- an encrypted table's files hold no plaintext.
#
# A unique marker goes into a tde_heap table three ways: an indexed column,
# a TOASTed column (stored EXTERNAL, so uncompressed), and a serial-backed
# row.  After CHECKPOINT no relation file under $PGDATA contains the marker,
# while a plain heap table used as a control does show its own marker.  With
# data checksums on, pg_checksums (offline) accepts the encrypted cluster and
# everything reads back after a restart.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use MIME::Base64 ();
use TdeTest;

my $node = new_node('cipher');
$node->start;
my $ring = configure_keys($node);

ok(-f $ring, 'tde_set_master_key created the keyring file');
is(sprintf('%04o', (stat $ring)[2] & 07777), '0600', 'keyring file is mode 0600');

my $enc = 'TDEMARKER-ENC-7f3a9c';
my $plain = 'TDEMARKER-PLAIN-51be2d';
$node->safe_psql('postgres', qq{
	CREATE TABLE enc (id serial PRIMARY KEY, tag text, big text) USING tde_heap;
	ALTER TABLE enc ALTER big SET STORAGE EXTERNAL;
	CREATE INDEX enc_tag ON enc (tag);
	INSERT INTO enc (tag, big) SELECT '$enc' || g, repeat('$enc', 400) FROM generate_series(1, 50) g;
	CREATE TABLE plain (id serial PRIMARY KEY, tag text, big text);
	ALTER TABLE plain ALTER big SET STORAGE EXTERNAL;
	CREATE INDEX plain_tag ON plain (tag);
	INSERT INTO plain (tag, big) SELECT '$plain' || g, repeat('$plain', 400) FROM generate_series(1, 50) g;
	CHECKPOINT;
});

my @leaks = grep { !m{/pg_wal/} } files_containing($node, $enc);
is_deeply(\@leaks, [], 'the encrypted marker is in no relation file');
my @control = files_containing($node, $plain);
ok(scalar(@control) >= 2, 'the plain marker is on disk (heap and index or TOAST): ' . scalar(@control) . ' files');

for my $rel (qw(enc enc_tag enc_pkey enc_id_seq))
{
	is($node->safe_psql('postgres', "SELECT tde_is_encrypted('$rel')"), 't', "$rel is encrypted");
}
# Serial and identity sequences are encrypted from their first page: they are
# created before their table and owned by it only after, and are never
# rewritten (a rewrite gives a new relfilenode; the first one equals the OID),
# so no page of theirs was ever plaintext on disk.
$node->safe_psql('postgres', q{
	CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY, v text) USING tde_heap;
	CREATE TABLE later (v text) USING tde_heap;
	ALTER TABLE later ADD COLUMN id bigserial;
	CREATE TABLE plainseq (id serial, v text);
});
for my $seq (qw(enc_id_seq ident_id_seq later_id_seq))
{
	is($node->safe_psql('postgres', "SELECT tde_is_encrypted('$seq') AND relfilenode = oid FROM pg_class WHERE relname = '$seq'"),
		't', "$seq is encrypted in the file it was created with");
}
is($node->safe_psql('postgres', "SELECT tde_is_encrypted('plainseq_id_seq') OR relfilenode <> oid FROM pg_class WHERE relname = 'plainseq_id_seq'"),
	'f', 'the sequence of a plain table is plain, and was not rewritten either');
is($node->safe_psql('postgres',
	"SELECT tde_is_encrypted(reltoastrelid::regclass) FROM pg_class WHERE relname = 'enc'"),
	't', 'the TOAST table is encrypted');
is($node->safe_psql('postgres', "SELECT tde_is_encrypted('plain')"), 'f', 'plain is not encrypted');
is($node->safe_psql('postgres', "SELECT count(*) FROM tde_status WHERE relation::text LIKE 'enc%'"),
	'4', 'tde_status lists enc, its indexes and its sequence');

# The master key never reaches the data directory (WAL included) or the log,
# raw or base64.
my $ring_json = slurp_file($ring);
my ($mek_b64) = $ring_json =~ /"mek-1"\s*:\s*"([^"]+)"/;
ok(defined $mek_b64, 'keyring holds mek-1');
my $mek_raw = MIME::Base64::decode_base64($mek_b64);
is(length($mek_raw), 32, 'mek-1 is 32 bytes');
is_deeply([ files_containing($node, $mek_raw, include_wal => 1) ], [], 'raw master key is in no file under PGDATA, WAL included');
is_deeply([ files_containing($node, $mek_b64, include_wal => 1) ], [], 'base64 master key is in no file under PGDATA');
unlike(slurp_file($node->logfile), qr/\Q$mek_b64\E/, 'nor in the server log');

# Reads back, via index and TOAST, before and after a restart.
my $q = "SELECT count(*), sum(length(big)) FROM enc WHERE tag LIKE '$enc%'";
is($node->safe_psql('postgres', $q), '50|' . (50 * 400 * length($enc)), 'rows read back');
$node->restart;
is($node->safe_psql('postgres', $q), '50|' . (50 * 400 * length($enc)), 'rows read back after restart');
is($node->safe_psql('postgres', "SET enable_seqscan = off; SELECT id FROM enc WHERE tag = '${enc}7'"),
	'7', 'index scan finds the row');

# The on-disk checksum is the checksum of the stored (encrypted) page.
$node->stop;
my $pg_checksums = $node->config_data('--bindir') . '/pg_checksums';
my ($stdout, $stderr);
IPC::Run::run([ $pg_checksums, '--check', '-D', $node->data_dir ], '>', \$stdout, '2>', \$stderr);
like($stdout, qr/Bad checksums:\s+0/, 'pg_checksums accepts the encrypted cluster');

# A flipped byte in an encrypted page is reported as a checksum failure.
$node->start;
my $path = $node->safe_psql('postgres', "SELECT pg_relation_filepath('enc')");
$node->stop;
my $file = $node->data_dir . "/$path";
open(my $fh, '+<:raw', $file) or die "open $file: $!";
seek($fh, 4000, 0);
my $byte;
read($fh, $byte, 1);
seek($fh, 4000, 0);
print $fh chr(ord($byte) ^ 0x20);
close $fh;
$node->start;
my ($rc, $out, $err) = $node->psql('postgres', 'SELECT count(*) FROM enc');
like($err, qr/invalid page|checksum/, 'a corrupted encrypted page is reported, not hidden');

$node->stop;
done_testing();
