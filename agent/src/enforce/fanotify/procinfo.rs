//! Facts about the blocked caller, read from the host's `/proc` (never from a marked mount).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// Converts a userspace `st_dev` into the kernel's internal `s_dev` (`major << 20 | minor`),
/// the encoding eBPF programs see in `inode->i_sb->s_dev`.
pub fn kernel_dev(st_dev: u64) -> u32 {
    let major = libc::major(st_dev);
    let minor = libc::minor(st_dev);
    (major << 20) | (minor & 0xf_ffff)
}

/// The path of the event's file as its opener sees it.
///
/// `readlink(/proc/self/fd/N)` runs `d_path` against *our* root; for a file on a mount of
/// another mount namespace the walk stops at that namespace's root, so the result is the path
/// inside the container (measured with a Docker container, see the host test).
pub fn fd_path(fd: BorrowedFd<'_>) -> Vec<u8> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.into_os_string().into_vec())
        .unwrap_or_default()
}

/// Where cgroup2 is mounted on the host (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mp = pre.split(' ').nth(4)?;
        let raw = super::marks::unescape(mp.as_bytes()).ok()?;
        Some(PathBuf::from(std::ffi::OsString::from_vec(raw)))
    })
}

/// cgroup2 id of `pid`: inode number of its cgroup2 directory (= `bpf_get_current_cgroup_id`).
pub fn cgroup_id(cgroup2: &Path, pid: i32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = cgroup2.join(rel.trim_start_matches('/'));
    std::fs::metadata(dir).ok().map(|m| m.ino())
}

/// What the blocked thread's current syscall tells about the open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// Inside `execve`/`execveat`: the open is part of an exec.
    Exec,
    /// An open syscall with these flags.
    Open { flags: u64 },
    /// Anything else (io_uring worker, unknown syscall, unreadable).
    Unknown,
}

impl Caller {
    /// Write intent, failing closed when unknown.
    pub fn write(self) -> bool {
        match self {
            Caller::Exec => false,
            Caller::Open { flags } => {
                let acc = flags & libc::O_ACCMODE as u64;
                acc != libc::O_RDONLY as u64 || flags & libc::O_TRUNC as u64 != 0
            }
            Caller::Unknown => true,
        }
    }
}

/// Reads `/proc/<tid>/syscall` of a thread blocked in a permission event.
pub fn caller(tid: i32) -> Caller {
    match std::fs::read_to_string(format!("/proc/{tid}/syscall")) {
        Ok(text) => parse_syscall(&text, |addr| read_open_how_flags(tid, addr)),
        Err(_) => Caller::Unknown,
    }
}

/// Parses `"NR arg1 … arg6 sp pc"` (NR decimal, the rest hex). `how_flags` reads
/// `open_how.flags` at a user address (for `openat2`).
pub fn parse_syscall(text: &str, how_flags: impl FnOnce(u64) -> Option<u64>) -> Caller {
    let mut it = text.split_ascii_whitespace();
    let Some(Ok(nr)) = it.next().map(str::parse::<i64>) else {
        return Caller::Unknown;
    };
    let args: Vec<u64> = it
        .take(6)
        .filter_map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .collect();
    let arg = |i: usize| args.get(i).copied();
    let open = |f: Option<u64>| f.map_or(Caller::Unknown, |flags| Caller::Open { flags });
    match nr {
        libc::SYS_execve | libc::SYS_execveat => Caller::Exec,
        libc::SYS_openat => open(arg(2)),
        libc::SYS_open_by_handle_at => open(arg(2)),
        libc::SYS_openat2 => open(arg(2).and_then(how_flags)),
        #[cfg(target_arch = "x86_64")]
        libc::SYS_open => open(arg(1)),
        #[cfg(target_arch = "x86_64")]
        libc::SYS_creat => Caller::Open {
            flags: (libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC) as u64,
        },
        _ => Caller::Unknown,
    }
}

/// `open_how.flags` (its first u64) from the caller's memory.
fn read_open_how_flags(tid: i32, addr: u64) -> Option<u64> {
    let mut flags = 0u64;
    let local = libc::iovec {
        iov_base: (&raw mut flags).cast(),
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: 8,
    };
    // SAFETY: `local` points at our 8-byte `flags`; the kernel validates `remote`.
    let n = unsafe { libc::process_vm_readv(tid, &local, 1, &remote, 1, 0) };
    (n == 8).then_some(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_how(_: u64) -> Option<u64> {
        None
    }

    #[test]
    fn parses_openat_flags() {
        let line = format!(
            "{} 0xffffffffffffff9c 0x7ffc1000 0x241 0x1b6 0x0 0x0 0x7ffc 0x4000",
            libc::SYS_openat
        );
        let c = parse_syscall(&line, no_how);
        assert_eq!(c, Caller::Open { flags: 0x241 });
        assert!(c.write(), "O_WRONLY|O_CREAT|O_TRUNC is a write");
        let ro = format!("{} 0xffffff9c 0x7ffc 0x80000 0x0 0 0 0 0", libc::SYS_openat);
        assert!(
            !parse_syscall(&ro, no_how).write(),
            "O_RDONLY|O_CLOEXEC is a read"
        );
    }

    #[test]
    fn rdonly_trunc_is_write_and_unknown_fails_closed() {
        let flags = (libc::O_RDONLY | libc::O_TRUNC) as u64;
        assert!(Caller::Open { flags }.write());
        assert!(parse_syscall("running", no_how).write());
        assert!(parse_syscall("-1 0x7ffc 0x4000", no_how).write());
        let how = format!(
            "{} 0xffffff9c 0x7ffc 0x5000 0x18 0 0 0 0",
            libc::SYS_openat2
        );
        assert_eq!(
            parse_syscall(&how, |a| (a == 0x5000).then_some(2)),
            Caller::Open { flags: 2 }
        );
        assert!(parse_syscall(&how, no_how).write());
    }

    #[test]
    fn exec_is_recognised() {
        let line = format!("{} 0x1 0x2 0x3 0 0 0 0 0", libc::SYS_execve);
        assert_eq!(parse_syscall(&line, no_how), Caller::Exec);
        assert!(!Caller::Exec.write());
    }

    #[test]
    fn kernel_dev_encoding() {
        // 0:45 (overlay) and 259:3 (nvme partition).
        assert_eq!(kernel_dev(libc::makedev(0, 45)), 45);
        assert_eq!(kernel_dev(libc::makedev(259, 3)), (259 << 20) | 3);
    }
}
