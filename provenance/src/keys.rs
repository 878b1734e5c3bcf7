//! Signing keys (ed25519, the default, or ECDSA P-256) in the formats the
//! reference verifier reads.
//!
//! Facts established against in-toto 3.1.0 / securesystemslib 1.6.0 (see
//! `tests/python_crosscheck.rs`):
//! - `in-toto-verify --verification-keys owner.pub` reads the file with
//!   `cryptography`'s `load_pem_public_key` (so an SPKI PEM,
//!   "BEGIN PUBLIC KEY") and converts it with `SSlibKey.from_crypto`, which
//!   gives for ed25519: keytype "ed25519", scheme "ed25519", keyval
//!   `{"public": <hex of the 32 raw bytes>}`; for a P-256 key: keytype
//!   "ecdsa", scheme "ecdsa-sha2-nistp256", keyval `{"public": <the SPKI PEM,
//!   final newline included>}`. The keyid is sha256(canonical JSON of exactly
//!   those three fields); there is no `keyid_hash_algorithms` in 1.x, so
//!   keyids from old 0.x tools differ.
//! - Layout `keys` entries are that dict plus `"keyid"`; in-toto's format
//!   check (`_check_public_key`) requires the `keyid` field.
//! - Signatures: ed25519's 64 bytes; ECDSA's DER `SEQUENCE {r, s}` over the
//!   SHA-256 of the message. Hex-encoded in metablocks, base64 in DSSE.
//! - The private key is PKCS#8 PEM ("BEGIN PRIVATE KEY"). For ed25519 v1 is
//!   written: ed25519-dalek's default v2 form (public key embedded) is NOT
//!   readable by Python `cryptography` 50 ("ASN.1 parsing error: extra
//!   data"); both forms are read.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use serde_json::{json, Value};

use crate::{cjson, hash, ProvenanceError};

/// The algorithm of a key, named as the runner's `key_type` setting names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum KeyType {
    #[default]
    Ed25519,
    /// ECDSA over NIST P-256 with SHA-256.
    EcdsaP256,
}

impl KeyType {
    /// Every type, in the order they are documented.
    pub const ALL: [KeyType; 2] = [KeyType::Ed25519, KeyType::EcdsaP256];

    /// `"ed25519"` or `"ecdsa-p256"`.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Ed25519 => "ed25519",
            KeyType::EcdsaP256 => "ecdsa-p256",
        }
    }
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A `key_type` that names no supported type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown key type {0:?} (expected \"ed25519\" or \"ecdsa-p256\")")]
pub struct UnknownKeyType(pub String);

impl std::str::FromStr for KeyType {
    type Err = UnknownKeyType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| UnknownKeyType(s.to_string()))
    }
}

#[derive(Clone)]
enum SecretKey {
    Ed25519(ed25519_dalek::SigningKey),
    EcdsaP256(p256::ecdsa::SigningKey),
}

/// A signing key (the runner's or a layout owner's): ed25519 or ECDSA P-256.
#[derive(Clone)]
pub struct SigningKey {
    inner: SecretKey,
}

impl std::fmt::Debug for SigningKey {
    // Never print secret material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({}, keyid={})", self.key_type(), self.keyid())
    }
}

impl SigningKey {
    /// A fresh ed25519 key from the OS random source.
    pub fn generate() -> Self {
        Self::generate_of(KeyType::Ed25519)
    }

    /// A fresh key of `key_type` from the OS random source.
    pub fn generate_of(key_type: KeyType) -> Self {
        let inner = match key_type {
            KeyType::Ed25519 => {
                SecretKey::Ed25519(ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng))
            }
            KeyType::EcdsaP256 => {
                SecretKey::EcdsaP256(p256::ecdsa::SigningKey::random(&mut rand_core::OsRng))
            }
        };
        SigningKey { inner }
    }

    pub fn key_type(&self) -> KeyType {
        match self.inner {
            SecretKey::Ed25519(_) => KeyType::Ed25519,
            SecretKey::EcdsaP256(_) => KeyType::EcdsaP256,
        }
    }

    /// Parse a PKCS#8 PEM ("-----BEGIN PRIVATE KEY-----") ed25519 or P-256 key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, ProvenanceError> {
        let ed25519 = match ed25519_dalek::SigningKey::from_pkcs8_pem(pem) {
            Ok(k) => {
                return Ok(SigningKey {
                    inner: SecretKey::Ed25519(k),
                })
            }
            Err(e) => e,
        };
        if pem.contains("-----BEGIN EC PRIVATE KEY-----") {
            // What `openssl ecparam -genkey` writes; one command turns it into PKCS#8.
            return Err(ProvenanceError::Key(
                "an EC key in SEC1 form (\"BEGIN EC PRIVATE KEY\"), not PKCS#8: convert it with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pem`".into(),
            ));
        }
        match p256::ecdsa::SigningKey::from_pkcs8_pem(pem) {
            Ok(k) => Ok(SigningKey {
                inner: SecretKey::EcdsaP256(k),
            }),
            Err(p256) => Err(ProvenanceError::Key(format!(
                "not a PKCS#8 PEM ed25519 or ECDSA P-256 private key (as ed25519: {ed25519}; as P-256: {p256})"
            ))),
        }
    }

    /// PKCS#8 PEM encoding ("-----BEGIN PRIVATE KEY-----").
    ///
    /// ed25519 keys as v1 (RFC 8410, no embedded public key) on purpose:
    /// ed25519-dalek's default v2 encoding is rejected by Python
    /// `cryptography` ("ASN.1 parsing error: extra data"), and OpenSSL-based
    /// tools all read v1. P-256 keys as RFC 5915 inside PKCS#8, as OpenSSL
    /// writes them.
    pub fn to_pkcs8_pem(&self) -> String {
        let encoded = match &self.inner {
            SecretKey::Ed25519(k) => ed25519_dalek::pkcs8::KeypairBytes {
                secret_key: k.to_bytes(),
                public_key: None,
            }
            .to_pkcs8_pem(LineEnding::LF),
            SecretKey::EcdsaP256(k) => k.to_pkcs8_pem(LineEnding::LF),
        };
        match encoded {
            Ok(pem) => pem.to_string(),
            // Encoding a fixed-size key into a fixed DER template cannot fail;
            // an empty string would then fail loudly on load.
            Err(_) => String::new(),
        }
    }

    /// Load the key at `path`, or create it if the file does not exist.
    ///
    /// Creation writes a temporary file with mode 0600 in the same directory,
    /// fsyncs it and links it into place without overwriting, so a crash never
    /// leaves a partial key and two racing creators end up using one key.
    /// Loading refuses a symlink, a file readable or writable by group or
    /// others, and a file not owned by the effective uid.
    pub fn load_or_create(path: &Path) -> Result<Self, ProvenanceError> {
        match Self::load(path) {
            Ok(k) => return Ok(k),
            Err(ProvenanceError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let key = Self::generate();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let file_name = path
            .file_name()
            .ok_or_else(|| ProvenanceError::Key(format!("{}: not a file path", path.display())))?;
        let mut nonce = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{}",
            file_name.to_string_lossy(),
            std::process::id(),
            hex::encode(nonce)
        ));
        let write_tmp = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(key.to_pkcs8_pem().as_bytes())?;
            f.sync_all()
        };
        if let Err(e) = write_tmp() {
            let _ = fs::remove_file(&tmp);
            return Err(ProvenanceError::io(&tmp, e));
        }
        // hard_link fails with AlreadyExists instead of replacing a key that
        // another process created meanwhile.
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                if let Ok(d) = File::open(&dir) {
                    // Persist the directory entry; best effort on odd filesystems.
                    let _ = d.sync_all();
                }
                Ok(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(path),
            Err(e) => Err(ProvenanceError::io(path, e)),
        }
    }

    /// Load an existing key file: a regular file (not a symlink), mode 0600
    /// or stricter, owned by the effective uid.
    pub fn load(path: &Path) -> Result<Self, ProvenanceError> {
        let (bytes, mode) = crate::keyfile::read_owned_file(path)?;
        if mode & 0o077 != 0 {
            return Err(ProvenanceError::KeyFileMode {
                path: path.to_path_buf(),
                mode,
            });
        }
        let pem = String::from_utf8(bytes)
            .map_err(|_| ProvenanceError::Key(format!("{}: not PEM text", path.display())))?;
        Self::from_pkcs8_pem(&pem)
            .map_err(|e| ProvenanceError::Key(format!("{}: {e}", path.display())))
    }

    pub fn public_key(&self) -> PublicKey {
        let inner = match &self.inner {
            SecretKey::Ed25519(k) => VerifyingKey::Ed25519(k.verifying_key()),
            SecretKey::EcdsaP256(k) => VerifyingKey::EcdsaP256(*k.verifying_key()),
        };
        PublicKey { inner }
    }

    /// The signature of `msg`: ed25519's 64 bytes, or for P-256 the DER
    /// encoding of an ECDSA signature over SHA-256(`msg`) (deterministic,
    /// RFC 6979).
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        match &self.inner {
            SecretKey::Ed25519(k) => {
                use ed25519_dalek::Signer as _;
                k.sign(msg).to_bytes().to_vec()
            }
            SecretKey::EcdsaP256(k) => {
                use p256::ecdsa::signature::Signer as _;
                let sig: p256::ecdsa::DerSignature = k.sign(msg);
                sig.as_bytes().to_vec()
            }
        }
    }

    /// The keyid of the public half (see [`PublicKey::keyid`]).
    pub fn keyid(&self) -> String {
        self.public_key().keyid()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum VerifyingKey {
    Ed25519(ed25519_dalek::VerifyingKey),
    EcdsaP256(p256::ecdsa::VerifyingKey),
}

/// A public key: ed25519 or ECDSA P-256.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey {
    inner: VerifyingKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({}, keyid={})", self.key_type(), self.keyid())
    }
}

/// securesystemslib's names of a key type: (keytype, scheme).
fn sslib_names(key_type: KeyType) -> (&'static str, &'static str) {
    match key_type {
        KeyType::Ed25519 => ("ed25519", "ed25519"),
        KeyType::EcdsaP256 => ("ecdsa", "ecdsa-sha2-nistp256"),
    }
}

impl PublicKey {
    pub fn key_type(&self) -> KeyType {
        match self.inner {
            VerifyingKey::Ed25519(_) => KeyType::Ed25519,
            VerifyingKey::EcdsaP256(_) => KeyType::EcdsaP256,
        }
    }

    /// Parse a SubjectPublicKeyInfo PEM ("-----BEGIN PUBLIC KEY-----") of an
    /// ed25519 (RFC 8410) or P-256 (RFC 5480) key.
    pub fn from_spki_pem(pem: &str) -> Result<Self, ProvenanceError> {
        let ed25519 = match ed25519_dalek::VerifyingKey::from_public_key_pem(pem) {
            Ok(k) => {
                return Ok(PublicKey {
                    inner: VerifyingKey::Ed25519(k),
                })
            }
            Err(e) => e,
        };
        match p256::ecdsa::VerifyingKey::from_public_key_pem(pem) {
            Ok(k) => Ok(PublicKey {
                inner: VerifyingKey::EcdsaP256(k),
            }),
            Err(p256) => Err(ProvenanceError::Key(format!(
                "not an SPKI PEM ed25519 or ECDSA P-256 public key (as ed25519: {ed25519}; as P-256: {p256})"
            ))),
        }
    }

    /// SPKI PEM, readable by `in-toto-verify --verification-keys` (an
    /// uncompressed point for P-256, as `cryptography` writes it).
    pub fn to_spki_pem(&self) -> String {
        match &self.inner {
            VerifyingKey::Ed25519(k) => k.to_public_key_pem(LineEnding::LF),
            VerifyingKey::EcdsaP256(k) => k.to_public_key_pem(LineEnding::LF),
        }
        .unwrap_or_default()
    }

    /// An ed25519 key from its 32 raw public key bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProvenanceError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            ProvenanceError::Key(format!(
                "ed25519 public key must be 32 bytes, got {}",
                bytes.len()
            ))
        })?;
        let inner = ed25519_dalek::VerifyingKey::from_bytes(&arr)
            .map_err(|e| ProvenanceError::Key(format!("invalid ed25519 public key: {e}")))?;
        Ok(PublicKey {
            inner: VerifyingKey::Ed25519(inner),
        })
    }

    /// The securesystemslib key fields without `keyid`; the keyid is the
    /// sha256 of exactly this object in canonical JSON.
    fn sslib_fields(&self) -> Value {
        let (keytype, scheme) = sslib_names(self.key_type());
        let public = match &self.inner {
            VerifyingKey::Ed25519(k) => hex::encode(k.to_bytes()),
            VerifyingKey::EcdsaP256(_) => self.to_spki_pem(),
        };
        json!({
            "keytype": keytype,
            "keyval": {"public": public},
            "scheme": scheme,
        })
    }

    /// hex(sha256(canonical JSON of `{"keytype","keyval":{"public"},"scheme"}`)),
    /// securesystemslib 1.x's default keyid.
    pub fn keyid(&self) -> String {
        match cjson::to_canonical(&self.sslib_fields()) {
            Ok(bytes) => hash::sha256_bytes(&bytes),
            // Only strings are encoded here, which cannot fail.
            Err(_) => String::new(),
        }
    }

    /// The entry for a layout's `keys` map: `{"keyid","keytype","keyval":{"public"},"scheme"}`
    /// (ed25519: `"ed25519"`, hex; P-256: `"ecdsa"`, SPKI PEM, `"ecdsa-sha2-nistp256"`).
    pub fn to_securesystemslib(&self) -> Value {
        let mut v = self.sslib_fields();
        if let Value::Object(m) = &mut v {
            m.insert("keyid".into(), Value::String(self.keyid()));
        }
        v
    }

    /// Parse a securesystemslib key dict: ed25519/ed25519 or
    /// ecdsa/ecdsa-sha2-nistp256. A present `keyid` must equal the default
    /// keyid, because Kiln finds links and signatures by that keyid.
    pub fn from_securesystemslib(v: &Value) -> Result<Self, ProvenanceError> {
        let obj = v
            .as_object()
            .ok_or_else(|| ProvenanceError::Format("public key must be a JSON object".into()))?;
        let keytype = obj.get("keytype").and_then(Value::as_str).unwrap_or("");
        let scheme = obj.get("scheme").and_then(Value::as_str).unwrap_or("");
        let Some(key_type) = KeyType::ALL
            .into_iter()
            .find(|t| sslib_names(*t) == (keytype, scheme))
        else {
            return Err(ProvenanceError::Key(format!(
                "unsupported key type/scheme {keytype:?}/{scheme:?} (supported: ed25519/ed25519, ecdsa/ecdsa-sha2-nistp256)"
            )));
        };
        if obj.contains_key("subkeys") {
            return Err(ProvenanceError::Key(
                "unsupported: keys with subkeys (GPG)".into(),
            ));
        }
        let public = obj
            .get("keyval")
            .and_then(|kv| kv.get("public"))
            .and_then(Value::as_str)
            .ok_or_else(|| ProvenanceError::Format("key has no keyval.public string".into()))?;
        let key = match key_type {
            KeyType::Ed25519 => {
                let bytes = hex::decode(public)
                    .map_err(|e| ProvenanceError::Key(format!("keyval.public is not hex: {e}")))?;
                Self::from_bytes(&bytes)?
            }
            KeyType::EcdsaP256 => {
                let inner =
                    p256::ecdsa::VerifyingKey::from_public_key_pem(public).map_err(|e| {
                        ProvenanceError::Key(format!(
                            "keyval.public is not an SPKI PEM P-256 public key: {e}"
                        ))
                    })?;
                PublicKey {
                    inner: VerifyingKey::EcdsaP256(inner),
                }
            }
        };
        if let Some(id) = obj.get("keyid") {
            let id = id
                .as_str()
                .ok_or_else(|| ProvenanceError::Format("keyid must be a string".into()))?;
            if id != key.keyid() {
                return Err(ProvenanceError::Key(format!(
                    "unsupported keyid {id}: differs from the securesystemslib 1.x default keyid {} of this key",
                    key.keyid()
                )));
            }
        }
        Ok(key)
    }

    /// True when `sig` is a valid signature of `msg` by this key. ed25519:
    /// strict verification (rejects malleable and small-order forms). P-256:
    /// a DER-encoded ECDSA signature over SHA-256(`msg`); any other encoding
    /// (BER variants, raw r||s) is refused.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        match &self.inner {
            VerifyingKey::Ed25519(k) => {
                use ed25519_dalek::Verifier as _;
                let Ok(arr) = <[u8; 64]>::try_from(sig) else {
                    return false;
                };
                let sig = ed25519_dalek::Signature::from_bytes(&arr);
                k.verify_strict(msg, &sig).is_ok() && k.verify(msg, &sig).is_ok()
            }
            VerifyingKey::EcdsaP256(k) => {
                use p256::ecdsa::signature::Verifier as _;
                let Ok(parsed) = p256::ecdsa::Signature::from_der(sig) else {
                    return false;
                };
                // DER is unique; re-encoding catches any leniency of the parser.
                parsed.to_der().as_bytes() == sig && k.verify(msg, &parsed).is_ok()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn pem_roundtrip_and_sign() {
        let k = SigningKey::generate();
        let pem = k.to_pkcs8_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let k2 = SigningKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(k.keyid(), k2.keyid());
        let pub_pem = k.public_key().to_spki_pem();
        assert!(pub_pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        let p = PublicKey::from_spki_pem(&pub_pem).unwrap();
        assert_eq!(p, k.public_key());
        let sig = k.sign(b"msg");
        assert_eq!(sig.len(), 64);
        assert!(p.verify(b"msg", &sig));
        assert!(!p.verify(b"msh", &sig));
        assert!(!p.verify(b"msg", &sig[..63]));
        // The PKCS#8 v2 form (public key embedded) other tools write is read too.
        let SecretKey::Ed25519(inner) = &k.inner else {
            panic!("generate() makes ed25519 keys")
        };
        let v2 = inner.to_pkcs8_pem(LineEnding::LF).unwrap();
        assert_ne!(v2.as_str(), pem);
        assert_eq!(SigningKey::from_pkcs8_pem(&v2).unwrap().keyid(), k.keyid());
        assert!(PublicKey::from_spki_pem(&pem).is_err());
        assert!(SigningKey::from_pkcs8_pem(&pub_pem).is_err());
    }

    #[test]
    fn keyid_known_vector() {
        // RFC 8032 test 1 public key; keyid computed independently with
        // python: sha256(b'{"keytype":"ed25519","keyval":{"public":"d75a...511a"},"scheme":"ed25519"}').
        let pk = PublicKey::from_bytes(
            &hex::decode("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
                .unwrap(),
        )
        .unwrap();
        let canon = br#"{"keytype":"ed25519","keyval":{"public":"d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"},"scheme":"ed25519"}"#;
        assert_eq!(pk.keyid(), hash::sha256_bytes(canon));
        let v = pk.to_securesystemslib();
        assert_eq!(v["keyid"], pk.keyid());
        assert!(v.get("keyid_hash_algorithms").is_none());
        assert_eq!(PublicKey::from_securesystemslib(&v).unwrap(), pk);
        let mut bad = v.clone();
        bad["keyid"] = "00".into();
        assert!(PublicKey::from_securesystemslib(&bad).is_err());
        let mut rsa = v;
        rsa["keytype"] = "rsa".into();
        let e = PublicKey::from_securesystemslib(&rsa)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsupported"), "{e}");
    }

    /// The RFC 6979 A.2.5 P-256 private key, as Python `cryptography` writes it
    /// (PKCS#8); its public PEM and keyid as securesystemslib 1.6.0's
    /// `SSlibKey.from_crypto` gives them.
    const P256_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgya+p2EW6dRZrXCFX
Z7HWk05Qw9s26JsSe4piKxIPZyGhRANCAARg/tS6JVqdMclh63TGNW1owEm4kjth
+mzmaWIuYPKftnkD/hAIuLyZpBrp6VYovGTy8bIMLX6fUXejwpTURiKZ
-----END PRIVATE KEY-----
";
    const P256_SPKI: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEYP7UuiVanTHJYet0xjVtaMBJuJI7
Yfps5mliLmDyn7Z5A/4QCLi8maQa6elWKLxk8vGyDC1+n1F3o8KU1EYimQ==
-----END PUBLIC KEY-----
";
    const P256_KEYID: &str = "716d622ec609eff48475645919645bb30ef604f59a69c764608fb64272dd5fe5";

    #[test]
    fn p256_keys_match_securesystemslib() {
        let k = SigningKey::from_pkcs8_pem(P256_PKCS8).unwrap();
        assert_eq!(k.key_type(), KeyType::EcdsaP256);
        let p = k.public_key();
        assert_eq!(p.to_spki_pem(), P256_SPKI);
        assert_eq!(p.keyid(), P256_KEYID);
        assert_eq!(PublicKey::from_spki_pem(P256_SPKI).unwrap(), p);
        let v = p.to_securesystemslib();
        assert_eq!(
            v,
            json!({"keyid": P256_KEYID, "keytype": "ecdsa", "scheme": "ecdsa-sha2-nistp256",
                   "keyval": {"public": P256_SPKI}})
        );
        assert_eq!(PublicKey::from_securesystemslib(&v).unwrap(), p);
        // The right names with an ed25519 key's value, or the reverse, are refused.
        let mut swapped = v.clone();
        swapped["keyval"]["public"] = json!(hex::encode([7u8; 32]));
        assert!(PublicKey::from_securesystemslib(&swapped).is_err());
        let mut renamed = v;
        renamed["keytype"] = "ed25519".into();
        assert!(PublicKey::from_securesystemslib(&renamed).is_err());

        // Written and read back in PKCS#8.
        let again = SigningKey::from_pkcs8_pem(&k.to_pkcs8_pem()).unwrap();
        assert_eq!(again.keyid(), P256_KEYID);
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nAA==\n-----END EC PRIVATE KEY-----\n";
        let e = SigningKey::from_pkcs8_pem(sec1).unwrap_err().to_string();
        assert!(e.contains("openssl pkcs8 -topk8"), "{e}");
        let fresh = SigningKey::generate_of(KeyType::EcdsaP256);
        assert_eq!(fresh.key_type(), KeyType::EcdsaP256);
        assert_ne!(fresh.keyid(), P256_KEYID);
        let pem = fresh.to_pkcs8_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        assert_eq!(
            SigningKey::from_pkcs8_pem(&pem).unwrap().keyid(),
            fresh.keyid()
        );
    }

    #[test]
    fn p256_signatures_are_strict_der_over_sha256() {
        let k = SigningKey::from_pkcs8_pem(P256_PKCS8).unwrap();
        let p = k.public_key();
        let sig = k.sign(b"msg");
        // SEQUENCE { INTEGER r, INTEGER s }
        assert_eq!(sig[0], 0x30);
        assert_eq!(usize::from(sig[1]) + 2, sig.len());
        assert!(p.verify(b"msg", &sig));
        assert!(!p.verify(b"msh", &sig));
        let other = SigningKey::generate_of(KeyType::EcdsaP256).public_key();
        assert!(!other.verify(b"msg", &sig));
        // An ed25519 key never accepts it, nor a P-256 key an ed25519 signature.
        let ed = SigningKey::generate();
        assert!(!ed.public_key().verify(b"msg", &sig));
        assert!(!p.verify(b"msg", &ed.sign(b"msg")));
        // The same (r, s) as raw r||s, or with a long-form length: refused.
        let parsed = p256::ecdsa::Signature::from_der(&sig).unwrap();
        assert!(!p.verify(b"msg", &parsed.to_bytes()));
        let mut long_form = vec![0x30, 0x81, sig[1]];
        long_form.extend_from_slice(&sig[2..]);
        assert!(!p.verify(b"msg", &long_form));
        let mut trailing = sig.clone();
        trailing.push(0);
        assert!(!p.verify(b"msg", &trailing));
    }

    #[test]
    fn key_type_names() {
        for t in KeyType::ALL {
            assert_eq!(t.name().parse::<KeyType>().unwrap(), t);
            assert_eq!(SigningKey::generate_of(t).public_key().key_type(), t);
        }
        assert_eq!(KeyType::default(), KeyType::Ed25519);
        let e = "rsa".parse::<KeyType>().unwrap_err().to_string();
        assert!(e.contains("\"rsa\"") && e.contains("ecdsa-p256"), "{e}");
    }

    #[test]
    fn load_or_create_modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runner.key");
        let k = SigningKey::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = SigningKey::load_or_create(&path).unwrap();
        assert_eq!(k.keyid(), again.keyid());
        // No temporary files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = SigningKey::load_or_create(&path).unwrap_err();
        assert!(
            matches!(e, ProvenanceError::KeyFileMode { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("too permissive"));

        // A symlink to a key is refused rather than followed.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(SigningKey::load_or_create(&link).is_err());

        // A garbage key file is an error, never silently replaced.
        let junk = dir.path().join("junk.key");
        fs::write(&junk, "nope").unwrap();
        fs::set_permissions(&junk, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(SigningKey::load_or_create(&junk).is_err());
        assert_eq!(fs::read_to_string(&junk).unwrap(), "nope");
    }
}
