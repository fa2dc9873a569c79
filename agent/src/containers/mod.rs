//! Container identity: cgroup discovery, runtime id parsing, metadata and the live inventory.
//!
//! Entry point: [`discovery::Discovery::start`] → [`inventory::Inventory`] (lookups by cgroup
//! id, list, and a broadcast of [`inventory::InventoryEvent`]s).
pub mod cgroup2;
pub mod cri;
pub mod discovery;
pub mod docker;
pub mod inventory;
pub mod meta;
pub mod runtime_api;
pub mod runtime_id;
pub mod watcher;

pub use discovery::Discovery;
pub use inventory::{Inventory, InventoryEvent};
