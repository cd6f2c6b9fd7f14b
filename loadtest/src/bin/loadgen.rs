//! Drives the same workload at the mock directly and then through Warden,
//! and prints both and the difference. The logic lives in `loadtest::loadgen`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use loadtest::loadgen::{self, Endpoint, LoadConfig, Mode, Target, Workload};
use tracing_subscriber::EnvFilter;

/// Load generator comparing direct-to-provider with through-Warden.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Base URL of the provider reached directly, including /v1 (loopback only).
    #[arg(long, required_unless_present = "spawn")]
    direct: Option<String>,
    /// Key for the direct target.
    #[arg(long, default_value = "mock")]
    direct_key: String,
    /// Base URL of Warden, including /v1 (loopback only); omit to measure direct only.
    #[arg(long)]
    warden: Option<String>,
    /// Key for Warden; no Authorization header when absent.
    #[arg(long)]
    warden_key: Option<String>,
    /// closed: fixed concurrency; rate: fixed arrival rate (open loop).
    #[arg(long, value_enum, default_value_t = ModeArg::Closed)]
    mode: ModeArg,
    /// Requests in flight in closed mode.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Requests per second in rate mode.
    #[arg(long, required_if_eq("mode", "rate"))]
    rate: Option<f64>,
    /// Most requests outstanding in rate mode.
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
    /// Measured requests per target.
    #[arg(long, default_value_t = 10_000)]
    requests: u64,
    /// Hard cap on each target's measured phase, in seconds.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Unrecorded requests per target before measuring.
    #[arg(long, default_value_t = 500)]
    warmup: u64,
    /// Per-request timeout, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    #[arg(long, value_enum, default_value_t = Endpoint::Chat)]
    endpoint: Endpoint,
    /// Ask for streamed answers (chat, responses).
    #[arg(long)]
    stream: bool,
    /// Completion tokens per answer (`mock.tokens`).
    #[arg(long)]
    tokens: Option<u32>,
    /// Microseconds between streamed tokens (`mock.token_delay_us`).
    #[arg(long)]
    token_delay_us: Option<u64>,
    #[arg(long, default_value = "gpt-4o-mini")]
    model: String,
    /// Ground-truth tag prefix; each target's requests carry `<tag>-<target>`.
    #[arg(long, default_value = "loadgen")]
    tag: String,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Do not print the live progress line.
    #[arg(long)]
    no_progress: bool,
    /// The spawn scenario instead: this many sub-agents spawned through `--warden`
    /// with `--warden-key` (a lead's key), `--concurrency` at a time, then ended.
    #[arg(long, requires = "warden")]
    spawn: Option<usize>,
    /// The parent of the spawned agents: the lead's name, id or SPIFFE ID.
    #[arg(long, default_value = "lead")]
    parent: String,
    /// Each spawned agent's daily slice, a decimal string.
    #[arg(long, default_value = "1.00")]
    slice: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Closed,
    Rate,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    match run(Args::parse()).await {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("loadgen: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<Box<dyn std::fmt::Display>, Box<dyn std::error::Error>> {
    let json = args.json.clone();
    let (report, value): (Box<dyn std::fmt::Display>, serde_json::Value) = match args.spawn {
        Some(agents) => {
            let report = loadgen::run_spawn(&spawn_config(&args, agents)?).await?;
            let value = serde_json::to_value(&report)?;
            (Box::new(report), value)
        }
        None => {
            let report = loadgen::run(&config(args)?).await?;
            let value = serde_json::to_value(&report)?;
            (Box::new(report), value)
        }
    };
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_vec_pretty(&value)?)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(report)
}

fn spawn_config(args: &Args, agents: usize) -> Result<loadgen::SpawnConfig, loadgen::LoadError> {
    let url = args.warden.as_deref().unwrap_or_default();
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(loadgen::SpawnConfig {
        warden: Target::new("warden", url, args.warden_key.as_deref())?,
        parent: args.parent.clone(),
        agents,
        concurrency: args.concurrency,
        slice: args.slice.clone(),
        prefix: format!("lg{run}"),
    })
}

fn config(args: Args) -> Result<LoadConfig, loadgen::LoadError> {
    let mode = match args.mode {
        ModeArg::Closed => Mode::Closed {
            concurrency: args.concurrency,
        },
        ModeArg::Rate => Mode::Rate {
            rate: args.rate.unwrap_or(0.0),
            max_in_flight: args.max_in_flight,
        },
    };
    let warden = args
        .warden
        .as_deref()
        .map(|url| Target::new("warden", url, args.warden_key.as_deref()));
    Ok(LoadConfig {
        direct: Target::new(
            "direct",
            args.direct.as_deref().unwrap_or_default(),
            Some(&args.direct_key),
        )?,
        warden: warden.transpose()?,
        mode,
        workload: Workload {
            endpoint: args.endpoint,
            stream: args.stream,
            model: args.model,
            tokens: args.tokens,
            token_delay_us: args.token_delay_us,
            tag: args.tag,
        },
        requests: args.requests,
        duration: Duration::from_secs(args.duration_secs),
        warmup: args.warmup,
        timeout: Duration::from_secs(args.timeout_secs),
        progress: !args.no_progress,
    })
}
