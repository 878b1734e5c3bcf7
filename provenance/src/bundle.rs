//! Sigstore bundles (v0.3) around Kiln's DSSE envelopes, so that standard
//! Sigstore verifiers (tested: npm's `@sigstore/verify`) check Kiln's
//! attestations against the runner's public key.
//!
//! Kiln's bundles carry no transparency log entries and no timestamps: the
//! key is the runner's own, named by `verificationMaterial.publicKey.hint`
//! (its securesystemslib keyid, as in the envelope's signature), and a
//! verifier must be told to require none (thresholds 0). The envelope inside
//! is the one the runner signed, unchanged.
//!
//! Reading a bundle back is strict: the v0.3 media type, a public key hint,
//! and a DSSE envelope with exactly one signature, nothing else; its size is
//! bounded before it is parsed.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ProvenanceError;

/// The media type of a Sigstore bundle v0.3.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";

/// The file name suffix of a bundle written beside an envelope:
/// `<envelope's stem>.sigstore.json`.
pub const BUNDLE_FILE_SUFFIX: &str = ".sigstore.json";

/// The largest bundle read. Above the largest envelope the daemon signs: a
/// link lists every workspace entry twice (materials and products), about 400
/// bytes an entry once base64-encoded, and `max_workspace_entries` is at
/// most 1,000,000.
pub const MAX_BUNDLE_BYTES: usize = 512 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Bundle {
    media_type: String,
    verification_material: VerificationMaterial,
    dsse_envelope: Envelope,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VerificationMaterial {
    public_key: PublicKeyIdentifier,
    /// Always empty in Kiln's bundles; a bundle naming log entries or
    /// timestamps is not one of them and is refused when read.
    #[serde(default)]
    tlog_entries: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timestamp_verification_data: Option<Value>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicKeyIdentifier {
    hint: String,
}

/// A DSSE envelope as Kiln writes it (and as the bundle's protobuf JSON
/// form spells it).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    payload: String,
    #[serde(rename = "payloadType")]
    payload_type: String,
    signatures: Vec<Signature>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Signature {
    /// Protobuf's JSON form leaves out an empty keyid.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    keyid: String,
    sig: String,
}

fn bad(what: impl Into<String>) -> ProvenanceError {
    ProvenanceError::Format(format!("Sigstore bundle: {}", what.into()))
}

/// Checks what both directions need of an envelope: one signature (bundles
/// carry exactly one), base64 payload and signature, a payload type.
fn check_envelope(envelope: &Envelope) -> Result<&Signature, ProvenanceError> {
    let [signature] = envelope.signatures.as_slice() else {
        return Err(bad(format!(
            "the DSSE envelope must have exactly one signature, it has {}",
            envelope.signatures.len()
        )));
    };
    if envelope.payload_type.is_empty() {
        return Err(bad("the DSSE envelope has no payloadType"));
    }
    if envelope.payload.is_empty() || STANDARD.decode(&envelope.payload).is_err() {
        return Err(bad("the DSSE envelope's payload is empty or not base64"));
    }
    if signature.sig.is_empty() || STANDARD.decode(&signature.sig).is_err() {
        return Err(bad("the DSSE envelope's signature is empty or not base64"));
    }
    Ok(signature)
}

fn parse_envelope(envelope_json: &[u8]) -> Result<Envelope, ProvenanceError> {
    serde_json::from_slice(envelope_json)
        .map_err(|e| bad(format!("not a DSSE envelope as Kiln writes it: {e}")))
}

/// The keyid of the one signature of a DSSE envelope (the hint its bundle
/// gets); an error when it has none or several.
pub fn envelope_keyid(envelope_json: &[u8]) -> Result<String, ProvenanceError> {
    let envelope = parse_envelope(envelope_json)?;
    let signature = check_envelope(&envelope)?;
    if signature.keyid.is_empty() {
        return Err(bad("the DSSE envelope's signature names no keyid"));
    }
    Ok(signature.keyid.clone())
}

/// Wraps a DSSE envelope (Kiln's JSON: `payload`, `payloadType`, one
/// signature) into a Sigstore bundle v0.3 whose `publicKey.hint` is `keyid`,
/// with no transparency log entries and no timestamps. `keyid` must be the
/// one the signature names, if it names one. Nothing is verified here.
pub fn envelope_to_bundle(envelope_json: &[u8], keyid: &str) -> Result<Vec<u8>, ProvenanceError> {
    if keyid.is_empty() {
        return Err(bad("the key hint is empty"));
    }
    let envelope = parse_envelope(envelope_json)?;
    let signature = check_envelope(&envelope)?;
    if !signature.keyid.is_empty() && signature.keyid != keyid {
        return Err(bad(format!(
            "the envelope is signed by key {}, not by the hinted key {keyid}",
            signature.keyid
        )));
    }
    let bundle = Bundle {
        media_type: BUNDLE_MEDIA_TYPE.to_string(),
        verification_material: VerificationMaterial {
            public_key: PublicKeyIdentifier {
                hint: keyid.to_string(),
            },
            tlog_entries: Vec::new(),
            timestamp_verification_data: None,
        },
        dsse_envelope: envelope,
    };
    let mut out = serde_json::to_vec_pretty(&bundle)?;
    out.push(b'\n');
    Ok(out)
}

/// The DSSE envelope inside a bundle that [`envelope_to_bundle`] wrote, as
/// Kiln's envelope JSON. Refused: more than [`MAX_BUNDLE_BYTES`], another
/// media type, a missing part (key hint, envelope, signature), log entries
/// or timestamps, unknown fields, or a signature naming another key than
/// the hint. The signature itself is not verified here.
pub fn bundle_to_envelope(bundle_json: &[u8]) -> Result<Vec<u8>, ProvenanceError> {
    if bundle_json.len() > MAX_BUNDLE_BYTES {
        return Err(bad(format!(
            "{} bytes, more than the {MAX_BUNDLE_BYTES} read",
            bundle_json.len()
        )));
    }
    let bundle: Bundle =
        serde_json::from_slice(bundle_json).map_err(|e| bad(format!("malformed: {e}")))?;
    if bundle.media_type != BUNDLE_MEDIA_TYPE {
        return Err(bad(format!(
            "media type {:?}, not {BUNDLE_MEDIA_TYPE:?}",
            bundle.media_type
        )));
    }
    let material = &bundle.verification_material;
    if material.public_key.hint.is_empty() {
        return Err(bad("verificationMaterial.publicKey.hint is empty"));
    }
    if !material.tlog_entries.is_empty() || material.timestamp_verification_data.is_some() {
        return Err(bad(
            "it has transparency log entries or timestamps, which Kiln's bundles never have",
        ));
    }
    let signature = check_envelope(&bundle.dsse_envelope)?;
    if !signature.keyid.is_empty() && signature.keyid != material.public_key.hint {
        return Err(bad(format!(
            "the envelope's signature names key {}, the hint key {}",
            signature.keyid, material.public_key.hint
        )));
    }
    let mut out = serde_json::to_vec_pretty(&bundle.dsse_envelope)?;
    out.push(b'\n');
    Ok(out)
}

/// True when `bytes` look like a Sigstore bundle rather than a bare DSSE
/// envelope (a top-level `mediaType`), so one file argument can take either.
pub fn is_bundle(bytes: &[u8]) -> bool {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<serde::de::IgnoredAny>,
    }
    bytes.len() <= MAX_BUNDLE_BYTES
        && serde_json::from_slice::<Probe>(bytes).is_ok_and(|p| p.media_type.is_some())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::dsse::{sign_envelope, verify_envelope, IN_TOTO_PAYLOAD_TYPE};
    use crate::keys::{KeyType, SigningKey};
    use serde_json::json;

    fn envelope(key: &SigningKey) -> Vec<u8> {
        serde_json::to_vec(&sign_envelope(
            IN_TOTO_PAYLOAD_TYPE,
            br#"{"_type":"https://in-toto.io/Statement/v1"}"#,
            key,
        ))
        .unwrap()
    }

    #[test]
    fn a_bundle_carries_the_envelope_and_the_hint_and_reads_back() {
        for key_type in KeyType::ALL {
            let key = SigningKey::generate_of(key_type);
            let env = envelope(&key);
            assert_eq!(envelope_keyid(&env).unwrap(), key.keyid());
            let bundle = envelope_to_bundle(&env, &key.keyid()).unwrap();
            assert!(is_bundle(&bundle));
            assert!(!is_bundle(&env));
            let v: Value = serde_json::from_slice(&bundle).unwrap();
            assert_eq!(v["mediaType"], BUNDLE_MEDIA_TYPE);
            assert_eq!(
                v["verificationMaterial"],
                json!({"publicKey": {"hint": key.keyid()}, "tlogEntries": []})
            );
            let original: Value = serde_json::from_slice(&env).unwrap();
            assert_eq!(v["dsseEnvelope"], original);
            let back = bundle_to_envelope(&bundle).unwrap();
            let back: Value = serde_json::from_slice(&back).unwrap();
            assert_eq!(back, original);
            verify_envelope(&back, &[key.public_key()]).unwrap();
        }
    }

    #[test]
    fn a_wrong_or_incomplete_bundle_is_refused() {
        let key = SigningKey::generate();
        let env = envelope(&key);
        assert!(envelope_to_bundle(&env, "").is_err());
        let other = SigningKey::generate().keyid();
        let e = envelope_to_bundle(&env, &other).unwrap_err().to_string();
        assert!(e.contains("not by the hinted key"), "{e}");
        let good: Value =
            serde_json::from_slice(&envelope_to_bundle(&env, &key.keyid()).unwrap()).unwrap();
        let refused = |edit: &dyn Fn(&mut Value), why: &str| {
            let mut v = good.clone();
            edit(&mut v);
            let e = bundle_to_envelope(&serde_json::to_vec(&v).unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{why}: {e}");
        };
        refused(
            &|v| v["mediaType"] = json!("application/vnd.dev.sigstore.bundle.v0.2+json"),
            "media type",
        );
        refused(
            &|v| {
                v.as_object_mut().unwrap().remove("mediaType");
            },
            "mediaType",
        );
        refused(
            &|v| {
                v.as_object_mut().unwrap().remove("dsseEnvelope");
            },
            "dsseEnvelope",
        );
        refused(
            &|v| {
                v["verificationMaterial"]
                    .as_object_mut()
                    .unwrap()
                    .remove("publicKey");
            },
            "publicKey",
        );
        refused(
            &|v| v["verificationMaterial"]["publicKey"]["hint"] = json!(""),
            "hint is empty",
        );
        refused(
            &|v| v["verificationMaterial"]["publicKey"]["hint"] = json!(other),
            "names key",
        );
        refused(
            &|v| v["verificationMaterial"]["tlogEntries"] = json!([{"logIndex": "1"}]),
            "transparency log",
        );
        refused(
            &|v| v["messageSignature"] = json!({"signature": "AA=="}),
            "unknown field",
        );
        refused(
            &|v| v["dsseEnvelope"]["signatures"] = json!([]),
            "exactly one",
        );
        refused(
            &|v| {
                let sig = v["dsseEnvelope"]["signatures"][0].clone();
                v["dsseEnvelope"]["signatures"] = json!([sig.clone(), sig]);
            },
            "exactly one",
        );
        refused(
            &|v| v["dsseEnvelope"]["payload"] = json!("not base64!"),
            "payload",
        );
        refused(
            &|v| v["dsseEnvelope"]["signatures"][0]["sig"] = json!(""),
            "signature is empty",
        );
        assert!(bundle_to_envelope(b"[]").is_err());
        assert!(bundle_to_envelope(b"").is_err());
    }

    #[test]
    fn a_bundle_larger_than_the_bound_is_refused_before_parsing() {
        let mut huge = vec![b' '; MAX_BUNDLE_BYTES + 1];
        huge[0] = b'{';
        let e = bundle_to_envelope(&huge).unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
        assert!(!is_bundle(&huge));
    }
}
