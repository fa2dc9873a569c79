//! Loading files and directories, emitting YAML, and the error messages shown in
//! `docs/policy.md` (asserted verbatim, so the documentation shows real output).
use super::tests_parse::{EXAMPLE, doc};
use super::*;

const SEL: &str = "mode: enforce\nselector: {cgroupPath: /x}\n";

#[test]
fn to_yaml_round_trips() {
    let ps = parse_str(EXAMPLE, "w.yaml").unwrap();
    let y = ps[0].to_yaml();
    let back = parse_str(&y, "emitted.yaml").unwrap_or_else(|e| panic!("{e}\n{y}"));
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].to_yaml(), y);
    assert_eq!(back[0].to_json(), ps[0].to_json());
    // Absent sections stay absent, present-empty ones stay present.
    let p = &parse_str(&doc(&format!("{SEL}exec: {{allow: []}}")), "e.yaml").unwrap()[0];
    let back = &parse_str(&p.to_yaml(), "e2.yaml").unwrap()[0];
    assert!(back.exec.as_ref().is_some_and(|e| e.allow.is_empty()));
    assert!(back.files.is_none() && back.network.is_none());
}

#[test]
fn load_dir_reports_bad_files_and_cross_file_duplicates() {
    let dir = std::env::temp_dir().join(format!("palisade-policy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), doc(SEL)).unwrap();
    std::fs::write(dir.join("b.yaml"), doc(SEL)).unwrap(); // duplicate of a.yaml's "t"
    std::fs::write(dir.join("c.yml"), doc(SEL).replace("name: t", "name: c")).unwrap();
    std::fs::write(dir.join("d.yaml"), "kind: [").unwrap();
    std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
    let (ps, errs) = load_dir(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        ps.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["t", "c"]
    );
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert_eq!(errs[0].kind, ErrorKind::Duplicate);
    assert!(
        errs[0].file.ends_with("b.yaml") && errs[0].reason.contains("a.yaml:4:9"),
        "{}",
        errs[0]
    );
    assert_eq!(errs[1].kind, ErrorKind::Syntax);
    assert!(errs[1].file.ends_with("d.yaml"));
    let e = load_file(dir.join("missing.yaml")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Io);
}

/// The error examples of `docs/policy.md`, with their exact output.
fn doc_error_cases() -> Vec<(&'static str, String)> {
    let web = |body: &str| {
        format!(
            "apiVersion: palisade.dev/v1\nkind: ContainerPolicy\nmetadata:\n  name: web\nspec:\n  mode: enforce\n  selector: {{image: \"nginx:*\"}}\n{body}"
        )
    };
    vec![
        (
            "policies/web.yaml",
            web(
                "  files:\n    - {path: /etc/, access: read}\n    - {path: etc/shadow, access: any, action: deny}\n",
            ),
        ),
        (
            "policies/web.yaml",
            web("  files:\n    - {path: /etc/, acess: read}\n"),
        ),
        (
            "policies/web.yaml",
            web("  network:\n    egress:\n      - {cidr: 10.1.2.3/8, ports: [443]}\n"),
        ),
        (
            "policies/web.yaml",
            web("  network:\n    egress:\n      - {cidr: 10.0.0.0/8, ports: [\"8080-80\"]}\n"),
        ),
        (
            "policies/web.yaml",
            web("  exec:\n    allowFileless: true\n"),
        ),
        ("policies/web.yaml", web("  mode: enforce\n")),
        ("policies/web.yaml", web("  exec: {allow: [/bin/sh]\n")),
        ("policies/web.yaml", format!("{}---\n{}", web(""), web(""))),
    ]
}

#[test]
fn doc_error_examples() {
    let want = [
        "policies/web.yaml:10:14: spec.files[1].path: must be absolute",
        "policies/web.yaml:9:21: spec.files[0].acess: unknown field (expected one of: path, access, action)",
        "policies/web.yaml:10:16: spec.network.egress[0].cidr: host bits set in 10.1.2.3/8 (the network is 10.0.0.0/8)",
        "policies/web.yaml:10:36: spec.network.egress[0].ports[0]: inverted range 8080-80",
        "policies/web.yaml:9:5: spec.exec.allow: missing required field",
        "policies/web.yaml:8:3: spec.mode: duplicate key",
        "policies/web.yaml:8:9: unclosed bracket '{'",
        "policies/web.yaml:12:9: metadata.name: duplicate policy name \"web\" (first defined at policies/web.yaml:4:9)",
    ];
    let got: Vec<String> = doc_error_cases()
        .iter()
        .map(|(f, t)| parse_str(t, f).unwrap_err().to_string())
        .collect();
    for g in &got {
        println!("{g}");
    }
    assert_eq!(got, want);
}

#[test]
fn emitted_yaml_text() {
    let p = &parse_str(EXAMPLE, "w.yaml").unwrap()[0];
    let y = p.to_yaml();
    assert!(
        y.starts_with("apiVersion: palisade.dev/v1\nkind: ContainerPolicy\nmetadata:\n  name: web\nspec:\n  mode: enforce\n"),
        "{y}"
    );
    for part in [
        "  exec:\n    allow:\n    - /bin/busybox\n    - /usr/bin/\n    allowFileless: false\n",
        "  - path: /etc/shadow\n    access: any\n    action: deny\n",
        "      ports:\n      - 80\n      - 8000-8080\n      protocol: tcp\n",
    ] {
        assert!(y.contains(part), "{y}\nlacks\n{part}");
    }
}
