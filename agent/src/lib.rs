//! Palisade: node-level container runtime security agent.
//!
//! - [`policy`]: pure policy engine (YAML model, validation, compiler to kernel map entries).
//! - [`bpf`]: loading the eBPF object, BTF offsets, ring-buffer reader.
//! - [`enforce`]: one enforcement interface, two backends (BPF-LSM, and cgroup hooks + fanotify).
//! - [`containers`]: cgroup discovery, runtime id parsing, metadata, inventory.
//! - [`events`]: typed events and the fan-out pipeline.
//! - [`api`]: gRPC services and the CLI client.
pub mod api;
pub mod bpf;
pub mod containers;
pub mod daemon;
pub mod enforce;
pub mod engine;
pub mod events;
pub mod learn;
pub mod policy;
