//! The daemon's side of the API: policy and container operations on the engine.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_common as abi;

use crate::{
    api::{ContainerInfo, Control, PolicyErrorInfo, PolicyInfo, StatusInfo, metrics::Metrics},
    containers::inventory::Inventory,
    engine::Engine,
    events::{
        bus::EventBus,
        model::{Event, Kind, Mode as EvMode, Verdict},
    },
    learn::{CheckReport, LearnError, LearnHandle, ProfileSummary},
    policy::{self, Mode},
};

pub struct DaemonControl {
    pub engine: Arc<Mutex<Engine>>,
    pub inventory: Option<Inventory>,
    pub bus: EventBus,
    pub kernel_features: Vec<String>,
    /// Why tier 1 was not used although BPF-LSM is active (`auto` fell back to tier 2).
    pub tier_fallback: Option<String>,
    pub learn: LearnHandle,
}

fn ev_mode(m: Mode) -> EvMode {
    match m {
        Mode::Learn => EvMode::Learn,
        Mode::Monitor => EvMode::Monitor,
        Mode::Enforce => EvMode::Enforce,
    }
}

fn abi_mode(m: u8) -> Option<EvMode> {
    crate::events::model::mode_from_abi(m)
}

impl DaemonControl {
    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parse, validate and apply; every outcome is also an event on the bus.
    pub fn apply_text(
        &self,
        yaml: &str,
        source: &str,
    ) -> Result<Vec<String>, Vec<PolicyErrorInfo>> {
        let parsed = match policy::parse_str(yaml, source) {
            Ok(p) => p,
            Err(e) => {
                let info = PolicyErrorInfo {
                    file: e.file.clone(),
                    line: e.pos.line,
                    column: e.pos.column,
                    field: e.field.clone(),
                    reason: e.reason.clone(),
                };
                self.policy_event(Verdict::Denied, format!("policy rejected: {info}"));
                return Err(vec![info]);
            }
        };
        let lines: BTreeMap<String, u32> = parsed
            .iter()
            .map(|p| (p.name.clone(), p.source.line))
            .collect();
        let res = self.engine().apply(parsed);
        match res {
            Ok(names) => {
                self.policy_event(
                    Verdict::Allowed,
                    format!("policies applied: {}", names.join(", ")),
                );
                Ok(names)
            }
            Err(refusals) => {
                let infos: Vec<PolicyErrorInfo> = refusals
                    .iter()
                    .map(|r| PolicyErrorInfo {
                        file: source.to_string(),
                        line: lines.get(&r.policy).copied().unwrap_or(0),
                        column: 1,
                        field: "spec.selector".into(),
                        reason: r.to_string(),
                    })
                    .collect();
                for i in &infos {
                    self.policy_event(Verdict::Denied, format!("policy rejected: {i}"));
                }
                Err(infos)
            }
        }
    }

    /// Delete a policy and report it on the event stream (API and policy directory alike).
    pub fn delete_named(&self, name: &str) -> Result<(), String> {
        let r = self.engine().delete(name);
        if r.is_ok() {
            self.policy_event(Verdict::Allowed, format!("policy deleted: {name}"));
        }
        r
    }

    /// Set the daemon-level gauges of `/metrics` from the engine and the inventory.
    pub fn update_gauges(&self, m: &Metrics) {
        let e = self.engine();
        m.policies.set(e.policies().count() as i64);
        let bound = e.bound().filter(|(_, b)| b.policy.is_some()).count();
        m.bound_containers.set(bound as i64);
        // Without discovery the engine's bindings are all the containers the agent knows.
        let known = match &self.inventory {
            Some(i) => i.list().len(),
            None => e.bound().count(),
        };
        m.containers.set(known as i64);
        let [cg, pending, exec, files, net, inodes] = e.map_counts();
        for (name, n, cap) in [
            (agent_common::MAP_CGROUPS, cg, agent_common::CAP_CGROUPS),
            (
                agent_common::MAP_PENDING,
                pending,
                agent_common::CAP_PENDING,
            ),
            (
                agent_common::MAP_EXEC_RULES,
                exec,
                agent_common::CAP_EXEC_RULES,
            ),
            (
                agent_common::MAP_FILE_RULES,
                files,
                agent_common::CAP_FILE_RULES,
            ),
            (
                agent_common::MAP_NET_RULES,
                net,
                agent_common::CAP_NET_RULES,
            ),
            (
                agent_common::MAP_EXEC_INODES,
                inodes,
                agent_common::CAP_EXEC_INODES,
            ),
        ] {
            let labels = vec![("map".to_string(), name.to_string())];
            m.map_fill
                .get_or_create(&labels)
                .set(n as f64 / f64::from(cap));
        }
    }

    fn policy_event(&self, verdict: Verdict, msg: String) {
        self.bus.publish(Event::agent(Kind::Policy, verdict, msg));
    }
}

/// Keep the gauges current: they are cheap to compute, and a scrape must not take the engine
/// lock on the HTTP path.
pub async fn refresh_gauges(ctl: Arc<DaemonControl>, metrics: Arc<Metrics>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        ctl.update_gauges(&metrics);
    }
}

#[tonic::async_trait]
impl Control for DaemonControl {
    async fn apply_policies(
        &self,
        yaml: String,
        source_name: String,
    ) -> Result<Vec<String>, Vec<PolicyErrorInfo>> {
        self.apply_text(&yaml, &source_name)
    }

    async fn delete_policy(&self, name: String) -> Result<(), String> {
        self.delete_named(&name)
    }

    async fn list_policies(&self) -> Vec<PolicyInfo> {
        let e = self.engine();
        e.policies()
            .map(|a| PolicyInfo {
                name: a.policy.name.clone(),
                mode: ev_mode(a.policy.mode),
                selector: crate::daemon::selector_summary(&a.policy),
                yaml: a.policy.to_yaml(),
                bound_containers: e.bound_count(&a.policy.name) as u32,
            })
            .collect()
    }

    async fn set_mode(&self, name: String, mode: EvMode) -> Result<(), String> {
        let m = match mode {
            EvMode::Learn => Mode::Learn,
            EvMode::Monitor => Mode::Monitor,
            EvMode::Enforce => Mode::Enforce,
        };
        let r = self.engine().set_mode(&name, m);
        if r.is_ok() {
            self.policy_event(Verdict::Allowed, format!("policy {name} mode set to {m}"));
        }
        r
    }

    async fn list_containers(&self) -> Vec<ContainerInfo> {
        let e = self.engine();
        let tier = e.tier().to_string();
        let mut out: Vec<ContainerInfo> = e
            .bound()
            .map(|(_, b)| {
                let meta = self
                    .inventory
                    .as_ref()
                    .and_then(|i| i.by_cgroup_id(b.meta.cgroup_id))
                    .unwrap_or_else(|| b.meta.clone());
                let mode = match &b.policy {
                    Some(p) => e.policy(p).map(|a| ev_mode(a.policy.mode)),
                    None => abi_mode(e.default_mode()),
                };
                ContainerInfo {
                    meta,
                    policy: b.policy.clone(),
                    mode,
                    tier: tier.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.meta.id.cmp(&b.meta.id));
        out
    }

    async fn status(&self) -> StatusInfo {
        let e = self.engine();
        let [cg, pending, exec, files, net, inodes] = e.map_counts();
        let (attach, marks) = e.attachments();
        let mut counters = BTreeMap::new();
        counters.insert("policies".into(), e.policies().count() as u64);
        counters.insert("bound_cgroups".into(), e.bound().count() as u64);
        counters.insert("map_cgroups".into(), cg as u64);
        counters.insert("map_pending".into(), pending as u64);
        counters.insert("map_exec_rules".into(), exec as u64);
        counters.insert("map_file_rules".into(), files as u64);
        counters.insert("map_net_rules".into(), net as u64);
        counters.insert("map_exec_inodes".into(), inodes as u64);
        counters.insert("cgroup_attachments".into(), attach as u64);
        counters.insert("fanotify_marks".into(), marks as u64);
        counters.insert(
            "kernel_ringbuf_drops".into(),
            e.kernel_stat(abi::STAT_RINGBUF_DROPS),
        );
        counters.insert("kernel_denied".into(), e.kernel_stat(abi::STAT_DENIED));
        counters.insert(
            "kernel_violations".into(),
            e.kernel_stat(abi::STAT_VIOLATIONS),
        );
        counters.insert("events_published".into(), self.bus.last_seq());
        StatusInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            tier: e.tier().to_string(),
            kernel_features: self.kernel_features.clone(),
            tier_fallback: self.tier_fallback.clone(),
            counters,
        }
    }

    async fn learn_status(&self) -> Vec<ProfileSummary> {
        self.learn.status()
    }

    async fn learn_export(
        &self,
        policy: String,
        image: Option<String>,
        mode: Mode,
    ) -> Result<String, LearnError> {
        // The applied policy is the base: its selector and rules are kept in the export.
        let base = self
            .engine()
            .policy(&policy)
            .map(|a| a.policy.clone())
            .ok_or(LearnError::NoPolicy(policy))?;
        self.learn
            .export(&base, image.as_deref(), mode)
            .map(|e| e.yaml)
    }

    async fn learn_check(
        &self,
        yaml: String,
        source_name: String,
    ) -> Result<CheckReport, LearnError> {
        self.learn.check_text(&yaml, &source_name)
    }
}
