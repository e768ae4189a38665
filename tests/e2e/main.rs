//! End-to-end tests: real jobs of real components (built by `weir-tests`'
//! build script with the wasm32-wasip2 toolchain), run through the library
//! and through the `weir` binary. One integration test binary for the whole
//! workspace keeps link time down.

mod api_fuzz;
mod build_sharing;
mod chaining;
mod checkpoints;
mod cli;
mod cluster;
mod event_time;
mod exchange;
mod faults;
mod host;
mod kafka;
mod languages;
mod nats;
mod s3;
mod savepoints;
mod support;
mod ttl;
mod upgrades;
mod wordcount;
