//! The dataflow runtime: one tokio task per subtask (a thread for a chain
//! with a Wasm operator), bounded channels between them (backpressure), key
//! partitioning, watermarks and timers.
//!
//! - [`operator`]: the [`Operator`] trait every operator implements (Wasm
//!   plugins and native ones alike) and the [`TaskContext`] it owns.
//! - [`output`]: the [`Collector`] that partitions emitted records onto
//!   downstream channels.
//! - [`input`]: the [`InputGate`] that reads a subtask's input channels and
//!   tracks the watermark as the minimum over them.
//! - [`alignment`]: barrier alignment as a pure state machine ([`Aligner`]).
//! - [`timers`]: event-time and processing-time timers per key.
//! - [`task`]: the loops of source, operator and sink subtasks.
//! - [`chain_thread`]: the thread each operator chain subtask runs on.
//! - [`metrics`]: their live counters, per node and subtask.
//! - [`runtime`]: builds channels and tasks from a job graph and runs them.
//!
//! Invariant: this module never names wasmtime or RocksDB; it speaks the
//! plain types of [`crate::types`] and the traits defined here.

pub mod alignment;
pub mod chain_thread;
pub mod input;
pub mod metrics;
pub mod operator;
pub mod output;
pub mod runtime;
pub mod task;
pub mod timers;

pub use alignment::{Aligner, Alignment};
pub use input::InputGate;
pub use operator::{
    FailureKind, Operator, OperatorError, Sink, Source, SourceStatus, TaskContext, TaskError,
    TaskInfo,
};
pub use output::Collector;
pub use runtime::{JobOutcome, NodeMetrics, TaskFactory};
pub use timers::{FiredTimer, TimeDomain, TimerService, now_millis};
