//! Shared helpers for Palisade's integration tests (root, real kernel, real containers).
pub mod agent;
pub mod attack;
pub mod cgroup;
pub mod docker;
pub mod events;
pub mod jail;
