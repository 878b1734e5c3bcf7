//! The Kubernetes deployment under deploy/: every manifest passes `kubernetes-validate
//! --strict` (the API's schemas, unknown fields refused), and the workers' configuration
//! the ConfigMap carries is one Kiln accepts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{describe, in_ci, repo_root};

/// Every YAML file under `dir`, sorted.
fn manifests(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(manifests(&path));
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            found.push(path);
        }
    }
    found.sort();
    found
}

#[test]
fn every_manifest_passes_strict_validation() {
    let test = "every_manifest_passes_strict_validation";
    let validator = std::env::var_os("KILN_KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .filter(|path| path.is_file());
    let Some(validator) = validator else {
        assert!(
            !in_ci(),
            "{test}: CI=true but KILN_KUBERNETES_VALIDATE is not set to kubernetes-validate"
        );
        eprintln!("SKIPPED: {test} needs KILN_KUBERNETES_VALIDATE (run scripts/test)");
        return;
    };
    let files = manifests(&repo_root().join("deploy"));
    let names: Vec<String> = files
        .iter()
        .map(|file| file.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in ["daemonset.yaml", "configmap.yaml", "namespace.yaml"] {
        assert!(names.iter().any(|name| name == expected), "{names:?}");
    }
    for file in &files {
        let output = Command::new(&validator)
            .arg("--strict")
            .arg(file)
            .output()
            .unwrap();
        let said = describe(&output);
        assert!(output.status.success(), "{}: {said}", file.display());
        // It exits 0 on a document it has no schema for; each must have been checked.
        assert!(!said.contains("ERROR"), "{}: {said}", file.display());
        assert!(
            said.contains("passed for resource"),
            "{}: {said}",
            file.display()
        );
    }
}

#[test]
fn the_workers_configuration_is_one_kiln_accepts() {
    let dir = repo_root().join("deploy/kubernetes");
    let toml = std::fs::read_to_string(dir.join("kiln.toml")).unwrap();
    let config_map = std::fs::read_to_string(dir.join("configmap.yaml")).unwrap();
    // The ConfigMap's block scalar: kiln.toml indented by four spaces, to the end.
    let embedded: String = toml
        .lines()
        .map(|line| {
            if line.is_empty() {
                "\n".to_string()
            } else {
                format!("    {line}\n")
            }
        })
        .collect();
    assert!(
        config_map.ends_with(&format!("  kiln.toml: |\n{embedded}")),
        "configmap.yaml does not carry deploy/kubernetes/kiln.toml as it is"
    );
    let config = runner::config::Config::load(Some(&dir.join("kiln.toml"))).unwrap();
    config.validate().unwrap();
    // Read from the file, not defaults: actions get no network.
    assert!(config.network_ceiling.is_empty());
    assert!(!config.cgroup_favordynmods);
    // The key ring is the Secret's volume, mounted read-only where keys_dir points, with
    // files only root may read (no fsGroup: it would make them group-readable).
    assert_eq!(
        config.keys_dir.as_deref(),
        Some(Path::new("/etc/kiln/keys"))
    );
    let daemonset = std::fs::read_to_string(dir.join("daemonset.yaml")).unwrap();
    for expected in [
        "- name: signing-keys\n              mountPath: /etc/kiln/keys\n              readOnly: true\n",
        "secretName: kiln-worker-keys\n            defaultMode: 0400\n",
    ] {
        assert!(daemonset.contains(expected), "daemonset.yaml lacks {expected:?}");
    }
    assert!(!daemonset.contains("fsGroup:"));
}
