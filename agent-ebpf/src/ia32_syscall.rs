//! Tier 2: `tp_btf/sys_enter` — 32-bit syscalls (`int 0x80` works from 64-bit code too) are
//! invisible to the `syscalls:sys_enter_*` tracepoints the tier-2 guards use (the kernel skips
//! compat syscalls there), so a policed workload could `unshare` or `chroot` through them
//! unseen. In `enforce` the caller of any 32-bit syscall is killed at syscall entry; `monitor`
//! and `learn` report it once per ruleset. Container workloads are 64-bit; tier 1 needs none of
//! this (LSM hooks judge kernel objects, whatever the syscall ABI).
//!
//! This program runs on every syscall of the node: it reads one word of the current task and
//! returns unless that syscall is a 32-bit one.
use agent_common::{
    EV_KILLED, KIND_ESCAPE, NS_OP_IA32, POLICE_EXEC, POLICE_FILES, POLICE_NET, RULESET_BYTES,
};
use aya_ebpf::{
    helpers::generated::{bpf_get_current_task, bpf_send_signal},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    decide::{self, Report},
    maps::scratch,
    offsets::{get, read},
    path,
};

/// `thread_info.status` bit of a task inside a 32-bit syscall (arch/x86).
const TS_COMPAT: u32 = 0x0002;
/// x32 syscalls carry this bit in their number.
const X32_SYSCALL_BIT: i64 = 0x4000_0000;
const SIGKILL: u32 = 9;

#[btf_tracepoint(function = "sys_enter")]
pub fn sys_enter(ctx: BtfTracePointContext) -> u32 {
    let id: i64 = ctx.arg(1);
    // SAFETY: a probe read of the current task at a BTF-derived offset.
    let status = unsafe {
        let task = bpf_get_current_task() as *const u8;
        read::<u32>(task, get::OFF_TASK_TI_STATUS()).unwrap_or(0)
    };
    if status & TS_COMPAT == 0 && id & X32_SYSCALL_BIT == 0 {
        return 0;
    }
    let Some(sub) = decide::current() else {
        return 0;
    };
    if sub.pol.flags & (POLICE_EXEC | POLICE_FILES | POLICE_NET) == 0 {
        return 0;
    }
    let (verdict, deny) = decide::judge(&sub.pol, false);
    let mut r = Report {
        kind: KIND_ESCAPE,
        verdict,
        access: NS_OP_IA32,
        rule: u32::MAX,
        ..Default::default()
    };
    if deny {
        r.flags = EV_KILLED;
        // SAFETY: signals the current process only.
        unsafe { bpf_send_signal(SIGKILL) };
    } else {
        // Every syscall of a 32-bit program would report: once per ruleset is enough.
        let Some(s) = scratch() else { return 0 };
        path::put_ruleset(s, sub.pol.ruleset);
        path::clear_tail(s, RULESET_BYTES);
        if !decide::first_sighting(s, KIND_ESCAPE, NS_OP_IA32, 0) {
            return 0;
        }
    }
    decide::emit(&sub, &r, core::ptr::null());
    0
}
