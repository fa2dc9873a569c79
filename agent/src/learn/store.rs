//! Observations per workload, bounded, with JSON persistence.
//!
//! A workload is `(policy name, image)`: every container that the same learning policy selects
//! and that runs the same image shares one profile, so replicas and restarts merge.
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;

use agent_common::{ACC_READ, ACC_WRITE, PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};

use super::LearnError;
use crate::containers::meta::ContainerMeta;

/// File name of the persisted store inside the learn directory.
pub const STORE_FILE: &str = "profiles.json";
const FORMAT_VERSION: u32 = 1;
/// Container names remembered per profile (for display only).
const MAX_CONTAINER_NAMES: usize = 64;

/// `(policy name, image)`. The image is the runtime's image reference, `""` when unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkloadKey {
    pub policy: String,
    pub image: String,
}

/// One distinct observation. Its order (derived) makes every iteration deterministic.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Observation {
    /// A program ran. `fileless`: memfd or deleted file (the path is only a name).
    Exec { path: String, fileless: bool },
    /// A file was opened; `access` is `ACC_READ` | `ACC_WRITE`.
    Open { path: String, access: u8 },
    /// An outgoing connection (or UDP send); `protocol` is `PROTO_TCP` or `PROTO_UDP`. The
    /// source port is never part of it, so ephemeral client ports do not multiply entries.
    Connect {
        addr: IpAddr,
        port: u16,
        protocol: u8,
    },
}

impl Observation {
    /// The observation an event describes, `None` for events that are not observations.
    pub fn from_event(e: &crate::events::model::Event) -> Option<Observation> {
        use crate::events::model::Kind;
        let fileless = e.flags.iter().any(|f| f == "fileless");
        match e.kind {
            Kind::Exec => Some(Observation::Exec {
                path: e.path.clone()?,
                fileless,
            }),
            Kind::Open => {
                let a = e.access.as_deref()?;
                let mut access = 0;
                for part in a.split(',') {
                    match part.trim() {
                        "read" => access |= ACC_READ,
                        "write" => access |= ACC_WRITE,
                        _ => {}
                    }
                }
                let path = e.path.clone()?;
                (access != 0).then_some(Observation::Open { path, access })
            }
            Kind::Connect => Some(Observation::Connect {
                addr: e.addr?.to_canonical(),
                port: e.port?,
                protocol: match e.protocol.as_deref()? {
                    "tcp" => PROTO_TCP,
                    "udp" => PROTO_UDP,
                    _ => return None,
                },
            }),
            _ => None,
        }
    }

    /// A short human form: `exec /bin/sh`, `open /etc/passwd (read)`, `connect 10.0.0.1:53/udp`.
    pub fn describe(&self) -> String {
        match self {
            Observation::Exec { path, fileless } => {
                format!("exec {path}{}", if *fileless { " (fileless)" } else { "" })
            }
            Observation::Open { path, access } => {
                format!("open {path} ({})", access_name(*access))
            }
            Observation::Connect {
                addr,
                port,
                protocol,
            } => {
                let a = match addr {
                    IpAddr::V4(a) => a.to_string(),
                    IpAddr::V6(a) => format!("[{a}]"),
                };
                format!("connect {a}:{port}/{}", proto_name(*protocol))
            }
        }
    }
}

pub fn access_name(bits: u8) -> &'static str {
    match bits & (ACC_READ | ACC_WRITE) {
        ACC_READ => "read",
        ACC_WRITE => "write",
        _ => "read,write",
    }
}

pub fn proto_name(p: u8) -> &'static str {
    if p == PROTO_UDP { "udp" } else { "tcp" }
}

/// How often and when an observation was seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// Sightings (the kernel reports each distinct observation once per policy generation,
    /// so this counts generations × containers, not operations).
    pub count: u64,
    pub first_ns: u64,
    pub last_ns: u64,
}

/// Everything learned about one workload.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub key: WorkloadKey,
    /// Metadata of the last container seen (selector matching when replaying).
    pub meta: Option<ContainerMeta>,
    pub containers: BTreeSet<String>,
    #[serde(with = "obs_map")]
    pub observations: BTreeMap<Observation, Seen>,
    pub first_ns: u64,
    pub last_ns: u64,
    /// When the last *new* distinct observation arrived (stability).
    pub last_new_ns: u64,
    pub sightings: u64,
    /// Distinct observations dropped because the profile was full.
    pub evicted: u64,
}

/// Bounds on memory and on the persisted file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_observations: usize,
    pub max_workloads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_observations: 4096,
            max_workloads: 256,
        }
    }
}

/// All profiles.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Store {
    pub profiles: BTreeMap<WorkloadKey, Profile>,
    pub limits: Limits,
    /// Whole workloads dropped because there were too many.
    pub evicted_workloads: u64,
}

impl Store {
    pub fn new(limits: Limits) -> Self {
        Store {
            limits,
            ..Store::default()
        }
    }

    /// Record one sighting. Returns true when it is a new distinct observation.
    pub fn record(
        &mut self,
        key: WorkloadKey,
        meta: Option<&ContainerMeta>,
        obs: Observation,
        time_ns: u64,
    ) -> bool {
        if !self.profiles.contains_key(&key) {
            self.make_room_for_workload();
        }
        let max = self.limits.max_observations.max(1);
        let p = self.profiles.entry(key.clone()).or_insert_with(|| Profile {
            key,
            first_ns: time_ns,
            ..Profile::default()
        });
        if let Some(m) = meta {
            if let Some(name) = &m.name
                && (p.containers.len() < MAX_CONTAINER_NAMES || p.containers.contains(name))
            {
                p.containers.insert(name.clone());
            }
            p.meta = Some(m.clone());
        }
        p.sightings += 1;
        p.first_ns = p.first_ns.min(time_ns);
        p.last_ns = p.last_ns.max(time_ns);
        if let Some(s) = p.observations.get_mut(&obs) {
            s.count += 1;
            s.first_ns = s.first_ns.min(time_ns);
            s.last_ns = s.last_ns.max(time_ns);
            return false;
        }
        if p.observations.len() >= max {
            evict_one(p);
        }
        p.observations.insert(
            obs,
            Seen {
                count: 1,
                first_ns: time_ns,
                last_ns: time_ns,
            },
        );
        p.last_new_ns = p.last_new_ns.max(time_ns);
        true
    }

    fn make_room_for_workload(&mut self) {
        while self.profiles.len() >= self.limits.max_workloads.max(1) && self.evict_oldest() {}
    }

    /// Drop the workload seen longest ago (ties: smallest key, deterministic), counted.
    fn evict_oldest(&mut self) -> bool {
        let Some(oldest) = self
            .profiles
            .values()
            .min_by_key(|p| (p.last_ns, p.key.clone()))
            .map(|p| p.key.clone())
        else {
            return false;
        };
        self.profiles.remove(&oldest);
        self.evicted_workloads += 1;
        true
    }

    /// Enforce the limits (after loading with smaller limits than the file was written with).
    fn trim(&mut self) {
        let max = self.limits.max_observations.max(1);
        for p in self.profiles.values_mut() {
            while p.observations.len() > max {
                evict_one(p);
            }
        }
        while self.profiles.len() > self.limits.max_workloads.max(1) && self.evict_oldest() {}
    }

    /// Write `<dir>/profiles.json` atomically (temporary file, fsync, rename).
    pub fn save(&self, dir: &Path) -> Result<(), LearnError> {
        let io = |e: std::io::Error| LearnError::Io(dir.display().to_string(), e);
        fs::create_dir_all(dir).map_err(io)?;
        let file = StoreFile {
            version: FORMAT_VERSION,
            evicted_workloads: self.evicted_workloads,
            profiles: self.profiles.values().cloned().collect(),
        };
        let text = serde_json::to_vec(&file).map_err(LearnError::Json)?;
        let tmp = dir.join(format!("{STORE_FILE}.tmp"));
        let mut f = fs::File::create(&tmp).map_err(io)?;
        f.write_all(&text).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, dir.join(STORE_FILE)).map_err(io)?;
        Ok(())
    }

    /// Read `<dir>/profiles.json`; a missing file is an empty store.
    pub fn load(dir: &Path, limits: Limits) -> Result<Store, LearnError> {
        let path = dir.join(STORE_FILE);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Store::new(limits)),
            Err(e) => return Err(LearnError::Io(path.display().to_string(), e)),
        };
        let file: StoreFile = serde_json::from_slice(&text).map_err(LearnError::Json)?;
        if file.version != FORMAT_VERSION {
            return Err(LearnError::Version(file.version));
        }
        let mut s = Store {
            profiles: file
                .profiles
                .into_iter()
                .map(|p| (p.key.clone(), p))
                .collect(),
            limits,
            evicted_workloads: file.evicted_workloads,
        };
        s.trim();
        Ok(s)
    }
}

/// Drop the least-seen observation (ties: seen longest ago, then smallest), counted.
fn evict_one(p: &mut Profile) {
    let victim = p
        .observations
        .iter()
        .min_by(|a, b| {
            (a.1.count, a.1.last_ns)
                .cmp(&(b.1.count, b.1.last_ns))
                .then_with(|| a.0.cmp(b.0))
        })
        .map(|(o, _)| o.clone());
    if let Some(v) = victim {
        p.observations.remove(&v);
        p.evicted += 1;
    }
}

#[derive(Serialize, Deserialize)]
struct StoreFile {
    version: u32,
    evicted_workloads: u64,
    profiles: Vec<Profile>,
}

/// JSON objects need string keys: the map is persisted as a list of `{obs, seen}` records.
mod obs_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{Observation, Seen};

    #[derive(Serialize, Deserialize)]
    struct Entry {
        obs: Observation,
        seen: Seen,
    }

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<Observation, Seen>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter().map(|(o, seen)| Entry {
            obs: o.clone(),
            seen: *seen,
        }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<Observation, Seen>, D::Error> {
        let v: Vec<Entry> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|e| (e.obs, e.seen)).collect())
    }
}
