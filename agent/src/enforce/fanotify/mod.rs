//! Tier-2 exec/open enforcement with fanotify permission events (no BPF-LSM needed).
//!
//! One fanotify group (`FAN_CLASS_CONTENT`) receives `FAN_OPEN_EXEC_PERM | FAN_OPEN_PERM` for
//! every mount of every enforced container ([`Group::mark_container`]). A dedicated thread
//! ([`Group::spawn_decider`]) turns each event into a [`Request`], asks the [`Decider`] and
//! answers `FAN_ALLOW` / `FAN_DENY` (the caller then gets `EPERM`).
//!
//! Facts and limits (measured on 6.18, see DESIGN.md §2 and the host test):
//! - An exec raises `FAN_OPEN_EXEC_PERM` then, once allowed, `FAN_OPEN_PERM` for the same
//!   file. The second one is answered without asking the decider (it is part of the exec, not
//!   a read the policy could deny): it is recognised by (tid, dev, ino) of the exec just
//!   allowed, or by the caller being inside `execve`/`execveat`.
//! - The event carries no open flags. `Request::write` is recovered from the blocked
//!   thread's `/proc/<tid>/syscall` (`open`/`openat`/`openat2`/`open_by_handle_at` flags);
//!   when that is impossible (io_uring workers, unknown syscalls) it is reported as `true`
//!   (fail closed: a read-only rule will not allow it).
//! - A denied `O_CREAT` open still creates the (empty) file: fanotify runs after creation.
//! - Directory opens are not reported (no `FAN_ONDIR`): policies are about files.
//! - memfd / fileless exec is on no marked mount and is never seen: the eBPF
//!   `sched_process_exec` backstop covers it.
//! - If the group's last descriptor closes, pending and future events are *allowed*: the
//!   holder process ([`holder`]) keeps a descriptor so an agent crash blocks instead.

mod decide;
mod group;
pub mod holder;
mod marks;
mod procinfo;
pub use procinfo::Caller;
mod sys;

use std::sync::atomic::{AtomicU64, Ordering};

pub use decide::DecisionThread;
pub use group::Group;
pub use marks::{MarkSet, MarkedMount, SKIPPED_FSTYPES};
pub use procinfo::kernel_dev;

/// What the process is doing with the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `execve` of the file (also the ELF interpreter and `#!` interpreters).
    Exec,
    /// Any other open of a regular file (or device node) on a marked mount.
    Open,
}

/// One permission question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Thread id of the caller (the group reports tids); valid for `/proc/<pid>/…`.
    pub pid: i32,
    /// cgroup2 id (inode of the cgroup2 directory) of the caller, 0 if unknown.
    pub cgroup_id: u64,
    pub kind: Kind,
    /// Path as the container sees it (relative to its root); `" (deleted)"` may be appended
    /// by the kernel for unlinked files. Empty if it could not be resolved.
    pub path: Vec<u8>,
    /// Open for writing (`O_WRONLY`/`O_RDWR`/`O_TRUNC`), or unknown. Always false for exec.
    pub write: bool,
    /// Userspace `st_dev` (see [`kernel_dev`] for the kernel's `s_dev` encoding).
    pub dev: u64,
    pub ino: u64,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allow: bool,
    /// Add an inode ignore mark: later events of the same kind on this inode are allowed by
    /// the kernel without asking, **from every container and in every open mode** (ignore
    /// marks are per inode and cannot tell read from write). Only set it when that is true for
    /// the policies of all containers that can reach the inode. Dropped by
    /// [`Group::flush_cache`].
    pub cache: bool,
}

impl Verdict {
    pub const ALLOW: Verdict = Verdict {
        allow: true,
        cache: false,
    };
    pub const DENY: Verdict = Verdict {
        allow: false,
        cache: false,
    };
}

/// Policy callback, called on the decision thread. Must not block for long (the caller is
/// blocked meanwhile) and **must never open a file on a marked mount** (it would deadlock
/// waiting for its own answer).
pub trait Decider: Send + Sync {
    fn decide(&self, req: &Request) -> Verdict;

    /// What the blocked thread `tid` is doing (its open flags). The agent's decider answers
    /// from the kernel's record (`PAL_OPEN_INTENT`); this default, which reads
    /// `/proc/<tid>/syscall` and the caller's memory, is only for harnesses without the eBPF
    /// object (the caller can change what it shows).
    fn caller(&self, tid: i32) -> Caller {
        procinfo::caller(tid)
    }
}

impl<F: Fn(&Request) -> Verdict + Send + Sync> Decider for F {
    fn decide(&self, req: &Request) -> Verdict {
        self(req)
    }
}

/// Errors of the fanotify backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("fanotify_init: {0}")]
    Init(#[source] std::io::Error),
    #[error("fanotify_mark {what}: {source}")]
    Mark {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fanotify holder: {0}")]
    Holder(String),
    #[error("holder state {path}: {source}")]
    State {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("spawning decision thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("decision thread already running")]
    AlreadyRunning,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Counters, updated by the decision thread (relaxed atomics; read for metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Permission events read.
    pub events: AtomicU64,
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    /// Ignore marks added.
    pub cached: AtomicU64,
    /// `FAN_OPEN_PERM` events recognised as the second half of an allowed exec.
    pub exec_companions: AtomicU64,
    /// Time inside `Decider::decide`, summed (ns).
    pub decide_ns: AtomicU64,
    /// Whole handling of an event, from read to response (ns): request building + decide +
    /// cache mark + response.
    pub handle_ns: AtomicU64,
    /// Events the decider was asked about.
    pub decided: AtomicU64,
    /// Queue overflows and unexpected errors (responses that failed, etc.).
    pub errors: AtomicU64,
}

/// A consistent-enough copy of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub events: u64,
    pub allowed: u64,
    pub denied: u64,
    pub cached: u64,
    pub exec_companions: u64,
    pub decide_ns: u64,
    pub handle_ns: u64,
    pub decided: u64,
    pub errors: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            events: l(&self.events),
            allowed: l(&self.allowed),
            denied: l(&self.denied),
            cached: l(&self.cached),
            exec_companions: l(&self.exec_companions),
            decide_ns: l(&self.decide_ns),
            handle_ns: l(&self.handle_ns),
            decided: l(&self.decided),
            errors: l(&self.errors),
        }
    }
}

impl StatsSnapshot {
    /// Mean handling time per event in ns (0 if none).
    pub fn mean_handle_ns(&self) -> u64 {
        self.handle_ns.checked_div(self.events).unwrap_or(0)
    }
}
