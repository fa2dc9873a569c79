//! The cgroup v2 hierarchy: where it is mounted, cgroup ids, and creating/removing child
//! cgroups. The mount point is read from mountinfo because it differs between hosts
//! (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones).
use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

/// Errors from cgroup filesystem operations.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem in {0}")]
    NotMounted(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not inside the cgroup2 mount {1}")]
    OutsideMount(PathBuf, PathBuf),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Finds the cgroup2 mount point of the calling process's mount namespace.
pub fn find_cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(io_err("read", path))?;
    parse_cgroup2_mount(&text).ok_or_else(|| CgroupError::NotMounted(path.display().to_string()))
}

/// Returns the mount point of the first cgroup2 entry of a mountinfo text.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // `id parent maj:min root mountpoint opts [optional fields...] - fstype source superopts`
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mountpoint = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mountpoint)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// cgroup v2 id of a cgroup directory: its inode number. This is what
/// `bpf_get_current_cgroup_id()` returns for a task inside it.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    Ok(fs::metadata(path).map_err(io_err("stat", path))?.ino())
}

/// The cgroup v2 path of a process, relative to the hierarchy root (the `0::` line of
/// `/proc/<pid>/cgroup`).
pub fn cgroup_path_of_pid(pid: u32) -> Result<String, CgroupError> {
    let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = fs::read_to_string(&path).map_err(io_err("read", &path))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or_else(|| CgroupError::NotMounted(path.display().to_string()))
}

/// Path of a cgroup relative to the mount, always starting with `/` (the form used in
/// `/proc/<pid>/cgroup` and in [`super::meta::ContainerMeta::cgroup_path`]).
pub fn relative_path(root: &Path, dir: &Path) -> Result<String, CgroupError> {
    let rel = dir
        .strip_prefix(root)
        .map_err(|_| CgroupError::OutsideMount(dir.to_path_buf(), root.to_path_buf()))?;
    Ok(format!("/{}", rel.display()))
}

/// Absolute directory of a cgroup path such as `/docker/<id>` under the mount `root`.
pub fn absolute_path(root: &Path, cgroup_path: &str) -> PathBuf {
    root.join(cgroup_path.trim_start_matches('/'))
}

/// Creates `parent/name` (no error if it exists) and returns its path.
pub fn create_child(parent: &Path, name: &str) -> Result<PathBuf, CgroupError> {
    let path = parent.join(name);
    match fs::create_dir(&path) {
        Ok(()) => Ok(path),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(path),
        Err(e) => Err(io_err("mkdir", &path)(e)),
    }
}

/// Moves a process into a cgroup.
pub fn move_pid(cgroup: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, pid.to_string()).map_err(io_err("write", &procs))
}

/// Pids currently in a cgroup (not its descendants).
pub fn pids(cgroup: &Path) -> Result<Vec<u32>, CgroupError> {
    let procs = cgroup.join("cgroup.procs");
    let text = fs::read_to_string(&procs).map_err(io_err("read", &procs))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Removes an empty cgroup. A cgroup whose last process just exited stays busy for a short
/// while (the kernel releases it asynchronously), so `EBUSY` is retried for up to a second.
pub fn remove(cgroup: &Path) -> Result<(), CgroupError> {
    let mut tries = 0;
    loop {
        match fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io_err("rmdir", cgroup)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "\
35 24 0:30 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 35 0:39 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 master:1 - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/sda rw"),
            None
        );
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_mountinfo(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo(r"/x\\"), r"/x\\");
    }

    #[test]
    fn this_machine_has_a_cgroup2_mount_whose_root_id_matches_stat() {
        let root = find_cgroup2_mount().expect("cgroup2 mounted");
        assert!(root.join("cgroup.procs").exists(), "{}", root.display());
        let id = cgroup_id(&root).unwrap();
        assert!(id > 0);
    }

    #[test]
    fn relative_and_absolute_paths_round_trip() {
        let root = Path::new("/sys/fs/cgroup/unified");
        let dir = absolute_path(root, "/docker/abc");
        assert_eq!(dir, Path::new("/sys/fs/cgroup/unified/docker/abc"));
        assert_eq!(relative_path(root, &dir).unwrap(), "/docker/abc");
        assert!(relative_path(root, Path::new("/tmp")).is_err());
    }
}
