//! Tier 2: `tp_btf/sys_exit` — an open syscall's recorded flags (`sys_enter.rs`) are for that
//! call only: removed when it returns, so they never apply to a later permission event.
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint, programs::BtfTracePointContext,
};

use crate::{
    maps::OPEN_INTENT,
    offsets::get,
    sys_enter::{NR_CREAT, NR_OPEN, NR_OPEN_BY_HANDLE_AT, NR_OPENAT, NR_OPENAT2},
};

#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit(ctx: BtfTracePointContext) -> u32 {
    let regs: *const u8 = ctx.arg(0);
    // SAFETY: a direct load from the trusted `pt_regs` BTF pointer at a BTF-derived offset (no
    // helper call: this runs on every syscall of the node).
    let nr = unsafe { *(regs.add(get::OFF_REGS_ORIG_AX()) as *const i64) };
    if matches!(
        nr,
        NR_OPEN | NR_OPENAT | NR_OPENAT2 | NR_CREAT | NR_OPEN_BY_HANDLE_AT
    ) {
        let tid = bpf_get_current_pid_tgid() as u32;
        let _ = OPEN_INTENT.remove(&tid);
    }
    0
}
