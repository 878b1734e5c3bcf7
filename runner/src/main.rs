//! `kiln`: the Kiln daemon (`kiln serve`) and its command-line client.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agent_proto::v1::{JobSpec, ResourceLimits, Step};
use anyhow::Context;
use clap::Parser;

use provenance::keys::KeyType;
use runner::cli::args::{
    AuditCommand, Cli, Command, KeyFormat, KeyRingArgs, KeysCommand, LayoutCommand, RunArgs,
    StoreCommand, VerifyArgs,
};
use runner::cli::client::LinkFormat;
use runner::cli::client::{Client, EXIT_KILN_ERROR};
use runner::cli::{action_cache, artifact, client, demo, jobfile, listing, verify};
use runner::config::Config;
use runner::daemon::server;
use runner::engine::signer;
use runner::store::{cas, db};
use runner::{config, units};

fn main() -> ExitCode {
    // The sandbox init is this same binary, re-executed by the daemon: it must
    // start single-threaded, before any runtime exists.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(sandbox::INIT_ARG)) {
        sandbox::init_main();
    }
    // So is a step's egress proxy, which then gives up its privileges.
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(runner::egress::process::EGRESS_ARG))
    {
        let logs = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(std::io::stderr)
            .with_ansi(false);
        match std::env::var(runner::egress::process::LOG_FORMAT_ENV).as_deref() {
            Ok("json") => logs.json().init(),
            _ => logs.init(),
        }
        runner::egress::process::child_main();
    }
    let cli = Cli::parse();
    // The daemon logs what it does; the client stays quiet unless asked (KILN_LOG).
    let default_filter = match cli.command {
        Command::Serve { .. } | Command::Worker(_) => "warn,runner=info,kiln=info",
        _ => "warn",
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr);
    match log_format(&cli.command) {
        config::LogFormat::Json => {
            // Still single-threaded: the daemon's egress proxies log alike (see process.rs).
            std::env::set_var(runner::egress::process::LOG_FORMAT_ENV, "json");
            logs.json().init()
        }
        // Colour codes only for a terminal: journald and log files get plain text.
        config::LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    // The daemon serves many clients and jobs; a client command waits on one daemon, and
    // a single-threaded runtime starts faster (no worker threads, no CPU quota lookup).
    // The demo also stops its own daemon with a blocking wait, while its client
    // connection must still be closed by a runtime task: it keeps worker threads.
    let mut builder = match cli.command {
        Command::Serve { .. } | Command::Demo { .. } | Command::Worker(_) => {
            tokio::runtime::Builder::new_multi_thread()
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("kiln: starting the runtime: {err}");
            return exit_code(EXIT_KILN_ERROR);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => exit_code(code),
        Err(err) => {
            eprintln!("kiln: {}", describe_error(&err));
            exit_code(EXIT_KILN_ERROR)
        }
    }
}

/// The daemon's `log_format`, read before the logs start (a configuration that does not
/// load is reported by `kiln serve` itself, in text). Clients log text.
fn log_format(command: &Command) -> config::LogFormat {
    match command {
        Command::Serve {
            config: Some(path), ..
        } => config::Config::load(Some(path))
            .map(|c| c.log_format)
            .unwrap_or_default(),
        _ => config::LogFormat::Text,
    }
}

/// The process exit status for a code: statuses are 0..=255, so others saturate.
fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(u8::MAX))
}

/// Where the client commands reach the daemon: --server with its TLS files, or else the
/// socket. Checked only by the commands that connect.
fn target(cli: &Cli) -> anyhow::Result<client::Target> {
    let Some(server) = cli.server.clone() else {
        return Ok(client::Target::Socket(
            cli.socket
                .clone()
                .unwrap_or_else(|| PathBuf::from(config::DEFAULT_SOCKET)),
        ));
    };
    let file = |given: &Option<PathBuf>, flag: &str, var: &str| {
        given
            .clone()
            .with_context(|| format!("--server needs {flag} (or {var})"))
    };
    Ok(client::Target::Remote {
        server,
        cert: file(&cli.tls_cert, "--tls-cert", "KILN_TLS_CERT")?,
        key: file(&cli.tls_key, "--tls-key", "KILN_TLS_KEY")?,
        ca: file(&cli.tls_ca, "--tls-ca", "KILN_TLS_CA")?,
    })
}

/// `kiln verify` in the mode its arguments choose.
async fn verify_command(args: VerifyArgs) -> anyhow::Result<i32> {
    if args.action_cache.is_some() || !args.bazel_grpc_logs.is_empty() {
        let actions: Vec<String> = args
            .files
            .iter()
            .map(|f| f.to_string_lossy().into_owned())
            .collect();
        let results = match &args.action_cache {
            Some(url) => action_cache::Results::ActionCache {
                url,
                instance: &args.instance,
            },
            None => action_cache::Results::AsBazelReceived,
        };
        return action_cache::run(action_cache::Check {
            results,
            keys: &args.keys,
            actions: &actions,
            grpc_logs: &args.bazel_grpc_logs,
            exec_logs: &args.bazel_exec_logs,
            json: args.json,
        })
        .await;
    }
    match (args.provenance, args.policy, args.layout, args.links) {
        (None, Some(policy), _, _) if args.image.is_some() => {
            let trust = artifact::Trust {
                keys: &args.keys,
                policy: &policy,
            };
            let reference = args.image.unwrap_or_default();
            artifact::verify_image(&reference, &trust, &args.registry.options(), args.json).await
        }
        (Some(envelope), Some(policy), _, _) => {
            verify::run_provenance(&envelope, &args.keys, &policy, &args.files, args.json)
        }
        (None, _, Some(layout), Some(links)) => verify::run(
            &layout,
            &args.layout_keys,
            &links,
            args.artifacts.as_deref(),
        ),
        _ => anyhow::bail!(
            "kiln verify needs --layout, --layout-key and --links, --provenance, --key and \
             --policy, or --image, --key and --policy"
        ),
    }
}

async fn keys_command(
    target: anyhow::Result<client::Target>,
    command: KeysCommand,
) -> anyhow::Result<i32> {
    match command {
        KeysCommand::Public { format } => keys_public(&target?, format).await,
        KeysCommand::Generate(args) => keys_generate(&args),
        KeysCommand::Rotate(args) => keys_rotate(&args),
    }
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let target = target(&cli);
    let socket_flag = cli.socket;
    match cli.command {
        Command::Serve {
            config,
            state_dir,
            max_jobs,
            new_database,
        } => serve_command(socket_flag, config, state_dir, max_jobs, new_database).await,
        Command::Run(args) => {
            let (attest_dir, link_format, out) =
                (args.attest_dir.clone(), args.link_format, args.out.clone());
            let (spec, locals) = single_step_job(args)?;
            run_job(
                &target?,
                spec,
                &locals,
                attest_dir.as_deref(),
                link_format,
                out.as_deref(),
                false,
            )
            .await
        }
        Command::Submit {
            job_file,
            attest_dir,
            link_format,
            out,
            detach,
        } => {
            submit_command(
                &target?,
                &job_file,
                attest_dir.as_deref(),
                link_format,
                out.as_deref(),
                detach,
            )
            .await
        }
        Command::Status { job_id, json } => status_command(&target?, &job_id, json).await,
        Command::Cancel { job_id } => {
            let client = Client::connect_to(&target?).await?;
            let state = client.cancel(&job_id).await?;
            println!("{}", client::state_name(state));
            Ok(0)
        }
        Command::Jobs { state, all, json } => {
            let client = Client::connect_to(&target?).await?;
            listing::jobs_command(&client, state, all, json).await
        }
        Command::Whoami { json } => {
            let client = Client::connect_to(&target?).await?;
            listing::whoami_command(&client, json).await
        }
        Command::Keys { command } => keys_command(target, command).await,
        Command::Layout {
            command: LayoutCommand::Init(args),
        } => runner::cli::layout::init(target, &args).await,
        Command::Verify(args) => verify_command(args).await,
        Command::Push { job_id, repository } => {
            let client = Client::connect_to(&target?).await?;
            artifact::push(&client, &job_id, &repository).await
        }
        Command::PullArtifact {
            reference,
            out,
            keys,
            policy,
            registry,
        } => {
            let trust = artifact::Trust {
                keys: &keys,
                policy: &policy,
            };
            artifact::pull_artifact(&reference, &out, &trust, &registry.options()).await
        }
        Command::Audit {
            command: AuditCommand::Verify { state_dir, key },
        } => runner::cli::audit::verify(&state_dir, key.as_deref()),
        Command::Audit {
            command: AuditCommand::Tail { n, state_dir },
        } => runner::cli::audit::tail(&state_dir, n),
        Command::Store {
            state_dir,
            command: StoreCommand::Verify,
        } => store_verify(&state_dir),
        Command::Image { state_dir, command } => {
            runner::cli::image::command(&state_dir, command).await
        }
        Command::Demo { keep } => demo::run(keep).await,
        Command::Worker(args) => runner::cli::worker::run(args).await.map(|()| 0),
    }
}

/// `kiln keys public`: the daemon's current key, or its ring.
async fn status_command(target: &client::Target, job_id: &str, json: bool) -> anyhow::Result<i32> {
    let client = Client::connect_to(target).await?;
    let job = client.get(job_id).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&client::job_json(&job))?);
    } else {
        println!("{}", client::summary(&job));
    }
    Ok(0)
}

async fn keys_public(target: &client::Target, format: KeyFormat) -> anyhow::Result<i32> {
    let client = Client::connect_to(target).await?;
    let key = client.public_key().await?;
    match format {
        KeyFormat::Pem => print!("{}", key.pem),
        KeyFormat::Securesystemslib => println!("{}", key.securesystemslib_json),
        KeyFormat::Ring if key.keyring_json.is_empty() => {
            anyhow::bail!("the daemon sent no key ring (it predates key rings)")
        }
        KeyFormat::Ring => print!("{}", key.keyring_json),
    }
    Ok(0)
}

/// `kiln submit`: a job file's job, followed to its end unless detached.
async fn submit_command(
    target: &client::Target,
    job_file: &Path,
    attest_dir: Option<&Path>,
    link_format: LinkFormat,
    out: Option<&Path>,
    detach: bool,
) -> anyhow::Result<i32> {
    let (spec, locals) = jobfile::load(job_file)?;
    if detach {
        let client = Client::connect_to(target).await?;
        client.upload(&locals).await?;
        println!("{}", client.submit(spec).await?);
        return Ok(0);
    }
    run_job(target, spec, &locals, attest_dir, link_format, out, true).await
}

/// The one-step job of `kiln run`, and the local files it uploads.
fn single_step_job(args: RunArgs) -> anyhow::Result<(JobSpec, Vec<client::LocalInput>)> {
    let mut locals = Vec::new();
    for input in &args.inputs {
        let (host, ws) = match input.split_once(':') {
            Some((host, ws)) => (PathBuf::from(host), ws.to_string()),
            None => {
                let host = PathBuf::from(input);
                let name = host
                    .file_name()
                    .and_then(|n| n.to_str())
                    .with_context(|| format!("--input {input}: no file name"))?
                    .to_string();
                (host, name)
            }
        };
        locals.extend(client::collect_inputs(&host, ws.trim_end_matches('/'))?);
    }
    let mut step_env = std::collections::HashMap::new();
    for pair in args.env {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("--env {pair}: expected NAME=VALUE"))?;
        step_env.insert(k.to_string(), v.to_string());
    }
    let spec = JobSpec {
        name: args.step.clone(),
        image: args.image,
        inputs: locals.iter().map(client::LocalInput::to_input).collect(),
        steps: vec![Step {
            name: args.step,
            argv: args.argv,
            env: step_env,
            timeout_seconds: args.timeout.unwrap_or(0),
            limits: Some(ResourceLimits {
                memory_bytes: args.memory.unwrap_or(0),
                pids: args.pids.unwrap_or(0),
                cpu_millis: args.cpus.unwrap_or(0),
                disk_bytes: args.disk.unwrap_or(0),
            }),
            allow_net: args.allow_net,
        }],
        outputs: args.outputs,
        publish_repository: String::new(),
    };
    Ok((spec, locals))
}

/// `kiln store verify`.
fn store_verify(state_dir: &Path) -> anyhow::Result<i32> {
    let root = state_dir.join("cas");
    anyhow::ensure!(root.is_dir(), "no content store at {}", root.display());
    let store = cas::ContentStore::attach(root);
    let report = store.verify_all()?;
    println!(
        "checked {} blobs ({}): {} intact, {} corrupt (quarantined), {} stray files",
        report.intact + report.quarantined.len() as u64,
        units::format_size(report.bytes),
        report.intact,
        report.quarantined.len(),
        report.stray
    );
    for digest in &report.quarantined {
        println!("corrupt: {digest}");
    }
    Ok(if report.quarantined.is_empty() { 0 } else { 1 })
}

/// `kiln serve`: the configuration file, overridden by the flags.
async fn serve_command(
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    max_jobs: Option<u32>,
    new_database: bool,
) -> anyhow::Result<i32> {
    let mut cfg = config::Config::load(config.as_deref())?;
    if let Some(socket) = socket {
        let socket = absolute(&socket)?;
        if cfg.listen.is_empty() {
            cfg.socket = socket;
        } else if !cfg.listen.iter().any(|l| l.unix.as_ref() == Some(&socket)) {
            // With [[listen]] entries, --socket is one more Unix listener.
            cfg.listen
                .push(config::Listen::unix(socket, cfg.socket_gid));
        }
    }
    if let Some(dir) = state_dir {
        cfg.state_dir = absolute(&dir)?;
    }
    if let Some(n) = max_jobs {
        cfg.max_concurrent_jobs = n;
    }
    let creation = if new_database {
        db::Creation::Allowed
    } else {
        db::Creation::FreshStateOnly
    };
    server::serve(cfg, creation).await?;
    Ok(0)
}

/// A gRPC status reads as "Code: message"; anything else as its context chain.
fn describe_error(err: &anyhow::Error) -> String {
    match err.chain().find_map(|e| e.downcast_ref::<tonic::Status>()) {
        Some(status) => {
            let context: Vec<String> = err
                .chain()
                .take_while(|e| e.downcast_ref::<tonic::Status>().is_none())
                .map(ToString::to_string)
                .collect();
            let mut text = context.join(": ");
            if !text.is_empty() {
                text.push_str(": ");
            }
            // A transport failure says why underneath (e.g. the daemon's TLS alert
            // refusing the client certificate).
            let mut cause = String::new();
            let mut source = std::error::Error::source(status);
            while let Some(err) = source {
                let said = err.to_string();
                if !cause.contains(&said) {
                    cause.push_str(": ");
                    cause.push_str(&said);
                }
                source = err.source();
            }
            // A connection that ended under the call: say what is known of why.
            let transport = matches!(
                status.code(),
                tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown
            ) && std::error::Error::source(status).is_some();
            if let Some(hint) = client::tls_failure_hint().filter(|_| transport) {
                cause.push_str(&format!(" ({hint})"));
            }
            format!("{text}{:?}: {}{cause}", status.code(), status.message())
        }
        None => format!("{err:#}"),
    }
}

/// The state directory and key type `kiln keys generate|rotate` use: the flags, else
/// the daemon's configuration, else the defaults.
fn key_ring_settings(args: &KeyRingArgs) -> anyhow::Result<(PathBuf, KeyType)> {
    let config = match &args.config {
        Some(path) => {
            let config = Config::load(Some(path))?;
            config.validate()?;
            config
        }
        None => Config::default(),
    };
    if let (None, Some(dir)) = (&args.state_dir, &config.keys_dir) {
        anyhow::bail!(
            "the configuration's keys_dir {} is a read-only key ring, which Kiln never creates \
             or rotates: make and rotate the ring elsewhere (`kiln keys generate --state-dir DIR`) \
             and update what is mounted there",
            dir.display()
        );
    }
    Ok((
        args.state_dir.clone().unwrap_or(config.state_dir),
        args.key_type.unwrap_or(config.key_type),
    ))
}

/// `kiln keys generate`: the key id on stdout, what happened on stderr.
fn keys_generate(args: &KeyRingArgs) -> anyhow::Result<i32> {
    use signer::RingOrigin;
    let (state_dir, key_type) = key_ring_settings(args)?;
    // The daemon makes the state directory traversable (0711) when it starts.
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let dir = state_dir.join("keys");
    let (ring, origin) = signer::open_ring(&dir, true, key_type)
        .with_context(|| format!("key ring in {}", dir.display()))?;
    let keyid = &ring.public().current;
    match origin {
        RingOrigin::Created => eprintln!(
            "created a key ring in {} with an {key_type} key",
            dir.display()
        ),
        RingOrigin::Migrated => eprintln!(
            "moved {} into a key ring in {}, keeping its key id",
            signer::LEGACY_KEY_FILE,
            dir.display()
        ),
        RingOrigin::Existing => eprintln!(
            "a key ring already exists in {}; nothing changed",
            dir.display()
        ),
    }
    println!("{keyid}");
    Ok(0)
}

/// `kiln keys rotate`: the new key id on stdout.
fn keys_rotate(args: &KeyRingArgs) -> anyhow::Result<i32> {
    let (state_dir, key_type) = key_ring_settings(args)?;
    let dir = state_dir.join("keys");
    let (mut ring, _) = signer::open_ring(&dir, false, key_type)
        .with_context(|| format!("key ring in {}", dir.display()))?;
    let old = ring.public().current.clone();
    ring.rotate_to(key_type)
        .with_context(|| format!("rotating the key ring in {}", dir.display()))?;
    let new = &ring.public().current;
    eprintln!(
        "retired key {old} (its window is closed, its private key deleted); signing key is now {new} ({key_type})"
    );
    println!("{new}");
    Ok(0)
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    })
}

/// Uploads, submits, follows, downloads; returns the process-style exit code.
async fn run_job(
    target: &client::Target,
    spec: JobSpec,
    locals: &[client::LocalInput],
    attest_dir: Option<&Path>,
    link_format: LinkFormat,
    out: Option<&Path>,
    print_summary: bool,
) -> anyhow::Result<i32> {
    let client = Client::connect_to(target).await?;
    client.upload(locals).await?;
    let job_id = client.submit(spec).await?;
    let job = client.follow(&job_id, false).await?;
    if let Some(dir) = attest_dir {
        client.download_links(&job_id, dir, link_format).await?;
        client.download_provenance(&job, dir).await?;
        client.download_sbom(&job, dir).await?;
    }
    if let Some(dir) = out {
        client.download_outputs(&job, dir).await?;
    }
    let code = client::exit_code(&job);
    // Network use is always shown: it is what a reviewer of the build wants to see.
    let used_network = job.steps.iter().any(|s| !s.network.is_empty());
    // So is a log cut at the daemon's caps: what the client printed is not all of it.
    let logs_cut = job
        .steps
        .iter()
        .any(|s| s.stdout_bytes > s.stdout_size || s.stderr_bytes > s.stderr_size);
    if print_summary || code != 0 || used_network || logs_cut {
        eprintln!("{}", client::summary(&job));
    }
    Ok(code)
}
