//! Kubernetes CRI runtime service (containerd, CRI-O) over its unix socket: container and pod
//! metadata. CRI v1 only (containerd ≥ 1.6, CRI-O ≥ 1.23).
use std::{collections::BTreeMap, collections::HashMap, path::Path, time::Duration};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    ContainerFilter, ContainerStatus, ContainerStatusRequest, ListContainersRequest,
    PodSandboxStatus, PodSandboxStatusRequest, VersionRequest,
    runtime_service_client::RuntimeServiceClient,
};
use tokio::net::UnixStream;
use tonic::{
    Code, Status,
    transport::{Channel, Endpoint, Uri},
};

use super::{
    meta::{PodMeta, Runtime},
    runtime_api::{MetadataError, RuntimeContainer},
};

const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";

/// Client for one CRI runtime service.
#[derive(Clone, Debug)]
pub struct CriClient {
    client: RuntimeServiceClient<Channel>,
    socket: String,
    runtime: Runtime,
    runtime_name: String,
}

impl CriClient {
    /// Connects and asks the runtime its name (so cgroupfs-layout containers, whose path does
    /// not say which CRI runtime made them, get the right [`Runtime`]).
    pub async fn connect(socket: &Path) -> Result<Self, MetadataError> {
        let socket_str = socket.display().to_string();
        let unreachable = |reason: String| MetadataError::Unreachable {
            socket: socket_str.clone(),
            reason,
        };
        let path = socket.to_path_buf();
        // The URI is ignored by the connector; tonic only needs a syntactically valid one.
        let channel =
            Endpoint::from_static("http://[::]:50051")
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(10))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .map_err(|e| unreachable(format!("{e:?}")))?;
        let mut client = RuntimeServiceClient::new(channel);
        let version = client
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(|s| map_status(&socket_str, "", s))?
            .into_inner();
        Ok(Self {
            client,
            runtime: runtime_from_name(&version.runtime_name),
            runtime_name: version.runtime_name,
            socket: socket_str,
        })
    }

    /// The runtime's own name (`containerd`, `cri-o`).
    pub fn runtime_name(&self) -> &str {
        &self.runtime_name
    }

    pub fn runtime(&self) -> Runtime {
        self.runtime
    }

    /// Metadata of one container: ContainerStatus (labels, image, pid) and the status of its
    /// pod sandbox (pod labels).
    pub async fn inspect(&self, id: &str) -> Result<RuntimeContainer, MetadataError> {
        let mut client = self.client.clone();
        let resp = client
            .container_status(ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: true,
            })
            .await
            .map_err(|s| map_status(&self.socket, id, s))?
            .into_inner();
        let status = resp
            .status
            .ok_or_else(|| MetadataError::NotFound(id.to_owned()))?;
        // ContainerStatus does not carry the sandbox id; the container list does.
        let listed = client
            .list_containers(ListContainersRequest {
                filter: Some(ContainerFilter {
                    id: id.to_owned(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(|s| map_status(&self.socket, id, s))?
            .into_inner();
        let sandbox_id = listed
            .containers
            .into_iter()
            .find(|c| c.id == status.id)
            .map(|c| c.pod_sandbox_id);
        let sandbox = match sandbox_id {
            Some(sid) if !sid.is_empty() => client
                .pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: sid,
                    verbose: false,
                })
                .await
                .ok()
                .and_then(|r| r.into_inner().status),
            _ => None,
        };
        Ok(container_from_cri(
            self.runtime,
            &status,
            &resp.info,
            sandbox.as_ref(),
        ))
    }
}

fn runtime_from_name(name: &str) -> Runtime {
    match name {
        "cri-o" | "crio" => Runtime::Crio,
        _ => Runtime::Containerd,
    }
}

fn map_status(socket: &str, id: &str, s: Status) -> MetadataError {
    match s.code() {
        Code::NotFound => MetadataError::NotFound(id.to_owned()),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
            MetadataError::Unreachable {
                socket: socket.to_owned(),
                reason: s.message().to_owned(),
            }
        }
        _ => MetadataError::Api(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// `sha256:…` from an image ref such as `docker.io/library/nginx@sha256:…` or a bare image id.
fn digest_of(image_ref: &str) -> Option<String> {
    match image_ref.split_once('@') {
        Some((_, digest)) => Some(digest.to_owned()),
        None if image_ref.starts_with("sha256:") => Some(image_ref.to_owned()),
        None => None,
    }
}

/// Main pid from the verbose `info` map (`{"info": "{\"pid\": 1234, ...}"}` on containerd and
/// CRI-O).
fn pid_of(info: &HashMap<String, String>) -> Option<u32> {
    let v: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    v.get("pid")?
        .as_u64()
        .filter(|p| *p > 0)
        .and_then(|p| u32::try_from(p).ok())
}

/// Builds runtime metadata from CRI ContainerStatus (+ info) and PodSandboxStatus.
pub fn container_from_cri(
    runtime: Runtime,
    status: &ContainerStatus,
    info: &HashMap<String, String>,
    sandbox: Option<&PodSandboxStatus>,
) -> RuntimeContainer {
    let labels: BTreeMap<String, String> = status
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let label = |k: &str| labels.get(k).cloned();
    let sandbox_meta = sandbox.and_then(|s| s.metadata.as_ref());
    let pod = match (
        label(LABEL_POD_NAME),
        label(LABEL_POD_NAMESPACE),
        label(LABEL_POD_UID),
    ) {
        (Some(name), Some(namespace), Some(uid)) => Some(PodMeta {
            name,
            namespace,
            uid,
            labels: sandbox
                .map(|s| {
                    s.labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
        }),
        // Labels missing (not a kubelet-made container): fall back to the sandbox metadata.
        _ => sandbox_meta.map(|m| PodMeta {
            name: m.name.clone(),
            namespace: m.namespace.clone(),
            uid: m.uid.clone(),
            labels: sandbox
                .map(|s| {
                    s.labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
        }),
    };
    let image = status.image.as_ref().and_then(|i| {
        let user = i.user_specified_image.as_str();
        let name = if user.is_empty() {
            i.image.as_str()
        } else {
            user
        };
        (!name.is_empty()).then(|| name.to_owned())
    });
    RuntimeContainer {
        runtime,
        id: status.id.clone(),
        name: status
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .filter(|n| !n.is_empty()),
        image,
        image_digest: digest_of(&status.image_ref),
        labels,
        pod,
        pid: pid_of(info),
    }
}

#[cfg(test)]
mod tests {
    use k8s_cri::v1::{ContainerMetadata, ImageSpec, PodSandboxMetadata};

    use super::*;

    fn status() -> ContainerStatus {
        ContainerStatus {
            id: "c0ffee".into(),
            metadata: Some(ContainerMetadata {
                name: "web".into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: "docker.io/library/nginx:1.27".into(),
                ..Default::default()
            }),
            image_ref: "docker.io/library/nginx@sha256:abcd".into(),
            labels: HashMap::from([
                (LABEL_POD_NAME.into(), "web-7d9f".into()),
                (LABEL_POD_NAMESPACE.into(), "shop".into()),
                (
                    LABEL_POD_UID.into(),
                    "8e2b1d0c-4f3a-4b6e-9a1d-2c3b4d5e6f70".into(),
                ),
                ("io.kubernetes.container.name".into(), "web".into()),
            ]),
            ..Default::default()
        }
    }

    #[test]
    fn maps_container_and_pod() {
        let sandbox = PodSandboxStatus {
            labels: HashMap::from([("app".into(), "web".into())]),
            ..Default::default()
        };
        let info = HashMap::from([(
            "info".to_owned(),
            r#"{"sandboxID":"s1","pid":31337,"runtimeSpec":{}}"#.to_owned(),
        )]);
        let m = container_from_cri(Runtime::Containerd, &status(), &info, Some(&sandbox));
        assert_eq!(m.name.as_deref(), Some("web"));
        assert_eq!(m.image.as_deref(), Some("docker.io/library/nginx:1.27"));
        assert_eq!(m.image_digest.as_deref(), Some("sha256:abcd"));
        assert_eq!(m.pid, Some(31337));
        let pod = m.pod.unwrap();
        assert_eq!(
            (pod.name.as_str(), pod.namespace.as_str()),
            ("web-7d9f", "shop")
        );
        assert_eq!(pod.uid, "8e2b1d0c-4f3a-4b6e-9a1d-2c3b4d5e6f70");
        assert_eq!(pod.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(m.labels.len(), 4);
    }

    #[test]
    fn falls_back_to_sandbox_metadata_and_tolerates_missing_info() {
        let mut s = status();
        s.labels.clear();
        s.image_ref = "sha256:beef".into();
        s.image.as_mut().unwrap().user_specified_image = "nginx:1.27".into();
        let sandbox = PodSandboxStatus {
            metadata: Some(PodSandboxMetadata {
                name: "p".into(),
                uid: "u".into(),
                namespace: "n".into(),
                attempt: 0,
            }),
            ..Default::default()
        };
        let m = container_from_cri(Runtime::Crio, &s, &HashMap::new(), Some(&sandbox));
        assert_eq!(m.pod.unwrap().namespace, "n");
        assert_eq!(m.image.as_deref(), Some("nginx:1.27"));
        assert_eq!(m.image_digest.as_deref(), Some("sha256:beef"));
        assert_eq!(m.pid, None);
        assert_eq!(m.runtime, Runtime::Crio);
    }

    #[test]
    fn runtime_names_and_status_codes() {
        assert_eq!(runtime_from_name("cri-o"), Runtime::Crio);
        assert_eq!(runtime_from_name("containerd"), Runtime::Containerd);
        assert!(map_status("s", "x", Status::unavailable("down")).is_unreachable());
        assert!(matches!(
            map_status("s", "x", Status::not_found("gone")),
            MetadataError::NotFound(_)
        ));
    }

    #[tokio::test]
    async fn missing_socket_is_unreachable() {
        let err = CriClient::connect(Path::new("/nonexistent/cri.sock"))
            .await
            .unwrap_err();
        assert!(err.is_unreachable(), "{err}");
    }
}
