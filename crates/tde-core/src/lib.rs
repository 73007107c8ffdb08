//! # tde-core: the cryptography of the `tde` extension, without PostgreSQL
//!
//! This crate holds the parts of Transparent Data Encryption that are pure computation,
//! so they can be tested anywhere: `cargo test -p tde-core` needs no PostgreSQL server,
//! no pgrx and no `pg_config` (it links the system OpenSSL, as PostgreSQL itself does).
//!
//! - [`secret`]: key types ([`secret::TableKey`], [`secret::WrapKey`]) that zeroize on
//!   drop and have no `Debug`, `Display` or `Clone`; the crate's [`secret::Error`].
//! - [`xts`]: [`xts::PageCipher`], AES-256-XTS over OpenSSL's EVP (chosen by benchmark,
//!   see `benches/page_cipher.rs` and `bench-xts.sh`), keyed once per table key.
//! - [`page`]: the page layout: 16 plaintext header bytes, 8176 encrypted bytes, the tweak
//!   built from (relation file number, fork, block, page LSN), all-zero pages passed through.
//! - [`keystore`]: the key store's changes and redo rules; [`storefile`]: its file, an
//!   authenticated append-only log; [`keytable`]: the shared key table and key cache
//!   algorithms over slots in shared memory.
//! - [`policy`]: which new relation files are encrypted, and what `tde.enforce_encryption`
//!   allows.
//! - [`wrap`]: AES-256-GCM key wrapping with associated data (table keys under a
//!   key-encryption key, key-encryption keys under a master key).
//!
//! Tests include published known-answer vectors (IEEE 1619 XTS-AES-256, McGrew–Viega
//! GCM), round trips and tamper checks. `bench-xts.sh` compares the page cipher with
//! `openssl speed -evp aes-256-xts`.

#![forbid(unsafe_code)]
pub mod audit;
pub mod keystore;
pub mod keytable;
pub mod offline;
pub mod page;
pub mod policy;
pub mod provider;
pub mod schedule;
pub mod secret;
pub mod storefile;
pub mod stream;
pub mod wrap;
pub mod xts;
