//! The policy engine at run time: which policy governs which container, and keeping the kernel
//! maps, the enforcement backend and the shared snapshot in step with it.
//!
//! Every change is a new generation: rules of the new generation are written under a fresh
//! ruleset id, each cgroup entry is flipped with one map update, then the old generation is
//! deleted. A rejected change leaves everything as it was.
mod bind;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
};

use agent_common::{self as abi, CgroupPolicy};

use crate::{
    containers::meta::ContainerMeta,
    enforce::{
        Backend,
        rules::RuleMaps,
        snapshot::{Binding, SharedSnapshot},
    },
    policy::{CompiledPolicy, Mode, Policy, compile},
};

/// One policy in force.
#[derive(Clone)]
pub struct Active {
    pub policy: Policy,
    pub compiled: Arc<CompiledPolicy>,
    pub id: u32,
    pub ruleset: u32,
}

/// A policed cgroup.
#[derive(Clone, Debug)]
pub struct Bound {
    pub meta: ContainerMeta,
    /// `None`: the node default.
    pub policy: Option<String>,
    pub dir: PathBuf,
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub policy: String,
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "policy {}: {}", self.policy, self.reason)
    }
}

pub struct Engine {
    rules: RuleMaps,
    backend: Box<dyn Backend>,
    snapshot: SharedSnapshot,
    cgroup_root: PathBuf,
    policies: BTreeMap<String, Active>,
    bound: HashMap<u64, Bound>,
    /// Container id (or cgroup path for path bindings) → what the runtime told us and the
    /// cgroup paths armed in the kernel for it.
    pending: HashMap<String, (ContainerMeta, Vec<String>)>,
    default_mode: u8,
    default_compiled: Arc<CompiledPolicy>,
    next_ruleset: u32,
    next_id: u32,
}

impl Engine {
    pub fn new(
        rules: RuleMaps,
        backend: Box<dyn Backend>,
        snapshot: SharedSnapshot,
        cgroup_root: PathBuf,
        default_mode: Mode,
    ) -> Self {
        Engine {
            rules,
            backend,
            snapshot,
            cgroup_root,
            policies: BTreeMap::new(),
            bound: HashMap::new(),
            pending: HashMap::new(),
            default_mode: default_mode.as_u8(),
            default_compiled: Arc::new(CompiledPolicy::default()),
            next_ruleset: 1,
            next_id: 1,
        }
    }

    /// Start the backend's userspace deciders, once policies and running containers are bound.
    pub fn activate(&mut self) -> Result<(), crate::enforce::EnforceError> {
        self.backend.activate()
    }

    /// Clean shutdown: every cgroup unbound, backend released. Dropping the engine then
    /// detaches the programs.
    pub fn shutdown(&mut self) {
        let ids: Vec<u64> = self.bound.keys().copied().collect();
        for id in ids {
            self.container_removed(id);
        }
        self.backend.shutdown();
    }

    pub fn tier(&self) -> crate::bpf::loader::Tier {
        self.backend.tier()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Active> {
        self.policies.values()
    }

    pub fn policy(&self, name: &str) -> Option<&Active> {
        self.policies.get(name)
    }

    pub fn bound(&self) -> impl Iterator<Item = (&u64, &Bound)> {
        self.bound.iter()
    }

    pub fn bound_count(&self, policy: &str) -> usize {
        self.bound
            .values()
            .filter(|b| b.policy.as_deref() == Some(policy))
            .count()
    }

    /// Kernel map entry counts: (cgroups, pending, exec, file, net rules, exec inodes).
    pub fn map_counts(&self) -> [usize; 6] {
        self.rules.counts()
    }

    pub fn attachments(&self) -> (usize, usize) {
        (self.backend.attachments(), self.backend.marks())
    }

    pub fn kernel_stat(&self, index: u32) -> u64 {
        self.rules.stat(index)
    }

    pub fn default_mode(&self) -> u8 {
        self.default_mode
    }

    /// Apply (create or replace) a set of validated policies atomically: all or nothing.
    pub fn apply(&mut self, new: Vec<Policy>) -> Result<Vec<String>, Vec<Refusal>> {
        self.check_conflicts(&new)?;
        let mut installed: Vec<Active> = Vec::new();
        for p in &new {
            let compiled = match compile(p) {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    self.rollback(&installed);
                    return Err(vec![Refusal {
                        policy: p.name.clone(),
                        reason: e.to_string(),
                    }]);
                }
            };
            let ruleset = self.alloc_ruleset();
            if let Err(e) = self.rules.install(ruleset, &compiled) {
                self.rollback(&installed);
                return Err(vec![Refusal {
                    policy: p.name.clone(),
                    reason: e.to_string(),
                }]);
            }
            let id = match self.policies.get(&p.name) {
                Some(a) => a.id,
                None => self.alloc_id(),
            };
            installed.push(Active {
                policy: p.clone(),
                compiled,
                id,
                ruleset,
            });
        }
        let mut old = Vec::new();
        let names: Vec<String> = installed.iter().map(|a| a.policy.name.clone()).collect();
        for a in installed {
            if let Some(prev) = self.policies.insert(a.policy.name.clone(), a) {
                old.push(prev);
            }
        }
        // The per-syscall guards are in place before a policy that needs them is bound.
        self.sync_policing();
        self.bind_direct_paths();
        self.rebind_all();
        for a in &old {
            self.rules.remove(a.ruleset, &a.compiled);
        }
        self.backend.on_rules_changed();
        Ok(names)
    }

    fn rollback(&mut self, installed: &[Active]) {
        for a in installed {
            self.rules.remove(a.ruleset, &a.compiled);
        }
    }

    /// A container matched by two policies is a conflict for the newer policy.
    fn check_conflicts(&self, new: &[Policy]) -> Result<(), Vec<Refusal>> {
        let mut errs = Vec::new();
        let replaced: Vec<&str> = new.iter().map(|p| p.name.as_str()).collect();
        for (i, p) in new.iter().enumerate() {
            for b in self.bound.values() {
                if !p.matches(&b.meta) {
                    continue;
                }
                let other = self
                    .policies
                    .values()
                    .map(|a| &a.policy)
                    .filter(|q| !replaced.contains(&q.name.as_str()))
                    .chain(new[..i].iter())
                    .find(|q| q.name != p.name && q.matches(&b.meta));
                if let Some(q) = other {
                    errs.push(Refusal {
                        policy: p.name.clone(),
                        reason: format!(
                            "conflicts with policy {} on container {} ({}): a container can have only one policy",
                            q.name,
                            b.meta.name.as_deref().unwrap_or(&b.meta.id),
                            b.meta.cgroup_path
                        ),
                    });
                }
            }
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    pub fn delete(&mut self, name: &str) -> Result<(), String> {
        let Some(a) = self.policies.remove(name) else {
            return Err(format!("no policy named {name}"));
        };
        self.rebind_all();
        self.rules.remove(a.ruleset, &a.compiled);
        self.sync_policing();
        self.backend.on_rules_changed();
        Ok(())
    }

    /// Tell the backend whether any policy polices a section.
    fn sync_policing(&mut self) {
        let police = abi::POLICE_EXEC | abi::POLICE_FILES | abi::POLICE_NET;
        let any = self
            .policies
            .values()
            .any(|a| a.compiled.flags & police != 0);
        if let Err(e) = self.backend.set_policing(any) {
            tracing::warn!(error = %e, "per-syscall hooks could not be attached: namespace, raw-socket and access-mode guards are off");
        }
    }

    /// Change a policy's mode live (a new generation, so learn-mode de-duplication restarts).
    pub fn set_mode(&mut self, name: &str, mode: Mode) -> Result<(), String> {
        let Some(a) = self.policies.get(name) else {
            return Err(format!("no policy named {name}"));
        };
        let mut p = a.policy.clone();
        p.mode = mode;
        self.apply(vec![p]).map(|_| ()).map_err(|e| {
            e.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    fn alloc_ruleset(&mut self) -> u32 {
        let r = self.next_ruleset;
        self.next_ruleset = self.next_ruleset.wrapping_add(1).max(1);
        r
    }

    fn alloc_id(&mut self) -> u32 {
        let r = self.next_id;
        self.next_id += 1;
        r
    }

    /// The kernel value for a container under `policy` (or the node default).
    fn kernel_policy(&self, meta: &ContainerMeta, policy: Option<&Active>) -> CgroupPolicy {
        let mut container = if meta.runtime == crate::containers::meta::Runtime::Cgroup {
            0
        } else {
            abi::CONTAINER
        };
        if meta.cgroup_id != 0 && self.backend.ready(meta.cgroup_id) {
            container |= abi::MARKED;
        }
        match policy {
            Some(a) => CgroupPolicy {
                policy_id: a.id,
                ruleset: a.ruleset,
                mode: a.compiled.mode,
                flags: a.compiled.flags | container,
                _pad: [0; 6],
            },
            None => CgroupPolicy {
                mode: self.default_mode,
                flags: container,
                ..Default::default()
            },
        }
    }

    fn binding_for(&self, policy: Option<&Active>) -> Binding {
        match policy {
            Some(a) => Binding {
                policy: Some(a.policy.name.clone()),
                policy_id: a.id,
                ruleset: a.ruleset,
                mode: a.compiled.mode,
                compiled: a.compiled.clone(),
                container: None,
            },
            None => Binding {
                policy: None,
                policy_id: 0,
                ruleset: 0,
                mode: self.default_mode,
                compiled: self.default_compiled.clone(),
                container: None,
            },
        }
    }
}
