//! The daemon side: a shared learner fed from the event bus and persisted periodically, and
//! the text the CLI prints. The API and the daemon only need [`LearnHandle`] and [`run`].
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, warn};

use super::{CheckReport, Exported, LearnError, Learner, ProfileSummary, time};
use crate::events::bus::{EventBus, Filter};
use crate::events::model::{Kind, Verdict, now_ns};
use crate::policy::{Mode, Policy, parse_str};

/// The learner shared between the bus task and the API.
#[derive(Clone, Default)]
pub struct LearnHandle(Arc<Mutex<Learner>>);

impl LearnHandle {
    pub fn new(l: Learner) -> Self {
        LearnHandle(Arc::new(Mutex::new(l)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Learner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `LearnStatus`.
    pub fn status(&self) -> Vec<ProfileSummary> {
        self.lock().profiles(now_ns())
    }

    /// `LearnExport`: `base` is the applied learning policy (from the engine).
    pub fn export(
        &self,
        base: &Policy,
        image: Option<&str>,
        mode: Mode,
    ) -> Result<Exported, LearnError> {
        self.lock().export(base, image, mode)
    }

    /// `LearnCheck`: candidate policies as YAML text (one or several documents).
    pub fn check_text(&self, yaml: &str, file_name: &str) -> Result<CheckReport, LearnError> {
        let candidates =
            parse_str(yaml, file_name).map_err(|e| LearnError::Policy(e.to_string()))?;
        self.lock().check(&candidates)
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut Learner) -> T) -> T {
        f(&mut self.lock())
    }
}

/// Feed learned exec/open/connect events from the bus into the learner and save it to `dir`
/// every `every` (when something changed) and when the bus closes.
pub async fn run(handle: LearnHandle, bus: EventBus, dir: PathBuf, every: Duration) {
    let filter = Filter {
        kinds: vec![Kind::Exec, Kind::Open, Kind::Connect],
        verdicts: vec![Verdict::Learned],
        ..Filter::default()
    };
    let mut sub = bus.subscribe(filter, None);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = sub.recv() => match r {
                Some(rec) if rec.gap.is_some() => {
                    // The kernel reports each observation once per generation: a lost one is
                    // seen again only after the policy changes (or the agent restarts).
                    warn!(message = ?rec.event.message, "learner missed events");
                }
                Some(rec) => {
                    if handle.lock().observe(&rec.event) {
                        debug!(path = ?rec.event.path, "new observation");
                    }
                }
                None => break,
            },
            _ = tick.tick() => save(&handle, &dir).await,
        }
    }
    save(&handle, &dir).await;
}

async fn save(handle: &LearnHandle, dir: &std::path::Path) {
    let snapshot = {
        let mut l = handle.lock();
        if !l.dirty() {
            return;
        }
        l.mark_clean();
        l.store.clone()
    };
    let dir = dir.to_path_buf();
    let res = tokio::task::spawn_blocking(move || snapshot.save(&dir)).await;
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(error = %e, "saving learned profiles");
            handle.with(|l| l.mark_dirty());
        }
        Err(e) => warn!(error = %e, "saving learned profiles"),
    }
}

fn dur(ns: u64) -> String {
    humantime::format_duration(Duration::from_secs(ns / 1_000_000_000)).to_string()
}

/// `palisade learn status` output.
pub fn render_status(profiles: &[ProfileSummary]) -> String {
    let mut o = String::new();
    if profiles.is_empty() {
        return "nothing learned yet\n".into();
    }
    for p in profiles {
        let img = if p.key.image.is_empty() {
            "<unknown image>"
        } else {
            &p.key.image
        };
        let _ = writeln!(o, "policy {} image {img}", p.key.policy);
        let _ = writeln!(o, "  containers: {}", p.containers.join(", "));
        let _ = writeln!(
            o,
            "  observations: {} exec, {} open, {} connect ({} sightings, {} evicted)",
            p.exec, p.open, p.connect, p.sightings, p.evicted
        );
        let _ = writeln!(
            o,
            "  first seen {}, last new observation {} (stable for {})",
            time(p.first_ns),
            time(p.last_new_ns),
            dur(p.stable_for_ns)
        );
    }
    o
}

/// `palisade learn check` output: one line per denial, then a summary line.
pub fn render_check(r: &CheckReport) -> String {
    let mut o = String::new();
    for d in &r.denials {
        let _ = writeln!(
            o,
            "DENY {} [policy {}, image {}] {}; seen {}x, last {}",
            d.observation.describe(),
            d.policy,
            d.workload.image,
            d.reason,
            d.seen.count,
            time(d.seen.last_ns)
        );
    }
    for w in &r.unmatched {
        let _ = writeln!(
            o,
            "SKIP policy {} image {}: no candidate applies",
            w.policy, w.image
        );
    }
    let _ = writeln!(
        o,
        "{} of {} recorded observations would be denied",
        r.denials.len(),
        r.checked
    );
    o
}
