//! Weir: a stream-processing runtime whose operators are WebAssembly
//! components.
//!
//! The host owns records, keyed state, timers, watermarks and snapshots; a
//! plugin (a component targeting the `weir:operator` WIT world) owns only its
//! per-record logic. Principal pieces:
//!
//! - [`types`]: records, [`types::RecordBatch`], [`types::StreamEvent`], key groups (leaf module).
//! - [`job`]: the job file and its validation into a [`job::JobGraph`].
//! - [`dataflow`]: subtasks as tokio tasks, channels, partitioning, watermarks, timers.
//! - [`state`]: [`state::StateBackend`] (RocksDB, memory) and [`state::KeyedState`].
//! - [`plugin`]: wasmtime, the compile cache, host imports, [`plugin::WasmOperator`].
//! - [`connectors`]: sources and sinks.
//! - [`protocol`]: what travels between subtasks and the checkpoint coordinator.
//! - [`checkpoint`]: the checkpoint coordinator, snapshot storage, `_metadata`, restore.
//! - [`restart`]: restart strategies (when and whether a failed job restarts).
//! - [`roots`]: the directories a job of the running host may name paths in, opened through cap-std.
//! - [`runner`]: the embedded runner behind `weir run`.
//! - [`control`]: the running host behind `weir serve` (API, plugin store, jobs, upgrades).
//! - [`cli`]: the command line.

pub mod checkpoint;
pub mod cli;
pub mod connectors;
pub mod control;
pub mod dataflow;
pub mod failpoints;
pub mod human;
pub mod job;
pub mod layers;
pub mod plugin;
pub mod prometheus;
pub mod protocol;

pub mod roots;
pub mod runner;
pub mod state;
pub mod types;
