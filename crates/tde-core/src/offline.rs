//! Checks a stopped cluster's audit trail from its data directory alone,
//! given access to its master-key provider: what `tde-audit-check` runs.
//!
//! Why it exists: an auditor must be able to verify the trail without
//! trusting the server that wrote it (docs/audit.md).  This reads
//! `tde/keystore`, unwraps the KEK with the master key from the provider
//! the store names (or options given instead, for a keyring moved
//! elsewhere), authenticates the key store with it, unwraps the audit key,
//! and verifies `tde/audit.log` against the head the key store holds.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use crate::audit::{self, AuditKey, Head, Report};
use crate::keystore::kek_aad;
use crate::provider;
use crate::storefile::{self, AuthKey};

/// Verifies the audit trail of the cluster at `pgdata`.  `options`
/// replaces the stored provider options (e.g. another keyring path).
/// A log that runs past the key store's head is accepted (a crash before
/// the key store caught up), and reported in `beyond_head`.
pub fn check_audit(pgdata: &Path, options: Option<serde_json::Value>) -> Result<Report, String> {
    check_audit_with(pgdata, options, &provider::from_config)
}

/// How a provider is built from its kind and options.
pub type Builder =
    dyn Fn(&str, &serde_json::Value) -> Result<Box<dyn provider::MasterKeyProvider>, provider::ProviderError>;

/// `check_audit` with the providers `build` knows (crates/tde-kms adds the
/// remote ones to the local `file` and `env`).
pub fn check_audit_with(pgdata: &Path, options: Option<serde_json::Value>, build: &Builder) -> Result<Report, String> {
    let store_path = pgdata.join("tde").join("keystore");
    let bytes = storefile::read(&store_path)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no key store at \"{}\"", store_path.display()))?;
    let loaded = storefile::parse(&bytes, &store_path).map_err(|e| e.to_string())?;
    let ks = &loaded.state;
    let head = Head {
        seq: ks.audit_head.seq,
        chain: if ks.audit_head.seq == 0 {
            audit::GENESIS
        } else {
            audit::from_hex(&ks.audit_head.chain).ok_or("the key store's audit head is malformed")?
        },
    };
    let key = match &ks.principal {
        None => {
            if loaded.needs_auth() {
                return Err("the key store has authenticated frames but no master key".into());
            }
            None
        }
        Some(p) => {
            let entry = ks.provider(&p.provider).ok_or_else(|| format!("unknown provider \"{}\"", p.provider))?;
            let opts = options.unwrap_or_else(|| entry.options.clone());
            let prov = build(&entry.kind, &opts).map_err(|e| e.to_string())?;
            let blob = B64.decode(&p.wrapped_kek).map_err(|_| "the wrapped KEK is not base64".to_string())?;
            let kek = prov
                .unwrap(&p.key_name, &blob, &kek_aad(&ks.store_id, &p.provider, &p.key_name))
                .map_err(|e| format!("master key \"{}\" of provider \"{}\": {e}", p.key_name, p.provider))?;
            loaded.authenticate(&AuthKey::derive(&kek, &ks.store_id), &store_path).map_err(|e| e.to_string())?;
            match &ks.audit_key {
                None => None,
                Some(w) => {
                    let blob = B64.decode(w).map_err(|_| "the wrapped audit key is not base64".to_string())?;
                    Some(
                        AuditKey::unwrap(&kek, &blob, &ks.store_id)
                            .map_err(|_| "the audit key does not unwrap under the KEK".to_string())?,
                    )
                }
            }
        }
    };
    let log_path = pgdata.join("tde").join("audit.log");
    let log = match std::fs::read(&log_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("could not read \"{}\": {e}", log_path.display())),
    };
    Ok(audit::verify(&log, key.as_ref(), &head, false))
}
