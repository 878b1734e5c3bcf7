//! Attacks on the worker's CAS client, input root and output collection, against a fake CAS
//! on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use prost::Message;

use super::cas::{Digest, UploadSource};
use super::fake_cas::Fake;
use super::inputs::{fetch_input_tree, materialize_input_root, validate_command_paths, InputTree};
use super::outputs::{collect_outputs, upload_outputs};
use super::ActionLimits;
use crate::error::RunnerError;

/// The result is the error `kind` of RunnerError.
macro_rules! assert_err {
    ($result:expr, $kind:ident) => {
        assert!(
            matches!($result, Err(RunnerError::$kind(_))),
            "{:?}",
            $result
        )
    };
}

fn file(fake: &Fake, name: &str, content: &[u8], executable: bool) -> reapi::FileNode {
    reapi::FileNode {
        name: name.into(),
        digest: Some(fake.put(content).to_proto()),
        is_executable: executable,
        node_properties: None,
    }
}

fn dir_node(fake: &Fake, name: &str, directory: &reapi::Directory) -> reapi::DirectoryNode {
    reapi::DirectoryNode {
        name: name.into(),
        digest: Some(fake.put_message(directory).to_proto()),
    }
}

fn symlink(name: &str, target: &str) -> reapi::SymlinkNode {
    reapi::SymlinkNode {
        name: name.into(),
        target: target.into(),
        node_properties: None,
    }
}

fn directory(
    files: Vec<reapi::FileNode>,
    directories: Vec<reapi::DirectoryNode>,
    symlinks: Vec<reapi::SymlinkNode>,
) -> reapi::Directory {
    reapi::Directory {
        files,
        directories,
        symlinks,
        node_properties: None,
    }
}

async fn fetch(fake: &Fake, root: &reapi::Directory) -> Result<InputTree, RunnerError> {
    let digest = fake.put_message(root);
    fetch_input_tree(&fake.client, &digest, &ActionLimits::default()).await
}

fn assert_invalid<T: std::fmt::Debug>(result: Result<T, RunnerError>, needle: &str) {
    match result {
        Err(RunnerError::InvalidArgument { reason, .. }) if reason.contains(needle) => {}
        other => panic!("expected InvalidArgument containing {needle:?}, got {other:?}"),
    }
}

// --- digests and the CAS client ---

#[test]
fn malformed_digests_are_refused() {
    let good = "a".repeat(64);
    for (hash, size) in [
        ("".to_string(), 1),
        ("A".repeat(64), 1),
        ("a".repeat(63), 1),
        ("g".repeat(64), 1),
        (format!("{}/", "a".repeat(63)), 1),
        (good.clone(), -1),
        (good.clone(), 0),
    ] {
        let result = Digest::from_proto(&reapi::Digest {
            hash: hash.clone(),
            size_bytes: size,
        });
        assert!(result.is_err(), "{hash:?}/{size} was accepted");
    }
    assert!(Digest::from_proto(&reapi::Digest {
        hash: good,
        size_bytes: 5
    })
    .is_ok());
}

#[tokio::test]
async fn blobs_round_trip_by_batch_and_bytestream() {
    // A batch of 4 KiB: the 100 KiB blob goes by ByteStream both ways.
    let fake = Fake::start(4096).await;
    let small = b"small blob".to_vec();
    let large: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
    let (small_digest, large_digest) = (Digest::of(&small), Digest::of(&large));
    assert_eq!(
        fake.client
            .find_missing(&[small_digest.clone(), large_digest.clone()])
            .await
            .unwrap()
            .len(),
        2
    );
    fake.client
        .upload_missing(vec![
            (small_digest.clone(), UploadSource::Bytes(small.clone())),
            (large_digest.clone(), UploadSource::Bytes(large.clone())),
        ])
        .await
        .unwrap();
    assert!(fake
        .client
        .find_missing(&[small_digest.clone(), large_digest.clone()])
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        fake.client
            .read_blob(&small_digest, u64::MAX)
            .await
            .unwrap(),
        small
    );
    assert_eq!(
        fake.client
            .read_blob(&large_digest, u64::MAX)
            .await
            .unwrap(),
        large
    );
    let both = fake
        .client
        .read_blobs(&[small_digest.clone(), large_digest.clone()])
        .await
        .unwrap();
    assert_eq!(both[&small_digest], small);
    assert_eq!(both[&large_digest], large);
}

#[tokio::test]
async fn a_blob_of_wrong_content_or_size_is_refused() {
    let fake = Fake::start(4096).await;
    let small = Digest::of(b"the real content");
    let large_content = vec![7u8; 64 * 1024];
    let large = Digest::of(&large_content);
    for (digest, lie) in [
        // Same size, other content; shorter; longer: by batch, then by ByteStream.
        (&small, b"the fake content".to_vec()),
        (&small, b"short".to_vec()),
        (&small, b"the real content and more".to_vec()),
        (&large, vec![8u8; 64 * 1024]),
        (&large, vec![7u8; 64 * 1024 - 1]),
        (&large, vec![7u8; 64 * 1024 + 1]),
    ] {
        fake.lie(digest, &lie);
        let result = fake.client.read_blob(digest, u64::MAX).await;
        assert!(
            matches!(result, Err(RunnerError::DigestMismatch(_))),
            "{digest}: {result:?}"
        );
        let mut sink = Vec::new();
        let result = fake.client.stream_read(digest, &mut sink).await;
        assert!(
            matches!(result, Err(RunnerError::DigestMismatch(_))),
            "{digest}: {result:?}"
        );
        assert!(
            sink.len() as u64 <= digest.size(),
            "read past the declared size"
        );
    }
}

#[tokio::test]
async fn a_huge_declared_size_is_refused_before_any_read() {
    let fake = Fake::start(0).await;
    let huge = Digest::from_proto(&reapi::Digest {
        hash: "b".repeat(64),
        size_bytes: i64::MAX,
    })
    .unwrap();
    let result = fake.client.read_blob(&huge, 1 << 20).await;
    assert_err!(result, ResourceExhausted);
    // As a Directory of an input root, too.
    let root = directory(
        vec![],
        vec![reapi::DirectoryNode {
            name: "d".into(),
            digest: Some(huge.to_proto()),
        }],
        vec![],
    );
    assert_invalid(fetch(&fake, &root).await, "larger than");
    // As a file of an input root: over the input bytes limit.
    let root = directory(
        vec![reapi::FileNode {
            name: "f".into(),
            digest: Some(huge.to_proto()),
            ..Default::default()
        }],
        vec![],
        vec![],
    );
    assert!(matches!(
        fetch(&fake, &root).await,
        Err(RunnerError::ResourceExhausted(_))
    ));
}

// --- the input root ---

#[tokio::test]
async fn bad_names_are_refused() {
    let fake = Fake::start(0).await;
    for name in ["..", ".", "", "a/b", "/etc", "nul\0"] {
        let root = directory(vec![file(&fake, name, b"x", false)], vec![], vec![]);
        assert!(
            matches!(
                fetch(&fake, &root).await,
                Err(RunnerError::InvalidArgument { .. })
            ),
            "file {name:?}"
        );
        let root = directory(
            vec![],
            vec![dir_node(&fake, name, &directory(vec![], vec![], vec![]))],
            vec![],
        );
        assert!(
            matches!(
                fetch(&fake, &root).await,
                Err(RunnerError::InvalidArgument { .. })
            ),
            "directory {name:?}"
        );
        let root = directory(vec![], vec![], vec![symlink(name, "target")]);
        assert!(
            matches!(
                fetch(&fake, &root).await,
                Err(RunnerError::InvalidArgument { .. })
            ),
            "symlink {name:?}"
        );
    }
}

#[tokio::test]
async fn duplicate_and_clashing_names_are_refused() {
    let fake = Fake::start(0).await;
    let empty = directory(vec![], vec![], vec![]);
    let cases = [
        directory(
            vec![file(&fake, "a", b"1", false), file(&fake, "a", b"2", false)],
            vec![],
            vec![],
        ),
        directory(
            vec![file(&fake, "a", b"1", false)],
            vec![dir_node(&fake, "a", &empty)],
            vec![],
        ),
        directory(
            vec![file(&fake, "a", b"1", false)],
            vec![],
            vec![symlink("a", "b")],
        ),
        directory(
            vec![],
            vec![dir_node(&fake, "a", &empty)],
            vec![symlink("a", "b")],
        ),
        directory(
            vec![],
            vec![dir_node(&fake, "a", &empty), dir_node(&fake, "a", &empty)],
            vec![],
        ),
    ];
    for root in cases {
        assert_invalid(fetch(&fake, &root).await, "two entries named");
    }
}

#[tokio::test]
async fn symlinks_out_of_the_workspace_are_refused() {
    let fake = Fake::start(0).await;
    let empty = directory(vec![], vec![], vec![]);
    // Lexical escapes, from the root and from a subdirectory.
    for target in ["..", "../../etc", "a/../../etc", "./../x"] {
        let root = directory(vec![], vec![], vec![symlink("s", target)]);
        assert_invalid(fetch(&fake, &root).await, "outside the workspace");
    }
    let sub = directory(vec![], vec![], vec![symlink("s", "../../etc/passwd")]);
    let root = directory(vec![], vec![dir_node(&fake, "sub", &sub)], vec![]);
    assert_invalid(fetch(&fake, &root).await, "outside the workspace");
    // Absolute targets.
    for target in ["/etc", "/", "//etc"] {
        let root = directory(vec![], vec![], vec![symlink("s", target)]);
        assert_invalid(fetch(&fake, &root).await, "absolute");
    }
    // Chains: each link is lexically inside, but resolving `..` after a symlink escapes.
    let root = directory(
        vec![],
        vec![],
        vec![symlink("here", "."), symlink("t", "here/..")],
    );
    assert_invalid(fetch(&fake, &root).await, "outside the workspace");
    let deep = directory(vec![], vec![dir_node(&fake, "b", &empty)], vec![]);
    let root = directory(
        vec![],
        vec![dir_node(&fake, "a", &deep)],
        // `r` resolves to the root (inside); `u` goes through it and then up, although
        // `r/../etc` is lexically `etc`.
        vec![symlink("r", "a/b/../.."), symlink("u", "r/../etc")],
    );
    assert_invalid(fetch(&fake, &root).await, "outside the workspace");
    // A loop.
    let root = directory(vec![], vec![], vec![symlink("x", "y"), symlink("y", "x/z")]);
    assert_invalid(fetch(&fake, &root).await, "levels of symlinks");
    // Links that stay inside are fine, dangling ones too.
    let sub = directory(
        vec![file(&fake, "f", b"x", false)],
        vec![],
        vec![symlink("up", "..")],
    );
    let root = directory(
        vec![],
        vec![dir_node(&fake, "sub", &sub)],
        vec![
            symlink("f", "sub/f"),
            symlink("loop", "sub/up/sub/up"),
            symlink("later", "out/x"),
        ],
    );
    fetch(&fake, &root).await.unwrap();
}

#[tokio::test]
async fn a_directory_that_does_not_match_its_digest_is_refused() {
    let fake = Fake::start(0).await;
    let honest = directory(vec![file(&fake, "a", b"1", false)], vec![], vec![]);
    let evil = directory(vec![], vec![], vec![symlink("a", "/etc")]);
    let digest = fake.put_message(&honest);
    fake.lie(&digest, &evil.encode_to_vec());
    let root = directory(
        vec![],
        vec![reapi::DirectoryNode {
            name: "d".into(),
            digest: Some(digest.to_proto()),
        }],
        vec![],
    );
    let result = fetch(&fake, &root).await;
    assert_err!(result, DigestMismatch);
}

#[tokio::test]
async fn deep_nesting_and_too_many_entries_are_refused() {
    let fake = Fake::start(0).await;
    let mut current = directory(vec![], vec![], vec![]);
    for _ in 0..ActionLimits::default().max_depth + 2 {
        current = directory(vec![], vec![dir_node(&fake, "d", &current)], vec![]);
    }
    assert_invalid(fetch(&fake, &current).await, "deeper than");

    // A small tree of repeated subtrees that expands exponentially.
    let mut bomb = directory(vec![file(&fake, "f", b"x", false)], vec![], vec![]);
    for _ in 0..30 {
        bomb = directory(
            vec![],
            vec![dir_node(&fake, "a", &bomb), dir_node(&fake, "b", &bomb)],
            vec![],
        );
    }
    let digest = fake.put_message(&bomb);
    let limits = ActionLimits {
        max_input_entries: 10_000,
        ..ActionLimits::default()
    };
    let result = fetch_input_tree(&fake.client, &digest, &limits).await;
    assert_err!(result, ResourceExhausted);
}

#[tokio::test]
async fn the_input_root_is_written_with_its_modes_and_links() {
    let fake = Fake::start(4096).await;
    let large: Vec<u8> = (0..50_000).map(|i| (i % 253) as u8).collect();
    let sub = directory(
        vec![file(&fake, "big", &large, false)],
        vec![],
        vec![symlink("up", "..")],
    );
    let root = directory(
        vec![
            file(&fake, "run.sh", b"#!/bin/sh\n", true),
            file(&fake, "data", b"data", false),
        ],
        vec![dir_node(&fake, "sub", &sub)],
        vec![symlink("link", "sub/big")],
    );
    let workspace = tempfile::tempdir().unwrap();
    let digest = fake.put_message(&root);
    let tree = materialize_input_root(
        &fake.client,
        &digest,
        workspace.path(),
        &ActionLimits::default(),
    )
    .await
    .unwrap();
    assert_eq!(tree.entries(), 6);
    let path = workspace.path();
    assert_eq!(std::fs::read(path.join("sub/big")).unwrap(), large);
    assert_eq!(std::fs::read(path.join("data")).unwrap(), b"data");
    let mode = |p: &str| {
        std::fs::metadata(path.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("run.sh"), 0o755);
    assert_eq!(mode("data"), 0o644);
    assert_eq!(
        std::fs::read_link(path.join("link")).unwrap().to_str(),
        Some("sub/big")
    );
    assert_eq!(
        std::fs::read_link(path.join("sub/up")).unwrap().to_str(),
        Some("..")
    );

    // A blob that lies is an error, not a file with the wrong content.
    let root = directory(vec![file(&fake, "x", b"honest", false)], vec![], vec![]);
    fake.lie(&Digest::of(b"honest"), b"forged");
    let other = tempfile::tempdir().unwrap();
    let digest = fake.put_message(&root);
    let result = materialize_input_root(
        &fake.client,
        &digest,
        other.path(),
        &ActionLimits::default(),
    )
    .await;
    assert_err!(result, DigestMismatch);

    // A workspace that is not empty is refused.
    let result =
        materialize_input_root(&fake.client, &digest, path, &ActionLimits::default()).await;
    assert!(result.is_err());
}

#[tokio::test]
async fn working_directory_and_output_paths_are_checked() {
    let fake = Fake::start(0).await;
    let sub = directory(vec![], vec![], vec![]);
    let root = directory(
        vec![file(&fake, "f", b"x", false)],
        vec![dir_node(&fake, "sub", &sub)],
        vec![symlink("ln", "sub")],
    );
    let tree = fetch(&fake, &root).await.unwrap();
    let limits = ActionLimits::default();
    let command = |wd: &str, outputs: &[&str]| reapi::Command {
        working_directory: wd.into(),
        output_paths: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    for wd in [
        "..", "/", "/tmp", "sub/..", "./sub", "sub/", "missing", "f", "ln",
    ] {
        assert!(
            validate_command_paths(&command(wd, &[]), &tree, &limits).is_err(),
            "working directory {wd:?}"
        );
    }
    for output in [
        "..",
        "../x",
        "/etc/passwd",
        "a/../../x",
        "a/./b",
        "a//b",
        "",
        "x/",
        "x\0",
    ] {
        assert!(
            validate_command_paths(&command("sub", &[output]), &tree, &limits).is_err(),
            "output {output:?}"
        );
    }
    assert!(validate_command_paths(&command("sub", &["x", "x"]), &tree, &limits).is_err());
    let paths = validate_command_paths(&command("sub", &["out/a", "b"]), &tree, &limits).unwrap();
    assert_eq!(paths.working_directory, vec!["sub".to_string()]);
    assert_eq!(paths.outputs[0].components, vec!["sub", "out", "a"]);
    assert_eq!(paths.outputs[0].path, "out/a");
}

// --- outputs ---

async fn empty_tree(fake: &Fake) -> InputTree {
    fetch(fake, &directory(vec![], vec![], vec![]))
        .await
        .unwrap()
}

#[allow(deprecated)]
fn v2_0_command(files: &[&str], directories: &[&str]) -> reapi::Command {
    reapi::Command {
        output_files: files.iter().map(|s| s.to_string()).collect(),
        output_directories: directories.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
#[allow(deprecated)]
async fn an_output_symlink_to_a_host_file_is_recorded_not_read() {
    let fake = Fake::start(0).await;
    let tree = empty_tree(&fake).await;
    let workspace = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/etc/passwd", workspace.path().join("out")).unwrap();
    let limits = ActionLimits::default();
    let passwd = Digest::of(&std::fs::read("/etc/passwd").unwrap());
    for command in [
        v2_0_command(&["out"], &[]),
        reapi::Command {
            output_paths: vec!["out".into()],
            ..Default::default()
        },
    ] {
        let paths = validate_command_paths(&command, &tree, &limits).unwrap();
        let collected = collect_outputs(workspace.path(), &paths, &limits).unwrap();
        assert!(collected.result.output_files.is_empty());
        let symlinks: Vec<_> = collected
            .result
            .output_file_symlinks
            .iter()
            .chain(&collected.result.output_symlinks)
            .collect();
        assert_eq!(symlinks.len(), 1);
        assert_eq!(symlinks[0].target, "/etc/passwd");
        assert!(
            collected.blobs.iter().all(|(d, _)| *d != passwd),
            "/etc/passwd was read"
        );
    }
}

#[tokio::test]
async fn an_output_directory_with_symlinks_out_records_them() {
    let fake = Fake::start(0).await;
    let tree = empty_tree(&fake).await;
    let workspace = tempfile::tempdir().unwrap();
    let out = workspace.path().join("out");
    std::fs::create_dir_all(out.join("nested")).unwrap();
    std::fs::write(out.join("nested/file"), b"content").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", out.join("passwd")).unwrap();
    std::os::unix::fs::symlink("../../../../etc", out.join("nested/etc")).unwrap();
    std::os::unix::fs::symlink("/etc", out.join("etcdir")).unwrap();
    let limits = ActionLimits::default();
    let paths = validate_command_paths(&v2_0_command(&[], &["out"]), &tree, &limits).unwrap();
    let collected = collect_outputs(workspace.path(), &paths, &limits).unwrap();
    let result = upload_outputs(
        &fake.client,
        collected,
        3,
        b"hello".to_vec(),
        Vec::new(),
        &limits,
    )
    .await
    .unwrap();
    assert_eq!(result.exit_code, 3);
    assert_eq!(
        fake.get(&Digest::from_field(result.stdout_digest.as_ref(), "stdout").unwrap())
            .unwrap(),
        b"hello"
    );
    let output = &result.output_directories[0];
    let tree_blob = fake
        .get(&Digest::from_field(output.tree_digest.as_ref(), "tree").unwrap())
        .unwrap();
    let tree = reapi::Tree::decode(tree_blob.as_slice()).unwrap();
    let root = tree.root.unwrap();
    let names: Vec<(&str, &str)> = root
        .symlinks
        .iter()
        .map(|s| (s.name.as_str(), s.target.as_str()))
        .collect();
    assert_eq!(names, vec![("etcdir", "/etc"), ("passwd", "/etc/passwd")]);
    assert!(root.files.is_empty());
    assert_eq!(tree.children.len(), 1);
    let nested = &tree.children[0];
    assert_eq!(nested.symlinks[0].target, "../../../../etc");
    assert_eq!(nested.files[0].name, "file");
    // Nothing of /etc was read: only the file, the Tree and stdout/stderr were uploaded.
    assert!(fake
        .get(&Digest::of(&std::fs::read("/etc/passwd").unwrap()))
        .is_none());
    assert_eq!(fake.get(&Digest::of(b"content")).unwrap(), b"content");
}

#[tokio::test]
async fn an_output_below_a_symlink_is_refused() {
    let fake = Fake::start(0).await;
    let tree = empty_tree(&fake).await;
    let workspace = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/etc", workspace.path().join("out")).unwrap();
    let limits = ActionLimits::default();
    let command = reapi::Command {
        output_paths: vec!["out/passwd".into()],
        ..Default::default()
    };
    let paths = validate_command_paths(&command, &tree, &limits).unwrap();
    assert_invalid(
        collect_outputs(workspace.path(), &paths, &limits),
        "below a symlink",
    );
}

#[tokio::test]
async fn outputs_are_collected_with_their_executable_bit_and_bounded() {
    let fake = Fake::start(0).await;
    let tree = empty_tree(&fake).await;
    let workspace = tempfile::tempdir().unwrap();
    let tool = workspace.path().join("tool");
    std::fs::write(&tool, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(workspace.path().join("data"), vec![1u8; 2048]).unwrap();
    let command = reapi::Command {
        output_paths: vec!["tool".into(), "data".into(), "absent".into()],
        ..Default::default()
    };
    let limits = ActionLimits::default();
    let paths = validate_command_paths(&command, &tree, &limits).unwrap();
    let collected = collect_outputs(workspace.path(), &paths, &limits).unwrap();
    let files = &collected.result.output_files;
    assert_eq!(files.len(), 2);
    assert!(files[0].is_executable && files[0].path == "tool");
    assert!(!files[1].is_executable);

    let small = ActionLimits {
        max_output_bytes: 1024,
        ..ActionLimits::default()
    };
    let result = collect_outputs(workspace.path(), &paths, &small);
    assert_err!(result, ResourceExhausted);
}

#[tokio::test]
async fn many_small_files_are_fetched_batch_by_batch() {
    // A batch of 4 KiB holds about two of these files: the writer fetches many batches.
    let fake = Fake::start(4096).await;
    let content = |i: usize| vec![u8::try_from(i % 7).unwrap(); 1000];
    let mut subdirs = Vec::new();
    for d in 0..4 {
        let files = (0..8)
            .map(|i| file(&fake, &format!("f{i}"), &content(i + d), i % 2 == 0))
            .collect();
        subdirs.push(dir_node(
            &fake,
            &format!("d{d}"),
            &directory(files, vec![], vec![]),
        ));
    }
    let root = directory(
        vec![file(&fake, "top", &content(3), false)],
        subdirs,
        vec![],
    );
    let workspace = tempfile::tempdir().unwrap();
    let digest = fake.put_message(&root);
    materialize_input_root(
        &fake.client,
        &digest,
        workspace.path(),
        &ActionLimits::default(),
    )
    .await
    .unwrap();
    for d in 0..4 {
        for i in 0..8 {
            let path = workspace.path().join(format!("d{d}/f{i}"));
            assert_eq!(std::fs::read(path).unwrap(), content(i + d));
        }
    }
    assert_eq!(
        std::fs::read(workspace.path().join("top")).unwrap(),
        content(3)
    );
}

#[tokio::test]
async fn the_directory_messages_are_bounded_in_total() {
    let fake = Fake::start(0).await;
    let sub = directory(vec![file(&fake, "f", b"x", false)], vec![], vec![]);
    let root = directory(vec![], vec![dir_node(&fake, "a", &sub)], vec![]);
    let digest = fake.put_message(&root);
    let limits = ActionLimits {
        max_tree_bytes: 100,
        ..ActionLimits::default()
    };
    let result = fetch_input_tree(&fake.client, &digest, &limits).await;
    assert_err!(result, ResourceExhausted);
}

#[tokio::test]
async fn a_large_output_is_streamed_and_a_changed_one_is_not_committed() {
    let fake = Fake::start(4096).await;
    let tree = empty_tree(&fake).await;
    let workspace = tempfile::tempdir().unwrap();
    let large: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 241) as u8).collect();
    std::fs::write(workspace.path().join("big"), &large).unwrap();
    let limits = ActionLimits::default();
    let command = reapi::Command {
        output_paths: vec!["big".into()],
        ..Default::default()
    };
    let paths = validate_command_paths(&command, &tree, &limits).unwrap();
    let collected = collect_outputs(workspace.path(), &paths, &limits).unwrap();
    let result = upload_outputs(&fake.client, collected, 0, Vec::new(), Vec::new(), &limits)
        .await
        .unwrap();
    let digest = Digest::from_field(result.output_files[0].digest.as_ref(), "output").unwrap();
    assert_eq!(fake.get(&digest).unwrap(), large);

    // Changed after it was hashed: refused, and nothing is stored under the old digest.
    let changed: Vec<u8> = large.iter().map(|b| b.wrapping_add(1)).collect();
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("big"), &changed).unwrap();
    let collected = collect_outputs(other.path(), &paths, &limits).unwrap();
    let hashed =
        Digest::from_field(collected.result.output_files[0].digest.as_ref(), "output").unwrap();
    std::fs::write(other.path().join("big"), &large).unwrap();
    let result = upload_outputs(&fake.client, collected, 0, Vec::new(), Vec::new(), &limits).await;
    assert_err!(result, FailedPrecondition);
    assert!(fake.get(&hashed).is_none());

    // Replaced by a symlink to a host file after it was hashed: not followed at upload.
    let fresh: Vec<u8> = large.iter().map(|b| b.wrapping_add(2)).collect();
    std::fs::write(other.path().join("big"), &fresh).unwrap();
    let collected = collect_outputs(other.path(), &paths, &limits).unwrap();
    std::fs::remove_file(other.path().join("big")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", other.path().join("big")).unwrap();
    let result = upload_outputs(&fake.client, collected, 0, Vec::new(), Vec::new(), &limits).await;
    assert_err!(result, FailedPrecondition);
}

#[tokio::test]
async fn an_action_is_fetched_and_its_command_checked() {
    use super::inputs::fetch_action;
    let fake = Fake::start(0).await;
    let sub = directory(vec![file(&fake, "in", b"input", false)], vec![], vec![]);
    let root = fake.put_message(&directory(
        vec![],
        vec![dir_node(&fake, "src", &sub)],
        vec![],
    ));
    let env = |name: &str, value: &str| reapi::command::EnvironmentVariable {
        name: name.into(),
        value: value.into(),
    };
    let good = reapi::Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), "cp in out".into()],
        environment_variables: vec![env("PATH", "/bin")],
        output_paths: vec!["out".into()],
        working_directory: "src".into(),
        ..Default::default()
    };
    let action = |command: &reapi::Command| reapi::Action {
        command_digest: Some(fake.put_message(command).to_proto()),
        input_root_digest: Some(root.to_proto()),
        ..Default::default()
    };
    let digest = fake.put_message(&action(&good));
    let fetched = fetch_action(&fake.client, &digest, &ActionLimits::default())
        .await
        .unwrap();
    assert_eq!(fetched.paths.outputs[0].components, vec!["src", "out"]);
    assert!(fetched.input_root.is_directory(&["src".to_string()]));

    let bad_commands = [
        reapi::Command {
            arguments: vec![],
            ..good.clone()
        },
        reapi::Command {
            arguments: vec!["a\0b".into()],
            ..good.clone()
        },
        reapi::Command {
            environment_variables: vec![env("A=B", "x")],
            ..good.clone()
        },
        reapi::Command {
            environment_variables: vec![env("A", "x"), env("A", "y")],
            ..good.clone()
        },
        reapi::Command {
            working_directory: "../src".into(),
            ..good.clone()
        },
        reapi::Command {
            output_paths: vec!["../../out".into()],
            ..good.clone()
        },
    ];
    for command in bad_commands {
        let digest = fake.put_message(&action(&command));
        let result = fetch_action(&fake.client, &digest, &ActionLimits::default()).await;
        assert!(
            matches!(result, Err(RunnerError::InvalidArgument { .. })),
            "{command:?}: {result:?}"
        );
    }
    let broken = reapi::Action {
        command_digest: Some(reapi::Digest {
            hash: "../etc".into(),
            size_bytes: 3,
        }),
        input_root_digest: Some(root.to_proto()),
        ..Default::default()
    };
    let digest = fake.put_message(&broken);
    assert_invalid(
        fetch_action(&fake.client, &digest, &ActionLimits::default()).await,
        "hexadecimal",
    );
}

#[test]
fn remote_workers_types_share_the_reapi_crate_types() {
    use agent_proto::remoteworkers::v1test2 as rwapi;
    // A lease's payload is the Action digest in a `google.protobuf.Any` of the crate.
    let action = Digest::of(b"action").to_proto();
    let lease = rwapi::Lease {
        id: "lease-1".into(),
        payload: Some(bazel_remote_apis::google::protobuf::Any {
            type_url: "type.googleapis.com/build.bazel.remote.execution.v2.Digest".into(),
            value: action.encode_to_vec(),
        }),
        state: rwapi::LeaseState::Active as i32,
        status: Some(bazel_remote_apis::google::rpc::Status::default()),
        ..Default::default()
    };
    let decoded = rwapi::Lease::decode(lease.encode_to_vec().as_slice()).unwrap();
    let payload = decoded.payload.unwrap();
    assert_eq!(
        reapi::Digest::decode(payload.value.as_slice()).unwrap(),
        action
    );
    let _client: Option<rwapi::bots_client::BotsClient<tonic::transport::Channel>> = None;
}

#[tokio::test]
async fn an_output_directory_is_bounded_in_entries_and_depth() {
    let fake = Fake::start(0).await;
    let tree = empty_tree(&fake).await;
    let workspace = tempfile::tempdir().unwrap();
    let wide = workspace.path().join("wide");
    std::fs::create_dir(&wide).unwrap();
    for i in 0..50 {
        std::fs::write(wide.join(format!("f{i}")), b"x").unwrap();
    }
    let mut deep = workspace.path().join("deep");
    for _ in 0..10 {
        deep = deep.join("d");
    }
    std::fs::create_dir_all(&deep).unwrap();
    let limits = ActionLimits {
        max_output_entries: 20,
        max_depth: 8,
        ..ActionLimits::default()
    };
    let command = |path: &str| reapi::Command {
        output_paths: vec![path.into()],
        ..Default::default()
    };
    let paths = validate_command_paths(&command("wide"), &tree, &limits).unwrap();
    let result = collect_outputs(workspace.path(), &paths, &limits);
    assert_err!(result, ResourceExhausted);
    let paths = validate_command_paths(&command("deep"), &tree, &limits).unwrap();
    assert_invalid(
        collect_outputs(workspace.path(), &paths, &limits),
        "deeper than",
    );
}
