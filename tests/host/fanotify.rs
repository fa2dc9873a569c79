//! Tier-2 exec/open enforcement with fanotify against real Docker containers (root only).
//!
//! One sequential scenario (the steps share containers and the holder):
//! 1. agent A marks container c1 and denies opens of /etc/secret, the bind-mounted
//!    /etc/hostname, plain reads of /bin/busybox, writes to /etc/public, and exec of /tmp/busybox2;
//! 2. the host and container c2 are unaffected; the decider saw container paths and c1's cgroup;
//! 3. the ignore-mark cache skips the decider until `flush_cache`;
//! 4. A is SIGKILLed: opens block (nothing denied succeeds); agent B adopts the group from the
//!    holder and answers them;
//! 5. B dies holding an unanswered event; agent C adopts and denies that orphan.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use palisade_tests::docker;

const AGENT: &str = env!("CARGO_BIN_EXE_fanotify-test-agent");

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A container (removed on drop by the shared guard) with `Output`-returning exec helpers.
struct Container {
    inner: docker::Container,
}

impl Container {
    fn run(prefix: &str) -> Container {
        let name = docker::unique_name(prefix);
        let inner = docker::Container::run(&name, &[], &["sleep", "600"]).expect("docker run");
        Container { inner }
    }

    fn inspect(&self, fmt: &str) -> String {
        docker::docker(&["inspect", "-f", fmt, &self.inner.id]).expect("docker inspect")
    }

    fn pid(&self) -> i32 {
        self.inner.pid().expect("container pid") as i32
    }

    fn exec_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker");
        c.arg("exec").arg(&self.inner.id).args(args);
        c
    }

    fn exec(&self, args: &[&str]) -> Output {
        self.exec_cmd(args).output().expect("docker exec")
    }
}

fn cgroup2_id(pid: i32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let rel = cg.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = mi
        .lines()
        .find(|l| l.contains(" - cgroup2 "))
        .and_then(|l| l.split(' ').nth(4))
        .unwrap()
        .to_string();
    std::fs::metadata(format!("{root}{rel}")).unwrap().ino()
}

/// A running test agent with its stdout lines on a channel.
struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Agent {
    fn start(state_dir: &str, pid: i32, slow: Option<&str>) -> Agent {
        let mut cmd = Command::new(AGENT);
        cmd.arg(state_dir)
            .arg(pid.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(p) = slow {
            cmd.env("FAN_SLOW_PATH", p);
        }
        let mut child = cmd.spawn().expect("spawn agent");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Agent {
            child,
            stdin,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix`, keeping every line seen.
    fn wait_for(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("agent: no {prefix} line; saw {:#?}", self.seen));
            self.seen.push(line.clone());
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
    }

    fn decisions(&mut self, needle: &str) -> Vec<String> {
        self.drain();
        self.seen
            .iter()
            .filter(|l| l.starts_with("DECIDE") && l.ends_with(needle))
            .cloned()
            .collect()
    }

    fn send(&mut self, cmd: &str) {
        let s = self.stdin.as_mut().unwrap();
        writeln!(s, "{cmd}").unwrap();
        s.flush().unwrap();
    }

    fn sigkill(mut self) {
        self.child.kill().unwrap(); // SIGKILL to this child's pid
        self.child.wait().unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A failed step must not leave an agent behind (only our own child, by pid).
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ')
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("{key} missing in {line}"))
}

fn denied(o: &Output) -> bool {
    let t = text(o).to_lowercase();
    !o.status.success() && (t.contains("not permitted") || t.contains("permission denied"))
}

/// Kills the holder recorded under `state_dir` (test cleanup when a step failed).
struct HolderGuard(String);

impl Drop for HolderGuard {
    fn drop(&mut self) {
        let pidfile = format!("{}/fanotify-holder.pid", self.0);
        if let Ok(t) = std::fs::read_to_string(&pidfile) {
            let pid: i32 = t.split(' ').next().unwrap().parse().unwrap();
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == palisade::enforce::fanotify::holder::HOLDER_NAME {
                // SAFETY: signalling a process this test started (verified by name).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a docker exec in the background; it must still be blocked after `wait`.
fn blocked(c: &Container, args: &[&str], wait: Duration) -> Child {
    let mut child = c
        .exec_cmd(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(wait);
    assert!(
        child.try_wait().unwrap().is_none(),
        "{args:?} finished while no agent was answering"
    );
    child
}

#[test]
fn fanotify_enforces_exec_and_open_in_real_containers() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    docker::ensure_docker().expect("dockerd and test image");
    let tag = std::process::id();
    let c1 = Container::run("palisade-fan-c1");
    let c2 = Container::run("palisade-fan-c2");
    let setup = "echo topsecret > /etc/secret && echo ok > /etc/public && \
                 echo c > /etc/cachetest && echo s > /etc/slow && cp /bin/busybox /tmp/busybox2";
    for c in [&c1, &c2] {
        let o = c.exec(&["/bin/sh", "-c", setup]);
        assert!(o.status.success(), "setup: {}", text(&o));
    }
    let state_dir = format!("/run/palisade-test-fanotify-{tag}");
    let _holder_guard = HolderGuard(state_dir.clone());
    let pid1 = c1.pid();

    // 1. Agent A enforces on c1.
    let mut a = Agent::start(&state_dir, pid1, None);
    let ready = a.wait_for("READY");
    assert_eq!(field(&ready, "adopted"), "false", "{ready}");
    let holder: i32 = field(&ready, "holder").parse().unwrap();
    assert!(holder > 0);
    let comm = std::fs::read_to_string(format!("/proc/{holder}/comm")).unwrap();
    assert_eq!(comm.trim(), "palisade-fanhld");
    // overlay root + /etc/hostname, /etc/hosts, /etc/resolv.conf binds + /dev, /dev/shm tmpfs.
    assert!(
        field(&ready, "mounts").parse::<usize>().unwrap() >= 4,
        "{ready}"
    );

    // A second agent may not take the group while A lives (it would deny A's in-flight events).
    let second = Command::new(AGENT)
        .args([state_dir.as_str(), &pid1.to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !second.status.success(),
        "second agent started: {}",
        text(&second)
    );
    assert!(text(&second).contains("another agent"), "{}", text(&second));

    let o = c1.exec(&["/bin/cat", "/etc/secret"]);
    assert!(denied(&o), "read of /etc/secret not denied: {}", text(&o));
    assert!(!text(&o).contains("topsecret"));
    let o = c1.exec(&["/bin/cat", "/etc/hostname"]);
    assert!(
        denied(&o),
        "read of bind-mounted /etc/hostname not denied: {}",
        text(&o)
    );
    let o = c1.exec(&["/bin/cat", "/etc/public"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n", "{}", text(&o));
    let o = c1.exec(&["/bin/sh", "-c", "echo more >> /etc/public"]);
    assert!(denied(&o), "write to /etc/public not denied: {}", text(&o));
    let o = c1.exec(&["/bin/cat", "/etc/hosts"]);
    assert!(o.status.success(), "/etc/hosts: {}", text(&o));
    // Plain reads of /bin/busybox are denied, yet exec of it works: the exec's own
    // FAN_OPEN_PERM is not judged as a read.
    let o = c1.exec(&["/bin/cat", "/bin/busybox"]);
    assert!(denied(&o), "read of /bin/busybox not denied: {}", text(&o));
    let o = c1.exec(&["/bin/busybox", "echo", "hi"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n", "{}", text(&o));
    let o = c1.exec(&["/tmp/busybox2", "echo", "hi"]);
    assert!(
        !o.status.success(),
        "exec of /tmp/busybox2 not denied: {}",
        text(&o)
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("hi"));

    // 2. Host and c2 unaffected; decider saw container paths and c1's cgroup.
    let merged = c1.inspect("{{.GraphDriver.Data.MergedDir}}");
    let host_view = std::fs::read_to_string(format!("{merged}/etc/secret")).unwrap();
    assert_eq!(host_view, "topsecret\n");
    let host_hostname = c1.inspect("{{.HostnamePath}}");
    std::fs::read_to_string(&host_hostname).expect("host reads the hostname bind source");
    let o = c2.exec(&["/bin/cat", "/etc/secret"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "topsecret\n",
        "c2: {}",
        text(&o)
    );
    let o = c2.exec(&["/tmp/busybox2", "echo", "hi"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "hi\n",
        "c2: {}",
        text(&o)
    );

    let cg1 = cgroup2_id(pid1).to_string();
    let cg2 = cgroup2_id(c2.pid()).to_string();
    let secret = a.decisions(" deny /etc/secret");
    assert!(
        !secret.is_empty(),
        "no decision on /etc/secret: {:#?}",
        a.seen
    );
    assert!(
        secret
            .iter()
            .all(|l| l.starts_with(&format!("DECIDE Open false {cg1} "))),
        "{secret:?}"
    );
    assert!(!a.decisions(" deny /etc/hostname").is_empty());
    assert!(
        !a.decisions(" deny /tmp/busybox2").is_empty(),
        "{:#?}",
        a.seen
    );
    let writes = a.decisions(" deny /etc/public");
    assert!(
        writes.iter().all(|l| l.starts_with("DECIDE Open true ")),
        "{writes:?}"
    );
    assert!(!writes.is_empty());
    assert!(
        !a.decisions(" allow /bin/busybox").is_empty(),
        "exec of busybox seen"
    );
    let from_c2: Vec<_> = a
        .seen
        .iter()
        .filter(|l| l.contains(&format!(" {cg2} ")))
        .collect();
    assert!(from_c2.is_empty(), "decider saw c2: {from_c2:?}");

    // 3. Ignore-mark cache: the second read is not asked; after a flush it is again.
    for _ in 0..2 {
        let o = c1.exec(&["/bin/cat", "/etc/cachetest"]);
        assert!(o.status.success(), "{}", text(&o));
    }
    assert_eq!(a.decisions(" /etc/cachetest").len(), 1, "{:#?}", a.seen);
    a.send("flush");
    a.wait_for("FLUSHED");
    let o = c1.exec(&["/bin/cat", "/etc/cachetest"]);
    assert!(o.status.success());
    assert_eq!(
        a.decisions(" /etc/cachetest").len(),
        2,
        "flush did not drop the cache"
    );

    // 4. Agent down: nothing is answered (so nothing denied can succeed); B adopts.
    a.send("stats");
    let stats = a.wait_for("STATS");
    eprintln!("agent A {stats}");
    // The exec companions were recognised (busybox reads are denied, yet busybox runs).
    assert!(
        field(&stats, "companions").parse::<u64>().unwrap() > 0,
        "{stats}"
    );
    assert_eq!(field(&stats, "errors"), "0", "{stats}");
    a.sigkill();
    assert!(
        std::path::Path::new(&format!("/proc/{holder}")).exists(),
        "holder died"
    );
    let secret_try = blocked(&c1, &["/bin/cat", "/etc/secret"], Duration::from_secs(3));
    let public_try = blocked(
        &c1,
        &["/bin/cat", "/etc/public"],
        Duration::from_millis(200),
    );
    let mut b = Agent::start(&state_dir, pid1, Some("/etc/slow"));
    let ready = b.wait_for("READY");
    assert_eq!(field(&ready, "adopted"), "true", "{ready}");
    assert_eq!(field(&ready, "holder"), holder.to_string());
    let o = secret_try.wait_with_output().unwrap();
    assert!(denied(&o), "queued /etc/secret read: {}", text(&o));
    let o = public_try.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n", "{}", text(&o));

    // 5. B dies holding an event it read but never answered; C denies that orphan.
    let slow_try = c1
        .exec_cmd(&["/bin/cat", "/etc/slow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    b.wait_for("SLOW /etc/slow");
    b.sigkill();
    let mut c = Agent::start(&state_dir, pid1, None);
    let ready = c.wait_for("READY");
    assert_eq!(field(&ready, "adopted"), "true");
    assert!(
        field(&ready, "orphans").parse::<usize>().unwrap() >= 1,
        "{ready}"
    );
    let o = slow_try.wait_with_output().unwrap();
    assert!(denied(&o), "orphaned /etc/slow read: {}", text(&o));
    let o = c1.exec(&["/bin/cat", "/etc/public"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "ok\n",
        "after adoption: {}",
        text(&o)
    );

    c.send("release");
    let stats = c.wait_for("STATS");
    c.wait_for("RELEASED");
    c.child.wait().unwrap();
    eprintln!("agent C {stats}");
    assert!(
        !std::path::Path::new(&format!("{state_dir}/fanotify-holder.pid")).exists(),
        "pidfile left behind"
    );
    // No holder, group closed: c1 runs freely again.
    let o = c1.exec(&["/bin/cat", "/etc/secret"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "topsecret\n",
        "{}",
        text(&o)
    );
}
