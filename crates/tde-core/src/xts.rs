//! AES-256-XTS (IEEE 1619-2007), length-preserving, for whole data units.
//!
//! Why this exists: relation pages are encrypted with XTS so a page stays 8 KiB on disk.
//! The implementation is OpenSSL's EVP `aes-256-xts` (AES-NI/VAES assembly), reached
//! through the safe `openssl` crate. It was chosen by benchmark (`benches/page_cipher.rs`,
//! `bench-xts.sh`) over a pipelined XTS on the RustCrypto `aes` crate, which reached only
//! about 0.6x of OpenSSL's throughput on the development machine (AMD EPYC, AES-NI + VAES
//! without AVX-512: the `aes` crate then falls back to 8-block AES-NI, whose generated code
//! is latency-bound), and over RustCrypto's `xts-mode`, about 6x slower still.
//!
//! Each direction has its own `EVP_CIPHER_CTX`, keyed once in [`PageCipher::new`]; a call
//! re-initialises only the IV (the tweak), so the key schedule is not recomputed per page
//! and nothing is allocated per call. OpenSSL wipes the contexts' key schedules when they
//! are freed (`EVP_CIPHER_CTX_free` cleanses provider state).
//!
//! Only whole 16-byte blocks are supported (no ciphertext stealing): pages are multiples of
//! the block size.

use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;

use crate::secret::{Error, TableKey};

/// AES block size in bytes.
pub const BLOCK_LEN: usize = 16;
/// Longest data unit accepted: IEEE 1619 allows at most 2^20 blocks per data unit.
pub const MAX_DATA_UNIT_LEN: usize = BLOCK_LEN << 20;

/// An AES-256-XTS cipher keyed once. Not `Clone`, not `Debug`, not `Sync` (an OpenSSL
/// cipher context is used by one thread at a time); give each process or thread its own.
pub struct PageCipher {
    enc: CipherCtx,
    dec: CipherCtx,
}

impl PageCipher {
    /// Sets up encryption and decryption contexts for `key` (Key1 = bytes 0..32 for data,
    /// Key2 = bytes 32..64 for the tweak, as in IEEE 1619 and OpenSSL).
    pub fn new(key: &TableKey) -> Result<PageCipher, Error> {
        let cipher = Cipher::aes_256_xts();
        let mut enc = CipherCtx::new().map_err(|_| Error::Cipher)?;
        enc.encrypt_init(Some(cipher), Some(key.expose()), None).map_err(|_| Error::Cipher)?;
        let mut dec = CipherCtx::new().map_err(|_| Error::Cipher)?;
        dec.decrypt_init(Some(cipher), Some(key.expose()), None).map_err(|_| Error::Cipher)?;
        Ok(PageCipher { enc, dec })
    }

    /// Encrypts `data` in place as one XTS data unit under `tweak` (IEEE 1619's data unit
    /// number "i" as 16 little-endian bytes; here the page tweak).
    ///
    /// `data.len()` must be a non-zero multiple of 16, at most [`MAX_DATA_UNIT_LEN`];
    /// otherwise [`Error::DataLength`] and `data` is untouched. On [`Error::Cipher`] the
    /// contents of `data` are unspecified and must not be stored.
    pub fn encrypt(&mut self, tweak: &[u8; BLOCK_LEN], data: &mut [u8]) -> Result<(), Error> {
        check_len(data)?;
        self.enc.encrypt_init(None, None, Some(tweak)).map_err(|_| Error::Cipher)?;
        run(&mut self.enc, data)
    }

    /// Encrypts `src` into `dst` (same length, same conditions as [`PageCipher::encrypt`]).
    /// Out of place, so a caller that needs a copy anyway (the page write path) saves a
    /// pass over the data.
    pub fn encrypt_into(&mut self, tweak: &[u8; BLOCK_LEN], src: &[u8], dst: &mut [u8]) -> Result<(), Error> {
        check_len(src)?;
        if dst.len() != src.len() {
            return Err(Error::DataLength { len: dst.len() });
        }
        self.enc.encrypt_init(None, None, Some(tweak)).map_err(|_| Error::Cipher)?;
        let out = self.enc.cipher_update(src, Some(dst)).map_err(|_| Error::Cipher)?;
        if out != src.len() {
            return Err(Error::Cipher);
        }
        Ok(())
    }

    /// Decrypts `data` in place; the inverse of [`PageCipher::encrypt`], same conditions.
    pub fn decrypt(&mut self, tweak: &[u8; BLOCK_LEN], data: &mut [u8]) -> Result<(), Error> {
        check_len(data)?;
        self.dec.decrypt_init(None, None, Some(tweak)).map_err(|_| Error::Cipher)?;
        run(&mut self.dec, data)
    }
}

fn check_len(data: &[u8]) -> Result<(), Error> {
    let len = data.len();
    if len == 0 || !len.is_multiple_of(BLOCK_LEN) || len > MAX_DATA_UNIT_LEN {
        return Err(Error::DataLength { len });
    }
    Ok(())
}

/// One `EVP_CipherUpdate` over the whole data unit (OpenSSL's XTS needs the data unit in a
/// single update call). The length was checked, so the `openssl` crate's size assertions
/// cannot fire.
fn run(ctx: &mut CipherCtx, data: &mut [u8]) -> Result<(), Error> {
    let len = data.len();
    let out = ctx.cipher_update_inplace(data, len).map_err(|_| Error::Cipher)?;
    if out != len {
        return Err(Error::Cipher);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// IEEE Std 1619-2007, Annex B, XTS-AES-256 test vectors 10–14 (also in IEEE P1619
    /// drafts). All share Key1, Key2 and the 512-byte plaintext 00 01 .. ff 00 01 .. ff;
    /// they differ in the data unit sequence number. Each ciphertext was checked against
    /// OpenSSL (Python `cryptography` AES XTS) before being added here.
    const IEEE1619_KEY1: &str = "2718281828459045235360287471352662497757247093699959574966967627";
    const IEEE1619_KEY2: &str = "3141592653589793238462643383279502884197169399375105820974944592";

    /// (vector number, data unit sequence number, ciphertext)
    const IEEE1619_XTS_AES_256: [(u32, u64, &str); 5] = [
        (10, 0xff, "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed43851ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151"),
        (11, 0xffff, "77a31251618a15e6b92d1d66dffe7b50b50bad552305ba0217a610688eff7e11e1d0225438e093242d6db274fde801d4cae06f2092c728b2478559df58e837c2469ee4a4fa794e4bbc7f39bc026e3cb72c33b0888f25b4acf56a2a9804f1ce6d3d6e1dc6ca181d4b546179d55544aa7760c40d06741539c7e3cd9d2f6650b2013fd0eeb8c2b8e3d8d240ccae2d4c98320a7442e1c8d75a42d6e6cfa4c2eca1798d158c7aecdf82490f24bb9b38e108bcda12c3faf9a21141c3613b58367f922aaa26cd22f23d708dae699ad7cb40a8ad0b6e2784973dcb605684c08b8d6998c69aac049921871ebb65301a4619ca80ecb485a31d744223ce8ddc2394828d6a80470c092f5ba413c3378fa6054255c6f9df4495862bbb3287681f931b687c888abf844dfc8fc28331e579928cd12bd2390ae123cf03818d14dedde5c0c24c8ab018bfca75ca096f2d531f3d1619e785f1ada437cab92e980558b3dce1474afb75bfedbf8ff54cb2618e0244c9ac0d3c66fb51598cd2db11f9be39791abe447c63094f7c453b7ff87cb5bb36b7c79efb0872d17058b83b15ab0866ad8a58656c5a7e20dbdf308b2461d97c0ec0024a2715055249cf3b478ddd4740de654f75ca686e0d7345c69ed50cdc2a8b332b1f8824108ac937eb050585608ee734097fc09054fbff89eeaeea791f4a7ab1f9868294a4f9e27b42af8100cb9d59cef9645803"),
        (12, 0xff_ffff, "e387aaa58ba483afa7e8eb469778317ecf4cf573aa9d4eac23f2cdf914e4e200a8b490e42ee646802dc6ee2b471b278195d60918ececb44bf79966f83faba0499298ebc699c0c8634715a320bb4f075d622e74c8c932004f25b41e361025b5a87815391f6108fc4afa6a05d9303c6ba68a128a55705d415985832fdeaae6c8e19110e84d1b1f199a2692119edc96132658f09da7c623efcec712537a3d94c0bf5d7e352ec94ae5797fdb377dc1551150721adf15bd26a8efc2fcaad56881fa9e62462c28f30ae1ceaca93c345cf243b73f542e2074a705bd2643bb9f7cc79bb6e7091ea6e232df0f9ad0d6cf502327876d82207abf2115cdacf6d5a48f6c1879a65b115f0f8b3cb3c59d15dd8c769bc014795a1837f3901b5845eb491adfefe097b1fa30a12fc1f65ba22905031539971a10f2f36c321bb51331cdefb39e3964c7ef079994f5b69b2edd83a71ef549971ee93f44eac3938fcdd61d01fa71799da3a8091c4c48aa9ed263ff0749df95d44fef6a0bb578ec69456aa5408ae32c7af08ad7ba8921287e3bbee31b767be06a0e705c864a769137df28292283ea81a2480241b44d9921cdbec1bc28dc1fda114bd8e5217ac9d8ebafa720e9da4f9ace231cc949e5b96fe76ffc21063fddc83a6b8679c00d35e09576a875305bed5f36ed242c8900dd1fa965bc950dfce09b132263a1eef52dd6888c309f5a7d712826"),
        (13, 0xffff_ffff, "bf53d2dade78e822a4d949a9bc6766b01b06a8ef70d26748c6a7fc36d80ae4c5520f7c4ab0ac8544424fa405162fef5a6b7f229498063618d39f0003cb5fb8d1c86b643497da1ff945c8d3bedeca4f479702a7a735f043ddb1d6aaade3c4a0ac7ca7f3fa5279bef56f82cd7a2f38672e824814e10700300a055e1630b8f1cb0e919f5e942010a416e2bf48cb46993d3cb6a51c19bacf864785a00bc2ecff15d350875b246ed53e68be6f55bd7e05cfc2b2ed6432198a6444b6d8c247fab941f569768b5c429366f1d3f00f0345b96123d56204c01c63b22ce78baf116e525ed90fdea39fa469494d3866c31e05f295ff21fea8d4e6e13d67e47ce722e9698a1c1048d68ebcde76b86fcf976eab8aa9790268b7068e017a8b9b749409514f1053027fd16c3786ea1bac5f15cb79711ee2abe82f5cf8b13ae73030ef5b9e4457e75d1304f988d62dd6fc4b94ed38ba831da4b7634971b6cd8ec325d9c61c00f1df73627ed3745a5e8489f3a95c69639c32cd6e1d537a85f75cc844726e8a72fc0077ad22000f1d5078f6b866318c668f1ad03d5a5fced5219f2eabbd0aa5c0f460d183f04404a0d6f469558e81fab24a167905ab4c7878502ad3e38fdbe62a41556cec37325759533ce8f25f367c87bb5578d667ae93f9e2fd99bcbc5f2fbba88cf6516139420fcff3b7361d86322c4bd84c82f335abb152c4a93411373aaa8220"),
        (14, 0xff_ffff_ffff, "64497e5a831e4a932c09be3e5393376daa599548b816031d224bbf50a818ed2350eae7e96087c8a0db51ad290bd00c1ac1620857635bf246c176ab463be30b808da548081ac847b158e1264be25bb0910bbc92647108089415d45fab1b3d2604e8a8eff1ae4020cfa39936b66827b23f371b92200be90251e6d73c5f86de5fd4a950781933d79a28272b782a2ec313efdfcc0628f43d744c2dc2ff3dcb66999b50c7ca895b0c64791eeaa5f29499fb1c026f84ce5b5c72ba1083cddb5ce45434631665c333b60b11593fb253c5179a2c8db813782a004856a1653011e93fb6d876c18366dd8683f53412c0c180f9c848592d593f8609ca736317d356e13e2bff3a9f59cd9aeb19cd482593d8c46128bb32423b37a9adfb482b99453fbe25a41bf6feb4aa0bef5ed24bf73c762978025482c13115e4015aac992e5613a3b5c2f685b84795cb6e9b2656d8c88157e52c42f978d8634c43d06fea928f2822e465aa6576e9bf419384506cc3ce3c54ac1a6f67dc66f3b30191e698380bc999b05abce19dc0c6dcc2dd001ec535ba18deb2df1a101023108318c75dc98611a09dc48a0acdec676fabdf222f07e026f059b672b56e5cbc8e1d21bbd867dd927212054681d70ea737134cdfce93b6f82ae22423274e58a0821cc5502e2d0ab4585e94de6975be5e0b4efce51cd3e70c25a1fbbbd609d273ad5b0d59631c531f6a0a57b9"),
    ];

    fn ieee_cipher() -> PageCipher {
        let mut key = hex(IEEE1619_KEY1);
        key.extend(hex(IEEE1619_KEY2));
        PageCipher::new(&TableKey::from_bytes(&key).unwrap()).unwrap()
    }

    /// IEEE 1619 data unit number as the 16-byte little-endian tweak.
    fn dusn_tweak(n: u64) -> [u8; 16] {
        let mut t = [0u8; 16];
        t[..8].copy_from_slice(&n.to_le_bytes());
        t
    }

    fn ieee_plaintext() -> Vec<u8> {
        (0..512).map(|i| (i % 256) as u8).collect()
    }

    #[test]
    fn ieee1619_vectors_encrypt() {
        let mut c = ieee_cipher();
        for (n, dusn, ctx) in IEEE1619_XTS_AES_256 {
            let mut buf = ieee_plaintext();
            c.encrypt(&dusn_tweak(dusn), &mut buf).unwrap();
            assert_eq!(buf, hex(ctx), "IEEE 1619 vector {n}");
        }
    }

    #[test]
    fn ieee1619_vectors_decrypt() {
        let mut c = ieee_cipher();
        for (n, dusn, ctx) in IEEE1619_XTS_AES_256 {
            let mut buf = hex(ctx);
            c.decrypt(&dusn_tweak(dusn), &mut buf).unwrap();
            assert_eq!(buf, ieee_plaintext(), "IEEE 1619 vector {n}");
        }
    }

    /// Every length from 1 to 100 blocks, plus page-sized units, against a second,
    /// independent implementation (RustCrypto `aes` + `xts-mode`).
    #[test]
    fn matches_reference_implementation_for_all_lengths() {
        use aes::cipher::KeyInit;
        use aes::Aes256;
        let key = TableKey::generate().unwrap();
        let mut ours = PageCipher::new(&key).unwrap();
        let (k1, k2) = key.expose().split_at(32);
        let reference = xts_mode::Xts128::new(Aes256::new_from_slice(k1).unwrap(), Aes256::new_from_slice(k2).unwrap());
        let tweak = [0x5au8; 16];
        for blocks in (1..=100).chain([511, 512]) {
            let plain: Vec<u8> = (0..blocks * 16).map(|i| (i * 7 + blocks) as u8).collect();
            let mut a = plain.clone();
            let mut b = plain.clone();
            ours.encrypt(&tweak, &mut a).unwrap();
            reference.encrypt_sector(&mut b, tweak.into());
            assert_eq!(a, b, "{blocks} blocks");
            ours.decrypt(&tweak, &mut a).unwrap();
            assert_eq!(a, plain, "{blocks} blocks round trip");
        }
    }

    #[test]
    fn encrypt_into_matches_in_place() {
        let mut c = ieee_cipher();
        let src = ieee_plaintext();
        let mut dst = vec![0u8; src.len()];
        c.encrypt_into(&dusn_tweak(0xffff), &src, &mut dst).unwrap();
        assert_eq!(dst, hex(IEEE1619_XTS_AES_256[1].2));
        let mut short = vec![0u8; src.len() - 16];
        assert!(c.encrypt_into(&dusn_tweak(1), &src, &mut short).is_err());
    }

    #[test]
    fn rejects_bad_lengths_without_touching_data() {
        let mut c = PageCipher::new(&TableKey::generate().unwrap()).unwrap();
        for len in [0usize, 1, 15, 17, 8191] {
            let mut buf = vec![0xabu8; len];
            assert_eq!(c.encrypt(&[0u8; 16], &mut buf), Err(Error::DataLength { len }));
            assert_eq!(c.decrypt(&[0u8; 16], &mut buf), Err(Error::DataLength { len }));
            assert!(buf.iter().all(|&b| b == 0xab));
        }
        let mut big = vec![0u8; MAX_DATA_UNIT_LEN + BLOCK_LEN];
        assert!(c.encrypt(&[0u8; 16], &mut big).is_err());
    }

    #[test]
    fn contexts_are_rekeyed_per_call_only_by_tweak() {
        // Interleaving directions and tweaks must not disturb either context's key.
        let mut c = ieee_cipher();
        let mut x = ieee_plaintext();
        let mut y = ieee_plaintext();
        c.encrypt(&dusn_tweak(0xff), &mut x).unwrap();
        c.decrypt(&dusn_tweak(0xffff), &mut y).unwrap();
        c.encrypt(&dusn_tweak(0xffff), &mut y).unwrap();
        assert_eq!(y, ieee_plaintext());
        assert_eq!(x, hex(IEEE1619_XTS_AES_256[0].2));
    }
}
