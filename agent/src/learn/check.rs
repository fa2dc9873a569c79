//! Replay: what a candidate policy would deny of everything recorded.
use agent_common::ALLOW_FILELESS;

use super::LearnError;
use super::store::{Observation, Profile, Seen, Store, WorkloadKey};
use crate::policy::{self, CompiledPolicy, Policy};

/// One recorded observation the candidate would deny.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Denial {
    pub workload: WorkloadKey,
    /// Name of the candidate policy that denies it.
    pub policy: String,
    pub observation: Observation,
    pub seen: Seen,
    pub reason: String,
}

/// The outcome of a replay.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckReport {
    /// In workload order, then observation order.
    pub denials: Vec<Denial>,
    /// Observations replayed (of workloads some candidate applies to).
    pub checked: usize,
    /// Workloads no candidate applies to.
    pub unmatched: Vec<WorkloadKey>,
}

/// The candidate for a workload: the one with the learning policy's name, else the first whose
/// selector matches the workload's last container.
fn candidate<'a>(
    p: &Profile,
    candidates: &'a [(Policy, CompiledPolicy)],
) -> Option<&'a (Policy, CompiledPolicy)> {
    candidates
        .iter()
        .find(|(c, _)| c.name == p.key.policy)
        .or_else(|| {
            let meta = p.meta.as_ref()?;
            candidates.iter().find(|(c, _)| c.matches(meta))
        })
}

pub fn check(store: &Store, candidates: &[Policy]) -> Result<CheckReport, LearnError> {
    let compiled = candidates
        .iter()
        .map(|c| {
            policy::compile(c)
                .map(|cp| (c.clone(), cp))
                .map_err(|e| LearnError::Policy(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut report = CheckReport::default();
    for p in store.profiles.values() {
        let Some((pol, cp)) = candidate(p, &compiled) else {
            report.unmatched.push(p.key.clone());
            continue;
        };
        for (o, seen) in &p.observations {
            report.checked += 1;
            if let Some(reason) = deny_reason(o, pol, cp) {
                report.denials.push(Denial {
                    workload: p.key.clone(),
                    policy: pol.name.clone(),
                    observation: o.clone(),
                    seen: *seen,
                    reason,
                });
            }
        }
    }
    Ok(report)
}

/// `None` when allowed; otherwise why not.
fn deny_reason(o: &Observation, pol: &Policy, cp: &CompiledPolicy) -> Option<String> {
    match o {
        Observation::Exec { path, fileless } => {
            if *fileless {
                let policed = pol.exec.is_some();
                return (policed && cp.flags & ALLOW_FILELESS == 0)
                    .then(|| "fileless exec and allowFileless is false".to_string());
            }
            let d = cp.check_exec(path.as_bytes());
            (!d.allowed).then(|| "no exec.allow entry matches".to_string())
        }
        Observation::Open { path, access } => {
            let d = cp.check_file(path.as_bytes(), *access);
            if d.allowed {
                return None;
            }
            Some(
                match d.rule.and_then(|i| pol.files.as_ref()?.get(i as usize)) {
                    Some(r) => format!(
                        "most specific rule {:?} ({:?} {:?}) does not allow it",
                        r.path, r.action, r.access
                    ),
                    None => "no files rule matches".to_string(),
                },
            )
        }
        Observation::Connect {
            addr,
            port,
            protocol,
        } => {
            let d = cp.check_connect(*addr, *port, *protocol);
            if d.allowed {
                return None;
            }
            Some(
                match d
                    .rule
                    .and_then(|i| pol.network.as_ref()?.egress.get(i as usize))
                {
                    Some(r) => format!("{} matches but not this port/protocol", r.cidr),
                    None => "no egress rule covers the address".to_string(),
                },
            )
        }
    }
}
