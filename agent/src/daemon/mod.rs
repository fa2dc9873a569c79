//! `palisade agent`: probe the kernel, load the programs of the best tier, discover containers,
//! bind policies, stream events, serve the API; detach everything on SIGINT/SIGTERM.
pub mod control;
pub mod enrich;
pub mod policy_dir;

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use agent_common as abi;
use anyhow::Context;
use clap::{Args, ValueEnum};
use tracing::{info, warn};

use crate::{
    api::{self, ServerConfig, metrics::Metrics},
    bpf::{
        self,
        loader::{Loaded, Tier},
    },
    containers::{cgroup2, discovery::Discovery, inventory::InventoryEvent, meta::ContainerMeta},
    enforce::{
        Backend,
        compat::{CompatBackend, Reporter},
        lsm::LsmBackend,
        rules::RuleMaps,
        snapshot::SharedSnapshot,
    },
    engine::Engine,
    events::{
        bus::EventBus,
        model::{self as ev, Event, Kind, Source, Verdict},
    },
    learn::{self, GenConfig, LearnHandle, Learner, Limits},
    policy::{Mode, Policy},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Enforcer {
    /// BPF-LSM when its programs load, else compat.
    Auto,
    Lsm,
    Compat,
}

#[derive(Args, Clone, Debug)]
pub struct AgentConfig {
    /// Enforcement tier.
    #[arg(long, value_enum, default_value_t = Enforcer::Auto)]
    pub enforcer: Enforcer,
    /// Directory of policy YAML files (e.g. a mounted ConfigMap), watched for changes.
    #[arg(long)]
    pub policy_dir: Option<PathBuf>,
    /// Mode for containers no policy selects (no rules: observe only).
    #[arg(long, default_value = "monitor")]
    pub default_mode: Mode,
    /// API unix socket (mode 0600).
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// State directory (fanotify holder pidfile).
    #[arg(long, default_value = "/run/palisade")]
    pub state_dir: PathBuf,
    /// Audit log of admin API calls (JSON lines).
    #[arg(long, default_value = "/var/log/palisade/audit.jsonl")]
    pub audit_log: PathBuf,
    /// Serve /metrics, /healthz, /readyz here (loopback unless --metrics-allow-remote).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    #[arg(long)]
    pub metrics_allow_remote: bool,
    /// Also print every event as a JSON line on stdout (for log shippers).
    #[arg(long)]
    pub events_stdout: bool,
    /// Docker Engine API socket (skipped if absent).
    #[arg(long, default_value = "/run/docker.sock")]
    pub docker_socket: PathBuf,
    /// CRI runtime socket (containerd / CRI-O; skipped if absent).
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub cri_socket: PathBuf,
    /// Do not discover containers (policies bound by cgroupPath only).
    #[arg(long)]
    pub no_discovery: bool,
    /// Tier 2 without fanotify (egress and the exec backstop only).
    #[arg(long)]
    pub no_fanotify: bool,
    /// bpffs directory for pinned links (programs outlive an agent crash: fail closed).
    #[arg(long, default_value = crate::bpf::pins::DEFAULT_PIN_ROOT)]
    pub pin_dir: PathBuf,
    /// Events held for resuming subscribers.
    #[arg(long, default_value_t = 65536)]
    pub replay: usize,
}

/// One-line selector summary for listings.
pub fn selector_summary(p: &Policy) -> String {
    let s = &p.selector;
    let mut parts = Vec::new();
    if let Some(v) = &s.container_name {
        parts.push(format!("name={v}"));
    }
    if let Some(v) = &s.image {
        parts.push(format!("image={v}"));
    }
    if let Some(l) = &s.labels {
        parts.extend(l.iter().map(|(k, v)| format!("{k}={v}")));
    }
    if let Some(v) = &s.namespace {
        parts.push(format!("namespace={v}"));
    }
    if s.pod_selector.is_some() {
        parts.push("podSelector".into());
    }
    if let Some(v) = &s.cgroup_path {
        parts.push(format!("cgroup={v}"));
    }
    parts.join(",")
}

/// What the kernel offers, for the log and `palisade status`.
fn kernel_features(root: &Path, lsm: bool) -> Vec<String> {
    let mut f = vec![format!("cgroup2={}", root.display())];
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        f.push("btf".into());
    }
    if lsm {
        f.push("bpf-lsm".into());
    }
    if let Ok(l) = std::fs::read_to_string("/sys/kernel/security/lsm") {
        f.push(format!("lsm={}", l.trim()));
    }
    f.push(format!(
        "kernel={}",
        nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    f
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let root = cgroup2::find_cgroup2_mount().context("no cgroup2 mount found")?;
    let probe = if cfg.enforcer == Enforcer::Compat {
        None
    } else {
        Some(bpf::probe::lsm())
    };
    let lsm = matches!(probe, Some(Ok(())));
    let tier = match (cfg.enforcer, &probe) {
        (Enforcer::Lsm, Some(Err(e))) => anyhow::bail!("--enforcer lsm: tier 1 unavailable: {e}"),
        (Enforcer::Auto | Enforcer::Lsm, Some(Ok(()))) => Tier::Lsm,
        _ => Tier::Compat,
    };
    // A node where BPF-LSM is active but tier 1 does not load (a verifier rejection on a newer
    // kernel, a missing capability) silently loses in-kernel enforcement: say so loudly.
    let fallback = match &probe {
        Some(Err(e)) if e.lsm_was_active() => {
            warn!(reason = %e, class = e.class(), "BPF-LSM is active but tier 1 does not load; falling back to tier 2");
            Some(e.clone())
        }
        Some(Err(e)) => {
            info!(reason = %e, "tier 1 unavailable; using tier 2");
            None
        }
        _ => None,
    };
    let features = kernel_features(&root, lsm);
    info!(%tier, features = ?features, "kernel probed; enforcement tier chosen");
    std::fs::create_dir_all(&cfg.state_dir).ok();

    let (loaded, maps, ring) = Loaded::load(tier, Some(&cfg.pin_dir))?;
    let rules = RuleMaps::new(maps);
    let snapshot = SharedSnapshot::default();
    let bus = EventBus::new(cfg.replay);
    let report: Reporter = {
        let bus = bus.clone();
        Arc::new(move |e| {
            bus.publish(e);
        })
    };
    let backend: Box<dyn Backend> = match tier {
        Tier::Lsm => Box::new(LsmBackend::new(loaded)),
        Tier::Compat => {
            let dir = (!cfg.no_fanotify).then_some(cfg.state_dir.as_path());
            Box::new(CompatBackend::new(
                loaded,
                dir,
                snapshot.clone(),
                rules.exec_inodes.clone(),
                rules.open_intent.clone(),
                report,
            )?)
        }
    };
    let engine = Arc::new(Mutex::new(Engine::new(
        rules,
        backend,
        snapshot.clone(),
        root.clone(),
        cfg.default_mode,
    )));

    let (inventory, discovery) = if cfg.no_discovery {
        (None, None)
    } else {
        let docker = cfg
            .docker_socket
            .exists()
            .then(|| cfg.docker_socket.clone());
        let cri = cfg.cri_socket.exists().then(|| cfg.cri_socket.clone());
        let (inv, h) = Discovery::start(root.clone(), docker, cri);
        (Some(inv), Some(h))
    };
    let learn_dir = cfg.state_dir.join("learn");
    let learner = Learner::load(&learn_dir, Limits::default(), GenConfig::default())
        .with_context(|| format!("loading learned profiles from {}", learn_dir.display()))?;
    let learn = LearnHandle::new(learner);
    let ctl = Arc::new(control::DaemonControl {
        engine: engine.clone(),
        inventory: inventory.clone(),
        bus: bus.clone(),
        kernel_features: features,
        tier_fallback: fallback.as_ref().map(|e| e.to_string()),
        learn: learn.clone(),
    });

    // Policies first, then containers, so nothing starts under the default by mistake.
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(dir) = &cfg.policy_dir {
        let mut st = policy_dir::DirState::default();
        for e in policy_dir::reload(dir, &ctl, &mut st) {
            warn!(error = %e, "policy file rejected");
        }
        tasks.spawn(policy_dir::watch(dir.clone(), ctl.clone(), st));
    }
    if let Some(inv) = &inventory {
        let (existing, mut rx) = inv.subscribe_with_snapshot();
        {
            let mut e = engine.lock().unwrap_or_else(|p| p.into_inner());
            for m in &existing {
                e.container_added(m);
            }
        }
        let engine = engine.clone();
        tasks.spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => on_inventory(&engine, ev),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        warn!(missed = n, "inventory events lagged");
                    }
                    Err(_) => return,
                }
            }
        });
    }

    tasks.spawn(learn::run(
        learn.clone(),
        bus.clone(),
        learn_dir.clone(),
        std::time::Duration::from_secs(5),
    ));
    if let (Some(inv), true) = (&inventory, cfg.docker_socket.exists()) {
        // Ready only once Docker's create events arm bindings (bounded: a hung dockerd must
        // not keep the node's agent from enforcing what it already knows).
        if !inv
            .wait_runtime_synced(std::time::Duration::from_secs(10))
            .await
        {
            warn!("Docker event stream not connected after 10 s; continuing without it");
        }
    }
    // Policies and running containers are bound: userspace deciders may answer now (events
    // that arrived meanwhile, e.g. queued in an adopted fanotify group, waited).
    engine
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .activate()
        .context("starting the enforcement backend")?;
    tasks.spawn(kernel_events(
        ring,
        engine.clone(),
        inventory.clone(),
        snapshot.clone(),
        bus.clone(),
        tier,
    ));
    if cfg.events_stdout {
        let mut sub = bus.subscribe(Default::default(), None);
        tasks.spawn(async move {
            while let Some(r) = sub.recv().await {
                if let Ok(line) = serde_json::to_string(&r.event) {
                    println!("{line}");
                }
            }
        });
    }
    let metrics = Metrics::new(bus.clone());
    metrics.set_info(env!("CARGO_PKG_VERSION"), &tier.to_string());
    if let Some(e) = &fallback {
        metrics.set_tier_fallback(e.class());
        let mut ev = Event::agent(
            Kind::Agent,
            Verdict::Violation,
            format!("tier 1 unavailable although BPF-LSM is active, running tier 2: {e}"),
        );
        ev.flags = vec!["tier_fallback".into(), e.class().into()];
        bus.publish(ev);
    }
    tasks.spawn(control::refresh_gauges(
        ctl.clone(),
        metrics.clone(),
        std::time::Duration::from_secs(2),
    ));
    if let Some(addr) = cfg.metrics_addr {
        let listener = api::metrics::bind_http(addr, cfg.metrics_allow_remote).await?;
        tasks.spawn({
            let m = metrics.clone();
            async move {
                if let Err(e) =
                    api::metrics::serve_http_on(listener, m, std::future::pending()).await
                {
                    warn!(error = %e, "metrics endpoint stopped");
                }
            }
        });
    }
    let server_cfg = ServerConfig {
        unix_socket: Some(cfg.socket.clone()),
        tls: None,
        audit_log: Some(cfg.audit_log.clone()),
    };
    if let Some(parent) = cfg.audit_log.parent() {
        std::fs::create_dir_all(parent).ok();
    }
    let server = api::server::bind(server_cfg, ctl.clone(), bus.clone()).await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tasks.spawn(async move {
        if let Err(e) = server
            .run(async {
                let _ = stop_rx.await;
            })
            .await
        {
            warn!(error = %e, "API server stopped");
        }
    });
    metrics.set_ready(true);
    bus.publish(Event::agent(
        Kind::Agent,
        Verdict::Allowed,
        format!("agent started (tier {tier})"),
    ));
    info!(socket = %cfg.socket.display(), "agent ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        _ = term.recv() => info!("SIGTERM: shutting down"),
    }
    let _ = stop_tx.send(());
    tasks.abort_all();
    // The learn task was aborted mid-interval: save what it has not saved yet.
    let saved = learn.with(|l| {
        if l.dirty() {
            l.save(&learn_dir)
        } else {
            Ok(())
        }
    });
    if let Err(e) = saved {
        warn!(error = %e, "saving learned profiles");
    }
    if let Some(h) = discovery {
        h.abort();
    }
    let engine = match Arc::try_unwrap(engine) {
        Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
        Err(shared) => {
            // Tasks still hold it for a moment after abort; shut down through the lock.
            shared.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
            info!("detached; bye");
            return Ok(());
        }
    };
    let mut engine = engine;
    engine.shutdown();
    info!("detached; bye");
    Ok(())
}

fn on_inventory(engine: &Arc<Mutex<Engine>>, ev: InventoryEvent) {
    let mut e = engine.lock().unwrap_or_else(|p| p.into_inner());
    match ev {
        InventoryEvent::Created(m) => e.container_added(&m),
        InventoryEvent::Updated(m) => e.container_updated(&m),
        InventoryEvent::Removed(m) => e.container_gone(&m),
        InventoryEvent::Pending {
            runtime,
            id,
            name,
            image,
            labels,
        } => {
            let meta = ContainerMeta {
                id,
                runtime,
                name,
                image,
                labels,
                metadata_known: true,
                ..Default::default()
            };
            e.container_pending(&meta);
        }
    }
}

/// The kernel event loop: decode, let the backend act (tier-2 stopped execs), classify the
/// exec trail in userspace where the kernel could not, enrich, publish.
async fn kernel_events(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    engine: Arc<Mutex<Engine>>,
    inventory: Option<crate::containers::inventory::Inventory>,
    snapshot: SharedSnapshot,
    bus: EventBus,
    tier: Tier,
) {
    let net_source = if tier == Tier::Lsm {
        Source::Lsm
    } else {
        Source::CgroupSock
    };
    let mut learned: HashSet<(u32, Vec<u8>)> = HashSet::new();
    let mut last_drops = 0u64;
    // Drops are read from a per-CPU kernel counter (a map syscall under the engine lock): a few
    // times a second is enough, not once per event.
    let mut next_drop_check = std::time::Instant::now();
    let r = bpf::ringbuf::run(ring, |k| {
        if k.kind == abi::KIND_CGROUP_BOUND {
            let path = String::from_utf8_lossy(k.path_bytes()).into_owned();
            engine
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .kernel_bound(k.cgroup_id, &path);
        }
        if k.kind == abi::KIND_EXEC && k.flags & abi::EV_FILENAME_AS_PASSED != 0 {
            let extra = engine
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .on_exec_event(&k);
            if let Some(mut e) = extra {
                e.container = inventory
                    .as_ref()
                    .and_then(|i| i.by_cgroup_id(e.cgroup_id))
                    .or_else(|| engine.lock().ok().and_then(|g| g.bound_meta(k.cgroup_id)));
                bus.publish(e);
                return true;
            }
        }
        if let Some(mut e) = enrich::enrich(&k, net_source, inventory.as_ref(), &snapshot) {
            if e.container.is_none() {
                e.container = engine.lock().ok().and_then(|g| g.bound_meta(k.cgroup_id));
            }
            if e.source == Source::ExecTrace
                && tier == Tier::Compat
                && !classify_exec_trail(&k, &mut e, &snapshot, &mut learned)
            {
                return true;
            }
            bus.publish(e);
        }
        if std::time::Instant::now() >= next_drop_check {
            next_drop_check = std::time::Instant::now() + std::time::Duration::from_millis(250);
            let drops = engine
                .lock()
                .map(|e| e.kernel_stat(abi::STAT_RINGBUF_DROPS))
                .unwrap_or(0);
            if drops > last_drops {
                bus.kernel_drops(drops - last_drops);
                last_drops = drops;
            }
        }
        true
    })
    .await;
    if let Err(e) = r {
        warn!(error = %e, "kernel event reader stopped");
    }
}

/// The exec trail carries every exec. In learn and monitor modes its verdict is decided here
/// from the resolved image path (`/proc/<pid>/exe`, as the container sees it); in learn mode
/// each image is reported once per generation. Returns false to drop the event.
fn classify_exec_trail(
    k: &abi::Event,
    e: &mut Event,
    snapshot: &SharedSnapshot,
    learned: &mut HashSet<(u32, Vec<u8>)>,
) -> bool {
    if let Ok(p) = std::fs::read_link(format!("/proc/{}/exe", k.tgid)) {
        e.path = Some(p.to_string_lossy().into_owned());
    }
    let Some(b) = crate::enforce::snapshot::binding(snapshot, k.cgroup_id) else {
        return true;
    };
    let path = e.path.clone().unwrap_or_default().into_bytes();
    match b.mode {
        abi::MODE_LEARN => {
            e.verdict = Verdict::Learned;
            learned.insert((b.ruleset, path))
        }
        abi::MODE_MONITOR if !b.compiled.check_exec(&path).allowed => {
            e.verdict = Verdict::Violation;
            true
        }
        _ => {
            if e.mode.is_none() {
                e.mode = ev::mode_from_abi(b.mode);
            }
            true
        }
    }
}
