//! Learning mode over the API: protobuf conversions (both directions, so the CLI prints the
//! same shapes the daemon holds), the gRPC status of a [`LearnError`], and the
//! `palisade learn ...` subcommands.
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;

use agent_common::{ACC_READ, ACC_WRITE, PROTO_TCP, PROTO_UDP};
use anyhow::Context;
use clap::Subcommand;
use tonic::Status;

use super::client::Client;
use super::convert::{self, ConvertError};
use super::pb;
use crate::events::model::Kind;
use crate::learn::{
    CheckReport, Denial, LearnError, Observation, ProfileSummary, Seen, WorkloadKey, access_name,
    proto_name, render_check, render_status,
};
use crate::policy::Mode;

#[derive(Subcommand, Clone, Debug)]
pub enum LearnCommand {
    /// What has been learned, per workload (learning policy, image).
    Status,
    /// Print what was learned under a learning policy as a policy document (YAML, stdout).
    Export {
        /// Name of the applied learning policy.
        policy: String,
        /// Only this image's profile (default: every image learned under the policy).
        #[arg(long)]
        image: Option<String>,
        /// Mode of the exported policy.
        #[arg(long, default_value = "enforce", value_parser = parse_export_mode)]
        mode: Mode,
    },
    /// Replay every recording against candidate policies. Exit code 1 when anything recorded
    /// would be denied.
    Check {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
}

fn parse_export_mode(s: &str) -> Result<Mode, String> {
    match s.parse::<Mode>() {
        Ok(Mode::Learn) | Err(_) => Err(format!("unknown mode {s:?} (enforce, monitor)")),
        Ok(m) => Ok(m),
    }
}

/// Run `palisade learn ...`. Returns the exit code.
pub async fn run(
    client: &mut Client,
    cmd: LearnCommand,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<i32> {
    match cmd {
        LearnCommand::Status => {
            let resp = client
                .learn_status(pb::LearnStatusRequest {})
                .await?
                .into_inner();
            let profiles: Vec<ProfileSummary> =
                resp.profiles.into_iter().map(profile_from_pb).collect();
            if json {
                serde_json::to_writer_pretty(&mut *out, &profiles)?;
                writeln!(out)?;
            } else {
                out.write_all(render_status(&profiles).as_bytes())?;
            }
            Ok(0)
        }
        LearnCommand::Export {
            policy,
            image,
            mode,
        } => {
            let req = pb::LearnExportRequest {
                policy: policy.clone(),
                image,
                mode: convert::mode_to_pb(Some(ev_mode(mode))).into(),
            };
            let yaml = client.learn_export(req).await?.into_inner().yaml;
            if json {
                let v = serde_json::json!({ "policy": policy, "yaml": yaml });
                writeln!(out, "{v}")?;
            } else {
                out.write_all(yaml.as_bytes())?;
            }
            Ok(0)
        }
        LearnCommand::Check { file } => {
            let yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let req = pb::LearnCheckRequest {
                yaml,
                source_name: file.display().to_string(),
            };
            let report = report_from_pb(client.learn_check(req).await?.into_inner())?;
            if json {
                serde_json::to_writer_pretty(&mut *out, &report)?;
                writeln!(out)?;
            } else {
                out.write_all(render_check(&report).as_bytes())?;
            }
            Ok(if report.denials.is_empty() { 0 } else { 1 })
        }
    }
}

fn ev_mode(m: Mode) -> crate::events::model::Mode {
    use crate::events::model::Mode as E;
    match m {
        Mode::Learn => E::Learn,
        Mode::Monitor => E::Monitor,
        Mode::Enforce => E::Enforce,
    }
}

/// The export mode of a request: unspecified means enforce.
pub fn export_mode_from_pb(v: i32) -> Result<Mode, ConvertError> {
    use crate::events::model::Mode as E;
    Ok(match convert::mode_from_pb(v)? {
        None | Some(E::Enforce) => Mode::Enforce,
        Some(E::Monitor) => Mode::Monitor,
        Some(E::Learn) => Mode::Learn,
    })
}

/// The gRPC status for a learning error: nothing to export is `NotFound` (the CLI exits 4),
/// a bad candidate or base policy is `InvalidArgument`.
pub fn status_of(e: LearnError) -> Status {
    match e {
        LearnError::NoProfile(..) | LearnError::NoPolicy(_) => Status::not_found(e.to_string()),
        LearnError::Policy(_) => Status::invalid_argument(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

pub fn profile_to_pb(p: ProfileSummary) -> pb::LearnProfile {
    pb::LearnProfile {
        policy: p.key.policy,
        image: p.key.image,
        containers: p.containers,
        exec: p.exec as u64,
        open: p.open as u64,
        connect: p.connect as u64,
        sightings: p.sightings,
        evicted: p.evicted,
        first_seen_ns: p.first_ns,
        last_seen_ns: p.last_ns,
        last_new_ns: p.last_new_ns,
        stable_for_ns: p.stable_for_ns,
    }
}

pub fn profile_from_pb(p: pb::LearnProfile) -> ProfileSummary {
    ProfileSummary {
        key: WorkloadKey {
            policy: p.policy,
            image: p.image,
        },
        containers: p.containers,
        exec: p.exec as usize,
        open: p.open as usize,
        connect: p.connect as usize,
        sightings: p.sightings,
        evicted: p.evicted,
        first_ns: p.first_seen_ns,
        last_ns: p.last_seen_ns,
        last_new_ns: p.last_new_ns,
        stable_for_ns: p.stable_for_ns,
    }
}

fn workload_to_pb(w: WorkloadKey) -> pb::LearnWorkload {
    pb::LearnWorkload {
        policy: w.policy,
        image: w.image,
    }
}

fn workload_from_pb(w: pb::LearnWorkload) -> WorkloadKey {
    WorkloadKey {
        policy: w.policy,
        image: w.image,
    }
}

pub fn observation_to_pb(o: &Observation) -> pb::LearnObservation {
    let mut out = pb::LearnObservation::default();
    match o {
        Observation::Exec { path, fileless } => {
            out.kind = convert::kind_to_pb(Kind::Exec).into();
            out.path = path.clone();
            out.fileless = *fileless;
        }
        Observation::Open { path, access } => {
            out.kind = convert::kind_to_pb(Kind::Open).into();
            out.path = path.clone();
            out.access = access_name(*access).into();
        }
        Observation::Connect {
            addr,
            port,
            protocol,
        } => {
            out.kind = convert::kind_to_pb(Kind::Connect).into();
            out.addr = addr.to_string();
            out.port = (*port).into();
            out.protocol = proto_name(*protocol).into();
        }
    }
    out
}

fn invalid(what: &'static str, value: impl ToString) -> ConvertError {
    ConvertError::Invalid {
        what,
        value: value.to_string(),
    }
}

pub fn observation_from_pb(o: pb::LearnObservation) -> Result<Observation, ConvertError> {
    Ok(match convert::kind_from_pb(o.kind)? {
        Kind::Exec => Observation::Exec {
            path: o.path,
            fileless: o.fileless,
        },
        Kind::Open => {
            let mut access = 0;
            for part in o.access.split(',') {
                access |= match part.trim() {
                    "read" => ACC_READ,
                    "write" => ACC_WRITE,
                    _ => return Err(invalid("access", &o.access)),
                };
            }
            Observation::Open {
                path: o.path,
                access,
            }
        }
        Kind::Connect => Observation::Connect {
            addr: o
                .addr
                .parse::<IpAddr>()
                .map_err(|_| invalid("address", &o.addr))?,
            port: u16::try_from(o.port).map_err(|_| invalid("port", o.port))?,
            protocol: match o.protocol.as_str() {
                "tcp" => PROTO_TCP,
                "udp" => PROTO_UDP,
                _ => return Err(invalid("protocol", &o.protocol)),
            },
        },
        k => return Err(invalid("observation kind", format!("{k:?}"))),
    })
}

pub fn report_to_pb(r: CheckReport) -> pb::LearnCheckResponse {
    pb::LearnCheckResponse {
        denials: r
            .denials
            .into_iter()
            .map(|d| pb::LearnDenial {
                observation: Some(observation_to_pb(&d.observation)),
                workload: Some(workload_to_pb(d.workload)),
                candidate: d.policy,
                count: d.seen.count,
                first_seen_ns: d.seen.first_ns,
                last_seen_ns: d.seen.last_ns,
                reason: d.reason,
            })
            .collect(),
        checked: r.checked as u64,
        unmatched: r.unmatched.into_iter().map(workload_to_pb).collect(),
    }
}

pub fn report_from_pb(r: pb::LearnCheckResponse) -> Result<CheckReport, ConvertError> {
    let denials = r
        .denials
        .into_iter()
        .map(|d| {
            Ok(Denial {
                workload: workload_from_pb(d.workload.unwrap_or_default()),
                policy: d.candidate,
                observation: observation_from_pb(d.observation.unwrap_or_default())?,
                seen: Seen {
                    count: d.count,
                    first_ns: d.first_seen_ns,
                    last_ns: d.last_seen_ns,
                },
                reason: d.reason,
            })
        })
        .collect::<Result<Vec<_>, ConvertError>>()?;
    Ok(CheckReport {
        denials,
        checked: r.checked as usize,
        unmatched: r.unmatched.into_iter().map(workload_from_pb).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(n: u64) -> Seen {
        Seen {
            count: n,
            first_ns: 1_000 + n,
            last_ns: 2_000 + n,
        }
    }

    #[test]
    fn check_report_round_trips_through_protobuf() {
        let w = WorkloadKey {
            policy: "web".into(),
            image: "busybox:1".into(),
        };
        let obs = [
            Observation::Exec {
                path: "/bin/sh".into(),
                fileless: false,
            },
            Observation::Exec {
                path: "/memfd:x (deleted)".into(),
                fileless: true,
            },
            Observation::Open {
                path: "/etc/passwd".into(),
                access: ACC_READ,
            },
            Observation::Open {
                path: "/var/log/a".into(),
                access: ACC_READ | ACC_WRITE,
            },
            Observation::Connect {
                addr: "::1".parse().unwrap(),
                port: 53,
                protocol: PROTO_UDP,
            },
            Observation::Connect {
                addr: "127.0.0.1".parse().unwrap(),
                port: 8080,
                protocol: PROTO_TCP,
            },
        ];
        let report = CheckReport {
            denials: obs
                .iter()
                .enumerate()
                .map(|(i, o)| Denial {
                    workload: w.clone(),
                    policy: "cand".into(),
                    observation: o.clone(),
                    seen: seen(i as u64),
                    reason: format!("reason {i}"),
                })
                .collect(),
            checked: 9,
            unmatched: vec![WorkloadKey {
                policy: "other".into(),
                image: String::new(),
            }],
        };
        let back = report_from_pb(report_to_pb(report.clone())).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn malformed_observations_are_rejected() {
        let open = pb::LearnObservation {
            kind: pb::Kind::Open.into(),
            path: "/x".into(),
            access: "exec".into(),
            ..Default::default()
        };
        assert!(observation_from_pb(open).is_err());
        let policy_kind = pb::LearnObservation {
            kind: pb::Kind::Policy.into(),
            ..Default::default()
        };
        assert!(observation_from_pb(policy_kind).is_err());
        let port = pb::LearnObservation {
            kind: pb::Kind::Connect.into(),
            addr: "10.0.0.1".into(),
            port: 70_000,
            protocol: "tcp".into(),
            ..Default::default()
        };
        assert!(observation_from_pb(port).is_err());
    }

    #[test]
    fn profile_round_trips_and_export_mode_defaults_to_enforce() {
        let p = ProfileSummary {
            key: WorkloadKey {
                policy: "web".into(),
                image: "img".into(),
            },
            containers: vec!["a".into(), "b".into()],
            exec: 1,
            open: 2,
            connect: 3,
            sightings: 4,
            evicted: 5,
            first_ns: 6,
            last_ns: 7,
            last_new_ns: 8,
            stable_for_ns: 9,
        };
        assert_eq!(profile_from_pb(profile_to_pb(p.clone())), p);
        assert_eq!(export_mode_from_pb(0).unwrap(), Mode::Enforce);
        assert_eq!(
            export_mode_from_pb(pb::Mode::Monitor.into()).unwrap(),
            Mode::Monitor
        );
        assert!(parse_export_mode("learn").is_err());
        assert_eq!(parse_export_mode("monitor").unwrap(), Mode::Monitor);
    }

    #[test]
    fn learn_errors_map_to_grpc_codes() {
        use tonic::Code;
        let code = |e| status_of(e).code();
        assert_eq!(
            code(LearnError::NoProfile("w".into(), String::new())),
            Code::NotFound
        );
        assert_eq!(code(LearnError::NoPolicy("w".into())), Code::NotFound);
        assert_eq!(
            code(LearnError::Policy("bad".into())),
            Code::InvalidArgument
        );
        assert_eq!(code(LearnError::Version(9)), Code::Internal);
    }
}
