//! Load and correctness tooling for Warden, in the order a test run uses it.
//!
//! - [`mock`]: an OpenAI-compatible mock provider that records the ground
//!   truth of every exchange (tokens received, generated, sent), with fault
//!   injection and replay of recorded provider streams. Warden's tests start
//!   it in-process; the `mock-provider` binary runs it standalone.
//! - [`loadgen`]: drives the same workload straight at the mock and then
//!   through Warden, and reports latency, time to first token, inter-event
//!   gaps and throughput for both and their difference (`loadgen` binary).

pub mod loadgen;
pub mod mock;
