//! Container identity on the real host: a real dockerd and real cgroup2 directories.
//! Needs root. Run: `AYA_BUILD_SKIP=1 cargo test -p palisade-tests --test host_identity`.
use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use palisade::containers::{
    Discovery, InventoryEvent,
    cgroup2::{self, find_cgroup2_mount},
    meta::{ContainerMeta, Runtime},
};
use palisade_tests::docker::{self, Container};
use tokio::{sync::broadcast::Receiver, time::timeout};

const WAIT: Duration = Duration::from_secs(20);

/// Receives events until one matches, or fails after [`WAIT`].
async fn wait_for(
    rx: &mut Receiver<InventoryEvent>,
    what: &str,
    mut pred: impl FnMut(&InventoryEvent) -> bool,
) -> InventoryEvent {
    let found = timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Ok(ev) if pred(&ev) => return ev,
                Ok(_) => {}
                Err(e) => panic!("inventory channel: {e}"),
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn meta_of(ev: &InventoryEvent) -> Option<&ContainerMeta> {
    match ev {
        InventoryEvent::Created(m) | InventoryEvent::Updated(m) | InventoryEvent::Removed(m) => {
            Some(m)
        }
        InventoryEvent::Pending { .. } => None,
    }
}

/// The cgroup the kernel reports for the container's main process, and its inode.
fn kernel_cgroup(c: &Container, root: &Path) -> (String, u64) {
    let path = c.cgroup_path().expect("cgroup of container pid");
    let ino = fs::metadata(cgroup2::absolute_path(root, &path))
        .expect("container cgroup dir")
        .ino();
    (path, ino)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_containers_are_identified_with_cgroup_and_metadata() {
    docker::ensure_docker().expect("docker");
    let root = find_cgroup2_mount().unwrap();
    let mut early = Container::run(
        &docker::unique_name("pal-id-early"),
        &[("stage", "early")],
        &["sleep", "60"],
    )
    .unwrap();

    let (inv, handle) = Discovery::start(root.clone(), Some(docker::socket()), None);

    // Found by the start-up walk, before any runtime answered.
    let (early_path, early_ino) = kernel_cgroup(&early, &root);
    let found = inv
        .by_cgroup_id(early_ino)
        .expect("pre-existing container found at start");
    assert_eq!(found.id, early.id);
    assert_eq!(found.runtime, Runtime::Docker);
    assert_eq!(found.cgroup_path, early_path);

    let (_, mut rx) = inv.subscribe_with_snapshot();
    // Its metadata follows from the Docker API (or was already there).
    if !inv.by_container_id(&early.id).unwrap().metadata_known {
        wait_for(&mut rx, "metadata of the early container", |ev| {
            meta_of(ev).is_some_and(|m| m.id == early.id && m.metadata_known)
        })
        .await;
    }
    let m = inv.by_container_id(&early.id).unwrap();
    assert_eq!(m.name.as_deref(), Some(early.name.as_str()));
    assert_eq!(m.labels.get("stage").map(String::as_str), Some("early"));

    // A new container: Pending (from the create event, before its cgroup), then Created.
    // `docker create`, then `start` below: the cgroup surely comes after the create event.
    let name = docker::unique_name("pal-id-new");
    let mut c = Container::create(
        &name,
        &[("app", "web"), ("tier", "front")],
        &["sleep", "30"],
    )
    .unwrap();
    let pending = wait_for(
        &mut rx,
        "Pending",
        |ev| matches!(ev, InventoryEvent::Pending { id, .. } if *id == c.id),
    )
    .await;
    let InventoryEvent::Pending {
        runtime,
        name: pname,
        labels,
        ..
    } = pending
    else {
        unreachable!()
    };
    assert_eq!(
        (runtime, pname.as_deref()),
        (Runtime::Docker, Some(name.as_str()))
    );
    assert_eq!(labels.get("app").map(String::as_str), Some("web"));
    c.start().unwrap();
    let created = wait_for(
        &mut rx,
        "Created",
        |ev| matches!(ev, InventoryEvent::Created(m) if m.id == c.id),
    )
    .await;
    let created = meta_of(&created).unwrap().clone();
    // Metadata arrived before the cgroup did, so Created already carries it.
    assert!(created.metadata_known);
    assert_eq!(created.name.as_deref(), Some(name.as_str()));

    // Wait for the pid from the `start` event, then compare with what the kernel says.
    let pid = c.pid().unwrap();
    if inv.by_container_id(&c.id).unwrap().pid != Some(pid) {
        wait_for(&mut rx, "pid", |ev| {
            meta_of(ev).is_some_and(|m| m.id == c.id && m.pid == Some(pid))
        })
        .await;
    }
    let (path, ino) = kernel_cgroup(&c, &root);
    let m = inv
        .by_cgroup_id(ino)
        .expect("by_cgroup_id of the new container");
    assert_eq!(m.id, c.id);
    assert_eq!(m.cgroup_id, ino);
    assert_eq!(
        m.cgroup_id,
        cgroup2::cgroup_id(&cgroup2::absolute_path(&root, &path)).unwrap()
    );
    assert_eq!(m.cgroup_path, path);
    assert_eq!(m.image.as_deref(), Some(docker::IMAGE));
    let image_id = docker::docker(&["inspect", "--format", "{{.Image}}", &c.id]).unwrap();
    assert_eq!(
        m.image_digest.as_deref(),
        Some(image_id.as_str()),
        "local image: digest = image id"
    );
    assert_eq!(m.labels.get("tier").map(String::as_str), Some("front"));
    assert_eq!(m.pid, Some(pid));
    assert!(inv.list().iter().any(|x| x.id == c.id));

    // Removal.
    c.remove().unwrap();
    let removed = wait_for(
        &mut rx,
        "Removed",
        |ev| matches!(ev, InventoryEvent::Removed(m) if m.id == c.id),
    )
    .await;
    assert_eq!(meta_of(&removed).unwrap().cgroup_id, ino);
    assert!(inv.by_cgroup_id(ino).is_none());
    assert!(inv.by_container_id(&c.id).is_none());

    early.remove().unwrap();
    wait_for(
        &mut rx,
        "Removed (early)",
        |ev| matches!(ev, InventoryEvent::Removed(m) if m.id == early.id),
    )
    .await;
    handle.abort();
}

/// A test-owned cgroup subtree, removed (deepest first) on drop.
struct TestCgroup(PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let mut dirs = vec![];
        let mut stack = vec![self.0.clone()];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = fs::read_dir(&d) {
                stack.extend(rd.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()));
            }
            dirs.push(d);
        }
        for d in dirs.iter().rev() {
            let _ = cgroup2::remove(d);
        }
    }
}

/// Runtime-independent path: cgroups appear and vanish, nested cgroups map to their
/// container, and an unreachable runtime socket leaves the metadata unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroups_of_any_runtime_are_tracked_by_inotify() {
    let root = find_cgroup2_mount().unwrap();
    let parent = TestCgroup(
        cgroup2::create_child(&root, &format!("palisade-identity-{}", std::process::id())).unwrap(),
    );
    let (inv, handle) = Discovery::start(
        root.clone(),
        Some(PathBuf::from("/nonexistent/docker.sock")),
        None,
    );
    let mut rx = inv.subscribe();
    let id = format!("{:064x}", u128::from(std::process::id()) << 64 | 0xfeed);

    // A podman-style container cgroup with a nested one (runc `cgroups=split`).
    let top = cgroup2::create_child(&parent.0, &format!("libpod-{id}.scope")).unwrap();
    let ev = wait_for(
        &mut rx,
        "Created (podman)",
        |ev| matches!(ev, InventoryEvent::Created(m) if m.id == id),
    )
    .await;
    let m = meta_of(&ev).unwrap();
    assert_eq!(m.runtime, Runtime::Podman);
    assert_eq!(m.cgroup_id, cgroup2::cgroup_id(&top).unwrap());
    assert_eq!(m.cgroup_path, cgroup2::relative_path(&root, &top).unwrap());
    assert!(!m.metadata_known);

    let nested = cgroup2::create_child(&top, "container").unwrap();
    let nested_id = cgroup2::cgroup_id(&nested).unwrap();
    wait_for(&mut rx, "nested cgroup", |ev| {
        matches!(ev, InventoryEvent::Updated(m) if m.id == id && m.nested_cgroup_ids == [nested_id])
    })
    .await;
    assert_eq!(inv.by_cgroup_id(nested_id).unwrap().id, id);

    // A Docker-style cgroup while dockerd's socket is unreachable: known by id, no metadata.
    let docker_id = format!("{:064x}", u128::from(std::process::id()) << 64 | 0xd0c);
    let dcg = cgroup2::create_child(&parent.0, &format!("docker-{docker_id}.scope")).unwrap();
    wait_for(
        &mut rx,
        "Created (docker, socket down)",
        |ev| matches!(ev, InventoryEvent::Created(m) if m.id == docker_id),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let d = inv.by_cgroup_id(cgroup2::cgroup_id(&dcg).unwrap()).unwrap();
    assert_eq!(
        (d.runtime, d.metadata_known, d.name.as_ref()),
        (Runtime::Docker, false, None)
    );

    // Removal: nested first (Updated), then the container (Removed).
    cgroup2::remove(&nested).unwrap();
    wait_for(&mut rx, "nested removed", |ev| {
        matches!(ev, InventoryEvent::Updated(m) if m.id == id && m.nested_cgroup_ids.is_empty())
    })
    .await;
    assert!(inv.by_cgroup_id(nested_id).is_none());
    cgroup2::remove(&top).unwrap();
    cgroup2::remove(&dcg).unwrap();
    for cid in [&id, &docker_id] {
        wait_for(
            &mut rx,
            "Removed",
            |ev| matches!(ev, InventoryEvent::Removed(m) if m.id == *cid),
        )
        .await;
    }
    assert!(inv.by_container_id(&id).is_none());
    handle.abort();
}

/// A private containerd (own root, state and socket), killed on drop.
struct PrivateContainerd {
    child: std::process::Child,
    dir: PathBuf,
}

impl PrivateContainerd {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("palisade-ctd-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n[grpc]\n  address = \"{d}/containerd.sock\"\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.join("log")).unwrap();
        let child = std::process::Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd");
        Self { child, dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The CRI client against a real containerd CRI plugin: version handshake and NotFound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_client_talks_to_real_containerd() {
    use palisade::containers::{cri::CriClient, runtime_api::MetadataError};
    let ctd = PrivateContainerd::start();
    let mut client = None;
    for _ in 0..50 {
        if let Ok(c) = CriClient::connect(&ctd.socket()).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let client = client.expect("containerd CRI answered");
    assert_eq!(client.runtime_name(), "containerd");
    assert_eq!(client.runtime(), Runtime::Containerd);
    let err = client
        .inspect(&format!("{:064x}", 0xabcu32))
        .await
        .unwrap_err();
    assert!(matches!(err, MetadataError::NotFound(_)), "{err}");
}
