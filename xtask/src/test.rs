//! `cargo xtask test`: everything, in order, with one summary at the end.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{
    bootstrap::{self, GuestKernel},
    cargo::{self, GUEST_PREFIX, TESTS_PACKAGE, cargo},
    docker,
    report::{self, Counts, Step},
    util::{display, phase},
    vm::{self, GuestOptions},
};

#[derive(Debug, Clone)]
pub struct TestOptions {
    /// The guest kernels to boot, each a step of its own.
    pub kernels: Vec<GuestKernel>,
    pub skip_guest: bool,
    pub skip_host: bool,
    pub only_guest: bool,
    pub no_lint: bool,
    pub guest: GuestOptions,
}

/// What a step returns when it ran to completion: test counts and a note for the summary.
type StepResult = Result<(Counts, String)>;

struct Runner {
    start: Instant,
    steps: Vec<Step>,
}

impl Runner {
    /// Runs one step, recording its outcome; returns whether it passed.
    fn step(&mut self, name: &str, f: impl FnOnce() -> StepResult) -> bool {
        phase(self.start, name);
        let begun = Instant::now();
        let (ok, counts, note) = match f() {
            Ok((counts, note)) => (counts.failed == 0, counts, note),
            Err(e) => {
                eprintln!("[xtask] {name} failed: {e:#}");
                (
                    false,
                    Counts::default(),
                    format!("{e:#}").lines().next().unwrap_or("").to_string(),
                )
            }
        };
        self.steps.push(Step {
            name: name.into(),
            ok,
            counts,
            elapsed: begun.elapsed(),
            note,
        });
        ok
    }

    fn skipped(&mut self, name: &str, why: &str) {
        eprintln!("[xtask] skipping {name}: {why}");
    }
}

/// Runs the suites selected by `opts`; prints the summary and returns whether all passed.
pub fn test(opts: &TestOptions) -> Result<bool> {
    let mut r = Runner {
        start: Instant::now(),
        steps: Vec::new(),
    };
    let host = !opts.only_guest && !opts.skip_host;
    let guest = !opts.skip_guest;

    if r.step("bootstrap", || bootstrap::bootstrap().map(|_| none())) {
        if host {
            r.step("docker-up", || docker::docker_up().map(|_| none()));
            r.step("image", || docker::image().map(|_| none()));
        }
        if opts.only_guest || opts.no_lint {
            r.skipped("lint", "disabled by flag");
        } else {
            r.step("fmt", || plain(cargo().args(["fmt", "--all", "--check"])));
            r.step("clippy", || plain(cargo().args(clippy_args())));
        }
        if opts.only_guest {
            r.skipped("unit tests", "--only-guest");
        } else {
            r.step("unit tests", || {
                counted(cargo().args([
                    "test",
                    "--workspace",
                    "--exclude",
                    "agent-ebpf",
                    "--lib",
                    "--bins",
                ]))
            });
        }
        if host {
            r.step("host integration", host_integration);
        } else {
            r.skipped("host integration", "disabled by flag");
        }
        if guest {
            // One initramfs for every kernel; a failed build fails every kernel's step.
            let initramfs = vm::prepare(&opts.guest).map_err(|e| format!("{e:#}"));
            for k in &opts.kernels {
                let g = GuestOptions {
                    kernel: *k,
                    ..opts.guest.clone()
                };
                r.step(&format!("guest {} (QEMU, BPF-LSM)", k.name), || {
                    let initramfs = initramfs.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
                    guest_suite(initramfs, &g)
                });
            }
        } else {
            r.skipped("guest", "--skip-guest");
        }
    }

    let totals = report::totals(&r.steps);
    let ok = r.steps.iter().all(|s| s.ok);
    println!("\n==================== palisade test summary ====================");
    for step in &r.steps {
        println!("{step}");
    }
    println!(
        "total {:.1}s: {}",
        r.start.elapsed().as_secs_f64(),
        if ok { "ALL PASSED" } else { "FAILED" }
    );
    println!("{} passed, {} failed", totals.passed, totals.failed);
    Ok(ok)
}

/// agent-ebpf is a BPF-target crate (built by agent/build.rs), not a host crate.
fn clippy_args() -> [&'static str; 8] {
    [
        "clippy",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]
}

fn none() -> (Counts, String) {
    (Counts::default(), String::new())
}

/// The test crate's integration tests that run on the host (every `[[test]]` except guest_*).
fn host_integration() -> StepResult {
    let targets: Vec<String> = cargo::test_targets()?
        .into_iter()
        .filter(|t| !t.starts_with(GUEST_PREFIX))
        .collect();
    if targets.is_empty() {
        return Ok((Counts::default(), "no host test targets yet".into()));
    }
    // The end-to-end tests run the real agent binary (with the real eBPF object).
    let palisade = cargo::build_palisade(false)?;
    let mut cmd = cargo();
    cmd.env("PALISADE_BIN", &palisade);
    cmd.args(["test", "-p", TESTS_PACKAGE, "--no-fail-fast"]);
    for t in &targets {
        cmd.args(["--test", t]);
    }
    cmd.args(["--", "--test-threads=1"]);
    counted(&mut cmd)
}

fn guest_suite(initramfs: &std::path::Path, opts: &GuestOptions) -> StepResult {
    let outcome = vm::boot_kernel(initramfs, opts)?;
    let summary = outcome.summary();
    eprintln!("[xtask] {summary}");
    // The self-checks are not libtest binaries: count each as one test.
    let mut counts = outcome.counts;
    for (name, code) in &outcome.results {
        if name.starts_with("selfcheck") {
            if *code == 0 {
                counts.passed += 1;
            } else {
                counts.failed += 1;
            }
        }
    }
    if !outcome.passed() {
        // A failed binary or a crash with no failed test line still has to show as a failure.
        counts.failed = counts.failed.max(1);
    }
    Ok((counts, summary))
}

/// Runs a command with inherited output; only its exit status matters.
fn plain(cmd: &mut Command) -> StepResult {
    crate::util::run(cmd)?;
    Ok(none())
}

/// Runs a `cargo test` command, streaming its stdout and summing libtest's result lines.
fn counted(cmd: &mut Command) -> StepResult {
    eprintln!("[xtask] $ {}", display(cmd));
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("spawning cargo")?;
    let mut counts = Counts::default();
    let mut results = 0;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(c) = report::parse_libtest(&line) {
            counts += c;
            results += 1;
        }
    }
    let status = child.wait()?;
    if !status.success() && counts.failed == 0 {
        bail!("`{}` failed: {status}", display(cmd));
    }
    Ok((counts, format!("{results} test binaries")))
}
