//! Egress trie: IPv6 keys (IPv4 as `::ffff:a.b.c.d`), each node holding the merged port ranges of
//! itself and every covering prefix, and the userspace lookup that mirrors the kernel's.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use agent_common::{
    NET_KEY_DATA, NET_MAX_PORTS, NetKeyData, NetRule, PROTO_TCP, PROTO_UDP, PortRange,
    RULESET_BYTES, ruleset_bytes,
};
use ipnet::IpNet;

/// A key of the egress trie, without the ruleset id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetPattern {
    /// Network address (host bits zero), IPv4 mapped into `::ffff:0:0/96`.
    pub addr: [u8; 16],
    /// Prefix length over the 128-bit address.
    pub bits: u8,
}

impl NetPattern {
    pub fn from_net(net: &IpNet) -> Self {
        let (addr, bits) = match net {
            IpNet::V4(n) => (n.network().to_ipv6_mapped(), 96 + n.prefix_len()),
            IpNet::V6(n) => (n.network(), n.prefix_len()),
        };
        Self {
            addr: addr.octets(),
            bits,
        }
    }

    /// LPM prefix length in bits, ruleset id included.
    pub fn prefix_len(&self) -> u32 {
        (RULESET_BYTES * 8) as u32 + self.bits as u32
    }

    pub fn key_data(&self, ruleset: u32) -> NetKeyData {
        let mut k = [0u8; NET_KEY_DATA];
        k[..RULESET_BYTES].copy_from_slice(&ruleset_bytes(ruleset));
        k[RULESET_BYTES..].copy_from_slice(&self.addr);
        k
    }

    fn contains(&self, addr: u128) -> bool {
        mask(addr, self.bits) == u128::from_be_bytes(self.addr)
    }
}

fn mask(addr: u128, bits: u8) -> u128 {
    match bits {
        0 => 0,
        b => addr & (u128::MAX << (128 - b as u32)),
    }
}

/// The 128-bit key address of `addr` (IPv4 and IPv4-mapped IPv6 both become mapped).
pub fn key_addr(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from_be_bytes(a.to_ipv6_mapped().octets()),
        IpAddr::V6(a) => u128::from_be_bytes(a.octets()),
    }
}

/// A source rule as the egress compiler sees it.
#[derive(Clone, Debug)]
pub(crate) struct SrcNet {
    pub net: IpNet,
    /// Inclusive ranges; every port when the rule names none.
    pub ports: Vec<(u16, u16)>,
    /// `PROTO_*` bits.
    pub proto: u8,
}

/// A node whose merged port list exceeds `NET_MAX_PORTS`: the index of the first source rule
/// at that node, and how many ranges it would need.
#[derive(Debug)]
pub(crate) struct TooManyPorts {
    pub rule: u32,
    pub count: usize,
}

/// Sorted, coalesced (overlapping or adjacent ranges joined).
fn coalesce(mut v: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    v.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(v.len());
    for (lo, hi) in v {
        match out.last_mut() {
            Some(last) if lo as u32 <= last.1 as u32 + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// Per protocol coalesced ranges; ranges identical for TCP and UDP share one entry.
fn merge_ports(rules: &[&SrcNet]) -> Vec<PortRange> {
    let per = |bit: u8| {
        coalesce(
            rules
                .iter()
                .filter(|r| r.proto & bit != 0)
                .flat_map(|r| r.ports.iter().copied())
                .collect(),
        )
    };
    let (tcp, udp) = (per(PROTO_TCP), per(PROTO_UDP));
    let mut out: BTreeMap<(u16, u16), u8> = BTreeMap::new();
    for r in tcp {
        *out.entry(r).or_default() |= PROTO_TCP;
    }
    for r in udp {
        *out.entry(r).or_default() |= PROTO_UDP;
    }
    out.into_iter()
        .map(|((lo, hi), proto)| PortRange {
            lo,
            hi,
            proto,
            ..Default::default()
        })
        .collect()
}

#[derive(Clone, Debug, Default)]
pub struct NetTable {
    entries: Vec<(NetPattern, NetRule)>,
    index: HashMap<(u128, u8), usize>,
    /// Distinct prefix lengths, longest first.
    lens: Vec<u8>,
}

impl NetTable {
    pub(crate) fn build(rules: &[SrcNet]) -> Result<Self, TooManyPorts> {
        let pats: Vec<NetPattern> = rules.iter().map(|r| NetPattern::from_net(&r.net)).collect();
        let mut nodes: BTreeMap<NetPattern, NetRule> = BTreeMap::new();
        for (i, p) in pats.iter().enumerate() {
            if nodes.contains_key(p) {
                continue;
            }
            let addr = u128::from_be_bytes(p.addr);
            // Rules at this prefix or a covering one: exactly those matching any address
            // whose longest match is this node.
            let covering: Vec<&SrcNet> = rules
                .iter()
                .zip(&pats)
                .filter(|(_, q)| q.bits <= p.bits && q.contains(addr))
                .map(|(r, _)| r)
                .collect();
            let ranges = merge_ports(&covering);
            if ranges.len() > NET_MAX_PORTS {
                return Err(TooManyPorts {
                    rule: i as u32,
                    count: ranges.len(),
                });
            }
            let mut rule = NetRule {
                count: ranges.len() as u32,
                rule: i as u32,
                ..Default::default()
            };
            rule.ports[..ranges.len()].copy_from_slice(&ranges);
            nodes.insert(*p, rule);
        }
        let entries: Vec<(NetPattern, NetRule)> = nodes.into_iter().collect();
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, (p, _))| ((u128::from_be_bytes(p.addr), p.bits), i))
            .collect();
        let mut lens: Vec<u8> = entries.iter().map(|(p, _)| p.bits).collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        lens.dedup();
        Ok(Self {
            entries,
            index,
            lens,
        })
    }

    /// Every entry, sorted by (address, prefix length).
    pub fn entries(&self) -> &[(NetPattern, NetRule)] {
        &self.entries
    }

    /// Entries rendered for `ruleset`: (prefix_len, key data, value).
    pub fn keys(&self, ruleset: u32) -> Vec<(u32, NetKeyData, NetRule)> {
        self.entries
            .iter()
            .map(|(p, r)| (p.prefix_len(), p.key_data(ruleset), *r))
            .collect()
    }

    /// The kernel's lookup: the longest prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&NetRule> {
        let a = key_addr(addr);
        self.lens
            .iter()
            .find_map(|&b| self.index.get(&(mask(a, b), b)))
            .map(|&i| &self.entries[i].1)
    }
}

/// The kernel's port check on a trie value.
pub fn ports_allow(rule: &NetRule, port: u16, proto: u8) -> bool {
    let n = (rule.count as usize).min(NET_MAX_PORTS);
    rule.ports[..n]
        .iter()
        .any(|r| r.lo <= port && port <= r.hi && r.proto & proto != 0)
}
