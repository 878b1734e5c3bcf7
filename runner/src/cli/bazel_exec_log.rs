//! Bazel's execution log in JSON (`--execution_log_json_file=FILE`): every spawn of a
//! build, wherever it ran, with the outputs it produced and their digests. Bazel writes
//! one `SpawnExec` message after another as JSON objects (not an array); only the fields
//! read here are decoded.

use std::io::Read;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpawnExec {
    #[serde(default)]
    actual_outputs: Vec<SpawnOutput>,
    #[serde(default)]
    runner: String,
    #[serde(default)]
    progress_message: String,
    #[serde(default)]
    mnemonic: String,
}

#[derive(Deserialize)]
struct SpawnOutput {
    path: String,
    #[serde(default)]
    digest: Option<FileDigest>,
}

#[derive(Deserialize)]
struct FileDigest {
    #[serde(default)]
    hash: String,
}

/// One output a spawn produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpawnOutputRecord {
    /// Relative to the execution root (`bazel-out/...`), as in an ActionResult.
    pub path: String,
    /// Its SHA-256, when Bazel recorded one.
    pub sha256: Option<String>,
    /// The spawn, as Bazel describes it (its progress message, or its mnemonic).
    pub spawn: String,
    /// Where it ran: `remote`, `remote cache hit`, `linux-sandbox`, `local`, ...
    pub runner: String,
}

#[derive(Debug, thiserror::Error)]
#[error("spawn {index} of the execution log: {source}")]
pub struct ExecLogError {
    index: usize,
    source: serde_json::Error,
}

/// Every output of every spawn in the log, in its order.
pub fn spawn_outputs(reader: impl Read) -> Result<Vec<SpawnOutputRecord>, ExecLogError> {
    let spawns = serde_json::Deserializer::from_reader(std::io::BufReader::new(reader))
        .into_iter::<SpawnExec>();
    let mut outputs = Vec::new();
    for (index, spawn) in spawns.enumerate() {
        let spawn = spawn.map_err(|source| ExecLogError { index, source })?;
        let name = if spawn.progress_message.is_empty() {
            spawn.mnemonic
        } else {
            spawn.progress_message
        };
        outputs.extend(spawn.actual_outputs.into_iter().map(|output| {
            SpawnOutputRecord {
                path: output.path,
                sha256: output
                    .digest
                    .map(|d| d.hash)
                    .filter(|hash| !hash.is_empty()),
                spawn: name.clone(),
                runner: spawn.runner.clone(),
            }
        }));
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_the_concatenated_objects_bazel_writes() {
        // As Bazel 4.2.3 writes it (abridged): objects one after another.
        let log = r#"{
  "commandArgs": ["/bin/bash", "-c", "gcc -O2 -o bazel-out/k8-fastbuild/bin/hello ./hello.c"],
  "listedOutputs": ["bazel-out/k8-fastbuild/bin/hello"],
  "progressMessage": "Executing genrule //:hello",
  "mnemonic": "Genrule",
  "actualOutputs": [{
    "path": "bazel-out/k8-fastbuild/bin/hello",
    "digest": {"hash": "a1a2", "sizeBytes": "15960", "hashFunctionName": "SHA-256"}
  }],
  "runner": "remote",
  "remoteCacheHit": false,
  "exitCode": 0
}{
  "mnemonic": "Genrule",
  "actualOutputs": [{"path": "bazel-out/k8-fastbuild/bin/x"}],
  "runner": "linux-sandbox"
}"#;
        let outputs = spawn_outputs(log.as_bytes()).unwrap();
        assert_eq!(
            outputs,
            vec![
                SpawnOutputRecord {
                    path: "bazel-out/k8-fastbuild/bin/hello".into(),
                    sha256: Some("a1a2".into()),
                    spawn: "Executing genrule //:hello".into(),
                    runner: "remote".into(),
                },
                SpawnOutputRecord {
                    path: "bazel-out/k8-fastbuild/bin/x".into(),
                    sha256: None,
                    spawn: "Genrule".into(),
                    runner: "linux-sandbox".into(),
                },
            ]
        );
        assert!(spawn_outputs(&b"{\"actualOutputs\": 3}"[..]).is_err());
        assert!(spawn_outputs(&b"{} garbage"[..]).is_err());
    }
}
