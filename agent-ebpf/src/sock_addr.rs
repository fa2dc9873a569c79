//! Tier 2: `cgroup/connect4|6` and `cgroup/sendmsg4|6`, attached to each policed container's
//! cgroup. Same rules and events as the LSM hooks; returning 0 makes the syscall fail with EPERM.
use agent_common::EV_SENDMSG;
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    decide,
    net::{self, AF_INET, AF_INET6, Dest},
};

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    check(&ctx, AF_INET, 0)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    check(&ctx, AF_INET6, 0)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    check(&ctx, AF_INET, EV_SENDMSG)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    check(&ctx, AF_INET6, EV_SENDMSG)
}

#[inline(always)]
fn check(ctx: &SockAddrContext, family: u16, flags: u16) -> i32 {
    let Some(sub) = decide::current() else {
        return 1;
    };
    // SAFETY: the context pointer is valid for the program's lifetime.
    let sa = unsafe { &*ctx.sock_addr };
    let addr = if family == AF_INET {
        net::v4_mapped(sa.user_ip4.to_ne_bytes())
    } else {
        let w = [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ];
        let mut a = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = w[i].to_ne_bytes();
            a[i * 4] = b[0];
            a[i * 4 + 1] = b[1];
            a[i * 4 + 2] = b[2];
            a[i * 4 + 3] = b[3];
            i += 1;
        }
        a
    };
    let d = Dest {
        family,
        addr,
        port: u16::from_be(sa.user_port as u16),
        proto: net::proto_bits(sa.type_),
    };
    if net::decide(&sub, &d, flags) { 1 } else { 0 }
}
