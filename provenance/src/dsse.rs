//! DSSE envelopes (used for SLSA provenance and accepted for in-toto links).

use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Value};

use crate::keys::{PublicKey, SigningKey};
use crate::ProvenanceError;

/// Payload type of in-toto metadata (links, layouts, Statements).
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// Pre-authentication encoding:
/// `"DSSEv1" SP len(type) SP type SP len(payload) SP payload`, lengths in
/// decimal bytes.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// `{"payload": b64, "payloadType": .., "signatures": [{"keyid", "sig": b64}]}`.
pub fn sign_envelope(payload_type: &str, payload: &[u8], key: &SigningKey) -> Value {
    let sig = key.sign(&pae(payload_type, payload));
    json!({
        "payload": STANDARD.encode(payload),
        "payloadType": payload_type,
        "signatures": [{"keyid": key.keyid(), "sig": STANDARD.encode(sig)}],
    })
}

/// The DSSE spec lets producers use either base64 alphabet.
fn b64decode(s: &str) -> Option<Vec<u8>> {
    STANDARD
        .decode(s)
        .or_else(|_| URL_SAFE.decode(s))
        .or_else(|_| URL_SAFE_NO_PAD.decode(s))
        .ok()
}

/// A verified envelope's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedEnvelope {
    pub payload_type: String,
    pub payload: Vec<u8>,
    /// keyids of the `keys` that produced a valid signature.
    pub signed_by: Vec<String>,
}

/// Verify `envelope` against `keys`: succeeds when at least one key produced
/// a valid signature. A signature whose keyid names a key is checked with
/// that key only; a signature without keyid is tried against every key.
pub fn verify_envelope(
    envelope: &Value,
    keys: &[PublicKey],
) -> Result<VerifiedEnvelope, ProvenanceError> {
    let payload_type = envelope
        .get("payloadType")
        .and_then(Value::as_str)
        .ok_or_else(|| ProvenanceError::Format("DSSE envelope has no payloadType".into()))?;
    let payload = envelope
        .get("payload")
        .and_then(Value::as_str)
        .and_then(b64decode)
        .ok_or_else(|| {
            ProvenanceError::Format("DSSE envelope payload is missing or not base64".into())
        })?;
    let sigs = envelope
        .get("signatures")
        .and_then(Value::as_array)
        .ok_or_else(|| ProvenanceError::Format("DSSE envelope has no signatures list".into()))?;
    let message = pae(payload_type, &payload);
    let mut signed_by: Vec<String> = Vec::new();
    for s in sigs {
        let Some(sig) = s.get("sig").and_then(Value::as_str).and_then(b64decode) else {
            continue;
        };
        let keyid = s
            .get("keyid")
            .and_then(Value::as_str)
            .filter(|k| !k.is_empty());
        for key in keys {
            let id = key.keyid();
            if keyid.is_some_and(|k| k != id) || signed_by.contains(&id) {
                continue;
            }
            if key.verify(&message, &sig) {
                signed_by.push(id);
            }
        }
    }
    if signed_by.is_empty() {
        return Err(ProvenanceError::Key(
            "DSSE envelope has no valid signature by any of the given keys".into(),
        ));
    }
    Ok(VerifiedEnvelope {
        payload_type: payload_type.to_owned(),
        payload,
        signed_by,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pae_vector() {
        // Example from the DSSE protocol description.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ".to_vec());
    }

    #[test]
    fn sign_and_verify() {
        let k = SigningKey::generate();
        let other = SigningKey::generate();
        let env = sign_envelope(IN_TOTO_PAYLOAD_TYPE, b"{\"a\":1}", &k);
        let v = verify_envelope(&env, &[other.public_key(), k.public_key()]).unwrap();
        assert_eq!(v.payload, b"{\"a\":1}");
        assert_eq!(v.signed_by, vec![k.keyid()]);
        assert!(verify_envelope(&env, &[other.public_key()]).is_err());

        let mut tampered = env.clone();
        tampered["payload"] = STANDARD.encode(b"{\"a\":2}").into();
        assert!(verify_envelope(&tampered, &[k.public_key()]).is_err());
        let mut retyped = env;
        retyped["payloadType"] = "text/plain".into();
        assert!(verify_envelope(&retyped, &[k.public_key()]).is_err());
    }
}
