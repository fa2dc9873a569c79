//! Path tries (exec and files): keys, inheritance materialised into each node, and the
//! userspace lookup that mirrors the kernel's LPM trie.
use std::collections::{BTreeMap, HashMap};

use agent_common::{PATH_KEY_DATA, PATH_MAX, PathKeyData, PathRule, RULESET_BYTES, ruleset_bytes};

/// A key of a path trie, without the ruleset id: path bytes, plus a NUL for exact entries.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathPattern(Vec<u8>);

impl PathPattern {
    /// `path` must fit the key (`check_path` guarantees it for rule paths).
    fn exact(path: &[u8]) -> Self {
        let mut v = path.to_vec();
        v.push(0);
        Self(v)
    }

    fn prefix(dir: &[u8]) -> Self {
        Self(dir.to_vec())
    }

    /// The key bytes after the ruleset id (path, and its NUL for exact entries).
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Exact entries end in NUL; the others match every path they are a prefix of.
    pub fn is_exact(&self) -> bool {
        self.0.last() == Some(&0)
    }

    /// LPM prefix length in bits, ruleset id included.
    pub fn prefix_len(&self) -> u32 {
        ((RULESET_BYTES + self.0.len()) * 8) as u32
    }

    /// Key data for `ruleset`: ruleset id ‖ bytes ‖ zero padding.
    pub fn key_data(&self, ruleset: u32) -> PathKeyData {
        let mut k = [0u8; PATH_KEY_DATA];
        k[..RULESET_BYTES].copy_from_slice(&ruleset_bytes(ruleset));
        k[RULESET_BYTES..RULESET_BYTES + self.0.len()].copy_from_slice(&self.0);
        k
    }
}

/// A source rule as the path compiler sees it.
#[derive(Clone, Debug)]
pub(crate) struct SrcPath<'a> {
    pub path: &'a str,
    /// `ACC_*` bits the rule speaks about.
    pub bits: u8,
    pub allow: bool,
}

/// The entries a rule contributes: `/etc/` gives the prefix `/etc/` and the exact `/etc`, so the
/// directory itself matches too; `/` needs no companion (every lookup has it as prefix).
fn rule_patterns(path: &str) -> Vec<PathPattern> {
    let b = path.as_bytes();
    match b.strip_suffix(b"/") {
        Some(dir) if !dir.is_empty() => vec![PathPattern::prefix(b), PathPattern::exact(dir)],
        Some(_) => vec![PathPattern::prefix(b)],
        None => vec![PathPattern::exact(b)],
    }
}

/// Specificity of a rule for a matched entry: longer wins, then an exact rule over the
/// directory rule naming the same directory, then deny over allow, then the earlier rule.
type Rank = (usize, bool, bool, std::cmp::Reverse<u32>);

/// One compiled trie.
#[derive(Clone, Debug, Default)]
pub struct PathTable {
    entries: Vec<(PathPattern, PathRule)>,
    index: HashMap<Vec<u8>, PathRule>,
    /// Distinct pattern lengths, longest first (the userspace lookup probes these).
    lens: Vec<usize>,
}

impl PathTable {
    pub(crate) fn build(rules: &[SrcPath<'_>]) -> Self {
        // Which rules own each pattern, so a node finds its matching rules by probing its own
        // prefixes (at most PATH_MAX probes) instead of scanning every rule.
        let mut owners: HashMap<&[u8], Vec<usize>> = HashMap::new();
        let pats: Vec<Vec<PathPattern>> = rules.iter().map(|r| rule_patterns(r.path)).collect();
        for (i, rp) in pats.iter().enumerate() {
            for q in rp {
                owners.entry(q.0.as_slice()).or_default().push(i);
            }
        }
        let mut nodes: BTreeMap<PathPattern, PathRule> = BTreeMap::new();
        for p in pats.iter().flatten() {
            if nodes.contains_key(p) {
                continue;
            }
            // Per access bit, the best rule speaking about that bit among the rules with an
            // entry that is a prefix of this one (= the rules matching any path landing here).
            let mut best_bit: [Option<(Rank, bool)>; 8] = [None; 8];
            let mut best: Option<(Rank, u32)> = None;
            for len in 1..=p.0.len() {
                for &i in owners.get(&p.0[..len]).into_iter().flatten() {
                    let r = &rules[i];
                    let rank: Rank = (
                        len,
                        !r.path.ends_with('/'),
                        !r.allow,
                        std::cmp::Reverse(i as u32),
                    );
                    for (bit, slot) in best_bit.iter_mut().enumerate() {
                        if r.bits & (1 << bit) != 0 && slot.is_none_or(|(k, _)| rank > k) {
                            *slot = Some((rank, r.allow));
                        }
                    }
                    if best.is_none_or(|(k, _)| rank > k) {
                        best = Some((rank, i as u32));
                    }
                }
            }
            let allow = best_bit
                .iter()
                .enumerate()
                .filter(|(_, s)| matches!(s, Some((_, true))))
                .fold(0u8, |acc, (bit, _)| acc | (1 << bit));
            let rule = PathRule {
                allow,
                rule: best.map_or(u32::MAX, |(_, i)| i),
                ..Default::default()
            };
            nodes.insert(p.clone(), rule);
        }
        let mut lens: Vec<usize> = nodes.keys().map(|p| p.0.len()).collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        lens.dedup();
        let index = nodes.iter().map(|(p, r)| (p.0.clone(), *r)).collect();
        Self {
            entries: nodes.into_iter().collect(),
            index,
            lens,
        }
    }

    /// Every entry, sorted by key bytes.
    pub fn entries(&self) -> &[(PathPattern, PathRule)] {
        &self.entries
    }

    /// Entries rendered for `ruleset`: (prefix_len, key data, value).
    pub fn keys(&self, ruleset: u32) -> Vec<(u32, PathKeyData, PathRule)> {
        self.entries
            .iter()
            .map(|(p, r)| (p.prefix_len(), p.key_data(ruleset), *r))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The kernel's lookup: the longest entry that is a prefix of `path ‖ NUL`. `None` when no
    /// entry matches or the path cannot be a key (too long, or with a NUL inside).
    pub fn lookup(&self, path: &[u8]) -> Option<PathRule> {
        if path.len() + 1 > PATH_MAX || path.contains(&0) {
            return None;
        }
        let mut key = Vec::with_capacity(path.len() + 1);
        key.extend_from_slice(path);
        key.push(0);
        self.lens
            .iter()
            .filter(|&&l| l <= key.len())
            .find_map(|&l| self.index.get(&key[..l]).copied())
    }
}
