//! Warden: a streaming, inline LLM-proxy firewall for fleets of AI agents.
//!
//! Agents point their OpenAI base URL at Warden. Every request is tied to the
//! agent's SPIFFE ID, forwarded to the provider that serves its model, relayed back
//! event by event, and metered in US dollars as it flows.
//!
//! The modules, in the order a request meets them:
//!
//! - [`server`]: the listener, the routes and graceful shutdown; owns the shared state.
//! - [`identity`]: the bearer key names the calling agent.
//! - [`policy`]: the operator's leads, scope catalogue and delegation rules.
//! - [`agents`]: the registry of leads and sub-agents; spawning and ending them.
//! - [`decisions`]: every delegation decision, recorded before it is acknowledged.
//! - [`proxy`]: the request path as phases: read, inspect, admit, rewrite, forward,
//!   relay (with [`proxy::sse`] framing the stream), settle.
//! - [`budget`]: every agent's limit, reservations before forwarding, settlement after.
//! - [`metering`]: tokens and cost per event and per request, from provider usage or a
//!   local upper bound.
//! - [`ledger`]: the signed, hash-chained evidence ledger every decision goes to.
//! - [`sinks`]: delivery of ledger entries to SIEM tooling, from durable cursors.
//! - [`store`]: the SQLite database and the write-behind usage log.
//! - [`telemetry`]: Prometheus metrics and tracing.
//! - [`error`]: the one mapping from every error to an OpenAI-shaped response.
//! - [`config`]: `warden.toml` and the price table, read once at startup.

pub mod agents;
pub mod budget;
pub mod config;
pub mod decisions;
pub mod error;
pub mod identity;
pub mod ledger;
pub mod metering;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod sinks;
pub mod store;
pub mod telemetry;
