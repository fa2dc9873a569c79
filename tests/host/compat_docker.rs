//! Tier 2 (no BPF-LSM), end to end: the real agent process in `--enforcer compat`, real Docker
//! containers, real policies from its policy directory. Every case asserts what the process saw
//! (exit code / errno) and the event the agent emitted.
use std::{
    net::{TcpListener, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use palisade_tests::{
    agent::{Agent, build_program, exclusive},
    docker::{Container, docker, ensure_docker, unique_name},
};
use serde_json::Value;

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    /// Host files copied into containers: a data dir (bind-mounted at /data) and helpers.
    fn new() -> Fixture {
        let dir = std::env::temp_dir().join(format!("palisade-compat-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("data/ok.txt"), "data-ok\n").unwrap();
        std::fs::write(dir.join("data/private.txt"), "data-private\n").unwrap();
        std::fs::write(dir.join("ok.txt"), "root-ok\n").unwrap();
        std::fs::write(dir.join("secret.txt"), "root-secret\n").unwrap();
        build_program("memfd_exec", &dir).unwrap();
        build_program("net_probe", &dir).unwrap();
        build_program("ns_escape", &dir).unwrap();
        build_program("open_race", &dir).unwrap();
        Fixture { dir }
    }

    /// `docker create` + copy the fixtures in + `docker start`.
    fn container(&self, name: &str, labels: &[(&str, &str)]) -> Container {
        self.container_with(name, labels, &[])
    }

    /// [`Fixture::container`] with extra `docker create` arguments.
    fn container_with(&self, name: &str, labels: &[(&str, &str)], extra: &[&str]) -> Container {
        let data = format!("{}:/data:ro", self.dir.join("data").display());
        let mut args: Vec<String> = vec!["--network".into(), "host".into(), "-v".into(), data];
        args.extend(extra.iter().map(|a| a.to_string()));
        for (k, v) in labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let c = Container::with_args(&["create"], name, &args, &["sleep", "600"]).unwrap();
        for (src, dst) in [
            ("ok.txt", "/ok.txt"),
            ("secret.txt", "/secret.txt"),
            ("memfd_exec", "/memfd_exec"),
            ("net_probe", "/net_probe"),
            ("ns_escape", "/ns_escape"),
            ("open_race", "/open_race"),
        ] {
            docker(&[
                "cp",
                self.dir.join(src).to_str().unwrap(),
                &format!("{}:{dst}", c.id),
            ])
            .unwrap();
        }
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

fn policy(name: &str, label: &str, mode: &str, tcp4: u16, tcp6: u16) -> String {
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
    allow: [/bin/busybox, /memfd_exec, /net_probe, /ns_escape, /open_race]
  files:
    - {{path: /, access: read}}
    - {{path: /tmp/, access: any}}
    - {{path: /dev/, access: any}}
    - {{path: /proc/, access: any}}
    - {{path: /secret.txt, access: any, action: deny}}
    - {{path: /data/private.txt, access: any, action: deny}}
  network:
    egress:
      - {{cidr: 127.0.0.1/32, ports: [{tcp4}], protocol: tcp}}
      - {{cidr: "::1/128", ports: [{tcp6}], protocol: tcp}}
"#
    )
}

fn find(
    agent: &Agent,
    from: usize,
    kind: &str,
    verdict: &str,
    key: &str,
    val: &str,
) -> Option<Value> {
    agent.wait_event_from(from, Duration::from_secs(5), |e| {
        e["kind"] == kind && e["verdict"] == verdict && e[key].as_str() == Some(val)
    })
}

fn container_name(e: &Value) -> Option<&str> {
    e["container"]["name"].as_str()
}

#[test]
fn compat_tier_enforces_exec_open_and_egress_in_real_containers() {
    let _lock = exclusive();
    ensure_docker().unwrap();
    let fx = Fixture::new();
    let allowed4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let denied4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let allowed6 = TcpListener::bind("[::1]:0").unwrap();
    let denied6 = TcpListener::bind("[::1]:0").unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (pa4, pd4) = (
        allowed4.local_addr().unwrap().port(),
        denied4.local_addr().unwrap().port(),
    );
    let (pa6, pd6) = (
        allowed6.local_addr().unwrap().port(),
        denied6.local_addr().unwrap().port(),
    );
    let pu = udp.local_addr().unwrap().port();

    let agent = Agent::start("compat", &["--enforcer", "compat"]).unwrap();
    let label = unique_name("lbl");
    let pname = format!("compat-{}", std::process::id());
    agent
        .write_policy("compat.yaml", &policy(&pname, &label, "enforce", pa4, pa6))
        .unwrap();

    let name = unique_name("pal-enf");
    let c = fx.container(&name, &[("palisade.test", &label)]);
    let other = fx.container(&unique_name("pal-free"), &[]);
    agent.wait_bound(&c.id, &pname);

    // Files: root mount and bind mount, allowed and denied.
    let (rc, out, _) = c.exec(&["cat", "/ok.txt"]);
    assert_eq!((rc, out.as_str()), (0, "root-ok\n"));
    let from = agent.event_count();
    let (rc, out, err) = c.exec(&["cat", "/secret.txt"]);
    assert_ne!(rc, 0, "denied read must fail: {out}");
    assert!(err.contains("not permitted"), "EPERM expected, got: {err}");
    let ev =
        find(&agent, from, "open", "denied", "path", "/secret.txt").expect("denied open event");
    assert_eq!(container_name(&ev), Some(name.as_str()));
    assert_eq!(ev["policy"], pname.as_str());
    let (rc, out, _) = c.exec(&["cat", "/data/ok.txt"]);
    assert_eq!((rc, out.as_str()), (0, "data-ok\n"));
    let (rc, _, err) = c.exec(&["cat", "/data/private.txt"]);
    assert!(
        rc != 0 && err.contains("not permitted"),
        "bind-mount deny: {err}"
    );
    assert!(find(&agent, from, "open", "denied", "path", "/data/private.txt").is_some());

    // Exec: a copy of busybox at a path not on the allow-list.
    let from = agent.event_count();
    let (rc, out, err) = c.exec(&["/tmp/echo", "ran"]);
    assert!(
        rc != 0 && !out.contains("ran"),
        "denied exec ran: {out} {err}"
    );
    assert!(
        find(&agent, from, "exec", "denied", "path", "/tmp/echo").is_some(),
        "denied exec event"
    );

    // Fileless exec: killed by the eBPF backstop before its first instruction.
    let from = agent.event_count();
    let (rc, out, _) = c.exec(&["/memfd_exec", "/bin/busybox", "echo", "fileless-ran"]);
    assert!(!out.contains("fileless-ran"), "memfd exec must not run");
    assert_eq!(rc, 137, "killed by SIGKILL");
    let ev = agent
        .wait_event_from(from, Duration::from_secs(5), |e| {
            e["kind"] == "exec"
                && e["verdict"] == "denied"
                && e["flags"].to_string().contains("fileless")
        })
        .expect("fileless exec event");
    assert!(ev["flags"].to_string().contains("killed"));

    // Egress: allowed and denied TCP on v4 and v6, UDP sendto and connected UDP.
    for (proto, addr, port, want) in [
        ("tcp", "127.0.0.1", pa4, "ok"),
        ("tcp", "127.0.0.1", pd4, "EPERM"),
        ("tcp", "::1", pa6, "ok"),
        ("tcp", "::1", pd6, "EPERM"),
        ("tcp", "::ffff:127.0.0.1", pa4, "ok"),
        ("tcp", "::ffff:127.0.0.1", pd4, "EPERM"),
        ("udp-sendto", "127.0.0.1", pu, "EPERM"),
        ("udp-connect", "127.0.0.1", pu, "EPERM"),
    ] {
        let from = agent.event_count();
        let (_, out, _) = c.exec(&["/net_probe", proto, addr, &port.to_string()]);
        assert_eq!(out.trim(), want, "{proto} {addr}:{port}");
        if want == "EPERM" {
            let ev = agent
                .wait_event_from(from, Duration::from_secs(5), |e| {
                    e["kind"] == "connect" && e["verdict"] == "denied" && e["port"] == port
                })
                .unwrap_or_else(|| panic!("no denied connect event for {proto} {addr}:{port}"));
            assert_eq!(container_name(&ev), Some(name.as_str()));
        }
    }

    // A second container and the host are unaffected.
    assert_eq!(other.exec(&["cat", "/secret.txt"]).1, "root-secret\n");
    assert_eq!(other.exec(&["/tmp/echo", "free"]).1, "free\n");
    assert_eq!(
        other
            .exec(&["/net_probe", "tcp", "127.0.0.1", &pd4.to_string()])
            .1
            .trim(),
        "ok"
    );
    assert_eq!(
        other
            .exec(&["/net_probe", "udp-sendto", "127.0.0.1", &pu.to_string()])
            .1
            .trim(),
        "ok"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", pd4)).is_ok());
    assert_eq!(
        std::fs::read_to_string(fx.dir.join("data/private.txt")).unwrap(),
        "data-private\n"
    );

    // Monitor mode, live: allowed but reported.
    agent
        .write_policy("compat.yaml", &policy(&pname, &label, "monitor", pa4, pa6))
        .unwrap();
    let from = agent.event_count();
    let (rc, out, _) = c.exec(&["cat", "/secret.txt"]);
    assert_eq!((rc, out.as_str()), (0, "root-secret\n"), "monitor allows");
    assert!(find(&agent, from, "open", "violation", "path", "/secret.txt").is_some());
    assert_eq!(
        c.exec(&["/net_probe", "tcp", "127.0.0.1", &pd4.to_string()])
            .1
            .trim(),
        "ok"
    );
    // And back to enforce.
    agent
        .write_policy("compat.yaml", &policy(&pname, &label, "enforce", pa4, pa6))
        .unwrap();
    let (rc, _, _) = c.exec(&["cat", "/secret.txt"]);
    assert_ne!(rc, 0, "enforce again");
}

/// The agent is SIGKILLed while enforcing: no denied operation succeeds while it is down (the
/// pinned eBPF programs keep enforcing egress and exec, the fanotify holder keeps opens
/// blocked), and a restarted agent takes over and enforces again.
#[test]
fn compat_tier_fails_closed_while_the_agent_is_down() {
    let _lock = exclusive();
    ensure_docker().unwrap();
    let fx = Fixture::new();
    let allowed4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let denied4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let (pa4, pd4) = (
        allowed4.local_addr().unwrap().port(),
        denied4.local_addr().unwrap().port(),
    );

    let mut agent = Agent::start("crash", &["--enforcer", "compat"]).unwrap();
    let label = unique_name("crash");
    let pname = format!("crash-{}", std::process::id());
    agent
        .write_policy("crash.yaml", &policy(&pname, &label, "enforce", pa4, pa4))
        .unwrap();
    // No seccomp profile (Kubernetes' default): the namespace guard, not seccomp, must stop
    // the unshare below.
    let c = fx.container_with(
        &unique_name("pal-crash"),
        &[("palisade.test", &label)],
        &["--security-opt", "seccomp=unconfined"],
    );
    agent.wait_bound(&c.id, &pname);
    assert_ne!(
        c.exec(&["cat", "/secret.txt"]).0,
        0,
        "denied before the crash"
    );
    assert_eq!(
        c.exec(&["/net_probe", "tcp", "127.0.0.1", &pd4.to_string()])
            .1
            .trim(),
        "EPERM"
    );

    // Probes started before the crash, released after it: an exec while the agent is down
    // would block on the fanotify group (that is the point), so they wait for a file that
    // `docker cp` creates from the host side.
    let probe = |port: u16| {
        let mut child = std::process::Command::new("docker")
            .args([
                "exec",
                &c.id,
                "/net_probe",
                "tcp",
                "127.0.0.1",
                &port.to_string(),
                "/go",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "waiting");
        (child, out)
    };
    let (mut denied_probe, mut denied_out) = probe(pd4);
    let (mut allowed_probe, mut allowed_out) = probe(pa4);
    // The namespace guard outlives the agent too (its programs are pinned).
    let mut escape = std::process::Command::new("docker")
        .args([
            "exec",
            &c.id,
            "/ns_escape",
            "unshare",
            "/tmp/ns-down",
            "/go",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut escape_out = std::io::BufReader::new(escape.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut escape_out, &mut line).unwrap();
    assert_eq!(line.trim(), "waiting");

    agent.crash();
    let go = fx.dir.join("go");
    std::fs::write(&go, "").unwrap();
    docker(&["cp", go.to_str().unwrap(), &format!("{}:/go", c.id)]).unwrap();
    let result = |out: &mut std::io::BufReader<std::process::ChildStdout>| {
        let mut line = String::new();
        std::io::BufRead::read_line(out, &mut line).unwrap();
        line.trim().to_string()
    };
    // Egress: the pinned cgroup programs still decide, in the kernel.
    assert_eq!(
        result(&mut denied_out),
        "EPERM",
        "denied connect while the agent is down"
    );
    assert_eq!(
        result(&mut allowed_out),
        "ok",
        "allowed connect while the agent is down"
    );
    let _ = denied_probe.wait();
    let _ = allowed_probe.wait();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut escape_out, &mut rest).unwrap();
    assert!(
        !rest.contains("escaped"),
        "unshare while the agent is down: {rest}"
    );
    assert_eq!(escape.wait().unwrap().code(), Some(137), "not killed");
    // Opens: the fanotify group is held by the holder, so the read blocks instead of passing.
    let blocked = std::process::Command::new("timeout")
        .args(["3", "docker", "exec", &c.id, "cat", "/secret.txt"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&blocked.stdout).contains("root-secret"),
        "a denied read succeeded while the agent was down"
    );

    agent.restart().unwrap();
    agent.wait_bound(&c.id, &pname);
    let (rc, out, err) = c.exec(&["cat", "/secret.txt"]);
    assert!(
        rc != 0 && !out.contains("root-secret"),
        "denied after restart: {out} {err}"
    );
    assert_ne!(
        c.exec(&["test", "-e", "/tmp/ns-down"]).0,
        0,
        "escape marker"
    );
    assert_eq!(
        c.exec(&["/ns_escape", "unshare", "/tmp/ns-after"]).0,
        137,
        "guard after restart"
    );
    assert_eq!(
        c.exec(&["cat", "/ok.txt"]).1,
        "root-ok\n",
        "allowed after restart"
    );
    assert_eq!(
        c.exec(&["/net_probe", "tcp", "127.0.0.1", &pd4.to_string()])
            .1
            .trim(),
        "EPERM"
    );
    assert_eq!(
        c.exec(&["/net_probe", "tcp", "127.0.0.1", &pa4.to_string()])
            .1
            .trim(),
        "ok"
    );
}

/// An attacker under Kubernetes' default profile (no seccomp) enters a user+mount namespace of
/// its own — where per-mount marks do not reach and a bind mount gives the secret an allowed
/// name — or a root of its own. The caller is killed at syscall entry: the marker is never
/// created, the secret never read, and each attempt is reported.
#[test]
fn compat_tier_keeps_the_workload_in_its_namespaces() {
    let _lock = exclusive();
    ensure_docker().unwrap();
    let fx = Fixture::new();
    let agent = Agent::start("nsesc", &["--enforcer", "compat"]).unwrap();
    let label = unique_name("nsesc");
    let pname = format!("nsesc-{}", std::process::id());
    agent
        .write_policy("nsesc.yaml", &policy(&pname, &label, "enforce", 1, 1))
        .unwrap();
    let c = fx.container_with(
        &unique_name("pal-nsesc"),
        &[("palisade.test", &label)],
        &["--security-opt", "seccomp=unconfined"],
    );
    agent.wait_bound(&c.id, &pname);
    assert_ne!(c.exec(&["cat", "/secret.txt"]).0, 0, "policy in force");

    for case in palisade_tests::attack::escapes("/tmp", "ia32-syscall") {
        let how = case.how;
        let from = agent.event_count();
        let (rc, out, err) = c.exec(&["/ns_escape", how, &case.marker_arg]);
        assert!(!out.contains("escaped"), "{how}: {out}{err}");
        assert_eq!(rc, 137, "{how}: not killed: {out}{err}");
        assert_ne!(
            c.exec(&["test", "-e", &case.marker]).0,
            0,
            "{how}: marker created"
        );
        let ev = agent
            .wait_event_from(from, Duration::from_secs(5), |e| {
                e["kind"] == "escape" && e["verdict"] == "denied" && e["access"] == case.op
            })
            .unwrap_or_else(|| panic!("{how}: no escape event"));
        assert!(ev["flags"].to_string().contains("killed"), "{ev}");
        assert_eq!(container_name(&ev), Some(c.name.as_str()), "{ev}");
    }
    // The clone3 race: a flipping thread rewrites clone_args.flags between the guard's read at
    // entry and the kernel's copy; the kernel's own flags (task_newtask) still catch it, and the
    // child dies at its first syscall, before it can create the marker.
    // Winning the race needs the flipping thread on another CPU at the right moment: a busy
    // machine may need a few rounds before the race path is taken once.
    let mut raced = None;
    for _ in 0..5 {
        let from = agent.event_count();
        let (_, out, err) = c.exec(&["/ns_escape", "clone3-race", "/tmp/ns-race", "40"]);
        assert!(!out.contains("escaped"), "clone3 race: {out}{err}");
        assert_ne!(c.exec(&["test", "-e", "/tmp/ns-race"]).0, 0, "race marker");
        raced = agent.wait_event_from(from, Duration::from_secs(2), |e| {
            e["kind"] == "escape" && e["flags"].to_string().contains("race")
        });
        if raced.is_some() {
            break;
        }
    }
    assert!(
        raced.is_some(),
        "the race path was never taken in 5 x 40 attempts"
    );

    // Raw, ping and packet sockets (Docker's default capabilities include CAP_NET_RAW): the
    // caller is killed at socket(); a raw UDP datagram never reaches the listener.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let pu = udp.local_addr().unwrap().port().to_string();
    for (mode, addr, op) in [
        ("raw", "127.0.0.1", "raw-socket"),
        ("raw", "::1", "raw-socket"),
        ("ping", "127.0.0.1", "ping-socket"),
        ("packet", "127.0.0.1", "packet-socket"),
    ] {
        let from = agent.event_count();
        let (rc, out, err) = c.exec(&["/net_probe", mode, addr, &pu]);
        assert_eq!(rc, 137, "{mode} {addr}: {out}{err}");
        agent
            .wait_event_from(from, Duration::from_secs(5), |e| {
                e["kind"] == "escape" && e["verdict"] == "denied" && e["access"] == op
            })
            .unwrap_or_else(|| panic!("{mode}: no escape event"));
    }
    udp.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(udp.recv(&mut [0u8; 64]).is_err(), "a raw datagram arrived");

    // The escape the guard exists for: bind the secret over an allowed name and read it.
    let (rc, out, _) = c.exec(&[
        "unshare",
        "-U",
        "-r",
        "-m",
        "sh",
        "-c",
        "mount --bind /secret.txt /ok.txt && cat /ok.txt",
    ]);
    assert!(
        !out.contains("root-secret"),
        "secret read through a bind mount"
    );
    assert_eq!(rc, 137);
}

/// The openat2 access-mode race: a second thread flips `open_how.flags` between read and write
/// while the first opens a file the policy makes read-only. The flags are read at syscall
/// entry; an open that the kernel then performs for writing is caught at syscall exit and its
/// caller killed before the descriptor reaches user space. The file is never written.
#[test]
fn compat_tier_openat2_flag_race_never_writes() {
    let _lock = exclusive();
    ensure_docker().unwrap();
    let fx = Fixture::new();
    let agent = Agent::start("race", &["--enforcer", "compat"]).unwrap();
    let label = unique_name("race");
    let pname = format!("race-{}", std::process::id());
    agent
        .write_policy("race.yaml", &policy(&pname, &label, "enforce", 1, 1))
        .unwrap();
    let c = fx.container(&unique_name("pal-race"), &[("palisade.test", &label)]);
    agent.wait_bound(&c.id, &pname);
    let from = agent.event_count();
    let (rc, out, err) = c.exec(&["/open_race", "/ok.txt", "20000"]);
    assert_eq!(
        c.exec(&["cat", "/ok.txt"]).1,
        "root-ok\n",
        "the read-only file was written"
    );
    assert!(!out.contains("won"), "{out}{err}");
    assert_eq!(rc, 137, "the race was never won, or not caught: {out}{err}");
    let ev = agent
        .wait_event_from(from, Duration::from_secs(5), |e| {
            e["kind"] == "escape" && e["access"] == "open-flags-race"
        })
        .expect("an open-flags-race event");
    assert_eq!(ev["verdict"], "denied", "{ev}");
}
