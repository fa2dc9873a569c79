//! The gRPC server: `palisade.v1.Palisade` on a root-only unix socket and, optionally, on TCP
//! with mutual TLS.
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use super::audit::{AuditLog, Outcome};
use super::auth::{Caller, Role, RoleMap, caller_of};
use super::convert;
use super::pb::{self, palisade_server::PalisadeServer};
use super::{Control, DEFAULT_SOCKET, learn};
use crate::events::bus::{EventBus, Subscription};

/// Where and how to serve.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Unix socket (mode 0600); `None` disables it.
    pub unix_socket: Option<PathBuf>,
    /// TCP listener; only with mutual TLS.
    pub tls: Option<TlsConfig>,
    /// JSON-lines audit log of admin calls; `None` = audit events on the bus only.
    pub audit_log: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            unix_socket: Some(DEFAULT_SOCKET.into()),
            tls: None,
            audit_log: Some("/var/log/palisade/audit.jsonl".into()),
        }
    }
}

/// TCP + mutual TLS. Clients must present a certificate signed by `client_ca`.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    pub addr: SocketAddr,
    /// Server certificate chain and key (PEM).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle (PEM) that client certificates must chain to.
    pub client_ca: PathBuf,
    pub roles: RoleMap,
}

/// Serve until `shutdown` resolves. Open event streams are ended at shutdown.
pub async fn serve(
    cfg: ServerConfig,
    control: Arc<dyn Control>,
    bus: EventBus,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    bind(cfg, control, bus).await?.run(shutdown).await
}

/// Listeners bound, not yet serving (lets callers learn the TCP port when binding port 0).
pub struct BoundServer {
    unix: Option<(UnixListener, PathBuf)>,
    tcp: Option<(TcpListener, ServerTlsConfig)>,
    service: PalisadeService,
    stop_tx: watch::Sender<bool>,
}

pub async fn bind(
    cfg: ServerConfig,
    control: Arc<dyn Control>,
    bus: EventBus,
) -> anyhow::Result<BoundServer> {
    if cfg.unix_socket.is_none() && cfg.tls.is_none() {
        bail!("no API listener configured");
    }
    let audit = AuditLog::open(cfg.audit_log.as_deref(), bus.clone())
        .with_context(|| format!("opening audit log {:?}", cfg.audit_log))?;
    let unix = match &cfg.unix_socket {
        Some(path) => Some((bind_unix(path).await?, path.clone())),
        None => None,
    };
    let tcp = match &cfg.tls {
        Some(t) => {
            let read =
                |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            let tls = ServerTlsConfig::new()
                .identity(Identity::from_pem(read(&t.cert)?, read(&t.key)?))
                .client_ca_root(Certificate::from_pem(read(&t.client_ca)?))
                .client_auth_optional(false);
            let listener = TcpListener::bind(t.addr)
                .await
                .with_context(|| format!("binding {}", t.addr))?;
            Some((listener, tls))
        }
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let roles = cfg.tls.map(|t| t.roles).unwrap_or_default();
    let service = PalisadeService {
        control,
        bus,
        audit: Arc::new(audit),
        roles,
        stop: stop_rx,
    };
    Ok(BoundServer {
        unix,
        tcp,
        service,
        stop_tx,
    })
}

/// Bind the socket with mode 0600, replacing a stale one but never a live agent's.
async fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    // A directory we create is root-only too; an existing one is left as its owner set it.
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                bail!(
                    "{} is in use: is another palisade agent running?",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

impl BoundServer {
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let BoundServer {
            unix,
            tcp,
            service,
            stop_tx,
        } = self;
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        let unix_task = unix.map(|(listener, path)| {
            let svc = PalisadeServer::new(service.clone());
            let stop = stopped(service.stop.clone());
            async move {
                let res = Server::builder()
                    .add_service(svc)
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop)
                    .await;
                let _ = std::fs::remove_file(&path);
                res.context("unix socket API server")
            }
        });
        let tcp_task = match tcp {
            Some((listener, tls)) => {
                let svc = PalisadeServer::new(service.clone());
                let stop = stopped(service.stop.clone());
                let mut builder = Server::builder()
                    .tls_config(tls)
                    .context("TLS configuration")?;
                Some(async move {
                    builder
                        .add_service(svc)
                        .serve_with_incoming_shutdown(TcpIncoming::from(listener), stop)
                        .await
                        .context("mTLS API server")
                })
            }
            None => None,
        };
        let unix_fut = async {
            match unix_task {
                Some(t) => t.await,
                None => Ok(()),
            }
        };
        let tcp_fut = async {
            match tcp_task {
                Some(t) => t.await,
                None => Ok(()),
            }
        };
        tokio::try_join!(unix_fut, tcp_fut)?;
        Ok(())
    }
}

#[derive(Clone)]
struct PalisadeService {
    control: Arc<dyn Control>,
    bus: EventBus,
    audit: Arc<AuditLog>,
    roles: RoleMap,
    stop: watch::Receiver<bool>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

impl PalisadeService {
    fn viewer<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let caller = caller_of(req, &self.roles);
        if caller.may(Role::Viewer) {
            Ok(caller)
        } else {
            Err(Status::permission_denied(format!(
                "{} has no role",
                caller.who
            )))
        }
    }

    /// Admin calls are audited whether allowed or not.
    fn admin<T>(&self, req: &Request<T>, call: &str, target: &str) -> Result<Caller, Status> {
        let caller = caller_of(req, &self.roles);
        if caller.may(Role::Admin) {
            Ok(caller)
        } else {
            self.audit.record(&caller, call, target, &Outcome::Denied);
            Err(Status::permission_denied(format!(
                "{call} requires the admin role; {} is not admin",
                caller.who
            )))
        }
    }

    async fn policy_exists(&self, name: &str) -> bool {
        self.control
            .list_policies()
            .await
            .iter()
            .any(|p| p.name == name)
    }

    fn follow(&self, mut sub: Subscription) -> EventStream {
        let (tx, rx) = mpsc::channel(64);
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let rec = tokio::select! {
                    r = sub.recv() => r,
                    _ = stop.wait_for(|v| *v) => None,
                };
                let Some(rec) = rec else { break };
                tokio::select! {
                    sent = tx.send(Ok(convert::record_to_pb(&rec))) => if sent.is_err() { break },
                    _ = stop.wait_for(|v| *v) => break,
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// A refused change: `NotFound` when the policy did not exist (the CLI exits 4), else
/// `FailedPrecondition`.
fn refused(missing: bool, e: String) -> Status {
    if missing {
        Status::not_found(e)
    } else {
        Status::failed_precondition(e)
    }
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

#[tonic::async_trait]
impl pb::palisade_server::Palisade for PalisadeService {
    type StreamEventsStream = EventStream;

    async fn stream_events(
        &self,
        req: Request<pb::EventFilter>,
    ) -> Result<Response<EventStream>, Status> {
        self.viewer(&req)?;
        let f = req.into_inner();
        let filter = convert::filter_from_pb(&f).map_err(invalid)?;
        if f.follow {
            let sub = self.bus.subscribe(filter, f.resume_from_seq);
            return Ok(Response::new(self.follow(sub)));
        }
        // Not following: what the replay ring holds, then end.
        let mut sub = self
            .bus
            .subscribe(filter, Some(f.resume_from_seq.unwrap_or(0)));
        let items: Vec<_> = sub
            .take_replay()
            .iter()
            .map(|r| Ok(convert::record_to_pb(r)))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    async fn list_policies(
        &self,
        req: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        self.viewer(&req)?;
        let policies = self
            .control
            .list_policies()
            .await
            .into_iter()
            .map(convert::policy_to_pb)
            .collect();
        Ok(Response::new(pb::ListPoliciesResponse { policies }))
    }

    async fn get_policy(
        &self,
        req: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::PolicyInfo>, Status> {
        self.viewer(&req)?;
        let name = req.into_inner().name;
        let found = self
            .control
            .list_policies()
            .await
            .into_iter()
            .find(|p| p.name == name);
        found
            .map(|p| Response::new(convert::policy_to_pb(p)))
            .ok_or_else(|| Status::not_found(format!("no policy named {name:?}")))
    }

    async fn list_containers(
        &self,
        req: Request<pb::ListContainersRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        self.viewer(&req)?;
        let containers = self
            .control
            .list_containers()
            .await
            .into_iter()
            .map(convert::container_info_to_pb)
            .collect();
        Ok(Response::new(pb::ListContainersResponse { containers }))
    }

    async fn get_container(
        &self,
        req: Request<pb::GetContainerRequest>,
    ) -> Result<Response<pb::ContainerInfo>, Status> {
        self.viewer(&req)?;
        let want = req.into_inner().id;
        let all = self.control.list_containers().await;
        let name_of = |c: &super::ContainerInfo| c.meta.name.clone().unwrap_or_default();
        let mut hits: Vec<_> = all
            .iter()
            .filter(|c| {
                c.meta.id == want
                    || name_of(c).trim_start_matches('/') == want.trim_start_matches('/')
            })
            .collect();
        if hits.is_empty() && want.len() >= 4 {
            hits = all
                .iter()
                .filter(|c| c.meta.id.starts_with(&want))
                .collect();
        }
        match hits.as_slice() {
            [one] => Ok(Response::new(convert::container_info_to_pb((*one).clone()))),
            [] => Err(Status::not_found(format!("no container {want:?}"))),
            _ => Err(Status::invalid_argument(format!(
                "{want:?} matches {} containers",
                hits.len()
            ))),
        }
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.viewer(&req)?;
        let mut status = self.control.status().await;
        let stats = self.bus.stats();
        let c = &mut status.counters;
        c.entry("events_published".into())
            .or_insert(stats.published);
        c.entry("last_seq".into()).or_insert(stats.last_seq);
        c.entry("subscribers".into())
            .or_insert(stats.subscribers.len() as u64);
        for (reason, n) in &stats.drops {
            c.entry(format!("dropped_{}", reason.as_str()))
                .or_insert(*n);
        }
        Ok(Response::new(convert::status_to_pb(status)))
    }

    async fn learn_status(
        &self,
        req: Request<pb::LearnStatusRequest>,
    ) -> Result<Response<pb::LearnStatusResponse>, Status> {
        self.viewer(&req)?;
        let profiles = self.control.learn_status().await;
        Ok(Response::new(pb::LearnStatusResponse {
            profiles: profiles.into_iter().map(learn::profile_to_pb).collect(),
        }))
    }

    /// Read-only (it returns text and changes nothing): viewer, not audited.
    async fn learn_export(
        &self,
        req: Request<pb::LearnExportRequest>,
    ) -> Result<Response<pb::LearnExportResponse>, Status> {
        self.viewer(&req)?;
        let r = req.into_inner();
        let mode = learn::export_mode_from_pb(r.mode).map_err(invalid)?;
        let yaml = self
            .control
            .learn_export(r.policy, r.image, mode)
            .await
            .map_err(learn::status_of)?;
        Ok(Response::new(pb::LearnExportResponse { yaml }))
    }

    async fn learn_check(
        &self,
        req: Request<pb::LearnCheckRequest>,
    ) -> Result<Response<pb::LearnCheckResponse>, Status> {
        self.viewer(&req)?;
        let r = req.into_inner();
        let source = if r.source_name.is_empty() {
            "candidate.yaml".to_string()
        } else {
            r.source_name
        };
        let report = self
            .control
            .learn_check(r.yaml, source)
            .await
            .map_err(learn::status_of)?;
        Ok(Response::new(learn::report_to_pb(report)))
    }

    async fn apply_policy(
        &self,
        req: Request<pb::ApplyPolicyRequest>,
    ) -> Result<Response<pb::ApplyPolicyResponse>, Status> {
        let source = req.get_ref().source_name.clone();
        let caller = self.admin(&req, "ApplyPolicy", &source)?;
        let r = req.into_inner();
        match self.control.apply_policies(r.yaml, r.source_name).await {
            Ok(applied) => {
                self.audit.record(
                    &caller,
                    "ApplyPolicy",
                    &format!("{source}: {}", applied.join(",")),
                    &Outcome::Ok,
                );
                Ok(Response::new(pb::ApplyPolicyResponse {
                    applied,
                    errors: vec![],
                }))
            }
            Err(errors) => {
                let first = errors.first().map(|e| e.to_string()).unwrap_or_default();
                let outcome = Outcome::Failed(format!("{} error(s); first: {first}", errors.len()));
                self.audit.record(&caller, "ApplyPolicy", &source, &outcome);
                let errors = errors
                    .into_iter()
                    .map(convert::policy_error_to_pb)
                    .collect();
                Ok(Response::new(pb::ApplyPolicyResponse {
                    applied: vec![],
                    errors,
                }))
            }
        }
    }

    async fn delete_policy(
        &self,
        req: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        let name = req.get_ref().name.clone();
        let caller = self.admin(&req, "DeletePolicy", &name)?;
        let missing = !self.policy_exists(&name).await;
        match self.control.delete_policy(name.clone()).await {
            Ok(()) => {
                self.audit
                    .record(&caller, "DeletePolicy", &name, &Outcome::Ok);
                Ok(Response::new(pb::DeletePolicyResponse {}))
            }
            Err(e) => {
                self.audit
                    .record(&caller, "DeletePolicy", &name, &Outcome::Failed(e.clone()));
                Err(refused(missing, e))
            }
        }
    }

    async fn set_policy_mode(
        &self,
        req: Request<pb::SetPolicyModeRequest>,
    ) -> Result<Response<pb::SetPolicyModeResponse>, Status> {
        let name = req.get_ref().name.clone();
        let caller = self.admin(&req, "SetPolicyMode", &name)?;
        let mode = convert::mode_from_pb(req.get_ref().mode)
            .ok()
            .flatten()
            .ok_or_else(|| Status::invalid_argument("mode must be learn, monitor or enforce"))?;
        let call = format!("SetPolicyMode({})", convert::mode_word(mode));
        let missing = !self.policy_exists(&name).await;
        match self.control.set_mode(name.clone(), mode).await {
            Ok(()) => {
                self.audit.record(&caller, &call, &name, &Outcome::Ok);
                Ok(Response::new(pb::SetPolicyModeResponse {}))
            }
            Err(e) => {
                self.audit
                    .record(&caller, &call, &name, &Outcome::Failed(e.clone()));
                Err(refused(missing, e))
            }
        }
    }
}
