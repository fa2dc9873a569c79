//! Tier 1 (BPF-LSM), in the QEMU guest booted with `lsm=...,bpf` (`cargo xtask guest`): the real
//! agent with `--enforcer lsm`, a policy bound to a test cgroup by path, and a table of real
//! operations from processes in that cgroup. Each case asserts the errno the process saw and
//! the event the agent emitted.
use std::{
    net::{TcpListener, UdpSocket},
    process::{Command, Output, Stdio},
    time::Duration,
};

use std::os::unix::process::CommandExt;

use palisade_tests::{
    agent::{AGENT_LOCK, Agent},
    cgroup::TestCgroup,
};
use serde_json::Value;

const EPERM: i32 = 1;
const T: &str = "/tmp/t";

fn policy(cgroup: &str, mode: &str, tcp: u16) -> String {
    format!(
        r#"apiVersion: palisade.dev/v1
kind: ContainerPolicy
metadata:
  name: guest-lsm
spec:
  mode: {mode}
  selector:
    cgroupPath: {cgroup}
  exec:
    allow: [/bin/busybox, /bin/memfd_exec, /bin/net_probe, /bin/ns_escape]
  files:
    - {{path: /, access: read}}
    - {{path: /dev/, access: any}}
    - {{path: /tmp/t/, access: any}}
    - {{path: /tmp/t/secret.txt, access: any, action: deny}}
  network:
    egress:
      - {{cidr: 127.0.0.1/32, ports: [{tcp}], protocol: tcp}}
      - {{cidr: "::1/128", ports: [{tcp}], protocol: tcp}}
"#
    )
}

struct Guest {
    agent: Agent,
    cg: TestCgroup,
}

impl Guest {
    fn run(&self, argv: &[&str]) -> std::io::Result<Output> {
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.cg.spawn(&mut cmd)?.wait_with_output()
    }

    /// Spawn must fail with EPERM (the exec itself was denied).
    fn exec_denied(&self, argv: &[&str], dir: Option<&str>) {
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]);
        if let Some(d) = dir {
            cmd.current_dir(d);
        }
        match self.cg.spawn(&mut cmd) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(EPERM), "{argv:?}: {e}"),
            Ok(c) => panic!("{argv:?} was allowed: {:?}", c.wait_with_output()),
        }
    }

    fn event(
        &self,
        from: usize,
        kind: &str,
        verdict: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.agent
            .wait_event_from(from, Duration::from_secs(10), |e| {
                e["kind"] == kind && e["verdict"] == verdict && pred(e)
            })
            .unwrap_or_else(|| {
                panic!(
                    "no {verdict} {kind} event; events: {:#?}",
                    &self.agent.events()[from..]
                )
            })
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn setup_files() {
    let _ = std::fs::remove_dir_all(T);
    std::fs::create_dir_all(format!("{T}/sub")).unwrap();
    std::fs::write(format!("{T}/allowed.txt"), "allowed\n").unwrap();
    std::fs::write(format!("{T}/secret.txt"), "secret\n").unwrap();
    std::fs::write(format!("{T}/secret.txt.bak"), "bak\n").unwrap();
    std::fs::write(format!("{T}/sub/file"), "sub\n").unwrap();
    std::fs::write("/tmp/outside.txt", "outside\n").unwrap();
    std::fs::copy("/bin/busybox", format!("{T}/denied-bin")).unwrap();
    // An allowed name inside a would-be chroot: /tmp/t/bin/busybox is /bin/busybox after
    // `chroot /tmp/t`, and /tmp/t/secret.txt is /secret.txt.
    std::fs::create_dir_all(format!("{T}/bin")).unwrap();
    std::fs::copy("/bin/busybox", format!("{T}/bin/busybox")).unwrap();
    std::os::unix::fs::symlink(format!("{T}/denied-bin"), format!("{T}/link")).unwrap();
    // A path longer than the kernel key (252 bytes with its NUL).
    let mut long = format!("{T}/long");
    while long.len() < 260 {
        long.push_str("/abcdefghijklmnopqrstuvwxyz");
    }
    std::fs::create_dir_all(&long).unwrap();
    std::fs::write(format!("{long}/f"), "long\n").unwrap();
    std::fs::write("/tmp/longpath", format!("{long}/f")).unwrap();
}

#[test]
#[ignore = "runs in the QEMU guest with BPF-LSM (cargo xtask guest)"]
fn lsm_tier_behaviour_table() {
    let _lock = AGENT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    setup_files();
    let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = allowed.local_addr().unwrap().port();
    let _allowed6 = TcpListener::bind(("::1", port)).unwrap();
    let denied = TcpListener::bind("127.0.0.1:0").unwrap();
    let pd = denied.local_addr().unwrap().port();
    let _denied6 = TcpListener::bind(("::1", pd)).unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let pu = udp.local_addr().unwrap().port();

    let agent = Agent::start("lsm", &["--enforcer", "lsm", "--no-discovery"]).unwrap();
    let cg = TestCgroup::new("lsm").unwrap();
    agent
        .write_policy("guest.yaml", &policy(&cg.rel, "enforce", port))
        .unwrap();
    let g = Guest { agent, cg };

    // Exec: allowed; denied; through a symlink; relative path; fileless.
    let o = g.run(&["/bin/busybox", "echo", "hi"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n");
    let from = g.agent.event_count();
    g.exec_denied(&[&format!("{T}/denied-bin"), "true"], None);
    g.event(from, "exec", "denied", |e| {
        e["path"] == format!("{T}/denied-bin").as_str()
    });
    let from = g.agent.event_count();
    g.exec_denied(&[&format!("{T}/link"), "true"], None);
    g.event(from, "exec", "denied", |e| {
        e["path"] == format!("{T}/denied-bin").as_str()
    });
    let from = g.agent.event_count();
    g.exec_denied(&["./denied-bin", "true"], Some(T));
    g.event(from, "exec", "denied", |e| {
        e["path"] == format!("{T}/denied-bin").as_str()
    });
    let from = g.agent.event_count();
    let o = g
        .run(&["/bin/memfd_exec", "/bin/busybox", "echo", "fileless-ran"])
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(97),
        "fexecve must fail: {}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("not permitted"), "{}", stderr(&o));
    let ev = g.event(from, "exec", "denied", |e| {
        e["flags"].to_string().contains("fileless")
    });
    assert!(
        ev["path"].as_str().unwrap_or("").starts_with("/memfd:"),
        "{ev}"
    );

    // Files: allowed and denied reads and writes, directory rule, deny-override.
    let read = |p: &str| g.run(&["/bin/busybox", "cat", p]).unwrap();
    assert!(read(&format!("{T}/allowed.txt")).status.success());
    assert!(
        read(&format!("{T}/sub/file")).status.success(),
        "directory rule"
    );
    assert!(
        read(&format!("{T}/secret.txt.bak")).status.success(),
        "exact deny only"
    );
    let from = g.agent.event_count();
    let o = read(&format!("{T}/secret.txt"));
    assert!(
        !o.status.success() && stderr(&o).contains("not permitted"),
        "{}",
        stderr(&o)
    );
    let ev = g.event(from, "open", "denied", |e| {
        e["path"] == format!("{T}/secret.txt").as_str()
    });
    assert_eq!(ev["access"], "read");
    let o = g
        .run(&["/bin/busybox", "sh", "-c", &format!("echo w > {T}/new.txt")])
        .unwrap();
    assert!(o.status.success(), "write under /tmp/t/: {}", stderr(&o));
    let from = g.agent.event_count();
    let o = g
        .run(&["/bin/busybox", "sh", "-c", "echo w >> /tmp/outside.txt"])
        .unwrap();
    assert!(
        !o.status.success() && stderr(&o).contains("not permitted"),
        "{}",
        stderr(&o)
    );
    let ev = g.event(from, "open", "denied", |e| e["path"] == "/tmp/outside.txt");
    assert!(ev["access"].as_str().unwrap().contains("write"));
    assert!(
        read("/tmp/outside.txt").status.success(),
        "read of the same file allowed"
    );
    // Known gap, documented in docs/enforcement.md: the kernel creates an O_CREAT file before
    // `file_open` runs, so a denied create leaves an empty file behind.
    let o = g
        .run(&["/bin/busybox", "sh", "-c", "echo w > /tmp/created.txt"])
        .unwrap();
    assert!(!o.status.success(), "denied create");
    assert_eq!(
        std::fs::metadata("/tmp/created.txt").map(|m| m.len()).ok(),
        Some(0)
    );

    // A path longer than the key fails closed.
    let long = std::fs::read_to_string("/tmp/longpath").unwrap();
    let from = g.agent.event_count();
    let o = read(&long);
    assert!(!o.status.success(), "long path must be denied");
    g.event(from, "open", "denied", |e| {
        e["flags"].to_string().contains("truncated")
    });

    // Egress: v4, v6, v4-mapped; UDP sendto and connected UDP.
    for (proto, addr, p, want) in [
        ("tcp", "127.0.0.1", port, "ok"),
        ("tcp", "127.0.0.1", pd, "EPERM"),
        ("tcp", "::1", port, "ok"),
        ("tcp", "::1", pd, "EPERM"),
        ("tcp", "::ffff:127.0.0.1", port, "ok"),
        ("tcp", "::ffff:127.0.0.1", pd, "EPERM"),
        ("udp-sendto", "127.0.0.1", pu, "EPERM"),
        ("udp-connect", "127.0.0.1", pu, "EPERM"),
    ] {
        let from = g.agent.event_count();
        let o = g
            .run(&["/bin/net_probe", proto, addr, &p.to_string()])
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            want,
            "{proto} {addr}:{p}"
        );
        if want == "EPERM" {
            g.event(from, "connect", "denied", |e| e["port"] == p);
        }
    }

    // Other ways out: TCP Fast Open and an AF_UNSPEC sendto to denied ports are judged as
    // connects; raw, ICMP "ping" and packet sockets are denied (no allowRawSockets). Nothing
    // reaches a listener.
    for (mode, addr, p, escape) in [
        ("tfo", "127.0.0.1", pd, None),
        ("udp-unspec", "127.0.0.1", pu, None),
        ("raw", "127.0.0.1", pu, Some("raw-socket")),
        ("raw", "::1", pu, Some("raw-socket")),
        ("ping", "127.0.0.1", 0, Some("ping-socket")),
        ("ping", "::1", 0, Some("ping-socket")),
        ("packet", "127.0.0.1", 0, Some("packet-socket")),
    ] {
        let from = g.agent.event_count();
        let o = g
            .run(&["/bin/net_probe", mode, addr, &p.to_string()])
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            "EPERM",
            "{mode} {addr}:{p}"
        );
        match escape {
            None => drop(g.event(from, "connect", "denied", |e| e["port"] == p)),
            Some(op) => drop(g.event(from, "escape", "denied", |e| e["access"] == op)),
        }
    }
    udp.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        udp.recv(&mut buf).is_err(),
        "a datagram reached the denied UDP port"
    );
    denied.set_nonblocking(true).unwrap();
    assert!(
        denied.accept().is_err(),
        "a connection reached the denied TCP port"
    );
    denied.set_nonblocking(false).unwrap();

    // No namespace or root of its own, where a forbidden file could take an allowed name:
    // user+mount namespace by unshare, clone and clone3, and chroot. Denied before it exists.
    for case in palisade_tests::attack::escapes(T, "userns") {
        let how = case.how;
        let from = g.agent.event_count();
        let o = g.run(&["/bin/ns_escape", how, &case.marker_arg]).unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(!out.contains("escaped"), "{how}: {out}");
        assert!(!o.status.success(), "{how}: {out}");
        assert!(
            !std::path::Path::new(&case.marker).exists(),
            "{how}: marker created"
        );
        let ev = g.event(from, "escape", "denied", |e| e["access"] == case.op);
        assert_eq!(ev["source"], "lsm", "{ev}");
    }
    // The chroot attack itself: the secret, read under an allowed name.
    let o = g
        .run(&[
            "/bin/busybox",
            "chroot",
            T,
            "/bin/busybox",
            "cat",
            "/secret.txt",
        ])
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("secret"),
        "read through chroot"
    );

    // Processes outside the policy's cgroup are unaffected.
    assert_eq!(
        std::fs::read_to_string(format!("{T}/secret.txt")).unwrap(),
        "secret\n"
    );
    // busybox picks the applet from argv[0].
    let o = Command::new(format!("{T}/denied-bin"))
        .arg0("true")
        .output();
    assert!(o.is_ok_and(|o| o.status.success()));
    assert!(std::net::TcpStream::connect(("127.0.0.1", pd)).is_ok());

    // Live switch enforce → monitor → enforce.
    g.agent
        .write_policy("guest.yaml", &policy(&g.cg.rel, "monitor", port))
        .unwrap();
    let from = g.agent.event_count();
    assert!(
        read(&format!("{T}/secret.txt")).status.success(),
        "monitor allows"
    );
    g.event(from, "open", "violation", |e| {
        e["path"] == format!("{T}/secret.txt").as_str()
    });
    g.agent
        .write_policy("guest.yaml", &policy(&g.cg.rel, "enforce", port))
        .unwrap();
    assert!(
        !read(&format!("{T}/secret.txt")).status.success(),
        "enforce again"
    );

    // A malformed policy is rejected and the one in force stays in force.
    let bad = policy(&g.cg.rel, "enforce", port).replace(
        "access: any, action: deny",
        "access: sideways, action: deny",
    );
    g.agent.write_policy("guest.yaml", &bad).unwrap();
    let rejected = g.agent.events().iter().any(|e| {
        e["kind"] == "policy"
            && e["verdict"] == "denied"
            && e["message"].to_string().contains("guest.yaml")
    });
    assert!(rejected, "rejection reported with the file name");
    assert!(
        !read(&format!("{T}/secret.txt")).status.success(),
        "old policy still enforced"
    );

    // Learn mode: each distinct observation once per generation (kernel de-duplication).
    g.agent
        .write_policy("guest.yaml", &policy(&g.cg.rel, "learn", port))
        .unwrap();
    let from = g.agent.event_count();
    for _ in 0..3 {
        assert!(read(&format!("{T}/allowed.txt")).status.success());
    }
    std::thread::sleep(Duration::from_millis(500));
    let n = g.agent.events()[from..]
        .iter()
        .filter(|e| e["verdict"] == "learned" && e["path"] == format!("{T}/allowed.txt").as_str())
        .count();
    assert_eq!(n, 1, "one learned observation for three reads");
    // Escapes are observed too, each kind once per generation, and not denied.
    let from = g.agent.event_count();
    for _ in 0..3 {
        let o = g
            .run(&["/bin/net_probe", "packet", "127.0.0.1", "0"])
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            "ok",
            "learn allows"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let n = g.agent.events()[from..]
        .iter()
        .filter(|e| e["kind"] == "escape" && e["verdict"] == "learned")
        .count();
    assert_eq!(n, 1, "one learned escape for three packet sockets");
}

#[test]
#[ignore = "runs in the QEMU guest with BPF-LSM (cargo xtask guest)"]
fn auto_picks_tier_1_where_every_program_loads() {
    let _lock = AGENT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // The default enforcer: the probe loads every tier-1 program of the object on this kernel.
    let agent = Agent::start("auto", &["--no-discovery"]).unwrap();
    let o = agent.cli(&["status"]).unwrap();
    let status = String::from_utf8_lossy(&o.stdout);
    assert!(
        status.contains("tier:      lsm"),
        "{status}\n{}",
        agent.log()
    );
    assert!(!status.contains("fallback:"), "{status}");
    assert!(
        !agent
            .events()
            .iter()
            .any(|e| e["flags"].to_string().contains("tier_fallback")),
        "no fallback event"
    );
}
