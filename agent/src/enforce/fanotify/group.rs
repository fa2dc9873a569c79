//! The fanotify group: creation or adoption, marks, the ignore-mark cache.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::holder::{self, Holder};
use super::marks::{self, MarkSet};
use super::{Decider, DecisionThread, Error, Kind, Result, Stats, procinfo, sys};

/// A handle on the group; cheap to clone, shared by the decision thread and the lead.
#[derive(Clone)]
pub struct Group {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub fd: OwnedFd,
    pub stats: Arc<Stats>,
    /// Cache generation, bumped by every flush. An ignore mark is only added if the
    /// generation did not move while the decider ran, so a verdict taken under an old policy
    /// never outlives the flush that follows a policy change.
    pub cache_gen: Mutex<u64>,
    pub cgroup2: Option<PathBuf>,
    pub running: AtomicBool,
    holder: Mutex<Option<Holder>>,
    adopted: bool,
    /// Exclusive lock on `<state_dir>/fanotify.lock` (held by the agent, not the holder).
    _lock: Option<std::fs::File>,
    orphans_denied: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("fd", &self.inner.fd.as_raw_fd())
            .field("adopted", &self.inner.adopted)
            .finish()
    }
}

const INIT_FLAGS: libc::c_uint = libc::FAN_CLASS_CONTENT
    | libc::FAN_CLOEXEC
    | libc::FAN_NONBLOCK
    | libc::FAN_UNLIMITED_QUEUE
    | libc::FAN_UNLIMITED_MARKS
    // The tid lets us read the blocked thread's syscall (write intent, exec companion).
    | libc::FAN_REPORT_TID;
const EVENT_F_FLAGS: libc::c_uint = (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as _;

/// Upper bound of the descriptor numbers swept by [`Group::deny_orphans`].
const ORPHAN_SWEEP_MAX: u64 = 1 << 16;

impl Group {
    fn from_fd(
        fd: OwnedFd,
        holder: Option<Holder>,
        adopted: bool,
        lock: Option<std::fs::File>,
    ) -> Group {
        Group {
            inner: Arc::new(Inner {
                fd,
                stats: Arc::default(),
                cache_gen: Mutex::new(0),
                cgroup2: procinfo::cgroup2_root(),
                running: AtomicBool::new(false),
                holder: Mutex::new(holder),
                adopted,
                _lock: lock,
                orphans_denied: Default::default(),
            }),
        }
    }

    /// A new group without a holder: if this process dies, everything is allowed again.
    /// For tests and `--no-holder` setups.
    pub fn open() -> Result<Group> {
        let fd = sys::fanotify_init(INIT_FLAGS, EVENT_F_FLAGS).map_err(Error::Init)?;
        Ok(Group::from_fd(fd, None, false, None))
    }

    /// Takes over the group kept by a living holder under `state_dir`, or creates a new group
    /// and a holder for it. After adoption, events the dead agent had read but not answered
    /// are denied ([`Group::deny_orphans`]) and its ignore marks are flushed (the policy may
    /// have changed meanwhile). Marks on container mounts survive: re-marking is idempotent.
    ///
    /// Only one agent may own the group: a second one would deny the first one's in-flight
    /// events. An exclusive `flock` on `<state_dir>/fanotify.lock` enforces it.
    pub fn open_or_adopt(state_dir: &Path) -> Result<Group> {
        let lock = holder::lock(state_dir)?;
        if let Some((fd, h)) = holder::adopt(state_dir)? {
            let group = Group::from_fd(fd, Some(h), true, Some(lock));
            let denied = group.deny_orphans();
            group.inner.orphans_denied.store(denied, Ordering::Relaxed);
            group.flush_cache()?;
            tracing::info!(denied, "adopted fanotify group from holder");
            return Ok(group);
        }
        let fd = sys::fanotify_init(INIT_FLAGS, EVENT_F_FLAGS).map_err(Error::Init)?;
        let h = holder::spawn(state_dir, fd.as_fd())?;
        Ok(Group::from_fd(fd, Some(h), false, Some(lock)))
    }

    /// True if this group was taken over from a holder (the agent restarted).
    pub fn adopted(&self) -> bool {
        self.inner.adopted
    }

    /// Events left unanswered by the previous agent and denied at adoption.
    pub fn orphans_denied(&self) -> usize {
        self.inner.orphans_denied.load(Ordering::Relaxed)
    }

    /// Pid of the holder process, if any.
    pub fn holder_pid(&self) -> Option<i32> {
        self.inner.holder.lock().ok()?.as_ref().map(Holder::pid)
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.inner.stats.clone()
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }

    /// Marks every mount of the container `pid` belongs to (its root and all bind mounts,
    /// volumes, tmpfs; not the kernel pseudo filesystems in [`super::SKIPPED_FSTYPES`]).
    pub fn mark_container(&self, pid: i32) -> Result<MarkSet> {
        marks::mark_container(self.as_fd(), pid)
    }

    /// Marks mounts the container gained since `set` was made; returns how many.
    pub fn rescan(&self, set: &mut MarkSet) -> Result<usize> {
        marks::rescan(self.as_fd(), set)
    }

    /// Removes the container's mount marks (no-op once it has exited).
    pub fn unmark(&self, set: MarkSet) -> Result<()> {
        marks::unmark(self.as_fd(), set)
    }

    /// Drops every ignore mark (the whole verdict cache). Call on every policy change.
    ///
    /// `FAN_MARK_FLUSH` without `FAN_MARK_MOUNT`/`FILESYSTEM` removes all *inode* marks of
    /// the group, and the only inode marks we ever add are cache ignore marks; the mount marks
    /// that enforce stay.
    pub fn flush_cache(&self) -> Result<()> {
        let mut generation = self
            .inner
            .cache_gen
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *generation += 1;
        sys::fanotify_mark_flush(self.as_fd(), libc::FAN_MARK_FLUSH).map_err(|source| Error::Mark {
            what: "flush inode marks".into(),
            source,
        })
    }

    /// Denies permission events a previous reader took but never answered (it died holding
    /// them). Responses are matched by descriptor number only, so answering every plausible
    /// number reaches them; numbers with no pending event get `ENOENT`. Must run before this
    /// process reads events itself. Returns how many were denied.
    pub fn deny_orphans(&self) -> usize {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid out-pointer.
        let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_max.min(ORPHAN_SWEEP_MAX)
        } else {
            ORPHAN_SWEEP_MAX
        };
        (0..max as i32)
            .filter(|&fd| sys::fanotify_respond(self.as_fd(), fd, libc::FAN_DENY).is_ok())
            .count()
    }

    /// Starts the decision thread. Only one may run per group.
    pub fn spawn_decider(&self, decider: Arc<dyn Decider>) -> Result<DecisionThread> {
        if self.inner.running.swap(true, Ordering::SeqCst) {
            return Err(Error::AlreadyRunning);
        }
        DecisionThread::spawn(self.clone(), decider).inspect_err(|_| {
            self.inner.running.store(false, Ordering::SeqCst);
        })
    }

    /// Deliberate shutdown of enforcement: kills the holder and removes its pidfile, so the
    /// group dies (and everything is allowed) once the last descriptor here is closed.
    pub fn release(self) -> Result<()> {
        let h = self
            .inner
            .holder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match h {
            Some(h) => h.kill(),
            None => Ok(()),
        }
    }

    /// Adds an ignore mark for the event's inode unless the cache was flushed since
    /// generation `seen`. Returns whether a mark was added.
    pub(crate) fn cache_inode(&self, event_fd: BorrowedFd<'_>, kind: Kind, seen: u64) -> bool {
        let mask = match kind {
            Kind::Exec => libc::FAN_OPEN_EXEC_PERM,
            Kind::Open => libc::FAN_OPEN_PERM,
        };
        let generation = self
            .inner
            .cache_gen
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *generation != seen {
            return false;
        }
        // Evictable: the cache must not pin inodes in memory; an evicted entry only costs one
        // more event. Survives modification: the verdict is about the path, not the content.
        let flags = libc::FAN_MARK_ADD
            | libc::FAN_MARK_IGNORE
            | libc::FAN_MARK_IGNORED_SURV_MODIFY
            | libc::FAN_MARK_EVICTABLE;
        match sys::fanotify_mark_fd(self.as_fd(), flags, mask, event_fd) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "ignore mark not added");
                false
            }
        }
    }

    pub(crate) fn cache_generation(&self) -> u64 {
        *self
            .inner
            .cache_gen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}
