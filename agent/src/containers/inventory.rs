//! The live set of containers on this node, keyed by container id and by every cgroup id that
//! belongs to a container, with a broadcast of changes.
//!
//! Changes are broadcast while the write lock is held, so [`Inventory::subscribe_with_snapshot`]
//! gives a snapshot and a receiver with nothing missed or duplicated in between.
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock, RwLockWriteGuard},
};

use tokio::sync::broadcast;

use super::{
    meta::{ContainerMeta, PodMeta, Runtime},
    runtime_api::RuntimeContainer,
    runtime_id::ParsedCgroup,
};

/// Events buffered per subscriber before a slow one starts missing them (it then sees
/// `RecvError::Lagged` and should resync from [`Inventory::list`]).
const EVENT_CAPACITY: usize = 1024;

/// A change in the inventory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InventoryEvent {
    /// The container's cgroup now exists; id (and metadata, if already known) set.
    Created(ContainerMeta),
    /// Metadata, pid or nested cgroups changed.
    Updated(ContainerMeta),
    /// The container's cgroup is gone; or (`cgroup_id == 0`) the runtime destroyed a container
    /// that has no cgroup.
    Removed(ContainerMeta),
    /// The runtime announced a container whose cgroup does not exist yet (Docker `create`).
    /// `id` is the full container id, which the container's cgroup path will contain.
    Pending {
        runtime: Runtime,
        id: String,
        name: Option<String>,
        image: Option<String>,
        labels: BTreeMap<String, String>,
    },
}

#[derive(Default)]
struct State {
    containers: HashMap<String, ContainerMeta>,
    /// Every cgroup id of a container (its own and nested ones) → container id.
    by_cgroup: HashMap<u64, String>,
    /// Nested cgroup path → (container id, cgroup id), to undo on rmdir.
    nested: HashMap<String, (String, u64)>,
    /// Runtime metadata by container id, kept across cgroup lifetimes (a restarted Docker
    /// container gets a new cgroup but no new `create` event).
    runtime_meta: HashMap<String, RuntimeContainer>,
}

/// Thread-safe handle to the inventory; cheap to clone.
#[derive(Clone)]
pub struct Inventory {
    state: Arc<RwLock<State>>,
    tx: broadcast::Sender<InventoryEvent>,
    /// Set once the Docker event stream is connected and the container list resynced: from
    /// then on a new container's `create` arms its binding before its cgroup exists.
    runtime_synced: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for Inventory {
    fn default() -> Self {
        Self::new()
    }
}

impl Inventory {
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            tx: broadcast::channel(EVENT_CAPACITY).0,
            runtime_synced: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// Called by discovery when a runtime's event stream is live.
    pub fn mark_runtime_synced(&self) {
        self.runtime_synced.send_replace(true);
    }

    /// Wait (at most `timeout`) until a runtime event stream is live; `false` on timeout.
    pub async fn wait_runtime_synced(&self, timeout: std::time::Duration) -> bool {
        let mut rx = self.runtime_synced.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|v| *v))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The container a cgroup id belongs to (its own cgroup or one nested inside it).
    pub fn by_cgroup_id(&self, cgroup_id: u64) -> Option<ContainerMeta> {
        let s = self.read();
        s.by_cgroup
            .get(&cgroup_id)
            .and_then(|id| s.containers.get(id))
            .cloned()
    }

    pub fn by_container_id(&self, id: &str) -> Option<ContainerMeta> {
        self.read().containers.get(id).cloned()
    }

    /// All containers whose cgroup exists, sorted by container id.
    pub fn list(&self) -> Vec<ContainerMeta> {
        let mut v: Vec<_> = self.read().containers.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn subscribe(&self) -> broadcast::Receiver<InventoryEvent> {
        self.tx.subscribe()
    }

    /// A consistent snapshot plus a receiver of every change after it.
    pub fn subscribe_with_snapshot(
        &self,
    ) -> (Vec<ContainerMeta>, broadcast::Receiver<InventoryEvent>) {
        // The write lock excludes concurrent mutations, which broadcast under it.
        let s = self.write();
        let rx = self.tx.subscribe();
        let mut v: Vec<_> = s.containers.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        (v, rx)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a way that matters
        // more than stopping identity altogether, so poisoning is ignored.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, ev: InventoryEvent) {
        // No subscribers is fine.
        let _ = self.tx.send(ev);
    }

    /// Records a container cgroup (`parsed.nested == false`) at `path` with `cgroup_id`.
    /// Returns true when this is a container not seen before (metadata should be fetched).
    pub fn add_container_cgroup(
        &self,
        parsed: &ParsedCgroup,
        cgroup_id: u64,
        pid: Option<u32>,
    ) -> bool {
        let mut s = self.write();
        let id = &parsed.container_id;
        if let Some(existing) = s.containers.get_mut(id) {
            if existing.cgroup_id == cgroup_id {
                return false;
            }
            // Same container, new cgroup (restart raced with our rmdir handling).
            let old = existing.cgroup_id;
            existing.cgroup_id = cgroup_id;
            existing.cgroup_path = parsed.container_cgroup.clone();
            let meta = existing.clone();
            s.by_cgroup.remove(&old);
            s.by_cgroup.insert(cgroup_id, id.clone());
            self.emit(InventoryEvent::Updated(meta));
            return false;
        }
        let mut meta = ContainerMeta {
            id: id.clone(),
            runtime: parsed.runtime,
            cgroup_id,
            cgroup_path: parsed.container_cgroup.clone(),
            pod: parsed.pod_uid.as_ref().map(|uid| PodMeta {
                uid: uid.clone(),
                ..Default::default()
            }),
            pid,
            ..Default::default()
        };
        let known = s.runtime_meta.get(id).cloned();
        if let Some(rc) = &known {
            rc.apply_to(&mut meta);
        }
        s.by_cgroup.insert(cgroup_id, id.clone());
        s.containers.insert(id.clone(), meta.clone());
        self.emit(InventoryEvent::Created(meta));
        known.is_none()
    }

    /// Records a cgroup nested inside a known container. Returns false when the container is
    /// not known (the caller registers the container's own cgroup first).
    pub fn add_nested_cgroup(&self, container_id: &str, path: &str, cgroup_id: u64) -> bool {
        let mut s = self.write();
        let Some(c) = s.containers.get_mut(container_id) else {
            return false;
        };
        if !c.nested_cgroup_ids.contains(&cgroup_id) {
            c.nested_cgroup_ids.push(cgroup_id);
            let meta = c.clone();
            s.by_cgroup.insert(cgroup_id, container_id.to_owned());
            s.nested
                .insert(path.to_owned(), (container_id.to_owned(), cgroup_id));
            self.emit(InventoryEvent::Updated(meta));
        }
        true
    }

    /// A cgroup directory was removed. Returns the container if it was a container's own cgroup.
    pub fn remove_cgroup(&self, path: &str) -> Option<ContainerMeta> {
        let mut s = self.write();
        if let Some((cid, cgid)) = s.nested.remove(path) {
            s.by_cgroup.remove(&cgid);
            if let Some(c) = s.containers.get_mut(&cid) {
                c.nested_cgroup_ids.retain(|x| *x != cgid);
                let meta = c.clone();
                self.emit(InventoryEvent::Updated(meta));
            }
            return None;
        }
        let id = s
            .containers
            .values()
            .find(|c| c.cgroup_path == path)
            .map(|c| c.id.clone())?;
        let meta = s.containers.remove(&id)?;
        s.by_cgroup.remove(&meta.cgroup_id);
        for n in &meta.nested_cgroup_ids {
            s.by_cgroup.remove(n);
        }
        s.nested.retain(|_, (cid, _)| *cid != id);
        // Docker tells us when a container is destroyed; other runtimes do not, and their ids
        // are not reused across restarts, so their metadata goes with the cgroup.
        if meta.runtime != Runtime::Docker {
            s.runtime_meta.remove(&id);
        }
        self.emit(InventoryEvent::Removed(meta.clone()));
        Some(meta)
    }

    /// Cgroup paths currently known (containers' own and nested), for resyncs.
    pub fn known_paths(&self) -> Vec<String> {
        let s = self.read();
        s.containers
            .values()
            .map(|c| c.cgroup_path.clone())
            .chain(s.nested.keys().cloned())
            .collect()
    }

    /// Runtime metadata arrived. Updates the container if its cgroup exists; otherwise keeps it
    /// for when the cgroup appears and, if `announce`, broadcasts [`InventoryEvent::Pending`].
    pub fn set_runtime_meta(&self, rc: RuntimeContainer, announce: bool) {
        let mut s = self.write();
        s.runtime_meta.insert(rc.id.clone(), rc.clone());
        match s.containers.get_mut(&rc.id) {
            Some(c) => {
                let mut updated = c.clone();
                rc.apply_to(&mut updated);
                if updated != *c {
                    *c = updated.clone();
                    self.emit(InventoryEvent::Updated(updated));
                }
            }
            None if announce => self.emit(InventoryEvent::Pending {
                runtime: rc.runtime,
                id: rc.id,
                name: rc.name,
                image: rc.image,
                labels: rc.labels,
            }),
            None => {}
        }
    }

    /// The runtime destroyed the container: forget its metadata. If it has no cgroup (created
    /// and never started, or already stopped), `Removed` is broadcast with `cgroup_id == 0`:
    /// whatever was armed for its `Pending` announcement can be let go.
    pub fn forget(&self, id: &str) {
        let mut s = self.write();
        let rc = s.runtime_meta.remove(id);
        if let Some(rc) = rc
            && !s.containers.contains_key(id)
        {
            let mut meta = ContainerMeta {
                id: rc.id.clone(),
                ..Default::default()
            };
            rc.apply_to(&mut meta);
            self.emit(InventoryEvent::Removed(meta));
        }
    }

    /// Sets the pid of a container whose runtime did not report one.
    pub fn set_pid_if_unknown(&self, id: &str, pid: u32) {
        let mut s = self.write();
        if let Some(c) = s.containers.get_mut(id).filter(|c| c.pid.is_none()) {
            c.pid = Some(pid);
            let meta = c.clone();
            self.emit(InventoryEvent::Updated(meta));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containers::runtime_id::parse_cgroup_path;

    const ID: &str = "3f9a1c0e5b7d2a4c6e8f0a1b3c5d7e9f1a2b3c4d5e6f708192a3b4c5d6e7f809";

    fn rc() -> RuntimeContainer {
        RuntimeContainer {
            runtime: Runtime::Docker,
            id: ID.into(),
            name: Some("web".into()),
            image: Some("nginx".into()),
            labels: BTreeMap::from([("app".into(), "web".into())]),
            ..Default::default()
        }
    }

    #[test]
    fn pending_then_cgroup_gives_created_with_metadata() {
        let inv = Inventory::new();
        let mut rx = inv.subscribe();
        inv.set_runtime_meta(rc(), true);
        assert!(matches!(rx.try_recv().unwrap(), InventoryEvent::Pending { id, .. } if id == ID));
        let parsed = parse_cgroup_path(&format!("/docker/{ID}")).unwrap();
        assert!(
            !inv.add_container_cgroup(&parsed, 77, None),
            "metadata already known"
        );
        let InventoryEvent::Created(m) = rx.try_recv().unwrap() else {
            panic!("expected Created")
        };
        assert!(m.metadata_known);
        assert_eq!((m.name.as_deref(), m.cgroup_id), (Some("web"), 77));
        assert_eq!(inv.by_cgroup_id(77).unwrap().id, ID);
    }

    #[test]
    fn destroyed_before_its_cgroup_existed_is_removed_without_cgroup() {
        let inv = Inventory::new();
        let mut rx = inv.subscribe();
        inv.set_runtime_meta(rc(), true);
        let _ = rx.try_recv(); // Pending
        inv.forget(ID);
        let InventoryEvent::Removed(m) = rx.try_recv().unwrap() else {
            panic!("expected Removed")
        };
        assert_eq!(
            (m.id.as_str(), m.cgroup_id, m.runtime),
            (ID, 0, Runtime::Docker)
        );
        inv.forget(ID);
        assert!(rx.try_recv().is_err(), "forgotten once");
        // With a live cgroup, the cgroup's removal reports it, not the destroy.
        inv.set_runtime_meta(rc(), false);
        inv.add_container_cgroup(
            &parse_cgroup_path(&format!("/docker/{ID}")).unwrap(),
            3,
            None,
        );
        let _ = rx.try_recv(); // Created
        inv.forget(ID);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn nested_cgroups_resolve_and_removal_cleans_everything() {
        let inv = Inventory::new();
        let parsed = parse_cgroup_path(&format!("/docker/{ID}")).unwrap();
        assert!(inv.add_container_cgroup(&parsed, 10, Some(5)));
        let (snap, mut rx) = inv.subscribe_with_snapshot();
        assert_eq!(snap.len(), 1);
        assert!(inv.add_nested_cgroup(ID, &format!("/docker/{ID}/sub"), 11));
        assert!(
            matches!(rx.try_recv().unwrap(), InventoryEvent::Updated(m) if m.nested_cgroup_ids == [11])
        );
        assert_eq!(inv.by_cgroup_id(11).unwrap().cgroup_id, 10);
        assert_eq!(inv.remove_cgroup(&format!("/docker/{ID}/sub")), None);
        assert!(inv.by_cgroup_id(11).is_none());
        inv.set_runtime_meta(rc(), true);
        let _ = rx.try_recv(); // Updated (nested removed)
        assert!(matches!(rx.try_recv().unwrap(), InventoryEvent::Updated(m) if m.metadata_known));
        let removed = inv.remove_cgroup(&format!("/docker/{ID}")).unwrap();
        assert_eq!(removed.name.as_deref(), Some("web"));
        assert!(matches!(rx.try_recv().unwrap(), InventoryEvent::Removed(_)));
        assert!(inv.list().is_empty() && inv.by_cgroup_id(10).is_none());
        assert!(!inv.add_nested_cgroup(ID, "/x", 12), "unknown container");
    }

    #[test]
    fn unchanged_metadata_does_not_emit() {
        let inv = Inventory::new();
        inv.add_container_cgroup(
            &parse_cgroup_path(&format!("/docker/{ID}")).unwrap(),
            1,
            None,
        );
        inv.set_runtime_meta(rc(), false);
        let mut rx = inv.subscribe();
        inv.set_runtime_meta(rc(), false);
        assert!(rx.try_recv().is_err());
    }
}
