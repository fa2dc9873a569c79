//! Tier 1: BPF-LSM. The LSM programs are global (attached at load); every decision is made in the
//! kernel from the shared maps, so there is nothing per cgroup to do.
use std::path::Path;

use super::{Backend, EnforceError};
use crate::bpf::loader::{Loaded, Tier};

pub struct LsmBackend {
    /// Keeps the programs attached (pinned: they outlive a crash).
    loaded: Loaded,
}

impl LsmBackend {
    pub fn new(loaded: Loaded) -> Self {
        LsmBackend { loaded }
    }
}

impl Backend for LsmBackend {
    fn tier(&self) -> Tier {
        Tier::Lsm
    }
    fn on_bind(&mut self, _cgroup_id: u64, _dir: &Path) -> Result<(), EnforceError> {
        Ok(())
    }
    fn on_unbind(&mut self, _cgroup_id: u64) {}
    fn on_rules_changed(&mut self) {}
    fn shutdown(&mut self) {
        self.loaded.release();
    }
    fn attachments(&self) -> usize {
        0
    }
}
