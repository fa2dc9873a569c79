//! Who is calling, and what they may do.
//!
//! Unix-socket callers are admins: the socket is root-only (mode 0600), so reaching it already
//! means root on the node. TCP callers must present a client certificate signed by the configured
//! CA (mutual TLS); its subject CN / OU maps to a role through [`RoleMap`].
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tonic::Request;
use tonic::transport::server::UdsConnectInfo;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Stream events, list/get policies and containers, status.
    Viewer,
    /// Everything, including applying/deleting policies and changing modes.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }
}

/// Certificate subject attribute a rule looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertAttr {
    Cn,
    Ou,
}

/// `attr=value` in the client certificate's subject grants `role`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRule {
    pub attr: CertAttr,
    pub value: String,
    pub role: Role,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "invalid role rule {0:?}: expected CN=<value>:<role> or OU=<value>:<role>, role admin|viewer"
)]
pub struct RoleRuleError(String);

impl FromStr for RoleRule {
    type Err = RoleRuleError;

    /// `OU=ops:admin`, `CN=alice:viewer`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || RoleRuleError(s.into());
        let (lhs, role) = s.rsplit_once(':').ok_or_else(err)?;
        let (attr, value) = lhs.split_once('=').ok_or_else(err)?;
        let attr = match attr.trim().to_ascii_uppercase().as_str() {
            "CN" => CertAttr::Cn,
            "OU" => CertAttr::Ou,
            _ => return Err(err()),
        };
        let role = match role.trim().to_ascii_lowercase().as_str() {
            "admin" => Role::Admin,
            "viewer" => Role::Viewer,
            _ => return Err(err()),
        };
        if value.is_empty() {
            return Err(err());
        }
        Ok(RoleRule {
            attr,
            value: value.into(),
            role,
        })
    }
}

/// Rules mapping certificate subjects to roles; the highest matching role wins, no match = no
/// access.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleMap {
    pub rules: Vec<RoleRule>,
}

impl Default for RoleMap {
    /// `OU=admin` → admin, `OU=viewer` → viewer.
    fn default() -> Self {
        RoleMap {
            rules: vec![
                RoleRule {
                    attr: CertAttr::Ou,
                    value: "admin".into(),
                    role: Role::Admin,
                },
                RoleRule {
                    attr: CertAttr::Ou,
                    value: "viewer".into(),
                    role: Role::Viewer,
                },
            ],
        }
    }
}

impl RoleMap {
    pub fn role_for(&self, subject: &Subject) -> Option<Role> {
        self.rules
            .iter()
            .filter(|r| match r.attr {
                CertAttr::Cn => subject.cn.contains(&r.value),
                CertAttr::Ou => subject.ou.contains(&r.value),
            })
            .map(|r| r.role)
            .max()
    }
}

/// The parts of a certificate subject that roles are keyed on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subject {
    pub cn: Vec<String>,
    pub ou: Vec<String>,
}

impl Subject {
    pub fn from_der(der: &[u8]) -> Option<Subject> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let strings = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
            it.filter_map(|a| a.as_str().ok().map(String::from))
                .collect::<Vec<_>>()
        };
        Some(Subject {
            cn: strings(&mut cert.subject().iter_common_name()),
            ou: strings(&mut cert.subject().iter_organizational_unit()),
        })
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = self.cn.iter().map(|v| format!("CN={v}")).collect();
        parts.extend(self.ou.iter().map(|v| format!("OU={v}")));
        parts.join(",")
    }
}

/// The authenticated caller of one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Caller {
    /// `uid:0`, `unix`, or `x509:CN=…,OU=…`.
    pub who: String,
    pub transport: &'static str,
    /// `None`: authenticated but mapped to no role.
    pub role: Option<Role>,
}

impl Caller {
    pub fn may(&self, needed: Role) -> bool {
        self.role.is_some_and(|r| r >= needed)
    }
}

/// Identify the caller from the connection the request came on.
pub fn caller_of<T>(req: &Request<T>, roles: &RoleMap) -> Caller {
    if let Some(info) = req.extensions().get::<UdsConnectInfo>() {
        let who = match info.peer_cred {
            Some(cred) => format!("uid:{}", cred.uid()),
            None => "unix".into(),
        };
        return Caller {
            who,
            transport: "unix",
            role: Some(Role::Admin),
        };
    }
    let subject = req
        .peer_certs()
        .and_then(|certs| certs.first().and_then(|c| Subject::from_der(c.as_ref())));
    match subject {
        Some(s) => Caller {
            who: format!("x509:{}", s.describe()),
            transport: "tls",
            role: roles.role_for(&s),
        },
        // TCP without a verified client certificate never reaches here (the listener requires
        // one), but fail closed anyway.
        None => Caller {
            who: "anonymous".into(),
            transport: "tcp",
            role: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_highest_role_wins() {
        let r: RoleRule = "OU=ops:admin".parse().unwrap();
        assert_eq!(
            r,
            RoleRule {
                attr: CertAttr::Ou,
                value: "ops".into(),
                role: Role::Admin
            }
        );
        assert!("OU=ops".parse::<RoleRule>().is_err());
        assert!("O=ops:admin".parse::<RoleRule>().is_err());
        assert!("CN=bob:root".parse::<RoleRule>().is_err());
        let map = RoleMap {
            rules: vec![
                "CN=alice:viewer".parse().unwrap(),
                "OU=sec:admin".parse().unwrap(),
            ],
        };
        let alice = Subject {
            cn: vec!["alice".into()],
            ou: vec![],
        };
        let alice_sec = Subject {
            cn: vec!["alice".into()],
            ou: vec!["sec".into()],
        };
        assert_eq!(map.role_for(&alice), Some(Role::Viewer));
        assert_eq!(map.role_for(&alice_sec), Some(Role::Admin));
        assert_eq!(map.role_for(&Subject::default()), None);
        let viewer = Caller {
            who: "x".into(),
            transport: "tls",
            role: Some(Role::Viewer),
        };
        assert!(viewer.may(Role::Viewer) && !viewer.may(Role::Admin));
        assert!(
            !Caller {
                who: "x".into(),
                transport: "tls",
                role: None
            }
            .may(Role::Viewer)
        );
    }
}
