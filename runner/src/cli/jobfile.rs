//! The job file of `kiln submit`: TOML describing inputs, steps and outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use agent_proto::v1::{JobSpec, ResourceLimits, Step};
use anyhow::Context;
use serde::Deserialize;

use crate::cli::client::{collect_inputs, LocalInput};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_image")]
    pub image: String,
    #[serde(default)]
    pub inputs: Vec<InputEntry>,
    pub steps: Vec<StepEntry>,
    #[serde(default)]
    pub outputs: Vec<OutputEntry>,
    /// Where the daemon publishes the outputs when the job succeeds.
    pub publish: Option<PublishEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishEntry {
    /// `REGISTRY/REPO[:TAG]`.
    pub repository: String,
}

fn default_image() -> String {
    crate::images::HOST_IMAGE.to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputEntry {
    /// Where it lands in the workspace.
    pub path: String,
    /// A file or directory on the client, relative to the job file.
    pub from: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepEntry {
    pub name: String,
    pub run: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Seconds; 0 or absent means the daemon's default.
    #[serde(default)]
    pub timeout: u32,
    #[serde(default)]
    pub network: Vec<String>,
    /// Memory limit, e.g. "512M"; absent means the daemon's default.
    pub memory: Option<String>,
    /// Most processes and threads.
    pub pids: Option<u32>,
    /// CPUs, e.g. 1.5 or "1.5".
    pub cpus: Option<crate::units::Cpus>,
    /// Workspace quota, e.g. "1G".
    pub disk: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputEntry {
    pub path: String,
}

/// Reads a job file; returns the spec and the local files to upload.
pub fn load(path: &Path) -> anyhow::Result<(JobSpec, Vec<LocalInput>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: JobFile =
        toml::from_str(&text).with_context(|| format!("parsing job file {}", path.display()))?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let mut locals = Vec::new();
    for input in &file.inputs {
        let source = base.join(&input.from);
        locals.extend(
            collect_inputs(&source, input.path.trim_end_matches('/'))
                .with_context(|| format!("input {:?}", input.path))?,
        );
    }
    let spec = JobSpec {
        publish_repository: file.publish.map(|p| p.repository).unwrap_or_default(),
        name: file.name,
        image: file.image,
        inputs: locals.iter().map(LocalInput::to_input).collect(),
        steps: file
            .steps
            .into_iter()
            .map(|s| {
                let size = |what: &str, v: &Option<String>| -> anyhow::Result<u64> {
                    v.as_deref()
                        .map(crate::units::parse_size)
                        .transpose()
                        .map_err(|e| anyhow::anyhow!("step {:?}: {what}: {e}", s.name))
                        .map(Option::unwrap_or_default)
                };
                let limits = ResourceLimits {
                    memory_bytes: size("memory", &s.memory)?,
                    pids: s.pids.unwrap_or(0),
                    cpu_millis: s.cpus.map(|c| c.0).unwrap_or(0),
                    disk_bytes: size("disk", &s.disk)?,
                };
                Ok(Step {
                    name: s.name,
                    argv: s.run,
                    env: s.env.into_iter().collect(),
                    timeout_seconds: s.timeout,
                    limits: Some(limits),
                    allow_net: s.network,
                })
            })
            .collect::<anyhow::Result<_>>()?,
        outputs: file.outputs.into_iter().map(|o| o.path).collect(),
    };
    Ok((spec, locals))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_the_documented_shape() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        std::fs::write(dir.path().join("src/hello.c"), "int main(){return 0;}").unwrap();
        let job = dir.path().join("job.toml");
        std::fs::write(
            &job,
            r#"
name = "hello"
image = "host"
[[inputs]]
path = "hello.c"
from = "./src/hello.c"
[[steps]]
name = "compile"
run = ["cc", "-O2", "-o", "hello", "hello.c"]
[[steps]]
name = "test"
run = ["/bin/sh", "-c", "./hello > result.txt"]
timeout = 30
env = { LC_ALL = "C" }
[[outputs]]
path = "hello"
"#,
        )
        .unwrap();
        let (spec, locals) = load(&job).unwrap();
        assert_eq!(spec.steps.len(), 2);
        assert_eq!(spec.steps[1].timeout_seconds, 30);
        assert_eq!(spec.inputs[0].path, "hello.c");
        assert_eq!(locals.len(), 1);
        assert_eq!(spec.outputs, vec!["hello".to_string()]);
        assert_eq!(spec.steps[0].limits, Some(ResourceLimits::default()));

        std::fs::write(
            &job,
            "[[steps]]\nname='a'\nrun=['x']\nmemory='512M'\npids=64\ncpus=1.5\ndisk='1G'\n",
        )
        .unwrap();
        let (spec, _) = load(&job).unwrap();
        let l = spec.steps[0].limits.unwrap();
        assert_eq!(
            (l.memory_bytes, l.pids, l.cpu_millis, l.disk_bytes),
            (512 << 20, 64, 1500, 1 << 30)
        );
        std::fs::write(&job, "[[steps]]\nname='a'\nrun=['x']\nmemory='lots'\n").unwrap();
        assert!(format!("{:#}", load(&job).unwrap_err()).contains("memory"));

        std::fs::write(&job, "[[steps]]\nname='a'\nrun=['x']\nbogus=1\n").unwrap();
        assert!(format!("{:#}", load(&job).unwrap_err()).contains("bogus"));
    }

    #[test]
    fn a_directory_input_lands_at_the_workspace_root_with_path_dot() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("src/lib")).unwrap();
        std::fs::write(dir.path().join("src/main.c"), "int main(){return 0;}").unwrap();
        std::fs::write(dir.path().join("src/lib/util.c"), "").unwrap();
        let job = dir.path().join("job.toml");
        let with_input = |path: &str, from: &str| {
            format!(
                "[[inputs]]\npath = {path:?}\nfrom = {from:?}\n[[steps]]\nname='a'\nrun=['x']\n"
            )
        };
        for root in [".", "./"] {
            std::fs::write(&job, with_input(root, "src")).unwrap();
            let (spec, locals) = load(&job).unwrap();
            let paths: Vec<&str> = spec.inputs.iter().map(|i| i.path.as_str()).collect();
            assert_eq!(paths, ["lib/util.c", "main.c"]);
            for input in &spec.inputs {
                crate::spec::check_workspace_path("inputs", &input.path).unwrap();
            }
            assert_eq!(locals.len(), 2);
        }
        // A file needs a name in the workspace.
        std::fs::write(&job, with_input(".", "src/main.c")).unwrap();
        let err = format!("{:#}", load(&job).unwrap_err());
        assert!(
            err.contains("only a directory can land at the workspace root"),
            "{err}"
        );
    }
}
