//! Tier 2 (no BPF-LSM): egress by cgroup sock_addr hooks attached per policed cgroup; exec and
//! open by fanotify permission events on the container's mounts; and the eBPF exec backstop,
//! whose stopped execs this backend answers (SIGCONT when allowed, SIGKILL when not).
use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use agent_common::{self as abi, ACC_EXEC, ACC_READ, ACC_WRITE, InodeKey};
use nix::{sys::signal::Signal, unistd::Pid};
use tracing::{debug, warn};

use super::{
    Backend, EnforceError,
    fanotify::Caller,
    fanotify::{self, Decider, DecisionThread, Group, MarkSet, Request, Verdict},
    rules::{ExecInodes, OpenIntents},
    snapshot::{self, SharedSnapshot},
};
use crate::{
    bpf::loader::{Loaded, Tier},
    events::model::{self as ev, Event, Kind, Source},
};

/// Where backends report what they decided in userspace.
pub type Reporter = Arc<dyn Fn(Event) + Send + Sync>;

pub struct CompatBackend {
    loaded: Loaded,
    group: Option<Group>,
    _thread: Option<DecisionThread>,
    /// Started by [`Backend::activate`], once the engine has bound what already runs: until
    /// then fanotify events wait in the group (a restarted agent must not answer them from an
    /// empty policy view).
    decider: Option<Arc<PolicyDecider>>,
    marks: HashMap<u64, MarkSet>,
    cgroup_dirs: HashMap<u64, PathBuf>,
    snapshot: SharedSnapshot,
    exec_inodes: AllowedInodes,
}

impl CompatBackend {
    /// `state_dir` holds the fanotify holder's pidfile; `None` disables fanotify (egress and
    /// the exec backstop still enforce).
    pub fn new(
        loaded: Loaded,
        state_dir: Option<&Path>,
        snapshot: SharedSnapshot,
        exec_inodes: ExecInodes,
        open_intent: OpenIntents,
        report: Reporter,
    ) -> Result<Self, EnforceError> {
        let exec_inodes = AllowedInodes::new(exec_inodes);
        let (group, decider) = match state_dir {
            Some(dir) => {
                let group = Group::open_or_adopt(dir)?;
                let decider = Arc::new(PolicyDecider {
                    snapshot: snapshot.clone(),
                    exec_inodes: exec_inodes.clone(),
                    open_intent,
                    report: report.clone(),
                    learned: Mutex::new(HashSet::new()),
                });
                (Some(group), Some(decider))
            }
            None => (None, None),
        };
        Ok(CompatBackend {
            loaded,
            group,
            _thread: None,
            decider,
            marks: HashMap::new(),
            cgroup_dirs: HashMap::new(),
            snapshot,
            exec_inodes,
        })
    }

    /// Mark the mounts of the container that `pid` lives in, once per cgroup. A process whose
    /// root is still the host's (the runtime before `pivot_root`) is not used: its mounts are
    /// the host's, and marking them would put every host open behind the decider.
    fn ensure_marked(&mut self, cgroup_id: u64, pid: i32) {
        let Some(group) = &self.group else { return };
        let root = std::fs::metadata(format!("/proc/{pid}/root"));
        let host = std::fs::metadata("/");
        if let (Ok(r), Ok(h)) = (&root, &host)
            && r.dev() == h.dev()
            && r.ino() == h.ino()
        {
            debug!(
                cgroup_id,
                pid, "process not in its container root yet; not marking"
            );
            return;
        }
        if let Some(set) = self.marks.get_mut(&cgroup_id) {
            let _ = group.rescan(set);
            return;
        }
        match group.mark_container(pid) {
            Ok(set) => {
                let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
                let points: Vec<String> = set
                    .mounts
                    .iter()
                    .map(|m| String::from_utf8_lossy(&m.mountpoint).into_owned())
                    .collect();
                debug!(cgroup_id, pid, exe = %exe.display(), ?points, "container mounts marked");
                self.marks.insert(cgroup_id, set);
            }
            Err(e) => warn!(cgroup_id, pid, error = %e, "cannot mark container mounts"),
        }
    }
}

/// The allowed-exec inode map (`PAL_EXEC_INODES`) and which policed cgroups each entry was
/// written for. A container's root is its own overlayfs device, so entries are in effect per
/// container: an entry goes when the last cgroup it was written for is unbound, else the map
/// fills up as containers come and go.
#[derive(Clone)]
struct AllowedInodes {
    map: ExecInodes,
    owners: Arc<Mutex<InodeOwners>>,
}

#[derive(Default)]
struct InodeOwners {
    by_cgroup: HashMap<u64, HashSet<InodeKey>>,
    refs: HashMap<InodeKey, usize>,
}

impl AllowedInodes {
    fn new(map: ExecInodes) -> Self {
        AllowedInodes {
            map,
            owners: Arc::default(),
        }
    }

    /// Let the kernel run `key` without asking (for every cgroup under its ruleset).
    fn allow(&self, cgroup_id: u64, key: InodeKey) {
        // Owners first, then the map (same order as `release`): an entry written concurrently
        // with its cgroup's release is either released or not yet recorded, never orphaned.
        let mut o = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(mut m) = self.map.lock() {
            let _ = m.insert(&key, &key.ruleset, 0);
        }
        if o.by_cgroup.entry(cgroup_id).or_default().insert(key) {
            *o.refs.entry(key).or_default() += 1;
        }
    }

    /// The cgroup is gone: delete the entries no other cgroup needs.
    fn release(&self, cgroup_id: u64) {
        let mut o = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        let Some(keys) = o.by_cgroup.remove(&cgroup_id) else {
            return;
        };
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            let last = match o.refs.get_mut(&k) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                _ => true,
            };
            if last {
                o.refs.remove(&k);
                let _ = m.remove(&k);
            }
        }
    }
}

/// Process state `T` (stopped) in /proc/<pid>/stat.
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

impl CompatBackend {
    /// Decide a stopped process from its image, as the backstop event would have.
    fn answer_stopped(&mut self, cgroup_id: u64, pid: i32) {
        let Ok(st) = nix::sys::stat::stat(format!("/proc/{pid}/exe").as_str()) else {
            return;
        };
        // SAFETY: `Event` is plain old data; all-zero is a valid value.
        let mut k: abi::Event = unsafe { std::mem::zeroed() };
        k.cgroup_id = cgroup_id;
        k.pid = pid as u32;
        k.tgid = pid as u32;
        k.flags = abi::EV_STOPPED;
        k.dev = fanotify::kernel_dev(st.st_dev);
        k.ino = st.st_ino;
        if let Some(e) = self.exec_event(&k) {
            tracing::info!(pid, path = ?e.path, "stopped exec left by a previous agent: denied");
        }
    }

    fn exec_event(&mut self, k: &abi::Event) -> Option<Event> {
        let pid = k.tgid as i32;
        if self.group.is_some() && !self.marks.contains_key(&k.cgroup_id) {
            // The process is stopped (enforce) or running in its own mount namespace: marking
            // through /proc/<pid>/root reaches the container's mounts either way.
            self.ensure_marked(k.cgroup_id, pid);
        }
        if k.flags & abi::EV_STOPPED == 0 {
            return None;
        }
        let b = snapshot::binding(&self.snapshot, k.cgroup_id);
        let path = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.into_os_string().into_encoded_bytes())
            .unwrap_or_default();
        let allowed = match &b {
            // Learn and monitor: stopped only until the mounts were marked (just done above);
            // their verdicts are reported from the exec trail.
            Some(b) if b.mode != abi::MODE_ENFORCE => true,
            Some(b) if !path.is_empty() => b.compiled.check_exec(&path).allowed,
            // Unknown binding or unreadable image: fail closed.
            _ => false,
        };
        let ruleset = b.as_ref().map_or(k.ruleset, |b| b.ruleset);
        if allowed {
            let key = InodeKey {
                ruleset,
                dev: k.dev,
                ino: k.ino,
            };
            self.exec_inodes.allow(k.cgroup_id, key);
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGCONT);
            None
        } else {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            let mut e = Event::agent(
                Kind::Exec,
                ev::Verdict::Denied,
                "exec denied by the backstop",
            );
            e.source = Source::ExecTrace;
            e.pid = k.pid;
            e.tgid = k.tgid;
            e.cgroup_id = k.cgroup_id;
            e.mode = ev::mode_from_abi(k.mode);
            e.policy = b.and_then(|b| b.policy);
            e.path = Some(String::from_utf8_lossy(&path).into_owned());
            e.access = Some("exec".into());
            e.flags = vec!["killed".into()];
            e.comm = String::from_utf8_lossy(&k.comm)
                .trim_end_matches('\0')
                .to_string();
            e.message = None;
            Some(e)
        }
    }
}

impl Backend for CompatBackend {
    fn tier(&self) -> Tier {
        Tier::Compat
    }

    fn on_bind(&mut self, cgroup_id: u64, dir: &Path) -> Result<(), EnforceError> {
        self.loaded.attach_cgroup(cgroup_id, dir)?;
        self.cgroup_dirs.insert(cgroup_id, dir.to_path_buf());
        // A container that already runs (found at start-up) is marked now; a new one on its
        // first exec.
        let pids = crate::containers::cgroup2::pids(dir).unwrap_or_default();
        if let Some(&pid) = pids.first() {
            self.ensure_marked(cgroup_id, pid as i32);
        }
        // Execs a previous agent instance's backstop stopped and nobody answered.
        for pid in pids.into_iter().filter(|&p| stopped(p)) {
            self.answer_stopped(cgroup_id, pid as i32);
        }
        if let Some(g) = &self.group {
            let _ = g.flush_cache();
        }
        Ok(())
    }

    fn on_unbind(&mut self, cgroup_id: u64) {
        self.exec_inodes.release(cgroup_id);
        self.loaded.detach_cgroup(cgroup_id);
        self.cgroup_dirs.remove(&cgroup_id);
        if let (Some(g), Some(set)) = (&self.group, self.marks.remove(&cgroup_id)) {
            // Mounts of a removed container are gone already; the marks went with them.
            let _ = g.unmark(set);
        }
    }

    fn set_policing(&mut self, any: bool) -> Result<(), EnforceError> {
        Ok(self.loaded.set_syscall_hooks(any)?)
    }

    fn on_rules_changed(&mut self) {
        if let Some(g) = &self.group
            && let Err(e) = g.flush_cache()
        {
            warn!(error = %e, "flushing the fanotify ignore-mark cache failed");
        }
    }

    fn attachments(&self) -> usize {
        self.loaded.attached_cgroups()
    }

    fn marks(&self) -> usize {
        self.marks.values().map(|m| m.mounts.len()).sum()
    }

    fn activate(&mut self) -> Result<(), EnforceError> {
        if let (Some(g), Some(d)) = (&self.group, self.decider.take()) {
            g.flush_cache()?;
            self._thread = Some(g.spawn_decider(d)?);
        }
        Ok(())
    }

    fn ready(&self, cgroup_id: u64) -> bool {
        self.group.is_none() || self.marks.contains_key(&cgroup_id)
    }

    fn shutdown(&mut self) {
        self.loaded.release();
        if let Some(t) = self._thread.take() {
            t.stop();
        }
        if let Some(g) = self.group.take()
            && let Err(e) = g.release()
        {
            warn!(error = %e, "releasing the fanotify group failed");
        }
    }

    /// Answer a stopped exec (backstop) and mark the container's mounts on its first exec.
    fn on_exec_event(&mut self, k: &abi::Event) -> Option<Event> {
        self.exec_event(k)
    }
}

/// Answers fanotify from the same compiled policies the kernel maps hold.
struct PolicyDecider {
    snapshot: SharedSnapshot,
    exec_inodes: AllowedInodes,
    open_intent: OpenIntents,
    report: Reporter,
    /// Learn mode: (ruleset, kind, path) already reported.
    learned: Mutex<HashSet<(u32, u8, Vec<u8>)>>,
}

impl Decider for PolicyDecider {
    /// The open flags the kernel recorded at syscall entry (`open_intent.rs`); none (not an
    /// open syscall, io_uring, an evicted entry) is unknown, which is judged as a write.
    fn caller(&self, tid: i32) -> Caller {
        let m = self.open_intent.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(&(tid as u32), 0) {
            Ok(i) => Caller::Open { flags: i.flags },
            Err(_) => Caller::Unknown,
        }
    }

    fn decide(&self, req: &Request) -> Verdict {
        let Some(b) = snapshot::binding(&self.snapshot, req.cgroup_id) else {
            // Not a policed process (e.g. the host touching a container's files). Never cached:
            // an ignore mark would also let the inode's policed readers through.
            return Verdict {
                allow: true,
                cache: false,
            };
        };
        let (access, d) = match req.kind {
            fanotify::Kind::Exec => (ACC_EXEC, b.compiled.check_exec(&req.path)),
            fanotify::Kind::Open => {
                let a = if req.write {
                    ACC_READ | ACC_WRITE
                } else {
                    ACC_READ
                };
                (a, b.compiled.check_file(&req.path, a))
            }
        };
        let is_exec = req.kind == fanotify::Kind::Exec;
        if d.allowed && is_exec {
            let key = InodeKey {
                ruleset: b.ruleset,
                dev: fanotify::kernel_dev(req.dev),
                ino: req.ino,
            };
            self.exec_inodes.allow(req.cgroup_id, key);
        }
        let verdict = match b.mode {
            abi::MODE_LEARN => ev::Verdict::Learned,
            _ if d.allowed => ev::Verdict::Allowed,
            abi::MODE_MONITOR => ev::Verdict::Violation,
            _ => ev::Verdict::Denied,
        };
        // Exec violations in monitor/learn mode are reported by the exec trail, not twice.
        let report = match verdict {
            ev::Verdict::Allowed => false,
            ev::Verdict::Learned => {
                !is_exec
                    && self
                        .learned
                        .lock()
                        .map(|mut s| s.insert((b.ruleset, access, req.path.clone())))
                        .unwrap_or(false)
            }
            ev::Verdict::Violation => !is_exec,
            ev::Verdict::Denied => true,
        };
        if report {
            let mut e = Event::agent(
                if is_exec { Kind::Exec } else { Kind::Open },
                verdict,
                String::new(),
            );
            e.message = None;
            e.source = Source::Fanotify;
            e.pid = req.pid as u32;
            e.tgid = req.pid as u32;
            e.comm = std::fs::read_to_string(format!("/proc/{}/comm", req.pid))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            e.cgroup_id = req.cgroup_id;
            e.container = b.container.clone();
            e.mode = ev::mode_from_abi(b.mode);
            e.policy = b.policy.clone();
            e.path = Some(String::from_utf8_lossy(&req.path).into_owned());
            e.access = Some(ev::access_string(access));
            (self.report)(e);
        }
        let allow = verdict != ev::Verdict::Denied;
        debug!(path = %String::from_utf8_lossy(&req.path), allow, "fanotify decision");
        Verdict {
            allow,
            cache: allow && self.cacheable(req),
        }
    }
}

impl PolicyDecider {
    /// An ignore mark is per inode and per event type, for every container and every access
    /// mode: only cache what every bound policy allows for read and write alike.
    fn cacheable(&self, req: &Request) -> bool {
        // Exec verdicts are never cached: the exec's own `FAN_OPEN_PERM` is recognised by the
        // `FAN_OPEN_EXEC_PERM` just before it, which a cached exec would no longer raise (the
        // open would then be judged as a plain open of unknown intent, i.e. a write).
        if req.kind == fanotify::Kind::Exec {
            return false;
        }
        let s = self.snapshot.read().unwrap_or_else(|e| e.into_inner());
        s.by_cgroup.values().all(|b| {
            b.mode != abi::MODE_LEARN
                && b.compiled
                    .check_file(&req.path, ACC_READ | ACC_WRITE)
                    .allowed
        })
    }
}
