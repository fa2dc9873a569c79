//! `cargo xtask bench`: what enforcement costs a containerised process, measured inside real
//! Docker containers against a no-agent baseline taken in the same run.
//!
//! Phases, each in a fresh container (`--network host`, a host directory of small files
//! bind-mounted at /bench, the static `bench_ops` program copied in):
//! 1. baseline: no agent running (measured before the agent starts and again after it
//!    stopped, so drift of a shared machine shows);
//! 2. default: the release agent (`--enforcer compat`) running, the container under the node
//!    default (monitor, no rules);
//! 3. enforce: the same agent, the container selected by an enforce policy that allows the
//!    workload (and denies the rest, which is checked before measuring).
//!
//! Each operation is run `--reps` times per phase (fresh files for the uncached opens) and the
//! median ns/op is reported. Another `palisade agent` on the machine would police our
//! containers too, so phases wait until none is running and are redone if one appeared.
use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    cargo, docker,
    util::{capture, display, root, run},
};

/// Iterations per run of each operation: bounded so the whole bench stays within minutes.
const OPEN_DISTINCT_N: usize = 4000;
const OPEN_SAME_N: usize = 50_000;
const EXEC_N: usize = 400;
const CONNECT_N: usize = 2000;
const SYSCALL_N: usize = 200_000;
const POLICY_NAME: &str = "bench-enforce";
const ENFORCE_LABEL: &str = "palisade.bench=enforce";
/// How long to wait for another helper's agent to finish before giving up.
const QUIET_TIMEOUT: Duration = Duration::from_secs(900);

pub struct BenchOptions {
    pub reps: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Baseline,
    Default,
    Enforce,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Baseline => "baseline",
            Phase::Default => "default",
            Phase::Enforce => "enforce",
        }
    }
}

#[derive(Clone, Copy)]
enum Op {
    OpenUncached,
    OpenCached,
    Exec,
    Connect,
    /// One cheap syscall: what the tier-2 syscall hooks cost every process of the node.
    Syscall,
}

const OPS: [Op; 5] = [
    Op::Syscall,
    Op::OpenUncached,
    Op::OpenCached,
    Op::Exec,
    Op::Connect,
];

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::OpenUncached => "open+read+close, uncached",
            Op::OpenCached => "open+read+close, cached",
            Op::Exec => "fork+exec+wait /bin/true",
            Op::Connect => "TCP connect 127.0.0.1",
            Op::Syscall => "getppid (any syscall)",
        }
    }
}

/// Everything the phases share: the work directory, the program, the loopback listeners.
struct Rig {
    dir: PathBuf,
    bench_ops: PathBuf,
    palisade: PathBuf,
    port: u16,
    denied_port: u16,
    reps: usize,
}

pub fn bench(opts: &BenchOptions) -> Result<()> {
    let started = Instant::now();
    let palisade = cargo::build_palisade(true)?;
    docker::docker_up()?;
    docker::image()?;
    let dir = std::env::temp_dir().join(format!("palisade-bench-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("files"))?;
    let bench_ops = dir.join("bench_ops");
    run(Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bench_ops)
        .arg(root().join("tests/programs/bench_ops.c")))?;
    let (port, denied_port) = (free_port()?, free_port()?);
    let rig = Rig {
        dir: dir.clone(),
        bench_ops,
        palisade,
        port,
        denied_port,
        reps: opts.reps.max(1),
    };
    let result = rig.all_phases();
    if result.is_err() {
        eprintln!(
            "[xtask] bench failed; agent log and files kept in {}",
            dir.display()
        );
    } else {
        let _ = fs::remove_dir_all(&dir);
    }
    let results = result?;
    print_table(&results, rig.reps);
    eprintln!(
        "[xtask] bench done in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A loopback port nobody listens on now. `bench_ops connect` listens on it itself (with a
/// backlog std's `TcpListener` cannot set); the enforce policy allows exactly it.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// ns/op samples of one phase, per operation in [`OPS`] order, and execs denied by mistake.
#[derive(Default)]
struct Samples {
    ns: [Vec<u64>; 5],
    denied_execs: u64,
}

/// Every phase's samples: baseline (before and after the agent ran), default, enforce.
struct Results {
    baseline_before: Samples,
    baseline_after: Samples,
    default: Samples,
    enforce: Samples,
}

impl Rig {
    fn all_phases(&self) -> Result<Results> {
        let baseline_before = self.phase_retrying(Phase::Baseline, None, "before")?;
        let agent_dir = self.dir.join("agent");
        fs::create_dir_all(agent_dir.join("policies"))?;
        wait_quiet(None)?;
        let agent = BenchAgent::start(&self.palisade, &agent_dir)?;
        // The default phase runs on a node with no policy at all (only the node default); the
        // enforce policy arrives through the watched directory before the enforce phase.
        let default = self.phase_retrying(Phase::Default, Some(&agent), "")?;
        fs::write(agent_dir.join("policies/bench.yaml"), policy(self.port))?;
        let enforce = self.phase_retrying(Phase::Enforce, Some(&agent), "")?;
        drop(agent);
        let baseline_after = self.phase_retrying(Phase::Baseline, None, "after")?;
        Ok(Results {
            baseline_before,
            baseline_after,
            default,
            enforce,
        })
    }

    /// Runs a phase; if another agent ran meanwhile (it would have policed our container), runs
    /// it again.
    fn phase_retrying(
        &self,
        phase: Phase,
        agent: Option<&BenchAgent>,
        round: &str,
    ) -> Result<Samples> {
        let ours = agent.map(BenchAgent::pid);
        for attempt in 1..=3 {
            wait_quiet(ours)?;
            let samples =
                self.phase(phase, agent, &format!("{}{round}-{attempt}", phase.name()))?;
            if other_agents(ours).is_empty() {
                return Ok(samples);
            }
            eprintln!(
                "[xtask] bench: another palisade agent started during the {} phase; redoing it",
                phase.name()
            );
        }
        bail!("other palisade agents kept interfering with the benchmark")
    }

    fn phase(&self, phase: Phase, agent: Option<&BenchAgent>, tag: &str) -> Result<Samples> {
        eprintln!("[xtask] bench: {tag} phase");
        // Fresh files per phase and repetition: the first open of each is a real first open.
        let files = self.dir.join("files").join(tag);
        for rep in 0..self.reps {
            let d = files.join(format!("r{rep}"));
            fs::create_dir_all(&d)?;
            for i in 0..OPEN_DISTINCT_N {
                fs::write(d.join(format!("f{i}")), b"palisade bench\n")?;
            }
        }
        fs::write(files.join("same"), b"palisade bench\n")?;
        let labels: &[&str] = if phase == Phase::Enforce {
            &["--label", ENFORCE_LABEL]
        } else {
            &[]
        };
        let c = BenchContainer::start(
            &format!("palisade-bench-{}-{tag}", std::process::id()),
            &files,
            &self.bench_ops,
            labels,
        )?;
        if let Some(agent) = agent {
            let want = (phase == Phase::Enforce).then_some(POLICY_NAME);
            agent.wait_bound(&c.id, want)?;
        }
        self.sanity(phase, &c)?;
        let mut samples = Samples::default();
        for rep in 0..self.reps {
            for (i, op) in OPS.iter().enumerate() {
                let (ns, denied) = self.measure(&c, *op, rep)?;
                samples.ns[i].push(ns);
                samples.denied_execs += denied;
            }
        }
        for (op, s) in OPS.iter().zip(&samples.ns) {
            eprintln!("[xtask] bench: {tag:>16} {:<28} ns/op {s:?}", op.label());
        }
        if samples.denied_execs > 0 {
            eprintln!(
                "[xtask] bench: WARNING: {} allowed execs failed with EPERM in the {tag} phase",
                samples.denied_execs
            );
        }
        Ok(samples)
    }

    /// Checks the container is in the state the phase claims: in the enforce phase the
    /// workload is allowed and something else is denied (else we would measure nothing).
    fn sanity(&self, phase: Phase, c: &BenchContainer) -> Result<()> {
        let open_other = c.exec(&["/bench_ops", "probe-open", "/etc/passwd"])?;
        let conn_other = c.exec(&[
            "/bench_ops",
            "probe-connect",
            "127.0.0.1",
            &self.denied_port.to_string(),
        ])?;
        let open_ok = c.exec(&["/bench_ops", "probe-open", "/bench/same"])?;
        let conn_ok = c.exec(&[
            "/bench_ops",
            "probe-connect",
            "127.0.0.1",
            &self.port.to_string(),
        ])?;
        let (open_denied, conn_denied) = if phase == Phase::Enforce {
            ("EPERM", "EPERM")
        } else {
            ("ok", "allowed")
        };
        let got = [
            open_ok.as_str(),
            conn_ok.as_str(),
            open_other.as_str(),
            conn_other.as_str(),
        ];
        if got != ["ok", "allowed", open_denied, conn_denied] {
            bail!(
                "{} phase: unexpected probe results (allowed open, allowed connect, other open, \
                 other connect) = {got:?}",
                phase.name()
            );
        }
        Ok(())
    }

    /// One run: (ns/op, execs that failed with EPERM).
    fn measure(&self, c: &BenchContainer, op: Op, rep: usize) -> Result<(u64, u64)> {
        let port = self.port.to_string();
        let (n, dir) = (format!("{}", iterations(op)), format!("/bench/r{rep}"));
        let args: Vec<&str> = match op {
            Op::OpenUncached => vec!["open-distinct", &dir, &n],
            Op::OpenCached => vec!["open-same", "/bench/same", &n],
            Op::Exec => vec!["exec", "/bin/true", &n],
            Op::Connect => vec!["connect", "127.0.0.1", &port, &n],
            Op::Syscall => vec!["syscall", &n],
        };
        let mut cmd = vec!["/bench_ops"];
        cmd.extend(args);
        let out = c.exec(&cmd)?;
        let mut fields = out.split_whitespace().map(str::parse::<u64>);
        match (fields.next(), fields.next()) {
            (Some(Ok(ns)), Some(Ok(denied))) => Ok((ns, denied)),
            (Some(Ok(ns)), None) => Ok((ns, 0)),
            _ => bail!("bench_ops printed {out:?} for {}", op.label()),
        }
    }
}

fn iterations(op: Op) -> usize {
    match op {
        Op::OpenUncached => OPEN_DISTINCT_N,
        Op::OpenCached => OPEN_SAME_N,
        Op::Exec => EXEC_N,
        Op::Connect => CONNECT_N,
        Op::Syscall => SYSCALL_N,
    }
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Allows exactly the workload: the two programs, the bench files (read and write, so the
/// ignore-mark cache may hold them), the files busybox and the runtime touch, one port.
fn policy(port: u16) -> String {
    let (key, value) = ENFORCE_LABEL.split_once('=').expect("label has a value");
    format!(
        r#"apiVersion: palisade.dev/v1
kind: ContainerPolicy
metadata:
  name: {POLICY_NAME}
spec:
  mode: enforce
  selector:
    labels: {{{key}: "{value}"}}
  exec:
    allow: [/bin/busybox, /bench_ops]
  files:
    - {{path: /bench/, access: any}}
    - {{path: /dev/, access: any}}
    - {{path: /proc/, access: any}}
  network:
    egress:
      - {{cidr: 127.0.0.1/32, ports: [{port}], protocol: tcp}}
"#
    )
}

fn print_table(r: &Results, reps: usize) {
    let kernel = capture(Command::new("uname").arg("-r")).unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\nPalisade benchmark: median of {reps} runs per phase (baseline: {} runs, before and \
         after the agent), ns per operation inside a Docker container; {cpus} CPUs, kernel {}; \
         agent --enforcer compat\n",
        2 * reps,
        kernel.trim()
    );
    println!(
        "| operation | iterations | baseline | default policy | enforce | default / baseline | enforce / baseline |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, op) in OPS.iter().enumerate() {
        let all: Vec<u64> = [&r.baseline_before.ns[i], &r.baseline_after.ns[i]]
            .into_iter()
            .flatten()
            .copied()
            .collect();
        let b = median(&all);
        let (d, e) = (median(&r.default.ns[i]), median(&r.enforce.ns[i]));
        let ratio = |x: u64| x as f64 / b.max(1) as f64;
        println!(
            "| {} | {} | {b} | {d} | {e} | {:.2} | {:.2} |",
            op.label(),
            iterations(*op),
            ratio(d),
            ratio(e)
        );
    }
    println!("\nbaseline before / after the agent ran (drift check):");
    for (i, op) in OPS.iter().enumerate() {
        println!(
            "  {:<28} {} / {} ns/op",
            op.label(),
            median(&r.baseline_before.ns[i]),
            median(&r.baseline_after.ns[i])
        );
    }
    let denied = r.default.denied_execs + r.enforce.denied_execs;
    if denied > 0 {
        println!(
            "\nWARNING: {denied} allowed execs failed with EPERM (default {}, enforce {}).",
            r.default.denied_execs, r.enforce.denied_execs
        );
    }
}

/// Pids of running `palisade agent` processes other than `ours` (read-only check). Fanotify
/// holders share the agent's command line but police nothing themselves: skipped.
fn other_agents(ours: Option<u32>) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-f", "palisade agent"])
        .stderr(Stdio::null())
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|p| Some(*p) != ours)
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() != "palisade-fanhld")
        })
        .collect()
}

fn wait_quiet(ours: Option<u32>) -> Result<()> {
    let start = Instant::now();
    let mut told = false;
    loop {
        let others = other_agents(ours);
        if others.is_empty() {
            return Ok(());
        }
        if start.elapsed() > QUIET_TIMEOUT {
            bail!("other palisade agents ({others:?}) still running after {QUIET_TIMEOUT:?}");
        }
        if !told {
            eprintln!("[xtask] bench: waiting for other palisade agents {others:?} to exit");
            told = true;
        }
        thread::sleep(Duration::from_secs(2));
    }
}

/// A container removed when dropped.
struct BenchContainer {
    id: String,
}

impl BenchContainer {
    fn start(name: &str, files: &Path, bench_ops: &Path, labels: &[&str]) -> Result<Self> {
        let _ = capture(Command::new("docker").args(["rm", "-f", name]));
        let mount = format!("{}:/bench:ro", files.display());
        let id = capture(
            Command::new("docker")
                .args(["create", "--name", name, "--network", "host", "-v", &mount])
                .args(labels)
                .args([docker::IMAGE, "sleep", "600"]),
        )?
        .trim()
        .to_string();
        let c = BenchContainer { id };
        capture(
            Command::new("docker")
                .arg("cp")
                .arg(bench_ops)
                .arg(format!("{}:/bench_ops", c.id)),
        )?;
        capture(Command::new("docker").args(["start", &c.id]))?;
        Ok(c)
    }

    /// `docker exec`, trimmed stdout; a non-zero exit is an error with its stderr.
    fn exec(&self, cmd: &[&str]) -> Result<String> {
        let out = capture(Command::new("docker").args(["exec", &self.id]).args(cmd))?;
        Ok(out.trim().to_string())
    }
}

impl Drop for BenchContainer {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The release agent with its own socket, state, pins, audit log and policy directory under
/// `dir`; stopped (SIGTERM, then SIGKILL) when dropped.
struct BenchAgent {
    child: Child,
    exe: PathBuf,
    dir: PathBuf,
    pin_dir: PathBuf,
}

impl BenchAgent {
    fn start(exe: &Path, dir: &Path) -> Result<Self> {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/palisade-bench-{}", std::process::id()));
        let mut cmd = Command::new(exe);
        cmd.arg("agent")
            .args(["--enforcer", "compat", "--policy-dir"])
            .arg(dir.join("policies"))
            .arg("--socket")
            .arg(dir.join("api.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--audit-log")
            .arg(dir.join("audit.jsonl"))
            .arg("--pin-dir")
            .arg(&pin_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("agent.log"))?);
        eprintln!("[xtask] $ {}", display(&cmd));
        let child = cmd.spawn().context("spawning palisade agent")?;
        let mut agent = BenchAgent {
            child,
            exe: exe.to_path_buf(),
            dir: dir.to_path_buf(),
            pin_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if agent.cli(&["status"]).is_ok() {
                return Ok(agent);
            }
            if let Some(st) = agent.child.try_wait()? {
                bail!("agent exited with {st}:\n{}", agent.log());
            }
            thread::sleep(Duration::from_millis(200));
        }
        bail!("agent did not answer within 60s:\n{}", agent.log())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        capture(
            Command::new(&self.exe)
                .arg("--socket")
                .arg(self.dir.join("api.sock"))
                .args(args),
        )
    }

    /// Waits until the agent lists the container under `policy` (`None`: the node default).
    fn wait_bound(&self, id: &str, policy: Option<&str>) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        // The JSON listing is one array of objects; a substring test on the container's own
        // object avoids a JSON dependency here.
        let want = match policy {
            Some(p) => format!("\"policy\":\"{p}\""),
            None => "\"policy\":null".to_string(),
        };
        while Instant::now() < deadline {
            let out = self.cli(&["containers", "-o", "json"]).unwrap_or_default();
            let compact: String = out.chars().filter(|c| !c.is_whitespace()).collect();
            let bound = compact
                .split("{\"meta\":")
                .any(|obj| obj.contains(&format!("\"id\":\"{id}\"")) && obj.contains(&want));
            if bound {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "container {id} never listed under {}:\n{}",
            policy.unwrap_or("the node default"),
            self.log()
        )
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        } else {
            let _ = fs::remove_dir_all(&self.pin_dir);
            return;
        }
        // A killed agent leaves its fanotify holder (and pinned links): end the holder by the
        // pid it recorded (only now: after a clean shutdown that pid may be reused).
        if let Ok(s) = fs::read_to_string(self.dir.join("state/fanotify-holder.pid"))
            && let Some(pid) = s.split_whitespace().next()
        {
            let _ = Command::new("kill")
                .args(["-KILL", pid])
                .stderr(Stdio::null())
                .status();
        }
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
}
