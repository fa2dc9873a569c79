//! The typed policy model. Every rule keeps its source position for error messages; positions
//! are not serialised, so `Policy::to_yaml` emits a clean document.
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use agent_common::{
    ACC_READ, ACC_WRITE, MODE_ENFORCE, MODE_LEARN, MODE_MONITOR, PROTO_TCP, PROTO_UDP,
};
use ipnet::IpNet;
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use super::error::Pos;

pub const API_VERSION: &str = "palisade.dev/v1";
pub const KIND: &str = "ContainerPolicy";

/// Where a policy was defined.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceRef {
    pub file: String,
    pub line: u32,
}

/// One `ContainerPolicy` document.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub name: String,
    pub mode: Mode,
    pub selector: Selector,
    /// `None`: exec is not policed.
    pub exec: Option<ExecSpec>,
    /// `None`: file opens are not policed.
    pub files: Option<Vec<FileRule>>,
    /// `None`: egress is not policed.
    pub network: Option<NetworkSpec>,
    pub source: SourceRef,
    /// Position of `metadata.name` (for duplicate-name errors).
    pub name_pos: Pos,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Learn,
    #[default]
    Monitor,
    Enforce,
}

impl Mode {
    /// The `MODE_*` constant of the kernel ABI.
    pub const fn as_u8(self) -> u8 {
        match self {
            Mode::Learn => MODE_LEARN,
            Mode::Monitor => MODE_MONITOR,
            Mode::Enforce => MODE_ENFORCE,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Learn => "learn",
            Mode::Monitor => "monitor",
            Mode::Enforce => "enforce",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode {0:?} (expected learn, monitor or enforce)")]
pub struct BadMode(pub String);

impl FromStr for Mode {
    type Err = BadMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "learn" => Ok(Mode::Learn),
            "monitor" => Ok(Mode::Monitor),
            "enforce" => Ok(Mode::Enforce),
            _ => Err(BadMode(s.to_string())),
        }
    }
}

/// Which containers a policy applies to; every given field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<PodSelector>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_path: Option<String>,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        *self == Selector::default()
    }
}

/// Kubernetes `LabelSelector`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSelector {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelExpr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LabelExpr {
    pub key: String,
    pub operator: LabelOp,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LabelOp {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecSpec {
    pub allow: Vec<ExecRule>,
    pub allow_fileless: bool,
    /// Let the workload create user/mount namespaces and chroot (denied by default).
    pub allow_namespaces: bool,
}

/// One exec allow-list entry: an absolute file, or a directory when it ends in `/`.
#[derive(Clone, Debug, Default)]
pub struct ExecRule {
    pub path: String,
    pub pos: Pos,
}

impl Serialize for ExecRule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.path)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Read,
    Write,
    Any,
}

impl Access {
    /// `ACC_*` bits this access names.
    pub const fn bits(self) -> u8 {
        match self {
            Access::Read => ACC_READ,
            Access::Write => ACC_WRITE,
            Access::Any => ACC_READ | ACC_WRITE,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Clone, Debug, Serialize)]
pub struct FileRule {
    pub path: String,
    pub access: Access,
    pub action: Action,
    #[serde(skip)]
    pub pos: Pos,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    pub egress: Vec<EgressRule>,
    /// Let the workload open raw, packet and ICMP "ping" sockets (denied by default: they send
    /// past the egress rules).
    pub allow_raw_sockets: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    #[default]
    Any,
}

impl Protocol {
    /// `PROTO_*` bits.
    pub const fn bits(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
            Protocol::Any => PROTO_TCP | PROTO_UDP,
        }
    }
}

/// An inclusive port range; a single port has `lo == hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ports {
    pub lo: u16,
    pub hi: u16,
}

impl Serialize for Ports {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.lo == self.hi {
            s.serialize_u16(self.lo)
        } else {
            s.serialize_str(&format!("{}-{}", self.lo, self.hi))
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EgressRule {
    #[serde(serialize_with = "ser_display")]
    pub cidr: IpNet,
    /// `None`: every port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<Ports>>,
    pub protocol: Protocol,
    #[serde(skip)]
    pub pos: Pos,
}

fn ser_display<S: Serializer>(v: &impl fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// The document layout (`apiVersion`, `kind`, `metadata`, `spec`) for serialisation.
impl Serialize for Policy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Metadata<'a> {
            name: &'a str,
        }
        #[derive(Serialize)]
        struct Spec<'a> {
            mode: Mode,
            selector: &'a Selector,
            #[serde(skip_serializing_if = "Option::is_none")]
            exec: Option<&'a ExecSpec>,
            #[serde(skip_serializing_if = "Option::is_none")]
            files: Option<&'a Vec<FileRule>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            network: Option<&'a NetworkSpec>,
        }
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("apiVersion", API_VERSION)?;
        m.serialize_entry("kind", KIND)?;
        m.serialize_entry("metadata", &Metadata { name: &self.name })?;
        m.serialize_entry(
            "spec",
            &Spec {
                mode: self.mode,
                selector: &self.selector,
                exec: self.exec.as_ref(),
                files: self.files.as_ref(),
                network: self.network.as_ref(),
            },
        )?;
        m.end()
    }
}

impl Policy {
    /// The policy as a YAML document that [`super::parse_str`] reads back to the same policy.
    pub fn to_yaml(&self) -> String {
        // Serialising plain strings, numbers and maps cannot fail.
        serde_saphyr::to_string(self).unwrap_or_default()
    }

    /// The policy as JSON (same layout as the YAML document).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}
