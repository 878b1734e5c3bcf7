//! The layout of a Kiln job, written for a reviewer: one layout step per job step,
//! chained by their artifacts, and the job's outputs checked by an inspection.
//!
//! The rules, per step (in-toto applies them in order; a rule consumes what it
//! authorises, so `DISALLOW` comes last):
//! - materials of the first step: `ALLOW <input>` for each of the job's input files,
//!   then `DISALLOW *`: the workspace holds nothing else when the job starts;
//! - materials of every later step: `MATCH * WITH PRODUCTS FROM <previous step>`, then
//!   `DISALLOW *`: nothing changed between two steps (Kiln's engine hands a step's
//!   products on as the next step's materials);
//! - products: `MATCH * WITH MATERIALS FROM <the step>` (unchanged files), `CREATE *`,
//!   `MODIFY *`, then `DISALLOW *`. A job file does not say which files a step makes,
//!   so any file it creates or changes is allowed; a reviewer who knows narrows
//!   `CREATE *` and `MODIFY *` to those files, and `DISALLOW *` then refuses the rest.
//!
//! The inspection [`OUTPUTS_INSPECTION`] runs `true` (it changes nothing; Kiln's
//! verifier evaluates it without running anything), so its materials are the
//! directory `in-toto-verify` runs in, the downloaded outputs: each output, as a file
//! (`MATCH <output>`) or as a directory (`MATCH <output>/*`), must equal the final
//! step's product at the same path, and `DISALLOW *` refuses any other file there.
//! Paths are escaped, so an input or output named `a*b` matches that name only.

use time::OffsetDateTime;

use super::{Inspection, LayoutBuilder, Step};
use crate::fnmatch::escape;
use crate::keys::PublicKey;
use crate::ProvenanceError;

/// The name of the inspection that checks the outputs. It holds a `.`, which a Kiln
/// step name cannot, so it never collides with a step.
pub const OUTPUTS_INSPECTION: &str = "outputs.match";

/// The inspection's command: run by `in-toto-verify` in its cwd, where it does
/// nothing; one of the no-op commands Kiln's verifier accepts without running it.
pub const INSPECTION_COMMAND: &str = "true";

/// One step of the job: its name (the name of its link) and its command.
#[derive(Debug, Clone)]
pub struct JobStep {
    pub name: String,
    pub command: Vec<String>,
}

/// What a layout needs from a job file.
#[derive(Debug, Clone, Default)]
pub struct JobOutline {
    /// The job's name, for the layout's readme.
    pub name: String,
    pub steps: Vec<JobStep>,
    /// Workspace paths of the job's input files.
    pub inputs: Vec<String>,
    /// The declared outputs: files, or directories (every file below them).
    pub outputs: Vec<String>,
}

fn rule(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| (*s).to_owned()).collect()
}

/// The first step's material rules: exactly the job's input files.
pub fn first_step_materials(inputs: &[String]) -> Vec<Vec<String>> {
    let mut rules: Vec<Vec<String>> = inputs
        .iter()
        .map(|path| rule(&["ALLOW", &escape(path)]))
        .collect();
    rules.push(rule(&["DISALLOW", "*"]));
    rules
}

/// A later step's material rules: the previous step's products, unchanged.
pub fn chained_materials(previous: &str) -> Vec<Vec<String>> {
    vec![
        rule(&["MATCH", "*", "WITH", "PRODUCTS", "FROM", previous]),
        rule(&["DISALLOW", "*"]),
    ]
}

/// A step's product rules: its materials unchanged, or files it created or changed.
pub fn step_products(step: &str) -> Vec<Vec<String>> {
    vec![
        rule(&["MATCH", "*", "WITH", "MATERIALS", "FROM", step]),
        rule(&["CREATE", "*"]),
        rule(&["MODIFY", "*"]),
        rule(&["DISALLOW", "*"]),
    ]
}

/// The inspection's material rules: every file of the directory is an output equal
/// to the final step's product at that path.
pub fn outputs_materials(outputs: &[String], final_step: &str) -> Vec<Vec<String>> {
    let mut rules = Vec::new();
    for output in outputs {
        let path = escape(output.trim_end_matches('/'));
        for pattern in [path.clone(), format!("{path}/*")] {
            rules.push(rule(&[
                "MATCH", &pattern, "WITH", "PRODUCTS", "FROM", final_step,
            ]));
        }
    }
    rules.push(rule(&["DISALLOW", "*"]));
    rules
}

impl JobOutline {
    /// The layout: one step per job step with `functionary` as its one key
    /// (threshold 1), and the outputs' inspection when the job has outputs.
    pub fn layout(
        &self,
        functionary: &PublicKey,
        expires: OffsetDateTime,
    ) -> Result<LayoutBuilder, ProvenanceError> {
        let last = self
            .steps
            .last()
            .ok_or_else(|| ProvenanceError::Format("the job has no steps".into()))?;
        let mut builder = LayoutBuilder::new(expires).readme(self.readme(&last.name));
        let mut previous: Option<&str> = None;
        for step in &self.steps {
            let mut layout_step = Step::new(step.name.as_str())
                .expected_command(step.command.iter().cloned())
                .pubkey(functionary)
                .threshold(1);
            layout_step.expected_materials = match previous {
                None => first_step_materials(&self.inputs),
                Some(prev) => chained_materials(prev),
            };
            layout_step.expected_products = step_products(&step.name);
            builder = builder.step(layout_step);
            previous = Some(step.name.as_str());
        }
        if !self.outputs.is_empty() {
            let mut inspection = Inspection::new(OUTPUTS_INSPECTION, [INSPECTION_COMMAND]);
            inspection.expected_materials = outputs_materials(&self.outputs, &last.name);
            builder = builder.inspection(inspection);
        }
        Ok(builder)
    }

    fn readme(&self, last: &str) -> String {
        let job = if self.name.is_empty() {
            "a Kiln job".to_owned()
        } else {
            format!("the Kiln job {:?}", self.name)
        };
        let mut text = format!(
            "Layout of {job}: each step's materials are the previous step's products \
             (the first step's: its inputs); "
        );
        if self.outputs.is_empty() {
            text.push_str("the job declares no outputs.");
        } else {
            text.push_str(&format!(
                "inspection {OUTPUTS_INSPECTION} runs `{INSPECTION_COMMAND}` (it changes \
                 nothing) so that the files of the directory in-toto-verify runs in, the \
                 downloaded outputs, must equal the products of step {last}."
            ));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::layout::{rule as words, sign_layout, Rule};
    use crate::link::Link;
    use crate::verify::verify_layout_with_artifacts;
    use crate::SigningKey;
    use std::path::Path;
    use time::macros::datetime;

    fn lists(rules: &[&str]) -> Vec<Vec<String>> {
        rules.iter().map(|r| words(r)).collect()
    }

    fn outline() -> JobOutline {
        JobOutline {
            name: "hello".into(),
            steps: vec![
                JobStep {
                    name: "compile".into(),
                    command: words("cc -O2 -o hello hello.c"),
                },
                JobStep {
                    name: "test".into(),
                    command: vec!["/bin/sh".into(), "-c".into(), "./hello > result.txt".into()],
                },
            ],
            inputs: vec!["hello.c".into(), "lib/[x]*.h".into()],
            outputs: vec!["hello".into(), "docs/".into()],
        }
    }

    #[test]
    fn the_first_step_takes_exactly_the_inputs_and_disallows_last() {
        assert_eq!(
            first_step_materials(&["hello.c".into(), "lib/[x]*.h".into()]),
            lists(&["ALLOW hello.c", "ALLOW lib/[[]x][*].h", "DISALLOW *"])
        );
        assert_eq!(first_step_materials(&[]), lists(&["DISALLOW *"]));
    }

    #[test]
    fn later_steps_match_the_previous_products_and_outputs_the_final_ones() {
        assert_eq!(
            chained_materials("compile"),
            lists(&["MATCH * WITH PRODUCTS FROM compile", "DISALLOW *"])
        );
        assert_eq!(
            step_products("test"),
            lists(&[
                "MATCH * WITH MATERIALS FROM test",
                "CREATE *",
                "MODIFY *",
                "DISALLOW *"
            ])
        );
        assert_eq!(
            outputs_materials(&["hello".into(), "dist/".into(), "a?b".into()], "test"),
            lists(&[
                "MATCH hello WITH PRODUCTS FROM test",
                "MATCH hello/* WITH PRODUCTS FROM test",
                "MATCH dist WITH PRODUCTS FROM test",
                "MATCH dist/* WITH PRODUCTS FROM test",
                "MATCH a[?]b WITH PRODUCTS FROM test",
                "MATCH a[?]b/* WITH PRODUCTS FROM test",
                "DISALLOW *",
            ])
        );
        // Every generated rule is one in-toto accepts, with DISALLOW as the last.
        for rules in [
            first_step_materials(&["x".into()]),
            chained_materials("a"),
            step_products("a"),
            outputs_materials(&["o".into()], "a"),
        ] {
            for r in &rules {
                Rule::parse(r).unwrap();
            }
            assert_eq!(
                Rule::parse(rules.last().unwrap()).unwrap(),
                Rule::Disallow("*".into())
            );
        }
    }

    #[test]
    fn the_layout_names_each_step_its_command_and_the_one_functionary() {
        let runner = SigningKey::generate().public_key();
        let layout = outline()
            .layout(&runner, datetime!(2030-01-01 0:00 UTC))
            .unwrap()
            .build()
            .unwrap();
        let steps = layout["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0]["name"], "compile");
        assert_eq!(steps[1]["name"], "test");
        assert_eq!(
            steps[1]["expected_command"],
            serde_json::json!(["/bin/sh", "-c", "./hello > result.txt"])
        );
        for step in steps {
            assert_eq!(step["pubkeys"], serde_json::json!([runner.keyid()]));
            assert_eq!(step["threshold"], 1);
        }
        assert_eq!(
            steps[1]["expected_materials"][0],
            serde_json::json!(["MATCH", "*", "WITH", "PRODUCTS", "FROM", "compile"])
        );
        let inspect = layout["inspect"].as_array().unwrap();
        assert_eq!(inspect.len(), 1);
        assert_eq!(inspect[0]["name"], OUTPUTS_INSPECTION);
        assert_eq!(inspect[0]["run"], serde_json::json!(["true"]));
        assert_eq!(
            inspect[0]["expected_materials"][3],
            serde_json::json!(["MATCH", "docs/*", "WITH", "PRODUCTS", "FROM", "test"])
        );
        assert_eq!(layout["keys"].as_object().unwrap().len(), 1);

        let no_outputs = JobOutline {
            outputs: Vec::new(),
            ..outline()
        };
        let layout = no_outputs
            .layout(&runner, datetime!(2030-01-01 0:00 UTC))
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(layout["inspect"], serde_json::json!([]));
        let no_steps = JobOutline {
            steps: Vec::new(),
            ..outline()
        };
        assert!(no_steps
            .layout(&runner, datetime!(2030-01-01 0:00 UTC))
            .is_err());
    }

    fn write_link(
        dir: &Path,
        key: &SigningKey,
        name: &str,
        materials: &[(&str, &str)],
        products: &[(&str, &str)],
    ) {
        let set = |files: &[(&str, &str)]| {
            files
                .iter()
                .map(|(p, c)| ((*p).to_owned(), crate::hash::sha256_bytes(c.as_bytes())))
                .collect()
        };
        let link = Link {
            name: name.into(),
            command: Vec::new(),
            materials: set(materials),
            products: set(products),
            byproducts: serde_json::json!({}),
            environment: serde_json::json!({}),
        };
        std::fs::write(
            dir.join(crate::link::link_file_name(name, &key.keyid())),
            link.sign(key).unwrap(),
        )
        .unwrap();
    }

    /// The generated rules against links of the job, with Kiln's verifier: the job as
    /// it ran passes; a file changed between steps, an extra input and a tampered
    /// output fail, the last naming the file and the step.
    #[test]
    fn the_generated_layout_accepts_the_job_and_rejects_changes() {
        let owner = SigningKey::generate();
        let runner = SigningKey::generate();
        let job = JobOutline {
            outputs: vec!["hello".into(), "docs".into()],
            inputs: vec!["hello.c".into()],
            ..outline()
        };
        let layout = job
            .layout(&runner.public_key(), datetime!(2030-01-01 0:00 UTC))
            .unwrap()
            .build()
            .unwrap();
        let layout = sign_layout(&layout, &owner).unwrap();
        let now = datetime!(2029-01-01 0:00 UTC);
        let check = |compile_products: &[(&str, &str)],
                     test_materials: &[(&str, &str)],
                     first_materials: &[(&str, &str)],
                     out_hello: &str| {
            let d = tempfile::tempdir().unwrap();
            let links = d.path().join("links");
            let out = d.path().join("out");
            std::fs::create_dir_all(&links).unwrap();
            std::fs::create_dir_all(out.join("docs")).unwrap();
            write_link(
                &links,
                &runner,
                "compile",
                first_materials,
                compile_products,
            );
            let test_products = [
                ("hello.c", "src"),
                ("hello", "bin"),
                ("result.txt", "hello, kiln\n"),
                ("docs/a.md", "doc"),
            ];
            write_link(&links, &runner, "test", test_materials, &test_products);
            std::fs::write(out.join("hello"), out_hello).unwrap();
            std::fs::write(out.join("docs/a.md"), "doc").unwrap();
            verify_layout_with_artifacts(&layout, &[owner.public_key()], &links, Some(&out), now)
        };
        let compiled = [("hello.c", "src"), ("hello", "bin")];
        let inputs = [("hello.c", "src")];
        check(&compiled, &compiled, &inputs, "bin").unwrap();

        let changed = [("hello.c", "src"), ("hello", "other")];
        let err = check(&compiled, &changed, &inputs, "bin")
            .unwrap_err()
            .to_string();
        assert!(err.contains("step 'test' expected_materials"), "{err}");

        let extra = [("hello.c", "src"), ("evil.sh", "x")];
        let err = check(&compiled, &compiled, &extra, "bin")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("step 'compile' expected_materials") && err.contains("evil.sh"),
            "{err}"
        );

        let err = check(&compiled, &compiled, &inputs, "tampered")
            .unwrap_err()
            .to_string();
        assert!(err.contains(OUTPUTS_INSPECTION), "{err}");
        assert!(
            err.contains("\"hello\"") && err.contains("step 'test'"),
            "{err}"
        );
    }
}
