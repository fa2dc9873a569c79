//! Container identity: cgroup discovery, runtime id parsing, metadata and the live inventory.
pub mod cgroup2;
pub mod cri;
pub mod docker;
pub mod meta;
pub mod runtime_api;
pub mod runtime_id;
