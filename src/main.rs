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
    /// Work with the evidence ledger offline.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
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

#[derive(Subcommand)]
enum LedgerCommand {
    /// Verify every entry: encoding, sequence, chain and signatures. Exits non-zero
    /// and names the first bad entry if anything is wrong.
    Verify {
        /// The SQLite database.
        #[arg(long, default_value = "data/warden.db", conflicts_with = "jsonl")]
        db: PathBuf,
        /// An exported JSON-lines file instead of the database.
        #[arg(long)]
        jsonl: Option<PathBuf>,
        /// An inclusion proof from `warden ledger prove` instead of a ledger.
        #[arg(long, conflicts_with_all = ["jsonl"])]
        proof: Option<PathBuf>,
        /// The public key(s) entries may be signed with.
        #[arg(long = "public-key", default_value = "data/ledger-public.key")]
        public_keys: Vec<PathBuf>,
    },
    /// Print an inclusion proof of entry `seq` against the latest checkpoint covering it.
    Prove {
        seq: u64,
        #[arg(long, default_value = "data/warden.db")]
        db: PathBuf,
    },
    /// An agent's chain of custody: its ancestors' spawns, its own spawn (what its
    /// parent granted) and every decision about it since. Verifies the ledger first.
    Custody {
        /// The agent's SPIFFE ID.
        spiffe_id: String,
        #[arg(long, default_value = "data/warden.db")]
        db: PathBuf,
        #[arg(long = "public-key", default_value = "data/ledger-public.key")]
        public_keys: Vec<PathBuf>,
    },
    /// Write the ledger as JSON lines: every entry, and each checkpoint after the last
    /// entry it covers.
    Export {
        #[arg(long, default_value = "data/warden.db")]
        db: PathBuf,
        /// Output file; standard output when absent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    warden::telemetry::init_tracing();
    let cli = Cli::parse();
    let (config, listen) = match cli.command {
        Some(Command::Serve { config, listen }) => (config, listen),
        Some(Command::Ledger { command }) => return ledger(command),
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

fn ledger(command: LedgerCommand) -> ExitCode {
    match run_ledger(command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("warden ledger: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_ledger(command: LedgerCommand) -> anyhow::Result<ExitCode> {
    use warden::ledger;

    match command {
        LedgerCommand::Verify {
            db,
            jsonl,
            proof,
            public_keys,
        } => {
            let keys = public_keys
                .iter()
                .map(|p| ledger::read_public_key(p))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(path) = proof {
                return check_proof(&path, &keys);
            }

            let (entries, checkpoints) = match jsonl {
                Some(path) => read_export(&path)?,
                None => (read_db(&db)?, read_checkpoints(&db)?),
            };
            let trusted = ledger::rotated_keys(&entries, &keys);
            let verified = ledger::verify(&entries, &keys).and_then(|n| {
                ledger::verify_checkpoints(&entries, &checkpoints, &trusted).map(|()| n)
            });
            match verified {
                Ok(n) => {
                    println!(
                        "ledger ok: {n} entries verified, {} checkpoints",
                        checkpoints.len()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(broken) => {
                    println!("ledger broken: {broken}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        LedgerCommand::Prove { seq, db } => {
            let entries = read_db(&db)?;
            let checkpoint = read_checkpoints(&db)?
                .into_iter()
                .find(|c| c.size >= seq)
                .ok_or_else(|| anyhow::anyhow!("no checkpoint covers entry {seq} yet"))?;
            let proof = ledger::prove(&entries, &checkpoint, seq)
                .ok_or_else(|| anyhow::anyhow!("entry {seq} is not in the ledger"))?;
            println!("{}", serde_json::to_string_pretty(&proof)?);
            Ok(ExitCode::SUCCESS)
        }
        LedgerCommand::Custody {
            spiffe_id,
            db,
            public_keys,
        } => {
            let keys = public_keys
                .iter()
                .map(|p| ledger::read_public_key(p))
                .collect::<Result<Vec<_>, _>>()?;
            let entries = read_db(&db)?;
            if let Err(broken) = ledger::verify(&entries, &keys) {
                println!("ledger broken: {broken}");
                return Ok(ExitCode::FAILURE);
            }
            let chain = ledger::custody(&entries, &spiffe_id);
            if chain.is_empty() {
                println!("no entries about {spiffe_id}");
                return Ok(ExitCode::FAILURE);
            }
            for entry in chain {
                println!("{}", serde_json::to_string(&entry)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        LedgerCommand::Export { db, out } => {
            let mut text = String::new();
            for item in ledger::export(&read_db(&db)?, &read_checkpoints(&db)?) {
                text.push_str(&serde_json::to_string(&item)?);
                text.push('\n');
            }
            match out {
                Some(path) => std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn read_db(path: &std::path::Path) -> anyhow::Result<Vec<warden::ledger::StoredEntry>> {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    let conn = rusqlite::Connection::open_with_flags(path, flags)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok(warden::store::control::read_ledger(&conn)?)
}

fn read_checkpoints(path: &std::path::Path) -> anyhow::Result<Vec<warden::ledger::Checkpoint>> {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    let conn = rusqlite::Connection::open_with_flags(path, flags)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok(warden::store::control::read_checkpoints(&conn)?)
}

fn check_proof(
    path: &std::path::Path,
    keys: &[ed25519_dalek::VerifyingKey],
) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let proof: warden::ledger::InclusionProof = serde_json::from_str(&text)?;
    match warden::ledger::verify_proof(&proof, keys) {
        Ok(()) => {
            let size = proof.checkpoint.size;
            println!(
                "proof ok: entry {} is in the ledger of checkpoint {size}",
                proof.seq
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(why) => {
            println!("proof broken: {why}");
            Ok(ExitCode::FAILURE)
        }
    }
}

type Ledger = (
    Vec<warden::ledger::StoredEntry>,
    Vec<warden::ledger::Checkpoint>,
);

fn read_export(path: &std::path::Path) -> anyhow::Result<Ledger> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    warden::ledger::read_export(&text).map_err(|why| anyhow::anyhow!("{}: {why}", path.display()))
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
