//! The decision thread: read permission events, ask the [`Decider`], answer.
//!
//! A plain OS thread (not tokio): callers are blocked in the kernel until we answer, so this
//! loop must never wait on anything but the group and its stop descriptor.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::procinfo::{self, Caller};
use super::{Decider, Error, Group, Kind, Request, Result, Verdict, sys};

const META_LEN: usize = std::mem::size_of::<libc::fanotify_event_metadata>();
/// An exec's `FAN_OPEN_PERM` follows its `FAN_OPEN_EXEC_PERM` at once; older records are
/// leftovers of threads killed in between.
const COMPANION_TTL: Duration = Duration::from_secs(10);

/// The running decision thread. Dropping it (or [`DecisionThread::stop`]) stops reading;
/// events then queue in the group (their callers block) until a reader comes back.
pub struct DecisionThread {
    stop: OwnedFd,
    handle: Option<JoinHandle<()>>,
}

impl DecisionThread {
    pub(crate) fn spawn(group: Group, decider: Arc<dyn Decider>) -> Result<DecisionThread> {
        // SAFETY: plain syscall; we own the returned descriptor.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(Error::Thread(std::io::Error::last_os_error()));
        }
        // SAFETY: fresh descriptor.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let stop_rx = stop.try_clone().map_err(Error::Thread)?;
        let handle = std::thread::Builder::new()
            .name("fanotify-decide".into())
            .spawn(move || {
                Loop::new(group.clone(), decider).run(stop_rx.as_fd());
                group.inner.running.store(false, Ordering::SeqCst);
            })
            .map_err(Error::Thread)?;
        Ok(DecisionThread {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let one = 1u64;
        // SAFETY: writing 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&raw const one).cast(), 8) };
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for DecisionThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Loop {
    group: Group,
    decider: Arc<dyn Decider>,
    /// tid → (dev, ino, when) of the exec just allowed: its `FAN_OPEN_PERM` comes next.
    pending_exec: HashMap<i32, (u64, u64, Instant)>,
}

impl Loop {
    fn new(group: Group, decider: Arc<dyn Decider>) -> Loop {
        Loop {
            group,
            decider,
            pending_exec: HashMap::new(),
        }
    }

    fn run(&mut self, stop: std::os::fd::BorrowedFd<'_>) {
        // u64 storage keeps the metadata records 8-byte aligned.
        let mut buf = vec![0u64; 8192];
        let gfd = self.group.as_fd().as_raw_fd();
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: gfd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %std::io::Error::last_os_error(), "fanotify poll");
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            // SAFETY: reading into our own buffer of the stated size.
            let len = unsafe { libc::read(gfd, buf.as_mut_ptr().cast(), buf.len() * 8) };
            if len < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                    _ => {
                        tracing::error!(error = %e, "fanotify read");
                        self.group
                            .inner
                            .stats
                            .errors
                            .fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                }
            }
            let bytes = &buf_bytes(&buf)[..len as usize];
            let mut off = 0;
            while off + META_LEN <= bytes.len() {
                // SAFETY: at least META_LEN bytes remain; read_unaligned copes with any offset.
                let meta: libc::fanotify_event_metadata =
                    unsafe { std::ptr::read_unaligned(bytes[off..].as_ptr().cast()) };
                if (meta.event_len as usize) < META_LEN {
                    break;
                }
                self.handle(&meta);
                off += meta.event_len as usize;
            }
        }
    }

    fn handle(&mut self, meta: &libc::fanotify_event_metadata) {
        let stats = self.group.inner.stats.clone();
        if meta.fd == libc::FAN_NOFD {
            if meta.mask & libc::FAN_Q_OVERFLOW != 0 {
                tracing::error!("fanotify queue overflow");
            }
            stats.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let t0 = Instant::now();
        // SAFETY: the kernel installed this descriptor for us; we own and close it.
        let fd = unsafe { OwnedFd::from_raw_fd(meta.fd) };
        let kind = if meta.mask & libc::FAN_OPEN_EXEC_PERM != 0 {
            Kind::Exec
        } else if meta.mask & libc::FAN_OPEN_PERM != 0 {
            Kind::Open
        } else {
            return; // not a permission event: nothing to answer
        };
        stats.events.fetch_add(1, Ordering::Relaxed);
        let tid = meta.pid;
        let (dev, ino) = sys::dev_ino(fd.as_fd()).unwrap_or((0, 0));

        let verdict = match kind {
            Kind::Open => {
                let pending = self.pending_exec.remove(&tid);
                let caller = match pending {
                    Some((d, i, at)) if (d, i) == (dev, ino) && at.elapsed() < COMPANION_TTL => {
                        Caller::Exec
                    }
                    _ => self.decider.caller(tid),
                };
                if caller == Caller::Exec {
                    // Second half of an exec whose EXEC_PERM was allowed (or ignore-cached).
                    stats.exec_companions.fetch_add(1, Ordering::Relaxed);
                    None
                } else {
                    Some(self.ask(&fd, tid, kind, caller.write(), dev, ino))
                }
            }
            Kind::Exec => {
                let v = self.ask(&fd, tid, kind, false, dev, ino);
                if v.allow {
                    self.remember_exec(tid, dev, ino);
                }
                Some(v)
            }
        };
        let allow = verdict.is_none_or(|v| v.allow);
        let response = if allow {
            libc::FAN_ALLOW
        } else {
            libc::FAN_DENY
        };
        if let Err(e) = sys::fanotify_respond(self.group.as_fd(), meta.fd, response) {
            tracing::error!(error = %e, "fanotify response");
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        drop(fd);
        let counter = if allow { &stats.allowed } else { &stats.denied };
        counter.fetch_add(1, Ordering::Relaxed);
        stats
            .handle_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Builds the request, calls the decider (a panic denies) and caches if told to.
    fn ask(&self, fd: &OwnedFd, tid: i32, kind: Kind, write: bool, dev: u64, ino: u64) -> Verdict {
        let stats = &self.group.inner.stats;
        let req = Request {
            pid: tid,
            cgroup_id: self
                .group
                .inner
                .cgroup2
                .as_deref()
                .and_then(|root| procinfo::cgroup_id(root, tid))
                .unwrap_or(0),
            kind,
            path: procinfo::fd_path(fd.as_fd()),
            write,
            dev,
            ino,
        };
        let generation = self.group.cache_generation();
        let t = Instant::now();
        let decider = &self.decider;
        let verdict =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decider.decide(&req)))
                .unwrap_or_else(|_| {
                    tracing::error!("decider panicked; denying");
                    Verdict::DENY
                });
        stats
            .decide_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        stats.decided.fetch_add(1, Ordering::Relaxed);
        if verdict.allow && verdict.cache && self.group.cache_inode(fd.as_fd(), kind, generation) {
            stats.cached.fetch_add(1, Ordering::Relaxed);
        }
        verdict
    }

    fn remember_exec(&mut self, tid: i32, dev: u64, ino: u64) {
        if self.pending_exec.len() >= 4096 {
            self.pending_exec
                .retain(|_, (_, _, at)| at.elapsed() < COMPANION_TTL);
        }
        self.pending_exec.insert(tid, (dev, ino, Instant::now()));
    }
}

fn buf_bytes(buf: &[u64]) -> &[u8] {
    // SAFETY: u64 storage viewed as bytes: same allocation, valid for reads, no padding.
    unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), buf.len() * 8) }
}
