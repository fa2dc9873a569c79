//! Palisade eBPF programs: one file per kernel hook; shared pieces in `maps`, `offsets`, `path`
//! and `decide`.
#![no_std]
#![no_main]
#![allow(static_mut_refs)]

mod cgroup_mkdir;
mod cgroup_rmdir;
mod connect;
mod decide;
mod exec;
mod maps;
mod namespace;
mod net;
mod offsets;
mod open;
mod path;
mod ret;
mod sched_exec;
mod sock_addr;
mod socket_create;
mod sys_enter;
mod sys_exit;
mod task_newtask;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
