//! Container identity: cgroup discovery, runtime id parsing, metadata and the live inventory.
pub mod meta;
