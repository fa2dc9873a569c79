//! Learning mode end to end, against the real agent (tier 2, `--enforcer compat`) and real
//! Docker containers: learn a workload, export what was learned as an enforcing policy, replace
//! the learning policy with it, and check that
//! - the same workload runs again with zero denials,
//! - anything new it does (a new binary, a file outside its profile, a new destination port) is
//!   denied and reported,
//! - `palisade learn check` lists exactly what a narrowed candidate would deny.
use std::{
    net::TcpListener,
    path::PathBuf,
    process::Output,
    time::{Duration, Instant},
};

use palisade_tests::{
    agent::{Agent, build_program, exclusive as lock},
    docker::{Container, docker, ensure_docker, unique_name},
};
use serde_json::Value;

/// The workload: reads its config, writes 12 rotating logs under one directory, runs a few
/// busybox applets and calls its backend on 127.0.0.1:$2. With `$1 = new` it then tries three
/// things it never did while learning.
const SCRIPT: &str = r#"#!/bin/sh
PORT=$2
cat /etc/app/app.conf >/dev/null || exit 10
mkdir -p /var/log/app || exit 11
i=0
while [ $i -lt 12 ]; do
  echo "entry $i" > /var/log/app/app-$i.log || exit 12
  i=$((i+1))
done
id >/dev/null || exit 13
date >/dev/null || exit 14
out=$(/net_probe tcp 127.0.0.1 $PORT)
[ "$out" = ok ] || { echo "backend: $out"; exit 15; }
if [ "$1" = new ]; then
  echo "exec: $(/tmp/echo ran 2>&1; echo rc=$?)"
  echo "read: $(cat /etc/extra.conf 2>&1; echo rc=$?)"
  echo "connect: $(/net_probe tcp 127.0.0.1 $3)"
fi
echo done
"#;

struct Fixture {
    dir: PathBuf,
    label: String,
    policy: String,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = std::env::temp_dir().join(format!("palisade-learn-e2e-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("etc-app")).unwrap();
        std::fs::write(dir.join("app.sh"), SCRIPT).unwrap();
        std::fs::write(dir.join("etc-app/app.conf"), "level=info\n").unwrap();
        std::fs::write(dir.join("extra.conf"), "not in the profile\n").unwrap();
        build_program("net_probe", &dir).unwrap();
        Fixture {
            dir,
            label: unique_name("learn"),
            policy: format!("learn-e2e-{}", std::process::id()),
        }
    }

    fn learning_policy(&self) -> String {
        // Every section present, so every section is observed; the placeholder rules are
        // never needed (learn mode allows everything) and are kept in the export.
        format!(
            r#"apiVersion: palisade.dev/v1
kind: ContainerPolicy
metadata:
  name: {name}
spec:
  mode: learn
  selector:
    labels: {{palisade.test: "{label}"}}
  exec:
    allow: [/nothing]
  files:
    - {{path: /nothing, access: read}}
  network:
    egress:
      - {{cidr: 192.0.2.1/32, protocol: tcp}}
"#,
            name = self.policy,
            label = self.label,
        )
    }

    /// Run the workload to completion in a new container: (exit code, output).
    fn run(&self, name: &str, args: &[&str]) -> (i64, String, Container) {
        let label = format!("palisade.test={}", self.label);
        // The entrypoint opens /app.sh at once: the backstop holds the container's first exec
        // until its mounts are marked, in learn mode too, so that open is observed.
        let mut cmd = vec!["/bin/sh", "/app.sh"];
        cmd.extend(args);
        let c = Container::with_args(
            &["create"],
            name,
            &["--network", "host", "--label", &label],
            &cmd,
        )
        .unwrap();
        let p = |f: &str| self.dir.join(f).display().to_string();
        for (src, dst) in [
            (p("app.sh"), "/app.sh"),
            (p("etc-app"), "/etc/app"),
            (p("extra.conf"), "/etc/extra.conf"),
            (p("net_probe"), "/net_probe"),
            ("/bin/busybox".to_string(), "/tmp/echo"),
        ] {
            docker(&["cp", &src, &format!("{}:{dst}", c.id)]).unwrap();
        }
        c.start().unwrap();
        let code: i64 = docker(&["wait", &c.id]).unwrap().parse().unwrap();
        let logs = std::process::Command::new("docker")
            .args(["logs", &c.id])
            .output()
            .unwrap();
        let mut out = String::from_utf8_lossy(&logs.stdout).into_owned();
        out.push_str(&String::from_utf8_lossy(&logs.stderr));
        (code, out, c)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cli(agent: &Agent, args: &[&str]) -> Output {
    agent.cli(args).unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The learned profile of `policy` (from `learn status -o json`), if any.
fn profile(agent: &Agent, policy: &str) -> Option<Value> {
    let o = cli(agent, &["learn", "status", "-o", "json"]);
    assert!(o.status.success(), "learn status: {o:?}");
    let list: Value = serde_json::from_slice(&o.stdout).unwrap();
    list.as_array()?
        .iter()
        .find(|p| p["key"]["policy"] == policy)
        .cloned()
}

/// Wait until the profile stops growing: the counts unchanged over 2 s, at most 20 s.
fn wait_stable(agent: &Agent, policy: &str) -> Value {
    let counts = |p: &Value| (p["exec"].clone(), p["open"].clone(), p["connect"].clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last: Option<(Value, Instant)> = None;
    loop {
        if let Some(p) = profile(agent, policy) {
            match &last {
                Some((prev, since)) if counts(prev) == counts(&p) => {
                    if since.elapsed() >= Duration::from_secs(2) {
                        return p;
                    }
                }
                _ => last = Some((p, Instant::now())),
            }
        }
        assert!(
            Instant::now() < deadline,
            "profile never became stable: {last:?}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn container_events(agent: &Agent, from: usize, name: &str) -> Vec<Value> {
    agent
        .events()
        .into_iter()
        .skip(from)
        .filter(|e| e["container"]["name"].as_str() == Some(name))
        .collect()
}

fn is_blocked(e: &Value) -> bool {
    e["verdict"] == "denied" || e["verdict"] == "violation"
}

#[test]
fn learned_policy_allows_the_workload_and_denies_anything_new() {
    let _lock = lock();
    ensure_docker().unwrap();
    let fx = Fixture::new();
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = backend.local_addr().unwrap().port().to_string();
    let new_port = other.local_addr().unwrap().port().to_string();

    let agent = Agent::start("learn", &["--enforcer", "compat"]).unwrap();
    let from = agent.event_count();
    agent
        .write_policy("learn.yaml", &fx.learning_policy())
        .unwrap();
    assert!(
        agent
            .wait_event_from(from, Duration::from_secs(1), |e| {
                e["kind"] == "policy" && e["verdict"] == "allowed"
            })
            .is_some(),
        "learning policy rejected: {:?}",
        agent.events()
    );

    // 1. Learn.
    let learn_name = unique_name("pal-learn");
    let from = agent.event_count();
    let (code, out, _learned) = fx.run(&learn_name, &["base", &port]);
    assert_eq!((code, out.trim()), (0, "done"), "learning run");
    let p = wait_stable(&agent, &fx.policy);
    println!(
        "--- learn status\n{}",
        stdout(&cli(&agent, &["learn", "status"]))
    );
    assert!(p["containers"].to_string().contains(&learn_name), "{p}");
    assert!(p["exec"].as_u64() >= Some(2), "busybox and net_probe: {p}");
    assert!(p["open"].as_u64() >= Some(13), "config and 12 logs: {p}");
    assert_eq!(p["connect"], 1, "{p}");
    let events = container_events(&agent, from, &learn_name);
    assert!(events.iter().all(|e| !is_blocked(e)), "{events:?}");
    assert!(events.iter().any(|e| e["verdict"] == "learned"));
    // Persisted by the learn task (every 5 s when something changed).
    let store = agent.dir.join("state/learn/profiles.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never written",
            store.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // 2. Export, replace the learning policy with it.
    let o = cli(
        &agent,
        &["learn", "export", &fx.policy, "--mode", "enforce"],
    );
    assert!(o.status.success(), "learn export: {o:?}");
    let yaml = stdout(&o);
    println!("--- learn export\n{yaml}");
    assert!(yaml.contains("mode: enforce"), "{yaml}");
    assert!(
        yaml.contains(r#"path: "/var/log/app/""#),
        "logs generalised: {yaml}"
    );
    assert!(
        !yaml.contains("app-0.log\""),
        "no per-file log rules: {yaml}"
    );
    assert!(
        yaml.contains(&format!(
            r#"{{cidr: "127.0.0.1/32", ports: [{port}], protocol: tcp}}"#
        )),
        "{yaml}"
    );
    assert!(yaml.contains(r#""/net_probe""#), "{yaml}");
    let missing = cli(&agent, &["learn", "export", "no-such-policy"]);
    assert_eq!(missing.status.code(), Some(4), "NotFound: {missing:?}");
    let from = agent.event_count();
    agent.write_policy("learn.yaml", &yaml).unwrap();
    let applied = agent.wait_event_from(from, Duration::from_secs(1), |e| e["kind"] == "policy");
    assert_eq!(
        applied.as_ref().map(|e| &e["verdict"]),
        Some(&"allowed".into())
    );
    let got = cli(&agent, &["policy", "get", &fx.policy]);
    assert!(stdout(&got).contains("mode: enforce"), "{got:?}");

    // 3. The same workload, enforced: runs, nothing denied.
    let name = unique_name("pal-replay");
    let from = agent.event_count();
    let (code, out, _replayed) = fx.run(&name, &["base", &port]);
    std::thread::sleep(Duration::from_millis(500));
    let events = container_events(&agent, from, &name);
    let blocked: Vec<_> = events.iter().filter(|e| is_blocked(e)).collect();
    assert_eq!((code, out.trim()), (0, "done"), "replay: {blocked:?}");
    assert!(
        blocked.is_empty(),
        "denied under the learned policy: {blocked:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["policy"] == fx.policy.as_str() && e["mode"] == "enforce"),
        "the replay container was not policed: {events:?}"
    );

    // 4. Anything new is denied and reported.
    let name = unique_name("pal-new");
    let from = agent.event_count();
    let (code, out, _new) = fx.run(&name, &["new", &port, &new_port]);
    println!("--- new behaviour\n{out}");
    assert_eq!(code, 0, "{out}");
    let line = |k: &str| {
        out.lines()
            .find(|l| l.starts_with(k))
            .unwrap_or_else(|| panic!("no {k} line in {out}"))
            .to_string()
    };
    let exec = line("exec:");
    assert!(!exec.contains("ran") && !exec.ends_with("rc=0"), "{exec}");
    let read = line("read:");
    assert!(
        read.contains("not permitted") && !read.contains("not in the profile"),
        "{read}"
    );
    assert_eq!(line("connect:"), "connect: EPERM");
    for (kind, key, want) in [
        ("exec", "path", Value::from("/tmp/echo")),
        ("open", "path", Value::from("/etc/extra.conf")),
        (
            "connect",
            "port",
            Value::from(new_port.parse::<u16>().unwrap()),
        ),
    ] {
        let ev = agent.wait_event_from(from, Duration::from_secs(5), |e| {
            e["kind"] == kind && e["verdict"] == "denied" && e[key] == want
        });
        let ev = ev.unwrap_or_else(|| panic!("no denied {kind} event for {want}"));
        assert_eq!(ev["container"]["name"].as_str(), Some(name.as_str()));
        assert_eq!(ev["policy"], fx.policy.as_str());
    }
    let blocked: Vec<_> = container_events(&agent, from, &name)
        .into_iter()
        .filter(is_blocked)
        .collect();
    assert_eq!(blocked.len(), 3, "only the three new things: {blocked:#?}");

    // 5. Replay the recordings against candidates.
    let full = fx.dir.join("learned.yaml");
    std::fs::write(&full, &yaml).unwrap();
    let o = cli(&agent, &["learn", "check", "-f", full.to_str().unwrap()]);
    println!("--- learn check (exported policy)\n{}", stdout(&o));
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    // Narrowed: without the net_probe exec, the log directory and the backend port.
    let narrowed: String = yaml
        .lines()
        .filter(|l| !l.contains(r#""/net_probe""#) && !l.contains(r#""/var/log/app/""#))
        .map(|l| {
            if l.contains("127.0.0.1/32") {
                l.replace(&format!("[{port}]"), &format!("[{new_port}]"))
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let cand = fx.dir.join("candidate.yaml");
    std::fs::write(&cand, narrowed).unwrap();
    let o = cli(&agent, &["learn", "check", "-f", cand.to_str().unwrap()]);
    println!("--- learn check (narrowed candidate)\n{}", stdout(&o));
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let o = cli(
        &agent,
        &["learn", "check", "-f", cand.to_str().unwrap(), "-o", "json"],
    );
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut denied: Vec<String> = report["denials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let o = &d["observation"];
            match o["kind"].as_str().unwrap() {
                "connect" => format!("connect {}:{}", o["addr"].as_str().unwrap(), o["port"]),
                k => format!("{k} {}", o["path"].as_str().unwrap()),
            }
        })
        .collect();
    denied.sort();
    let mut want: Vec<String> = (0..12)
        .map(|i| format!("open /var/log/app/app-{i}.log"))
        .collect();
    want.push(format!("connect 127.0.0.1:{port}"));
    want.push("exec /net_probe".into());
    want.sort();
    assert_eq!(denied, want, "{report:#}");
    assert!(report["unmatched"].as_array().unwrap().is_empty());

    // 6. What was learned survives an agent crash (saved every 5 s, loaded at start).
    std::thread::sleep(Duration::from_secs(6));
    let mut agent = agent;
    agent.crash();
    agent.restart().unwrap();
    let again = profile(&agent, &fx.policy).expect("profile lost across a restart");
    for k in ["exec", "open", "connect", "sightings", "containers"] {
        assert_eq!(again[k], p[k], "{k} after restart");
    }
}
