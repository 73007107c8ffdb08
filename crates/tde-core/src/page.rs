//! Page layout: what of a PostgreSQL page is encrypted, and with which tweak.
//!
//! Why this exists: the storage manager wrapper hands us whole 8 KiB pages. The first 16
//! bytes (the part of `PageHeaderData` holding pd_lsn, pd_checksum, pd_flags, pd_lower and
//! pd_upper) stay in plaintext so that recovery, checksum tools and backup tools can read
//! them; bytes 16..8192 (511 AES blocks) are encrypted with AES-256-XTS under a tweak
//! derived from the page's position and its LSN. All-zero pages, which PostgreSQL writes
//! when it extends a relation, are stored as they are so they stay recognisable as new.
//!
//! Each encrypted page says so on disk: bit [`PD_TDE_ENCRYPTED`] of pd_flags, a bit that
//! PostgreSQL never sets (it uses only `PD_VALID_FLAG_BITS` = 0x0007, and `PageIsVerified`
//! rejects any other). `encrypt_page` sets it in the stored copy and `decrypt_page` clears
//! it, so the buffer manager and everything above it see a normal page. A reader that
//! finds the bit on a file it believes to be plain knows it is missing a key (an error,
//! never garbage); a non-zero page without the bit in an encrypted file is refused too.
//! [`PD_TDE_KEY_ALT`] says which of a file's two live key versions encrypted the page
//! (the parity of the version), so that online re-encryption can leave pages under the
//! old and the new version side by side, each page unambiguous.
//!
//! What the files leak by design: the plaintext header (LSN, checksum, flags, fill level),
//! and whether a page is all zeros. Because XTS is deterministic, a page rewritten with the
//! same (position, LSN) — e.g. a hint-bit-only change written without WAL — shows which
//! 16-byte blocks changed; including the LSN in the tweak limits that to such writes.

use zeroize::Zeroize;

use crate::secret::Error;
use crate::xts::PageCipher;

/// PostgreSQL's block size (BLCKSZ). Only the default 8 KiB is supported.
pub const PAGE_SIZE: usize = 8192;
/// Bytes at the start of a page that stay in plaintext.
pub const PLAINTEXT_HEADER_LEN: usize = 16;
/// Highest valid fork number (PostgreSQL's MAX_FORKNUM: main 0, fsm 1, vm 2, init 3).
pub const MAX_FORK: u8 = 3;
/// LSNs below this bound are mapped injectively into the tweak (see [`page_tweak`]).
pub const LSN_TWEAK_LIMIT: u64 = 1 << 62;
/// Offset of pd_flags (a native-endian u16) in PageHeaderData: after pd_lsn (8 bytes) and
/// pd_checksum (2 bytes).
pub const PD_FLAGS_OFFSET: usize = 10;
/// PostgreSQL's `PD_VALID_FLAG_BITS`: the only pd_flags bits a page in a buffer may have.
pub const PD_VALID_FLAG_BITS: u16 = 0x0007;
/// On disk only: the page is encrypted.
pub const PD_TDE_ENCRYPTED: u16 = 0x8000;
/// On disk only: the page is encrypted under an even key version of its file (a file
/// has at most two live versions, consecutive, so the parity names one).
pub const PD_TDE_KEY_ALT: u16 = 0x4000;
/// Every pd_flags bit tde uses on disk.
pub const PD_TDE_BITS: u16 = PD_TDE_ENCRYPTED | PD_TDE_KEY_ALT;

/// What a page read from disk is, judged by its plaintext header alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// All zeros: a freshly extended page, never encrypted.
    Zero,
    /// Not marked as encrypted.
    Plain,
    /// Marked as encrypted by [`encrypt_page`].
    Encrypted,
}

fn pd_flags(page: &[u8; PAGE_SIZE]) -> u16 {
    u16::from_ne_bytes([page[PD_FLAGS_OFFSET], page[PD_FLAGS_OFFSET + 1]])
}

fn set_pd_flags(page: &mut [u8; PAGE_SIZE], flags: u16) {
    page[PD_FLAGS_OFFSET..PD_FLAGS_OFFSET + 2].copy_from_slice(&flags.to_ne_bytes());
}

/// Whether a stored page carries the "encrypted" mark (two bytes read: cheap
/// enough for every page of a plain relation).
pub fn is_marked(page: &[u8; PAGE_SIZE]) -> bool {
    pd_flags(page) & PD_TDE_ENCRYPTED != 0
}

/// Whether a page encrypted under key `version` carries [`PD_TDE_KEY_ALT`].
pub fn alt_for_version(version: u32) -> bool {
    version.is_multiple_of(2)
}

/// Whether a stored (marked) page carries [`PD_TDE_KEY_ALT`]: which of its file's two
/// live key versions encrypted it.
pub fn key_alt(page: &[u8; PAGE_SIZE]) -> bool {
    pd_flags(page) & PD_TDE_KEY_ALT != 0
}

/// Classifies a stored page (cheap: reads pd_flags, and scans for zeros only when the
/// page is not marked).
pub fn stored_kind(page: &[u8; PAGE_SIZE]) -> Stored {
    if is_marked(page) {
        Stored::Encrypted
    } else if is_all_zero(page) {
        Stored::Zero
    } else {
        Stored::Plain
    }
}

/// Where a page lives: the relation file number (not the OID of the relation, and on
/// purpose not the tablespace or database), the fork, and the block number in the fork.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PagePosition {
    /// RelFileNumber of the relation file.
    pub rel_number: u32,
    /// Fork number, 0..=[`MAX_FORK`].
    pub fork: u8,
    /// Block number within the fork (PostgreSQL's BlockNumber; at most 0xFFFF_FFFE).
    pub block: u32,
}

/// The 16-byte XTS tweak (IEEE 1619's data unit number) for a page.
///
/// Byte layout (all little-endian):
///
/// | bytes  | content                                         |
/// |--------|-------------------------------------------------|
/// | 0..4   | `block`                                         |
/// | 4..8   | `rel_number`                                    |
/// | 8..16  | `lsn ^ (fork << 62)`                            |
///
/// Why this is collision-free: block and rel_number are full 32-bit values and get 32 bits
/// each. The fork (0..=3) needs 2 bits, and the only field with spare bits is the LSN: an
/// LSN is a byte position in the WAL stream, and reaching 2^62 would take 4 EiB of WAL
/// (146 years at a sustained 1 GB/s), while the fake LSNs PostgreSQL uses for unlogged and
/// temporary relations are small counters. For every `lsn < 2^62` and `fork <= 3` the
/// top two bits of bytes 8..16 are exactly the fork and the low 62 bits exactly the LSN,
/// so distinct (rel_number, fork, block, lsn) give distinct tweaks. Past 2^62 the XOR keeps
/// the tweak deterministic (pages still decrypt) but uniqueness is no longer guaranteed.
/// No hashing is involved, so uniqueness is a property of the packing, not of probability.
///
/// The tablespace and database OIDs are deliberately left out: `CREATE DATABASE ...
/// STRATEGY FILE_COPY` and `ALTER DATABASE ... SET TABLESPACE` copy files byte for byte
/// under new OIDs, and those pages must still decrypt.
pub fn page_tweak(pos: &PagePosition, lsn: u64) -> [u8; 16] {
    debug_assert!(pos.fork <= MAX_FORK, "fork number out of range");
    let mut t = [0u8; 16];
    t[0..4].copy_from_slice(&pos.block.to_le_bytes());
    t[4..8].copy_from_slice(&pos.rel_number.to_le_bytes());
    let mixed = lsn ^ (u64::from(pos.fork & 0x3) << 62);
    t[8..16].copy_from_slice(&mixed.to_le_bytes());
    t
}

/// The page LSN as PostgreSQL reads it (`PageGetLSN`): pd_lsn is a `PageXLogRecPtr`,
/// two native-endian 32-bit halves, `xlogid` (high) then `xrecoff` (low).
pub fn page_lsn(page: &[u8; PAGE_SIZE]) -> u64 {
    let hi = u32::from_ne_bytes([page[0], page[1], page[2], page[3]]);
    let lo = u32::from_ne_bytes([page[4], page[5], page[6], page[7]]);
    (u64::from(hi) << 32) | u64::from(lo)
}

/// True if every byte of the page is zero (a freshly extended page).
pub fn is_all_zero(page: &[u8; PAGE_SIZE]) -> bool {
    // The answer is public (the output shows it), so an early exit is fine; chunks of 8
    // bytes keep the common non-zero case to one comparison.
    page.chunks_exact(8).all(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) == 0)
}

/// Encrypts one page from `src` into `dst` (a private bounce buffer; the caller's buffer
/// in shared memory is never modified). The first [`PLAINTEXT_HEADER_LEN`] bytes are
/// copied unchanged; the tweak uses `pos` and the LSN found in the header. All-zero pages
/// are copied through unchanged. The stored copy is marked with [`PD_TDE_ENCRYPTED`].
/// Returns whether it encrypted.
///
/// On error `dst` is zeroed, so a caller that wrongly ignored the error still could not
/// write the plaintext out.
pub fn encrypt_page(
    c: &mut PageCipher,
    pos: &PagePosition,
    src: &[u8; PAGE_SIZE],
    dst: &mut [u8; PAGE_SIZE],
) -> Result<bool, Error> {
    encrypt_page_alt(c, pos, src, dst, false)
}

/// [`encrypt_page`] under a key version whose pages carry [`PD_TDE_KEY_ALT`] if `alt`
/// (see [`alt_for_version`]).
pub fn encrypt_page_alt(
    c: &mut PageCipher,
    pos: &PagePosition,
    src: &[u8; PAGE_SIZE],
    dst: &mut [u8; PAGE_SIZE],
    alt: bool,
) -> Result<bool, Error> {
    if is_all_zero(src) {
        dst.fill(0);
        return Ok(false);
    }
    let (src_head, src_body) = src.split_at(PLAINTEXT_HEADER_LEN);
    let (dst_head, dst_body) = dst.split_at_mut(PLAINTEXT_HEADER_LEN);
    dst_head.copy_from_slice(src_head);
    let tweak = page_tweak(pos, page_lsn(src));
    // Out of place: reads `src` once and writes `dst` once, no separate copy.
    if let Err(e) = c.encrypt_into(&tweak, src_body, dst_body) {
        dst.zeroize();
        return Err(e);
    }
    let alt_bit = if alt { PD_TDE_KEY_ALT } else { 0 };
    set_pd_flags(dst, (pd_flags(src) & !PD_TDE_BITS) | PD_TDE_ENCRYPTED | alt_bit);
    Ok(true)
}

/// Decrypts one page in place, reading the LSN from its plaintext header, and clears the
/// on-disk marker bits. All-zero pages pass through unchanged. A non-zero page that is
/// not marked as encrypted is refused with [`Error::NotEncrypted`] and left untouched.
/// Returns whether it decrypted. On a cipher error the page contents are unspecified and
/// must not be used.
pub fn decrypt_page(c: &mut PageCipher, pos: &PagePosition, page: &mut [u8; PAGE_SIZE]) -> Result<bool, Error> {
    match stored_kind(page) {
        Stored::Zero => return Ok(false),
        Stored::Plain => return Err(Error::NotEncrypted),
        Stored::Encrypted => {}
    }
    let tweak = page_tweak(pos, page_lsn(page));
    c.decrypt(&tweak, &mut page[PLAINTEXT_HEADER_LEN..])?;
    let flags = pd_flags(page) & !PD_TDE_BITS;
    set_pd_flags(page, flags);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::TableKey;
    use std::collections::HashSet;

    fn cipher() -> PageCipher {
        PageCipher::new(&TableKey::generate().unwrap()).unwrap()
    }

    fn set_lsn(page: &mut [u8; PAGE_SIZE], lsn: u64) {
        page[0..4].copy_from_slice(&((lsn >> 32) as u32).to_ne_bytes());
        page[4..8].copy_from_slice(&(lsn as u32).to_ne_bytes());
    }

    fn sample_page(lsn: u64) -> Box<[u8; PAGE_SIZE]> {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        for (i, b) in p.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        set_lsn(&mut p, lsn);
        // A page as the buffer manager has it: only PD_VALID_FLAG_BITS in pd_flags.
        set_pd_flags(&mut p, 0x0005);
        p
    }

    const POS: PagePosition = PagePosition { rel_number: 16384, fork: 0, block: 7 };

    #[test]
    fn key_version_parity_is_marked_and_cleared() {
        let src = sample_page(0x1234_5678);
        for version in 1..=4u32 {
            let mut c = cipher();
            let mut dst = Box::new([0u8; PAGE_SIZE]);
            assert!(encrypt_page_alt(&mut c, &POS, &src, &mut dst, alt_for_version(version)).unwrap());
            assert!(is_marked(&dst));
            assert_eq!(key_alt(&dst), version.is_multiple_of(2), "version {version}");
            assert!(decrypt_page(&mut c, &POS, &mut dst).unwrap());
            assert_eq!(&dst[..], &src[..], "both bits are cleared on decryption");
        }
        assert!(!alt_for_version(1), "version 1 pages (written before rotation existed) carry no bit");
    }

    #[test]
    fn tweak_layout_is_as_documented() {
        let pos = PagePosition { rel_number: 0x0403_0201, fork: 2, block: 0x1413_1211 };
        let t = page_tweak(&pos, 0x2827_2625_2423_2221);
        assert_eq!(t, [0x11, 0x12, 0x13, 0x14, 0x01, 0x02, 0x03, 0x04, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0xa8]);
    }

    #[test]
    fn distinct_positions_and_lsns_give_distinct_tweaks() {
        let rels = [0u32, 1, 2, 16384, 0x8000_0000, u32::MAX - 1, u32::MAX];
        let blocks = [0u32, 1, 2, 131_072, 0x8000_0000, 0xFFFF_FFFE];
        let lsns = [
            0u64,
            1,
            2,
            1000,
            0x1_0000_0000,
            0x0000_0001_0000_0001,
            (1 << 61) | 5,
            LSN_TWEAK_LIMIT - 1,
            LSN_TWEAK_LIMIT >> 1,
        ];
        let mut seen = HashSet::new();
        let mut count = 0;
        for &rel_number in &rels {
            for fork in 0..=MAX_FORK {
                for &block in &blocks {
                    for &lsn in &lsns {
                        let pos = PagePosition { rel_number, fork, block };
                        assert!(seen.insert(page_tweak(&pos, lsn)), "tweak collision at {pos:?} lsn {lsn:#x}");
                        count += 1;
                    }
                }
            }
        }
        assert_eq!(seen.len(), count);
    }

    #[test]
    fn page_lsn_reads_xlogrecptr_halves() {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        set_lsn(&mut p, 0x0000_0001_2345_6789);
        assert_eq!(page_lsn(&p), 0x0000_0001_2345_6789);
    }

    #[test]
    fn round_trip_and_header_unchanged() {
        let mut c = cipher();
        let src = sample_page(0x0000_0002_0000_0100);
        let mut dst = Box::new([0u8; PAGE_SIZE]);
        assert!(encrypt_page(&mut c, &POS, &src, &mut dst).unwrap());
        // The header is plaintext, except for the marker bit in pd_flags.
        assert_eq!(dst[..PD_FLAGS_OFFSET], src[..PD_FLAGS_OFFSET]);
        assert_eq!(dst[PD_FLAGS_OFFSET + 2..PLAINTEXT_HEADER_LEN], src[PD_FLAGS_OFFSET + 2..PLAINTEXT_HEADER_LEN]);
        assert_eq!(pd_flags(&dst), pd_flags(&src) | PD_TDE_ENCRYPTED);
        assert_eq!(stored_kind(&dst), Stored::Encrypted);
        assert!(is_marked(&dst) && !is_marked(&src));
        assert_ne!(dst[PLAINTEXT_HEADER_LEN..], src[PLAINTEXT_HEADER_LEN..]);
        assert!(decrypt_page(&mut c, &POS, &mut dst).unwrap());
        assert_eq!(dst[..], src[..]);
    }

    #[test]
    fn all_zero_pages_pass_through() {
        let mut c = cipher();
        let zero = Box::new([0u8; PAGE_SIZE]);
        let mut dst = Box::new([0xAAu8; PAGE_SIZE]);
        assert!(!encrypt_page(&mut c, &POS, &zero, &mut dst).unwrap());
        assert!(dst.iter().all(|&b| b == 0));
        assert!(!decrypt_page(&mut c, &POS, &mut dst).unwrap());
        assert!(dst.iter().all(|&b| b == 0));
    }

    #[test]
    fn page_with_zero_body_but_header_is_encrypted() {
        let mut c = cipher();
        let mut src = Box::new([0u8; PAGE_SIZE]);
        set_lsn(&mut src, 42);
        let mut dst = Box::new([0u8; PAGE_SIZE]);
        assert!(encrypt_page(&mut c, &POS, &src, &mut dst).unwrap());
        assert!(!dst[PLAINTEXT_HEADER_LEN..].iter().all(|&b| b == 0));
        assert!(decrypt_page(&mut c, &POS, &mut dst).unwrap());
        assert_eq!(dst[..], src[..]);
    }

    #[test]
    fn different_lsn_changes_every_block() {
        let mut c = cipher();
        let a = sample_page(100);
        let mut b = a.clone();
        set_lsn(&mut b, 101);
        let mut ea = Box::new([0u8; PAGE_SIZE]);
        let mut eb = Box::new([0u8; PAGE_SIZE]);
        encrypt_page(&mut c, &POS, &a, &mut ea).unwrap();
        encrypt_page(&mut c, &POS, &b, &mut eb).unwrap();
        // Same body, different LSN: no 16-byte ciphertext block repeats.
        for (x, y) in ea[PLAINTEXT_HEADER_LEN..].chunks_exact(16).zip(eb[PLAINTEXT_HEADER_LEN..].chunks_exact(16)) {
            assert_ne!(x, y);
        }
    }

    #[test]
    fn different_position_encrypts_differently() {
        let mut c = cipher();
        let src = sample_page(100);
        let mut e1 = Box::new([0u8; PAGE_SIZE]);
        let mut e2 = Box::new([0u8; PAGE_SIZE]);
        encrypt_page(&mut c, &POS, &src, &mut e1).unwrap();
        for other in [
            PagePosition { block: 8, ..POS },
            PagePosition { fork: 1, ..POS },
            PagePosition { rel_number: 16385, ..POS },
        ] {
            encrypt_page(&mut c, &other, &src, &mut e2).unwrap();
            assert_ne!(e1[PLAINTEXT_HEADER_LEN..], e2[PLAINTEXT_HEADER_LEN..]);
            // And decrypting at the wrong position does not give the plaintext back.
            let mut wrong = e1.clone();
            decrypt_page(&mut c, &other, &mut wrong).unwrap();
            assert_ne!(wrong[..], src[..]);
        }
    }

    #[test]
    fn unmarked_page_is_refused_and_untouched() {
        let mut c = cipher();
        let mut plain = sample_page(9);
        let before = plain.clone();
        assert_eq!(stored_kind(&plain), Stored::Plain);
        assert_eq!(decrypt_page(&mut c, &POS, &mut plain), Err(Error::NotEncrypted));
        assert_eq!(plain[..], before[..]);
    }

    #[test]
    fn marker_survives_any_page_flags_and_is_cleared_on_read() {
        let mut c = cipher();
        for flags in 0..=PD_VALID_FLAG_BITS {
            let mut src = sample_page(11);
            set_pd_flags(&mut src, flags);
            let mut dst = Box::new([0u8; PAGE_SIZE]);
            encrypt_page(&mut c, &POS, &src, &mut dst).unwrap();
            assert_eq!(pd_flags(&dst) & PD_TDE_BITS, PD_TDE_ENCRYPTED);
            assert_eq!(pd_flags(&dst) & PD_VALID_FLAG_BITS, flags);
            decrypt_page(&mut c, &POS, &mut dst).unwrap();
            assert_eq!(pd_flags(&dst), flags, "the buffer manager sees the page's own flags");
            assert_eq!(dst[..], src[..]);
        }
    }

    #[test]
    fn zero_page_is_zero_not_plain() {
        assert_eq!(stored_kind(&[0u8; PAGE_SIZE]), Stored::Zero);
    }

    #[test]
    fn wrong_key_does_not_decrypt() {
        let src = sample_page(7);
        let mut dst = Box::new([0u8; PAGE_SIZE]);
        encrypt_page(&mut cipher(), &POS, &src, &mut dst).unwrap();
        decrypt_page(&mut cipher(), &POS, &mut dst).unwrap();
        assert_ne!(dst[PLAINTEXT_HEADER_LEN..], src[PLAINTEXT_HEADER_LEN..]);
    }
}
