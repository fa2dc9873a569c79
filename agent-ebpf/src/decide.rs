//! The decision and reporting logic every hook shares: which policy applies, what the mode
//! makes of a rule verdict, learn-mode de-duplication, and event emission.
use agent_common::{
    ALLOW_NAMESPACES, CONTAINER, CgroupPolicy, Event, KIND_ESCAPE, MODE_ENFORCE, MODE_LEARN,
    MODE_MONITOR, PATH_MAX, POLICE_EXEC, POLICE_FILES, PathKeyData, PathRule, RULESET_BYTES,
    STAT_DENIED, STAT_LEARN_DUPES, STAT_RINGBUF_DROPS, STAT_VIOLATIONS, SeenKey, VERDICT_ALLOWED,
    VERDICT_DENIED, VERDICT_LEARNED, VERDICT_VIOLATION,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel_buf,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task, bpf_ktime_get_ns},
    },
    maps::lpm_trie::{Key, LpmTrie},
};

use crate::{
    maps::{CGROUPS, EVENTS, SEEN, Scratch, bump, scratch},
    offsets::{get, read},
};

/// The policed subject: the current task's cgroup and its policy.
#[derive(Clone, Copy)]
pub struct Subject {
    pub cgroup_id: u64,
    pub pol: CgroupPolicy,
}

/// One hash lookup; `None` means not policed (host processes pay only this).
#[inline(always)]
pub fn current() -> Option<Subject> {
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is copied out at once.
    let pol = unsafe { *CGROUPS.get(&cgroup_id)? };
    if pol.flags & CONTAINER != 0 && (in_host_mntns() || at_host_root()) {
        // The runtime's own setup (runc init before pivot_root), not the workload.
        return None;
    }
    Some(Subject { cgroup_id, pol })
}

#[inline(always)]
fn in_host_mntns() -> bool {
    let host = get::HOST_MNTNS() as u32;
    if host == 0 {
        return false;
    }
    // SAFETY: probe reads of kernel memory; any failure counts as "not host" (policed).
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let Ok(nsproxy) = read::<*const u8>(task, get::OFF_TASK_NSPROXY()) else {
            return false;
        };
        let Ok(mnt_ns) = read::<*const u8>(nsproxy, get::OFF_NSPROXY_MNT_NS()) else {
            return false;
        };
        matches!(read::<u32>(mnt_ns, get::OFF_MNT_NS_INUM()), Ok(inum) if inum == host)
    }
}

/// Whether the current task's root directory is the host's root (not yet pivoted into the
/// container's root filesystem).
#[inline(always)]
fn at_host_root() -> bool {
    let ino = crate::offsets::host_root_ino();
    if ino == 0 {
        return false;
    }
    // SAFETY: probe reads of kernel memory; any failure counts as "not host" (policed).
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let Ok(fs) = read::<*const u8>(task, get::OFF_TASK_FS()) else {
            return false;
        };
        let Ok(dentry) = read::<*const u8>(fs, get::OFF_FS_ROOT() + get::OFF_PATH_DENTRY()) else {
            return false;
        };
        let Ok(inode) = read::<*const u8>(dentry, get::OFF_DENTRY_D_INODE()) else {
            return false;
        };
        let Ok(sb) = read::<*const u8>(dentry, get::OFF_DENTRY_D_SB()) else {
            return false;
        };
        read::<u64>(inode, get::OFF_INODE_I_INO()) == Ok(ino)
            && read::<u32>(sb, get::OFF_SB_S_DEV()) == Ok(get::HOST_ROOT_DEV() as u32)
    }
}

/// What the mode makes of a rule verdict: (event verdict, deny?).
/// An unknown mode fails closed.
#[inline(always)]
pub fn judge(pol: &CgroupPolicy, allowed: bool) -> (u8, bool) {
    match pol.mode {
        MODE_LEARN => (VERDICT_LEARNED, false),
        _ if allowed => (VERDICT_ALLOWED, false),
        MODE_MONITOR => (VERDICT_VIOLATION, false),
        MODE_ENFORCE => (VERDICT_DENIED, true),
        _ => (VERDICT_DENIED, true),
    }
}

/// The LSM verdict when the input could not be read (no scratch space, unreadable message):
/// what the mode makes of "not allowed".
#[inline(always)]
pub fn fail_closed(sub: &Subject) -> i32 {
    crate::ret::verdict(judge(&sub.pol, false).1)
}

/// A policed workload is creating a user/mount namespace or changing its root (`op`:
/// `NS_OP_*`). Policies that police exec or files deny it unless they allow namespaces: in a
/// namespace or root of its own, a process could give any file an allowed name (bind mounts,
/// chroot). Reports per mode; returns whether to deny. `flags` are added to a denial's event.
#[inline(always)]
pub fn confine(sub: &Subject, op: u8, flags: u16) -> bool {
    escape(sub, op, flags, POLICE_EXEC | POLICE_FILES, ALLOW_NAMESPACES)
}

/// A way around the policy (`op`: `NS_OP_*`), judged when the policy polices one of `police`
/// and does not set `allow`. Reports per mode; returns whether to deny.
#[inline(always)]
pub fn escape(sub: &Subject, op: u8, flags: u16, police: u8, allow: u8) -> bool {
    let p = sub.pol.flags;
    if p & police == 0 || p & allow != 0 {
        return false;
    }
    let (verdict, deny) = judge(&sub.pol, false);
    if verdict == VERDICT_LEARNED && !first_escape(sub, op) {
        return false;
    }
    let r = Report {
        kind: KIND_ESCAPE,
        verdict,
        access: op,
        flags: if deny { flags } else { 0 },
        rule: u32::MAX,
        ..Default::default()
    };
    emit(sub, &r, core::ptr::null());
    deny
}

/// The first time this escape `op` is seen in the ruleset generation (learn-mode
/// de-duplication, as for every other kind).
#[inline(always)]
pub fn first_escape(sub: &Subject, op: u8) -> bool {
    let Some(s) = scratch() else {
        return true;
    };
    crate::path::put_ruleset(s, sub.pol.ruleset);
    crate::path::clear_tail(s, RULESET_BYTES);
    first_sighting(s, KIND_ESCAPE, op, 0)
}

/// Longest-prefix lookup of the path in `s` (resolved by `path::resolve`, `len` with NUL).
#[inline(always)]
pub fn lookup_path(
    s: &mut Scratch,
    trie: &LpmTrie<PathKeyData, PathRule>,
    len: usize,
) -> Option<PathRule> {
    s.head = ((RULESET_BYTES + len) * 8) as u32;
    // SAFETY: `Scratch` is `u32 ‖ [u8; 256]`, exactly the layout of `Key<[u8; 256]>`.
    let key = unsafe { &*(s as *const Scratch as *const Key<PathKeyData>) };
    trie.get(key).copied()
}

/// Learn mode: `true` the first time this (kind, access, port, key data) is seen in this
/// ruleset generation. The key data must have a clean tail.
#[inline(always)]
pub fn first_sighting(s: &mut Scratch, kind: u8, access: u8, port: u16) -> bool {
    s.head = kind as u32 | (access as u32) << 8 | (port as u32) << 16;
    // SAFETY: same size and layout as `SeenKey` (4 header bytes ‖ 256 data bytes).
    let key = unsafe { &*(s as *const Scratch as *const SeenKey) };
    if SEEN.get_ptr(key).is_some() {
        bump(STAT_LEARN_DUPES);
        return false;
    }
    // A full LRU evicts old observations; a lost insert only means a repeated event.
    let _ = SEEN.insert(key, &1, 0);
    true
}

/// Fields of an event beyond the subject.
#[derive(Clone, Copy, Default)]
pub struct Report {
    pub kind: u8,
    pub verdict: u8,
    pub access: u8,
    pub flags: u16,
    pub rule: u32,
    pub port: u16,
    pub family: u16,
    pub addr: [u8; 16],
    pub dev: u32,
    pub ino: u64,
    /// Path length without NUL; the bytes are copied from `path_src`.
    pub path_len: u16,
}

/// Emit one event; `path_src` points at `PATH_MAX` readable bytes (scratch data + 4).
#[inline(always)]
pub fn emit(sub: &Subject, r: &Report, path_src: *const u8) {
    match r.verdict {
        VERDICT_DENIED => bump(STAT_DENIED),
        VERDICT_VIOLATION => bump(STAT_VIOLATIONS),
        _ => {}
    }
    let Some(mut slot) = EVENTS.reserve::<Event>(0) else {
        bump(STAT_RINGBUF_DROPS);
        return;
    };
    let ev = slot.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: `ev` is a reserved, exclusively owned ring-buffer slot of `Event` size; every
    // field is written (the slot is not zeroed).
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).cgroup_id = sub.cgroup_id;
        (*ev).ino = r.ino;
        (*ev).pid = pid_tgid as u32;
        (*ev).tgid = (pid_tgid >> 32) as u32;
        (*ev).policy_id = sub.pol.policy_id;
        (*ev).ruleset = sub.pol.ruleset;
        (*ev).rule = r.rule;
        (*ev).dev = r.dev;
        (*ev).kind = r.kind;
        (*ev).verdict = r.verdict;
        (*ev).mode = sub.pol.mode;
        (*ev).access = r.access;
        (*ev).flags = r.flags;
        (*ev).port = r.port;
        (*ev).family = r.family;
        (*ev).addr = r.addr;
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*ev).path_len = 0;
        let dst: &mut [u8; PATH_MAX] = &mut (*ev).path;
        if r.path_len > 0 && !path_src.is_null() && bpf_probe_read_kernel_buf(path_src, dst).is_ok()
        {
            (*ev).path_len = r.path_len;
        }
    }
    slot.submit(0);
}

/// Report per mode and return the LSM verdict (0 or -EPERM). Learn mode reports each distinct
/// observation once; monitor/enforce report violations only.
#[inline(always)]
pub fn conclude(
    sub: &Subject,
    s: &mut Scratch,
    mut r: Report,
    allowed: bool,
    key_len: usize,
) -> i32 {
    let (verdict, deny) = judge(&sub.pol, allowed);
    r.verdict = verdict;
    if verdict == VERDICT_ALLOWED {
        return 0;
    }
    if verdict == VERDICT_LEARNED {
        crate::path::clear_tail(s, RULESET_BYTES + key_len);
        if !first_sighting(s, r.kind, r.access, r.port) {
            return 0;
        }
    }
    let src = unsafe { s.data.as_ptr().add(RULESET_BYTES) };
    emit(sub, &r, src);
    crate::ret::verdict(deny)
}
