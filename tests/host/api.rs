//! The agent API end to end: a real tonic server on a real unix socket (and mTLS TCP on
//! 127.0.0.1), real clients, the real CLI functions, the real policy parser behind an in-memory
//! `Control`. No root needed.
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use palisade::api::cli::{Cli, run_cli_io};
use palisade::api::client::{Client, TlsClientConfig, connect_tls, connect_unix};
use palisade::api::pb;
use palisade::api::server::{ServerConfig, TlsConfig, bind};
use palisade::api::{ContainerInfo, Control, PolicyErrorInfo, PolicyInfo, StatusInfo};
use palisade::containers::meta::{ContainerMeta, PodMeta, Runtime};
use palisade::events::bus::EventBus;
use palisade::events::model::{Event, Kind, Mode, Source, Verdict, mode_from_abi};
use palisade::learn::{CheckReport, LearnError, LearnHandle, ProfileSummary};
use tokio::sync::oneshot;

/// In-memory daemon: real policy parsing, policies in a map, a fixed container list.
struct MemControl {
    policies: Mutex<BTreeMap<String, PolicyInfo>>,
    containers: Vec<ContainerInfo>,
}

#[tonic::async_trait]
impl Control for MemControl {
    async fn apply_policies(
        &self,
        yaml: String,
        source: String,
    ) -> Result<Vec<String>, Vec<PolicyErrorInfo>> {
        let parsed = palisade::policy::parse_str(&yaml, &source).map_err(|e| {
            vec![PolicyErrorInfo {
                file: e.file.clone(),
                line: e.pos.line,
                column: e.pos.column,
                field: e.field.clone(),
                reason: e.reason.clone(),
            }]
        })?;
        let mut map = self.policies.lock().unwrap();
        let mut names = Vec::new();
        for p in parsed {
            let bound = self
                .containers
                .iter()
                .filter(|c| c.policy.as_deref() == Some(&p.name))
                .count();
            map.insert(
                p.name.clone(),
                PolicyInfo {
                    name: p.name.clone(),
                    mode: mode_from_abi(p.mode.as_u8()).unwrap(),
                    selector: "containerName=web".into(),
                    yaml: yaml.clone(),
                    bound_containers: bound as u32,
                },
            );
            names.push(p.name);
        }
        Ok(names)
    }
    async fn delete_policy(&self, name: String) -> Result<(), String> {
        self.policies
            .lock()
            .unwrap()
            .remove(&name)
            .map(drop)
            .ok_or(format!("no policy named {name:?}"))
    }
    async fn list_policies(&self) -> Vec<PolicyInfo> {
        self.policies.lock().unwrap().values().cloned().collect()
    }
    async fn set_mode(&self, name: String, mode: Mode) -> Result<(), String> {
        let mut map = self.policies.lock().unwrap();
        let p = map
            .get_mut(&name)
            .ok_or(format!("no policy named {name:?}"))?;
        p.mode = mode;
        Ok(())
    }
    async fn list_containers(&self) -> Vec<ContainerInfo> {
        self.containers.clone()
    }
    async fn status(&self) -> StatusInfo {
        StatusInfo {
            version: "9.9.9-test".into(),
            tier: "lsm".into(),
            kernel_features: vec!["bpf-lsm".into(), "ringbuf".into()],
            tier_fallback: None,
            counters: BTreeMap::from([(
                "policies".into(),
                self.policies.lock().unwrap().len() as u64,
            )]),
        }
    }
    // Learning is tested against the real daemon (host_learn_e2e); nothing is learned here.
    async fn learn_status(&self) -> Vec<ProfileSummary> {
        Vec::new()
    }
    async fn learn_export(
        &self,
        policy: String,
        _image: Option<String>,
        _mode: palisade::policy::Mode,
    ) -> Result<String, LearnError> {
        Err(LearnError::NoPolicy(policy))
    }
    async fn learn_check(&self, yaml: String, source: String) -> Result<CheckReport, LearnError> {
        LearnHandle::default().check_text(&yaml, &source)
    }
}

fn meta(name: &str) -> ContainerMeta {
    ContainerMeta {
        id: format!("{:0<64}", hex_of(name)),
        runtime: Runtime::Docker,
        cgroup_id: 4242,
        cgroup_path: format!("/system.slice/docker-{name}.scope"),
        name: Some(name.into()),
        image: Some(format!("{name}:1.0")),
        pod: Some(PodMeta {
            name: format!("{name}-pod"),
            namespace: "prod".into(),
            ..Default::default()
        }),
        metadata_known: true,
        ..Default::default()
    }
}

fn hex_of(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn event(kind: Kind, verdict: Verdict, container: &str, path: &str) -> Event {
    let mut e = Event::agent(kind, verdict, "");
    e.message = None;
    e.source = Source::Lsm;
    e.mode = Some(Mode::Enforce);
    e.comm = "sh".into();
    e.path = Some(path.into());
    e.container = Some(meta(container));
    e
}

struct Harness {
    dir: tempfile::TempDir,
    socket: PathBuf,
    bus: EventBus,
    tcp: Option<std::net::SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Harness {
    async fn start(bus: EventBus, tls: Option<TlsConfig>, dir: tempfile::TempDir) -> Harness {
        let socket = dir.path().join("run/palisade.sock");
        let control = Arc::new(MemControl {
            policies: Mutex::new(BTreeMap::new()),
            containers: vec![
                ContainerInfo {
                    meta: meta("web"),
                    policy: Some("web".into()),
                    mode: Some(Mode::Enforce),
                    tier: "lsm".into(),
                },
                ContainerInfo {
                    meta: meta("db"),
                    policy: None,
                    mode: None,
                    tier: "lsm".into(),
                },
            ],
        });
        let cfg = ServerConfig {
            unix_socket: Some(socket.clone()),
            tls,
            audit_log: Some(dir.path().join("audit.jsonl")),
        };
        let server = bind(cfg, control, bus.clone()).await.expect("bind");
        let tcp = server.tcp_addr();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Harness {
            dir,
            socket,
            bus,
            tcp,
            stop: Some(tx),
            task: Some(task),
        }
    }

    async fn client(&self) -> Client {
        connect_unix(&self.socket).await.expect("connect")
    }

    /// Run a CLI command line; returns (exit code, stdout, stderr).
    async fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut argv = vec!["palisade", "--socket", self.socket.to_str().unwrap()];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).expect("CLI arguments parse");
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_cli_io(&cli.client, cli.cmd, &mut out, &mut err)
            .await
            .expect("CLI runs");
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let res = tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap()).await;
        res.expect("server stops (open streams ended)")
            .unwrap()
            .expect("server ran cleanly");
        assert!(!self.socket.exists(), "socket removed at shutdown");
    }
}

async fn collect(client: &mut Client, filter: pb::EventFilter) -> Vec<pb::Event> {
    let mut s = client.stream_events(filter).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(e) = s.message().await.unwrap() {
        out.push(e);
    }
    out
}

async fn next(s: &mut tonic::Streaming<pb::Event>) -> pb::Event {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("event in time")
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filters_and_resume_over_the_unix_socket() {
    let h = Harness::start(EventBus::new(1000), None, tempfile::tempdir().unwrap()).await;
    let mode = std::fs::metadata(&h.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket is root-only");

    let s1 = h
        .bus
        .publish(event(Kind::Exec, Verdict::Allowed, "web", "/bin/sh"));
    let s2 = h
        .bus
        .publish(event(Kind::Exec, Verdict::Denied, "db", "/bin/nc"));
    let s3 = h
        .bus
        .publish(event(Kind::Open, Verdict::Denied, "web", "/etc/shadow"));
    let s4 = h
        .bus
        .publish(event(Kind::Open, Verdict::Violation, "web", "/etc/passwd"));
    let mut c = h.client().await;

    let denied_web = pb::EventFilter {
        containers: vec!["web".into()],
        verdicts: vec![pb::Verdict::Denied.into()],
        resume_from_seq: Some(0),
        ..Default::default()
    };
    let got = collect(&mut c, denied_web).await;
    assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![s3]);
    assert_eq!(got[0].path.as_deref(), Some("/etc/shadow"));
    assert_eq!(
        got[0].container.as_ref().unwrap().name.as_deref(),
        Some("web")
    );
    assert_eq!(got[0].mode, pb::Mode::Enforce as i32);

    let by_ns_kind = pb::EventFilter {
        namespaces: vec!["prod".into()],
        kinds: vec![pb::Kind::Exec.into()],
        images: vec!["db".into()],
        ..Default::default()
    };
    assert_eq!(
        collect(&mut c, by_ns_kind)
            .await
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        vec![s2]
    );

    // Resume: held events after s2, then live ones, in order, nothing twice.
    let mut live = c
        .stream_events(pb::EventFilter {
            resume_from_seq: Some(s2),
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut live).await.seq, s3);
    assert_eq!(next(&mut live).await.seq, s4);
    let s5 = h
        .bus
        .publish(event(Kind::Connect, Verdict::Denied, "web", "-"));
    assert_eq!(next(&mut live).await.seq, s5);
    assert!(s1 < s2);

    // A follow stream with a filter sees only matching live events.
    let mut execs = c
        .stream_events(pb::EventFilter {
            kinds: vec![pb::Kind::Exec.into()],
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    h.bus
        .publish(event(Kind::Open, Verdict::Allowed, "web", "/etc/hosts"));
    let s7 = h
        .bus
        .publish(event(Kind::Exec, Verdict::Allowed, "web", "/bin/ls"));
    assert_eq!(next(&mut execs).await.seq, s7);

    // Bad enum values are refused, not ignored.
    let bad = c
        .stream_events(pb::EventFilter {
            kinds: vec![77],
            ..Default::default()
        })
        .await;
    assert_eq!(bad.err().unwrap().code(), tonic::Code::InvalidArgument);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_subscriber_gets_a_gap_while_another_gets_everything() {
    // Small per-subscriber queue so the stalled stream overflows quickly.
    let h = Harness::start(
        EventBus::with_queue(100_000, 64),
        None,
        tempfile::tempdir().unwrap(),
    )
    .await;
    let follow = pb::EventFilter {
        follow: true,
        kinds: vec![pb::Kind::Exec.into()],
        ..Default::default()
    };
    // Separate connections: a stalled stream must not eat the other's HTTP/2 window.
    let mut stalled = h
        .client()
        .await
        .stream_events(follow.clone())
        .await
        .unwrap()
        .into_inner();
    let mut fast = h
        .client()
        .await
        .stream_events(follow)
        .await
        .unwrap()
        .into_inner();

    let (total, batch) = (6016u64, 32u64);
    let padding = "x".repeat(1024);
    let mut fast_seqs = Vec::new();
    let mut published = 0;
    while published < total {
        for _ in 0..batch {
            h.bus.publish(event(
                Kind::Exec,
                Verdict::Allowed,
                "web",
                &format!("/bin/{padding}"),
            ));
        }
        published += batch;
        // Pace the publisher to the fast reader (the bus never waits for anyone): bursts stay
        // within the fast reader's queue.
        while (fast_seqs.len() as u64) < published {
            fast_seqs.push(next(&mut fast).await.seq);
        }
    }
    assert_eq!(
        fast_seqs,
        (1..=total).collect::<Vec<_>>(),
        "fast subscriber got everything, in order"
    );

    // Reading the stalled stream now: every event it did not get is accounted for by a gap
    // record placed exactly where the events are missing. (Transport buffers may drain a little
    // while "stalled", so there can be more than one gap.)
    let (mut received, mut missed, mut expect, mut gaps) = (0u64, 0u64, 1u64, 0);
    while received + missed < total {
        let e = next(&mut stalled).await;
        match e.gap {
            Some(g) => {
                assert_eq!(e.kind, pb::Kind::Agent as i32);
                assert_eq!(e.seq, 0, "gap records are not part of the sequence");
                assert_eq!(
                    e.message.unwrap(),
                    format!("gap: {} events missed (subscriber too slow)", g.missed)
                );
                assert_eq!(g.reason, "subscriber_slow");
                assert_eq!(
                    (g.first_seq, g.last_seq - g.first_seq + 1),
                    (expect, g.missed)
                );
                expect = g.last_seq + 1;
                missed += g.missed;
                gaps += 1;
            }
            None => {
                assert_eq!(e.seq, expect, "no event lost without a gap record");
                expect += 1;
                received += 1;
            }
        }
    }
    assert!(
        gaps >= 1 && received > 0,
        "received {received}, {gaps} gaps"
    );
    let marker = h
        .bus
        .publish(event(Kind::Exec, Verdict::Allowed, "web", "/bin/marker"));
    assert_eq!(
        next(&mut stalled).await.seq,
        marker,
        "then live events again"
    );

    let status = h
        .client()
        .await
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.counters["dropped_subscriber_slow"], missed);
    h.stop().await;
}

struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// CA, server cert for localhost/127.0.0.1, and client certs for the given (CN, OU) pairs.
    fn new(dir: &Path, clients: &[(&str, &str)]) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "palisade test CA");
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        let issue = |file: &str, sans: Vec<String>, cn: &str, ou: Option<&str>, server: bool| {
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            if let Some(ou) = ou {
                p.distinguished_name
                    .push(DnType::OrganizationalUnitName, ou);
            }
            p.extended_key_usages = vec![if server {
                ExtendedKeyUsagePurpose::ServerAuth
            } else {
                ExtendedKeyUsagePurpose::ClientAuth
            }];
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &ca).unwrap();
            std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        };
        issue(
            "server",
            vec!["localhost".into(), "127.0.0.1".into()],
            "palisade",
            None,
            true,
        );
        for (cn, ou) in clients {
            issue(cn, vec![], cn, Some(ou), false);
        }
        Pki { dir: dir.into() }
    }

    fn client(&self, name: &str) -> TlsClientConfig {
        TlsClientConfig {
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
            domain: Some("localhost".into()),
        }
    }
}

const GOOD: &str = "apiVersion: palisade.dev/v1\nkind: ContainerPolicy\nmetadata:\n  name: web\nspec:\n  mode: monitor\n  selector:\n    containerName: web\n  exec:\n    allow: [/bin/sh]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mtls_roles_deny_viewer_admin_calls_and_audit_both() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(
        dir.path(),
        &[
            ("alice", "viewer"),
            ("bob", "admin"),
            ("eve", "contractors"),
        ],
    );
    let tls = TlsConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server.key"),
        client_ca: dir.path().join("ca.pem"),
        roles: Default::default(),
    };
    let h = Harness::start(EventBus::new(1000), Some(tls), dir).await;
    let addr = h.tcp.unwrap().to_string();

    let mut viewer = connect_tls(&addr, &pki.client("alice")).await.unwrap();
    assert_eq!(
        viewer
            .status(pb::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .version,
        "9.9.9-test"
    );
    assert!(
        viewer
            .list_policies(pb::ListPoliciesRequest {})
            .await
            .is_ok()
    );
    let apply = pb::ApplyPolicyRequest {
        yaml: GOOD.into(),
        source_name: "web.yaml".into(),
    };
    let denied = viewer.apply_policy(apply.clone()).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    let mut admin = connect_tls(&addr, &pki.client("bob")).await.unwrap();
    let ok = admin.apply_policy(apply).await.unwrap().into_inner();
    assert_eq!(ok.applied, vec!["web".to_string()]);

    // A certificate from the right CA but with no mapped role can do nothing.
    let mut nobody = connect_tls(&addr, &pki.client("eve")).await.unwrap();
    let e = nobody.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // A certificate from another CA does not get through the handshake.
    let other = tempfile::tempdir().unwrap();
    let rogue = Pki::new(other.path(), &[("mallory", "admin")]);
    let mut cfg = rogue.client("mallory");
    cfg.ca = pki.dir.join("ca.pem");
    let res = match connect_tls(&addr, &cfg).await {
        Ok(mut c) => c
            .status(pb::StatusRequest {})
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(res.is_err(), "foreign client certificate accepted");

    let audit = h.audit_lines();
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert_eq!(audit[0]["who"], "x509:CN=alice,OU=viewer");
    assert_eq!(audit[0]["call"], "ApplyPolicy");
    assert_eq!(audit[0]["outcome"], "denied");
    assert_eq!(audit[1]["who"], "x509:CN=bob,OU=admin");
    assert_eq!(audit[1]["outcome"], "ok");
    assert_eq!(audit[1]["target"], "web.yaml: web");
    assert!(
        audit
            .iter()
            .all(|l| l["time"].as_str().is_some_and(|t| t.ends_with('Z')))
    );

    // The same facts are on the event stream.
    let agent = pb::EventFilter {
        kinds: vec![pb::Kind::Agent.into()],
        resume_from_seq: Some(0),
        ..Default::default()
    };
    let events = collect(&mut h.client().await, agent).await;
    let msgs: Vec<_> = events.iter().filter_map(|e| e.message.clone()).collect();
    assert!(
        msgs[0].starts_with("audit: denied ApplyPolicy") && msgs[0].contains("alice"),
        "{msgs:?}"
    );
    assert!(
        msgs[1].starts_with("audit: ok ApplyPolicy") && msgs[1].contains("bob"),
        "{msgs:?}"
    );
    assert_eq!(events[0].verdict, pb::Verdict::Denied as i32);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_commands_print_tables_json_and_positioned_errors() {
    let h = Harness::start(EventBus::new(1000), None, tempfile::tempdir().unwrap()).await;
    let pol = h.dir.path().join("policies");
    std::fs::create_dir(&pol).unwrap();
    std::fs::write(pol.join("web.yaml"), GOOD).unwrap();
    std::fs::write(pol.join("notes.txt"), "ignored").unwrap();
    let bad = h.dir.path().join("bad.yaml");
    std::fs::write(&bad, GOOD.replace("mode: monitor", "mode: block")).unwrap();

    let (code, out, err) = h
        .cli(&["policy", "apply", "-f", pol.to_str().unwrap()])
        .await;
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(
        out,
        format!("policy/web applied ({})\n", pol.join("web.yaml").display())
    );

    let (code, out, err) = h
        .cli(&["policy", "apply", "-f", bad.to_str().unwrap()])
        .await;
    assert_eq!(code, 1);
    assert_eq!(out, "");
    let prefix = format!("{}:6:9: spec.mode: ", bad.display());
    assert!(
        err.starts_with(&prefix) && err.ends_with('\n'),
        "{err:?} does not start with {prefix:?}"
    );

    let (code, out, _) = h.cli(&["policy", "list"]).await;
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "NAME  MODE     CONTAINERS  SELECTOR\nweb   monitor  1           containerName=web\n"
    );

    let (code, out, _) = h.cli(&["policy", "mode", "web", "enforce"]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "policy/web mode set to enforce\n")
    );
    let (_, out, _) = h.cli(&["-o", "json", "policy", "get", "web"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["name"].as_str(), v["mode"].as_str()),
        (Some("web"), Some("enforce"))
    );
    let (_, out, _) = h.cli(&["policy", "get", "web"]).await;
    assert_eq!(out, GOOD);

    let (code, out, _) = h.cli(&["containers"]).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "ID            NAME  IMAGE    POD           POLICY  MODE     TIER"
    );
    assert_eq!(
        lines[1],
        "776562000000  web   web:1.0  prod/web-pod  web     enforce  lsm"
    );
    assert_eq!(
        lines[2],
        "646200000000  db    db:1.0   prod/db-pod   -       -        lsm"
    );
    let (code, out, _) = h.cli(&["containers", "db"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("name:    db\n") && out.contains("policy:  -\n"),
        "{out}"
    );
    let (code, _, err) = h.cli(&["containers", "nope"]).await;
    assert_eq!((code, err.as_str()), (4, "error: no container \"nope\"\n"));
    let (_, out, _) = h.cli(&["containers", "-o", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["meta"]["pod"]["namespace"], "prod");

    let (code, out, _) = h.cli(&["status"]).await;
    assert_eq!(code, 0);
    assert!(
        out.starts_with("version:   9.9.9-test\ntier:      lsm\nfeatures:  bpf-lsm, ringbuf\n"),
        "{out}"
    );
    assert!(out.contains("  policies                 1\n"), "{out}");

    h.bus
        .publish(event(Kind::Exec, Verdict::Denied, "web", "/bin/nc"));
    h.bus
        .publish(event(Kind::Open, Verdict::Allowed, "db", "/etc/hosts"));
    let (code, out, _) = h
        .cli(&[
            "events",
            "--kind",
            "exec",
            "--verdict",
            "denied",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(code, 0);
    let evs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(evs.len(), 1, "{out}");
    assert_eq!(
        (evs[0]["kind"].as_str(), evs[0]["path"].as_str()),
        (Some("exec"), Some("/bin/nc"))
    );
    let (_, out, _) = h.cli(&["events", "--container", "db"]).await;
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains(" open    allowed   enforce db               sh[")
            && out.ends_with("/etc/hosts (-)\n"),
        "{out:?}"
    );
    // Policy changes made through the API are on the stream as audit events.
    let (_, out, _) = h.cli(&["events", "--kind", "agent"]).await;
    assert!(
        out.contains("audit: ok SetPolicyMode(enforce) \"web\" by uid:"),
        "{out}"
    );

    let (code, out, _) = h.cli(&["policy", "delete", "web"]).await;
    assert_eq!((code, out.as_str()), (0, "policy/web deleted\n"));
    let (code, _, err) = h.cli(&["policy", "get", "web"]).await;
    assert_eq!(
        (code, err.as_str()),
        (4, "error: no policy named \"web\"\n")
    );
    let audit = h.audit_lines();
    let calls: Vec<_> = audit
        .iter()
        .map(|l| (l["call"].as_str().unwrap(), l["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        calls,
        [
            ("ApplyPolicy", "ok"),
            ("ApplyPolicy", "failed"),
            ("SetPolicyMode(enforce)", "ok"),
            ("DeletePolicy", "ok")
        ]
    );
    assert!(audit[0]["who"].as_str().unwrap().starts_with("uid:"));
    h.stop().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_over_http() {
    use palisade::api::metrics::{Metrics, bind_http, serve_http_on};
    let bus = EventBus::new(100);
    let metrics = Metrics::new(bus.clone());
    let listener = bind_http("127.0.0.1:0".parse().unwrap(), false)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_http_on(listener, metrics.clone(), async move {
        let _ = rx.await;
    }));
    bus.publish(event(Kind::Exec, Verdict::Denied, "web", "/bin/nc"));
    metrics.containers.set(2);

    assert!(http_get(addr, "/healthz").await.starts_with("HTTP/1.0 200"));
    assert!(http_get(addr, "/readyz").await.starts_with("HTTP/1.0 503"));
    metrics.set_ready(true);
    assert!(http_get(addr, "/readyz").await.starts_with("HTTP/1.0 200"));
    let body = http_get(addr, "/metrics").await;
    assert!(
        body.contains("palisade_events_total{kind=\"exec\",verdict=\"denied\",source=\"lsm\"} 1"),
        "{body}"
    );
    assert!(body.contains("palisade_containers 2"), "{body}");
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}
