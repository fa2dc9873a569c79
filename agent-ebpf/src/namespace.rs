//! Tier 1: `lsm/userns_create` and `lsm/path_chroot` — a policed workload may not create a user
//! namespace (the only way an unprivileged process gets a mount namespace, bind mounts and
//! `pivot_root` of its own) nor chroot (Docker's default capabilities include CAP_SYS_CHROOT),
//! unless its policy allows namespaces. Both would let it give a forbidden file an allowed name
//! (paths are rendered against the caller's root). Denied before the namespace or root exists.
use agent_common::{NS_OP_CHROOT, NS_OP_USERNS};
use aya_ebpf::{macros::lsm, programs::LsmContext};

use crate::{decide, ret};

/// `userns_create(const struct cred *cred)`; the previous program's verdict is argument 1.
#[lsm(hook = "userns_create")]
pub fn userns_create(ctx: LsmContext) -> i32 {
    guard(&ctx, NS_OP_USERNS)
}

/// `path_chroot(const struct path *path)`; the previous program's verdict is argument 1.
#[lsm(hook = "path_chroot")]
pub fn path_chroot(ctx: LsmContext) -> i32 {
    guard(&ctx, NS_OP_CHROOT)
}

#[inline(always)]
fn guard(ctx: &LsmContext, op: u8) -> i32 {
    let retval: i32 = ctx.arg(1);
    if retval != 0 {
        return ret::pass_on(retval);
    }
    let Some(sub) = decide::current() else {
        return 0;
    };
    ret::verdict(decide::confine(&sub, op, 0))
}
