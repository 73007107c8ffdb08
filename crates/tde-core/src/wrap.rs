//! Key wrapping with AES-256-GCM and associated data.
//!
//! Why this exists: table keys are stored only wrapped by a key-encryption key, and
//! key-encryption keys only wrapped by a master key. Wrapping is authenticated encryption
//! whose associated data names what the key protects (e.g. the relation and key version),
//! so a wrapped key copied onto another relation, or altered on disk, fails to unwrap.
//!
//! Blob layout: `nonce (12) || ciphertext (key length) || tag (16)`.
//!
//! Nonces are 96 random bits from the OS CSPRNG, one per wrap. With random nonces GCM stays
//! within NIST SP 800-38D's bound (collision probability below 2^-32) for up to 2^32
//! wraps under one key; a key-encryption key wraps one key per table key version, many
//! orders of magnitude fewer, and master keys wrap fewer still.

use aes_gcm::aead::{Nonce, Tag};
use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use zeroize::Zeroizing;

use crate::secret::{random_fill, Error, TableKey, WrapKey, TABLE_KEY_LEN, WRAP_KEY_LEN};

/// GCM nonce length in bytes.
pub const NONCE_LEN: usize = 12;
/// GCM tag length in bytes.
pub const TAG_LEN: usize = 16;
/// Length of a wrapped [`TableKey`]: nonce + 64 + tag = 92.
pub const WRAPPED_TABLE_KEY_LEN: usize = NONCE_LEN + TABLE_KEY_LEN + TAG_LEN;
/// Length of a wrapped [`WrapKey`]: nonce + 32 + tag = 60.
pub const WRAPPED_WRAP_KEY_LEN: usize = NONCE_LEN + WRAP_KEY_LEN + TAG_LEN;

/// Wraps a table key under a key-encryption key, binding it to `aad`.
pub fn wrap_table_key(kek: &WrapKey, tek: &TableKey, aad: &[u8]) -> Result<[u8; WRAPPED_TABLE_KEY_LEN], Error> {
    let mut blob = [0u8; WRAPPED_TABLE_KEY_LEN];
    wrap_into(kek, tek.expose(), aad, &mut blob)?;
    Ok(blob)
}

/// Unwraps a table key. Any failure other than a wrong blob length is reported as
/// [`Error::Unwrap`], without saying whether the key, the associated data or the blob
/// was wrong.
pub fn unwrap_table_key(kek: &WrapKey, blob: &[u8], aad: &[u8]) -> Result<TableKey, Error> {
    let mut plain = Zeroizing::new([0u8; TABLE_KEY_LEN]);
    unwrap_into(kek, blob, aad, &mut plain[..])?;
    TableKey::from_bytes(&plain[..]).map_err(|_| Error::Unwrap)
}

/// Wraps a 32-byte key (a key-encryption key) under a master key, binding it to `aad`.
pub fn wrap_wrap_key(mek: &WrapKey, k: &WrapKey, aad: &[u8]) -> Result<[u8; WRAPPED_WRAP_KEY_LEN], Error> {
    let mut blob = [0u8; WRAPPED_WRAP_KEY_LEN];
    wrap_into(mek, k.expose(), aad, &mut blob)?;
    Ok(blob)
}

/// Unwraps a 32-byte key; failures as for [`unwrap_table_key`].
pub fn unwrap_wrap_key(mek: &WrapKey, blob: &[u8], aad: &[u8]) -> Result<WrapKey, Error> {
    let mut plain = Zeroizing::new([0u8; WRAP_KEY_LEN]);
    unwrap_into(mek, blob, aad, &mut plain[..])?;
    WrapKey::from_bytes(&plain[..]).map_err(|_| Error::Unwrap)
}

/// Seals `plain` into `blob` (whose length is nonce + plain + tag) with a fresh nonce.
fn wrap_into(key: &WrapKey, plain: &[u8], aad: &[u8], blob: &mut [u8]) -> Result<(), Error> {
    if blob.len() != NONCE_LEN + plain.len() + TAG_LEN {
        return Err(Error::Wrap);
    }
    let (nonce, rest) = blob.split_at_mut(NONCE_LEN);
    random_fill(nonce)?;
    let (body, tag_out) = rest.split_at_mut(plain.len());
    body.copy_from_slice(plain);
    let mut nonce_arr = [0u8; NONCE_LEN];
    nonce_arr.copy_from_slice(nonce);
    let tag = gcm_seal(key.expose(), &nonce_arr, aad, body)?;
    tag_out.copy_from_slice(&tag);
    Ok(())
}

/// Opens `blob` into `plain` (whose length fixes the expected blob length).
fn unwrap_into(key: &WrapKey, blob: &[u8], aad: &[u8], plain: &mut [u8]) -> Result<(), Error> {
    let expected = NONCE_LEN + plain.len() + TAG_LEN;
    if blob.len() != expected {
        return Err(Error::WrappedKeyLength { expected, actual: blob.len() });
    }
    let (nonce, rest) = blob.split_at(NONCE_LEN);
    let (body, tag) = rest.split_at(plain.len());
    let mut nonce_arr = [0u8; NONCE_LEN];
    nonce_arr.copy_from_slice(nonce);
    let mut tag_arr = [0u8; TAG_LEN];
    tag_arr.copy_from_slice(tag);
    plain.copy_from_slice(body);
    gcm_open(key.expose(), &nonce_arr, aad, plain, &tag_arr)
}

/// The AES-256-GCM primitive: encrypts `buf` in place and returns the tag. Private so that
/// callers cannot choose nonces; tests drive it with the published vectors' fixed nonces.
fn gcm_seal(key: &[u8; 32], nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut [u8]) -> Result<[u8; TAG_LEN], Error> {
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| Error::Wrap)?;
    let nonce = Nonce::<Aes256Gcm>::from(*nonce);
    let tag = cipher.encrypt_inout_detached(&nonce, aad, buf.into()).map_err(|_| Error::Wrap)?;
    Ok(tag.into())
}

/// Inverse of [`gcm_seal`]: verifies the tag, then decrypts `buf` in place. On failure
/// `buf` is wiped and [`Error::Unwrap`] returned.
fn gcm_open(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), Error> {
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| Error::Unwrap)?;
    let nonce = Nonce::<Aes256Gcm>::from(*nonce);
    let tag = Tag::<Aes256Gcm>::from(*tag);
    let r = cipher.decrypt_inout_detached(&nonce, aad, (&mut *buf).into(), &tag);
    if r.is_err() {
        zeroize::Zeroize::zeroize(buf);
        return Err(Error::Unwrap);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        assert!(s.len().is_multiple_of(2));
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// One AES-256-GCM known-answer test: (name, key, iv, plaintext, aad, ciphertext, tag).
    type GcmVector = (&'static str, &'static str, &'static str, &'static str, &'static str, &'static str, &'static str);

    const K15: &str = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308";
    const IV15: &str = "cafebabefacedbaddecaf888";

    /// Test cases 13–16 (the AES-256 cases) from D. McGrew and J. Viega, "The
    /// Galois/Counter Mode of Operation (GCM)", revised 2005, Appendix B. Cross-checked
    /// against OpenSSL (Python `cryptography` AESGCM) before being added here.
    const MCGREW_VIEGA_GCM_256: [GcmVector; 4] = [
        (
            "test case 13",
            "0000000000000000000000000000000000000000000000000000000000000000",
            "000000000000000000000000",
            "",
            "",
            "",
            "530f8afbc74536b9a963b4f1c4cb738b",
        ),
        (
            "test case 14",
            "0000000000000000000000000000000000000000000000000000000000000000",
            "000000000000000000000000",
            "00000000000000000000000000000000",
            "",
            "cea7403d4d606b6e074ec5d3baf39d18",
            "d0d1c8a799996bf0265b98b5d48ab919",
        ),
        (
            "test case 15",
            K15,
            IV15,
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255",
            "",
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
             8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
            "b094dac5d93471bdec1a502270e3cc6c",
        ),
        (
            "test case 16",
            K15,
            IV15,
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
            "feedfacedeadbeeffeedfacedeadbeefabaddad2",
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
             8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
            "76fc6ece0f4e1768cddf8853bb2d551b",
        ),
    ];

    #[test]
    fn gcm_primitive_matches_published_vectors() {
        for (name, k, iv, p, a, c, t) in MCGREW_VIEGA_GCM_256 {
            let key: [u8; 32] = hex(k).try_into().unwrap();
            let nonce: [u8; 12] = hex(iv).try_into().unwrap();
            let mut buf = hex(p);
            let tag = gcm_seal(&key, &nonce, &hex(a), &mut buf).unwrap();
            assert_eq!(buf, hex(c), "{name}: ciphertext");
            assert_eq!(tag.to_vec(), hex(t), "{name}: tag");
            gcm_open(&key, &nonce, &hex(a), &mut buf, &tag).unwrap();
            assert_eq!(buf, hex(p), "{name}: decrypt");
        }
    }

    #[test]
    fn gcm_open_rejects_bad_tag_and_wipes() {
        let (_, k, iv, p, a, c, t) = MCGREW_VIEGA_GCM_256[3];
        let key: [u8; 32] = hex(k).try_into().unwrap();
        let nonce: [u8; 12] = hex(iv).try_into().unwrap();
        let mut tag: [u8; 16] = hex(t).try_into().unwrap();
        tag[0] ^= 1;
        let mut buf = hex(c);
        assert_eq!(gcm_open(&key, &nonce, &hex(a), &mut buf, &tag), Err(Error::Unwrap));
        assert_ne!(buf, hex(p));
        assert!(buf.iter().all(|&b| b == 0));
    }

    const AAD: &[u8] = b"tde:table-key:db=5:rel=16384:v=1";

    #[test]
    fn table_key_round_trip() {
        let kek = WrapKey::generate().unwrap();
        let tek = TableKey::generate().unwrap();
        let blob = wrap_table_key(&kek, &tek, AAD).unwrap();
        assert_eq!(blob.len(), 92);
        let back = unwrap_table_key(&kek, &blob, AAD).unwrap();
        assert_eq!(back.expose(), tek.expose());
        // The key bytes do not appear in the blob.
        assert!(!blob.windows(16).any(|w| w == &tek.expose()[..16]));
    }

    #[test]
    fn wrap_key_round_trip() {
        let mek = WrapKey::generate().unwrap();
        let kek = WrapKey::generate().unwrap();
        let blob = wrap_wrap_key(&mek, &kek, AAD).unwrap();
        assert_eq!(blob.len(), 60);
        let back = unwrap_wrap_key(&mek, &blob, AAD).unwrap();
        assert_eq!(back.expose(), kek.expose());
    }

    #[test]
    fn wrapping_twice_uses_fresh_nonces() {
        let kek = WrapKey::generate().unwrap();
        let tek = TableKey::generate().unwrap();
        let a = wrap_table_key(&kek, &tek, AAD).unwrap();
        let b = wrap_table_key(&kek, &tek, AAD).unwrap();
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
        assert_ne!(a, b);
    }

    #[test]
    fn tampering_fails_with_the_same_opaque_error() {
        let kek = WrapKey::generate().unwrap();
        let tek = TableKey::generate().unwrap();
        let blob = wrap_table_key(&kek, &tek, AAD).unwrap();
        // Every single-bit flip anywhere in the blob (nonce, ciphertext, tag) is rejected.
        for i in 0..blob.len() {
            let mut bad = blob;
            bad[i] ^= 0x01;
            assert_eq!(unwrap_table_key(&kek, &bad, AAD).err(), Some(Error::Unwrap), "flip at byte {i}");
        }
        // Wrong associated data.
        assert_eq!(unwrap_table_key(&kek, &blob, b"tde:table-key:db=5:rel=16385:v=1").err(), Some(Error::Unwrap));
        assert_eq!(unwrap_table_key(&kek, &blob, b"").err(), Some(Error::Unwrap));
        // Wrong key.
        let other = WrapKey::generate().unwrap();
        assert_eq!(unwrap_table_key(&other, &blob, AAD).err(), Some(Error::Unwrap));
    }

    #[test]
    fn wrap_key_tampering_fails() {
        let mek = WrapKey::generate().unwrap();
        let k = WrapKey::generate().unwrap();
        let mut blob = wrap_wrap_key(&mek, &k, AAD).unwrap();
        assert_eq!(unwrap_wrap_key(&mek, &blob, b"other").err(), Some(Error::Unwrap));
        assert_eq!(unwrap_wrap_key(&WrapKey::generate().unwrap(), &blob, AAD).err(), Some(Error::Unwrap));
        blob[NONCE_LEN + 3] ^= 0x80;
        assert_eq!(unwrap_wrap_key(&mek, &blob, AAD).err(), Some(Error::Unwrap));
    }

    #[test]
    fn wrong_length_blobs_are_rejected() {
        let kek = WrapKey::generate().unwrap();
        let tek = TableKey::generate().unwrap();
        let blob = wrap_table_key(&kek, &tek, AAD).unwrap();
        assert_eq!(
            unwrap_table_key(&kek, &blob[..91], AAD).err(),
            Some(Error::WrappedKeyLength { expected: 92, actual: 91 })
        );
        // A table-key blob is not a wrap-key blob.
        assert!(unwrap_wrap_key(&kek, &blob, AAD).is_err());
    }
}
