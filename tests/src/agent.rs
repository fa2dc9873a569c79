//! A real `palisade agent` process for end-to-end tests: its own policy directory, API socket,
//! state and pin directories; events collected from its `--events-stdout` JSON lines.
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The `palisade` binary: `$PALISADE_BIN`, else `target/debug/palisade` of this workspace
/// (`cargo xtask test` builds it before the integration tests).
pub fn palisade_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PALISADE_BIN") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/palisade");
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p palisade` first (cargo xtask test does)",
        p.display()
    );
    p
}

/// Tests that run an agent take this lock: two agents would both police every container.
pub static AGENT_LOCK: Mutex<()> = Mutex::new(());

/// Is another `palisade agent` running on this machine (its binary named `palisade`, first
/// argument `agent`)? Read from /proc: `pgrep -f` would also match shells mentioning the words.
pub fn other_agent_running() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.filter_map(Result::ok).any(|e| {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            return false;
        };
        let mut args = cmd.split(|b| *b == 0);
        let bin = args.next().unwrap_or_default();
        bin.rsplit(|b| *b == b'/').next() == Some(b"palisade".as_slice())
            && args.next() == Some(b"agent".as_slice())
    })
}

/// The agent lock, once no other agent runs on this machine (another test binary's, or a
/// developer's): take it before [`Agent::start`].
pub fn exclusive() -> MutexGuard<'static, ()> {
    let guard = AGENT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let deadline = Instant::now() + Duration::from_secs(1800);
    while other_agent_running() {
        assert!(
            Instant::now() < deadline,
            "another palisade agent kept running"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    guard
}

pub struct Agent {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub policy_dir: PathBuf,
    events: Arc<Mutex<Vec<Value>>>,
    args: Vec<String>,
}

impl Agent {
    /// Start with the given extra arguments and wait until the API answers.
    pub fn start(name: &str, extra: &[&str]) -> Result<Agent> {
        let dir = std::env::temp_dir().join(format!("palisade-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let policy_dir = dir.join("policies");
        std::fs::create_dir_all(&policy_dir)?;
        let mut a = Agent {
            child: None,
            socket: dir.join("api.sock"),
            policy_dir,
            dir,
            events: Arc::new(Mutex::new(Vec::new())),
            args: extra.iter().map(|s| s.to_string()).collect(),
        };
        a.spawn()?;
        Ok(a)
    }

    fn spawn(&mut self) -> Result<()> {
        let d = &self.dir;
        let mut cmd = Command::new(palisade_bin());
        cmd.arg("agent")
            .arg("--policy-dir")
            .arg(&self.policy_dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(d.join("state"))
            .arg("--pin-dir")
            .arg(format!("/sys/fs/bpf/palisade-test-{}", std::process::id()))
            .arg("--audit-log")
            .arg(d.join("audit.jsonl"))
            .arg("--events-stdout")
            .args(&self.args)
            .env(
                "PALISADE_LOG",
                std::env::var("PALISADE_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(d.join("agent.log"))?);
        let mut child = cmd.spawn().context("spawning palisade agent")?;
        let out = child.stdout.take().context("stdout")?;
        let events = self.events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    events.lock().unwrap_or_else(|e| e.into_inner()).push(v);
                }
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.socket.exists() && self.cli(&["status"]).is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                bail!("agent exited with {st}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("agent did not become ready: {}", self.log())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Run the CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(palisade_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()?)
    }

    /// Write a policy file and wait until the agent reports it applied (or rejected).
    pub fn write_policy(&self, file: &str, yaml: &str) -> Result<()> {
        let before = self.events().len();
        let tmp = self.policy_dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.policy_dir.join(file))?;
        self.wait_event_from(before, Duration::from_secs(10), |e| e["kind"] == "policy")
            .map(drop)
            .with_context(|| format!("no policy event after writing {file}"))
    }

    pub fn events(&self) -> Vec<Value> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn event_count(&self) -> usize {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// First event (from index `from`) matching `pred`, waiting up to `timeout`.
    pub fn wait_event_from(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.events().into_iter().skip(from).find(|v| pred(v)) {
                return Some(v);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until the agent lists container `id` under `policy` (panics after 10 s).
    pub fn wait_bound(&self, id: &str, policy: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let out = self.cli(&["containers", "-o", "json"]).ok();
            let list: Value = out
                .and_then(|o| serde_json::from_slice(&o.stdout).ok())
                .unwrap_or(Value::Null);
            let bound = list.as_array().is_some_and(|l| {
                l.iter()
                    .any(|c| c["meta"]["id"] == id && c["policy"] == policy)
            });
            if bound {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "container {id} never bound to {policy}; agent log:\n{}",
            self.log()
        );
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL the agent (crash), leaving its pinned programs and fanotify holder behind.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again after [`Agent::crash`] with the same directories.
    pub fn restart(&mut self) -> Result<()> {
        self.spawn()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        // A crashed test agent can leave its fanotify holder: end it by the pid it recorded.
        if let Ok(s) = std::fs::read_to_string(self.dir.join("state/fanotify-holder.pid"))
            && let Some(pid) = s
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ =
            std::fs::remove_dir_all(format!("/sys/fs/bpf/palisade-test-{}", std::process::id()));
    }
}

/// Compile a static helper program from `tests/programs/<name>.c` into `out_dir`.
pub fn build_program(name: &str, out_dir: &Path) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("programs/{name}.c"));
    let out = out_dir.join(name);
    let st = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()?;
    if !st.success() {
        bail!("gcc -static {} failed", src.display());
    }
    Ok(out)
}
