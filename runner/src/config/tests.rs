#![allow(clippy::unwrap_used)]
use super::*;

#[test]
fn rejects_unknown_keys_and_bad_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    std::fs::write(&path, "max_concurent_jobs = 3\n").unwrap();
    let err = Config::load(Some(&path)).unwrap_err().to_string();
    assert!(err.contains("unknown field"), "{err}");

    std::fs::write(&path, "max_concurrent_jobs = 0\n").unwrap();
    let cfg = Config::load(Some(&path)).unwrap();
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("max_concurrent_jobs"));

    Config::default().validate().unwrap();
}

#[test]
fn key_type_is_ed25519_by_default_or_ecdsa_p256_and_nothing_else() {
    assert_eq!(Config::default().key_type, KeyType::Ed25519);
    let cfg: Config = toml::from_str("key_type = \"ecdsa-p256\"\n").unwrap();
    assert_eq!(cfg.key_type, KeyType::EcdsaP256);
    let cfg: Config = toml::from_str("key_type = \"ed25519\"\n").unwrap();
    assert_eq!(cfg.key_type, KeyType::Ed25519);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    for bad in ["\"rsa\"", "\"ECDSA-P256\"", "\"\"", "1"] {
        std::fs::write(&path, format!("key_type = {bad}\n")).unwrap();
        let err = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("key_type"), "{bad}: {err}");
    }
    std::fs::write(&path, "key_type = \"rsa\"\n").unwrap();
    let err = Config::load(Some(&path)).unwrap_err().to_string();
    assert!(
        err.contains("key_type: unknown key type \"rsa\"") && err.contains("ecdsa-p256"),
        "{err}"
    );
}

#[test]
fn listeners_are_unix_sockets_or_tls_with_every_file() {
    let cfg = Config::default();
    assert_eq!(
        cfg.listeners().unwrap(),
        [Listener::Unix(UnixListen {
            name: "socket".into(),
            path: DEFAULT_SOCKET.into(),
            mode: 0o660,
            gid: None
        })]
    );
    let cfg: Config = toml::from_str(
        "[[listen]]\nunix = \"/run/k.sock\"\nmode = \"0600\"\nsocket_gid = 7\n\
         [[listen]]\ntcp = \"127.0.0.1:7443\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\nclient_ca = \"/ca.pem\"\n",
    )
    .unwrap();
    cfg.validate().unwrap();
    let listeners = cfg.listeners().unwrap();
    assert!(matches!(&listeners[0], Listener::Unix(u) if u.mode == 0o600 && u.gid == Some(7)));
    assert!(
        matches!(&listeners[1], Listener::Tls(t) if t.name == "listen[1]" && t.address.port() == 7443)
    );
    let tcp = "[[listen]]\nunix = \"/run/k.sock\"\n[[listen]]\ntcp = \"127.0.0.1:7443\"\n";
    for (text, key) in [
        (format!("{tcp}tls_cert = \"/c\"\nclient_ca = \"/a\"\n"), "listen[1].tls_key"),
        (format!("{tcp}tls_cert = \"/c\"\ntls_key = \"/k\"\n"), "listen[1].client_ca"),
        (format!("{tcp}tls_cert = \"c\"\ntls_key = \"/k\"\nclient_ca = \"/a\"\n"), "listen[1].tls_cert"),
        ("[[listen]]\nunix = \"/a\"\ntls_key = \"/k\"\n".into(), "listen[0].tls_key"),
        ("[[listen]]\nunix = \"/a\"\nmode = \"01777\"\n".into(), "listen[0].mode"),
        ("[[listen]]\ntcp = \"localhost:1\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\nclient_ca = \"/a\"\n".into(), "listen[0].tcp"),
        ("[[listen]]\nunix = \"/a\"\ntcp = \"127.0.0.1:1\"\n".into(), "listen[0]"),
        ("[[listen]]\nmode = \"0600\"\n".into(), "listen[0]"),
        ("[[listen]]\nunix = \"/a\"\n[[listen]]\nunix = \"/a\"\n".into(), "listen[1]"),
        ("socket = \"/b\"\n[[listen]]\nunix = \"/a\"\n".into(), "socket"),
    ] {
        let cfg: Config = toml::from_str(&text).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{text}: {err}");
    }
    assert!(toml::from_str::<Config>("[[listen]]\nunix = \"/a\"\nmode = \"rw\"\n").is_err());
    assert!(toml::from_str::<Config>("[[listen]]\nunix = \"/a\"\ncert = \"/c\"\n").is_err());
}

#[test]
fn workspace_entries_and_outputs_are_bounded() {
    let cfg = Config::default();
    assert_eq!(cfg.max_workspace_entries, 100_000);
    assert_eq!(cfg.max_outputs, 10_000);
    let cfg: Config =
        toml::from_str("max_workspace_entries = 500000\nmax_outputs = 20000\n").unwrap();
    cfg.validate().unwrap();
    for (bad, key) in [
        ("max_workspace_entries = 0\n", "max_workspace_entries"),
        ("max_workspace_entries = 1000001\n", "max_workspace_entries"),
        ("max_outputs = 0\n", "max_outputs"),
        ("max_outputs = 20001\n", "max_outputs"),
    ] {
        let cfg: Config = toml::from_str(bad).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{bad}: {err}");
    }
}

#[test]
fn waive_accepts_only_known_layers() {
    let cfg: Config = toml::from_str("waive = [\"landlock\"]\n").unwrap();
    assert_eq!(cfg.waive, ["landlock"]);
    cfg.validate().unwrap();
    assert!(Config::default().waive.is_empty());
    for bad in [
        "waive = [\"seccomp\"]\n",
        "waive = [\"namespaces\"]\n",
        "waive = [\"\"]\n",
        "waive = [\"landlock\", \"landlock\"]\n",
    ] {
        let cfg: Config = toml::from_str(bad).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("waive"), "{bad}: {err}");
    }
    assert!(toml::from_str::<Config>("waive = \"landlock\"\n").is_err());
}

#[test]
fn limit_keys_take_sizes_and_cpus_and_are_checked() {
    let cfg: Config = toml::from_str(
        "default_memory = \"512M\"\nmax_memory = \"2G\"\ndefault_cpus = 0.5\nmax_cpus = \"1.5\"\nmax_disk = 1073741824\ndefault_disk = \"64M\"\n",
    )
    .unwrap();
    assert_eq!(cfg.default_memory.0, 512 << 20);
    assert_eq!(cfg.max_cpus.0, 1500);
    assert_eq!(cfg.max_disk.0, 1 << 30);
    cfg.validate().unwrap();

    let cfg: Config = toml::from_str("default_pids = 5000\n").unwrap();
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("default_pids") && err.contains("max_pids"),
        "{err}"
    );
    let cfg: Config = toml::from_str("default_memory = \"1M\"\n").unwrap();
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("default_memory"));
    assert!(toml::from_str::<Config>("max_memory = \"lots\"\n").is_err());
}

#[test]
fn daemon_bounds_take_sizes_and_are_checked() {
    let cfg: Config = toml::from_str(
        "max_job_log_bytes = \"1G\"\nmax_event_memory = \"8M\"\nmax_blob_size = \"2G\"\n\
         max_spec_bytes = \"1M\"\nmax_inputs = 10\nmax_queued_jobs = 5\n",
    )
    .unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.max_event_memory.0, 8 << 20);
    assert_eq!(cfg.max_blob_size.0, 2 << 30);
    for (bad, key) in [
        ("max_queued_jobs = 0\n", "max_queued_jobs"),
        ("max_spec_bytes = 1024\n", "max_spec_bytes"),
        ("max_spec_bytes = \"1G\"\n", "max_spec_bytes"),
        ("max_blob_size = 0\n", "max_blob_size"),
    ] {
        let cfg: Config = toml::from_str(bad).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{bad}: {err}");
    }
}

#[test]
fn tenant_ceilings_stay_within_the_global_ones() {
    let base = "[tenants.ci]\nuids = [1001]\n";
    let cfg: Config = toml::from_str(&format!(
        "default_memory = \"1G\"\nmax_memory = \"8G\"\n{base}max_memory = \"2G\"\n\
         max_timeout_seconds = 600\nnetwork_ceiling = [\"*.example.org:443\"]\n"
    ))
    .unwrap();
    cfg.validate().unwrap();
    assert_eq!(
        cfg.tenants.get("ci").unwrap().max_memory.unwrap().0,
        2 << 30
    );
    for (extra, key) in [
        ("max_memory = \"16G\"\n", "tenants.ci.max_memory"),
        ("max_pids = 100000\n", "tenants.ci.max_pids"),
        ("max_disk = \"1T\"\n", "tenants.ci.max_disk"),
        (
            "max_timeout_seconds = 100000\n",
            "tenants.ci.max_timeout_seconds",
        ),
        // Below what a step that names no limit gets.
        ("max_memory = \"1M\"\n", "tenants.ci.max_memory"),
        (
            "max_timeout_seconds = 1\n",
            "tenants.ci.max_timeout_seconds",
        ),
    ] {
        let cfg: Config = toml::from_str(&format!("{base}{extra}")).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{extra}: {err}");
    }
}

#[test]
fn the_images_table_parses_its_allow_list_and_nothing_else() {
    let hex = "ab".repeat(32);
    let cfg: Config = toml::from_str(&format!(
        "[images]\nallowed = [\"host\", \"debian@sha256:{hex}\", \"sha256:{hex}\"]\n"
    ))
    .unwrap();
    cfg.validate().unwrap();
    let allowed = cfg.images.allowed.unwrap();
    let image = |name: &str, digest: &str| crate::images::allow::ImageIdentity {
        name: Some(name.into()),
        digests: vec![digest.into()],
    };
    assert!(allowed.allows(&image("debian", &hex)));
    assert!(!allowed.allows(&image("debian", &"cd".repeat(32))));
    assert!(Config::default().images.allowed.is_none());
    for bad in [
        "[images]\nallowed = [\"debian:12\"]\n",
        "[images]\nallowed = [\"sha256:12\"]\n",
        "[images]\nallow = []\n",
    ] {
        assert!(toml::from_str::<Config>(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_uid_configured_twice_is_refused() {
    let cfg: Config = toml::from_str(
        "[network_ceiling_by_uid]\n1001 = [\"*:443\"]\n[tenants.ci]\nuids = [1001]\n",
    )
    .unwrap();
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("network_ceiling_by_uid.1001") && err.contains("tenants.ci.network_ceiling"),
        "{err}"
    );
    // A uid outside every tenant keeps its own ceiling.
    let cfg: Config = toml::from_str(
        "[network_ceiling_by_uid]\n1002 = [\"*:443\"]\n[tenants.ci]\nuids = [1001]\n",
    )
    .unwrap();
    cfg.validate().unwrap();
    let cfg: Config = toml::from_str("admin_uids = [1001]\n[tenants.ci]\nuids = [1001]\n").unwrap();
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("admin_uids") && err.contains("1001"), "{err}");
    let err = toml::from_str::<Config>("[tenants.a]\nuids = [1001]\n[tenants.b]\nuids = [1001]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("two tenants"), "{err}");
}

#[test]
fn the_network_ceiling_of_a_caller_is_its_tenants_else_its_uids_else_the_global() {
    use crate::api::auth::{Authenticator, Peer};
    use crate::egress::netpolicy::Entry;
    let cfg: Config = toml::from_str(
        "network_ceiling = [\"*:*\"]\n[network_ceiling_by_uid]\n1002 = [\"a.org:443\"]\n\
         [tenants.ci]\nuids = [1001]\nnetwork_ceiling = [\"b.org:443\"]\n\
         [tenants.web]\nuids = [1003]\n",
    )
    .unwrap();
    cfg.validate().unwrap();
    let auth = Authenticator::new(&[1002], &cfg.tenants);
    let ceiling = |uid| cfg.network_ceiling_of(&auth.resolve(Peer::Unix { uid }).unwrap());
    let (a, b, c) = (
        Entry::parse("a.org:443").unwrap(),
        Entry::parse("b.org:443").unwrap(),
        Entry::parse("c.org:443").unwrap(),
    );
    assert!(ceiling(1001).covers(&b) && !ceiling(1001).covers(&a));
    assert!(ceiling(1002).covers(&a) && !ceiling(1002).covers(&b));
    assert!(ceiling(1003).covers(&c));
}

#[test]
fn publishing_settings_are_checked() {
    for (text, field) in [
        ("[publish]\nmax_concurrent = 0\n", "publish.max_concurrent"),
        (
            "[publish]\ntimeout_seconds = 0\n",
            "publish.timeout_seconds",
        ),
    ] {
        let config: Config = toml::from_str(text).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{text}: {err}");
    }
    let config: Config =
        toml::from_str("[publish]\nrepositories = [\"r.example/team/*\"]\n").unwrap();
    assert!(config.validate().is_ok());
    assert!(toml::from_str::<Config>("[publish]\nrepositories = [\"team/*\"]\n").is_err());
}

#[test]
fn worker_images_must_each_be_pinned_by_digest() {
    let hex = "ab".repeat(32);
    let cfg: Config = toml::from_str(&format!(
        "[worker]\nimage = \"host\"\nimages = [\"docker://gcr.io/team/gcc@sha256:{hex}\", \"gcc@sha256:{hex}\", \"sha256:{hex}\"]\n"
    ))
    .unwrap();
    cfg.validate().unwrap();
    assert!(Config::default().worker.images.is_empty());
    for bad in ["gcc", "docker://gcr.io/team/gcc:12", "host", "sha256:12"] {
        let cfg: Config = toml::from_str(&format!("[worker]\nimages = [{bad:?}]\n")).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("worker.images") && err.contains(bad),
            "{bad}: {err}"
        );
    }
}

#[test]
fn keys_dir_is_an_absolute_directory_or_the_state_dirs_keys() {
    let default = Config::default();
    assert_eq!(default.keys_dir, None);
    assert_eq!(default.signing_keys_dir(), default.state_dir.join("keys"));
    let cfg: Config = toml::from_str("keys_dir = \"/etc/kiln/keys\"\n").unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.signing_keys_dir(), PathBuf::from("/etc/kiln/keys"));
    let relative: Config = toml::from_str("keys_dir = \"keys\"\n").unwrap();
    let err = relative.validate().unwrap_err().to_string();
    assert!(err.contains("keys_dir"), "{err}");
}
