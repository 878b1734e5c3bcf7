//! Sigstore bundles v0.3 around Kiln's DSSE envelopes, the form npm's `@sigstore/verify`
//! and cosign read: the envelope as `dsseEnvelope`, the signing key named by its key id
//! in `verificationMaterial.publicKey.hint`, no transparency log entries or timestamps.

use serde_json::{json, Value};

use crate::ProvenanceError;

pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";

/// The bundle holding `envelope_json` (a DSSE envelope) signed by the key `keyid`.
pub fn envelope_to_bundle(envelope_json: &[u8], keyid: &str) -> Result<Vec<u8>, ProvenanceError> {
    let envelope: Value = serde_json::from_slice(envelope_json)?;
    if !envelope.get("payload").is_some_and(Value::is_string)
        || !envelope.get("payloadType").is_some_and(Value::is_string)
        || !envelope.get("signatures").is_some_and(Value::is_array)
    {
        return Err(ProvenanceError::Format("not a DSSE envelope".into()));
    }
    let bundle = json!({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": keyid}, "tlogEntries": []},
        "dsseEnvelope": envelope,
    });
    Ok(serde_json::to_vec(&bundle)?)
}

/// The DSSE envelope inside a bundle (whose signature the caller still verifies).
pub fn bundle_to_envelope(bundle_json: &[u8]) -> Result<Vec<u8>, ProvenanceError> {
    let bundle: Value = serde_json::from_slice(bundle_json)?;
    if bundle.get("mediaType").and_then(Value::as_str) != Some(BUNDLE_MEDIA_TYPE) {
        return Err(ProvenanceError::Format(format!(
            "not a Sigstore bundle v0.3 (mediaType {BUNDLE_MEDIA_TYPE})"
        )));
    }
    let envelope = bundle
        .get("dsseEnvelope")
        .ok_or_else(|| ProvenanceError::Format("the bundle holds no dsseEnvelope".into()))?;
    Ok(serde_json::to_vec(envelope)?)
}
