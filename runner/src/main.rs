//! `kiln`: the Kiln daemon (`kiln serve`) and its command-line client.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agent_proto::v1::{JobSpec, ResourceLimits, Step};
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use runner::cli::client::LinkFormat;
use runner::cli::client::{Client, EXIT_KILN_ERROR};
use runner::cli::{client, demo, jobfile, listing, verify};
use runner::daemon::server;
use runner::engine::signer;
use runner::store::{cas, db};
use runner::{config, images, units};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: a hardened, hermetic build runner"
)]
struct Cli {
    /// The daemon's socket [default: /run/kiln/kiln.sock].
    #[arg(long, global = true, env = "KILN_SOCKET")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// TOML configuration file (see README).
        #[arg(long)]
        config: Option<PathBuf>,
        /// State directory (overrides the config).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Jobs run at once (overrides the config).
        #[arg(long)]
        max_jobs: Option<u32>,
        /// Start an empty job database although the state directory holds Kiln data
        /// (its database was lost: every earlier job record stays lost).
        #[arg(long)]
        new_database: bool,
    },
    /// Run one command as a single-step job and stream its output.
    Run(RunArgs),
    /// Submit a multi-step job described by a TOML file and follow it.
    Submit {
        job_file: PathBuf,
        #[arg(long)]
        attest_dir: Option<PathBuf>,
        /// Form of the link files written to --attest-dir.
        #[arg(long, value_enum, default_value = "metablock")]
        link_format: LinkFormat,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the job id and return at once instead of following the job.
        #[arg(long, conflicts_with_all = ["attest_dir", "out"])]
        detach: bool,
    },
    /// Show a job's record.
    Status {
        job_id: String,
        /// The whole record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running job; every process of its running step is killed.
    Cancel { job_id: String },
    /// List your jobs (your tenant's), newest first.
    Jobs {
        /// Only jobs in this state.
        #[arg(long, value_enum)]
        state: Option<listing::StateFilter>,
        /// Every client's jobs (operators only).
        #[arg(long)]
        all: bool,
        /// As a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Show the principal and tenant the daemon sees you as.
    Whoami {
        #[arg(long)]
        json: bool,
    },
    /// The runner's signing keys: create, rotate, export.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Verify links against an in-toto layout, as in-toto-verify does.
    ///
    /// Layout mode: --layout, --layout-key, --links [--artifacts].
    /// Provenance mode: --provenance ENVELOPE --key KEY... --policy POLICY [--json] FILE...
    Verify {
        /// An in-toto layout (metablock).
        #[arg(long, required_unless_present = "provenance", requires_all = ["layout_keys", "links"])]
        layout: Option<PathBuf>,
        /// PEM public key(s) of the layout owner; repeatable.
        #[arg(long = "layout-key")]
        layout_keys: Vec<PathBuf>,
        /// Directory holding the links.
        #[arg(long)]
        links: Option<PathBuf>,
        /// Directory of artifacts to check against the final step's products.
        #[arg(long)]
        artifacts: Option<PathBuf>,
        /// A job's SLSA provenance (DSSE envelope) to check instead of a layout.
        #[arg(long, conflicts_with = "layout", requires_all = ["keys", "policy"])]
        provenance: Option<PathBuf>,
        /// Runner public key(s): SPKI PEM, or a key ring export (JSON, with validity windows).
        #[arg(long = "key")]
        keys: Vec<PathBuf>,
        /// Verification policy (TOML; see README).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Print the verdict as JSON.
        #[arg(long)]
        json: bool,
        /// Artifact files whose SHA-256 must be subjects of the provenance.
        files: Vec<PathBuf>,
    },
    /// Check or read the audit log (offline, from the state directory's files).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Check the content store.
    Store {
        /// State directory of the daemon.
        #[arg(long, global = true, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Build, import, list, inspect and remove images (locally, as root, in the state
    /// directory).
    Image {
        /// State directory of the daemon.
        #[arg(long, global = true, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Start a daemon on a temporary socket, build and run a C program in the
    /// sandbox, and verify the signed links.
    Demo {
        /// Keep the temporary directory (links, layout, outputs) for inspection.
        #[arg(long)]
        keep: bool,
    },
}

/// `kiln run`'s arguments.
#[derive(clap::Args)]
struct RunArgs {
    /// NAME, NAME@sha256:DIGEST or sha256:DIGEST.
    #[arg(long, default_value = images::HOST_IMAGE)]
    image: String,
    /// HOSTPATH[:WORKSPACEPATH], a file or directory; repeatable.
    #[arg(long = "input", value_name = "HOSTPATH[:WORKSPACEPATH]")]
    inputs: Vec<String>,
    /// Workspace path to collect after the step; repeatable.
    #[arg(long = "output", value_name = "PATH")]
    outputs: Vec<String>,
    /// Step timeout in seconds (default: the daemon's).
    #[arg(long)]
    timeout: Option<u32>,
    /// Step name (names its link).
    #[arg(long, default_value = "run")]
    step: String,
    /// NAME=VALUE added to the step's environment; repeatable.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Where to write the step's signed link.
    #[arg(long)]
    attest_dir: Option<PathBuf>,
    /// Form of the link files written to --attest-dir.
    #[arg(long, value_enum, default_value = "metablock")]
    link_format: LinkFormat,
    /// Where to write the outputs.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Memory limit of the step, e.g. 512M, 2G (default: the daemon's).
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    memory: Option<u64>,
    /// Most processes and threads of the step (default: the daemon's).
    #[arg(long, value_name = "N")]
    pids: Option<u32>,
    /// CPUs of the step, may be fractional, e.g. 1.5 (default: the daemon's).
    #[arg(long, value_name = "N", value_parser = units::parse_cpus)]
    cpus: Option<u32>,
    /// Workspace quota of the step, e.g. 1G (default: the daemon's).
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    disk: Option<u64>,
    /// A destination the step may reach through its egress proxy: HOST:PORT,
    /// *.DOMAIN:PORT, IP:PORT, CIDR:PORT, [IPv6]:PORT (PORT may be *); repeatable.
    /// Without any, the step has no network at all.
    #[arg(long = "allow-net", value_name = "HOST:PORT")]
    allow_net: Vec<String>,
    #[arg(required = true, last = true)]
    argv: Vec<String>,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print the runner's public key (asks the daemon).
    Public {
        #[arg(long, value_enum, default_value = "pem")]
        format: KeyFormat,
    },
    /// Create the key ring in the state directory if it has none; print the current key id.
    Generate {
        /// State directory of the daemon.
        #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Replace the current key by a new one; the old public key stays in the
    /// ring with its window closed, its private key is deleted. A running
    /// daemon signs with the new key from its next signature on.
    Rotate {
        /// State directory of the daemon.
        #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KeyFormat {
    /// The current key, SPKI PEM.
    Pem,
    /// The current key as in-toto layouts embed it.
    Securesystemslib,
    /// Every key the runner signed with and its validity window (JSON), for
    /// `kiln verify --provenance --key`.
    Ring,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain, every checkpoint's signature, and that the log still holds
    /// its last signed checkpoint. Exits 1 naming the line and seq where it is broken.
    Verify {
        /// State directory of the daemon.
        #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// The runner's public key(s): SPKI PEM or a key ring export (`kiln keys public
        /// --format ring`) [default: the state directory's key ring].
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Print the last entries, one JSON line each.
    Tail {
        /// How many.
        #[arg(short = 'n', default_value_t = 20)]
        n: usize,
        /// State directory of the daemon.
        #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Hash every blob and compare it with its name. A blob that does not match is moved
    /// to the store's quarantine/ (so it is missing, and a client's next upload of it
    /// repairs it). Exits 1 if any was. Safe while the daemon runs.
    Verify,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build an image from a recipe directory (e.g. images/busybox).
    Build { recipe: PathBuf },
    /// Import an OCI image: oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker-archive:FILE
    /// (what skopeo, umoci, buildah and `docker save` write). Prints NAME@sha256:DIGEST.
    Import {
        source: String,
        /// The image's name [default: the archive's repository, else the file's name].
        #[arg(long)]
        name: Option<String>,
        /// Most bytes of files the layers may unpack to, e.g. 8G.
        #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
        max_size: Option<u64>,
        /// Most entries the layers may hold.
        #[arg(long, value_name = "N")]
        max_entries: Option<u64>,
    },
    /// List installed images.
    List,
    /// Show an image's record (JSON): digests, source, Env, skipped entries.
    Inspect {
        /// NAME, NAME@sha256:DIGEST or sha256:DIGEST.
        image: String,
    },
    /// Remove an image's name, and its tree when no other name uses it; or, as
    /// sha256:DIGEST, an imported tree no name uses any more.
    Rm { name: String },
}

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
        Command::Serve { .. } => "warn,runner=info,kiln=info",
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
        Command::Serve { .. } | Command::Demo { .. } => tokio::runtime::Builder::new_multi_thread(),
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

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let socket_flag = cli.socket;
    let socket = socket_flag
        .clone()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_SOCKET));
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
                &socket,
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
                &socket,
                &job_file,
                attest_dir.as_deref(),
                link_format,
                out.as_deref(),
                detach,
            )
            .await
        }
        Command::Status { job_id, json } => {
            let client = Client::connect(&socket).await?;
            let job = client.get(&job_id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&client::job_json(&job))?);
            } else {
                println!("{}", client::summary(&job));
            }
            Ok(0)
        }
        Command::Cancel { job_id } => {
            let client = Client::connect(&socket).await?;
            let state = client.cancel(&job_id).await?;
            println!("{}", client::state_name(state));
            Ok(0)
        }
        Command::Jobs { state, all, json } => {
            let client = Client::connect(&socket).await?;
            listing::jobs_command(&client, state, all, json).await
        }
        Command::Whoami { json } => {
            let client = Client::connect(&socket).await?;
            listing::whoami_command(&client, json).await
        }
        Command::Keys {
            command: KeysCommand::Public { format },
        } => keys_public(&socket, format).await,
        Command::Keys {
            command: KeysCommand::Generate { state_dir },
        } => keys_generate(&state_dir),
        Command::Keys {
            command: KeysCommand::Rotate { state_dir },
        } => keys_rotate(&state_dir),
        Command::Verify {
            layout,
            layout_keys,
            links,
            artifacts,
            provenance,
            keys,
            policy,
            json,
            files,
        } => match (provenance, policy, layout, links) {
            (Some(envelope), Some(policy), _, _) => {
                verify::run_provenance(&envelope, &keys, &policy, &files, json)
            }
            (None, _, Some(layout), Some(links)) => {
                verify::run(&layout, &layout_keys, &links, artifacts.as_deref())
            }
            _ => anyhow::bail!(
                "kiln verify needs --layout, --layout-key and --links, or --provenance, --key and --policy"
            ),
        },
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
        Command::Image { state_dir, command } => image_command(&state_dir, command),
        Command::Demo { keep } => demo::run(keep).await,
    }
}

/// `kiln keys public`: the daemon's current key, or its ring.
async fn keys_public(socket: &Path, format: KeyFormat) -> anyhow::Result<i32> {
    let client = Client::connect(socket).await?;
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
    socket: &Path,
    job_file: &Path,
    attest_dir: Option<&Path>,
    link_format: LinkFormat,
    out: Option<&Path>,
    detach: bool,
) -> anyhow::Result<i32> {
    let (spec, locals) = jobfile::load(job_file)?;
    if detach {
        let client = Client::connect(socket).await?;
        client.upload(&locals).await?;
        println!("{}", client.submit(spec).await?);
        return Ok(0);
    }
    run_job(socket, spec, &locals, attest_dir, link_format, out, true).await
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

/// `kiln image build|import|list|inspect|rm`.
fn image_command(state_dir: &Path, command: ImageCommand) -> anyhow::Result<i32> {
    let images = images::Images::attach(state_dir)?;
    match command {
        ImageCommand::Build { recipe } => {
            let record = images.build(&recipe)?;
            println!(
                "built image {} tree sha256:{} from {}",
                record.name, record.tree_digest, record.source
            );
        }
        ImageCommand::Import {
            source,
            name,
            max_size,
            max_entries,
        } => {
            let defaults = images::unpack::Limits::default();
            let limits = images::unpack::Limits {
                max_bytes: max_size.unwrap_or(defaults.max_bytes),
                max_entries: max_entries.unwrap_or(defaults.max_entries),
            };
            let imported = images.import(&source, name.as_deref(), limits)?;
            let report = &imported.report;
            if imported.already_installed {
                eprintln!("the image's tree was already installed; named it");
            } else {
                eprintln!(
                    "unpacked {} entries, {}, tree sha256:{}",
                    report.entries,
                    units::format_size(report.bytes),
                    imported.record.tree_digest
                );
            }
            if let Some(old) = &imported.replaced {
                eprintln!(
                    "{} named sha256:{old} before; that tree stays for jobs that pin its digest",
                    imported.record.name
                );
            }
            if report.skipped_count > 0 {
                eprintln!(
                    "skipped {} special entries (device nodes, FIFOs...): {}",
                    report.skipped_count,
                    report.skipped.join(", ")
                );
            }
            println!(
                "{}@sha256:{}",
                imported.record.name,
                imported.record.digest()
            );
        }
        ImageCommand::List => {
            println!("{:<16} {:<72} SOURCE", "NAME", "DIGEST");
            println!(
                "{:<16} {:<72} host /usr (unpinned)",
                images::HOST_IMAGE,
                "-"
            );
            for record in images.list()? {
                println!(
                    "{:<16} sha256:{:<65} {}",
                    record.name,
                    record.digest(),
                    record.source
                );
            }
            for record in images.unnamed()? {
                println!(
                    "{:<16} sha256:{:<65} {} (was {}; no name now)",
                    "-",
                    record.digest(),
                    record.source,
                    record.name
                );
            }
        }
        ImageCommand::Inspect { image } => {
            let reference = images::reference::ImageRef::parse(&image)?;
            let record = images
                .lookup(&reference)?
                .with_context(|| format!("image {image:?} is not installed"))?;
            println!("{}", serde_json::to_string_pretty(&record)?);
        }
        ImageCommand::Rm { name } => {
            let record = images.remove(&name)?;
            println!("removed {}@sha256:{}", record.name, record.digest());
        }
    }
    Ok(0)
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
        cfg.socket = absolute(&socket)?;
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
            format!("{text}{:?}: {}", status.code(), status.message())
        }
        None => format!("{err:#}"),
    }
}

/// `kiln keys generate`: the key id on stdout, what happened on stderr.
fn keys_generate(state_dir: &Path) -> anyhow::Result<i32> {
    use signer::RingOrigin;
    // The daemon makes the state directory traversable (0711) when it starts.
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let dir = state_dir.join("keys");
    let (ring, origin) =
        signer::open_ring(&dir, true).with_context(|| format!("key ring in {}", dir.display()))?;
    let keyid = &ring.public().current;
    match origin {
        RingOrigin::Created => eprintln!("created a key ring in {}", dir.display()),
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
fn keys_rotate(state_dir: &Path) -> anyhow::Result<i32> {
    let dir = state_dir.join("keys");
    let (mut ring, _) =
        signer::open_ring(&dir, false).with_context(|| format!("key ring in {}", dir.display()))?;
    let old = ring.public().current.clone();
    ring.rotate()
        .with_context(|| format!("rotating the key ring in {}", dir.display()))?;
    let new = &ring.public().current;
    eprintln!(
        "retired key {old} (its window is closed, its private key deleted); signing key is now {new}"
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
    socket: &Path,
    spec: JobSpec,
    locals: &[client::LocalInput],
    attest_dir: Option<&Path>,
    link_format: LinkFormat,
    out: Option<&Path>,
    print_summary: bool,
) -> anyhow::Result<i32> {
    let client = Client::connect(socket).await?;
    client.upload(locals).await?;
    let job_id = client.submit(spec).await?;
    let job = client.follow(&job_id, false).await?;
    if let Some(dir) = attest_dir {
        client.download_links(&job_id, dir, link_format).await?;
        client.download_provenance(&job, dir).await?;
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
