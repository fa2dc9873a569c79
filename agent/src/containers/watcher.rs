//! Watching the cgroup2 tree: an initial walk, then inotify `IN_CREATE`/`IN_DELETE` on every
//! directory, so containers of any runtime are seen the moment their cgroup is made or removed.
//! cgroup directories are only ever made by `mkdir(2)`/`rmdir(2)`, which the VFS reports to
//! inotify even on cgroupfs.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{
    cgroup2::{self, absolute_path, relative_path},
    inventory::Inventory,
    meta::Runtime,
    runtime_id::parse_cgroup_path,
};

/// Where to send ids of containers whose metadata must be fetched, per runtime API.
#[derive(Clone, Default)]
pub struct Resolvers {
    pub docker: Option<mpsc::UnboundedSender<String>>,
    pub cri: Option<mpsc::UnboundedSender<String>>,
}

impl Resolvers {
    pub fn request(&self, runtime: Runtime, id: &str) {
        let tx = match runtime {
            Runtime::Docker => self.docker.as_ref(),
            Runtime::Containerd | Runtime::Crio => self.cri.as_ref(),
            // Podman has no daemon to ask; bare cgroups have no metadata.
            Runtime::Podman | Runtime::Cgroup => None,
        };
        if let Some(tx) = tx {
            let _ = tx.send(id.to_owned());
        }
    }
}

/// The cgroup tree scanner and (when inotify is available) watcher.
pub struct CgroupWatcher {
    root: PathBuf,
    inventory: Inventory,
    resolvers: Resolvers,
    watches: Option<Watches>,
    wd_paths: HashMap<WatchDescriptor, PathBuf>,
}

const DIR_MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::ONLYDIR)
    .union(WatchMask::DONT_FOLLOW);

impl CgroupWatcher {
    /// Creates the watcher. Returns the inotify instance to turn into an event stream, or
    /// `None` when inotify is unavailable (then only rescans find containers).
    pub fn new(
        root: PathBuf,
        inventory: Inventory,
        resolvers: Resolvers,
    ) -> (Self, Option<Inotify>) {
        let inotify = match Inotify::init() {
            Ok(i) => Some(i),
            Err(e) => {
                warn!(error = %e, "inotify unavailable; containers found by periodic rescans only");
                None
            }
        };
        let watcher = Self {
            root,
            inventory,
            resolvers,
            watches: inotify.as_ref().map(Inotify::watches),
            wd_paths: HashMap::new(),
        };
        (watcher, inotify)
    }

    /// Watches and registers `dir` and everything below it. Watching before listing means a
    /// child made meanwhile is either listed or reported.
    pub fn scan(&mut self, dir: &Path) {
        if let Some(w) = self.watches.as_mut() {
            match w.add(dir, DIR_MASK) {
                Ok(wd) => {
                    self.wd_paths.insert(wd, dir.to_path_buf());
                }
                Err(e) => debug!(dir = %dir.display(), error = %e, "inotify watch failed"),
            }
        }
        self.register(dir);
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.scan(&entry.path());
            }
        }
    }

    /// Records `dir` in the inventory if it is (inside) a container cgroup.
    fn register(&mut self, dir: &Path) {
        let Ok(rel) = relative_path(&self.root, dir) else {
            return;
        };
        let Some(parsed) = parse_cgroup_path(&rel) else {
            return;
        };
        // The directory may already be gone again: then there is nothing to record.
        let Ok(cgroup_id) = cgroup2::cgroup_id(dir) else {
            return;
        };
        if parsed.nested {
            if !self
                .inventory
                .add_nested_cgroup(&parsed.container_id, &rel, cgroup_id)
            {
                let top = absolute_path(&self.root, &parsed.container_cgroup);
                self.register(&top);
                self.inventory
                    .add_nested_cgroup(&parsed.container_id, &rel, cgroup_id);
            }
            return;
        }
        let pid = cgroup2::pids(dir).ok().and_then(|p| p.first().copied());
        if self.inventory.add_container_cgroup(&parsed, cgroup_id, pid) {
            self.resolvers.request(parsed.runtime, &parsed.container_id);
        } else if let Some(pid) = pid {
            // Seen again on a rescan: a runtime without a pid (podman) gets one from the cgroup.
            self.inventory.set_pid_if_unknown(&parsed.container_id, pid);
        }
    }

    /// Full resync: registers what exists, removes what no longer does (after an inotify
    /// queue overflow, or periodically as a safety net).
    pub fn rescan(&mut self) {
        let root = self.root.clone();
        self.scan(&root);
        for path in self.inventory.known_paths() {
            if !absolute_path(&self.root, &path).exists() {
                self.inventory.remove_cgroup(&path);
            }
        }
    }

    /// Handles one inotify event.
    pub fn on_event(
        &mut self,
        wd: &WatchDescriptor,
        mask: EventMask,
        name: Option<&std::ffi::OsStr>,
    ) {
        if mask.contains(EventMask::Q_OVERFLOW) {
            warn!("inotify queue overflow; rescanning the cgroup tree");
            self.rescan();
            return;
        }
        if mask.contains(EventMask::IGNORED) {
            self.wd_paths.remove(wd);
            return;
        }
        if !mask.contains(EventMask::ISDIR) {
            return;
        }
        let (Some(parent), Some(name)) = (self.wd_paths.get(wd), name) else {
            return;
        };
        let dir = parent.join(name);
        if mask.contains(EventMask::CREATE) {
            self.scan(&dir);
        } else if mask.contains(EventMask::DELETE)
            && let Ok(rel) = relative_path(&self.root, &dir)
        {
            self.inventory.remove_cgroup(&rel);
        }
    }
}
