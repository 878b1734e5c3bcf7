//! Verifier tests: every rule type (pass and fail), signatures, expiry,
//! thresholds, missing links and unsupported features.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use provenance::dsse::{sign_envelope, IN_TOTO_PAYLOAD_TYPE};
use provenance::layout::{rule, sign_layout, LayoutBuilder, Step};
use provenance::link::{link_file_name, sign_metablock};
use provenance::verify::{
    check_artifacts, verify_layout, verify_layout_with_artifacts, VerifyError, VerifyReport,
};
use provenance::{hash, KeyType, Link, SigningKey};
use serde_json::{json, Value};
use time::macros::datetime;
use time::OffsetDateTime;

const NOW: OffsetDateTime = datetime!(2026-06-01 12:00 UTC);
const EXPIRES: OffsetDateTime = datetime!(2030-01-01 0:00 UTC);

fn h(s: &str) -> String {
    hash::sha256_bytes(s.as_bytes())
}

fn arts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(p, c)| (p.to_string(), h(c))).collect()
}

fn link(name: &str, cmd: &[&str], materials: &[(&str, &str)], products: &[(&str, &str)]) -> Link {
    Link {
        name: name.into(),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        materials: arts(materials),
        products: arts(products),
        byproducts: json!({"return-value": 0, "stdout": "ok\n", "stderr": ""}),
        environment: json!({"image": "sha256:00"}),
    }
}

fn write_link(dir: &Path, l: &Link, key: &SigningKey) {
    std::fs::write(
        dir.join(link_file_name(&l.name, &key.keyid())),
        l.sign(key).unwrap(),
    )
    .unwrap();
}

struct Fixture {
    owner: SigningKey,
    func: SigningKey,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Self::of(KeyType::Ed25519, KeyType::Ed25519)
    }

    fn of(owner: KeyType, functionary: KeyType) -> Self {
        Fixture {
            owner: SigningKey::generate_of(owner),
            func: SigningKey::generate_of(functionary),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn verify(&self, layout: &Value) -> Result<VerifyReport, VerifyError> {
        let signed = sign_layout(layout, &self.owner).unwrap();
        verify_layout(&signed, &[self.owner.public_key()], self.dir.path(), NOW)
    }

    /// fetch creates hello.c; compile turns it into hello.
    fn two_step_layout(&self) -> Value {
        let k = self.func.public_key();
        LayoutBuilder::new(EXPIRES)
            .step(
                Step::new("fetch")
                    .expected_command(["fetch"])
                    .pubkey(&k)
                    .material_rule(&rule("DISALLOW *"))
                    .product_rule(&rule("CREATE hello.c"))
                    .product_rule(&rule("DISALLOW *")),
            )
            .step(
                Step::new("compile")
                    .expected_command(["cc", "-o", "hello", "hello.c"])
                    .pubkey(&k)
                    .material_rule(&rule("MATCH hello.c WITH PRODUCTS FROM fetch"))
                    .material_rule(&rule("DISALLOW *"))
                    .product_rule(&rule("MATCH hello.c WITH PRODUCTS FROM fetch"))
                    .product_rule(&rule("CREATE hello"))
                    .product_rule(&rule("DISALLOW *")),
            )
            .build()
            .unwrap()
    }

    fn write_two_step_links(&self) {
        write_link(
            self.dir.path(),
            &link("fetch", &["fetch"], &[], &[("hello.c", "src")]),
            &self.func,
        );
        write_link(
            self.dir.path(),
            &link(
                "compile",
                &["cc", "-o", "hello", "hello.c"],
                &[("hello.c", "src")],
                &[("hello.c", "src"), ("hello", "bin")],
            ),
            &self.func,
        );
    }
}

#[test]
fn two_step_passes() {
    let f = Fixture::new();
    f.write_two_step_links();
    let r = f.verify(&f.two_step_layout()).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(r.steps.len(), 2);
    assert_eq!(r.final_step().unwrap().name, "compile");
    assert_eq!(
        r.final_step().unwrap().products["hello"]["sha256"],
        h("bin")
    );
    assert_eq!(r.steps[0].functionaries, vec![f.func.keyid()]);
    assert_eq!(r.layout_keyids, vec![f.owner.keyid()]);
}

#[test]
fn command_mismatch_is_a_warning() {
    let f = Fixture::new();
    f.write_two_step_links();
    write_link(
        f.dir.path(),
        &link("fetch", &["curl", "x"], &[], &[("hello.c", "src")]),
        &f.func,
    );
    let r = f.verify(&f.two_step_layout()).unwrap();
    assert_eq!(r.warnings.len(), 1);
    assert!(r.warnings[0].contains("curl"), "{:?}", r.warnings);
}

#[test]
fn expired_layout() {
    let f = Fixture::new();
    f.write_two_step_links();
    let signed = sign_layout(&f.two_step_layout(), &f.owner).unwrap();
    let e = verify_layout(
        &signed,
        &[f.owner.public_key()],
        f.dir.path(),
        datetime!(2030-01-01 0:00 UTC),
    )
    .unwrap_err();
    assert!(matches!(e, VerifyError::LayoutExpired { .. }), "{e}");
}

#[test]
fn layout_signature_wrong_key_or_tampered() {
    let f = Fixture::new();
    f.write_two_step_links();
    let layout = f.two_step_layout();
    let signed = sign_layout(&layout, &f.owner).unwrap();
    let e = verify_layout(&signed, &[f.func.public_key()], f.dir.path(), NOW).unwrap_err();
    assert!(matches!(e, VerifyError::LayoutSignature(_)), "{e}");
    // Every given key must have signed, as in in-toto-verify.
    let e = verify_layout(
        &signed,
        &[f.owner.public_key(), f.func.public_key()],
        f.dir.path(),
        NOW,
    )
    .unwrap_err();
    assert!(matches!(e, VerifyError::LayoutSignature(_)), "{e}");
    let e = verify_layout(&signed, &[], f.dir.path(), NOW).unwrap_err();
    assert!(matches!(e, VerifyError::LayoutSignature(_)), "{e}");

    let mut v: Value = serde_json::from_slice(&signed).unwrap();
    v["signed"]["readme"] = "changed".into();
    let e = verify_layout(
        &serde_json::to_vec(&v).unwrap(),
        &[f.owner.public_key()],
        f.dir.path(),
        NOW,
    )
    .unwrap_err();
    assert!(matches!(e, VerifyError::LayoutSignature(_)), "{e}");
}

#[test]
fn tampered_link_is_rejected_naming_the_file() {
    let f = Fixture::new();
    f.write_two_step_links();
    let name = link_file_name("compile", &f.func.keyid());
    let p = f.dir.path().join(&name);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["signed"]["products"]["hello"]["sha256"] = json!(h("evil"));
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = f.verify(&f.two_step_layout()).unwrap_err();
    match &e {
        VerifyError::Threshold {
            step,
            found: 0,
            rejected,
            ..
        } => {
            assert_eq!(step, "compile");
            assert!(rejected[0].contains(&name), "{e}");
        }
        _ => panic!("{e}"),
    }
}

#[test]
fn link_signed_by_unauthorized_key_is_rejected() {
    let f = Fixture::new();
    f.write_two_step_links();
    let intruder = SigningKey::generate();
    // Signed by another key but stored under the authorized file name.
    let l = link("fetch", &["fetch"], &[], &[("hello.c", "src")]);
    std::fs::write(
        f.dir.path().join(link_file_name("fetch", &f.func.keyid())),
        l.sign(&intruder).unwrap(),
    )
    .unwrap();
    let e = f.verify(&f.two_step_layout()).unwrap_err();
    assert!(
        matches!(&e, VerifyError::Threshold { step, .. } if step == "fetch"),
        "{e}"
    );
    assert!(e.to_string().contains("no signature by key"), "{e}");
}

#[test]
fn missing_link() {
    let f = Fixture::new();
    f.write_two_step_links();
    std::fs::remove_file(
        f.dir
            .path()
            .join(link_file_name("compile", &f.func.keyid())),
    )
    .unwrap();
    let e = f.verify(&f.two_step_layout()).unwrap_err();
    assert!(
        matches!(&e, VerifyError::LinkNotFound { step, found: 0, .. } if step == "compile"),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains(&link_file_name("compile", &f.func.keyid())),
        "{e}"
    );
}

#[test]
fn link_name_must_match_step() {
    let f = Fixture::new();
    f.write_two_step_links();
    let l = link("compile", &["fetch"], &[], &[("hello.c", "src")]);
    std::fs::write(
        f.dir.path().join(link_file_name("fetch", &f.func.keyid())),
        l.sign(&f.func).unwrap(),
    )
    .unwrap();
    let e = f.verify(&f.two_step_layout()).unwrap_err();
    assert!(matches!(e, VerifyError::LinkName { .. }), "{e}");
}

#[test]
fn threshold_two_functionaries() {
    let f = Fixture::new();
    let a = SigningKey::generate();
    let b = SigningKey::generate();
    let layout = LayoutBuilder::new(EXPIRES)
        .step(
            Step::new("build")
                .pubkey(&a.public_key())
                .pubkey(&b.public_key())
                .threshold(2)
                .product_rule(&rule("ALLOW *")),
        )
        .build()
        .unwrap();
    let l = link("build", &[], &[], &[("out", "1")]);
    write_link(f.dir.path(), &l, &a);
    // One of two: the preliminary file count already fails.
    let e = f.verify(&layout).unwrap_err();
    assert!(
        matches!(
            e,
            VerifyError::LinkNotFound {
                found: 1,
                required: 2,
                ..
            }
        ),
        "{e}"
    );

    // Two files, one signed by the wrong key: only one valid link.
    std::fs::write(
        f.dir.path().join(link_file_name("build", &b.keyid())),
        l.sign(&a).unwrap(),
    )
    .unwrap();
    let e = f.verify(&layout).unwrap_err();
    assert!(
        matches!(
            e,
            VerifyError::Threshold {
                found: 1,
                required: 2,
                ..
            }
        ),
        "{e}"
    );

    write_link(f.dir.path(), &l, &b);
    let r = f.verify(&layout).unwrap();
    assert_eq!(r.steps[0].functionaries.len(), 2);

    // Both valid but disagreeing on products.
    write_link(f.dir.path(), &link("build", &[], &[], &[("out", "2")]), &b);
    let e = f.verify(&layout).unwrap_err();
    assert!(matches!(e, VerifyError::ThresholdArtifacts { .. }), "{e}");
}

#[test]
fn dsse_link_is_accepted() {
    let f = Fixture::new();
    f.write_two_step_links();
    let l = link("fetch", &["fetch"], &[], &[("hello.c", "src")]);
    let env = sign_envelope(
        IN_TOTO_PAYLOAD_TYPE,
        &serde_json::to_vec(&l.to_signed()).unwrap(),
        &f.func,
    );
    std::fs::write(
        f.dir.path().join(link_file_name("fetch", &f.func.keyid())),
        serde_json::to_vec(&env).unwrap(),
    )
    .unwrap();
    f.verify(&f.two_step_layout()).unwrap();
}

#[test]
fn p256_layout_and_functionary_keys_verify_and_tampering_fails() {
    for (owner, functionary) in [
        (KeyType::EcdsaP256, KeyType::EcdsaP256),
        (KeyType::Ed25519, KeyType::EcdsaP256),
        (KeyType::EcdsaP256, KeyType::Ed25519),
    ] {
        let f = Fixture::of(owner, functionary);
        f.write_two_step_links();
        let layout = f.two_step_layout();
        assert_eq!(
            layout["keys"][f.func.keyid()]["keytype"],
            if functionary == KeyType::EcdsaP256 {
                "ecdsa"
            } else {
                "ed25519"
            }
        );
        let r = f.verify(&layout).unwrap();
        assert_eq!(r.steps[1].functionaries, vec![f.func.keyid()]);
        assert_eq!(r.layout_keyids, vec![f.owner.keyid()]);

        // The compile link as a DSSE envelope: accepted, and refused once its payload
        // changes under the signature.
        let l = link(
            "compile",
            &["cc", "-o", "hello", "hello.c"],
            &[("hello.c", "src")],
            &[("hello.c", "src"), ("hello", "bin")],
        );
        let path = f
            .dir
            .path()
            .join(link_file_name("compile", &f.func.keyid()));
        let payload = serde_json::to_vec(&l.to_signed()).unwrap();
        let env = sign_envelope(IN_TOTO_PAYLOAD_TYPE, &payload, &f.func);
        std::fs::write(&path, serde_json::to_vec(&env).unwrap()).unwrap();
        f.verify(&layout).unwrap();
        let mut forged = l.clone();
        forged.products.insert("hello".into(), h("evil"));
        let mut tampered = env.clone();
        tampered["payload"] = json!(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            serde_json::to_vec(&forged.to_signed()).unwrap()
        ));
        std::fs::write(&path, serde_json::to_vec(&tampered).unwrap()).unwrap();
        let e = f.verify(&layout).unwrap_err();
        assert!(
            matches!(&e, VerifyError::Threshold { step, found: 0, .. } if step == "compile"),
            "{e}"
        );
        // A layout signed by another P-256 key is refused.
        let stranger = SigningKey::generate_of(KeyType::EcdsaP256);
        let signed = sign_layout(&layout, &stranger).unwrap();
        let e = verify_layout(&signed, &[f.owner.public_key()], f.dir.path(), NOW).unwrap_err();
        assert!(matches!(e, VerifyError::LayoutSignature(_)), "{e}");
    }
}

// ---- artifact rules, one step at a time ----

/// Verify a single step "s" with the given artifacts and rules; `prev` is an
/// optional earlier step "prev" whose products MATCH rules can refer to.
fn rules(
    materials: &[(&str, &str)],
    products: &[(&str, &str)],
    mrules: &[&str],
    prules: &[&str],
    prev: Option<&[(&str, &str)]>,
) -> Result<VerifyReport, VerifyError> {
    let f = Fixture::new();
    let k = f.func.public_key();
    let mut b = LayoutBuilder::new(EXPIRES);
    if let Some(pp) = prev {
        b = b.step(Step::new("prev").pubkey(&k));
        write_link(f.dir.path(), &link("prev", &[], &[], pp), &f.func);
    }
    let mut s = Step::new("s").pubkey(&k);
    for r in mrules {
        s = s.material_rule(&rule(r));
    }
    for r in prules {
        s = s.product_rule(&rule(r));
    }
    write_link(f.dir.path(), &link("s", &[], materials, products), &f.func);
    f.verify(&b.step(s).build().unwrap())
}

fn rule_err(r: Result<VerifyReport, VerifyError>) -> (String, usize, String) {
    match r {
        Err(VerifyError::Rule {
            kind, index, rule, ..
        }) => (kind.to_string(), index, rule),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("rules passed unexpectedly"),
    }
}

#[test]
fn create_rule() {
    rules(
        &[],
        &[("new", "x")],
        &[],
        &["CREATE new", "DISALLOW *"],
        None,
    )
    .unwrap();
    // Existed before: not created, so not consumed.
    let e = rule_err(rules(
        &[("new", "x")],
        &[("new", "y")],
        &[],
        &["CREATE new", "DISALLOW *"],
        None,
    ));
    assert_eq!(e, ("products".into(), 2, "DISALLOW *".into()));
}

#[test]
fn modify_rule() {
    rules(
        &[("f", "a")],
        &[("f", "b")],
        &[],
        &["MODIFY f", "DISALLOW *"],
        None,
    )
    .unwrap();
    let e = rule_err(rules(
        &[("f", "a")],
        &[("f", "a")],
        &[],
        &["MODIFY f", "DISALLOW *"],
        None,
    ));
    assert_eq!(e.1, 2);
}

#[test]
fn delete_rule() {
    rules(
        &[("gone", "a")],
        &[],
        &["DELETE gone", "DISALLOW *"],
        &[],
        None,
    )
    .unwrap();
    let e = rule_err(rules(
        &[("gone", "a")],
        &[("gone", "a")],
        &["DELETE gone", "DISALLOW *"],
        &[],
        None,
    ));
    assert_eq!(e, ("materials".into(), 2, "DISALLOW *".into()));
}

#[test]
fn allow_and_disallow_rules() {
    rules(
        &[],
        &[("a.o", "1"), ("b.o", "2")],
        &[],
        &["ALLOW *.o", "DISALLOW *"],
        None,
    )
    .unwrap();
    let r = rules(
        &[],
        &[("a.o", "1"), ("evil.sh", "2")],
        &[],
        &["ALLOW *.o", "DISALLOW *"],
        None,
    );
    let Err(e) = r else { panic!("passed") };
    let msg = e.to_string();
    assert!(
        msg.contains("evil.sh") && msg.contains("'s'") && msg.contains("DISALLOW *"),
        "{msg}"
    );
    // No rules at all: everything is implicitly allowed, as in in-toto.
    rules(&[("x", "1")], &[("y", "2")], &[], &[], None).unwrap();
}

#[test]
fn require_rule() {
    rules(&[], &[("hello", "1")], &[], &["REQUIRE hello"], None).unwrap();
    let e = rule_err(rules(&[], &[("other", "1")], &[], &["REQUIRE hello"], None));
    assert_eq!(e.1, 1);
    // Consumed by an earlier rule: no longer in the queue.
    let e = rule_err(rules(
        &[],
        &[("hello", "1")],
        &[],
        &["ALLOW *", "REQUIRE hello"],
        None,
    ));
    assert_eq!(e.1, 2);
    // REQUIRE takes a literal name, not a pattern.
    assert!(rules(&[], &[("hello", "1")], &[], &["REQUIRE hell*"], None).is_err());
}

#[test]
fn match_rule() {
    let prev: &[(&str, &str)] = &[("src/a.c", "A"), ("src/b.c", "B")];
    rules(
        &[("src/a.c", "A"), ("src/b.c", "B")],
        &[],
        &["MATCH * WITH PRODUCTS FROM prev", "DISALLOW *"],
        &[],
        Some(prev),
    )
    .unwrap();
    // A material whose hash differs from prev's product is not consumed.
    let e = rule_err(rules(
        &[("src/a.c", "A"), ("src/b.c", "tampered")],
        &[],
        &["MATCH * WITH PRODUCTS FROM prev", "DISALLOW *"],
        &[],
        Some(prev),
    ));
    assert_eq!(e, ("materials".into(), 2, "DISALLOW *".into()));
    // Source prefix: materials "src/x" match prev products "x"... via IN on both sides.
    rules(
        &[("build/a.c", "A")],
        &[],
        &[
            "MATCH *.c IN build WITH PRODUCTS IN src FROM prev",
            "DISALLOW *",
        ],
        &[],
        Some(prev),
    )
    .unwrap();
    rules(
        &[("a.c", "A")],
        &[],
        &["MATCH a.c WITH PRODUCTS IN src FROM prev", "DISALLOW *"],
        &[],
        Some(prev),
    )
    .unwrap();
    rules(
        &[("src/a.c", "A")],
        &[],
        &[
            "MATCH a.c IN src/ WITH PRODUCTS IN src FROM prev",
            "DISALLOW *",
        ],
        &[],
        Some(prev),
    )
    .unwrap();
    // Pattern is applied after stripping the source prefix.
    assert!(rules(
        &[("src/a.c", "A")],
        &[],
        &[
            "MATCH src/* IN src WITH PRODUCTS IN src FROM prev",
            "DISALLOW *"
        ],
        &[],
        Some(prev)
    )
    .is_err());
    // Missing destination artifact.
    assert!(rules(
        &[("src/c.c", "C")],
        &[],
        &["MATCH * WITH PRODUCTS FROM prev", "DISALLOW *"],
        &[],
        Some(prev)
    )
    .is_err());
    // MATCH against materials of the destination (prev has none).
    assert!(rules(
        &[("src/a.c", "A")],
        &[],
        &["MATCH * WITH MATERIALS FROM prev", "DISALLOW *"],
        &[],
        Some(prev)
    )
    .is_err());
    // A step without a link consumes nothing.
    assert!(rules(
        &[("src/a.c", "A")],
        &[],
        &["MATCH * WITH PRODUCTS FROM nosuchstep", "DISALLOW *"],
        &[],
        Some(prev)
    )
    .is_err());
}

#[test]
fn rules_apply_in_order_on_a_queue() {
    // DISALLOW before ALLOW fails; the same rules the other way round pass.
    assert!(rules(&[], &[("a", "1")], &[], &["DISALLOW a", "ALLOW a"], None).is_err());
    rules(&[], &[("a", "1")], &[], &["ALLOW a", "DISALLOW a"], None).unwrap();
    // A DISALLOW with a narrower pattern ignores other leftovers.
    rules(&[], &[("a", "1"), ("b", "2")], &[], &["DISALLOW a*"], None).unwrap_err();
    rules(&[], &[("b", "2")], &[], &["DISALLOW a*"], None).unwrap();
}

// ---- unsupported features and malformed metadata ----

fn expect_unsupported(layout: Value, what: &str) {
    let f = Fixture::new();
    f.write_two_step_links();
    let e = f.verify(&layout).unwrap_err();
    assert!(matches!(e, VerifyError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains(what), "{e}");
}

#[test]
fn unsupported_features_are_errors() {
    let f = Fixture::new();
    let base = f.two_step_layout();

    let mut l = base.clone();
    l["inspect"] = json!([{"_type": "inspection", "name": "i", "run": ["make", "check"], "expected_materials": [], "expected_products": []}]);
    expect_unsupported(l, "never runs commands");

    let mut l = base.clone();
    let id = f.func.keyid();
    l["keys"][&id]["keytype"] = "rsa".into();
    l["keys"][&id]["scheme"] = "rsassa-pss-sha256".into();
    expect_unsupported(l, "rsa");

    let mut l = base.clone();
    l["steps"][0]["expected_products"] = json!([["SIGN", "*"]]);
    expect_unsupported(l, "unsupported artifact rule type");

    let mut l = base.clone();
    l["steps"][0]["new_feature"] = json!(1);
    expect_unsupported(l, "new_feature");

    let mut l = base;
    l["keys"][&id]["keyid_hash_algorithms"] = json!(["sha256", "sha512"]);
    // Extra key fields are harmless (same keyid), matching securesystemslib 1.x.
    let f2 = Fixture {
        owner: f.owner.clone(),
        func: f.func.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    f2.write_two_step_links();
    f2.verify(&l).unwrap();
}

#[test]
fn sublayout_link_is_unsupported() {
    let f = Fixture::new();
    f.write_two_step_links();
    let sub = LayoutBuilder::new(EXPIRES).build().unwrap();
    std::fs::write(
        f.dir.path().join(link_file_name("fetch", &f.func.keyid())),
        sign_metablock(&sub, &f.func).unwrap(),
    )
    .unwrap();
    let e = f.verify(&f.two_step_layout()).unwrap_err();
    assert!(
        matches!(e, VerifyError::Unsupported { .. }) && e.to_string().contains("sublayouts"),
        "{e}"
    );
}

#[test]
fn malformed_link_environment_null() {
    let f = Fixture::new();
    f.write_two_step_links();
    let mut signed = link("fetch", &["fetch"], &[], &[("hello.c", "src")]).to_signed();
    signed["environment"] = Value::Null;
    std::fs::write(
        f.dir.path().join(link_file_name("fetch", &f.func.keyid())),
        sign_metablock(&signed, &f.func).unwrap(),
    )
    .unwrap();
    let e = f.verify(&f.two_step_layout()).unwrap_err();
    assert!(
        matches!(e, VerifyError::Format { .. }) && e.to_string().contains("environment"),
        "{e}"
    );
}

// ---- check_artifacts ----

#[test]
fn artifacts_check() {
    let f = Fixture::new();
    f.write_two_step_links();
    let r = f.verify(&f.two_step_layout()).unwrap();
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("hello"), "bin").unwrap();
    std::fs::write(out.path().join("README"), "extra").unwrap();
    let c = check_artifacts(&r, out.path()).unwrap();
    assert_eq!(c.step, "compile");
    assert_eq!(c.checked, vec!["hello"]);
    assert_eq!(c.missing, vec!["hello.c"]);
    assert_eq!(c.unrecorded, vec!["README"]);

    std::fs::write(out.path().join("hello"), "bin!").unwrap();
    let e = check_artifacts(&r, out.path()).unwrap_err();
    assert!(
        matches!(&e, VerifyError::Artifact { path, .. } if path == "hello"),
        "{e}"
    );

    let empty = tempfile::tempdir().unwrap();
    assert!(check_artifacts(&r, empty.path()).is_err());
}

// ---- inspections (no-op only, evaluated against an artifacts directory) ----

fn inspection(name: &str, run: &[&str], materials: &[&[&str]], products: &[&[&str]]) -> Value {
    json!({"_type": "inspection", "name": name, "run": run,
           "expected_materials": materials, "expected_products": products})
}

/// The two-step layout plus "check-hello" (hello must be compile's product,
/// nothing else may be there) and "check-again", which MATCHes everything
/// against the first inspection's recording.
fn inspection_layout(f: &Fixture, run: &[&str]) -> Value {
    let mut l = f.two_step_layout();
    l["inspect"] = json!([
        inspection(
            "check-hello",
            run,
            &[&["ALLOW", "*"]],
            &[
                &["MATCH", "hello", "WITH", "PRODUCTS", "FROM", "compile"],
                &["DISALLOW", "*"],
            ],
        ),
        inspection(
            "check-again",
            &["/usr/bin/true"],
            &[
                &["MATCH", "*", "WITH", "PRODUCTS", "FROM", "check-hello"],
                &["DISALLOW", "*"],
            ],
            &[],
        ),
    ]);
    l
}

fn verify_with(
    f: &Fixture,
    layout: &Value,
    dir: Option<&Path>,
) -> Result<VerifyReport, VerifyError> {
    let signed = sign_layout(layout, &f.owner).unwrap();
    verify_layout_with_artifacts(&signed, &[f.owner.public_key()], f.dir.path(), dir, NOW)
}

/// hello as compile produced it, plus files in-toto's default excludes hide.
fn artifacts_dir() -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("hello"), "bin").unwrap();
    std::fs::write(out.path().join("check-hello.link"), "{}").unwrap();
    std::fs::write(out.path().join("hello~"), "backup").unwrap();
    std::fs::create_dir_all(out.path().join("sub/.git")).unwrap();
    std::fs::write(out.path().join("sub/.git/config"), "x").unwrap();
    out
}

#[test]
fn noop_inspection_passes_with_matching_artifacts() {
    let f = Fixture::new();
    f.write_two_step_links();
    let out = artifacts_dir();
    let r = verify_with(&f, &inspection_layout(&f, &["true"]), Some(out.path())).unwrap();
    assert_eq!(r.inspections.len(), 2);
    assert_eq!(r.inspections[0].name, "check-hello");
    assert_eq!(r.inspections[0].run, vec!["true"]);
    let paths: Vec<&str> = r.inspections[0]
        .artifacts
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(paths, ["hello"]);
    assert_eq!(r.inspections[0].artifacts["hello"]["sha256"], h("bin"));
    // The other no-op spellings are accepted too.
    verify_with(&f, &inspection_layout(&f, &["/bin/true"]), Some(out.path())).unwrap();
    // Steps are reported as before.
    assert_eq!(r.steps.len(), 2);
}

#[test]
fn noop_inspection_fails_on_a_flipped_byte() {
    let f = Fixture::new();
    f.write_two_step_links();
    let out = artifacts_dir();
    std::fs::write(out.path().join("hello"), "bim").unwrap();
    let e = verify_with(&f, &inspection_layout(&f, &["true"]), Some(out.path())).unwrap_err();
    // MATCH leaves the tampered file in the queue; DISALLOW catches it.
    match &e {
        VerifyError::InspectionRule {
            inspection,
            kind,
            index,
            rule,
            detail,
        } => {
            assert_eq!(
                (inspection.as_str(), *kind, *index, rule.as_str()),
                ("check-hello", "products", 2, "DISALLOW *")
            );
            assert!(detail.contains("\"hello\""), "{e}");
        }
        _ => panic!("unexpected error {e}"),
    }
    // An extra file is caught the same way.
    let out = artifacts_dir();
    std::fs::write(out.path().join("extra"), "x").unwrap();
    let e = verify_with(&f, &inspection_layout(&f, &["true"]), Some(out.path())).unwrap_err();
    assert!(e.to_string().contains("extra"), "{e}");
}

#[test]
fn inspection_with_another_command_is_unsupported() {
    let f = Fixture::new();
    f.write_two_step_links();
    let out = artifacts_dir();
    for run in [
        &["sh", "-c", "true"][..],
        &["true", "x"],
        &["./true"],
        &["false"],
        &[],
    ] {
        let e = verify_with(&f, &inspection_layout(&f, run), Some(out.path())).unwrap_err();
        assert!(matches!(e, VerifyError::Unsupported { .. }), "{run:?}: {e}");
        assert!(e.to_string().contains("never runs commands"), "{e}");
    }
}

#[test]
fn inspection_without_artifacts_dir_is_an_error() {
    let f = Fixture::new();
    f.write_two_step_links();
    let layout = inspection_layout(&f, &["true"]);
    let e = verify_with(&f, &layout, None).unwrap_err();
    assert!(
        matches!(&e, VerifyError::ArtifactsDirRequired { inspections } if inspections.len() == 2),
        "{e}"
    );
    assert!(e.to_string().contains("--artifacts"), "{e}");
    // verify_layout is the same with no directory.
    let e = f.verify(&layout).unwrap_err();
    assert!(matches!(e, VerifyError::ArtifactsDirRequired { .. }), "{e}");
    // Without inspections a directory is not needed, and not used.
    let r = verify_with(&f, &f.two_step_layout(), Some(Path::new("/nonexistent"))).unwrap();
    assert!(r.inspections.is_empty());
}

#[test]
fn inspection_name_must_not_repeat_a_step() {
    let f = Fixture::new();
    f.write_two_step_links();
    let mut l = f.two_step_layout();
    l["inspect"] = json!([inspection("compile", &["true"], &[], &[])]);
    let out = artifacts_dir();
    let e = verify_with(&f, &l, Some(out.path())).unwrap_err();
    assert!(matches!(e, VerifyError::Format { .. }), "{e}");
}

#[test]
fn inspection_symlinks() {
    let f = Fixture::new();
    f.write_two_step_links();
    let mut l = f.two_step_layout();
    l["inspect"] = json!([inspection(
        "check",
        &["true"],
        &[],
        &[
            &["MATCH", "hello", "WITH", "PRODUCTS", "FROM", "compile"],
            &["MATCH", "hello", "IN", "alias", "WITH", "PRODUCTS", "FROM", "compile"],
            &["DISALLOW", "*"],
        ],
    )]);
    // A symlink to a file inside the directory is recorded with the file's
    // content, as in-toto does.
    let out = artifacts_dir();
    std::fs::create_dir(out.path().join("alias")).unwrap();
    std::os::unix::fs::symlink("../hello", out.path().join("alias/hello")).unwrap();
    let r = verify_with(&f, &l, Some(out.path())).unwrap();
    assert_eq!(
        r.inspections[0].artifacts["alias/hello"]["sha256"],
        h("bin")
    );

    // One pointing outside is refused, even to identical content.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(elsewhere.path().join("hello"), "bin").unwrap();
    std::fs::remove_file(out.path().join("alias/hello")).unwrap();
    std::os::unix::fs::symlink(
        elsewhere.path().join("hello"),
        out.path().join("alias/hello"),
    )
    .unwrap();
    let e = verify_with(&f, &l, Some(out.path())).unwrap_err();
    assert!(e.to_string().contains("outside"), "{e}");

    // Dangling: in-toto skips it; Kiln refuses.
    std::fs::remove_file(out.path().join("alias/hello")).unwrap();
    std::os::unix::fs::symlink("nowhere", out.path().join("alias/hello")).unwrap();
    let e = verify_with(&f, &l, Some(out.path())).unwrap_err();
    assert!(e.to_string().contains("cannot be resolved"), "{e}");
}
