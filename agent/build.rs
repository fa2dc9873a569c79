//! Builds `agent-ebpf` for the BPF target and leaves the object in `OUT_DIR/agent-ebpf`, where
//! `src/bpf/loader.rs` embeds it. `AYA_BUILD_SKIP=1` skips it (unit tests need no kernel objects):
//! an empty stub is written instead, and loading it fails with a clear error.
use std::{env, fs, path::PathBuf};

use aya_build::{Package, Toolchain};

/// Must match rust-toolchain.toml: bpf-linker is built against this nightly's libLLVM.
const EBPF_TOOLCHAIN: &str = "nightly-2026-10-29";

fn main() -> anyhow::Result<()> {
    compile_protos()?;
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
    if skip {
        fs::write(out_dir.join("agent-ebpf"), b"")?;
        return Ok(());
    }
    // `cargo xtask bootstrap` installs bpf-linker here; put it on PATH for the nested cargo.
    if let Some(home) = env::var_os("HOME") {
        let bin =
            PathBuf::from(home).join(format!(".cache/palisade/bpf-linker-{EBPF_TOOLCHAIN}/bin"));
        if bin.is_dir() {
            let path = env::var_os("PATH").unwrap_or_default();
            let mut paths = vec![bin];
            paths.extend(env::split_paths(&path));
            // SAFETY: build scripts are single-threaded at this point.
            unsafe { env::set_var("PATH", env::join_paths(paths)?) };
        }
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../agent-ebpf");
    let root = root.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [Package {
            name: "agent-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}

/// gRPC API (`src/api/`): generated from `proto/palisade/v1/*.proto` with protoc. Always runs,
/// also under `AYA_BUILD_SKIP=1`.
fn compile_protos() -> anyhow::Result<()> {
    let proto_root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    // Without this, the `rerun-if-env-changed` above makes cargo ignore edits to the protos.
    println!("cargo::rerun-if-changed={}", proto_root.display());
    let files: Vec<PathBuf> = ["events", "policies", "containers", "agent"]
        .iter()
        .map(|f| proto_root.join(format!("palisade/v1/{f}.proto")))
        .collect();
    tonic_prost_build::configure().compile_protos(&files, &[proto_root])?;
    Ok(())
}
