//! Why the relay meters output with a byte bound rather than an exact BPE count.
//!
//! When a stream ends without provider usage, Warden needs a token count that is never
//! below the truth. Two candidates: the byte length of the streamed text (every token
//! of a byte-level BPE covers at least one byte) and an exact o200k count with the
//! `bpe-openai` crate. This bench measures both on the text of recorded streams, per
//! event as the relay would meter it, and checks the bound holds on that text.
//!
//! Run with `cargo bench --features bpe-bench --bench tokens`.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// The text deltas of a recorded chat stream, in order.
fn deltas(name: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/provider-streams")
        .join(name)
        .join("response.sse");
    let body = std::fs::read_to_string(&path).unwrap();
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| {
            let delta = &v["choices"][0]["delta"];
            let text = delta["content"].as_str().or(delta["reasoning"].as_str())?;
            (!text.is_empty()).then(|| text.to_owned())
        })
        .collect()
}

fn bench_counting(c: &mut Criterion) {
    let bpe = bpe_openai::o200k_base();
    let mut events = deltas("openai-chat-stream-text-01");
    events.extend(deltas("groq-chat-stream-reasoning-tool-call-01"));
    let whole: String = events.concat();

    // The bound must hold on real text, event by event and in total.
    for event in &events {
        assert!(bpe.count(event) <= event.len(), "{event:?}");
    }
    assert!(bpe.count(&whole) <= whole.len());

    let mut group = c.benchmark_group("tokens");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("byte_bound_per_event", |b| {
        b.iter(|| {
            events
                .iter()
                .map(|e| black_box(e.as_str()).len())
                .sum::<usize>()
        })
    });
    group.bench_function("bpe_o200k_per_event", |b| {
        b.iter(|| {
            events
                .iter()
                .map(|e| bpe.count(black_box(e)))
                .sum::<usize>()
        })
    });
    group.finish();

    println!(
        "text: {} events, {} bytes, {} o200k tokens (bound/exact = {:.2})",
        events.len(),
        whole.len(),
        bpe.count(&whole),
        whole.len() as f64 / bpe.count(&whole) as f64
    );
}

criterion_group!(benches, bench_counting);
criterion_main!(benches);
