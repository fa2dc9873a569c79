//! Tier 1: `lsm/bprm_check_security` — the exec allow-list, decided before the image runs.
use agent_common::{ACC_EXEC, ALLOW_FILELESS, EV_FILELESS, EV_TRUNCATED, KIND_EXEC, POLICE_EXEC};
use aya_ebpf::{macros::lsm, programs::LsmContext};

use crate::{
    decide::{self, Report},
    maps::{EXEC_RULES, scratch},
    offsets::get,
    path,
};

#[lsm(hook = "bprm_check_security")]
pub fn bprm_check_security(ctx: LsmContext) -> i32 {
    // Respect an earlier LSM's denial (clamped to a valid errno range).
    let retval: i32 = ctx.arg(1);
    if retval != 0 {
        return crate::ret::pass_on(retval);
    }
    let Some(sub) = decide::current() else {
        return 0;
    };
    if sub.pol.flags & POLICE_EXEC == 0 {
        return 0;
    }
    let bprm: *const u8 = ctx.arg(0);
    // SAFETY: direct loads from trusted BTF pointers at BTF-derived offsets.
    let file = unsafe { *(bprm.add(get::OFF_BPRM_FILE()) as *const *const u8) };
    let Some(s) = scratch() else {
        return decide::fail_closed(&sub);
    };
    let f_path = unsafe { file.add(get::OFF_FILE_F_PATH()) };
    let mut r = Report {
        kind: KIND_EXEC,
        access: ACC_EXEC,
        rule: u32::MAX,
        ..Default::default()
    };
    let (allowed, len) = match path::resolve(s, f_path, sub.pol.ruleset) {
        Ok(len) => {
            r.path_len = (len - 1) as u16;
            let fileless = path::is_deleted_suffix(s, len);
            let rule = decide::lookup_path(s, &EXEC_RULES, len);
            if let Some(rule) = rule {
                r.rule = rule.rule;
            }
            let by_rule = rule.is_some_and(|x| x.allow & ACC_EXEC != 0);
            if fileless {
                r.flags |= EV_FILELESS;
                (sub.pol.flags & ALLOW_FILELESS != 0, len)
            } else {
                (by_rule, len)
            }
        }
        Err(_) => {
            r.flags |= EV_TRUNCATED;
            path::put_ruleset(s, sub.pol.ruleset);
            (false, 0)
        }
    };
    decide::conclude(&sub, s, r, allowed, len)
}
