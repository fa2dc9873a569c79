//! Mount marks: every mount a container can reach gets `FAN_MARK_MOUNT`.
//!
//! Mounts are resolved through `/proc/<pid>/root` with `openat2(RESOLVE_IN_ROOT)`, so a
//! symlink planted by the container in a mountpoint's path cannot redirect us to a host mount,
//! and each resolved object is checked to sit on the mount id listed in
//! `/proc/<pid>/mountinfo` (a mount hidden under another one is unreachable and skipped).
//! Marks are per mount *instance*: the host's view of the same files (e.g.
//! `/var/lib/docker/overlay2/…/merged`, the source of `/etc/hosts`) stays unmarked.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use super::{Error, Result, sys};

/// Filesystem types never marked. They hold kernel objects, not user content, and are read
/// constantly (`/proc`, `/sys`): marking them would cost an event per read and no policy
/// speaks about them. memfd/anon files are not on a mount at all (eBPF backstop).
/// `tmpfs` IS marked: `/dev/shm`, `--tmpfs` and Kubernetes secrets live there, and a binary
/// dropped in `/dev/shm` must be subject to the exec policy.
pub const SKIPPED_FSTYPES: &[&str] = &[
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "devpts",
    "mqueue",
    "securityfs",
    "debugfs",
    "tracefs",
    "bpf",
    "configfs",
    "pstore",
    "nsfs",
    "fusectl",
    "binfmt_misc",
    "efivarfs",
    "selinuxfs",
    "autofs",
    "rpc_pipefs",
    "hugetlbfs",
];

/// Events a container mount is marked for.
pub(crate) const MARK_MASK: u64 = libc::FAN_OPEN_PERM | libc::FAN_OPEN_EXEC_PERM;

/// One marked mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkedMount {
    /// Mount id as in `/proc/<pid>/mountinfo`.
    pub mnt_id: u64,
    /// Mountpoint inside the container.
    pub mountpoint: Vec<u8>,
    pub fstype: String,
}

/// The marks placed for one container (identified by one of its processes).
#[derive(Debug)]
pub struct MarkSet {
    pub pid: i32,
    pub mounts: Vec<MarkedMount>,
    /// Detects exit and pid reuse: a dead pid is never resolved again.
    pidfd: OwnedFd,
}

impl MarkSet {
    fn alive(&self) -> bool {
        alive(self.pidfd.as_fd())
    }
}

/// A pidfd becomes readable when the process exits.
fn alive(pidfd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 0
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountEntry {
    pub mnt_id: u64,
    pub mountpoint: Vec<u8>,
    pub fstype: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
pub(crate) fn unescape(s: &[u8]) -> Result<Vec<u8>, ()> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' {
            let oct = s.get(i + 1..i + 4).ok_or(())?;
            let txt = std::str::from_utf8(oct).map_err(drop)?;
            out.push(u8::from_str_radix(txt, 8).map_err(drop)?);
            i += 4;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Ok(out)
}

pub(crate) fn parse_mountinfo(text: &[u8]) -> Vec<MountEntry> {
    text.split(|&b| b == b'\n')
        .filter_map(|line| {
            let sep = line.windows(3).position(|w| w == b" - ")?;
            let (pre, post) = (&line[..sep], &line[sep + 3..]);
            let mut f = pre.split(|&b| b == b' ');
            let mnt_id = std::str::from_utf8(f.next()?).ok()?.parse().ok()?;
            let mountpoint = unescape(f.nth(3)?).ok()?;
            let fstype = post.split(|&b| b == b' ').next()?;
            Some(MountEntry {
                mnt_id,
                mountpoint,
                fstype: String::from_utf8_lossy(fstype).into_owned(),
            })
        })
        .collect()
}

fn proc_err(path: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Proc { path, source }
}

/// The container's root and its mount table, read while the pid is verified alive.
fn snapshot(pid: i32, pidfd: BorrowedFd<'_>) -> Result<Option<(OwnedFd, Vec<MountEntry>)>> {
    let root_path = format!("/proc/{pid}/root");
    let root = sys::open_path(root_path.as_ref(), true).map_err(proc_err(root_path))?;
    let mi_path = format!("/proc/{pid}/mountinfo");
    let text = std::fs::read(&mi_path).map_err(proc_err(mi_path))?;
    // Still alive after both reads: they were of this process, not of a reused pid.
    if !alive(pidfd) {
        return Ok(None);
    }
    Ok(Some((root, parse_mountinfo(&text))))
}

/// Resolves `entry` inside `root`; `None` if it is gone or hidden (not the listed mount).
fn resolve(root: BorrowedFd<'_>, entry: &MountEntry) -> Option<OwnedFd> {
    let fd = if entry.mountpoint == b"/" {
        root.try_clone_to_owned().ok()?
    } else {
        sys::open_in_root(root, &entry.mountpoint).ok()?
    };
    (sys::mount_id(fd.as_fd()).ok()? == entry.mnt_id).then_some(fd)
}

fn mark_entries(
    group: BorrowedFd<'_>,
    root: BorrowedFd<'_>,
    entries: Vec<MountEntry>,
    set: &mut Vec<MarkedMount>,
) -> Result<usize> {
    let mut added = 0;
    for e in entries {
        if SKIPPED_FSTYPES.contains(&e.fstype.as_str()) || set.iter().any(|m| m.mnt_id == e.mnt_id)
        {
            continue;
        }
        let Some(fd) = resolve(root, &e) else {
            tracing::debug!(mnt_id = e.mnt_id, mountpoint = %String::from_utf8_lossy(&e.mountpoint),
                "mount vanished or hidden, not marked");
            continue;
        };
        let flags = libc::FAN_MARK_ADD | libc::FAN_MARK_MOUNT;
        sys::fanotify_mark_opath(group, flags, MARK_MASK, fd.as_fd()).map_err(|source| {
            Error::Mark {
                what: format!(
                    "mount {} ({}, {})",
                    String::from_utf8_lossy(&e.mountpoint),
                    e.fstype,
                    e.mnt_id
                ),
                source,
            }
        })?;
        set.push(MarkedMount {
            mnt_id: e.mnt_id,
            mountpoint: e.mountpoint,
            fstype: e.fstype,
        });
        added += 1;
    }
    Ok(added)
}

pub(crate) fn mark_container(group: BorrowedFd<'_>, pid: i32) -> Result<MarkSet> {
    let pidfd = sys::pidfd_open(pid).map_err(proc_err(format!("pidfd of {pid}")))?;
    let (root, entries) = snapshot(pid, pidfd.as_fd())?.ok_or_else(|| Error::Proc {
        path: format!("/proc/{pid}"),
        source: std::io::Error::from_raw_os_error(libc::ESRCH),
    })?;
    let mut mounts = Vec::new();
    mark_entries(group, root.as_fd(), entries, &mut mounts)?;
    if !mounts.iter().any(|m| m.mountpoint == b"/") {
        return Err(Error::Mark {
            what: format!("root of pid {pid}"),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        });
    }
    Ok(MarkSet { pid, mounts, pidfd })
}

/// Marks mounts added since `set` was made. Returns how many were added (0 if exited).
pub(crate) fn rescan(group: BorrowedFd<'_>, set: &mut MarkSet) -> Result<usize> {
    if !set.alive() {
        return Ok(0);
    }
    match snapshot(set.pid, set.pidfd.as_fd()) {
        Ok(Some((root, entries))) => mark_entries(group, root.as_fd(), entries, &mut set.mounts),
        Ok(None) => Ok(0),
        Err(_) if !set.alive() => Ok(0),
        Err(e) => Err(e),
    }
}

/// Removes the marks of a living container; a dead one's mounts (and marks) are gone already.
pub(crate) fn unmark(group: BorrowedFd<'_>, set: MarkSet) -> Result<()> {
    let Ok(Some((root, _))) = snapshot(set.pid, set.pidfd.as_fd()) else {
        return Ok(());
    };
    for m in &set.mounts {
        let entry = MountEntry {
            mnt_id: m.mnt_id,
            mountpoint: m.mountpoint.clone(),
            fstype: m.fstype.clone(),
        };
        let Some(fd) = resolve(root.as_fd(), &entry) else {
            continue;
        };
        let flags = libc::FAN_MARK_REMOVE | libc::FAN_MARK_MOUNT;
        match sys::fanotify_mark_opath(group, flags, MARK_MASK, fd.as_fd()) {
            Ok(()) => {}
            // Never marked by this group (e.g. adopted after a restart and not re-marked).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => {
                return Err(Error::Mark {
                    what: format!("remove {}", String::from_utf8_lossy(&m.mountpoint)),
                    source,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_container_mountinfo() {
        let text = b"1083 993 0:120 / / rw,relatime master:496 - overlay overlay rw,lowerdir=/x\n\
1084 1083 0:123 / /proc rw,nosuid - proc proc rw\n\
1097 1083 254:1 /var/lib/docker/containers/abc/hosts /etc/hosts rw - ext4 /dev/vda1 rw\n\
1100 1083 0:50 / /my\\040data rw - tmpfs tmpfs rw\n";
        let e = parse_mountinfo(text);
        assert_eq!(e.len(), 4);
        assert_eq!(e[0].mnt_id, 1083);
        assert_eq!(e[0].mountpoint, b"/");
        assert_eq!(e[0].fstype, "overlay");
        assert_eq!(e[2].mountpoint, b"/etc/hosts");
        assert_eq!(e[2].fstype, "ext4");
        assert_eq!(e[3].mountpoint, b"/my data");
        assert!(SKIPPED_FSTYPES.contains(&e[1].fstype.as_str()));
    }

    #[test]
    fn unescape_rejects_truncated_escape() {
        assert_eq!(unescape(b"a\\134b").unwrap(), b"a\\b");
        assert!(unescape(b"a\\13").is_err());
    }
}
