//! AES-256-CTR for bytes written outside relation pages: where a spill file
//! gets encrypted.
//!
//! Why this exists: logical decoding's spill files (and, later, temporary
//! files and WAL) are byte streams written at offsets, not 8 KiB pages with
//! a header to keep. A length-preserving stream cipher fits them: the
//! counter is taken from the position, so any byte range can be encrypted
//! or decrypted on its own, in any order, and a file keeps its size.
//!
//! The rule that makes CTR safe is that a (key, counter) pair never covers
//! two different plaintexts. Here the counter block is `nonce || offset/16`
//! (64 + 64 bits, big-endian), so it is unique as long as each nonce names
//! one *incarnation* of one file: whoever calls this must take a fresh
//! nonce whenever a position could be written again with other content (a
//! file removed and created again under the same name). Writing the same
//! bytes again at the same place (appends that rewrite a partial block)
//! gives the same ciphertext and leaks nothing.
//!
//! `StreamKey` is a key that never leaves the process: generated at random,
//! held only inside an OpenSSL context, with no `Debug`, `Display` or
//! `Clone`.

use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;
use zeroize::Zeroizing;

use crate::secret::{random_fill, Error};

/// Length of a stream key (AES-256).
pub const STREAM_KEY_LEN: usize = 32;

/// An AES-256-CTR key that lives only in memory: an OpenSSL EVP context
/// keyed once (the key schedule is OpenSSL's, cleansed when the context is
/// freed); the raw key bytes are wiped as soon as the context holds them.
/// OpenSSL EVP was chosen by benchmark (benches/stream_cipher.rs,
/// docs/benchmarks.md): RustCrypto's `ctr` over `aes` took 2.4 times as
/// long per 8 KiB here.
pub struct StreamKey {
    ctx: CipherCtx,
}

impl StreamKey {
    /// A fresh random key from the OS CSPRNG.
    pub fn generate() -> Result<StreamKey, Error> {
        let mut raw = Zeroizing::new([0u8; STREAM_KEY_LEN]);
        random_fill(&mut raw[..])?;
        Self::from_raw(&raw)
    }

    fn from_raw(raw: &[u8; STREAM_KEY_LEN]) -> Result<StreamKey, Error> {
        let mut ctx = CipherCtx::new().map_err(|_| Error::Cipher)?;
        ctx.encrypt_init(Some(Cipher::aes_256_ctr()), Some(raw), None).map_err(|_| Error::Cipher)?;
        Ok(StreamKey { ctx })
    }

    /// Encrypts or decrypts (the same operation) `buf`, the bytes at
    /// `offset` of the stream named by `nonce`, in place.
    pub fn apply(&mut self, nonce: u64, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.apply_from_block(nonce, offset / 16, (offset % 16) as usize, buf)
    }

    /// `buf` starts `skip` bytes into counter block `block`.
    fn apply_from_block(&mut self, nonce: u64, block: u64, skip: usize, buf: &mut [u8]) -> Result<(), Error> {
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&nonce.to_be_bytes());
        iv[8..].copy_from_slice(&block.to_be_bytes());
        // A new IV keeps the key schedule (EVP_CipherInit_ex with a NULL key).
        self.ctx.encrypt_init(None, None, Some(&iv)).map_err(|_| Error::Cipher)?;
        if skip > 0 {
            let mut pad = [0u8; 16];
            self.update(&mut pad[..skip])?;
        }
        self.update(buf)
    }

    fn update(&mut self, data: &mut [u8]) -> Result<(), Error> {
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len();
        // CTR is a stream mode (block size 1): the output is exactly the input.
        match self.ctx.cipher_update_inplace(data, len) {
            Ok(n) if n == len => Ok(()),
            _ => Err(Error::Cipher),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt. Its initial counter block
    /// f0f1..feff is nonce f0f1f2f3f4f5f6f7 and counter f8f9fafbfcfdfeff,
    /// which is block number 0xf8f9fafbfcfdfeff of our layout.
    #[test]
    fn sp800_38a_f55() {
        let mut key = StreamKey::from_raw(
            &hex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4").try_into().unwrap(),
        )
        .unwrap();
        let plain = hex(concat!(
            "6bc1bee22e409f96e93d7e117393172a",
            "ae2d8a571e03ac9c9eb76fac45af8e51",
            "30c81c46a35ce411e5fbc1191a0a52ef",
            "f69f2445df4f9b17ad2b417be66c3710"
        ));
        let cipher = hex(concat!(
            "601ec313775789a5b7a7f504bbf3d228",
            "f443e3ca4d62b59aca84e990cacaf5c5",
            "2b0930daa23de94ce87017ba2d84988d",
            "dfc9c58db67aada613c2dd08457941a6"
        ));
        let (nonce, block) = (0xf0f1f2f3f4f5f6f7u64, 0xf8f9fafbfcfdfeffu64);
        let mut out = plain.clone();
        key.apply_from_block(nonce, block, 0, &mut out).unwrap();
        assert_eq!(out, cipher);
        // Starting mid-block gives the matching slice of the keystream.
        let mut tail = plain[21..].to_vec();
        key.apply_from_block(nonce, block + 1, 5, &mut tail).unwrap();
        assert_eq!(tail, cipher[21..]);
    }

    #[test]
    fn any_range_decrypts_on_its_own() {
        let mut key = StreamKey::generate().unwrap();
        let plain: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut whole = plain.clone();
        key.apply(42, 100, &mut whole).unwrap();
        // Pieces at odd offsets and lengths give the same bytes.
        let mut pieces = plain.clone();
        let mut at = 0;
        for len in [1usize, 15, 16, 17, 33, 200, 718] {
            key.apply(42, 100 + at as u64, &mut pieces[at..at + len]).unwrap();
            at += len;
        }
        assert_eq!(at, plain.len());
        assert_eq!(pieces, whole);
        assert_ne!(whole, plain);
        key.apply(42, 100, &mut whole).unwrap();
        assert_eq!(whole, plain);
    }

    #[test]
    fn another_nonce_or_key_gives_another_keystream() {
        let mut key = StreamKey::generate().unwrap();
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        key.apply(1, 0, &mut a).unwrap();
        key.apply(2, 0, &mut b).unwrap();
        assert_ne!(a, b);
        let mut c = [0u8; 64];
        StreamKey::generate().unwrap().apply(1, 0, &mut c).unwrap();
        assert_ne!(a, c);
    }
}
