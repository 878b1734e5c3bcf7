//! SLSA provenance checked by an independent decoder: Python `cryptography`
//! and `securesystemslib` (not Kiln code) decode the DSSE envelope, rebuild
//! the PAE, verify the ed25519 signature, and check the payload type, the
//! Statement fields and that every artifact's sha256 is a subject. Tampering
//! with an artifact, the payload or the signature must fail both that
//! decoder and Kiln's verifier.
//!
//! Same convention as `python_crosscheck.rs`: runs when KILN_PYTHON names the
//! test venv's python; prints SKIPPED otherwise, except under CI=true, where
//! a missing KILN_PYTHON fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use provenance::hash::sha256_bytes;
use provenance::keyring::KeyRing;
use provenance::slsa::{ProvenanceInput, ResourceDescriptor, KILN_BUILD_TYPE};
use provenance::verify::provenance::{verify_provenance, Artifact, Policy};
use serde_json::{json, Map, Value};
use time::macros::datetime;

fn python() -> Option<PathBuf> {
    match std::env::var_os("KILN_PYTHON") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "CI=true but KILN_PYTHON is not set: the independent SLSA decoder cannot run"
                );
            }
            eprintln!(
                "SKIPPED: set KILN_PYTHON to the test venv's python to run the SLSA cross-checks"
            );
            None
        }
    }
}

/// Decodes and verifies without any Kiln code. argv: envelope, keyring.json,
/// artifact files... Prints OK or exits 1 with FAIL: reason.
const DECODER: &str = r#"
import base64, datetime, hashlib, json, sys
from cryptography.exceptions import InvalidSignature
from securesystemslib.signer import Key
from securesystemslib.dsse import Envelope

def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)

env = json.load(open(sys.argv[1]))
ring = json.load(open(sys.argv[2]))
keys = {k["keyid"]: Key.from_dict(k["keyid"], {f: k[f] for f in ("keytype", "scheme", "keyval")}) for k in ring["keys"]}
if set(env) != {"payload", "payloadType", "signatures"}:
    fail("envelope fields %r" % sorted(env))
ptype = env["payloadType"]
if ptype != "application/vnd.in-toto+json":
    fail("payloadType " + ptype)
payload = base64.b64decode(env["payload"], validate=True)
pae = b"DSSEv1 %d %s %d %s" % (len(ptype.encode()), ptype.encode(), len(payload), payload)
ok = False
for s in env["signatures"]:
    key = keys.get(s.get("keyid"))
    if key is None:
        continue
    # Raw ed25519 check over our own PAE, with cryptography.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key.keyval["public"]))
    try:
        pub.verify(base64.b64decode(s["sig"]), pae)
        ok = True
    except InvalidSignature:
        pass
if not ok:
    fail("no valid signature by a keyring key")
# securesystemslib's own DSSE implementation agrees.
try:
    Envelope.from_dict(env).verify(list(keys.values()), 1)
except Exception as e:
    fail("securesystemslib: %s" % e)
st = json.loads(payload)
if st.get("_type") != "https://in-toto.io/Statement/v1":
    fail("_type")
if st.get("predicateType") != "https://slsa.dev/provenance/v1":
    fail("predicateType")
if set(st) != {"_type", "subject", "predicateType", "predicate"}:
    fail("statement fields %r" % sorted(st))
pred = st["predicate"]
if set(pred) != {"buildDefinition", "runDetails"}:
    fail("predicate fields")
bd, rd = pred["buildDefinition"], pred["runDetails"]
if not set(bd) <= {"buildType", "externalParameters", "internalParameters", "resolvedDependencies"} or "buildType" not in bd or "externalParameters" not in bd:
    fail("buildDefinition fields %r" % sorted(bd))
if not set(rd) <= {"builder", "metadata", "byproducts"} or "id" not in rd["builder"]:
    fail("runDetails fields %r" % sorted(rd))
md = rd["metadata"]
if not set(md) <= {"invocationId", "startedOn", "finishedOn"}:
    fail("metadata fields")
start = datetime.datetime.fromisoformat(md["startedOn"])
end = datetime.datetime.fromisoformat(md["finishedOn"])
if end < start or end.utcoffset() != datetime.timedelta(0):
    fail("timestamps")
rd_fields = {"uri", "digest", "name", "downloadLocation", "mediaType", "content", "annotations"}
for d in st["subject"] + bd.get("resolvedDependencies", []) + rd.get("byproducts", []):
    if not set(d) <= rd_fields or not ({"uri", "digest", "content"} & set(d)):
        fail("ResourceDescriptor %r" % d)
subjects = {s["digest"]["sha256"]: s.get("name") for s in st["subject"]}
names = []
for a in sys.argv[3:]:
    h = hashlib.sha256(open(a, "rb").read()).hexdigest()
    if h not in subjects:
        fail("artifact %s is not a subject" % a)
    names.append(subjects[h])
print("OK " + " ".join(names) + " " + rd["builder"]["id"] + " " + md["invocationId"])
"#;

fn decode(python: &Path, env: &Path, ring: &Path, artifacts: &[&Path]) -> (bool, String) {
    let out = Command::new(python)
        .arg("-c")
        .arg(DECODER)
        .arg(env)
        .arg(ring)
        .args(artifacts)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() || stdout.starts_with("FAIL"),
        "decoder crashed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), stdout)
}

#[test]
fn slsa_envelope_decoded_independently() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A rotated ring: the current key signs; the export lists both.
    let (mut ring, _) = KeyRing::generate(&d.join("keys")).unwrap();
    ring.rotate().unwrap();
    let ring_path = d.join("ring.json");
    std::fs::write(&ring_path, ring.public().to_json_bytes()).unwrap();

    let bin = d.join("hello");
    let lib = d.join("libhello.a");
    std::fs::write(&bin, b"\x7fELF binary \xff\x00").unwrap();
    std::fs::write(&lib, b"archive").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let input = ProvenanceInput {
        subjects: vec![
            ResourceDescriptor::sha256("out/hello", sha256_bytes(&std::fs::read(&bin).unwrap())),
            ResourceDescriptor::sha256("out/libhello.a", sha256_bytes(b"archive")),
        ],
        build_type: KILN_BUILD_TYPE.into(),
        external_parameters: json!({"name": "héllo \"job\"\n", "image": "busybox",
            "steps": [{"name": "compile", "argv": ["cc", "-o", "hello"], "allow_net": []}]}),
        internal_parameters: Map::new(),
        network_destinations: vec![],
        resolved_dependencies: vec![
            ResourceDescriptor::image("busybox", Some(&sha256_bytes(b"tree"))),
            ResourceDescriptor::input("hello.c", &sha256_bytes(b"int main(){}")),
        ],
        builder_id: "kiln://ci-host".into(),
        builder_version: [("kiln".to_string(), "0.1.0".to_string())].into(),
        invocation_id: "job-42".into(),
        started_on: datetime!(2026-01-01 00:00 UTC),
        finished_on: now,
        byproducts: vec![ResourceDescriptor::step_link(
            "compile",
            "compile.0123abcd.link",
            &sha256_bytes(b"link"),
        )],
    };
    let envelope = input.sign(ring.signing_key()).unwrap();
    let env_path = d.join("prov.intoto.json");
    std::fs::write(&env_path, &envelope).unwrap();
    let trusted = ring.public().keys.clone();
    let policy = Policy::from_toml(&format!(
        "allowed_builder_ids = [\"kiln://ci-host\"]\nallowed_images = [\"sha256:{}\"]\nrequired_steps = [\"compile\"]\n",
        sha256_bytes(b"tree")
    ))
    .unwrap();
    let ours = |env: &[u8], arts: &[&Path]| {
        let arts: Vec<Artifact> = arts
            .iter()
            .map(|p| Artifact::from_path(p).unwrap())
            .collect();
        verify_provenance(env, &trusted, &arts, &policy)
    };

    // Intact: both accept.
    let (ok, msg) = decode(&python, &env_path, &ring_path, &[&bin, &lib]);
    assert!(ok, "{msg}");
    assert_eq!(msg, "OK out/hello out/libhello.a kiln://ci-host job-42");
    let v = ours(&envelope, &[&bin, &lib]);
    assert!(v.passed, "{v:?}");

    // Tampered artifact.
    let evil = d.join("hello-evil");
    std::fs::write(&evil, b"\x7fELF binarY \xff\x00").unwrap();
    let (ok, msg) = decode(&python, &env_path, &ring_path, &[&evil]);
    assert!(!ok && msg.contains("not a subject"), "{msg}");
    assert!(!ours(&envelope, &[&evil]).passed);

    // Tampered payload: the subject now names the evil file's digest.
    let mut e: Value = serde_json::from_slice(&envelope).unwrap();
    let mut st: Value =
        serde_json::from_slice(&STANDARD.decode(e["payload"].as_str().unwrap()).unwrap()).unwrap();
    st["subject"][0]["digest"]["sha256"] = sha256_bytes(&std::fs::read(&evil).unwrap()).into();
    e["payload"] = STANDARD.encode(serde_json::to_vec(&st).unwrap()).into();
    let tampered = serde_json::to_vec(&e).unwrap();
    let tp = d.join("payload-tampered.json");
    std::fs::write(&tp, &tampered).unwrap();
    let (ok, msg) = decode(&python, &tp, &ring_path, &[&evil]);
    assert!(!ok && msg.contains("signature"), "{msg}");
    let v = ours(&tampered, &[&evil]);
    assert!(!v.passed && v.reasons[0].starts_with("signature"), "{v:?}");

    // Tampered signature (one bit).
    let mut e: Value = serde_json::from_slice(&envelope).unwrap();
    let mut sig = STANDARD
        .decode(e["signatures"][0]["sig"].as_str().unwrap())
        .unwrap();
    sig[0] ^= 0x01;
    e["signatures"][0]["sig"] = STANDARD.encode(&sig).into();
    let tampered = serde_json::to_vec(&e).unwrap();
    let ts = d.join("sig-tampered.json");
    std::fs::write(&ts, &tampered).unwrap();
    let (ok, msg) = decode(&python, &ts, &ring_path, &[&bin]);
    assert!(!ok && msg.contains("signature"), "{msg}");
    assert!(!ours(&tampered, &[&bin]).passed);

    // Tampered payloadType (signature covers it through the PAE).
    let mut e: Value = serde_json::from_slice(&envelope).unwrap();
    e["payloadType"] = "application/json".into();
    let tampered = serde_json::to_vec(&e).unwrap();
    let tt = d.join("type-tampered.json");
    std::fs::write(&tt, &tampered).unwrap();
    let (ok, _) = decode(&python, &tt, &ring_path, &[&bin]);
    assert!(!ok);
    assert!(!ours(&tampered, &[&bin]).passed);
}

/// The key ring export is read by securesystemslib as key dicts, and the
/// keyids it computes itself match.
#[test]
fn keyring_export_read_by_securesystemslib() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (mut ring, _) = KeyRing::generate(&dir.path().join("keys")).unwrap();
    ring.rotate().unwrap();
    let ring_path = dir.path().join("ring.json");
    std::fs::write(&ring_path, ring.public().to_json_bytes()).unwrap();
    let pem_path = dir.path().join("current.pem");
    let current = ring.public().current_key().unwrap();
    std::fs::write(&pem_path, current.key.to_spki_pem()).unwrap();
    let out = Command::new(&python)
        .arg("-c")
        .arg(
            "import hashlib,json,sys\n\
             from securesystemslib.formats import encode_canonical\n\
             from securesystemslib.signer import SSlibKey\n\
             from cryptography.hazmat.primitives.serialization import load_pem_public_key\n\
             ring = json.load(open(sys.argv[1]))\n\
             for k in ring['keys']:\n\
             \x20   d = {f: k[f] for f in ('keytype','scheme','keyval')}\n\
             \x20   assert hashlib.sha256(encode_canonical(d).encode()).hexdigest() == k['keyid']\n\
             \x20   SSlibKey.from_dict(k['keyid'], d)\n\
             pem = SSlibKey.from_crypto(load_pem_public_key(open(sys.argv[2],'rb').read()))\n\
             assert pem.keyid == ring['current']\n\
             print(ring['current'])",
        )
        .arg(&ring_path)
        .arg(&pem_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        ring.public().current
    );
}
