use std::collections::BTreeMap;
use std::net::IpAddr;

use proptest::prelude::*;

use super::*;
use crate::containers::meta::ContainerMeta;
use crate::events::model::{Event, Kind, Verdict};
use crate::policy::{Mode, parse_str};

const T0: u64 = 1_800_000_000_000_000_000;

fn meta(name: &str, image: &str) -> ContainerMeta {
    ContainerMeta {
        id: format!("id-{name}"),
        name: Some(name.into()),
        image: Some(image.into()),
        labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
        metadata_known: true,
        ..ContainerMeta::default()
    }
}

fn base_event(kind: Kind, t: u64) -> Event {
    let mut e = Event::agent(kind, Verdict::Learned, "");
    e.message = None;
    e.time_ns = T0 + t;
    e.policy = Some("web".into());
    e.container = Some(meta("web-1", "busybox:1"));
    e
}

fn open(path: &str, access: &str, t: u64) -> Event {
    let mut e = base_event(Kind::Open, t);
    e.path = Some(path.into());
    e.access = Some(access.into());
    e
}

fn exec(path: &str, t: u64) -> Event {
    let mut e = base_event(Kind::Exec, t);
    e.path = Some(path.into());
    e.access = Some("exec".into());
    e
}

fn connect(addr: &str, port: u16, proto: &str, t: u64) -> Event {
    let mut e = base_event(Kind::Connect, t);
    e.addr = Some(addr.parse().unwrap());
    e.port = Some(port);
    e.protocol = Some(proto.into());
    e
}

fn learner(events: &[Event]) -> Learner {
    let mut l = Learner::default();
    for e in events {
        l.observe(e);
    }
    l
}

/// The learning policy the tests export from: every section policed, nothing allowed.
fn base() -> crate::policy::Policy {
    let text = r#"
apiVersion: palisade.dev/v1
kind: ContainerPolicy
metadata: {name: web}
spec:
  mode: learn
  selector:
    image: "busybox:*"
    labels: {app: web}
    podSelector:
      matchExpressions: [{key: env, operator: NotIn, values: [prod]}]
  exec: {allow: []}
  files: []
  network: {egress: []}
"#;
    parse_str(text, "base.yaml").unwrap().remove(0)
}

fn gen_files(events: &[Event], cfg: &GenConfig) -> Vec<(String, u8, usize)> {
    let l = learner(events);
    let p = l.store.profiles.values().next().unwrap();
    generalize(&p.observations, cfg)
        .files
        .into_iter()
        .map(|r| (r.path, r.bits, r.cover.observations))
        .collect()
}

const R: u8 = agent_common::ACC_READ;
const W: u8 = agent_common::ACC_WRITE;

#[test]
fn proc_pid_entries_collapse_into_proc_dir() {
    let rules = gen_files(
        &[
            open("/proc/12/status", "read", 1),
            open("/proc/345/status", "read", 2),
            open("/proc/345/task/346/stat", "read", 3),
            open("/proc/self/cgroup", "read", 4),
            open("/proc/meminfo", "read", 5),
            open("/proc/sys/net/core/somaxconn", "write", 6),
        ],
        &GenConfig::default(),
    );
    assert_eq!(
        rules,
        vec![
            // meminfo is read-only, so the /proc/ read rule absorbs it; the write stays exact.
            ("/proc/".to_string(), R, 5),
            ("/proc/sys/net/core/somaxconn".to_string(), W, 1),
        ]
    );
}

#[test]
fn numbered_siblings_over_threshold_become_a_directory_rule() {
    let logs = |n: usize| -> Vec<Event> {
        (0..n)
            .map(|i| open(&format!("/var/log/app/app.{i}.log"), "write", i as u64))
            .chain([open("/etc/app.conf", "read", 100)])
            .collect()
    };
    let cfg = GenConfig::default();
    // 5 is not more than 5: exact rules.
    let five = gen_files(&logs(5), &cfg);
    assert_eq!(five.len(), 6);
    assert!(five.iter().all(|(p, ..)| !p.ends_with('/')));
    // 6 is: one directory rule covering them all.
    assert_eq!(
        gen_files(&logs(6), &cfg),
        vec![
            ("/etc/app.conf".to_string(), R, 1),
            ("/var/log/app/".to_string(), W, 6),
        ]
    );
    // N is configurable.
    let cfg2 = GenConfig {
        sibling_threshold: 2,
        ..GenConfig::default()
    };
    assert_eq!(
        gen_files(&logs(3), &cfg2)[1],
        ("/var/log/app/".to_string(), W, 3)
    );
}

#[test]
fn numbered_directories_collapse_at_their_parent() {
    let ev: Vec<Event> = (0..7)
        .map(|i| open(&format!("/var/cache/job/{}/out", 1000 + i), "write", i))
        .collect();
    assert_eq!(
        gen_files(&ev, &GenConfig::default()),
        vec![("/var/cache/job/".to_string(), W, 7)]
    );
}

#[test]
fn random_names_collapse_plain_names_do_not() {
    let random = [
        "a8Xk2q9z", "Qm3pL0vv", "zz91kfqa", "p0o9i8u7", "x1y2z3w4", "k3j2h1g0",
    ];
    let mut ev: Vec<Event> = random
        .iter()
        .enumerate()
        .map(|(i, n)| open(&format!("/data/sess/sess_{n}"), "read,write", i as u64))
        .collect();
    // Many plain names in one directory stay exact: only varying names generalise.
    for (i, n) in [
        "passwd",
        "group",
        "hosts",
        "resolv.conf",
        "hostname",
        "os-release",
        "shells",
    ]
    .iter()
    .enumerate()
    {
        ev.push(open(&format!("/etc/{n}"), "read", 50 + i as u64));
    }
    let rules = gen_files(&ev, &GenConfig::default());
    assert!(rules.contains(&("/data/sess/".to_string(), R | W, 6)));
    assert_eq!(
        rules
            .iter()
            .filter(|(p, ..)| p.starts_with("/etc/"))
            .count(),
        7
    );
    assert!(!rules.iter().any(|(p, ..)| p == "/etc/"));
    assert_eq!(shape("sess_a8Xk2q9z").as_deref(), Some("sess_*"));
    assert_eq!(shape("app.12.log").as_deref(), Some("app.#.log"));
    assert_eq!(shape("Makefile"), None);
    assert_eq!(shape("resolv.conf"), None);
}

#[test]
fn temporary_directories_are_directory_rules_for_files_only() {
    let ev = [
        open("/tmp/x1", "write", 1),
        open("/tmp/sub/y", "read", 2),
        open("/var/tmp/z", "read", 3),
        exec("/tmp/tool", 4),
    ];
    let l = learner(&ev);
    let g = generalize(
        &l.store.profiles.values().next().unwrap().observations,
        &l.config,
    );
    let files: Vec<(&str, u8)> = g.files.iter().map(|r| (r.path.as_str(), r.bits)).collect();
    assert_eq!(files, vec![("/tmp/", R | W), ("/var/tmp/", R)]);
    // Exec from a temporary directory stays exact.
    assert_eq!(g.exec.len(), 1);
    assert_eq!(g.exec[0].path, "/tmp/tool");
    assert_eq!(g.files[0].why, "temporary directory");
}

#[test]
fn egress_keeps_destination_ports_and_merges_ranges() {
    let mut ev = vec![
        connect("127.0.0.1", 8080, "tcp", 1),
        connect("127.0.0.1", 8081, "tcp", 2),
        connect("127.0.0.1", 9000, "tcp", 3),
        connect("::ffff:127.0.0.1", 9000, "tcp", 4),
        connect("127.0.0.1", 53, "udp", 5),
    ];
    let l = learner(&ev);
    let g = generalize(
        &l.store.profiles.values().next().unwrap().observations,
        &l.config,
    );
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    assert_eq!(g.egress.len(), 2, "{:?}", g.egress);
    assert_eq!(g.egress[0].addr, lo);
    assert_eq!(g.egress[0].ports, vec![(8080, 8081), (9000, 9000)]);
    assert_eq!(g.egress[0].cover.observations, 3); // mapped address is the same destination
    assert_eq!(g.egress[1].ports, vec![(53, 53)]);
    // Twenty scattered ports: at most max_port_ranges ranges, each seen port still covered.
    ev.clear();
    let ports: Vec<u16> = (0..20).map(|i| 20000 + i * i * 7).collect();
    for (i, p) in ports.iter().enumerate() {
        ev.push(connect("10.1.2.3", *p, "tcp", i as u64));
    }
    let l = learner(&ev);
    let g = generalize(
        &l.store.profiles.values().next().unwrap().observations,
        &l.config,
    );
    let r = &g.egress[0].ports;
    assert_eq!(r.len(), 8);
    assert!(
        ports
            .iter()
            .all(|p| r.iter().any(|(a, b)| a <= p && p <= b))
    );
    assert!(g.egress[0].why.contains("merged"));
}

#[test]
fn never_widens_to_root() {
    let mut ev: Vec<Event> = (0..20).map(|i| open(&format!("/{i}"), "read", i)).collect();
    ev.extend((0..20).map(|i| exec(&format!("/run{i}x"), i)));
    ev.push(open("/", "read", 99));
    let l = learner(&ev);
    let g = generalize(
        &l.store.profiles.values().next().unwrap().observations,
        &l.config,
    );
    assert!(g.files.iter().chain(&g.exec).all(|r| r.path != "/"));
    assert_eq!(g.files.len(), 20);
    assert_eq!(g.exec.len(), 20);
    assert_eq!(g.skipped.len(), 1);
    assert!(g.skipped[0].1.contains("root directory"));
    // A temp-dir setting of `/` is ignored rather than obeyed.
    let cfg = GenConfig {
        temp_dirs: vec!["/".into()],
        ..GenConfig::default()
    };
    assert!(
        generalize(
            &l.store.profiles.values().next().unwrap().observations,
            &cfg
        )
        .files
        .iter()
        .all(|r| r.path != "/")
    );
}

fn workload_events() -> Vec<Event> {
    let mut ev = vec![
        exec("/bin/busybox", 1),
        exec("/usr/local/bin/app", 2),
        open("/etc/app.conf", "read", 3),
        open("/etc/passwd", "read", 4),
        open("/proc/1/status", "read", 5),
        open("/tmp/lock", "read,write", 6),
        connect("127.0.0.1", 8080, "tcp", 7),
        connect("::1", 53, "udp", 8),
    ];
    ev.extend((0..8).map(|i| open(&format!("/var/log/app/app-{i}.log"), "write", 10 + i)));
    ev
}

#[test]
fn export_round_trips_through_the_policy_parser() {
    let l = learner(&workload_events());
    for mode in [Mode::Enforce, Mode::Monitor] {
        let out = l.export(&base(), None, mode).unwrap();
        let parsed = parse_str(&out.yaml, "learned.yaml").unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].to_yaml(), out.policy.to_yaml());
        assert_eq!(parsed[0].mode, mode);
        assert_eq!(parsed[0].name, "web");
        assert_eq!(parsed[0].selector, base().selector);
        assert!(
            out.yaml
                .contains("# 8 observations (8 sightings), last seen"),
            "{}",
            out.yaml
        );
        assert!(out.yaml.contains("numbered or random names like app-#.log"));
    }
    let out = l.export(&base(), None, Mode::Enforce).unwrap();
    let files: Vec<&str> = out
        .policy
        .files
        .as_ref()
        .unwrap()
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(
        files,
        [
            "/etc/app.conf",
            "/etc/passwd",
            "/proc/",
            "/tmp/",
            "/var/log/app/"
        ]
    );
    let exec: Vec<&str> = out
        .policy
        .exec
        .as_ref()
        .unwrap()
        .allow
        .iter()
        .map(|r| r.path.as_str())
        .collect();
    assert_eq!(exec, ["/bin/busybox", "/usr/local/bin/app"]);
    assert_eq!(out.policy.network.as_ref().unwrap().egress.len(), 2);
    // No profile for another policy.
    let mut other = base();
    other.name = "other".into();
    assert!(matches!(
        l.export(&other, None, Mode::Enforce),
        Err(LearnError::NoProfile(..))
    ));
}

#[test]
fn export_keeps_the_learning_policys_rules_and_denies() {
    let text = r#"
apiVersion: palisade.dev/v1
kind: ContainerPolicy
metadata: {name: web}
spec:
  mode: learn
  selector: {image: "busybox:*"}
  exec: {allow: [/bin/]}
  files:
    - {path: /etc/shadow, access: any, action: deny}
"#;
    let b = parse_str(text, "b.yaml").unwrap().remove(0);
    let l = learner(&[
        exec("/bin/busybox", 1),
        exec("/opt/x", 2),
        open("/etc/shadow", "read", 3),
        open("/etc/hosts", "read", 4),
        connect("127.0.0.1", 80, "tcp", 5),
    ]);
    let out = l.export(&b, None, Mode::Enforce).unwrap();
    let exec: Vec<&str> = out
        .policy
        .exec
        .as_ref()
        .unwrap()
        .allow
        .iter()
        .map(|r| r.path.as_str())
        .collect();
    assert_eq!(exec, ["/bin/", "/opt/x"]); // /bin/busybox already allowed
    let files = out.policy.files.as_ref().unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(files[1].path, "/etc/hosts");
    assert!(out.policy.network.is_none()); // not policed by the learning policy
    assert!(
        out.yaml
            .contains("# kept denied by the policy's deny rules: open /etc/shadow (read)")
    );
    let report = l.check(std::slice::from_ref(&out.policy)).unwrap();
    assert_eq!(report.denials.len(), 1);
    assert!(report.denials[0].reason.contains("/etc/shadow"));
}

#[test]
fn export_is_deterministic_regardless_of_order() {
    let ev = workload_events();
    let a = learner(&ev)
        .export(&base(), None, Mode::Enforce)
        .unwrap()
        .yaml;
    let mut rev = ev.clone();
    rev.reverse();
    let b = learner(&rev)
        .export(&base(), None, Mode::Enforce)
        .unwrap()
        .yaml;
    let mut rot = ev.clone();
    rot.rotate_left(5);
    let c = learner(&rot)
        .export(&base(), None, Mode::Enforce)
        .unwrap()
        .yaml;
    assert_eq!(a, b);
    assert_eq!(a, c);
}

#[test]
fn check_lists_exactly_what_a_candidate_denies() {
    let mut l = learner(&workload_events());
    let exported = l.export(&base(), None, Mode::Enforce).unwrap().policy;
    let r = l.check(std::slice::from_ref(&exported)).unwrap();
    assert!(r.denials.is_empty(), "{:?}", r.denials);
    assert_eq!(r.checked, 16);
    // New things the exported policy does not cover.
    l.observe(&exec("/usr/bin/wget", 100));
    l.observe(&open("/etc/shadow", "read", 101));
    l.observe(&open("/etc/passwd", "write", 102));
    l.observe(&connect("127.0.0.1", 9090, "tcp", 103));
    let r = l.check(std::slice::from_ref(&exported)).unwrap();
    let got: Vec<String> = r.denials.iter().map(|d| d.observation.describe()).collect();
    assert_eq!(
        got,
        [
            "exec /usr/bin/wget",
            "open /etc/passwd (write)",
            "open /etc/shadow (read)",
            "connect 127.0.0.1:9090/tcp",
        ]
    );
    assert!(
        r.denials[1].reason.contains("\"/etc/passwd\""),
        "{}",
        r.denials[1].reason
    );
    assert!(r.denials.iter().all(|d| d.policy == "web"));
    // A candidate with another name applies by selector; none applies: unmatched.
    let mut renamed = exported.clone();
    renamed.name = "web-v2".into();
    renamed.selector = crate::policy::Selector {
        image: Some("busybox:*".into()),
        ..Default::default()
    };
    assert_eq!(
        l.check(std::slice::from_ref(&renamed))
            .unwrap()
            .denials
            .len(),
        4
    );
    let mut elsewhere = renamed.clone();
    elsewhere.selector.image = Some("nginx:*".into());
    let r = l.check(&[elsewhere]).unwrap();
    assert_eq!(r.unmatched.len(), 1);
    assert_eq!(r.checked, 0);
}

#[test]
fn fileless_exec_sets_allow_fileless() {
    let mut e = exec("/memfd:x (deleted)", 1);
    e.flags = vec!["fileless".into()];
    let l = learner(&[e, exec("/bin/sh", 2)]);
    let out = l.export(&base(), None, Mode::Enforce).unwrap();
    let ex = out.policy.exec.as_ref().unwrap();
    assert!(ex.allow_fileless);
    assert_eq!(ex.allow.len(), 1);
    assert!(out.yaml.contains("fileless programs ran"));
}

#[test]
fn observe_groups_by_policy_and_image_and_ignores_other_verdicts() {
    let mut l = Learner::default();
    assert!(l.observe(&open("/a", "read", 1)));
    assert!(!l.observe(&open("/a", "read", 2))); // repeat: a sighting, not new
    let mut other = open("/a", "read", 3);
    other.container = Some(meta("web-2", "busybox:1"));
    assert!(!l.observe(&other)); // same workload
    let mut img = open("/a", "read", 4);
    img.container = Some(meta("web-3", "busybox:2"));
    assert!(l.observe(&img));
    let mut denied = open("/b", "read", 5);
    denied.verdict = Verdict::Denied;
    assert!(!l.observe(&denied));
    let s = l.profiles(T0 + 10);
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].key.image, "busybox:1");
    assert_eq!(s[0].containers, ["web-1", "web-2"]);
    assert_eq!(s[0].sightings, 3);
    assert_eq!(s[0].open, 1);
    assert_eq!(s[0].last_new_ns, T0 + 1);
    assert_eq!(s[0].stable_for_ns, 9);
    // Per-image export.
    let out = l.export(&base(), Some("busybox:2"), Mode::Enforce).unwrap();
    assert!(out.yaml.contains("# images: busybox:2\n"));
}

#[test]
fn store_is_bounded_and_persists() {
    let dir = std::env::temp_dir().join(format!("palisade-learn-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let limits = Limits {
        max_observations: 3,
        max_workloads: 2,
    };
    let mut l = Learner::new(limits, GenConfig::default());
    // /a seen three times, /b twice, /c once: /c (least seen) goes for /d, then /d for /e.
    for (p, n) in [("/a", 3), ("/b", 2), ("/c", 1), ("/d", 1), ("/e", 1)] {
        for i in 0..n {
            l.observe(&open(p, "read", i));
        }
    }
    let p = l.store.profiles.values().next().unwrap();
    let paths: Vec<String> = p.observations.keys().map(|o| o.describe()).collect();
    assert_eq!(
        paths,
        ["open /a (read)", "open /b (read)", "open /e (read)"]
    );
    assert_eq!(p.evicted, 2);
    // Workloads: the one seen longest ago goes.
    for (i, img) in ["i2", "i3"].iter().enumerate() {
        let mut e = open("/x", "read", 100 + i as u64);
        e.container = Some(meta("w", img));
        l.observe(&e);
    }
    assert_eq!(l.store.profiles.len(), 2);
    assert_eq!(l.store.evicted_workloads, 1);
    assert!(l.dirty());
    l.save(&dir).unwrap();
    assert!(!l.dirty());
    let back = Learner::load(&dir, limits, GenConfig::default()).unwrap();
    assert_eq!(back.store, l.store);
    // Smaller limits on load trim what was saved.
    let small = Limits {
        max_observations: 1,
        max_workloads: 1,
    };
    let back = Learner::load(&dir, small, GenConfig::default()).unwrap();
    assert_eq!(back.store.profiles.len(), 1);
    assert_eq!(
        back.store
            .profiles
            .values()
            .next()
            .unwrap()
            .observations
            .len(),
        1
    );
    // A missing directory is an empty store; a corrupt file is an error.
    assert!(
        Learner::load(&dir.join("nope"), limits, GenConfig::default())
            .unwrap()
            .store
            .profiles
            .is_empty()
    );
    std::fs::write(dir.join(STORE_FILE), "{").unwrap();
    assert!(Learner::load(&dir, limits, GenConfig::default()).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

proptest! {
    /// Whatever is observed: the export parses, contains no `/` rule, and allows every
    /// recorded observation it could express.
    #[test]
    fn export_allows_everything_recorded(
        paths in prop::collection::vec(
            prop::collection::vec(prop::sample::select(vec!["a", "b", "1", "22", "x9y8z7", "tmp", "proc", "7"]), 0..4),
            1..40),
        writes in prop::collection::vec(any::<bool>(), 40),
        ports in prop::collection::vec(1u16..200, 0..30),
    ) {
        let mut ev = Vec::new();
        for (i, segs) in paths.iter().enumerate() {
            let p = format!("/{}", segs.join("/"));
            ev.push(open(&p, if writes[i] { "write" } else { "read" }, i as u64));
            ev.push(exec(&p, i as u64));
        }
        for (i, p) in ports.iter().enumerate() {
            ev.push(connect("127.0.0.1", *p, if i % 2 == 0 { "tcp" } else { "udp" }, i as u64));
        }
        let l = learner(&ev);
        let out = l.export(&base(), None, Mode::Enforce).unwrap();
        let pol = &out.policy;
        prop_assert!(pol.files.as_ref().unwrap().iter().all(|r| r.path != "/"));
        prop_assert!(pol.exec.as_ref().unwrap().allow.iter().all(|r| r.path != "/"));
        let r = l.check(std::slice::from_ref(pol)).unwrap();
        // Only the root directory itself is inexpressible.
        for d in &r.denials {
            let root = matches!(&d.observation,
                Observation::Open { path, .. } | Observation::Exec { path, .. } if path == "/");
            prop_assert!(root, "denied: {:?}", d);
        }
    }
}

#[tokio::test]
async fn bus_task_feeds_the_learner_and_persists() {
    use crate::events::bus::EventBus;
    let dir = std::env::temp_dir().join(format!("palisade-learn-task-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bus = EventBus::new(64);
    let h = LearnHandle::default();
    let task = tokio::spawn(run(
        h.clone(),
        bus.clone(),
        dir.clone(),
        std::time::Duration::from_millis(20),
    ));
    // Let the task subscribe before publishing (live events only).
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    bus.publish(open("/etc/passwd", "read", 1));
    bus.publish(exec("/bin/sh", 2));
    let mut violation = open("/etc/shadow", "read", 3);
    violation.verdict = Verdict::Violation;
    bus.publish(violation);
    let mut saved = None;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let s = Store::load(&dir, Limits::default()).unwrap();
        if s.profiles
            .values()
            .map(|p| p.observations.len())
            .sum::<usize>()
            == 2
        {
            saved = Some(s);
            break;
        }
    }
    task.abort();
    let saved = saved.expect("profiles persisted");
    assert_eq!(saved.profiles, h.with(|l| l.store.profiles.clone()));
    let status = render_status(&h.status());
    assert!(status.contains("policy web image busybox:1"), "{status}");
    assert!(status.contains("1 exec, 1 open, 0 connect"), "{status}");
    // Replay through YAML text, as the API does.
    let candidate = "apiVersion: palisade.dev/v1\nkind: ContainerPolicy\nmetadata: {name: web}\n\
        spec:\n  mode: enforce\n  selector: {image: \"busybox:*\"}\n  exec: {allow: [/bin/sh]}\n  files: []\n";
    let r = h.check_text(candidate, "c.yaml").unwrap();
    assert_eq!(
        render_check(&r).lines().collect::<Vec<_>>(),
        [
            "DENY open /etc/passwd (read) [policy web, image busybox:1] no files rule matches; seen 1x, last 2027-01-15T08:00:00Z",
            "1 of 2 recorded observations would be denied",
        ]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
