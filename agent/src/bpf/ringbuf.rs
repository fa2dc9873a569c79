//! Reads kernel events from the ring buffer asynchronously and decodes them.
use agent_common as abi;
use aya::maps::{MapData, PerCpuArray, RingBuf};
use tokio::io::unix::AsyncFd;

/// Decode one ring-buffer record. Records of the wrong size are skipped (never trusted).
pub fn decode(bytes: &[u8]) -> Option<abi::Event> {
    if bytes.len() < std::mem::size_of::<abi::Event>() {
        return None;
    }
    // SAFETY: size checked; `Event` is plain data, any bit pattern is valid; unaligned read.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const abi::Event) })
}

/// Forward every kernel event to `sink` until the sink returns `false`.
pub async fn run(
    ring: RingBuf<MapData>,
    mut sink: impl FnMut(abi::Event) -> bool,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd and moves into the AsyncFd, which drops it last.
    let mut fd =
        unsafe { AsyncFd::register(ring) }.map_err(|e| std::io::Error::other(e.to_string()))?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if let Some(ev) = decode(&item)
                && !sink(ev)
            {
                return Ok(());
            }
        }
        guard.clear_ready();
    }
}

/// Sum a per-CPU counter (e.g. `STAT_RINGBUF_DROPS`).
pub fn stat(stats: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    stats.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
}
