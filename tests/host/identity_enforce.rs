//! Container identity, enforced end to end: the real agent (`--enforcer compat`), a real
//! dockerd, policies from the agent's policy directory.
//!
//! - a container whose entrypoint its policy does not allow never runs it (the policy is bound
//!   to the container's cgroup at `mkdir`, before the first exec), over many runs;
//! - in monitor mode the same container runs and the violation names the container;
//! - containers running before the agent started are discovered and policed;
//! - removing containers gives back every piece of kernel state they held.
use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use palisade_tests::{
    agent::{AGENT_LOCK, Agent},
    docker::{Container, IMAGE, docker, ensure_docker, unique_name},
};
use serde_json::Value;

/// Runs of the denied-entrypoint container (every one must fail to start).
const DENIED_RUNS: usize = 20;
/// Containers started and removed by the leak test.
const CHURN: usize = 200;
/// Parallel docker CLI calls in the leak test.
const PARALLEL: usize = 8;

fn policy(name: &str, label: &str, mode: &str, body: &str) -> String {
    format!(
        r#"apiVersion: palisade.dev/v1
kind: ContainerPolicy
metadata:
  name: {name}
spec:
  mode: {mode}
  selector:
    labels: {{palisade.test: "{label}"}}
{body}"#
    )
}

/// (exit code, stdout, stderr) of a docker CLI call.
fn docker_out(args: &[&str]) -> (i32, String, String) {
    let o = Command::new("docker")
        .args(args)
        .output()
        .expect("spawning docker");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `docker run --rm` in the foreground: (exit code, stdout, stderr, container id).
fn run_once(
    name: &str,
    label: &str,
    dir: &std::path::Path,
    cmd: &[&str],
) -> (i32, String, String, String) {
    let cidfile = dir.join(format!("{name}.cid"));
    let _ = std::fs::remove_file(&cidfile);
    let lbl = format!("palisade.test={label}");
    let mut args = vec![
        "run",
        "--rm",
        "--network",
        "none",
        "--label",
        &lbl,
        "--name",
        name,
        "--cidfile",
    ];
    let cid = cidfile.to_string_lossy().into_owned();
    args.push(&cid);
    args.push(IMAGE);
    args.extend(cmd);
    let (rc, out, err) = docker_out(&args);
    let id = std::fs::read_to_string(&cidfile)
        .unwrap_or_default()
        .trim()
        .to_owned();
    (rc, out, err, id)
}

fn scratch(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("palisade-idenf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The exec event of `verdict` for the container named `name`, from event index `from`.
fn exec_event_of(
    agent: &Agent,
    from: usize,
    verdict: &str,
    name: &str,
    wait: Duration,
) -> Option<Value> {
    agent.wait_event_from(from, wait, |e| {
        e["kind"] == "exec"
            && e["verdict"] == verdict
            && e["container"]["name"].as_str() == Some(name)
    })
}

fn assert_names_container(ev: &Value, name: &str, id: &str) {
    let c = &ev["container"];
    assert_eq!(c["name"].as_str(), Some(name), "event: {ev}");
    if !id.is_empty() {
        assert_eq!(c["id"].as_str(), Some(id), "event: {ev}");
    }
    let img = c["image"].as_str().unwrap_or_default();
    assert!(img.starts_with("palisade-test"), "image in event: {ev}");
}

fn status(agent: &Agent) -> BTreeMap<String, u64> {
    let out = agent.cli(&["status", "-o", "json"]).unwrap();
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["counters"]
        .as_object()
        .expect("counters")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect()
}

/// Counters that must come back to their baseline once containers are gone. Allowed-exec
/// inodes are keyed by (ruleset, device, inode) and every container's root is its own overlayfs
/// device, so they are per container too.
const PER_CONTAINER: [&str; 6] = [
    "bound_cgroups",
    "map_cgroups",
    "map_pending",
    "cgroup_attachments",
    "fanotify_marks",
    "map_exec_inodes",
];

fn per_container(s: &BTreeMap<String, u64>) -> BTreeMap<&'static str, u64> {
    PER_CONTAINER
        .iter()
        .map(|k| (*k, s.get(*k).copied().unwrap_or(u64::MAX)))
        .collect()
}

/// Wait until the agent lists the container under `policy`.
fn wait_bound(agent: &Agent, id: &str, policy: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = agent.cli(&["containers", "-o", "json"]).unwrap();
        let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if list.as_array().is_some_and(|l| {
            l.iter()
                .any(|c| c["meta"]["id"] == id && c["policy"] == policy)
        }) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "container {id} never bound to {policy}; agent log:\n{}",
        agent.log()
    );
}

#[test]
fn entrypoint_not_on_the_exec_list_never_runs() {
    let _lock = AGENT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ensure_docker().unwrap();
    let dir = scratch("deny");
    let agent = Agent::start("idenf-deny", &["--enforcer", "compat"]).unwrap();
    let label = unique_name("deny");
    let pname = format!("idenf-deny-{}", std::process::id());
    let exec = "  exec:\n    allow: [/nothing]\n";
    agent
        .write_policy("deny.yaml", &policy(&pname, &label, "enforce", exec))
        .unwrap();

    let from = agent.event_count();
    let mut runs = Vec::new();
    for i in 0..DENIED_RUNS {
        let name = unique_name(&format!("pal-deny{i}"));
        let (rc, out, err, id) = run_once(&name, &label, &dir, &["sh", "-c", "echo started"]);
        assert!(
            !out.contains("started"),
            "run {i}: the denied entrypoint ran (rc {rc}): {out} {err}\nagent log:\n{}",
            agent.log()
        );
        assert_ne!(rc, 0, "run {i}: docker run succeeded: {out} {err}");
        runs.push((name, id, rc));
    }
    // Every run's entrypoint was stopped and killed by the agent: each left a denied exec event.
    for (name, id, rc) in &runs {
        let ev = exec_event_of(&agent, from, "denied", name, Duration::from_secs(5))
            .unwrap_or_else(|| {
                panic!(
                    "no denied exec event for {name} (rc {rc}); events: {:?}",
                    agent.events()
                )
            });
        assert_names_container(&ev, name, id);
        assert_eq!(ev["policy"].as_str(), Some(pname.as_str()));
    }
    eprintln!(
        "denied entrypoint: {DENIED_RUNS} runs, 0 started; exit codes {:?}",
        runs.iter().map(|r| r.2).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn monitor_mode_runs_the_entrypoint_and_reports_it() {
    let _lock = AGENT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ensure_docker().unwrap();
    let dir = scratch("mon");
    let agent = Agent::start("idenf-mon", &["--enforcer", "compat"]).unwrap();
    let label = unique_name("mon");
    let pname = format!("idenf-mon-{}", std::process::id());
    let exec = "  exec:\n    allow: [/nothing]\n";
    // Enforce first, then switched to monitor by rewriting the file: the live change applies.
    agent
        .write_policy("p.yaml", &policy(&pname, &label, "enforce", exec))
        .unwrap();
    let name = unique_name("pal-enf");
    let (rc, out, _, _) = run_once(&name, &label, &dir, &["sh", "-c", "echo started"]);
    assert!(
        rc != 0 && !out.contains("started"),
        "enforce: rc {rc} {out}"
    );

    agent
        .write_policy("p.yaml", &policy(&pname, &label, "monitor", exec))
        .unwrap();
    for i in 0..3 {
        let name = unique_name(&format!("pal-mon{i}"));
        let from = agent.event_count();
        let (rc, out, err, id) = run_once(&name, &label, &dir, &["sh", "-c", "echo started"]);
        assert_eq!(
            (rc, out.as_str()),
            (0, "started\n"),
            "monitor must allow: {err}"
        );
        let ev = exec_event_of(&agent, from, "violation", &name, Duration::from_secs(5))
            .unwrap_or_else(|| {
                panic!(
                    "no violation exec event for {name}; events: {:?}",
                    agent.events()
                )
            });
        assert_names_container(&ev, &name, &id);
        // The image as resolved from /proc/<pid>/exe, or the filename as passed when `sh`
        // exited before the agent could read it.
        assert!(
            matches!(ev["path"].as_str(), Some("/bin/busybox" | "/bin/sh")),
            "{ev}"
        );
        assert_eq!(ev["policy"].as_str(), Some(pname.as_str()));
        assert!(
            exec_event_of(&agent, from, "denied", &name, Duration::ZERO).is_none(),
            "monitor mode denied something"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn containers_running_before_the_agent_are_policed() {
    let _lock = AGENT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ensure_docker().unwrap();
    let dir = scratch("early");
    std::fs::write(dir.join("secret.txt"), "early-secret\n").unwrap();
    std::fs::write(dir.join("ok.txt"), "early-ok\n").unwrap();
    let label = unique_name("early");
    let name = unique_name("pal-early");
    let c = Container::with_args(
        &["create"],
        &name,
        &[
            "--network",
            "none",
            "--label",
            &format!("palisade.test={label}"),
        ],
        &["sleep", "600"],
    )
    .unwrap();
    for f in ["secret.txt", "ok.txt"] {
        docker(&[
            "cp",
            dir.join(f).to_str().unwrap(),
            &format!("{}:/{f}", c.id),
        ])
        .unwrap();
    }
    c.start().unwrap();
    // Readable before any agent runs.
    assert_eq!(c.exec(&["cat", "/secret.txt"]).1, "early-secret\n");

    let agent = Agent::start("idenf-early", &["--enforcer", "compat"]).unwrap();
    let pname = format!("idenf-early-{}", std::process::id());
    let body = "  exec:\n    allow: [/bin/busybox]\n  files:\n    - {path: /, access: read}\n    - {path: /secret.txt, access: any, action: deny}\n";
    agent
        .write_policy("early.yaml", &policy(&pname, &label, "enforce", body))
        .unwrap();
    wait_bound(&agent, &c.id, &pname);

    let from = agent.event_count();
    let (rc, out, err) = c.exec(&["cat", "/secret.txt"]);
    assert_ne!(rc, 0, "denied read must fail: {out}");
    assert!(err.contains("not permitted"), "EPERM expected, got: {err}");
    assert!(!out.contains("early-secret"));
    let ev = agent
        .wait_event_from(from, Duration::from_secs(5), |e| {
            e["kind"] == "open" && e["verdict"] == "denied" && e["path"] == "/secret.txt"
        })
        .expect("denied open event");
    assert_names_container(&ev, &name, &c.id);
    let (rc, out, err) = c.exec(&["cat", "/ok.txt"]);
    assert_eq!((rc, out.as_str()), (0, "early-ok\n"), "allowed read: {err}");
    // Its processes from before the agent started are policed too (not only new execs): the
    // container's init is the `sleep` that was running all along, and a new exec still works.
    let (rc, _, err) = c.exec(&["true"]);
    assert_eq!(rc, 0, "allowed exec: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Run `f` over `items` with up to [`PARALLEL`] threads.
fn parallel<T: Sync>(items: &[T], f: impl Fn(&T) + Sync) {
    let chunk = items.len().div_ceil(PARALLEL).max(1);
    std::thread::scope(|s| {
        for part in items.chunks(chunk) {
            let f = &f;
            s.spawn(move || part.iter().for_each(f));
        }
    });
}

/// Polls `status` until the per-container counters equal `want`, up to 20 s.
fn settle(agent: &Agent, want: &BTreeMap<&'static str, u64>) -> BTreeMap<String, u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(agent);
        if per_container(&s) == *want || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn removed_containers_release_kernel_state() {
    let _lock = AGENT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ensure_docker().unwrap();
    let agent = Agent::start("idenf-churn", &["--enforcer", "compat"]).unwrap();
    let label = unique_name("churn");
    let pname = format!("idenf-churn-{}", std::process::id());
    let body = "  exec:\n    allow: [/bin/busybox]\n  files:\n    - {path: /, access: any}\n";
    agent
        .write_policy("churn.yaml", &policy(&pname, &label, "enforce", body))
        .unwrap();
    let base = status(&agent);
    let baseline = per_container(&base);
    let started = Instant::now();

    let lbl = format!("palisade.test={label}");
    let names: Vec<String> = (0..CHURN)
        .map(|i| unique_name(&format!("pal-churn{i}")))
        .collect();
    // Batches: create and bind a batch, check it is really policed, remove it.
    let mut peak = BTreeMap::new();
    for batch in names.chunks(50) {
        parallel(batch, |n| {
            docker(&[
                "run",
                "-d",
                "--network",
                "none",
                "--label",
                &lbl,
                "--name",
                n,
                IMAGE,
                "sleep",
                "600",
            ])
            .unwrap_or_else(|e| panic!("{e}"));
        });
        // Each container is bound, attached and its mounts marked (its entrypoint ran, so the
        // first exec was answered and marked).
        let n = batch.len() as u64;
        let policed = |s: &BTreeMap<String, u64>| {
            [
                "bound_cgroups",
                "map_cgroups",
                "cgroup_attachments",
                "fanotify_marks",
            ]
            .iter()
            .all(|k| s[*k] >= baseline[k] + n)
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            let s = status(&agent);
            if policed(&s) || Instant::now() > deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(
            policed(&s),
            "batch not fully policed: {s:?} (baseline {baseline:?})"
        );
        peak = s;
        parallel(batch, |n| {
            docker(&["rm", "-f", n]).unwrap_or_else(|e| panic!("{e}"));
        });
    }
    // Containers created but never started: their pending bindings must go with them.
    let never: Vec<String> = (0..20)
        .map(|i| unique_name(&format!("pal-never{i}")))
        .collect();
    parallel(&never, |n| {
        docker(&[
            "create",
            "--network",
            "none",
            "--label",
            &lbl,
            "--name",
            n,
            IMAGE,
            "true",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    });
    // Armed: two predicted cgroup paths each (cgroupfs and systemd drivers).
    let armed = baseline["map_pending"] + 2 * never.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&agent)["map_pending"] < armed && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        status(&agent)["map_pending"] >= armed,
        "pending bindings not armed"
    );
    parallel(&never, |n| {
        docker(&["rm", "-f", n]).unwrap_or_else(|e| panic!("{e}"));
    });

    let end = settle(&agent, &baseline);
    eprintln!(
        "churn: {CHURN} containers + {} never started in {:?}; baseline {base:?}; last batch {peak:?}; after {end:?}",
        never.len(),
        started.elapsed()
    );
    assert_eq!(
        per_container(&end),
        baseline,
        "kernel state leaked; agent log tail:\n{}",
        tail(&agent.log())
    );
    assert!(
        started.elapsed() < Duration::from_secs(240),
        "took {:?}",
        started.elapsed()
    );
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
