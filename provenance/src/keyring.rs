//! The runner's signing keys over time: generation, rotation, export.
//!
//! A key ring is a directory (the daemon's `<state>/keys/`):
//! - `<keyid>.pem`: the private key of the current key, PKCS#8 PEM (ed25519
//!   or ECDSA P-256), mode 0600, owned by the daemon's effective uid;
//! - `keyring.json`: every public key the runner ever signed with, each a
//!   securesystemslib key dict (`keyid`, `keytype`, `scheme`, `keyval`) plus
//!   its validity window `not_before` / `not_after` (RFC 3339, `null` = still
//!   open), and `current`, the keyid that signs now:
//!   `{"_type":"kiln/keyring","version":1,"current":..,"keys":[..]}`.
//!
//! Rotation closes the current key's window at the rotation instant, opens a
//! new key's window there (the new key of the type asked, so a ring may hold
//! keys of both types), and deletes the retired private key (nothing may
//! sign with it any more); its public key stays listed so provenance it
//! signed earlier still verifies. Verifiers accept a signature only from a
//! key whose window contains the statement's `finishedOn`
//! ([`TrustedKey::valid_at`]).
//!
//! Writes are atomic (temporary file, fsync, rename, fsync of the directory)
//! and ordered so a crash leaves either the old or the new ring, at worst
//! with an unlisted private key file. One writer at a time (the operator's
//! `kiln keys`); a running daemon keeps the key it loaded until it reopens
//! the ring, and its signatures fail verification once that key's window
//! closes, so the daemon must reopen the ring after a rotation.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::keyfile::{check_dir, read_owned_file, sync_dir, write_atomic};
use crate::keys::{KeyType, PublicKey, SigningKey};
use crate::ProvenanceError;

mod mounted;
use mounted::{MountedDir, Secrecy};

/// The public part of the ring inside the key directory.
pub const KEYRING_FILE: &str = "keyring.json";
const KEYRING_TYPE: &str = "kiln/keyring";
const KEYRING_VERSION: u64 = 1;

/// A public key with the window in which its signatures are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub key: PublicKey,
    pub not_before: OffsetDateTime,
    /// `None`: still the current key.
    pub not_after: Option<OffsetDateTime>,
}

impl TrustedKey {
    /// A key trusted at any time (a bare PEM given to the verifier).
    pub fn unbounded(key: PublicKey) -> Self {
        TrustedKey {
            key,
            not_before: OffsetDateTime::UNIX_EPOCH,
            not_after: None,
        }
    }

    pub fn keyid(&self) -> String {
        self.key.keyid()
    }

    /// True when `t` is inside `[not_before, not_after]` (both inclusive).
    pub fn valid_at(&self, t: OffsetDateTime) -> bool {
        t >= self.not_before && self.not_after.is_none_or(|end| t <= end)
    }

    /// The securesystemslib key dict plus `not_before` / `not_after`.
    pub fn to_json(&self) -> Value {
        let mut v = self.key.to_securesystemslib();
        if let Value::Object(m) = &mut v {
            m.insert(
                "not_before".into(),
                Value::String(fmt_time(self.not_before)),
            );
            m.insert(
                "not_after".into(),
                self.not_after
                    .map_or(Value::Null, |t| Value::String(fmt_time(t))),
            );
        }
        v
    }

    /// Parse [`TrustedKey::to_json`]; the keyid must be the key's own.
    pub fn from_json(v: &Value) -> Result<Self, ProvenanceError> {
        let obj = v
            .as_object()
            .ok_or_else(|| ProvenanceError::Format("keyring entry must be an object".into()))?;
        for k in obj.keys() {
            if ![
                "keyid",
                "keytype",
                "scheme",
                "keyval",
                "not_before",
                "not_after",
            ]
            .contains(&k.as_str())
            {
                return Err(ProvenanceError::Format(format!(
                    "keyring entry: unknown field {k:?}"
                )));
            }
        }
        if !obj.contains_key("keyid") {
            return Err(ProvenanceError::Format("keyring entry has no keyid".into()));
        }
        let key = PublicKey::from_securesystemslib(v)?;
        let not_before = obj
            .get("not_before")
            .and_then(Value::as_str)
            .ok_or_else(|| ProvenanceError::Format("keyring entry has no not_before".into()))
            .and_then(parse_time)?;
        let not_after = match obj.get("not_after") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(parse_time(s)?),
            Some(_) => {
                return Err(ProvenanceError::Format(
                    "keyring entry not_after must be a string or null".into(),
                ))
            }
        };
        if not_after.is_some_and(|end| end < not_before) {
            return Err(ProvenanceError::Format(format!(
                "keyring entry {}: not_after is before not_before",
                key.keyid()
            )));
        }
        Ok(TrustedKey {
            key,
            not_before,
            not_after,
        })
    }
}

/// RFC 3339 in UTC, with the fraction of a second when there is one.
pub fn fmt_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_default()
}

pub fn parse_time(s: &str) -> Result<OffsetDateTime, ProvenanceError> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| ProvenanceError::Format(format!("{s:?} is not an RFC 3339 time: {e}")))
}

/// The public keys of a ring: what `kiln keys public --json` exports and
/// what `kiln verify` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKeyRing {
    /// keyid of the key that signs now.
    pub current: String,
    /// Oldest first.
    pub keys: Vec<TrustedKey>,
}

impl PublicKeyRing {
    pub fn current_key(&self) -> Option<&TrustedKey> {
        self.keys.iter().find(|k| k.keyid() == self.current)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "_type": KEYRING_TYPE,
            "version": KEYRING_VERSION,
            "current": self.current,
            "keys": self.keys.iter().map(TrustedKey::to_json).collect::<Vec<_>>(),
        })
    }

    /// Pretty JSON with a final newline (the file format and the export).
    pub fn to_json_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(&self.to_json()).unwrap_or_default();
        out.push(b'\n');
        out
    }

    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self, ProvenanceError> {
        let v: Value = serde_json::from_slice(bytes)?;
        let obj = v
            .as_object()
            .ok_or_else(|| ProvenanceError::Format("keyring must be a JSON object".into()))?;
        for k in obj.keys() {
            if !["_type", "version", "current", "keys"].contains(&k.as_str()) {
                return Err(ProvenanceError::Format(format!(
                    "keyring: unknown field {k:?}"
                )));
            }
        }
        if obj.get("_type").and_then(Value::as_str) != Some(KEYRING_TYPE) {
            return Err(ProvenanceError::Format(format!(
                "keyring: _type must be {KEYRING_TYPE:?}"
            )));
        }
        if obj.get("version").and_then(Value::as_u64) != Some(KEYRING_VERSION) {
            return Err(ProvenanceError::Format(format!(
                "keyring: unsupported version (this Kiln reads version {KEYRING_VERSION})"
            )));
        }
        let current = obj
            .get("current")
            .and_then(Value::as_str)
            .ok_or_else(|| ProvenanceError::Format("keyring: no current keyid".into()))?
            .to_owned();
        let keys = obj
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| ProvenanceError::Format("keyring: no keys list".into()))?
            .iter()
            .map(TrustedKey::from_json)
            .collect::<Result<Vec<_>, _>>()?;
        let ring = PublicKeyRing { current, keys };
        let mut ids: Vec<String> = ring.keys.iter().map(TrustedKey::keyid).collect();
        ids.sort();
        ids.dedup();
        if ids.len() != ring.keys.len() {
            return Err(ProvenanceError::Format(
                "keyring: a key is listed twice".into(),
            ));
        }
        match ring.current_key() {
            Some(k) if k.not_after.is_none() => Ok(ring),
            Some(_) => Err(ProvenanceError::Format(
                "keyring: the current key's window is closed".into(),
            )),
            None => Err(ProvenanceError::Format(
                "keyring: the current keyid is not listed".into(),
            )),
        }
    }

    /// SPKI PEM of every key, oldest first, each preceded by a comment line
    /// naming its keyid and window (OpenSSL ignores text between blocks).
    pub fn to_pem_bundle(&self) -> String {
        let mut out = String::new();
        for k in &self.keys {
            out.push_str(&format!(
                "# keyid {} valid {} .. {}\n",
                k.keyid(),
                fmt_time(k.not_before),
                k.not_after.map_or_else(|| "now".to_string(), fmt_time)
            ));
            out.push_str(&k.key.to_spki_pem());
        }
        out
    }
}

/// The runner's key ring on disk, with the current private key loaded.
#[derive(Debug)]
pub struct KeyRing {
    dir: PathBuf,
    public: PublicKeyRing,
    signing: SigningKey,
    /// Opened with [`KeyRing::open_read_only`]: never written.
    read_only: bool,
}

impl KeyRing {
    /// Open an existing ring. Refuses a directory or file that another user
    /// owns or can write, a private key file looser than 0600, and a private
    /// key that does not match `current`.
    pub fn open(dir: &Path) -> Result<Self, ProvenanceError> {
        check_dir(dir)?;
        let ring_path = dir.join(KEYRING_FILE);
        let (bytes, mode) = read_owned_file(&ring_path)?;
        if mode & 0o022 != 0 {
            return Err(ProvenanceError::Key(format!(
                "{}: mode {mode:04o} lets others write it",
                ring_path.display()
            )));
        }
        let public = PublicKeyRing::from_json_bytes(&bytes)
            .map_err(|e| ProvenanceError::Key(format!("{}: {e}", ring_path.display())))?;
        let key_path = private_key_path(dir, &public.current);
        let signing = SigningKey::load(&key_path)?;
        if signing.keyid() != public.current {
            return Err(ProvenanceError::Key(format!(
                "{}: holds key {}, not the ring's current key {}",
                key_path.display(),
                signing.keyid(),
                public.current
            )));
        }
        Ok(KeyRing {
            dir: dir.to_path_buf(),
            public,
            signing,
            read_only: false,
        })
    }

    /// Opens a ring mounted read-only from elsewhere, such as a Kubernetes Secret volume
    /// (see [`mounted`] for the links it follows and the checks); returns it with the
    /// bytes of `keyring.json` it was read from. Such a ring is never created, migrated
    /// or rotated: a missing one is an error naming the directory.
    pub fn open_read_only(dir: &Path) -> Result<(Self, Vec<u8>), ProvenanceError> {
        let mounted = MountedDir::open(dir)?;
        let ring = mounted.read(&[], KEYRING_FILE, Secrecy::Public)?;
        let ring_path = dir.join(KEYRING_FILE);
        let public = PublicKeyRing::from_json_bytes(&ring.bytes)
            .map_err(|e| ProvenanceError::Key(format!("{}: {e}", ring_path.display())))?;
        let key_name = format!("{}.pem", public.current);
        // Beside the keyring.json actually read: one version of the Secret.
        let key = mounted.read(&ring.dir, &key_name, Secrecy::Private)?;
        let key_path = dir.join(&key_name);
        let pem = String::from_utf8(key.bytes)
            .map_err(|_| ProvenanceError::Key(format!("{}: not PEM text", key_path.display())))?;
        let signing = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| ProvenanceError::Key(format!("{}: {e}", key_path.display())))?;
        if signing.keyid() != public.current {
            return Err(ProvenanceError::Key(format!(
                "{}: holds key {}, not the ring's current key {}",
                key_path.display(),
                signing.keyid(),
                public.current
            )));
        }
        Ok((
            KeyRing {
                dir: dir.to_path_buf(),
                public,
                signing,
                read_only: true,
            },
            ring.bytes,
        ))
    }

    /// The bytes of a read-only ring's `keyring.json`, read with the checks of
    /// [`KeyRing::open_read_only`] (to notice an update without reading the key).
    pub fn read_only_ring_file(dir: &Path) -> Result<Vec<u8>, ProvenanceError> {
        Ok(MountedDir::open(dir)?
            .read(&[], KEYRING_FILE, Secrecy::Public)?
            .bytes)
    }

    /// Open the ring at `dir`, creating it (directory 0700, a fresh ed25519
    /// key) if it has no `keyring.json`. Returns the ring and whether it was
    /// created.
    pub fn generate(dir: &Path) -> Result<(Self, bool), ProvenanceError> {
        Self::generate_of(dir, KeyType::Ed25519)
    }

    /// [`KeyRing::generate`] with a first key of `key_type`; an existing ring
    /// is opened as it is, whatever its keys' types.
    pub fn generate_of(dir: &Path, key_type: KeyType) -> Result<(Self, bool), ProvenanceError> {
        Self::create_with(
            dir,
            SigningKey::generate_of(key_type),
            OffsetDateTime::now_utc(),
        )
    }

    /// [`KeyRing::generate`] with an explicit creation time.
    pub fn generate_at(dir: &Path, now: OffsetDateTime) -> Result<(Self, bool), ProvenanceError> {
        Self::create_with(dir, SigningKey::generate(), now)
    }

    /// Create a ring whose first key is `key` (e.g. a pre-ring `runner.pem`),
    /// or open the existing ring (then `key` is ignored; the bool is false).
    pub fn import(dir: &Path, key: SigningKey) -> Result<(Self, bool), ProvenanceError> {
        Self::create_with(dir, key, OffsetDateTime::now_utc())
    }

    fn create_with(
        dir: &Path,
        key: SigningKey,
        now: OffsetDateTime,
    ) -> Result<(Self, bool), ProvenanceError> {
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(ProvenanceError::io(dir, e)),
        }
        check_dir(dir)?;
        if fs::symlink_metadata(dir.join(KEYRING_FILE)).is_ok() {
            return Self::open(dir).map(|r| (r, false));
        }
        let keyid = key.keyid();
        write_atomic(
            dir,
            &format!("{keyid}.pem"),
            key.to_pkcs8_pem().as_bytes(),
            0o600,
        )?;
        let public = PublicKeyRing {
            current: keyid.clone(),
            keys: vec![TrustedKey {
                key: key.public_key(),
                not_before: now,
                not_after: None,
            }],
        };
        write_atomic(dir, KEYRING_FILE, &public.to_json_bytes(), 0o644)?;
        Ok((
            KeyRing {
                dir: dir.to_path_buf(),
                public,
                signing: key,
                read_only: false,
            },
            true,
        ))
    }

    /// Replace the current key by a fresh ed25519 key now (see
    /// [`KeyRing::rotate_to_at`]).
    pub fn rotate(&mut self) -> Result<(), ProvenanceError> {
        self.rotate_to(KeyType::Ed25519)
    }

    /// Replace the current key by a fresh one of `key_type` now.
    pub fn rotate_to(&mut self, key_type: KeyType) -> Result<(), ProvenanceError> {
        self.rotate_to_at(key_type, OffsetDateTime::now_utc())
    }

    /// [`KeyRing::rotate`] at `now`.
    pub fn rotate_at(&mut self, now: OffsetDateTime) -> Result<(), ProvenanceError> {
        self.rotate_to_at(KeyType::Ed25519, now)
    }

    /// Close the current key's window at `now`, make a new key of `key_type`
    /// current from `now`, persist, then delete the retired private key.
    pub fn rotate_to_at(
        &mut self,
        key_type: KeyType,
        now: OffsetDateTime,
    ) -> Result<(), ProvenanceError> {
        if self.read_only {
            return Err(ProvenanceError::Key(format!(
                "{}: a read-only key ring is never rotated here: rotate the copy it is made from",
                self.dir.display()
            )));
        }
        let old_id = self.public.current.clone();
        let new = SigningKey::generate_of(key_type);
        let new_id = new.keyid();
        let mut public = self.public.clone();
        for k in &mut public.keys {
            if k.keyid() == old_id {
                if now < k.not_before {
                    return Err(ProvenanceError::Key(format!(
                        "cannot rotate at {}: the current key is valid only from {}",
                        fmt_time(now),
                        fmt_time(k.not_before)
                    )));
                }
                k.not_after = Some(now);
            }
        }
        public.keys.push(TrustedKey {
            key: new.public_key(),
            not_before: now,
            not_after: None,
        });
        public.current = new_id.clone();
        // New private key first: a crash before the ring is written leaves
        // an unlisted file, never a ring naming a missing key.
        write_atomic(
            &self.dir,
            &format!("{new_id}.pem"),
            new.to_pkcs8_pem().as_bytes(),
            0o600,
        )?;
        write_atomic(&self.dir, KEYRING_FILE, &public.to_json_bytes(), 0o644)?;
        self.public = public;
        self.signing = new;
        let old = private_key_path(&self.dir, &old_id);
        match fs::remove_file(&old) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ProvenanceError::io(old, e)),
        }
        Ok(())
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    pub fn public(&self) -> &PublicKeyRing {
        &self.public
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn private_key_path(dir: &Path, keyid: &str) -> PathBuf {
    dir.join(format!("{keyid}.pem"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::keyfile::effective_uid;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use time::macros::datetime;

    fn ring_dir() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("keys");
        (d, dir)
    }

    #[test]
    fn generate_is_idempotent_and_private_key_is_0600() {
        let (_d, dir) = ring_dir();
        let (ring, created) = KeyRing::generate(&dir).unwrap();
        assert!(created);
        let id = ring.public().current.clone();
        assert_eq!(ring.signing_key().keyid(), id);
        let mode = fs::metadata(dir.join(format!("{id}.pem")))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let (again, created) = KeyRing::generate(&dir).unwrap();
        assert!(!created);
        assert_eq!(again.public(), ring.public());
        assert_eq!(KeyRing::open(&dir).unwrap().public(), ring.public());
        // Only the key and the ring: no temporary files left.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);
    }

    #[test]
    fn rotate_keeps_old_public_key_with_closed_window() {
        let (_d, dir) = ring_dir();
        let t0 = datetime!(2026-01-01 00:00 UTC);
        let t1 = datetime!(2026-02-01 12:30:00.5 UTC);
        let (mut ring, _) = KeyRing::generate_at(&dir, t0).unwrap();
        let old = ring.public().current.clone();
        ring.rotate_at(t1).unwrap();
        let new = ring.public().current.clone();
        assert_ne!(old, new);
        assert_eq!(ring.signing_key().keyid(), new);
        let reopened = KeyRing::open(&dir).unwrap();
        assert_eq!(reopened.public(), ring.public());
        let keys = &reopened.public().keys;
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].keyid(), old);
        assert_eq!(keys[0].not_before, t0);
        assert_eq!(keys[0].not_after, Some(t1));
        assert_eq!(keys[1].not_before, t1);
        assert_eq!(keys[1].not_after, None);
        assert!(keys[0].valid_at(datetime!(2026-01-15 00:00 UTC)));
        assert!(!keys[0].valid_at(datetime!(2026-02-02 00:00 UTC)));
        assert!(!keys[1].valid_at(datetime!(2026-01-15 00:00 UTC)));
        // The retired private key is gone; the new one is there.
        assert!(!dir.join(format!("{old}.pem")).exists());
        assert!(dir.join(format!("{new}.pem")).exists());
        // Rotating into the past of the current key is refused.
        assert!(ring.rotate_at(t0).is_err());
    }

    #[test]
    fn export_roundtrip_pem_and_securesystemslib() {
        let (_d, dir) = ring_dir();
        let (mut ring, _) = KeyRing::generate(&dir).unwrap();
        ring.rotate().unwrap();
        let exported = ring.public().to_json_bytes();
        let back = PublicKeyRing::from_json_bytes(&exported).unwrap();
        assert_eq!(&back, ring.public());
        let v: Value = serde_json::from_slice(&exported).unwrap();
        let entry = &v["keys"][1];
        assert_eq!(entry["keytype"], "ed25519");
        assert_eq!(entry["keyid"], ring.public().current);
        assert!(entry["not_after"].is_null());
        // Each entry is a securesystemslib key dict.
        assert_eq!(
            PublicKey::from_securesystemslib(entry).unwrap(),
            ring.signing_key().public_key()
        );
        let bundle = ring.public().to_pem_bundle();
        assert_eq!(bundle.matches("-----BEGIN PUBLIC KEY-----").count(), 2);
        // Unknown fields and a closed current window are refused.
        let mut bad = v.clone();
        bad["extra"] = 1.into();
        assert!(PublicKeyRing::from_json_bytes(&serde_json::to_vec(&bad).unwrap()).is_err());
        let mut closed = v.clone();
        closed["keys"][1]["not_after"] = "2030-01-01T00:00:00Z".into();
        assert!(PublicKeyRing::from_json_bytes(&serde_json::to_vec(&closed).unwrap()).is_err());
        let mut wrong_id = v;
        wrong_id["keys"][0]["keyid"] = "00".into();
        assert!(PublicKeyRing::from_json_bytes(&serde_json::to_vec(&wrong_id).unwrap()).is_err());
    }

    #[test]
    fn a_ring_rotates_across_key_types_and_reads_back_both() {
        let (_d, dir) = ring_dir();
        let (mut ring, _) = KeyRing::generate(&dir).unwrap();
        let ed = ring.public().current.clone();
        ring.rotate_to(KeyType::EcdsaP256).unwrap();
        assert_eq!(ring.signing_key().key_type(), KeyType::EcdsaP256);
        let reopened = KeyRing::open(&dir).unwrap();
        assert_eq!(reopened.signing_key().key_type(), KeyType::EcdsaP256);
        assert_eq!(reopened.signing_key().keyid(), ring.public().current);
        let keys = &reopened.public().keys;
        assert_eq!(keys[0].keyid(), ed);
        assert_eq!(keys[0].key.key_type(), KeyType::Ed25519);
        assert_eq!(keys[1].key.key_type(), KeyType::EcdsaP256);
        // The export carries each key as securesystemslib writes it.
        let v: Value = serde_json::from_slice(&reopened.public().to_json_bytes()).unwrap();
        assert_eq!(v["keys"][0]["keytype"], "ed25519");
        assert_eq!(v["keys"][1]["keytype"], "ecdsa");
        assert_eq!(v["keys"][1]["scheme"], "ecdsa-sha2-nistp256");
        assert!(v["keys"][1]["keyval"]["public"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(
            PublicKeyRing::from_json_bytes(&reopened.public().to_json_bytes()).unwrap(),
            *reopened.public()
        );
        // And back to ed25519; a fresh ring can start with P-256.
        ring.rotate().unwrap();
        assert_eq!(KeyRing::open(&dir).unwrap().public().keys.len(), 3);
        let (_d2, dir2) = ring_dir();
        let (p256, created) = KeyRing::generate_of(&dir2, KeyType::EcdsaP256).unwrap();
        assert!(created);
        assert_eq!(p256.signing_key().key_type(), KeyType::EcdsaP256);
        // An existing ring is opened as it is, whatever type is asked.
        let (same, created) = KeyRing::generate_of(&dir2, KeyType::Ed25519).unwrap();
        assert!(!created);
        assert_eq!(same.signing_key().key_type(), KeyType::EcdsaP256);
    }

    #[test]
    fn refuses_loose_modes_and_foreign_owners() {
        let (_d, dir) = ring_dir();
        let (ring, _) = KeyRing::generate(&dir).unwrap();
        let key = dir.join(format!("{}.pem", ring.public().current));
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
        let e = KeyRing::open(&dir).unwrap_err();
        assert!(
            matches!(e, ProvenanceError::KeyFileMode { mode: 0o640, .. }),
            "{e}"
        );
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        KeyRing::open(&dir).unwrap();

        fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).unwrap();
        assert!(KeyRing::open(&dir).is_err());
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();

        // Ownership: only testable as root (chown to another uid).
        if effective_uid().unwrap() == 0 {
            std::os::unix::fs::chown(&key, Some(65534), None).unwrap();
            let e = KeyRing::open(&dir).unwrap_err();
            assert!(
                matches!(
                    e,
                    ProvenanceError::KeyFileOwner {
                        uid: 65534,
                        euid: 0,
                        ..
                    }
                ),
                "{e}"
            );
            // The legacy single-key loader refuses it too.
            assert!(matches!(
                SigningKey::load_or_create(&key).unwrap_err(),
                ProvenanceError::KeyFileOwner { .. }
            ));
            std::os::unix::fs::chown(&key, Some(0), None).unwrap();
            KeyRing::open(&dir).unwrap();
        } else {
            eprintln!("not root: foreign-owner refusal not exercised");
        }
    }

    #[test]
    fn import_adopts_an_existing_key() {
        let (d, dir) = ring_dir();
        let legacy = SigningKey::load_or_create(&d.path().join("runner.pem")).unwrap();
        let (ring, created) = KeyRing::import(&dir, legacy.clone()).unwrap();
        assert!(created);
        assert_eq!(ring.public().current, legacy.keyid());
        let (again, created) = KeyRing::import(&dir, SigningKey::generate()).unwrap();
        assert!(!created);
        assert_eq!(again.signing_key().keyid(), legacy.keyid());
    }

    #[test]
    fn euid_matches_a_fresh_file_owner() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, b"x").unwrap();
        assert_eq!(effective_uid().unwrap(), fs::metadata(&p).unwrap().uid());
    }
}
