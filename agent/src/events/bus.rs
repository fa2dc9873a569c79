//! Node-wide event bus: sequence numbers, a bounded replay ring, and fan-out to subscribers.
//!
//! The publisher is the kernel path (ring-buffer reader, fanotify loop): [`EventBus::publish`]
//! never waits for a subscriber. Each subscriber owns a bounded queue; when it is full the
//! subscriber's missed count grows and, before its next delivered event, it receives an explicit
//! gap record saying how many events it lost. Nothing is dropped silently.
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::Stream;

use super::model::{Event, Kind, Mode, Source, Verdict, now_ns};

/// Per-subscriber queue length. Large enough to absorb bursts; small enough that a stuck client
/// costs bounded memory.
pub const DEFAULT_SUBSCRIBER_QUEUE: usize = 4096;

/// Why events were lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GapReason {
    /// The subscriber's queue was full.
    SubscriberSlow,
    /// A resume point older than what the replay ring still holds.
    ReplayWindow,
    /// The kernel ring buffer was full (reported by the reader).
    KernelRingbuf,
}

impl GapReason {
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::SubscriberSlow => "subscriber_slow",
            GapReason::ReplayWindow => "replay_window",
            GapReason::KernelRingbuf => "kernel_ringbuf",
        }
    }
}

/// Events were lost before the record that carries this.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub missed: u64,
    pub reason: GapReason,
    /// Lost sequence range, when known (0 = unknown).
    pub first_seq: u64,
    pub last_seq: u64,
}

/// What subscribers receive: an event, plus gap information on gap records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub event: Event,
    pub gap: Option<Gap>,
}

impl Record {
    fn gap(gap: Gap) -> Self {
        let message = match gap.reason {
            GapReason::SubscriberSlow => {
                format!("gap: {} events missed (subscriber too slow)", gap.missed)
            }
            GapReason::ReplayWindow => format!(
                "gap: up to {} events no longer held for replay (resume point too old)",
                gap.missed
            ),
            GapReason::KernelRingbuf => format!("kernel ring buffer dropped {} events", gap.missed),
        };
        let mut event = Event::agent(Kind::Agent, Verdict::Allowed, message);
        event.flags.push("gap".into());
        Record {
            event,
            gap: Some(gap),
        }
    }
}

/// Which events a subscriber wants. Every empty list matches anything; lists are ANDed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Container id, id prefix (at least 4 characters) or name.
    pub containers: Vec<String>,
    pub pods: Vec<String>,
    pub namespaces: Vec<String>,
    /// Exact image reference, or its repository part (`nginx` matches `nginx:1.27`).
    pub images: Vec<String>,
    pub kinds: Vec<Kind>,
    pub verdicts: Vec<Verdict>,
    pub modes: Vec<Mode>,
}

impl Filter {
    pub fn matches(&self, ev: &Event) -> bool {
        let c = ev.container.as_ref();
        let any = |list: &[String], f: &dyn Fn(&str) -> bool| {
            list.is_empty() || list.iter().any(|v| f(v))
        };
        (self.kinds.is_empty() || self.kinds.contains(&ev.kind))
            && (self.verdicts.is_empty() || self.verdicts.contains(&ev.verdict))
            && (self.modes.is_empty() || ev.mode.is_some_and(|m| self.modes.contains(&m)))
            && any(&self.containers, &|v| {
                c.is_some_and(|c| {
                    c.id == v
                        || (v.len() >= 4 && c.id.starts_with(v))
                        || c.name.as_deref().map(|n| n.trim_start_matches('/'))
                            == Some(v.trim_start_matches('/'))
                })
            })
            && any(&self.pods, &|v| {
                c.and_then(|c| c.pod.as_ref()).is_some_and(|p| p.name == v)
            })
            && any(&self.namespaces, &|v| {
                c.and_then(|c| c.pod.as_ref())
                    .is_some_and(|p| p.namespace == v)
            })
            && any(&self.images, &|v| {
                c.and_then(|c| c.image.as_deref())
                    .is_some_and(|img| image_matches(img, v))
            })
    }
}

/// `nginx` matches `nginx`, `nginx:1.27` and `nginx@sha256:…`; otherwise exact.
fn image_matches(image: &str, want: &str) -> bool {
    image == want
        || image
            .strip_prefix(want)
            .is_some_and(|rest| rest.starts_with(':') || rest.starts_with('@'))
}

/// Counters for metrics and `Status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BusStats {
    pub published: u64,
    pub last_seq: u64,
    pub by_kind_verdict_source: HashMap<(Kind, Verdict, Source), u64>,
    /// Events lost, by cause (a subscriber missing an event counts once per subscriber).
    pub drops: HashMap<GapReason, u64>,
    /// Gap records delivered, by cause.
    pub gaps: HashMap<GapReason, u64>,
    pub subscribers: Vec<SubscriberStats>,
    pub replay_held: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriberStats {
    pub id: u64,
    /// Records waiting in the subscriber's queue (its lag).
    pub queued: usize,
    /// Events currently owed to the subscriber as a gap record.
    pub missed_pending: u64,
}

struct Slot {
    id: u64,
    filter: Filter,
    tx: mpsc::Sender<Arc<Record>>,
    capacity: usize,
    missed: u64,
    first_missed: u64,
    last_missed: u64,
}

struct State {
    next_seq: u64,
    next_sub: u64,
    ring: VecDeque<Arc<Record>>,
    slots: Vec<Slot>,
    stats: BusStats,
}

struct Inner {
    capacity: usize,
    queue: usize,
    state: Mutex<State>,
}

/// Cheap to clone; all clones share one bus.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("capacity", &self.inner.capacity)
            .finish_non_exhaustive()
    }
}

impl EventBus {
    /// A bus holding the last `replay_capacity` events for resuming subscribers.
    pub fn new(replay_capacity: usize) -> Self {
        Self::with_queue(replay_capacity, DEFAULT_SUBSCRIBER_QUEUE)
    }

    /// As [`EventBus::new`], with an explicit per-subscriber queue length.
    pub fn with_queue(replay_capacity: usize, subscriber_queue: usize) -> Self {
        EventBus {
            inner: Arc::new(Inner {
                capacity: replay_capacity.max(1),
                queue: subscriber_queue.max(2),
                state: Mutex::new(State {
                    next_seq: 1,
                    next_sub: 1,
                    ring: VecDeque::new(),
                    slots: Vec::new(),
                    stats: BusStats::default(),
                }),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is a single step).
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Assigns the next sequence number (and the time, if 0), stores the event for replay and
    /// hands it to every matching subscriber without waiting. Returns the sequence number.
    pub fn publish(&self, event: Event) -> u64 {
        self.publish_record(Record { event, gap: None })
    }

    /// The kernel ring buffer lost `n` events: tell every subscriber.
    pub fn kernel_drops(&self, n: u64) -> u64 {
        {
            let mut st = self.lock();
            *st.stats.drops.entry(GapReason::KernelRingbuf).or_default() += n;
            *st.stats.gaps.entry(GapReason::KernelRingbuf).or_default() += 1;
        }
        self.publish_record(Record::gap(Gap {
            missed: n,
            reason: GapReason::KernelRingbuf,
            first_seq: 0,
            last_seq: 0,
        }))
    }

    fn publish_record(&self, mut rec: Record) -> u64 {
        if rec.event.time_ns == 0 {
            rec.event.time_ns = now_ns();
        }
        let mut st = self.lock();
        let seq = st.next_seq;
        st.next_seq += 1;
        rec.event.seq = seq;
        let ev = &rec.event;
        st.stats.published += 1;
        st.stats.last_seq = seq;
        *st.stats
            .by_kind_verdict_source
            .entry((ev.kind, ev.verdict, ev.source))
            .or_default() += 1;
        let rec = Arc::new(rec);
        if st.ring.len() == self.inner.capacity {
            st.ring.pop_front();
        }
        st.ring.push_back(rec.clone());

        let State { slots, stats, .. } = &mut *st;
        slots.retain_mut(|slot| {
            // Kernel-drop notices go to everyone, whatever the filter.
            if rec.gap.is_none() && !slot.filter.matches(&rec.event) {
                return !slot.tx.is_closed();
            }
            deliver(slot, &rec, stats)
        });
        seq
    }

    /// Subscribe. With `resume_from = Some(n)`, first replays held events with `seq > n` that
    /// match (preceded by a gap record if the ring no longer holds all of them), then live ones.
    pub fn subscribe(&self, filter: Filter, resume_from: Option<u64>) -> Subscription {
        let (tx, rx) = mpsc::channel(self.inner.queue);
        let mut st = self.lock();
        let mut replay = VecDeque::new();
        if let Some(from) = resume_from {
            let last = st.next_seq - 1;
            let oldest = st.ring.front().map_or(st.next_seq, |r| r.event.seq);
            if from < last && from + 1 < oldest {
                let lost_last = oldest - 1;
                let missed = lost_last - from;
                *st.stats.drops.entry(GapReason::ReplayWindow).or_default() += missed;
                *st.stats.gaps.entry(GapReason::ReplayWindow).or_default() += 1;
                replay.push_back(Arc::new(Record::gap(Gap {
                    missed,
                    reason: GapReason::ReplayWindow,
                    first_seq: from + 1,
                    last_seq: lost_last,
                })));
            }
            replay.extend(
                st.ring
                    .iter()
                    .filter(|r| r.event.seq > from && (r.gap.is_some() || filter.matches(&r.event)))
                    .cloned(),
            );
        }
        let id = st.next_sub;
        st.next_sub += 1;
        st.slots.push(Slot {
            id,
            filter,
            tx,
            capacity: self.inner.queue,
            missed: 0,
            first_missed: 0,
            last_missed: 0,
        });
        Subscription {
            id,
            bus: self.clone(),
            replay,
            rx,
        }
    }

    /// Sequence number of the last published event (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.lock().next_seq - 1
    }

    pub fn stats(&self) -> BusStats {
        let st = self.lock();
        let mut stats = st.stats.clone();
        stats.replay_held = st.ring.len();
        stats.subscribers = st
            .slots
            .iter()
            .map(|s| SubscriberStats {
                id: s.id,
                queued: s.capacity - s.tx.capacity(),
                missed_pending: s.missed,
            })
            .collect();
        stats
    }

    /// The gap record owed to subscriber `id`, if any. Only called with its queue empty: every
    /// event it holds precedes the missed ones, and a publish that finds room sends the gap
    /// first (under the same lock), so order is kept either way.
    fn take_gap(&self, id: u64) -> Option<Arc<Record>> {
        let mut st = self.lock();
        let State { slots, stats, .. } = &mut *st;
        let slot = slots.iter_mut().find(|s| s.id == id && s.missed > 0)?;
        *stats.gaps.entry(GapReason::SubscriberSlow).or_default() += 1;
        let gap = Gap {
            missed: std::mem::take(&mut slot.missed),
            reason: GapReason::SubscriberSlow,
            first_seq: slot.first_missed,
            last_seq: slot.last_missed,
        };
        Some(Arc::new(Record::gap(gap)))
    }

    fn unsubscribe(&self, id: u64) {
        self.lock().slots.retain(|s| s.id != id);
    }
}

/// Try to hand `rec` to one subscriber; a pending gap record goes first. Returns false when the
/// subscriber is gone.
fn deliver(slot: &mut Slot, rec: &Arc<Record>, stats: &mut BusStats) -> bool {
    use mpsc::error::TrySendError;
    if slot.missed > 0 {
        let gap = Arc::new(Record::gap(Gap {
            missed: slot.missed,
            reason: GapReason::SubscriberSlow,
            first_seq: slot.first_missed,
            last_seq: slot.last_missed,
        }));
        match slot.tx.try_send(gap) {
            Ok(()) => {
                *stats.gaps.entry(GapReason::SubscriberSlow).or_default() += 1;
                slot.missed = 0;
            }
            Err(TrySendError::Closed(_)) => return false,
            Err(TrySendError::Full(_)) => {}
        }
    }
    if slot.missed == 0 {
        match slot.tx.try_send(rec.clone()) {
            Ok(()) => return true,
            Err(TrySendError::Closed(_)) => return false,
            Err(TrySendError::Full(_)) => slot.first_missed = rec.event.seq,
        }
    }
    slot.missed += 1;
    slot.last_missed = rec.event.seq;
    *stats.drops.entry(GapReason::SubscriberSlow).or_default() += 1;
    true
}

/// A live subscription: replayed records first, then live ones. Unsubscribes on drop.
pub struct Subscription {
    id: u64,
    bus: EventBus,
    replay: VecDeque<Arc<Record>>,
    rx: mpsc::Receiver<Arc<Record>>,
}

impl Subscription {
    pub async fn recv(&mut self) -> Option<Arc<Record>> {
        if let Some(r) = self.try_recv() {
            return Some(r);
        }
        // Queue empty and nothing owed: nothing can be missed while we wait.
        self.rx.recv().await
    }

    /// Records replayed at subscribe time (for non-follow requests), leaving live ones queued.
    pub fn take_replay(&mut self) -> Vec<Arc<Record>> {
        self.replay.drain(..).collect()
    }

    /// A record already waiting, without waiting for one. Once the queue is drained, a pending
    /// gap record is handed over at once rather than with the next event.
    pub fn try_recv(&mut self) -> Option<Arc<Record>> {
        if let Some(r) = self.replay.pop_front() {
            return Some(r);
        }
        self.rx
            .try_recv()
            .ok()
            .or_else(|| self.bus.take_gap(self.id))
    }
}

impl Stream for Subscription {
    type Item = Arc<Record>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(r) = self.try_recv() {
            return Poll::Ready(Some(r));
        }
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.bus.unsubscribe(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containers::meta::{ContainerMeta, PodMeta};

    fn exec(container: &str, verdict: Verdict) -> Event {
        let mut e = Event::agent(Kind::Exec, verdict, "");
        e.message = None;
        e.source = Source::Lsm;
        e.mode = Some(Mode::Enforce);
        e.path = Some("/bin/sh".into());
        e.container = Some(ContainerMeta {
            id: format!("{container}0123456789abcdef"),
            name: Some(container.into()),
            image: Some(format!("{container}:1.0")),
            pod: Some(PodMeta {
                name: format!("{container}-pod"),
                namespace: "web".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        e
    }

    fn drain(sub: &mut Subscription) -> Vec<Arc<Record>> {
        std::iter::from_fn(|| sub.try_recv()).collect()
    }

    #[test]
    fn sequence_is_strictly_increasing_and_time_is_set() {
        let bus = EventBus::new(8);
        let mut e = exec("a", Verdict::Allowed);
        e.time_ns = 0;
        let seqs: Vec<u64> = (0..20).map(|_| bus.publish(e.clone())).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        assert_eq!(seqs[0], 1);
        assert_eq!(bus.last_seq(), 20);
        let mut sub = bus.subscribe(Filter::default(), Some(0));
        let held = drain(&mut sub);
        // Ring holds 8: a replay-window gap for 1..=12, then 13..=20.
        assert_eq!(held[0].gap.as_ref().unwrap().missed, 12);
        assert_eq!(
            held[0].gap.as_ref().unwrap().reason,
            GapReason::ReplayWindow
        );
        let seqs: Vec<u64> = held[1..].iter().map(|r| r.event.seq).collect();
        assert_eq!(seqs, (13..=20).collect::<Vec<_>>());
        assert!(held[1..].iter().all(|r| r.event.time_ns > 0));
    }

    #[test]
    fn stalled_subscriber_gets_gap_while_other_gets_everything() {
        let bus = EventBus::with_queue(16, 4);
        let mut slow = bus.subscribe(Filter::default(), None);
        let mut fast = bus.subscribe(Filter::default(), None);
        let mut fast_seen = Vec::new();
        for _ in 0..10 {
            bus.publish(exec("a", Verdict::Allowed));
            fast_seen.extend(drain(&mut fast).into_iter().map(|r| r.event.seq));
        }
        assert_eq!(fast_seen, (1..=10).collect::<Vec<_>>());
        // slow's queue (4) filled with 1..=4; 5..=10 missed. Reading one frees a slot: the next
        // publish puts the gap record there (the event itself no longer fits, and is owed).
        let seq = |v: &[Arc<Record>]| v.iter().map(|r| r.event.seq).collect::<Vec<_>>();
        assert_eq!(slow.try_recv().unwrap().event.seq, 1);
        bus.publish(exec("a", Verdict::Allowed));
        let got = drain(&mut slow);
        assert_eq!(seq(&got), vec![2, 3, 4, 0, 0]);
        let gap = got[3]
            .gap
            .as_ref()
            .expect("gap record after the queued events");
        assert_eq!((gap.missed, gap.first_seq, gap.last_seq), (6, 5, 10));
        assert_eq!(got[3].event.kind, Kind::Agent);
        assert_eq!(
            got[3].event.message.as_deref(),
            Some("gap: 6 events missed (subscriber too slow)")
        );
        // Once drained, what is still owed comes at once, without waiting for a new event.
        let gap = got[4].gap.as_ref().expect("second gap on catching up");
        assert_eq!((gap.missed, gap.first_seq, gap.last_seq), (1, 11, 11));
        bus.publish(exec("a", Verdict::Allowed));
        assert_eq!(seq(&drain(&mut slow)), vec![12]);
        assert_eq!(seq(&drain(&mut fast)), vec![11, 12]);
        let stats = bus.stats();
        assert_eq!(stats.drops[&GapReason::SubscriberSlow], 7);
        assert_eq!(stats.gaps[&GapReason::SubscriberSlow], 2);
    }

    #[test]
    fn resume_replays_then_goes_live_without_duplicates() {
        let bus = EventBus::new(100);
        for _ in 0..5 {
            bus.publish(exec("a", Verdict::Allowed));
        }
        let mut sub = bus.subscribe(Filter::default(), Some(3));
        bus.publish(exec("a", Verdict::Allowed));
        let seqs: Vec<u64> = drain(&mut sub).iter().map(|r| r.event.seq).collect();
        assert_eq!(seqs, vec![4, 5, 6]);
        // Live-only subscription sees nothing old.
        let mut live = bus.subscribe(Filter::default(), None);
        assert!(live.try_recv().is_none());
        // Resuming from the present yields no gap.
        let mut now = bus.subscribe(Filter::default(), Some(6));
        assert!(now.try_recv().is_none());
    }

    #[test]
    fn filters_select_exactly_the_matching_events() {
        let bus = EventBus::new(100);
        let only_b_denied = Filter {
            containers: vec!["b".into()],
            verdicts: vec![Verdict::Denied],
            ..Default::default()
        };
        let mut sub = bus.subscribe(only_b_denied, None);
        let by_image = bus.subscribe(
            Filter {
                images: vec!["a".into()],
                ..Default::default()
            },
            None,
        );
        let mut by_ns = bus.subscribe(
            Filter {
                namespaces: vec!["other".into()],
                ..Default::default()
            },
            None,
        );
        let mut by_kind = bus.subscribe(
            Filter {
                kinds: vec![Kind::Connect],
                ..Default::default()
            },
            None,
        );
        bus.publish(exec("a", Verdict::Denied));
        let want = bus.publish(exec("b", Verdict::Denied));
        bus.publish(exec("b", Verdict::Allowed));
        bus.publish(Event::agent(Kind::Agent, Verdict::Allowed, "hello"));
        assert_eq!(
            drain(&mut sub)
                .iter()
                .map(|r| r.event.seq)
                .collect::<Vec<_>>(),
            vec![want]
        );
        assert!(drain(&mut by_ns).is_empty());
        assert!(drain(&mut by_kind).is_empty());
        let mut by_image = by_image;
        assert_eq!(drain(&mut by_image).len(), 1);
        // id prefix, pod, mode
        let f = Filter {
            containers: vec!["b012".into()],
            pods: vec!["b-pod".into()],
            modes: vec![Mode::Enforce],
            ..Default::default()
        };
        assert!(f.matches(&exec("b", Verdict::Allowed)));
        assert!(!f.matches(&exec("a", Verdict::Allowed)));
        assert!(image_matches("nginx:1.27", "nginx") && !image_matches("nginx-x:1", "nginx"));
    }

    #[test]
    fn kernel_drops_reach_every_subscriber_and_dropped_subscribers_leave() {
        let bus = EventBus::new(10);
        let mut a = bus.subscribe(
            Filter {
                kinds: vec![Kind::Exec],
                ..Default::default()
            },
            None,
        );
        let b = bus.subscribe(Filter::default(), None);
        assert_eq!(bus.stats().subscribers.len(), 2);
        drop(b);
        assert_eq!(bus.stats().subscribers.len(), 1);
        bus.kernel_drops(42);
        let got = drain(&mut a);
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].event.message.as_deref(),
            Some("kernel ring buffer dropped 42 events")
        );
        assert_eq!(
            got[0].gap.as_ref().unwrap().reason,
            GapReason::KernelRingbuf
        );
        assert_eq!(bus.stats().drops[&GapReason::KernelRingbuf], 42);
    }
}
