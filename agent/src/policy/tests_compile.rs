//! Compiler and evaluators: the documented examples, key layout, and property tests checking
//! the compiled trie lookup against a direct evaluation of the source rules.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use agent_common::*;
use proptest::prelude::*;

use super::tests_parse::{EXAMPLE, doc};
use super::*;

fn compiled(text: &str) -> CompiledPolicy {
    compile(&parse_str(text, "t.yaml").unwrap()[0]).unwrap()
}

fn allowed(d: Decision) -> bool {
    d.allowed
}

const SEL: &str = "mode: monitor\nselector: {cgroupPath: /x}\n";

#[test]
fn example_exec_and_flags() {
    let c = compiled(EXAMPLE);
    assert_eq!(c.mode, MODE_ENFORCE);
    assert_eq!(c.flags, POLICE_EXEC | POLICE_FILES | POLICE_NET);
    assert_eq!(
        c.check_exec(b"/bin/busybox"),
        Decision {
            allowed: true,
            rule: Some(0)
        }
    );
    assert!(!allowed(c.check_exec(b"/bin/busybox2")));
    assert!(!allowed(c.check_exec(b"/bin/sh")));
    assert_eq!(c.check_exec(b"/usr/bin/env").rule, Some(1));
    assert!(allowed(c.check_exec(b"/usr/bin/sub/dir/tool")));
    assert!(allowed(c.check_exec(b"/usr/bin")), "the directory itself");
    assert!(!allowed(c.check_exec(b"/usr/binx")));
    assert!(!allowed(c.check_exec(b"/usr")));
}

#[test]
fn example_files_deny_overrides_allow() {
    let c = compiled(EXAMPLE);
    let d = c.check_file(b"/etc/passwd", ACC_READ);
    assert_eq!(
        d,
        Decision {
            allowed: true,
            rule: Some(0)
        }
    );
    assert!(!allowed(c.check_file(b"/etc/passwd", ACC_WRITE)));
    assert!(!allowed(c.check_file(b"/etc/passwd", ACC_READ | ACC_WRITE)));
    assert_eq!(
        c.check_file(b"/etc/shadow", ACC_READ),
        Decision {
            allowed: false,
            rule: Some(1)
        }
    );
    assert!(allowed(c.check_file(b"/etc/shadow.bak", ACC_READ)));
    assert!(
        allowed(c.check_file(b"/etc/shadow/x", ACC_READ)),
        "exact rules are not prefixes"
    );
    assert!(allowed(c.check_file(b"/etc", ACC_READ)));
    assert_eq!(
        c.check_file(b"/tmp/x", ACC_READ),
        Decision {
            allowed: false,
            rule: None
        }
    );
}

#[test]
fn nested_write_inside_read() {
    let c = compiled(&doc(&format!(
        "{SEL}files:\n  - {{path: /, access: read}}\n  - {{path: /var/log/, access: write}}"
    )));
    assert!(allowed(
        c.check_file(b"/var/log/app.log", ACC_READ | ACC_WRITE)
    ));
    assert!(allowed(c.check_file(b"/var/log", ACC_WRITE)));
    assert!(!allowed(c.check_file(b"/var/lib/x", ACC_WRITE)));
    assert!(allowed(c.check_file(b"/var/lib/x", ACC_READ)));
    assert!(allowed(c.check_file(b"/", ACC_READ)));
    // A path too long for the key fails closed even under `/`.
    let long = format!("/{}", "a".repeat(PATH_MAX));
    assert_eq!(
        c.check_file(long.as_bytes(), ACC_READ),
        Decision {
            allowed: false,
            rule: None
        }
    );
    let just_fits = format!("/{}", "a".repeat(PATH_MAX - 2));
    assert!(allowed(c.check_file(just_fits.as_bytes(), ACC_READ)));
}

#[test]
fn path_keys_layout() {
    let c = compiled(EXAMPLE);
    let got: Vec<(Vec<u8>, u32, u8)> = c
        .files
        .entries()
        .iter()
        .map(|(p, r)| (p.bytes().to_vec(), p.prefix_len(), r.allow))
        .collect();
    assert_eq!(
        got,
        vec![
            (b"/etc\0".to_vec(), 72, ACC_READ),
            (b"/etc/".to_vec(), 72, ACC_READ),
            (b"/etc/shadow\0".to_vec(), 128, 0),
        ]
    );
    let keys = c.files.keys(0x0102_0304);
    let (plen, data, rule) = keys[1];
    assert_eq!(plen, 72);
    assert_eq!(&data[..9], b"\x01\x02\x03\x04/etc/");
    assert!(data[9..].iter().all(|&b| b == 0));
    assert_eq!(rule.rule, 0);
    assert_eq!(keys[2].2.rule, 1);
    assert!(c.exec.entries().iter().all(|(_, r)| r.allow == ACC_EXEC));
}

#[test]
fn example_egress() {
    let c = compiled(EXAMPLE);
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    assert_eq!(
        c.check_connect(lo, 80, PROTO_TCP),
        Decision {
            allowed: true,
            rule: Some(0)
        }
    );
    assert!(allowed(c.check_connect(lo, 8080, PROTO_TCP)));
    assert!(!allowed(c.check_connect(lo, 8081, PROTO_TCP)));
    assert!(!allowed(c.check_connect(lo, 80, PROTO_UDP)));
    let mapped = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
    assert!(allowed(c.check_connect(mapped, 8000, PROTO_TCP)));
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    assert_eq!(
        c.check_connect(v6, 53, PROTO_UDP),
        Decision {
            allowed: true,
            rule: Some(1)
        }
    );
    assert_eq!(
        c.check_connect("127.0.0.2".parse().unwrap(), 80, PROTO_TCP),
        Decision {
            allowed: false,
            rule: None
        }
    );
    let (p, r) = c.net.entries()[1];
    assert_eq!(IpAddr::from(p.addr), mapped);
    assert_eq!((p.bits, p.prefix_len()), (128, 160));
    assert_eq!(
        &r.ports[..r.count as usize],
        &[
            PortRange {
                lo: 80,
                hi: 80,
                proto: PROTO_TCP,
                _pad: [0; 3]
            },
            PortRange {
                lo: 8000,
                hi: 8080,
                proto: PROTO_TCP,
                _pad: [0; 3]
            },
        ]
    );
    let key = p.key_data(7);
    assert_eq!(&key[..4], &[0, 0, 0, 7]);
    assert_eq!(&key[4..], &p.addr);
}

#[test]
fn egress_inherits_covering_prefixes() {
    let c = compiled(&doc(&format!(
        "{SEL}network:\n  egress:\n    - {{cidr: 10.0.0.0/8, ports: [53], protocol: udp}}\n    - {{cidr: 10.1.0.0/16, ports: [443], protocol: tcp}}\n    - {{cidr: 0.0.0.0/0, ports: [53], protocol: tcp}}"
    )));
    let a: IpAddr = "10.1.2.3".parse().unwrap();
    assert_eq!(
        c.check_connect(a, 443, PROTO_TCP),
        Decision {
            allowed: true,
            rule: Some(1)
        }
    );
    assert!(allowed(c.check_connect(a, 53, PROTO_UDP)));
    assert!(allowed(c.check_connect(a, 53, PROTO_TCP)));
    assert!(!allowed(c.check_connect(
        "10.2.0.1".parse().unwrap(),
        443,
        PROTO_TCP
    )));
    // 53 is allowed for both protocols at the /16 node: one merged range.
    let node = c
        .net
        .entries()
        .iter()
        .find(|(p, _)| p.bits == 112)
        .unwrap()
        .1;
    assert_eq!(node.count, 2);
    assert_eq!(node.ports[0].proto, PROTO_TCP | PROTO_UDP);
    // IPv4 rules never cover IPv6 addresses.
    assert!(!allowed(c.check_connect(
        "fd00::1".parse().unwrap(),
        53,
        PROTO_TCP
    )));
}

#[test]
fn unpoliced_and_empty_sections() {
    let c = compiled(&doc(SEL));
    assert_eq!(c.flags, 0);
    let open = Decision {
        allowed: true,
        rule: None,
    };
    assert_eq!(c.check_exec(b"/anything"), open);
    assert_eq!(c.check_file(b"/etc/shadow", ACC_WRITE), open);
    assert_eq!(
        c.check_connect("1.1.1.1".parse().unwrap(), 1, PROTO_TCP),
        open
    );
    let c = compiled(&doc(&format!(
        "{SEL}exec: {{allow: [], allowFileless: true, allowNamespaces: true}}\nfiles: []\nnetwork: {{egress: [], allowRawSockets: true}}"
    )));
    assert_eq!(
        c.flags,
        POLICE_EXEC
            | POLICE_FILES
            | POLICE_NET
            | ALLOW_FILELESS
            | ALLOW_NAMESPACES
            | ALLOW_RAW_SOCKETS
    );
    assert!(!allowed(c.check_exec(b"/bin/sh")));
    assert!(!allowed(c.check_file(b"/etc/hosts", ACC_READ)));
    assert!(!allowed(c.check_connect(
        "::1".parse().unwrap(),
        80,
        PROTO_TCP
    )));
}

#[test]
fn selectors() {
    use crate::containers::meta::{ContainerMeta, PodMeta};
    let p = &parse_str(EXAMPLE, "w.yaml").unwrap()[0];
    let mut m = ContainerMeta {
        name: Some("web-1".into()),
        image: Some("nginx:1.27".into()),
        labels: [("app".to_string(), "web".to_string())].into(),
        pod: Some(PodMeta {
            namespace: "prod".into(),
            labels: [("tier", "front"), ("env", "a")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert!(p.matches(&m));
    m.pod
        .as_mut()
        .unwrap()
        .labels
        .insert("env".into(), "b".into());
    assert!(!p.matches(&m), "matchExpressions In");
    m.pod
        .as_mut()
        .unwrap()
        .labels
        .insert("env".into(), "a".into());
    m.image = Some("redis:7".into());
    assert!(!p.matches(&m), "image glob");
    m.image = Some("nginx:1.27".into());
    m.labels.clear();
    assert!(!p.matches(&m), "labels");
    let by_path = &parse_str(
        &doc("mode: enforce\nselector: {cgroupPath: /palisade-test/x}"),
        "c.yaml",
    )
    .unwrap()[0];
    m.cgroup_path = "/palisade-test/x".into();
    assert!(by_path.matches(&m));
    // A sub-cgroup stays under its ancestor's policy (no escape by mkdir); a sibling with the
    // same prefix does not match.
    m.cgroup_path = "/palisade-test/x/y".into();
    assert!(by_path.matches(&m));
    m.cgroup_path = "/palisade-test/xy".into();
    assert!(!by_path.matches(&m));
    m.cgroup_path = "/palisade-test".into();
    assert!(!by_path.matches(&m));
    assert!(glob_match("web-?", "web-1") && !glob_match("web-?", "web-12"));
    assert!(glob_match("*a*b", "xxaxxb") && !glob_match("*a*b", "xxaxxbc"));
    assert!(glob_match("*", "") && !glob_match("?", ""));
}

// ---- property tests ---------------------------------------------------------------------------

/// Paths over a tiny alphabet so that rules and probes collide and nest often.
fn arb_path() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(prop::sample::select(vec!["a", "b", "ab"]), 0..4),
        any::<bool>(),
    )
        .prop_map(|(segs, dir)| {
            let mut s = format!("/{}", segs.join("/"));
            if dir && !s.ends_with('/') {
                s.push('/');
            }
            s
        })
}

fn arb_file_rule() -> impl Strategy<Value = FileRule> {
    (
        arb_path(),
        prop::sample::select(vec![Access::Read, Access::Write, Access::Any]),
        any::<bool>(),
    )
        .prop_map(|(path, access, allow)| FileRule {
            path,
            access,
            action: if allow { Action::Allow } else { Action::Deny },
            pos: Pos::default(),
        })
}

/// How specifically a rule names `path` (None: it does not match): bytes pinned down (an exact
/// rule also pins the end), then exact over directory, then deny over allow, then the earlier.
fn reference_rank(
    rule_path: &str,
    deny: bool,
    index: usize,
    path: &str,
) -> Option<(usize, bool, bool, std::cmp::Reverse<usize>)> {
    let exact = !rule_path.ends_with('/');
    let matches = if exact {
        path == rule_path
    } else {
        path.starts_with(rule_path) || path == &rule_path[..rule_path.len() - 1]
    };
    let pinned = if exact {
        rule_path.len() + 1
    } else {
        rule_path.len()
    };
    matches.then_some((pinned, exact, deny, std::cmp::Reverse(index)))
}

/// Direct evaluation of file rules: per access bit the most specific rule mentioning it decides.
fn reference_file(rules: &[FileRule], path: &str, access: u8) -> Decision {
    let ranked = |bit: Option<u8>| {
        rules
            .iter()
            .enumerate()
            .filter(|(_, r)| bit.is_none_or(|b| r.access.bits() & b != 0))
            .filter_map(|(i, r)| {
                reference_rank(&r.path, r.action == Action::Deny, i, path).map(|k| (k, i))
            })
            .max()
    };
    let allowed = [ACC_READ, ACC_WRITE]
        .into_iter()
        .filter(|b| access & b != 0)
        .all(|b| ranked(Some(b)).is_some_and(|(_, i)| rules[i].action == Action::Allow));
    Decision {
        allowed,
        rule: ranked(None).map(|(_, i)| i as u32),
    }
}

fn arb_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (prop::sample::select(vec![0u8, 1, 10, 255]), 0u8..3, 0u8..3)
            .prop_map(|(a, b, c)| IpAddr::V4(Ipv4Addr::new(10, a, b, c))),
        (0u16..3, 0u16..3)
            .prop_map(|(a, b)| IpAddr::V6(Ipv6Addr::new(0xfd00, a, 0, 0, 0, 0, 0, b))),
        (0u8..3).prop_map(|c| IpAddr::V6(Ipv4Addr::new(10, 0, 0, c).to_ipv6_mapped())),
    ]
}

fn arb_egress() -> impl Strategy<Value = EgressRule> {
    let v4 = (
        arb_ip(),
        prop::sample::select(vec![0u8, 8, 16, 24, 30, 32, 104, 112, 128]),
    );
    let ports = prop::option::of(prop::collection::vec((1u16..60, 0u16..8), 1..3));
    let proto = prop::sample::select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Any]);
    (v4, ports, proto).prop_map(|((ip, bits), ports, protocol)| {
        let net = match ip {
            IpAddr::V4(a) => ipnet::IpNet::new(IpAddr::V4(a), bits.min(32)),
            IpAddr::V6(a) => ipnet::IpNet::new(IpAddr::V6(a), bits),
        }
        .unwrap()
        .trunc();
        EgressRule {
            cidr: net,
            ports: ports.map(|v| {
                v.into_iter()
                    .map(|(lo, n)| Ports { lo, hi: lo + n })
                    .collect()
            }),
            protocol,
            pos: Pos::default(),
        }
    })
}

fn as_mapped(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Direct evaluation of egress rules (IPv4 compared in the mapped space, as the kernel does).
fn reference_net(rules: &[EgressRule], addr: IpAddr, port: u16, proto: u8) -> Decision {
    let a = as_mapped(addr);
    let net6 = |n: &ipnet::IpNet| match n {
        ipnet::IpNet::V4(n) => {
            ipnet::Ipv6Net::new(n.network().to_ipv6_mapped(), 96 + n.prefix_len()).unwrap()
        }
        ipnet::IpNet::V6(n) => *n,
    };
    let covering: Vec<(usize, &EgressRule)> = rules
        .iter()
        .enumerate()
        .filter(|(_, r)| net6(&r.cidr).contains(&a))
        .collect();
    let allowed = covering.iter().any(|(_, r)| {
        r.protocol.bits() & proto != 0
            && r.ports
                .as_ref()
                .is_none_or(|ps| ps.iter().any(|p| p.lo <= port && port <= p.hi))
    });
    let longest = covering
        .iter()
        .map(|(_, r)| net6(&r.cidr).prefix_len())
        .max();
    let rule = covering
        .iter()
        .find(|(_, r)| Some(net6(&r.cidr).prefix_len()) == longest)
        .map(|(i, _)| *i as u32);
    Decision { allowed, rule }
}

fn policy_with(
    files: Option<Vec<FileRule>>,
    exec: Option<ExecSpec>,
    net: Option<NetworkSpec>,
) -> Policy {
    Policy {
        name: "p".into(),
        files,
        exec,
        network: net,
        ..Default::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn files_match_reference(
        rules in prop::collection::vec(arb_file_rule(), 0..7),
        probes in prop::collection::vec((arb_path(), prop::sample::select(vec![ACC_READ, ACC_WRITE, ACC_READ | ACC_WRITE])), 1..12),
    ) {
        let c = compile(&policy_with(Some(rules.clone()), None, None)).unwrap();
        for (path, access) in probes {
            let want = reference_file(&rules, &path, access);
            prop_assert_eq!(c.check_file(path.as_bytes(), access), want, "path {} access {}", path, access);
        }
    }

    #[test]
    fn exec_matches_reference(
        paths in prop::collection::vec(arb_path(), 0..6),
        probes in prop::collection::vec(arb_path(), 1..12),
    ) {
        let exec = ExecSpec {
            allow: paths.iter().map(|p| ExecRule { path: p.clone(), pos: Pos::default() }).collect(),
            allow_fileless: false,
            allow_namespaces: false,
        };
        let c = compile(&policy_with(None, Some(exec), None)).unwrap();
        let as_rules: Vec<FileRule> = paths.iter().map(|p| FileRule {
            path: p.clone(), access: Access::Read, action: Action::Allow, pos: Pos::default(),
        }).collect();
        for path in probes {
            let want = reference_file(&as_rules, &path, ACC_READ);
            prop_assert_eq!(c.check_exec(path.as_bytes()), want, "path {}", path);
        }
    }

    #[test]
    fn egress_matches_reference(
        rules in prop::collection::vec(arb_egress(), 0..6),
        probes in prop::collection::vec((arb_ip(), 0u16..70, prop::sample::select(vec![PROTO_TCP, PROTO_UDP])), 1..16),
    ) {
        let p = policy_with(None, None, Some(NetworkSpec { egress: rules.clone(), allow_raw_sockets: false }));
        let c = match compile(&p) {
            Ok(c) => c,
            Err(e) => {
                prop_assert_eq!(e.kind, ErrorKind::Limit);
                return Ok(());
            }
        };
        for (addr, port, proto) in probes {
            let want = reference_net(&rules, addr, port, proto);
            prop_assert_eq!(c.check_connect(addr, port, proto), want, "{} {} {}", addr, port, proto);
        }
    }

    #[test]
    fn emitted_yaml_round_trips(
        rules in prop::collection::vec(arb_file_rule(), 0..4),
        egress in prop::collection::vec(arb_egress(), 0..4),
        exec in prop::collection::vec(arb_path(), 0..3),
    ) {
        let mut p = policy_with(
            Some(rules),
            Some(ExecSpec { allow: exec.into_iter().map(|path| ExecRule { path, pos: Pos::default() }).collect(), allow_fileless: true, allow_namespaces: false }),
            Some(NetworkSpec { egress, allow_raw_sockets: false }),
        );
        p.selector.cgroup_path = Some("/x".into());
        prop_assume!(compile(&p).is_ok());
        let y = p.to_yaml();
        let back = parse_str(&y, "e.yaml").map_err(|e| TestCaseError::fail(format!("{e}\n{y}")))?;
        prop_assert_eq!(back[0].to_yaml(), y);
    }
}
