//! Tier 2: `syscalls:sys_enter_{unshare,clone,clone3,chroot}` — without LSM hooks the agent
//! cannot make these fail, but it can make sure their caller never runs another instruction:
//! SIGKILL at syscall entry. The caller dies on its way back to user space (a new namespace or
//! root dies with it), and `clone`/`clone3` abort before the child exists because the kernel
//! refuses to fork with a fatal signal pending. What is policed matches tier 1 (user namespace,
//! chroot) plus a mount namespace alone (which needs CAP_SYS_ADMIN: tier 1 leaves it to the
//! capability check).
use agent_common::{EV_KILLED, NS_OP_CHROOT, NS_OP_MOUNTNS, NS_OP_USERNS};
use aya_ebpf::{
    helpers::{bpf_probe_read_user, generated::bpf_send_signal},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::decide;

const ARG0: usize = 16;
const CLONE_NEWNS: u64 = 0x0002_0000;
const CLONE_NEWUSER: u64 = 0x1000_0000;
const SIGKILL: u32 = 9;

#[inline(always)]
fn flags_arg(ctx: &TracePointContext) -> Option<u64> {
    // SAFETY: the record holds the syscall's arguments from ARG0.
    unsafe { ctx.read_at::<u64>(ARG0) }.ok()
}

#[inline(always)]
fn by_flags(flags: u64) -> u32 {
    if flags & CLONE_NEWUSER != 0 {
        kill_if_denied(NS_OP_USERNS)
    } else if flags & CLONE_NEWNS != 0 {
        kill_if_denied(NS_OP_MOUNTNS)
    } else {
        0
    }
}

#[inline(always)]
fn kill_if_denied(op: u8) -> u32 {
    let Some(sub) = decide::current() else {
        return 0;
    };
    if decide::confine(&sub, op, EV_KILLED) {
        // SAFETY: signals the current process only.
        unsafe { bpf_send_signal(SIGKILL) };
    }
    0
}

/// `unshare(flags)`.
#[tracepoint]
pub fn sys_enter_unshare(ctx: TracePointContext) -> u32 {
    flags_arg(&ctx).map_or(0, by_flags)
}

/// `clone(flags, ...)`: flags in a register.
#[tracepoint]
pub fn sys_enter_clone(ctx: TracePointContext) -> u32 {
    flags_arg(&ctx).map_or(0, by_flags)
}

/// `clone3(struct clone_args *uargs, size)`: `uargs->flags` (offset 0) lives in the caller's
/// memory, read at entry (see docs/threat-model.md for the race this leaves).
#[tracepoint]
pub fn sys_enter_clone3(ctx: TracePointContext) -> u32 {
    let Some(args) = flags_arg(&ctx) else {
        return 0;
    };
    // SAFETY: a checked read of user memory.
    match unsafe { bpf_probe_read_user(args as *const u64) } {
        Ok(flags) => by_flags(flags),
        Err(_) => 0,
    }
}

/// `chroot(path)`.
#[tracepoint]
pub fn sys_enter_chroot(_ctx: TracePointContext) -> u32 {
    kill_if_denied(NS_OP_CHROOT)
}
