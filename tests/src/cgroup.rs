//! Test cgroups: created by the test under the cgroup2 mount, removed (with their processes
//! killed by PID) on drop. Never the root, never the test's own cgroup.
use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command},
};

use palisade::containers::cgroup2;

pub struct TestCgroup {
    pub dir: PathBuf,
    pub id: u64,
    /// Path relative to the cgroup2 mount, e.g. `/palisade-test-exec-123`.
    pub rel: String,
}

impl TestCgroup {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let root = cgroup2::find_cgroup2_mount()?;
        let leaf = format!("palisade-test-{name}-{}", std::process::id());
        let dir = cgroup2::create_child(&root, &leaf)?;
        assert_ne!(dir, root, "never police the cgroup2 root");
        let id = cgroup2::cgroup_id(&dir)?;
        Ok(TestCgroup {
            rel: format!("/{leaf}"),
            dir,
            id,
        })
    }

    /// Spawn `cmd` inside this cgroup: the child moves itself in before `exec`, so the exec
    /// itself is already policed.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<Child> {
        self.enter_before_exec(cmd).spawn()
    }

    /// Make `cmd`'s child move itself into this cgroup before `exec` (before any later
    /// `pre_exec` step, which may leave the host's mount namespace).
    pub fn enter_before_exec<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        let procs = self.dir.join("cgroup.procs");
        // SAFETY: only async-signal-safe work after fork (open/write/close via std::fs is
        // a plain syscall sequence here; no allocation happens before the path is prebuilt).
        let procs = std::ffi::CString::new(procs.as_os_str().as_encoded_bytes()).unwrap();
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr() as *const _, 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for pid in cgroup2::pids(&self.dir).unwrap_or_default() {
            // Only processes in the test's own cgroup, by PID.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = cgroup2::remove(&self.dir);
    }
}
