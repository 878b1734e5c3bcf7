//! The `kiln` command line's client side: its arguments, the daemon client, job files,
//! `kiln layout init`, `kiln verify`, `kiln demo`, `kiln worker`, `kiln jobs` and `kiln whoami`, `kiln audit`.

pub mod action_cache;
pub mod args;
pub mod artifact;
pub mod audit;
pub mod bazel_exec_log;
pub mod bazel_grpc_log;
pub mod client;
pub mod connect;
pub mod demo;
pub mod image;
pub mod jobfile;
pub mod layout;
pub mod listing;
pub mod verify;
pub mod worker;

/// `text` with its control characters and bidirectional overrides escaped (`\n`,
/// `\u{1b}`, `\u{202e}`): a name a client chose must not start a line of its own, move
/// the terminal's cursor or reorder what follows in the listing an operator reads.
pub fn printable(text: &str) -> String {
    let bidi = |c: char| matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    text.chars()
        .map(|c| {
            if c.is_control() || bidi(c) {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use agent_proto::v1::{Job, NetworkAttempt, StepResult};

    #[test]
    fn a_jobs_summary_prints_what_a_step_chose_escaped() {
        let job = Job {
            job_id: "j".into(),
            message: "failed\u{1b}[2J".into(),
            steps: vec![StepResult {
                name: "build".into(),
                message: "oops\n  step fake       succeeded\u{202e}".into(),
                network: vec![NetworkAttempt {
                    method: "CONNECT".into(),
                    host: "evil\u{1b}]0;title\u{7}.example".into(),
                    sni: "x\ny".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let out = super::client::summary(&job);
        assert!(
            !out.contains('\u{1b}') && !out.contains('\u{202e}'),
            "{out}"
        );
        // One line for the step, one for its network attempt, one for the job.
        assert_eq!(out.lines().count(), 3, "{out}");
        assert!(out.contains("oops\\n  step fake"), "{out}");
    }
}
