//! One page on its way to or from disk: tweak inputs and data checksums.
//!
//! The cipher layout (first 16 header bytes plain, the rest AES-256-XTS with
//! a tweak from file, fork, block and page LSN) is tde-core's `page` module.
//! This file adds what needs the server:
//!
//! - The fork in the tweak: the init fork of an unlogged relation is copied
//!   byte for byte over its main fork at crash restart, so init-fork pages
//!   are encrypted as main-fork pages.
//! - Data checksums: pd_checksum on disk is the checksum of the page *as
//!   stored*, so pg_checksums and base-backup verification work unchanged.
//!   On read we verify it before decrypting; if it fails we hand the buffer
//!   manager a checksum that cannot match, so the corruption is reported by
//!   PostgreSQL exactly as for a plain page, never hidden.

use std::ffi::c_char;

use pgrx::pg_sys;
use tde_core::page::{decrypt_page, encrypt_page_alt, key_alt, stored_kind, PagePosition, Stored, PAGE_SIZE};

use crate::keys::local::Ciphers;

use crate::pg::pg_checksum_page;

const CHECKSUM_OFFSET: usize = 8;

fn checksums_enabled() -> bool {
    thread_local!(static ON: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) });
    ON.with(|on| {
        *on.get().get_or_insert_with(|| {
            // SAFETY: reads the control file copy in shared memory; data
            // checksums can only change while the server is down.
            unsafe { pg_sys::DataChecksumsEnabled() }
        })
    })
}

fn position(rel: u32, fork: pg_sys::ForkNumber::Type, block: u32) -> PagePosition {
    let fork = if fork == pg_sys::ForkNumber::INIT_FORKNUM { pg_sys::ForkNumber::MAIN_FORKNUM } else { fork };
    PagePosition { rel_number: rel, fork: fork as u8, block }
}

fn checksum(page: &mut [u8; PAGE_SIZE], block: u32) -> u16 {
    // SAFETY: a full, writable page; pg_checksum_page zeroes and restores
    // pd_checksum while it computes.
    unsafe { pg_checksum_page(page.as_mut_ptr() as *mut c_char, block) }
}

fn set_checksum(page: &mut [u8; PAGE_SIZE], v: u16) {
    page[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 2].copy_from_slice(&v.to_ne_bytes());
}

/// PageIsNew: pd_upper (bytes 14..16, plaintext) is zero.  PostgreSQL never
/// checksums such pages, and pg_checksum_page must not be called on them.
fn is_new(page: &[u8; PAGE_SIZE]) -> bool {
    page[14] == 0 && page[15] == 0
}

fn stored_checksum(page: &[u8; PAGE_SIZE]) -> u16 {
    u16::from_ne_bytes([page[CHECKSUM_OFFSET], page[CHECKSUM_OFFSET + 1]])
}

fn cipher_failed(what: &'static str) -> ! {
    crate::error::TdeError::Cipher(what).raise()
}

/// Encrypts `src` into `dst`.
/// Under the file's current key version, marked with its parity.
pub fn encrypt(
    c: &mut Ciphers,
    rel: u32,
    fork: pg_sys::ForkNumber::Type,
    block: u32,
    src: &[u8; PAGE_SIZE],
    dst: &mut [u8; PAGE_SIZE],
) {
    let alt = c.current_alt;
    let encrypted = encrypt_page_alt(&mut c.current, &position(rel, fork, block), src, dst, alt)
        .unwrap_or_else(|_| cipher_failed("encryption"));
    if encrypted && checksums_enabled() && !is_new(dst) {
        let sum = checksum(dst, block);
        set_checksum(dst, sum);
    }
}

/// Whether a page read from disk carries tde's "encrypted" mark (checked on
/// every page of a plain relation: reads two bytes, never scans the page).
pub fn is_marked(page: &[u8; PAGE_SIZE]) -> bool {
    tde_core::page::is_marked(page)
}

/// What `decrypt` did with a page.
pub enum Decrypted {
    /// Decrypted (or all zeros, or a corrupt page handed on for PostgreSQL
    /// to report its checksum).
    Done,
    /// A non-zero page that is not marked as encrypted, left as read: the
    /// caller refuses it.
    NotMarked,
    /// Marked with a key version parity that no live version has (its
    /// version was retired, or the key store is older than the file).
    NoVersion,
}

/// Decrypts `page` in place, with the live key version its mark names.  A
/// page whose stored checksum fails is handed on for PostgreSQL to report,
/// marked or not.
pub fn decrypt(
    c: &mut Ciphers,
    rel: u32,
    fork: pg_sys::ForkNumber::Type,
    block: u32,
    page: &mut [u8; PAGE_SIZE],
) -> Decrypted {
    let with_checksum = checksums_enabled() && !is_new(page);
    let verified = !with_checksum || checksum(page, block) == stored_checksum(page);
    let cipher = match stored_kind(page) {
        Stored::Zero => return Decrypted::Done,
        // Not rewritten yet by tde_encrypt_table / tde_decrypt_table: plain.
        Stored::Plain if c.accept_plain => return Decrypted::Done,
        // PostgreSQL reports the bad checksum, or the caller refuses it.
        Stored::Plain => return if verified { Decrypted::NotMarked } else { Decrypted::Done },
        Stored::Encrypted => match c.for_alt(key_alt(page)) {
            Some(cipher) => cipher,
            None if !verified => return Decrypted::Done,
            None => return Decrypted::NoVersion,
        },
    };
    let decrypted =
        decrypt_page(cipher, &position(rel, fork, block), page).unwrap_or_else(|_| cipher_failed("decryption"));
    if decrypted && with_checksum {
        let sum = checksum(page, block);
        set_checksum(page, if verified { sum } else { !sum });
    }
    Decrypted::Done
}
