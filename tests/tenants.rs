//! Tenants on the Unix socket: members of one tenant share its jobs, blobs, links,
//! provenance and idempotency keys; another tenant sees none of them; a uid of no tenant
//! is refused; operators see all. Per-tenant ceilings are enforced at Submit and name
//! their key. ListJobs pages through every job once; WhoAmI says who the daemon sees.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use agent_proto::v1::{
    CancelRequest, FindMissingRequest, GetProvenanceRequest, Input, JobSpec, JobState, JobSummary,
    ListJobsRequest, ListLinksRequest, ResourceLimits, Step, WatchRequest, WhoAmIRequest,
};
use support::*;

/// The daemon's services as one client; `new` connects as a host uid.
type Client = ApiClient;
use tonic::Code;

const CLIENTS_GID: u32 = 48_000;
/// Two members of tenant `red`.
const RED_1: u32 = 48_001;
const RED_2: u32 = 48_002;
/// The one member of tenant `blue`.
const BLUE: u32 = 48_003;
/// The one member of tenant `narrow`, whose ceilings are below the runner's.
const NARROW: u32 = 48_004;
/// In the socket's group, in no tenant.
const STRANGER: u32 = 48_009;

const TENANTS: &str = "
[tenants.red]
uids = [48001, 48002]

[tenants.blue]
uids = [48003]

[tenants.narrow]
uids = [48004]
images = [\"host\"]
network_ceiling = [\"*.example.org:443\"]
max_memory = \"1G\"
max_timeout_seconds = 60
max_queued_jobs = 1
";

impl Client {
    async fn new(daemon: &Daemon, uid: u32) -> Client {
        Self::over(channel_as(&daemon.socket, uid, CLIENTS_GID).await)
    }

    async fn missing(&mut self, digest: &str) -> bool {
        !self
            .store
            .find_missing(FindMissingRequest {
                digests: vec![digest.to_string()],
            })
            .await
            .unwrap()
            .into_inner()
            .missing
            .is_empty()
    }

    async fn cancel(&mut self, id: &str) -> Result<i32, tonic::Status> {
        Ok(self
            .jobs
            .cancel(CancelRequest {
                job_id: id.to_string(),
            })
            .await?
            .into_inner()
            .state)
    }

    async fn wait_running(&mut self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.get(id).await.unwrap().state != JobState::Running as i32 {
            assert!(Instant::now() < deadline, "job never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every page of ListJobs, each of `page_size`.
    async fn list(
        &mut self,
        all: bool,
        state: Option<JobState>,
        page_size: u32,
    ) -> Result<Vec<String>, tonic::Status> {
        Ok(self
            .list_summaries(all, state, page_size)
            .await?
            .into_iter()
            .map(|j| j.job_id)
            .collect())
    }

    async fn list_summaries(
        &mut self,
        all: bool,
        state: Option<JobState>,
        page_size: u32,
    ) -> Result<Vec<JobSummary>, tonic::Status> {
        let mut jobs = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .jobs
                .list_jobs(ListJobsRequest {
                    state: state.map(|s| s as i32),
                    all,
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            assert!(page.jobs.len() <= page_size as usize);
            jobs.extend(page.jobs);
            if page.next_page_token.is_empty() {
                return Ok(jobs);
            }
            page_token = page.next_page_token;
        }
    }
}

fn job(name: &str, input: Option<&str>, script: &str) -> JobSpec {
    JobSpec {
        name: name.into(),
        image: "host".into(),
        inputs: input
            .map(|digest| Input {
                path: "secret.txt".into(),
                digest: digest.into(),
                executable: false,
            })
            .into_iter()
            .collect(),
        steps: vec![Step {
            name: "build".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            ..Default::default()
        }],
        outputs: if input.is_some() {
            vec!["out.txt".into()]
        } else {
            Vec::new()
        },
        publish_repository: String::new(),
    }
}

/// The configuration of the tenants above, with the runner's defaults within their
/// ceilings, and one job slot.
fn tenant_config() -> tempfile::NamedTempFile {
    config_file(&format!(
        "socket_gid = {CLIENTS_GID}\nmax_concurrent_jobs = 1\ndefault_timeout_seconds = 30\n\
         default_memory = \"512M\"\n{TENANTS}"
    ))
}

fn tenant_daemon() -> (Daemon, tempfile::NamedTempFile) {
    let config = tenant_config();
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    (daemon, config)
}

fn assert_hidden<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>) {
    let err = result.expect_err(what);
    assert_eq!(err.code(), Code::NotFound, "{what}: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_share_within_and_see_nothing_across() {
    if !require_root("tenants_share_within_and_see_nothing_across") {
        return;
    }
    let (daemon, _config) = tenant_daemon();
    let mut red_1 = Client::new(&daemon, RED_1).await;
    let mut red_2 = Client::new(&daemon, RED_2).await;
    let mut blue = Client::new(&daemon, BLUE).await;

    let secret = b"red's unreleased source\n";
    let input = red_1.upload(secret).await.unwrap();
    let spec = job("red", Some(&input), "tr a-z A-Z < secret.txt > out.txt");
    let id = red_1.submit(spec.clone(), "release-1").await.unwrap();
    let done = red_1.wait(&id).await;
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    let output = done.outputs[0].digest.clone();
    let link = done.steps[0].link_digest.clone();
    let log = done.steps[0].stdout_digest.clone();
    let built = secret.to_ascii_uppercase();

    // The other member of red shares all of it, and its idempotency key.
    assert!(!red_2.missing(&input).await);
    assert_eq!(red_2.read(&input).await.unwrap(), secret);
    assert_eq!(red_2.get(&id).await.unwrap().job_id, id);
    assert_eq!(red_2.read(&output).await.unwrap(), built);
    assert!(!red_2.read(&link).await.unwrap().is_empty());
    let links = red_2
        .attestations
        .list_links(ListLinksRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(links.links.len(), 1);
    red_2
        .attestations
        .get_provenance(GetProvenanceRequest { job_id: id.clone() })
        .await
        .unwrap();
    assert_eq!(red_2.submit(spec.clone(), "release-1").await.unwrap(), id);

    // Blue sees none of it, exactly as if it did not exist.
    assert!(blue.missing(&input).await, "FindMissing leaks red's blob");
    assert_hidden("blue reads red's input", blue.read(&input).await);
    assert_hidden("blue gets red's job", blue.get(&id).await);
    assert_hidden(
        "blue watches red's job",
        blue.jobs.watch(WatchRequest { job_id: id.clone() }).await,
    );
    assert_hidden(
        "blue lists red's links",
        blue.attestations
            .list_links(ListLinksRequest { job_id: id.clone() })
            .await,
    );
    assert_hidden(
        "blue gets red's provenance",
        blue.attestations
            .get_provenance(GetProvenanceRequest { job_id: id.clone() })
            .await,
    );
    for (what, digest) in [("output", &output), ("link", &link), ("log", &log)] {
        assert_hidden(what, blue.read(digest).await);
    }
    let stolen = blue
        .submit(job("blue", Some(&input), "cp secret.txt out.txt"), "")
        .await
        .unwrap_err();
    assert_eq!(stolen.code(), Code::FailedPrecondition, "{stolen}");
    // Its own key of the same name is its own.
    let blue_job = blue
        .submit(job("blue", None, "true"), "release-1")
        .await
        .unwrap();
    assert_ne!(blue_job, id, "blue's idempotency key answered red's job");
    blue.wait(&blue_job).await;

    // Listing: each tenant its own; `all` is for operators.
    assert_eq!(
        red_2.list(false, None, 100).await.unwrap(),
        vec![id.clone()]
    );
    assert_eq!(
        blue.list(false, None, 100).await.unwrap(),
        vec![blue_job.clone()]
    );
    let err = red_2.list(true, None, 100).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let out = daemon.kiln(&["jobs", "--all", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let owners: BTreeSet<(String, String)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["job_id"].as_str().unwrap().to_string(),
                j["tenant"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        owners,
        BTreeSet::from([
            (id.clone(), "red".into()),
            (blue_job.clone(), "blue".into())
        ])
    );
    // Root without --all has no jobs of its own.
    let out = daemon.kiln(&["jobs"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "");

    // Cancel: another tenant cannot; a fellow member can.
    let long = red_1
        .submit(job("long", None, "sleep 60"), "")
        .await
        .unwrap();
    red_1.wait_running(&long).await;
    assert_hidden("blue cancels red's job", blue.cancel(&long).await);
    assert_eq!(
        red_1.get(&long).await.unwrap().state,
        JobState::Running as i32
    );
    red_2.cancel(&long).await.unwrap();
    assert_eq!(red_1.wait(&long).await.state, JobState::Cancelled as i32);

    // WhoAmI, as a member, as root.
    let me = red_2
        .jobs
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (me.principal.as_str(), me.tenant.as_str(), me.admin, me.uid),
        ("tenant:red", "red", false, Some(RED_2))
    );
    let out = daemon.kiln(&["whoami", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    let root: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(root["principal"], "uid:0");
    assert_eq!(root["admin"], true);
    assert_eq!(root["tenant"], "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_of_no_tenant_is_refused_without_learning_of_tenants() {
    if !require_root("a_uid_of_no_tenant_is_refused_without_learning_of_tenants") {
        return;
    }
    let (daemon, _config) = tenant_daemon();
    let mut stranger = Client::new(&daemon, STRANGER).await;
    let err = stranger.jobs.who_am_i(WhoAmIRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(
        err.message()
            .contains(&format!("uid {STRANGER} is not a member of any tenant")),
        "{err}"
    );
    for name in ["red", "blue", "narrow", "48001"] {
        assert!(!err.message().contains(name), "{err}");
    }
    let err = stranger
        .submit(job("x", None, "true"), "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = stranger.upload(b"data").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_ceilings_are_enforced_at_submit_naming_the_key() {
    if !require_root("a_tenants_ceilings_are_enforced_at_submit_naming_the_key") {
        return;
    }
    let (daemon, _config) = tenant_daemon();
    let mut narrow = Client::new(&daemon, NARROW).await;
    let mut red = Client::new(&daemon, RED_1).await;

    let mut other_image = job("img", None, "true");
    other_image.image = "busybox".into();
    let err = narrow.submit(other_image.clone(), "").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("tenants.narrow.images"), "{err}");

    let mut outside = job("net", None, "true");
    outside.steps[0].allow_net = vec!["example.com:443".into()];
    let err = narrow.submit(outside.clone(), "").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(
        err.message().contains("tenants.narrow.network_ceiling"),
        "{err}"
    );
    // The runner's own ceiling (any) still holds for another tenant.
    let red_net = red.submit(outside, "").await.unwrap();
    red.wait(&red_net).await;

    let mut big = job("big", None, "true");
    big.steps[0].limits = Some(ResourceLimits {
        memory_bytes: 2 << 30,
        ..Default::default()
    });
    let err = narrow.submit(big, "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("tenants.narrow.max_memory"), "{err}");
    let mut slow = job("slow", None, "true");
    slow.steps[0].timeout_seconds = 120;
    let err = narrow.submit(slow, "").await.unwrap_err();
    assert!(
        err.message().contains("tenants.narrow.max_timeout_seconds"),
        "{err}"
    );

    // The queue cap: the one slot held by a long job, narrow may queue one job.
    let long = red.submit(job("long", None, "sleep 60"), "").await.unwrap();
    red.wait_running(&long).await;
    let queued = narrow.submit(job("first", None, "true"), "").await.unwrap();
    let err = narrow
        .submit(job("second", None, "true"), "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.message().contains("tenants.narrow.max_queued_jobs"),
        "{err}"
    );
    // Another tenant's queue is its own.
    let red_queued = red.submit(job("red", None, "true"), "").await.unwrap();
    // Leaving the queue makes room again.
    narrow.cancel(&queued).await.unwrap();
    narrow
        .submit(job("second", None, "true"), "")
        .await
        .unwrap();
    red.cancel(&red_queued).await.unwrap();
    red.cancel(&long).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_jobs_pages_through_every_job_once() {
    if !require_root("list_jobs_pages_through_every_job_once") {
        return;
    }
    let (daemon, _config) = tenant_daemon();
    let mut root = Client::over(channel(&daemon).await);
    let mut blue = Client::new(&daemon, BLUE).await;
    // One job runs (and holds the slot); the rest wait.
    let long = root
        .submit(job("long", None, "sleep 60"), "")
        .await
        .unwrap();
    root.wait_running(&long).await;
    let mut submitted = vec![long.clone()];
    for i in 0..104 {
        submitted.push(
            root.submit(job(&format!("job-{i}"), None, "true"), "")
                .await
                .unwrap(),
        );
    }
    let blues = blue.submit(job("blue", None, "true"), "").await.unwrap();

    let summaries = root.list_summaries(false, None, 7).await.unwrap();
    // Newest first.
    assert!(
        summaries
            .windows(2)
            .all(|w| w[0].created_unix_ms >= w[1].created_unix_ms),
        "not newest first"
    );
    assert!(summaries
        .iter()
        .all(|j| j.owner == "uid:0" && j.step_count == 1));
    let listed: Vec<String> = summaries.into_iter().map(|j| j.job_id).collect();
    assert_eq!(listed.len(), submitted.len(), "{listed:?}");
    assert_eq!(
        listed.iter().collect::<BTreeSet<_>>(),
        submitted.iter().collect::<BTreeSet<_>>(),
        "a job listed twice, or missed"
    );
    let queued = root
        .list(false, Some(JobState::Queued), 1000)
        .await
        .unwrap();
    assert_eq!(queued.len(), 104);
    assert!(!queued.contains(&long));
    // Everyone's: root's and blue's.
    let everyone = root.list(true, None, 1000).await.unwrap();
    assert_eq!(everyone.len(), submitted.len() + 1);
    assert!(everyone.contains(&blues));

    // The CLI follows the pages (100 a page by default).
    let out = daemon.kiln(&["jobs", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli.as_array().unwrap().len(), submitted.len());
    let out = daemon.kiln(&["jobs", "--state", "running"]);
    assert!(out.status.success(), "{}", describe(&out));
    let lines = text(&out.stdout);
    assert_eq!(lines.lines().count(), 1, "{lines}");
    assert!(
        lines.starts_with(&long) && lines.contains("running"),
        "{lines}"
    );

    for bad in ["zz", "31", &hex::encode("1:5:../../x")] {
        let err = root
            .jobs
            .list_jobs(ListJobsRequest {
                page_token: bad.to_string(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err}");
    }
    let err = root
        .jobs
        .list_jobs(ListJobsRequest {
            state: Some(99),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    root.cancel(&long).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_from_before_tenants_go_with_their_uid_into_its_tenant() {
    if !require_root("records_from_before_tenants_go_with_their_uid_into_its_tenant") {
        return;
    }
    // First without tenants: uid RED_1 is a client of its own.
    let plain = config_file(&format!("socket_gid = {CLIENTS_GID}\n"));
    let mut daemon = Daemon::start_with(&["--config", plain.path().to_str().unwrap()]);
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (old, input) = {
        let mut red_1 = Client::new(&daemon, RED_1).await;
        let input = red_1.upload(b"old source\n").await.unwrap();
        let old = red_1
            .submit(job("old", Some(&input), "cp secret.txt out.txt"), "")
            .await
            .unwrap();
        assert_eq!(red_1.wait(&old).await.state, JobState::Succeeded as i32);
        (old, input)
    };
    let whoami = Client::new(&daemon, RED_1)
        .await
        .jobs
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (whoami.principal.as_str(), whoami.tenant.as_str()),
        ("uid:48001", "")
    );
    assert!(daemon.stop().success());

    // Then RED_1 joins tenant red: the tenant (every member) has its earlier records.
    let tenants = tenant_config();
    daemon.spawn(&["--config", tenants.path().to_str().unwrap()]);
    let mut red_2 = Client::new(&daemon, RED_2).await;
    let mut blue = Client::new(&daemon, BLUE).await;
    let job = red_2.get(&old).await.unwrap();
    assert_eq!(
        red_2.read(&job.outputs[0].digest).await.unwrap(),
        b"old source\n"
    );
    assert_eq!(red_2.read(&input).await.unwrap(), b"old source\n");
    assert_eq!(
        red_2.list(false, None, 10).await.unwrap(),
        vec![old.clone()]
    );
    assert_hidden("blue gets the old job", blue.get(&old).await);
    assert_hidden("blue reads the old input", blue.read(&input).await);
    assert!(blue.list(false, None, 10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_is_held_to_its_tenants_images_when_it_starts() {
    if !require_root("a_queued_job_is_held_to_its_tenants_images_when_it_starts") {
        return;
    }
    let config = |tenants: &str| {
        config_file(&format!(
            "socket_gid = {CLIENTS_GID}\nmax_concurrent_jobs = 1\ndefault_timeout_seconds = 30\n\
             default_memory = \"512M\"\nshutdown_grace_seconds = 1\n{tenants}"
        ))
    };
    let first = config(TENANTS);
    let mut daemon = Daemon::start_with(&["--config", first.path().to_str().unwrap()]);
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let queued = {
        let mut red = Client::new(&daemon, RED_1).await;
        let mut narrow = Client::new(&daemon, NARROW).await;
        let long = red.submit(job("long", None, "sleep 60"), "").await.unwrap();
        red.wait_running(&long).await;
        // Allowed when submitted ...
        narrow.submit(job("host", None, "true"), "").await.unwrap()
    };
    assert!(daemon.stop().success());
    // ... and no longer when it starts, after the operator narrowed the list.
    let second = config(&TENANTS.replace("images = [\"host\"]", "images = [\"busybox\"]"));
    daemon.spawn(&["--config", second.path().to_str().unwrap()]);
    let mut narrow = Client::new(&daemon, NARROW).await;
    let job = narrow.wait(&queued).await;
    assert_eq!(job.state, JobState::Error as i32, "{job:?}");
    assert!(job.message.contains("tenants.narrow.images"), "{job:?}");
}

/// Item 3 of the tenants design: one tenant's flood holds another's single job back by
/// at most one slot turnover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_flood_delays_anothers_job_by_at_most_one_slot_turnover() {
    if !require_root("a_tenants_flood_delays_anothers_job_by_at_most_one_slot_turnover") {
        return;
    }
    let (daemon, _config) = tenant_daemon();
    let mut red = Client::new(&daemon, RED_1).await;
    let mut blue = Client::new(&daemon, BLUE).await;
    let blocker = red
        .submit(job("blocker", None, "sleep 60"), "")
        .await
        .unwrap();
    red.wait_running(&blocker).await;
    let mut flood = Vec::new();
    for i in 0..30 {
        flood.push(
            red.submit(job(&format!("f{i}"), None, "true"), "")
                .await
                .unwrap(),
        );
    }
    let single = blue.submit(job("single", None, "true"), "").await.unwrap();
    red.cancel(&blocker).await.unwrap();
    let single = blue.wait(&single).await;
    assert_eq!(
        single.state,
        JobState::Succeeded as i32,
        "{}",
        single.message
    );
    // One job slot: no job of the flood started before the other tenant's.
    for id in &flood {
        let job = red.get(id).await.unwrap();
        assert!(
            job.started_unix_ms == 0 || job.started_unix_ms >= single.started_unix_ms,
            "a flood job started before the other tenant's single one"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_running_cap_waits_while_others_use_the_free_slot() {
    if !require_root("a_tenant_at_its_running_cap_waits_while_others_use_the_free_slot") {
        return;
    }
    let config = config_file(&format!(
        "socket_gid = {CLIENTS_GID}\nmax_concurrent_jobs = 2\ndefault_timeout_seconds = 60\n\
         default_memory = \"512M\"\n\
         [tenants.red]\nuids = [{RED_1}]\nmax_running_jobs = 1\nweight = 3\n\
         [tenants.blue]\nuids = [{BLUE}]\n"
    ));
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut red = Client::new(&daemon, RED_1).await;
    let mut blue = Client::new(&daemon, BLUE).await;
    let blocker = red
        .submit(job("blocker", None, "sleep 60"), "")
        .await
        .unwrap();
    red.wait_running(&blocker).await;
    let capped = red.submit(job("capped", None, "true"), "").await.unwrap();
    let other = blue.submit(job("other", None, "true"), "").await.unwrap();
    let other = blue.wait(&other).await;
    assert_eq!(other.state, JobState::Succeeded as i32, "{}", other.message);
    assert_eq!(
        red.get(&capped).await.unwrap().state,
        JobState::Queued as i32,
        "red's second job ran beyond its max_running_jobs"
    );
    red.cancel(&blocker).await.unwrap();
    let capped = red.wait(&capped).await;
    assert_eq!(
        capped.state,
        JobState::Succeeded as i32,
        "{}",
        capped.message
    );
}

/// The runner's `max_queued_jobs` is shared: a tenant that fills it cannot keep another
/// tenant from queueing its share (by weight) of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_filling_the_runners_queue_leaves_others_their_share() {
    if !require_root("a_tenant_filling_the_runners_queue_leaves_others_their_share") {
        return;
    }
    let config = config_file(&format!(
        "socket_gid = {CLIENTS_GID}\nmax_concurrent_jobs = 1\ndefault_timeout_seconds = 60\n\
         default_memory = \"512M\"\nmax_queued_jobs = 4\n\
         [tenants.red]\nuids = [{RED_1}]\n\
         [tenants.blue]\nuids = [{BLUE}]\n"
    ));
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut red = Client::new(&daemon, RED_1).await;
    let mut blue = Client::new(&daemon, BLUE).await;
    let blocker = red
        .submit(job("blocker", None, "sleep 60"), "")
        .await
        .unwrap();
    red.wait_running(&blocker).await;
    // Red fills the runner's whole queue ...
    for i in 0..4 {
        red.submit(job(&format!("r{i}"), None, "true"), "")
            .await
            .unwrap();
    }
    let err = red.submit(job("r4", None, "true"), "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    // ... and blue still queues its half of it (equal weights), then no more.
    for i in 0..2 {
        blue.submit(job(&format!("b{i}"), None, "true"), "")
            .await
            .unwrap_or_else(|e| panic!("blue's job {i} was refused: {e}"));
    }
    let err = blue.submit(job("b2", None, "true"), "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("max_queued_jobs"), "{err}");
    red.cancel(&blocker).await.unwrap();
}

/// A job still queued at a restart is held to its owner's limits as configured now: a
/// uid's job from before tenants to the tenant the uid joined (its images, its ceilings),
/// as a tenant's own job to its narrowed ceilings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_queued_across_a_restart_is_held_to_its_owners_limits_as_they_are_now() {
    if !require_root("a_job_queued_across_a_restart_is_held_to_its_owners_limits_as_they_are_now") {
        return;
    }
    let config = |tenants: &str| {
        config_file(&format!(
            "socket_gid = {CLIENTS_GID}\nmax_concurrent_jobs = 1\ndefault_timeout_seconds = 30\n\
             default_memory = \"512M\"\nshutdown_grace_seconds = 1\n{tenants}"
        ))
    };
    // Before tenants: NARROW's jobs wait behind another uid's long one.
    let plain = config("");
    let mut daemon = Daemon::start_with(&["--config", plain.path().to_str().unwrap()]);
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (host_image, big) = {
        let mut red = Client::new(&daemon, RED_1).await;
        let mut narrow = Client::new(&daemon, NARROW).await;
        let long = red.submit(job("long", None, "sleep 60"), "").await.unwrap();
        red.wait_running(&long).await;
        let host_image = narrow.submit(job("host", None, "true"), "").await.unwrap();
        let mut spec = job("big", None, "true");
        spec.steps[0].limits = Some(ResourceLimits {
            memory_bytes: 2 << 30,
            ..Default::default()
        });
        (host_image, narrow.submit(spec, "").await.unwrap())
    };
    assert!(daemon.stop().success());
    // NARROW is now the one member of tenant narrow: busybox only, at most 1G.
    let tenants = config(&TENANTS.replace("images = [\"host\"]", "images = [\"busybox\"]"));
    daemon.spawn(&["--config", tenants.path().to_str().unwrap()]);
    let mut narrow = Client::new(&daemon, NARROW).await;
    let job = narrow.wait(&host_image).await;
    assert_eq!(job.state, JobState::Error as i32, "{job:?}");
    assert!(job.message.contains("tenants.narrow.images"), "{job:?}");
    let job = narrow.wait(&big).await;
    assert_eq!(job.state, JobState::Error as i32, "{job:?}");
    assert!(job.message.contains("tenants.narrow.max_memory"), "{job:?}");
}

/// Every Submit is audited, also one refused by its spec's checks: an allow-list beyond
/// the tenant's network ceiling is an authorization denial, recorded as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_beyond_a_tenants_ceiling_is_audited_as_a_denial() {
    if !require_root("a_submit_beyond_a_tenants_ceiling_is_audited_as_a_denial") {
        return;
    }
    let (daemon, _config) = tenant_daemon();
    let mut narrow = Client::new(&daemon, NARROW).await;
    let mut outside = job("net", None, "true");
    outside.steps[0].allow_net = vec!["example.com:443".into()];
    let err = narrow.submit(outside, "").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let log = std::fs::read_to_string(daemon.state.join("audit/audit.jsonl")).unwrap();
    let denial = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["action"] == "job.submit")
        .unwrap_or_else(|| panic!("the refused Submit is not in the audit log:\n{log}"));
    assert_eq!(denial["decision"], "deny", "{denial}");
    assert_eq!(denial["principal"], format!("uid:{NARROW}"), "{denial}");
    assert_eq!(denial["tenant"], "narrow", "{denial}");
    assert!(
        denial["reason"]
            .as_str()
            .unwrap()
            .contains("tenants.narrow.network_ceiling"),
        "{denial}"
    );
}

/// A ListJobs page reads a bounded amount of job records (under the database's lock,
/// which every other client's Submit and every job's state change wait for): jobs with
/// big specs make shorter pages, and paging still lists every job once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_jobs_page_reads_a_bounded_amount_of_records() {
    if !require_root("a_list_jobs_page_reads_a_bounded_amount_of_records") {
        return;
    }
    let (daemon, _config) = tenant_daemon();
    let mut red = Client::new(&daemon, RED_1).await;
    let blocker = red
        .submit(job("blocker", None, "sleep 60"), "")
        .await
        .unwrap();
    red.wait_running(&blocker).await;
    let mut submitted = BTreeSet::from([blocker.clone()]);
    for i in 0..24 {
        // About 1 MB each, within the spec and environment limits.
        let mut spec = job(&format!("big-{i}"), None, "true");
        for v in 0..8 {
            spec.steps[0]
                .env
                .insert(format!("BIG{v}"), "x".repeat(120_000));
        }
        submitted.insert(red.submit(spec, "").await.unwrap());
    }
    let first = red
        .jobs
        .list_jobs(ListJobsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        first.jobs.len() < submitted.len() && !first.next_page_token.is_empty(),
        "one page read {} jobs of about 1 MB each",
        first.jobs.len()
    );
    let listed = red.list(false, None, 1000).await.unwrap();
    assert_eq!(listed.len(), submitted.len(), "a job listed twice");
    assert_eq!(listed.into_iter().collect::<BTreeSet<_>>(), submitted);
    red.cancel(&blocker).await.unwrap();
}
