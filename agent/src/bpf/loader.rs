//! Loads the eBPF object with the running kernel's struct offsets, attaches the programs of the
//! chosen enforcement tier, and hands out the maps.
use std::{collections::HashMap as StdHashMap, os::fd::AsFd, os::unix::fs::MetadataExt};

use agent_common::{
    self as abi, CgroupPathKey, CgroupPolicy, InodeKey, NetKeyData, NetRule, PathKeyData, PathRule,
};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSockAddr, Lsm, ProgramError,
        cgroup_sock_addr::CgroupSockAddrLinkId,
    },
};
use thiserror::Error;
use tracing::{debug, info};

use super::{EBPF_OBJECT, btf::KernelBtf, offsets};

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
}

const LSM_PROGRAMS: &[(&str, &str)] = &[
    ("bprm_check_security", "bprm_check_security"),
    ("file_open", "file_open"),
    ("socket_connect", "socket_connect"),
    ("socket_sendmsg", "socket_sendmsg"),
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
    pub stats: PerCpuArray<MapData, u64>,
}

/// The loaded object and its attachments. Dropping it detaches everything.
pub struct Loaded {
    ebpf: Ebpf,
    pub tier: Tier,
    cgroup_links: StdHashMap<u64, Vec<(&'static str, CgroupSockAddrLinkId)>>,
}

fn host_mntns() -> u32 {
    std::fs::metadata("/proc/self/ns/mnt")
        .map(|m| m.ino() as u32)
        .unwrap_or(0)
}

fn open_object(backstop: bool) -> Result<Ebpf, LoadError> {
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
    Ok(loader.load(EBPF_OBJECT)?)
}

/// Whether BPF-LSM programs load here (the `auto` tier probe). Loads and drops one program.
pub fn lsm_available() -> bool {
    let probe = || -> Result<(), LoadError> {
        let mut ebpf = open_object(false)?;
        let btf = Btf::from_sys_fs()?;
        let prog: &mut Lsm = program(&mut ebpf, "bprm_check_security")?;
        prog.load("bprm_check_security", &btf)
            .map_err(|source| LoadError::Program {
                name: "bprm_check_security",
                source,
            })
    };
    match probe() {
        Ok(()) => true,
        Err(e) => {
            debug!(error = %e, "BPF-LSM probe failed");
            false
        }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
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
    /// Load the object for `tier`, attach its global programs, and take the maps out.
    pub fn load(tier: Tier) -> Result<(Loaded, Maps, RingBuf<MapData>), LoadError> {
        let mut ebpf = open_object(tier == Tier::Compat)?;
        let btf = Btf::from_sys_fs()?;
        if tier == Tier::Lsm {
            for &(name, hook) in LSM_PROGRAMS {
                let p: &mut Lsm = program(&mut ebpf, name)?;
                p.load(hook, &btf)
                    .map_err(|source| LoadError::Program { name, source })?;
                p.attach()
                    .map_err(|source| LoadError::Program { name, source })?;
            }
        } else {
            for &name in SOCK_ADDR_PROGRAMS {
                let p: &mut CgroupSockAddr = program(&mut ebpf, name)?;
                p.load()
                    .map_err(|source| LoadError::Program { name, source })?;
            }
        }
        for &(name, tp) in &[
            ("sched_process_exec", "sched_process_exec"),
            ("cgroup_mkdir", "cgroup_mkdir"),
            ("cgroup_rmdir", "cgroup_rmdir"),
        ] {
            let p: &mut BtfTracePoint = program(&mut ebpf, name)?;
            p.load(tp, &btf)
                .map_err(|source| LoadError::Program { name, source })?;
            p.attach()
                .map_err(|source| LoadError::Program { name, source })?;
        }
        let maps = Maps {
            cgroups: take(&mut ebpf, abi::MAP_CGROUPS)?,
            pending: take(&mut ebpf, abi::MAP_PENDING)?,
            exec_rules: take(&mut ebpf, abi::MAP_EXEC_RULES)?,
            file_rules: take(&mut ebpf, abi::MAP_FILE_RULES)?,
            net_rules: take(&mut ebpf, abi::MAP_NET_RULES)?,
            exec_inodes: take(&mut ebpf, abi::MAP_EXEC_INODES)?,
            stats: take(&mut ebpf, abi::MAP_STATS)?,
        };
        let ring = take(&mut ebpf, abi::MAP_EVENTS)?;
        info!(%tier, "eBPF programs loaded and attached");
        Ok((
            Loaded {
                ebpf,
                tier,
                cgroup_links: StdHashMap::new(),
            },
            maps,
            ring,
        ))
    }

    /// Tier 2: attach the egress hooks to one cgroup (idempotent). `AllowMultiple` keeps any
    /// program the runtime or another tool attached.
    pub fn attach_cgroup(
        &mut self,
        cgroup_id: u64,
        dir: &std::path::Path,
    ) -> Result<(), LoadError> {
        if self.tier != Tier::Compat || self.cgroup_links.contains_key(&cgroup_id) {
            return Ok(());
        }
        let f = std::fs::File::open(dir).map_err(|source| LoadError::Cgroup {
            path: dir.display().to_string(),
            source,
        })?;
        let mut links = Vec::new();
        for &name in SOCK_ADDR_PROGRAMS {
            let p: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            match p.attach(f.as_fd(), CgroupAttachMode::AllowMultiple) {
                Ok(id) => links.push((name, id)),
                Err(source) => {
                    self.detach_links(links);
                    return Err(LoadError::Program { name, source });
                }
            }
        }
        self.cgroup_links.insert(cgroup_id, links);
        Ok(())
    }

    pub fn detach_cgroup(&mut self, cgroup_id: u64) {
        if let Some(links) = self.cgroup_links.remove(&cgroup_id) {
            self.detach_links(links);
        }
    }

    pub fn attached_cgroups(&self) -> usize {
        self.cgroup_links.len()
    }

    fn detach_links(&mut self, links: Vec<(&'static str, CgroupSockAddrLinkId)>) {
        for (name, id) in links {
            if let Ok(p) = program::<CgroupSockAddr>(&mut self.ebpf, name) {
                // A cgroup already removed has dropped the link itself.
                let _ = p.detach(id);
            }
        }
    }
}
