//! `--policy-dir`: every `*.yaml` / `*.yml` loaded at start-up and again whenever the directory
//! changes (a Kubernetes ConfigMap mount swaps a `..data` symlink, so any event triggers a full
//! reload). A bad file is reported with file, line and reason; its policies already in force
//! stay in force; good files apply.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use tracing::{info, warn};

use super::control::DaemonControl;

/// Policies that came from the directory, by file, so removing a file removes its policies.
#[derive(Default)]
pub struct DirState {
    by_file: BTreeMap<PathBuf, BTreeSet<String>>,
    /// Content hash of each file last applied: an unchanged file is not re-applied.
    applied: BTreeMap<PathBuf, u64>,
    /// Content hash of each file last rejected: reported once, not at every reload.
    rejected: BTreeMap<PathBuf, u64>,
}

fn hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    let hidden = p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
                    !hidden
                        && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Load every file once; returns what failed (as printed errors).
pub fn reload(dir: &Path, ctl: &DaemonControl, st: &mut DirState) -> Vec<String> {
    let mut errors = Vec::new();
    let files = yaml_files(dir);
    for f in &files {
        let name = f.display().to_string();
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{name}: {e}"));
                continue;
            }
        };
        let h = hash(&text);
        if st.applied.get(f) == Some(&h) || st.rejected.get(f) == Some(&h) {
            continue;
        }
        match ctl.apply_text(&text, &name) {
            Ok(names) => {
                st.rejected.remove(f);
                st.applied.insert(f.clone(), h);
                let now: BTreeSet<String> = names.into_iter().collect();
                // Policies this file no longer defines go.
                if let Some(before) = st.by_file.get(f) {
                    for gone in before.difference(&now) {
                        let _ = ctl.delete_named(gone);
                    }
                }
                st.by_file.insert(f.clone(), now);
            }
            Err(errs) => {
                // A text that does not parse stays bad until it changes; a refusal by the engine
                // (e.g. a conflict with another file) may clear when other files change.
                if crate::policy::parse_str(&text, &name).is_err() {
                    st.rejected.insert(f.clone(), h);
                }
                for e in errs {
                    warn!(error = %e, "policy file rejected; policies in force stay in force");
                    errors.push(e.to_string());
                }
            }
        }
    }
    st.rejected.retain(|f, _| files.contains(f));
    let removed: Vec<PathBuf> = st
        .by_file
        .keys()
        .filter(|f| !files.contains(f))
        .cloned()
        .collect();
    for f in removed {
        st.applied.remove(&f);
        for name in st.by_file.remove(&f).unwrap_or_default() {
            info!(policy = %name, file = %f.display(), "policy file removed; deleting its policy");
            let _ = ctl.delete_named(&name);
        }
    }
    errors
}

/// Watch `dir` with inotify (plus a slow poll as a safety net) and reload on change.
pub async fn watch(dir: PathBuf, ctl: std::sync::Arc<DaemonControl>, mut st: DirState) {
    use tokio_stream::StreamExt;
    let mask = inotify::WatchMask::CREATE
        | inotify::WatchMask::CLOSE_WRITE
        | inotify::WatchMask::MOVED_TO
        | inotify::WatchMask::MOVED_FROM
        | inotify::WatchMask::DELETE
        | inotify::WatchMask::MODIFY;
    let stream = inotify::Inotify::init().ok().and_then(|i| {
        i.watches().add(&dir, mask).ok()?;
        i.into_event_stream(vec![0u8; 4096]).ok()
    });
    let mut stream = match stream {
        Some(s) => s,
        None => {
            warn!(dir = %dir.display(), "inotify unavailable; polling the policy directory");
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                reload(&dir, &ctl, &mut st);
            }
        }
    };
    loop {
        let changed = tokio::time::timeout(Duration::from_secs(60), stream.next()).await;
        if matches!(changed, Ok(None)) {
            return;
        }
        // Coalesce a burst (editors and ConfigMap swaps write several events).
        tokio::time::sleep(Duration::from_millis(100)).await;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(10), stream.next()).await
        {
        }
        reload(&dir, &ctl, &mut st);
    }
}
