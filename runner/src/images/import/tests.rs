//! Imports of layouts and archives made here: compressions, platform and tag selection,
//! and blobs that do not match their descriptors (which must install nothing).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::*;

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn layer(files: &[(&str, &str)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, content) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(content.len() as u64);
        tar.append_data(&mut h, path, content.as_bytes()).unwrap();
    }
    tar.into_inner().unwrap()
}

fn compress(tar: &[u8], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(tar).unwrap();
            gz.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(tar, 1).unwrap(),
    }
}

/// An OCI layout under construction.
struct Oci {
    dir: PathBuf,
    manifests: Vec<Value>,
}

impl Oci {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Oci {
            dir: dir.to_path_buf(),
            manifests: Vec::new(),
        }
    }

    fn put(&self, bytes: &[u8], media_type: &str) -> Value {
        let hex = sha256(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(&hex), bytes).unwrap();
        json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()})
    }

    /// Adds an image of these layers; answers its manifest digest.
    fn image(
        &mut self,
        layers: &[(Vec<u8>, Compression)],
        arch: &str,
        tag: Option<&str>,
    ) -> String {
        let mut descriptors = Vec::new();
        let mut diff_ids = Vec::new();
        for (tar, compression) in layers {
            let media_type = match compression {
                Compression::None => "application/vnd.oci.image.layer.v1.tar",
                Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
                Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            };
            descriptors.push(self.put(&compress(tar, *compression), media_type));
            diff_ids.push(format!("sha256:{}", sha256(tar)));
        }
        let config = json!({
            "architecture": arch, "os": "linux",
            "config": {"Env": ["PATH=/usr/bin", "LANG=C"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = self.put(
            &serde_json::to_vec(&config).unwrap(),
            "application/vnd.oci.image.config.v1+json",
        );
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST_TYPE,
            "config": config,
            "layers": descriptors,
        });
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let mut descriptor = self.put(&bytes, OCI_MANIFEST_TYPE);
        descriptor["platform"] = json!({"os": "linux", "architecture": arch});
        if let Some(tag) = tag {
            descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        }
        self.manifests.push(descriptor);
        self.write_index();
        sha256(&bytes)
    }

    fn write_index(&self) {
        let index = json!({"schemaVersion": 2, "manifests": self.manifests});
        std::fs::write(self.dir.join("index.json"), index.to_string()).unwrap();
    }

    fn blob(&self, hex: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(hex)
    }
}

const OCI_MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

struct State {
    dir: tempfile::TempDir,
    images: Images,
}

fn state() -> State {
    let dir = tempfile::tempdir().unwrap();
    let images = Images::open(dir.path()).unwrap();
    State { dir, images }
}

impl State {
    /// What the images directory holds besides the host image: names, trees, staging.
    fn installed(&self) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(self.dir.path().join("images"))
            .unwrap()
            .flatten()
        {
            let name = entry.file_name().into_string().unwrap();
            if name == HOST_IMAGE {
                continue;
            }
            if name == ".oci" {
                for tree in std::fs::read_dir(entry.path()).unwrap().flatten() {
                    found.push(format!(".oci/{}", tree.file_name().into_string().unwrap()));
                }
            } else {
                found.push(name);
            }
        }
        found.sort();
        found
    }
}

#[test]
fn layers_of_each_compression_import_and_resolve_with_the_config_env() {
    let s = state();
    let src = tempfile::tempdir().unwrap();
    let mut oci = Oci::new(src.path());
    let manifest = oci.image(
        &[
            (layer(&[("usr/bin/a", "plain")]), Compression::None),
            (layer(&[("usr/bin/b", "gzip")]), Compression::Gzip),
            (
                layer(&[("usr/bin/c", "zstd"), ("usr/bin/.wh.a", "")]),
                Compression::Zstd,
            ),
        ],
        oci::host_arch(),
        Some("v1"),
    );
    let source = format!("oci:{}:v1", src.path().display());
    let imported = s
        .images
        .import(&source, Some("tools"), Limits::default())
        .unwrap();
    assert_eq!(
        imported.record.manifest_digest.as_deref(),
        Some(manifest.as_str())
    );
    assert_eq!(imported.record.env, ["PATH=/usr/bin", "LANG=C"]);
    assert_eq!(imported.report.entries, 4);

    let resolved = s
        .images
        .resolve(&format!("tools@sha256:{manifest}"))
        .unwrap();
    assert_eq!(resolved.digest.as_deref(), Some(manifest.as_str()));
    assert_eq!(resolved.env, ["PATH=/usr/bin", "LANG=C"]);
    let rootfs = s
        .dir
        .path()
        .join("images/.oci")
        .join(&manifest)
        .join("rootfs");
    assert!(!rootfs.join("usr/bin/a").exists());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("usr/bin/c")).unwrap(),
        "zstd"
    );
    // By digest alone, the record's name is the image's.
    let by_digest = s.images.resolve(&format!("sha256:{manifest}")).unwrap();
    assert_eq!(by_digest.name, "tools");
    assert_eq!(s.installed(), [format!(".oci/{manifest}"), "tools".into()]);

    // A modified tree is refused.
    std::fs::write(rootfs.join("usr/bin/b"), "evil").unwrap();
    let err = s.images.resolve("tools").unwrap_err().to_string();
    assert!(err.contains("was modified"), "{err}");
    // Importing it again repairs it; an intact tree is only named again.
    let again = s
        .images
        .import(&source, Some("tools"), Limits::default())
        .unwrap();
    assert_eq!(again.replaced, None);
    assert!(!again.already_installed);
    s.images.resolve("tools").unwrap();
    let named = s
        .images
        .import(&source, Some("tools2"), Limits::default())
        .unwrap();
    assert!(named.already_installed);
    assert_eq!(s.images.resolve("tools2").unwrap().digest, resolved.digest);
}

#[test]
fn a_layer_whose_digest_does_not_match_fails_and_installs_nothing() {
    let s = state();
    let src = tempfile::tempdir().unwrap();
    let mut oci = Oci::new(src.path());
    let tar = layer(&[("etc/os-release", "ID=kiln\n")]);
    oci.image(&[(tar.clone(), Compression::Gzip)], oci::host_arch(), None);
    // Same size, other bytes: the blob no longer matches its descriptor.
    let gz = compress(&tar, Compression::Gzip);
    let blob = oci.blob(&sha256(&gz));
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    let source = format!("oci:{}", src.path().display());
    let err = s
        .images
        .import(&source, Some("broken"), Limits::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("digest does not match"), "{err}");
    assert!(s.installed().is_empty(), "{:?}", s.installed());
}

#[test]
fn a_layer_that_differs_from_its_diff_id_fails_and_installs_nothing() {
    let s = state();
    let src = tempfile::tempdir().unwrap();
    let mut oci = Oci::new(src.path());
    oci.image(
        &[(layer(&[("a", "a")]), Compression::None)],
        oci::host_arch(),
        None,
    );
    // Rewrite the config's diff_id: the manifest then names a config that says otherwise.
    let index: Value =
        serde_json::from_slice(&std::fs::read(src.path().join("index.json")).unwrap()).unwrap();
    let manifest_hex = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(oci.blob(&manifest_hex)).unwrap()).unwrap();
    let config = json!({
        "architecture": oci::host_arch(), "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", "00".repeat(32))]},
    });
    manifest["config"] = oci.put(
        &serde_json::to_vec(&config).unwrap(),
        "application/vnd.oci.image.config.v1+json",
    );
    let bytes = serde_json::to_vec(&manifest).unwrap();
    oci.manifests = vec![oci.put(&bytes, OCI_MANIFEST_TYPE)];
    oci.write_index();
    let err = s
        .images
        .import(
            &format!("oci:{}", src.path().display()),
            Some("x"),
            Limits::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("diff_id"), "{err}");
    assert!(s.installed().is_empty(), "{:?}", s.installed());
}

#[test]
fn an_index_selects_this_hosts_platform_and_a_tag_selects_an_image() {
    let s = state();
    let src = tempfile::tempdir().unwrap();
    let mut oci = Oci::new(src.path());
    let foreign = if oci::host_arch() == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    oci.image(
        &[(layer(&[("arch", "foreign")]), Compression::Gzip)],
        foreign,
        None,
    );
    let native = oci.image(
        &[(layer(&[("arch", "native")]), Compression::Gzip)],
        oci::host_arch(),
        None,
    );
    let imported = s
        .images
        .import(
            &format!("oci:{}", src.path().display()),
            Some("multi"),
            Limits::default(),
        )
        .unwrap();
    assert_eq!(
        imported.record.manifest_digest.as_deref(),
        Some(native.as_str())
    );

    let other = oci.image(
        &[(layer(&[("v", "2")]), Compression::Gzip)],
        oci::host_arch(),
        Some("v2"),
    );
    // Two images for this platform: a tag must choose.
    let err = s
        .images
        .import(
            &format!("oci:{}", src.path().display()),
            Some("m"),
            Limits::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("name one with :TAG"), "{err}");
    let err = s
        .images
        .import(
            &format!("oci:{}:nope", src.path().display()),
            Some("m"),
            Limits::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("names no image \"nope\"") && err.contains("v2"),
        "{err}"
    );

    // As an OCI archive (a tar of the layout), by tag, named after the archive.
    let archive = src.path().with_extension("tar");
    let mut tar = tar::Builder::new(std::fs::File::create(&archive).unwrap());
    tar.append_dir_all(".", src.path()).unwrap();
    tar.finish().unwrap();
    let imported = s
        .images
        .import(
            &format!("oci-archive:{}:v2", archive.display()),
            None,
            Limits::default(),
        )
        .unwrap();
    assert_eq!(
        imported.record.manifest_digest.as_deref(),
        Some(other.as_str())
    );
    assert_eq!(imported.record.name, "v2");
    assert_eq!(
        imported.record.source,
        format!(
            "oci-archive:{}:v2",
            archive.file_name().unwrap().to_string_lossy()
        )
    ); // The name `multi` now names another image: the import says so.
    let renamed = s
        .images
        .import(
            &format!("oci-archive:{}:v2", archive.display()),
            Some("multi"),
            Limits::default(),
        )
        .unwrap();
    assert_eq!(renamed.replaced.as_deref(), Some(native.as_str()));
    let unnamed: Vec<_> = s
        .images
        .unnamed()
        .unwrap()
        .into_iter()
        .map(|r| r.source_sha256)
        .collect();
    assert_eq!(unnamed, vec![native.as_str()]);
    // Still runnable by digest until removed.
    s.images.resolve(&format!("sha256:{native}")).unwrap();
    let err = s
        .images
        .remove(&format!("sha256:{other}"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("is named multi, v2"), "{err}");
    s.images.remove(&format!("sha256:{native}")).unwrap();
    assert!(s.images.unnamed().unwrap().is_empty());
    assert!(s.images.resolve(&format!("sha256:{native}")).is_err());
}

#[test]
fn the_size_limit_fails_an_import_and_installs_nothing() {
    let s = state();
    let src = tempfile::tempdir().unwrap();
    let mut oci = Oci::new(src.path());
    let big = "x".repeat(64 << 10);
    oci.image(
        &[(layer(&[("big", &big)]), Compression::Gzip)],
        oci::host_arch(),
        None,
    );
    let limits = Limits {
        max_bytes: 16 << 10,
        max_entries: 100,
    };
    let err = s
        .images
        .import(
            &format!("oci:{}", src.path().display()),
            Some("bomb"),
            limits,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer 0: big") && err.contains("size limit"),
        "{err}"
    );
    assert!(s.installed().is_empty(), "{:?}", s.installed());
}

#[test]
fn sources_parse_and_describe_themselves_without_their_directories() {
    let parsed = Source::parse("oci:/srv/images/debian:bookworm").unwrap();
    assert_eq!(
        parsed,
        Source::OciDir {
            dir: "/srv/images/debian".into(),
            tag: Some("bookworm".into())
        }
    );
    assert_eq!(parsed.public(), "oci:debian:bookworm");
    assert_eq!(
        Source::parse("oci-archive:./a:b/c.tar").unwrap(),
        Source::OciArchive {
            file: "./a:b/c.tar".into(),
            tag: None
        }
    );
    assert_eq!(
        Source::parse("docker-archive:/tmp/x.tar").unwrap().public(),
        "docker-archive:x.tar"
    );
    for bad in ["oci", "oci:", "docker:x", "registry.example.org/x"] {
        assert!(Source::parse(bad).is_err(), "{bad}");
    }
    let archive = Source::parse("docker-archive:/tmp/Some Image.tar").unwrap();
    assert_eq!(archive.default_name(None), "some-image");
    assert_eq!(
        archive.default_name(Some("example.org/tools/gcc:13")),
        "gcc"
    );
}

/// `[images] allowed = ["tools"]` admits what `tools` names. Once `tools` is imported
/// again, its old tree is reachable by digest alone, but it is no longer `tools`: neither
/// Submit's check nor the run's may admit it by that name.
#[test]
fn an_old_image_by_digest_is_not_admitted_by_the_name_that_moved_on() {
    let s = state();
    let src = tempfile::tempdir().unwrap();
    let mut oci = Oci::new(src.path());
    let old = oci.image(
        &[(layer(&[("bin/tool", "old")]), Compression::None)],
        oci::host_arch(),
        Some("v1"),
    );
    let new = oci.image(
        &[(layer(&[("bin/tool", "new")]), Compression::None)],
        oci::host_arch(),
        Some("v2"),
    );
    let dir = src.path().display();
    for tag in ["v1", "v2"] {
        s.images
            .import(
                &format!("oci:{dir}:{tag}"),
                Some("tools"),
                Limits::default(),
            )
            .unwrap();
    }
    #[derive(serde::Deserialize)]
    struct T {
        allowed: crate::images::allow::ImageAllowList,
    }
    let allowed = toml::from_str::<T>("allowed = [\"tools\"]\n")
        .unwrap()
        .allowed;
    assert!(allowed.allows(&s.images.identity_of("tools").unwrap()));
    assert!(allowed.allows(&s.images.identity_of(&format!("sha256:{new}")).unwrap()));
    let by_old = format!("sha256:{old}");
    assert!(!allowed.allows(&s.images.identity_of(&by_old).unwrap()));
    assert!(!allowed.allows(&s.images.resolve(&by_old).unwrap().identity()));
    // Named again, it is that name's image again.
    s.images
        .import(
            &format!("oci:{dir}:v1"),
            Some("tools-old"),
            Limits::default(),
        )
        .unwrap();
    let identity = s.images.identity_of(&by_old).unwrap();
    assert_eq!(identity.name.as_deref(), Some("tools-old"));
    assert_eq!(
        s.images
            .resolve(&by_old)
            .unwrap()
            .identity()
            .name
            .as_deref(),
        Some("tools-old")
    );
}

/// A manifest with more layers than its config has diff_ids (or fewer) is not an image
/// other runtimes would run: unpacking only the layers that pair up would run a tree that
/// leaves out the last layers (say, the one removing a vulnerable binary).
#[test]
fn layers_and_diff_ids_that_do_not_pair_up_fail_and_install_nothing() {
    for keep in [1, 3] {
        let s = state();
        let src = tempfile::tempdir().unwrap();
        let mut oci = Oci::new(src.path());
        let (first, second) = (
            layer(&[("bin/tool", "vulnerable")]),
            layer(&[("bin/.wh.tool", "")]),
        );
        oci.image(
            &[
                (first.clone(), Compression::None),
                (second.clone(), Compression::None),
            ],
            oci::host_arch(),
            None,
        );
        let index: Value =
            serde_json::from_slice(&std::fs::read(src.path().join("index.json")).unwrap()).unwrap();
        let manifest_hex = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
        let mut manifest: Value =
            serde_json::from_slice(&std::fs::read(oci.blob(&manifest_hex)).unwrap()).unwrap();
        let diff_ids: Vec<String> = [&first, &second, &first]
            .iter()
            .take(keep)
            .map(|tar| format!("sha256:{}", sha256(tar)))
            .collect();
        let config = json!({
            "architecture": oci::host_arch(), "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        manifest["config"] = oci.put(
            &serde_json::to_vec(&config).unwrap(),
            "application/vnd.oci.image.config.v1+json",
        );
        let bytes = serde_json::to_vec(&manifest).unwrap();
        oci.manifests = vec![oci.put(&bytes, OCI_MANIFEST_TYPE)];
        oci.write_index();
        let err = s
            .images
            .import(
                &format!("oci:{}", src.path().display()),
                Some("x"),
                Limits::default(),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("layer digests"), "{keep}: {err}");
        assert!(s.installed().is_empty(), "{:?}", s.installed());
    }
}

/// An index that names one nested index many times, each naming many manifests, would
/// have the import gather (and a pull fetch) their product: the entries of all indexes
/// together are bounded.
#[test]
fn indexes_that_multiply_their_entries_stop_at_the_entry_limit() {
    let s = state();
    let src = tempfile::tempdir().unwrap();
    let mut oci = Oci::new(src.path());
    oci.image(
        &[(layer(&[("a", "a")]), Compression::None)],
        oci::host_arch(),
        None,
    );
    let manifest = oci.manifests[0].clone();
    let nested = json!({"schemaVersion": 2, "manifests": vec![manifest; 100]});
    let nested = oci.put(
        &serde_json::to_vec(&nested).unwrap(),
        "application/vnd.oci.image.index.v1+json",
    );
    oci.manifests = vec![nested; 100];
    oci.write_index();
    let err = s
        .images
        .import(
            &format!("oci:{}", src.path().display()),
            Some("x"),
            Limits::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("more than {} entries", oci::MAX_INDEX_ENTRIES)),
        "{err}"
    );
    assert!(s.installed().is_empty(), "{:?}", s.installed());
}

/// Without --name, an import names the image after its own metadata (the ref.name
/// annotation, a Docker archive's RepoTags): an archive that calls itself `debian` must
/// not silently re-point the operator's `debian` (which allow-lists and jobs name).
#[test]
fn an_image_cannot_take_over_an_installed_name_by_its_own_metadata() {
    let s = state();
    let trusted = tempfile::tempdir().unwrap();
    let mut oci = Oci::new(trusted.path());
    let debian = oci.image(
        &[(layer(&[("etc/debian_version", "12")]), Compression::None)],
        oci::host_arch(),
        None,
    );
    s.images
        .import(
            &format!("oci:{}", trusted.path().display()),
            Some("debian"),
            Limits::default(),
        )
        .unwrap();

    let vendor = tempfile::tempdir().unwrap();
    let mut oci = Oci::new(vendor.path());
    oci.image(
        &[(layer(&[("bin/backdoor", "x")]), Compression::None)],
        oci::host_arch(),
        Some("docker.io/library/debian:12"),
    );
    let source = format!("oci:{}", vendor.path().display());
    let err = s
        .images
        .import(&source, None, Limits::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--name debian"), "{err}");
    assert_eq!(
        s.images.read_record("debian").unwrap().unwrap().digest(),
        debian
    );
    // Named on purpose, it replaces.
    let imported = s
        .images
        .import(&source, Some("debian"), Limits::default())
        .unwrap();
    assert_eq!(imported.replaced.as_deref(), Some(debian.as_str()));
    // The same image again, by its own name, is only named again.
    s.images.import(&source, None, Limits::default()).unwrap();
}

/// Each layer blob is read (and hashed) in full, twice, while its decompressed content
/// is metered: a zstd skippable frame (data the decoder skips) makes a blob of any size
/// that decompresses to almost nothing, and a manifest may list it thousands of times.
/// The layers' blobs add up to no more than the import may decompress.
#[test]
fn layer_blobs_larger_than_what_they_may_decompress_to_are_refused_before_reading() {
    let s = state();
    let src = tempfile::tempdir().unwrap();
    let oci = Oci::new(src.path());
    let tar = layer(&[("a", "a")]);
    let junk = 3usize << 20;
    let mut blob = zstd::encode_all(tar.as_slice(), 1).unwrap();
    blob.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18]);
    blob.extend_from_slice(&u32::try_from(junk).unwrap().to_le_bytes());
    blob.resize(blob.len() + junk, 0);
    let descriptor = oci.put(&blob, "application/vnd.oci.image.layer.v1.tar+zstd");
    let diff_id = format!("sha256:{}", sha256(&tar));
    let config = json!({
        "architecture": oci::host_arch(), "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id, diff_id]},
    });
    let config = oci.put(
        &serde_json::to_vec(&config).unwrap(),
        "application/vnd.oci.image.config.v1+json",
    );
    let manifest = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST_TYPE,
        "config": config, "layers": [descriptor, descriptor],
    });
    let mut oci = oci;
    oci.manifests = vec![oci.put(&serde_json::to_vec(&manifest).unwrap(), OCI_MANIFEST_TYPE)];
    oci.write_index();
    let limits = Limits {
        max_bytes: 1 << 20,
        max_entries: 100,
    };
    let source = format!("oci:{}", src.path().display());
    let err = s
        .images
        .import(&source, Some("x"), limits)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layers are"), "{err}");
    assert!(s.installed().is_empty(), "{:?}", s.installed());
}

/// The same in a Docker archive: its manifest.json lists one layer member again and
/// again (each listing is a layer to read); the archive is refused on the layers' size.
#[test]
fn a_docker_archive_listing_one_large_layer_again_and_again_is_refused() {
    let s = state();
    let dir = tempfile::tempdir().unwrap();
    let tar = layer(&[("a", "a")]);
    let mut blob = zstd::encode_all(tar.as_slice(), 1).unwrap();
    blob.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18]);
    blob.extend_from_slice(&(1u32 << 20).to_le_bytes());
    blob.resize(blob.len() + (1 << 20), 0);
    let diff_id = format!("sha256:{}", sha256(&tar));
    let config = json!({
        "architecture": oci::host_arch(), "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": vec![diff_id; 3]},
    });
    let manifest = json!([{
        "Config": "config.json",
        "RepoTags": ["tool:1"],
        "Layers": ["layer.tar", "layer.tar", "layer.tar"],
    }]);
    let archive = dir.path().join("tool.tar");
    let mut out = tar::Builder::new(std::fs::File::create(&archive).unwrap());
    for (name, bytes) in [
        ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        ("config.json", serde_json::to_vec(&config).unwrap()),
        ("layer.tar", blob),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(bytes.len() as u64);
        out.append_data(&mut h, name, bytes.as_slice()).unwrap();
    }
    out.finish().unwrap();
    let limits = Limits {
        max_bytes: 1 << 20,
        max_entries: 100,
    };
    let err = s
        .images
        .import(
            &format!("docker-archive:{}", archive.display()),
            None,
            limits,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("layers are"), "{err}");
    assert!(s.installed().is_empty(), "{:?}", s.installed());
}
