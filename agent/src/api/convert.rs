//! Conversions between the internal model and the generated protobuf types (both directions:
//! the server encodes, the CLI decodes to print the same shapes as JSON).
use std::net::IpAddr;

use thiserror::Error;

use super::{ContainerInfo, PolicyErrorInfo, PolicyInfo, StatusInfo, pb};
use crate::containers::meta::{ContainerMeta, PodMeta, Runtime};
use crate::events::bus::{Filter, Gap, GapReason, Record};
use crate::events::model::{Event, Kind, Mode, Source, Verdict};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("unknown {what} value {value}")]
    UnknownEnum { what: &'static str, value: i32 },
    #[error("invalid {what}: {value:?}")]
    Invalid { what: &'static str, value: String },
}

pub fn kind_to_pb(k: Kind) -> pb::Kind {
    match k {
        Kind::Exec => pb::Kind::Exec,
        Kind::Open => pb::Kind::Open,
        Kind::Connect => pb::Kind::Connect,
        Kind::Escape => pb::Kind::Escape,
        Kind::Policy => pb::Kind::Policy,
        Kind::Agent => pb::Kind::Agent,
    }
}

pub fn kind_from_pb(v: i32) -> Result<Kind, ConvertError> {
    Ok(match pb::Kind::try_from(v) {
        Ok(pb::Kind::Exec) => Kind::Exec,
        Ok(pb::Kind::Open) => Kind::Open,
        Ok(pb::Kind::Connect) => Kind::Connect,
        Ok(pb::Kind::Escape) => Kind::Escape,
        Ok(pb::Kind::Policy) => Kind::Policy,
        Ok(pb::Kind::Agent) => Kind::Agent,
        _ => {
            return Err(ConvertError::UnknownEnum {
                what: "kind",
                value: v,
            });
        }
    })
}

pub fn verdict_to_pb(v: Verdict) -> pb::Verdict {
    match v {
        Verdict::Allowed => pb::Verdict::Allowed,
        Verdict::Violation => pb::Verdict::Violation,
        Verdict::Denied => pb::Verdict::Denied,
        Verdict::Learned => pb::Verdict::Learned,
    }
}

pub fn verdict_from_pb(v: i32) -> Result<Verdict, ConvertError> {
    Ok(match pb::Verdict::try_from(v) {
        Ok(pb::Verdict::Allowed) => Verdict::Allowed,
        Ok(pb::Verdict::Violation) => Verdict::Violation,
        Ok(pb::Verdict::Denied) => Verdict::Denied,
        Ok(pb::Verdict::Learned) => Verdict::Learned,
        _ => {
            return Err(ConvertError::UnknownEnum {
                what: "verdict",
                value: v,
            });
        }
    })
}

pub fn mode_to_pb(m: Option<Mode>) -> pb::Mode {
    match m {
        None => pb::Mode::Unspecified,
        Some(Mode::Learn) => pb::Mode::Learn,
        Some(Mode::Monitor) => pb::Mode::Monitor,
        Some(Mode::Enforce) => pb::Mode::Enforce,
    }
}

/// `MODE_UNSPECIFIED` is `None`.
pub fn mode_from_pb(v: i32) -> Result<Option<Mode>, ConvertError> {
    Ok(match pb::Mode::try_from(v) {
        Ok(pb::Mode::Unspecified) => None,
        Ok(pb::Mode::Learn) => Some(Mode::Learn),
        Ok(pb::Mode::Monitor) => Some(Mode::Monitor),
        Ok(pb::Mode::Enforce) => Some(Mode::Enforce),
        Err(_) => {
            return Err(ConvertError::UnknownEnum {
                what: "mode",
                value: v,
            });
        }
    })
}

fn source_to_pb(s: Source) -> pb::Source {
    match s {
        Source::Lsm => pb::Source::Lsm,
        Source::CgroupSock => pb::Source::CgroupSock,
        Source::Fanotify => pb::Source::Fanotify,
        Source::ExecTrace => pb::Source::ExecTrace,
        Source::Agent => pb::Source::Agent,
    }
}

fn source_from_pb(v: i32) -> Result<Source, ConvertError> {
    Ok(match pb::Source::try_from(v) {
        Ok(pb::Source::Lsm) => Source::Lsm,
        Ok(pb::Source::CgroupSock) => Source::CgroupSock,
        Ok(pb::Source::Fanotify) => Source::Fanotify,
        Ok(pb::Source::ExecTrace) => Source::ExecTrace,
        Ok(pb::Source::Agent) => Source::Agent,
        _ => {
            return Err(ConvertError::UnknownEnum {
                what: "source",
                value: v,
            });
        }
    })
}

pub fn runtime_str(r: Runtime) -> &'static str {
    match r {
        Runtime::Docker => "docker",
        Runtime::Containerd => "containerd",
        Runtime::Crio => "crio",
        Runtime::Podman => "podman",
        Runtime::Cgroup => "cgroup",
    }
}

fn runtime_from_str(s: &str) -> Runtime {
    match s {
        "docker" => Runtime::Docker,
        "containerd" => Runtime::Containerd,
        "crio" => Runtime::Crio,
        "podman" => Runtime::Podman,
        _ => Runtime::Cgroup,
    }
}

pub fn container_to_pb(c: &ContainerMeta) -> pb::Container {
    pb::Container {
        id: c.id.clone(),
        runtime: runtime_str(c.runtime).into(),
        cgroup_id: c.cgroup_id,
        cgroup_path: c.cgroup_path.clone(),
        name: c.name.clone(),
        image: c.image.clone(),
        image_digest: c.image_digest.clone(),
        labels: c.labels.clone().into_iter().collect(),
        pod: c.pod.as_ref().map(|p| pb::Pod {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            uid: p.uid.clone(),
            labels: p.labels.clone().into_iter().collect(),
        }),
        metadata_known: c.metadata_known,
    }
}

pub fn container_from_pb(c: pb::Container) -> ContainerMeta {
    ContainerMeta {
        id: c.id,
        runtime: runtime_from_str(&c.runtime),
        cgroup_id: c.cgroup_id,
        cgroup_path: c.cgroup_path,
        name: c.name,
        image: c.image,
        image_digest: c.image_digest,
        labels: c.labels.into_iter().collect(),
        pod: c.pod.map(|p| PodMeta {
            name: p.name,
            namespace: p.namespace,
            uid: p.uid,
            labels: p.labels.into_iter().collect(),
        }),
        metadata_known: c.metadata_known,
        // Node-local details (pid, nested cgroups) are not part of the API.
        ..Default::default()
    }
}

pub fn record_to_pb(r: &Record) -> pb::Event {
    let e = &r.event;
    pb::Event {
        seq: e.seq,
        time_ns: e.time_ns,
        kind: kind_to_pb(e.kind).into(),
        verdict: verdict_to_pb(e.verdict).into(),
        mode: mode_to_pb(e.mode).into(),
        source: source_to_pb(e.source).into(),
        pid: e.pid,
        tgid: e.tgid,
        comm: e.comm.clone(),
        cgroup_id: e.cgroup_id,
        container: e.container.as_ref().map(container_to_pb),
        policy: e.policy.clone(),
        path: e.path.clone(),
        access: e.access.clone(),
        addr: e.addr.map(|a| a.to_string()),
        port: e.port.map(u32::from),
        protocol: e.protocol.clone(),
        flags: e.flags.clone(),
        message: e.message.clone(),
        gap: r.gap.as_ref().map(|g| pb::Gap {
            missed: g.missed,
            reason: g.reason.as_str().into(),
            first_seq: g.first_seq,
            last_seq: g.last_seq,
        }),
    }
}

fn gap_reason_from_str(s: &str) -> Result<GapReason, ConvertError> {
    Ok(match s {
        "subscriber_slow" => GapReason::SubscriberSlow,
        "replay_window" => GapReason::ReplayWindow,
        "kernel_ringbuf" => GapReason::KernelRingbuf,
        _ => {
            return Err(ConvertError::Invalid {
                what: "gap reason",
                value: s.into(),
            });
        }
    })
}

pub fn record_from_pb(e: pb::Event) -> Result<Record, ConvertError> {
    let addr = match e.addr {
        Some(a) => Some(a.parse::<IpAddr>().map_err(|_| ConvertError::Invalid {
            what: "address",
            value: a,
        })?),
        None => None,
    };
    let gap = match e.gap {
        Some(g) => Some(Gap {
            missed: g.missed,
            reason: gap_reason_from_str(&g.reason)?,
            first_seq: g.first_seq,
            last_seq: g.last_seq,
        }),
        None => None,
    };
    let event = Event {
        seq: e.seq,
        time_ns: e.time_ns,
        kind: kind_from_pb(e.kind)?,
        verdict: verdict_from_pb(e.verdict)?,
        mode: mode_from_pb(e.mode)?,
        source: source_from_pb(e.source)?,
        pid: e.pid,
        tgid: e.tgid,
        comm: e.comm,
        cgroup_id: e.cgroup_id,
        container: e.container.map(container_from_pb),
        policy: e.policy,
        path: e.path,
        access: e.access,
        addr,
        port: e.port.map(|p| p as u16),
        protocol: e.protocol,
        flags: e.flags,
        message: e.message,
    };
    Ok(Record { event, gap })
}

pub fn filter_from_pb(f: &pb::EventFilter) -> Result<Filter, ConvertError> {
    Ok(Filter {
        containers: f.containers.clone(),
        pods: f.pods.clone(),
        namespaces: f.namespaces.clone(),
        images: f.images.clone(),
        kinds: f
            .kinds
            .iter()
            .map(|&k| kind_from_pb(k))
            .collect::<Result<_, _>>()?,
        verdicts: f
            .verdicts
            .iter()
            .map(|&v| verdict_from_pb(v))
            .collect::<Result<_, _>>()?,
        modes: f
            .modes
            .iter()
            .map(|&m| {
                mode_from_pb(m)?.ok_or(ConvertError::Invalid {
                    what: "mode",
                    value: "unspecified".into(),
                })
            })
            .collect::<Result<_, _>>()?,
    })
}

pub fn policy_error_to_pb(e: PolicyErrorInfo) -> pb::PolicyError {
    pb::PolicyError {
        file: e.file,
        line: e.line,
        column: e.column,
        field: e.field,
        reason: e.reason,
    }
}

pub fn policy_error_from_pb(e: pb::PolicyError) -> PolicyErrorInfo {
    PolicyErrorInfo {
        file: e.file,
        line: e.line,
        column: e.column,
        field: e.field,
        reason: e.reason,
    }
}

pub fn policy_to_pb(p: PolicyInfo) -> pb::PolicyInfo {
    pb::PolicyInfo {
        name: p.name,
        mode: mode_to_pb(Some(p.mode)).into(),
        selector: p.selector,
        yaml: p.yaml,
        bound_containers: p.bound_containers,
    }
}

pub fn policy_from_pb(p: pb::PolicyInfo) -> Result<PolicyInfo, ConvertError> {
    Ok(PolicyInfo {
        name: p.name,
        mode: mode_from_pb(p.mode)?.ok_or(ConvertError::Invalid {
            what: "policy mode",
            value: "unspecified".into(),
        })?,
        selector: p.selector,
        yaml: p.yaml,
        bound_containers: p.bound_containers,
    })
}

pub fn container_info_to_pb(c: ContainerInfo) -> pb::ContainerInfo {
    pb::ContainerInfo {
        container: Some(container_to_pb(&c.meta)),
        policy: c.policy,
        mode: mode_to_pb(c.mode).into(),
        tier: c.tier,
    }
}

pub fn container_info_from_pb(c: pb::ContainerInfo) -> Result<ContainerInfo, ConvertError> {
    Ok(ContainerInfo {
        meta: c.container.map(container_from_pb).unwrap_or_default(),
        policy: c.policy,
        mode: mode_from_pb(c.mode)?,
        tier: c.tier,
    })
}

pub fn status_to_pb(s: StatusInfo) -> pb::StatusResponse {
    pb::StatusResponse {
        version: s.version,
        tier: s.tier,
        kernel_features: s.kernel_features,
        tier_fallback: s.tier_fallback.unwrap_or_default(),
        counters: s.counters.into_iter().collect(),
    }
}

pub fn status_from_pb(s: pb::StatusResponse) -> StatusInfo {
    StatusInfo {
        version: s.version,
        tier: s.tier,
        kernel_features: s.kernel_features,
        tier_fallback: Some(s.tier_fallback).filter(|r| !r.is_empty()),
        counters: s.counters.into_iter().collect(),
    }
}

pub fn mode_word(m: Mode) -> &'static str {
    match m {
        Mode::Learn => "learn",
        Mode::Monitor => "monitor",
        Mode::Enforce => "enforce",
    }
}

/// `learn` / `monitor` / `enforce` (CLI and config spelling).
pub fn parse_mode(s: &str) -> Result<Mode, ConvertError> {
    match s.to_ascii_lowercase().as_str() {
        "learn" => Ok(Mode::Learn),
        "monitor" => Ok(Mode::Monitor),
        "enforce" => Ok(Mode::Enforce),
        _ => Err(ConvertError::Invalid {
            what: "mode",
            value: s.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_through_protobuf() {
        let mut e = Event::agent(Kind::Connect, Verdict::Denied, "x");
        e.seq = 7;
        e.mode = Some(Mode::Enforce);
        e.source = Source::CgroupSock;
        e.addr = Some("::1".parse().unwrap());
        e.port = Some(443);
        e.protocol = Some("tcp".into());
        e.container = Some(ContainerMeta {
            id: "abc".into(),
            runtime: Runtime::Docker,
            pod: Some(PodMeta {
                name: "p".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        let r = Record {
            event: e,
            gap: Some(Gap {
                missed: 3,
                reason: GapReason::SubscriberSlow,
                first_seq: 1,
                last_seq: 3,
            }),
        };
        assert_eq!(record_from_pb(record_to_pb(&r)).unwrap(), r);
    }

    #[test]
    fn bad_enum_values_are_rejected() {
        let f = pb::EventFilter {
            kinds: vec![99],
            ..Default::default()
        };
        assert_eq!(
            filter_from_pb(&f),
            Err(ConvertError::UnknownEnum {
                what: "kind",
                value: 99
            })
        );
        let f = pb::EventFilter {
            modes: vec![0],
            ..Default::default()
        };
        assert!(filter_from_pb(&f).is_err());
        assert_eq!(parse_mode("Enforce"), Ok(Mode::Enforce));
        assert!(parse_mode("block").is_err());
    }
}
