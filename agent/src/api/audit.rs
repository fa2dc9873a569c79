//! Audit trail of admin calls: one JSON line per call in a file, and the same fact as an `Agent`
//! event on the bus (so a security team streaming events sees policy changes as they happen).
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use super::auth::Caller;
use crate::events::bus::EventBus;
use crate::events::model::{Event, Kind, Verdict};

/// Result of an audited call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Caller lacks the role.
    Denied,
    /// Allowed, but the operation failed.
    Failed(String),
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    who: &'a str,
    transport: &'a str,
    role: Option<&'static str>,
    call: &'a str,
    target: &'a str,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

pub struct AuditLog {
    path: Option<PathBuf>,
    file: Option<Mutex<File>>,
    bus: EventBus,
}

impl AuditLog {
    /// Appends to `path` (created with mode 0600, parent directories too); `None` = bus only.
    pub fn open(path: Option<&Path>, bus: EventBus) -> std::io::Result<Self> {
        let file = match path {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                use std::os::unix::fs::OpenOptionsExt;
                Some(Mutex::new(
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .open(p)?,
                ))
            }
            None => None,
        };
        Ok(AuditLog {
            path: path.map(Path::to_path_buf),
            file,
            bus,
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Record one admin call. `target` is what it acted on (policy name, source file).
    pub fn record(&self, caller: &Caller, call: &str, target: &str, outcome: &Outcome) {
        let (word, error) = match outcome {
            Outcome::Ok => ("ok", None),
            Outcome::Denied => ("denied", None),
            Outcome::Failed(e) => ("failed", Some(e.as_str())),
        };
        let line = Line {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            who: &caller.who,
            transport: caller.transport,
            role: caller.role.map(|r| r.as_str()),
            call,
            target,
            outcome: word,
            error,
        };
        if let Some(file) = &self.file {
            let mut text = serde_json::to_string(&line).unwrap_or_default();
            text.push('\n');
            let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
            // One write per line with O_APPEND keeps lines whole; a failing disk must not fail
            // the call, but must be visible.
            if let Err(e) = f.write_all(text.as_bytes()) {
                tracing::error!(error = %e, "cannot write audit log");
            }
        }
        let verdict = if *outcome == Outcome::Denied {
            Verdict::Denied
        } else {
            Verdict::Allowed
        };
        let mut msg = format!(
            "audit: {} {call} {target:?} by {} ({})",
            word, caller.who, caller.transport
        );
        if let Some(e) = error {
            msg.push_str(": ");
            msg.push_str(e);
        }
        let mut ev = Event::agent(Kind::Agent, verdict, msg);
        ev.flags.push("audit".into());
        ev.policy = (call != "ApplyPolicy" && !target.is_empty()).then(|| target.to_string());
        self.bus.publish(ev);
        tracing::info!(who = %caller.who, call, target, outcome = word, "audit");
    }
}
