//! `tp_btf/cgroup_mkdir`: binds a policy to a cgroup the moment it is created, before any
//! process can enter it — so a container's entrypoint exec is already policed:
//! - a pending policy for this path (the runtime announced the container), or
//! - the parent's policy: a sub-cgroup of a policed cgroup inherits it, so a workload cannot
//!   escape its policy by creating a child cgroup.
use agent_common::{CGROUP_PATH_KEY, CgroupPathKey, KIND_CGROUP_BOUND, VERDICT_ALLOWED};
use aya_ebpf::{
    helpers::bpf_probe_read_kernel_str_bytes, macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    decide::{self, Report, Subject},
    maps::{CGROUPS, PENDING, scratch},
    offsets::{get, read},
};

#[btf_tracepoint(function = "cgroup_mkdir")]
pub fn cgroup_mkdir(ctx: BtfTracePointContext) -> u32 {
    let cgrp: *const u8 = ctx.arg(0);
    let path: *const u8 = ctx.arg(1);
    // SAFETY: probe reads of kernel memory at BTF-derived offsets.
    unsafe {
        let Ok(root) = read::<*const u8>(cgrp, get::OFF_CGROUP_ROOT()) else {
            return 0;
        };
        // cgroup-v1 hierarchies fire this too; only the v2 hierarchy (id 0) is ours.
        if read::<i32>(root, get::OFF_CGROUP_ROOT_HIERARCHY_ID()) != Ok(0) {
            return 0;
        }
        let Some(s) = scratch() else { return 0 };
        let len = match bpf_probe_read_kernel_str_bytes(path, &mut s.data[..CGROUP_PATH_KEY]) {
            Ok(b) => b.len(),
            Err(_) => return 0,
        };
        crate::path::clear_tail(s, len);
        let key = &*(s.data.as_ptr() as *const CgroupPathKey);
        let pol = match PENDING.get(key).copied() {
            Some(p) => p,
            None => {
                let Some(parent_id) = parent_id(cgrp) else {
                    return 0;
                };
                let Some(p) = CGROUPS.get(&parent_id).copied() else {
                    return 0;
                };
                p
            }
        };
        let Ok(kn) = read::<*const u8>(cgrp, get::OFF_CGROUP_KN()) else {
            return 0;
        };
        let Ok(id) = read::<u64>(kn, get::OFF_KERNFS_NODE_ID()) else {
            return 0;
        };
        if CGROUPS.insert(&id, &pol, 0).is_err() {
            return 0;
        }
        let sub = Subject { cgroup_id: id, pol };
        let r = Report {
            kind: KIND_CGROUP_BOUND,
            verdict: VERDICT_ALLOWED,
            rule: u32::MAX,
            path_len: len as u16,
            ..Default::default()
        };
        decide::emit(&sub, &r, s.data.as_ptr());
    }
    0
}

/// cgroup id of the parent (`cgrp->self.parent` is the parent's embedded css, at offset 0).
#[inline(always)]
unsafe fn parent_id(cgrp: *const u8) -> Option<u64> {
    unsafe {
        let parent = read::<*const u8>(cgrp, get::OFF_CGROUP_PARENT()).ok()?;
        if parent.is_null() {
            return None;
        }
        let kn = read::<*const u8>(parent, get::OFF_CGROUP_KN()).ok()?;
        read::<u64>(kn, get::OFF_KERNFS_NODE_ID()).ok()
    }
}
