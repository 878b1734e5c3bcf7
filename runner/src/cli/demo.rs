//! `kiln demo`: Kiln's main job on built-in defaults. Starts a daemon on a
//! temporary socket and state directory, builds and runs a C program in two
//! sandboxed steps, verifies the signed links against a layout it writes, and
//! cleans up.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use agent_proto::v1::{Job, JobSpec, ResourceLimits, Step};
use anyhow::{bail, Context};
use provenance::keys::SigningKey;
use provenance::layout::{sign_layout, LayoutBuilder, Step as LayoutStep};

use crate::cli::client::{collect_inputs, Client, LocalInput};

const HELLO_C: &str = r#"#include <stdio.h>

int main(void) {
    printf("Hello from a Kiln sandbox.\n");
    return 0;
}
"#;

struct Daemon {
    child: std::process::Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.child.wait();
    }
}

pub async fn run(keep: bool) -> anyhow::Result<i32> {
    let dir = tempfile::Builder::new()
        .prefix("kiln-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let root = dir.path();
    let socket = root.join("kiln.sock");
    let state = root.join("state");
    let log_path = root.join("daemon.log");
    println!("Kiln demo in {}", root.display());

    let (daemon, client) = start_daemon(&socket, &state, &log_path).await?;
    println!("1. daemon started (socket {})", socket.display());

    let (job_id, job) = build_hello(&client, root, &log_path).await?;
    let links = root.join("links");
    let out = root.join("out");
    let written = client
        .download_links(&job_id, &links, crate::cli::client::LinkFormat::Metablock)
        .await?;
    let provenance = client.download_provenance(&job, &links).await?;
    client.download_outputs(&job, &out).await?;
    let greeting = std::fs::read_to_string(out.join("greeting.txt"))?;
    println!(
        "3. {} signed link(s) in {}; the program printed: {}",
        written.len(),
        links.display(),
        greeting.trim()
    );
    if let Some(path) = provenance {
        println!("   SLSA v1 provenance (DSSE): {}", path.display());
    }

    let (layout_path, owner_pub) = write_layout(&client, root).await?;
    verify_links(&layout_path, &owner_pub, &links, &out)?;
    drop(daemon);
    if keep {
        let kept = dir.keep();
        println!("5. done; files kept in {}", kept.display());
    } else {
        println!("5. done; daemon stopped and temporary files removed (--keep keeps them)");
    }
    Ok(0)
}

/// Starts `kiln serve` (this binary) on the demo's socket and state, and connects.
async fn start_daemon(
    socket: &Path,
    state: &Path,
    log_path: &Path,
) -> anyhow::Result<(Daemon, Client)> {
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(log_path)?;
    let child = std::process::Command::new(&exe)
        .arg("--socket")
        .arg(socket)
        .arg("serve")
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting kiln serve")?;
    let mut daemon = Daemon { child };
    let client = wait_for_daemon(&mut daemon, socket, log_path).await?;
    Ok((daemon, client))
}

const COMPILE: [&str; 5] = ["cc", "-O2", "-o", "hello", "hello.c"];
const RUN: [&str; 3] = ["/bin/sh", "-c", "./hello > greeting.txt"];

/// Submits the two-step job (compile hello.c, run it) and follows it to its end.
async fn build_hello(
    client: &Client,
    root: &Path,
    log_path: &Path,
) -> anyhow::Result<(String, Job)> {
    let src = root.join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("hello.c"), HELLO_C)?;
    let locals: Vec<LocalInput> = collect_inputs(&src.join("hello.c"), "hello.c")?;
    let step = |name: &str, argv: &[&str]| Step {
        name: name.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Default::default(),
        timeout_seconds: 120,
        limits: Some(ResourceLimits::default()),
        allow_net: vec![],
    };
    let spec = JobSpec {
        name: "demo".into(),
        image: crate::images::HOST_IMAGE.into(),
        inputs: locals.iter().map(LocalInput::to_input).collect(),
        steps: vec![step("compile", &COMPILE), step("run", &RUN)],
        outputs: vec!["hello".into(), "greeting.txt".into()],
        publish_repository: String::new(),
    };
    client.upload(&locals).await?;
    let job_id = client.submit(spec).await?;
    println!("2. job {job_id} submitted: compile hello.c with cc, then run it");
    let job = client.follow(&job_id, true).await?;
    println!("{}", crate::cli::client::summary(&job));
    if crate::cli::client::exit_code(&job) != 0 {
        bail!(
            "the demo job did not succeed (daemon log: {})",
            log_path.display()
        );
    }
    Ok((job_id, job))
}

/// The layout says what the supply chain must look like; its owner (a fresh key) signs
/// it. Returns the layout's path and the owner's public key file.
async fn write_layout(client: &Client, root: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let runner_key = client.public_key().await?;
    let runner_pub = provenance::keys::PublicKey::from_spki_pem(&runner_key.pem)?;
    let owner = SigningKey::generate();
    let expires = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    let layout = LayoutBuilder::new(expires)
        .readme("Kiln demo: compile hello.c, run it")
        .step(
            LayoutStep::new("compile")
                .expected_command(COMPILE)
                .pubkey(&runner_pub)
                .material_rule(&["ALLOW", "hello.c"])
                .material_rule(&["DISALLOW", "*"])
                .product_rule(&["MATCH", "hello.c", "WITH", "MATERIALS", "FROM", "compile"])
                .product_rule(&["CREATE", "hello"])
                .product_rule(&["DISALLOW", "*"]),
        )
        .step(
            LayoutStep::new("run")
                .expected_command(RUN)
                .pubkey(&runner_pub)
                .material_rule(&["MATCH", "*", "WITH", "PRODUCTS", "FROM", "compile"])
                .material_rule(&["DISALLOW", "*"])
                .product_rule(&["MATCH", "hello*", "WITH", "PRODUCTS", "FROM", "compile"])
                .product_rule(&["CREATE", "greeting.txt"])
                .product_rule(&["DISALLOW", "*"]),
        )
        .build()?;
    let layout_path = root.join("demo.layout");
    std::fs::write(&layout_path, sign_layout(&layout, &owner)?)?;
    let owner_pub = root.join("owner.pub");
    std::fs::write(&owner_pub, owner.public_key().to_spki_pem())?;
    std::fs::write(root.join("runner.pub"), &runner_key.pem)?;
    Ok((layout_path, owner_pub))
}

/// Checks the links with `kiln verify`, and with the reference in-toto-verify when found.
fn verify_links(
    layout_path: &Path,
    owner_pub: &Path,
    links: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    println!("4. verifying the links against a layout signed by a fresh owner key:");
    let code = crate::cli::verify::run(layout_path, &[owner_pub.to_path_buf()], links, Some(out))?;
    if code != 0 {
        bail!("verification failed");
    }
    if let Some(in_toto) = find_in_toto_verify() {
        let status = std::process::Command::new(&in_toto)
            .arg("--layout")
            .arg(layout_path)
            .arg("--verification-keys")
            .arg(owner_pub)
            .arg("--link-dir")
            .arg(links)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        println!(
            "   in-toto-verify ({}): {}",
            in_toto.display(),
            if status.success() { "PASSED" } else { "FAILED" }
        );
        if !status.success() {
            bail!("in-toto-verify rejected the links");
        }
    } else {
        println!("   (in-toto-verify not found; `pip install in-toto==3.1.0` to check with the reference verifier too)");
    }
    Ok(())
}

fn find_in_toto_verify() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("KILN_IN_TOTO_VERIFY") {
        return Some(path.into());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("in-toto-verify"))
            .find(|p| p.is_file())
    })
}

async fn wait_for_daemon(daemon: &mut Daemon, socket: &Path, log: &Path) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = daemon.child.try_wait()? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            bail!("the daemon exited ({status}):\n{text}");
        }
        if socket.exists() {
            if let Ok(client) = Client::connect(socket).await {
                return Ok(client);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon did not start within 20 s (log: {})",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
