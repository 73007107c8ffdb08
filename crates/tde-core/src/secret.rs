//! Key material types.
//!
//! Why this exists: every key the extension handles (table keys, the key-encryption key,
//! master keys from the file provider) must live in a type that wipes itself when dropped
//! and that cannot leak through formatting or accidental copies. These types therefore
//! implement neither `Debug`, `Display` nor `Clone`; the bytes sit on the heap (so moving
//! a key moves a pointer, not a copy of the secret) and are zeroized on drop. The only way
//! to read them is an explicit `expose()`, meant for cipher setup and key wrapping.

use zeroize::Zeroize;

/// Errors from this crate. No variant ever carries key bytes, and the messages say what
/// failed without saying anything about secret values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The operating system's random number generator failed.
    #[error("the operating system random number generator failed")]
    Rng,
    /// Key material of the wrong length was supplied.
    #[error("key material has the wrong length: expected {expected} bytes, got {actual}")]
    KeyLength { expected: usize, actual: usize },
    /// The two halves of an AES-256-XTS key were equal (IEEE 1619 forbids this and
    /// OpenSSL refuses such keys).
    #[error("invalid AES-XTS key: its two halves are equal")]
    XtsKeyHalvesEqual,
    /// A wrapped key blob has the wrong length (a corrupt or foreign blob).
    #[error("wrapped key has the wrong length: expected {expected} bytes, got {actual}")]
    WrappedKeyLength { expected: usize, actual: usize },
    /// Unwrapping failed. Deliberately says nothing about why (wrong key, wrong associated
    /// data and tampered ciphertext are indistinguishable).
    #[error("key unwrap failed (wrong key, wrong associated data, or corrupted wrapped key)")]
    Unwrap,
    /// Wrapping failed; cannot happen for the fixed sizes used here, reported for completeness.
    #[error("key wrap failed")]
    Wrap,
    /// Data handed to the XTS cipher was empty, not a multiple of 16 bytes, or longer than
    /// one IEEE 1619 data unit.
    #[error("XTS data length must be a non-zero multiple of 16 up to 16 MiB, got {len}")]
    DataLength { len: usize },
    /// A non-zero page handed to `decrypt_page` is not marked as encrypted on disk.
    #[error("the page is not marked as encrypted")]
    NotEncrypted,
    /// The cipher backend (OpenSSL) reported a failure.
    #[error("the AES-XTS cipher backend failed")]
    Cipher,
}

/// Length of a [`TableKey`] in bytes: two independent AES-256 keys.
pub const TABLE_KEY_LEN: usize = 64;
/// Length of a [`WrapKey`] in bytes: one AES-256 key.
pub const WRAP_KEY_LEN: usize = 32;

/// Fill `buf` from the OS CSPRNG.
pub(crate) fn random_fill(buf: &mut [u8]) -> Result<(), Error> {
    getrandom::fill(buf).map_err(|_| Error::Rng)
}

/// A table encryption key (TEK): an AES-256-XTS key pair. Bytes 0..32 are the data key
/// (IEEE 1619 "Key1"), bytes 32..64 the tweak key ("Key2"). The halves are never equal.
pub struct TableKey(Box<[u8; TABLE_KEY_LEN]>);

impl TableKey {
    /// A fresh random key from the OS CSPRNG. A draw whose halves are equal (probability
    /// 2^-256) is rejected and redrawn.
    pub fn generate() -> Result<TableKey, Error> {
        let mut key = TableKey(Box::new([0u8; TABLE_KEY_LEN]));
        loop {
            random_fill(&mut key.0[..])?;
            if !halves_equal(&key.0) {
                return Ok(key);
            }
        }
    }

    /// Takes a copy of `bytes` (which the caller should wipe). Errors if the length is not
    /// 64 or the two halves are equal.
    pub fn from_bytes(bytes: &[u8]) -> Result<TableKey, Error> {
        if bytes.len() != TABLE_KEY_LEN {
            return Err(Error::KeyLength { expected: TABLE_KEY_LEN, actual: bytes.len() });
        }
        let mut key = TableKey(Box::new([0u8; TABLE_KEY_LEN]));
        key.0.copy_from_slice(bytes);
        if halves_equal(&key.0) {
            return Err(Error::XtsKeyHalvesEqual);
        }
        Ok(key)
    }

    /// The raw key bytes. Only for wrapping the key and for setting up a cipher; never log,
    /// print, or store the result unwrapped.
    pub fn expose(&self) -> &[u8; TABLE_KEY_LEN] {
        &self.0
    }
}

impl Drop for TableKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Compares the two XTS halves without an early exit.
fn halves_equal(k: &[u8; TABLE_KEY_LEN]) -> bool {
    let (a, b) = k.split_at(TABLE_KEY_LEN / 2);
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An AES-256-GCM key used to wrap other keys: the key-encryption key (KEK) and master
/// encryption keys (MEK) held by the file provider.
pub struct WrapKey(Box<[u8; WRAP_KEY_LEN]>);

impl WrapKey {
    /// A fresh random key from the OS CSPRNG.
    pub fn generate() -> Result<WrapKey, Error> {
        let mut key = WrapKey(Box::new([0u8; WRAP_KEY_LEN]));
        random_fill(&mut key.0[..])?;
        Ok(key)
    }

    /// Takes a copy of `bytes` (which the caller should wipe). Errors if the length is not 32.
    pub fn from_bytes(bytes: &[u8]) -> Result<WrapKey, Error> {
        if bytes.len() != WRAP_KEY_LEN {
            return Err(Error::KeyLength { expected: WRAP_KEY_LEN, actual: bytes.len() });
        }
        let mut key = WrapKey(Box::new([0u8; WRAP_KEY_LEN]));
        key.0.copy_from_slice(bytes);
        Ok(key)
    }

    /// The raw key bytes. Only for wrapping and for setting up a cipher; never log, print,
    /// or store the result unwrapped.
    pub fn expose(&self) -> &[u8; WRAP_KEY_LEN] {
        &self.0
    }
}

impl Drop for WrapKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_key_generate_is_random_and_valid() {
        let a = TableKey::generate().unwrap();
        let b = TableKey::generate().unwrap();
        assert_ne!(a.expose(), b.expose());
        assert!(!halves_equal(a.expose()));
    }

    #[test]
    fn table_key_from_bytes_round_trips() {
        let bytes: Vec<u8> = (0..64u8).collect();
        let k = TableKey::from_bytes(&bytes).unwrap();
        assert_eq!(&k.expose()[..], &bytes[..]);
    }

    #[test]
    fn table_key_rejects_wrong_length() {
        assert_eq!(TableKey::from_bytes(&[1u8; 32]).err(), Some(Error::KeyLength { expected: 64, actual: 32 }));
        assert!(TableKey::from_bytes(&[1u8; 65]).is_err());
        assert!(TableKey::from_bytes(&[]).is_err());
    }

    #[test]
    fn table_key_rejects_equal_halves() {
        let mut bytes = [0u8; 64];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i % 32) as u8;
        }
        assert_eq!(TableKey::from_bytes(&bytes).err(), Some(Error::XtsKeyHalvesEqual));
        bytes[63] ^= 1;
        assert!(TableKey::from_bytes(&bytes).is_ok());
    }

    #[test]
    fn wrap_key_generate_and_from_bytes() {
        let a = WrapKey::generate().unwrap();
        let b = WrapKey::generate().unwrap();
        assert_ne!(a.expose(), b.expose());
        let c = WrapKey::from_bytes(a.expose()).unwrap();
        assert_eq!(a.expose(), c.expose());
        assert!(WrapKey::from_bytes(&[0u8; 31]).is_err());
        assert!(WrapKey::from_bytes(&[0u8; 64]).is_err());
    }

    #[test]
    fn error_messages_do_not_carry_bytes() {
        // Errors are plain values; their messages are fixed text plus lengths.
        let msg = Error::Unwrap.to_string();
        assert!(msg.contains("unwrap failed"));
        let msg = Error::KeyLength { expected: 64, actual: 3 }.to_string();
        assert!(msg.contains("64") && msg.contains('3'));
    }
}
