//! Parsing and validation: the documented example, and one test per validation error, each
//! asserting the reported line and column.
use super::*;

pub(super) const EXAMPLE: &str = r#"apiVersion: palisade.dev/v1
kind: ContainerPolicy
metadata:
  name: web
spec:
  mode: enforce
  selector:
    containerName: "web-*"
    image: "nginx:*"
    labels: {app: web}
    namespace: prod
    podSelector:
      matchLabels: {tier: front}
      matchExpressions: [{key: env, operator: In, values: [a]}]
  exec:
    allow: [/bin/busybox, /usr/bin/]
    allowFileless: false
  files:
    - {path: /etc/, access: read, action: allow}
    - {path: /etc/shadow, access: any, action: deny}
  network:
    egress:
      - {cidr: 127.0.0.1/32, ports: [80, "8000-8080"], protocol: tcp}
      - {cidr: "::1/128", protocol: any}
"#;

/// A valid policy with `spec` lines replaced by `spec_body` (indented by 2), so error tests
/// know their line numbers: `spec:` is line 5, the first body line is line 6.
pub(super) fn doc(spec_body: &str) -> String {
    let mut s = String::from(
        "apiVersion: palisade.dev/v1\nkind: ContainerPolicy\nmetadata:\n  name: t\nspec:\n",
    );
    for l in spec_body.lines() {
        s.push_str("  ");
        s.push_str(l);
        s.push('\n');
    }
    s
}

const SEL: &str = "mode: enforce\nselector: {cgroupPath: /x}\n";

fn err(text: &str) -> PolicyError {
    match parse_str(text, "p.yaml") {
        Ok(p) => panic!("expected an error, got {p:?}"),
        Err(e) => e,
    }
}

#[track_caller]
fn assert_err(text: &str, line: u32, col: u32, field: &str, reason: &str) {
    let e = err(text);
    assert_eq!((e.pos.line, e.pos.column), (line, col), "{e}");
    assert_eq!(e.field, field, "{e}");
    assert!(e.reason.contains(reason), "{e} does not mention {reason:?}");
}

#[test]
fn example_parses() {
    let ps = parse_str(EXAMPLE, "policies/web.yaml").unwrap();
    assert_eq!(ps.len(), 1);
    let p = &ps[0];
    assert_eq!(p.name, "web");
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(
        p.source,
        SourceRef {
            file: "policies/web.yaml".into(),
            line: 1
        }
    );
    assert_eq!(p.selector.container_name.as_deref(), Some("web-*"));
    let ps_ = p.selector.pod_selector.as_ref().unwrap();
    assert_eq!(ps_.match_labels["tier"], "front");
    assert_eq!(ps_.match_expressions[0].operator, LabelOp::In);
    let exec = p.exec.as_ref().unwrap();
    assert_eq!(exec.allow.len(), 2);
    assert_eq!(exec.allow[1].path, "/usr/bin/");
    assert_eq!(exec.allow[1].pos, Pos::new(16, 27));
    let files = p.files.as_ref().unwrap();
    assert_eq!(files[1].action, Action::Deny);
    assert_eq!(files[1].access, Access::Any);
    let eg = &p.network.as_ref().unwrap().egress;
    assert_eq!(
        eg[0].ports.as_deref(),
        Some(&[Ports { lo: 80, hi: 80 }, Ports { lo: 8000, hi: 8080 }][..])
    );
    assert_eq!(eg[0].protocol, Protocol::Tcp);
    assert_eq!(eg[1].cidr.to_string(), "::1/128");
    assert_eq!(eg[1].ports, None);
}

#[test]
fn multi_document_and_defaults() {
    let text = format!(
        "{}---\n{}---\n",
        doc(SEL),
        doc(SEL).replace("name: t", "name: u")
    );
    let ps = parse_str(&text, "m.yaml").unwrap();
    assert_eq!(
        ps.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["t", "u"]
    );
    assert_eq!(ps[1].source.line, 9);
    assert!(ps[0].exec.is_none() && ps[0].files.is_none() && ps[0].network.is_none());
    let p = &parse_str(
        &doc(&format!(
            "{SEL}files: [{{path: /a, access: read}}]\nnetwork: {{egress: [{{cidr: 10.0.0.0/8}}]}}"
        )),
        "d.yaml",
    )
    .unwrap()[0];
    assert_eq!(p.files.as_ref().unwrap()[0].action, Action::Allow);
    assert_eq!(
        p.network.as_ref().unwrap().egress[0].protocol,
        Protocol::Any
    );
    assert!(parse_str("", "empty.yaml").unwrap().is_empty());
}

#[test]
fn anchors_and_aliases_resolve() {
    let text = doc("mode: enforce\nselector: {cgroupPath: &p /x}\nexec: {allow: [*p]}");
    assert_eq!(
        parse_str(&text, "a.yaml").unwrap()[0]
            .exec
            .as_ref()
            .unwrap()
            .allow[0]
            .path,
        "/x"
    );
}

#[test]
fn mode_roundtrip() {
    for m in [Mode::Learn, Mode::Monitor, Mode::Enforce] {
        assert_eq!(m.to_string().parse::<Mode>().unwrap(), m);
    }
    assert_eq!(Mode::Enforce.as_u8(), agent_common::MODE_ENFORCE);
    assert!("Enforce".parse::<Mode>().is_err());
}

#[test]
fn yaml_syntax_error() {
    let e = err("apiVersion: palisade.dev/v1\nkind: [\n");
    assert_eq!(e.kind, ErrorKind::Syntax);
    assert_eq!(e.pos.line, 2, "{e}");
    let e = err("a: b\n  c: d\n");
    assert_eq!((e.kind, e.pos.line), (ErrorKind::Syntax, 2), "{e}");
}

#[test]
fn missing_required_fields() {
    assert_err(
        "kind: ContainerPolicy\n",
        1,
        1,
        "apiVersion",
        "missing required field",
    );
    assert_err(
        &doc("selector: {cgroupPath: /x}"),
        6,
        3,
        "spec.mode",
        "missing",
    );
    assert_err(&doc("mode: enforce"), 6, 3, "spec.selector", "missing");
    assert_err(
        &doc(&format!("{SEL}exec: {{allowFileless: true}}")),
        8,
        9,
        "spec.exec.allow",
        "missing",
    );
    assert_err(
        &doc(&format!("{SEL}files:\n  - {{access: read}}")),
        9,
        7,
        "spec.files[0].path",
        "missing",
    );
    assert_err(
        &doc(&format!("{SEL}network: {{egress: [{{ports: [1]}}]}}")),
        8,
        22,
        "spec.network.egress[0].cidr",
        "missing",
    );
    let e = err("apiVersion: palisade.dev/v1\nkind: ContainerPolicy\nmetadata: {}\nspec: {}\n");
    assert_eq!((e.pos.line, e.field.as_str()), (3, "metadata.name"));
}

#[test]
fn unknown_fields_anywhere() {
    assert_err(
        &format!("{}extra: 1\n", doc(SEL)),
        8,
        1,
        "extra",
        "unknown field",
    );
    assert_err(
        &doc(&format!("{SEL}exec: {{allow: [], alow: []}}")),
        8,
        21,
        "spec.exec.alow",
        "unknown field",
    );
    assert_err(
        &doc(&format!(
            "{SEL}files:\n  - path: /a\n    access: read\n    mode: 1"
        )),
        11,
        7,
        "spec.files[0].mode",
        "unknown field",
    );
    assert_err(
        &doc("mode: enforce\nselector: {cgroupPath: /x, pod: y}"),
        7,
        30,
        "spec.selector.pod",
        "unknown field",
    );
    let e = err(&doc("mode: enforce\nselector: {cgroupPath: /x, pod: y}"));
    assert!(e.reason.contains("containerName"), "{e}");
}

#[test]
fn wrong_api_version_kind_mode() {
    assert_err(
        &doc(SEL).replace("palisade.dev/v1", "palisade.dev/v2"),
        1,
        13,
        "apiVersion",
        "must be palisade.dev/v1",
    );
    assert_err(
        &doc(SEL).replace("ContainerPolicy", "Pod"),
        2,
        7,
        "kind",
        "must be ContainerPolicy",
    );
    assert_err(
        &doc("mode: block\nselector: {cgroupPath: /x}"),
        6,
        9,
        "spec.mode",
        "unknown mode",
    );
}

#[test]
fn bad_paths() {
    let cases = [
        ("etc/passwd", "must be absolute"),
        ("/etc/../root", "`.` or `..`"),
        ("/etc/./x", "`.` or `..`"),
        ("/etc//x", "`//`"),
        ("", "must not be empty"),
    ];
    for (p, reason) in cases {
        assert_err(
            &doc(&format!("{SEL}files:\n  - {{access: read, path: \"{p}\"}}")),
            9,
            28,
            "spec.files[0].path",
            reason,
        );
        assert_err(
            &doc(&format!("{SEL}exec:\n  allow:\n    - /ok\n    - \"{p}\"")),
            11,
            9,
            "spec.exec.allow[1]",
            reason,
        );
    }
    assert_err(
        &doc(&format!("{SEL}exec: {{allow: [\"/a\\0b\"]}}")),
        8,
        18,
        "spec.exec.allow[0]",
        "NUL",
    );
    assert_err(
        &doc("mode: enforce\nselector: {cgroupPath: x}"),
        7,
        26,
        "spec.selector.cgroupPath",
        "absolute",
    );
}

#[test]
fn path_length_limit() {
    // 251 bytes + NUL = 252 = PATH_MAX fits; one more does not.
    let ok = format!("/{}", "a".repeat(250));
    parse_str(&doc(&format!("{SEL}exec: {{allow: [{ok}]}}")), "l.yaml").unwrap();
    let long = format!("/{}", "a".repeat(251));
    assert_err(
        &doc(&format!("{SEL}exec: {{allow: [{long}]}}")),
        8,
        18,
        "spec.exec.allow[0]",
        "too long: 252 bytes, at most 251",
    );
}

#[test]
fn empty_rule_and_selector() {
    assert_err(
        &doc(&format!(
            "{SEL}files:\n  - {{path: /a, access: read}}\n  - {{}}"
        )),
        10,
        7,
        "spec.files[1]",
        "empty rule",
    );
    assert_err(
        &doc(&format!("{SEL}network:\n  egress: [{{}}]")),
        9,
        14,
        "spec.network.egress[0]",
        "empty rule",
    );
    assert_err(
        &doc("mode: enforce\nselector: {}"),
        7,
        13,
        "spec.selector",
        "empty selector",
    );
    assert_err(
        &doc("mode: enforce\nselector: {image: \"\"}"),
        7,
        21,
        "spec.selector.image",
        "must not be empty",
    );
}

#[test]
fn bad_cidrs() {
    let net = |c: &str| {
        doc(&format!(
            "{SEL}network:\n  egress:\n    - cidr: \"{c}\"\n      protocol: tcp"
        ))
    };
    assert_err(
        &net("10.0.0.1/8"),
        10,
        15,
        "spec.network.egress[0].cidr",
        "host bits set in 10.0.0.1/8 (the network is 10.0.0.0/8)",
    );
    assert_err(
        &net("::1/64"),
        10,
        15,
        "spec.network.egress[0].cidr",
        "host bits set",
    );
    assert_err(
        &net("10.0.0.0/33"),
        10,
        15,
        "spec.network.egress[0].cidr",
        "invalid CIDR",
    );
    assert_err(
        &net("example.com"),
        10,
        15,
        "spec.network.egress[0].cidr",
        "invalid CIDR",
    );
    // A bare address is a host prefix.
    let p = parse_str(&net("10.1.2.3"), "c.yaml").unwrap();
    assert_eq!(
        p[0].network.as_ref().unwrap().egress[0].cidr.to_string(),
        "10.1.2.3/32"
    );
}

#[test]
fn bad_ports_protocol_access_action() {
    let ports = |p: &str| {
        doc(&format!(
            "{SEL}network:\n  egress:\n    - cidr: 10.0.0.0/8\n      ports: [22, {p}]"
        ))
    };
    assert_err(
        &ports("0"),
        11,
        21,
        "spec.network.egress[0].ports[1]",
        "port 0",
    );
    assert_err(
        &ports("65536"),
        11,
        21,
        "spec.network.egress[0].ports[1]",
        "out of range",
    );
    assert_err(
        &ports("\"90-80\""),
        11,
        21,
        "spec.network.egress[0].ports[1]",
        "inverted range 90-80",
    );
    assert_err(
        &ports("\"http\""),
        11,
        21,
        "spec.network.egress[0].ports[1]",
        "invalid port",
    );
    assert_err(
        &ports("[1]"),
        11,
        21,
        "spec.network.egress[0].ports[1]",
        "must be a string",
    );
    assert_err(
        &doc(&format!(
            "{SEL}network: {{egress: [{{cidr: ::1/128, protocol: icmp}}]}}"
        )),
        8,
        48,
        "spec.network.egress[0].protocol",
        "unknown protocol \"icmp\"",
    );
    assert_err(
        &doc(&format!("{SEL}files: [{{path: /a, access: exec}}]")),
        8,
        30,
        "spec.files[0].access",
        "unknown access",
    );
    assert_err(
        &doc(&format!(
            "{SEL}files: [{{path: /a, access: read, action: block}}]"
        )),
        8,
        44,
        "spec.files[0].action",
        "unknown action",
    );
    assert_err(
        &doc(&format!("{SEL}exec: {{allow: [], allowFileless: yes}}")),
        8,
        36,
        "spec.exec.allowFileless",
        "true or false",
    );
}

#[test]
fn wrong_types() {
    assert_err(
        &doc(&format!("{SEL}files: {{path: /a}}")),
        8,
        10,
        "spec.files",
        "must be a sequence, found a mapping",
    );
    assert_err(
        &doc(&format!("{SEL}exec:")),
        8,
        7,
        "spec.exec",
        "must be a mapping, found null",
    );
    assert_err(
        &doc("mode: [enforce]\nselector: {cgroupPath: /x}"),
        6,
        9,
        "spec.mode",
        "must be a string",
    );
}

#[test]
fn duplicate_names_and_keys() {
    let text = format!("{}---\n{}", doc(SEL), doc(SEL));
    let e = err(&text);
    assert_eq!(e.kind, ErrorKind::Duplicate);
    assert_eq!((e.pos.line, e.pos.column), (12, 9));
    assert!(e.reason.contains("first defined at p.yaml:4:9"), "{e}");
    assert_eq!(
        e.to_string(),
        "p.yaml:12:9: metadata.name: duplicate policy name \"t\" (first defined at p.yaml:4:9)"
    );
    assert_err(
        &doc("mode: enforce\nmode: learn\nselector: {cgroupPath: /x}"),
        7,
        3,
        "spec.mode",
        "duplicate key",
    );
    assert_err(
        &doc(SEL).replace("name: t", "name: Web_1"),
        4,
        9,
        "metadata.name",
        "invalid name",
    );
}

#[test]
fn pod_selector_expressions() {
    let sel = |e: &str| {
        doc(&format!(
            "mode: enforce\nselector:\n  podSelector:\n    matchExpressions: [{e}]"
        ))
    };
    assert_err(
        &sel("{key: a, operator: Has}"),
        9,
        45,
        "spec.selector.podSelector.matchExpressions[0].operator",
        "unknown operator",
    );
    assert_err(
        &sel("{key: a, operator: In}"),
        9,
        26,
        "spec.selector.podSelector.matchExpressions[0].values",
        "at least one value",
    );
    assert_err(
        &sel("{key: a, operator: Exists, values: [x]}"),
        9,
        26,
        "spec.selector.podSelector.matchExpressions[0].values",
        "take no values",
    );
}

#[test]
fn too_many_port_ranges_on_one_prefix() {
    // 16 disjoint TCP ports on 10/8 fit; one more on a covered /16 overflows that node.
    let ports: Vec<String> = (0..16).map(|i| (1000 + 2 * i).to_string()).collect();
    let base = format!(
        "{SEL}network:\n  egress:\n    - {{cidr: 10.0.0.0/8, protocol: tcp, ports: [{}]}}\n",
        ports.join(", ")
    );
    parse_str(&doc(&base), "n.yaml").unwrap();
    let text = doc(&format!(
        "{base}    - {{cidr: 10.1.0.0/16, protocol: tcp, ports: [5000]}}"
    ));
    let e = err(&text);
    assert_eq!(e.kind, ErrorKind::Limit);
    assert_eq!(
        (e.pos.line, e.field.as_str()),
        (11, "spec.network.egress[1]"),
        "{e}"
    );
    assert!(e.reason.contains("needs 17 port ranges"), "{e}");
    // Adjacent ranges coalesce, so they do not count twice.
    let text = doc(&format!(
        "{base}    - {{cidr: 10.1.0.0/16, protocol: tcp, ports: [1001]}}"
    ));
    parse_str(&text, "n.yaml").unwrap();
}

#[test]
fn display_format() {
    let e = err(&doc(&format!(
        "{SEL}files:\n  - {{path: /a, access: read}}\n  - {{path: etc, access: read}}"
    )));
    assert_eq!(
        e.to_string(),
        "p.yaml:10:14: spec.files[1].path: must be absolute"
    );
}
