//! Human-readable rendering for the CLI: aligned tables and one-line events.
use std::time::{Duration, UNIX_EPOCH};

use super::convert::mode_word;
use super::{ContainerInfo, PolicyInfo, StatusInfo};
use crate::containers::meta::ContainerMeta;
use crate::events::bus::Record;
use crate::events::model::{Event, Kind};

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<&str> = cells.collect();
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn or_dash(s: Option<&str>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or("-").to_string()
}

pub fn short_id(id: &str) -> &str {
    if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        &id[..12]
    } else {
        id
    }
}

/// Container name for display: name, else short id.
pub fn container_label(c: &ContainerMeta) -> String {
    match c.name.as_deref() {
        Some(n) if !n.is_empty() => n.trim_start_matches('/').to_string(),
        _ => short_id(&c.id).to_string(),
    }
}

pub fn policies(list: &[PolicyInfo]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                mode_word(p.mode).into(),
                p.bound_containers.to_string(),
                or_dash(Some(&p.selector)),
            ]
        })
        .collect();
    table(&["NAME", "MODE", "CONTAINERS", "SELECTOR"], &rows)
}

pub fn containers(list: &[ContainerInfo]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            let m = &c.meta;
            let pod = m
                .pod
                .as_ref()
                .map(|p| format!("{}/{}", p.namespace, p.name));
            vec![
                short_id(&m.id).to_string(),
                or_dash(m.name.as_deref().map(|n| n.trim_start_matches('/'))),
                or_dash(m.image.as_deref()),
                or_dash(pod.as_deref()),
                or_dash(c.policy.as_deref()),
                c.mode.map_or("-".into(), |m| mode_word(m).to_string()),
                or_dash(Some(&c.tier)),
            ]
        })
        .collect();
    table(
        &["ID", "NAME", "IMAGE", "POD", "POLICY", "MODE", "TIER"],
        &rows,
    )
}

pub fn container_detail(c: &ContainerInfo) -> String {
    let m = &c.meta;
    let mut rows = vec![
        vec!["id".into(), m.id.clone()],
        vec!["name".into(), or_dash(m.name.as_deref())],
        vec![
            "runtime".into(),
            super::convert::runtime_str(m.runtime).into(),
        ],
        vec!["image".into(), or_dash(m.image.as_deref())],
        vec![
            "cgroup".into(),
            format!("{} (id {})", m.cgroup_path, m.cgroup_id),
        ],
        vec!["policy".into(), or_dash(c.policy.as_deref())],
        vec![
            "mode".into(),
            c.mode.map_or("-".into(), |m| mode_word(m).to_string()),
        ],
        vec!["tier".into(), or_dash(Some(&c.tier))],
    ];
    if let Some(p) = &m.pod {
        rows.push(vec!["pod".into(), format!("{}/{}", p.namespace, p.name)]);
    }
    rows.iter()
        .map(|r| format!("{:<8} {}\n", format!("{}:", r[0]), r[1]))
        .collect()
}

pub fn status(s: &StatusInfo) -> String {
    let mut out = format!(
        "version:   {}\ntier:      {}\nfeatures:  {}\n",
        s.version,
        s.tier,
        s.kernel_features.join(", ")
    );
    if let Some(why) = &s.tier_fallback {
        out.push_str(&format!("fallback:  {why}\n"));
    }
    if !s.counters.is_empty() {
        out.push_str("counters:\n");
        for (k, v) in &s.counters {
            out.push_str(&format!("  {k:<24} {v}\n"));
        }
    }
    out
}

fn time(ns: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

fn detail(e: &Event) -> String {
    match e.kind {
        Kind::Exec => or_dash(e.path.as_deref()),
        Kind::Open => format!(
            "{} ({})",
            or_dash(e.path.as_deref()),
            or_dash(e.access.as_deref())
        ),
        Kind::Connect => {
            let addr = e.addr.map_or("-".to_string(), |a| match a {
                std::net::IpAddr::V6(_) => format!("[{a}]"),
                std::net::IpAddr::V4(_) => a.to_string(),
            });
            format!(
                "{addr}:{}/{}",
                e.port.unwrap_or(0),
                or_dash(e.protocol.as_deref())
            )
        }
        Kind::Escape => or_dash(e.access.as_deref()),
        Kind::Policy | Kind::Agent => or_dash(e.message.as_deref()),
    }
}

/// One line per event: seq, time, kind, verdict, mode, container, process, what, policy.
pub fn event_line(r: &Record) -> String {
    let e = &r.event;
    let container = e
        .container
        .as_ref()
        .map_or("-".to_string(), container_label);
    let mut line = format!(
        "{:>6} {} {:<7} {:<9} {:<7} {:<16} {}[{}] {}",
        e.seq,
        time(e.time_ns),
        lower(&e.kind),
        lower(&e.verdict),
        e.mode.map_or("-", mode_word),
        container,
        e.comm,
        e.tgid,
        detail(e),
    );
    if let Some(p) = &e.policy {
        line.push_str(&format!(" policy={p}"));
    }
    let flags: Vec<&str> = e
        .flags
        .iter()
        .map(String::as_str)
        .filter(|f| *f != "gap")
        .collect();
    if !flags.is_empty() {
        line.push_str(&format!(" [{}]", flags.join(",")));
    }
    line.push('\n');
    line
}

/// Lowercase serde name of a model enum (`Exec` → `exec`).
fn lower<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "w".into()]],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz    w\n");
    }
}
