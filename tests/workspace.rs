//! What a step leaves in its workspace that Kiln cannot record: a tree deeper than
//! PATH_MAX, more entries than the runner allows, names in-toto reads differently,
//! special files. Each fails the step (the job ends `failed`, never `error`), the step
//! still gets its signed link, the job stays readable, and no message names a host
//! path of the daemon.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Output;

use support::*;

/// The id of the `n`th job the daemon accepted.
fn job_id(daemon: &Daemon, n: usize) -> String {
    let log = daemon.log();
    log.lines()
        .filter(|l| l.contains("job accepted"))
        .nth(n)
        .and_then(|l| l.split("job=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(String::from)
        .unwrap_or_else(|| panic!("job {n} in the daemon log:\n{log}"))
}

fn status(daemon: &Daemon, id: &str) -> serde_json::Value {
    let out = daemon.kiln(&["status", "--json", id]);
    assert!(out.status.success(), "kiln status: {}", describe(&out));
    assert_no_host_path(daemon, &out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Neither the daemon's state directory nor the test's directory shows up.
fn assert_no_host_path(daemon: &Daemon, out: &Output) {
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    for host in [
        daemon.state.to_str().unwrap(),
        daemon.dir.path().to_str().unwrap(),
    ] {
        assert!(!all.contains(host), "host path {host} in:\n{all}");
    }
}

/// Runs `script` as step `step`, links to links/; returns the CLI's output.
fn run(daemon: &Daemon, step: &str, outputs: &[&str], script: &str) -> Output {
    let mut args = vec!["run", "--step", step, "--attest-dir", "links"];
    for output in outputs {
        args.extend(["--output", output]);
    }
    args.extend(["--", "/bin/sh", "-c", script]);
    let out = daemon.kiln(&args);
    assert_no_host_path(daemon, &out);
    out
}

/// The step failed (the job too, not with a Kiln error), and its signed link records
/// no products and says why.
fn assert_failed_with_link(daemon: &Daemon, out: &Output, id: &str, step: &str) -> String {
    assert_ne!(out.status.code(), Some(0), "{}", describe(out));
    assert_ne!(out.status.code(), Some(125), "{}", describe(out));
    let job = status(daemon, id);
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["steps"][0]["state"], "failed", "{job}");
    let link = signed_link(&daemon.path("links"), step);
    assert_eq!(link["products"], serde_json::json!({}), "{link}");
    let reason = link["byproducts"]["kiln"]["unrecorded_products"]
        .as_str()
        .unwrap_or_else(|| panic!("no unrecorded_products in {link}"))
        .to_string();
    let message = job["steps"][0]["message"].as_str().unwrap();
    assert!(message.contains(&reason), "{message} / {reason}");
    reason
}

#[test]
fn a_tree_deeper_than_path_max_fails_the_step_with_its_link() {
    if !require_root("a_tree_deeper_than_path_max_fails_the_step_with_its_link") {
        return;
    }
    let daemon = Daemon::start();
    // Two chains of 1100 levels (2200 bytes each), one moved into the other: every
    // command's path stays under PATH_MAX, the tree's deepest path does not.
    let out = run(
        &daemon,
        "deep",
        &[],
        "P=$(printf 'a/%.0s' $(seq 1100)) && mkdir -p x/$P y/$P && mv x y/$P && touch y/$P/x/${P}leaf",
    );
    let id = job_id(&daemon, 0);
    let reason = assert_failed_with_link(&daemon, &out, &id, "deep");
    assert!(reason.contains("/workspace/y/a/a/a/"), "{reason}");
    assert!(reason.contains("PATH_MAX"), "{reason}");
    // The daemon goes on serving: a next job runs normally.
    let out = run(&daemon, "after", &[], "echo fine > f");
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn more_workspace_entries_than_allowed_fail_with_reason_files() {
    if !require_root("more_workspace_entries_than_allowed_fail_with_reason_files") {
        return;
    }
    let cfg = config_file("max_workspace_entries = 1000\nmax_outputs = 100\n");
    let daemon = Daemon::start_with(&["--config", cfg.path().to_str().unwrap()]);

    let out = run(
        &daemon,
        "many",
        &["d"],
        "mkdir d && cd d && seq 3000 | xargs touch",
    );
    let id = job_id(&daemon, 0);
    assert!(text(&out.stderr).contains("[files]"), "{}", describe(&out));
    let reason = assert_failed_with_link(&daemon, &out, &id, "many");
    assert!(
        reason.contains("more than 1000 entries") && reason.contains("max_workspace_entries"),
        "{reason}"
    );
    let job = status(&daemon, &id);
    assert_eq!(job["steps"][0]["limit_reason"], "files", "{job}");
    assert_eq!(
        job["steps"][0]["link_name"].as_str().unwrap_or_default(),
        signed_link_name(&daemon, "many"),
        "{job}"
    );
    assert_eq!(job["outputs"], serde_json::json!([]), "{job}");

    // Within the entry limit but over max_outputs: the job fails before storing
    // anything, and stays readable.
    let out = run(
        &daemon,
        "outputs",
        &["d"],
        "mkdir d && cd d && seq 300 | xargs touch",
    );
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    let id = job_id(&daemon, 1);
    let job = status(&daemon, &id);
    assert_eq!(job["state"], "failed", "{job}");
    assert!(
        job["message"].as_str().unwrap().contains("max_outputs"),
        "{job}"
    );
    assert_eq!(job["outputs"], serde_json::json!([]), "{job}");
}

fn signed_link_name(daemon: &Daemon, step: &str) -> String {
    std::fs::read_dir(daemon.path("links"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&format!("{step}.")) && n.ends_with(".link"))
        .unwrap()
}

#[test]
fn names_in_toto_reads_differently_and_special_files_fail_the_step() {
    if !require_root("names_in_toto_reads_differently_and_special_files_fail_the_step") {
        return;
    }
    let daemon = Daemon::start();
    let out = run(
        &daemon,
        "slash",
        &[],
        "mkdir dir && echo x > 'dir/back\\slash'",
    );
    let id = job_id(&daemon, 0);
    let reason = assert_failed_with_link(&daemon, &out, &id, "slash");
    assert!(
        reason.contains("/workspace/dir/back\\slash") && reason.contains("backslash"),
        "{reason}"
    );

    let out = run(&daemon, "fifo", &[], "mkfifo pipe");
    let id = job_id(&daemon, 1);
    let reason = assert_failed_with_link(&daemon, &out, &id, "fifo");
    assert!(
        reason.contains("/workspace/pipe: special file (fifo)"),
        "{reason}"
    );

    // Declared paths with a backslash are refused at submission.
    let out = daemon.kiln(&["run", "--output", "a\\b", "--", "/bin/true"]);
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("backslash"),
        "{}",
        describe(&out)
    );
}

/// Links too large to carry together come without content in ListLinks (so every
/// client can decode the answer) and the CLI reads them by digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_links_are_listed_by_digest_and_still_downloaded() {
    use agent_proto::v1::attestations_client::AttestationsClient;
    use agent_proto::v1::ListLinksRequest;
    use prost::Message;
    use sha2::{Digest, Sha256};
    if !require_root("large_links_are_listed_by_digest_and_still_downloaded") {
        return;
    }
    let daemon = Daemon::start();
    // 12,000 files with long names: each link (metablock and DSSE) is megabytes.
    let job = "name = \"big\"\nimage = \"host\"\n\n\
        [[steps]]\nname = \"make\"\nrun = [\"/bin/sh\", \"-c\", \"mkdir d && cd d && seq -f 'a-long-file-name-to-make-the-link-large-%06g' 12000 | xargs touch\"]\n\n\
        [[steps]]\nname = \"again\"\nrun = [\"/bin/true\"]\n";
    std::fs::write(daemon.path("big.toml"), job).unwrap();
    let out = daemon.kiln(&["submit", "big.toml", "--attest-dir", "links"]);
    assert!(out.status.success(), "{}", describe(&out));
    let id = job_id(&daemon, 0);
    let channel = channel_as(&daemon.socket, 0, 0).await;
    let answer = AttestationsClient::new(channel)
        .list_links(ListLinksRequest { job_id: id })
        .await
        .unwrap()
        .into_inner();
    assert!(
        answer.encoded_len() < 4 << 20,
        "{} bytes",
        answer.encoded_len()
    );
    assert_eq!(answer.links.len(), 2);
    assert!(answer.links.iter().any(|l| l.content_omitted));
    for link in &answer.links {
        let written = std::fs::read(daemon.path("links").join(&link.file_name)).unwrap();
        assert_eq!(hex::encode(Sha256::digest(&written)), link.digest);
    }
}
