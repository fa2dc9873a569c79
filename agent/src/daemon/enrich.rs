//! Kernel event records → typed events, with container metadata and policy names.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use agent_common as abi;

use crate::{
    containers::inventory::Inventory,
    enforce::snapshot::SharedSnapshot,
    events::model::{self as ev, Event, Kind, Source},
};

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn addr_of(k: &abi::Event) -> IpAddr {
    let v6 = Ipv6Addr::from(k.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None if k.family == 2 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        None => IpAddr::V6(v6),
    }
}

/// Decode one kernel record. `None` for records that are not user-facing events.
pub fn enrich(
    k: &abi::Event,
    source_for_net: Source,
    inventory: Option<&Inventory>,
    snapshot: &SharedSnapshot,
) -> Option<Event> {
    let kind = match k.kind {
        abi::KIND_EXEC => Kind::Exec,
        abi::KIND_OPEN => Kind::Open,
        abi::KIND_CONNECT => Kind::Connect,
        abi::KIND_ESCAPE => Kind::Escape,
        abi::KIND_CGROUP_BOUND => Kind::Policy,
        _ => return None,
    };
    let mut e = Event::agent(kind, ev::verdict_from_abi(k.verdict), String::new());
    e.message = None;
    e.time_ns = 0; // the bus stamps wall-clock time
    e.source = match kind {
        Kind::Exec if k.flags & abi::EV_FILENAME_AS_PASSED != 0 => Source::ExecTrace,
        Kind::Connect => source_for_net,
        Kind::Escape if k.flags & abi::EV_KILLED != 0 => Source::ExecTrace,
        Kind::Policy => Source::Agent,
        _ => Source::Lsm,
    };
    e.pid = k.pid;
    e.tgid = k.tgid;
    e.comm = cstr(&k.comm);
    e.cgroup_id = k.cgroup_id;
    e.mode = ev::mode_from_abi(k.mode);
    e.flags = ev::flag_strings(k.flags);
    let snap = snapshot.read().unwrap_or_else(|p| p.into_inner());
    e.policy = snap.policy_names.get(&k.policy_id).cloned();
    drop(snap);
    e.container = inventory.and_then(|i| i.by_cgroup_id(k.cgroup_id));
    let path = String::from_utf8_lossy(k.path_bytes()).into_owned();
    match kind {
        Kind::Exec | Kind::Open => {
            e.path = Some(path);
            e.access = Some(ev::access_string(k.access));
        }
        Kind::Escape => e.access = Some(ev::escape_op(k.access).into()),
        Kind::Connect => {
            e.addr = Some(addr_of(k));
            e.port = Some(k.port);
            e.protocol = Some(
                match k.access {
                    abi::PROTO_TCP => "tcp",
                    abi::PROTO_UDP => "udp",
                    _ => "any",
                }
                .into(),
            );
        }
        _ => {
            e.message = Some(format!("policy bound to new cgroup {path} at creation"));
            e.path = Some(path);
        }
    }
    Some(e)
}
