//! `kiln verify --action-cache URL --key KEYS [--instance NAME] [--json] ACTION_DIGEST...`:
//! the results a remote execution engine (BuildGrid) keeps for actions Kiln workers ran,
//! each checked against the signed statement the worker attached to it
//! (`execution_metadata.auxiliary_metadata`, a `kiln.v1.SignedLink`): a trusted key's
//! signature, the statement about this very action, every output of the result a subject
//! of it. A result without a statement is unattested, and fails.
//!
//! `kiln verify --bazel-grpc-log FILE... [--bazel-exec-log FILE...] --key KEYS
//! [--action-cache URL]`: the same check of every action a Bazel build had executed
//! remotely or took from the remote cache, named by Bazel's log of its remote calls, in
//! every result Bazel received (or the one the cache holds now); and every output of the
//! build's execution log an output of a verified action.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use bazel_remote_apis::build::bazel::remote::execution::v2::action_cache_client::ActionCacheClient;
use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ActionResult, Digest, GetActionResultRequest,
};
use prost::Message;
use provenance::action::{verify_action_statement, ActionOutcome, ActionVerdict};
use serde_json::json;
use tonic::transport::Channel;

use crate::cli::bazel_exec_log::SpawnOutputRecord;
use crate::cli::bazel_grpc_log::Source;

/// The type URL of the statement in `auxiliary_metadata`.
pub const SIGNED_LINK_TYPE_URL: &str = "type.googleapis.com/kiln.v1.SignedLink";
/// The largest ActionResult read from the engine.
const MAX_RESULT_BYTES: usize = 16 << 20;
/// The most actions one call checks.
const MAX_ACTIONS: usize = 100_000;
/// The host's CA certificates, for a `grpcs://` engine.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// `HEX/SIZE` or `sha256:HEX/SIZE` (Bazel writes the former).
pub fn parse_action_digest(text: &str) -> anyhow::Result<Digest> {
    let bare = text.strip_prefix("sha256:").unwrap_or(text);
    let Some((hash, size)) = bare.split_once('/') else {
        bail!("action digest {text:?}: expected HEX/SIZE");
    };
    if hash.len() != 64
        || !hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        bail!("action digest {text:?}: the hash is 64 lower-case hex digits");
    }
    let size_bytes: i64 =
        size.parse().ok().filter(|n| *n >= 0).with_context(|| {
            format!("action digest {text:?}: the size is a non-negative number")
        })?;
    Ok(Digest {
        hash: hash.to_string(),
        size_bytes,
    })
}

/// A channel to the engine: `grpc://HOST:PORT` (plain) or `grpcs://HOST:PORT` (TLS,
/// checked against the host's CA certificates).
pub async fn connect(url: &str) -> anyhow::Result<Channel> {
    if let Some(rest) = url.strip_prefix("grpc://") {
        return Channel::from_shared(format!("http://{rest}"))
            .with_context(|| format!("{url:?}"))?
            .connect()
            .await
            .with_context(|| format!("connecting to {url}"));
    }
    let Some(rest) = url.strip_prefix("grpcs://") else {
        bail!("{url:?}: expected grpc://HOST:PORT or grpcs://HOST:PORT");
    };
    let bundle = std::fs::read(SYSTEM_CA_BUNDLE)
        .with_context(|| format!("reading the host's CA certificates {SYSTEM_CA_BUNDLE}"))?;
    let roots = crate::cli::connect::ca_roots(&bundle)?;
    let tls = rustls::ClientConfig::builder_with_provider(crate::daemon::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .context("the TLS configuration")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    crate::cli::connect::channel_over_tls(&format!("https://{rest}"), Arc::new(tls)).await
}

/// Where the results to judge come from.
pub enum Results<'a> {
    /// The engine's action cache, as it holds them now.
    ActionCache { url: &'a str, instance: &'a str },
    /// As Bazel received them, recorded in its log of remote calls.
    AsBazelReceived,
}

/// What `kiln verify --action-cache`/`--bazel-grpc-log` checks.
pub struct Check<'a> {
    pub results: Results<'a>,
    pub keys: &'a [PathBuf],
    /// Action digests named on the command line (HEX/SIZE).
    pub actions: &'a [String],
    /// Bazel's logs of its remote calls: every action in them is checked.
    pub grpc_logs: &'a [PathBuf],
    /// Bazel's execution logs (JSON): every output of every spawn in them must be an
    /// output of a verified action, with the same digest.
    pub exec_logs: &'a [PathBuf],
    pub json: bool,
}

/// One action to judge: its result, or why there is none.
struct Candidate {
    digest: Digest,
    /// "action-cache", or a [`Source`]'s name: where the judged result came from.
    source: &'static str,
    result: Result<ActionResult, String>,
}

/// Each action's verdict, printed; exit code 0 only when every one passed.
pub async fn run(check: Check<'_>) -> anyhow::Result<i32> {
    if check.actions.len() > MAX_ACTIONS {
        bail!("at most {MAX_ACTIONS} actions at once");
    }
    let mut named = check
        .actions
        .iter()
        .map(|a| parse_action_digest(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut logged = Vec::new();
    for path in check.grpc_logs {
        let file = std::fs::File::open(path)
            .with_context(|| format!("opening Bazel's gRPC log {}", path.display()))?;
        let actions = crate::cli::bazel_grpc_log::remote_actions(file)
            .with_context(|| format!("Bazel's gRPC log {}", path.display()))?;
        if actions.is_empty() {
            bail!(
                "Bazel's gRPC log {} records no remote action (was the build remote?)",
                path.display()
            );
        }
        logged.extend(actions);
    }
    if named.is_empty() && logged.is_empty() {
        bail!("name at least one action digest (HEX/SIZE) or --bazel-grpc-log");
    }
    if named.len() + logged.len() > MAX_ACTIONS {
        bail!("at most {MAX_ACTIONS} actions at once");
    }
    let trusted = crate::cli::verify::trusted_keys(check.keys)?;
    if trusted.is_empty() {
        bail!("no worker keys to trust: give --key");
    }
    let mut seen = HashSet::new();
    let mut candidates = Vec::new();
    match check.results {
        Results::ActionCache { url, instance } => {
            named.extend(logged.into_iter().map(|a| a.digest));
            named.retain(|d| seen.insert((d.hash.clone(), d.size_bytes)));
            let mut client = ActionCacheClient::new(connect(url).await?)
                .max_decoding_message_size(MAX_RESULT_BYTES);
            for digest in named {
                let request = GetActionResultRequest {
                    instance_name: instance.to_string(),
                    action_digest: Some(digest.clone()),
                    inline_stdout: false,
                    inline_stderr: false,
                    ..Default::default()
                };
                let result = client
                    .get_action_result(request)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|status| {
                        format!(
                            "the action cache has no result for it: {}",
                            crate::cli::printable(status.message())
                        )
                    });
                candidates.push(Candidate {
                    digest,
                    source: "action-cache",
                    result,
                });
            }
        }
        Results::AsBazelReceived => {
            if !named.is_empty() {
                bail!("action digests on the command line need --action-cache to fetch them from");
            }
            // Every result Bazel received is judged: for an action in two logs (two
            // builds), or called about twice in one, each result it took.
            for action in logged {
                for (source, result) in action.earlier {
                    candidates.push(Candidate {
                        digest: action.digest.clone(),
                        source: source.name(),
                        result: Ok(result),
                    });
                }
                let (source, result) = match action.received {
                    Some((source, result)) => (source.name(), Ok(result)),
                    None => (
                        Source::Executed.name(),
                        Err(format!(
                            "Bazel received no result for it: {}",
                            action
                                .missing_because
                                .as_deref()
                                .unwrap_or("no call answered one")
                        )),
                    ),
                };
                candidates.push(Candidate {
                    digest: action.digest,
                    source,
                    result,
                });
            }
        }
    }
    let verdicts: Vec<_> = candidates
        .into_iter()
        .map(|candidate| {
            let verdict = match &candidate.result {
                Ok(result) => judge(&candidate.digest, result, &trusted),
                Err(why) => ActionVerdict {
                    passed: false,
                    reasons: vec![why.clone()],
                    signed_by: Vec::new(),
                    worker: None,
                    finished_on: None,
                },
            };
            (candidate, verdict)
        })
        .collect();
    let mut spawn_outputs = Vec::new();
    for path in check.exec_logs {
        let file = std::fs::File::open(path)
            .with_context(|| format!("opening Bazel's execution log {}", path.display()))?;
        spawn_outputs.extend(
            crate::cli::bazel_exec_log::spawn_outputs(file)
                .with_context(|| format!("Bazel's execution log {}", path.display()))?,
        );
    }
    let unattested = unattested_outputs(&spawn_outputs, &verdicts);
    let passed = verdicts.iter().all(|(_, v)| v.passed) && unattested.is_empty();
    if check.json {
        let list: Vec<_> = verdicts
            .iter()
            .map(|(c, v)| {
                json!({
                    "action": format!("{}/{}", c.digest.hash, c.digest.size_bytes),
                    "source": c.source,
                    "verdict": v,
                })
            })
            .collect();
        let mut answer = json!({"passed": passed, "actions": list});
        if !check.exec_logs.is_empty() {
            let unattested: Vec<_> = unattested
                .iter()
                .map(|(output, why)| {
                    json!({
                        "path": output.path,
                        "spawn": output.spawn,
                        "runner": output.runner,
                        "reason": why,
                    })
                })
                .collect();
            answer["outputs"] = json!({"checked": spawn_outputs.len(), "unattested": unattested});
        }
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        for (candidate, verdict) in &verdicts {
            let digest = &candidate.digest;
            let head = format!("action {}/{}", digest.hash, digest.size_bytes);
            if verdict.passed {
                println!(
                    "{head}: PASS, run by {} and signed by {}{}",
                    crate::cli::printable(verdict.worker.as_deref().unwrap_or("?")),
                    verdict.signed_by.join(", "),
                    if candidate.source == Source::CacheHit.name() {
                        " (Bazel took it from the remote cache)"
                    } else {
                        ""
                    }
                );
            } else {
                println!(
                    "{head}: FAIL: {}",
                    crate::cli::printable(&verdict.reasons.join("; "))
                );
            }
        }
        for (output, why) in &unattested {
            println!(
                "output {} ({}): FAIL: {}",
                crate::cli::printable(&output.path),
                crate::cli::printable(&output.spawn),
                crate::cli::printable(why)
            );
        }
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        let outputs = if check.exec_logs.is_empty() {
            String::new()
        } else {
            let n = spawn_outputs.len();
            format!(", {n} output{}", plural(n))
        };
        println!(
            "{} ({} action{}{outputs})",
            if passed { "PASS" } else { "FAIL" },
            verdicts.len(),
            plural(verdicts.len())
        );
    }
    Ok(if passed { 0 } else { 1 })
}

/// The spawn outputs no verified action vouches for, each with why: a verified result
/// must have it as an output file, at the same path with the same digest.
fn unattested_outputs(
    outputs: &[SpawnOutputRecord],
    verdicts: &[(Candidate, ActionVerdict)],
) -> Vec<(SpawnOutputRecord, String)> {
    let mut files = HashSet::new();
    let mut directories = Vec::new();
    for (candidate, verdict) in verdicts {
        let (true, Ok(result)) = (verdict.passed, &candidate.result) else {
            continue;
        };
        for file in &result.output_files {
            if let Some(digest) = &file.digest {
                files.insert((file.path.as_str(), digest.hash.as_str()));
            }
        }
        for directory in &result.output_directories {
            directories.push(format!("{}/", directory.path.trim_end_matches('/')));
        }
    }
    outputs
        .iter()
        .filter_map(|output| {
            let why = match &output.sha256 {
                Some(hash) if files.contains(&(output.path.as_str(), hash.as_str())) => {
                    return None
                }
                None => "Bazel recorded no digest of it".to_string(),
                Some(_) if directories.iter().any(|d| output.path.starts_with(d)) => {
                    "it lies in an output directory of a verified action, whose files are \
                     not checked one by one"
                        .to_string()
                }
                Some(hash) => format!(
                    "no verified action has it as an output with sha256 {hash} (the spawn's \
                     runner: {})",
                    output.runner
                ),
            };
            Some((output.clone(), why))
        })
        .collect()
}

/// One result against the statements attached to it: exactly one must be there.
fn judge(
    digest: &Digest,
    result: &ActionResult,
    trusted: &[provenance::keyring::TrustedKey],
) -> ActionVerdict {
    let unattested = |why: &str| ActionVerdict {
        passed: false,
        reasons: vec![why.to_string()],
        signed_by: Vec::new(),
        worker: None,
        finished_on: None,
    };
    let statements: Vec<_> = result
        .execution_metadata
        .iter()
        .flat_map(|m| m.auxiliary_metadata.iter())
        .filter(|any| any.type_url == SIGNED_LINK_TYPE_URL)
        .collect();
    let [statement] = statements.as_slice() else {
        return unattested(if statements.is_empty() {
            "unattested: no statement of a Kiln worker is attached to the result"
        } else {
            "more than one statement is attached to the result"
        });
    };
    let envelope = match agent_proto::v1::SignedLink::decode(statement.value.as_slice()) {
        Ok(link) => link.dsse_envelope,
        Err(e) => return unattested(&format!("the attached statement does not decode: {e}")),
    };
    let digest_of = |d: &Option<Digest>| d.as_ref().map(|d| d.hash.clone()).unwrap_or_default();
    let outcome = ActionOutcome {
        output_files: result
            .output_files
            .iter()
            .map(|f| (f.path.clone(), digest_of(&f.digest)))
            .collect(),
        output_directories: result
            .output_directories
            .iter()
            .map(|d| (d.path.clone(), digest_of(&d.tree_digest)))
            .collect(),
        exit_code: result.exit_code,
    };
    verify_action_statement(&envelope, trusted, &digest.hash, &outcome)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use crate::cli::bazel_grpc_log::fixtures;
    use bazel_remote_apis::build::bazel::remote::execution::v2::{
        ExecutedActionMetadata, OutputFile,
    };
    use provenance::action::{ActionDigest, ActionStatementInput};
    use provenance::keys::SigningKey;

    /// An action's result with one output, and the statement `key` signed about it.
    fn signed_result(key: &SigningKey, action: &Digest) -> ActionResult {
        let output = "cc".repeat(32);
        let now = time::OffsetDateTime::now_utc();
        let envelope = ActionStatementInput {
            action: ActionDigest {
                sha256: action.hash.clone(),
                size_bytes: action.size_bytes,
            },
            input_root: ActionDigest {
                sha256: "bb".repeat(32),
                size_bytes: 80,
            },
            command: vec!["/bin/true".into()],
            environment: Default::default(),
            working_directory: String::new(),
            exit_code: 0,
            output_files: vec![("out".into(), output.clone())],
            output_directories: Vec::new(),
            sandbox_profile: "ee".repeat(32),
            image: json!({"name": "host"}),
            network: json!([]),
            worker: "bot-1".into(),
            started_on: now,
            finished_on: now,
        }
        .sign(key)
        .unwrap();
        ActionResult {
            output_files: vec![OutputFile {
                path: "out".into(),
                digest: Some(Digest {
                    hash: output,
                    size_bytes: 3,
                }),
                ..Default::default()
            }],
            execution_metadata: Some(ExecutedActionMetadata {
                auxiliary_metadata: vec![bazel_remote_apis::google::protobuf::Any {
                    type_url: SIGNED_LINK_TYPE_URL.into(),
                    value: agent_proto::v1::SignedLink {
                        dsse_envelope: envelope,
                    }
                    .encode_to_vec(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// `kiln verify --bazel-grpc-log LOG --key KEY`'s exit code (offline).
    async fn verify_log(log: &[u8], key: &SigningKey) -> i32 {
        verify_build(log, None, key).await
    }

    /// As [`verify_log`], with `--bazel-exec-log EXEC_LOG`.
    async fn verify_build(log: &[u8], exec_log: Option<&str>, key: &SigningKey) -> i32 {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("grpc.log");
        std::fs::write(&log_path, log).unwrap();
        let key_path = dir.path().join("worker.pub");
        std::fs::write(&key_path, key.public_key().to_spki_pem()).unwrap();
        let exec_logs: Vec<PathBuf> = exec_log
            .map(|text| {
                let path = dir.path().join("exec.json");
                std::fs::write(&path, text).unwrap();
                path
            })
            .into_iter()
            .collect();
        run(Check {
            results: Results::AsBazelReceived,
            keys: &[key_path],
            actions: &[],
            grpc_logs: &[log_path],
            exec_logs: &exec_logs,
            json: false,
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn every_output_in_the_execution_log_must_come_from_a_verified_action() {
        let key = SigningKey::generate();
        let a = Digest {
            hash: "aa".repeat(32),
            size_bytes: 140,
        };
        let log = fixtures::executed(&a, signed_result(&key, &a));
        let spawn = |path: &str, hash: &str, runner: &str| {
            format!(
                r#"{{"progressMessage": "Executing genrule //:x", "runner": "{runner}",
                   "actualOutputs": [{{"path": "{path}", "digest": {{"hash": "{hash}"}}}}]}}"#
            )
        };
        let covered = spawn("out", &"cc".repeat(32), "remote");
        assert_eq!(verify_build(&log, Some(&covered), &key).await, 0);
        // A spawn Bazel ran locally: nothing vouches for its output.
        let local = spawn("other", &"dd".repeat(32), "linux-sandbox");
        assert_eq!(
            verify_build(&log, Some(&format!("{covered}{local}")), &key).await,
            1
        );
        // The same path with other bytes than the verified action's.
        let changed = spawn("out", &"cd".repeat(32), "remote");
        assert_eq!(verify_build(&log, Some(&changed), &key).await, 1);
        // Covered only by a result that does not verify.
        assert_eq!(
            verify_build(&log, Some(&covered), &SigningKey::generate()).await,
            1
        );
    }

    #[tokio::test]
    async fn a_bazel_log_passes_only_when_every_result_bazel_received_is_signed() {
        let key = SigningKey::generate();
        let (a, b) = (
            Digest {
                hash: "aa".repeat(32),
                size_bytes: 140,
            },
            Digest {
                hash: "ab".repeat(32),
                size_bytes: 141,
            },
        );
        let good = [
            fixtures::executed(&a, signed_result(&key, &a)),
            fixtures::executed(&b, signed_result(&key, &b)),
        ]
        .concat();
        assert_eq!(verify_log(&good, &key).await, 0);
        // Another worker's key.
        assert_eq!(verify_log(&good, &SigningKey::generate()).await, 1);

        // Bazel received an output the statement does not name.
        let mut forged = signed_result(&key, &b);
        forged.output_files[0].digest = Some(Digest {
            hash: "cd".repeat(32),
            size_bytes: 3,
        });
        let log = [
            fixtures::executed(&a, signed_result(&key, &a)),
            fixtures::executed(&b, forged),
        ]
        .concat();
        assert_eq!(verify_log(&log, &key).await, 1);
        // A statement about another action, replayed.
        let log = fixtures::executed(&b, signed_result(&key, &a));
        assert_eq!(verify_log(&log, &key).await, 1);
        // No statement at all.
        let log = fixtures::executed(&a, ActionResult::default());
        assert_eq!(verify_log(&log, &key).await, 1);
        // Bazel received a result no worker signed, and later in the same build a signed
        // one for the same action: the unsigned one fails the build all the same.
        let mut unsigned = signed_result(&key, &a);
        unsigned.execution_metadata = None;
        let log = [
            fixtures::executed(&a, unsigned.clone()),
            fixtures::hit(&a, signed_result(&key, &a)),
        ]
        .concat();
        assert_eq!(verify_log(&log, &key).await, 1);
        let log = [
            fixtures::hit(&a, signed_result(&key, &a)),
            fixtures::executed(&a, unsigned),
        ]
        .concat();
        assert_eq!(verify_log(&log, &key).await, 1);
        // Looked up, missed, and never executed remotely: Bazel ran it elsewhere.
        let log = [
            fixtures::executed(&a, signed_result(&key, &a)),
            fixtures::missed(&b),
        ]
        .concat();
        assert_eq!(verify_log(&log, &key).await, 1);
    }

    #[tokio::test]
    async fn a_log_without_remote_actions_is_an_error_not_a_pass() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("empty.log");
        std::fs::write(&log, b"").unwrap();
        let key = dir.path().join("worker.pub");
        std::fs::write(&key, SigningKey::generate().public_key().to_spki_pem()).unwrap();
        let check = Check {
            results: Results::AsBazelReceived,
            keys: std::slice::from_ref(&key),
            actions: &[],
            grpc_logs: std::slice::from_ref(&log),
            exec_logs: &[],
            json: false,
        };
        let err = run(check).await.unwrap_err();
        assert!(format!("{err:#}").contains("no remote action"), "{err:#}");
    }

    #[test]
    fn action_digests_are_hex_and_size() {
        let hex = "ab".repeat(32);
        assert_eq!(
            parse_action_digest(&format!("{hex}/140"))
                .unwrap()
                .size_bytes,
            140
        );
        assert!(parse_action_digest(&format!("sha256:{hex}/0")).is_ok());
        for bad in [
            hex.clone(),
            format!("{hex}/-1"),
            format!("{hex}/x"),
            format!("{}/1", "AB".repeat(32)),
            format!("{}/1", "ab".repeat(31)),
        ] {
            assert!(parse_action_digest(&bad).is_err(), "{bad}");
        }
    }
}
