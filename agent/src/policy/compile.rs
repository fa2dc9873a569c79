//! `compile`: a validated policy to exactly the entries of the kernel maps, plus userspace
//! evaluators over those same entries (tier 2 answers fanotify with them, so both tiers agree).
use std::net::IpAddr;

use agent_common::{
    ACC_EXEC, ALLOW_FILELESS, ALLOW_NAMESPACES, ALLOW_RAW_SOCKETS, NET_MAX_PORTS, POLICE_EXEC,
    POLICE_FILES, POLICE_NET,
};

use super::error::{ErrorKind, PolicyError};
use super::model::{Action, Policy};
use super::net::{NetTable, SrcNet, ports_allow};
use super::paths::{PathTable, SrcPath};

/// Outcome of a check: `rule` is the index of the source rule of the matched entry (in
/// `exec.allow`, `files` or `network.egress`), `None` when nothing matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub rule: Option<u32>,
}

impl Decision {
    const UNPOLICED: Decision = Decision {
        allowed: true,
        rule: None,
    };
    const NO_MATCH: Decision = Decision {
        allowed: false,
        rule: None,
    };
}

fn rule_index(i: u32) -> Option<u32> {
    (i != u32::MAX).then_some(i)
}

/// What goes into the kernel maps for one policy, independent of the ruleset id.
#[derive(Clone, Debug, Default)]
pub struct CompiledPolicy {
    /// `MODE_*`.
    pub mode: u8,
    /// `POLICE_*` | `ALLOW_FILELESS`.
    pub flags: u8,
    pub exec: PathTable,
    pub files: PathTable,
    pub net: NetTable,
}

/// Compile one policy. Fails only on kernel limits (too many port ranges on one prefix);
/// [`super::parse_str`] runs it, so a loaded policy always compiles.
pub fn compile(policy: &Policy) -> Result<CompiledPolicy, PolicyError> {
    let mut flags = 0u8;
    let exec = match &policy.exec {
        None => PathTable::default(),
        Some(e) => {
            flags |= POLICE_EXEC;
            if e.allow_fileless {
                flags |= ALLOW_FILELESS;
            }
            if e.allow_namespaces {
                flags |= ALLOW_NAMESPACES;
            }
            let src: Vec<SrcPath<'_>> = e
                .allow
                .iter()
                .map(|r| SrcPath {
                    path: &r.path,
                    bits: ACC_EXEC,
                    allow: true,
                })
                .collect();
            PathTable::build(&src)
        }
    };
    let files = match &policy.files {
        None => PathTable::default(),
        Some(rules) => {
            flags |= POLICE_FILES;
            let src: Vec<SrcPath<'_>> = rules
                .iter()
                .map(|r| SrcPath {
                    path: &r.path,
                    bits: r.access.bits(),
                    allow: r.action == Action::Allow,
                })
                .collect();
            PathTable::build(&src)
        }
    };
    let net = match &policy.network {
        None => NetTable::default(),
        Some(n) => {
            flags |= POLICE_NET;
            if n.allow_raw_sockets {
                flags |= ALLOW_RAW_SOCKETS;
            }
            let src: Vec<SrcNet> = n
                .egress
                .iter()
                .map(|r| SrcNet {
                    net: r.cidr,
                    ports: r.ports.as_ref().map_or_else(
                        || vec![(0, u16::MAX)],
                        |p| p.iter().map(|p| (p.lo, p.hi)).collect(),
                    ),
                    proto: r.protocol.bits(),
                })
                .collect();
            NetTable::build(&src).map_err(|e| {
                let i = e.rule as usize;
                PolicyError::new(
                    ErrorKind::Limit,
                    &policy.source.file,
                    n.egress[i].pos,
                    format!("spec.network.egress[{i}]"),
                    format!(
                        "{} needs {} port ranges after merging the rules that cover it (at most {NET_MAX_PORTS})",
                        n.egress[i].cidr, e.count
                    ),
                )
            })?
        }
    };
    Ok(CompiledPolicy {
        mode: policy.mode.as_u8(),
        flags,
        exec,
        files,
        net,
    })
}

impl CompiledPolicy {
    /// Exec of the file at `path` (as `d_path` renders it).
    pub fn check_exec(&self, path: &[u8]) -> Decision {
        if self.flags & POLICE_EXEC == 0 {
            return Decision::UNPOLICED;
        }
        match self.exec.lookup(path) {
            None => Decision::NO_MATCH,
            Some(r) => Decision {
                allowed: r.allow & ACC_EXEC != 0,
                rule: rule_index(r.rule),
            },
        }
    }

    /// Open of `path` for `access` (`ACC_READ` | `ACC_WRITE`): allowed only if every bit is.
    pub fn check_file(&self, path: &[u8], access: u8) -> Decision {
        if self.flags & POLICE_FILES == 0 {
            return Decision::UNPOLICED;
        }
        match self.files.lookup(path) {
            None => Decision::NO_MATCH,
            Some(r) => Decision {
                allowed: r.allow & access == access,
                rule: rule_index(r.rule),
            },
        }
    }

    /// Connect (or sendmsg) to `addr:port` with protocol `proto` (`PROTO_TCP` or `PROTO_UDP`).
    pub fn check_connect(&self, addr: IpAddr, port: u16, proto: u8) -> Decision {
        if self.flags & POLICE_NET == 0 {
            return Decision::UNPOLICED;
        }
        match self.net.lookup(addr) {
            None => Decision::NO_MATCH,
            Some(r) => Decision {
                allowed: ports_allow(r, port, proto),
                rule: rule_index(r.rule),
            },
        }
    }
}
