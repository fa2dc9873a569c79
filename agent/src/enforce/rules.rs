//! The shared kernel maps: compiled rule sets in the tries, cgroup bindings, pending bindings.
//! A policy change writes the new generation's rules under a fresh ruleset id, flips each
//! cgroup entry (one atomic map update each), then deletes the old generation — so a container
//! is never under no policy or half a policy.
use std::sync::{Arc, Mutex};

use agent_common::{self as abi, CgroupPathKey, CgroupPolicy, InodeKey};
use aya::maps::{HashMap, MapData, MapError, lpm_trie::Key};

use super::EnforceError;
use crate::{bpf::loader::Maps, policy::CompiledPolicy};

fn map_err(map: &'static str) -> impl Fn(MapError) -> EnforceError {
    move |source| EnforceError::Map { map, source }
}

/// Allowed exec images (tier-2 backstop), shared with the fanotify decision thread.
pub type ExecInodes = Arc<Mutex<HashMap<MapData, InodeKey, u32>>>;

/// Open flags of policed threads in an open syscall (tier 2), read by the fanotify decider.
pub type OpenIntents = Arc<Mutex<HashMap<MapData, u32, abi::OpenIntent>>>;

/// The maps without the exec-inode map, which moves behind its own lock.
struct Tables {
    cgroups: HashMap<MapData, u64, CgroupPolicy>,
    pending: HashMap<MapData, CgroupPathKey, CgroupPolicy>,
    exec_rules: aya::maps::LpmTrie<MapData, abi::PathKeyData, abi::PathRule>,
    file_rules: aya::maps::LpmTrie<MapData, abi::PathKeyData, abi::PathRule>,
    net_rules: aya::maps::LpmTrie<MapData, abi::NetKeyData, abi::NetRule>,
    stats: aya::maps::PerCpuArray<MapData, u64>,
}

pub struct RuleMaps {
    maps: Tables,
    pub exec_inodes: ExecInodes,
    pub open_intent: OpenIntents,
}

/// Cgroup path → the fixed-size key of `PAL_PENDING` (as the kernel's `cgroup_mkdir`
/// tracepoint renders it: relative to the cgroup2 root, starting with `/`).
pub fn pending_key(path: &str) -> Result<CgroupPathKey, EnforceError> {
    let b = path.as_bytes();
    if b.len() >= abi::CGROUP_PATH_KEY {
        return Err(EnforceError::CgroupPathTooLong(path.into()));
    }
    let mut k = [0u8; abi::CGROUP_PATH_KEY];
    k[..b.len()].copy_from_slice(b);
    Ok(k)
}

impl RuleMaps {
    pub fn new(maps: Maps) -> Self {
        let Maps {
            cgroups,
            pending,
            exec_rules,
            file_rules,
            net_rules,
            exec_inodes,
            open_intent,
            stats,
        } = maps;
        RuleMaps {
            maps: Tables {
                cgroups,
                pending,
                exec_rules,
                file_rules,
                net_rules,
                stats,
            },
            exec_inodes: Arc::new(Mutex::new(exec_inodes)),
            open_intent: Arc::new(Mutex::new(open_intent)),
        }
    }

    /// Write every entry of `c` under `ruleset`; on failure nothing of it stays.
    pub fn install(&mut self, ruleset: u32, c: &CompiledPolicy) -> Result<(), EnforceError> {
        let r = self.try_install(ruleset, c);
        if r.is_err() {
            self.remove(ruleset, c);
        }
        r
    }

    fn try_install(&mut self, ruleset: u32, c: &CompiledPolicy) -> Result<(), EnforceError> {
        for (len, data, rule) in c.exec.keys(ruleset) {
            self.maps
                .exec_rules
                .insert(&Key::new(len, data), &rule, 0)
                .map_err(map_err(abi::MAP_EXEC_RULES))?;
        }
        for (len, data, rule) in c.files.keys(ruleset) {
            self.maps
                .file_rules
                .insert(&Key::new(len, data), &rule, 0)
                .map_err(map_err(abi::MAP_FILE_RULES))?;
        }
        for (len, data, rule) in c.net.keys(ruleset) {
            self.maps
                .net_rules
                .insert(&Key::new(len, data), &rule, 0)
                .map_err(map_err(abi::MAP_NET_RULES))?;
        }
        Ok(())
    }

    /// Delete the entries of `c` under `ruleset` and the exec inodes allowed under it.
    pub fn remove(&mut self, ruleset: u32, c: &CompiledPolicy) {
        for (len, data, _) in c.exec.keys(ruleset) {
            let _ = self.maps.exec_rules.remove(&Key::new(len, data));
        }
        for (len, data, _) in c.files.keys(ruleset) {
            let _ = self.maps.file_rules.remove(&Key::new(len, data));
        }
        for (len, data, _) in c.net.keys(ruleset) {
            let _ = self.maps.net_rules.remove(&Key::new(len, data));
        }
        let mut inodes = self.exec_inodes.lock().unwrap_or_else(|e| e.into_inner());
        let stale: Vec<InodeKey> = inodes
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.ruleset == ruleset)
            .collect();
        for k in stale {
            let _ = inodes.remove(&k);
        }
    }

    pub fn bind(&mut self, cgroup_id: u64, pol: CgroupPolicy) -> Result<(), EnforceError> {
        self.maps
            .cgroups
            .insert(&cgroup_id, &pol, 0)
            .map_err(map_err(abi::MAP_CGROUPS))
    }

    pub fn unbind(&mut self, cgroup_id: u64) {
        let _ = self.maps.cgroups.remove(&cgroup_id);
    }

    pub fn bound(&self, cgroup_id: u64) -> Option<CgroupPolicy> {
        self.maps.cgroups.get(&cgroup_id, 0).ok()
    }

    pub fn set_pending(&mut self, path: &str, pol: CgroupPolicy) -> Result<(), EnforceError> {
        self.maps
            .pending
            .insert(&pending_key(path)?, &pol, 0)
            .map_err(map_err(abi::MAP_PENDING))
    }

    pub fn clear_pending(&mut self, path: &str) {
        if let Ok(k) = pending_key(path) {
            let _ = self.maps.pending.remove(&k);
        }
    }

    /// Entry counts (cgroups, pending, exec rules, file rules, net rules, exec inodes): the
    /// baseline check after containers come and go.
    pub fn counts(&self) -> [usize; 6] {
        let inodes = self
            .exec_inodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .count();
        [
            self.maps.cgroups.keys().count(),
            self.maps.pending.keys().count(),
            self.maps.exec_rules.keys().count(),
            self.maps.file_rules.keys().count(),
            self.maps.net_rules.keys().count(),
            inodes,
        ]
    }

    /// Sum of a per-CPU kernel counter (`STAT_*`).
    pub fn stat(&self, index: u32) -> u64 {
        crate::bpf::ringbuf::stat(&self.maps.stats, index)
    }
}
