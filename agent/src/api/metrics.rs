//! Prometheus metrics and health endpoints (`/metrics`, `/healthz`, `/readyz`).
//!
//! Event-pipeline numbers are read from the [`EventBus`] at scrape time (no double bookkeeping on
//! the hot path); daemon-level gauges are set by the daemon through the public fields.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context, bail};
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::events::bus::EventBus;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    /// Policies loaded.
    pub policies: Gauge,
    /// Containers known to the inventory.
    pub containers: Gauge,
    /// Containers with a policy bound.
    pub bound_containers: Gauge,
    /// Fill ratio (0..1) of each kernel map, by map name.
    pub map_fill: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Always 1, labelled with the agent version and the enforcement tier in use.
    pub info: Family<Labels, Gauge>,
    /// 1, labelled with the reason class, when `auto` fell back to tier 2 although BPF-LSM is
    /// active on the node.
    pub tier_fallback: Family<Labels, Gauge>,
    ready: AtomicBool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(bus: EventBus) -> Arc<Self> {
        let mut registry = Registry::with_prefix("palisade");
        let policies = Gauge::default();
        let containers = Gauge::default();
        let bound_containers = Gauge::default();
        let map_fill = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register("policies", "Policies loaded", policies.clone());
        registry.register("containers", "Containers known", containers.clone());
        registry.register(
            "bound_containers",
            "Containers with a policy bound",
            bound_containers.clone(),
        );
        registry.register(
            "map_fill_ratio",
            "Fill ratio of kernel maps",
            map_fill.clone(),
        );
        let info = Family::<Labels, Gauge>::default();
        registry.register(
            "agent_info",
            "Agent version and enforcement tier",
            info.clone(),
        );
        let tier_fallback = Family::<Labels, Gauge>::default();
        registry.register(
            "tier_fallback",
            "Tier 2 in use although BPF-LSM is active, by reason",
            tier_fallback.clone(),
        );
        registry.register_collector(Box::new(BusCollector(bus)));
        Arc::new(Metrics {
            info,
            tier_fallback,
            registry,
            policies,
            containers,
            bound_containers,
            map_fill,
            ready: AtomicBool::new(false),
        })
    }

    /// Record the version and tier (`palisade_agent_info{version,tier} 1`).
    pub fn set_info(&self, version: &str, tier: &str) {
        let labels = vec![
            ("version".to_string(), version.to_string()),
            ("tier".to_string(), tier.to_string()),
        ];
        self.info.get_or_create(&labels).set(1);
    }

    /// Record a tier fallback (`palisade_tier_fallback{reason} 1`).
    pub fn set_tier_fallback(&self, reason: &str) {
        let labels = vec![("reason".to_string(), reason.to_string())];
        self.tier_fallback.get_or_create(&labels).set(1);
    }

    /// `/readyz` answers 200 once the daemon says so (policies loaded, hooks attached).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}

#[derive(Debug)]
struct BusCollector(EventBus);

fn family<M: EncodeMetric + TypedMetric + Default + Clone>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, Box<dyn Fn(&M)>)>,
) -> Result<(), std::fmt::Error> {
    let fam = Family::<Labels, M>::default();
    for (labels, set) in rows {
        set(&fam.get_or_create(&labels));
    }
    fam.encode(enc.encode_descriptor(name, help, None, fam.metric_type())?)
}

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn lower<T: serde::Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

impl Collector for BusCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.stats();
        let counter = |n: u64| -> Box<dyn Fn(&Counter)> {
            Box::new(move |c: &Counter| {
                c.inc_by(n);
            })
        };
        let gauge = |n: i64| -> Box<dyn Fn(&Gauge)> {
            Box::new(move |g: &Gauge| {
                g.set(n);
            })
        };
        family(
            &mut enc,
            "events",
            "Events published, by kind, verdict and source",
            s.by_kind_verdict_source.iter().map(|((k, v, src), n)| {
                (
                    l(&[
                        ("kind", &lower(k)),
                        ("verdict", &lower(v)),
                        ("source", &lower(src)),
                    ]),
                    counter(*n),
                )
            }),
        )?;
        family(
            &mut enc,
            "events_dropped",
            "Events lost, by cause (per subscriber for subscriber_slow)",
            s.drops
                .iter()
                .map(|(r, n)| (l(&[("cause", r.as_str())]), counter(*n))),
        )?;
        family(
            &mut enc,
            "event_gaps",
            "Gap records delivered, by cause",
            s.gaps
                .iter()
                .map(|(r, n)| (l(&[("cause", r.as_str())]), counter(*n))),
        )?;
        family(
            &mut enc,
            "subscribers",
            "Event stream subscribers",
            [(vec![], gauge(s.subscribers.len() as i64))],
        )?;
        family(
            &mut enc,
            "subscriber_lag",
            "Events queued for each subscriber",
            s.subscribers.iter().map(|sub| {
                (
                    l(&[("subscriber", &sub.id.to_string())]),
                    gauge(sub.queued as i64),
                )
            }),
        )?;
        family(
            &mut enc,
            "replay_held",
            "Events held for replay",
            [(vec![], gauge(s.replay_held as i64))],
        )?;
        family(
            &mut enc,
            "last_seq",
            "Last event sequence number",
            [(vec![], gauge(s.last_seq as i64))],
        )
    }
}

/// Serve `/metrics`, `/healthz`, `/readyz` on `addr` until `shutdown`. Metrics reveal what runs
/// on the node, so a non-loopback address needs `allow_non_loopback`.
pub async fn serve_http(
    addr: SocketAddr,
    allow_non_loopback: bool,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = bind_http(addr, allow_non_loopback).await?;
    serve_http_on(listener, metrics, shutdown).await
}

/// Bind only (lets callers use port 0 and learn the port).
pub async fn bind_http(
    addr: SocketAddr,
    allow_non_loopback: bool,
) -> anyhow::Result<tokio::net::TcpListener> {
    if !addr.ip().is_loopback() && !allow_non_loopback {
        bail!("refusing to serve metrics on non-loopback {addr} (allow it explicitly)");
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics on {addr}"))
}

pub async fn serve_http_on(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let m = metrics.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = metrics.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n").into_response()
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("metrics server")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::model::{Event, Kind, Verdict};

    #[test]
    fn exposition_contains_bus_and_daemon_metrics() {
        let bus = EventBus::with_queue(10, 2);
        let m = Metrics::new(bus.clone());
        let _sub = bus.subscribe(Default::default(), None);
        for _ in 0..3 {
            bus.publish(Event::agent(Kind::Agent, Verdict::Allowed, "x"));
        }
        bus.kernel_drops(5);
        m.policies.set(2);
        m.map_fill.get_or_create(&l(&[("map", "rules")])).set(0.25);
        let text = m.encode();
        for want in [
            "palisade_events_total{kind=\"agent\",verdict=\"allowed\",source=\"agent\"} 4",
            "palisade_events_dropped_total{cause=\"kernel_ringbuf\"} 5",
            "palisade_events_dropped_total{cause=\"subscriber_slow\"} 2",
            "palisade_subscribers 1",
            "palisade_subscriber_lag{subscriber=\"1\"} 2",
            "palisade_policies 2",
            "palisade_map_fill_ratio{map=\"rules\"} 0.25",
            "palisade_last_seq 4",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!m.is_ready());
    }

    #[tokio::test]
    async fn refuses_non_loopback_unless_allowed() {
        let err = bind_http("0.0.0.0:0".parse().unwrap(), false)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("non-loopback"), "{err}");
        assert!(
            bind_http("127.0.0.1:0".parse().unwrap(), false)
                .await
                .is_ok()
        );
    }
}
