//! # tde-kms: the remote master-key providers of `tde`
//!
//! The master key of a cluster can live in a KMS or an HSM, which wraps and
//! unwraps the cluster's key-encryption key (KEK) for us and never hands out
//! the master key.  This crate implements `tde_core::provider::MasterKeyProvider`
//! for those, one file each:
//!
//! - [`aws`] `aws-kms`: AWS KMS (`Encrypt`/`Decrypt`, AAD as encryption context);
//! - [`vault`] `vault-transit`: HashiCorp Vault / OpenBao Transit (`encrypt`/
//!   `decrypt` with `associated_data`);
//! - [`pkcs11`] `pkcs11`: an HSM through its PKCS#11 module (`C_Encrypt`/
//!   `C_Decrypt` with `CKM_AES_GCM` under a non-extractable AES-256 key);
//! - [`kmip`] `kmip`: a KMIP 1.4 server over mutual TLS (Encrypt/Decrypt with
//!   AES-GCM; the key is never fetched);
//! - [`gcp`] `gcp-kms`: Google Cloud KMS (`Encrypt`/`Decrypt` with
//!   `additional_authenticated_data`);
//! - [`azure`] `azure-keyvault`: Azure Key Vault (`wrapKey`/`unwrapKey`
//!   with RSA-OAEP-256 of a data key that seals the KEK with AES-GCM and
//!   the AAD, since Key Vault's RSA wrap takes no AAD).
//!
//! The local kinds (`file`, `env`) stay in `tde-core`; [`from_config`] falls
//! back to them.
//!
//! ## Why a separate library
//!
//! The vendors' SDKs bring an async runtime, an HTTP stack and a TLS stack:
//! megabytes of code, threads and global state that no PostgreSQL backend
//! should map.  So the extension never links this crate.  Only tde's key
//! worker process `dlopen`s `$libdir/tde_kms.so` (built from this crate as a
//! `cdylib`), calls it through the small C ABI below, and passes the results
//! to the backends through shared memory.  A backend's address space holds
//! neither the SDKs nor their secrets (tokens, PINs, access keys), and a
//! crash or hang in a vendor's code takes down, at worst, the key worker.
//!
//! ## The C ABI (version 1)
//!
//! ```c
//! uint32_t tde_kms_abi_version(void);   /* 1 */
//! int32_t  tde_kms_call(const uint8_t *req, size_t req_len,
//!                       const uint8_t *input, size_t input_len,
//!                       uint8_t *out, size_t out_cap, size_t *out_len,
//!                       uint8_t *msg, size_t msg_cap, size_t *msg_len);
//! ```
//!
//! `req` is UTF-8 JSON, which holds no secret (options only *name* the
//! environment variable or file holding one):
//!
//! ```json
//! {"op": "wrap" | "unwrap" | "ensure" | "probe",
//!  "kind": "aws-kms", "options": {...},
//!  "key": "master key name",          // absent for probe
//!  "aad": "<base64>",                 // wrap and unwrap only
//!  "timeout_ms": 10000}               // optional, 1..=3600000, default 10000
//! ```
//!
//! `input` is the 32-byte KEK for wrap, the blob for unwrap, else empty.
//! On success the result is 0 and `out` holds the blob (wrap) or the 32-byte
//! KEK (unwrap); `*out_len` its length (0 for ensure and probe).  On failure
//! the result is a [`tde_core::provider::Failure`] code (1..=8) and `msg`
//! holds the error's text (`ProviderError`'s `Display`, cut to `msg_cap` on
//! a UTF-8 boundary), `*msg_len` its length.  An output larger than `out_cap`
//! is a failure (8) that says so.
//!
//! During a call every signal is blocked in the calling thread (and restored
//! after), so threads started meanwhile inherit a blocked mask; the
//! runtime's own threads block all signals when they start.  A panic is
//! caught and reported as code 8, "internal error in the provider library".
//! Providers are cached per (kind, timeout, options), see [`worker`]; the
//! plaintext output is wiped once copied.
//!
//! ## Rules every provider here follows
//!
//! - One process-wide tokio current-thread runtime, created on the first
//!   remote call, never at load time ([`rt`]).
//! - Every remote call is bounded twice: by the client's own connect and
//!   operation timeouts (a little under `timeout_ms`), and by
//!   `tokio::time::timeout` at `timeout_ms`.
//! - Secrets are read from the environment variable or file the options
//!   name, when the client is built, into zeroizing buffers; they are never
//!   logged, printed or put in an error.  Plaintext KEKs are `WrapKey`s.
//! - Vendor errors are mapped onto `Failure` in one function per vendor; the
//!   error's detail is the vendor's message, never key material.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod aws;
pub mod azure;
pub mod ffi;
pub mod gcp;
pub mod kmip;
mod options;
pub mod pkcs11;
mod rt;
mod tls;
mod ttlv;
pub mod vault;
pub mod worker;

use serde_json::Value;
use std::time::Duration;
use tde_core::provider::{MasterKeyProvider, ProviderError};

pub use ffi::{tde_kms_abi_version, tde_kms_call};

/// The deadline of a remote call when none is given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The kinds this crate implements.
pub const REMOTE_KINDS: [&str; 6] = [aws::KIND, vault::KIND, pkcs11::KIND, kmip::KIND, gcp::KIND, azure::KIND];

/// Validates a provider's kind and options and builds it, with the default
/// timeout.  Local kinds (`file`, `env`) are built by `tde-core`.
pub fn from_config(kind: &str, options: &Value) -> Result<Box<dyn MasterKeyProvider>, ProviderError> {
    from_config_with_timeout(kind, options, DEFAULT_TIMEOUT)
}

/// [`from_config`] with a deadline for each remote call.
pub fn from_config_with_timeout(
    kind: &str,
    options: &Value,
    timeout: Duration,
) -> Result<Box<dyn MasterKeyProvider>, ProviderError> {
    if REMOTE_KINDS.contains(&kind) {
        Ok(build_remote(kind, options, timeout)?)
    } else {
        tde_core::provider::from_config(kind, options)
    }
}

/// Builds one of [`REMOTE_KINDS`].
pub(crate) fn build_remote(
    kind: &str,
    options: &Value,
    timeout: Duration,
) -> Result<Box<dyn MasterKeyProvider + Send + Sync>, ProviderError> {
    match kind {
        aws::KIND => Ok(Box::new(aws::AwsKms::from_options(options, timeout)?)),
        vault::KIND => Ok(Box::new(vault::VaultTransit::from_options(options, timeout)?)),
        pkcs11::KIND => Ok(Box::new(pkcs11::Pkcs11Provider::from_options(options, timeout)?)),
        kmip::KIND => Ok(Box::new(kmip::Kmip::from_options(options, timeout)?)),
        gcp::KIND => Ok(Box::new(gcp::GcpKms::from_options(options, timeout)?)),
        azure::KIND => Ok(Box::new(azure::AzureKeyVault::from_options(options, timeout)?)),
        other => Err(ProviderError::UnknownKind(other.to_string())),
    }
}
