//! Foundation: the real `sched_process_exec` program reports every exec in a watched cgroup
//! (path, pid, cgroup id) and nothing from processes outside it. Root, real kernel.
use std::{process::Command, time::Duration};

use agent_common::{self as abi, CgroupPolicy};
use palisade::bpf::loader::{Loaded, Tier};
use palisade_tests::{cgroup::TestCgroup, events};

#[test]
fn exec_in_watched_cgroup_is_reported_and_outside_is_not() {
    let (_loaded, mut maps, mut ring) = Loaded::load(Tier::Compat, None).expect("load eBPF");
    let cg = TestCgroup::new("exec").unwrap();
    // Monitor mode, nothing policed: the exec audit trail only.
    let pol = CgroupPolicy {
        policy_id: 7,
        ruleset: 70,
        mode: abi::MODE_MONITOR,
        ..Default::default()
    };
    maps.cgroups.insert(&cg.id, &pol, 0).unwrap();

    let outside = Command::new("/bin/true").spawn().unwrap();
    let outside_pid = outside.id();
    let mut inside = cg.spawn(Command::new("/bin/echo").arg("palisade")).unwrap();
    let inside_pid = inside.id();
    inside.wait().unwrap();
    let mut outside = outside;
    outside.wait().unwrap();

    let (ev, seen) = events::wait_for(&mut ring, Duration::from_secs(5), |e| {
        e.kind == abi::KIND_EXEC && e.tgid == inside_pid
    });
    let ev = ev.unwrap_or_else(|| panic!("no exec event for pid {inside_pid}; saw {}", seen.len()));
    assert_eq!(events::path_of(&ev), "/bin/echo");
    assert_eq!(ev.cgroup_id, cg.id);
    assert_eq!(ev.policy_id, 7);
    assert_eq!(ev.mode, abi::MODE_MONITOR);
    assert_ne!(ev.ino, 0, "image inode is reported");
    // Drain a little more: the outside process must never show up.
    let (_, more) = events::wait_for(&mut ring, Duration::from_millis(300), |_| false);
    assert!(
        seen.iter()
            .chain(more.iter())
            .all(|e| e.tgid != outside_pid && e.cgroup_id == cg.id),
        "only the watched cgroup's processes are reported"
    );
    maps.cgroups.remove(&cg.id).unwrap();
}
