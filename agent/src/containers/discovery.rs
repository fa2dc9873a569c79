//! Discovery: keeps the [`Inventory`] in step with the node. Three event sources:
//! - the cgroup2 tree (initial walk + inotify): every runtime, the authority on existence;
//! - the Docker `/events` stream: ids, names and labels *before* the cgroup exists (`create`),
//!   pid at `start`, forgetting at `destroy`;
//! - CRI (containerd / CRI-O): metadata for cgroups the tree reports.
//!
//! A runtime socket that cannot be reached leaves `metadata_known = false`, is warned about
//! once per outage, and is retried with exponential backoff.
use std::{
    collections::HashMap,
    path::PathBuf,
    pin::pin,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    sync::mpsc,
    task::{JoinHandle, JoinSet},
    time::sleep,
};
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use super::{
    cri::CriClient,
    docker::{DockerAction, DockerClient},
    inventory::Inventory,
    meta::Runtime,
    runtime_api::{MetadataError, RuntimeContainer},
    watcher::{CgroupWatcher, Resolvers},
};

/// Safety-net rescan period; inotify normally reports changes at once.
const RESCAN_PERIOD: Duration = Duration::from_secs(30);
/// Rescan period when inotify is unavailable.
const POLL_PERIOD: Duration = Duration::from_secs(2);
/// CRI lookups that say NotFound are retried this many times (the runtime may record the
/// container slightly after its cgroup appears).
const CRI_NOT_FOUND_RETRIES: u32 = 5;

/// Starts container discovery. Must be called inside a tokio runtime.
pub struct Discovery;

impl Discovery {
    /// Walks the cgroup tree under `cgroup_root` (the cgroup2 mount) before returning, so
    /// existing containers are in the inventory at once (their metadata follows). The handle
    /// runs until aborted; aborting it stops every discovery task.
    pub fn start(
        cgroup_root: PathBuf,
        docker_socket: Option<PathBuf>,
        cri_socket: Option<PathBuf>,
    ) -> (Inventory, JoinHandle<()>) {
        let inventory = Inventory::new();
        let mut resolvers = Resolvers::default();
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(socket) = docker_socket {
            let (tx, rx) = mpsc::unbounded_channel();
            resolvers.docker = Some(tx);
            tasks.spawn(docker_loop(socket, inventory.clone(), rx));
        }
        if let Some(socket) = cri_socket {
            let (tx, rx) = mpsc::unbounded_channel();
            resolvers.cri = Some(tx.clone());
            tasks.spawn(cri_loop(socket, inventory.clone(), tx, rx));
        }
        let (mut watcher, inotify) =
            CgroupWatcher::new(cgroup_root.clone(), inventory.clone(), resolvers);
        watcher.scan(&cgroup_root);
        tasks.spawn(watch_loop(watcher, inotify));
        let handle = tokio::spawn(async move {
            // The JoinSet aborts its tasks when dropped, i.e. when this task is aborted.
            while let Some(r) = tasks.join_next().await {
                if let Err(e) = r {
                    warn!(error = %e, "container discovery task ended");
                }
            }
        });
        (inventory, handle)
    }
}

async fn watch_loop(mut watcher: CgroupWatcher, inotify: Option<inotify::Inotify>) {
    let stream = inotify.and_then(|i| match i.into_event_stream(vec![0u8; 64 * 1024]) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "inotify stream unavailable; polling the cgroup tree");
            None
        }
    });
    let Some(mut stream) = stream else {
        loop {
            sleep(POLL_PERIOD).await;
            watcher.rescan();
        }
    };
    let mut rescan = tokio::time::interval(RESCAN_PERIOD);
    rescan.tick().await;
    loop {
        tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(ev)) => watcher.on_event(&ev.wd, ev.mask, ev.name.as_deref()),
                Some(Err(e)) => {
                    warn!(error = %e, "inotify read failed; rescanning");
                    watcher.rescan();
                }
                None => return,
            },
            _ = rescan.tick() => watcher.rescan(),
        }
    }
}

/// Exponential backoff between reconnection attempts, with a once-per-outage warning.
struct Backoff {
    runtime: &'static str,
    delay: Duration,
    warned: bool,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    fn new(runtime: &'static str) -> Self {
        Self {
            runtime,
            delay: Self::MIN,
            warned: false,
        }
    }

    async fn failed(&mut self, e: &MetadataError) {
        if self.warned {
            debug!(runtime = self.runtime, error = %e, "runtime still unreachable");
        } else {
            warn!(runtime = self.runtime, error = %e, "runtime unreachable; container metadata unknown until it answers");
            self.warned = true;
        }
        sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Self::MAX);
    }

    fn connected(&mut self) {
        if self.warned {
            info!(runtime = self.runtime, "runtime reachable again");
        }
        self.delay = Self::MIN;
        self.warned = false;
    }
}

async fn docker_loop(
    socket: PathBuf,
    inventory: Inventory,
    mut requests: mpsc::UnboundedReceiver<String>,
) {
    let mut backoff = Backoff::new("docker");
    loop {
        let result = match DockerClient::connect(&socket) {
            Ok(client) => docker_session(&client, &inventory, &mut requests, &mut backoff).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            backoff.failed(&e).await;
        }
    }
}

/// In-flight `inspect` calls of one Docker session, each on its own task: dockerd can hang an
/// inspect indefinitely (seen for a container whose processes are stopped), and a hung call
/// must not hold up the event stream — its `create` events arm bindings before a container's
/// first exec. Per container only the answer to the newest request is applied, and a
/// `destroy` discards answers still to come.
#[derive(Default)]
struct Inspections {
    tasks: JoinSet<(String, u64, bool, Result<RuntimeContainer, MetadataError>)>,
    latest: HashMap<String, u64>,
    next: u64,
}

impl Inspections {
    /// Inspect `id`; `announce`: broadcast `Pending` if its cgroup does not exist yet.
    fn start(&mut self, client: &DockerClient, id: String, announce: bool) {
        self.next += 1;
        let seq = self.next;
        self.latest.insert(id.clone(), seq);
        let client = client.clone();
        self.tasks.spawn(async move {
            let r = client.inspect(&id).await;
            (id, seq, announce, r)
        });
    }

    fn forget(&mut self, id: &str) {
        self.latest.remove(id);
    }

    /// Whether an answer is the newest for its container (and still wanted).
    fn current(&mut self, id: &str, seq: u64) -> bool {
        let newest = self.latest.get(id) == Some(&seq);
        if newest {
            self.latest.remove(id);
        }
        newest
    }
}

/// One connection to dockerd: resync, then follow events and answer metadata requests until
/// the daemon goes away (the event stream or the container list fails; a failed inspect only
/// leaves that container's metadata unknown).
async fn docker_session(
    client: &DockerClient,
    inventory: &Inventory,
    requests: &mut mpsc::UnboundedReceiver<String>,
    backoff: &mut Backoff,
) -> Result<(), MetadataError> {
    // Replay from a second ago: nothing between the resync below and the stream's start is lost
    // (duplicates are harmless, every update is idempotent).
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64 - 1);
    let mut events = pin!(client.events(since));
    let containers = client.list().await?;
    backoff.connected();
    inventory.mark_runtime_synced();
    let mut inspections = Inspections::default();
    for (id, state) in containers {
        if !matches!(
            state.as_str(),
            "created" | "running" | "paused" | "restarting"
        ) {
            continue;
        }
        inspections.start(client, id, state == "created");
    }
    loop {
        tokio::select! {
            ev = events.next() => {
                let ev = match ev {
                    Some(Ok(ev)) => ev,
                    Some(Err(e)) => return Err(e),
                    None => return Err(MetadataError::Unreachable {
                        socket: "docker".into(),
                        reason: "event stream ended".into(),
                    }),
                };
                debug!(id = %ev.id, action = ?ev.action, "docker event");
                match ev.action {
                    DockerAction::Destroy => {
                        inspections.forget(&ev.id);
                        inventory.forget(&ev.id);
                    }
                    DockerAction::Die => {}
                    DockerAction::Create | DockerAction::Start => {
                        if ev.action == DockerAction::Create {
                            // Announce at once: runc may make the cgroup before an inspect
                            // round trip completes.
                            inventory.set_runtime_meta(ev.to_runtime_container(), true);
                        }
                        inspections.start(client, ev.id, false);
                    }
                }
            }
            Some(id) = requests.recv() => inspections.start(client, id, false),
            Some(done) = inspections.tasks.join_next(), if !inspections.tasks.is_empty() => {
                let Ok((id, seq, announce, result)) = done else { continue };
                if !inspections.current(&id, seq) {
                    continue;
                }
                match result {
                    Ok(rc) => inventory.set_runtime_meta(rc, announce),
                    // Removed again before we asked, or dockerd did not answer in time.
                    Err(e) => debug!(%id, error = %e, "docker inspect failed"),
                }
            }
        }
    }
}

async fn cri_loop(
    socket: PathBuf,
    inventory: Inventory,
    requeue: mpsc::UnboundedSender<String>,
    mut requests: mpsc::UnboundedReceiver<String>,
) {
    let mut backoff = Backoff::new("cri");
    loop {
        let result = match CriClient::connect(&socket).await {
            Ok(client) => {
                backoff.connected();
                info!(runtime = client.runtime_name(), "connected to CRI runtime");
                cri_session(&client, &inventory, &requeue, &mut requests).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            backoff.failed(&e).await;
        }
    }
}

async fn cri_session(
    client: &CriClient,
    inventory: &Inventory,
    requeue: &mpsc::UnboundedSender<String>,
    requests: &mut mpsc::UnboundedReceiver<String>,
) -> Result<(), MetadataError> {
    // Containers found while the runtime was unreachable (their requests may have been spent
    // on a failed connection).
    for c in inventory.list() {
        if !c.metadata_known && matches!(c.runtime, Runtime::Containerd | Runtime::Crio) {
            let _ = requeue.send(c.id);
        }
    }
    let mut not_found: std::collections::HashMap<String, u32> = Default::default();
    while let Some(id) = requests.recv().await {
        if inventory.by_container_id(&id).is_none() {
            not_found.remove(&id);
            continue;
        }
        match client.inspect(&id).await {
            Ok(rc) => {
                not_found.remove(&id);
                inventory.set_runtime_meta(rc, false);
            }
            Err(e) if e.is_unreachable() => return Err(e),
            Err(e) => {
                let n = not_found.entry(id.clone()).or_default();
                *n += 1;
                if *n <= CRI_NOT_FOUND_RETRIES {
                    let tx = requeue.clone();
                    let delay = Duration::from_millis(200) * *n;
                    tokio::spawn(async move {
                        sleep(delay).await;
                        let _ = tx.send(id);
                    });
                } else {
                    debug!(%id, error = %e, "CRI has no metadata for this container");
                    not_found.remove(&id);
                }
            }
        }
    }
    Ok(())
}
