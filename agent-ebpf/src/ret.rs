//! LSM return values that the verifier can prove lie in [-MAX_ERRNO, 0]. Since Linux 6.12 it
//! rejects an LSM program whose R0 at exit is not provably in that range ("At program exit the
//! register R0 has unknown scalar value"). LLVM compiles the natural forms — `if deny { -EPERM }
//! else { 0 }` and `retval.clamp(-4095, 0)` — into a negation and sign masks, which the verifier
//! tracks as unknown scalars. Every non-constant LSM return goes through here instead: a zero the
//! compiler cannot see through, minus a value masked to 12 bits. The verifier bounds both (a
//! spilled constant, an AND with a constant), so the difference is in [-4095, 0] on any kernel;
//! the compiler cannot fold the mask away because it cannot see the value either.

const MAX_ERRNO: i32 = 4095;
const EPERM: i32 = 1;

/// `v`, hidden from the optimiser (a volatile stack round trip the verifier tracks exactly).
#[inline(always)]
fn opaque(v: i32) -> i32 {
    // SAFETY: a volatile read of a live local.
    unsafe { core::ptr::read_volatile(&v) }
}

/// `-errno`, provably in [-MAX_ERRNO, 0] for the verifier.
#[inline(always)]
fn neg_errno(errno: i32) -> i32 {
    opaque(0).wrapping_sub(opaque(errno) & MAX_ERRNO)
}

/// The verdict of this program: `-EPERM` when denying, else 0.
#[inline(always)]
pub fn verdict(deny: bool) -> i32 {
    neg_errno(if deny { EPERM } else { 0 })
}

/// An earlier BPF-LSM program's non-zero verdict, passed on unchanged when it is an errno;
/// anything else (which the kernel would not accept either) becomes `-EPERM` — still a denial.
#[inline(always)]
pub fn pass_on(retval: i32) -> i32 {
    let errno = opaque(0).wrapping_sub(retval);
    if (1..=MAX_ERRNO).contains(&errno) {
        neg_errno(errno)
    } else {
        neg_errno(EPERM)
    }
}
