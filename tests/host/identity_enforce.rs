//! Container identity, enforced end to end: the real agent (`--enforcer compat`), a real
//! dockerd, policies from the agent's policy directory.
//!
//! - a container whose entrypoint its policy does not allow never runs it (the policy is bound
//!   to the container's cgroup at `mkdir`, before the first exec), over many runs;
//! - in monitor mode the same container runs and the violation names the container;
//! - containers running before the agent started are discovered and policed;
//! - removing containers gives back every piece of kernel state they held.
use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::{Duration, Instant},
};

use palisade_tests::{
    agent::{Agent, exclusive},
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

#[test]
fn entrypoint_not_on_the_exec_list_never_runs() {
    let _lock = exclusive();
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
    let _lock = exclusive();
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
    let _lock = exclusive();
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
    agent.wait_bound(&c.id, &pname);

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

/// Bound containers the agent lists: (ours = under `policy`, the ids of all others).
/// Other tests on this machine may start and remove containers meanwhile; every bound cgroup
/// counts in the global counters, so theirs are accounted for.
fn bound_split(agent: &Agent, policy: &str) -> (usize, BTreeSet<String>) {
    let out = agent.cli(&["containers", "-o", "json"]).unwrap();
    let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let mut ours = 0;
    let mut others = BTreeSet::new();
    for c in list.as_array().into_iter().flatten() {
        if c["policy"] == policy {
            ours += 1;
        } else {
            others.insert(c["meta"]["cgroup_id"].to_string());
        }
    }
    (ours, others)
}

/// The baseline adjusted for other tests' containers that came or went: one map entry and one
/// attachment each; their mount marks are not reported per container, so when the set of other
/// containers changed, marks are left out of the comparison.
fn expected(
    baseline: &BTreeMap<&'static str, u64>,
    others0: &BTreeSet<String>,
    others1: &BTreeSet<String>,
) -> BTreeMap<&'static str, u64> {
    let mut want = baseline.clone();
    for k in ["bound_cgroups", "map_cgroups", "cgroup_attachments"] {
        let v = want[k] as i64 + others1.len() as i64 - others0.len() as i64;
        want.insert(k, v.max(0) as u64);
    }
    if others0 != others1 {
        want.remove("fanotify_marks");
    }
    want
}

/// Polls until the per-container counters match the (adjusted) baseline, up to 30 s:
/// (counters, what was expected, how many of ours are still listed).
fn settle(
    agent: &Agent,
    policy: &str,
    baseline: &BTreeMap<&'static str, u64>,
    others0: &BTreeSet<String>,
) -> (
    BTreeMap<&'static str, u64>,
    BTreeMap<&'static str, u64>,
    usize,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ours, others1) = bound_split(agent, policy);
        let want = expected(baseline, others0, &others1);
        let got: BTreeMap<&'static str, u64> = per_container(&status(agent))
            .into_iter()
            .filter(|(k, _)| want.contains_key(k))
            .collect();
        // Only a reading taken while other tests' containers stood still is comparable.
        let steady = bound_split(agent, policy).1 == others1;
        if (steady && got == want && ours == 0) || Instant::now() > deadline {
            return (got, want, ours);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Removes the named containers when dropped (also when an assertion fails mid-test).
struct RemoveOnDrop(Vec<String>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        parallel(&self.0, |n| {
            let _ = docker_out(&["rm", "-f", n]);
        });
    }
}

#[test]
fn removed_containers_release_kernel_state() {
    let _lock = exclusive();
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
    let (_, others0) = bound_split(&agent, &pname);
    let started = Instant::now();

    let lbl = format!("palisade.test={label}");
    let names: Vec<String> = (0..CHURN)
        .map(|i| unique_name(&format!("pal-churn{i}")))
        .collect();
    // Batches: create and bind a batch, check it is really policed, remove it.
    let never: Vec<String> = (0..20)
        .map(|i| unique_name(&format!("pal-never{i}")))
        .collect();
    let _cleanup = RemoveOnDrop(names.iter().chain(&never).cloned().collect());
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
        // Ours all listed under the policy, with kernel entries, attachments and marks; the
        // allowed entrypoint image of each recorded (only this policy polices exec, and each
        // container's root is its own device). Other tests' containers (under the node
        // default) may come and go meanwhile, so only lower bounds hold for the shared counters.
        let policed = |s: &BTreeMap<String, u64>, ours: usize| {
            ours == batch.len()
                && s["map_cgroups"] >= n
                && s["cgroup_attachments"] >= n
                && s["fanotify_marks"] >= n
                && s["map_exec_inodes"] >= baseline["map_exec_inodes"] + n
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let (s, ours) = loop {
            let (ours, _) = bound_split(&agent, &pname);
            let s = status(&agent);
            if policed(&s, ours) || Instant::now() > deadline {
                break (s, ours);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(
            policed(&s, ours),
            "batch not fully policed: {ours} of {n} bound; {s:?} (baseline {baseline:?})"
        );
        peak = s;
        parallel(batch, |n| {
            docker(&["rm", "-f", n]).unwrap_or_else(|e| panic!("{e}"));
        });
    }
    // Containers created but never started: their pending bindings must go with them.
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

    let (got, want, ours) = settle(&agent, &pname, &baseline, &others0);
    eprintln!(
        "churn: {CHURN} containers + {} never started in {:?}; baseline {base:?}; last batch {peak:?}; after {got:?}",
        never.len(),
        started.elapsed()
    );
    assert_eq!(ours, 0, "containers of ours still bound");
    assert_eq!(
        got,
        want,
        "kernel state leaked (expected: baseline adjusted for other tests' containers); agent log tail:\n{}",
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

/// cgroup-v1 hierarchies (hybrid hosts): their directories' kernfs ids are allocated in the
/// same number range as cgroup-v2 ids, so a v1 rmdir must not touch a v2 binding.
fn v1_hierarchies() -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists() && !p.join("cgroup.controllers").exists())
        .collect()
}

/// Id the next directory made under `dir` gets (kernfs ids are allocated cyclically per
/// hierarchy, so making and removing directories moves the cursor on).
fn next_id(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let probe = dir.join(format!("palisade-idenf-{}", std::process::id()));
    std::fs::create_dir(&probe).unwrap();
    let ino = std::fs::metadata(&probe).unwrap().ino();
    std::fs::remove_dir(&probe).unwrap();
    ino
}

/// Moves the v2 id cursor past every v1 hierarchy's, so the next container's v2 cgroup gets an
/// id the v1 hierarchies have yet to hand out.
fn advance_v2_ids(v2_root: &std::path::Path) {
    let v1_max = v1_hierarchies()
        .iter()
        .map(|h| next_id(h))
        .max()
        .unwrap_or(0);
    while next_id(v2_root) < v1_max + 500 {}
}

/// Makes and removes v1 cgroups until one gets kernfs id `target`, whose rmdir then runs the
/// `cgroup_rmdir` hook with that id. Returns whether the id was hit.
fn rmdir_v1_with_id(target: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    for h in v1_hierarchies() {
        let probe = h.join(format!("palisade-idenf-{}", std::process::id()));
        for _ in 0..200_000 {
            if std::fs::create_dir(&probe).is_err() {
                break;
            }
            let ino = std::fs::metadata(&probe)
                .map(|m| m.ino())
                .unwrap_or(u64::MAX);
            let _ = std::fs::remove_dir(&probe);
            if ino == target {
                return true;
            }
            if ino > target {
                break;
            }
        }
    }
    false
}

/// Reproduced the `cgroup_rmdir` v1/v2 id collision once (egress allowed after the rmdir);
/// fixed in agent-ebpf since. Hitting the exact id is not deterministic (a v1 directory takes
/// one kernfs id per control file too, so the cursor moves in steps of ~20), hence ignored.
#[test]
#[ignore = "needs an exact kernfs id collision, which is probabilistic; run with --ignored"]
fn removing_a_v1_cgroup_with_the_same_id_keeps_the_binding() {
    let _lock = exclusive();
    ensure_docker().unwrap();
    if v1_hierarchies().is_empty() {
        eprintln!("no cgroup-v1 hierarchy on this host: nothing to collide with");
        return;
    }
    let agent = Agent::start("idenf-v1", &["--enforcer", "compat"]).unwrap();
    let label = unique_name("v1");
    let pname = format!("idenf-v1-{}", std::process::id());
    let body = "  network:\n    egress: []\n";
    agent
        .write_policy("v1.yaml", &policy(&pname, &label, "enforce", body))
        .unwrap();
    let root = palisade::containers::cgroup2::find_cgroup2_mount().unwrap();
    advance_v2_ids(&root);
    let lbl = format!("palisade.test={label}");
    let c = Container::with_args(
        &["run", "-d"],
        &unique_name("pal-v1"),
        &["--network", "none", "--label", &lbl],
        &["sleep", "600"],
    )
    .unwrap();
    agent.wait_bound(&c.id, &pname);
    let (_, _, err) = c.exec(&["nc", "127.0.0.1", "1"]);
    assert!(err.contains("not permitted"), "egress denied before: {err}");
    let dir = palisade::containers::cgroup2::absolute_path(&root, &c.cgroup_path().unwrap());
    let id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(dir).unwrap());
    assert!(rmdir_v1_with_id(id), "no v1 hierarchy reached id {id}");
    let (_, _, err) = c.exec(&["nc", "127.0.0.1", "1"]);
    assert!(
        err.contains("not permitted"),
        "the container lost its kernel binding when a v1 cgroup with its id was removed: {err}; status {:?}",
        status(&agent)
    );
}
