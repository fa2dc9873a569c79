//! Path resolution into the per-CPU scratch key: `ruleset` (big-endian) ‖ path ‖ NUL.
use agent_common::{PATH_MAX, RULESET_BYTES};
use aya_ebpf::{bindings::path, helpers::generated::bpf_d_path};

use crate::maps::Scratch;

/// Write `ruleset ‖ d_path(p)` into `s.data`. Returns the path length including its NUL.
/// Bytes after the NUL are garbage until [`clear_tail`] runs: LPM lookups ignore them (the
/// prefix length stops at the NUL), hash keys and events do not.
#[inline(always)]
pub fn resolve(s: &mut Scratch, p: *const u8, ruleset: u32) -> Result<usize, i64> {
    put_ruleset(s, ruleset);
    // SAFETY: `p` is `&file->f_path` derived from a trusted BTF pointer at a BTF offset.
    let ret = unsafe {
        bpf_d_path(
            p as *mut path,
            s.data.as_mut_ptr().add(RULESET_BYTES) as *mut _,
            PATH_MAX as u32,
        )
    };
    if ret <= 0 || ret as usize > PATH_MAX {
        return Err(ret);
    }
    Ok(ret as usize)
}

#[inline(always)]
pub fn put_ruleset(s: &mut Scratch, ruleset: u32) {
    let rb = ruleset.to_be_bytes();
    s.data[0] = rb[0];
    s.data[1] = rb[1];
    s.data[2] = rb[2];
    s.data[3] = rb[3];
}

/// Zero every data byte from `from` on. A masked store per byte with a constant bound: a
/// conditional or variable-length clear gets turned into a `memset` call the BPF backend rejects.
#[inline(always)]
pub fn clear_tail(s: &mut Scratch, from: usize) {
    let mut i = 0;
    while i < s.data.len() {
        let keep = ((i < from) as u8).wrapping_neg();
        s.data[i] &= keep;
        i += 1;
    }
}

/// `true` if the resolved path ends in " (deleted)" (memfd, unlinked file): fileless exec.
#[inline(always)]
pub fn is_deleted_suffix(s: &Scratch, len_with_nul: usize) -> bool {
    const SUFFIX: &[u8; 10] = b" (deleted)";
    if len_with_nul < SUFFIX.len() + 2 {
        return false;
    }
    let end = RULESET_BYTES + len_with_nul - 1; // index of the NUL
    let start = end - SUFFIX.len();
    let mut i = 0;
    while i < SUFFIX.len() {
        let idx = (start + i) & 0xff;
        if s.data[idx] != SUFFIX[i] {
            return false;
        }
        i += 1;
    }
    true
}
