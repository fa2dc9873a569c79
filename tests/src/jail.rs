//! A container stand-in for kernels without Docker (the QEMU guest): a directory that processes
//! enter as their root in a private mount namespace, the way runc does (`unshare(CLONE_NEWNS)`,
//! bind the root onto itself, `pivot_root`, detach the old root). The agent then sees what it
//! sees of a real container: a root that is not the host's, paths rendered from that root,
//! mounts only that namespace has.
use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use crate::cgroup::TestCgroup;

pub struct Jail {
    pub root: PathBuf,
    /// The jail's first process (`sleep`): its mount namespace is the one later processes
    /// join, as `docker exec` joins a container's.
    init: Option<Child>,
}

impl Jail {
    /// A fresh root under /tmp with `/bin/busybox` and each of `bins` (host paths) in `/bin`.
    pub fn new(name: &str, bins: &[&str]) -> std::io::Result<Jail> {
        let root = PathBuf::from(format!("/tmp/jail-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["bin", "tmp", "old", "dev"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        for b in std::iter::once(&"/bin/busybox").chain(bins) {
            let name = Path::new(b).file_name().expect("file name");
            std::fs::copy(b, root.join("bin").join(name))?;
        }
        Ok(Jail { root, init: None })
    }

    /// Start the jail's init process in `cg`: it creates the jail's mount namespace and root
    /// first and enters the cgroup last, as runc does (the namespace set-up is the runtime's,
    /// not the workload's: a policed workload may not create namespaces).
    pub fn start(&mut self, cg: &TestCgroup) -> std::io::Result<()> {
        let mut cmd = Command::new("/bin/busybox");
        cmd.args(["sleep", "3600"]).env_clear();
        let root = CString::new(self.root.as_os_str().as_bytes()).expect("no NUL");
        let procs = procs_path(cg);
        // SAFETY: only raw syscalls after fork, on strings built before it.
        unsafe {
            cmd.pre_exec(move || {
                let fd = open_procs(&procs)?;
                enter(&root)?;
                join_cgroup(fd)
            });
        }
        self.init = Some(cmd.spawn()?);
        Ok(())
    }

    /// `path` inside the jail, as the host sees it.
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Run `argv` (paths inside the jail) in `cg`, rooted in the jail, output captured.
    pub fn spawn(&self, cg: &TestCgroup, argv: &[&str]) -> std::io::Result<Child> {
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", "/bin")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.spawn_cmd(cg, &mut cmd)
    }

    /// Spawn a prepared command in `cg`, in the jail's mount namespace and root (its program
    /// path is resolved inside the jail). [`Jail::start`] must have run.
    pub fn spawn_cmd(&self, cg: &TestCgroup, cmd: &mut Command) -> std::io::Result<Child> {
        let init = self.init.as_ref().expect("Jail::start first").id();
        let ns = CString::new(format!("/proc/{init}/ns/mnt")).expect("no NUL");
        let procs = procs_path(cg);
        // SAFETY: only raw syscalls after fork, on strings built before it.
        unsafe {
            cmd.pre_exec(move || {
                let fd = open_procs(&procs)?;
                join(&ns)?;
                join_cgroup(fd)
            });
        }
        cmd.spawn()
    }
}

fn procs_path(cg: &TestCgroup) -> CString {
    CString::new(cg.dir.join("cgroup.procs").as_os_str().as_bytes()).expect("no NUL")
}

/// Opened before leaving the host's mount namespace, written after.
fn open_procs(procs: &CString) -> std::io::Result<libc::c_int> {
    // SAFETY: a plain open of a NUL-terminated path.
    let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn join_cgroup(fd: libc::c_int) -> std::io::Result<()> {
    // SAFETY: writes one byte from a static buffer to an fd we own, then closes it.
    let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    if n != 1 {
        return Err(err);
    }
    Ok(())
}

/// runc's sequence, reduced: private mount namespace, the root bound onto itself, pivot_root,
/// old root detached.
fn enter(root: &CString) -> std::io::Result<()> {
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let slash = c"/";
    let dot = c".";
    let old = c"old";
    let old_abs = c"/old";
    // SAFETY: plain syscalls with NUL-terminated strings that outlive them.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            root.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ))?;
        check(libc::chdir(root.as_ptr()))?;
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), old.as_ptr()) == 0 {
            check(libc::chdir(slash.as_ptr()))?;
            check(libc::umount2(old_abs.as_ptr(), libc::MNT_DETACH))?;
        } else {
            // The guest's root is the initramfs, which cannot be pivoted away from (EINVAL):
            // move the jail over `/` and chroot into it, as runc's no-pivot mode does.
            check(libc::mount(
                dot.as_ptr(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            ))?;
            check(libc::chroot(dot.as_ptr()))?;
            check(libc::chdir(slash.as_ptr()))?;
        }
    }
    Ok(())
}

/// `docker exec`'s sequence, reduced: join the jail's mount namespace (which also sets the root
/// to that namespace's root, the jail).
fn join(ns: &CString) -> std::io::Result<()> {
    // SAFETY: plain syscalls on a NUL-terminated path; the fd is closed before exec.
    unsafe {
        let fd = libc::open(ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let r = libc::setns(fd, libc::CLONE_NEWNS);
        libc::close(fd);
        if r < 0 || libc::chdir(c"/".as_ptr()) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Drop for Jail {
    fn drop(&mut self) {
        if let Some(mut c) = self.init.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
