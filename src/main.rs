//! The `warden` command: parses arguments, loads configuration, starts telemetry and
//! runs the server until SIGTERM or SIGINT. The server brings its own runtimes (one
//! per worker thread), so `main` is synchronous.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ed25519_dalek::VerifyingKey;
use warden::config::Config;
use warden::ledger;
use warden::server::Server;
use warden::store::control;

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
    /// Verify every entry and checkpoint: encoding, sequence, chain, signatures, key
    /// succession and Merkle roots. Exits non-zero and names the first bad entry if
    /// anything is wrong.
    Verify {
        /// The SQLite database.
        #[arg(long, default_value = "data/warden.db", conflicts_with = "jsonl")]
        db: PathBuf,
        /// An exported JSON-lines file instead of the database.
        #[arg(long)]
        jsonl: Option<PathBuf>,
        /// An inclusion proof from `warden ledger prove` instead of a ledger.
        #[arg(long, conflicts_with_all = ["jsonl", "witness"])]
        proof: Option<PathBuf>,
        /// A checkpoint kept outside the ledger (from `GET /v1/ledger/checkpoint`) that
        /// the ledger must still hold, unchanged; repeatable. Catches a tail cut off
        /// together with the checkpoints over it.
        #[arg(long)]
        witness: Vec<PathBuf>,
        /// The ledger's first public key (keys a rotation introduced follow from the
        /// ledger); repeatable. Default: every `ledger-public*.key` beside the ledger.
        #[arg(long = "public-key")]
        public_keys: Vec<PathBuf>,
    },
    /// Print an inclusion proof of entry `seq` against the latest checkpoint.
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
        /// As for `verify`.
        #[arg(long = "public-key")]
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
        Some(Command::Ledger { command }) => return ledger_command(command),
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

fn ledger_command(command: LedgerCommand) -> ExitCode {
    match run_ledger(command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("warden ledger: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_ledger(command: LedgerCommand) -> anyhow::Result<ExitCode> {
    match command {
        LedgerCommand::Verify {
            db,
            jsonl,
            proof,
            witness,
            public_keys,
        } => {
            let keys = read_public_keys(&public_keys, jsonl.as_deref().unwrap_or(&db))?;
            let witnesses = witness
                .iter()
                .map(|path| read_json(path))
                .collect::<anyhow::Result<Vec<_>>>()?;
            match (proof, jsonl) {
                (Some(proof), _) => check_proof(&read_json(&proof)?, &keys),
                (None, Some(jsonl)) => verify(&read_export(&jsonl)?, &keys, &witnesses),
                (None, None) => verify(&read_db(&db)?, &keys, &witnesses),
            }
        }
        LedgerCommand::Prove { seq, db } => prove(&read_db(&db)?, seq),
        LedgerCommand::Custody {
            spiffe_id,
            db,
            public_keys,
        } => custody(
            &read_db(&db)?,
            &read_public_keys(&public_keys, &db)?,
            &spiffe_id,
        ),
        LedgerCommand::Export { db, out } => export(&read_db(&db)?, out.as_deref()),
    }
}

/// Checks entries, checkpoints and witnesses; prints the first thing wrong, if anything
/// is.
fn verify(
    ledger: &Ledger,
    keys: &[VerifyingKey],
    witnesses: &[ledger::Checkpoint],
) -> anyhow::Result<ExitCode> {
    let (entries, checkpoints) = ledger;
    let checked = check(ledger, keys).and_then(|history| {
        witnesses
            .iter()
            .try_for_each(|w| ledger::verify_witness(entries, w, &history))?;
        Ok(history.first_key_id())
    });
    match checked {
        Ok(first_key) => {
            println!(
                "ledger ok: {} entries verified, {} checkpoints, first key {}",
                entries.len(),
                checkpoints.len(),
                first_key.as_deref().unwrap_or("-")
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(broken) => {
            println!("ledger broken: {broken}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Verifies entries and checkpoints; returns the keys in the order they signed.
fn check(
    (entries, checkpoints): &Ledger,
    keys: &[VerifyingKey],
) -> Result<ledger::KeyHistory, ledger::Broken> {
    let history = ledger::verify(entries, keys)?;
    ledger::verify_checkpoints(entries, checkpoints, &history)?;
    Ok(history)
}

/// Prints the inclusion proof of entry `seq` against the latest checkpoint, which is
/// signed by the newest key.
fn prove((entries, checkpoints): &Ledger, seq: u64) -> anyhow::Result<ExitCode> {
    let checkpoint = checkpoints
        .last()
        .filter(|c| c.size >= seq)
        .ok_or_else(|| anyhow::anyhow!("no checkpoint covers entry {seq} yet"))?;
    let proof = ledger::prove(entries, checkpoint, seq)
        .ok_or_else(|| anyhow::anyhow!("entry {seq} is not in the ledger"))?;
    println!("{}", serde_json::to_string_pretty(&proof)?);
    Ok(ExitCode::SUCCESS)
}

/// Prints an agent's chain of custody, one entry per line, once the ledger verifies.
fn custody(ledger: &Ledger, keys: &[VerifyingKey], spiffe_id: &str) -> anyhow::Result<ExitCode> {
    if let Err(broken) = check(ledger, keys) {
        println!("ledger broken: {broken}");
        return Ok(ExitCode::FAILURE);
    }

    let chain = ledger::custody(&ledger.0, spiffe_id);
    if chain.is_empty() {
        println!("no entries about {spiffe_id}");
        return Ok(ExitCode::FAILURE);
    }
    for entry in chain {
        println!("{}", serde_json::to_string(&entry)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn export((entries, checkpoints): &Ledger, out: Option<&Path>) -> anyhow::Result<ExitCode> {
    let mut text = String::new();
    for item in ledger::export(entries, checkpoints) {
        text.push_str(&serde_json::to_string(&item)?);
        text.push('\n');
    }
    match out {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The keys in `paths`; without any, every ledger public key beside `ledger` (the
/// current `ledger-public.key` and those rotations archived as
/// `ledger-public.<key id>.key`), so a ledger that rotated verifies from its first key.
fn read_public_keys(paths: &[PathBuf], ledger: &Path) -> anyhow::Result<Vec<VerifyingKey>> {
    let paths = if paths.is_empty() {
        public_keys_beside(ledger)?
    } else {
        paths.to_vec()
    };
    Ok(paths
        .iter()
        .map(|p| ledger::read_public_key(p))
        .collect::<Result<_, _>>()?)
}

fn public_keys_beside(ledger: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let dir = match ledger.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let listing = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut keys = Vec::new();
    for file in listing {
        let path = file?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("ledger-public.") && name.ends_with(".key") {
            keys.push(path);
        }
    }
    anyhow::ensure!(
        !keys.is_empty(),
        "no ledger-public.key in {}: pass --public-key",
        dir.display()
    );
    Ok(keys)
}

/// The ledger's entries and checkpoints, read in one transaction so a running Warden
/// cannot add a checkpoint between the two reads.
fn read_db(path: &Path) -> anyhow::Result<Ledger> {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    let mut conn = rusqlite::Connection::open_with_flags(path, flags)
        .with_context(|| format!("opening {}", path.display()))?;
    let snapshot = conn.transaction()?;
    let entries = control::read_ledger(&snapshot)?;
    let checkpoints = control::read_checkpoints(&snapshot)?;
    Ok((entries, checkpoints))
}

fn check_proof(proof: &ledger::InclusionProof, keys: &[VerifyingKey]) -> anyhow::Result<ExitCode> {
    match ledger::verify_proof(proof, keys) {
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

type Ledger = (Vec<ledger::StoredEntry>, Vec<ledger::Checkpoint>);

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))
}

fn read_export(path: &Path) -> anyhow::Result<Ledger> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    ledger::read_export(&text).map_err(|why| anyhow::anyhow!("{}: {why}", path.display()))
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
