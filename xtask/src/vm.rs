//! `cargo xtask guest`: runs the `guest_*` tests inside a QEMU guest booted with BPF-LSM
//! active (`lsm=...,bpf`), which the host kernels here do not offer.
use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    bootstrap::{self, GuestKernel},
    cargo,
    cpio::Archive,
    docker::{busybox_applets, static_busybox},
    report::{Counts, parse_libtest},
    util::{capture, display, on_path, root, target_dir},
};

const INIT: &str = include_str!("../../tests/guest/init.sh");
const APPEND: &str = "console=ttyS0 lsm=lockdown,capability,landlock,yama,bpf panic=-1 quiet";
const RESULT: &str = "PALISADE-GUEST-RESULT ";
const BOOTED: &str = "PALISADE-GUEST-BOOTED";
const DONE: &str = "PALISADE-GUEST-DONE";

#[derive(Debug, Clone)]
pub struct GuestOptions {
    /// The kernel of the matrix to boot.
    pub kernel: GuestKernel,
    /// Drop to a shell on the console after the tests instead of powering off.
    pub keep: bool,
    pub timeout: Duration,
    /// Extra arguments for every guest test binary (e.g. a test-name filter).
    pub test_args: Vec<String>,
}

/// What the guest reported.
#[derive(Debug, Default)]
pub struct GuestOutcome {
    /// (binary or self-check name, exit code) in the order they ran.
    pub results: Vec<(String, i32)>,
    pub done: bool,
    pub counts: Counts,
    pub boot: Option<Duration>,
    /// `uname -r` as the guest printed it.
    pub release: Option<String>,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl GuestOutcome {
    pub fn passed(&self) -> bool {
        self.done && !self.results.is_empty() && self.results.iter().all(|(_, code)| *code == 0)
    }

    pub fn summary(&self) -> String {
        let failed: Vec<&str> = self
            .results
            .iter()
            .filter(|r| r.1 != 0)
            .map(|r| r.0.as_str())
            .collect();
        let boot = self
            .boot
            .map_or("never".into(), |b| format!("{:.1}s", b.as_secs_f64()));
        let release = self.release.as_deref().unwrap_or("?");
        let mut s = format!(
            "guest {release}: {} binaries/checks, boot {boot}, total {:.1}s",
            self.results.len(),
            self.elapsed.as_secs_f64()
        );
        if !failed.is_empty() {
            s.push_str(&format!(", failed: {}", failed.join(" ")));
        }
        if self.timed_out {
            s.push_str(", TIMED OUT");
        } else if !self.done {
            s.push_str(", no DONE line (guest crashed?)");
        }
        s
    }
}

/// Builds everything, boots the guest on `opts.kernel` and collects its results.
pub fn guest(opts: &GuestOptions) -> Result<GuestOutcome> {
    let initramfs = prepare(opts)?;
    boot_kernel(&initramfs, opts)
}

/// Boots the guest on `opts.kernel` with an initramfs from [`prepare`].
pub fn boot_kernel(initramfs: &Path, opts: &GuestOptions) -> Result<GuestOutcome> {
    let vmlinuz = match opts.kernel.vmlinuz() {
        Some(v) => v,
        None => bootstrap::guest_kernel(&mut Default::default(), &opts.kernel)?,
    };
    let log = target_dir()
        .join("guest")
        .join(format!("serial-{}.log", opts.kernel.name));
    let mut outcome = boot(&vmlinuz, initramfs, opts, &log)?;
    // The matrix is only as good as the kernel that really booted.
    let want = format!("{}.", opts.kernel.name);
    let booted = outcome.release.as_deref().unwrap_or("");
    if !booted.starts_with(&want) {
        eprintln!(
            "[xtask] guest: expected kernel {} but the guest reported `{booted}`",
            opts.kernel.name
        );
        outcome.results.push(("selfcheck-kernel-version".into(), 1));
    } else {
        outcome.results.push(("selfcheck-kernel-version".into(), 0));
    }
    Ok(outcome)
}

/// Builds the agent and the guest tests and packs them into an initramfs (kernel-independent:
/// one image serves every kernel of the matrix).
pub fn prepare(opts: &GuestOptions) -> Result<PathBuf> {
    // The debug build: the host tests built it already, and the guest only runs tests.
    let palisade = cargo::build_palisade(false)?;
    let tests = cargo::build_guest_tests()?;
    if tests.is_empty() {
        eprintln!("[xtask] guest: no `guest_*` test targets yet; running the self-checks only");
    }
    let dir = target_dir().join("guest");
    fs::create_dir_all(&dir)?;
    let initramfs = dir.join("initramfs.cpio.gz");
    let started = Instant::now();
    build_initramfs(&dir, &palisade, &tests, opts, &initramfs)?;
    eprintln!(
        "[xtask] guest: initramfs {} ({:.1} MiB) in {:.1}s",
        initramfs.display(),
        fs::metadata(&initramfs)?.len() as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    Ok(initramfs)
}

/// busybox, the agent, the test binaries, their shared libraries, /dev/console and /init.
fn build_initramfs(
    dir: &Path,
    palisade: &Path,
    tests: &[cargo::Executable],
    opts: &GuestOptions,
    out: &Path,
) -> Result<()> {
    let stage = dir.join("stage");
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(&stage)?;
    let mut a = Archive::default();
    for d in [
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "mnt",
        "var",
        "etc/palisade",
    ] {
        a.dir(d);
    }
    a.char_dev("dev/console", 5, 1);
    a.char_dev("dev/null", 1, 3);
    a.bytes("init", INIT, 0o755);
    a.bytes(
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        0o644,
    );
    a.bytes("etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644);

    let busybox = static_busybox()?;
    a.file("bin/busybox", &busybox, 0o755);
    for applet in busybox_applets(&busybox)? {
        if applet != "busybox" {
            a.symlink(&format!("bin/{applet}"), "busybox");
        }
    }

    let mut binaries = vec![("palisade".to_string(), palisade.to_path_buf())];
    binaries.extend(tests.iter().map(|t| (t.target.clone(), t.path.clone())));
    for (name, path) in &binaries {
        let small = strip_debug(path, &stage.join(name))?;
        a.file(&format!("bin/{name}"), &small, 0o755);
        for lib in shared_libraries(path)? {
            if !a.contains(&lib.to_string_lossy()) {
                a.file(&lib.to_string_lossy(), &lib, 0o755);
            }
        }
    }
    // Static C helpers of the test crate (memfd exec, network probe): /bin/<name>.
    for (name, bin) in build_test_programs(&stage)? {
        a.file(&format!("bin/{name}"), &bin, 0o755);
    }
    let names: Vec<&str> = tests.iter().map(|t| t.target.as_str()).collect();
    a.bytes("etc/palisade/guest-tests", names.join("\n") + "\n", 0o644);
    a.bytes(
        "etc/palisade/test-args",
        opts.test_args.join(" ") + "\n",
        0o644,
    );

    // Fixed data the guest tests need, owned by the test crate.
    let overlay = root().join("tests/guest/rootfs");
    if overlay.is_dir() {
        add_tree(&mut a, &overlay, &overlay)?;
    }

    let mut gzip = Command::new("gzip")
        .args(["-1", "-c"])
        .stdin(Stdio::piped())
        .stdout(fs::File::create(out)?)
        .spawn()
        .context("spawning gzip")?;
    a.write_to(&mut gzip.stdin.take().expect("piped"))?;
    if !gzip.wait()?.success() {
        bail!("gzip failed");
    }
    Ok(())
}

/// `tests/programs/*.c`, compiled with `gcc -static` (the guest has no compiler).
fn build_test_programs(stage: &Path) -> Result<Vec<(String, PathBuf)>> {
    let dir = root().join("tests/programs");
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(&dir) else {
        return Ok(out);
    };
    for e in rd.filter_map(Result::ok) {
        let src = e.path();
        if src.extension().and_then(|x| x.to_str()) != Some("c") {
            continue;
        }
        let name = src
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("prog")
            .to_string();
        let bin = stage.join(format!("prog-{name}"));
        let ok = Command::new("gcc")
            .args(["-static", "-O2", "-o"])
            .arg(&bin)
            .arg(&src)
            .status()
            .context("running gcc")?
            .success();
        if !ok {
            bail!("gcc -static {} failed", src.display());
        }
        out.push((name, bin));
    }
    out.sort();
    Ok(out)
}

/// Debug info is most of a test binary; the guest unpacks the initramfs under TCG, so shipping
/// it would only slow the boot. Symbols stay for backtraces.
fn strip_debug(src: &Path, dst: &Path) -> Result<PathBuf> {
    if !on_path("objcopy") {
        return Ok(src.to_path_buf());
    }
    let ok = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(src)
        .arg(dst)
        .status()?
        .success();
    Ok(if ok {
        dst.to_path_buf()
    } else {
        src.to_path_buf()
    })
}

/// Absolute paths of the libraries (and the loader) a dynamic executable needs, from `ldd`.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = match capture(Command::new("ldd").arg(exe)) {
        Ok(out) => out,
        // "not a dynamic executable": nothing to copy.
        Err(_) => return Ok(Vec::new()),
    };
    Ok(parse_ldd(&out))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect()
}

fn add_tree(a: &mut Archive, base: &Path, dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let rel = path.strip_prefix(base)?.to_string_lossy().into_owned();
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            a.dir(&rel);
            add_tree(a, base, &path)?;
        } else if meta.file_type().is_symlink() {
            a.symlink(&rel, &fs::read_link(&path)?.to_string_lossy());
        } else {
            a.file(&rel, &path, meta.permissions().mode() & 0o7777);
        }
    }
    Ok(())
}

/// Boots QEMU (TCG: KVM is not available here), tees the serial console to the terminal and
/// `log`, and parses the result lines. The VM is killed at the timeout.
fn boot(vmlinuz: &Path, initramfs: &Path, opts: &GuestOptions, log: &Path) -> Result<GuestOutcome> {
    let append = if opts.keep {
        format!("{APPEND} palisade.keep")
    } else {
        APPEND.to_string()
    };
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "1024",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
        // No NIC: the guest needs loopback only, and boot skips the iPXE option ROM.
        "-nic",
        "none",
    ])
    .arg("-kernel")
    .arg(vmlinuz)
    .arg("-initrd")
    .arg(initramfs)
    .args(["-append", &append])
    .stdin(if opts.keep {
        Stdio::inherit()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped());
    eprintln!("[xtask] $ {}", display(&cmd));
    let start = Instant::now();
    let mut child = cmd.spawn().context("spawning qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped");
    let mut log_file =
        fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            buf.clear();
            println!("{line}");
            let _ = writeln!(log_file, "{line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut outcome = GuestOutcome::default();
    let deadline = (!opts.keep).then(|| start + opts.timeout);
    loop {
        let wait = deadline.map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(Instant::now())
        });
        match rx.recv_timeout(wait) {
            Ok(line) => outcome.observe(&line, start.elapsed()),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    eprintln!(
                        "[xtask] guest: timeout after {:?}, killing QEMU",
                        opts.timeout
                    );
                    outcome.timed_out = true;
                    let _ = child.kill();
                    break;
                }
            }
        }
    }
    let status = child.wait()?;
    // Lines still buffered after a kill.
    for line in rx.try_iter() {
        outcome.observe(&line, start.elapsed());
    }
    let _ = reader.join();
    outcome.elapsed = start.elapsed();
    eprintln!(
        "[xtask] guest: QEMU exited ({status}); serial log in {}",
        log.display()
    );
    Ok(outcome)
}

impl GuestOutcome {
    fn observe(&mut self, line: &str, at: Duration) {
        // Markers may follow firmware escape sequences or kernel output on the same line.
        let line = ["PALISADE-GUEST-", "test result: "]
            .iter()
            .filter_map(|m| line.find(m))
            .min()
            .map_or(line, |i| &line[i..]);
        if line.starts_with(BOOTED) && self.boot.is_none() {
            self.boot = Some(at);
            // "PALISADE-GUEST-BOOTED 2.49s kernel 6.12.118+deb12-amd64 lsm=..."
            let mut words = line.split_whitespace();
            self.release = words
                .by_ref()
                .skip_while(|w| *w != "kernel")
                .nth(1)
                .map(str::to_string);
        } else if let Some(rest) = line.strip_prefix(RESULT) {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(code)) = (it.next(), it.next()) {
                self.results
                    .push((name.to_string(), code.parse().unwrap_or(-1)));
            }
        } else if line.trim() == DONE {
            self.done = true;
        } else if let Some(c) = parse_libtest(line) {
            self.counts += c;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_yields_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn outcome_needs_done_and_all_zero() {
        let mut o = GuestOutcome::default();
        o.observe(
            "\x1b[0m.PALISADE-GUEST-BOOTED 2.49s kernel 6.12.118+deb12-amd64 lsm=bpf",
            Duration::from_secs(3),
        );
        assert_eq!(o.boot, Some(Duration::from_secs(3)));
        assert_eq!(o.release.as_deref(), Some("6.12.118+deb12-amd64"));
        o.observe("PALISADE-GUEST-RESULT selfcheck 0", Duration::ZERO);
        assert!(!o.passed(), "no DONE line yet");
        o.observe(
            "test result: ok. 4 passed; 0 failed; 0 ignored",
            Duration::ZERO,
        );
        o.observe("PALISADE-GUEST-DONE", Duration::ZERO);
        assert!(o.passed());
        assert_eq!(
            o.counts,
            Counts {
                passed: 4,
                failed: 0
            }
        );
        o.observe("PALISADE-GUEST-RESULT guest_lsm 101", Duration::ZERO);
        assert!(!o.passed());
    }
}
