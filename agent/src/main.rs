//! `palisade`: the node agent (`palisade agent`) and its command-line client.
use clap::{Parser, Subcommand};
use palisade::{
    api::cli::{ClientArgs, ClientCommand, run_cli},
    daemon::{self, AgentConfig},
};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "palisade",
    version,
    about = "Palisade container runtime security agent"
)]
struct Cli {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent (root).
    Agent(AgentConfig),
    #[command(flatten)]
    Client(ClientCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Command::Agent(cfg) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    EnvFilter::try_from_env("PALISADE_LOG")
                        .unwrap_or_else(|_| EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .init();
            rt.block_on(daemon::run(cfg))
        }
        Command::Client(cmd) => {
            let code = rt.block_on(run_cli(&cli.client, cmd))?;
            std::process::exit(code);
        }
    }
}
