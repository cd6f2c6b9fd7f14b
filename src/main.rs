//! The `warden` command: parses arguments, loads configuration, starts telemetry and
//! runs the server until SIGTERM or SIGINT. The server brings its own runtimes (one
//! per worker thread), so `main` is synchronous.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use warden::config::Config;
use warden::server::Server;

#[derive(Parser)]
#[command(version, about = "Streaming LLM-proxy firewall for AI-agent fleets")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default when no command is given).
    Serve {
        /// Configuration file; without it Warden runs on its embedded default.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address, overriding `server.listen` (port 0 picks a free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
}

fn main() -> ExitCode {
    warden::telemetry::init_tracing();
    let cli = Cli::parse();
    let (config, listen) = match cli.command {
        Some(Command::Serve { config, listen }) => (config, listen),
        None => (None, None),
    };

    match serve(config, listen) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warden: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Option<PathBuf>, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let mut config = Config::load(config.as_deref()).context("loading configuration")?;
    if let Some(listen) = listen {
        config.server.listen = listen;
    }

    let server = Server::bind(config)?;
    let addr = server.local_addr()?;
    // One machine-readable line on stdout, so scripts and tests can find the port.
    println!("warden listening on http://{addr}");
    tracing::info!(addr = %addr, "listening");

    server.run(shutdown_signal())?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};

    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT stops warden");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
}
