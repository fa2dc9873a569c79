//! The `palisade` client subcommands: events, policy, containers, status, learn.
//!
//! Embed in the binary's parser:
//! ```ignore
//! #[derive(clap::Parser)]
//! struct Cli {
//!     #[command(flatten)] client: palisade::api::cli::ClientArgs,
//!     #[command(subcommand)] cmd: Cmd,
//! }
//! #[derive(clap::Subcommand)]
//! enum Cmd { Agent(AgentArgs), #[command(flatten)] Client(palisade::api::cli::ClientCommand) }
//! // … Cmd::Client(c) => std::process::exit(palisade::api::cli::run_cli(&cli.client, c).await?),
//! ```
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use tonic::Code;

use super::client::{Client, TlsClientConfig, connect_tls, connect_unix};
use super::{DEFAULT_SOCKET, convert, output, pb};
use crate::events::bus::Record;
use crate::events::model::{Kind, Mode, Verdict};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// How to reach the agent, and how to print.
#[derive(Args, Clone, Debug)]
pub struct ClientArgs {
    /// Agent API socket (root only).
    #[arg(long, global = true, env = "PALISADE_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Remote agent `host:port` over mutual TLS (instead of the socket).
    #[arg(long, global = true, env = "PALISADE_ADDR")]
    pub addr: Option<String>,
    /// CA certificate (PEM) the agent's certificate must chain to.
    #[arg(long, global = true, env = "PALISADE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, global = true, env = "PALISADE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long, global = true, env = "PALISADE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Expected name in the agent's certificate (default: host of --addr).
    #[arg(long, global = true)]
    pub tls_domain: Option<String>,
    /// Output format: human-readable text, or JSON (one object per line for events).
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Subcommand, Clone, Debug)]
pub enum ClientCommand {
    /// Show events held by the agent, or follow them live.
    Events(EventsArgs),
    /// Manage policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// List containers, or show one (by id, id prefix or name).
    Containers { id: Option<String> },
    /// Agent version, tier, kernel features and counters.
    Status,
    /// Learning mode: what was learned, export it as a policy, replay candidates.
    #[command(subcommand)]
    Learn(super::learn::LearnCommand),
}

#[derive(Args, Clone, Debug, Default)]
pub struct EventsArgs {
    /// Keep streaming new events.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Container id, id prefix or name (repeatable).
    #[arg(long)]
    pub container: Vec<String>,
    #[arg(long)]
    pub pod: Vec<String>,
    #[arg(long)]
    pub namespace: Vec<String>,
    #[arg(long)]
    pub image: Vec<String>,
    /// exec, open, connect, policy, agent (repeatable).
    #[arg(long, value_parser = parse_kind)]
    pub kind: Vec<Kind>,
    /// allowed, violation, denied, learned (repeatable).
    #[arg(long, value_parser = parse_verdict)]
    pub verdict: Vec<Verdict>,
    /// learn, monitor, enforce (repeatable).
    #[arg(long, value_parser = parse_mode)]
    pub mode: Vec<Mode>,
    /// Start after this sequence number (replays what the agent still holds).
    #[arg(long)]
    pub since_seq: Option<u64>,
}

#[derive(Subcommand, Clone, Debug)]
pub enum PolicyCommand {
    /// Apply policy files (a file, or every .yaml/.yml in a directory). Each file is atomic.
    Apply {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
    },
    /// List policies.
    List,
    /// Show one policy (its YAML).
    Get { name: String },
    /// Delete a policy (unbinds its containers).
    Delete { name: String },
    /// Set a policy's mode: learn, monitor or enforce.
    Mode {
        name: String,
        #[arg(value_parser = parse_mode)]
        mode: Mode,
    },
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase()))
        .map_err(|_| format!("unknown kind {s:?} (exec, open, connect, escape, policy, agent)"))
}

fn parse_verdict(s: &str) -> Result<Verdict, String> {
    serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase()))
        .map_err(|_| format!("unknown verdict {s:?} (allowed, violation, denied, learned)"))
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    convert::parse_mode(s).map_err(|_| format!("unknown mode {s:?} (learn, monitor, enforce)"))
}

/// Run a client command, printing to stdout/stderr. Returns the process exit code.
pub async fn run_cli(args: &ClientArgs, cmd: ClientCommand) -> anyhow::Result<i32> {
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    run_cli_io(args, cmd, &mut out, &mut err).await
}

/// As [`run_cli`], writing to the given streams (tests).
pub async fn run_cli_io(
    args: &ClientArgs,
    cmd: ClientCommand,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> anyhow::Result<i32> {
    let mut client = connect(args).await?;
    let json = args.output == Output::Json;
    let res = match cmd {
        ClientCommand::Events(e) => events(&mut client, e, json, out).await,
        ClientCommand::Policy(p) => policy(&mut client, p, json, out, err).await,
        ClientCommand::Containers { id } => containers(&mut client, id, json, out).await,
        ClientCommand::Status => {
            let s =
                convert::status_from_pb(client.status(pb::StatusRequest {}).await?.into_inner());
            print(out, json, &s, || output::status(&s))?;
            Ok(0)
        }
        ClientCommand::Learn(l) => super::learn::run(&mut client, l, json, out).await,
    };
    match res {
        Ok(code) => Ok(code),
        // Server-side refusals are expected outcomes: print them and fail, like any CLI error.
        Err(e) => match e.downcast_ref::<tonic::Status>() {
            Some(s) if s.code() != Code::Unavailable => {
                writeln!(err, "error: {}", s.message())?;
                Ok(match s.code() {
                    Code::PermissionDenied => 3,
                    Code::NotFound => 4,
                    _ => 1,
                })
            }
            _ => Err(e),
        },
    }
}

async fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    match &args.addr {
        Some(addr) => {
            let need = |p: &Option<PathBuf>, flag: &str| {
                p.clone().with_context(|| format!("--addr needs {flag}"))
            };
            let tls = TlsClientConfig {
                ca: need(&args.tls_ca, "--tls-ca")?,
                cert: need(&args.tls_cert, "--tls-cert")?,
                key: need(&args.tls_key, "--tls-key")?,
                domain: args.tls_domain.clone(),
            };
            connect_tls(addr, &tls).await
        }
        None => connect_unix(&args.socket).await,
    }
}

fn print<T: Serialize>(
    out: &mut (dyn Write + Send),
    json: bool,
    value: &T,
    text: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, value)?;
        writeln!(out)?;
    } else {
        out.write_all(text().as_bytes())?;
    }
    Ok(())
}

/// JSON shape of one streamed record: the event's fields, plus `gap` on gap records.
#[derive(Serialize)]
struct EventJson<'a> {
    #[serde(flatten)]
    event: &'a crate::events::model::Event,
    #[serde(skip_serializing_if = "Option::is_none")]
    gap: Option<&'a crate::events::bus::Gap>,
}

async fn events(
    client: &mut Client,
    a: EventsArgs,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<i32> {
    let filter = pb::EventFilter {
        containers: a.container,
        pods: a.pod,
        namespaces: a.namespace,
        images: a.image,
        kinds: a
            .kind
            .into_iter()
            .map(|k| convert::kind_to_pb(k).into())
            .collect(),
        verdicts: a
            .verdict
            .into_iter()
            .map(|v| convert::verdict_to_pb(v).into())
            .collect(),
        modes: a
            .mode
            .into_iter()
            .map(|m| convert::mode_to_pb(Some(m)).into())
            .collect(),
        resume_from_seq: a.since_seq,
        follow: a.follow,
    };
    let mut stream = client.stream_events(filter).await?.into_inner();
    while let Some(ev) = stream.message().await? {
        let rec: Record = convert::record_from_pb(ev)?;
        if json {
            serde_json::to_writer(
                &mut *out,
                &EventJson {
                    event: &rec.event,
                    gap: rec.gap.as_ref(),
                },
            )?;
            writeln!(out)?;
        } else {
            out.write_all(output::event_line(&rec).as_bytes())?;
        }
        out.flush()?;
    }
    Ok(0)
}

/// Files to apply: the file itself, or a directory's `.yaml`/`.yml` files in name order.
fn policy_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && f.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            found.sort();
            anyhow::ensure!(!found.is_empty(), "no .yaml/.yml files in {}", p.display());
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

async fn apply(
    client: &mut Client,
    file: &Path,
    json: bool,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> anyhow::Result<bool> {
    let yaml =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let req = pb::ApplyPolicyRequest {
        yaml,
        source_name: file.display().to_string(),
    };
    let resp = client.apply_policy(req).await?.into_inner();
    let errors: Vec<_> = resp
        .errors
        .into_iter()
        .map(convert::policy_error_from_pb)
        .collect();
    if json {
        let v = serde_json::json!({ "file": file, "applied": resp.applied, "errors": errors });
        writeln!(out, "{v}")?;
    } else {
        for name in &resp.applied {
            writeln!(out, "policy/{name} applied ({})", file.display())?;
        }
        for e in &errors {
            writeln!(err, "{e}")?;
        }
    }
    Ok(errors.is_empty())
}

async fn policy(
    client: &mut Client,
    cmd: PolicyCommand,
    json: bool,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> anyhow::Result<i32> {
    match cmd {
        PolicyCommand::Apply { files } => {
            let mut ok = true;
            for f in policy_files(&files)? {
                ok &= apply(client, &f, json, out, err).await?;
            }
            Ok(if ok { 0 } else { 1 })
        }
        PolicyCommand::List => {
            let list = client
                .list_policies(pb::ListPoliciesRequest {})
                .await?
                .into_inner()
                .policies;
            let list = list
                .into_iter()
                .map(convert::policy_from_pb)
                .collect::<Result<Vec<_>, _>>()?;
            print(out, json, &list, || output::policies(&list))?;
            Ok(0)
        }
        PolicyCommand::Get { name } => {
            let p = convert::policy_from_pb(
                client
                    .get_policy(pb::GetPolicyRequest { name })
                    .await?
                    .into_inner(),
            )?;
            print(out, json, &p, || {
                if p.yaml.ends_with('\n') {
                    p.yaml.clone()
                } else {
                    format!("{}\n", p.yaml)
                }
            })?;
            Ok(0)
        }
        PolicyCommand::Delete { name } => {
            client
                .delete_policy(pb::DeletePolicyRequest { name: name.clone() })
                .await?;
            print(out, json, &serde_json::json!({ "deleted": name }), || {
                format!("policy/{name} deleted\n")
            })?;
            Ok(0)
        }
        PolicyCommand::Mode { name, mode } => {
            let req = pb::SetPolicyModeRequest {
                name: name.clone(),
                mode: convert::mode_to_pb(Some(mode)).into(),
            };
            client.set_policy_mode(req).await?;
            let word = convert::mode_word(mode);
            print(
                out,
                json,
                &serde_json::json!({ "policy": name, "mode": word }),
                || format!("policy/{name} mode set to {word}\n"),
            )?;
            Ok(0)
        }
    }
}

async fn containers(
    client: &mut Client,
    id: Option<String>,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<i32> {
    match id {
        Some(id) => {
            let c = client
                .get_container(pb::GetContainerRequest { id })
                .await?
                .into_inner();
            let c = convert::container_info_from_pb(c)?;
            print(out, json, &c, || output::container_detail(&c))?;
        }
        None => {
            let list = client
                .list_containers(pb::ListContainersRequest {})
                .await?
                .into_inner()
                .containers;
            let list = list
                .into_iter()
                .map(convert::container_info_from_pb)
                .collect::<Result<Vec<_>, _>>()?;
            print(out, json, &list, || output::containers(&list))?;
        }
    }
    Ok(0)
}

/// Standalone parser (tests, and documentation of the intended embedding).
#[derive(clap::Parser, Debug)]
#[command(name = "palisade")]
pub struct Cli {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub cmd: ClientCommand,
}
