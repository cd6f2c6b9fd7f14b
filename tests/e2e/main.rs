//! End-to-end tests: the real `warden` binary between real clients (async-openai,
//! reqwest, curl) and the mock provider, all on loopback.

mod common;

mod agents;
mod budgets;
mod chat;
mod errors;
mod fleet;
mod ledger;
mod lifecycle;
mod other_endpoints;
mod policy;
mod replay;
mod sinks;
