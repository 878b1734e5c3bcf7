//! `kiln verify --action-cache URL --key KEYS [--instance NAME] [--json] ACTION_DIGEST...`:
//! the results a remote execution engine (BuildGrid) keeps for actions Kiln workers ran,
//! each checked against the signed statement the worker attached to it
//! (`execution_metadata.auxiliary_metadata`, a `kiln.v1.SignedLink`): a trusted key's
//! signature, the statement about this very action, every output of the result a subject
//! of it. A result without a statement is unattested, and fails.

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

/// Each action's verdict, printed; exit code 0 only when every one passed.
pub async fn run(
    url: &str,
    instance: &str,
    keys: &[PathBuf],
    actions: &[String],
    json_out: bool,
) -> anyhow::Result<i32> {
    if actions.is_empty() {
        bail!("name at least one action digest (HEX/SIZE)");
    }
    if actions.len() > MAX_ACTIONS {
        bail!("at most {MAX_ACTIONS} actions at once");
    }
    let digests = actions
        .iter()
        .map(|a| parse_action_digest(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let trusted = crate::cli::verify::trusted_keys(keys)?;
    if trusted.is_empty() {
        bail!("no worker keys to trust: give --key");
    }
    let mut client =
        ActionCacheClient::new(connect(url).await?).max_decoding_message_size(MAX_RESULT_BYTES);
    let mut verdicts = Vec::new();
    for digest in digests {
        let request = GetActionResultRequest {
            instance_name: instance.to_string(),
            action_digest: Some(digest.clone()),
            inline_stdout: false,
            inline_stderr: false,
            ..Default::default()
        };
        let verdict = match client.get_action_result(request).await {
            Ok(result) => judge(&digest, &result.into_inner(), &trusted),
            Err(status) => ActionVerdict {
                passed: false,
                reasons: vec![format!(
                    "the action cache has no result for it: {}",
                    crate::cli::printable(status.message())
                )],
                signed_by: Vec::new(),
                worker: None,
                finished_on: None,
            },
        };
        verdicts.push((digest, verdict));
    }
    let passed = verdicts.iter().all(|(_, v)| v.passed);
    if json_out {
        let list: Vec<_> = verdicts
            .iter()
            .map(|(d, v)| json!({"action": format!("{}/{}", d.hash, d.size_bytes), "verdict": v}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"passed": passed, "actions": list}))?
        );
    } else {
        for (digest, verdict) in &verdicts {
            let head = format!("action {}/{}", digest.hash, digest.size_bytes);
            if verdict.passed {
                println!(
                    "{head}: PASS, run by {} and signed by {}",
                    crate::cli::printable(verdict.worker.as_deref().unwrap_or("?")),
                    verdict.signed_by.join(", ")
                );
            } else {
                println!(
                    "{head}: FAIL: {}",
                    crate::cli::printable(&verdict.reasons.join("; "))
                );
            }
        }
        println!("{}", if passed { "PASS" } else { "FAIL" });
    }
    Ok(if passed { 0 } else { 1 })
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
