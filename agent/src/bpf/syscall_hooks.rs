//! Tier 2's programs on the syscall path (`sys_enter`, `sys_exit`, `task_newtask`): the open
//! records and the escape guards. Every syscall of the node pays for them (measured in `cargo
//! xtask bench`), so they are attached only while a policy polices a section.
use aya::programs::{BtfTracePoint, links::PinnedLink, tp_btf::BtfTracePointLinkId};
use tracing::info;

use super::loader::{Links, LoadError, Loaded, Tier, program};

/// Tier 2's programs on the syscall path (every syscall, every fork).
pub(super) const SYSCALL_HOOKS: [&str; 3] = ["sys_enter", "sys_exit", "task_newtask"];

pub(super) enum SyscallHook {
    Owned(&'static str, BtfTracePointLinkId),
    Pinned(PinnedLink),
}

impl Loaded {
    /// Tier 2: attach (or detach) the per-syscall programs. Every syscall of the node pays for
    /// them (measured in `cargo xtask bench`), so they run only while a policy needs them.
    pub fn set_syscall_hooks(&mut self, on: bool) -> Result<(), LoadError> {
        if self.tier != Tier::Compat || on == !self.syscall_hooks.is_empty() {
            return Ok(());
        }
        if !on {
            for h in self.syscall_hooks.drain(..) {
                match h {
                    SyscallHook::Owned(name, id) => {
                        if let Ok(p) = program::<BtfTracePoint>(&mut self.ebpf, name) {
                            let _ = p.detach(id);
                        }
                    }
                    SyscallHook::Pinned(l) => drop(l.unpin()),
                }
            }
            info!("per-syscall hooks detached (no policy polices a section)");
            return Ok(());
        }
        for name in SYSCALL_HOOKS {
            let err = |source| LoadError::Program { name, source };
            let p: &mut BtfTracePoint = program(&mut self.ebpf, name)?;
            let id = p.attach().map_err(err)?;
            let hook = match &self.links {
                Links::Owned(_) => SyscallHook::Owned(name, id),
                Links::Pinned { pins, .. } => {
                    let link = p.take_link(id).map_err(err)?;
                    SyscallHook::Pinned(pins.pin(name, link.into()).map_err(LoadError::Pin)?)
                }
            };
            self.syscall_hooks.push(hook);
        }
        info!("per-syscall hooks attached");
        Ok(())
    }
}
