//! `tp_btf/cgroup_rmdir`: a removed cgroup's binding goes with it, in the kernel, so
//! `PAL_CGROUPS` never accumulates stale ids (cgroup ids are never reused, but the map is finite).
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::{
    maps::CGROUPS,
    offsets::{get, read},
};

#[btf_tracepoint(function = "cgroup_rmdir")]
pub fn cgroup_rmdir(ctx: BtfTracePointContext) -> u32 {
    let cgrp: *const u8 = ctx.arg(0);
    // SAFETY: probe reads of kernel memory at BTF-derived offsets.
    unsafe {
        // Only the v2 hierarchy (id 0): cgroup ids are per hierarchy, and a cgroup-v1 rmdir
        // can carry the same id as a live v2 cgroup.
        let Ok(root) = read::<*const u8>(cgrp, get::OFF_CGROUP_ROOT()) else {
            return 0;
        };
        if read::<i32>(root, get::OFF_CGROUP_ROOT_HIERARCHY_ID()) != Ok(0) {
            return 0;
        }
        let Ok(kn) = read::<*const u8>(cgrp, get::OFF_CGROUP_KN()) else {
            return 0;
        };
        let Ok(id) = read::<u64>(kn, get::OFF_KERNFS_NODE_ID()) else {
            return 0;
        };
        let _ = CGROUPS.remove(&id);
    }
    0
}
