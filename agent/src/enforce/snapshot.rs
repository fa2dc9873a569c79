//! A read-mostly view of "which cgroup is under which compiled policy", shared with the
//! fanotify decision thread and the event enricher (they never touch the engine's lock).
use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use crate::policy::CompiledPolicy;

#[derive(Clone, Debug)]
pub struct Binding {
    /// `None` for the node default policy.
    pub policy: Option<String>,
    pub policy_id: u32,
    pub ruleset: u32,
    /// `MODE_*`.
    pub mode: u8,
    pub compiled: Arc<CompiledPolicy>,
    /// The container, for events decided outside the kernel event loop.
    pub container: Option<crate::containers::meta::ContainerMeta>,
}

#[derive(Default)]
pub struct Snapshot {
    pub by_cgroup: HashMap<u64, Binding>,
    pub policy_names: HashMap<u32, String>,
}

pub type SharedSnapshot = Arc<RwLock<Snapshot>>;

pub fn binding(s: &SharedSnapshot, cgroup_id: u64) -> Option<Binding> {
    s.read()
        .unwrap_or_else(|e| e.into_inner())
        .by_cgroup
        .get(&cgroup_id)
        .cloned()
}
