//! Running a prepared job: launching an [`Attempt`] (its subtasks and its
//! checkpoint coordinator), and running attempts until the job ends,
//! restarting a failed one from the latest completed checkpoint as the
//! job's restart strategy allows. A [`RunObserver`] is told of each
//! launch, asked at each failure, told of each restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{Instrument, info, warn};

use crate::checkpoint::coordinator::{
    CheckpointMetrics, Coordinator, CoordinatorSettings, Savepointer,
};
use crate::checkpoint::remote;
use crate::dataflow::TaskError;
use crate::dataflow::metrics::JobMetrics;
use crate::dataflow::runtime::{self, JobOutcome, NodeMetrics, RunningJob};
use crate::job::restart::{RestartDecision, RestartStrategy, RestartTracker};
use crate::protocol::TransferProgress;

use super::prepare::{downloads_dir, metadata_template, savepoint_staging};
use super::subtasks::{Factory, prepare_attempt};
use super::{
    NativeOperator, PreparedJob, RunError, RunSettings, checkpoint_remote, checkpoint_root,
};

/// A running attempt of a prepared job: its tasks, and the handles the
/// embedded CLI and the running host use while it runs (its coordinator's
/// [`Savepointer`], its checkpoint counters).
#[derive(Debug)]
pub struct Attempt {
    running: RunningJob,
    savepointer: Savepointer,
    checkpoints: Option<Arc<CheckpointMetrics>>,
    savepoint_progress: Arc<TransferProgress>,
    job_metrics: Arc<JobMetrics>,
}

impl Attempt {
    /// Live counters per node.
    pub fn metrics(&self) -> &[Arc<NodeMetrics>] {
        self.running.metrics()
    }

    /// Restarts and failures across the run's attempts.
    pub fn job_metrics(&self) -> Arc<JobMetrics> {
        self.job_metrics.clone()
    }

    /// Checkpoint counters (None: checkpointing is off).
    pub fn checkpoint_metrics(&self) -> Option<Arc<CheckpointMetrics>> {
        self.checkpoints.clone()
    }

    /// Keys and bytes of the savepoint being written (progress).
    pub fn savepoint_progress(&self) -> Arc<TransferProgress> {
        self.savepoint_progress.clone()
    }

    /// A handle that asks the attempt's coordinator for savepoints.
    pub fn savepointer(&self) -> Savepointer {
        self.savepointer.clone()
    }

    /// Asks the sources to stop; the rest of the job drains and ends.
    pub fn cancel(&self) {
        self.running.cancel();
    }

    /// A handle that can cancel the attempt from elsewhere.
    pub fn canceller(&self) -> tokio::sync::watch::Sender<bool> {
        self.running.canceller()
    }

    /// Waits for every task (see [`RunningJob::wait`]).
    pub async fn wait(self) -> Result<JobOutcome, TaskError> {
        self.running.wait().await
    }
}

/// Creates every subtask and starts the job on the current tokio runtime,
/// restored from the latest completed checkpoint of this job, else from the
/// restore point it was prepared with.
pub fn launch(job: &PreparedJob) -> Result<Attempt, RunError> {
    launch_with_native(job, &RunSettings::default(), &HashMap::new())
}

/// Like [`launch`], run as `settings` say, with the operators named in
/// `native` (by uid) replaced by native implementations.
pub fn launch_with_native(
    job: &PreparedJob,
    run: &RunSettings,
    native: &HashMap<String, NativeOperator>,
) -> Result<Attempt, RunError> {
    let point = job.restore_point();
    let restore = point.as_ref().map(|(read, own)| (read, *own));
    prepare_attempt(job, run, restore)?;
    let factory = Factory {
        job,
        settings: run,
        native,
        restore,
    };
    if restore.is_some() {
        job.restore_progress.start();
    }
    let settings = &job.graph.checkpoint;
    let coordinator = Coordinator {
        settings: CoordinatorSettings {
            interval: settings.interval,
            timeout: settings.timeout.unwrap_or(Duration::from_secs(600)),
            min_pause: settings.min_pause.unwrap_or_default(),
            tolerable_failures: settings.tolerable_failures,
        },
        store: job.checkpoints.clone(),
        template: metadata_template(job),
        pace: job.pace.clone(),
        savepoint_progress: job.savepoint_progress.clone(),
        first_id: job
            .restore
            .as_ref()
            .map_or(1, |r| r.metadata.checkpoint + 1),
        commit_hold: run.commit_hold.clone(),
        savepoint_job_id: run.savepoint_job_id.clone(),
        savepoint_staging: savepoint_staging(job),
        roots: job.graph.roots.clone(),
        commit_gate: run.commit_gate.clone(),
    };
    let (savepointer, requests) = Savepointer::channel();
    let checkpoints = job.checkpoints.as_ref().map(|c| c.metrics.clone());
    let span = tracing::info_span!("coordinator", job = %job.job_id);
    let launched = runtime::launch(
        &job.graph,
        &job.job_id,
        &factory,
        job.pace.clone(),
        move |wiring| tokio::spawn(coordinator.run(wiring, requests).instrument(span)),
    );
    job.restore_progress.finish();
    let running = launched.map_err(|source| RunError::Task {
        job: job.graph.name.clone(),
        cause: source,
    })?;
    Ok(Attempt {
        running,
        savepointer,
        checkpoints,
        savepoint_progress: job.savepoint_progress.clone(),
        job_metrics: run.metrics.clone(),
    })
}

/// Called with each running attempt (e.g. to show progress or wire Ctrl-C).
pub type AttemptHook<'a> = &'a mut dyn FnMut(&Attempt);

/// Watches a run's attempts: told of each launch, asked at each failure
/// whether the restart strategy may decide, told of each restart.
pub trait RunObserver {
    /// An attempt is running.
    fn launched(&mut self, attempt: &Attempt);
    /// An attempt failed (or could not start). `Some(reason)`: do not
    /// restart; the run ends with this error. `None`: the restart strategy
    /// decides. Asynchronous: the running host asks the job's driver,
    /// which decides in order with everything else the job does.
    fn failed(
        &mut self,
        _error: &TaskError,
    ) -> impl std::future::Future<Output = Option<String>> + Send {
        std::future::ready(None)
    }
    /// The restart strategy restarts the job after `delay` from `from`.
    fn restarting(&mut self, _error: &TaskError, _attempt: u32, _delay: Duration, _from: &str) {}
}

/// [`RunObserver`] for a plain hook: the restart is printed on stderr.
struct HookObserver<'a>(AttemptHook<'a>);

impl RunObserver for HookObserver<'_> {
    fn launched(&mut self, attempt: &Attempt) {
        (self.0)(attempt)
    }

    fn restarting(&mut self, error: &TaskError, attempt: u32, delay: Duration, from: &str) {
        eprintln!(
            "weir: {error}; restart {attempt} in {} from {from}",
            crate::human::duration(delay)
        );
    }
}

/// Runs a prepared job to its end: launches it, and on a failure restarts
/// every task from the latest completed checkpoint as the restart strategy
/// allows. Removes the working state directory at the end.
pub async fn run(
    job: &PreparedJob,
    hook: AttemptHook<'_>,
) -> Result<runtime::JobOutcome, RunError> {
    let settings = RunSettings::default();
    run_observed(job, &settings, &HashMap::new(), &mut HookObserver(hook)).await
}

/// [`run`] with native operators (see [`launch_with_native`]).
pub async fn run_with_native(
    job: &PreparedJob,
    native: &HashMap<String, NativeOperator>,
    hook: AttemptHook<'_>,
) -> Result<runtime::JobOutcome, RunError> {
    let settings = RunSettings::default();
    run_observed(job, &settings, native, &mut HookObserver(hook)).await
}

/// [`run_with_native`] with an observer of every attempt.
pub async fn run_observed<O: RunObserver>(
    job: &PreparedJob,
    settings: &RunSettings,
    native: &HashMap<String, NativeOperator>,
    observer: &mut O,
) -> Result<runtime::JobOutcome, RunError> {
    let strategy = RestartStrategy::from_settings(&job.graph.restart).map_err(|problems| {
        crate::job::JobError::Invalid {
            file: job.graph.file.clone(),
            problems,
        }
    })?;
    check_connectors(job).await?;
    let mut tracker = RestartTracker::new(strategy);
    let cancelled = || settings.cancel.as_ref().is_some_and(|c| *c.borrow());
    let cancelled_between_attempts = || runtime::JobOutcome {
        summaries: Vec::new(),
        cancelled: true,
        savepoint: None,
    };
    let result = loop {
        if cancelled() {
            break Ok(cancelled_between_attempts());
        }
        let launched = launch_with_native(job, settings, native);
        if let Some(standby) = &settings.standby {
            // Its state went to the first attempt's subtasks, if anywhere.
            standby.release();
        }
        let attempt = match launched {
            Ok(running) => {
                observer.launched(&running);
                // Cancelling the run cancels this attempt.
                let forward = settings.cancel.clone().map(|mut cancel| {
                    let canceller = running.canceller();
                    tokio::spawn(async move {
                        if cancel.wait_for(|c| *c).await.is_ok() {
                            let _ = canceller.send(true);
                        }
                    })
                });
                let result = running.wait().await;
                if let Some(forward) = forward {
                    forward.abort();
                }
                result
            }
            Err(RunError::Task { cause, .. }) => Err(cause),
            Err(other) => break Err(other),
        };
        let error = match attempt {
            Ok(outcome) => break Ok(outcome),
            Err(error) => error,
        };
        settings.metrics.failed(&error);
        if let Some(reason) = observer.failed(&error).await {
            break Err(RunError::GaveUp {
                job: job.graph.name.clone(),
                reason,
                cause: error,
            });
        }
        // In [0, 1): 53 random bits.
        let jitter = (crate::checkpoint::storage::random_u64() >> 11) as f64 / (1u64 << 53) as f64;
        match tracker.on_failure(Instant::now(), jitter) {
            RestartDecision::Restart { delay, attempt } => {
                let from = job
                    .checkpoints
                    .as_ref()
                    .and_then(|c| c.latest())
                    .map(|r| format!("checkpoint {}", r.metadata.checkpoint))
                    .or_else(|| {
                        job.restore
                            .as_ref()
                            .map(|r| format!("the restore point {}", r.path.display()))
                    })
                    .unwrap_or_else(|| "the beginning (no checkpoint yet)".to_string());
                warn!(%error, attempt, ?delay, "job failed; restarting from {from}");
                observer.restarting(&error, attempt, delay, &from);
                settings
                    .metrics
                    .restarts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = wait_cancelled(settings.cancel.clone()) => {
                        break Ok(cancelled_between_attempts());
                    }
                }
            }
            RestartDecision::GiveUp { reason } => {
                break Err(RunError::GaveUp {
                    job: job.graph.name.clone(),
                    reason,
                    cause: error,
                });
            }
        }
    };
    let dir = job.state_dir();
    let teardown = job.teardown.clone();
    let staging =
        checkpoint_remote(&job.graph).map(|_| checkpoint_root(&job.graph).join(&job.job_id));
    let downloads = downloads_dir(&job.graph, &job.job_id);
    let savepoints = savepoint_staging(job);
    let remove = move || {
        // Durable copies are remote: the local staging of checkpoints and
        // savepoints and a downloaded restore point go.
        for local in staging.iter().chain([&downloads, &savepoints]) {
            if local.exists() {
                let _ = std::fs::remove_dir_all(local);
            }
        }
        teardown.wait();
        if dir.exists()
            && let Err(error) = std::fs::remove_dir_all(&dir)
        {
            warn!(dir = %dir.display(), %error, "could not remove the job's working state");
        }
    };
    if settings.remove_state_in_background {
        if !crate::state::in_background("weir-state-remove", remove) {
            warn!(dir = %job.state_dir().display(), "no thread to remove the job's working state: it stays");
        }
    } else {
        remove();
    }
    if let Ok(outcome) = &result {
        info!(job = %job.graph.name, cancelled = outcome.cancelled, "job finished");
    }
    result
}

/// Checks the job's external connectors before anything is written: the
/// servers answer, their streams exist, settings they keep (a stream's
/// duplicate window) suit the job's. Once per prepared job.
pub async fn check_connectors(job: &PreparedJob) -> Result<(), RunError> {
    use std::sync::atomic::Ordering;
    if job.connectors_checked.load(Ordering::Relaxed) {
        return Ok(());
    }
    let strategy = RestartStrategy::from_settings(&job.graph.restart).map_err(|problems| {
        crate::job::JobError::Invalid {
            file: job.graph.file.clone(),
            problems,
        }
    })?;
    let mut problems = crate::connectors::nats::check(&job.graph, strategy.longest_delay())
        .await
        .err()
        .unwrap_or_default();
    problems.extend(
        crate::connectors::kafka::check(&job.graph)
            .await
            .err()
            .unwrap_or_default(),
    );
    if let Some(url) = checkpoint_remote(&job.graph) {
        let checked = match remote::Remote::open(url) {
            Ok(remote) => remote.check().await,
            Err(error) => Err(error),
        };
        if let Err(error) = checked {
            problems.push(format!("[checkpoint] dir {error}"));
        }
    }
    if !problems.is_empty() {
        return Err(RunError::Connectors {
            job: job.graph.name.clone(),
            problems,
        });
    }
    job.connectors_checked.store(true, Ordering::Relaxed);
    Ok(())
}

/// Resolves once `cancel` reads `true`; never without one.
async fn wait_cancelled(cancel: Option<tokio::sync::watch::Receiver<bool>>) {
    match cancel {
        Some(mut cancel) => {
            if cancel.wait_for(|c| *c).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}
