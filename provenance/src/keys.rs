//! ed25519 keys in the formats the reference verifier reads.
//!
//! Facts established against in-toto 3.1.0 / securesystemslib 1.6.0 (see
//! `tests/python_crosscheck.rs`):
//! - `in-toto-verify --verification-keys owner.pub` reads the file with
//!   `cryptography`'s `load_pem_public_key` (so an RFC 8410 SPKI PEM,
//!   "BEGIN PUBLIC KEY") and converts it with `SSlibKey.from_crypto`, which for
//!   ed25519 gives keytype "ed25519", scheme "ed25519", keyval
//!   `{"public": <hex of the 32 raw bytes>}` and keyid =
//!   sha256(canonical JSON of exactly those three fields); there is no
//!   `keyid_hash_algorithms` in 1.x, so keyids from old 0.x tools differ.
//! - Layout `keys` entries are that dict plus `"keyid"`; in-toto's format
//!   check (`_check_public_key`) requires the `keyid` field.
//! - Signatures are the 64-byte ed25519 signature, hex-encoded in metablocks.
//! - The private key is PKCS#8 v1 PEM ("BEGIN PRIVATE KEY"). ed25519-dalek's
//!   default v2 form (public key embedded) is NOT readable by Python
//!   `cryptography` 50 ("ASN.1 parsing error: extra data"), so v1 is written;
//!   both forms are read.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, Verifier};
use serde_json::{json, Value};

use crate::{cjson, hash, ProvenanceError};

/// An ed25519 signing key (the runner's or a layout owner's).
#[derive(Clone)]
pub struct SigningKey {
    inner: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SigningKey {
    // Never print secret material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey(keyid={})", self.keyid())
    }
}

impl SigningKey {
    /// A fresh key from the OS random source.
    pub fn generate() -> Self {
        SigningKey {
            inner: ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng),
        }
    }

    /// Parse a PKCS#8 PEM ("-----BEGIN PRIVATE KEY-----") ed25519 key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, ProvenanceError> {
        let inner = ed25519_dalek::SigningKey::from_pkcs8_pem(pem).map_err(|e| {
            ProvenanceError::Key(format!("not a PKCS#8 PEM ed25519 private key: {e}"))
        })?;
        Ok(SigningKey { inner })
    }

    /// PKCS#8 v1 PEM encoding ("-----BEGIN PRIVATE KEY-----", RFC 8410).
    ///
    /// v1 (no embedded public key) on purpose: ed25519-dalek's default v2
    /// encoding is rejected by Python `cryptography` ("ASN.1 parsing error:
    /// extra data"), and OpenSSL-based tools all read v1.
    pub fn to_pkcs8_pem(&self) -> String {
        let bytes = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.inner.to_bytes(),
            public_key: None,
        };
        match bytes.to_pkcs8_pem(LineEnding::LF) {
            Ok(pem) => pem.to_string(),
            // Encoding a 32-byte key into a fixed DER template cannot fail;
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
        PublicKey {
            inner: self.inner.verifying_key(),
        }
    }

    /// Raw 64-byte ed25519 signature of `msg`.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.inner.sign(msg).to_bytes().to_vec()
    }

    /// The keyid of the public half (see [`PublicKey::keyid`]).
    pub fn keyid(&self) -> String {
        self.public_key().keyid()
    }
}

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey {
    inner: ed25519_dalek::VerifyingKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey(keyid={})", self.keyid())
    }
}

impl PublicKey {
    /// Parse an RFC 8410 SubjectPublicKeyInfo PEM ("-----BEGIN PUBLIC KEY-----").
    pub fn from_spki_pem(pem: &str) -> Result<Self, ProvenanceError> {
        let inner = ed25519_dalek::VerifyingKey::from_public_key_pem(pem).map_err(|e| {
            ProvenanceError::Key(format!("not an SPKI PEM ed25519 public key: {e}"))
        })?;
        Ok(PublicKey { inner })
    }

    /// RFC 8410 SPKI PEM, readable by `in-toto-verify --verification-keys`.
    pub fn to_spki_pem(&self) -> String {
        self.inner
            .to_public_key_pem(LineEnding::LF)
            .unwrap_or_default()
    }

    /// From the 32 raw public key bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProvenanceError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            ProvenanceError::Key(format!(
                "ed25519 public key must be 32 bytes, got {}",
                bytes.len()
            ))
        })?;
        let inner = ed25519_dalek::VerifyingKey::from_bytes(&arr)
            .map_err(|e| ProvenanceError::Key(format!("invalid ed25519 public key: {e}")))?;
        Ok(PublicKey { inner })
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.inner.to_bytes()
    }

    /// The securesystemslib key fields without `keyid`; the keyid is the
    /// sha256 of exactly this object in canonical JSON.
    fn sslib_fields(&self) -> Value {
        json!({
            "keytype": "ed25519",
            "keyval": {"public": hex::encode(self.inner.to_bytes())},
            "scheme": "ed25519",
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

    /// The entry for a layout's `keys` map:
    /// `{"keyid","keytype":"ed25519","keyval":{"public":hex},"scheme":"ed25519"}`.
    pub fn to_securesystemslib(&self) -> Value {
        let mut v = self.sslib_fields();
        if let Value::Object(m) = &mut v {
            m.insert("keyid".into(), Value::String(self.keyid()));
        }
        v
    }

    /// Parse a securesystemslib key dict. Only ed25519/ed25519 is supported;
    /// a present `keyid` must equal the default keyid, because Kiln finds
    /// links and signatures by that keyid.
    pub fn from_securesystemslib(v: &Value) -> Result<Self, ProvenanceError> {
        let obj = v
            .as_object()
            .ok_or_else(|| ProvenanceError::Format("public key must be a JSON object".into()))?;
        let keytype = obj.get("keytype").and_then(Value::as_str).unwrap_or("");
        let scheme = obj.get("scheme").and_then(Value::as_str).unwrap_or("");
        if keytype != "ed25519" || scheme != "ed25519" {
            return Err(ProvenanceError::Key(format!(
                "unsupported key type/scheme {keytype:?}/{scheme:?} (only ed25519/ed25519 is supported)"
            )));
        }
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
        let bytes = hex::decode(public)
            .map_err(|e| ProvenanceError::Key(format!("keyval.public is not hex: {e}")))?;
        let key = Self::from_bytes(&bytes)?;
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

    /// True when `sig` is a valid ed25519 signature of `msg` by this key.
    /// Uses strict verification (rejects malleable and small-order forms).
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        let Ok(arr) = <[u8; 64]>::try_from(sig) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&arr);
        self.inner.verify_strict(msg, &sig).is_ok() && self.inner.verify(msg, &sig).is_ok()
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
        let v2 = k.inner.to_pkcs8_pem(LineEnding::LF).unwrap();
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
