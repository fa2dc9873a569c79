//! `cargo xtask docker-up` and `cargo xtask image`: a running dockerd and the local
//! `palisade-test:latest` image (static busybox, no registry needed).
use std::{
    fs,
    os::unix::{
        fs::{PermissionsExt, symlink},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::util::{capture, on_path, root, succeeds, target_dir};

pub const IMAGE: &str = "palisade-test:latest";
const HASH_LABEL: &str = "palisade.rootfs.hash";
const DOCKERD_LOG: &str = "/tmp/palisade-dockerd.log";
const DOCKERD_PID: &str = "/tmp/palisade-dockerd.pid";
const DOCKERD_TIMEOUT: Duration = Duration::from_secs(60);

/// Files copied on top of the busybox rootfs (owned by the test crate), if the directory exists.
fn image_overlay() -> PathBuf {
    root().join("tests/image")
}

fn docker_ready() -> bool {
    succeeds(Command::new("docker").arg("info"))
}

/// Starts dockerd (no bridge, no iptables: tests use `--network none|host`) unless a daemon
/// already answers, and waits until it does.
pub fn docker_up() -> Result<()> {
    if docker_ready() {
        eprintln!("[xtask] docker: daemon is up");
        return Ok(());
    }
    if !on_path("dockerd") {
        bail!("dockerd not found: run `cargo xtask bootstrap`");
    }
    eprintln!("[xtask] docker: starting dockerd (log {DOCKERD_LOG})");
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(DOCKERD_LOG)?;
    let mut child = Command::new("dockerd")
        .args([
            "--bridge=none",
            "--iptables=false",
            "--pidfile",
            DOCKERD_PID,
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Own process group: a Ctrl-C on xtask must not take the daemon down with it.
        .process_group(0)
        .spawn()
        .context("spawning dockerd")?;
    let start = Instant::now();
    while start.elapsed() < DOCKERD_TIMEOUT {
        if let Some(status) = child.try_wait()? {
            bail!(
                "dockerd exited early ({status}); see {DOCKERD_LOG}:\n{}",
                log_tail()
            );
        }
        if docker_ready() {
            eprintln!(
                "[xtask] docker: up after {:.1}s (pid {})",
                start.elapsed().as_secs_f64(),
                child.id()
            );
            return Ok(());
        }
        thread::sleep(Duration::from_millis(500));
    }
    bail!(
        "dockerd did not answer within {DOCKERD_TIMEOUT:?}; see {DOCKERD_LOG}:\n{}",
        log_tail()
    )
}

fn log_tail() -> String {
    let text = fs::read_to_string(DOCKERD_LOG).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Builds the rootfs and imports it as `palisade-test:latest` unless an image with the same
/// content hash is already there.
pub fn image() -> Result<()> {
    let rootfs = target_dir().join("palisade-test-image/rootfs");
    build_rootfs(&rootfs)?;
    let hash = format!("{:016x}", tree_hash(&rootfs)?);
    let have = capture(Command::new("docker").args([
        "image",
        "inspect",
        "--format",
        &format!("{{{{index .Config.Labels \"{HASH_LABEL}\"}}}}"),
        IMAGE,
    ]))
    .unwrap_or_default();
    if have.trim() == hash {
        eprintln!("[xtask] image {IMAGE}: up to date ({hash})");
        return Ok(());
    }
    eprintln!("[xtask] image {IMAGE}: importing ({hash})");
    let mut tar = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(&rootfs)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("spawning tar")?;
    let tar_out = tar.stdout.take().expect("piped");
    let import = Command::new("docker")
        .args([
            "import",
            "--change",
            &format!("LABEL {HASH_LABEL}={hash}"),
            "--change",
            "CMD [\"/bin/sh\"]",
            "-",
            IMAGE,
        ])
        .stdin(tar_out)
        .stdout(Stdio::null())
        .status()
        .context("spawning docker import")?;
    let tar_status = tar.wait()?;
    if !tar_status.success() || !import.success() {
        bail!("importing {IMAGE} failed (tar {tar_status}, docker import {import})");
    }
    Ok(())
}

/// busybox + one symlink per applet, a minimal /etc, and the test crate's overlay.
fn build_rootfs(rootfs: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(rootfs);
    for dir in ["bin", "etc", "tmp", "proc", "sys", "dev", "root", "var/www"] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    let busybox = static_busybox()?;
    fs::copy(&busybox, rootfs.join("bin/busybox"))?;
    for applet in busybox_applets(&busybox)? {
        if applet != "busybox" {
            symlink("busybox", rootfs.join("bin").join(&applet))?;
        }
    }
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    let overlay = image_overlay();
    if overlay.is_dir() {
        copy_tree(&overlay, rootfs)?;
    }
    Ok(())
}

/// The busybox-static binary (Debian installs it as /bin/busybox).
pub fn static_busybox() -> Result<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("busybox not found: run `cargo xtask bootstrap` (package busybox-static)")
}

/// Every applet the given busybox provides.
pub fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let list = capture(Command::new(busybox).arg("--list"))?;
    Ok(list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains('/'))
        .map(String::from)
        .collect())
}

/// Recursive copy preserving modes and symlinks.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let meta = fs::symlink_metadata(&src)?;
        if meta.is_dir() {
            fs::create_dir_all(&dst)?;
            copy_tree(&src, &dst)?;
        } else if meta.file_type().is_symlink() {
            let _ = fs::remove_file(&dst);
            symlink(fs::read_link(&src)?, &dst)?;
        } else {
            let _ = fs::remove_file(&dst);
            fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

/// FNV-1a over (path, mode, content or link target) of every entry in sorted order: stable
/// across runs (mtimes are ignored), so an unchanged rootfs is not re-imported.
fn tree_hash(dir: &Path) -> Result<u64> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            out.push(path.strip_prefix(base)?.to_path_buf());
            if fs::symlink_metadata(&path)?.is_dir() {
                walk(base, &path, out)?;
            }
        }
        Ok(())
    }
    let mut paths = Vec::new();
    walk(dir, dir, &mut paths)?;
    paths.sort();
    let mut h = Fnv::default();
    for rel in paths {
        let path = dir.join(&rel);
        let meta = fs::symlink_metadata(&path)?;
        h.write(rel.as_os_str().as_encoded_bytes());
        h.write(&meta.permissions().mode().to_le_bytes());
        if meta.file_type().is_symlink() {
            h.write(fs::read_link(&path)?.as_os_str().as_encoded_bytes());
        } else if meta.is_file() {
            h.write(&fs::read(&path)?);
        }
        h.write(&[0]);
    }
    Ok(h.0)
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_hash_tracks_content_not_mtime() {
        let dir = std::env::temp_dir().join(format!("xtask-hash-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("bin/a"), "one").unwrap();
        symlink("a", dir.join("bin/b")).unwrap();
        let first = tree_hash(&dir).unwrap();
        fs::write(dir.join("bin/a"), "one").unwrap();
        assert_eq!(first, tree_hash(&dir).unwrap());
        fs::write(dir.join("bin/a"), "two").unwrap();
        assert_ne!(first, tree_hash(&dir).unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }
}
