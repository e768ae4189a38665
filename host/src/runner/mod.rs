//! The embedded runner: everything `weir run` does in one process, and
//! the engine path the running host drives too. Principal parts:
//!
//! - [`prepare`]: loads a job's plugins (validated, compiled, cached) and
//!   checks a restore point against the design's restore rules into a
//!   [`PreparedJob`]: what preparing produced, nothing the caller tunes.
//! - [`RunSettings`]: how the caller runs it (the running host holds
//!   commits on probation, hands over an upgrade's standby, discards a
//!   failed version's files); `weir run` takes the defaults.
//! - [`subtasks`]: the dataflow's [`TaskFactory`] with the connectors and
//!   [`WasmOperator`]s, each operator subtask's keyed state opened and
//!   restored; settling the sinks' files before an attempt.
//! - [`attempt`]: launching an [`Attempt`] and running attempts until the
//!   job ends, restarting failed ones from the latest completed checkpoint
//!   as the job's restart strategy allows, told to a [`RunObserver`].
//! - [`standby`]: an upgrade's new state restored ahead of the stop.

pub mod attempt;
pub mod prepare;
pub mod standby;
pub mod subtasks;

pub use attempt::{
    Attempt, AttemptHook, RunObserver, check_connectors, launch, launch_with_native, run,
    run_observed, run_with_native,
};
pub use prepare::{
    PreparedJob, RunOptions, checkpoint_remote, checkpoint_root, prepare, prepare_as, prepare_with,
};
pub use standby::Standby;
pub use subtasks::NativeOperator;

use std::path::Path;
use std::sync::Arc;

use crate::dataflow::metrics::JobMetrics;

use crate::checkpoint::CheckpointError;
use crate::dataflow::TaskError;
use crate::dataflow::runtime;
use crate::job::JobGraph;
use crate::plugin::{PluginEngine, PluginError};

/// Errors starting or running a job embedded.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Job(#[from] crate::job::JobError),
    #[error("operator `{uid}`: {cause}")]
    Plugin { uid: String, cause: PluginError },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("job `{job}` failed: {cause}")]
    Task { job: String, cause: TaskError },
    #[error("job `{job}` cannot start:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Connectors { job: String, problems: Vec<String> },
    #[error("job `{job}` failed for good ({reason}); the last failure: {cause}")]
    GaveUp {
        job: String,
        reason: String,
        cause: TaskError,
    },
}

impl RunError {
    /// The task failure behind this error, if it is one.
    pub fn task_error(&self) -> Option<&TaskError> {
        match self {
            RunError::Task { cause, .. } | RunError::GaveUp { cause, .. } => Some(cause),
            _ => None,
        }
    }
}

/// A new random job id (32 hex digits, like Flink's).
pub fn new_job_id() -> String {
    crate::checkpoint::storage::random_hex(16)
}

/// Loads, launches and runs a job file to its end: the library form of
/// `weir run` without progress output.
pub async fn run_file(engine: &PluginEngine, path: &Path) -> Result<runtime::JobOutcome, RunError> {
    let graph = JobGraph::load(path)?;
    let job = prepare(engine, graph)?;
    run(&job, &mut |_| {}).await
}

/// How a prepared job is run: what the running host asks of a run beyond
/// what `weir run` does. [`RunSettings::default`] is `weir run`'s.
#[derive(Debug)]
pub struct RunSettings {
    /// While it reads `true`, completed checkpoints are not committed by
    /// the sinks (see the coordinator's `commit_hold`): an upgrade's new
    /// version on probation.
    pub commit_hold: Option<tokio::sync::watch::Receiver<bool>>,
    /// Asked before the sinks commit each completed checkpoint (see the
    /// coordinator's [`CommitGate`](crate::checkpoint::coordinator::CommitGate)):
    /// a cluster job's fencing.
    pub commit_gate: Option<Arc<dyn crate::checkpoint::coordinator::CommitGate>>,
    /// The new version's state restored ahead by an upgrade (see
    /// [`Standby`]): subtasks it follows take their state from it.
    pub standby: Option<Arc<Standby>>,
    /// Ids of earlier runs whose uncommitted sink files this run discards
    /// when it starts (a version that failed its probation).
    pub discard_runs: Vec<String>,
    /// Savepoint directories are named after this id instead of the run's
    /// job id (the running host: after the job, not the run).
    pub savepoint_job_id: Option<String>,
    /// Whether operator subtasks count their keys when they end (a flush
    /// and a full scan, for `weir run`'s summary). The running host turns
    /// it off: it would hold up every stop and upgrade.
    pub count_keys_at_end: bool,
    /// Close each subtask's keyed state and remove the working state
    /// directory at the end on background threads, without waiting for
    /// them (a long-lived process: the running host, whose next run must
    /// not wait for a large cache to be freed or a directory to go).
    pub remove_state_in_background: bool,
    /// Restarts and failures across attempts (the running host shares one
    /// across a job's runs).
    pub metrics: Arc<JobMetrics>,
    /// Once it reads `true` the run is cancelled: its running attempt, or
    /// the wait before the next one (which then never starts).
    pub cancel: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Default for RunSettings {
    fn default() -> Self {
        Self {
            commit_hold: None,
            commit_gate: None,
            standby: None,
            discard_runs: Vec::new(),
            savepoint_job_id: None,
            count_keys_at_end: true,
            remove_state_in_background: false,
            metrics: Arc::default(),
            cancel: None,
        }
    }
}
