//! The typed event every source (kernel ring buffer, fanotify, the agent itself) produces.
use std::net::IpAddr;

use agent_common as abi;
use serde::{Deserialize, Serialize};

use crate::containers::meta::ContainerMeta;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Exec,
    Open,
    Connect,
    /// A policed workload leaving what its policy relies on (`access`: `userns`, `mountns`,
    /// `chroot`, `ia32-syscall`).
    Escape,
    /// Policy applied / rejected / deleted / mode changed.
    Policy,
    /// Agent lifecycle, audit records, gaps.
    Agent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Allowed by the rules (exec audit events, agent/policy events).
    Allowed,
    /// Not allowed by the rules; allowed because the policy is in monitor mode.
    Violation,
    /// Not allowed and denied (enforce).
    Denied,
    /// Learn-mode observation.
    Learned,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Learn,
    Monitor,
    Enforce,
}

/// Which component saw the operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// BPF-LSM hooks (tier 1).
    Lsm,
    /// cgroup sock_addr hooks (tier 2 egress).
    CgroupSock,
    /// fanotify permission events (tier 2 exec/open).
    Fanotify,
    /// sched_process_exec tracepoint (exec audit, tier-2 backstop).
    ExecTrace,
    Agent,
}

/// One event. `seq` is assigned by the pipeline (node-wide, strictly increasing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    /// Wall-clock time, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    pub kind: Kind,
    pub verdict: Verdict,
    pub mode: Option<Mode>,
    pub source: Source,
    pub pid: u32,
    pub tgid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    /// Container metadata, when the cgroup belongs to a known container.
    pub container: Option<ContainerMeta>,
    pub policy: Option<String>,
    /// exec / open: path as seen by the process (inside the container's root).
    pub path: Option<String>,
    /// open: "read", "write", "read,write"; exec: "exec".
    pub access: Option<String>,
    /// connect: destination.
    pub addr: Option<IpAddr>,
    pub port: Option<u16>,
    /// connect: "tcp" / "udp".
    pub protocol: Option<String>,
    /// Fileless exec (memfd, deleted file), truncated path, lookup error, killed by backstop…
    pub flags: Vec<String>,
    /// Free text for policy/agent events (and gap records).
    pub message: Option<String>,
}

impl Event {
    /// An agent/policy event with a message.
    pub fn agent(kind: Kind, verdict: Verdict, message: impl Into<String>) -> Self {
        Event {
            seq: 0,
            time_ns: now_ns(),
            kind,
            verdict,
            mode: None,
            source: Source::Agent,
            pid: std::process::id(),
            tgid: std::process::id(),
            comm: "palisade".into(),
            cgroup_id: 0,
            container: None,
            policy: None,
            path: None,
            access: None,
            addr: None,
            port: None,
            protocol: None,
            flags: Vec::new(),
            message: Some(message.into()),
        }
    }
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub fn mode_from_abi(m: u8) -> Option<Mode> {
    match m {
        abi::MODE_LEARN => Some(Mode::Learn),
        abi::MODE_MONITOR => Some(Mode::Monitor),
        abi::MODE_ENFORCE => Some(Mode::Enforce),
        _ => None,
    }
}

pub fn verdict_from_abi(v: u8) -> Verdict {
    match v {
        abi::VERDICT_VIOLATION => Verdict::Violation,
        abi::VERDICT_DENIED => Verdict::Denied,
        abi::VERDICT_LEARNED => Verdict::Learned,
        _ => Verdict::Allowed,
    }
}

/// The operation of an escape event (`Event::access` of the kernel record).
pub fn escape_op(op: u8) -> &'static str {
    match op {
        abi::NS_OP_USERNS => "userns",
        abi::NS_OP_MOUNTNS => "mountns",
        abi::NS_OP_CHROOT => "chroot",
        abi::NS_OP_IA32 => "ia32-syscall",
        abi::NS_OP_RAW_SOCKET => "raw-socket",
        abi::NS_OP_PACKET_SOCKET => "packet-socket",
        abi::NS_OP_PING_SOCKET => "ping-socket",
        abi::NS_OP_OPEN_RACE => "open-flags-race",
        _ => "unknown",
    }
}

pub fn access_string(bits: u8) -> String {
    let mut parts = Vec::new();
    if bits & abi::ACC_EXEC != 0 {
        parts.push("exec");
    }
    if bits & abi::ACC_READ != 0 {
        parts.push("read");
    }
    if bits & abi::ACC_WRITE != 0 {
        parts.push("write");
    }
    parts.join(",")
}

pub fn flag_strings(flags: u16) -> Vec<String> {
    let names = [
        (abi::EV_FILELESS, "fileless"),
        (abi::EV_TRUNCATED, "truncated"),
        (abi::EV_LOOKUP_ERROR, "lookup-error"),
        (abi::EV_KILLED, "killed"),
        (abi::EV_SENDMSG, "sendmsg"),
        (abi::EV_FILENAME_AS_PASSED, "filename-as-passed"),
        (abi::EV_RACE, "race"),
    ];
    names
        .iter()
        .filter(|(b, _)| flags & b != 0)
        .map(|(_, n)| n.to_string())
        .collect()
}
