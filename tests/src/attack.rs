//! Attack cases shared by the suites of both tiers (QEMU guest and host), so each tier is tried
//! with the same ways out.

/// One attempt to leave the container's namespaces or root (`tests/programs/ns_escape.c`).
pub struct Escape {
    /// `ns_escape` mode.
    pub how: &'static str,
    /// The marker argument: the path the escaped process creates (inside the new root, /tmp,
    /// for `chroot`).
    pub marker_arg: String,
    /// Where that marker would appear in the container's normal root.
    pub marker: String,
    /// The `access` of the `escape` event that reports it.
    pub op: &'static str,
}

/// Every namespace and root escape. `dir` is a writable directory under /tmp (so that a marker
/// is absent only because the escape was stopped); `ia32_op` is the event tier 2 reports for
/// the 32-bit `unshare` (`ia32-syscall`), where tier 1 reports the namespace (`userns`).
pub fn escapes(dir: &str, ia32_op: &'static str) -> Vec<Escape> {
    let in_tmp = dir.strip_prefix("/tmp").expect("a directory under /tmp");
    ["unshare", "clone", "clone3", "ia32", "chroot"]
        .into_iter()
        .map(|how| {
            let marker = format!("{dir}/ns-{how}");
            let (marker_arg, op) = match how {
                "chroot" => (format!("{in_tmp}/ns-{how}"), "chroot"),
                "ia32" => (marker.clone(), ia32_op),
                _ => (marker.clone(), "userns"),
            };
            Escape {
                how,
                marker_arg,
                marker,
                op,
            }
        })
        .collect()
}
