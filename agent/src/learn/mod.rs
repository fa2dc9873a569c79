//! Learning mode: record what the containers of a `mode: learn` policy do, generalise it, and
//! emit a policy that allows exactly that (plus explained generalisations).
//!
//! - [`Learner::observe`] takes bus events with verdict `learned` (exec/open/connect) and
//!   records each distinct observation per workload. A workload is `(policy name, image)`:
//!   containers selected by the same learning policy and running the same image share one
//!   profile.
//! - [`Learner::save`] / [`Learner::load`] persist the store as `<dir>/profiles.json`, bounded by
//!   [`Limits`] (least-seen observations are evicted and counted).
//! - [`Learner::profiles`] summarises each profile, including how long since the last new
//!   observation (stability).
//! - [`Learner::export`] writes a `ContainerPolicy` document (`generalize` explains the rules)
//!   that `policy::parse_str` accepts unchanged; [`Learner::check`] replays the recordings
//!   against candidate policies and lists what they would deny.
mod check;
mod export;
mod generalize;
mod store;
mod task;

#[cfg(test)]
mod tests;

pub use check::{CheckReport, Denial};
pub use export::{Exported, time};
pub use generalize::{Cover, GenConfig, Generalized, NetRule, PathRule, generalize, shape};
pub use store::{
    Limits, Observation, Profile, STORE_FILE, Seen, Store, WorkloadKey, access_name, proto_name,
};
pub use task::{LearnHandle, render_check, render_status, run};

use std::path::Path;

use crate::events::model::{Event, Verdict};
use crate::policy::{Mode, Policy};

#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("learn store: {0}")]
    Json(#[source] serde_json::Error),
    #[error("learn store format version {0} is not supported")]
    Version(u32),
    #[error("nothing learned for policy {0:?}{1}")]
    NoProfile(String, String),
    #[error("no policy named {0:?}")]
    NoPolicy(String),
    #[error("policy: {0}")]
    Policy(String),
}

/// Summary of one profile.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProfileSummary {
    pub key: WorkloadKey,
    pub containers: Vec<String>,
    pub exec: usize,
    pub open: usize,
    pub connect: usize,
    pub sightings: u64,
    pub evicted: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub last_new_ns: u64,
    /// Nanoseconds since the last new distinct observation (at the time asked).
    pub stable_for_ns: u64,
}

/// The learning state: the observation store and the generalisation settings.
#[derive(Clone, Debug, Default)]
pub struct Learner {
    pub store: Store,
    pub config: GenConfig,
    dirty: bool,
}

impl Learner {
    pub fn new(limits: Limits, config: GenConfig) -> Self {
        Learner {
            store: Store::new(limits),
            config,
            dirty: false,
        }
    }

    /// Record a learn-mode event. Returns true when it is a new distinct observation; other
    /// events (other verdicts, kinds, no policy) are ignored.
    pub fn observe(&mut self, e: &Event) -> bool {
        if e.verdict != Verdict::Learned {
            return false;
        }
        let (Some(policy), Some(obs)) = (&e.policy, Observation::from_event(e)) else {
            return false;
        };
        let image = e
            .container
            .as_ref()
            .and_then(|c| c.image.clone())
            .unwrap_or_default();
        let key = WorkloadKey {
            policy: policy.clone(),
            image,
        };
        self.dirty = true;
        self.store.record(key, e.container.as_ref(), obs, e.time_ns)
    }

    /// One summary per workload, in key order. `now_ns`: the reference for stability.
    pub fn profiles(&self, now_ns: u64) -> Vec<ProfileSummary> {
        self.store
            .profiles
            .values()
            .map(|p| {
                let count =
                    |f: fn(&Observation) -> bool| p.observations.keys().filter(|o| f(o)).count();
                ProfileSummary {
                    key: p.key.clone(),
                    containers: p.containers.iter().cloned().collect(),
                    exec: count(|o| matches!(o, Observation::Exec { .. })),
                    open: count(|o| matches!(o, Observation::Open { .. })),
                    connect: count(|o| matches!(o, Observation::Connect { .. })),
                    sightings: p.sightings,
                    evicted: p.evicted,
                    first_ns: p.first_ns,
                    last_ns: p.last_ns,
                    last_new_ns: p.last_new_ns,
                    stable_for_ns: now_ns.saturating_sub(p.last_new_ns),
                }
            })
            .collect()
    }

    /// Export what was learned under the policy `base` (the applied learning policy: its name,
    /// selector and rules are kept), for one image or all of them, as a policy in `mode`.
    pub fn export(
        &self,
        base: &Policy,
        image: Option<&str>,
        mode: Mode,
    ) -> Result<Exported, LearnError> {
        let profiles: Vec<&Profile> = self
            .store
            .profiles
            .values()
            .filter(|p| p.key.policy == base.name && image.is_none_or(|i| p.key.image == i))
            .collect();
        if profiles.is_empty() {
            let img = image
                .map(|i| format!(" and image {i:?}"))
                .unwrap_or_default();
            return Err(LearnError::NoProfile(base.name.clone(), img));
        }
        export::export(&profiles, base, mode, &self.config)
    }

    /// Replay every recorded observation against the candidates.
    pub fn check(&self, candidates: &[Policy]) -> Result<CheckReport, LearnError> {
        check::check(&self.store, candidates)
    }

    /// Whether anything was observed since the last save/load.
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    pub fn mark_clean(&mut self) {
        self.dirty = false;
    }

    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    pub fn save(&mut self, dir: &Path) -> Result<(), LearnError> {
        self.store.save(dir)?;
        self.dirty = false;
        Ok(())
    }

    pub fn load(dir: &Path, limits: Limits, config: GenConfig) -> Result<Self, LearnError> {
        Ok(Learner {
            store: Store::load(dir, limits)?,
            config,
            dirty: false,
        })
    }

    /// Forget what was learned for a policy (e.g. after exporting it).
    pub fn forget(&mut self, policy: &str) {
        self.store.profiles.retain(|k, _| k.policy != policy);
        self.dirty = true;
    }
}
