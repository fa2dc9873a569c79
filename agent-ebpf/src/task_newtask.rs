//! Tier 2: `tp_btf/task_newtask` — the `clone3` race. `clone3` passes its flags in user memory;
//! `sys_enter` reads them at entry, and a second thread may rewrite them before the kernel copies
//! them. Here the kernel's own copy is at hand (`clone_flags`): a policed process that created a
//! user or mount namespace anyway is killed (it is the current task), and the new process, which
//! has not run yet, is doomed: `sys_enter` kills it at its first syscall.
use agent_common::{EV_KILLED, EV_RACE, NS_OP_MOUNTNS, NS_OP_USERNS};
use aya_ebpf::{
    helpers::generated::bpf_send_signal, macros::btf_tracepoint, programs::BtfTracePointContext,
};

use crate::{
    decide,
    maps::{DOOM_ARMED, DOOMED},
    offsets::{get, read},
};

const CLONE_NEWNS: u64 = 0x0002_0000;
const CLONE_NEWUSER: u64 = 0x1000_0000;
const SIGKILL: u32 = 9;

/// `task_newtask(struct task_struct *task, u64 clone_flags)`.
#[btf_tracepoint(function = "task_newtask")]
pub fn task_newtask(ctx: BtfTracePointContext) -> u32 {
    let flags: u64 = ctx.arg(1);
    let op = if flags & CLONE_NEWUSER != 0 {
        NS_OP_USERNS
    } else if flags & CLONE_NEWNS != 0 {
        NS_OP_MOUNTNS
    } else {
        return 0;
    };
    let Some(sub) = decide::current() else {
        return 0;
    };
    if !decide::confine(&sub, op, EV_KILLED | EV_RACE) {
        return 0;
    }
    let task: *const u8 = ctx.arg(0);
    // SAFETY: a probe read of the new task at a BTF-derived offset.
    if let Ok(tgid) = unsafe { read::<u32>(task, get::OFF_TASK_TGID()) } {
        let _ = DOOMED.insert(&tgid, &1, 0);
        if let Some(armed) = DOOM_ARMED.get_ptr_mut(0) {
            // SAFETY: a single u32 flag; any writer stores the same value.
            unsafe { *armed = 1 };
        }
    }
    // SAFETY: signals the current process (the parent) only.
    unsafe { bpf_send_signal(SIGKILL) };
    0
}
