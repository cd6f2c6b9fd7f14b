//! Criterion benches of the hot path's two halves:
//!
//! - `relay/*`: what the relay does per SSE event: frame it out of the upstream
//!   bytes, parse its data, meter it, hand the same bytes on.
//! - `admission/*`: what a non-streamed request costs before it is forwarded:
//!   authenticate the key, inspect the body, route the model, rewrite.
//!
//! Run with `cargo bench --bench relay`. Figures are in docs/benchmarks.md.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use http::HeaderMap;
use warden::agents::Registry;
use warden::budget::{Amount, Budgets, SystemClock};
use warden::config::Config;
use warden::identity::Identities;
use warden::metering::{StreamFormat, StreamMeter};
use warden::proxy::sse::{self, Framer};
use warden::proxy::{Endpoint, Routes, inspect, rewrite};
use warden::store::Store;
use warden::store::control::ControlStore;

/// Counts heap allocations, to report how many the relay path makes per event.
struct CountingAlloc;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers every call to the system allocator unchanged; only counts them.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds `GlobalAlloc::dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn fixture(name: &str) -> Bytes {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/provider-streams")
        .join(name)
        .join("response.sse");
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into()
}

/// Relays a whole recorded body the way `Relay` does, returning the bytes forwarded.
fn relay(body: &[u8], chunk: usize, format: StreamFormat) -> usize {
    let mut framer = Framer::default();
    let mut meter = StreamMeter::new(format, 100, 16_384);
    let mut forwarded = 0;

    for piece in body.chunks(chunk) {
        framer.push(piece);
        let mut end = 0;
        while let Some(next) = framer.event_end(end) {
            if let Some(data) = sse::parse(&framer.bytes()[end..next]).data.as_bytes() {
                black_box(meter.observe(data).expect("recorded events parse"));
            }
            end = next;
        }
        if end > 0 {
            forwarded += black_box(framer.take(end)).len();
        }
    }
    forwarded
}

fn bench_relay(c: &mut Criterion) {
    let mut group = c.benchmark_group("relay");
    let streams = [
        (
            "chat_text",
            "openai-chat-stream-text-01",
            StreamFormat::Chat,
        ),
        (
            "chat_tool_calls",
            "openai-chat-stream-tool-call-parallel-01",
            StreamFormat::Chat,
        ),
        (
            "responses_text",
            "openai-responses-stream-text-01",
            StreamFormat::Responses,
        ),
    ];

    for (label, name, format) in streams {
        let body = fixture(name);
        let events = body.windows(2).filter(|w| w == b"\n\n").count() as u64;
        group.throughput(Throughput::Elements(events));
        // Upstream reads usually carry one event; 64 KiB reads carry the whole body.
        group.bench_function(format!("{label}/per_event_reads"), |b| {
            b.iter(|| relay(&body, 400, format))
        });
        group.bench_function(format!("{label}/one_read"), |b| {
            b.iter(|| relay(&body, 64 * 1024, format))
        });

        // Allocations are the read buffer's: one read of the whole body shows what
        // framing and metering themselves allocate.
        for (reads, chunk) in [("400-byte", 400), ("one", 64 * 1024)] {
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            relay(&body, chunk, format);
            let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
            println!("{label}: {allocations} allocations for {events} events, {reads} reads");
        }
    }
    group.finish();
}

fn bench_admission(c: &mut Criterion) {
    let config = Config::load(None).expect("embedded config");
    // The embedded policy's demo lead.
    let key = "wdn-demo-agent-0001";
    let budgets = Budgets::new(Arc::new(SystemClock));
    let data = std::env::temp_dir().join(format!("warden-bench-{}", std::process::id()));
    let store = Store::open(&data).unwrap();
    let control = ControlStore::open(&store, &data).unwrap();
    let registry = Registry::restore(&config.policy, &budgets, &control).unwrap();
    let identities = Identities::new(&config.operator.key_sha256, &registry).unwrap();
    let routes = Routes::new(&config, 1).unwrap();

    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    let plain: Bytes = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Summarise the quarterly reconciliation report in three bullet points."}],"max_tokens":256,"temperature":0.2}"#.to_vec().into();
    let streamed: Bytes = br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Summarise the quarterly reconciliation report in three bullet points."}],"max_tokens":256}"#.to_vec().into();

    let mut group = c.benchmark_group("admission");
    for (label, body) in [("non_streamed", plain), ("streamed_with_rewrite", streamed)] {
        group.bench_function(label, |b| {
            b.iter_batched(
                || body.clone(),
                |body| {
                    let agent = identities.authenticate_agent(&headers).unwrap();
                    let inspected = inspect(Endpoint::Chat, &body).unwrap();
                    let route = routes.get(&inspected.model).unwrap();
                    assert!(agent.manifest().allows_model(&route.model));
                    black_box(rewrite(Endpoint::Chat, body.clone(), &inspected).unwrap())
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// The budget check of the request path: reserve the worst case (agent and ancestors
/// in one step), then settle with the actual cost.
fn bench_budget(c: &mut Criterion) {
    let budgets = Budgets::new(Arc::new(SystemClock));
    budgets.add_root(1, Amount(1_000_000_000_000_000));
    budgets.delegate(1, 2, Amount(100_000_000_000_000)).unwrap();
    budgets.delegate(2, 3, Amount(10_000_000_000_000)).unwrap();

    c.bench_function("budget/reserve_settle_depth_2", |b| {
        b.iter(|| {
            let held = budgets
                .reserve_up_to(3, Amount(1_000), black_box(Amount(10_000_000)))
                .unwrap();
            held.settle(Amount::ZERO);
        })
    });
}

/// The evidence ledger: sealing one entry (canonical encoding, SHA-256, Ed25519), and
/// appending one decision durably (a SQLite transaction in WAL mode).
fn bench_ledger(c: &mut Criterion) {
    use warden::ledger::{Entry, GENESIS};
    use warden::store::control::DecisionRow;

    let data = std::env::temp_dir().join(format!("warden-bench-ledger-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let store = Store::open(&data).unwrap();
    let control = ControlStore::open(&store, &data).unwrap();
    let details = serde_json::json!({"agent_id": "agt_0000000000000001", "parent": "spiffe://bench.local/agent/b/lead",
        "slice_usd": "50", "scopes": ["market_data.read", "models.standard"], "trust": "WATCHED"});

    let entry = Entry {
        seq: 1,
        time: "2026-12-03T00:00:00.000Z".into(),
        kind: "spawn".into(),
        actor: "spiffe://bench.local/agent/b/lead".into(),
        subject: "spiffe://bench.local/agent/b/data-fetcher-01".into(),
        details: details.clone(),
        prev: GENESIS.into(),
    };
    let signer = control.signer();
    c.bench_function("ledger/seal_entry", |b| {
        b.iter(|| signer.seal(black_box(&entry)))
    });

    let decision = DecisionRow {
        time: "2026-12-03T00:00:00.000Z".into(),
        kind: "spawn",
        actor: "spiffe://bench.local/agent/b/lead".into(),
        subject: "spiffe://bench.local/agent/b/data-fetcher-01".into(),
        details,
    };
    c.bench_function("ledger/append_durable", |b| {
        b.iter(|| control.record(black_box(&decision)).unwrap())
    });

    // Eight callers appending at once, as spawns in flight do: the time per append
    // when queued appends share a commit (and its fsync).
    let control = std::sync::Arc::new(control);
    c.bench_function("ledger/append_durable_8_callers", |b| {
        b.iter_custom(|iters| {
            let per_caller = iters.div_ceil(8);
            let start = std::time::Instant::now();
            let callers: Vec<_> = (0..8)
                .map(|_| {
                    let (control, decision) = (std::sync::Arc::clone(&control), decision.clone());
                    std::thread::spawn(move || {
                        for _ in 0..per_caller {
                            control.record(&decision).unwrap();
                        }
                    })
                })
                .collect();
            for caller in callers {
                caller.join().unwrap();
            }
            start
                .elapsed()
                .mul_f64(iters as f64 / (per_caller * 8) as f64)
        })
    });
    let _ = std::fs::remove_dir_all(&data);
}

criterion_group!(
    benches,
    bench_relay,
    bench_admission,
    bench_budget,
    bench_ledger
);
criterion_main!(benches);
