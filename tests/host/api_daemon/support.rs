//! Helpers for `api_daemon.rs`: the agent lock, a fixture (host data, policies, containers), CLI
//! wrappers, a `palisade events --follow` process, and a plain HTTP/1.0 GET.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use palisade::api::pb;
pub use palisade_tests::agent::exclusive as lock;
use palisade_tests::{
    agent::{Agent, palisade_bin},
    docker::{Container, docker, ensure_docker, unique_name},
};
use serde_json::Value;

pub const WAIT: Duration = Duration::from_secs(10);

/// Host data bind-mounted read-only at /data, and policy files to apply.
pub struct Fixture {
    pub dir: PathBuf,
    pub label: String,
    pub policy: String,
}

impl Fixture {
    pub fn new(name: &str) -> Fixture {
        ensure_docker().unwrap();
        let dir = std::env::temp_dir().join(format!("palisade-apid-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        for (f, text) in [
            ("ok.txt", "ok\n"),
            ("secret.txt", "secret\n"),
            ("key.txt", "key\n"),
        ] {
            std::fs::write(dir.join("data").join(f), text).unwrap();
        }
        Fixture {
            dir,
            label: unique_name("lbl"),
            policy: format!("web-{name}"),
        }
    }

    /// A policy selecting this fixture's containers: /data/secret.txt and /data/key.txt denied.
    pub fn yaml(&self, mode: &str, tmp: &str) -> String {
        format!(
            r#"apiVersion: palisade.dev/v1
kind: ContainerPolicy
metadata:
  name: {name}
spec:
  mode: {mode}
  selector:
    labels: {{palisade.test: "{label}"}}
  exec:
    allow: [/bin/busybox]
  files:
    - {{path: /, access: read}}
    - {{path: {tmp}, access: any}}
    - {{path: /dev/, access: any}}
    - {{path: /proc/, access: any}}
    - {{path: /data/secret.txt, access: any, action: deny}}
    - {{path: /data/key.txt, access: any, action: deny}}
"#,
            name = self.policy,
            label = self.label,
        )
    }

    pub fn good(&self, mode: &str) -> String {
        self.yaml(mode, "/tmp/")
    }

    /// Rejected at 13:14 (`spec.files[1].path: must be absolute`); monitor mode, so applying
    /// it by mistake would show as the denied read succeeding.
    pub fn bad(&self) -> String {
        self.yaml("monitor", "tmp/")
    }

    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A labelled container with /data mounted and a busybox copy at /tmp/echo (not allowed).
    pub fn container(&self, prefix: &str) -> Container {
        let data = format!("{}:/data:ro", self.dir.join("data").display());
        let label = format!("palisade.test={}", self.label);
        let args = ["--network", "none", "-v", &data, "--label", &label];
        let c = Container::with_args(&["create"], &unique_name(prefix), &args, &["sleep", "600"])
            .unwrap();
        docker(&["cp", "/bin/busybox", &format!("{}:/tmp/echo", c.id)]).unwrap();
        c.start().unwrap();
        c
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn agent(name: &str, extra: &[&str]) -> Agent {
    let mut args = vec!["--enforcer", "compat"];
    args.extend(extra);
    Agent::start(name, &args).unwrap()
}

pub fn text(o: &Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Run the CLI, require success, return stdout.
pub fn cli_ok(agent: &Agent, args: &[&str]) -> String {
    let (code, out, err) = text(&agent.cli(args).unwrap());
    assert_eq!(code, 0, "palisade {args:?}: {err}");
    out
}

pub fn cli_json(agent: &Agent, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&cli_ok(agent, &all)).unwrap()
}

pub fn apply(agent: &Agent, file: &Path) -> String {
    cli_ok(agent, &["policy", "apply", "-f", file.to_str().unwrap()])
}

/// Wait until the agent lists the container under `policy`.
pub fn wait_bound(agent: &Agent, c: &Container, policy: &str) {
    agent.wait_bound(&c.id, policy);
}

pub fn read(c: &Container, path: &str) -> Result<String, String> {
    match c.exec(&["cat", path]) {
        (0, out, _) => Ok(out),
        (_, _, err) => Err(err),
    }
}

/// The read is refused with EPERM and the agent reports a denied open for this container.
pub fn assert_denied(agent: &Agent, c: &Container, path: &str) -> Value {
    let from = agent.event_count();
    let err = read(c, path).expect_err("read must be denied");
    assert!(err.contains("not permitted"), "EPERM expected: {err}");
    wait_for(agent, from, |e| is(e, "open", "denied", c, path))
}

pub fn is(e: &Value, kind: &str, verdict: &str, c: &Container, path: &str) -> bool {
    e["kind"] == kind
        && e["verdict"] == verdict
        && e["container"]["name"] == c.name.as_str()
        && e["path"] == path
}

pub fn wait_for(agent: &Agent, from: usize, pred: impl Fn(&Value) -> bool) -> Value {
    agent
        .wait_event_from(from, WAIT, pred)
        .unwrap_or_else(|| panic!("expected event not seen; agent log:\n{}", agent.log()))
}

pub fn subscribers(agent: &Agent) -> u64 {
    cli_json(agent, &["status"])["counters"]["subscribers"]
        .as_u64()
        .unwrap()
}

/// A `palisade events --follow …` process; its stdout lines collected.
pub struct Follower {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Follower {
    /// Spawn and wait until the agent counts it as a subscriber.
    pub fn spawn(agent: &Agent, args: &[&str]) -> Follower {
        let before = subscribers(agent);
        let mut child = Command::new(palisade_bin())
            .arg("--socket")
            .arg(&agent.socket)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        let deadline = Instant::now() + WAIT;
        while subscribers(agent) <= before {
            assert!(Instant::now() < deadline, "follower never subscribed");
            std::thread::sleep(Duration::from_millis(50));
        }
        Follower { child, lines }
    }

    pub fn events(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn next_event(s: &mut tonic::Streaming<pb::Event>) -> pb::Event {
    let msg = tokio::time::timeout(WAIT, s.message())
        .await
        .expect("stream stalled");
    msg.unwrap().expect("stream ended")
}

/// Mode of the policy as the agent lists it.
pub fn listed_mode(agent: &Agent, name: &str) -> String {
    let list = cli_json(agent, &["policy", "list"]);
    let p = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .expect("policy listed");
    p["mode"].as_str().unwrap().to_owned()
}

pub fn tokens(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// `GET path` over plain HTTP/1.0: (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// Value of the sample whose line starts with `prefix` (name plus labels).
pub fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

pub fn wait_metric(port: u16, prefix: &str, want: impl Fn(f64) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, body) = http_get(port, "/metrics");
        assert_eq!(code, 200);
        if sample(&body, prefix).is_some_and(&want) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{prefix}: wrong or missing in\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
