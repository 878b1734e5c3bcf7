//! Cross-checks against the reference implementation (in-toto 3.1.0,
//! securesystemslib 1.x). They run only when KILN_PYTHON names a Python
//! with in-toto installed; otherwise each test prints "SKIPPED" and passes,
//! except under CI (CI=true), where a missing reference is a failure.
//!
//! Setup (once; target/ is not committed):
//!     python3.11 -m venv target/pyvenv
//!     target/pyvenv/bin/pip install in-toto==3.1.0
//! Run:
//!     KILN_PYTHON=$PWD/target/pyvenv/bin/python cargo test -p provenance --test python_crosscheck
//!
//! The end-to-end test runs, in a temporary directory,
//!     <venv>/bin/in-toto-verify --layout root.layout --verification-keys owner.pub --link-dir links
//! and expects exit 0, then exit 1 after flipping one product hash in a link
//! and after flipping one byte of a link signature. The inspection test runs
//! it with a `["true"]` inspection, cwd = an artifacts directory, intact and
//! tampered, and expects the same verdicts from Kiln's verifier.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use provenance::dsse::{sign_envelope, IN_TOTO_PAYLOAD_TYPE};
use provenance::layout::{rule, sign_layout, LayoutBuilder, Step};
use provenance::link::link_file_name;
use provenance::verify::{verify_layout, verify_layout_with_artifacts, VerifyError};
use provenance::{cjson, fnmatch, hash, KeyType, Link, PublicKey, SigningKey};
use serde_json::{json, Value};

fn python() -> Option<PathBuf> {
    match std::env::var_os("KILN_PYTHON") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            // A CI without the reference tools must not pass by skipping.
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("CI=true but KILN_PYTHON is not set: the reference cross-checks cannot run (set it to a python with in-toto==3.1.0)");
            }
            eprintln!("SKIPPED: set KILN_PYTHON to a python with in-toto==3.1.0 to run the reference cross-checks");
            None
        }
    }
}

/// Run a Python snippet with args; returns stdout bytes, panics with stderr on failure.
fn py(python: &Path, code: &str, args: &[&Path]) -> Vec<u8> {
    let out = Command::new(python)
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn tricky() -> Value {
    json!({
        "z": [1, -2, 0, 9007199254740993i64, true, false, null, ""],
        "a": {"tab": "a\tb", "nl": "l1\nl2\r\n", "ctl": "\u{1}\u{7}\u{1f}\u{7f}", "bs_n": "x\\ny",
              "quote": "say \"hi\" \\\"", "utf8": "é 日本 😀", "slash": "a/b"},
        "é": 1, "E": 2, "\u{FF21}": 3, "😀": 4, "_type": "link", "": {},
    })
}

#[test]
fn canonical_json_matches_securesystemslib() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.json");
    std::fs::write(&p, serde_json::to_vec(&tricky()).unwrap()).unwrap();
    let theirs = py(
        &python,
        "import json,sys\nfrom securesystemslib.formats import encode_canonical\n\
         sys.stdout.buffer.write(encode_canonical(json.load(open(sys.argv[1], encoding='utf-8'))).encode('utf-8'))",
        &[&p],
    );
    assert_eq!(
        String::from_utf8(cjson::to_canonical(&tricky()).unwrap()).unwrap(),
        String::from_utf8(theirs).unwrap()
    );
}

#[test]
fn keyid_and_key_formats_match_in_toto() {
    let Some(python) = python() else { return };
    for key_type in KeyType::ALL {
        keyid_and_key_formats_match_in_toto_for(&python, key_type);
    }
}

fn keyid_and_key_formats_match_in_toto_for(python: &Path, key_type: KeyType) {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate_of(key_type);
    let pubp = dir.path().join("k.pub");
    let privp = dir.path().join("k.pem");
    std::fs::write(&pubp, key.public_key().to_spki_pem()).unwrap();
    std::fs::write(&privp, key.to_pkcs8_pem()).unwrap();
    // The exact loader in-toto-verify uses for --verification-keys.
    let out = py(
        python,
        "import json,sys\nfrom in_toto.models._signer import load_public_key_from_file\n\
         print(json.dumps(load_public_key_from_file(sys.argv[1]), sort_keys=True))",
        &[&pubp],
    );
    let theirs: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(theirs, key.public_key().to_securesystemslib());
    assert_eq!(theirs["keyid"], key.keyid());
    // securesystemslib's signer API loads the PKCS#8 private key and derives the same key.
    let out = py(
        python,
        "import sys\nfrom cryptography.hazmat.primitives.serialization import load_pem_private_key\n\
         from securesystemslib.signer import CryptoSigner\n\
         s = CryptoSigner(load_pem_private_key(open(sys.argv[1],'rb').read(), None))\n\
         print(s.public_key.keyid)",
        &[&privp],
    );
    assert_eq!(String::from_utf8(out).unwrap().trim(), key.keyid());
}

/// The other direction: a P-256 key and a DSSE signature made by
/// securesystemslib's CryptoSigner (DER ECDSA over SHA-256) are read and
/// verified by Kiln, under the keyid securesystemslib gives.
#[test]
fn securesystemslib_p256_signatures_verify_in_kiln() {
    let Some(python) = python() else { return };
    let out = py(
        &python,
        "import json\nfrom cryptography.hazmat.primitives.asymmetric import ec\n\
         from securesystemslib.signer import CryptoSigner\nfrom securesystemslib.dsse import Envelope\n\
         s = CryptoSigner(ec.generate_private_key(ec.SECP256R1()))\n\
         e = Envelope(payload=b'{\"a\":1}', payload_type='application/vnd.in-toto+json', signatures={})\n\
         e.sign(s)\n\
         print(json.dumps({'key': s.public_key.to_dict() | {'keyid': s.public_key.keyid}, 'env': e.to_dict()}))",
        &[],
    );
    let v: Value = serde_json::from_slice(&out).unwrap();
    let key = PublicKey::from_securesystemslib(&v["key"]).unwrap();
    assert_eq!(key.key_type(), KeyType::EcdsaP256);
    assert_eq!(key.keyid(), v["key"]["keyid"].as_str().unwrap());
    let verified = provenance::dsse::verify_envelope(&v["env"], &[key]).unwrap();
    assert_eq!(verified.payload, br#"{"a":1}"#);
    let other = SigningKey::generate_of(KeyType::EcdsaP256).public_key();
    assert!(provenance::dsse::verify_envelope(&v["env"], &[other]).is_err());
}

fn tricky_link() -> Link {
    Link {
        name: "compile".into(),
        command: vec!["sh".into(), "-c".into(), "echo \"é\"\t> out".into()],
        materials: [
            ("src/hello.c".to_string(), hash::sha256_bytes(b"c")),
            (
                "dir with space/日本.txt".to_string(),
                hash::sha256_bytes(b"j"),
            ),
        ]
        .into(),
        products: [("hello".to_string(), hash::sha256_bytes(b"bin"))].into(),
        byproducts: json!({"return-value": 0, "stdout": "line\n\ttab \u{1} \\n \"q\" é", "stderr": ""}),
        environment: json!({"image": "sha256:ab", "runner": "kiln 0.1.0"}),
    }
}

#[test]
fn link_and_dsse_verify_with_securesystemslib() {
    let Some(python) = python() else { return };
    for key_type in KeyType::ALL {
        link_and_dsse_verify_with_securesystemslib_for(&python, key_type);
    }
}

fn link_and_dsse_verify_with_securesystemslib_for(python: &Path, key_type: KeyType) {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate_of(key_type);
    let linkp = dir.path().join("compile.link");
    let keyp = dir.path().join("key.json");
    let envp = dir.path().join("env.json");
    std::fs::write(&linkp, tricky_link().sign(&key).unwrap()).unwrap();
    std::fs::write(
        &keyp,
        serde_json::to_vec(&key.public_key().to_securesystemslib()).unwrap(),
    )
    .unwrap();
    let env = sign_envelope(IN_TOTO_PAYLOAD_TYPE, b"{\"_type\":\"link\"}\n\x01", &key);
    std::fs::write(&envp, serde_json::to_vec(&env).unwrap()).unwrap();
    let out = py(
        python,
        "import json,sys\nfrom in_toto.models.metadata import Metadata\n\
         from securesystemslib.signer import Key\nfrom securesystemslib.dsse import Envelope\n\
         k = json.load(open(sys.argv[2]))\n\
         m = Metadata.load(sys.argv[1]); m.verify_signature(k)\n\
         e = Envelope.from_dict(json.load(open(sys.argv[3])))\n\
         e.verify([Key.from_dict(k['keyid'], dict(k))], 1)\n\
         print(m.get_payload().name, e.payload_type)",
        &[&linkp, &keyp, &envp],
    );
    assert_eq!(
        String::from_utf8(out).unwrap().trim(),
        format!("compile {IN_TOTO_PAYLOAD_TYPE}")
    );
}

#[test]
fn fnmatch_matches_python() {
    let Some(python) = python() else { return };
    let patterns = [
        "*",
        "*.c",
        "src/*",
        "a?c",
        "[ab]*",
        "[!ab]*",
        "[a-c]x",
        "[]]",
        "[!]]",
        "[a-]",
        "[",
        "[a",
        "[z-a]",
        "[!]",
        "[\\]",
        "*[*]",
        "[--a]",
        "[a-b-c]",
        "dir with space/*",
        "日*",
        "**/x",
        "[!a-c]?",
    ];
    let names = [
        "",
        "a",
        "b",
        "abc",
        "ac",
        "x.c",
        "src/x.c",
        "srcx",
        "]",
        "-",
        "[",
        "[a",
        "m",
        "\\",
        "*",
        "bx",
        "cx",
        "ax",
        "dx",
        "dir with space/日本.txt",
        "日本",
        "q/x",
        "x",
        "[!]",
        "!",
        "ab",
        "dd",
    ];
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cases.json");
    std::fs::write(
        &p,
        serde_json::to_vec(&json!({"p": patterns, "n": names})).unwrap(),
    )
    .unwrap();
    let out = py(
        &python,
        "import json,sys,fnmatch\nc = json.load(open(sys.argv[1], encoding='utf-8'))\n\
         print(json.dumps([[fnmatch.fnmatch(n, p) for n in c['n']] for p in c['p']]))",
        &[&p],
    );
    let theirs: Vec<Vec<bool>> = serde_json::from_slice(&out).unwrap();
    for (i, pat) in patterns.iter().enumerate() {
        for (j, name) in names.iter().enumerate() {
            assert_eq!(
                fnmatch::fnmatch(pat, name),
                theirs[i][j],
                "pattern {pat:?} name {name:?}"
            );
        }
    }
}

fn in_toto_verify(python: &Path, dir: &Path) -> std::process::Output {
    let bin = python.parent().unwrap().join("in-toto-verify");
    Command::new(bin)
        .args([
            "--layout",
            "root.layout",
            "--verification-keys",
            "owner.pub",
            "--link-dir",
            "links",
        ])
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn in_toto_verify_end_to_end() {
    let Some(python) = python() else { return };
    end_to_end(&python, KeyType::Ed25519, KeyType::Ed25519);
}

/// The same with a P-256 runner key and a P-256 layout owner key, and mixed.
#[test]
fn in_toto_verify_end_to_end_with_p256_keys() {
    let Some(python) = python() else { return };
    end_to_end(&python, KeyType::EcdsaP256, KeyType::EcdsaP256);
    end_to_end(&python, KeyType::Ed25519, KeyType::EcdsaP256);
}

fn end_to_end(python: &Path, owner_type: KeyType, runner_type: KeyType) {
    let python = python.to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let links = dir.path().join("links");
    std::fs::create_dir(&links).unwrap();
    let owner = SigningKey::generate_of(owner_type);
    let runner = SigningKey::generate_of(runner_type);
    let rk = runner.public_key();
    let layout = LayoutBuilder::new(time::OffsetDateTime::now_utc() + time::Duration::days(30))
        .readme("kiln cross-check")
        .step(
            Step::new("fetch")
                .expected_command(["fetch"])
                .pubkey(&rk)
                .material_rule(&rule("DISALLOW *"))
                .product_rule(&rule("CREATE src/*"))
                .product_rule(&["CREATE", "dir with space/*"])
                .product_rule(&rule("DISALLOW *")),
        )
        .step(
            Step::new("compile")
                .expected_command(["sh", "-c", "echo \"é\"\t> out"])
                .pubkey(&rk)
                .material_rule(&["MATCH", "*", "WITH", "PRODUCTS", "FROM", "fetch"])
                .material_rule(&rule("DISALLOW *"))
                .product_rule(&["MATCH", "*", "WITH", "MATERIALS", "FROM", "compile"])
                .product_rule(&rule("CREATE hello"))
                .product_rule(&rule("DISALLOW *")),
        )
        .build()
        .unwrap();
    std::fs::write(
        dir.path().join("root.layout"),
        sign_layout(&layout, &owner).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("owner.pub"),
        owner.public_key().to_spki_pem(),
    )
    .unwrap();
    let compile = tricky_link();
    let fetch = Link {
        name: "fetch".into(),
        command: vec!["fetch".into()],
        materials: Default::default(),
        products: compile.materials.clone(),
        byproducts: json!({}),
        environment: json!({}),
    };
    let compile_file = links.join(link_file_name("compile", &runner.keyid()));
    std::fs::write(
        links.join(link_file_name("fetch", &runner.keyid())),
        fetch.sign(&runner).unwrap(),
    )
    .unwrap();
    std::fs::write(&compile_file, compile.sign(&runner).unwrap()).unwrap();

    let out = in_toto_verify(&python, dir.path());
    assert!(
        out.status.success(),
        "in-toto-verify rejected Kiln metadata:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Kiln's own verifier agrees.
    let layout_bytes = std::fs::read(dir.path().join("root.layout")).unwrap();
    verify_layout(
        &layout_bytes,
        &[owner.public_key()],
        &links,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();

    // Tamper one hex digit of a product hash.
    let good = std::fs::read(&compile_file).unwrap();
    let mut v: Value = serde_json::from_slice(&good).unwrap();
    let d = v["signed"]["products"]["hello"]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let flipped = format!("{}{}", if d.starts_with('0') { '1' } else { '0' }, &d[1..]);
    v["signed"]["products"]["hello"]["sha256"] = flipped.into();
    std::fs::write(&compile_file, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let out = in_toto_verify(&python, dir.path());
    assert!(
        !out.status.success(),
        "in-toto-verify accepted a tampered product hash"
    );
    // Rejected for the signature, not for some setup problem.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ThresholdVerificationError"), "{err}");
    assert!(verify_layout(
        &layout_bytes,
        &[owner.public_key()],
        &links,
        time::OffsetDateTime::now_utc()
    )
    .is_err());

    // Tamper one byte of the signature (in its middle: inside the DER of an ECDSA
    // signature's integers, not its framing).
    let mut v: Value = serde_json::from_slice(&good).unwrap();
    let s = v["signatures"][0]["sig"].as_str().unwrap().to_owned();
    let mid = s.len() / 2;
    let digit = if &s[mid..=mid] == "0" { "1" } else { "0" };
    let flipped = format!("{}{digit}{}", &s[..mid], &s[mid + 1..]);
    v["signatures"][0]["sig"] = flipped.into();
    std::fs::write(&compile_file, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let out = in_toto_verify(&python, dir.path());
    assert!(
        !out.status.success(),
        "in-toto-verify accepted a tampered signature"
    );
    // Rejected for the signature, not for some setup problem.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ThresholdVerificationError"), "{err}");
    assert!(verify_layout(
        &layout_bytes,
        &[owner.public_key()],
        &links,
        time::OffsetDateTime::now_utc()
    )
    .is_err());

    // Restored, it passes again (the tampering, not the setup, caused the failures).
    std::fs::write(&compile_file, &good).unwrap();
    assert!(in_toto_verify(&python, dir.path()).status.success());

    // A DSSE-enveloped link (payloadType application/vnd.in-toto+json) is accepted too.
    let env = sign_envelope(
        IN_TOTO_PAYLOAD_TYPE,
        &serde_json::to_vec(&fetch.to_signed()).unwrap(),
        &runner,
    );
    std::fs::write(
        links.join(link_file_name("fetch", &runner.keyid())),
        serde_json::to_vec(&env).unwrap(),
    )
    .unwrap();
    let out = in_toto_verify(&python, dir.path());
    assert!(
        out.status.success(),
        "in-toto-verify rejected a Kiln DSSE link:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    verify_layout(
        &layout_bytes,
        &[owner.public_key()],
        &links,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
}

/// in-toto-verify with absolute metadata paths, run in `cwd` (the directory
/// its inspections record).
fn in_toto_verify_in(python: &Path, meta: &Path, cwd: &Path) -> std::process::Output {
    let bin = python.parent().unwrap().join("in-toto-verify");
    Command::new(bin)
        .arg("--layout")
        .arg(meta.join("root.layout"))
        .arg("--verification-keys")
        .arg(meta.join("owner.pub"))
        .arg("--link-dir")
        .arg(meta.join("links"))
        .current_dir(cwd)
        .output()
        .unwrap()
}

/// A directory of files in-toto's inspection recording treats specially.
fn write_recording_tree(root: &Path) {
    for (p, c) in [
        ("hello", "bin"),
        ("src/hello.c", "c"),
        ("dir with space/日本.txt", "j"),
        // Excluded by in-toto's default patterns, some only as a directory.
        ("junk~", "x"),
        ("z.pyc", "x"),
        ("a.linkage", "x"),
        ("sub/.git/config", "x"),
        ("d.pyc/inner", "x"),
        (".gitignore", "kept"),
        ("X.LINK", "kept: case-sensitive"),
    ] {
        let f = root.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, c).unwrap();
    }
    std::fs::create_dir_all(root.join("alias")).unwrap();
    std::os::unix::fs::symlink("../hello", root.join("alias/hello")).unwrap();
    std::os::unix::fs::symlink("src/hello.c", root.join("c-link")).unwrap();
}

#[test]
fn inspection_recording_matches_in_toto() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    write_recording_tree(dir.path());
    // Exactly what run_all_inspections records for a cwd.
    let out = py(
        &python,
        "import json,os,sys\nimport in_toto.runlib as r\nos.chdir(sys.argv[1])\n\
         print(json.dumps(r.record_artifacts_as_dict(['.'], follow_symlink_dirs=True)))",
        &[dir.path()],
    );
    let theirs: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> =
        serde_json::from_slice(&out).unwrap();
    let ours: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> =
        hash::hash_tree_as_in_toto(dir.path())
            .unwrap()
            .into_iter()
            .map(|(p, d)| (p, [("sha256".to_string(), d)].into()))
            .collect();
    assert_eq!(ours, theirs);
}

#[test]
fn in_toto_verify_noop_inspection() {
    let Some(python) = python() else { return };
    let meta = tempfile::tempdir().unwrap();
    let links = meta.path().join("links");
    std::fs::create_dir(&links).unwrap();
    let owner = SigningKey::generate();
    let runner = SigningKey::generate();
    let rk = runner.public_key();
    let mut layout = LayoutBuilder::new(time::OffsetDateTime::now_utc() + time::Duration::days(30))
        .step(Step::new("fetch").expected_command(["fetch"]).pubkey(&rk))
        .step(
            Step::new("compile")
                .expected_command(["sh", "-c", "echo \"é\"\t> out"])
                .pubkey(&rk),
        )
        .build()
        .unwrap();
    // "check" ties the downloaded files to the links, with prefixes and a
    // symlink; "check-again" MATCHes against the first inspection.
    layout["inspect"] = json!([
        {"_type": "inspection", "name": "check", "run": ["true"],
         "expected_materials": [["MATCH", "*", "WITH", "PRODUCTS", "FROM", "fetch"],
                                ["MATCH", "hello", "WITH", "PRODUCTS", "FROM", "compile"],
                                ["MATCH", "hello", "IN", "alias", "WITH", "PRODUCTS", "FROM", "compile"],
                                ["ALLOW", "c-link"], ["ALLOW", ".gitignore"], ["ALLOW", "X.LINK"],
                                ["DISALLOW", "*"]],
         "expected_products": [["MATCH", "*", "WITH", "MATERIALS", "FROM", "check"],
                               ["DISALLOW", "*"]]},
        {"_type": "inspection", "name": "check-again", "run": ["true"],
         "expected_materials": [],
         "expected_products": [["MATCH", "*", "WITH", "PRODUCTS", "FROM", "check"],
                               ["DISALLOW", "*"]]},
    ]);
    let layout_bytes = sign_layout(&layout, &owner).unwrap();
    std::fs::write(meta.path().join("root.layout"), &layout_bytes).unwrap();
    std::fs::write(
        meta.path().join("owner.pub"),
        owner.public_key().to_spki_pem(),
    )
    .unwrap();
    let compile = tricky_link();
    let fetch = Link {
        name: "fetch".into(),
        command: vec!["fetch".into()],
        materials: Default::default(),
        products: compile.materials.clone(),
        byproducts: json!({}),
        environment: json!({}),
    };
    for l in [&fetch, &compile] {
        std::fs::write(
            links.join(link_file_name(&l.name, &runner.keyid())),
            l.sign(&runner).unwrap(),
        )
        .unwrap();
    }
    let ours = |art: &Path| {
        verify_layout_with_artifacts(
            &layout_bytes,
            &[owner.public_key()],
            &links,
            Some(art),
            time::OffsetDateTime::now_utc(),
        )
    };

    // Intact: both pass. in-toto-verify writes check.link and
    // check-again.link into its cwd; the *.link* exclude hides them from both.
    let art = tempfile::tempdir().unwrap();
    write_recording_tree(art.path());
    let out = in_toto_verify_in(&python, meta.path(), art.path());
    assert!(
        out.status.success(),
        "in-toto-verify rejected intact artifacts:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(art.path().join("check.link").exists());
    let r = ours(art.path()).unwrap();
    assert_eq!(r.inspections.len(), 2);
    // Run again after in-toto's link files appeared: still passing.
    assert!(in_toto_verify_in(&python, meta.path(), art.path())
        .status
        .success());

    // Tampered: a flipped byte, an extra file, a flipped byte deeper down.
    type Tamper = fn(&Path);
    let tampers: [(&str, Tamper); 3] = [
        ("flipped byte", |d| {
            std::fs::write(d.join("hello"), "bim").unwrap()
        }),
        ("extra file", |d| {
            std::fs::write(d.join("extra"), "x").unwrap()
        }),
        ("nested flipped byte", |d| {
            std::fs::write(d.join("dir with space/日本.txt"), "k").unwrap()
        }),
    ];
    for (what, tamper) in tampers {
        let art = tempfile::tempdir().unwrap();
        write_recording_tree(art.path());
        tamper(art.path());
        let out = in_toto_verify_in(&python, meta.path(), art.path());
        assert!(!out.status.success(), "in-toto-verify accepted: {what}");
        // Rejected by an inspection rule, not by some setup problem.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("RuleVerificationError"), "{what}: {err}");
        let e = ours(art.path()).unwrap_err();
        assert!(
            matches!(e, VerifyError::InspectionRule { .. }),
            "{what}: {e}"
        );
    }
}

/// Two linked steps whose second MATCHes its materials against the first's
/// products under the prefix `dir`; `name` is the one artifact under `dir`.
/// Returns the directory to run in-toto-verify in, and Kiln's verdict.
fn prefixed_match_chain(name: &str) -> (tempfile::TempDir, Result<(), String>) {
    let dir = tempfile::tempdir().unwrap();
    let links = dir.path().join("links");
    std::fs::create_dir(&links).unwrap();
    let owner = SigningKey::generate();
    let runner = SigningKey::generate();
    let rk = runner.public_key();
    let layout = LayoutBuilder::new(time::OffsetDateTime::now_utc() + time::Duration::days(30))
        .step(
            Step::new("fetch")
                .pubkey(&rk)
                .product_rule(&rule("CREATE *"))
                .product_rule(&rule("DISALLOW *")),
        )
        .step(
            Step::new("build")
                .pubkey(&rk)
                .material_rule(&[
                    "MATCH", "*", "IN", "dir", "WITH", "PRODUCTS", "IN", "dir", "FROM", "fetch",
                ])
                .material_rule(&rule("DISALLOW *")),
        )
        .build()
        .unwrap();
    std::fs::write(
        dir.path().join("root.layout"),
        sign_layout(&layout, &owner).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("owner.pub"),
        owner.public_key().to_spki_pem(),
    )
    .unwrap();
    let artifacts: std::collections::BTreeMap<String, String> =
        [(format!("dir/{name}"), hash::sha256_bytes(b"x"))].into();
    for (step, materials, products) in [
        ("fetch", Default::default(), artifacts.clone()),
        ("build", artifacts.clone(), Default::default()),
    ] {
        let link = Link {
            name: step.into(),
            command: vec![],
            materials,
            products,
            byproducts: json!({}),
            environment: json!({}),
        };
        std::fs::write(
            links.join(link_file_name(step, &runner.keyid())),
            link.sign(&runner).unwrap(),
        )
        .unwrap();
    }
    let layout_bytes = std::fs::read(dir.path().join("root.layout")).unwrap();
    let kiln = verify_layout(
        &layout_bytes,
        &[owner.public_key()],
        &links,
        time::OffsetDateTime::now_utc(),
    )
    .map(|_| ())
    .map_err(|e| e.to_string());
    (dir, kiln)
}

/// in-toto 3.1 rewrites '\' to '/' when it joins a rule's prefix, so a
/// product named `back\slash` under a prefixed MATCH makes in-toto-verify
/// fail. Kiln's verifier must not pass it either, and Kiln never records
/// such a name in the first place.
#[test]
fn backslash_names_never_verify_differently() {
    // Kiln's recording refuses the name, naming the file.
    let tree = tempfile::tempdir().unwrap();
    std::fs::create_dir(tree.path().join("dir")).unwrap();
    std::fs::write(tree.path().join("dir/back\\slash"), b"x").unwrap();
    let err = hash::hash_tree(tree.path()).unwrap_err().to_string();
    assert!(err.contains("dir/back\\slash"), "{err}");
    assert!(err.contains("backslash"), "{err}");

    let Some(python) = python() else { return };
    // The same chain with a plain name passes both verifiers: the setup is sound.
    let (dir, kiln) = prefixed_match_chain("back_slash");
    let out = in_toto_verify(&python, dir.path());
    assert!(
        out.status.success(),
        "in-toto-verify rejected the plain chain:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    kiln.unwrap();

    let (dir, kiln) = prefixed_match_chain("back\\slash");
    let out = in_toto_verify(&python, dir.path());
    assert!(
        !out.status.success(),
        "in-toto-verify accepted a backslash name"
    );
    let err = kiln.expect_err("Kiln's verifier accepted what in-toto-verify rejects");
    assert!(err.contains("backslash"), "{err}");
}
