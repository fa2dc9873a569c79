//! From the position-keeping YAML tree to the typed model, validating as it goes.
use std::collections::BTreeMap;
use std::net::IpAddr;

use agent_common::PATH_MAX;
use ipnet::IpNet;

use super::error::{ErrorKind, PolicyError, Pos};
use super::model::*;
use super::yaml::{Node, Value};

type Result<T> = std::result::Result<T, PolicyError>;

/// Converts one document; `file` is used in errors and in `Policy::source`.
pub(crate) struct Ctx<'a> {
    pub file: &'a str,
}

/// A mapping whose keys were checked against the allowed field names.
struct Fields<'n> {
    entries: Vec<(&'n str, &'n Node)>,
    pos: Pos,
    field: String,
}

fn join(field: &str, key: &str) -> String {
    if field.is_empty() {
        key.to_string()
    } else {
        format!("{field}.{key}")
    }
}

impl Ctx<'_> {
    fn err(
        &self,
        kind: ErrorKind,
        pos: Pos,
        field: &str,
        reason: impl Into<String>,
    ) -> PolicyError {
        PolicyError::new(kind, self.file, pos, field, reason)
    }

    fn invalid(&self, node: &Node, field: &str, reason: impl Into<String>) -> PolicyError {
        self.err(ErrorKind::Invalid, node.pos, field, reason)
    }

    fn fields<'n>(&self, node: &'n Node, field: &str, allowed: &[&str]) -> Result<Fields<'n>> {
        let Value::Map(entries) = &node.value else {
            return Err(self.invalid(
                node,
                field,
                format!("must be a mapping, found {}", node.type_name()),
            ));
        };
        let mut out: Vec<(&str, &Node)> = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let Value::Scalar { text: key, .. } = &k.value else {
                return Err(self.invalid(k, field, "mapping keys must be strings"));
            };
            if !allowed.contains(&key.as_str()) {
                return Err(self.err(
                    ErrorKind::Unknown,
                    k.pos,
                    &join(field, key),
                    format!("unknown field (expected one of: {})", allowed.join(", ")),
                ));
            }
            if out.iter().any(|(seen, _)| *seen == key) {
                return Err(self.invalid(k, &join(field, key), "duplicate key"));
            }
            out.push((key.as_str(), v));
        }
        Ok(Fields {
            entries: out,
            pos: node.pos,
            field: field.to_string(),
        })
    }

    fn req<'n>(&self, f: &Fields<'n>, key: &str) -> Result<&'n Node> {
        f.get(key).ok_or_else(|| {
            self.err(
                ErrorKind::Missing,
                f.pos,
                &join(&f.field, key),
                "missing required field",
            )
        })
    }

    fn string(&self, node: &Node, field: &str) -> Result<String> {
        match &node.value {
            Value::Scalar { text, .. } if !node.is_null() => Ok(text.clone()),
            _ => Err(self.invalid(
                node,
                field,
                format!("must be a string, found {}", node.type_name()),
            )),
        }
    }

    fn seq<'n>(&self, node: &'n Node, field: &str) -> Result<&'n [Node]> {
        match &node.value {
            Value::Seq(items) => Ok(items),
            _ => Err(self.invalid(
                node,
                field,
                format!("must be a sequence, found {}", node.type_name()),
            )),
        }
    }

    fn boolean(&self, node: &Node, field: &str) -> Result<bool> {
        match &node.value {
            Value::Scalar { text, plain: true } if text == "true" => Ok(true),
            Value::Scalar { text, plain: true } if text == "false" => Ok(false),
            _ => Err(self.invalid(node, field, "must be true or false")),
        }
    }

    fn string_map(&self, node: &Node, field: &str) -> Result<BTreeMap<String, String>> {
        let Value::Map(entries) = &node.value else {
            return Err(self.invalid(
                node,
                field,
                format!("must be a mapping, found {}", node.type_name()),
            ));
        };
        let mut out = BTreeMap::new();
        for (k, v) in entries {
            let key = self.string(k, field)?;
            let f = join(field, &key);
            if key.is_empty() {
                return Err(self.invalid(k, &f, "label keys must not be empty"));
            }
            let val = self.string(v, &f)?;
            if out.insert(key, val).is_some() {
                return Err(self.invalid(k, &f, "duplicate key"));
            }
        }
        Ok(out)
    }

    /// One `ContainerPolicy` document.
    pub fn policy(&self, doc: &Node) -> Result<Policy> {
        let top = self.fields(doc, "", &["apiVersion", "kind", "metadata", "spec"])?;
        let api = self.req(&top, "apiVersion")?;
        if self.string(api, "apiVersion")? != API_VERSION {
            return Err(self.invalid(api, "apiVersion", format!("must be {API_VERSION}")));
        }
        let kind = self.req(&top, "kind")?;
        if self.string(kind, "kind")? != KIND {
            return Err(self.invalid(kind, "kind", format!("must be {KIND}")));
        }
        let meta = self.fields(self.req(&top, "metadata")?, "metadata", &["name"])?;
        let name_node = self.req(&meta, "name")?;
        let name = self.string(name_node, "metadata.name")?;
        check_name(&name).map_err(|r| self.invalid(name_node, "metadata.name", r))?;

        let spec = self.fields(
            self.req(&top, "spec")?,
            "spec",
            &["mode", "selector", "exec", "files", "network"],
        )?;
        let mode_node = self.req(&spec, "mode")?;
        let mode = self
            .string(mode_node, "spec.mode")?
            .parse::<Mode>()
            .map_err(|e| self.invalid(mode_node, "spec.mode", e.to_string()))?;
        let selector = self.selector(self.req(&spec, "selector")?)?;
        let exec = spec.get("exec").map(|n| self.exec(n)).transpose()?;
        let files = spec.get("files").map(|n| self.files(n)).transpose()?;
        let network = spec.get("network").map(|n| self.network(n)).transpose()?;
        Ok(Policy {
            name,
            mode,
            selector,
            exec,
            files,
            network,
            source: SourceRef {
                file: self.file.to_string(),
                line: doc.pos.line,
            },
            name_pos: name_node.pos,
        })
    }

    fn selector(&self, node: &Node) -> Result<Selector> {
        const F: &str = "spec.selector";
        let f = self.fields(
            node,
            F,
            &[
                "containerName",
                "image",
                "labels",
                "namespace",
                "podSelector",
                "cgroupPath",
            ],
        )?;
        let glob = |key: &str| -> Result<Option<String>> {
            let Some(n) = f.get(key) else { return Ok(None) };
            let field = join(F, key);
            let s = self.string(n, &field)?;
            if s.is_empty() {
                return Err(self.invalid(n, &field, "must not be empty"));
            }
            Ok(Some(s))
        };
        let mut sel = Selector {
            container_name: glob("containerName")?,
            image: glob("image")?,
            namespace: glob("namespace")?,
            cgroup_path: glob("cgroupPath")?,
            labels: f
                .get("labels")
                .map(|n| self.string_map(n, "spec.selector.labels"))
                .transpose()?,
            pod_selector: None,
        };
        if let (Some(p), Some(n)) = (&sel.cgroup_path, f.get("cgroupPath")) {
            check_path(p).map_err(|r| self.invalid(n, "spec.selector.cgroupPath", r))?;
        }
        if let Some(n) = f.get("podSelector") {
            sel.pod_selector = Some(self.pod_selector(n)?);
        }
        if sel.is_empty() {
            return Err(self.invalid(node, F, "empty selector: give at least one field"));
        }
        Ok(sel)
    }

    fn pod_selector(&self, node: &Node) -> Result<PodSelector> {
        const F: &str = "spec.selector.podSelector";
        let f = self.fields(node, F, &["matchLabels", "matchExpressions"])?;
        let mut out = PodSelector::default();
        if let Some(n) = f.get("matchLabels") {
            out.match_labels = self.string_map(n, &join(F, "matchLabels"))?;
        }
        if let Some(n) = f.get("matchExpressions") {
            for (i, e) in self
                .seq(n, &join(F, "matchExpressions"))?
                .iter()
                .enumerate()
            {
                let field = format!("{F}.matchExpressions[{i}]");
                let ef = self.fields(e, &field, &["key", "operator", "values"])?;
                let key = self.string(self.req(&ef, "key")?, &join(&field, "key"))?;
                let op_node = self.req(&ef, "operator")?;
                let operator = match self.string(op_node, &join(&field, "operator"))?.as_str() {
                    "In" => LabelOp::In,
                    "NotIn" => LabelOp::NotIn,
                    "Exists" => LabelOp::Exists,
                    "DoesNotExist" => LabelOp::DoesNotExist,
                    other => {
                        return Err(self.invalid(
                            op_node,
                            &join(&field, "operator"),
                            format!("unknown operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"),
                        ));
                    }
                };
                let mut values = Vec::new();
                if let Some(v) = ef.get("values") {
                    for (j, s) in self.seq(v, &join(&field, "values"))?.iter().enumerate() {
                        values.push(self.string(s, &format!("{field}.values[{j}]"))?);
                    }
                }
                let needs_values = matches!(operator, LabelOp::In | LabelOp::NotIn);
                if needs_values == values.is_empty() {
                    let reason = if needs_values {
                        "In and NotIn need at least one value"
                    } else {
                        "Exists and DoesNotExist take no values"
                    };
                    return Err(self.invalid(e, &join(&field, "values"), reason));
                }
                out.match_expressions.push(LabelExpr {
                    key,
                    operator,
                    values,
                });
            }
        }
        Ok(out)
    }

    fn exec(&self, node: &Node) -> Result<ExecSpec> {
        let f = self.fields(
            node,
            "spec.exec",
            &["allow", "allowFileless", "allowNamespaces"],
        )?;
        let mut out = ExecSpec::default();
        for (i, n) in self
            .seq(self.req(&f, "allow")?, "spec.exec.allow")?
            .iter()
            .enumerate()
        {
            let field = format!("spec.exec.allow[{i}]");
            let path = self.string(n, &field)?;
            check_path(&path).map_err(|r| self.invalid(n, &field, r))?;
            out.allow.push(ExecRule { path, pos: n.pos });
        }
        if let Some(n) = f.get("allowFileless") {
            out.allow_fileless = self.boolean(n, "spec.exec.allowFileless")?;
        }
        if let Some(n) = f.get("allowNamespaces") {
            out.allow_namespaces = self.boolean(n, "spec.exec.allowNamespaces")?;
        }
        Ok(out)
    }

    fn files(&self, node: &Node) -> Result<Vec<FileRule>> {
        let mut out = Vec::new();
        for (i, n) in self.seq(node, "spec.files")?.iter().enumerate() {
            let field = format!("spec.files[{i}]");
            let f = self.fields(n, &field, &["path", "access", "action"])?;
            if f.entries.is_empty() {
                return Err(self.invalid(n, &field, "empty rule"));
            }
            let pn = self.req(&f, "path")?;
            let path = self.string(pn, &join(&field, "path"))?;
            check_path(&path).map_err(|r| self.invalid(pn, &join(&field, "path"), r))?;
            let an = self.req(&f, "access")?;
            let access = match self.string(an, &join(&field, "access"))?.as_str() {
                "read" => Access::Read,
                "write" => Access::Write,
                "any" => Access::Any,
                other => {
                    return Err(self.invalid(
                        an,
                        &join(&field, "access"),
                        format!("unknown access {other:?} (expected read, write or any)"),
                    ));
                }
            };
            let action = match f.get("action") {
                None => Action::Allow,
                Some(n) => match self.string(n, &join(&field, "action"))?.as_str() {
                    "allow" => Action::Allow,
                    "deny" => Action::Deny,
                    other => {
                        return Err(self.invalid(
                            n,
                            &join(&field, "action"),
                            format!("unknown action {other:?} (expected allow or deny)"),
                        ));
                    }
                },
            };
            out.push(FileRule {
                path,
                access,
                action,
                pos: n.pos,
            });
        }
        Ok(out)
    }

    fn network(&self, node: &Node) -> Result<NetworkSpec> {
        let f = self.fields(node, "spec.network", &["egress", "allowRawSockets"])?;
        let mut out = NetworkSpec::default();
        for (i, n) in self
            .seq(self.req(&f, "egress")?, "spec.network.egress")?
            .iter()
            .enumerate()
        {
            let field = format!("spec.network.egress[{i}]");
            let rf = self.fields(n, &field, &["cidr", "ports", "protocol"])?;
            if rf.entries.is_empty() {
                return Err(self.invalid(n, &field, "empty rule"));
            }
            let cn = self.req(&rf, "cidr")?;
            let cidr = parse_cidr(&self.string(cn, &join(&field, "cidr"))?)
                .map_err(|r| self.invalid(cn, &join(&field, "cidr"), r))?;
            let ports = match rf.get("ports") {
                None => None,
                Some(pn) => {
                    let items = self.seq(pn, &join(&field, "ports"))?;
                    if items.is_empty() {
                        return Err(self.invalid(
                            pn,
                            &join(&field, "ports"),
                            "must not be empty (omit it for every port)",
                        ));
                    }
                    let mut v = Vec::new();
                    for (j, p) in items.iter().enumerate() {
                        let pf = format!("{field}.ports[{j}]");
                        let s = self.string(p, &pf)?;
                        v.push(parse_ports(&s).map_err(|r| self.invalid(p, &pf, r))?);
                    }
                    Some(v)
                }
            };
            let protocol = match rf.get("protocol") {
                None => Protocol::Any,
                Some(p) => match self.string(p, &join(&field, "protocol"))?.as_str() {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    "any" => Protocol::Any,
                    other => {
                        return Err(self.invalid(
                            p,
                            &join(&field, "protocol"),
                            format!("unknown protocol {other:?} (expected tcp, udp or any)"),
                        ));
                    }
                },
            };
            out.egress.push(EgressRule {
                cidr,
                ports,
                protocol,
                pos: n.pos,
            });
        }
        if let Some(n) = f.get("allowRawSockets") {
            out.allow_raw_sockets = self.boolean(n, "spec.network.allowRawSockets")?;
        }
        Ok(out)
    }
}

impl<'n> Fields<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }
}

/// Policy names: lower-case DNS-subdomain style, as Kubernetes object names.
fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty() || name.len() > 253 {
        return Err("must be 1 to 253 characters".into());
    }
    if !name.chars().all(ok_char) || !alnum(name.chars().next()) || !alnum(name.chars().last()) {
        return Err(format!(
            "invalid name {name:?}: use lower-case letters, digits, '-' and '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// Rule paths: absolute, normalised, and short enough for the kernel key (path + NUL in
/// `PATH_MAX` bytes). A trailing `/` makes a directory rule.
pub(crate) fn check_path(path: &str) -> std::result::Result<(), String> {
    if path.is_empty() {
        return Err("must not be empty".into());
    }
    if path.contains('\0') {
        return Err("must not contain NUL bytes".into());
    }
    if !path.starts_with('/') {
        return Err("must be absolute".into());
    }
    if path.contains("//") {
        return Err("must not contain `//`".into());
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("must not contain `.` or `..` segments".into());
    }
    if path.len() + 1 > PATH_MAX {
        return Err(format!(
            "too long: {} bytes, at most {} fit in the kernel key",
            path.len(),
            PATH_MAX - 1
        ));
    }
    Ok(())
}

/// A CIDR (`10.0.0.0/8`, `::1/128`) or a bare address (a host prefix). Host bits must be clear.
pub(crate) fn parse_cidr(s: &str) -> std::result::Result<IpNet, String> {
    let net = if s.contains('/') {
        s.parse::<IpNet>()
            .map_err(|_| format!("invalid CIDR {s:?}"))?
    } else {
        IpNet::from(
            s.parse::<IpAddr>()
                .map_err(|_| format!("invalid CIDR {s:?}"))?,
        )
    };
    if net.trunc() != net {
        return Err(format!(
            "host bits set in {s} (the network is {})",
            net.trunc()
        ));
    }
    Ok(net)
}

/// `80`, `"80"` or `"8000-8080"`.
pub(crate) fn parse_ports(s: &str) -> std::result::Result<Ports, String> {
    let port = |p: &str| -> std::result::Result<u16, String> {
        let p = p.trim();
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("invalid port {s:?} (expected N or LO-HI)"));
        }
        match p.parse::<u32>() {
            Ok(0) => Err("port 0 is not allowed".into()),
            Ok(n) if n <= 65535 => Ok(n as u16),
            _ => Err(format!("port {p} out of range (1-65535)")),
        }
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => {
            let p = port(s)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(format!("inverted range {lo}-{hi}"));
    }
    Ok(Ports { lo, hi })
}
