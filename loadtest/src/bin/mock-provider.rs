//! Runs the mock OpenAI-compatible provider until SIGINT or SIGTERM.
//!
//! Prints `mock-provider listening on http://ADDR` on stdout once bound, so
//! scripts can wait for that line. Logs go to stderr, filtered by RUST_LOG.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use loadtest::mock::{MockConfig, MockProvider};
use tracing_subscriber::EnvFilter;

/// Mock OpenAI-compatible provider with ground truth, for Warden's tests and load runs.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// Require `Authorization: Bearer <KEY>` on API requests.
    #[arg(long)]
    api_key: Option<String>,
    /// Completion tokens per answer when a request's `mock.tokens` is absent.
    #[arg(long, default_value_t = 16)]
    tokens: u32,
    /// Microseconds between streamed tokens when `mock.token_delay_us` is absent.
    #[arg(long, default_value_t = 0)]
    token_delay_us: u64,
    /// Folder of recorded exchanges for `mock.replay`.
    #[arg(long)]
    fixtures: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();

    let config = MockConfig {
        api_key: args.api_key,
        default_tokens: args.tokens,
        default_token_delay: Duration::from_micros(args.token_delay_us),
        fixtures: args.fixtures,
    };
    let mock = MockProvider::start(args.listen, config).await?;
    println!("mock-provider listening on http://{}", mock.addr());

    shutdown_signal().await?;
    tracing::info!("mock provider shutting down");
    drop(mock);
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted,
        _ = terminate.recv() => Ok(()),
    }
}
