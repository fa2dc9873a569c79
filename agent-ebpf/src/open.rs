//! Tier 1: `lsm/file_open` — file rules per access (read / write), decided before the open
//! completes. The exec's own open (FMODE_EXEC) is left to `bprm_check_security`.
use agent_common::{ACC_READ, ACC_WRITE, EV_TRUNCATED, KIND_OPEN, POLICE_FILES};
use aya_ebpf::{macros::lsm, programs::LsmContext};

use crate::{
    decide::{self, Report},
    maps::{FILE_RULES, scratch},
    offsets::get,
    path,
};

const FMODE_READ: u32 = 0x1;
const FMODE_WRITE: u32 = 0x2;
const FMODE_EXEC: u32 = 0x20;

#[lsm(hook = "file_open")]
pub fn file_open(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(1);
    if retval != 0 {
        return crate::ret::pass_on(retval);
    }
    let Some(sub) = decide::current() else {
        return 0;
    };
    if sub.pol.flags & POLICE_FILES == 0 {
        return 0;
    }
    let file: *const u8 = ctx.arg(0);
    // SAFETY: direct load from a trusted BTF pointer at a BTF-derived offset.
    let f_mode = unsafe { *(file.add(get::OFF_FILE_F_MODE()) as *const u32) };
    if f_mode & FMODE_EXEC != 0 {
        return 0;
    }
    let mut access = 0;
    if f_mode & FMODE_READ != 0 {
        access |= ACC_READ;
    }
    if f_mode & FMODE_WRITE != 0 {
        access |= ACC_WRITE;
    }
    if access == 0 {
        // O_PATH-like opens carry no data access; count them as reads (fail closed).
        access = ACC_READ;
    }
    let Some(s) = scratch() else {
        return decide::fail_closed(&sub);
    };
    let f_path = unsafe { file.add(get::OFF_FILE_F_PATH()) };
    let mut r = Report {
        kind: KIND_OPEN,
        access,
        rule: u32::MAX,
        ..Default::default()
    };
    let (allowed, len) = match path::resolve(s, f_path, sub.pol.ruleset) {
        Ok(len) => {
            r.path_len = (len - 1) as u16;
            let rule = decide::lookup_path(s, &FILE_RULES, len);
            if let Some(rule) = rule {
                r.rule = rule.rule;
            }
            (rule.is_some_and(|x| x.allow & access == access), len)
        }
        Err(_) => {
            r.flags |= EV_TRUNCATED;
            path::put_ruleset(s, sub.pol.ruleset);
            (false, 0)
        }
    };
    decide::conclude(&sub, s, r, allowed, len)
}
