//! Tier 2's kernel-level machinery on every kernel of the matrix (`cargo xtask guest --kernel`),
//! where Docker is not available: the real agent with `--enforcer compat`, a policy bound to a
//! test cgroup, and a container stand-in (private mount namespace, pivoted root: [`Jail`]).
//! Checks what each kernel must provide: cgroup sock_addr hooks, fanotify permission events on
//! the container's mounts, the `sched_process_exec` backstop (fileless exec killed in the
//! kernel) and policy inheritance by sub-cgroups (`cgroup_mkdir`). Each case asserts the
//! forbidden effect did not happen and the denial event.
use std::{
    net::TcpListener,
    process::{Command, Output},
    time::Duration,
};

use palisade_tests::{
    agent::{AGENT_LOCK, Agent},
    cgroup::TestCgroup,
    jail::Jail,
};
use serde_json::Value;

fn policy(cgroup: &str, port: u16) -> String {
    format!(
        r#"apiVersion: palisade.dev/v1
kind: ContainerPolicy
metadata:
  name: guest-compat
spec:
  mode: enforce
  selector:
    cgroupPath: {cgroup}
  exec:
    allow: [/bin/busybox, /bin/net_probe, /bin/memfd_exec, /bin/ns_escape]
  files:
    - {{path: /, access: read}}
    - {{path: /tmp/, access: any}}
    - {{path: /dev/, access: any}}
    - {{path: /secret.txt, access: any, action: deny}}
  network:
    egress:
      - {{cidr: 127.0.0.1/32, ports: [{port}], protocol: tcp}}
"#
    )
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn event(agent: &Agent, from: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    agent
        .wait_event_from(from, Duration::from_secs(10), pred)
        .unwrap_or_else(|| panic!("no {what} event; events: {:#?}", &agent.events()[from..]))
}

#[test]
#[ignore = "runs in the QEMU guest (cargo xtask guest)"]
fn compat_tier_kernel_machinery() {
    let _lock = AGENT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = allowed.local_addr().unwrap().port();
    let denied = TcpListener::bind("127.0.0.1:0").unwrap();
    let pd = denied.local_addr().unwrap().port();

    let mut jail = Jail::new(
        "compat",
        &["/bin/net_probe", "/bin/memfd_exec", "/bin/ns_escape"],
    )
    .unwrap();
    std::fs::copy("/bin/busybox", jail.host_path("/bin/denied")).unwrap();
    std::fs::write(jail.host_path("/ok.txt"), "ok\n").unwrap();
    std::fs::write(jail.host_path("/secret.txt"), "secret\n").unwrap();

    let agent = Agent::start("compat", &["--enforcer", "compat", "--no-discovery"]).unwrap();
    let status = agent.cli(&["status"]).unwrap();
    assert!(
        out(&status).contains("tier:      compat"),
        "{}",
        out(&status)
    );
    let cg = TestCgroup::new("compat").unwrap();
    agent
        .write_policy("compat.yaml", &policy(&cg.rel, port))
        .unwrap();
    jail.start(&cg).unwrap();
    let run = |argv: &[&str]| jail.spawn(&cg, argv).unwrap().wait_with_output().unwrap();

    // The jail's first exec (its init) was held by the backstop until the agent had marked the
    // jail's mounts; later processes join its mount namespace.
    let o = run(&["/bin/busybox", "cat", "/ok.txt"]);
    assert_eq!(
        out(&o),
        "ok\n",
        "allowed read ({:?}); events {:#?}\nagent log:\n{}",
        o.status,
        agent.events(),
        agent.log()
    );

    // fanotify: a denied open fails and nothing is read.
    let from = agent.event_count();
    let o = run(&["/bin/busybox", "cat", "/secret.txt"]);
    assert!(
        !o.status.success(),
        "denied read: {}\nagent log:\n{}",
        out(&o),
        agent.log()
    );
    assert!(o.stdout.is_empty(), "secret bytes read: {}", out(&o));
    let e = event(&agent, from, "open denied", |e| {
        e["kind"] == "open" && e["verdict"] == "denied" && e["path"] == "/secret.txt"
    });
    assert_eq!(e["source"], "fanotify");

    // fanotify exec permission: a binary not on the list never runs.
    let from = agent.event_count();
    let r = jail
        .spawn(&cg, &["/bin/denied", "touch", "/tmp/denied-ran"])
        .and_then(|c| c.wait_with_output());
    assert!(
        r.as_ref().map_or(true, |o| !o.status.success()),
        "denied exec succeeded: {r:?}"
    );
    assert!(
        !jail.host_path("/tmp/denied-ran").exists(),
        "denied binary ran"
    );
    event(&agent, from, "exec denied", |e| {
        e["kind"] == "exec" && e["verdict"] == "denied"
    });

    // Backstop: a fileless image is killed in the kernel before its first instruction.
    let from = agent.event_count();
    let o = run(&[
        "/bin/memfd_exec",
        "/bin/busybox",
        "touch",
        "/tmp/fileless-ran",
    ]);
    assert!(!o.status.success(), "fileless exec: {}", out(&o));
    assert!(
        !jail.host_path("/tmp/fileless-ran").exists(),
        "fileless image ran"
    );
    event(&agent, from, "fileless exec denied", |e| {
        e["kind"] == "exec"
            && e["verdict"] == "denied"
            && e["flags"].to_string().contains("fileless")
    });

    // No namespace or root of its own: the caller is killed at syscall entry, before the
    // namespace or the child exists.
    for case in palisade_tests::attack::escapes("/tmp", "ia32-syscall") {
        let how = case.how;
        let from = agent.event_count();
        let o = run(&["/bin/ns_escape", how, &case.marker_arg]);
        assert!(!out(&o).contains("escaped"), "{how}: {}", out(&o));
        assert!(
            std::os::unix::process::ExitStatusExt::signal(&o.status) == Some(9),
            "{how}: not killed: {:?} {}",
            o.status,
            out(&o)
        );
        assert!(
            !jail.host_path(&case.marker).exists(),
            "{how}: marker created"
        );
        event(&agent, from, "escape denied", |e| {
            e["kind"] == "escape"
                && e["verdict"] == "denied"
                && e["access"] == case.op
                && e["flags"].to_string().contains("killed")
        });
    }

    // cgroup sock_addr hooks: egress by destination.
    let probe = |cg: &TestCgroup, p: u16| {
        let o = jail
            .spawn(cg, &["/bin/net_probe", "tcp", "127.0.0.1", &p.to_string()])
            .unwrap()
            .wait_with_output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(probe(&cg, port), "ok");
    let from = agent.event_count();
    assert_eq!(probe(&cg, pd), "EPERM");
    event(&agent, from, "connect denied", |e| {
        e["kind"] == "connect" && e["verdict"] == "denied" && e["port"] == pd
    });

    // The clone3 flag race (a thread rewrites the flags after the guard read them): caught with
    // the kernel's own copy at task_newtask; the child dies at its first syscall.
    let o = run(&["/bin/ns_escape", "clone3-race", "/tmp/ns-race", "20"]);
    assert!(!out(&o).contains("escaped"), "clone3 race: {}", out(&o));
    assert!(!jail.host_path("/tmp/ns-race").exists(), "race marker");

    // Other ways out: TCP Fast Open and AF_UNSPEC sendto are judged by the cgroup hooks; raw,
    // ping and packet sockets kill their caller (no allowRawSockets). Nothing arrives.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let pu = udp.local_addr().unwrap().port();
    for (mode, p) in [("tfo", pd), ("udp-unspec", pu)] {
        let o = jail
            .spawn(&cg, &["/bin/net_probe", mode, "127.0.0.1", &p.to_string()])
            .unwrap()
            .wait_with_output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "EPERM", "{mode}");
    }
    for (mode, addr, op) in [
        ("raw", "127.0.0.1", "raw-socket"),
        ("raw", "::1", "raw-socket"),
        ("ping", "127.0.0.1", "ping-socket"),
        ("packet", "127.0.0.1", "packet-socket"),
    ] {
        let from = agent.event_count();
        let o = jail
            .spawn(&cg, &["/bin/net_probe", mode, addr, &pu.to_string()])
            .unwrap()
            .wait_with_output()
            .unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&o.status),
            Some(9),
            "{mode} {addr}: {}",
            out(&o)
        );
        event(&agent, from, "raw socket denied", |e| {
            e["kind"] == "escape" && e["verdict"] == "denied" && e["access"] == op
        });
    }
    udp.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(udp.recv(&mut [0u8; 64]).is_err(), "a datagram arrived");
    denied.set_nonblocking(true).unwrap();
    assert!(denied.accept().is_err(), "a connection arrived");

    // A sub-cgroup created later inherits the policy in the kernel (cgroup_mkdir).
    let child_dir = cg.dir.join("child");
    std::fs::create_dir(&child_dir).unwrap();
    let child = TestCgroup {
        id: palisade::containers::cgroup2::cgroup_id(&child_dir).unwrap(),
        rel: format!("{}/child", cg.rel),
        dir: child_dir,
    };
    assert_eq!(probe(&child, pd), "EPERM", "sub-cgroup escaped the policy");
    assert_eq!(probe(&child, port), "ok");

    // Processes outside the cgroup are not policed.
    let o = Command::new("/bin/busybox")
        .args(["cat"])
        .arg(jail.host_path("/secret.txt"))
        .output()
        .unwrap();
    assert_eq!(out(&o), "secret\n");
    drop(child);
}
