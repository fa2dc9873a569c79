//! Tier 1: `lsm/socket_connect` and `lsm/socket_sendmsg` (UDP with an explicit destination).
use agent_common::{EV_SENDMSG, EV_TRUNCATED};
use aya_ebpf::{macros::lsm, programs::LsmContext};

use crate::{
    decide,
    net::{self, AF_INET, AF_INET6, AF_UNSPEC, Dest},
    offsets::{get, read},
    ret,
};

#[lsm(hook = "socket_connect")]
pub fn socket_connect(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(3);
    if retval != 0 {
        return ret::pass_on(retval);
    }
    let Some(sub) = decide::current() else {
        return 0;
    };
    let sock: *const u8 = ctx.arg(0);
    let addr: *const u8 = ctx.arg(1);
    let addrlen: i32 = ctx.arg(2);
    verdict(&sub, sock, addr, addrlen, 0)
}

#[lsm(hook = "socket_sendmsg")]
pub fn socket_sendmsg(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(3);
    if retval != 0 {
        return ret::pass_on(retval);
    }
    let Some(sub) = decide::current() else {
        return 0;
    };
    let sock: *const u8 = ctx.arg(0);
    let msg: *const u8 = ctx.arg(1);
    // Any socket type: a stream socket's `sendto(MSG_FASTOPEN)` connects and sends in one call
    // (TCP Fast Open), and no `socket_connect` runs for it.
    // SAFETY: probe reads of kernel memory at BTF-derived offsets.
    let Ok(name) = (unsafe { read::<*const u8>(msg, get::OFF_MSGHDR_MSG_NAME()) }) else {
        return decide::fail_closed(&sub);
    };
    if name.is_null() {
        // Connected socket: its destination was policed at connect.
        return 0;
    }
    verdict(&sub, sock, name, 128, EV_SENDMSG)
}

/// The family the kernel reads a destination as: `AF_UNSPEC` in a `sendmsg` to an IP socket is
/// taken as the socket's own family (UDP delivers it), in a `connect` it disconnects.
#[inline(always)]
fn effective_family(family: u16, sock: *const u8, sending: bool) -> u16 {
    if family != AF_UNSPEC || !sending {
        return family;
    }
    // SAFETY: probe reads of kernel memory at BTF-derived offsets; failure is AF_UNSPEC.
    unsafe {
        read::<*const u8>(sock, get::OFF_SOCKET_SK())
            .and_then(|sk| read::<u16>(sk, get::OFF_SOCK_FAMILY()))
            .unwrap_or(AF_UNSPEC)
    }
}

#[inline(always)]
fn verdict(
    sub: &decide::Subject,
    sock: *const u8,
    addr: *const u8,
    addrlen: i32,
    flags: u16,
) -> i32 {
    // SAFETY: probe reads of kernel memory.
    let family = unsafe { read::<u16>(addr, 0) }.unwrap_or(0);
    let family = effective_family(family, sock, flags & EV_SENDMSG != 0);
    if family != AF_INET && family != AF_INET6 {
        return 0;
    }
    let sock_type = unsafe { read::<u16>(sock, get::OFF_SOCKET_TYPE()) }.unwrap_or(0) as u32;
    let mut d = Dest {
        family,
        addr: [0; 16],
        port: 0,
        proto: net::proto_bits(sock_type),
    };
    let mut flags = flags;
    let port = unsafe { read::<u16>(addr, 2) };
    let ok = if family == AF_INET {
        let a = unsafe { read::<[u8; 4]>(addr, 4) };
        match (addrlen >= 16, port, a) {
            (true, Ok(p), Ok(a)) => {
                d.port = u16::from_be(p);
                d.addr = net::v4_mapped(a);
                true
            }
            _ => false,
        }
    } else {
        let a = unsafe { read::<[u8; 16]>(addr, 8) };
        match (addrlen >= 24, port, a) {
            (true, Ok(p), Ok(a)) => {
                d.port = u16::from_be(p);
                d.addr = a;
                true
            }
            _ => false,
        }
    };
    if !ok {
        flags |= EV_TRUNCATED;
    }
    ret::verdict(!net::decide(sub, &d, flags))
}
