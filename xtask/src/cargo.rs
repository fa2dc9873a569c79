//! Cargo invocations that need to know what was built (executables from JSON messages) or what
//! exists (test targets from `cargo metadata`).
use std::{
    env,
    io::BufReader,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use cargo_metadata::{Message, MetadataCommand, TargetKind};

use crate::util::{display, root};

pub const TESTS_PACKAGE: &str = "palisade-tests";
/// Test targets of the test crate whose name starts with this run inside the QEMU guest.
pub const GUEST_PREFIX: &str = "guest_";

/// A `cargo` command at the workspace root that always builds the real eBPF object.
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root()).env_remove("AYA_BUILD_SKIP");
    cmd
}

/// One executable cargo produced.
#[derive(Debug, Clone)]
pub struct Executable {
    pub target: String,
    pub path: PathBuf,
}

/// Runs `cargo <args> --message-format=json-render-diagnostics` and returns the executables
/// it reported; diagnostics still reach the terminal.
pub fn build_executables(args: &[&str]) -> Result<Vec<Executable>> {
    let mut cmd = cargo();
    cmd.args(args)
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped());
    eprintln!("[xtask] $ {}", display(&cmd));
    let mut child = cmd.spawn().context("spawning cargo")?;
    let stdout = child.stdout.take().expect("piped");
    let mut out = Vec::new();
    for message in Message::parse_stream(BufReader::new(stdout)) {
        if let Message::CompilerArtifact(artifact) = message?
            && let Some(path) = artifact.executable
        {
            out.push(Executable {
                target: artifact.target.name.clone(),
                path: path.into(),
            });
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{}` failed: {status}", display(&cmd));
    }
    Ok(out)
}

/// Builds the `palisade` binary (with the real eBPF object) and returns its path.
pub fn build_palisade(release: bool) -> Result<PathBuf> {
    let mut args = vec!["build", "-p", "palisade", "--bin", "palisade"];
    if release {
        args.push("--release");
    }
    build_executables(&args)?
        .into_iter()
        .find(|e| e.target == "palisade")
        .map(|e| e.path)
        .context("cargo built no `palisade` executable")
}

/// Builds the test crate's `guest_*` test executables without running them.
pub fn build_guest_tests() -> Result<Vec<Executable>> {
    let guest = test_targets()?
        .into_iter()
        .filter(|t| t.starts_with(GUEST_PREFIX))
        .collect::<Vec<_>>();
    if guest.is_empty() {
        return Ok(Vec::new());
    }
    let mut args = vec!["test", "-p", TESTS_PACKAGE, "--no-run"];
    for t in &guest {
        args.extend(["--test", t.as_str()]);
    }
    let exes = build_executables(&args)?;
    Ok(exes
        .into_iter()
        .filter(|e| guest.contains(&e.target))
        .collect())
}

/// Names of the test crate's integration-test targets (`[[test]]`).
pub fn test_targets() -> Result<Vec<String>> {
    let metadata = MetadataCommand::new()
        .current_dir(root())
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == TESTS_PACKAGE)
        .with_context(|| format!("no package {TESTS_PACKAGE} in the workspace"))?;
    Ok(package
        .targets
        .iter()
        .filter(|t| t.kind.contains(&TargetKind::Test))
        .map(|t| t.name.clone())
        .collect())
}
