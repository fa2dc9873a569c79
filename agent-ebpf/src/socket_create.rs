//! Tier 1: `lsm/socket_create` — raw, packet and ICMP "ping" sockets send past the egress
//! rules (a raw UDP packet reaches any port, ICMP any host). Where a policy polices `network`
//! they are denied before the socket exists, unless it sets `network.allowRawSockets`.
use agent_common::{ALLOW_RAW_SOCKETS, POLICE_NET};
use aya_ebpf::{macros::lsm, programs::LsmContext};

use crate::{decide, net, ret};

/// `socket_create(int family, int type, int protocol, int kern)`; verdict so far is argument 4.
#[lsm(hook = "socket_create")]
pub fn socket_create(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(4);
    if retval != 0 {
        return ret::pass_on(retval);
    }
    let kern: i32 = ctx.arg(3);
    if kern != 0 {
        return 0;
    }
    let family: i32 = ctx.arg(0);
    let ty: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let Some(op) = net::raw_socket_op(family as u16, ty as u32, protocol as u32) else {
        return 0;
    };
    let Some(sub) = decide::current() else {
        return 0;
    };
    ret::verdict(decide::escape(&sub, op, 0, POLICE_NET, ALLOW_RAW_SOCKETS))
}
