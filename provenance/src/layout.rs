//! Writing in-toto v0.9 layouts (used by `kiln demo` and tests) and parsing
//! artifact rules (shared with the verifier).

use std::collections::BTreeMap;

use serde_json::{json, Value};
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

use crate::keys::{PublicKey, SigningKey};
use crate::link::sign_metablock;
use crate::ProvenanceError;

pub mod job;

/// Which artifact set of a link a rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactKind {
    Materials,
    Products,
}

impl ArtifactKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Materials => "materials",
            ArtifactKind::Products => "products",
        }
    }
}

/// One artifact rule, as in in-toto's `rulelib.unpack_rule`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// `MATCH <pattern> [IN <src-prefix>] WITH (MATERIALS|PRODUCTS) [IN <dst-prefix>] FROM <step>`
    Match {
        pattern: String,
        source_prefix: String,
        dest_kind: ArtifactKind,
        dest_prefix: String,
        dest_step: String,
    },
    Create(String),
    Modify(String),
    Delete(String),
    Allow(String),
    Disallow(String),
    /// `REQUIRE <file>`: a literal path, not a pattern.
    Require(String),
}

impl Rule {
    /// Parse a rule list like `["MATCH","*","WITH","PRODUCTS","FROM","compile"]`.
    /// Keywords are case-insensitive, as in in-toto. An unknown rule type is an
    /// "unsupported" error rather than being skipped.
    pub fn parse<S: AsRef<str>>(rule: &[S]) -> Result<Rule, String> {
        let r: Vec<&str> = rule.iter().map(AsRef::as_ref).collect();
        let show = || format!("{r:?}");
        if r.len() < 2 {
            return Err(format!("rule {} needs a type and a pattern", show()));
        }
        let kw = |i: usize| r[i].to_ascii_lowercase();
        let pattern = r[1].to_owned();
        let ty = kw(0);
        let generic = |f: fn(String) -> Rule| {
            if r.len() == 2 {
                Ok(f(pattern.clone()))
            } else {
                Err(format!("rule {} must have exactly 2 elements", show()))
            }
        };
        match ty.as_str() {
            "create" => generic(Rule::Create),
            "modify" => generic(Rule::Modify),
            "delete" => generic(Rule::Delete),
            "allow" => generic(Rule::Allow),
            "disallow" => generic(Rule::Disallow),
            "require" => generic(Rule::Require),
            "match" => {
                let (src, dtype, dst, step) = match r.len() {
                    10 if kw(2) == "in" && kw(4) == "with" && kw(6) == "in" && kw(8) == "from" => {
                        (r[3], kw(5), r[7], r[9])
                    }
                    8 if kw(2) == "in" && kw(4) == "with" && kw(6) == "from" => (r[3], kw(5), "", r[7]),
                    8 if kw(2) == "with" && kw(4) == "in" && kw(6) == "from" => ("", kw(3), r[5], r[7]),
                    6 if kw(2) == "with" && kw(4) == "from" => ("", kw(3), "", r[5]),
                    _ => {
                        return Err(format!(
                            "rule {} is not MATCH <pattern> [IN <prefix>] WITH (MATERIALS|PRODUCTS) [IN <prefix>] FROM <step>",
                            show()
                        ))
                    }
                };
                let dest_kind = match dtype.as_str() {
                    "materials" => ArtifactKind::Materials,
                    "products" => ArtifactKind::Products,
                    _ => {
                        return Err(format!(
                            "rule {}: destination must be MATERIALS or PRODUCTS",
                            show()
                        ))
                    }
                };
                Ok(Rule::Match {
                    pattern,
                    source_prefix: src.to_owned(),
                    dest_kind,
                    dest_prefix: dst.to_owned(),
                    dest_step: step.to_owned(),
                })
            }
            _ => Err(format!(
                "unsupported artifact rule type {:?} in {}",
                r[0],
                show()
            )),
        }
    }

    /// The rule as a layout list (canonical upper-case keywords).
    pub fn to_list(&self) -> Vec<String> {
        let v = |a: &str, p: &str| vec![a.to_owned(), p.to_owned()];
        match self {
            Rule::Create(p) => v("CREATE", p),
            Rule::Modify(p) => v("MODIFY", p),
            Rule::Delete(p) => v("DELETE", p),
            Rule::Allow(p) => v("ALLOW", p),
            Rule::Disallow(p) => v("DISALLOW", p),
            Rule::Require(p) => v("REQUIRE", p),
            Rule::Match {
                pattern,
                source_prefix,
                dest_kind,
                dest_prefix,
                dest_step,
            } => {
                let mut out = vec!["MATCH".to_owned(), pattern.clone()];
                if !source_prefix.is_empty() {
                    out.extend(["IN".to_owned(), source_prefix.clone()]);
                }
                out.extend(["WITH".to_owned(), dest_kind.as_str().to_ascii_uppercase()]);
                if !dest_prefix.is_empty() {
                    out.extend(["IN".to_owned(), dest_prefix.clone()]);
                }
                out.extend(["FROM".to_owned(), dest_step.clone()]);
                out
            }
        }
    }
}

/// Split a rule written as one string on whitespace ("MATCH * WITH PRODUCTS FROM build").
pub fn rule(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

/// `YYYY-MM-DDTHH:MM:SSZ` in UTC, the only form in-toto accepts.
pub fn format_expires(t: OffsetDateTime) -> String {
    let fmt = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    t.to_offset(UtcOffset::UTC).format(&fmt).unwrap_or_default()
}

/// Parse in-toto's `YYYY-MM-DDTHH:MM:SSZ`; anything else is an error.
pub fn parse_expires(s: &str) -> Result<OffsetDateTime, String> {
    let fmt = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    PrimitiveDateTime::parse(s, &fmt)
        .map(PrimitiveDateTime::assume_utc)
        .map_err(|e| format!("expires {s:?} is not YYYY-MM-DDTHH:MM:SSZ: {e}"))
}

/// One step of a layout.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub expected_command: Vec<String>,
    pub pubkeys: Vec<PublicKey>,
    pub threshold: u32,
    pub expected_materials: Vec<Vec<String>>,
    pub expected_products: Vec<Vec<String>>,
}

impl Step {
    pub fn new(name: impl Into<String>) -> Self {
        Step {
            name: name.into(),
            expected_command: Vec::new(),
            pubkeys: Vec::new(),
            threshold: 1,
            expected_materials: Vec::new(),
            expected_products: Vec::new(),
        }
    }

    pub fn expected_command<I, S>(mut self, cmd: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.expected_command = cmd.into_iter().map(Into::into).collect();
        self
    }

    /// Authorise a functionary key for this step (added to the layout's keys).
    pub fn pubkey(mut self, key: &PublicKey) -> Self {
        self.pubkeys.push(*key);
        self
    }

    pub fn threshold(mut self, n: u32) -> Self {
        self.threshold = n;
        self
    }

    /// Append a material rule, e.g. `&["MATCH","*","WITH","PRODUCTS","FROM","fetch"]`.
    pub fn material_rule<S: AsRef<str>>(mut self, rule: &[S]) -> Self {
        self.expected_materials
            .push(rule.iter().map(|s| s.as_ref().to_owned()).collect());
        self
    }

    /// Append a product rule, e.g. `&["CREATE","hello"]`.
    pub fn product_rule<S: AsRef<str>>(mut self, rule: &[S]) -> Self {
        self.expected_products
            .push(rule.iter().map(|s| s.as_ref().to_owned()).collect());
        self
    }
}

/// One inspection of a layout: a command in-toto-verify runs in its cwd, whose
/// recorded cwd (before and after) its rules check.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub name: String,
    pub run: Vec<String>,
    pub expected_materials: Vec<Vec<String>>,
    pub expected_products: Vec<Vec<String>>,
}

impl Inspection {
    pub fn new<I, S>(name: impl Into<String>, run: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Inspection {
            name: name.into(),
            run: run.into_iter().map(Into::into).collect(),
            expected_materials: Vec::new(),
            expected_products: Vec::new(),
        }
    }

    /// Append a material rule (the recorded cwd before the command).
    pub fn material_rule<S: AsRef<str>>(mut self, rule: &[S]) -> Self {
        self.expected_materials
            .push(rule.iter().map(|s| s.as_ref().to_owned()).collect());
        self
    }

    /// Append a product rule (the recorded cwd after the command).
    pub fn product_rule<S: AsRef<str>>(mut self, rule: &[S]) -> Self {
        self.expected_products
            .push(rule.iter().map(|s| s.as_ref().to_owned()).collect());
        self
    }
}

/// Builds the `signed` object of an in-toto v0.9 layout.
#[derive(Debug, Clone)]
pub struct LayoutBuilder {
    expires: String,
    readme: String,
    keys: BTreeMap<String, PublicKey>,
    steps: Vec<Step>,
    inspections: Vec<Inspection>,
}

impl LayoutBuilder {
    pub fn new(expires: OffsetDateTime) -> Self {
        LayoutBuilder {
            expires: format_expires(expires),
            readme: String::new(),
            keys: BTreeMap::new(),
            steps: Vec::new(),
            inspections: Vec::new(),
        }
    }

    /// Expiry as an already formatted `YYYY-MM-DDTHH:MM:SSZ` string (checked in `build`).
    pub fn expires_str(mut self, expires: impl Into<String>) -> Self {
        self.expires = expires.into();
        self
    }

    pub fn readme(mut self, readme: impl Into<String>) -> Self {
        self.readme = readme.into();
        self
    }

    /// Add a functionary key that no step names (steps add theirs themselves).
    pub fn key(mut self, key: &PublicKey) -> Self {
        self.keys.insert(key.keyid(), *key);
        self
    }

    pub fn step(mut self, step: Step) -> Self {
        for k in &step.pubkeys {
            self.keys.insert(k.keyid(), *k);
        }
        self.steps.push(step);
        self
    }

    /// Add an inspection (run by in-toto-verify after all steps' rules).
    pub fn inspection(mut self, inspection: Inspection) -> Self {
        self.inspections.push(inspection);
        self
    }

    /// The layout's `signed` object. Every field of in-toto's Layout, Step and
    /// Inspection models is present (in-toto fills in missing ones before
    /// checking the signature, which would break it). Steps and inspections
    /// share one namespace of names, as in in-toto.
    pub fn build(&self) -> Result<Value, ProvenanceError> {
        parse_expires(&self.expires).map_err(ProvenanceError::Format)?;
        let mut names = std::collections::BTreeSet::new();
        let mut steps = Vec::new();
        for s in &self.steps {
            if s.name.is_empty() || !names.insert(s.name.as_str()) {
                return Err(ProvenanceError::Format(format!(
                    "step name {:?} is empty or repeated",
                    s.name
                )));
            }
            if s.threshold < 1 {
                return Err(ProvenanceError::Format(format!(
                    "step {:?}: threshold must be >= 1",
                    s.name
                )));
            }
            for r in s.expected_materials.iter().chain(&s.expected_products) {
                Rule::parse(r)
                    .map_err(|e| ProvenanceError::Format(format!("step {:?}: {e}", s.name)))?;
            }
            let pubkeys: Vec<String> = s.pubkeys.iter().map(PublicKey::keyid).collect();
            steps.push(json!({
                "_type": "step",
                "name": s.name,
                "expected_command": s.expected_command,
                "pubkeys": pubkeys,
                "threshold": s.threshold,
                "expected_materials": s.expected_materials,
                "expected_products": s.expected_products,
            }));
        }
        let mut inspect = Vec::new();
        for i in &self.inspections {
            if i.name.is_empty() || !names.insert(i.name.as_str()) {
                return Err(ProvenanceError::Format(format!(
                    "inspection name {:?} is empty or repeats a step or inspection",
                    i.name
                )));
            }
            for r in i.expected_materials.iter().chain(&i.expected_products) {
                Rule::parse(r).map_err(|e| {
                    ProvenanceError::Format(format!("inspection {:?}: {e}", i.name))
                })?;
            }
            inspect.push(json!({
                "_type": "inspection",
                "name": i.name,
                "run": i.run,
                "expected_materials": i.expected_materials,
                "expected_products": i.expected_products,
            }));
        }
        let keys: serde_json::Map<String, Value> = self
            .keys
            .iter()
            .map(|(id, k)| (id.clone(), k.to_securesystemslib()))
            .collect();
        Ok(json!({
            "_type": "layout",
            "expires": self.expires,
            "readme": self.readme,
            "keys": keys,
            "steps": steps,
            "inspect": inspect,
        }))
    }
}

/// Sign a layout `signed` object with the owner's key; returns the file bytes.
pub fn sign_layout(layout: &Value, owner_key: &SigningKey) -> Result<Vec<u8>, ProvenanceError> {
    sign_metablock(layout, owner_key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rules_parse_and_roundtrip() {
        for s in [
            "MATCH * WITH PRODUCTS FROM compile",
            "MATCH *.c IN src WITH MATERIALS FROM fetch",
            "MATCH * WITH PRODUCTS IN out FROM build",
            "MATCH * IN a WITH PRODUCTS IN b FROM build",
            "CREATE hello",
            "MODIFY *",
            "DELETE tmp/*",
            "ALLOW *",
            "DISALLOW *",
            "REQUIRE hello",
        ] {
            let r = Rule::parse(&rule(s)).unwrap();
            assert_eq!(r.to_list().join(" "), s);
        }
        assert!(matches!(
            Rule::parse(&rule("match * with products from x")).unwrap(),
            Rule::Match {
                dest_kind: ArtifactKind::Products,
                ..
            }
        ));
        let e = Rule::parse(&rule("SIGN *")).unwrap_err();
        assert!(e.contains("unsupported"), "{e}");
        assert!(Rule::parse(&rule("CREATE")).is_err());
        assert!(Rule::parse(&rule("CREATE a b")).is_err());
        assert!(Rule::parse(&rule("MATCH * WITH STUFF FROM x")).is_err());
        assert!(Rule::parse(&rule("MATCH * FROM x")).is_err());
    }

    #[test]
    fn expires_format() {
        let t = time::macros::datetime!(2030-01-02 03:04:05 +02:00);
        assert_eq!(format_expires(t), "2030-01-02T01:04:05Z");
        assert_eq!(parse_expires("2030-01-02T01:04:05Z").unwrap(), t);
        assert!(parse_expires("2030-01-02T01:04:05+00:00").is_err());
        assert!(parse_expires("2030-01-02 01:04:05Z").is_err());
    }

    #[test]
    fn build_layout() {
        let k = SigningKey::generate().public_key();
        let l = LayoutBuilder::new(time::macros::datetime!(2030-01-01 0:00 UTC))
            .readme("demo")
            .step(
                Step::new("build")
                    .expected_command(["make"])
                    .pubkey(&k)
                    .product_rule(&["CREATE", "hello"])
                    .product_rule(&["DISALLOW", "*"]),
            )
            .build()
            .unwrap();
        assert_eq!(l["_type"], "layout");
        assert_eq!(l["expires"], "2030-01-01T00:00:00Z");
        assert_eq!(l["inspect"], json!([]));
        assert_eq!(l["keys"][k.keyid()], k.to_securesystemslib());
        assert_eq!(l["steps"][0]["pubkeys"], json!([k.keyid()]));
        assert_eq!(l["steps"][0]["threshold"], 1);
        assert_eq!(l["steps"][0]["expected_materials"], json!([]));
        let dup = LayoutBuilder::new(time::macros::datetime!(2030-01-01 0:00 UTC))
            .step(Step::new("a"))
            .step(Step::new("a"))
            .build();
        assert!(dup.is_err());
        let bad_rule = LayoutBuilder::new(time::macros::datetime!(2030-01-01 0:00 UTC))
            .step(Step::new("a").product_rule(&["FROB", "x"]))
            .build();
        assert!(bad_rule.is_err());
    }
}
