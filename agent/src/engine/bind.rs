//! Binding containers (and cgroups named by path) to policies.
use tracing::{info, warn};

use super::{Active, Bound, Engine};
use crate::containers::{
    cgroup2,
    meta::{ContainerMeta, Runtime},
};

impl Engine {
    fn policy_for(&self, meta: &ContainerMeta) -> Option<&Active> {
        self.policies.values().find(|a| a.policy.matches(meta))
    }

    /// A container's cgroup exists: bind it (idempotent; also re-evaluates the policy).
    pub fn container_added(&mut self, meta: &ContainerMeta) {
        // Runtime containers: the cgroup exists, the pending entry has served. Path bindings
        // keep theirs (the cgroup may be removed and created again).
        if meta.runtime != Runtime::Cgroup
            && let Some((_, paths)) = self.pending.remove(&meta.id)
        {
            for p in paths {
                self.rules.clear_pending(&p);
            }
        }
        if meta.cgroup_id == 0 {
            return;
        }
        let dir = cgroup2::absolute_path(&self.cgroup_root, &meta.cgroup_path);
        let fresh = !self.bound.contains_key(&meta.cgroup_id);
        let policy = self.policy_for(meta).map(|a| a.policy.name.clone());
        let changed = self
            .bound
            .get(&meta.cgroup_id)
            .is_some_and(|b| b.policy != policy);
        self.bound.insert(
            meta.cgroup_id,
            Bound {
                meta: meta.clone(),
                policy: policy.clone(),
                dir: dir.clone(),
            },
        );
        self.flip(meta.cgroup_id);
        if changed {
            // Cached verdicts (ignore marks) were decided under the old policy.
            self.backend.on_rules_changed();
        }
        if fresh {
            if let Err(e) = self.backend.on_bind(meta.cgroup_id, &dir) {
                warn!(cgroup = %meta.cgroup_path, error = %e, "attaching enforcement failed");
            }
            // Binding may have made the backend ready (a running container's mounts marked).
            self.flip(meta.cgroup_id);
            info!(
                container = %meta.name.as_deref().unwrap_or(&meta.id),
                cgroup = %meta.cgroup_path,
                policy = %policy.as_deref().unwrap_or("<node default>"),
                "container bound"
            );
        }
    }

    /// Metadata changed: re-evaluate the selector.
    pub fn container_updated(&mut self, meta: &ContainerMeta) {
        if self.bound.contains_key(&meta.cgroup_id) {
            self.container_added(meta);
        }
    }

    pub fn container_removed(&mut self, cgroup_id: u64) {
        if let Some(b) = self.bound.remove(&cgroup_id) {
            self.rules.unbind(cgroup_id);
            self.backend.on_unbind(cgroup_id);
            if b.meta.runtime != Runtime::Cgroup
                && let Some((_, paths)) = self.pending.remove(&b.meta.id)
            {
                for p in paths {
                    self.rules.clear_pending(&p);
                }
            }
            self.snapshot
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .by_cgroup
                .remove(&cgroup_id);
        }
    }

    /// The inventory reports a container gone: its cgroup was removed, or (`cgroup_id == 0`)
    /// the runtime destroyed it without a cgroup — created and never started. Its pending
    /// bindings go too: `PAL_PENDING` is small, and a full map would leave new containers
    /// unbound at their first exec.
    pub fn container_gone(&mut self, meta: &ContainerMeta) {
        if meta.cgroup_id != 0 {
            self.container_removed(meta.cgroup_id);
        }
        if meta.runtime != Runtime::Cgroup
            && let Some((_, paths)) = self.pending.remove(&meta.id)
        {
            for p in paths {
                self.rules.clear_pending(&p);
            }
        }
    }

    /// The runtime announced a container whose cgroup does not exist yet: arm the kernel so
    /// that the `cgroup_mkdir` hook binds its policy the instant the cgroup appears.
    pub fn container_pending(&mut self, meta: &ContainerMeta) {
        let paths = predicted_cgroup_paths(meta.runtime, &meta.id);
        self.arm(meta, &paths);
        self.pending.insert(meta.id.clone(), (meta.clone(), paths));
    }

    fn arm(&mut self, meta: &ContainerMeta, paths: &[String]) {
        let pol = self.kernel_policy(meta, self.policy_for(meta));
        for p in paths {
            if let Err(e) = self.rules.set_pending(p, pol) {
                warn!(path = %p, error = %e, "cannot arm pending binding");
            }
        }
    }

    /// The kernel bound a new cgroup at creation (a pending entry, or inheritance from its
    /// parent). Record it at once — before the first exec event of that cgroup is handled —
    /// with what the runtime told us, and attach the per-cgroup enforcement.
    pub fn kernel_bound(&mut self, cgroup_id: u64, path: &str) {
        if self.bound.contains_key(&cgroup_id) {
            return;
        }
        let from_pending = self
            .pending
            .values()
            .find(|(_, paths)| paths.iter().any(|p| p == path))
            .map(|(m, _)| m.clone());
        let meta = from_pending.or_else(|| {
            // Inherited: same container as the nearest bound ancestor.
            let mut parent = path;
            while let Some(i) = parent.rfind('/') {
                parent = &parent[..i];
                if let Some(b) = self.bound.values().find(|b| b.meta.cgroup_path == parent) {
                    return Some(b.meta.clone());
                }
            }
            None
        });
        let Some(mut meta) = meta else { return };
        meta.cgroup_id = cgroup_id;
        meta.cgroup_path = path.to_string();
        if meta.runtime == Runtime::Cgroup {
            // A path binding (or a child of one) keeps its own identity.
            meta.id = path.to_string();
        }
        let dir = cgroup2::absolute_path(&self.cgroup_root, path);
        let policy = self.policy_for(&meta).map(|a| a.policy.name.clone());
        self.bound.insert(
            cgroup_id,
            Bound {
                meta,
                policy,
                dir: dir.clone(),
            },
        );
        self.flip(cgroup_id);
        if let Err(e) = self.backend.on_bind(cgroup_id, &dir) {
            warn!(cgroup = %path, error = %e, "attaching enforcement failed");
        }
        self.flip(cgroup_id);
    }

    /// Metadata of a bound cgroup (for events the inventory cannot enrich yet).
    pub fn bound_meta(&self, cgroup_id: u64) -> Option<ContainerMeta> {
        self.bound.get(&cgroup_id).map(|b| b.meta.clone())
    }

    /// Policies that name a cgroup path bind it directly (existing now, or when created).
    pub(super) fn bind_direct_paths(&mut self) {
        let direct: Vec<(String, String)> = self
            .policies
            .values()
            .filter_map(|a| {
                a.policy
                    .selector
                    .cgroup_path
                    .clone()
                    .map(|p| (a.policy.name.clone(), p))
            })
            .collect();
        for (_, path) in direct {
            let meta = ContainerMeta {
                id: path.clone(),
                runtime: Runtime::Cgroup,
                cgroup_path: path.clone(),
                ..Default::default()
            };
            let pol = self.kernel_policy(&meta, self.policy_for(&meta));
            if let Err(e) = self.rules.set_pending(&path, pol) {
                warn!(path = %path, error = %e, "cannot arm pending binding");
            }
            let dir = cgroup2::absolute_path(&self.cgroup_root, &path);
            if let Ok(id) = cgroup2::cgroup_id(&dir) {
                self.container_added(&ContainerMeta {
                    cgroup_id: id,
                    ..meta
                });
            }
            self.pending
                .insert(path.clone(), (meta_for_pending(&path), vec![path]));
        }
    }

    /// Re-evaluate every bound cgroup after a policy change, and forget path bindings whose
    /// policy is gone.
    pub(super) fn rebind_all(&mut self) {
        let ids: Vec<u64> = self.bound.keys().copied().collect();
        for id in ids {
            let Some(b) = self.bound.get(&id) else {
                continue;
            };
            let policy = self.policy_for(&b.meta).map(|a| a.policy.name.clone());
            if policy.is_none() && b.meta.runtime == Runtime::Cgroup {
                // A cgroup bound only because a policy named it: no longer policed.
                self.container_removed(id);
                continue;
            }
            if let Some(b) = self.bound.get_mut(&id) {
                b.policy = policy;
            }
            self.flip(id);
        }
        // Pending path bindings of deleted policies.
        let live: Vec<String> = self
            .policies
            .values()
            .filter_map(|a| a.policy.selector.cgroup_path.clone())
            .collect();
        let stale: Vec<String> = self
            .pending
            .keys()
            .filter(|k| k.starts_with('/') && !live.contains(k))
            .cloned()
            .collect();
        for k in stale {
            self.pending.remove(&k);
            self.rules.clear_pending(&k);
        }
        // Re-arm the rest with the new generation.
        let armed: Vec<(ContainerMeta, Vec<String>)> = self.pending.values().cloned().collect();
        for (m, paths) in armed {
            self.arm(&m, &paths);
        }
        let names = self
            .policies
            .values()
            .map(|a| (a.id, a.policy.name.clone()))
            .collect();
        self.snapshot
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .policy_names = names;
    }

    /// Write the kernel entry and the snapshot for one bound cgroup.
    fn flip(&mut self, cgroup_id: u64) {
        let Some(b) = self.bound.get(&cgroup_id) else {
            return;
        };
        let active = b.policy.as_deref().and_then(|n| self.policies.get(n));
        let kpol = self.kernel_policy(&b.meta, active);
        let mut binding = self.binding_for(active);
        binding.container = Some(b.meta.clone());
        if let Err(e) = self.rules.bind(cgroup_id, kpol) {
            warn!(cgroup_id, error = %e, "binding cgroup failed");
        }
        // Policy names change only with the policy set; `rebind_all` refreshes them.
        self.snapshot
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .by_cgroup
            .insert(cgroup_id, binding);
    }

    /// Hand a kernel exec event to the backend (tier 2 answers stopped execs).
    pub fn on_exec_event(
        &mut self,
        ev: &agent_common::Event,
    ) -> Option<crate::events::model::Event> {
        let was_ready = self.backend.ready(ev.cgroup_id);
        let out = self.backend.on_exec_event(ev);
        if !was_ready && self.backend.ready(ev.cgroup_id) {
            // Marks are in place now: execs of allowed images no longer need to stop.
            self.flip(ev.cgroup_id);
        }
        out
    }
}

fn meta_for_pending(path: &str) -> ContainerMeta {
    ContainerMeta {
        id: path.to_string(),
        runtime: Runtime::Cgroup,
        cgroup_path: path.to_string(),
        ..Default::default()
    }
}

/// Where a runtime will create a container's cgroup (cgroupfs and systemd drivers).
pub fn predicted_cgroup_paths(runtime: Runtime, id: &str) -> Vec<String> {
    match runtime {
        Runtime::Docker => vec![
            format!("/docker/{id}"),
            format!("/system.slice/docker-{id}.scope"),
        ],
        Runtime::Podman => vec![format!("/machine.slice/libpod-{id}.scope")],
        Runtime::Crio => vec![format!("/crio-{id}.scope")],
        Runtime::Containerd | Runtime::Cgroup => Vec::new(),
    }
}
