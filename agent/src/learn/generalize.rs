//! Deterministic generalisation of observations into policy rules, each with its reason.
//!
//! Rules, in order:
//! 1. `/proc/<pid>/…` (and `/proc/self/…`, `/proc/thread-self/…`): the kernel renders
//!    `/proc/self` as the numbered directory, and pids change on every run, so these collapse
//!    into one `/proc/` directory rule with the union of their accesses (files only).
//! 2. Temporary directories (`/tmp/`, `/var/tmp/`, `/dev/shm/` by default): one directory rule
//!    each (files only; exec from a temporary directory is never generalised this way).
//! 3. Numbered or random names: within one directory, names that differ only in digit runs or
//!    random-looking tokens share a *shape* (`app.1.log` and `app.2.log` are `app.#.log`).
//!    More than `sibling_threshold` names of one shape turn the directory into a directory rule.
//! 4. Any rule another learned directory rule already covers (same or fewer accesses) is
//!    absorbed into it and counted there.
//! 5. Egress: one rule per destination address and protocol with the destination ports seen
//!    (the source port is never recorded, so ephemeral client ports are irrelevant); more than
//!    `max_port_ranges` ranges merge across the smallest gaps.
//!
//! Nothing is ever widened to `/`: an observation that only `/` could express (opening the
//! root directory itself) is skipped and reported.
use std::collections::BTreeMap;
use std::net::IpAddr;

use agent_common::{ACC_EXEC, PATH_MAX};

use super::store::{Observation, Seen};

/// Knobs of the generalisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenConfig {
    /// A directory with more than this many names of one numbered/random shape becomes a
    /// directory rule.
    pub sibling_threshold: usize,
    /// Directories (ending in `/`) whose content is allowed as a whole once anything is seen.
    pub temp_dirs: Vec<String>,
    /// Port ranges per destination and protocol (the kernel holds 16 per prefix, shared by
    /// TCP and UDP).
    pub max_port_ranges: usize,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            sibling_threshold: 5,
            temp_dirs: vec!["/tmp/".into(), "/var/tmp/".into(), "/dev/shm/".into()],
            max_port_ranges: 8,
        }
    }
}

/// What a rule stands for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cover {
    /// Distinct observations.
    pub observations: usize,
    pub sightings: u64,
    pub last_ns: u64,
}

impl Cover {
    fn add_seen(&mut self, s: &Seen) {
        self.observations += 1;
        self.sightings += s.count;
        self.last_ns = self.last_ns.max(s.last_ns);
    }

    fn merge(&mut self, o: &Cover) {
        self.observations += o.observations;
        self.sightings += o.sightings;
        self.last_ns = self.last_ns.max(o.last_ns);
    }
}

/// A path rule: exact file, or directory when `path` ends in `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathRule {
    pub path: String,
    /// `ACC_READ` | `ACC_WRITE` for files, `ACC_EXEC` for exec.
    pub bits: u8,
    pub cover: Cover,
    pub why: String,
}

/// An egress rule for one destination address and protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetRule {
    pub addr: IpAddr,
    pub protocol: u8,
    /// Inclusive, sorted, disjoint.
    pub ports: Vec<(u16, u16)>,
    pub cover: Cover,
    pub why: String,
}

/// The generalised profile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Generalized {
    pub exec: Vec<PathRule>,
    pub files: Vec<PathRule>,
    pub egress: Vec<NetRule>,
    /// Fileless programs ran (memfd, deleted files).
    pub fileless: Option<Cover>,
    /// Observations no rule can express, with the reason.
    pub skipped: Vec<(Observation, String)>,
}

/// Generalise observations. The result depends only on the set of observations and their
/// counts, never on the order they arrive in.
pub fn generalize<'a>(
    obs: impl IntoIterator<Item = (&'a Observation, &'a Seen)>,
    cfg: &GenConfig,
) -> Generalized {
    // Sorted input: every later step iterates BTreeMaps, so the output is deterministic.
    let sorted: BTreeMap<&Observation, &Seen> = obs.into_iter().collect();
    let mut g = Generalized::default();
    let mut exec = Vec::new();
    let mut files = Vec::new();
    let mut net: BTreeMap<(IpAddr, u8), BTreeMap<u16, Seen>> = BTreeMap::new();
    for (o, s) in sorted {
        match o {
            Observation::Exec { fileless: true, .. } => {
                g.fileless.get_or_insert_with(Cover::default).add_seen(s);
            }
            Observation::Exec { path, .. } => exec.push((o, path.as_str(), ACC_EXEC, *s)),
            Observation::Open { path, access } => files.push((o, path.as_str(), *access, *s)),
            Observation::Connect { port: 0, .. } => {
                g.skipped
                    .push((o.clone(), "port 0 cannot be allowed".into()));
            }
            Observation::Connect {
                addr,
                port,
                protocol,
            } => {
                net.entry((*addr, *protocol)).or_default().insert(*port, *s);
            }
        }
    }
    g.exec = paths(exec, cfg, false, &mut g.skipped);
    g.files = paths(files, cfg, true, &mut g.skipped);
    g.egress = net
        .into_iter()
        .map(|((addr, protocol), ports)| net_rule(addr, protocol, ports, cfg))
        .collect();
    g
}

type Item<'a> = (&'a Observation, &'a str, u8, Seen);

/// Accumulated accesses and coverage of a set of observations.
#[derive(Clone, Copy, Debug, Default)]
struct Acc {
    bits: u8,
    cover: Cover,
}

impl Acc {
    fn add(&mut self, bits: u8, s: &Seen) {
        self.bits |= bits;
        self.cover.add_seen(s);
    }
    fn merge(&mut self, o: &Acc) {
        self.bits |= o.bits;
        self.cover.merge(&o.cover);
    }
}

#[derive(Default)]
struct Node {
    leaf: Option<Acc>,
    children: BTreeMap<String, Node>,
}

impl Node {
    fn subtree(&self) -> Acc {
        let mut a = self.leaf.unwrap_or_default();
        for c in self.children.values() {
            a.merge(&c.subtree());
        }
        a
    }
}

fn paths(
    items: Vec<Item<'_>>,
    cfg: &GenConfig,
    files: bool,
    skipped: &mut Vec<(Observation, String)>,
) -> Vec<PathRule> {
    // Forced directory rules (proc, temp dirs), keyed by path.
    let mut forced: BTreeMap<String, (Acc, String)> = BTreeMap::new();
    let mut root = Node::default();
    for (o, path, bits, s) in items {
        if let Err(why) = valid_rule_path(path) {
            skipped.push((o.clone(), why));
            continue;
        }
        if path == "/" {
            skipped.push((
                o.clone(),
                "the root directory itself can only be allowed by `/`, which allows everything"
                    .into(),
            ));
            continue;
        }
        let special = if !files {
            None
        } else if is_proc_pid(path) {
            Some((
                "/proc/".to_string(),
                "per-process /proc entries (pids change on every run)".to_string(),
            ))
        } else {
            cfg.temp_dirs
                .iter()
                .find(|d| path.starts_with(d.as_str()) || path == d.trim_end_matches('/'))
                .filter(|d| d.as_str() != "/" && valid_rule_path(d).is_ok())
                .map(|d| (d.clone(), "temporary directory".to_string()))
        };
        if let Some((dir, why)) = special {
            forced
                .entry(dir)
                .or_insert_with(|| (Acc::default(), why))
                .0
                .add(bits, &s);
            continue;
        }
        let mut n = &mut root;
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            n = n.children.entry(seg.to_string()).or_default();
        }
        n.leaf.get_or_insert_with(Acc::default).add(bits, &s);
    }
    let mut rules: Vec<PathRule> = Vec::new();
    walk(&root, "/", cfg, &mut rules);
    for (path, (acc, why)) in forced {
        rules.push(PathRule {
            path,
            bits: acc.bits,
            cover: acc.cover,
            why,
        });
    }
    absorb(rules)
}

/// Emit rules for the children of `node`, the directory `dir` (ending in `/`).
fn walk(node: &Node, dir: &str, cfg: &GenConfig, out: &mut Vec<PathRule>) {
    let mut shapes: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for name in node.children.keys() {
        if let Some(s) = shape(name) {
            shapes.entry(s).or_default().push(name);
        }
    }
    // Never `/`: names directly under the root stay exact however many there are.
    let collapsing: BTreeMap<&str, &Vec<&str>> = shapes
        .iter()
        .filter(|(_, names)| names.len() > cfg.sibling_threshold && dir != "/")
        .map(|(s, n)| (s.as_str(), n))
        .collect();
    if !collapsing.is_empty() && valid_rule_path(dir).is_ok() {
        let mut acc = Acc::default();
        let mut count = 0;
        for names in collapsing.values() {
            for name in names.iter() {
                acc.merge(&node.children[*name].subtree());
                count += 1;
            }
        }
        let like: Vec<&str> = collapsing.keys().copied().collect();
        out.push(PathRule {
            path: dir.to_string(),
            bits: acc.bits,
            cover: acc.cover,
            why: format!(
                "{count} numbered or random names like {} in {dir} (more than {})",
                like.join(", "),
                cfg.sibling_threshold
            ),
        });
        for (name, child) in &node.children {
            if !collapsing
                .values()
                .any(|names| names.contains(&name.as_str()))
            {
                child_rules(child, dir, name, cfg, out);
            }
        }
        return;
    }
    for (name, child) in &node.children {
        child_rules(child, dir, name, cfg, out);
    }
}

fn child_rules(child: &Node, dir: &str, name: &str, cfg: &GenConfig, out: &mut Vec<PathRule>) {
    let path = format!("{dir}{name}");
    if let Some(a) = child.leaf {
        out.push(PathRule {
            path: path.clone(),
            bits: a.bits,
            cover: a.cover,
            why: "exact".into(),
        });
    }
    if !child.children.is_empty() {
        walk(child, &format!("{path}/"), cfg, out);
    }
}

/// Fold every rule into the most specific learned directory rule that covers its path with at
/// least its accesses (learned rules only allow, so this changes no verdict). Sorted by path.
fn absorb(rules: Vec<PathRule>) -> Vec<PathRule> {
    let mut by_path: BTreeMap<String, PathRule> = BTreeMap::new();
    for r in rules {
        match by_path.get_mut(&r.path) {
            Some(e) => {
                e.bits |= r.bits;
                e.cover.merge(&r.cover);
            }
            None => {
                by_path.insert(r.path.clone(), r);
            }
        }
    }
    // Deepest first, so coverage flows up through nested directory rules.
    let mut order: Vec<String> = by_path.keys().cloned().collect();
    order.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    for p in order {
        let Some(r) = by_path.get(&p) else { continue };
        let (bits, cover) = (r.bits, r.cover);
        let target = by_path
            .iter()
            .filter(|(d, dr)| {
                d.ends_with('/')
                    && d.len() < p.len()
                    && p.starts_with(d.as_str())
                    && bits & !dr.bits == 0
            })
            .map(|(d, _)| d.clone())
            .max_by_key(|d| d.len());
        if let Some(t) = target {
            by_path.remove(&p);
            if let Some(d) = by_path.get_mut(&t) {
                d.cover.merge(&cover);
            }
        }
    }
    by_path.into_values().collect()
}

/// `/proc/<digits>`, `/proc/self`, `/proc/thread-self` and anything below.
fn is_proc_pid(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/proc/") else {
        return false;
    };
    let first = rest.split('/').next().unwrap_or("");
    (!first.is_empty() && first.bytes().all(|b| b.is_ascii_digit()))
        || first == "self"
        || first == "thread-self"
}

/// The shape of a name when it has a numbered or random part (`None`: a plain name).
/// Digit runs become `#`, random-looking alphanumeric tokens `*`.
pub fn shape(name: &str) -> Option<String> {
    let mut out = String::with_capacity(name.len());
    let mut varied = false;
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String, varied: &mut bool| {
        if token.is_empty() {
            return;
        }
        if token.bytes().all(|b| b.is_ascii_digit()) {
            out.push('#');
            *varied = true;
        } else if looks_random(token) {
            out.push('*');
            *varied = true;
        } else {
            out.push_str(token);
        }
        token.clear();
    };
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            token.push(c);
        } else {
            flush(&mut token, &mut out, &mut varied);
            out.push(c);
        }
    }
    flush(&mut token, &mut out, &mut varied);
    varied.then_some(out)
}

/// At least 6 characters mixing letters and digits (`tmpa8Xk2q`, `3f9a0c1d`), or mixing case
/// erratically (`aBcDeFgh`).
fn looks_random(t: &str) -> bool {
    if t.len() < 6 {
        return false;
    }
    let digits = t.bytes().any(|b| b.is_ascii_digit());
    let letters = t.bytes().any(|b| b.is_ascii_alphabetic());
    let switches = t
        .as_bytes()
        .windows(2)
        .filter(|w| {
            w[0].is_ascii_alphabetic()
                && w[1].is_ascii_alphabetic()
                && w[0].is_ascii_uppercase() != w[1].is_ascii_uppercase()
        })
        .count();
    (digits && letters) || switches >= 3
}

/// The rule-path constraints of the policy parser (`docs/policy.md`).
pub fn valid_rule_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("not an absolute path".into());
    }
    if path.contains('\0') || path.contains("//") {
        return Err("not a normalised path".into());
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return Err("path with `.` or `..` segments".into());
    }
    if path.len() + 1 > PATH_MAX {
        return Err(format!(
            "path longer than the kernel key ({} bytes, at most {})",
            path.len(),
            PATH_MAX - 1
        ));
    }
    Ok(())
}

fn net_rule(addr: IpAddr, protocol: u8, ports: BTreeMap<u16, Seen>, cfg: &GenConfig) -> NetRule {
    let mut cover = Cover::default();
    let mut ranges: Vec<(u16, u16)> = Vec::new();
    for (p, s) in &ports {
        cover.add_seen(s);
        match ranges.last_mut() {
            Some(r) if r.1.checked_add(1) == Some(*p) => r.1 = *p,
            _ => ranges.push((*p, *p)),
        }
    }
    let exact = ranges.len();
    let max = cfg.max_port_ranges.max(1);
    while ranges.len() > max {
        // Merge across the smallest gap (first one on ties).
        let i = (0..ranges.len() - 1)
            .min_by_key(|&i| (ranges[i + 1].0 - ranges[i].1, i))
            .unwrap_or(0);
        ranges[i].1 = ranges[i + 1].1;
        ranges.remove(i + 1);
    }
    let why = if ranges.len() < exact {
        format!(
            "{} destination ports in {exact} ranges, merged across the smallest gaps into {} (at most {max})",
            ports.len(),
            ranges.len()
        )
    } else {
        "destination ports seen (source ports are never recorded)".into()
    };
    NetRule {
        addr,
        protocol,
        ports: ranges,
        cover,
        why,
    }
}
