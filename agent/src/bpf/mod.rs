//! Loading the eBPF object: BTF offsets, programs per enforcement tier, maps, ring buffer.
pub mod btf;
pub mod loader;
pub mod offsets;
pub mod pins;
pub mod probe;
pub mod ringbuf;
pub mod syscall_hooks;

/// The eBPF object built by `build.rs` (empty when built with `AYA_BUILD_SKIP=1`).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));
