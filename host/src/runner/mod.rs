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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobGraph;

    const JOB: &str = r#"
name = "tasks"
max_parallelism = 8
[checkpoint]
interval = "50ms"
dir = "checkpoints"
[state]
dir = "state"
[[source]]
uid = "in"
kind = "generator"
count = 3000
keys = 50
seed = 3
parallelism = 2
[[sink]]
uid = "out"
kind = "file"
path = "out"
inputs = [{ from = "in", partition = "forward" }]
parallelism = 2
"#;

    /// Every line the file sink committed under `dir/out`, sorted.
    fn output(dir: &Path) -> Vec<String> {
        let mut lines = Vec::new();
        for entry in std::fs::read_dir(dir.join("out")).expect("out/") {
            let path = entry.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("part-") {
                let text = std::fs::read_to_string(&path).expect("part file");
                lines.extend(text.lines().map(str::to_string));
            }
        }
        lines.sort();
        lines
    }

    /// Runs the job in `dir` (task `task` of it, or whole); answers the
    /// subtasks its newest checkpoint holds, by uid.
    async fn run_in(
        engine: &PluginEngine,
        dir: &Path,
        task: Option<u32>,
    ) -> std::collections::BTreeMap<String, Vec<u32>> {
        newest(&run_from(engine, dir, task, None).await)
            .metadata
            .operators
            .iter()
            .map(|(uid, op)| (uid.clone(), op.subtasks.iter().map(|s| s.subtask).collect()))
            .collect()
    }

    /// Runs the job in `dir` (task `task` of it, or whole) from `restore`
    /// to its end; answers its checkpoints' directory.
    async fn run_from(
        engine: &PluginEngine,
        dir: &Path,
        task: Option<u32>,
        restore: Option<&Path>,
    ) -> std::path::PathBuf {
        let path = dir.join("job.toml");
        std::fs::write(&path, JOB).expect("job file");
        let mut graph = JobGraph::load(&path).expect("valid job");
        if let Some(task) = task {
            graph.set_task(task).expect("a job of forward edges");
        }
        let options = RunOptions {
            restore: restore.map(|p| crate::types::Location::Local(p.to_path_buf())),
            ..RunOptions::default()
        };
        let job = prepare_with(engine, graph, &options).expect("prepared");
        run(&job, &mut |_| {}).await.expect("runs to its end");
        dir.join("checkpoints").join(&job.job_id)
    }

    /// The newest checkpoint in `checkpoints`.
    fn newest(checkpoints: &Path) -> crate::checkpoint::metadata::ReadMetadata {
        let newest = std::fs::read_dir(checkpoints)
            .expect("checkpoints")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|name| name.strip_prefix("chk-")?.parse::<u64>().ok())
            .max()
            .expect("a completed checkpoint");
        crate::checkpoint::metadata::read(&checkpoints.join(format!("chk-{newest}")))
            .expect("its _metadata")
    }

    /// Each source subtask's position in `read`.
    fn positions(read: &crate::checkpoint::metadata::ReadMetadata) -> Vec<(u32, Option<u64>)> {
        read.metadata.operators["in"]
            .subtasks
            .iter()
            .map(|s| (s.subtask, s.position))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_run_as_separate_tasks_writes_what_it_writes_whole() {
        let engine = PluginEngine::new(None).expect("engine");
        let whole = tempfile::tempdir().expect("tempdir");
        let held = run_in(&engine, whole.path(), None).await;
        assert_eq!(held["in"], [0, 1]);
        let expected = output(whole.path());
        assert_eq!(expected.len(), 3000);

        let mut together = Vec::new();
        for task in 0..2 {
            let dir = tempfile::tempdir().expect("tempdir");
            let held = run_in(&engine, dir.path(), Some(task)).await;
            // Its checkpoints hold its own subtask of each node, no other.
            assert_eq!(held["in"], [task], "task {task}: {held:?}");
            assert_eq!(held["out"], [task], "task {task}: {held:?}");
            let lines = output(dir.path());
            assert!(!lines.is_empty() && lines.len() < 3000, "task {task}");
            together.extend(lines);
        }
        together.sort();
        assert!(together == expected, "the tasks' output is the whole job's");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tasks_restore_their_subtasks_of_a_whole_run_and_merged_restore_it_whole() {
        let engine = PluginEngine::new(None).expect("engine");
        let whole = tempfile::tempdir().expect("tempdir");
        let ended = newest(&run_from(&engine, whole.path(), None, None).await);
        let at_end = positions(&ended);
        assert_eq!(at_end.len(), 2);
        assert!(at_end.iter().all(|(_, p)| p.is_some()), "{at_end:?}");

        // Each task restores its own subtask's position from the whole
        // run's checkpoint (in its directory, where the sink's files are):
        // at the end, it writes nothing more.
        let written = output(whole.path());
        assert_eq!(written.len(), 3000);
        let mut parts = Vec::new();
        for task in 0..2u32 {
            let checkpoints = run_from(&engine, whole.path(), Some(task), Some(&ended.path)).await;
            let read = newest(&checkpoints);
            assert_eq!(positions(&read), [at_end[task as usize]], "task {task}");
            let now = output(whole.path()).len();
            assert_eq!(
                now,
                written.len(),
                "task {task} restored at its end: lines written"
            );
            let mut metadata = read.metadata.clone();
            // Neither holds files (no keyed state): as good as savepoints.
            assert_eq!(metadata.size(), 0);
            metadata.kind = crate::checkpoint::SnapshotKind::Savepoint;
            let relative = read.path.strip_prefix(whole.path()).expect("below");
            parts.push((relative.display().to_string(), metadata));
        }

        // Merged, the tasks' snapshots restore the job whole.
        let merged = crate::checkpoint::metadata::merge_tasks("merged", "tasks", &parts)
            .expect("every subtask once");
        let out = crate::types::OutDir::open(whole.path()).expect("open");
        crate::checkpoint::metadata::write(&out, &merged).expect("written");
        let read = newest(&run_from(&engine, whole.path(), None, Some(whole.path())).await);
        assert_eq!(positions(&read), at_end);
        assert_eq!(output(whole.path()).len(), written.len(), "lines written");

        // Both tasks' snapshots are needed, each once.
        let one = crate::checkpoint::metadata::merge_tasks("merged", "tasks", &parts[..1]);
        assert_eq!(
            one.expect_err("refused"),
            "job merged: subtask(s) 1 of uid `in` are in no task's savepoint"
        );
        let twice = [parts[0].clone(), parts[0].clone()];
        let twice = crate::checkpoint::metadata::merge_tasks("merged", "tasks", &twice);
        assert!(
            twice
                .expect_err("refused")
                .ends_with("subtask 0 of uid `in` is in another task's savepoint too"),
        );
    }

    #[test]
    fn only_a_graph_of_forward_edges_and_one_parallelism_runs_as_tasks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job.toml");
        let graph = |text: &str| {
            std::fs::write(&path, text).expect("job file");
            JobGraph::load(&path).expect("valid job")
        };
        let mut ok = graph(JOB);
        assert!(ok.runs(1));
        ok.set_task(1).expect("task 1 of 2");
        assert!(ok.runs(1) && !ok.runs(0));
        assert_eq!(
            graph(JOB).set_task(2).expect_err("refused"),
            "task 2: the job's nodes run 2 subtasks (tasks 0 to 1)"
        );
        let rebalanced = JOB.replace("partition = \"forward\"", "partition = \"rebalance\"");
        assert_eq!(
            graph(&rebalanced).set_task(0).expect_err("refused"),
            "task 0: only a job whose edges are all `forward` runs as tasks, and in → out is not"
        );
        // Two pipelines apart, one of 2 subtasks, the other of 3.
        let uneven = format!(
            "{JOB}{}",
            r#"
[[source]]
uid = "other"
kind = "generator"
count = 10
parallelism = 3
[[sink]]
uid = "other-out"
kind = "blackhole"
inputs = [{ from = "other", partition = "forward" }]
parallelism = 3
"#
        );
        assert_eq!(
            graph(&uneven).set_task(0).expect_err("refused"),
            "task 0: the job's nodes run at parallelism 2, 3, not one"
        );
    }
}
