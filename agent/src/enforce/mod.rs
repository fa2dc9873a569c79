//! Enforcement: the kernel rule maps every tier shares ([`rules`]), and one [`Backend`]
//! interface with two implementations — BPF-LSM ([`lsm`], tier 1) and cgroup sock_addr hooks +
//! fanotify + the exec backstop ([`compat`], tier 2).
pub mod compat;
pub mod fanotify;
pub mod lsm;
pub mod rules;
pub mod snapshot;

use std::path::Path;

use thiserror::Error;

use crate::bpf::loader::{LoadError, Tier};

#[derive(Debug, Error)]
pub enum EnforceError {
    #[error("kernel map `{map}`: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("fanotify: {0}")]
    Fanotify(#[from] fanotify::Error),
    #[error("cgroup path `{0}` does not fit the kernel key (127 bytes)")]
    CgroupPathTooLong(String),
}

/// What differs between the tiers once the shared maps are written.
pub trait Backend: Send {
    fn tier(&self) -> Tier;
    /// A cgroup was bound to a policy (its map entry is already in place).
    fn on_bind(&mut self, cgroup_id: u64, dir: &Path) -> Result<(), EnforceError>;
    /// A cgroup is no longer policed (removed, or unbound).
    fn on_unbind(&mut self, cgroup_id: u64);
    /// Policies changed: drop every cache derived from the old rules.
    fn on_rules_changed(&mut self);
    /// Whether some policy polices a section (exec, files or network): tier 2 runs its
    /// per-syscall programs only then. Called before such a policy is bound.
    fn set_policing(&mut self, _any: bool) -> Result<(), EnforceError> {
        Ok(())
    }
    /// Number of cgroups with per-cgroup kernel attachments (for tests and metrics).
    fn attachments(&self) -> usize;
    /// Number of fanotify mount marks held (tier 2; 0 otherwise).
    fn marks(&self) -> usize {
        0
    }
    /// A kernel exec event; the backend may act on it (tier 2 answers stopped execs) and may
    /// return an event of its own to publish.
    /// Start userspace deciders: called once the engine has bound what already runs.
    fn activate(&mut self) -> Result<(), EnforceError> {
        Ok(())
    }
    /// Whether per-cgroup userspace enforcement (tier-2 fanotify marks) is in place.
    fn ready(&self, _cgroup_id: u64) -> bool {
        true
    }
    /// Clean shutdown: stop userspace deciders and release what outlives the process.
    fn shutdown(&mut self) {}
    fn on_exec_event(&mut self, _ev: &agent_common::Event) -> Option<crate::events::model::Event> {
        None
    }
}
