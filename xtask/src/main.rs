//! `cargo xtask`: bootstrap, build, run and test Palisade (host and QEMU guest).
mod bench;
mod bootstrap;
mod cargo;
mod cpio;
mod docker;
mod report;
mod test;
mod util;
mod vm;

use std::{os::unix::process::CommandExt, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Palisade developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh Debian 12 machine lacks (apt packages, rust-src, bpf-linker, guest
    /// kernel). Idempotent.
    Bootstrap,
    /// Start dockerd (no bridge, no iptables) unless a daemon already answers.
    DockerUp,
    /// Build and import the `palisade-test:latest` image (static busybox) if it changed.
    Image,
    /// Build the agent with its eBPF object.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build (release) and run `palisade agent [ARGS...]`.
    Run {
        /// Arguments for `palisade agent` (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Everything: bootstrap, lint, unit, host integration and guest tests.
    Test(TestArgs),
    /// Run the `guest_*` tests in a QEMU guest booted with BPF-LSM.
    Guest(GuestArgs),
    /// Measure enforcement overhead in real containers against a no-agent baseline
    /// (docs/benchmarks.md). Not part of `test`.
    Bench {
        /// Runs of each operation per phase (the median is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
}

#[derive(Args)]
struct TestArgs {
    /// Do not run the QEMU guest suite.
    #[arg(long)]
    skip_guest: bool,
    /// Do not run the host integration tests (nor start docker for them).
    #[arg(long)]
    skip_host: bool,
    /// Only bootstrap and run the guest suite.
    #[arg(long, conflicts_with_all = ["skip_guest", "skip_host"])]
    only_guest: bool,
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Guest timeout in seconds (per kernel).
    #[arg(long, default_value_t = 300)]
    guest_timeout: u64,
    /// Boot only these kernels of the matrix (repeatable; default: all of them).
    #[arg(long = "kernel", value_name = "NAME")]
    kernels: Vec<String>,
}

#[derive(Args)]
struct GuestArgs {
    /// The kernel of the matrix to boot (`6.1`, `6.12`).
    #[arg(long, default_value = "6.1")]
    kernel: String,
    /// After the tests, open a shell on the guest console instead of powering off.
    #[arg(long)]
    keep: bool,
    /// Kill the VM after this many seconds (ignored with --keep).
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Extra arguments for every guest test binary (e.g. a test-name filter), after `--`.
    #[arg(last = true)]
    test_args: Vec<String>,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("[xtask] error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<bool> {
    match Cli::parse().command {
        Cmd::Bootstrap => {
            let started = std::time::Instant::now();
            bootstrap::bootstrap()?;
            eprintln!(
                "[xtask] bootstrap done in {:.1}s",
                started.elapsed().as_secs_f64()
            );
        }
        Cmd::DockerUp => docker::docker_up()?,
        Cmd::Image => {
            docker::docker_up()?;
            docker::image()?;
        }
        Cmd::Build { release } => {
            bootstrap::bootstrap()?;
            let exe = cargo::build_palisade(release)?;
            eprintln!("[xtask] built {}", exe.display());
        }
        Cmd::Run { args } => {
            bootstrap::bootstrap()?;
            let exe = cargo::build_palisade(true)?;
            // The agent watches Docker when it is there; without it the agent still runs.
            if let Err(e) = docker::docker_up() {
                eprintln!("[xtask] warning: docker unavailable: {e:#}");
            }
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("agent").args(&args);
            eprintln!("[xtask] $ {}", util::display(&cmd));
            // exec: signals (Ctrl-C, SIGTERM) go straight to the agent.
            return Err(cmd.exec()).with_context(|| format!("exec {}", exe.display()));
        }
        Cmd::Test(t) => {
            let kernels = if t.kernels.is_empty() {
                bootstrap::KERNELS.to_vec()
            } else {
                t.kernels
                    .iter()
                    .map(|k| bootstrap::GuestKernel::named(k))
                    .collect::<Result<_>>()?
            };
            let opts = test::TestOptions {
                kernels,
                skip_guest: t.skip_guest,
                skip_host: t.skip_host,
                only_guest: t.only_guest,
                no_lint: t.no_lint,
                guest: vm::GuestOptions {
                    kernel: bootstrap::KERNELS[0],
                    keep: false,
                    timeout: Duration::from_secs(t.guest_timeout),
                    test_args: Vec::new(),
                },
            };
            return test::test(&opts);
        }
        Cmd::Guest(g) => {
            let opts = vm::GuestOptions {
                kernel: bootstrap::GuestKernel::named(&g.kernel)?,
                keep: g.keep,
                timeout: Duration::from_secs(g.timeout),
                test_args: g.test_args,
            };
            let outcome = vm::guest(&opts)?;
            eprintln!("[xtask] {}", outcome.summary());
            let failed =
                outcome.results.iter().filter(|r| r.1 != 0).count() + usize::from(!outcome.done);
            let passed =
                outcome.results.len() - outcome.results.iter().filter(|r| r.1 != 0).count();
            println!("{passed} passed, {failed} failed");
            return Ok(outcome.passed());
        }
        Cmd::Bench { reps } => bench::bench(&bench::BenchOptions { reps })?,
    }
    Ok(true)
}
