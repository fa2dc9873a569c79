//! What a runtime API (Docker Engine, CRI) reports about one container, and why it may fail.
use std::collections::BTreeMap;

use super::meta::{ContainerMeta, PodMeta, Runtime};

/// Why runtime metadata could not be obtained. `Unreachable` is retried with backoff;
/// `NotFound` means the runtime does not (or no longer) know the container.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("runtime socket {socket} unreachable: {reason}")]
    Unreachable { socket: String, reason: String },
    #[error("container {0} not found")]
    NotFound(String),
    #[error("runtime API error: {0}")]
    Api(String),
}

impl MetadataError {
    pub fn is_unreachable(&self) -> bool {
        matches!(self, MetadataError::Unreachable { .. })
    }
}

/// Metadata of one container as reported by its runtime.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeContainer {
    pub runtime: Runtime,
    pub id: String,
    pub name: Option<String>,
    /// Image reference as the user gave it (`nginx:1.27`, `registry/x@sha256:..`).
    pub image: Option<String>,
    /// `sha256:…`: the repo (manifest) digest when the runtime knows one, else the image id.
    pub image_digest: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub pod: Option<PodMeta>,
    pub pid: Option<u32>,
}

impl RuntimeContainer {
    /// Copies the runtime's view into an inventory entry and marks its metadata as known.
    pub fn apply_to(&self, meta: &mut ContainerMeta) {
        meta.runtime = self.runtime;
        meta.name = self.name.clone();
        meta.image = self.image.clone();
        meta.image_digest = self.image_digest.clone();
        meta.labels = self.labels.clone();
        if self.pod.is_some() {
            meta.pod = self.pod.clone();
        }
        if self.pid.is_some() {
            meta.pid = self.pid;
        }
        meta.metadata_known = true;
    }
}
