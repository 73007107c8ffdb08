//! This server's own options for a key provider (`tde.provider_overrides`).
//!
//! Why it exists: provider options live in the key store, so the WAL
//! carries the primary's options to every standby and every backup.  A
//! standby in another region, or a backup restored elsewhere, may have to
//! reach the same master key differently: another region's replica of a
//! multi-region key, another endpoint, its own credential file.  The
//! override file names providers and the options to use instead, key by
//! key (`null` removes one); the stored options, and the primary, stay as
//! they are.  Only the key worker reads it, at each provider call, so an
//! edit takes effect without a restart.
//!
//! ```json
//! {"aws": {"region": "eu-west-1", "secret_access_key_file": "/etc/tde/aws-eu"}}
//! ```

use serde_json::Value;
use tde_core::provider::{Failure, ProviderError};

use crate::gucs;

fn bad(path: &str, why: String) -> ProviderError {
    ProviderError::Relayed {
        failure: Failure::BadOptions,
        message: format!("tde.provider_overrides file \"{path}\": {why}"),
    }
}

/// `stored` with this server's overrides for provider `name` applied.
pub fn apply(name: &str, stored: &Value) -> Result<Value, ProviderError> {
    let Some(path) = gucs::provider_overrides() else { return Ok(stored.clone()) };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(&path, format!("cannot be read: {e}")))?;
    let all: Value = serde_json::from_str(&text).map_err(|e| bad(&path, format!("is not JSON: {e}")))?;
    let all = all.as_object().ok_or_else(|| bad(&path, "must be a JSON object of provider names".into()))?;
    merge(stored, all.get(name)).map_err(|why| bad(&path, why))
}

/// The options `stored` with `over`'s keys replaced (null: removed).
fn merge(stored: &Value, over: Option<&Value>) -> Result<Value, String> {
    let Some(over) = over else { return Ok(stored.clone()) };
    let over = over.as_object().ok_or("a provider's overrides must be a JSON object")?;
    let mut out = stored.as_object().cloned().unwrap_or_default();
    for (k, v) in over {
        if v.is_null() {
            out.remove(k);
        } else {
            out.insert(k.clone(), v.clone());
        }
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::merge;
    use serde_json::json;

    #[test]
    fn overrides_replace_and_remove_keys() {
        let stored = json!({"region": "us-east-1", "endpoint": "http://a", "access_key_id": "K"});
        let over = json!({"region": "eu-west-1", "endpoint": null});
        assert_eq!(merge(&stored, Some(&over)).unwrap(), json!({"region": "eu-west-1", "access_key_id": "K"}));
        assert_eq!(merge(&stored, None).unwrap(), stored);
        assert!(merge(&stored, Some(&json!(["x"]))).is_err());
    }
}
