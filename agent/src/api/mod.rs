//! The node agent's API: gRPC service (`palisade.v1.Palisade`), its authorisation and audit,
//! metrics/health endpoint, and the CLI client.
//!
//! The daemon plugs in through [`Control`]; events come from the [`crate::events::bus::EventBus`].
//! Start it with [`server::serve`]; the CLI entry point is [`cli::run_cli`].
use std::collections::BTreeMap;

use crate::containers::meta::ContainerMeta;
use crate::events::model::Mode;
use crate::learn::{CheckReport, LearnError, ProfileSummary};

pub mod audit;
pub mod auth;
pub mod cli;
pub mod client;
pub mod convert;
pub mod learn;
pub mod metrics;
mod output;
pub mod server;

/// Generated protobuf/gRPC code for `proto/palisade/v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("palisade.v1");
}

pub use server::{ServerConfig, TlsConfig, serve};

/// Default API socket (root-only).
pub const DEFAULT_SOCKET: &str = "/run/palisade/palisade.sock";

/// One problem in submitted policy YAML.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyErrorInfo {
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for PolicyErrorInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.column, self.field, self.reason
        )
    }
}

/// A policy as the daemon holds it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyInfo {
    pub name: String,
    pub mode: Mode,
    /// Human summary of the selector, e.g. `image=nginx:* namespace=web`.
    pub selector: String,
    /// The policy as applied.
    pub yaml: String,
    pub bound_containers: u32,
}

/// A container as the daemon sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerInfo {
    pub meta: ContainerMeta,
    pub policy: Option<String>,
    pub mode: Option<Mode>,
    /// Enforcement tier serving it: `lsm` or `compat`.
    pub tier: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatusInfo {
    pub version: String,
    pub tier: String,
    pub kernel_features: Vec<String>,
    /// Set when `auto` fell back to tier 2 on a node where BPF-LSM is active: the reason.
    pub tier_fallback: Option<String>,
    pub counters: BTreeMap<String, u64>,
}

/// What the API needs from the daemon. Implemented by the daemon; errors are shown to the caller
/// as they are (keep them short and specific).
#[tonic::async_trait]
pub trait Control: Send + Sync + 'static {
    /// Parse, validate and apply every policy in `yaml` atomically: all or nothing.
    async fn apply_policies(
        &self,
        yaml: String,
        source_name: String,
    ) -> Result<Vec<String>, Vec<PolicyErrorInfo>>;
    async fn delete_policy(&self, name: String) -> Result<(), String>;
    async fn list_policies(&self) -> Vec<PolicyInfo>;
    async fn set_mode(&self, name: String, mode: Mode) -> Result<(), String>;
    async fn list_containers(&self) -> Vec<ContainerInfo>;
    async fn status(&self) -> StatusInfo;
    /// One summary per learned workload.
    async fn learn_status(&self) -> Vec<ProfileSummary>;
    /// What was learned under the applied policy `policy` (one image or all), as a policy in
    /// `mode` (YAML). `NoPolicy`/`NoProfile` when there is nothing to export.
    async fn learn_export(
        &self,
        policy: String,
        image: Option<String>,
        mode: crate::policy::Mode,
    ) -> Result<String, LearnError>;
    /// Replay every recording against the candidate policies in `yaml`; changes nothing.
    async fn learn_check(
        &self,
        yaml: String,
        source_name: String,
    ) -> Result<CheckReport, LearnError>;
}
