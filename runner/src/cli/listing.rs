//! `kiln jobs` (every page of ListJobs) and `kiln whoami`.

use agent_proto::v1::{JobState, JobSummary, ListJobsRequest};

use crate::cli::client::{state_name, Client};

/// A job state on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StateFilter {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Error,
}

impl From<StateFilter> for JobState {
    fn from(state: StateFilter) -> Self {
        match state {
            StateFilter::Queued => JobState::Queued,
            StateFilter::Running => JobState::Running,
            StateFilter::Succeeded => JobState::Succeeded,
            StateFilter::Failed => JobState::Failed,
            StateFilter::Cancelled => JobState::Cancelled,
            StateFilter::Error => JobState::Error,
        }
    }
}

/// Every job the caller may list (its own, or every client's with `all`), newest
/// first, following the pages to the end.
pub async fn all_jobs(
    client: &Client,
    state: Option<StateFilter>,
    all: bool,
) -> anyhow::Result<Vec<JobSummary>> {
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_jobs(ListJobsRequest {
                state: state.map(|s| JobState::from(s) as i32),
                all,
                page_size: 0,
                page_token,
            })
            .await?;
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return Ok(jobs);
        }
        page_token = page.next_page_token;
    }
}

pub fn summary_json(job: &JobSummary) -> serde_json::Value {
    serde_json::json!({
        "job_id": job.job_id,
        "name": job.name,
        "image": job.image,
        "state": state_name(job.state),
        "message": job.message,
        "created_unix_ms": job.created_unix_ms,
        "started_unix_ms": job.started_unix_ms,
        "finished_unix_ms": job.finished_unix_ms,
        "step_count": job.step_count,
        "owner": job.owner,
        "tenant": job.tenant,
    })
}

/// One line per job: id, state, creation time (UTC), owner, name.
pub fn summary_line(job: &JobSummary) -> String {
    let created = time::OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(job.created_unix_ms) * 1_000_000,
    )
    .ok()
    .and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_else(|| job.created_unix_ms.to_string());
    format!(
        "{}  {:<9}  {}  {}  {}",
        job.job_id,
        state_name(job.state),
        created,
        job.owner,
        super::printable(&job.name)
    )
}

/// `kiln jobs`.
pub async fn jobs_command(
    client: &Client,
    state: Option<StateFilter>,
    all: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let jobs = all_jobs(client, state, all).await?;
    if json {
        let list: Vec<_> = jobs.iter().map(summary_json).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        for job in &jobs {
            println!("{}", summary_line(job));
        }
    }
    Ok(0)
}

/// `kiln whoami`.
pub async fn whoami_command(client: &Client, json: bool) -> anyhow::Result<i32> {
    let me = client.who_am_i().await?;
    if json {
        let value = serde_json::json!({
            "principal": me.principal,
            "tenant": me.tenant,
            "admin": me.admin,
            "uid": me.uid,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("principal: {}", me.principal);
        println!(
            "tenant: {}",
            if me.tenant.is_empty() {
                "(none)"
            } else {
                &me.tenant
            }
        );
        println!("admin: {}", me.admin);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_name_cannot_forge_or_hide_lines_of_the_listing() {
        // A client names its job; an operator lists everyone's.
        let job = JobSummary {
            job_id: "6f0c".into(),
            state: JobState::Running as i32,
            owner: "tenant:red".into(),
            name: "x\n1234  succeeded  2026-11-27T00:00:00Z  tenant:blue  deploy\r\x1b[2K".into(),
            ..Default::default()
        };
        let line = summary_line(&job);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.starts_with("6f0c  running"), "{line:?}");
        assert!(
            line.ends_with(
                r"x\n1234  succeeded  2026-11-27T00:00:00Z  tenant:blue  deploy\r\u{1b}[2K"
            ),
            "{line:?}"
        );
        let reversed = summary_line(&JobSummary {
            name: "build\u{202e}dlrow".into(),
            ..job
        });
        assert!(reversed.ends_with(r"build\u{202e}dlrow"), "{reversed:?}");
    }
}
