//! The `kiln` command line: its global options and subcommands, as clap parses them
//! (`src/main.rs` dispatches them).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::cli::client::LinkFormat;
use crate::cli::listing;
use crate::{config, images, units};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: a hardened, hermetic build runner"
)]
pub struct Cli {
    /// The daemon's socket [default: /run/kiln/kiln.sock].
    #[arg(long, global = true, env = "KILN_SOCKET")]
    pub socket: Option<PathBuf>,
    /// A remote daemon's TLS listener, https://HOST:PORT, instead of the socket; needs
    /// --tls-cert, --tls-key and --tls-ca.
    #[arg(long, global = true, env = "KILN_SERVER")]
    pub server: Option<String>,
    /// The client certificate (PEM, leaf first) for --server.
    #[arg(long, global = true, env = "KILN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM) for --server.
    #[arg(long, global = true, env = "KILN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate(s) (PEM) the daemon's certificate must chain to, for --server.
    #[arg(long, global = true, env = "KILN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// In-toto layouts for reviewers.
    Layout {
        #[command(subcommand)]
        command: LayoutCommand,
    },
    /// Verify links against an in-toto layout, as in-toto-verify does.
    ///
    /// Layout mode: --layout, --layout-key, --links [--artifacts].
    /// Provenance mode: --provenance ENVELOPE --key KEY... --policy POLICY [--json] FILE...
    /// Registry mode: --image REGISTRY/REPO@sha256:DIGEST --key KEY... --policy POLICY [--json]
    /// Action cache mode: --action-cache URL --key KEY... [--instance NAME] [--json] ACTION_DIGEST...
    /// Bazel build mode: --bazel-grpc-log FILE... [--bazel-exec-log FILE...] --key KEY... [--action-cache URL] [--json]
    Verify(VerifyArgs),
    /// Have the daemon publish a succeeded job to an OCI registry: its outputs as one
    /// artifact, its provenance, links and SBOM attached as Sigstore bundles. Prints
    /// REGISTRY/REPO@sha256:DIGEST.
    Push {
        job_id: String,
        /// REGISTRY/REPO or REGISTRY/REPO:TAG.
        repository: String,
    },
    /// Verify an artifact in a registry as `kiln verify --image` does, then download its
    /// outputs into a new or empty directory.
    PullArtifact {
        /// REGISTRY/REPO@sha256:DIGEST.
        reference: String,
        #[arg(long)]
        out: PathBuf,
        /// Runner public key(s): SPKI PEM, or a key ring export.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// Verification policy (TOML; see README).
        #[arg(long)]
        policy: PathBuf,
        #[command(flatten)]
        registry: RegistryArgs,
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
    /// Run remote actions for a scheduler (the Remote Workers API, e.g. BuildGrid), each
    /// in the sandbox, each result signed. Runs as root, without `kiln serve`.
    Worker(WorkerArgs),
}

/// `kiln worker`'s arguments.
#[derive(clap::Args)]
pub struct WorkerArgs {
    /// The scheduler: grpc://HOST:PORT or grpcs://HOST:PORT.
    #[arg(long)]
    pub scheduler: String,
    /// The scheduler's instance name.
    #[arg(long, default_value = "")]
    pub instance: String,
    /// Bots (actions run at once); default: the config's max_concurrent_jobs.
    #[arg(long)]
    pub bots: Option<u32>,
    /// State directory (keys, images, workspaces; overrides the config).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// TOML configuration file (see README).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// `kiln verify`'s arguments: one of three modes (layout, provenance, registry).
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// An in-toto layout (metablock).
    #[arg(long, required_unless_present_any = ["provenance", "image", "action_cache", "bazel_grpc_logs"], requires_all = ["layout_keys", "links"])]
    pub layout: Option<PathBuf>,
    /// PEM public key(s) of the layout owner (ed25519 or ECDSA P-256); repeatable.
    #[arg(long = "layout-key")]
    pub layout_keys: Vec<PathBuf>,
    /// Directory holding the links.
    #[arg(long)]
    pub links: Option<PathBuf>,
    /// Directory of artifacts to check against the final step's products.
    #[arg(long)]
    pub artifacts: Option<PathBuf>,
    /// A job's SLSA provenance (DSSE envelope, or the Sigstore bundle holding it) to
    /// check instead of a layout.
    #[arg(long, conflicts_with_all = ["layout", "image"], requires_all = ["keys", "policy"])]
    pub provenance: Option<PathBuf>,
    /// An artifact in an OCI registry (REGISTRY/REPO@sha256:DIGEST): its attached
    /// provenance is checked against every layer, and each layer against its digest.
    #[arg(long, conflicts_with = "layout", requires_all = ["keys", "policy"])]
    pub image: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Runner public key(s): SPKI PEM (ed25519 or ECDSA P-256), or a key ring export
    /// (JSON, with validity windows).
    #[arg(long = "key")]
    pub keys: Vec<PathBuf>,
    /// Verification policy (TOML; see README).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Print the verdict as JSON.
    #[arg(long)]
    pub json: bool,
    /// A remote execution engine's action cache (grpc://HOST:PORT or grpcs://HOST:PORT):
    /// the results of the actions named as FILE... (HEX/SIZE action digests), each
    /// checked against the statement its Kiln worker signed.
    #[arg(long, conflicts_with_all = ["layout", "image", "provenance"], requires = "keys")]
    pub action_cache: Option<String>,
    /// Bazel's log of its remote calls (`--experimental_remote_grpc_log=FILE`): every
    /// action the build executed remotely or took from the remote cache is checked, in
    /// every result Bazel received (or, with --action-cache, the one the cache holds now);
    /// an action Bazel got no result for fails. Repeatable.
    #[arg(long = "bazel-grpc-log", value_name = "FILE", conflicts_with_all = ["layout", "image", "provenance"], requires = "keys")]
    pub bazel_grpc_logs: Vec<PathBuf>,
    /// Bazel's execution log of the same build (`--execution_log_json_file=FILE`): every
    /// output of every spawn in it, wherever it ran, must be an output of a verified
    /// action with the same digest. Repeatable.
    #[arg(
        long = "bazel-exec-log",
        value_name = "FILE",
        requires = "bazel_grpc_logs"
    )]
    pub bazel_exec_logs: Vec<PathBuf>,
    /// The engine's instance name (with --action-cache).
    #[arg(long, default_value = "", requires = "action_cache")]
    pub instance: String,
    /// Artifact files whose SHA-256 must be subjects of the provenance (with
    /// --action-cache: action digests, HEX/SIZE).
    pub files: Vec<PathBuf>,
}

/// How the client reaches a registry.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// HOST:PORT of a registry spoken to over plain HTTP (loopback ones always may be);
    /// repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
    /// A docker-style config.json with the registry's credentials [default:
    /// $DOCKER_CONFIG/config.json or ~/.docker/config.json when present].
    #[arg(long, value_name = "FILE")]
    pub registry_auth: Option<PathBuf>,
}

impl RegistryArgs {
    pub fn options(self) -> crate::cli::artifact::RegistryOptions {
        crate::cli::artifact::RegistryOptions {
            insecure_registries: self.insecure_registries,
            auth_file: self.registry_auth,
        }
    }
}

/// `kiln run`'s arguments.
#[derive(clap::Args)]
pub struct RunArgs {
    /// NAME, NAME@sha256:DIGEST or sha256:DIGEST.
    #[arg(long, default_value = images::HOST_IMAGE)]
    pub image: String,
    /// HOSTPATH[:WORKSPACEPATH], a file or directory; repeatable.
    #[arg(long = "input", value_name = "HOSTPATH[:WORKSPACEPATH]")]
    pub inputs: Vec<String>,
    /// Workspace path to collect after the step; repeatable.
    #[arg(long = "output", value_name = "PATH")]
    pub outputs: Vec<String>,
    /// Step timeout in seconds (default: the daemon's).
    #[arg(long)]
    pub timeout: Option<u32>,
    /// Step name (names its link).
    #[arg(long, default_value = "run")]
    pub step: String,
    /// NAME=VALUE added to the step's environment; repeatable.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Where to write the step's signed link.
    #[arg(long)]
    pub attest_dir: Option<PathBuf>,
    /// Form of the link files written to --attest-dir.
    #[arg(long, value_enum, default_value = "metablock")]
    pub link_format: LinkFormat,
    /// Where to write the outputs.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Memory limit of the step, e.g. 512M, 2G (default: the daemon's).
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    pub memory: Option<u64>,
    /// Most processes and threads of the step (default: the daemon's).
    #[arg(long, value_name = "N")]
    pub pids: Option<u32>,
    /// CPUs of the step, may be fractional, e.g. 1.5 (default: the daemon's).
    #[arg(long, value_name = "N", value_parser = units::parse_cpus)]
    pub cpus: Option<u32>,
    /// Workspace quota of the step, e.g. 1G (default: the daemon's).
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    pub disk: Option<u64>,
    /// A destination the step may reach through its egress proxy: HOST:PORT,
    /// *.DOMAIN:PORT, IP:PORT, CIDR:PORT, [IPv6]:PORT (PORT may be *); repeatable.
    /// Without any, the step has no network at all.
    #[arg(long = "allow-net", value_name = "HOST:PORT")]
    pub allow_net: Vec<String>,
    #[arg(required = true, last = true)]
    pub argv: Vec<String>,
}

#[derive(Subcommand)]
pub enum LayoutCommand {
    /// Write a signed in-toto layout for a job file's steps: each step's materials are
    /// the previous step's products (the first step's the job's inputs), the outputs
    /// are matched by an inspection that runs `true`. For in-toto-verify and
    /// `kiln verify --layout`.
    Init(crate::cli::layout::InitArgs),
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Print the runner's public key (asks the daemon).
    Public {
        #[arg(long, value_enum, default_value = "pem")]
        format: KeyFormat,
    },
    /// Create the key ring in the state directory if it has none; print the current key id.
    Generate(KeyRingArgs),
    /// Replace the current key by a new one; the old public key stays in the
    /// ring with its window closed, its private key is deleted. A running
    /// daemon signs with the new key from its next signature on.
    Rotate(KeyRingArgs),
}

/// Where the key ring is and the type of key a new one gets.
#[derive(Args)]
pub struct KeyRingArgs {
    /// State directory of the daemon [default: the config's `state_dir`, else
    /// /var/lib/kiln].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The daemon's configuration file: its `state_dir` and `key_type` count.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The new key's type: ed25519 or ecdsa-p256 [default: the config's `key_type`,
    /// else ed25519].
    #[arg(long, value_name = "TYPE", value_parser = parse_key_type)]
    pub key_type: Option<provenance::keys::KeyType>,
}

fn parse_key_type(s: &str) -> Result<provenance::keys::KeyType, String> {
    s.parse()
        .map_err(|e: provenance::keys::UnknownKeyType| e.to_string())
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KeyFormat {
    /// The current key, SPKI PEM.
    Pem,
    /// The current key as in-toto layouts embed it.
    Securesystemslib,
    /// Every key the runner signed with and its validity window (JSON), for
    /// `kiln verify --provenance --key`.
    Ring,
}

#[derive(Subcommand)]
pub enum AuditCommand {
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
pub enum StoreCommand {
    /// Hash every blob and compare it with its name. A blob that does not match is moved
    /// to the store's quarantine/ (so it is missing, and a client's next upload of it
    /// repairs it). Exits 1 if any was. Safe while the daemon runs.
    Verify,
}

#[derive(Subcommand)]
pub enum ImageCommand {
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
    /// Pull an image from an OCI registry: REGISTRY/REPO@sha256:DIGEST, or
    /// REGISTRY/REPO:TAG (resolved once to a digest, printed and pinned). HTTPS, except
    /// for loopback registries and --insecure-registry ones. Prints NAME@sha256:DIGEST.
    Pull {
        reference: String,
        /// The image's name [default: the repository's last component].
        #[arg(long)]
        name: Option<String>,
        /// HOST:PORT of a registry spoken to over plain HTTP; repeatable.
        #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
        insecure_registries: Vec<String>,
        /// The daemon's configuration file: its `[images] insecure_registries` count too.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// A docker-style config.json with the registry's credentials [default:
        /// $DOCKER_CONFIG/config.json or ~/.docker/config.json when present].
        #[arg(long, value_name = "FILE")]
        registry_auth: Option<PathBuf>,
        /// Most bytes of files the layers may unpack to (and may download), e.g. 8G.
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
    /// Print an imported image's SBOM: the packages of its package databases (dpkg,
    /// apk) as a CycloneDX 1.5 JSON document, recorded at import.
    Sbom {
        /// NAME, NAME@sha256:DIGEST or sha256:DIGEST.
        image: String,
    },
    /// Remove an image's name, and its tree when no other name uses it; or, as
    /// sha256:DIGEST, an imported tree no name uses any more.
    Rm { name: String },
}
