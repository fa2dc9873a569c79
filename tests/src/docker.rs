//! Docker helpers for integration tests: a running dockerd, the local `palisade-test:latest`
//! image (static busybox; `cargo xtask image` builds a richer one with the same name), and
//! containers removed when their guard drops.
use std::{
    fs,
    os::unix::{fs::symlink, process::CommandExt},
    path::PathBuf,
    process::{Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};

pub const IMAGE: &str = "palisade-test:latest";
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";
const DOCKERD_LOG: &str = "/tmp/palisade-dockerd.log";
const DOCKERD_PID: &str = "/tmp/palisade-dockerd.pid";

/// Serialises daemon start and image import between tests of one binary.
static SETUP: Mutex<()> = Mutex::new(());

fn docker_ready() -> bool {
    Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Output of a docker CLI call, failing with its stderr.
pub fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("spawning docker")?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Starts `dockerd --bridge=none --iptables=false` (left running for later tests) unless a
/// daemon answers, then ensures the test image exists.
pub fn ensure_docker() -> Result<()> {
    let _guard = SETUP.lock().unwrap_or_else(|e| e.into_inner());
    if !docker_ready() {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(DOCKERD_LOG)?;
        Command::new("dockerd")
            .args([
                "--bridge=none",
                "--iptables=false",
                "--pidfile",
                DOCKERD_PID,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Own process group: the daemon outlives the test process.
            .process_group(0)
            .spawn()
            .context("spawning dockerd")?;
        let start = Instant::now();
        while !docker_ready() {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("dockerd did not come up; see {DOCKERD_LOG}");
            }
            thread::sleep(Duration::from_millis(300));
        }
    }
    if docker(&["image", "inspect", IMAGE]).is_err() {
        import_busybox_image()?;
    }
    Ok(())
}

/// Imports a minimal image: static busybox plus the applet links tests use.
fn import_busybox_image() -> Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| fs::metadata(p).is_ok())
        .context("busybox-static not installed")?;
    let rootfs = std::env::temp_dir().join(format!("palisade-test-rootfs-{}", std::process::id()));
    let bin = rootfs.join("bin");
    fs::create_dir_all(&bin)?;
    for d in ["etc", "tmp", "proc", "sys", "dev"] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    fs::copy(busybox, bin.join("busybox"))?;
    for applet in [
        "sh", "sleep", "cat", "ls", "echo", "true", "wget", "nc", "touch", "id",
    ] {
        symlink("busybox", bin.join(applet))?;
    }
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar --numeric-owner --owner=0 --group=0 -C {} -c . | docker import --change 'CMD [\"/bin/sh\"]' - {IMAGE} >/dev/null",
            rootfs.display()
        ))
        .status()?;
    let _ = fs::remove_dir_all(&rootfs);
    if !status.success() {
        bail!("docker import of {IMAGE} failed");
    }
    Ok(())
}

/// A unique container name for this test run.
pub fn unique_name(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

/// A container removed (`docker rm -f`) when dropped.
#[derive(Debug)]
pub struct Container {
    pub id: String,
    pub name: String,
    removed: bool,
}

impl Container {
    /// `docker run -d --network none --name <name> [--label k=v]... <IMAGE> <cmd...>`.
    pub fn run(name: &str, labels: &[(&str, &str)], cmd: &[&str]) -> Result<Self> {
        Self::docker_new(&["run", "-d"], name, labels, cmd)
    }

    /// `docker create` (no cgroup yet; [`Container::start`] makes it).
    pub fn create(name: &str, labels: &[(&str, &str)], cmd: &[&str]) -> Result<Self> {
        Self::docker_new(&["create"], name, labels, cmd)
    }

    /// `docker <verb...> --name <name> <args...> <IMAGE> <cmd...>` with full control of the
    /// arguments (network, volumes, labels, `--rm`); returns the guard and the CLI's output.
    pub fn with_args(verb: &[&str], name: &str, args: &[&str], cmd: &[&str]) -> Result<Self> {
        let mut all = verb.to_vec();
        all.extend(["--name", name]);
        all.extend(args);
        all.push(IMAGE);
        all.extend(cmd);
        let id = docker(&all)?;
        Ok(Self {
            id,
            name: name.to_owned(),
            removed: false,
        })
    }

    /// `docker exec <id> <cmd...>`: (exit code, stdout, stderr).
    pub fn exec(&self, cmd: &[&str]) -> (i32, String, String) {
        let out = Command::new("docker")
            .arg("exec")
            .arg(&self.id)
            .args(cmd)
            .output();
        match out {
            Ok(o) => (
                o.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            ),
            Err(e) => (-1, String::new(), e.to_string()),
        }
    }

    pub fn start(&self) -> Result<()> {
        docker(&["start", &self.id]).map(drop)
    }

    fn docker_new(
        verb: &[&str],
        name: &str,
        labels: &[(&str, &str)],
        cmd: &[&str],
    ) -> Result<Self> {
        let mut args = verb.to_vec();
        args.extend(["--network", "none", "--name", name]);
        let label_args: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for l in &label_args {
            args.extend(["--label", l.as_str()]);
        }
        args.push(IMAGE);
        args.extend(cmd);
        let id = docker(&args)?;
        Ok(Self {
            id,
            name: name.to_owned(),
            removed: false,
        })
    }

    /// Main pid on the host (0 when not running).
    pub fn pid(&self) -> Result<u32> {
        Ok(docker(&["inspect", "--format", "{{.State.Pid}}", &self.id])?.parse()?)
    }

    /// cgroup v2 path of the container's main process (the `0::` line).
    pub fn cgroup_path(&self) -> Result<String> {
        let text = fs::read_to_string(format!("/proc/{}/cgroup", self.pid()?))?;
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(str::to_owned)
            .context("no cgroup2 line")
    }

    /// `docker rm -f` now (the guard then does nothing).
    pub fn remove(&mut self) -> Result<()> {
        self.removed = true;
        docker(&["rm", "-f", &self.id]).map(drop)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if !self.removed {
            let _ = docker(&["rm", "-f", &self.id]);
        }
    }
}

/// The Docker socket path, for clients.
pub fn socket() -> PathBuf {
    PathBuf::from(DOCKER_SOCKET)
}
