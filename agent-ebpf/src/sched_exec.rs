//! `tp_btf/sched_process_exec`: the exec audit trail for policed cgroups (every tier), and the
//! tier-2 backstop. The tracepoint fires after the new image is committed but before it runs a
//! single instruction, so a signal sent here lands first:
//! - fileless image (memfd, deleted file) not allowed → SIGKILL, decided in the kernel;
//! - image whose inode the agent has not allowed yet → SIGSTOP, and the agent answers with
//!   SIGCONT or SIGKILL. A dead agent leaves it stopped: fail closed.
use agent_common::{
    ACC_EXEC, ALLOW_FILELESS, EV_FILELESS, EV_FILENAME_AS_PASSED, EV_KILLED, EV_STOPPED, InodeKey,
    KIND_EXEC, MARKED, MODE_ENFORCE, PATH_MAX, POLICE_EXEC, POLICE_FILES, VERDICT_ALLOWED,
    VERDICT_DENIED,
};
use aya_ebpf::{
    helpers::{bpf_probe_read_kernel_str_bytes, generated::bpf_send_signal},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    decide::{self, Report},
    maps::{EXEC_INODES, scratch},
    offsets::{get, read},
    path,
};

const SIGKILL: u32 = 9;
const SIGSTOP: u32 = 19;

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> u32 {
    let Some(sub) = decide::current() else {
        return 0;
    };
    let bprm: *const u8 = ctx.arg(2);
    let mut r = Report {
        kind: KIND_EXEC,
        verdict: VERDICT_ALLOWED,
        access: ACC_EXEC,
        flags: EV_FILENAME_AS_PASSED,
        rule: u32::MAX,
        ..Default::default()
    };
    // SAFETY: probe reads of kernel memory at BTF-derived offsets; failures leave zeroes.
    let fileless = unsafe {
        let file = read::<*const u8>(bprm, get::OFF_BPRM_FILE()).unwrap_or(core::ptr::null());
        let inode = read::<*const u8>(file, get::OFF_FILE_F_INODE()).unwrap_or(core::ptr::null());
        r.ino = read::<u64>(inode, get::OFF_INODE_I_INO()).unwrap_or(0);
        let sb = read::<*const u8>(inode, get::OFF_INODE_I_SB()).unwrap_or(core::ptr::null());
        r.dev = read::<u32>(sb, get::OFF_SB_S_DEV()).unwrap_or(0);
        let nlink = read::<u32>(inode, get::OFF_INODE_I_NLINK()).unwrap_or(1);
        let dentry = read::<*const u8>(file, get::OFF_FILE_F_PATH() + get::OFF_PATH_DENTRY())
            .unwrap_or(core::ptr::null());
        let pprev = read::<u64>(dentry, get::OFF_DENTRY_D_HASH_PPREV()).unwrap_or(1);
        nlink == 0 || pprev == 0
    };
    if fileless {
        r.flags |= EV_FILELESS;
    }
    let Some(s) = scratch() else { return 0 };
    // The name as passed to execve (the resolved path needs d_path, not allowed here).
    let filename = unsafe { read::<*const u8>(bprm, get::OFF_BPRM_FILENAME()) };
    if let Ok(name) = filename {
        let dst = &mut s.data[4..4 + PATH_MAX];
        if let Ok(b) = unsafe { bpf_probe_read_kernel_str_bytes(name, dst) } {
            r.path_len = b.len() as u16;
        }
    }
    if get::BACKSTOP() != 0 {
        backstop(&sub, &mut r, fileless);
    }
    path::put_ruleset(s, sub.pol.ruleset);
    let src = unsafe { s.data.as_ptr().add(4) };
    decide::emit(&sub, &r, src);
    0
}

/// Tier 2: kill a fileless image the policy does not allow; stop any exec until the
/// container's mounts are marked (every mode: learn and monitor must not miss early opens
/// either); in enforce mode, stop an image whose inode the agent has not allowed yet.
#[inline(always)]
fn backstop(sub: &decide::Subject, r: &mut Report, fileless: bool) {
    let flags = sub.pol.flags;
    if flags & (POLICE_EXEC | POLICE_FILES) == 0 {
        return;
    }
    let enforce_exec = sub.pol.mode == MODE_ENFORCE && flags & POLICE_EXEC != 0;
    if enforce_exec && fileless && flags & ALLOW_FILELESS == 0 {
        // SAFETY: signals the current task only.
        unsafe { bpf_send_signal(SIGKILL) };
        r.verdict = VERDICT_DENIED;
        r.flags |= EV_KILLED;
        return;
    }
    let key = InodeKey {
        ruleset: sub.pol.ruleset,
        dev: r.dev,
        ino: r.ino,
    };
    let unknown = enforce_exec && EXEC_INODES.get_ptr(&key).is_none();
    if flags & MARKED == 0 || unknown {
        // SAFETY: signals the current task only.
        unsafe { bpf_send_signal(SIGSTOP) };
        r.flags |= EV_STOPPED;
    }
}
