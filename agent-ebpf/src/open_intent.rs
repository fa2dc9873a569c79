//! Tier 2: the access mode of each open, taken from the kernel. fanotify's permission event
//! does not say whether a file is opened for reading or writing, and the caller's memory or
//! `/proc/<tid>/syscall` are the caller's to change (a second thread rewrites `open_how` after
//! anyone read it). These `syscalls:sys_enter_*` tracepoints record the flags of every open
//! syscall of a policed thread (tid → flags) before the kernel performs the open; the exit
//! tracepoints remove them. The decider reads the entry for the blocked tid; none fails closed.
//!
//! Layout of a syscall tracepoint record: 8 bytes of common fields, the syscall number at 8,
//! then each argument as 8 bytes from offset 16.
use agent_common::{INTENT_REGISTER, INTENT_USER_MEMORY, OpenIntent};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_get_current_cgroup_id,
    },
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::maps::{CGROUPS, OPEN_INTENT};

const ARG0: usize = 16;
const O_WRONLY: u64 = 0o1;
const O_CREAT: u64 = 0o100;
const O_TRUNC: u64 = 0o1000;

#[inline(always)]
fn record(flags: u64, source: u32) -> u32 {
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if CGROUPS.get_ptr(&cgroup_id).is_none() {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    let v = OpenIntent {
        flags,
        source,
        _pad: 0,
    };
    // A failed insert leaves no entry: the open is then judged as a write (fail closed).
    let _ = OPEN_INTENT.insert(&tid, &v, 0);
    0
}

#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> Option<u64> {
    // SAFETY: the record holds six 8-byte arguments from ARG0.
    unsafe { ctx.read_at::<u64>(ARG0 + 8 * n) }.ok()
}

/// `open(filename, flags, mode)`.
#[tracepoint]
pub fn sys_enter_open(ctx: TracePointContext) -> u32 {
    arg(&ctx, 1).map_or(0, |f| record(f, INTENT_REGISTER))
}

/// `openat(dfd, filename, flags, mode)`.
#[tracepoint]
pub fn sys_enter_openat(ctx: TracePointContext) -> u32 {
    arg(&ctx, 2).map_or(0, |f| record(f, INTENT_REGISTER))
}

/// `open_by_handle_at(mountdirfd, handle, flags)`.
#[tracepoint]
pub fn sys_enter_open_by_handle_at(ctx: TracePointContext) -> u32 {
    arg(&ctx, 2).map_or(0, |f| record(f, INTENT_REGISTER))
}

/// `creat(pathname, mode)` is `open(pathname, O_CREAT|O_WRONLY|O_TRUNC, mode)`.
#[tracepoint]
pub fn sys_enter_creat(_ctx: TracePointContext) -> u32 {
    record(O_CREAT | O_WRONLY | O_TRUNC, INTENT_REGISTER)
}

/// `openat2(dfd, filename, how, size)`: `how->flags` lives in the caller's memory.
#[tracepoint]
pub fn sys_enter_openat2(ctx: TracePointContext) -> u32 {
    let Some(how) = arg(&ctx, 2) else { return 0 };
    // SAFETY: a checked read of user memory; failure leaves no entry (judged as a write).
    match unsafe { bpf_probe_read_user(how as *const u64) } {
        Ok(f) => record(f, INTENT_USER_MEMORY),
        Err(_) => 0,
    }
}

/// Attached to the exit of each open syscall above: the entry is for that call only.
#[tracepoint]
pub fn sys_exit_open_any(_ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = OPEN_INTENT.remove(&tid);
    0
}
