//! securesystemslib's canonical JSON (`securesystemslib.formats.encode_canonical`).
//!
//! Differences from ordinary JSON that matter for signatures: keys sorted by
//! code point, no whitespace, only `"` and `\` escaped (every other character,
//! including newline and control characters, is written raw as UTF-8), and no
//! floats. serde_json's serializer escapes control characters, so it cannot be
//! used for signed bytes.

use serde_json::Value;

use crate::ProvenanceError;

/// Encode `value` as securesystemslib canonical JSON.
pub fn to_canonical(value: &Value) -> Result<Vec<u8>, ProvenanceError> {
    let mut out = Vec::with_capacity(256);
    encode(value, &mut out)?;
    Ok(out)
}

/// Append the canonical encoding of `value` to `out`.
pub(crate) fn encode(value: &Value, out: &mut Vec<u8>) -> Result<(), ProvenanceError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            // Python's encoder accepts ints only; a float is a FormatError there.
            if let Some(i) = n.as_i64() {
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(u) = n.as_u64() {
                out.extend_from_slice(u.to_string().as_bytes());
            } else {
                return Err(ProvenanceError::CanonicalJson(format!("float {n}")));
            }
        }
        Value::String(s) => encode_str(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                encode(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // Sort explicitly: serde_json's map keeps insertion order when
            // another crate in the build enables `preserve_order`. Byte order
            // of UTF-8 equals code point order, which is Python's str order.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                encode_str(k, out);
                out.push(b':');
                encode(v, out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

/// Append the canonical encoding of the string `s` to `out`.
pub(crate) fn encode_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for b in s.bytes() {
        // Safe to work on bytes: '"' and '\' never occur inside a multi-byte
        // UTF-8 sequence.
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn c(v: Value) -> String {
        String::from_utf8(to_canonical(&v).unwrap()).unwrap()
    }

    #[test]
    fn scalars() {
        assert_eq!(c(json!(null)), "null");
        assert_eq!(c(json!(true)), "true");
        assert_eq!(c(json!(false)), "false");
        assert_eq!(c(json!(0)), "0");
        assert_eq!(c(json!(-42)), "-42");
        assert_eq!(c(json!(u64::MAX)), "18446744073709551615");
        assert_eq!(c(json!(i64::MIN)), "-9223372036854775808");
        assert_eq!(c(json!("")), "\"\"");
    }

    #[test]
    fn strings_escape_only_quote_and_backslash() {
        assert_eq!(c(json!("a\tb")), "\"a\tb\"");
        assert_eq!(c(json!("a\nb")), "\"a\nb\"");
        assert_eq!(c(json!("\u{1}\u{1f}\u{7f}")), "\"\u{1}\u{1f}\u{7f}\"");
        // A literal backslash followed by n stays two characters, backslash doubled.
        assert_eq!(c(json!("x\\ny")), "\"x\\\\ny\"");
        assert_eq!(c(json!("say \"hi\"")), "\"say \\\"hi\\\"\"");
        assert_eq!(c(json!("é日本")), "\"é日本\"");
        assert_eq!(c(json!("😀")).as_bytes(), "\"😀\"".as_bytes());
    }

    #[test]
    fn objects_sorted_nested_no_whitespace() {
        let v = json!({"b": 1, "a": {"z": [1, 2, {"y": null, "x": "s"}], "A": true}, "é": 0, "_type": "t", "Z": []});
        assert_eq!(
            c(v),
            r#"{"Z":[],"_type":"t","a":{"A":true,"z":[1,2,{"x":"s","y":null}]},"b":1,"é":0}"#
        );
        assert_eq!(c(json!({})), "{}");
        assert_eq!(c(json!([])), "[]");
    }

    #[test]
    fn keys_sort_by_code_point() {
        // U+FF21 (fullwidth A, 3 UTF-8 bytes) sorts after U+00E9 (2 bytes),
        // and U+1F600 after both: byte order equals code point order.
        let v = json!({"\u{1F600}": 1, "\u{FF21}": 2, "é": 3, "z": 4});
        assert_eq!(c(v), "{\"z\":4,\"é\":3,\"\u{FF21}\":2,\"\u{1F600}\":1}");
    }

    #[test]
    fn floats_rejected() {
        assert!(to_canonical(&json!(1.5)).is_err());
        assert!(to_canonical(&json!({"a": [0.0]})).is_err());
    }
}
