//! `cargo xtask bootstrap`: installs what a fresh Debian 12 machine (as root) lacks, using only
//! apt, rustup and crates.io. Every step checks first and does nothing when already done, so a
//! second run takes well under a second.
use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::util::{self, cache_dir, capture, run, succeeds};

/// Debian packages the build and the test suites need.
const APT_PACKAGES: &[&str] = &[
    "docker.io",
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "protobuf-compiler",
    "iproute2",
];

/// The guest kernels the suites boot (`cargo xtask guest --kernel NAME`): Debian 12's own 6.1
/// and its 6.12 LTS (also Debian 13's, RHEL 10's, many cloud images'), each named by the meta
/// package that points at the current build.
pub const KERNELS: &[GuestKernel] = &[
    GuestKernel {
        name: "6.1",
        meta: "linux-image-amd64",
    },
    GuestKernel {
        name: "6.12",
        meta: "linux-image-6.12-amd64",
    },
];

/// One kernel of the matrix.
#[derive(Clone, Copy, Debug)]
pub struct GuestKernel {
    /// Short name used on the command line and in reports.
    pub name: &'static str,
    /// Debian meta package whose `Depends:` names the versioned image package.
    pub meta: &'static str,
}

impl GuestKernel {
    /// Looks a kernel up by its short name.
    pub fn named(name: &str) -> Result<GuestKernel> {
        KERNELS
            .iter()
            .copied()
            .find(|k| k.name == name)
            .with_context(|| {
                let known: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
                format!(
                    "unknown guest kernel `{name}` (known: {})",
                    known.join(", ")
                )
            })
    }

    /// Where this kernel (extracted Debian package, `boot/` only) is cached.
    pub fn dir(&self) -> PathBuf {
        cache_dir().join(format!("guest-kernel-{}", self.name))
    }

    /// The vmlinuz inside the cached kernel, if any.
    pub fn vmlinuz(&self) -> Option<PathBuf> {
        fs::read_dir(self.dir().join("boot"))
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
    }
}

/// Tracks whether `apt-get update` already ran in this process: it is slow and only needed
/// when something has to be installed or looked up.
#[derive(Default)]
pub struct Apt {
    updated: bool,
}

impl Apt {
    fn update_once(&mut self) -> Result<()> {
        if !self.updated {
            run(apt_cmd("apt-get").arg("update"))?;
            self.updated = true;
        }
        Ok(())
    }
}

fn apt_cmd(program: &str) -> Command {
    let mut cmd = Command::new(program);
    // Another apt (unattended upgrades, a second bootstrap) holding the lock is waited for,
    // not a failure.
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["-o", "DPkg::Lock::Timeout=600"]);
    cmd
}

/// Runs every bootstrap step, including every guest kernel of the matrix.
pub fn bootstrap() -> Result<()> {
    let mut apt = Apt::default();
    apt_packages(&mut apt)?;
    let toolchain = util::toolchain()?;
    rust_src(&toolchain)?;
    bpf_linker(&toolchain)?;
    for k in KERNELS {
        guest_kernel(&mut apt, k)?;
    }
    Ok(())
}

fn apt_packages(apt: &mut Apt) -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !succeeds(Command::new("dpkg").args(["-s", p])))
        .collect();
    if missing.is_empty() {
        eprintln!("[xtask] apt packages: all present");
        return Ok(());
    }
    eprintln!("[xtask] apt packages missing: {}", missing.join(" "));
    apt.update_once()?;
    run(apt_get_install().args(&missing))
}

fn apt_get_install() -> Command {
    let mut cmd = apt_cmd("apt-get");
    cmd.args(["install", "-y", "--no-install-recommends"]);
    cmd
}

/// rust-toolchain.toml makes rustup install the toolchain (with rust-src) on the first cargo
/// call; this covers rustup versions that ignore `components` there.
fn rust_src(toolchain: &str) -> Result<()> {
    let installed = capture(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("[xtask] toolchain {toolchain}: rust-src present");
        return Ok(());
    }
    if !succeeds(Command::new("rustup").args(["run", toolchain, "rustc", "--version"])) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            toolchain,
            "--profile",
            "minimal",
        ]))?;
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", toolchain]))
}

/// The directory bpf-linker is installed into; agent/build.rs puts its `bin/` on PATH.
pub fn bpf_linker_prefix(toolchain: &str) -> PathBuf {
    cache_dir().join(format!("bpf-linker-{toolchain}"))
}

/// Builds bpf-linker against the pinned nightly's own libLLVM (DESIGN.md §3): no prebuilt
/// binary can be downloaded here, and only the matching LLVM reads rustc's bitcode.
fn bpf_linker(toolchain: &str) -> Result<()> {
    let prefix = bpf_linker_prefix(toolchain);
    let sysroot =
        capture(Command::new("rustup").args(["run", toolchain, "rustc", "--print", "sysroot"]))?;
    let llvm = find_libllvm(Path::new(sysroot.trim()))?;
    let soname = llvm
        .file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned();
    let want = format!("toolchain={toolchain}\nllvm={soname}\n");
    let stamp = prefix.join(".palisade-stamp");
    let bin = prefix.join("bin/bpf-linker");
    let runs = succeeds(Command::new(&bin).arg("--version"));
    if runs {
        match fs::read_to_string(&stamp) {
            Ok(have) if have == want => {
                eprintln!("[xtask] bpf-linker: present for {toolchain} ({soname})");
                return Ok(());
            }
            // Built before stamps existed: trust it if it links against this very LLVM.
            Err(_) if prefix.join("lib").join(&soname).exists() => {
                fs::write(&stamp, &want)?;
                eprintln!("[xtask] bpf-linker: present, stamped for {toolchain} ({soname})");
                return Ok(());
            }
            _ => {}
        }
    }
    eprintln!("[xtask] bpf-linker: building against {}", llvm.display());
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib)?;
    for name in ["libLLVM.so", soname.as_str()] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(&llvm, &link).with_context(|| format!("symlinking {}", link.display()))?;
    }
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args(["install", "bpf-linker", "--locked", "--force", "--root"])
        .arg(&prefix)
        .env("LLVM_PREFIX", &prefix)
        .env("RUSTUP_TOOLCHAIN", toolchain)
        .env_remove("CARGO_TARGET_DIR")
        // Outside the workspace so its .cargo/config.toml and target dir do not interfere.
        .current_dir(cache_dir()))?;
    if !succeeds(Command::new(&bin).arg("--version")) {
        bail!("{} was built but does not run", bin.display());
    }
    fs::write(&stamp, want)?;
    Ok(())
}

fn find_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))
}

/// Downloads (not installs) the Debian kernel that `k.meta` points at and keeps its `boot/` in
/// the cache: booted under QEMU with `lsm=...,bpf` it gives the BPF-LSM tier.
pub fn guest_kernel(apt: &mut Apt, k: &GuestKernel) -> Result<PathBuf> {
    if let Some(vmlinuz) = k.vmlinuz() {
        eprintln!("[xtask] guest kernel {}: {}", k.name, vmlinuz.display());
        return Ok(vmlinuz);
    }
    apt.update_once()?;
    let deps = capture(Command::new("apt-cache").args(["depends", k.meta]))?;
    let package = parse_kernel_dependency(&deps).with_context(|| {
        format!(
            "no linux-image-*-amd64 dependency of {} in:\n{deps}",
            k.meta
        )
    })?;
    eprintln!("[xtask] guest kernel {}: downloading {package}", k.name);
    let work = cache_dir().join(format!("guest-kernel-{}.tmp", k.name));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    run(apt_cmd("apt-get")
        .args(["download", &package])
        .current_dir(&work))?;
    let deb = fs::read_dir(&work)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download produced no .deb")?;
    let unpacked = work.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    // Only boot/ is needed (the guest loads no modules); dropping lib/modules saves ~400 MB.
    let dest = k.dir();
    let _ = fs::remove_dir_all(&dest);
    fs::create_dir_all(&dest)?;
    fs::rename(unpacked.join("boot"), dest.join("boot"))?;
    fs::write(dest.join("PACKAGE"), format!("{package}\n"))?;
    fs::remove_dir_all(&work)?;
    k.vmlinuz()
        .context("the kernel package has no boot/vmlinuz-*")
}

/// Picks `linux-image-<ver>-amd64` out of `apt-cache depends linux-image-amd64`.
fn parse_kernel_dependency(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| {
            p.starts_with("linux-image-") && p.ends_with("-amd64") && *p != "linux-image-amd64"
        })
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_dependency_is_found() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_kernel_dependency(text).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        let text = "linux-image-6.12-amd64\n  Depends: linux-image-6.12.118+deb12-amd64\n";
        assert_eq!(
            parse_kernel_dependency(text).as_deref(),
            Some("linux-image-6.12.118+deb12-amd64")
        );
        assert_eq!(
            parse_kernel_dependency("linux-image-amd64\n  Recommends: x\n"),
            None
        );
    }
}
