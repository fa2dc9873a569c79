//! Thin, safe wrappers over the raw syscalls this module needs (fanotify, pidfd, openat2,
//! statx). Kept in one place so the `unsafe` surface is small and reviewable.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn fanotify_init(flags: libc::c_uint, event_f_flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success we own the returned descriptor.
    let fd = cvt(unsafe { libc::fanotify_init(flags, event_f_flags) })?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fanotify_mark(group, flags, mask, dirfd, NULL)`: marks the object `dirfd` refers to.
pub fn fanotify_mark_fd(
    group: BorrowedFd<'_>,
    flags: libc::c_uint,
    mask: u64,
    target: BorrowedFd<'_>,
) -> io::Result<()> {
    // SAFETY: a NULL pathname is documented to mean "the object dirfd refers to".
    cvt(unsafe {
        libc::fanotify_mark(
            group.as_raw_fd(),
            flags,
            mask,
            target.as_raw_fd(),
            std::ptr::null(),
        )
    })
    .map(drop)
}

/// Marks the object an `O_PATH` descriptor refers to. `fanotify_mark` rejects `O_PATH`
/// descriptors as `dirfd` with a NULL path (EBADF) and has no `AT_EMPTY_PATH`, so the mark goes
/// through the `/proc/self/fd/N` magic link, which resolves to exactly that mount and dentry.
pub fn fanotify_mark_opath(
    group: BorrowedFd<'_>,
    flags: libc::c_uint,
    mask: u64,
    target: BorrowedFd<'_>,
) -> io::Result<()> {
    let path = CString::new(format!("/proc/self/fd/{}", target.as_raw_fd()))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
    cvt(unsafe {
        libc::fanotify_mark(
            group.as_raw_fd(),
            flags,
            mask,
            libc::AT_FDCWD,
            path.as_ptr(),
        )
    })
    .map(drop)
}

/// `fanotify_mark` without a target object (used for `FAN_MARK_FLUSH`).
pub fn fanotify_mark_flush(group: BorrowedFd<'_>, flags: libc::c_uint) -> io::Result<()> {
    let root = c"/";
    // SAFETY: FAN_MARK_FLUSH ignores dirfd/pathname; we still pass a valid path.
    cvt(unsafe { libc::fanotify_mark(group.as_raw_fd(), flags, 0, libc::AT_FDCWD, root.as_ptr()) })
        .map(drop)
}

/// Writes one permission response. `ENOENT` means "no such pending event".
pub fn fanotify_respond(group: BorrowedFd<'_>, fd: RawFd, response: u32) -> io::Result<()> {
    let resp = libc::fanotify_response { fd, response };
    let len = std::mem::size_of::<libc::fanotify_response>();
    // SAFETY: `resp` is a valid, initialised struct of `len` bytes.
    let n = unsafe {
        libc::write(
            group.as_raw_fd(),
            (&raw const resp).cast::<libc::c_void>(),
            len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall, no pointers.
    let fd = cvt_long(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Duplicates descriptor `target_fd` of the process behind `pidfd` into ours (`O_CLOEXEC`).
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target_fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall, no pointers.
    let fd =
        cvt_long(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) })?;
    // SAFETY: fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: NULL siginfo is allowed (behaves like kill(2)).
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    })
    .map(drop)
}

/// `openat2(dirfd, path, O_PATH | O_CLOEXEC [| O_DIRECTORY], RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`.
///
/// `RESOLVE_IN_ROOT` makes absolute symlinks and `..` resolve inside `dirfd` (the container's
/// root): a container cannot make us mark a host mount by planting a symlink in a mountpoint's
/// path. `O_PATH` opens generate no fanotify events, so this is safe on a marked mount.
pub fn open_in_root(root: BorrowedFd<'_>, path: &[u8]) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain data; all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `c` and `how` outlive the call; size matches the struct.
    let fd = cvt_long(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &raw const how,
            std::mem::size_of::<libc::open_how>(),
        )
    })?;
    // SAFETY: fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Opens a host path with `O_PATH` (no fanotify events).
pub fn open_path(path: &std::path::Path, dir: bool) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut flags = libc::O_PATH | libc::O_CLOEXEC;
    if dir {
        flags |= libc::O_DIRECTORY;
    }
    // SAFETY: `c` is a valid NUL-terminated string.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), flags) })?;
    // SAFETY: fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The mount id of the object `fd` refers to (`statx(STATX_MNT_ID)`).
pub fn mount_id(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: empty path + AT_EMPTY_PATH stats `fd` itself; `stx` is writable.
    cvt(unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_MNT_ID,
            stx.as_mut_ptr(),
        )
    })?;
    // SAFETY: statx succeeded and filled the struct (it was zeroed before anyway).
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(io::Error::from_raw_os_error(libc::ENOSYS));
    }
    Ok(stx.stx_mnt_id)
}

/// `(st_dev, st_ino)` of an open descriptor.
pub fn dev_ino(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `st` is writable and sized for `struct stat`.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded.
    let st = unsafe { st.assume_init() };
    Ok((st.st_dev, st.st_ino))
}
