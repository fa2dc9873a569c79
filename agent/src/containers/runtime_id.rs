//! Recognising a container from its cgroup v2 path alone.
//!
//! Every runtime names the container's cgroup after the container id, so the path is enough to
//! know *which* container a cgroup belongs to, before any runtime API answers. The outermost
//! matching path component wins, so cgroups nested inside a container (systemd inside the
//! container, `init.scope`, runc's `cgroups=split` sub-cgroups, Docker-in-Docker) map to the
//! outer container.
use super::meta::Runtime;

/// What a cgroup path says about its container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedCgroup {
    pub runtime: Runtime,
    /// Full container id (64 lowercase hex).
    pub container_id: String,
    /// Kubernetes pod UID (with dashes) when the path lies under a kubepods pod cgroup.
    pub pod_uid: Option<String>,
    /// The container's own cgroup path (the prefix of the input up to the container component).
    pub container_cgroup: String,
    /// True when the input is a cgroup *below* the container's own cgroup.
    pub nested: bool,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `prefix<id>` or `prefix<id>.scope` → `id`, when `id` is a container id.
fn strip_id<'a>(component: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = component.strip_prefix(prefix)?;
    let id = rest.strip_suffix(".scope").unwrap_or(rest);
    is_container_id(id).then_some(id)
}

/// Recognises one path component; `parent` is the previous component ("" at the top).
fn container_component(
    parent: &str,
    component: &str,
    under_pod: bool,
) -> Option<(Runtime, String)> {
    // Order matters: `crio-conmon-<id>` and `libpod-conmon-<id>` are the runtime monitor, not
    // the container; they fail `strip_id` because "conmon-<id>" is not 64 hex.
    let prefixes = [
        ("docker-", Runtime::Docker),
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::Crio),
        ("libpod-payload-", Runtime::Podman),
        ("libpod-", Runtime::Podman),
        ("nerdctl-", Runtime::Containerd),
    ];
    for (prefix, runtime) in prefixes {
        if let Some(id) = strip_id(component, prefix) {
            return Some((runtime, id.to_owned()));
        }
    }
    if is_container_id(component) {
        // cgroupfs driver: `/docker/<id>`; under kubepods the CRI runtime is not visible in
        // the path (containerd and CRI-O both use the bare id), containerd is assumed and the
        // CRI client corrects it from the runtime's own name.
        let runtime = if parent == "docker" && !under_pod {
            Runtime::Docker
        } else {
            Runtime::Containerd
        };
        return Some((runtime, component.to_owned()));
    }
    None
}

/// Pod UID from `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_with_underscores>.slice`.
fn pod_uid(component: &str) -> Option<String> {
    let raw = if let Some(rest) = component.strip_suffix(".slice") {
        let idx = rest.rfind("-pod")?;
        if !rest.starts_with("kubepods") {
            return None;
        }
        &rest[idx + 4..]
    } else {
        component.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-");
    let valid = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    valid.then_some(uid.to_ascii_lowercase())
}

/// Parses a cgroup v2 path relative to the hierarchy root (as in `/proc/<pid>/cgroup`).
/// Returns `None` for cgroups that are not (inside) a container.
pub fn parse_cgroup_path(path: &str) -> Option<ParsedCgroup> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let mut pod = None;
    let mut parent = "";
    for (i, component) in components.iter().enumerate() {
        if pod.is_none() {
            pod = pod_uid(component);
        }
        if let Some((runtime, container_id)) = container_component(parent, component, pod.is_some())
        {
            return Some(ParsedCgroup {
                runtime,
                container_id,
                pod_uid: pod,
                container_cgroup: format!("/{}", components[..=i].join("/")),
                nested: i + 1 < components.len(),
            });
        }
        parent = component;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f9a1c0e5b7d2a4c6e8f0a1b3c5d7e9f1a2b3c4d5e6f708192a3b4c5d6e7f809";
    const UID: &str = "8e2b1d0c-4f3a-4b6e-9a1d-2c3b4d5e6f70";

    fn parse(p: &str) -> (Runtime, String, Option<String>, bool) {
        let r = parse_cgroup_path(p).unwrap_or_else(|| panic!("not recognised: {p}"));
        (r.runtime, r.container_id, r.pod_uid, r.nested)
    }

    #[test]
    fn docker_cgroupfs_and_systemd() {
        assert_eq!(
            parse(&format!("/docker/{ID}")),
            (Runtime::Docker, ID.into(), None, false)
        );
        assert_eq!(
            parse(&format!("/system.slice/docker-{ID}.scope")),
            (Runtime::Docker, ID.into(), None, false)
        );
        let p = parse_cgroup_path(&format!("/docker/{ID}")).unwrap();
        assert_eq!(p.container_cgroup, format!("/docker/{ID}"));
    }

    #[test]
    fn kubernetes_cgroupfs_qos_classes() {
        for qos in ["/kubepods/burstable", "/kubepods/besteffort", "/kubepods"] {
            let p = format!("{qos}/pod{UID}/{ID}");
            assert_eq!(
                parse(&p),
                (Runtime::Containerd, ID.into(), Some(UID.into()), false),
                "{p}"
            );
        }
        // CRI-O with the cgroupfs manager.
        assert_eq!(
            parse(&format!("/kubepods/burstable/pod{UID}/crio-{ID}")),
            (Runtime::Crio, ID.into(), Some(UID.into()), false)
        );
    }

    #[test]
    fn kubernetes_systemd_qos_classes() {
        let u = UID.replace('-', "_");
        let burstable = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope"
        );
        let besteffort = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{ID}.scope"
        );
        let guaranteed = format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope");
        for p in [burstable, besteffort, guaranteed] {
            assert_eq!(
                parse(&p),
                (Runtime::Containerd, ID.into(), Some(UID.into()), false),
                "{p}"
            );
        }
        let crio = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-{ID}.scope"
        );
        assert_eq!(
            parse(&crio),
            (Runtime::Crio, ID.into(), Some(UID.into()), false)
        );
    }

    #[test]
    fn runtime_monitors_and_pod_slices_are_not_containers() {
        let u = UID.replace('-', "_");
        for p in [
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-conmon-{ID}.scope"
            ),
            format!("/machine.slice/libpod-conmon-{ID}.scope"),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
            format!("/kubepods/burstable/pod{UID}"),
            "/".into(),
            "/system.slice/docker.service".into(),
            "/user.slice/user-1000.slice/session-3.scope".into(),
            "/docker".into(),
            // Wrong length / not hex.
            "/docker/3f9a1c0e5b7d".into(),
            format!("/system.slice/docker-{}.scope", ID.to_uppercase()),
        ] {
            assert_eq!(parse_cgroup_path(&p), None, "{p}");
        }
    }

    #[test]
    fn podman() {
        assert_eq!(
            parse(&format!("/machine.slice/libpod-{ID}.scope")),
            (Runtime::Podman, ID.into(), None, false)
        );
        assert_eq!(
            parse(&format!("/libpod_parent/libpod-payload-{ID}")),
            (Runtime::Podman, ID.into(), None, false)
        );
        // cgroups=split: the payload lives in a `container` sub-cgroup.
        assert_eq!(
            parse(&format!("/machine.slice/libpod-{ID}.scope/container")),
            (Runtime::Podman, ID.into(), None, true)
        );
    }

    #[test]
    fn nested_cgroups_belong_to_the_outer_container() {
        let inner = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for (p, top) in [
            (
                format!("/system.slice/docker-{ID}.scope/init.scope"),
                format!("/system.slice/docker-{ID}.scope"),
            ),
            (format!("/docker/{ID}/sub"), format!("/docker/{ID}")),
            (
                format!("/docker/{ID}/docker/{inner}"),
                format!("/docker/{ID}"),
            ),
        ] {
            let r = parse_cgroup_path(&p).unwrap();
            assert_eq!((r.container_id.as_str(), r.nested), (ID, true), "{p}");
            assert_eq!(r.container_cgroup, top);
        }
    }

    #[test]
    fn pod_uid_forms() {
        assert_eq!(pod_uid(&format!("pod{UID}")), Some(UID.into()));
        assert_eq!(
            pod_uid(&format!("kubepods-pod{}.slice", UID.replace('-', "_"))),
            Some(UID.into())
        );
        assert_eq!(pod_uid("podman.slice"), None);
        assert_eq!(pod_uid(&format!("user-pod{UID}.slice")), None);
    }
}
