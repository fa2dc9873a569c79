//! Pinned links: the programs keep enforcing if the agent dies (SIGKILL, OOM, crash) — the
//! last policy stays in force in the kernel, and fanotify events block on the holder — instead
//! of everything detaching with the process. A restarted agent attaches its own programs first,
//! then removes the previous instance's pins. A clean shutdown removes its own.
use std::{
    io,
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, PinnedLink};
use tracing::{info, warn};

/// Where bpffs is expected.
pub const BPFFS: &str = "/sys/fs/bpf";
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/palisade";

pub struct Pins {
    dir: PathBuf,
    /// Directories of earlier agent instances.
    stale: Vec<PathBuf>,
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(BPFFS) && l.contains(" bpf "))
        })
        .unwrap_or(false)
}

impl Pins {
    /// Prepare `root/<pid>`; mounts bpffs at /sys/fs/bpf when it is missing.
    pub fn open(root: &Path) -> io::Result<Pins> {
        if root.starts_with(BPFFS) && !bpffs_mounted() {
            nix::mount::mount(
                Some("bpf"),
                BPFFS,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(io::Error::from)?;
        }
        std::fs::create_dir_all(root)?;
        let stale = std::fs::read_dir(root)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        let dir = root.join(std::process::id().to_string());
        std::fs::create_dir_all(&dir)?;
        Ok(Pins { dir, stale })
    }

    pub fn pin(&self, name: &str, link: FdLink) -> io::Result<PinnedLink> {
        let path = self.dir.join(name);
        // A leftover file of the same name (pid reuse) would make pinning fail.
        let _ = std::fs::remove_file(&path);
        link.pin(&path).map_err(|e| io::Error::other(e.to_string()))
    }

    /// Whether a previous instance pinned a link of this name (it was attached when it died).
    pub fn stale_has(&self, name: &str) -> bool {
        self.stale.iter().any(|d| d.join(name).exists())
    }

    /// Detach the previous instance's programs: call once ours are attached.
    pub fn drop_stale(&mut self) {
        for d in self.stale.drain(..) {
            let n = remove_dir_files(&d);
            info!(dir = %d.display(), links = n, "removed the previous agent's pinned links");
        }
    }

    /// Remove our own directory (clean shutdown; pinned links must be unpinned first).
    pub fn remove(&self) {
        remove_dir_files(&self.dir);
    }
}

fn remove_dir_files(d: &Path) -> usize {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.filter_map(Result::ok) {
            if std::fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(d)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(dir = %d.display(), error = %e, "cannot remove pin directory");
    }
    n
}
