//! Stream cipher benchmark: time per 8 KiB of `tde_core::stream::StreamKey::apply` (the
//! AES-256-CTR of logical decoding's spill files) next to OpenSSL's EVP aes-256-ctr on the
//! same buffer, measured in the same run.
//!
//! Why this exists: the spill-file cipher (and later the WAL and temporary-file one) was
//! chosen by this benchmark (docs/benchmarks.md): OpenSSL EVP keyed once, a new IV per call
//! (`ours_apply`), against the RustCrypto `ctr` crate over `aes` (`rustcrypto_ctr`, the
//! losing candidate, key expanded per call so that no expanded key outlives it) and
//! OpenSSL EVP re-keyed per call.

use std::hint::black_box;

use aes::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use openssl::symm::{Cipher, Crypter, Mode};
use tde_core::stream::StreamKey;

fn bench(c: &mut Criterion) {
    let mut key = StreamKey::generate().unwrap();
    let raw = [7u8; 32];
    let mut buf = vec![0x5au8; 8192];
    let mut out = vec![0u8; 8192 + 16];
    let mut g = c.benchmark_group("ctr_8192");
    g.throughput(Throughput::Bytes(8192));
    g.bench_function("ours_apply", |b| b.iter(|| key.apply(black_box(3), black_box(40960), &mut buf).unwrap()));
    g.bench_function("rustcrypto_ctr", |b| {
        b.iter(|| {
            let mut iv = [0u8; 16];
            iv[15] = 3;
            let mut c = ctr::Ctr128BE::<aes::Aes256>::new((&raw).into(), (&iv).into());
            c.seek(black_box(0u64));
            c.apply_keystream(&mut buf);
        })
    });
    g.bench_function("openssl_evp_new_per_call", |b| {
        b.iter(|| {
            let mut iv = [0u8; 16];
            iv[15] = 3;
            let mut cr = Crypter::new(Cipher::aes_256_ctr(), Mode::Encrypt, &raw, Some(&iv)).unwrap();
            cr.update(black_box(&buf), &mut out).unwrap()
        })
    });
    let mut iv = [0u8; 16];
    iv[15] = 3;
    let mut cr = Crypter::new(Cipher::aes_256_ctr(), Mode::Encrypt, &raw, Some(&iv)).unwrap();
    g.bench_function("openssl_evp_keyed_once", |b| b.iter(|| cr.update(black_box(&buf), &mut out).unwrap()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
