//! Emitting a learned profile as a `ContainerPolicy` document, with a comment per rule saying
//! what it covers, when it was last seen and why it has its shape.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use agent_common::{ACC_READ, ACC_WRITE, PROTO_TCP, PROTO_UDP};
use ipnet::IpNet;

use super::LearnError;
use super::generalize::{Cover, GenConfig, Generalized, generalize};
use super::store::{Observation, Profile, Seen};
use crate::policy::{
    self, Access, Action, EgressRule, ExecRule, ExecSpec, FileRule, Mode, NetworkSpec, Policy,
    Ports, Protocol,
};

/// An exported policy: the model and the commented YAML text (which parses back to it).
#[derive(Clone, Debug)]
pub struct Exported {
    pub policy: Policy,
    pub yaml: String,
}

/// Why observations did not become rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Dropped {
    /// Already allowed by the learning policy's own rules.
    allowed: usize,
    /// Denied by an explicit `deny` rule of the learning policy: kept denied.
    denied: Vec<Observation>,
    /// The learning policy does not police that section.
    unpoliced: usize,
}

/// Export the profiles of `base` (the applied learning policy; its name, selector and rules
/// are kept) as a policy in `mode`.
pub fn export(
    profiles: &[&Profile],
    base: &Policy,
    mode: Mode,
    cfg: &GenConfig,
) -> Result<Exported, LearnError> {
    let compiled = policy::compile(base).map_err(|e| LearnError::Policy(e.to_string()))?;
    let mut obs: BTreeMap<Observation, Seen> = BTreeMap::new();
    for p in profiles {
        for (o, s) in &p.observations {
            let e = obs.entry(o.clone()).or_insert(Seen {
                count: 0,
                first_ns: s.first_ns,
                last_ns: 0,
            });
            e.count += s.count;
            e.first_ns = e.first_ns.min(s.first_ns);
            e.last_ns = e.last_ns.max(s.last_ns);
        }
    }
    let mut dropped = Dropped::default();
    obs.retain(|o, _| keep(o, base, &compiled, &mut dropped));
    let g = generalize(&obs, cfg);
    let pol = build(base, mode, &g);
    let yaml = render(profiles, base, &pol, &g, &dropped);
    let parsed =
        policy::parse_str(&yaml, "learned.yaml").map_err(|e| LearnError::Policy(e.to_string()))?;
    match parsed.into_iter().next() {
        Some(p) if p.to_yaml() == pol.to_yaml() => Ok(Exported { policy: p, yaml }),
        _ => Err(LearnError::Policy(
            "exported text does not read back to the exported policy".into(),
        )),
    }
}

/// Whether an observation still needs a learned rule.
fn keep(o: &Observation, base: &Policy, c: &policy::CompiledPolicy, d: &mut Dropped) -> bool {
    match o {
        Observation::Exec { path, fileless } => {
            let Some(e) = &base.exec else {
                d.unpoliced += 1;
                return false;
            };
            let allowed = if *fileless {
                e.allow_fileless
            } else {
                c.check_exec(path.as_bytes()).allowed
            };
            if allowed {
                d.allowed += 1;
            }
            !allowed
        }
        Observation::Open { path, access } => {
            let Some(files) = &base.files else {
                d.unpoliced += 1;
                return false;
            };
            let r = c.check_file(path.as_bytes(), *access);
            if r.allowed {
                d.allowed += 1;
                return false;
            }
            // An explicit deny of the operator is never overridden by a learned allow.
            let explicit = r
                .rule
                .and_then(|i| files.get(i as usize))
                .is_some_and(|f| f.action == Action::Deny);
            if explicit {
                d.denied.push(o.clone());
            }
            !explicit
        }
        Observation::Connect {
            addr,
            port,
            protocol,
        } => {
            if base.network.is_none() {
                d.unpoliced += 1;
                return false;
            }
            let allowed = c.check_connect(*addr, *port, *protocol).allowed;
            if allowed {
                d.allowed += 1;
            }
            !allowed
        }
    }
}

fn access_of(bits: u8) -> Access {
    match (bits & ACC_READ != 0, bits & ACC_WRITE != 0) {
        (true, true) => Access::Any,
        (false, true) => Access::Write,
        _ => Access::Read,
    }
}

fn protocol_of(p: u8) -> Protocol {
    match p {
        PROTO_TCP => Protocol::Tcp,
        PROTO_UDP => Protocol::Udp,
        _ => Protocol::Any,
    }
}

/// The policy model: the base's sections (and rules) with the learned rules appended.
fn build(base: &Policy, mode: Mode, g: &Generalized) -> Policy {
    let exec = base.exec.as_ref().map(|e| {
        let mut allow = e.allow.clone();
        allow.extend(g.exec.iter().map(|r| ExecRule {
            path: r.path.clone(),
            pos: Default::default(),
        }));
        ExecSpec {
            allow,
            allow_fileless: e.allow_fileless || g.fileless.is_some(),
            allow_namespaces: e.allow_namespaces,
        }
    });
    let files = base.files.as_ref().map(|f| {
        let mut v = f.clone();
        v.extend(g.files.iter().map(|r| FileRule {
            path: r.path.clone(),
            access: access_of(r.bits),
            action: Action::Allow,
            pos: Default::default(),
        }));
        v
    });
    let network = base.network.as_ref().map(|n| {
        let mut egress = n.egress.clone();
        egress.extend(g.egress.iter().map(|r| EgressRule {
            cidr: IpNet::from(r.addr),
            ports: Some(r.ports.iter().map(|&(lo, hi)| Ports { lo, hi }).collect()),
            protocol: protocol_of(r.protocol),
            pos: Default::default(),
        }));
        NetworkSpec {
            egress,
            allow_raw_sockets: n.allow_raw_sockets,
        }
    });
    Policy {
        name: base.name.clone(),
        mode,
        selector: base.selector.clone(),
        exec,
        files,
        network,
        source: Default::default(),
        name_pos: Default::default(),
    }
}

/// RFC 3339 UTC, seconds.
pub fn time(ns: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

/// A YAML string scalar: JSON strings are valid YAML double-quoted scalars.
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Comment text on one line.
fn c(s: &str) -> String {
    s.chars()
        .map(|ch| if ch.is_control() { '?' } else { ch })
        .collect()
}

fn cover_note(cv: &Cover, why: &str) -> String {
    c(&format!(
        "{} observation{} ({} sighting{}), last seen {}: {why}",
        cv.observations,
        if cv.observations == 1 { "" } else { "s" },
        cv.sightings,
        if cv.sightings == 1 { "" } else { "s" },
        time(cv.last_ns)
    ))
}

fn ports_text(ports: &[Ports]) -> String {
    let v: Vec<String> = ports
        .iter()
        .map(|p| {
            if p.lo == p.hi {
                p.lo.to_string()
            } else {
                format!("\"{}-{}\"", p.lo, p.hi)
            }
        })
        .collect();
    format!("[{}]", v.join(", "))
}

fn egress_line(r: &EgressRule) -> String {
    let ports = r
        .ports
        .as_ref()
        .map(|p| format!(", ports: {}", ports_text(p)))
        .unwrap_or_default();
    let proto = match r.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Any => "any",
    };
    format!(
        "- {{cidr: {}{ports}, protocol: {proto}}}",
        q(&r.cidr.to_string())
    )
}

fn file_line(r: &FileRule) -> String {
    let access = match r.access {
        Access::Read => "read",
        Access::Write => "write",
        Access::Any => "any",
    };
    let action = match r.action {
        Action::Allow => "allow",
        Action::Deny => "deny",
    };
    format!(
        "- {{path: {}, access: {access}, action: {action}}}",
        q(&r.path)
    )
}

fn render(
    profiles: &[&Profile],
    base: &Policy,
    pol: &Policy,
    g: &Generalized,
    d: &Dropped,
) -> String {
    let mut o = String::new();
    let images: Vec<&str> = profiles.iter().map(|p| p.key.image.as_str()).collect();
    let containers: std::collections::BTreeSet<&str> = profiles
        .iter()
        .flat_map(|p| p.containers.iter().map(String::as_str))
        .collect();
    let distinct: usize = profiles.iter().map(|p| p.observations.len()).sum();
    let evicted: u64 = profiles.iter().map(|p| p.evicted).sum();
    let last_new = profiles.iter().map(|p| p.last_new_ns).max().unwrap_or(0);
    let _ = writeln!(o, "# Learned by palisade from policy {:?}", base.name);
    let _ = writeln!(o, "# images: {}", c(&images.join(", ")));
    let names: Vec<&str> = containers.into_iter().collect();
    let _ = writeln!(o, "# containers: {}", c(&names.join(", ")));
    let _ = writeln!(
        o,
        "# {distinct} distinct observations ({evicted} evicted from a full profile), last new one {}",
        time(last_new)
    );
    if d.allowed > 0 {
        let _ = writeln!(
            o,
            "# {} already allowed by the policy's own rules",
            d.allowed
        );
    }
    if d.unpoliced > 0 {
        let _ = writeln!(
            o,
            "# {} in sections the policy does not police",
            d.unpoliced
        );
    }
    for x in &d.denied {
        let _ = writeln!(
            o,
            "# kept denied by the policy's deny rules: {}",
            c(&x.describe())
        );
    }
    for (x, why) in &g.skipped {
        let _ = writeln!(o, "# not expressible: {} ({})", c(&x.describe()), c(why));
    }
    let _ = writeln!(o, "apiVersion: {}", policy::API_VERSION);
    let _ = writeln!(o, "kind: {}", policy::KIND);
    let _ = writeln!(o, "metadata:\n  name: {}", q(&pol.name));
    let _ = writeln!(o, "spec:\n  mode: {}", pol.mode);
    let sel = serde_json::to_string(&pol.selector).unwrap_or_else(|_| "{}".into());
    let _ = writeln!(o, "  selector: {sel}");
    if let Some(e) = &pol.exec {
        let _ = writeln!(o, "  exec:");
        if let Some(cv) = &g.fileless {
            let _ = writeln!(o, "    # {}", cover_note(cv, "fileless programs ran"));
        }
        let _ = writeln!(o, "    allowFileless: {}", e.allow_fileless);
        if e.allow_namespaces {
            let _ = writeln!(o, "    allowNamespaces: true");
        }
        let nbase = base.exec.as_ref().map_or(0, |b| b.allow.len());
        if e.allow.is_empty() {
            let _ = writeln!(o, "    allow: []");
        } else {
            let _ = writeln!(o, "    allow:");
        }
        for (i, r) in e.allow.iter().enumerate() {
            let note = match i.checked_sub(nbase) {
                None => "rule of the learning policy".to_string(),
                Some(j) => cover_note(&g.exec[j].cover, &g.exec[j].why),
            };
            let _ = writeln!(o, "      # {}\n      - {}", c(&note), q(&r.path));
        }
    }
    if let Some(files) = &pol.files {
        let nbase = base.files.as_ref().map_or(0, Vec::len);
        let _ = writeln!(o, "  files:{}", if files.is_empty() { " []" } else { "" });
        for (i, r) in files.iter().enumerate() {
            let note = match i.checked_sub(nbase) {
                None => "rule of the learning policy".to_string(),
                Some(j) => cover_note(&g.files[j].cover, &g.files[j].why),
            };
            let _ = writeln!(o, "    # {}\n    {}", c(&note), file_line(r));
        }
    }
    if let Some(n) = &pol.network {
        let nbase = base.network.as_ref().map_or(0, |b| b.egress.len());
        let empty = if n.egress.is_empty() { " []" } else { "" };
        let _ = writeln!(o, "  network:");
        if n.allow_raw_sockets {
            let _ = writeln!(o, "    allowRawSockets: true");
        }
        let _ = writeln!(o, "    egress:{empty}");
        for (i, r) in n.egress.iter().enumerate() {
            let note = match i.checked_sub(nbase) {
                None => "rule of the learning policy".to_string(),
                Some(j) => cover_note(&g.egress[j].cover, &g.egress[j].why),
            };
            let _ = writeln!(o, "      # {}\n      {}", c(&note), egress_line(r));
        }
    }
    o
}
