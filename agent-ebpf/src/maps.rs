//! Every map the programs share. Names and value types come from `agent-common`.
use agent_common::{
    CAP_CGROUPS, CAP_EXEC_INODES, CAP_EXEC_RULES, CAP_FILE_RULES, CAP_NET_RULES, CAP_OPEN_INTENT,
    CAP_PENDING, CAP_SEEN, CgroupPathKey, CgroupPolicy, InodeKey, NetKeyData, NetRule, OpenIntent,
    PATH_KEY_DATA, PathKeyData, PathRule, STAT_COUNT, SeenKey,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};

#[map(name = "PAL_CGROUPS")]
pub static CGROUPS: HashMap<u64, CgroupPolicy> = HashMap::with_max_entries(CAP_CGROUPS, 0);

#[map(name = "PAL_PENDING")]
pub static PENDING: HashMap<CgroupPathKey, CgroupPolicy> =
    HashMap::with_max_entries(CAP_PENDING, 0);

#[map(name = "PAL_EXEC_RULES")]
pub static EXEC_RULES: LpmTrie<PathKeyData, PathRule> =
    LpmTrie::with_max_entries(CAP_EXEC_RULES, 0);

#[map(name = "PAL_FILE_RULES")]
pub static FILE_RULES: LpmTrie<PathKeyData, PathRule> =
    LpmTrie::with_max_entries(CAP_FILE_RULES, 0);

#[map(name = "PAL_NET_RULES")]
pub static NET_RULES: LpmTrie<NetKeyData, NetRule> = LpmTrie::with_max_entries(CAP_NET_RULES, 0);

#[map(name = "PAL_OPEN_INTENT")]
pub static OPEN_INTENT: LruHashMap<u32, OpenIntent> =
    LruHashMap::with_max_entries(CAP_OPEN_INTENT, 0);

/// Tier 2: processes created in a namespace the policy forbids (a `clone3` race caught at
/// `task_newtask`): killed at their first syscall. Key: tgid.
#[map(name = "PAL_DOOMED")]
pub static DOOMED: LruHashMap<u32, u8> = LruHashMap::with_max_entries(1024, 0);

/// Tier 2: non-zero once `DOOMED` was ever written, so that `sys_enter` looks it up only then.
#[map(name = "PAL_DOOM_ARMED")]
pub static DOOM_ARMED: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "PAL_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

#[map(name = "PAL_SEEN")]
pub static SEEN: LruHashMap<SeenKey, u8> = LruHashMap::with_max_entries(CAP_SEEN, 0);

#[map(name = "PAL_EXEC_INODES")]
pub static EXEC_INODES: HashMap<InodeKey, u32> = HashMap::with_max_entries(CAP_EXEC_INODES, 0);

#[map(name = "PAL_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Per-CPU scratch: an LPM key (`prefix_len` ‖ data), re-used as a `SeenKey` (same size and
/// layout: 4 header bytes ‖ 256 data bytes) so no 256-byte copy is ever needed. Too big for the
/// 512-byte stack alongside everything else.
#[repr(C)]
pub struct Scratch {
    pub head: u32,
    pub data: [u8; PATH_KEY_DATA],
}

#[map(name = "PAL_SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn bump(stat: u32) {
    if let Some(v) = STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *v += 1 };
    }
}

#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: per-CPU map value; programs do not nest on one CPU for these hooks.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}
