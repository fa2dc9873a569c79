//! Loads the eBPF object with the running kernel's struct offsets, attaches the programs of the
//! chosen enforcement tier, and hands out the maps.
use std::{
    collections::HashMap as StdHashMap, os::fd::AsFd, os::unix::fs::MetadataExt, path::Path,
};

use agent_common::{
    self as abi, CgroupPathKey, CgroupPolicy, InodeKey, NetKeyData, NetRule, PathKeyData, PathRule,
};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSockAddr, Lsm, ProgramError,
        cgroup_sock_addr::CgroupSockAddrLinkId,
        links::{FdLink, PinnedLink},
    },
};
use thiserror::Error;
use tracing::{debug, info};

use super::{
    EBPF_OBJECT,
    btf::KernelBtf,
    offsets,
    pins::Pins,
    syscall_hooks::{SYSCALL_HOOKS, SyscallHook},
};

/// Enforcement tier (DESIGN.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// BPF-LSM hooks decide exec, open and connect in the kernel.
    Lsm,
    /// cgroup sock_addr hooks + fanotify permission events + the exec backstop.
    Compat,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Lsm => "lsm",
            Tier::Compat => "compat",
        })
    }
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(
        "this binary carries no eBPF object (it was built with AYA_BUILD_SKIP=1); rebuild with `cargo xtask build`"
    )]
    NoObject,
    #[error(transparent)]
    Btf(#[from] super::btf::BtfError),
    #[error("aya cannot read the kernel BTF: {0}")]
    AyaBtf(#[from] aya::BtfError),
    #[error("loading the eBPF object failed: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("eBPF program `{name}`: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("eBPF map `{0}` missing or of the wrong type")]
    Map(&'static str),
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: String,
        source: std::io::Error,
    },
    #[error("pinning links in bpffs: {0}")]
    Pin(std::io::Error),
}

/// Tier-1 programs: (program name, LSM hook).
pub(super) const LSM_PROGRAMS: &[(&str, &str)] = &[
    ("bprm_check_security", "bprm_check_security"),
    ("file_open", "file_open"),
    ("socket_connect", "socket_connect"),
    ("socket_sendmsg", "socket_sendmsg"),
    ("userns_create", "userns_create"),
    ("path_chroot", "path_chroot"),
    ("socket_create", "socket_create"),
];
const SOCK_ADDR_PROGRAMS: &[&str] = &["connect4", "connect6", "sendmsg4", "sendmsg6"];

/// The maps the agent writes and reads.
pub struct Maps {
    pub cgroups: HashMap<MapData, u64, CgroupPolicy>,
    pub pending: HashMap<MapData, CgroupPathKey, CgroupPolicy>,
    pub exec_rules: LpmTrie<MapData, PathKeyData, PathRule>,
    pub file_rules: LpmTrie<MapData, PathKeyData, PathRule>,
    pub net_rules: LpmTrie<MapData, NetKeyData, NetRule>,
    pub exec_inodes: HashMap<MapData, InodeKey, u32>,
    pub open_intent: HashMap<MapData, u32, abi::OpenIntent>,
    pub stats: PerCpuArray<MapData, u64>,
}

/// How the attachments live.
pub(super) enum Links {
    /// Owned by this process: they detach when it exits (tests).
    Owned(StdHashMap<u64, Vec<(&'static str, CgroupSockAddrLinkId)>>),
    /// Pinned in bpffs: they outlive a crash; [`Loaded::release`] detaches them.
    Pinned {
        pins: Pins,
        global: Vec<PinnedLink>,
        cgroups: StdHashMap<u64, Vec<PinnedLink>>,
    },
}

/// The loaded object and its attachments.
pub struct Loaded {
    pub(super) ebpf: Ebpf,
    pub tier: Tier,
    pub(super) links: Links,
    /// Tier 2's syscall-path links while attached (pinned ones unpin on detach).
    pub(super) syscall_hooks: Vec<SyscallHook>,
}

fn host_mntns() -> u32 {
    std::fs::metadata("/proc/self/ns/mnt")
        .map(|m| m.ino() as u32)
        .unwrap_or(0)
}

/// (inode, kernel dev_t) of the host's root directory.
pub fn host_root() -> (u64, u32) {
    match std::fs::metadata("/") {
        Ok(m) => {
            let dev = m.dev();
            let (major, minor) = (libc::major(dev), libc::minor(dev));
            (m.ino(), abi::kernel_dev(major, minor))
        }
        Err(_) => (0, 0),
    }
}

pub(super) fn open_object(backstop: bool) -> Result<Ebpf, LoadError> {
    if EBPF_OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let btf = KernelBtf::from_sys()?;
    let offs = offsets::resolve(&btf)?;
    let mut loader = EbpfLoader::new();
    for (name, off) in &offs {
        debug!(global = name, offset = off, "kernel struct offset");
        loader.override_global(name, off, true);
    }
    let mntns = host_mntns();
    let backstop = backstop as u32;
    loader.override_global(abi::GLOBAL_HOST_MNTNS, &mntns, true);
    loader.override_global(abi::GLOBAL_BACKSTOP, &backstop, true);
    let (root_ino, root_dev) = host_root();
    loader.override_global(abi::GLOBAL_HOST_ROOT_INO, &root_ino, true);
    loader.override_global(abi::GLOBAL_HOST_ROOT_DEV, &root_dev, true);
    Ok(loader.load(EBPF_OBJECT)?)
}

pub(super) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(LoadError::Program {
        name,
        source: ProgramError::UnexpectedProgramType,
    })?;
    p.try_into()
        .map_err(|source| LoadError::Program { name, source })
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map>,
{
    let m = ebpf.take_map(name).ok_or(LoadError::Map(name))?;
    T::try_from(m).map_err(|_| LoadError::Map(name))
}

impl Loaded {
    /// Load the object for `tier`, attach its global programs, and take the maps out. With a
    /// `pin_root`, links are pinned there and survive the process (the agent); without, they
    /// detach when the process exits (tests).
    pub fn load(
        tier: Tier,
        pin_root: Option<&Path>,
    ) -> Result<(Loaded, Maps, RingBuf<MapData>), LoadError> {
        let mut pins = pin_root
            .map(Pins::open)
            .transpose()
            .map_err(LoadError::Pin)?;
        let mut global: Vec<PinnedLink> = Vec::new();
        let mut ebpf = open_object(tier == Tier::Compat)?;
        let btf = Btf::from_sys_fs()?;
        let err = |name| move |source| LoadError::Program { name, source };
        // Load and attach one BTF-typed program (LSM hook or tp_btf), pinning its link.
        macro_rules! attach_global {
            ($ty:ty, $name:expr, $hook:expr) => {{
                let p: &mut $ty = program(&mut ebpf, $name)?;
                p.load($hook, &btf).map_err(err($name))?;
                let id = p.attach().map_err(err($name))?;
                if let Some(pins) = &pins {
                    let link = p.take_link(id).map_err(err($name))?;
                    global.push(pins.pin($name, link.into()).map_err(LoadError::Pin)?);
                }
            }};
        }
        if tier == Tier::Lsm {
            for &(name, hook) in LSM_PROGRAMS {
                attach_global!(Lsm, name, hook);
            }
        } else {
            for &name in SOCK_ADDR_PROGRAMS {
                let p: &mut CgroupSockAddr = program(&mut ebpf, name)?;
                p.load().map_err(err(name))?;
            }
            // The open records and the escape guards (`sys_enter.rs`, `sys_exit.rs`) run on every
            // syscall of the node: loaded now, attached only while some policy polices a
            // section ([`Loaded::set_syscall_hooks`]) — or at once, if the previous instance
            // had them attached (no gap across a restart).
            for name in SYSCALL_HOOKS {
                let p: &mut BtfTracePoint = program(&mut ebpf, name)?;
                p.load(name, &btf).map_err(err(name))?;
            }
        }
        for name in ["sched_process_exec", "cgroup_mkdir", "cgroup_rmdir"] {
            attach_global!(BtfTracePoint, name, name);
        }
        let maps = Maps {
            cgroups: take(&mut ebpf, abi::MAP_CGROUPS)?,
            pending: take(&mut ebpf, abi::MAP_PENDING)?,
            exec_rules: take(&mut ebpf, abi::MAP_EXEC_RULES)?,
            file_rules: take(&mut ebpf, abi::MAP_FILE_RULES)?,
            net_rules: take(&mut ebpf, abi::MAP_NET_RULES)?,
            exec_inodes: take(&mut ebpf, abi::MAP_EXEC_INODES)?,
            open_intent: take(&mut ebpf, abi::MAP_OPEN_INTENT)?,
            stats: take(&mut ebpf, abi::MAP_STATS)?,
        };
        let ring = take(&mut ebpf, abi::MAP_EVENTS)?;
        info!(%tier, "eBPF programs loaded and attached");
        let inherit_hooks = pins.as_ref().is_some_and(|p| p.stale_has(SYSCALL_HOOKS[0]));
        let links = match pins.take() {
            Some(pins) => Links::Pinned {
                pins,
                global,
                cgroups: StdHashMap::new(),
            },
            None => Links::Owned(StdHashMap::new()),
        };
        let mut loaded = Loaded {
            ebpf,
            tier,
            links,
            syscall_hooks: Vec::new(),
        };
        if inherit_hooks {
            loaded.set_syscall_hooks(true)?;
        }
        if let Links::Pinned { pins, .. } = &mut loaded.links {
            // Ours are attached: the previous instance's may go now.
            pins.drop_stale();
        }
        Ok((loaded, maps, ring))
    }

    /// Tier 2: attach the egress hooks to one cgroup (idempotent). These are bpf_links, which
    /// the kernel always runs alongside other programs; it rejects any explicit attach flag.
    pub fn attach_cgroup(&mut self, cgroup_id: u64, dir: &Path) -> Result<(), LoadError> {
        if self.tier != Tier::Compat || self.is_attached(cgroup_id) {
            return Ok(());
        }
        let f = std::fs::File::open(dir).map_err(|source| LoadError::Cgroup {
            path: dir.display().to_string(),
            source,
        })?;
        let mut ids = Vec::new();
        for &name in SOCK_ADDR_PROGRAMS {
            let p: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            match p.attach(f.as_fd(), CgroupAttachMode::Single) {
                Ok(id) => ids.push((name, id)),
                Err(source) => {
                    self.detach_ids(ids);
                    return Err(LoadError::Program { name, source });
                }
            }
        }
        match &mut self.links {
            Links::Owned(m) => {
                m.insert(cgroup_id, ids);
            }
            Links::Pinned { pins, cgroups, .. } => {
                let mut pinned = Vec::new();
                for (name, id) in ids {
                    let p: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
                    let link = p
                        .take_link(id)
                        .map_err(|source| LoadError::Program { name, source })?;
                    let fd = FdLink::try_from(link)
                        .map_err(|e| LoadError::Pin(std::io::Error::other(e)))?;
                    pinned.push(
                        pins.pin(&format!("cg{cgroup_id}-{name}"), fd)
                            .map_err(LoadError::Pin)?,
                    );
                }
                cgroups.insert(cgroup_id, pinned);
            }
        }
        Ok(())
    }

    fn is_attached(&self, cgroup_id: u64) -> bool {
        match &self.links {
            Links::Owned(m) => m.contains_key(&cgroup_id),
            Links::Pinned { cgroups, .. } => cgroups.contains_key(&cgroup_id),
        }
    }

    pub fn detach_cgroup(&mut self, cgroup_id: u64) {
        match &mut self.links {
            Links::Owned(m) => {
                if let Some(ids) = m.remove(&cgroup_id) {
                    self.detach_ids(ids);
                }
            }
            Links::Pinned { cgroups, .. } => {
                for l in cgroups.remove(&cgroup_id).unwrap_or_default() {
                    // Unpinning returns the last reference; dropping it detaches. A removed
                    // cgroup has dropped its programs already.
                    drop(l.unpin());
                }
            }
        }
    }

    pub fn attached_cgroups(&self) -> usize {
        match &self.links {
            Links::Owned(m) => m.len(),
            Links::Pinned { cgroups, .. } => cgroups.len(),
        }
    }

    fn detach_ids(&mut self, ids: Vec<(&'static str, CgroupSockAddrLinkId)>) {
        for (name, id) in ids {
            if let Ok(p) = program::<CgroupSockAddr>(&mut self.ebpf, name) {
                let _ = p.detach(id);
            }
        }
    }

    /// Clean shutdown: unpin and detach everything this instance attached.
    pub fn release(&mut self) {
        if let Links::Pinned {
            pins,
            global,
            cgroups,
        } = &mut self.links
        {
            let hooks = self.syscall_hooks.drain(..).filter_map(|h| match h {
                SyscallHook::Pinned(l) => Some(l),
                SyscallHook::Owned(..) => None,
            });
            for l in global
                .drain(..)
                .chain(cgroups.drain().flat_map(|(_, v)| v))
                .chain(hooks)
            {
                drop(l.unpin());
            }
            pins.remove();
        }
    }
}
