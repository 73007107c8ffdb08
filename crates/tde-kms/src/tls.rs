//! The TLS client configuration every provider that speaks TLS itself
//! shares (vault-transit, azure-keyvault, kmip): rustls on ring, the
//! system's trust roots plus the provider's `ca_file`.

use std::sync::Arc;

use rustls::client::WantsClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, ConfigBuilder};
use tde_core::provider::ProviderError;

use crate::options::bad;

/// A client configuration that trusts the system's roots and the
/// certificates of `ca` (the contents of a `ca_file`, checked by
/// `Opts::ca_file`), waiting for the client-certificate choice.
pub(crate) fn client_builder(
    kind: &str,
    ca: Option<&[u8]>,
) -> Result<ConfigBuilder<ClientConfig, WantsClientCert>, ProviderError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(pem) = ca {
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| bad(kind, format!("\"ca_file\": {e}")))?;
            roots.add(cert).map_err(|e| bad(kind, format!("\"ca_file\": {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(kind, format!("TLS configuration: {e}")))?
        .with_root_certificates(roots))
}
