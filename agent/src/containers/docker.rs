//! Docker Engine API over its unix socket: container metadata and the live event stream.
use std::{collections::BTreeMap, path::Path};

use bollard::{
    Docker,
    errors::Error as BollardError,
    models::{ContainerInspectResponse, EventMessage, EventMessageTypeEnum, ImageInspect},
    query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder},
};
use tokio_stream::{Stream, StreamExt};

use super::{
    meta::Runtime,
    runtime_api::{MetadataError, RuntimeContainer},
};

/// Seconds before an API request gives up; inspect calls are small.
const REQUEST_TIMEOUT_SECS: u64 = 10;

/// Client for one Docker daemon.
#[derive(Clone, Debug)]
pub struct DockerClient {
    docker: Docker,
    socket: String,
}

/// A container lifecycle event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerEvent {
    pub action: DockerAction,
    pub id: String,
    /// From the event's attributes (always present for container events).
    pub name: Option<String>,
    pub image: Option<String>,
    /// Container labels: Docker puts them in the attributes next to `name` and `image`
    /// (`inspect` has the unambiguous set).
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DockerAction {
    /// Container created: id and config known, cgroup not yet created.
    Create,
    Start,
    Die,
    Destroy,
}

impl DockerEvent {
    /// The metadata the event itself carries (no pid, no digest).
    pub fn to_runtime_container(&self) -> RuntimeContainer {
        RuntimeContainer {
            runtime: Runtime::Docker,
            id: self.id.clone(),
            name: self.name.clone(),
            image: self.image.clone(),
            labels: self.labels.clone(),
            ..Default::default()
        }
    }
}

impl DockerClient {
    /// Connects lazily; fails at once only when the socket file does not exist.
    pub fn connect(socket: &Path) -> Result<Self, MetadataError> {
        let socket_str = socket.display().to_string();
        let docker = Docker::connect_with_unix(
            &socket_str,
            REQUEST_TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| map_err(&socket_str, "", e))?;
        Ok(Self {
            docker,
            socket: socket_str,
        })
    }

    /// Metadata of one container (id or name).
    pub async fn inspect(&self, id: &str) -> Result<RuntimeContainer, MetadataError> {
        let c = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| map_err(&self.socket, id, e))?;
        // The image may be gone (`docker rmi -f`) while the container lives on: then the image
        // id is the best digest we have.
        let image = match c.image.as_deref() {
            Some(image_id) => self.docker.inspect_image(image_id).await.ok(),
            None => None,
        };
        Ok(container_from_inspect(&c, image.as_ref()))
    }

    /// (id, state) of all containers the daemon knows, running or not. States are Docker's:
    /// `created`, `running`, `paused`, `restarting`, `exited`, `dead`, `removing`.
    pub async fn list(&self) -> Result<Vec<(String, String)>, MetadataError> {
        let opts = ListContainersOptionsBuilder::new().all(true).build();
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| map_err(&self.socket, "", e))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let state = c.state.map(|s| s.to_string()).unwrap_or_default();
                Some((c.id?, state))
            })
            .collect())
    }

    /// Container lifecycle events since `since` (unix seconds; events are replayed from then,
    /// so a caller that resyncs after subscribing misses nothing). The stream ends (or yields
    /// an error) when the daemon goes away; the caller reconnects.
    pub fn events(
        &self,
        since: i64,
    ) -> impl Stream<Item = Result<DockerEvent, MetadataError>> + use<> {
        let filters = std::collections::HashMap::from([
            ("type", vec!["container"]),
            ("event", vec!["create", "start", "die", "destroy"]),
        ]);
        let opts = EventsOptionsBuilder::new()
            .since(&since.to_string())
            .filters(&filters)
            .build();
        let socket = self.socket.clone();
        self.docker.events(Some(opts)).filter_map(move |r| match r {
            Ok(msg) => parse_event(&msg).map(Ok),
            Err(e) => Some(Err(map_err(&socket, "", e))),
        })
    }
}

fn map_err(socket: &str, id: &str, e: BollardError) -> MetadataError {
    match e {
        BollardError::DockerResponseServerError {
            status_code: 404, ..
        } => MetadataError::NotFound(id.to_owned()),
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => MetadataError::Api(format!("{status_code}: {message}")),
        BollardError::JsonDataError { .. } | BollardError::JsonSerdeError { .. } => {
            MetadataError::Api(e.to_string())
        }
        // Everything else is transport: missing socket, refused, reset, timeout.
        other => MetadataError::Unreachable {
            socket: socket.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// Maps one event message; `None` for events we do not track.
pub fn parse_event(msg: &EventMessage) -> Option<DockerEvent> {
    if msg.typ != Some(EventMessageTypeEnum::CONTAINER) {
        return None;
    }
    let action = match msg.action.as_deref()? {
        "create" => DockerAction::Create,
        "start" => DockerAction::Start,
        "die" => DockerAction::Die,
        "destroy" => DockerAction::Destroy,
        _ => return None,
    };
    let actor = msg.actor.as_ref()?;
    let attr = |k: &str| actor.attributes.as_ref().and_then(|a| a.get(k)).cloned();
    let labels = actor
        .attributes
        .iter()
        .flatten()
        .filter(|(k, _)| !matches!(k.as_str(), "name" | "image" | "exitCode" | "signal"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Some(DockerEvent {
        action,
        id: actor.id.clone()?,
        name: attr("name"),
        image: attr("image"),
        labels,
    })
}

/// Builds runtime metadata from `GET /containers/{id}/json` and `GET /images/{id}/json`.
pub fn container_from_inspect(
    c: &ContainerInspectResponse,
    image: Option<&ImageInspect>,
) -> RuntimeContainer {
    let config = c.config.as_ref();
    let labels: BTreeMap<String, String> = config
        .and_then(|cfg| cfg.labels.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    let repo_digest = image
        .and_then(|i| i.repo_digests.as_ref())
        .and_then(|d| d.first())
        .and_then(|d| d.split_once('@'))
        .map(|(_, digest)| digest.to_owned());
    let pid = c
        .state
        .as_ref()
        .and_then(|s| s.pid)
        .filter(|p| *p > 0)
        .and_then(|p| u32::try_from(p).ok());
    RuntimeContainer {
        runtime: Runtime::Docker,
        id: c.id.clone().unwrap_or_default(),
        name: c
            .name
            .as_deref()
            .map(|n| n.trim_start_matches('/').to_owned()),
        image: config.and_then(|cfg| cfg.image.clone()),
        image_digest: repo_digest.or_else(|| c.image.clone()),
        labels,
        pod: None,
        pid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSPECT: &str = r#"{
      "Id": "3f9a1c0e5b7d2a4c6e8f0a1b3c5d7e9f1a2b3c4d5e6f708192a3b4c5d6e7f809",
      "Name": "/web-1",
      "Image": "sha256:1111111111111111111111111111111111111111111111111111111111111111",
      "State": {"Status": "running", "Running": true, "Pid": 4242},
      "Config": {"Image": "nginx:1.27", "Labels": {"app": "web", "tier": "front"}}
    }"#;

    #[test]
    fn maps_inspect_with_repo_digest() {
        let c: ContainerInspectResponse = serde_json::from_str(INSPECT).unwrap();
        let img: ImageInspect = serde_json::from_str(
            r#"{"Id":"sha256:1111111111111111111111111111111111111111111111111111111111111111",
                "RepoDigests":["nginx@sha256:2222222222222222222222222222222222222222222222222222222222222222"]}"#,
        )
        .unwrap();
        let m = container_from_inspect(&c, Some(&img));
        assert_eq!(m.name.as_deref(), Some("web-1"));
        assert_eq!(m.image.as_deref(), Some("nginx:1.27"));
        assert_eq!(
            m.image_digest.as_deref(),
            Some("sha256:2222222222222222222222222222222222222222222222222222222222222222")
        );
        assert_eq!(m.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(m.labels.len(), 2);
        assert_eq!(m.pid, Some(4242));
        assert_eq!(m.runtime, Runtime::Docker);
    }

    #[test]
    fn local_image_without_repo_digest_uses_image_id_and_stopped_has_no_pid() {
        let mut c: ContainerInspectResponse = serde_json::from_str(INSPECT).unwrap();
        c.state.as_mut().unwrap().pid = Some(0);
        let m = container_from_inspect(&c, None);
        assert_eq!(m.image_digest, c.image);
        assert_eq!(m.pid, None);
    }

    #[test]
    fn parses_container_events_only() {
        let ev: EventMessage = serde_json::from_str(
            r#"{"Type":"container","Action":"create","Actor":{"ID":"abc",
                "Attributes":{"name":"web-1","image":"nginx:1.27","app":"web"}},"time":1}"#,
        )
        .unwrap();
        assert_eq!(
            parse_event(&ev),
            Some(DockerEvent {
                action: DockerAction::Create,
                id: "abc".into(),
                name: Some("web-1".into()),
                image: Some("nginx:1.27".into()),
                labels: BTreeMap::from([("app".into(), "web".into())]),
            })
        );
        let exec: EventMessage = serde_json::from_str(
            r#"{"Type":"container","Action":"exec_start: sh","Actor":{"ID":"abc"}}"#,
        )
        .unwrap();
        assert_eq!(parse_event(&exec), None);
        let net: EventMessage =
            serde_json::from_str(r#"{"Type":"network","Action":"create","Actor":{"ID":"n"}}"#)
                .unwrap();
        assert_eq!(parse_event(&net), None);
    }

    #[tokio::test]
    async fn missing_socket_is_unreachable() {
        let err = DockerClient::connect(Path::new("/nonexistent/docker.sock")).unwrap_err();
        assert!(err.is_unreachable(), "{err}");
    }
}
