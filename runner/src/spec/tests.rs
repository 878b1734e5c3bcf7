#![allow(clippy::unwrap_used)]
use super::*;
use agent_proto::v1::{Input, ResourceLimits, Step};

fn limits() -> SpecLimits {
    SpecLimits {
        max_timeout_seconds: 3600,
        max_memory_bytes: 1 << 30,
        max_pids: 100,
        max_cpu_millis: 2000,
        max_disk_bytes: 1 << 30,
        network_ceiling: crate::egress::netpolicy::Ceiling::parse(&["*:*"]).unwrap(),
        max_inputs: 1000,
        max_spec_bytes: 1 << 20,
        tenant: None,
        tenant_caps: BTreeSet::new(),
        publish: crate::registry::policy::RepositoryPatterns::parse(&["127.0.0.1:5000/ok/*"])
            .unwrap(),
        publish_key: "[publish] repositories".into(),
        insecure_registries: Vec::new(),
    }
}

fn good() -> JobSpec {
    JobSpec {
        name: "j".into(),
        image: "host".into(),
        inputs: vec![Input {
            path: "src/a.c".into(),
            digest: "a".repeat(64),
            executable: false,
        }],
        steps: vec![Step {
            name: "build".into(),
            argv: vec!["cc".into()],
            ..Default::default()
        }],
        outputs: vec!["out/a".into()],
        publish_repository: String::new(),
    }
}

fn err_of(spec: &JobSpec) -> String {
    validate(spec, &limits()).unwrap_err().to_string()
}

#[test]
fn accepts_a_good_spec() {
    validate(&good(), &limits()).unwrap();
}

#[test]
fn rejects_paths_that_could_escape() {
    for bad in [
        "../x",
        "a/../../x",
        "/etc/passwd",
        "a//b",
        "./a",
        "a\0b",
        "",
        // Read as "back/slash" by in-toto-verify.
        "back\\slash",
    ] {
        let mut spec = good();
        spec.inputs[0].path = bad.into();
        assert!(err_of(&spec).contains("inputs[0].path"), "{bad:?}");
        let mut spec = good();
        spec.outputs[0] = bad.into();
        assert!(err_of(&spec).contains("outputs[0]"), "{bad:?}");
    }
}

#[test]
fn names_the_bad_field() {
    let mut spec = good();
    spec.steps[0].argv.clear();
    assert!(err_of(&spec).contains("steps[0].argv"));

    let mut spec = good();
    spec.steps.push(spec.steps[0].clone());
    assert!(err_of(&spec).contains("duplicate step name"));

    let mut spec = good();
    spec.steps[0].name = "a/b".into();
    assert!(err_of(&spec).contains("steps[0].name"));

    let mut spec = good();
    spec.steps[0].argv.push("x\0y".into());
    assert!(err_of(&spec).contains("steps[0].argv[1]"));

    let mut spec = good();
    spec.steps[0].argv[0] = "x".repeat(MAX_ARG_BYTES + 1);
    assert!(err_of(&spec).contains("too long"));

    let mut spec = good();
    spec.inputs[0].digest = "zz".into();
    assert!(err_of(&spec).contains("inputs[0].digest"));

    let mut spec = good();
    spec.image = "../etc".into();
    assert!(err_of(&spec).contains("image"));
    for bad in ["busybox:latest", "busybox@sha256:12", "docker.io/busybox"] {
        spec.image = bad.into();
        assert!(err_of(&spec).contains("image"), "{bad}");
    }
    let hex = "0a".repeat(32);
    for good in [format!("busybox@sha256:{hex}"), format!("sha256:{hex}")] {
        spec.image = good.clone();
        assert!(validate(&spec, &limits()).is_ok(), "{good}");
    }

    let mut spec = good();
    spec.steps[0].timeout_seconds = 7200;
    assert!(err_of(&spec).contains("timeout_seconds"));

    let mut spec = good();
    spec.inputs.push(Input {
        path: "src".into(),
        digest: "b".repeat(64),
        executable: false,
    });
    assert!(err_of(&spec).contains("needs it to be a directory"));
}

#[test]
fn size_and_count_caps_name_the_config_key() {
    let mut spec = good();
    spec.inputs = (0..1001)
        .map(|i| Input {
            path: format!("src/{i}"),
            digest: "a".repeat(64),
            executable: false,
        })
        .collect();
    assert!(err_of(&spec).contains("max_inputs of 1000"));
    spec.inputs.truncate(1000);
    validate(&spec, &limits()).unwrap();

    let mut spec = good();
    spec.steps[0].argv = vec!["x".repeat(100_000); 11];
    assert!(err_of(&spec).contains("max_spec_bytes"));

    let mut spec = good();
    spec.steps[0].env = (0..9)
        .map(|i| (format!("V{i}"), "v".repeat(MAX_ARG_BYTES)))
        .collect();
    let mut big = limits();
    big.max_spec_bytes = 4 << 20;
    let err = validate(&spec, &big).unwrap_err().to_string();
    assert!(err.contains("steps[0].env"), "{err}");
}

#[test]
fn a_file_input_cannot_also_be_a_directory() {
    let mut spec = good();
    for (path, digest) in [("a/b", "b"), ("a/b!x", "c"), ("a/b.c", "d")] {
        spec.inputs.push(Input {
            path: path.into(),
            digest: digest.repeat(64),
            executable: false,
        });
    }
    // Siblings that sort between "a/b" and "a/b/..." are not below it.
    validate(&spec, &limits()).unwrap();
    spec.inputs.push(Input {
        path: "a/b/c/d".into(),
        digest: "e".repeat(64),
        executable: false,
    });
    let err = err_of(&spec);
    assert!(err.contains("\"a/b\" is a file but \"a/b/c/d\""), "{err}");
}

#[test]
fn resource_limits_are_checked_against_the_caps() {
    let mut spec = good();
    spec.steps[0].limits = Some(ResourceLimits {
        memory_bytes: 1 << 30,
        pids: 100,
        cpu_millis: 1500,
        disk_bytes: 64 << 20,
    });
    validate(&spec, &limits()).unwrap();
    for (l, field) in [
        (
            ResourceLimits {
                memory_bytes: 2 << 30,
                ..Default::default()
            },
            "steps[0].limits.memory_bytes",
        ),
        (
            ResourceLimits {
                memory_bytes: 1 << 20,
                ..Default::default()
            },
            "steps[0].limits.memory_bytes",
        ),
        (
            ResourceLimits {
                pids: 101,
                ..Default::default()
            },
            "steps[0].limits.pids",
        ),
        (
            ResourceLimits {
                cpu_millis: 2500,
                ..Default::default()
            },
            "steps[0].limits.cpu_millis",
        ),
        (
            ResourceLimits {
                disk_bytes: 2 << 30,
                ..Default::default()
            },
            "steps[0].limits.disk_bytes",
        ),
    ] {
        spec.steps[0].limits = Some(l);
        let err = validate(&spec, &limits()).unwrap_err();
        assert!(matches!(err, RunnerError::InvalidArgument { .. }), "{err}");
        assert!(err.to_string().contains(field), "{err}");
    }
}

#[test]
fn allow_lists_are_parsed_and_held_to_the_client_ceiling() {
    let mut spec = good();
    spec.steps[0].allow_net = vec!["example.org:443".into()];
    validate(&spec, &limits()).unwrap();
    // A malformed entry is a bad argument, named.
    spec.steps[0].allow_net = vec!["example.org:443".into(), "example.org".into()];
    let err = validate(&spec, &limits()).unwrap_err();
    assert!(matches!(err, RunnerError::InvalidArgument { .. }));
    assert!(err.to_string().contains("steps[0].allow_net[1]"), "{err}");
    // Outside the operator's ceiling for this client: refused, named.
    let mut narrow = limits();
    narrow.network_ceiling =
        crate::egress::netpolicy::Ceiling::parse(&["*.example.org:443"]).unwrap();
    spec.steps[0].allow_net = vec!["a.example.org:443".into(), "example.org:443".into()];
    let err = validate(&spec, &narrow).unwrap_err();
    assert!(matches!(err, RunnerError::PermissionDenied(_)), "{err}");
    assert!(err.to_string().contains("steps[0].allow_net[1]"), "{err}");
    // A tenant's own ceiling is named by its key.
    narrow.tenant = Some("ci".into());
    narrow.tenant_caps.insert("network_ceiling");
    let err = validate(&spec, &narrow).unwrap_err();
    assert!(
        err.to_string().contains("tenants.ci.network_ceiling"),
        "{err}"
    );
}

#[test]
fn a_tenants_own_caps_are_named_by_their_key() {
    let mut spec = good();
    spec.steps[0].limits = Some(ResourceLimits {
        memory_bytes: 2 << 30,
        ..Default::default()
    });
    let mut caps = limits();
    caps.tenant = Some("ci".into());
    let err = validate(&spec, &caps).unwrap_err().to_string();
    assert!(err.contains("the runner's maximum"), "{err}");
    caps.tenant_caps.insert("max_memory");
    let err = validate(&spec, &caps).unwrap_err().to_string();
    assert!(err.contains("tenants.ci.max_memory"), "{err}");
    spec.steps[0].limits = None;
    spec.steps[0].timeout_seconds = 7200;
    caps.tenant_caps.insert("max_timeout_seconds");
    let err = validate(&spec, &caps).unwrap_err().to_string();
    assert!(err.contains("tenants.ci.max_timeout_seconds"), "{err}");
}

#[test]
fn a_job_publishes_only_where_its_caller_may() {
    let mut spec = good();
    spec.publish_repository = "127.0.0.1:5000/ok/app:v1".into();
    assert!(validate(&spec, &limits()).is_ok());
    for (refused, words) in [
        (
            "127.0.0.1:5000/other/app",
            "[publish] repositories does not list",
        ),
        ("127.0.0.1:5000/ok", "[publish] repositories does not list"),
        ("127.0.0.1:5000/ok/app@sha256:00", "not a digest"),
        ("127.0.0.1:5000/ok/app:sha256-abc", "referrers"),
        ("ok/app", "registry"),
    ] {
        spec.publish_repository = refused.into();
        let err = validate(&spec, &limits()).unwrap_err().to_string();
        assert!(err.contains(words), "{refused}: {err}");
    }
}
