//! A minimal "agent" for the fanotify host test: runs the tier-2 enforcer with a fixed policy
//! so the test can SIGKILL it and start another one that adopts the group.
//!
//! Usage: `fanotify-test-agent <state_dir> <container pid>...`
//! stdout: `READY adopted=<bool> holder=<pid> orphans=<n>`, one `DECIDE <kind> <write> <cgroup>
//! <path>` line per decision, `FLUSHED`, `STATS …`. stdin commands: `flush`, `quit`, `release`.
//! Env `FAN_SLOW_PATH=<path>`: never answer opens of that path (an in-flight event at crash).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use palisade::enforce::fanotify::{Group, Kind, Request, Verdict};

fn policy(slow: Option<&[u8]>, req: &Request) -> Verdict {
    let path = req.path.as_slice();
    if slow == Some(path) {
        println!("SLOW {}", String::from_utf8_lossy(path));
        let _ = std::io::stdout().flush();
        loop {
            std::thread::park();
        }
    }
    let deny = match req.kind {
        Kind::Exec => path == b"/tmp/busybox2",
        Kind::Open => {
            matches!(path, b"/etc/secret" | b"/etc/hostname" | b"/bin/busybox")
                || (path == b"/etc/public" && req.write)
        }
    };
    Verdict {
        allow: !deny,
        cache: !deny && path == b"/etc/cachetest",
    }
}

fn print_stats(group: &Group) {
    let s = group.stats().snapshot();
    println!(
        "STATS events={} allowed={} denied={} cached={} companions={} decided={} \
         mean_handle_ns={} mean_decide_ns={} errors={}",
        s.events,
        s.allowed,
        s.denied,
        s.cached,
        s.exec_companions,
        s.decided,
        s.mean_handle_ns(),
        s.decide_ns.checked_div(s.decided).unwrap_or(0),
        s.errors
    );
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let state_dir = PathBuf::from(args.next().expect("state dir"));
    let pids: Vec<i32> = args.map(|a| a.parse().expect("pid")).collect();
    let slow = std::env::var("FAN_SLOW_PATH").ok().map(String::into_bytes);

    let group = Group::open_or_adopt(&state_dir)?;
    let marks = pids
        .iter()
        .map(|&pid| group.mark_container(pid))
        .collect::<Result<Vec<_>, _>>()?;
    let decider = move |req: &Request| {
        let v = policy(slow.as_deref(), req);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "DECIDE {:?} {} {} {} {}",
            req.kind,
            req.write,
            req.cgroup_id,
            if v.allow { "allow" } else { "deny" },
            String::from_utf8_lossy(&req.path)
        );
        let _ = out.flush();
        v
    };
    let thread = group.spawn_decider(Arc::new(decider))?;
    let mounts: usize = marks.iter().map(|m| m.mounts.len()).sum();
    println!(
        "READY adopted={} holder={} orphans={} mounts={mounts}",
        group.adopted(),
        group.holder_pid().unwrap_or(0),
        group.orphans_denied()
    );
    std::io::stdout().flush()?;

    for line in std::io::stdin().lock().lines() {
        match line?.trim() {
            "flush" => {
                group.flush_cache()?;
                println!("FLUSHED");
            }
            "stats" => print_stats(&group),
            "quit" | "release" => break,
            _ => {}
        }
        std::io::stdout().flush()?;
    }
    thread.stop();
    print_stats(&group);
    for m in marks {
        group.unmark(m)?;
    }
    group.release()?;
    println!("RELEASED");
    std::io::stdout().flush()?;
    Ok(())
}
