//! Tier 2: `tp_btf/sys_enter` — one raw tracepoint for every syscall of the node, dispatching on
//! the syscall number (a per-syscall `syscalls:*` tracepoint builds a perf record per call and
//! cost 5x more, measured in `cargo xtask bench`). Without LSM hooks the agent cannot make a
//! syscall fail, but it can:
//! - record the flags of each open of a policed thread (tid → flags in `PAL_OPEN_INTENT`)
//!   before the kernel opens the file: fanotify's permission event does not say read or write,
//!   and the caller's memory or `/proc/<tid>/syscall` are the caller's to change. `sys_exit`
//!   removes the entry; the decider reads it for the blocked tid, none fails closed (a write);
//! - make sure the caller of a forbidden call never runs another instruction: SIGKILL at entry
//!   for a user/mount namespace (`unshare`, `clone`, `clone3`), `chroot`, a raw/packet/ping
//!   `socket`, and any 32-bit syscall (`int 0x80` works from 64-bit code too, and its numbers
//!   differ). The caller dies on its way back to user space (a new namespace or root dies with
//!   it), and `clone`/`clone3` abort before the child exists: the kernel does not fork with a
//!   fatal signal pending.
//!
//! x86_64 only (syscall numbers, `pt_regs` argument registers, `TS_COMPAT`).
use agent_common::{
    ALLOW_RAW_SOCKETS, EV_KILLED, INTENT_REGISTER, INTENT_USER_MEMORY, KIND_ESCAPE, NS_OP_CHROOT,
    NS_OP_IA32, NS_OP_MOUNTNS, NS_OP_USERNS, OpenIntent, POLICE_EXEC, POLICE_FILES, POLICE_NET,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task_btf, bpf_send_signal},
    },
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    decide::{self, Report},
    maps::{CGROUPS, DOOM_ARMED, DOOMED, OPEN_INTENT},
    net,
    offsets::get,
};

pub const NR_OPEN: i64 = 2;
const NR_SOCKET: i64 = 41;
const NR_CLONE: i64 = 56;
const NR_CHROOT: i64 = 161;
pub const NR_CREAT: i64 = 85;
const NR_UNSHARE: i64 = 272;
pub const NR_OPENAT: i64 = 257;
pub const NR_OPEN_BY_HANDLE_AT: i64 = 304;
const NR_CLONE3: i64 = 435;
pub const NR_OPENAT2: i64 = 437;

const CLONE_NEWNS: u64 = 0x0002_0000;
const CLONE_NEWUSER: u64 = 0x1000_0000;
const O_WRONLY: u64 = 0o1;
const O_CREAT: u64 = 0o100;
const O_TRUNC: u64 = 0o1000;
/// `thread_info.status` bit of a task inside a 32-bit syscall (arch/x86).
const TS_COMPAT: u32 = 0x0002;
/// x32 syscalls carry this bit in their number.
const X32_SYSCALL_BIT: i64 = 0x4000_0000;
const SIGKILL: u32 = 9;

#[btf_tracepoint(function = "sys_enter")]
pub fn sys_enter(ctx: BtfTracePointContext) -> u32 {
    let regs: *const u8 = ctx.arg(0);
    let id: i64 = ctx.arg(1);
    if doomed() {
        return kill_if(true);
    }
    if in_compat_syscall() || id & X32_SYSCALL_BIT != 0 {
        return ia32();
    }
    // SAFETY: direct loads from the trusted `pt_regs` BTF pointer at BTF-derived offsets (no
    // helper call: this runs on every syscall of the node).
    let arg = |off: usize| unsafe { *(regs.add(off) as *const u64) };
    match id {
        NR_OPEN => record(arg(get::OFF_REGS_SI()), INTENT_REGISTER),
        NR_OPENAT | NR_OPEN_BY_HANDLE_AT => record(arg(get::OFF_REGS_DX()), INTENT_REGISTER),
        NR_CREAT => record(O_CREAT | O_WRONLY | O_TRUNC, INTENT_REGISTER),
        // `how->flags` lives in the caller's memory: read here, before the kernel copies it.
        NR_OPENAT2 => match unsafe { bpf_probe_read_user(arg(get::OFF_REGS_DX()) as *const u64) } {
            Ok(f) => record(f, INTENT_USER_MEMORY),
            Err(_) => 0,
        },
        NR_UNSHARE | NR_CLONE => by_clone_flags(arg(get::OFF_REGS_DI())),
        // `clone_args.flags` (offset 0) lives in the caller's memory (docs/threat-model.md).
        NR_CLONE3 => match unsafe { bpf_probe_read_user(arg(get::OFF_REGS_DI()) as *const u64) } {
            Ok(f) => by_clone_flags(f),
            Err(_) => 0,
        },
        NR_CHROOT => kill_if_confined(NS_OP_CHROOT),
        NR_SOCKET => socket(
            arg(get::OFF_REGS_DI()) as u16,
            arg(get::OFF_REGS_SI()) as u32,
            arg(get::OFF_REGS_DX()) as u32,
        ),
        _ => 0,
    }
}

/// A process created in a forbidden namespace (`task_newtask.rs`): its first syscall is its last
/// (instructions without syscalls change nothing outside its memory).
#[inline(always)]
fn doomed() -> bool {
    if DOOM_ARMED.get(0).is_none_or(|v| *v == 0) {
        return false;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if DOOMED.get_ptr(&tgid).is_none() {
        return false;
    }
    let _ = DOOMED.remove(&tgid);
    true
}

#[inline(always)]
fn in_compat_syscall() -> bool {
    // SAFETY: a direct load from the trusted current-task BTF pointer at a BTF-derived offset.
    let status = unsafe {
        let task = bpf_get_current_task_btf() as *const u8;
        *(task.add(get::OFF_TASK_TI_STATUS()) as *const u32)
    };
    status & TS_COMPAT != 0
}

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
fn by_clone_flags(flags: u64) -> u32 {
    if flags & CLONE_NEWUSER != 0 {
        kill_if_confined(NS_OP_USERNS)
    } else if flags & CLONE_NEWNS != 0 {
        kill_if_confined(NS_OP_MOUNTNS)
    } else {
        0
    }
}

#[inline(always)]
fn kill_if_confined(op: u8) -> u32 {
    let Some(sub) = decide::current() else {
        return 0;
    };
    kill_if(decide::confine(&sub, op, EV_KILLED))
}

#[inline(always)]
fn socket(family: u16, sock_type: u32, protocol: u32) -> u32 {
    let Some(op) = net::raw_socket_op(family, sock_type, protocol) else {
        return 0;
    };
    let Some(sub) = decide::current() else {
        return 0;
    };
    kill_if(decide::escape(
        &sub,
        op,
        EV_KILLED,
        POLICE_NET,
        ALLOW_RAW_SOCKETS,
    ))
}

#[inline(always)]
fn kill_if(deny: bool) -> u32 {
    if deny {
        // SAFETY: signals the current process only.
        unsafe { bpf_send_signal(SIGKILL) };
    }
    0
}

/// A 32-bit syscall of a policed workload: the dispatch above cannot read it (other numbers,
/// other registers). `enforce` kills; `monitor` and `learn` report once per ruleset.
#[inline(always)]
fn ia32() -> u32 {
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
        kill_if(true);
    } else if !decide::first_escape(&sub, NS_OP_IA32) {
        // Every syscall of a 32-bit program would report: once per ruleset is enough.
        return 0;
    }
    decide::emit(&sub, &r, core::ptr::null());
    0
}
