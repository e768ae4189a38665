//! A job's driver: one tokio task per job of the running host, the only
//! code that starts, watches and ends the job's runs, and so the only
//! caller of its state machine's transitions (through [`JobHandle`]).
//!
//! A driver runs one [`RunPlan`] after another. Each is a run of the
//! embedded engine ([`runner::run_observed`], the same path as `weir run`)
//! with a [`RunObserver`] that keeps the record and the live view current.
//! While it runs, the driver takes commands: savepoint, stop, cancel,
//! upgrade, shutdown. The upgrade procedure lives in [`super::upgrade`];
//! the driver carries out its three phases: the check before anything
//! stops, the run on probation, and the rollback.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::jobs::{JobHandle, build_graph, internal};
use super::lifecycle::JobStatus;
use super::record::*;
use super::upgrade::{self, ActivityWatch, Probation, ProbationOutcome};
use super::{ControlError, HostContext, now_ms};
use crate::checkpoint::coordinator::Savepointer;
use crate::checkpoint::coordinator::{CheckpointMetrics, JobCheckpoints};
use crate::dataflow::TaskError;
use crate::dataflow::metrics::SubtaskMetrics;
use crate::dataflow::runtime::NodeMetrics;
use crate::job::{JobGraph, NodeKind, OnCancel};
use crate::plugin::LoadedPlugin;
use crate::runner::Attempt;
use crate::runner::{self, PreparedJob, RunError, RunObserver, RunOptions};
use crate::runner::{RunSettings, Standby};
use crate::types::Location;

/// A location the job record holds (validated when it was recorded).
pub(super) fn recorded_location(text: &str) -> Location {
    Location::parse(text).unwrap_or_else(|_| Location::Local(PathBuf::from(text)))
}

/// What the API can see of a job's current run.
pub(super) struct Live {
    pub graph: JobGraph,
    pub metrics: Vec<Arc<NodeMetrics>>,
    pub checkpoint_metrics: Option<Arc<CheckpointMetrics>>,
    pub checkpoints: Option<Arc<JobCheckpoints>>,
    pub savepointer: Option<Savepointer>,
    pub canceller: Option<watch::Sender<bool>>,
}

/// What the job manager asks a driver to do.
pub(super) enum Command {
    Savepoint {
        operation: String,
        target: Location,
    },
    Stop {
        operation: String,
        target: Location,
        drain: bool,
    },
    Cancel {
        operation: String,
    },
    Upgrade {
        operation: String,
        upgrade: Box<Upgrade>,
    },
    /// The host is shutting down: stop with a savepoint (resumed from it
    /// on the next start) or cancel (resumed from the newest checkpoint).
    Shutdown {
        savepoint: bool,
        target: Location,
        done: oneshot::Sender<()>,
    },
}

/// An upgrade the manager accepted in shape.
pub(super) struct Upgrade {
    pub spec: JobSpec,
    pub allow_non_restored_state: bool,
    pub probation: Duration,
    pub probation_checkpoints: u64,
    /// The new version's plugins, loaded by the check before the stop.
    pub loaded: HashMap<PathBuf, Arc<LoadedPlugin>>,
    /// The new version's state, restored ahead (a migrating upgrade).
    pub standby: Option<Arc<Standby>>,
}

/// One run to start.
pub(super) struct RunPlan {
    spec: JobSpec,
    restore: Option<Location>,
    allow_non_restored_state: bool,
    reason: String,
    run_id: String,
    /// Earlier runs whose uncommitted output this run discards.
    discard_runs: Vec<String>,
    /// Plugins loaded already (see [`RunOptions::loaded`]).
    loaded: HashMap<PathBuf, Arc<LoadedPlugin>>,
    /// State restored ahead for this run (see [`PreparedJob::standby`]).
    standby: Option<Arc<Standby>>,
    phase: Phase,
}

enum Phase {
    Normal,
    /// The new version of an upgrade, on probation.
    Probation(Box<Probation>),
    /// The old version again, after the new one failed.
    RollBack(Box<upgrade::RollBack>),
}

impl RunPlan {
    /// A submitted job's first run (its id is the job id).
    pub fn first(record: &JobRecord) -> Self {
        Self {
            spec: record.spec.clone(),
            restore: record.initial_restore.as_deref().map(recorded_location),
            allow_non_restored_state: record.allow_non_restored_state,
            reason: "submitted".to_string(),
            run_id: record.id.clone(),
            discard_runs: Vec::new(),
            loaded: HashMap::new(),
            standby: None,
            phase: Phase::Normal,
        }
    }
}

/// How a job the host finds live at its start resumes: from the savepoint
/// it was stopped with at shutdown, else from its newest completed
/// checkpoint (or savepoint). Operations the old host left unfinished fail.
pub(super) fn resume_plan(ctx: &HostContext, handle: &JobHandle) -> RunPlan {
    let record = handle.record();
    handle.update(|record| {
        for operation in &mut record.operations {
            if operation.status == OperationStatus::Running {
                operation.status = OperationStatus::Failed;
                operation.finished_ms = Some(now_ms());
                operation.error = Some("the host stopped before the operation finished".into());
            }
        }
    });
    let (restore, cause) = match &record.resume_from {
        Some(savepoint) => {
            handle.update(|r| r.resume_from = None);
            handle.transition(
                JobStatus::Created,
                format!(
                    "host started: resuming from the savepoint taken at its shutdown, {savepoint}"
                ),
            );
            (
                Some(recorded_location(savepoint)),
                "resumed after a host shutdown",
            )
        }
        None => {
            let point = upgrade::newest_restore_point(ctx, &record);
            let from = point.as_ref().map_or_else(
                || "the beginning (no checkpoint)".to_string(),
                |p| p.to_string(),
            );
            if record.status() == JobStatus::Cancelling {
                handle.transition(JobStatus::Cancelled, "host restarted while cancelling");
            } else {
                handle.transition(
                    JobStatus::Restarting,
                    format!("host restarted: resuming from {from}"),
                );
            }
            (point, "resumed after a host restart")
        }
    };
    RunPlan {
        spec: record.spec.clone(),
        restore,
        allow_non_restored_state: record.allow_non_restored_state,
        reason: cause.to_string(),
        run_id: crate::runner::new_job_id(),
        discard_runs: Vec::new(),
        loaded: HashMap::new(),
        standby: None,
        phase: Phase::Normal,
    }
}

/// Runs plans until the job ends.
pub(super) async fn drive(
    ctx: Arc<HostContext>,
    handle: Arc<JobHandle>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    first: RunPlan,
) {
    if handle.status().is_terminal() && handle.status() != JobStatus::Stopped {
        return;
    }
    let mut plan = Some(first);
    while let Some(current) = plan.take() {
        plan = run(&ctx, &handle, &mut commands, current).await;
    }
    *handle.live.lock().expect("not poisoned") = None;
    // An operation the job's end overtook (an upgrade on probation when
    // the job was cancelled) fails rather than stay open.
    let open: Vec<String> = handle
        .record()
        .operations
        .iter()
        .filter(|o| o.status == OperationStatus::Running)
        .map(|o| o.id.clone())
        .collect();
    for operation in open {
        fail_operation(
            &handle,
            &operation,
            format!("the job ended ({}) first", handle.status()),
        );
    }
    // Answer what came in as the job ended.
    commands.close();
    while let Ok(command) = commands.try_recv() {
        match command {
            Command::Savepoint { operation, .. }
            | Command::Stop { operation, .. }
            | Command::Cancel { operation }
            | Command::Upgrade { operation, .. } => {
                fail_operation(&handle, &operation, "the job ended first")
            }
            Command::Shutdown { done, .. } => {
                let _ = done.send(());
            }
        }
    }
}

pub(super) fn fail_operation(handle: &JobHandle, operation: &str, error: impl Into<String>) {
    let error = error.into();
    handle.finish_operation(operation, |o| {
        o.status = OperationStatus::Failed;
        o.error = Some(error);
    });
}

/// Loads a spec's plugins and checks the restore point (blocking).
pub(super) fn prepare(
    ctx: &HostContext,
    spec: &JobSpec,
    options: &RunOptions,
    run_id: String,
) -> Result<PreparedJob, ControlError> {
    let graph = build_graph(ctx, spec)?;
    runner::prepare_as(&ctx.engine, graph, options, run_id)
        .map_err(|e| ControlError::BadRequest(e.to_string()))
}

/// One run: prepared, launched, watched, and ended. Returns the next plan
/// (an upgrade's new version, a rollback) or None when the job ended.
async fn run(
    ctx: &Arc<HostContext>,
    handle: &Arc<JobHandle>,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    plan: RunPlan,
) -> Option<RunPlan> {
    let prepared = {
        let ctx = ctx.clone();
        let (spec, run_id) = (plan.spec.clone(), plan.run_id.clone());
        let options = RunOptions {
            restore: plan.restore.clone(),
            allow_non_restored_state: plan.allow_non_restored_state,
            // The savepoint an upgrade's new version restores was written
            // by this host a moment ago.
            trusted: matches!(plan.phase, Phase::Probation(_)),
            loaded: plan.loaded.clone(),
        };
        tokio::task::spawn_blocking(move || prepare(&ctx, &spec, &options, run_id))
            .await
            .map_err(internal)
            .and_then(|r| r)
    };
    let prepared = match prepared {
        Ok(prepared) => prepared,
        Err(error) => return start_failed(handle, plan, error.to_string()),
    };
    let mut settings = RunSettings {
        discard_runs: plan.discard_runs.clone(),
        standby: plan.standby.clone(),
        savepoint_job_id: Some(handle.id.clone()),
        count_keys_at_end: false,
        remove_state_in_background: true,
        metrics: handle.metrics.clone(),
        ..RunSettings::default()
    };
    let probation = match &plan.phase {
        Phase::Probation(probation) => {
            let (release, hold) = watch::channel(true);
            settings.commit_hold = Some(hold);
            Some((probation, release))
        }
        _ => None,
    };
    handle.update(|record| {
        record.spec = plan.spec.clone();
        record.runs.push(RunRecord {
            run_id: plan.run_id.clone(),
            started_ms: now_ms(),
            restored_from: plan.restore.as_ref().map(ToString::to_string),
            reason: plan.reason.clone(),
            abandoned: false,
        });
    });
    let outcome = Arc::new(Mutex::new(ProbationOutcome::Pending));
    // The run future borrows the observer, which borrows the plan: both
    // end with this block, before the plan's parts move on.
    let (result, stop_operation, cancel_operation) = {
        let mut observer = Observer {
            handle: handle.clone(),
            graph: prepared.graph.clone(),
            checkpoints: prepared.checkpoints.clone(),
            phase: &plan.phase,
            probation: probation.map(|(p, release)| (p.as_ref(), release)),
            outcome: outcome.clone(),
            launched: false,
            run_id: plan.run_id.clone(),
        };
        let native = HashMap::new();
        let running = runner::run_observed(&prepared, &settings, &native, &mut observer);
        tokio::pin!(running);
        let mut stop_operation: Option<String> = None;
        let mut cancel_operation: Option<String> = None;
        let result = loop {
            tokio::select! {
                result = &mut running => break result,
                command = commands.recv() => {
                    let Some(command) = command else { continue };
                    match command {
                        Command::Savepoint { operation, target } => {
                            savepoint(handle, operation, target);
                        }
                        Command::Stop { operation, target, drain } => {
                            stop(handle, operation.clone(), target, drain);
                            stop_operation = Some(operation);
                        }
                        Command::Cancel { operation } => {
                            handle.transition(JobStatus::Cancelling, "cancel requested");
                            if let Some(cancel) = live_canceller(handle) {
                                let _ = cancel.send(true);
                            }
                            cancel_operation = Some(operation);
                        }
                        Command::Upgrade { operation, mut upgrade } => {
                            let last_record = ActivityWatch::start(live_metrics(handle));
                            match upgrade::stop_for_upgrade(ctx, handle, &plan, &operation, &mut upgrade).await {
                                Ok(savepoint) => {
                                    let result = (&mut running).await;
                                    let last = last_record.stop();
                                    return upgrade::after_stop(handle, plan_parts(&plan), operation, *upgrade, savepoint, result, last);
                                }
                                Err(()) => {
                                    last_record.stop();
                                }
                            }
                        }
                        Command::Shutdown { savepoint, target, done } => {
                            shutdown(handle, savepoint, target, &mut running).await;
                            let _ = done.send(());
                            return None;
                        }
                    }
                }
            }
        };
        (result, stop_operation, cancel_operation)
    };
    *handle.live.lock().expect("not poisoned") = None;
    let savepoint = match &result {
        Ok(outcome) => outcome.savepoint.clone(),
        Err(_) => None,
    };
    if let Some(path) = &savepoint {
        record_savepoint(handle, path, stop_operation.clone());
    }
    match result {
        Ok(outcome) if outcome.savepoint.is_some() => {
            let path = outcome.savepoint.expect("checked").to_string();
            if let Some(operation) = &stop_operation {
                handle.finish_operation(operation, |o| {
                    o.savepoint = Some(path.clone());
                    o.outcome = Some("stopped".to_string());
                });
            }
            handle.transition(
                JobStatus::Stopped,
                format!("stopped with the savepoint {path}"),
            );
            None
        }
        Ok(outcome) if outcome.cancelled => {
            if prepared.graph.checkpoint.on_cancel == OnCancel::Delete {
                delete_checkpoints(ctx, handle);
            }
            if let Some(operation) = &cancel_operation {
                handle.finish_operation(operation, |o| o.outcome = Some("cancelled".to_string()));
            }
            handle.transition(JobStatus::Cancelled, "cancelled");
            None
        }
        Ok(_) => {
            upgrade::pass_if_pending(handle, &outcome, &plan.phase_probation());
            handle.transition(JobStatus::Finished, "its sources ended");
            None
        }
        Err(error) => {
            let message = error.to_string();
            let probation_failed = matches!(
                *outcome.lock().expect("not poisoned"),
                ProbationOutcome::Failed
            );
            if probation_failed && let Phase::Probation(probation) = plan.phase {
                let cause = error
                    .task_error()
                    .map_or_else(|| message.clone(), ToString::to_string);
                return Some(upgrade::roll_back(handle, *probation, plan.run_id, cause));
            }
            for operation in [stop_operation, cancel_operation].into_iter().flatten() {
                fail_operation(handle, &operation, message.clone());
            }
            handle.update(|r| r.last_error = Some(message.clone()));
            handle.transition(JobStatus::Failed, message);
            None
        }
    }
}

impl RunPlan {
    /// What this run restores.
    pub(super) fn restore_point(&self) -> Option<Location> {
        self.restore.clone()
    }

    fn phase_probation(&self) -> Option<&Probation> {
        match &self.phase {
            Phase::Probation(p) => Some(p),
            _ => None,
        }
    }
}

/// What an upgrade needs of the plan it replaces.
pub(super) struct PlanParts {
    pub spec: JobSpec,
    pub allow_non_restored_state: bool,
}

fn plan_parts(plan: &RunPlan) -> PlanParts {
    PlanParts {
        spec: plan.spec.clone(),
        allow_non_restored_state: plan.allow_non_restored_state,
    }
}

/// Builds the plan for the new version of an upgrade.
pub(super) fn probation_plan(
    spec: JobSpec,
    restore: Location,
    allow_non_restored_state: bool,
    loaded: HashMap<PathBuf, Arc<LoadedPlugin>>,
    standby: Option<Arc<Standby>>,
    probation: Probation,
) -> RunPlan {
    RunPlan {
        spec,
        restore: Some(restore),
        allow_non_restored_state,
        reason: format!("upgrade (operation {})", probation.operation),
        run_id: crate::runner::new_job_id(),
        discard_runs: Vec::new(),
        loaded,
        standby,
        phase: Phase::Probation(Box::new(probation)),
    }
}

/// Builds the plan that restarts the old version after a failed upgrade.
pub(super) fn rollback_plan(
    spec: JobSpec,
    restore: Location,
    allow_non_restored_state: bool,
    discard: String,
    rollback: upgrade::RollBack,
) -> RunPlan {
    RunPlan {
        spec,
        restore: Some(restore),
        allow_non_restored_state,
        reason: format!("rollback (operation {})", rollback.operation),
        run_id: crate::runner::new_job_id(),
        discard_runs: vec![discard],
        loaded: HashMap::new(),
        standby: None,
        phase: Phase::RollBack(Box::new(rollback)),
    }
}

/// A run that could not start: an upgrade's new version rolls back; any
/// other job fails.
fn start_failed(handle: &Arc<JobHandle>, plan: RunPlan, error: String) -> Option<RunPlan> {
    warn!(%error, "the job could not start");
    if let Phase::Probation(probation) = plan.phase {
        return Some(upgrade::roll_back(handle, *probation, plan.run_id, error));
    }
    if let Phase::RollBack(rollback) = &plan.phase {
        fail_operation(
            handle,
            &rollback.operation,
            format!("{}; the rollback failed too: {error}", rollback.error),
        );
    }
    handle.update(|r| r.last_error = Some(error.clone()));
    handle.transition(JobStatus::Failed, format!("cannot start: {error}"));
    None
}

fn live_canceller(handle: &JobHandle) -> Option<watch::Sender<bool>> {
    handle
        .live
        .lock()
        .expect("not poisoned")
        .as_ref()
        .and_then(|l| l.canceller.clone())
}

fn live_savepointer(handle: &JobHandle) -> Option<Savepointer> {
    handle
        .live
        .lock()
        .expect("not poisoned")
        .as_ref()
        .and_then(|l| l.savepointer.clone())
}

pub(super) fn live_metrics(handle: &JobHandle) -> Vec<Arc<NodeMetrics>> {
    handle
        .live
        .lock()
        .expect("not poisoned")
        .as_ref()
        .map(|l| l.metrics.clone())
        .unwrap_or_default()
}

pub(super) fn live_checkpoints(handle: &JobHandle) -> Option<Arc<JobCheckpoints>> {
    handle
        .live
        .lock()
        .expect("not poisoned")
        .as_ref()
        .and_then(|l| l.checkpoints.clone())
}

/// Remembers a savepoint the job wrote.
pub(super) fn record_savepoint(handle: &JobHandle, location: &Location, operation: Option<String>) {
    let checkpoint = location
        .local()
        .and_then(|path| crate::checkpoint::metadata::read(path).ok())
        .map_or(0, |r| r.metadata.checkpoint);
    let path = location.to_string();
    handle.update(|record| {
        if !record.savepoints.iter().any(|s| s.path == path) {
            record.savepoints.push(SavepointRecord {
                path,
                checkpoint,
                time_ms: now_ms(),
                operation,
            });
        }
    });
}

fn savepoint(handle: &Arc<JobHandle>, operation: String, target: Location) {
    let Some(savepointer) = live_savepointer(handle) else {
        fail_operation(handle, &operation, "the job is between attempts; try again");
        return;
    };
    handle.transition(
        JobStatus::Savepointing,
        format!("savepoint requested (operation {operation})"),
    );
    let handle = handle.clone();
    tokio::spawn(async move {
        match savepointer.savepoint(target, None).await {
            Ok(path) => {
                record_savepoint(&handle, &path, Some(operation.clone()));
                handle.finish_operation(&operation, |o| {
                    o.savepoint = Some(path.to_string());
                });
            }
            Err(error) => fail_operation(&handle, &operation, error),
        }
        if handle.status() == JobStatus::Savepointing {
            handle.transition(JobStatus::Running, "savepoint done");
        }
    });
}

fn stop(handle: &Arc<JobHandle>, operation: String, target: Location, drain: bool) {
    let Some(savepointer) = live_savepointer(handle) else {
        fail_operation(handle, &operation, "the job is between attempts; try again");
        return;
    };
    handle.transition(
        JobStatus::Stopping,
        format!(
            "stop with a savepoint requested{} (operation {operation})",
            if drain { ", draining" } else { "" }
        ),
    );
    let handle = handle.clone();
    tokio::spawn(async move {
        if let Err(error) = savepointer.savepoint(target, Some(drain)).await {
            fail_operation(
                &handle,
                &operation,
                format!("the savepoint failed, the job runs on: {error}"),
            );
            if handle.status() == JobStatus::Stopping {
                handle.transition(JobStatus::Running, "the stop's savepoint failed");
            }
        }
    });
}

/// At host shutdown: a savepoint the next start resumes from, or a cancel
/// (resumed from the newest checkpoint).
async fn shutdown(
    handle: &Arc<JobHandle>,
    with_savepoint: bool,
    target: Location,
    running: &mut std::pin::Pin<
        &mut impl std::future::Future<Output = Result<crate::dataflow::runtime::JobOutcome, RunError>>,
    >,
) {
    let savepointer = live_savepointer(handle).filter(|_| with_savepoint);
    let mut stopped = None;
    if let Some(savepointer) = savepointer {
        handle.transition(JobStatus::Stopping, "the host is shutting down");
        match savepointer.native_savepoint(target, Some(false)).await {
            Ok(path) => stopped = Some(path),
            Err(error) => {
                warn!(%error, "the shutdown savepoint failed; cancelling (the job resumes from its newest checkpoint)")
            }
        }
    }
    if stopped.is_none() {
        match live_canceller(handle) {
            Some(cancel) => {
                let _ = cancel.send(true);
            }
            // Between attempts (waiting to restart): nothing runs to stop.
            None => {
                info!(
                    "job between attempts at the host's shutdown; the next host start resumes it"
                );
                return;
            }
        }
    }
    let _ = running.as_mut().await;
    *handle.live.lock().expect("not poisoned") = None;
    if let Some(path) = stopped {
        record_savepoint(handle, &path, None);
        let text = path.to_string();
        handle.update(|r| r.resume_from = Some(text.clone()));
        handle.transition(
            JobStatus::Stopped,
            format!(
                "host shut down: stopped with the savepoint {text}; the next host start resumes it"
            ),
        );
    } else {
        info!(
            "job cancelled for the host's shutdown; the next host start resumes it from its newest checkpoint"
        );
    }
}

fn delete_checkpoints(ctx: &HostContext, handle: &JobHandle) {
    for run in handle.record().runs {
        let dir = ctx.data.join("checkpoints").join(&run.run_id);
        if dir.exists()
            && let Err(error) = std::fs::remove_dir_all(&dir)
        {
            warn!(dir = %dir.display(), %error, "could not delete the cancelled job's checkpoints");
        }
    }
}

/// Keeps the record and the live view current for one run.
struct Observer<'a> {
    handle: Arc<JobHandle>,
    graph: JobGraph,
    checkpoints: Option<Arc<JobCheckpoints>>,
    phase: &'a Phase,
    probation: Option<(&'a Probation, watch::Sender<bool>)>,
    outcome: Arc<Mutex<ProbationOutcome>>,
    launched: bool,
    run_id: String,
}

/// Once this run has completed a checkpoint (and, on probation, passed
/// it), the checkpoints of the job's earlier runs can restore nothing newer
/// (savepoints live apart): their directories are removed, in the
/// background.
fn retire_earlier_runs(
    handle: &Arc<JobHandle>,
    run_id: String,
    checkpoints: Arc<CheckpointMetrics>,
    probation: Option<Arc<Mutex<ProbationOutcome>>>,
) {
    let handle = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            // Only this task still holds the counters: the run has ended.
            if Arc::strong_count(&checkpoints) == 1 {
                return;
            }
            let outcome = probation.as_ref().map(|o| *o.lock().expect("not poisoned"));
            if outcome == Some(ProbationOutcome::Failed) {
                return;
            }
            let decided = outcome.is_none_or(|o| o == ProbationOutcome::Passed);
            if decided && checkpoints.completed.load(Ordering::Relaxed) >= 1 {
                break;
            }
        }
        let earlier: Vec<String> = handle
            .record()
            .runs
            .iter()
            .map(|r| r.run_id.clone())
            .filter(|id| *id != run_id)
            .collect();
        let root = handle.ctx.data.join("checkpoints");
        let job = handle.id.clone();
        tokio::task::spawn_blocking(move || {
            for id in earlier {
                let dir = root.join(&id);
                if dir.exists()
                    && let Err(error) = std::fs::remove_dir_all(&dir)
                {
                    warn!(%job, dir = %dir.display(), %error, "could not remove an earlier run's checkpoints");
                }
            }
        });
    });
}

impl RunObserver for Observer<'_> {
    fn launched(&mut self, running: &Attempt) {
        *self.handle.live.lock().expect("not poisoned") = Some(Live {
            graph: self.graph.clone(),
            metrics: running.metrics().to_vec(),
            checkpoint_metrics: running.checkpoint_metrics(),
            checkpoints: self.checkpoints.clone(),
            savepointer: Some(running.savepointer()),
            canceller: Some(running.canceller()),
        });
        let first = !self.launched;
        self.launched = true;
        if first && let Some(checkpoints) = running.checkpoint_metrics() {
            let probation = matches!(self.phase, Phase::Probation(_)).then(|| self.outcome.clone());
            retire_earlier_runs(&self.handle, self.run_id.clone(), checkpoints, probation);
        }
        let status = self.handle.status();
        if status == JobStatus::Cancelling {
            running.cancel();
            return;
        }
        match self.phase {
            Phase::Probation(_) if first => {
                if let Some((probation, release)) = &self.probation {
                    upgrade::watch_probation(
                        &self.handle,
                        probation,
                        running,
                        release.clone(),
                        self.outcome.clone(),
                    );
                }
            }
            Phase::RollBack(rollback) if first => {
                upgrade::watch_rollback(&self.handle, rollback, running);
                self.handle.transition(
                    JobStatus::Running,
                    format!(
                        "rolled back: the previous version runs again from {}",
                        rollback.savepoint
                    ),
                );
            }
            _ => {
                if matches!(
                    status,
                    JobStatus::Created | JobStatus::Restarting | JobStatus::Failing
                ) {
                    self.handle
                        .transition(JobStatus::Running, "all tasks started");
                }
            }
        }
    }

    fn failed(
        &mut self,
        error: &TaskError,
    ) -> impl std::future::Future<Output = Option<String>> + Send {
        std::future::ready(self.decide(error))
    }
    fn restarting(&mut self, _error: &TaskError, attempt: u32, delay: Duration, from: &str) {
        self.handle.update(|record| {
            if let Some(last) = record.restarts.last_mut() {
                last.attempt = attempt;
            }
        });
        self.handle.transition(
            JobStatus::Restarting,
            format!(
                "restart {attempt} in {} from {from}",
                humantime::format_duration(delay)
            ),
        );
    }
}

impl Observer<'_> {
    /// Whether a failed attempt restarts (None: the restart strategy
    /// decides).
    fn decide(&mut self, error: &TaskError) -> Option<String> {
        let message = error.to_string();
        *self.handle.live.lock().expect("not poisoned") = None;
        self.handle.update(|record| {
            record.last_error = Some(message.clone());
            record.restarts.push(RestartRecord {
                time_ms: now_ms(),
                uid: error.uid.clone(),
                error: message.clone(),
                attempt: 0,
            });
        });
        if self.handle.status() == JobStatus::Cancelling {
            return Some("it was being cancelled".to_string());
        }
        let mut outcome = self.outcome.lock().expect("not poisoned");
        if matches!(self.phase, Phase::Probation(_)) && *outcome == ProbationOutcome::Pending {
            *outcome = ProbationOutcome::Failed;
            return Some("it failed during the upgrade's probation".to_string());
        }
        drop(outcome);
        self.handle.transition(JobStatus::Failing, message);
        None
    }
}

/// uid → plugin (name@version and digest) a spec runs.
pub(super) fn plugin_versions(
    ctx: &HostContext,
    spec: &JobSpec,
) -> BTreeMap<String, PluginVersion> {
    let Ok(file) = crate::job::JobFile::parse(&spec.job_file, &spec.base_dir.join(&spec.file_name))
    else {
        return BTreeMap::new();
    };
    let names: HashMap<String, String> = ctx
        .store
        .list()
        .into_iter()
        .map(|p| (p.digest.clone(), p.reference()))
        .collect();
    file.operators
        .iter()
        .filter_map(|op| {
            let digest = spec
                .overrides
                .get(&op.uid)
                .or_else(|| spec.resolved.get(&op.plugin))?
                .clone();
            let plugin = names
                .get(&digest)
                .cloned()
                .unwrap_or_else(|| format!("sha256:{}", &digest[..12.min(digest.len())]));
            Some((op.uid.clone(), PluginVersion { plugin, digest }))
        })
        .collect()
}

/// The record plus the live view of the current run.
/// A time counter (ns) summed over subtasks, in milliseconds.
fn total_ms(subtasks: &[SubtaskMetrics], counter: impl Fn(&SubtaskMetrics) -> &AtomicU64) -> f64 {
    subtasks
        .iter()
        .map(|s| counter(s).load(Ordering::Relaxed) as f64 / 1e6)
        .sum()
}

pub(super) fn detail(ctx: &HostContext, handle: &JobHandle) -> JobDetail {
    let record = handle.record();
    let versions = plugin_versions(ctx, &record.spec);
    let live = handle.live.lock().expect("not poisoned");
    // Key counts: from the newest restore point that has them (savepoints
    // count; incremental checkpoints do not scan the state).
    let counts = |read: &crate::checkpoint::metadata::ReadMetadata| {
        read.metadata
            .operators
            .values()
            .flat_map(|op| &op.subtasks)
            .any(|s| !s.state_stats.is_empty())
    };
    let latest =
        live.as_ref()
            .and_then(|l| l.checkpoints.as_ref())
            .and_then(|c| c.latest())
            .filter(counts)
            .or_else(|| {
                record.savepoints.last().and_then(|s| {
                    crate::checkpoint::metadata::read(std::path::Path::new(&s.path)).ok()
                })
            });
    let mut operators = Vec::new();
    if let Some(live) = live.as_ref() {
        for (node_id, (node, metrics)) in live.graph.nodes.iter().zip(&live.metrics).enumerate() {
            let role = match node.kind {
                NodeKind::Source(_) => "source",
                NodeKind::Operator(_) => "operator",
                NodeKind::Sink(_) => "sink",
            };
            let mut state_keys = BTreeMap::new();
            for subtask in &metrics.subtasks {
                for table in subtask.state.lock().expect("not poisoned").iter() {
                    let name = table.table.rsplit('/').next().unwrap_or(&table.table);
                    *state_keys.entry(name.to_string()).or_insert(0) += table.keys;
                }
            }
            if state_keys.is_empty()
                && let Some(op) = latest
                    .as_ref()
                    .and_then(|l| l.metadata.operators.get(&node.uid))
            {
                for subtask in &op.subtasks {
                    for stats in &subtask.state_stats {
                        *state_keys.entry(stats.name.clone()).or_insert(0) += stats.keys;
                    }
                }
            }
            operators.push(OperatorView {
                uid: node.uid.clone(),
                role: role.to_string(),
                plugin: versions.get(&node.uid).cloned(),
                parallelism: node.parallelism,
                inputs: live
                    .graph
                    .edges
                    .iter()
                    .filter(|e| e.to == node_id)
                    .map(|e| live.graph.nodes[e.from].uid.clone())
                    .collect(),
                records_in: metrics.records_in(),
                records_out: metrics.records_out(),
                busy_ms: total_ms(&metrics.subtasks, |s| &s.busy_ns),
                idle_ms: total_ms(&metrics.subtasks, |s| &s.idle_ns),
                backpressured_ms: total_ms(&metrics.subtasks, |s| &s.backpressured_ns),
                state_keys,
            });
        }
    }
    let metrics = live.as_ref().and_then(|l| l.checkpoint_metrics.clone());
    JobDetail {
        job: record,
        operators,
        checkpoints_completed: metrics
            .as_ref()
            .map_or(0, |m| m.completed.load(Ordering::Relaxed)),
        checkpoints_failed: metrics
            .as_ref()
            .map_or(0, |m| m.failed.load(Ordering::Relaxed)),
        checkpoints: metrics
            .map(|m| {
                m.recent()
                    .into_iter()
                    .map(|c| CheckpointView {
                        id: c.id,
                        completed_ms: c.completed_ms,
                        duration_ms: c.duration.as_secs_f64() * 1000.0,
                        alignment_ms: c.alignment.as_secs_f64() * 1000.0,
                        bytes: c.bytes,
                        new_bytes: c.new_bytes,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}
