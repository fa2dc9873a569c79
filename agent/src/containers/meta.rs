//! What Palisade knows about one container. Shared by the selector matcher (policy engine),
//! the inventory, event enrichment and the API.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Container runtime that owns a cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Docker,
    Containerd,
    Crio,
    Podman,
    /// A cgroup bound to a policy directly by path (tests, bare processes).
    #[default]
    Cgroup,
}

/// Metadata of one container. Fields are `None` when the runtime could not be asked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerMeta {
    /// Runtime container id (64 hex for Docker/containerd/CRI-O), or the cgroup path for
    /// [`Runtime::Cgroup`].
    pub id: String,
    pub runtime: Runtime,
    /// cgroup v2 id (inode number of the cgroup directory).
    pub cgroup_id: u64,
    /// cgroup path relative to the cgroup2 mount, starting with `/`.
    pub cgroup_path: String,
    pub name: Option<String>,
    pub image: Option<String>,
    pub image_digest: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub pod: Option<PodMeta>,
    /// False when metadata could not be fetched (runtime socket unreachable).
    pub metadata_known: bool,
    /// Main (init) pid of the container, when known: from the runtime, else the first pid
    /// found in the container's cgroup. Used to reach its mounts via `/proc/<pid>/root`.
    #[serde(default)]
    pub pid: Option<u32>,
    /// cgroup ids of cgroups *below* the container's own (systemd in the container, runc's
    /// split cgroups, ...). Processes there report these ids, so kernel lookups keyed by cgroup
    /// id need them too.
    #[serde(default)]
    pub nested_cgroup_ids: Vec<u64>,
}

/// Kubernetes pod metadata (from CRI labels/annotations).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMeta {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
}
