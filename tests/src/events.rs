//! Collecting kernel events in tests.
use std::time::{Duration, Instant};

use agent_common as abi;
use aya::maps::{MapData, RingBuf};

/// Drain `ring` until `pred` matches an event or `timeout` passes; returns every event seen.
pub fn wait_for(
    ring: &mut RingBuf<MapData>,
    timeout: Duration,
    mut pred: impl FnMut(&abi::Event) -> bool,
) -> (Option<abi::Event>, Vec<abi::Event>) {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        while let Some(item) = ring.next() {
            if let Some(ev) = palisade::bpf::ringbuf::decode(&item) {
                seen.push(ev);
                if pred(&ev) {
                    return (Some(ev), seen);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (None, seen)
}

pub fn path_of(ev: &abi::Event) -> String {
    String::from_utf8_lossy(ev.path_bytes()).into_owned()
}
