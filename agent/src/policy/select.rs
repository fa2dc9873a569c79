//! Selector matching: which containers a policy applies to.
use crate::containers::meta::ContainerMeta;

use super::model::{LabelOp, PodSelector, Policy, Selector};

/// Glob with `*` (any run, including empty) and `?` (one character).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Classic backtracking on the last `*`: linear in practice, no recursion.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

fn glob_opt(pattern: &Option<String>, value: Option<&str>) -> bool {
    match pattern {
        None => true,
        Some(p) => value.is_some_and(|v| glob_match(p, v)),
    }
}

impl PodSelector {
    pub fn matches(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| {
                let got = labels.get(&e.key);
                match e.operator {
                    LabelOp::In => got.is_some_and(|v| e.values.contains(v)),
                    LabelOp::NotIn => got.is_none_or(|v| !e.values.contains(v)),
                    LabelOp::Exists => got.is_some(),
                    LabelOp::DoesNotExist => got.is_none(),
                }
            })
    }
}

impl Selector {
    /// Every given field must match; an empty selector matches nothing.
    pub fn matches(&self, meta: &ContainerMeta) -> bool {
        if self.is_empty() {
            return false;
        }
        glob_opt(&self.container_name, meta.name.as_deref())
            && glob_opt(&self.image, meta.image.as_deref())
            && self
                .labels
                .as_ref()
                .is_none_or(|want| want.iter().all(|(k, v)| meta.labels.get(k) == Some(v)))
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| meta.pod.as_ref().is_some_and(|p| &p.namespace == ns))
            && self
                .pod_selector
                .as_ref()
                .is_none_or(|s| meta.pod.as_ref().is_some_and(|p| s.matches(&p.labels)))
            && self
                .cgroup_path
                .as_ref()
                .is_none_or(|c| in_subtree(&meta.cgroup_path, c))
    }
}

/// `path` is the cgroup `root` or one below it: a workload that creates a child cgroup (it may,
/// with a delegated or writable cgroupfs) stays under its policy.
fn in_subtree(path: &str, root: &str) -> bool {
    let root = root.trim_end_matches('/');
    path == root || (path.starts_with(root) && path.as_bytes().get(root.len()) == Some(&b'/'))
}

impl Policy {
    /// Whether this policy applies to the container.
    pub fn matches(&self, meta: &ContainerMeta) -> bool {
        self.selector.matches(meta)
    }
}
