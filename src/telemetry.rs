//! Telemetry: Prometheus metrics and the tracing subscriber.
//!
//! Metrics live in one private registry rendered as Prometheus text at `/metrics`.
//! Spend is a float counter for dashboards only; the exact figures (decimal USD)
//! are in the usage records.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder, exponential_buckets,
};

/// Every metric Warden exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by agent, model, endpoint and outcome status.
    pub requests: IntCounterVec,
    /// Tokens by agent, model and kind (input, cached_input, output).
    pub tokens: IntCounterVec,
    /// Spend in USD by agent and model.
    pub spend: prometheus::CounterVec,
    /// Time from sending a request upstream to its response headers, by provider.
    pub upstream_latency: HistogramVec,
    /// Time Warden itself adds to a request (everything but waiting on the provider).
    pub overhead: Histogram,
    /// Time from the request's arrival to the first streamed event sent, by model.
    pub ttft: HistogramVec,
    /// Streams being relayed right now.
    pub open_streams: IntGauge,
    /// Usage records waiting to be written to SQLite.
    pub usage_backlog: IntGauge,
    /// Control-store writes waiting for their commit.
    pub control_queue: IntGauge,
    /// Ledger entries not yet acknowledged by each SIEM sink.
    pub sink_lag: prometheus::IntGaugeVec,
    /// Ledger entries each SIEM sink's receiver refused for good.
    pub sink_dropped: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();

        let requests = IntCounterVec::new(
            Opts::new("warden_requests_total", "Data-plane requests by outcome."),
            &["agent", "model", "endpoint", "status"],
        )
        .expect("static metric definition is valid");
        let tokens = IntCounterVec::new(
            Opts::new("warden_tokens_total", "Tokens metered, by kind."),
            &["agent", "model", "kind"],
        )
        .expect("static metric definition is valid");
        let spend = prometheus::CounterVec::new(
            Opts::new("warden_spend_usd_total", "Metered spend in US dollars."),
            &["agent", "model"],
        )
        .expect("static metric definition is valid");

        // 50 µs to ~100 s: upstream latency spans network round trips to long generations.
        let upstream_latency = HistogramVec::new(
            HistogramOpts::new(
                "warden_upstream_latency_seconds",
                "Time from sending a request upstream to its response headers.",
            )
            .buckets(exponential_buckets(0.00005, 2.0, 22).expect("valid buckets")),
            &["provider"],
        )
        .expect("static metric definition is valid");
        // 1 µs to ~30 ms: Warden's own share of a request.
        let overhead = Histogram::with_opts(
            HistogramOpts::new(
                "warden_proxy_overhead_seconds",
                "Time Warden adds to a request, excluding the wait on the provider.",
            )
            .buckets(exponential_buckets(0.000001, 2.0, 16).expect("valid buckets")),
        )
        .expect("static metric definition is valid");
        let ttft = HistogramVec::new(
            HistogramOpts::new(
                "warden_time_to_first_token_seconds",
                "Time from a streamed request's arrival to its first event at the client.",
            )
            .buckets(exponential_buckets(0.0001, 2.0, 20).expect("valid buckets")),
            &["model"],
        )
        .expect("static metric definition is valid");
        let open_streams = IntGauge::new("warden_open_streams", "Streams being relayed.")
            .expect("static metric definition is valid");
        let usage_backlog = IntGauge::new(
            "warden_usage_backlog",
            "Usage records accepted but not yet committed to SQLite.",
        )
        .expect("static metric definition is valid");

        let control_queue = IntGauge::new(
            "warden_control_writes_queued",
            "Control-store writes (decisions, agent changes, leases) waiting for their commit.",
        )
        .expect("static metric definition is valid");

        let sink_lag = prometheus::IntGaugeVec::new(
            Opts::new(
                "warden_sink_lag_entries",
                "Ledger entries a SIEM sink has not acknowledged yet.",
            ),
            &["sink"],
        )
        .expect("static metric definition is valid");

        let sink_dropped = IntCounterVec::new(
            Opts::new(
                "warden_sink_dropped_entries_total",
                "Ledger entries a SIEM receiver refused for good (logged and skipped).",
            ),
            &["sink"],
        )
        .expect("static metric definition is valid");

        let metrics = Metrics {
            registry,
            requests,
            tokens,
            spend,
            upstream_latency,
            overhead,
            ttft,
            open_streams,
            usage_backlog,
            control_queue,
            sink_lag,
            sink_dropped,
        };
        metrics.register();
        metrics
    }

    fn register(&self) {
        let collectors: [Box<dyn prometheus::core::Collector>; 11] = [
            Box::new(self.requests.clone()),
            Box::new(self.tokens.clone()),
            Box::new(self.spend.clone()),
            Box::new(self.upstream_latency.clone()),
            Box::new(self.overhead.clone()),
            Box::new(self.ttft.clone()),
            Box::new(self.open_streams.clone()),
            Box::new(self.usage_backlog.clone()),
            Box::new(self.control_queue.clone()),
            Box::new(self.sink_lag.clone()),
            Box::new(self.sink_dropped.clone()),
        ];
        for collector in collectors {
            self.registry
                .register(collector)
                .expect("each metric name is registered once");
        }
    }

    /// Exports the control store's commit counters.
    pub fn watch_control_store(&self, stats: &crate::store::control::Stats) {
        for counter in [&stats.groups, &stats.writes] {
            self.registry
                .register(Box::new(counter.clone()))
                .expect("each metric name is registered once");
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding into a Vec cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Installs the global tracing subscriber: human-readable lines on stderr, filtered by
/// `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
