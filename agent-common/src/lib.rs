//! The one ABI shared by the eBPF programs and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding fields, and its size is asserted at compile
//! time, so the kernel and userspace cannot drift apart silently.
#![no_std]

use core::mem::size_of;

// ---------------------------------------------------------------------------------------------
// Map names (as they appear in the eBPF object).
// ---------------------------------------------------------------------------------------------

/// `HashMap<u64 cgroup id, CgroupPolicy>`: which cgroups are policed, and how.
pub const MAP_CGROUPS: &str = "PAL_CGROUPS";
/// `HashMap<CgroupPathKey, CgroupPolicy>`: policies waiting for a cgroup that does not exist yet
/// (keyed by its path relative to the cgroup2 mount). The `cgroup_mkdir` hook moves the entry
/// into `PAL_CGROUPS` the moment the cgroup is created, before any process can enter it.
pub const MAP_PENDING: &str = "PAL_PENDING";
/// `LpmTrie<PathKeyData, PathRule>`: exec allow-list, keyed by ruleset id ‖ path.
pub const MAP_EXEC_RULES: &str = "PAL_EXEC_RULES";
/// `LpmTrie<PathKeyData, PathRule>`: file rules, keyed by ruleset id ‖ path.
pub const MAP_FILE_RULES: &str = "PAL_FILE_RULES";
/// `LpmTrie<NetKeyData, NetRule>`: egress rules, keyed by ruleset id ‖ IPv6 (v4 is v4-mapped).
pub const MAP_NET_RULES: &str = "PAL_NET_RULES";
/// `RingBuf` of [`Event`].
pub const MAP_EVENTS: &str = "PAL_EVENTS";
/// `LruHashMap<SeenKey, u8>`: learn-mode de-duplication (one event per distinct observation).
pub const MAP_SEEN: &str = "PAL_SEEN";
/// `HashMap<InodeKey, u32>`: tier-2 exec backstop, images the agent allowed (value: ruleset).
pub const MAP_EXEC_INODES: &str = "PAL_EXEC_INODES";
/// `LruHashMap<u32, OpenIntent>`: tier 2, the open flags of each policed thread's open syscall
/// in progress (tid → flags), recorded by the kernel at syscall entry and removed at its exit.
pub const MAP_OPEN_INTENT: &str = "PAL_OPEN_INTENT";
/// `PerCpuArray<u64>` of counters, indexed by the `STAT_*` constants.
pub const MAP_STATS: &str = "PAL_STATS";

// Read-only globals the agent sets at load time (struct member offsets from BTF).
pub const GLOBAL_OFF_BPRM_FILE: &str = "OFF_BPRM_FILE";
pub const GLOBAL_OFF_BPRM_FILENAME: &str = "OFF_BPRM_FILENAME";
pub const GLOBAL_OFF_FILE_F_PATH: &str = "OFF_FILE_F_PATH";
pub const GLOBAL_OFF_FILE_F_INODE: &str = "OFF_FILE_F_INODE";
pub const GLOBAL_OFF_FILE_F_MODE: &str = "OFF_FILE_F_MODE";
pub const GLOBAL_OFF_INODE_I_INO: &str = "OFF_INODE_I_INO";
pub const GLOBAL_OFF_INODE_I_SB: &str = "OFF_INODE_I_SB";
pub const GLOBAL_OFF_INODE_I_NLINK: &str = "OFF_INODE_I_NLINK";
pub const GLOBAL_OFF_SB_S_DEV: &str = "OFF_SB_S_DEV";
pub const GLOBAL_OFF_MSGHDR_MSG_NAME: &str = "OFF_MSGHDR_MSG_NAME";
pub const GLOBAL_OFF_SOCKET_TYPE: &str = "OFF_SOCKET_TYPE";
pub const GLOBAL_OFF_PATH_DENTRY: &str = "OFF_PATH_DENTRY";
pub const GLOBAL_OFF_DENTRY_D_HASH_PPREV: &str = "OFF_DENTRY_D_HASH_PPREV";
pub const GLOBAL_OFF_TASK_NSPROXY: &str = "OFF_TASK_NSPROXY";
pub const GLOBAL_OFF_NSPROXY_MNT_NS: &str = "OFF_NSPROXY_MNT_NS";
pub const GLOBAL_OFF_MNT_NS_INUM: &str = "OFF_MNT_NS_INUM";
pub const GLOBAL_OFF_CGROUP_KN: &str = "OFF_CGROUP_KN";
pub const GLOBAL_OFF_CGROUP_PARENT: &str = "OFF_CGROUP_PARENT";
pub const GLOBAL_OFF_KERNFS_NODE_ID: &str = "OFF_KERNFS_NODE_ID";
pub const GLOBAL_OFF_CGROUP_ROOT: &str = "OFF_CGROUP_ROOT";
pub const GLOBAL_OFF_CGROUP_ROOT_HIERARCHY_ID: &str = "OFF_CGROUP_ROOT_HIERARCHY_ID";
pub const GLOBAL_OFF_TASK_FS: &str = "OFF_TASK_FS";
pub const GLOBAL_OFF_FS_ROOT: &str = "OFF_FS_ROOT";
pub const GLOBAL_OFF_DENTRY_D_INODE: &str = "OFF_DENTRY_D_INODE";
pub const GLOBAL_OFF_DENTRY_D_SB: &str = "OFF_DENTRY_D_SB";
pub const GLOBAL_OFF_TASK_TI_STATUS: &str = "OFF_TASK_TI_STATUS";
pub const GLOBAL_OFF_SOCKET_SK: &str = "OFF_SOCKET_SK";
pub const GLOBAL_OFF_SOCK_FAMILY: &str = "OFF_SOCK_FAMILY";
/// `pt_regs` argument registers of a syscall (x86_64: rdi, rsi, rdx) and its number.
pub const GLOBAL_OFF_REGS_DI: &str = "OFF_REGS_DI";
pub const GLOBAL_OFF_REGS_SI: &str = "OFF_REGS_SI";
pub const GLOBAL_OFF_REGS_DX: &str = "OFF_REGS_DX";
pub const GLOBAL_OFF_REGS_ORIG_AX: &str = "OFF_REGS_ORIG_AX";
/// `current->files->fdt->fd[]` (and its bound) for the file an open returned.
pub const GLOBAL_OFF_TASK_FILES: &str = "OFF_TASK_FILES";
pub const GLOBAL_OFF_FILES_FDT: &str = "OFF_FILES_FDT";
pub const GLOBAL_OFF_FDT_FD: &str = "OFF_FDT_FD";
pub const GLOBAL_OFF_FDT_MAX_FDS: &str = "OFF_FDT_MAX_FDS";
pub const GLOBAL_OFF_TASK_TGID: &str = "OFF_TASK_TGID";
/// Inode number and kernel dev_t of the host's root directory.
pub const GLOBAL_HOST_ROOT_INO: &str = "HOST_ROOT_INO";
pub const GLOBAL_HOST_ROOT_DEV: &str = "HOST_ROOT_DEV";
/// Inode number of the agent's (host) mount namespace.
pub const GLOBAL_HOST_MNTNS: &str = "HOST_MNTNS";
/// Non-zero: the tier-2 exec backstop is active (`sched_process_exec` kills/stops images).
pub const GLOBAL_BACKSTOP: &str = "BACKSTOP";

// ---------------------------------------------------------------------------------------------
// Map capacities (max entries), shared so the agent can report how full each map is.
// ---------------------------------------------------------------------------------------------

pub const CAP_CGROUPS: u32 = 16384;
pub const CAP_PENDING: u32 = 1024;
pub const CAP_EXEC_RULES: u32 = 65536;
pub const CAP_FILE_RULES: u32 = 65536;
pub const CAP_NET_RULES: u32 = 16384;
pub const CAP_SEEN: u32 = 65536;
pub const CAP_EXEC_INODES: u32 = 65536;
/// Threads of policed containers inside an open syscall at once (LRU: an evicted entry makes
/// the open's mode unknown, which fails closed as a write).
pub const CAP_OPEN_INTENT: u32 = 16384;

// ---------------------------------------------------------------------------------------------
// Sizes.
// ---------------------------------------------------------------------------------------------

/// LPM trie key data size (the kernel maximum for trie data is 256 bytes).
pub const PATH_KEY_DATA: usize = 256;
/// Bytes of the key taken by the ruleset id.
pub const RULESET_BYTES: usize = 4;
/// Room for a path including its terminating NUL. Longer paths fail closed in enforce mode.
pub const PATH_MAX: usize = PATH_KEY_DATA - RULESET_BYTES;
/// Maximum port ranges per egress trie node (the compiler merges ancestors' ranges in).
pub const NET_MAX_PORTS: usize = 16;
/// Bytes of an egress key: ruleset id ‖ 16-byte address.
pub const NET_KEY_DATA: usize = RULESET_BYTES + 16;

// ---------------------------------------------------------------------------------------------
// Modes, access bits, verdicts, event kinds, flags.
// ---------------------------------------------------------------------------------------------

pub const MODE_LEARN: u8 = 1;
pub const MODE_MONITOR: u8 = 2;
pub const MODE_ENFORCE: u8 = 3;

/// `CgroupPolicy::flags`: which sections the policy polices (an absent section is not policed).
pub const POLICE_EXEC: u8 = 1;
pub const POLICE_FILES: u8 = 2;
pub const POLICE_NET: u8 = 4;
/// `CgroupPolicy::flags`: the policy allows fileless (memfd / deleted file) exec explicitly.
pub const ALLOW_FILELESS: u8 = 8;
/// `CgroupPolicy::flags`: a runtime container; operations of processes whose root is still the
/// host's root directory (the runtime's own `runc init` and helpers before `pivot_root`) are
/// not the workload's and are not policed. Never set for cgroups bound by path.
pub const CONTAINER: u8 = 16;
/// `CgroupPolicy::flags`, tier 2: the container's mounts carry fanotify marks. Until the agent
/// sets it, the exec backstop stops every exec of the cgroup for the agent (which marks the
/// mounts first), so no exec or open runs unmarked.
pub const MARKED: u8 = 32;
/// `CgroupPolicy::flags`: the policy lets the workload create user or mount namespaces and
/// chroot (`exec.allowNamespaces`). Without it, a policed workload that tries is denied in
/// enforce: a new namespace or root is a way around path-based exec and file rules.
pub const ALLOW_NAMESPACES: u8 = 64;
/// `CgroupPolicy::flags`: the policy lets the workload open raw, packet and ICMP "ping"
/// sockets (`network.allowRawSockets`); without it they are denied where `network` is policed.
pub const ALLOW_RAW_SOCKETS: u8 = 128;

/// Access bits (`PathRule::allow`, `Event::access`).
pub const ACC_EXEC: u8 = 1;
pub const ACC_READ: u8 = 2;
pub const ACC_WRITE: u8 = 4;

/// Protocol bits (`PortRange::proto`).
pub const PROTO_TCP: u8 = 1;
pub const PROTO_UDP: u8 = 2;

pub const KIND_EXEC: u8 = 1;
pub const KIND_OPEN: u8 = 2;
pub const KIND_CONNECT: u8 = 3;
/// A pending policy was bound to a new cgroup by the `cgroup_mkdir` hook.
pub const KIND_CGROUP_BOUND: u8 = 4;
/// A policed workload tried to leave what the policy relies on: its namespaces, its root, or
/// the 64-bit syscall ABI the tier-2 guards watch; `Event::access` is the `NS_OP_*`.
pub const KIND_ESCAPE: u8 = 5;

/// `Event::access` of a `KIND_ESCAPE` event.
pub const NS_OP_USERNS: u8 = 1;
pub const NS_OP_MOUNTNS: u8 = 2;
pub const NS_OP_CHROOT: u8 = 3;
/// A 32-bit (`int 0x80` / ia32) syscall: invisible to the syscall tracepoints tier 2 relies on.
pub const NS_OP_IA32: u8 = 4;
/// Raw IPv4/IPv6 socket (`SOCK_RAW`): sends any packet, past the egress rules.
pub const NS_OP_RAW_SOCKET: u8 = 5;
/// `AF_PACKET` (or the obsolete `SOCK_PACKET`) socket: link-level frames.
pub const NS_OP_PACKET_SOCKET: u8 = 6;
/// ICMP "ping" datagram socket (`SOCK_DGRAM` + `IPPROTO_ICMP`/`IPPROTO_ICMPV6`).
pub const NS_OP_PING_SOCKET: u8 = 7;
/// `openat2` whose `open_how.flags` were rewritten between the agent's read and the kernel's
/// copy: the file came back writable although a read was judged.
pub const NS_OP_OPEN_RACE: u8 = 8;

/// Allowed by the rules (only exec audit events carry it).
pub const VERDICT_ALLOWED: u8 = 1;
/// Not allowed by the rules, allowed anyway because the mode is monitor.
pub const VERDICT_VIOLATION: u8 = 2;
/// Not allowed, denied (enforce).
pub const VERDICT_DENIED: u8 = 3;
/// Learn-mode observation (first sighting in this ruleset generation).
pub const VERDICT_LEARNED: u8 = 4;

/// `Event::flags`.
pub const EV_FILELESS: u16 = 1;
/// The path did not fit the key (or `d_path` failed): the event's path is partial or empty.
pub const EV_TRUNCATED: u16 = 2;
/// An internal lookup failed; the verdict is the fail-closed one.
pub const EV_LOOKUP_ERROR: u16 = 4;
/// Emitted by the tier-2 exec backstop (the process was SIGKILLed before its first instruction).
pub const EV_KILLED: u16 = 8;
/// Connect event came from `sendmsg` (unconnected UDP) rather than `connect`.
pub const EV_SENDMSG: u16 = 16;
/// Exec audit event: the image filename is as the caller passed it (may be relative).
pub const EV_FILENAME_AS_PASSED: u16 = 32;
/// Tier-2 backstop: the image is not known to be allowed; the process was SIGSTOPped before its
/// first instruction and waits for the agent's verdict (SIGCONT or SIGKILL).
pub const EV_STOPPED: u16 = 64;
/// Caught after the fact: the flags the guard read at syscall entry were rewritten before the
/// kernel copied them (a `clone3` race caught at `task_newtask`, an `openat2` one at exit).
pub const EV_RACE: u16 = 128;

/// `PAL_STATS` indices.
pub const STAT_RINGBUF_DROPS: u32 = 0;
pub const STAT_PATH_ERRORS: u32 = 1;
pub const STAT_DENIED: u32 = 2;
pub const STAT_VIOLATIONS: u32 = 3;
pub const STAT_LEARN_DUPES: u32 = 4;
pub const STAT_COUNT: u32 = 8;

// ---------------------------------------------------------------------------------------------
// Map keys and values.
// ---------------------------------------------------------------------------------------------

/// Value of `PAL_CGROUPS`. Flipping a cgroup from one ruleset to the next is a single map update,
/// so a container is never under half a policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupPolicy {
    /// Stable id of the policy (for events).
    pub policy_id: u32,
    /// Id of the compiled rule set in the tries (new for every policy generation).
    pub ruleset: u32,
    pub mode: u8,
    /// `POLICE_*` | `ALLOW_FILELESS`.
    pub flags: u8,
    pub _pad: [u8; 6],
}

/// Data of an LPM key for path rules: `ruleset` big-endian ‖ path bytes ‖ NUL ‖ zeroes.
/// Directory rules end in `/` and are stored without NUL, so they match as prefixes; exact
/// rules include the NUL, so `/etc/shadow` does not match `/etc/shadow.bak`.
pub type PathKeyData = [u8; PATH_KEY_DATA];

/// Value of the path tries. The compiler materialises inheritance, so the longest match alone
/// decides: `allow` holds the access bits allowed at this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathRule {
    /// `ACC_*` bits allowed.
    pub allow: u8,
    pub _pad: [u8; 3],
    /// Index of the source rule that decided (for events; `u32::MAX` = none).
    pub rule: u32,
}

/// Data of an LPM key for egress rules: `ruleset` big-endian ‖ IPv6 address (v4 as `::ffff:a.b.c.d`).
pub type NetKeyData = [u8; NET_KEY_DATA];

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
    /// `PROTO_*` bits.
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of `PAL_NET_RULES`: the union of all port ranges allowed for this prefix (ancestors
/// included, merged by the compiler).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRule {
    pub count: u32,
    pub rule: u32,
    pub ports: [PortRange; NET_MAX_PORTS],
}

/// Key of `PAL_SEEN` (learn-mode de-duplication).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeenKey {
    pub kind: u8,
    pub access: u8,
    pub port: u16,
    /// `ruleset` ‖ path or address, as in the trie keys.
    pub data: [u8; PATH_KEY_DATA],
}

/// Bytes of a `PAL_PENDING` key (cgroup path, NUL-padded).
pub const CGROUP_PATH_KEY: usize = 128;
pub type CgroupPathKey = [u8; CGROUP_PATH_KEY];

/// Key of `PAL_EXEC_INODES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InodeKey {
    pub ruleset: u32,
    /// Kernel `dev_t` of the superblock (`MKDEV` encoding: major << 20 | minor).
    pub dev: u32,
    pub ino: u64,
}

/// Value of `PAL_OPEN_INTENT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenIntent {
    /// `open(2)` flags as the kernel received them.
    pub flags: u64,
    /// `INTENT_*`: where the flags came from.
    pub source: u32,
    pub _pad: u32,
}

/// Flags from a syscall register (`open`, `openat`, `creat`, `open_by_handle_at`): exactly
/// what the kernel uses; no other thread can change them.
pub const INTENT_REGISTER: u32 = 1;
/// Flags read from the caller's memory at entry (`openat2`'s `struct open_how`): another
/// thread can change them before the kernel copies them.
pub const INTENT_USER_MEMORY: u32 = 2;

/// Kernel-internal `dev_t` (major << 20 | minor) from a userspace `st_dev`.
pub const fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | minor
}

// ---------------------------------------------------------------------------------------------
// Event record (ring buffer).
// ---------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub ts_ns: u64,
    pub cgroup_id: u64,
    /// Exec: inode number of the image (tier-2 backstop).
    pub ino: u64,
    pub pid: u32,
    pub tgid: u32,
    pub policy_id: u32,
    pub ruleset: u32,
    /// Source rule that decided, `u32::MAX` for none.
    pub rule: u32,
    /// Exec: kernel dev_t of the image's superblock.
    pub dev: u32,
    pub kind: u8,
    pub verdict: u8,
    pub mode: u8,
    /// `ACC_*` for exec/open, `PROTO_*` for connect.
    pub access: u8,
    pub flags: u16,
    /// Destination port (host order) for connect.
    pub port: u16,
    /// Length of `path` excluding NUL (0 when unknown).
    pub path_len: u16,
    /// `AF_INET` / `AF_INET6` for connect.
    pub family: u16,
    /// Destination address (v4 as v4-mapped v6).
    pub addr: [u8; 16],
    pub comm: [u8; 16],
    pub path: [u8; PATH_MAX],
}

// Compile-time layout checks: the sizes below are the sum of the fields, so there is no implicit
// padding anywhere.
const _: () = assert!(size_of::<CgroupPolicy>() == 16);
const _: () = assert!(size_of::<PathRule>() == 8);
const _: () = assert!(size_of::<PortRange>() == 8);
const _: () = assert!(size_of::<NetRule>() == 8 + 8 * NET_MAX_PORTS);
const _: () = assert!(size_of::<SeenKey>() == 4 + PATH_KEY_DATA);
const _: () = assert!(size_of::<InodeKey>() == 16);
const _: () = assert!(size_of::<Event>() == 3 * 8 + 6 * 4 + 4 + 4 * 2 + 16 + 16 + PATH_MAX);
const _: () = assert!(size_of::<Event>() % 8 == 0);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain-old-data, `#[repr(C)]`, no implicit padding (asserted above).
    unsafe impl aya::Pod for CgroupPolicy {}
    unsafe impl aya::Pod for PathRule {}
    unsafe impl aya::Pod for PortRange {}
    unsafe impl aya::Pod for NetRule {}
    unsafe impl aya::Pod for SeenKey {}
    unsafe impl aya::Pod for InodeKey {}
    unsafe impl aya::Pod for OpenIntent {}
    unsafe impl aya::Pod for Event {}
}

impl Event {
    /// The path bytes (without NUL).
    pub fn path_bytes(&self) -> &[u8] {
        let n = (self.path_len as usize).min(PATH_MAX);
        &self.path[..n]
    }
}

/// Encode a ruleset id the way the tries expect it (big-endian, so it is the key's prefix).
pub const fn ruleset_bytes(ruleset: u32) -> [u8; 4] {
    ruleset.to_be_bytes()
}
