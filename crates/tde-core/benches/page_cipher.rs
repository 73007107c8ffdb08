//! Page cipher benchmark: time per 8 KiB page for the chosen XTS implementation and for
//! the candidates it was chosen over.
//!
//! Why this exists: the XTS implementation is chosen by benchmark (docs/benchmarks.md),
//! against OpenSSL's own `openssl speed -evp aes-256-xts -bytes 8192`. `bench-xts.sh` runs
//! this together with the OpenSSL CLI and prints the comparison table.
//!
//! Groups (times per 8192-byte data unit unless noted):
//! - `xts_8192_encrypt` / `xts_8192_decrypt`:
//!   - `ours`: `tde_core::xts::PageCipher` (OpenSSL EVP aes-256-xts, keyed once, IV-only
//!     re-init per page);
//!   - `aes_pipelined`: the losing candidate, a batched XTS over the RustCrypto `aes` crate
//!     (kept here, not in the library, so the comparison can be re-run);
//!   - `xts_mode`: RustCrypto `xts-mode`, reference point only.
//! - `page`: `encrypt_page` (8192-byte copy into the bounce buffer + 8176 bytes encrypted)
//!   and `decrypt_page` (8176 bytes in place), the calls the storage manager makes.

use std::hint::black_box;

use aes::cipher::KeyInit;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tde_core::page::{decrypt_page, encrypt_page, PagePosition, PAGE_SIZE, PD_FLAGS_OFFSET, PD_TDE_ENCRYPTED};
use tde_core::secret::TableKey;
use tde_core::xts::PageCipher;

/// Candidate (b): XTS pipelined over the `aes` crate's parallel block path. For each batch
/// of N blocks (8 with AES-NI, 30 with VAES/AVX2, 64 with VAES/AVX-512, picked at run time
/// by the `aes` crate) the tweaks are XORed in, the batch is encrypted with one
/// `encrypt_par_blocks` call, and the tweaks are XORed out.
mod aes_pipelined {
    use aes::cipher::{
        array::{Array, ArraySize},
        consts::U16,
        Block, BlockCipherDecBackend, BlockCipherDecClosure, BlockCipherDecrypt, BlockCipherEncBackend,
        BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser, KeyInit,
    };
    use aes::{Aes256, Aes256Enc};

    type AesBlock = Block<Aes256>;
    const BLOCK_LEN: usize = 16;

    pub struct Xts {
        data: Aes256,
        tweak: Aes256Enc,
    }

    impl Xts {
        pub fn new(key: &[u8; 64]) -> Xts {
            Xts {
                data: Aes256::new_from_slice(&key[..32]).unwrap(),
                tweak: Aes256Enc::new_from_slice(&key[32..]).unwrap(),
            }
        }

        pub fn encrypt(&self, tweak: &[u8; 16], data: &mut [u8]) {
            let t = self.initial_tweak(tweak);
            self.data.encrypt_with_backend(Enc { t, data });
        }

        pub fn decrypt(&self, tweak: &[u8; 16], data: &mut [u8]) {
            let t = self.initial_tweak(tweak);
            self.data.decrypt_with_backend(Dec { t, data });
        }

        fn initial_tweak(&self, tweak: &[u8; 16]) -> u128 {
            let mut b = AesBlock::from(*tweak);
            self.tweak.encrypt_block(&mut b);
            u128::from_le_bytes(b.0)
        }
    }

    #[inline(always)]
    fn mul_alpha(t: u128) -> u128 {
        let carry = ((t as i128) >> 127) as u128;
        (t << 1) ^ (carry & 0x87)
    }

    #[inline(always)]
    fn xor_block(dst: &mut [u8], t: u128) {
        let mut b = [0u8; BLOCK_LEN];
        b.copy_from_slice(dst);
        dst.copy_from_slice(&(u128::from_le_bytes(b) ^ t).to_le_bytes());
    }

    #[inline(always)]
    fn xts_blocks<N: ArraySize>(
        data: &mut [u8],
        mut t: u128,
        par: impl Fn(&mut Array<AesBlock, N>),
        single: impl Fn(&mut AesBlock),
    ) {
        let mut batch: Array<AesBlock, N> = Default::default();
        let mut tweaks: Array<u128, N> = Default::default();
        let mut chunks = data.chunks_exact_mut(N::USIZE * BLOCK_LEN);
        for chunk in &mut chunks {
            for ((src, dst), tw) in chunk.chunks_exact(BLOCK_LEN).zip(batch.iter_mut()).zip(tweaks.iter_mut()) {
                *tw = t;
                dst.copy_from_slice(src);
                xor_block(dst, t);
                t = mul_alpha(t);
            }
            par(&mut batch);
            for ((dst, src), tw) in chunk.chunks_exact_mut(BLOCK_LEN).zip(batch.iter()).zip(tweaks.iter()) {
                dst.copy_from_slice(src);
                xor_block(dst, *tw);
            }
        }
        for dst in chunks.into_remainder().chunks_exact_mut(BLOCK_LEN) {
            let b = &mut batch[0];
            b.copy_from_slice(dst);
            xor_block(b, t);
            single(b);
            xor_block(b, t);
            dst.copy_from_slice(b);
            t = mul_alpha(t);
        }
    }

    struct Enc<'a> {
        t: u128,
        data: &'a mut [u8],
    }
    impl BlockSizeUser for Enc<'_> {
        type BlockSize = U16;
    }
    impl BlockCipherEncClosure for Enc<'_> {
        #[inline(always)]
        fn call<B: BlockCipherEncBackend<BlockSize = U16>>(self, backend: &B) {
            xts_blocks::<B::ParBlocksSize>(
                self.data,
                self.t,
                |b| backend.encrypt_par_blocks_inplace(b),
                |b| backend.encrypt_block_inplace(b),
            );
        }
    }

    struct Dec<'a> {
        t: u128,
        data: &'a mut [u8],
    }
    impl BlockSizeUser for Dec<'_> {
        type BlockSize = U16;
    }
    impl BlockCipherDecClosure for Dec<'_> {
        #[inline(always)]
        fn call<B: BlockCipherDecBackend<BlockSize = U16>>(self, backend: &B) {
            xts_blocks::<B::ParBlocksSize>(
                self.data,
                self.t,
                |b| backend.decrypt_par_blocks_inplace(b),
                |b| backend.decrypt_block_inplace(b),
            );
        }
    }
}

fn xts_mode_cipher(key: &TableKey) -> xts_mode::Xts128<aes::Aes256> {
    let (k1, k2) = key.expose().split_at(32);
    xts_mode::Xts128::new(aes::Aes256::new_from_slice(k1).unwrap(), aes::Aes256::new_from_slice(k2).unwrap())
}

fn bench(c: &mut Criterion) {
    let key = TableKey::generate().unwrap();
    let mut ours = PageCipher::new(&key).unwrap();
    let pipelined = aes_pipelined::Xts::new(key.expose());
    let xm = xts_mode_cipher(&key);
    let tweak = [7u8; 16];

    // The candidates must agree before their speed means anything.
    let mut a = vec![0x3cu8; PAGE_SIZE];
    let mut b = a.clone();
    let mut d = a.clone();
    ours.encrypt(&tweak, &mut a).unwrap();
    pipelined.encrypt(&tweak, &mut b);
    xm.encrypt_sector(&mut d, tweak.into());
    assert_eq!(a, b, "ours and aes_pipelined disagree");
    assert_eq!(a, d, "ours and xts-mode disagree");
    pipelined.decrypt(&tweak, &mut b);
    assert_eq!(b, vec![0x3cu8; PAGE_SIZE], "aes_pipelined does not round-trip");

    let mut buf = vec![0x5au8; PAGE_SIZE];
    for enc in [true, false] {
        let mut g = c.benchmark_group(if enc { "xts_8192_encrypt" } else { "xts_8192_decrypt" });
        g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
        g.bench_function("ours", |bch| {
            bch.iter(|| {
                if enc {
                    ours.encrypt(&tweak, black_box(&mut buf)).unwrap();
                } else {
                    ours.decrypt(&tweak, black_box(&mut buf)).unwrap();
                }
            })
        });
        g.bench_function("aes_pipelined", |bch| {
            bch.iter(|| {
                if enc {
                    pipelined.encrypt(&tweak, black_box(&mut buf));
                } else {
                    pipelined.decrypt(&tweak, black_box(&mut buf));
                }
            })
        });
        g.bench_function("xts_mode", |bch| {
            bch.iter(|| {
                if enc {
                    xm.encrypt_sector(black_box(&mut buf), tweak.into());
                } else {
                    xm.decrypt_sector(black_box(&mut buf), tweak.into());
                }
            })
        });
        g.finish();
    }

    let pos = PagePosition { rel_number: 16384, fork: 0, block: 42 };
    let mut src = Box::new([0u8; PAGE_SIZE]);
    for (i, b) in src.iter_mut().enumerate() {
        *b = (i % 253) as u8 | 1;
    }
    let mut dst = Box::new([0u8; PAGE_SIZE]);
    let mut g = c.benchmark_group("page");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    g.bench_function("encrypt_page", |bch| {
        bch.iter(|| encrypt_page(&mut ours, &pos, black_box(&src), black_box(&mut dst)).unwrap())
    });
    g.bench_function("decrypt_page", |bch| {
        // Decrypting the same buffer repeatedly is as much work as decrypting a real page;
        // decrypting clears the on-disk marker, so it is set again (a 2-byte store) first.
        bch.iter(|| {
            let f = u16::from_ne_bytes([dst[PD_FLAGS_OFFSET], dst[PD_FLAGS_OFFSET + 1]]) | PD_TDE_ENCRYPTED;
            dst[PD_FLAGS_OFFSET..PD_FLAGS_OFFSET + 2].copy_from_slice(&f.to_ne_bytes());
            decrypt_page(&mut ours, &pos, black_box(&mut dst)).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
