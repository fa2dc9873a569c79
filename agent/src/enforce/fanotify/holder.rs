//! Fail-closed holder: a tiny forked process that keeps a descriptor of the fanotify group.
//!
//! Without it an agent crash closes the group and the kernel *allows* every pending and future
//! event. With it the group survives: events queue up and their callers block until a
//! restarted agent takes the descriptor back (`pidfd_open` + `pidfd_getfd`, see
//! [`super::Group::open_or_adopt`]).
//!
//! The holder is a plain `fork()` that only makes raw syscalls (safe in a multi-threaded
//! parent), keeps the group at descriptor [`HOLDER_FD`], closes everything else (it must not
//! pin the agent's sockets or BPF objects) and sleeps in `pause()`. It is found through
//! `<state_dir>/fanotify-holder.pid` holding `"<pid> <starttime>"`, checked against
//! `/proc/<pid>/stat` (name and start time) so a reused pid is never trusted.
//!
//! The group has no marks yet when the holder is spawned and the pidfile is written before the
//! agent marks anything, so an agent crash in between leaves at worst a harmless idle process.
//! Sending SIGKILL to the holder while the agent is down releases every blocked caller
//! (fail-open by an explicit operator action).

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use super::{Error, Result, sys};

/// Descriptor number of the group inside the holder.
pub const HOLDER_FD: RawFd = 3;
/// `comm` of the holder process (15 bytes max).
pub const HOLDER_NAME: &str = "palisade-fanhld";
const PIDFILE: &str = "fanotify-holder.pid";

/// A living holder process.
#[derive(Debug)]
pub struct Holder {
    pid: i32,
    pidfd: OwnedFd,
    pidfile: PathBuf,
    /// We forked it (so we reap it after killing it).
    child: bool,
}

impl Holder {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Kills the holder and removes its pidfile.
    pub fn kill(self) -> Result<()> {
        let _ = std::fs::remove_file(&self.pidfile);
        sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL)
            .or_else(|e| {
                if e.raw_os_error() == Some(libc::ESRCH) {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| Error::Holder(format!("kill {}: {e}", self.pid)))?;
        if self.child {
            // SAFETY: reaping our own child; a null status pointer is allowed.
            unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
        }
        Ok(())
    }
}

/// The pidfile's path under `state_dir`.
pub fn pidfile(state_dir: &Path) -> PathBuf {
    state_dir.join(PIDFILE)
}

fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::State {
        path: path.display().to_string(),
        source,
    }
}

/// Takes the exclusive agent lock `<state_dir>/fanotify.lock` (released when we die; the
/// holder closes its inherited copy at once).
pub fn lock(state_dir: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(state_dir).map_err(state_err(state_dir))?;
    let path = state_dir.join("fanotify.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(state_err(&path))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::Holder(format!(
            "{}: another agent owns the fanotify group ({e})",
            path.display()
        )));
    }
    Ok(f)
}

/// `(comm, starttime)` from `/proc/<pid>/stat`.
fn proc_identity(pid: i32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, tail) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    // Fields after ")" start at field 3 (state); starttime is field 22.
    let start = tail.split_ascii_whitespace().nth(19)?.parse().ok()?;
    Some((comm, start))
}

/// Finds a living holder under `state_dir` and takes a copy of its group descriptor.
/// A stale pidfile (dead or foreign pid) is removed and `None` returned.
pub fn adopt(state_dir: &Path) -> Result<Option<(OwnedFd, Holder)>> {
    let path = pidfile(state_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_err(&path)(e)),
    };
    let mut it = text.split_ascii_whitespace().map(str::parse::<u64>);
    let (Some(Ok(pid)), Some(Ok(start))) = (it.next(), it.next()) else {
        tracing::warn!(path = %path.display(), "malformed holder pidfile, ignoring");
        let _ = std::fs::remove_file(&path);
        return Ok(None);
    };
    let pid = pid as i32;
    let stale = |why: &str| {
        tracing::warn!(pid, why, "stale fanotify holder pidfile");
        let _ = std::fs::remove_file(&path);
        Ok(None)
    };
    let Ok(pidfd) = sys::pidfd_open(pid) else {
        return stale("no such process");
    };
    // Checked after pidfd_open: from here on the pidfd pins this very process.
    if proc_identity(pid) != Some((HOLDER_NAME.to_string(), start)) {
        return stale("pid belongs to another process");
    }
    let fd = sys::pidfd_getfd(pidfd.as_fd(), HOLDER_FD)
        .map_err(|e| Error::Holder(format!("pidfd_getfd({pid}, {HOLDER_FD}): {e}")))?;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| Error::Holder(format!("checking adopted fd: {e}")))?;
    if link.as_os_str() != "anon_inode:[fanotify]" {
        return Err(Error::Holder(format!(
            "holder {pid} fd {HOLDER_FD} is {}, not a fanotify group",
            link.display()
        )));
    }
    Ok(Some((
        fd,
        Holder {
            pid,
            pidfd,
            pidfile: path,
            child: false,
        },
    )))
}

/// Forks a holder for `group` and records it under `state_dir`.
pub fn spawn(state_dir: &Path, group: BorrowedFd<'_>) -> Result<Holder> {
    std::fs::create_dir_all(state_dir).map_err(state_err(state_dir))?;
    let raw = group.as_raw_fd();
    // SAFETY: the child only performs async-signal-safe raw syscalls (see `holder_child`).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::Holder(format!(
            "fork: {}",
            std::io::Error::last_os_error()
        )));
    }
    if pid == 0 {
        holder_child(raw);
    }
    let pidfd = sys::pidfd_open(pid).map_err(|e| Error::Holder(format!("pidfd_open: {e}")))?;
    let holder = Holder {
        pid,
        pidfd,
        pidfile: pidfile(state_dir),
        child: true,
    };
    if let Err(e) = write_pidfile(state_dir, pid) {
        let _ = holder.kill();
        return Err(e);
    }
    tracing::info!(pid, "spawned fanotify holder");
    Ok(holder)
}

fn write_pidfile(state_dir: &Path, pid: i32) -> Result<()> {
    // The child may not have renamed itself yet: wait for it so the recorded identity is final.
    let start = (0..1000)
        .find_map(|_| match proc_identity(pid) {
            Some((comm, start)) if comm == HOLDER_NAME => Some(start),
            _ => {
                std::thread::sleep(std::time::Duration::from_millis(1));
                None
            }
        })
        .ok_or_else(|| Error::Holder(format!("holder {pid} did not start")))?;
    let path = pidfile(state_dir);
    let tmp = state_dir.join(format!("{PIDFILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(state_err(&tmp))?;
    writeln!(f, "{pid} {start}").map_err(state_err(&tmp))?;
    f.sync_all().map_err(state_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(state_err(&path))
}

/// Body of the forked holder. Never returns; raw syscalls only (no allocation, no locks).
fn holder_child(group: RawFd) -> ! {
    // SAFETY: all calls below are async-signal-safe syscalls on plain integers / static data.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"palisade-fanhld".as_ptr());
        libc::setsid();
        // The agent may have installed handlers (tokio's write to a pipe we close below).
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        if group != HOLDER_FD && libc::dup2(group, HOLDER_FD) < 0 {
            libc::_exit(1);
        }
        for fd in 0..HOLDER_FD {
            libc::close(fd);
        }
        libc::close_range((HOLDER_FD + 1) as libc::c_uint, libc::c_uint::MAX, 0);
        loop {
            libc::pause();
        }
    }
}
