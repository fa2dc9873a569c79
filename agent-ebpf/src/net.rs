//! Egress decision shared by the LSM hooks (tier 1) and the cgroup sock_addr hooks (tier 2).
use agent_common::{
    EV_TRUNCATED, KIND_CONNECT, NET_KEY_DATA, NET_MAX_PORTS, NetKeyData, POLICE_NET, PROTO_TCP,
    PROTO_UDP, RULESET_BYTES,
};
use aya_ebpf::maps::lpm_trie::Key;

use crate::{
    decide::{self, Report, Subject},
    maps::{NET_RULES, Scratch, scratch},
    path,
};

pub const AF_UNSPEC: u16 = 0;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const AF_PACKET: u16 = 17;
pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;
const SOCK_PACKET: u32 = 10;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_ICMPV6: u32 = 58;

/// Sockets that send past the egress rules (`NS_OP_*`), or `None`. Only IP families: a raw
/// netlink socket (`AF_NETLINK`, `SOCK_RAW`) talks to the kernel, not the network.
#[inline(always)]
pub fn raw_socket_op(family: u16, sock_type: u32, protocol: u32) -> Option<u8> {
    let ty = sock_type & 0xf;
    if family == AF_PACKET {
        return Some(agent_common::NS_OP_PACKET_SOCKET);
    }
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    match ty {
        SOCK_RAW => Some(agent_common::NS_OP_RAW_SOCKET),
        SOCK_PACKET => Some(agent_common::NS_OP_PACKET_SOCKET),
        SOCK_DGRAM if protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6 => {
            Some(agent_common::NS_OP_PING_SOCKET)
        }
        _ => None,
    }
}

/// Protocol bits a socket type needs from a rule: other types need a rule for both.
#[inline(always)]
pub fn proto_bits(sock_type: u32) -> u8 {
    match sock_type & 0xf {
        SOCK_STREAM => PROTO_TCP,
        SOCK_DGRAM => PROTO_UDP,
        _ => PROTO_TCP | PROTO_UDP,
    }
}

/// A destination: IPv6 bytes (IPv4 as `::ffff:a.b.c.d`), host-order port, protocol bits.
pub struct Dest {
    pub family: u16,
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
}

#[inline(always)]
pub fn v4_mapped(be_addr: [u8; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12] = be_addr[0];
    a[13] = be_addr[1];
    a[14] = be_addr[2];
    a[15] = be_addr[3];
    a
}

/// Decide and report one destination; returns `true` to allow. `truncated` = the address could
/// not be read (fails closed).
#[inline(always)]
pub fn decide(sub: &Subject, d: &Dest, flags: u16) -> bool {
    if sub.pol.flags & POLICE_NET == 0 {
        return true;
    }
    let Some(s) = scratch() else {
        return !decide::judge(&sub.pol, false).1;
    };
    let mut r = Report {
        kind: KIND_CONNECT,
        access: d.proto,
        flags,
        rule: u32::MAX,
        port: d.port,
        family: d.family,
        addr: d.addr,
        ..Default::default()
    };
    let allowed = flags & EV_TRUNCATED == 0 && lookup(s, sub.pol.ruleset, d, &mut r);
    // Learn-mode de-duplication keys on ruleset ‖ address (+ port, protocol in the header).
    put_key(s, sub.pol.ruleset, &d.addr);
    decide::conclude(sub, s, r, allowed, NET_KEY_DATA - RULESET_BYTES) == 0
}

#[inline(always)]
fn put_key(s: &mut Scratch, ruleset: u32, addr: &[u8; 16]) {
    path::put_ruleset(s, ruleset);
    let mut i = 0;
    while i < 16 {
        s.data[RULESET_BYTES + i] = addr[i];
        i += 1;
    }
}

#[inline(always)]
fn lookup(s: &mut Scratch, ruleset: u32, d: &Dest, r: &mut Report) -> bool {
    put_key(s, ruleset, &d.addr);
    s.head = (NET_KEY_DATA * 8) as u32;
    // SAFETY: `Scratch` starts with `u32 ‖ [u8; 20..]`, the layout of `Key<[u8; 20]>`.
    let key = unsafe { &*(s as *const Scratch as *const Key<NetKeyData>) };
    let Some(rule) = NET_RULES.get(key) else {
        return false;
    };
    r.rule = rule.rule;
    let count = rule.count as usize;
    let mut i = 0;
    while i < NET_MAX_PORTS {
        if i < count {
            let p = &rule.ports[i];
            if p.lo <= d.port && d.port <= p.hi && p.proto & d.proto == d.proto {
                return true;
            }
        }
        i += 1;
    }
    false
}
