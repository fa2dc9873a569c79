//! Connecting to the agent: over the unix socket (root, admin) or TCP with mutual TLS.
use std::path::{Path, PathBuf};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use super::pb::palisade_client::PalisadeClient;

pub type Client = PalisadeClient<Channel>;

/// Connect over the agent's unix socket.
pub async fn connect_unix(path: impl AsRef<Path>) -> anyhow::Result<Client> {
    let path: PathBuf = path.as_ref().to_path_buf();
    let shown = path.display().to_string();
    // The URI is required by the API but unused: the connector always dials the socket.
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .with_context(|| format!("cannot connect to the palisade agent at {shown}"))?;
    Ok(PalisadeClient::new(channel))
}

/// Client certificate material for TCP + mutual TLS (all PEM).
#[derive(Clone, Debug)]
pub struct TlsClientConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Name the server certificate must carry; defaults to the host in the address.
    pub domain: Option<String>,
}

/// Connect to `addr` (`host:port` or `https://host:port`) with a client certificate.
pub async fn connect_tls(addr: &str, tls: &TlsClientConfig) -> anyhow::Result<Client> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("https://{addr}")
    };
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
        .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
    if let Some(d) = &tls.domain {
        cfg = cfg.domain_name(d.clone());
    }
    let channel = Endpoint::try_from(url.clone())?
        .tls_config(cfg)?
        .connect()
        .await
        .with_context(|| format!("cannot connect to the palisade agent at {url}"))?;
    Ok(PalisadeClient::new(channel))
}
