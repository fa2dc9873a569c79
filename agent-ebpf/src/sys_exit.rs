//! Tier 2: `tp_btf/sys_exit` — an open syscall's recorded flags (`sys_enter.rs`) are for that
//! call only: removed when it returns, so they never apply to a later permission event.
//!
//! `openat2` is checked first: its flags were read from the caller's memory at entry, and a
//! second thread may have rewritten them before the kernel copied them. If the flags judged a
//! read but the file came back open for writing, the caller is killed here, before the
//! descriptor reaches user space: no byte is written through it. (An `O_TRUNC` the kernel applied
//! during the open cannot be undone; see docs/threat-model.md.)
use agent_common::{EV_KILLED, EV_RACE, INTENT_USER_MEMORY, NS_OP_OPEN_RACE, POLICE_FILES};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_task, bpf_send_signal},
    },
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    decide,
    maps::OPEN_INTENT,
    offsets::{get, read},
    sys_enter::{NR_CREAT, NR_OPEN, NR_OPEN_BY_HANDLE_AT, NR_OPENAT, NR_OPENAT2},
};

const O_ACCMODE: u64 = 0o3;
const O_TRUNC: u64 = 0o1000;
const FMODE_WRITE: u32 = 0x2;
const SIGKILL: u32 = 9;

#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit(ctx: BtfTracePointContext) -> u32 {
    let regs: *const u8 = ctx.arg(0);
    // SAFETY: a direct load from the trusted `pt_regs` BTF pointer at a BTF-derived offset (no
    // helper call: this runs on every syscall of the node).
    let nr = unsafe { *(regs.add(get::OFF_REGS_ORIG_AX()) as *const i64) };
    if !matches!(
        nr,
        NR_OPEN | NR_OPENAT | NR_OPENAT2 | NR_CREAT | NR_OPEN_BY_HANDLE_AT
    ) {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    if nr == NR_OPENAT2 {
        let ret: i64 = ctx.arg(1);
        check_openat2(tid, ret);
    }
    let _ = OPEN_INTENT.remove(&tid);
    0
}

#[inline(always)]
fn check_openat2(tid: u32, fd: i64) {
    let Some(intent) = (unsafe { OPEN_INTENT.get(&tid) }).copied() else {
        return;
    };
    let judged_read = intent.flags & O_ACCMODE == 0 && intent.flags & O_TRUNC == 0;
    if intent.source != INTENT_USER_MEMORY || !judged_read || fd < 0 {
        return;
    }
    let Some(f_mode) = file_mode(fd as u64) else {
        return;
    };
    if f_mode & FMODE_WRITE == 0 {
        return;
    }
    let Some(sub) = decide::current() else {
        return;
    };
    if decide::escape(&sub, NS_OP_OPEN_RACE, EV_KILLED | EV_RACE, POLICE_FILES, 0) {
        // SAFETY: signals the current process only.
        unsafe { bpf_send_signal(SIGKILL) };
    }
}

/// `f_mode` of the current task's descriptor `fd`.
#[inline(always)]
fn file_mode(fd: u64) -> Option<u32> {
    // SAFETY: probe reads of kernel memory at BTF-derived offsets; the index is bounded by the
    // table's own size.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let files = read::<*const u8>(task, get::OFF_TASK_FILES()).ok()?;
        let fdt = read::<*const u8>(files, get::OFF_FILES_FDT()).ok()?;
        let max = read::<u32>(fdt, get::OFF_FDT_MAX_FDS()).ok()? as u64;
        if fd >= max {
            return None;
        }
        let fds = read::<*const *const u8>(fdt, get::OFF_FDT_FD()).ok()?;
        let file = read::<*const u8>(fds.add(fd as usize) as *const u8, 0).ok()?;
        read::<u32>(file, get::OFF_FILE_F_MODE()).ok()
    }
}
