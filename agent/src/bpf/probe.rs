//! The tier-1 probe: does every BPF-LSM program the agent would attach load on this kernel, and
//! if not, why — said precisely, because the answer decides whether a node is protected by the
//! kernel (tier 1) or by userspace (tier 2). It loads exactly the programs [`super::loader`]
//! attaches in tier 1 (not one sample: a probe that passes while the full load fails later is
//! worse than none) and attaches nothing.
use aya::{Btf, programs::Lsm, programs::ProgramError};
use thiserror::Error;

use super::loader::{LSM_PROGRAMS, LoadError, open_object, program};

/// Why tier 1 is not available here.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LsmUnavailable {
    #[error("the kernel exposes no BTF (/sys/kernel/btf/vmlinux is missing)")]
    NoBtf,
    #[error("BPF-LSM is not active (active LSMs: {0}); boot with lsm=...,bpf to use tier 1")]
    NotActive(String),
    #[error("missing capabilities: {0} (tier 1 needs CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)")]
    NoCapability(String),
    #[error("the verifier rejected BPF-LSM program `{program}`: {reason}")]
    Verifier { program: String, reason: String },
    #[error(
        "the kernel refused BPF-LSM program `{program}` before verification ({errno}): trampoline programs are blocked here (lockdown or another security module)"
    )]
    Refused { program: String, errno: String },
    #[error("{0}")]
    Other(String),
}

impl LsmUnavailable {
    /// Short, stable class for metrics labels and event flags.
    pub fn class(&self) -> &'static str {
        match self {
            LsmUnavailable::NoBtf => "no_btf",
            LsmUnavailable::NotActive(_) => "lsm_inactive",
            LsmUnavailable::NoCapability(_) => "capability",
            LsmUnavailable::Verifier { .. } => "verifier",
            LsmUnavailable::Refused { .. } => "refused",
            LsmUnavailable::Other(_) => "other",
        }
    }

    /// Whether BPF-LSM itself is active (then falling back is a surprise the operator must see).
    pub fn lsm_was_active(&self) -> bool {
        !matches!(self, LsmUnavailable::NotActive(_) | LsmUnavailable::NoBtf)
    }
}

const LSM_LIST: &str = "/sys/kernel/security/lsm";

/// The active LSMs from securityfs, mounting it when it is not (it often is not).
pub fn active_lsms() -> Option<String> {
    let read = || {
        std::fs::read_to_string(LSM_LIST)
            .ok()
            .map(|s| s.trim().to_string())
    };
    read().or_else(|| {
        nix::mount::mount(
            Some("securityfs"),
            "/sys/kernel/security",
            Some("securityfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .ok()?;
        read()
    })
}

/// Capabilities tier 1 needs that this process lacks (from `CapEff` in /proc/self/status).
fn missing_capabilities() -> Vec<&'static str> {
    const NEEDED: &[(u32, &str)] = &[(21, "CAP_SYS_ADMIN"), (38, "CAP_PERFMON"), (39, "CAP_BPF")];
    let eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        });
    match eff {
        Some(eff) => NEEDED
            .iter()
            .filter(|(bit, _)| eff & (1 << bit) == 0)
            .map(|(_, name)| *name)
            .collect(),
        None => Vec::new(),
    }
}

/// The last lines of a verifier log that say what went wrong (bounded: it goes into events).
fn verifier_reason(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("processed ") && !l.starts_with("verification time")
        })
        .collect();
    let tail = lines[lines.len().saturating_sub(2)..].join(" | ");
    tail.chars().take(400).collect()
}

fn classify_load(name: &str, e: ProgramError) -> LsmUnavailable {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            if !log.trim().is_empty() {
                LsmUnavailable::Verifier {
                    program: name.into(),
                    reason: verifier_reason(&log),
                }
            } else if matches!(io_error.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
                LsmUnavailable::Refused {
                    program: name.into(),
                    errno: io_error.to_string(),
                }
            } else {
                LsmUnavailable::Other(format!("loading `{name}`: {io_error}"))
            }
        }
        other => LsmUnavailable::Other(format!("loading `{name}`: {other}")),
    }
}

/// Loads (without attaching) every tier-1 program. `Ok` means `Loaded::load(Tier::Lsm)` will
/// load them too.
pub fn lsm() -> Result<(), LsmUnavailable> {
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(LsmUnavailable::NoBtf);
    }
    // An LSM program loads and attaches even where BPF-LSM is not active, and then never
    // runs: without the list, tier 1 cannot be trusted.
    let active = active_lsms().unwrap_or_else(|| "unknown (securityfs unavailable)".into());
    if !active.split(',').any(|l| l == "bpf") {
        return Err(LsmUnavailable::NotActive(active));
    }
    let missing = missing_capabilities();
    if !missing.is_empty() {
        return Err(LsmUnavailable::NoCapability(missing.join(", ")));
    }
    let mut ebpf = open_object(false).map_err(|e| LsmUnavailable::Other(e.to_string()))?;
    let btf = Btf::from_sys_fs().map_err(|e| LsmUnavailable::Other(e.to_string()))?;
    for &(name, hook) in LSM_PROGRAMS {
        let p: &mut Lsm = program(&mut ebpf, name)
            .map_err(|e: LoadError| LsmUnavailable::Other(e.to_string()))?;
        p.load(hook, &btf).map_err(|e| classify_load(name, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_reason_keeps_the_error_lines() {
        let log = "0: R1=ctx() R10=fp0\n; 12: (95) exit\nAt program exit the register R0 has unknown scalar value should have been in [-4095, 0]\nprocessed 120 insns (limit 1000000)\n";
        assert_eq!(
            verifier_reason(log),
            "; 12: (95) exit | At program exit the register R0 has unknown scalar value should have been in [-4095, 0]"
        );
        assert_eq!(verifier_reason(&"x".repeat(1000)).len(), 400);
    }

    #[test]
    fn classes_say_whether_bpf_lsm_was_active() {
        assert!(!LsmUnavailable::NotActive("capability".into()).lsm_was_active());
        assert!(!LsmUnavailable::NoBtf.lsm_was_active());
        let v = LsmUnavailable::Verifier {
            program: "file_open".into(),
            reason: "R0".into(),
        };
        assert!(v.lsm_was_active());
        assert_eq!(v.class(), "verifier");
        assert!(
            v.to_string()
                .contains("verifier rejected BPF-LSM program `file_open`")
        );
    }
}
