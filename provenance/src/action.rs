//! The signed statement of one remote action (a REAPI action a Kiln worker ran for an
//! engine such as BuildGrid), and its verifier.
//!
//! The statement is an in-toto Statement v1 in a DSSE envelope signed by the worker's
//! runner key. Its subjects are the action's outputs: each output file by its path and
//! SHA-256, each output directory by its path with a trailing `/` and the SHA-256 of its
//! REAPI `Tree`. Its predicate (`predicateType` [`ACTION_PREDICATE_TYPE`]) names the
//! action digest (so a statement cannot be moved onto another action's result), the
//! command, environment and working directory, the input root digest, the image it ran
//! in, the sandbox profile digest, the exit code, the network attempts and when it ran.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::dsse::{sign_envelope, verify_envelope, IN_TOTO_PAYLOAD_TYPE};
use crate::keyring::{fmt_time, parse_time, TrustedKey};
use crate::keys::SigningKey;
use crate::slsa::STATEMENT_TYPE;
use crate::ProvenanceError;

pub const ACTION_PREDICATE_TYPE: &str = "https://kiln.dev/attestations/remote-action/v1";

/// A REAPI digest: SHA-256 (lower-case hex) and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionDigest {
    pub sha256: String,
    #[serde(rename = "sizeBytes")]
    pub size_bytes: i64,
}

/// What a worker states about one action it ran.
#[derive(Debug, Clone)]
pub struct ActionStatementInput {
    pub action: ActionDigest,
    pub input_root: ActionDigest,
    pub command: Vec<String>,
    pub environment: BTreeMap<String, String>,
    pub working_directory: String,
    pub exit_code: i32,
    /// Output files: path and SHA-256.
    pub output_files: Vec<(String, String)>,
    /// Output directories: path and the SHA-256 of their `Tree`.
    pub output_directories: Vec<(String, String)>,
    /// The digest of the sandbox profile the action ran under.
    pub sandbox_profile: String,
    /// The image the action ran in: its name, its digest (none for the host's own
    /// system) and where it came from.
    pub image: Value,
    /// Every connection attempt of the action (as a step's link records them).
    pub network: Value,
    /// The worker (bot) that ran it.
    pub worker: String,
    pub started_on: OffsetDateTime,
    pub finished_on: OffsetDateTime,
}

impl ActionStatementInput {
    /// The in-toto Statement.
    pub fn statement(&self) -> Value {
        let mut subjects: Vec<Value> = self
            .output_files
            .iter()
            .map(|(path, sha256)| json!({"name": path, "digest": {"sha256": sha256}}))
            .collect();
        subjects.extend(self.output_directories.iter().map(|(path, sha256)| {
            json!({"name": format!("{}/", path.trim_end_matches('/')), "digest": {"sha256": sha256}})
        }));
        json!({
            "_type": STATEMENT_TYPE,
            "subject": subjects,
            "predicateType": ACTION_PREDICATE_TYPE,
            "predicate": {
                "actionDigest": self.action,
                "inputRootDigest": self.input_root,
                "command": self.command,
                "environment": self.environment,
                "workingDirectory": self.working_directory,
                "exitCode": self.exit_code,
                "sandboxProfile": self.sandbox_profile,
                "image": self.image,
                "network": self.network,
                "worker": self.worker,
                "startedOn": fmt_time(self.started_on),
                "finishedOn": fmt_time(self.finished_on),
            },
        })
    }

    /// The statement signed as a DSSE envelope (JSON bytes).
    pub fn sign(&self, key: &SigningKey) -> Result<Vec<u8>, ProvenanceError> {
        let payload = serde_json::to_vec(&self.statement())?;
        Ok(serde_json::to_vec(&sign_envelope(
            IN_TOTO_PAYLOAD_TYPE,
            &payload,
            key,
        ))?)
    }
}

/// What an action's result holds, as the engine's action cache answers it.
#[derive(Debug, Clone, Default)]
pub struct ActionOutcome {
    pub output_files: Vec<(String, String)>,
    pub output_directories: Vec<(String, String)>,
    pub exit_code: i32,
}

/// The verdict on one action's statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActionVerdict {
    pub passed: bool,
    pub reasons: Vec<String>,
    pub signed_by: Vec<String>,
    pub worker: Option<String>,
    pub finished_on: Option<String>,
}

#[derive(Deserialize)]
struct Subject {
    name: String,
    digest: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Predicate {
    #[serde(rename = "actionDigest")]
    action: ActionDigest,
    #[serde(rename = "exitCode")]
    exit_code: i32,
    worker: Option<String>,
    #[serde(rename = "finishedOn")]
    finished_on: String,
}

#[derive(Deserialize)]
struct Statement {
    #[serde(rename = "_type")]
    statement_type: String,
    subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    predicate_type: String,
    predicate: Predicate,
}

/// Checks `envelope` as the statement of action `action_sha256` whose result is
/// `outcome`: a trusted key's signature, valid when the action finished; the statement
/// names this action; the exit code is the result's; every output file and directory of
/// the result is a subject of the same name and digest. Never panics: every problem is a
/// reason in a failing verdict.
pub fn verify_action_statement(
    envelope: &[u8],
    keys: &[TrustedKey],
    action_sha256: &str,
    outcome: &ActionOutcome,
) -> ActionVerdict {
    let mut verdict = ActionVerdict {
        passed: false,
        reasons: Vec::new(),
        signed_by: Vec::new(),
        worker: None,
        finished_on: None,
    };
    let fail = |mut verdict: ActionVerdict, reason: String| {
        verdict.reasons.push(reason);
        verdict
    };
    let value: Value = match serde_json::from_slice(envelope) {
        Ok(v) => v,
        Err(e) => return fail(verdict, format!("the envelope is not JSON: {e}")),
    };
    let public: Vec<_> = keys.iter().map(|k| k.key).collect();
    let verified = match verify_envelope(&value, &public) {
        Ok(v) => v,
        Err(e) => return fail(verdict, format!("signature: {e}")),
    };
    verdict.signed_by = verified.signed_by.clone();
    if verified.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return fail(
            verdict,
            format!("payloadType is {:?}", verified.payload_type),
        );
    }
    let statement: Statement = match serde_json::from_slice(&verified.payload) {
        Ok(s) => s,
        Err(e) => return fail(verdict, format!("not an action statement: {e}")),
    };
    if statement.statement_type != STATEMENT_TYPE
        || statement.predicate_type != ACTION_PREDICATE_TYPE
    {
        return fail(
            verdict,
            format!(
                "not a Kiln action statement (predicateType {:?})",
                statement.predicate_type
            ),
        );
    }
    let predicate = &statement.predicate;
    verdict.worker = predicate.worker.clone();
    verdict.finished_on = Some(predicate.finished_on.clone());
    match parse_time(&predicate.finished_on) {
        Ok(t) => {
            let in_window = keys
                .iter()
                .filter(|k| verified.signed_by.contains(&k.keyid()))
                .any(|k| k.valid_at(t));
            if !in_window {
                verdict.reasons.push(format!(
                    "signed by key(s) {} that were not valid at finishedOn {}",
                    verified.signed_by.join(", "),
                    predicate.finished_on
                ));
            }
        }
        Err(e) => verdict.reasons.push(format!("finishedOn: {e}")),
    }
    if !predicate.action.sha256.eq_ignore_ascii_case(action_sha256) {
        verdict.reasons.push(format!(
            "the statement is about action {}, not {action_sha256}",
            predicate.action.sha256
        ));
    }
    if predicate.exit_code != outcome.exit_code {
        verdict.reasons.push(format!(
            "the result's exit code is {}, the statement's {}",
            outcome.exit_code, predicate.exit_code
        ));
    }
    let named = |name: &str, sha256: &str| {
        statement.subject.iter().any(|s| {
            s.name == name
                && s.digest
                    .get("sha256")
                    .is_some_and(|d| d.eq_ignore_ascii_case(sha256))
        })
    };
    for (path, sha256) in &outcome.output_files {
        if !named(path, sha256) {
            verdict.reasons.push(format!(
                "output file {path:?} (sha256 {sha256}) is not a subject of the statement"
            ));
        }
    }
    for (path, sha256) in &outcome.output_directories {
        let name = format!("{}/", path.trim_end_matches('/'));
        if !named(&name, sha256) {
            verdict.reasons.push(format!(
                "output directory {path:?} (Tree sha256 {sha256}) is not a subject of the statement"
            ));
        }
    }
    verdict.passed = verdict.reasons.is_empty();
    verdict
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn input() -> ActionStatementInput {
        let now = OffsetDateTime::now_utc();
        ActionStatementInput {
            action: ActionDigest {
                sha256: "aa".repeat(32),
                size_bytes: 140,
            },
            input_root: ActionDigest {
                sha256: "bb".repeat(32),
                size_bytes: 80,
            },
            command: vec!["/bin/sh".into(), "-c".into(), "echo hi > out/a".into()],
            environment: BTreeMap::new(),
            working_directory: String::new(),
            exit_code: 0,
            output_files: vec![("out/a".into(), "cc".repeat(32))],
            output_directories: vec![("out/d".into(), "dd".repeat(32))],
            sandbox_profile: "ee".repeat(32),
            image: json!({"name": "gcc", "digest": {"sha256": "ff".repeat(32)}}),
            network: json!([]),
            worker: "bot-1".into(),
            started_on: now,
            finished_on: now,
        }
    }

    fn outcome() -> ActionOutcome {
        ActionOutcome {
            output_files: vec![("out/a".into(), "cc".repeat(32))],
            output_directories: vec![("out/d".into(), "dd".repeat(32))],
            exit_code: 0,
        }
    }

    #[test]
    fn a_statement_verifies_for_its_action_and_result_only() {
        for key in [
            SigningKey::generate(),
            SigningKey::generate_of(crate::KeyType::EcdsaP256),
        ] {
            let trusted = [TrustedKey::unbounded(key.public_key())];
            let envelope = input().sign(&key).unwrap();
            let verdict =
                verify_action_statement(&envelope, &trusted, &"aa".repeat(32), &outcome());
            assert!(verdict.passed, "{verdict:?}");
            assert_eq!(verdict.worker.as_deref(), Some("bot-1"));

            // Replayed onto another action.
            let other = verify_action_statement(&envelope, &trusted, &"ab".repeat(32), &outcome());
            assert!(
                !other.passed && other.reasons[0].contains("is about action"),
                "{other:?}"
            );
            // An output changed in the cache, renamed, or added.
            for changed in [
                ActionOutcome {
                    output_files: vec![("out/a".into(), "cd".repeat(32))],
                    ..outcome()
                },
                ActionOutcome {
                    output_files: vec![("out/b".into(), "cc".repeat(32))],
                    ..outcome()
                },
                ActionOutcome {
                    output_directories: vec![("out/d".into(), "de".repeat(32))],
                    ..outcome()
                },
                ActionOutcome {
                    exit_code: 1,
                    ..outcome()
                },
            ] {
                let verdict =
                    verify_action_statement(&envelope, &trusted, &"aa".repeat(32), &changed);
                assert!(!verdict.passed, "{changed:?}");
            }
            // Another key.
            let stranger = [TrustedKey::unbounded(SigningKey::generate().public_key())];
            assert!(
                !verify_action_statement(&envelope, &stranger, &"aa".repeat(32), &outcome()).passed
            );
            // A payload byte changed.
            let mut value: Value = serde_json::from_slice(&envelope).unwrap();
            value["payload"] = json!("e30=");
            let forged = serde_json::to_vec(&value).unwrap();
            assert!(
                !verify_action_statement(&forged, &trusted, &"aa".repeat(32), &outcome()).passed
            );
            assert!(
                !verify_action_statement(b"not json", &trusted, &"aa".repeat(32), &outcome())
                    .passed
            );
        }
    }
}
