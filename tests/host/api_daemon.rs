//! The API against the real daemon: a real `palisade agent --enforcer compat` process, its unix
//! socket, the real `palisade` CLI binary and the tonic client, real Docker containers doing
//! allowed and denied things. Each case checks what the container saw and what the API reported.
use std::{net::TcpListener, process::Command, time::Duration};

use palisade::api::{client::connect_unix, pb};
use serde_json::Value;
use support::*;

#[path = "api_daemon/support.rs"]
mod support;

#[test]
fn follow_with_filters_sees_exactly_the_matching_events() {
    let _lock = lock();
    let fx = Fixture::new("filters");
    let agent = agent("apid-filters", &[]);
    apply(&agent, &fx.file("web.yaml", &fx.good("enforce")));
    let a = fx.container("pal-a");
    let b = fx.container("pal-b");
    wait_bound(&agent, &a, &fx.policy);
    wait_bound(&agent, &b, &fx.policy);

    let f = Follower::spawn(
        &agent,
        &[
            "events",
            "--follow",
            "--container",
            &a.name,
            "--kind",
            "open",
            "--verdict",
            "denied",
            "-o",
            "json",
        ],
    );
    let from = agent.event_count();
    assert_eq!(
        read(&a, "/data/ok.txt").as_deref(),
        Ok("ok\n"),
        "allowed read"
    );
    let (rc, out, _) = a.exec(&["/tmp/echo", "ran"]);
    assert!(
        rc != 0 && !out.contains("ran"),
        "exec outside the allow-list must fail"
    );
    wait_for(&agent, from, |e| {
        e["kind"] == "exec" && e["verdict"] == "denied" && e["path"] == "/tmp/echo"
    });
    assert_denied(&agent, &a, "/data/secret.txt");
    assert_denied(&agent, &a, "/data/key.txt");
    assert_denied(&agent, &b, "/data/secret.txt");
    // The follower is behind the agent's own stdout subscriber by at most a moment.
    std::thread::sleep(Duration::from_millis(500));
    let got = f.events();
    let paths: Vec<&str> = got
        .iter()
        .map(|e| e["path"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        paths,
        ["/data/secret.txt", "/data/key.txt"],
        "follower saw: {got:#?}"
    );
    for e in &got {
        assert!(
            is(e, "open", "denied", &a, e["path"].as_str().unwrap()),
            "{e}"
        );
        assert_eq!(e["policy"], fx.policy.as_str());
        assert!(e["seq"].as_u64().unwrap() > 0);
    }
    // The unfiltered stream had more from these containers than the follower got.
    let all = agent.events();
    let others = all[from..]
        .iter()
        .filter(|e| {
            e["container"]["name"] == a.name.as_str() || e["container"]["name"] == b.name.as_str()
        })
        .count();
    assert!(
        others > got.len(),
        "the filters must have had something to exclude"
    );
}

#[test]
fn since_seq_replays_held_events_then_follows_live() {
    let _lock = lock();
    let fx = Fixture::new("resume");
    let agent = agent("apid-resume", &[]);
    apply(&agent, &fx.file("web.yaml", &fx.good("enforce")));
    let a = fx.container("pal-r");
    wait_bound(&agent, &a, &fx.policy);

    let first = assert_denied(&agent, &a, "/data/secret.txt");
    let n = first["seq"].as_u64().unwrap();
    assert_eq!(read(&a, "/data/ok.txt").as_deref(), Ok("ok\n"));
    let second = assert_denied(&agent, &a, "/data/key.txt");

    // CLI, no --follow: every held event after N, in order, then the stream ends.
    let out = cli_ok(
        &agent,
        &["events", "--since-seq", &n.to_string(), "-o", "json"],
    );
    let replay: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<u64> = replay.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs.first(), Some(&(n + 1)), "resume starts right after N");
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "no hole, no duplicate: {seqs:?}"
    );
    let last = *seqs.last().unwrap();
    agent
        .wait_event_from(0, WAIT, |e| e["seq"].as_u64() >= Some(last))
        .unwrap();
    let want: Vec<u64> = agent
        .events()
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .filter(|s| (n + 1..=last).contains(s))
        .collect();
    assert_eq!(seqs, want, "the replay is what the agent published after N");
    assert!(
        replay
            .iter()
            .any(|e| e["seq"] == second["seq"] && e["path"] == "/data/key.txt")
    );

    // With filters: only the second denied read.
    let out = cli_ok(
        &agent,
        &[
            "events",
            "--since-seq",
            &n.to_string(),
            "--container",
            &a.name,
            "--kind",
            "open",
            "--verdict",
            "denied",
            "-o",
            "json",
        ],
    );
    let filtered: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(filtered.len(), 1, "{out}");
    assert_eq!(filtered[0]["seq"], second["seq"]);

    // tonic client: resume from N and keep following; a new denial arrives after the held ones.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = connect_unix(&agent.socket).await.unwrap();
        let filter = pb::EventFilter {
            containers: vec![a.name.clone()],
            kinds: vec![pb::Kind::Open.into()],
            resume_from_seq: Some(n),
            follow: true,
            ..Default::default()
        };
        let mut stream = client.stream_events(filter).await.unwrap().into_inner();
        let held = next_event(&mut stream).await;
        assert_eq!(held.seq, second["seq"].as_u64().unwrap());
        let c = a.id.clone();
        let live = tokio::task::spawn_blocking(move || {
            Command::new("docker")
                .args(["exec", &c, "cat", "/data/secret.txt"])
                .output()
                .unwrap()
        });
        let ev = next_event(&mut stream).await;
        assert!(!live.await.unwrap().status.success(), "denied read");
        assert!(ev.seq > held.seq);
        assert_eq!(ev.path.as_deref(), Some("/data/secret.txt"));
        assert_eq!(ev.verdict(), pb::Verdict::Denied);
    });
}

#[test]
fn malformed_policies_are_reported_and_the_applied_policy_stays_enforced() {
    let _lock = lock();
    let fx = Fixture::new("bad");
    let agent = agent("apid-bad", &[]);
    agent.write_policy("web.yaml", &fx.good("enforce")).unwrap();
    let a = fx.container("pal-bad");
    wait_bound(&agent, &a, &fx.policy);
    assert_denied(&agent, &a, "/data/secret.txt");

    // Over gRPC: non-zero exit, `file:line:col: field: reason` on stderr, nothing applied.
    let bad = fx.file("bad.yaml", &fx.bad());
    let (code, out, err) = text(
        &agent
            .cli(&["policy", "apply", "-f", bad.to_str().unwrap()])
            .unwrap(),
    );
    assert_eq!(code, 1, "stdout: {out}");
    assert_eq!(
        err,
        format!(
            "{}:13:14: spec.files[1].path: must be absolute\n",
            bad.display()
        )
    );
    assert!(!out.contains("applied"), "{out}");
    let (code, out, _) = text(
        &agent
            .cli(&["policy", "apply", "-f", bad.to_str().unwrap(), "-o", "json"])
            .unwrap(),
    );
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["applied"], serde_json::json!([]));
    assert_eq!(v["errors"][0]["line"], 13);
    assert_eq!(v["errors"][0]["column"], 14);
    assert_eq!(v["errors"][0]["field"], "spec.files[1].path");
    assert_eq!(v["errors"][0]["reason"], "must be absolute");
    assert_eq!(listed_mode(&agent, &fx.policy), "enforce");
    assert_denied(&agent, &a, "/data/secret.txt");

    // Through the policy directory: a new bad file, reported as a rejected-policy event.
    let rejected = |file: &str| {
        let want = format!(
            "policy rejected: {}:13:14: spec.files[1].path: must be absolute",
            agent.policy_dir.join(file).display()
        );
        move |e: &Value| {
            e["kind"] == "policy" && e["verdict"] == "denied" && e["message"] == want.as_str()
        }
    };
    let from = agent.event_count();
    agent.write_policy("bad.yaml", &fx.bad()).unwrap();
    wait_for(&agent, from, rejected("bad.yaml"));
    assert_eq!(listed_mode(&agent, &fx.policy), "enforce");
    assert_denied(&agent, &a, "/data/secret.txt");

    // The good file itself turned bad: its policy stays as it was.
    let from = agent.event_count();
    agent.write_policy("web.yaml", &fx.bad()).unwrap();
    wait_for(&agent, from, rejected("web.yaml"));
    assert_eq!(listed_mode(&agent, &fx.policy), "enforce");
    assert_denied(&agent, &a, "/data/secret.txt");

    // Another change in the directory reloads it: the unchanged bad files are not re-reported.
    let from = agent.event_count();
    let other = fx
        .good("monitor")
        .replace(&fx.policy, "unrelated")
        .replace(&fx.label, "nobody");
    agent.write_policy("other.yaml", &other).unwrap();
    wait_for(&agent, from, |e| {
        e["kind"] == "policy" && e["message"] == "policies applied: unrelated"
    });
    std::thread::sleep(Duration::from_millis(500));
    let again: Vec<Value> = agent.events()[from..]
        .iter()
        .filter(|e| e["kind"] == "policy" && e["verdict"] == "denied")
        .cloned()
        .collect();
    assert!(again.is_empty(), "bad files reported again: {again:#?}");

    // Fixing the file applies it (monitor: the read now succeeds and is reported).
    let from = agent.event_count();
    agent.write_policy("web.yaml", &fx.good("monitor")).unwrap();
    wait_for(&agent, from, |e| {
        e["kind"] == "policy" && e["verdict"] == "allowed"
    });
    assert_eq!(listed_mode(&agent, &fx.policy), "monitor");
    let from = agent.event_count();
    assert_eq!(read(&a, "/data/secret.txt").as_deref(), Ok("secret\n"));
    wait_for(&agent, from, |e| {
        is(e, "open", "violation", &a, "/data/secret.txt")
    });
}

#[test]
fn cli_lists_gets_switches_modes_and_deletes_against_the_daemon() {
    let _lock = lock();
    let fx = Fixture::new("cli");
    let agent = agent("apid-cli", &[]);
    let file = fx.file("web.yaml", &fx.good("enforce"));
    assert_eq!(
        apply(&agent, &file),
        format!("policy/{} applied ({})\n", fx.policy, file.display())
    );
    let a = fx.container("pal-cli");
    wait_bound(&agent, &a, &fx.policy);
    let selector = format!("palisade.test={}", fx.label);

    // policy list: table and JSON.
    let out = cli_ok(&agent, &["policy", "list"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(tokens(lines[0]), ["NAME", "MODE", "CONTAINERS", "SELECTOR"]);
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(
        tokens(lines[1]),
        [fx.policy.as_str(), "enforce", "1", &selector]
    );
    let list = cli_json(&agent, &["policy", "list"]);
    let p = &list[0];
    assert_eq!(
        (p["name"].as_str(), p["mode"].as_str()),
        (Some(fx.policy.as_str()), Some("enforce"))
    );
    assert_eq!(
        (p["bound_containers"].as_u64(), p["selector"].as_str()),
        (Some(1), Some(selector.as_str()))
    );
    assert!(
        p["yaml"]
            .as_str()
            .unwrap()
            .contains(&format!("name: {}", fx.policy))
    );

    // policy get: the YAML as applied, and JSON; a missing one is "not found" (exit 4).
    let out = cli_ok(&agent, &["policy", "get", &fx.policy]);
    assert!(
        out.contains(&format!("name: {}", fx.policy)) && out.contains("mode: enforce"),
        "{out}"
    );
    assert!(out.contains("/data/secret.txt"), "{out}");
    assert_eq!(
        cli_json(&agent, &["policy", "get", &fx.policy])["name"],
        fx.policy.as_str()
    );
    assert_eq!(
        agent
            .cli(&["policy", "get", "nosuch"])
            .unwrap()
            .status
            .code(),
        Some(4)
    );

    // containers: table, JSON, detail.
    let out = cli_ok(&agent, &["containers"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        tokens(lines[0]),
        ["ID", "NAME", "IMAGE", "POD", "POLICY", "MODE", "TIER"]
    );
    let row = lines
        .iter()
        .find(|l| l.contains(&a.name))
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(
        tokens(row),
        [
            &a.id[..12],
            &a.name,
            "palisade-test:latest",
            "-",
            &fx.policy,
            "enforce",
            "compat"
        ]
    );
    let list = cli_json(&agent, &["containers"]);
    let c = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["meta"]["id"] == a.id.as_str())
        .unwrap();
    assert_eq!(
        (c["meta"]["name"].as_str(), c["meta"]["runtime"].as_str()),
        (Some(a.name.as_str()), Some("docker"))
    );
    assert_eq!(
        (c["policy"].as_str(), c["mode"].as_str(), c["tier"].as_str()),
        (Some(fx.policy.as_str()), Some("enforce"), Some("compat"))
    );
    assert_eq!(c["meta"]["image"], "palisade-test:latest");
    assert!(c["meta"]["cgroup_id"].as_u64().unwrap() > 0);
    let out = cli_ok(&agent, &["containers", &a.name]);
    assert!(
        out.contains(&format!("id:      {}", a.id))
            && out.contains(&format!("policy:  {}", fx.policy)),
        "{out}"
    );

    // status: text and JSON.
    let out = cli_ok(&agent, &["status"]);
    for want in [
        "version:",
        "tier:      compat",
        "features:",
        "counters:",
        "policies",
    ] {
        assert!(out.contains(want), "{want:?} missing in\n{out}");
    }
    let s = cli_json(&agent, &["status"]);
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["tier"], "compat");
    assert!(
        s["kernel_features"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().starts_with("kernel="))
    );
    assert_eq!(s["counters"]["policies"], 1);
    assert!(s["counters"]["bound_cgroups"].as_u64().unwrap() >= 1);
    assert!(s["counters"]["events_published"].as_u64().unwrap() > 0);

    // policy mode: live switch to monitor (the denied read succeeds, reported as a violation)
    // and back to enforce.
    assert_denied(&agent, &a, "/data/secret.txt");
    assert_eq!(
        cli_ok(&agent, &["policy", "mode", &fx.policy, "monitor"]),
        format!("policy/{} mode set to monitor\n", fx.policy)
    );
    let from = agent.event_count();
    assert_eq!(read(&a, "/data/secret.txt").as_deref(), Ok("secret\n"));
    let v = wait_for(&agent, from, |e| {
        is(e, "open", "violation", &a, "/data/secret.txt")
    });
    assert_eq!(
        (v["mode"].as_str(), v["policy"].as_str()),
        (Some("monitor"), Some(fx.policy.as_str()))
    );
    assert_eq!(listed_mode(&agent, &fx.policy), "monitor");
    let m = cli_json(&agent, &["policy", "mode", &fx.policy, "enforce"]);
    assert_eq!(
        m,
        serde_json::json!({"policy": fx.policy, "mode": "enforce"})
    );
    assert_denied(&agent, &a, "/data/secret.txt");
    assert_eq!(
        agent
            .cli(&["policy", "mode", "nosuch", "monitor"])
            .unwrap()
            .status
            .code(),
        Some(4)
    );

    // policy delete: gone from the list, the container unbound, the read no longer denied.
    assert_eq!(
        cli_ok(&agent, &["policy", "delete", &fx.policy]),
        format!("policy/{} deleted\n", fx.policy)
    );
    assert_eq!(
        cli_ok(&agent, &["policy", "list"]).lines().count(),
        1,
        "only the header left"
    );
    assert_eq!(cli_json(&agent, &["policy", "list"]), serde_json::json!([]));
    let list = cli_json(&agent, &["containers"]);
    let c = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["meta"]["id"] == a.id.as_str())
        .unwrap();
    assert_eq!(c["policy"], Value::Null);
    assert_eq!(read(&a, "/data/secret.txt").as_deref(), Ok("secret\n"));
    let (code, _, err) = text(&agent.cli(&["policy", "delete", &fx.policy]).unwrap());
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("no policy named"), "{err}");
}

/// `auto` on a node where BPF-LSM is active either runs tier 1 or says loudly why not: the
/// status line, the metric and an event (these CI hosts list `bpf` but refuse trampolines).
#[test]
fn auto_tier_choice_is_explained() {
    let _lock = lock();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let agent = palisade_tests::agent::Agent::start(
        "apid-auto",
        &[
            "--enforcer",
            "auto",
            "--no-discovery",
            "--metrics-addr",
            &metrics,
        ],
    )
    .unwrap();
    let status = cli_ok(&agent, &["status"]);
    // The agent mounted securityfs if it was not, to read the active LSMs.
    let lsms = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    if status.contains("tier:      lsm") || !lsms.split(',').any(|l| l.trim() == "bpf") {
        assert!(!status.contains("fallback:"), "{status}");
        return;
    }
    let line = status
        .lines()
        .find(|l| l.starts_with("fallback:"))
        .unwrap_or_else(|| panic!("tier 2 on a BPF-LSM node without a reason: {status}"));
    assert!(line.contains("BPF-LSM program"), "{line}");
    let ev = wait_for(&agent, 0, |e| {
        e["kind"] == "agent" && e["flags"].to_string().contains("tier_fallback")
    });
    assert_eq!(ev["verdict"], "violation", "{ev}");
    wait_metric(port, "palisade_tier_fallback{reason=", |v| v == 1.0);
}

#[test]
fn metrics_health_and_gauges_from_the_daemon() {
    let _lock = lock();
    let fx = Fixture::new("metrics");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agent = agent(
        "apid-metrics",
        &["--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    assert_eq!(http_get(port, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(port, "/readyz"), (200, "ready\n".into()));

    apply(&agent, &fx.file("web.yaml", &fx.good("enforce")));
    let a = fx.container("pal-met");
    wait_bound(&agent, &a, &fx.policy);
    assert_denied(&agent, &a, "/data/secret.txt");

    let body = wait_metric(
        port,
        "palisade_events_total{kind=\"open\",verdict=\"denied\"",
        |v| v >= 1.0,
    );
    assert!(
        sample(
            &body,
            "palisade_events_total{kind=\"policy\",verdict=\"allowed\""
        )
        .is_some_and(|v| v >= 1.0)
    );
    assert!(sample(&body, "palisade_last_seq").is_some_and(|v| v > 0.0));
    assert!(
        sample(&body, "palisade_subscribers").is_some_and(|v| v >= 1.0),
        "the --events-stdout subscriber"
    );
    wait_metric(port, "palisade_policies ", |v| v == 1.0);
    wait_metric(port, "palisade_bound_containers ", |v| v == 1.0);
    // The bound container's cgroup entry and the policy's rules fill the kernel maps.
    wait_metric(port, "palisade_map_fill_ratio{map=\"PAL_CGROUPS\"}", |v| {
        v > 0.0
    });
    wait_metric(
        port,
        "palisade_map_fill_ratio{map=\"PAL_FILE_RULES\"}",
        |v| v > 0.0,
    );
    wait_metric(port, "palisade_agent_info{version=", |v| v == 1.0);
    let known = cli_json(&agent, &["containers"]).as_array().unwrap().len() as f64;
    wait_metric(port, "palisade_containers ", |v| {
        v >= 1.0 && v >= known - 0.5
    });

    cli_ok(&agent, &["policy", "delete", &fx.policy]);
    wait_metric(port, "palisade_policies ", |v| v == 0.0);
    wait_metric(port, "palisade_bound_containers ", |v| v == 0.0);
}

#[test]
fn admin_calls_over_the_socket_are_audited() {
    let _lock = lock();
    let fx = Fixture::new("audit");
    let agent = agent("apid-audit", &["--no-discovery"]);
    let from = agent.event_count();
    let good = fx.file("web.yaml", &fx.good("enforce"));
    let bad = fx.file("bad.yaml", &fx.bad());
    apply(&agent, &good);
    assert_eq!(
        agent
            .cli(&["policy", "apply", "-f", bad.to_str().unwrap()])
            .unwrap()
            .status
            .code(),
        Some(1)
    );
    cli_ok(&agent, &["policy", "mode", &fx.policy, "monitor"]);
    cli_ok(&agent, &["policy", "delete", &fx.policy]);

    let log = std::fs::read_to_string(agent.dir.join("audit.jsonl")).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let calls: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| (l["call"].as_str().unwrap(), l["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        calls,
        [
            ("ApplyPolicy", "ok"),
            ("ApplyPolicy", "failed"),
            ("SetPolicyMode(monitor)", "ok"),
            ("DeletePolicy", "ok")
        ],
        "{log}"
    );
    let uid = nix::unistd::getuid().as_raw();
    for l in &lines {
        assert_eq!(l["who"], format!("uid:{uid}").as_str(), "{l}");
        assert_eq!(
            (l["transport"].as_str(), l["role"].as_str()),
            (Some("unix"), Some("admin"))
        );
        let t = l["time"].as_str().unwrap();
        assert!(
            t.len() == 24 && t.ends_with('Z') && t.as_bytes()[10] == b'T',
            "RFC 3339 UTC: {t}"
        );
    }
    assert_eq!(
        lines[0]["target"],
        format!("{}: {}", good.display(), fx.policy).as_str()
    );
    assert_eq!(lines[1]["target"], bad.display().to_string().as_str());
    assert!(
        lines[1]["error"]
            .as_str()
            .unwrap()
            .contains("13:14: spec.files[1].path: must be absolute"),
        "{}",
        lines[1]
    );
    assert_eq!(lines[2]["target"], fx.policy.as_str());
    // The same facts on the event stream, flagged `audit`.
    let audited = agent.events()[from..]
        .iter()
        .filter(|e| {
            e["kind"] == "agent"
                && e["flags"]
                    .as_array()
                    .is_some_and(|f| f.contains(&"audit".into()))
        })
        .count();
    assert_eq!(audited, 4);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(agent.dir.join("audit.jsonl"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
