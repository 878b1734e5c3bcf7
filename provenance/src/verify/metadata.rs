//! Signed metadata as files hold it (a metablock or a DSSE envelope), and
//! the strict field checks shared by the layout and link parsers.

use serde_json::{Map, Value};

use super::{fmt_err, unsupported, VerifyError};
use crate::cjson;
use crate::dsse::{self, IN_TOTO_PAYLOAD_TYPE};
use crate::keys::PublicKey;
/// Metadata as loaded from a file: a metablock or a DSSE envelope.
pub(super) enum Signed {
    Metablock {
        signed: Value,
        /// (keyid, sig hex) in file order.
        signatures: Vec<(String, String)>,
    },
    Dsse {
        envelope: Value,
        payload: Value,
    },
}

impl Signed {
    pub(super) fn parse(bytes: &[u8], file: &str) -> Result<Signed, VerifyError> {
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| fmt_err(file, format!("not JSON: {e}")))?;
        let o = v
            .as_object()
            .ok_or_else(|| fmt_err(file, "not a JSON object"))?;
        if o.contains_key("payload") {
            let pt = o.get("payloadType").and_then(Value::as_str).unwrap_or("");
            if pt != IN_TOTO_PAYLOAD_TYPE {
                return Err(unsupported(file, format!("DSSE payloadType {pt:?}")));
            }
            // Decoding without verifying only to read the payload; signatures
            // are checked by `verify_with` before anything in it is trusted.
            let raw = o
                .get("payload")
                .and_then(Value::as_str)
                .and_then(|p| {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD.decode(p).ok()
                })
                .ok_or_else(|| fmt_err(file, "DSSE payload is not base64"))?;
            let payload: Value = serde_json::from_slice(&raw)
                .map_err(|e| fmt_err(file, format!("DSSE payload is not JSON: {e}")))?;
            if payload.get("predicateType").is_some() || payload.get("subject").is_some() {
                return Err(unsupported(
                    file,
                    "in-toto Statements are not links or layouts",
                ));
            }
            return Ok(Signed::Dsse {
                envelope: v,
                payload,
            });
        }
        let signed = o
            .get("signed")
            .cloned()
            .ok_or_else(|| fmt_err(file, "no `signed` field"))?;
        let sigs = o
            .get("signatures")
            .and_then(Value::as_array)
            .ok_or_else(|| fmt_err(file, "no `signatures` list"))?;
        let mut signatures = Vec::new();
        for s in sigs {
            let keyid = s.get("keyid").and_then(Value::as_str);
            let sig = s.get("sig").and_then(Value::as_str);
            match (keyid, sig) {
                (Some(k), Some(g)) => signatures.push((k.to_owned(), g.to_owned())),
                _ => {
                    return Err(unsupported(
                        file,
                        "signature without keyid/sig (GPG signatures are not supported)",
                    ))
                }
            }
        }
        Ok(Signed::Metablock { signed, signatures })
    }

    pub(super) fn payload(&self) -> &Value {
        match self {
            Signed::Metablock { signed, .. } => signed,
            Signed::Dsse { payload, .. } => payload,
        }
    }

    /// As in-toto: only the first signature whose keyid is the key's is checked.
    pub(super) fn verify_with(&self, key: &PublicKey) -> Result<(), String> {
        let keyid = key.keyid();
        match self {
            Signed::Metablock { signed, signatures } => {
                let (_, sig) = signatures
                    .iter()
                    .find(|(k, _)| *k == keyid)
                    .ok_or_else(|| format!("no signature by key {keyid}"))?;
                let sig =
                    hex::decode(sig).map_err(|_| format!("signature by key {keyid} is not hex"))?;
                let canonical = cjson::to_canonical(signed).map_err(|e| e.to_string())?;
                if key.verify(&canonical, &sig) {
                    Ok(())
                } else {
                    Err(format!("invalid signature by key {keyid}"))
                }
            }
            Signed::Dsse { envelope, .. } => {
                let has_keyid = envelope
                    .get("signatures")
                    .and_then(Value::as_array)
                    .is_some_and(|a| {
                        a.iter()
                            .any(|s| s.get("keyid").and_then(Value::as_str) == Some(keyid.as_str()))
                    });
                if !has_keyid {
                    return Err(format!("no signature by key {keyid}"));
                }
                dsse::verify_envelope(envelope, std::slice::from_ref(key))
                    .map(|_| ())
                    .map_err(|_| format!("invalid DSSE signature by key {keyid}"))
            }
        }
    }
}

/// Reject unknown fields and require known ones, so that what we check is
/// exactly what the reference verifier reconstructs and signs over.
pub(super) fn exact_fields<'a>(
    v: &'a Value,
    fields: &[&str],
    what: &str,
    file: &str,
) -> Result<&'a Map<String, Value>, VerifyError> {
    let o = v
        .as_object()
        .ok_or_else(|| fmt_err(file, format!("{what} is not an object")))?;
    for k in o.keys() {
        if !fields.contains(&k.as_str()) {
            return Err(unsupported(file, format!("field `{k}` in {what}")));
        }
    }
    for f in fields {
        if !o.contains_key(*f) {
            return Err(fmt_err(file, format!("{what} has no `{f}` field")));
        }
    }
    Ok(o)
}

pub(super) fn str_list(v: &Value, what: &str, file: &str) -> Result<Vec<String>, VerifyError> {
    v.as_array()
        .and_then(|a| {
            a.iter()
                .map(|x| x.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| fmt_err(file, format!("{what} must be a list of strings")))
}
