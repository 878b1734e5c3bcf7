//! in-toto v0.9 link metadata and the signed metablock container.

use std::collections::BTreeMap;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::dsse::{sign_envelope, IN_TOTO_PAYLOAD_TYPE};
use crate::keys::SigningKey;
use crate::{cjson, ProvenanceError};

/// Evidence of one step: what ran, what it read and what it left behind.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub name: String,
    pub command: Vec<String>,
    /// path -> sha256 hex, before the step.
    pub materials: BTreeMap<String, String>,
    /// path -> sha256 hex, after the step.
    pub products: BTreeMap<String, String>,
    /// JSON object (return-value, stdout, stderr, network attempts, ...).
    pub byproducts: Value,
    /// JSON object; in-toto rejects `null`.
    pub environment: Value,
}

fn artifacts(map: &BTreeMap<String, String>) -> Value {
    // sha256 only: MATCH rules compare whole hash dicts, so every link must
    // record the same set of algorithms.
    Value::Object(
        map.iter()
            .map(|(path, digest)| (path.clone(), json!({ "sha256": digest })))
            .collect(),
    )
}

/// An object value, with `null` (or a non-object) replaced by `{}` because
/// the reference verifier rejects anything but a dict.
fn object_or_empty(v: &Value) -> Value {
    match v {
        Value::Object(_) => v.clone(),
        _ => Value::Object(Map::new()),
    }
}

impl Link {
    /// The in-toto v0.9 `signed` object. It carries exactly the seven fields
    /// of in-toto's Link model: the reference verifier re-serialises the
    /// object from those fields before checking the signature, so an extra
    /// field would break verification.
    pub fn to_signed(&self) -> Value {
        json!({
            "_type": "link",
            "name": self.name,
            "command": self.command,
            "materials": artifacts(&self.materials),
            "products": artifacts(&self.products),
            "byproducts": object_or_empty(&self.byproducts),
            "environment": object_or_empty(&self.environment),
        })
    }

    /// Parse a `signed` link object. Artifacts without a sha256 entry are an
    /// error, since Kiln records and compares sha256 only.
    pub fn from_signed(v: &Value) -> Result<Link, ProvenanceError> {
        let o = v
            .as_object()
            .ok_or_else(|| ProvenanceError::Format("link must be a JSON object".into()))?;
        if o.get("_type").and_then(Value::as_str) != Some("link") {
            return Err(ProvenanceError::Format("`_type` is not \"link\"".into()));
        }
        let name = o
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ProvenanceError::Format("link has no string `name`".into()))?
            .to_owned();
        let command = match o.get("command") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ProvenanceError::Format("`command` must be a list of strings".into())
                })?,
            _ => return Err(ProvenanceError::Format("link has no list `command`".into())),
        };
        let parse_art = |field: &str| -> Result<BTreeMap<String, String>, ProvenanceError> {
            let m = o
                .get(field)
                .and_then(Value::as_object)
                .ok_or_else(|| ProvenanceError::Format(format!("link has no object `{field}`")))?;
            m.iter()
                .map(|(p, h)| {
                    h.get("sha256")
                        .and_then(Value::as_str)
                        .map(|d| (p.clone(), d.to_owned()))
                        .ok_or_else(|| {
                            ProvenanceError::Format(format!("{field} {p:?} has no sha256"))
                        })
                })
                .collect()
        };
        let object = |field: &str| -> Result<Value, ProvenanceError> {
            match o.get(field) {
                Some(v @ Value::Object(_)) => Ok(v.clone()),
                _ => Err(ProvenanceError::Format(format!(
                    "link `{field}` must be an object"
                ))),
            }
        };
        Ok(Link {
            name,
            command,
            materials: parse_art("materials")?,
            products: parse_art("products")?,
            byproducts: object("byproducts")?,
            environment: object("environment")?,
        })
    }

    /// Sign as a metablock with `key`; returns the file bytes (the same bytes as
    /// [`sign_metablock`] of [`Link::to_signed`], without building that value).
    pub fn sign(&self, key: &SigningKey) -> Result<Vec<u8>, ProvenanceError> {
        let sig = key.sign(&self.canonical_signed()?);
        let block = MetablockView {
            signatures: [SignatureView {
                keyid: key.keyid(),
                sig: hex::encode(sig),
            }],
            signed: self.view(),
        };
        let mut bytes = serde_json::to_vec_pretty(&block)?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// Canonical JSON of [`Link::to_signed`], written straight from the artifact
    /// maps: a link lists every file of a workspace twice, and a JSON value per
    /// artifact costs far more memory than its bytes.
    fn canonical_signed(&self) -> Result<Vec<u8>, ProvenanceError> {
        let mut out = Vec::new();
        // Keys in code point order, as canonical JSON sorts them.
        out.extend_from_slice(b"{\"_type\":\"link\",\"byproducts\":");
        cjson::encode(&object_or_empty(&self.byproducts), &mut out)?;
        out.extend_from_slice(b",\"command\":[");
        for (i, arg) in self.command.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            cjson::encode_str(arg, &mut out);
        }
        out.extend_from_slice(b"],\"environment\":");
        cjson::encode(&object_or_empty(&self.environment), &mut out)?;
        out.extend_from_slice(b",\"materials\":");
        canonical_artifacts(&self.materials, &mut out);
        out.extend_from_slice(b",\"name\":");
        cjson::encode_str(&self.name, &mut out);
        out.extend_from_slice(b",\"products\":");
        canonical_artifacts(&self.products, &mut out);
        out.push(b'}');
        Ok(out)
    }

    /// The `signed` object for serde, borrowing the artifact maps.
    fn view(&self) -> SignedView<'_> {
        SignedView {
            kind: "link",
            byproducts: object_or_empty(&self.byproducts),
            command: &self.command,
            environment: object_or_empty(&self.environment),
            materials: ArtifactsView(&self.materials),
            name: &self.name,
            products: ArtifactsView(&self.products),
        }
    }

    /// Sign as a DSSE envelope with `key`; returns the file bytes.
    ///
    /// in-toto 3.1 loads a link file holding `payload` and payloadType
    /// `application/vnd.in-toto+json` as an envelope and reads the payload
    /// with `json.loads` into its Link model, so the payload is the same
    /// `signed` object in ordinary JSON (control characters escaped, which
    /// `json.loads` requires); the signature covers the payload bytes as sent
    /// (PAE), so no canonical form is involved.
    pub fn sign_dsse(&self, key: &SigningKey) -> Result<Vec<u8>, ProvenanceError> {
        let payload = serde_json::to_vec(&self.view())?;
        let envelope = sign_envelope(IN_TOTO_PAYLOAD_TYPE, &payload, key);
        let mut bytes = serde_json::to_vec_pretty(&envelope)?;
        bytes.push(b'\n');
        Ok(bytes)
    }
}

/// A map's BTreeMap order is byte order, which canonical JSON wants.
fn canonical_artifacts(map: &BTreeMap<String, String>, out: &mut Vec<u8>) {
    out.push(b'{');
    for (i, (path, digest)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        cjson::encode_str(path, out);
        out.extend_from_slice(b":{\"sha256\":");
        cjson::encode_str(digest, out);
        out.push(b'}');
    }
    out.push(b'}');
}

/// [`Link::to_signed`] as serde sees it, fields in sorted order like the
/// value's keys, so both serialise to the same bytes.
#[derive(Serialize)]
struct SignedView<'a> {
    #[serde(rename = "_type")]
    kind: &'static str,
    byproducts: Value,
    command: &'a [String],
    environment: Value,
    materials: ArtifactsView<'a>,
    name: &'a str,
    products: ArtifactsView<'a>,
}

/// path -> `{"sha256": digest}`, serialised without a value per artifact.
struct ArtifactsView<'a>(&'a BTreeMap<String, String>);

impl Serialize for ArtifactsView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (path, digest) in self.0 {
            map.serialize_entry(path, &Sha256View(digest))?;
        }
        map.end()
    }
}

struct Sha256View<'a>(&'a str);

impl Serialize for Sha256View<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1))?;
        map.serialize_entry("sha256", self.0)?;
        map.end()
    }
}

#[derive(Serialize)]
struct MetablockView<'a> {
    signatures: [SignatureView; 1],
    signed: SignedView<'a>,
}

#[derive(Serialize)]
struct SignatureView {
    keyid: String,
    sig: String,
}

/// `{"signatures":[{"keyid":..,"sig":hex}],"signed":..}` with the signature
/// over the canonical JSON of `signed`.
///
/// The file itself is ordinary (pretty, escaped) JSON, not canonical JSON:
/// Python's `json.load` rejects raw control characters inside strings, which
/// canonical JSON would emit for a captured stdout containing a newline.
pub fn sign_metablock(signed: &Value, key: &SigningKey) -> Result<Vec<u8>, ProvenanceError> {
    let canonical = cjson::to_canonical(signed)?;
    let sig = key.sign(&canonical);
    let block = json!({
        "signatures": [{"keyid": key.keyid(), "sig": hex::encode(sig)}],
        "signed": signed,
    });
    let mut bytes = serde_json::to_vec_pretty(&block)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// `<step>.<first 8 hex of keyid>.link`, in-toto's FILENAME_FORMAT.
pub fn link_file_name(step: &str, keyid: &str) -> String {
    let short: String = keyid.chars().take(8).collect();
    format!("{step}.{short}.link")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> Link {
        Link {
            name: "compile".into(),
            command: vec!["cc".into(), "-o".into(), "hello".into(), "hello.c".into()],
            materials: [("hello.c".to_string(), "aa".repeat(32))].into(),
            products: [
                ("hello".to_string(), "bb".repeat(32)),
                ("hello.c".to_string(), "aa".repeat(32)),
            ]
            .into(),
            byproducts: json!({"return-value": 0, "stdout": "line1\nline2\t\u{1}", "stderr": ""}),
            environment: Value::Null,
        }
    }

    #[test]
    fn signed_shape() {
        let s = sample().to_signed();
        let keys: Vec<&String> = s.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 7);
        assert_eq!(s["_type"], "link");
        assert_eq!(
            s["materials"]["hello.c"],
            json!({"sha256": "aa".repeat(32)})
        );
        assert_eq!(s["environment"], json!({}), "null environment becomes {{}}");
        assert_eq!(Link::from_signed(&s).unwrap().products, sample().products);
    }

    #[test]
    fn metablock_signature_over_canonical() {
        let k = SigningKey::generate();
        let l = sample();
        let bytes = l.sign(&k).unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        // The file escapes control characters (readable by Python's json).
        assert!(!bytes.contains(&1u8));
        let sig = hex::decode(v["signatures"][0]["sig"].as_str().unwrap()).unwrap();
        assert_eq!(v["signatures"][0]["keyid"], k.keyid());
        let canon = cjson::to_canonical(&v["signed"]).unwrap();
        assert!(k.public_key().verify(&canon, &sig));
        assert_eq!(Link::from_signed(&v["signed"]).unwrap().name, "compile");
    }

    #[test]
    fn dsse_envelope_carries_the_signed_link_and_keyid() {
        let k = SigningKey::generate();
        let bytes = sample().sign_dsse(&k).unwrap();
        // Readable by Python's json (no raw control characters).
        assert!(!bytes.contains(&1u8));
        let env: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(env["payloadType"], IN_TOTO_PAYLOAD_TYPE);
        assert_eq!(env["signatures"][0]["keyid"], k.keyid());
        let verified = crate::dsse::verify_envelope(&env, &[k.public_key()]).unwrap();
        assert_eq!(verified.signed_by, vec![k.keyid()]);
        let payload: Value = serde_json::from_slice(&verified.payload).unwrap();
        assert_eq!(payload, sample().to_signed());
        assert!(
            crate::dsse::verify_envelope(&env, &[SigningKey::generate().public_key()]).is_err()
        );
    }

    #[test]
    fn direct_serialisation_matches_the_value_form() {
        let key = SigningKey::generate();
        let mut link = sample();
        link.command = vec!["sh".into(), "-c".into(), "echo \"a\\b\"\n\tq".into()];
        link.products
            .insert("dir/\u{e9}t\u{e9} \"q\"\n".into(), "cc".repeat(32));
        link.byproducts = json!({"stdout": "x\ny", "n": 3, "nested": {"b": [1, "z"], "a": null}});
        link.environment = Value::Null;
        assert_eq!(
            link.canonical_signed().unwrap(),
            cjson::to_canonical(&link.to_signed()).unwrap()
        );
        assert_eq!(
            link.sign(&key).unwrap(),
            sign_metablock(&link.to_signed(), &key).unwrap()
        );
        let payload = serde_json::to_vec(&link.to_signed()).unwrap();
        let mut dsse =
            serde_json::to_vec_pretty(&sign_envelope(IN_TOTO_PAYLOAD_TYPE, &payload, &key))
                .unwrap();
        dsse.push(b'\n');
        assert_eq!(link.sign_dsse(&key).unwrap(), dsse);
    }

    #[test]
    fn file_name() {
        assert_eq!(
            link_file_name("build", "0123456789abcdef"),
            "build.01234567.link"
        );
    }
}
