//! The daemon's signing key: the current key of the key ring in `<state>/keys/`.
//!
//! `kiln keys rotate` rewrites `keyring.json` while the daemon runs. Before
//! every signature (link, provenance) and every GetPublicKey the [`Signer`]
//! reads that small file and compares it with the bytes it loaded; when they
//! differ it reopens the ring (all owner and mode checks again). A byte
//! comparison, not mtime or inode, so neither a coarse timestamp nor a reused
//! inode can hide a rotation. A ring that changed but cannot be opened fails
//! the signature: the old key may be retired, so it is never used as a fallback.
//!
//! A ring the configuration names with `keys_dir` (a Kubernetes Secret volume, say) is
//! read-only: never created, migrated or rotated here, read through the links of the
//! kubelet's layout only (see `provenance::keyring::KeyRing::open_read_only`), and an
//! update of the Secret, which swaps its `..data` link, is picked up the same way.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use provenance::keyring::{fmt_time, KeyRing, PublicKeyRing, KEYRING_FILE};
use provenance::keys::{KeyType, SigningKey};
use provenance::ProvenanceError;
use time::OffsetDateTime;

use crate::config::Config;

/// The single key file of Kiln before key rings; imported once, then removed.
pub const LEGACY_KEY_FILE: &str = "runner.pem";

/// How [`open_ring`] found the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingOrigin {
    Existing,
    /// A fresh ring with a new key.
    Created,
    /// A ring made from a pre-ring `runner.pem`, keeping its key id.
    Migrated,
}

/// Opens the ring in `dir`. Without `keyring.json`: imports a legacy
/// `runner.pem` (then deletes it: the ring holds the key now, and a rotation
/// must leave no copy of the retired private key), or else creates a fresh
/// ring with a key of `key_type` when `create`, or fails.
pub fn open_ring(
    dir: &Path,
    create: bool,
    key_type: KeyType,
) -> Result<(KeyRing, RingOrigin), ProvenanceError> {
    let legacy = dir.join(LEGACY_KEY_FILE);
    if exists(&dir.join(KEYRING_FILE)) {
        let ring = KeyRing::open(dir)?;
        remove_imported_legacy(&ring, &legacy)?;
        return Ok((ring, RingOrigin::Existing));
    }
    if exists(&legacy) {
        let key = SigningKey::load(&legacy)?;
        let (ring, _) = KeyRing::import(dir, key)?;
        remove_imported_legacy(&ring, &legacy)?;
        return Ok((ring, RingOrigin::Migrated));
    }
    if !create {
        return Err(ProvenanceError::Key(format!(
            "{}: no key ring (create one with `kiln keys generate` or by starting the daemon)",
            dir.display()
        )));
    }
    let (ring, created) = KeyRing::generate_of(dir, key_type)?;
    let origin = if created {
        RingOrigin::Created
    } else {
        RingOrigin::Existing
    };
    Ok((ring, origin))
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// A `runner.pem` left next to a ring that lists its key (a migration that
/// stopped before the delete) is a stale copy: delete it. One the ring does
/// not list is not ours to judge, so it stays.
fn remove_imported_legacy(ring: &KeyRing, legacy: &Path) -> Result<(), ProvenanceError> {
    if !exists(legacy) {
        return Ok(());
    }
    let Ok(key) = SigningKey::load(legacy) else {
        return Ok(());
    };
    let id = key.keyid();
    if ring.public().keys.iter().any(|k| k.keyid() == id) {
        fs::remove_file(legacy).map_err(|source| ProvenanceError::Io {
            path: legacy.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// The key to sign with now and the start of its validity window.
#[derive(Debug, Clone)]
pub struct CurrentKey {
    pub key: SigningKey,
    pub not_before: OffsetDateTime,
}

struct Loaded {
    /// `keyring.json` as read before the ring was (re)opened.
    ring_bytes: Vec<u8>,
    public: PublicKeyRing,
    current: CurrentKey,
}

impl Loaded {
    fn from_ring(ring: &KeyRing, ring_bytes: Vec<u8>) -> Result<Self, ProvenanceError> {
        let public = ring.public().clone();
        let window = public.current_key().ok_or_else(|| {
            ProvenanceError::Key(format!(
                "the ring's current key {} is not listed",
                public.current
            ))
        })?;
        Ok(Loaded {
            current: CurrentKey {
                key: ring.signing_key().clone(),
                not_before: window.not_before,
            },
            ring_bytes,
            public,
        })
    }
}

/// The shared handle on the ring: signs with its current key, reopening it
/// when `keyring.json` changed.
pub struct Signer {
    dir: PathBuf,
    read_only: bool,
    loaded: Mutex<Loaded>,
}

impl Signer {
    /// Opens (creating with an ed25519 key or migrating, see [`open_ring`])
    /// the ring in `dir`.
    pub fn open(dir: &Path) -> Result<(Self, RingOrigin), ProvenanceError> {
        Self::open_with(dir, KeyType::Ed25519)
    }

    /// [`Signer::open`], a new ring's first key being of `key_type`.
    pub fn open_with(dir: &Path, key_type: KeyType) -> Result<(Self, RingOrigin), ProvenanceError> {
        let (ring, origin) = open_ring(dir, true, key_type)?;
        let bytes = read_ring_file(dir)?;
        let loaded = Loaded::from_ring(&ring, bytes)?;
        Ok((
            Signer {
                dir: dir.to_path_buf(),
                read_only: false,
                loaded: Mutex::new(loaded),
            },
            origin,
        ))
    }

    /// Opens the read-only ring in `dir` (`keys_dir`): a missing one is an error naming
    /// it, never a fresh key.
    pub fn open_read_only(dir: &Path) -> Result<Self, ProvenanceError> {
        let (ring, bytes) = KeyRing::open_read_only(dir)?;
        let loaded = Loaded::from_ring(&ring, bytes)?;
        Ok(Signer {
            dir: dir.to_path_buf(),
            read_only: true,
            loaded: Mutex::new(loaded),
        })
    }

    /// The ring the configuration signs with: `keys_dir`, read-only, when it names one,
    /// else `<state_dir>/keys` (created with a key of `key_type`, or migrated, as needed).
    pub fn open_configured(config: &Config) -> Result<(Self, RingOrigin), ProvenanceError> {
        match &config.keys_dir {
            Some(dir) => Ok((Self::open_read_only(dir)?, RingOrigin::Existing)),
            None => Self::open_with(&config.signing_keys_dir(), config.key_type),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Loaded> {
        // The state is replaced whole, never left half-written: a panic
        // elsewhere cannot make it inconsistent.
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reopens the ring if `keyring.json` changed since it was loaded.
    fn refreshed(&self) -> Result<MutexGuard<'_, Loaded>, ProvenanceError> {
        let bytes = if self.read_only {
            KeyRing::read_only_ring_file(&self.dir)?
        } else {
            read_ring_file(&self.dir)?
        };
        let mut loaded = self.lock();
        if bytes != loaded.ring_bytes {
            // Compared with the bytes read before the open: a rotation racing
            // with it only causes one more reopen on the next call. A read-only
            // ring gives the bytes it was opened from.
            let (ring, bytes) = if self.read_only {
                // The kubelet removes a Secret's previous version right after swapping
                // `..data`: an open that straddled that is made again, once, with every
                // check.
                KeyRing::open_read_only(&self.dir)
                    .or_else(|_| KeyRing::open_read_only(&self.dir))?
            } else {
                (KeyRing::open(&self.dir)?, bytes)
            };
            let fresh = Loaded::from_ring(&ring, bytes)?;
            if fresh.public.current != loaded.public.current {
                tracing::info!(
                    old = %loaded.public.current,
                    new = %fresh.public.current,
                    "key ring changed: signing with its new current key"
                );
            }
            *loaded = fresh;
        }
        Ok(loaded)
    }

    /// The key to sign with now. Never a key whose window does not contain
    /// the present: a ring's current key has an open window (the ring file
    /// refuses anything else), and one that starts in the future is refused.
    pub fn current(&self) -> Result<CurrentKey, ProvenanceError> {
        let loaded = self.refreshed()?;
        self.check_window(&loaded)?;
        Ok(loaded.current.clone())
    }

    /// [`Signer::current`] and every public key of the ring, from one look
    /// at the ring.
    pub fn current_and_ring(&self) -> Result<(CurrentKey, PublicKeyRing), ProvenanceError> {
        let loaded = self.refreshed()?;
        self.check_window(&loaded)?;
        Ok((loaded.current.clone(), loaded.public.clone()))
    }

    fn check_window(&self, loaded: &Loaded) -> Result<(), ProvenanceError> {
        let now = OffsetDateTime::now_utc();
        if loaded.public.current_key().is_some_and(|k| k.valid_at(now)) {
            return Ok(());
        }
        Err(ProvenanceError::Key(format!(
            "{}: the current key {} is valid only from {} (is the clock behind?)",
            self.dir.join(KEYRING_FILE).display(),
            loaded.public.current,
            fmt_time(loaded.current.not_before)
        )))
    }
}

fn read_ring_file(dir: &Path) -> Result<Vec<u8>, ProvenanceError> {
    let path = dir.join(KEYRING_FILE);
    fs::read(&path).map_err(|source| ProvenanceError::Io { path, source })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn keys_dir() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("keys");
        (d, dir)
    }

    #[test]
    fn picks_up_a_rotation_by_another_process() {
        let (_d, dir) = keys_dir();
        let (signer, origin) = Signer::open(&dir).unwrap();
        assert_eq!(origin, RingOrigin::Created);
        let first = signer.current().unwrap().key.keyid();
        // What `kiln keys rotate` does, on its own handle.
        let mut ring = KeyRing::open(&dir).unwrap();
        ring.rotate().unwrap();
        let second = signer.current().unwrap();
        assert_ne!(second.key.keyid(), first);
        assert_eq!(second.key.keyid(), ring.public().current);
        let (_, public) = signer.current_and_ring().unwrap();
        assert_eq!(public.keys.len(), 2);
        assert!(public.keys[0].not_after.is_some());
        assert_eq!(public.keys[1].not_before, second.not_before);
        // Unchanged ring: the same key, no reopen needed.
        assert_eq!(signer.current().unwrap().key.keyid(), second.key.keyid());
    }

    #[test]
    fn a_p256_ring_signs_and_picks_up_a_rotation_to_ed25519() {
        let (_d, dir) = keys_dir();
        let (signer, origin) = Signer::open_with(&dir, KeyType::EcdsaP256).unwrap();
        assert_eq!(origin, RingOrigin::Created);
        let first = signer.current().unwrap().key;
        assert_eq!(first.key_type(), KeyType::EcdsaP256);
        // An existing ring is kept as it is, whatever type is asked.
        let (again, origin) = Signer::open_with(&dir, KeyType::Ed25519).unwrap();
        assert_eq!(origin, RingOrigin::Existing);
        assert_eq!(again.current().unwrap().key.keyid(), first.keyid());
        let mut ring = KeyRing::open(&dir).unwrap();
        ring.rotate_to(KeyType::Ed25519).unwrap();
        let (second, public) = signer.current_and_ring().unwrap();
        assert_eq!(second.key.key_type(), KeyType::Ed25519);
        let types: Vec<KeyType> = public.keys.iter().map(|k| k.key.key_type()).collect();
        assert_eq!(types, [KeyType::EcdsaP256, KeyType::Ed25519]);
    }

    #[test]
    fn a_changed_ring_that_cannot_be_opened_is_not_signed_around() {
        let (_d, dir) = keys_dir();
        let (signer, _) = Signer::open(&dir).unwrap();
        let mut ring = KeyRing::open(&dir).unwrap();
        ring.rotate().unwrap();
        let key = dir.join(format!("{}.pem", ring.public().current));
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = signer.current().unwrap_err().to_string();
        assert!(
            err.contains(&key.display().to_string()) && err.contains("0644"),
            "{err}"
        );
    }

    #[test]
    fn migrates_a_legacy_key_and_removes_it() {
        let (_d, dir) = keys_dir();
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let legacy = SigningKey::load_or_create(&dir.join(LEGACY_KEY_FILE)).unwrap();
        let (signer, origin) = Signer::open(&dir).unwrap();
        assert_eq!(origin, RingOrigin::Migrated);
        assert_eq!(signer.current().unwrap().key.keyid(), legacy.keyid());
        assert!(!dir.join(LEGACY_KEY_FILE).exists());
        let (_, origin) = open_ring(&dir, false, KeyType::Ed25519).unwrap();
        assert_eq!(origin, RingOrigin::Existing);
    }

    #[test]
    fn a_loose_legacy_key_is_refused_by_name() {
        let (_d, dir) = keys_dir();
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.join(LEGACY_KEY_FILE);
        SigningKey::load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Signer::open(&dir).err().unwrap().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(!dir.join(KEYRING_FILE).exists());
    }

    /// Updates `volume` as the kubelet's atomic writer updates a Secret volume: the
    /// files of `ring` (mode 0400) in a new timestamped directory, `..data` swapped to it
    /// by a rename, visible links `NAME -> ..data/NAME` added and stale ones removed,
    /// then the old directory removed.
    fn kubelet_update(volume: &Path, ring: &Path, serial: u32) {
        use std::os::unix::fs::symlink;
        let data = volume.join("..data");
        let old = fs::read_link(&data).ok();
        let ts_name = format!("..2026_11_27_23_00_00.{serial:010}");
        let ts = volume.join(&ts_name);
        fs::create_dir(&ts).unwrap();
        fs::set_permissions(&ts, fs::Permissions::from_mode(0o755)).unwrap();
        let mut names = Vec::new();
        for entry in fs::read_dir(ring).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            fs::copy(entry.path(), ts.join(&name)).unwrap();
            fs::set_permissions(ts.join(&name), fs::Permissions::from_mode(0o400)).unwrap();
            names.push(name);
        }
        symlink(&ts_name, volume.join("..data_tmp")).unwrap();
        fs::rename(volume.join("..data_tmp"), &data).unwrap();
        for name in &names {
            let visible = volume.join(name);
            if fs::symlink_metadata(&visible).is_err() {
                symlink(Path::new("..data").join(name), &visible).unwrap();
            }
        }
        for entry in fs::read_dir(volume).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("..") && !names.contains(&name) {
                fs::remove_file(entry.path()).unwrap();
            }
        }
        if let Some(old) = old {
            fs::remove_dir_all(volume.join(old)).unwrap();
        }
    }

    #[test]
    fn a_secret_update_swapping_data_is_picked_up_and_a_bad_one_never_signed_around() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: a read-only ring must be root's, not exercised");
            return;
        }
        let (d, made) = keys_dir();
        let (mut ring, _) = KeyRing::generate(&made).unwrap();
        let first = ring.public().current.clone();
        let volume = d.path().join("secret");
        fs::create_dir(&volume).unwrap();
        fs::set_permissions(&volume, fs::Permissions::from_mode(0o755)).unwrap();
        kubelet_update(&volume, &made, 1);
        let config = Config {
            keys_dir: Some(volume.clone()),
            ..Config::default()
        };
        let (signer, origin) = Signer::open_configured(&config).unwrap();
        assert_eq!(origin, RingOrigin::Existing);
        assert_eq!(signer.current().unwrap().key.keyid(), first);
        // `kiln keys rotate` on the operator's copy, then the Secret updated.
        ring.rotate().unwrap();
        let second = ring.public().current.clone();
        kubelet_update(&volume, &made, 2);
        assert_eq!(signer.current().unwrap().key.keyid(), second);
        let (_, public) = signer.current_and_ring().unwrap();
        assert_eq!(public.keys.len(), 2);
        // An update whose key others may read: no signature, and never the old key.
        ring.rotate().unwrap();
        let third = ring.public().current.clone();
        kubelet_update(&volume, &made, 3);
        let key = volume.join("..data").join(format!("{third}.pem"));
        fs::set_permissions(&key, fs::Permissions::from_mode(0o440)).unwrap();
        let err = signer.current().err().unwrap().to_string();
        assert!(
            err.contains(&format!("{third}.pem")) && err.contains("0440"),
            "{err}"
        );
        fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(signer.current().unwrap().key.keyid(), third);
    }

    #[test]
    fn a_missing_read_only_ring_is_an_error_and_no_key_is_made() {
        let (_d, dir) = keys_dir();
        let config = Config {
            keys_dir: Some(dir.clone()),
            ..Config::default()
        };
        let err = Signer::open_configured(&config).err().unwrap().to_string();
        assert!(err.contains(&dir.display().to_string()), "{err}");
        assert!(!dir.exists());
    }

    #[test]
    fn without_create_a_missing_ring_is_an_error() {
        let (_d, dir) = keys_dir();
        assert!(open_ring(&dir, false, KeyType::Ed25519).is_err());
        assert!(!dir.exists());
    }
}
