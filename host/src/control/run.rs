//! One run of a hosted job: the engine path `weir run` takes
//! ([`runner::run_observed`]), as a task of its own that tells the job's
//! driver what happens as [`RunEvent`]s: each attempt launched, each
//! failure (and waits for the driver to decide whether it restarts), each
//! restart, and the run's end. A run never changes the job's status: the
//! driver does, in order with everything else the job does.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use super::jobs::{JobHandle, build_graph};
use super::record::{JobSpec, RunRecord};
use super::{HostContext, now_ms};
use crate::checkpoint::coordinator::{CheckpointMetrics, JobCheckpoints, Savepointer};
use crate::dataflow::TaskError;
use crate::dataflow::runtime::{JobOutcome, NodeMetrics};
use crate::job::JobGraph;
use crate::plugin::LoadedPlugin;
use crate::runner::{
    self, Attempt, PreparedJob, RunError, RunObserver, RunOptions, RunSettings, Standby,
};
use crate::types::Location;

/// What a run is to be.
pub(super) struct RunPlan {
    pub spec: JobSpec,
    pub restore: Option<Location>,
    pub allow_non_restored_state: bool,
    /// Why it starts (the record keeps it).
    pub reason: String,
    pub run_id: String,
    /// Earlier runs whose uncommitted output this run discards.
    pub discard_runs: Vec<String>,
    /// Plugins loaded already (an upgrade's check loaded them).
    pub loaded: HashMap<PathBuf, Arc<LoadedPlugin>>,
    /// State restored ahead for this run (an upgrade's standby).
    pub standby: Option<Arc<Standby>>,
    /// Holds the sinks' commits while it reads `true` (probation).
    pub commit_hold: Option<watch::Receiver<bool>>,
    /// Fences the run's commits (a cluster job: this host must still own
    /// it).
    pub commit_gate: Option<Arc<dyn crate::checkpoint::coordinator::CommitGate>>,
    /// The restore point is a savepoint this host wrote a moment ago: its
    /// files are not hashed again.
    pub trusted: bool,
    /// Watch each attempt for its first record (an upgrade's downtime ends
    /// there).
    pub watch_first_record: bool,
}

impl RunPlan {
    /// A run of `spec` from `restore`, for `reason`, under a new run id.
    pub fn new(
        spec: JobSpec,
        restore: Option<Location>,
        allow_non_restored_state: bool,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            spec,
            restore,
            allow_non_restored_state,
            reason: reason.into(),
            run_id: runner::new_job_id(),
            discard_runs: Vec::new(),
            loaded: HashMap::new(),
            standby: None,
            commit_hold: None,
            commit_gate: None,
            trusted: false,
            watch_first_record: false,
        }
    }
}

/// What the driver sees of a running attempt.
#[derive(Clone)]
pub(super) struct AttemptView {
    pub graph: Arc<JobGraph>,
    pub savepointer: Savepointer,
    pub metrics: Vec<Arc<NodeMetrics>>,
    pub checkpoint_metrics: Option<Arc<CheckpointMetrics>>,
    pub checkpoints: Option<Arc<JobCheckpoints>>,
    /// When its operators took in their first record, if the plan asked.
    pub first_record: Option<FirstRecord>,
}

/// When an attempt's operators (or sinks) took in their first record:
/// watched from the attempt's launch (of a run whose plan asks, see
/// [`RunPlan::watch_first_record`]), every millisecond, so an upgrade's
/// downtime ends at that record, however late the driver gets to it. The
/// watch ends at the first record, when every copy of it is gone (the
/// driver moved on), or after [`FirstRecord::LIMIT`].
#[derive(Clone)]
pub(super) struct FirstRecord(watch::Receiver<Option<Instant>>);

impl FirstRecord {
    const LIMIT: Duration = Duration::from_secs(600);

    /// Starts watching `metrics`, the attempt's record counters.
    pub fn watch(metrics: Vec<Arc<NodeMetrics>>) -> Self {
        let (seen, first) = watch::channel(None);
        tokio::spawn(async move {
            let deadline = Instant::now() + Self::LIMIT;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while Instant::now() < deadline && !seen.is_closed() {
                tick.tick().await;
                if records_in(&metrics) > 0 {
                    let _ = seen.send(Some(Instant::now()));
                    return;
                }
            }
        });
        Self(first)
    }

    /// The first record's time, waiting up to `limit` for it.
    pub async fn within(mut self, limit: Duration) -> Option<Instant> {
        tokio::time::timeout(limit, self.0.wait_for(Option::is_some))
            .await
            .ok()?
            .ok()
            .and_then(|first| *first)
    }

    /// The first record's time, if it came already.
    pub fn now(&self) -> Option<Instant> {
        *self.0.borrow()
    }
}

/// The records a run's operators and sinks took in (its sources' not).
pub(super) fn records_in(metrics: &[Arc<NodeMetrics>]) -> u64 {
    metrics
        .iter()
        .filter(|m| !m.is_source)
        .map(|m| m.records_in())
        .sum()
}

/// Why a run ended without an outcome.
#[derive(Debug)]
pub(super) enum RunFailure {
    /// It could not be prepared (a plugin, the restore point).
    CannotStart(String),
    /// It failed for good (the restart strategy gave up, or the driver
    /// said not to restart).
    Failed(RunError),
}

impl std::fmt::Display for RunFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunFailure::CannotStart(message) => write!(f, "cannot start: {message}"),
            RunFailure::Failed(error) => error.fmt(f),
        }
    }
}

impl RunFailure {
    /// The task failure behind it, naming the operator, or the whole.
    pub fn cause(&self) -> String {
        match self {
            RunFailure::Failed(error) => error
                .task_error()
                .map_or_else(|| error.to_string(), ToString::to_string),
            RunFailure::CannotStart(message) => message.clone(),
        }
    }
}

/// What a run tells its job's driver, tagged with the run's id.
pub(super) enum RunEvent {
    /// An attempt is running.
    Launched { run: String, attempt: AttemptView },
    /// An attempt failed. The driver answers on `decide`: `Some(reason)`,
    /// the run ends with the failure; `None` (or no answer), the job's
    /// restart strategy decides.
    Failed {
        run: String,
        error: TaskError,
        decide: oneshot::Sender<Option<String>>,
    },
    /// The restart strategy restarts the run after `delay`.
    Restarting {
        run: String,
        attempt: u32,
        delay: Duration,
        from: String,
    },
    /// The run is over.
    Ended {
        run: String,
        result: Result<JobOutcome, RunFailure>,
    },
}

impl RunEvent {
    pub fn run(&self) -> &str {
        match self {
            RunEvent::Launched { run, .. }
            | RunEvent::Failed { run, .. }
            | RunEvent::Restarting { run, .. }
            | RunEvent::Ended { run, .. } => run,
        }
    }
}

/// A run started: its id and how to cancel it.
pub(super) struct RunHandle {
    pub id: String,
    cancel: watch::Sender<bool>,
}

impl RunHandle {
    /// Cancels the run: its running attempt, or the wait before the next
    /// (which then never starts). It ends with a cancelled outcome.
    pub fn cancel(&self) {
        let _ = self.cancel.send(true);
    }
}

/// Loads a spec's plugins and checks the restore point (blocking).
pub(super) fn prepare(
    ctx: &HostContext,
    spec: &JobSpec,
    options: &RunOptions,
    run_id: String,
) -> Result<PreparedJob, String> {
    let graph = build_graph(ctx, spec).map_err(|e| e.to_string())?;
    runner::prepare_as(&ctx.engine, graph, options, run_id).map_err(|e| e.to_string())
}

/// Starts `plan` as a task that reports to `events`.
pub(super) fn start(
    host: &Arc<HostContext>,
    job: &Arc<JobHandle>,
    plan: RunPlan,
    events: mpsc::UnboundedSender<RunEvent>,
) -> RunHandle {
    let (cancel, cancelled) = watch::channel(false);
    let id = plan.run_id.clone();
    let span = tracing::info_span!("run", id = %id);
    let (host, job) = (host.clone(), job.clone());
    tokio::spawn(run(host, job, plan, events, cancelled).instrument(span));
    RunHandle { id, cancel }
}

async fn run(
    host: Arc<HostContext>,
    job: Arc<JobHandle>,
    plan: RunPlan,
    events: mpsc::UnboundedSender<RunEvent>,
    cancelled: watch::Receiver<bool>,
) {
    let id = plan.run_id.clone();
    let options = RunOptions {
        restore: plan.restore.clone(),
        allow_non_restored_state: plan.allow_non_restored_state,
        trusted: plan.trusted,
        loaded: plan.loaded.clone(),
    };
    let prepared = {
        let (host, spec, id) = (host.clone(), plan.spec.clone(), id.clone());
        tokio::task::spawn_blocking(move || prepare(&host, &spec, &options, id))
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
    };
    let prepared = match prepared {
        Ok(prepared) => prepared,
        Err(error) => {
            let _ = events.send(RunEvent::Ended {
                run: id,
                result: Err(RunFailure::CannotStart(error)),
            });
            return;
        }
    };
    job.update(|record| {
        record.spec = plan.spec.clone();
        record.runs.push(RunRecord {
            run_id: id.clone(),
            started_ms: now_ms(),
            restored_from: plan.restore.as_ref().map(ToString::to_string),
            reason: plan.reason.clone(),
            abandoned: false,
        });
    });
    let settings = RunSettings {
        commit_hold: plan.commit_hold.clone(),
        commit_gate: plan
            .commit_gate
            .clone()
            .or_else(|| fence(&host, &job, &plan.spec)),
        standby: plan.standby.clone(),
        discard_runs: plan.discard_runs.clone(),
        savepoint_job_id: Some(job.id.clone()),
        count_keys_at_end: false,
        remove_state_in_background: true,
        metrics: job.metrics.clone(),
        cancel: Some(cancelled),
    };
    let mut observer = Forwarder {
        run: id.clone(),
        events: events.clone(),
        graph: Arc::new(prepared.graph.clone()),
        checkpoints: prepared.checkpoints.clone(),
        watch_first_record: plan.watch_first_record,
    };
    let result = runner::run_observed(&prepared, &settings, &HashMap::new(), &mut observer)
        .await
        .map_err(RunFailure::Failed);
    let _ = events.send(RunEvent::Ended { run: id, result });
}

/// The reason an upgrade's new version runs for (its runs are told by it).
pub(super) fn upgrade_reason(operation: &str) -> String {
    format!("upgrade (operation {operation})")
}

/// A movable cluster job's commit gate: this host must still own the
/// job at the generation it runs it under; what it admits restores as
/// `spec`.
fn fence(
    host: &HostContext,
    job: &JobHandle,
    spec: &JobSpec,
) -> Option<Arc<dyn crate::checkpoint::coordinator::CommitGate>> {
    let generation = job.record().generation?;
    let assignments = host.cluster.get()?.assignments()?;
    Some(assignments.fence(&job.id, generation, spec.clone()))
}

/// Tells the driver of each attempt, and asks it at each failure.
struct Forwarder {
    run: String,
    events: mpsc::UnboundedSender<RunEvent>,
    graph: Arc<JobGraph>,
    checkpoints: Option<Arc<JobCheckpoints>>,
    watch_first_record: bool,
}

impl RunObserver for Forwarder {
    fn launched(&mut self, attempt: &Attempt) {
        let _ = self.events.send(RunEvent::Launched {
            run: self.run.clone(),
            attempt: AttemptView {
                graph: self.graph.clone(),
                savepointer: attempt.savepointer(),
                metrics: attempt.metrics().to_vec(),
                checkpoint_metrics: attempt.checkpoint_metrics(),
                checkpoints: self.checkpoints.clone(),
                first_record: self
                    .watch_first_record
                    .then(|| FirstRecord::watch(attempt.metrics().to_vec())),
            },
        });
    }

    fn failed(
        &mut self,
        error: &TaskError,
    ) -> impl std::future::Future<Output = Option<String>> + Send {
        let (decide, decided) = oneshot::channel();
        let _ = self.events.send(RunEvent::Failed {
            run: self.run.clone(),
            error: error.clone(),
            decide,
        });
        // No answer (the driver moved on): the restart strategy decides.
        async move { decided.await.ok().flatten() }
    }

    fn restarting(&mut self, _error: &TaskError, attempt: u32, delay: Duration, from: &str) {
        let _ = self.events.send(RunEvent::Restarting {
            run: self.run.clone(),
            attempt,
            delay,
            from: from.to_string(),
        });
    }
}
