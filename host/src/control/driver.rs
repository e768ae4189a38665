//! A job's driver: one tokio task per job of the running host, and the
//! only code that starts, watches and ends the job's runs and changes its
//! status (through [`JobHandle::transition`]).
//!
//! The driver runs a state machine of [`Step`]s. Each step is a type whose
//! `next(self, &mut JobCtx) -> Step` does its work while it reads the job's
//! messages ([`JobCtx::next`]: commands from the API, events of the current
//! run), so at every step a cancel, a stop, the host's shutdown or a task
//! failure is seen and handled, not after the step. [`Running`] is a job
//! with no procedure in progress; each procedure reads top to bottom in its
//! own module: [`super::savepoint`], [`super::stop`] (stop, cancel, the
//! host's shutdown), [`super::upgrade`]. Runs are tasks of their own
//! ([`super::run`]) that report to the driver and wait for its decision
//! when an attempt fails.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::jobs::JobHandle;
use super::lifecycle::{JobStatus, TransitionError};
use super::record::*;
use super::run::{self, AttemptView, RunEvent, RunFailure, RunHandle, RunPlan};
use super::upgrade::{self, Upgrade};
use super::{HostContext, now_ms, savepoint, stop};
use crate::checkpoint::coordinator::{CheckpointMetrics, JobCheckpoints, Savepointer};
use crate::dataflow::runtime::{JobOutcome, NodeMetrics};
use crate::job::JobGraph;

use crate::types::Location;

/// What the API can see of a job's current run.
pub(super) struct Live {
    pub graph: Arc<JobGraph>,
    pub metrics: Vec<Arc<NodeMetrics>>,
    pub checkpoint_metrics: Option<Arc<CheckpointMetrics>>,
    pub checkpoints: Option<Arc<JobCheckpoints>>,
}

/// What the job manager asks a driver to do.
pub(super) enum Command {
    Savepoint {
        operation: String,
        target: Location,
        /// A task's part of a staged job's savepoint: the cut's name.
        cut: Option<String>,
    },
    Stop {
        operation: String,
        target: Location,
        drain: bool,
        /// A stage of a staged job stopped whole: its sources wait for the
        /// stages upstream (see `SavepointRequest::aligned`).
        aligned: bool,
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

impl Command {
    /// The operation it answers (none: the host's shutdown).
    pub fn operation(&self) -> Option<&str> {
        match self {
            Command::Savepoint { operation, .. }
            | Command::Stop { operation, .. }
            | Command::Cancel { operation }
            | Command::Upgrade { operation, .. } => Some(operation),
            Command::Shutdown { .. } => None,
        }
    }
}

/// What a step reads: a command, or an event of the job's current run.
pub(super) enum Message {
    Command(Command),
    Run(RunEvent),
}

/// The run the job has now.
pub(super) struct CurrentRun {
    pub handle: RunHandle,
    pub spec: JobSpec,
    pub allow_non_restored_state: bool,
    pub restore: Option<Location>,
    /// Its running attempt (None: preparing, restarting, or ended).
    pub attempt: Option<AttemptView>,
    /// Attempts launched so far.
    pub launches: u32,
    /// Its end was seen.
    pub ended: bool,
}

/// Everything a step works with: the host, the job, its messages and its
/// current run. Only the driver's task holds it.
pub(super) struct JobCtx {
    pub host: Arc<HostContext>,
    pub job: Arc<JobHandle>,
    commands: mpsc::UnboundedReceiver<Command>,
    events_sender: mpsc::UnboundedSender<RunEvent>,
    events: mpsc::UnboundedReceiver<RunEvent>,
    pub run: Option<CurrentRun>,
}

impl JobCtx {
    /// The next command, or event of the current run (events of runs that
    /// ended are dropped: a failure nobody answers restarts nothing).
    pub async fn next(&mut self) -> Message {
        loop {
            tokio::select! {
                biased;
                Some(command) = self.commands.recv() => return Message::Command(command),
                Some(event) = self.events.recv() => {
                    if self.run.as_ref().is_some_and(|r| r.handle.id == event.run()) {
                        self.track(&event);
                        return Message::Run(event);
                    }
                }
                else => std::future::pending::<()>().await,
            }
        }
    }

    /// Keeps the current run's attempt and the API's live view current.
    fn track(&mut self, event: &RunEvent) {
        let Some(run) = self.run.as_mut() else { return };
        match event {
            RunEvent::Launched { attempt, .. } => {
                run.attempt = Some(attempt.clone());
                run.launches += 1;
                *self.job.live.lock().expect("not poisoned") = Some(Live {
                    graph: attempt.graph.clone(),
                    metrics: attempt.metrics.clone(),
                    checkpoint_metrics: attempt.checkpoint_metrics.clone(),
                    checkpoints: attempt.checkpoints.clone(),
                });
            }
            RunEvent::Failed { .. } => {
                run.attempt = None;
                *self.job.live.lock().expect("not poisoned") = None;
            }
            RunEvent::Ended { .. } => {
                run.attempt = None;
                run.ended = true;
                *self.job.live.lock().expect("not poisoned") = None;
            }
            RunEvent::Restarting { .. } => {}
        }
    }

    /// Starts `plan` as the job's current run.
    pub fn start_run(&mut self, plan: RunPlan) {
        let spec = plan.spec.clone();
        let allow_non_restored_state = plan.allow_non_restored_state;
        let restore = plan.restore.clone();
        let handle = run::start(&self.host, &self.job, plan, self.events_sender.clone());
        self.run = Some(CurrentRun {
            handle,
            spec,
            allow_non_restored_state,
            restore,
            attempt: None,
            launches: 0,
            ended: false,
        });
    }

    /// The running attempt's savepointer, if an attempt runs.
    pub fn savepointer(&self) -> Option<Savepointer> {
        self.run
            .as_ref()
            .and_then(|r| r.attempt.as_ref())
            .map(|a| a.savepointer.clone())
    }

    /// When the running attempt took in its first record (None between
    /// attempts, or when its run's plan did not ask).
    pub fn first_record(&self) -> Option<run::FirstRecord> {
        self.run
            .as_ref()
            .and_then(|r| r.attempt.as_ref())
            .and_then(|a| a.first_record.clone())
    }

    /// The running attempt's record counters (empty between attempts).
    pub fn metrics(&self) -> Vec<Arc<NodeMetrics>> {
        self.run
            .as_ref()
            .and_then(|r| r.attempt.as_ref())
            .map(|a| a.metrics.clone())
            .unwrap_or_default()
    }

    /// Cancels the current run, whatever it is doing.
    pub fn cancel_run(&self) {
        if let Some(run) = &self.run {
            run.handle.cancel();
        }
    }

    /// Moves the job to `to`. A refusal is a fault of the driver (it owns
    /// the job's status): recorded as the job's last error, logged, and
    /// returned.
    pub fn transition(
        &self,
        to: JobStatus,
        cause: impl Into<String>,
    ) -> Result<(), TransitionError> {
        self.job
            .transition(to, cause)
            .inspect_err(|error| self.fault(error))
    }

    /// Moves the job from `expected` to `to`; `false` when it is no longer
    /// `expected` (what happened meanwhile decided its status).
    pub fn transition_from(
        &self,
        expected: JobStatus,
        to: JobStatus,
        cause: impl Into<String>,
    ) -> bool {
        match self.job.transition_from(expected, to, cause) {
            Ok(()) => true,
            Err(TransitionError::NotIn { .. }) => false,
            Err(error) => {
                self.fault(&error);
                false
            }
        }
    }

    fn fault(&self, error: &TransitionError) {
        error!(job = %self.job.id, %error, "the driver asked for a status change the state machine refuses");
        let message = format!("internal error: {error}");
        self.job.update(|r| r.last_error = Some(message));
    }

    /// Fails `operation` with `error`.
    pub fn fail_operation(&self, operation: &str, error: impl Into<String>) {
        fail_operation(&self.job, operation, error);
    }

    /// Answers a command this step does not carry out.
    pub fn refuse(&self, command: Command, why: &str) {
        match command {
            Command::Shutdown { done, .. } => {
                let _ = done.send(());
            }
            other => {
                if let Some(operation) = other.operation() {
                    self.fail_operation(operation, why);
                }
            }
        }
    }

    /// Remembers a savepoint target before its barrier goes out (see
    /// [`JobRecord::savepoint_targets`]).
    pub fn note_savepoint_target(&self, target: &Location) {
        self.job.update(|r| r.note_savepoint_target(target));
    }

    /// The default for an event of the current run no procedure needs:
    /// an attempt launched is running; a failure goes to the restart
    /// strategy; the run's end ends the job. `Some(step)`: what comes next.
    pub fn on_run_event(&mut self, event: RunEvent) -> Option<Step> {
        match event {
            RunEvent::Launched { .. } => {
                let status = self.job.status();
                if matches!(
                    status,
                    JobStatus::Created | JobStatus::Restarting | JobStatus::Failing
                ) {
                    let _ = self.transition(JobStatus::Running, "all tasks started");
                }
                if status == JobStatus::Cancelling {
                    self.cancel_run();
                }
                self.retire_earlier_runs();
                None
            }
            RunEvent::Failed { error, decide, .. } => {
                let message = self.record_failure(&error);
                if self.job.status() == JobStatus::Cancelling {
                    let _ = decide.send(Some("it was being cancelled".to_string()));
                } else if error.kind() == crate::dataflow::FailureKind::Fenced {
                    // Another host owns the job now: never restarted here
                    // (the cluster's follower releases it); it fails here.
                    let _ = self.transition(JobStatus::Failing, message);
                    let _ = decide.send(Some("another host owns the job now".to_string()));
                } else {
                    let _ = self.transition(JobStatus::Failing, message);
                    let _ = decide.send(None);
                }
                None
            }
            RunEvent::Restarting {
                attempt,
                delay,
                from,
                ..
            } => {
                self.job.update(|record| {
                    if let Some(last) = record.restarts.last_mut() {
                        last.attempt = attempt;
                    }
                });
                let _ = self.transition(
                    JobStatus::Restarting,
                    format!(
                        "restart {attempt} in {} from {from}",
                        humantime::format_duration(delay)
                    ),
                );
                None
            }
            RunEvent::Ended { result, .. } => Some(self.run_ended(result, None)),
        }
    }

    /// Records a failed attempt; returns its message.
    pub fn record_failure(&self, error: &crate::dataflow::TaskError) -> String {
        let message = error.to_string();
        self.job.update(|record| {
            record.last_error = Some(message.clone());
            record.restarts.push(RestartRecord {
                time_ms: now_ms(),
                uid: error.uid.clone(),
                error: message.clone(),
                attempt: 0,
            });
        });
        message
    }

    /// The job's run ended: the job ends as the run did (stopped with a
    /// savepoint, cancelled, finished or failed). `operation`: the one that
    /// ended it, finished with the outcome.
    pub fn run_ended(
        &mut self,
        result: Result<JobOutcome, RunFailure>,
        operation: Option<&str>,
    ) -> Step {
        match result {
            Ok(outcome) if outcome.savepoint.is_some() => {
                let location = outcome.savepoint.expect("checked");
                self.record_savepoint(&location, operation.map(str::to_string));
                if let Some(operation) = operation {
                    self.job.finish_operation(operation, |o| {
                        o.savepoint = Some(location.to_string());
                        o.outcome = Some("stopped".to_string());
                    });
                }
                let _ = self.transition(
                    JobStatus::Stopped,
                    format!("stopped with the savepoint {location}"),
                );
            }
            Ok(outcome) if outcome.cancelled => {
                self.delete_checkpoints_if_asked();
                if let Some(operation) = operation {
                    self.job
                        .finish_operation(operation, |o| o.outcome = Some("cancelled".to_string()));
                }
                let _ = self.transition(JobStatus::Cancelled, "cancelled");
            }
            Ok(_) => {
                let _ = self.transition(JobStatus::Finished, "its sources ended");
            }
            Err(failure) => {
                let message = failure.to_string();
                if let Some(operation) = operation {
                    self.fail_operation(operation, message.clone());
                }
                self.job.update(|r| r.last_error = Some(message.clone()));
                let _ = self.transition(JobStatus::Failed, message);
            }
        }
        Step::Ended
    }

    /// Remembers a savepoint the job wrote.
    pub fn record_savepoint(&self, location: &Location, operation: Option<String>) {
        record_savepoint(&self.job, location, operation, |_| {});
    }

    /// [`Self::record_savepoint`], with `also` changed in the same write.
    pub fn record_savepoint_and(
        &self,
        location: &Location,
        operation: Option<String>,
        also: impl FnOnce(&mut JobRecord),
    ) {
        record_savepoint(&self.job, location, operation, also);
    }

    /// `[checkpoint] on_cancel = "delete"`: a cancelled job's checkpoints go.
    fn delete_checkpoints_if_asked(&self) {
        let Some(spec) = self.run.as_ref().map(|r| &r.spec) else {
            return;
        };
        let delete = super::jobs::build_graph(&self.host, spec)
            .is_ok_and(|g| g.checkpoint.on_cancel == crate::job::OnCancel::Delete);
        if !delete {
            return;
        }
        for run in self.job.record().runs {
            let dir = self.host.data.join("checkpoints").join(&run.run_id);
            if dir.exists()
                && let Err(error) = std::fs::remove_dir_all(&dir)
            {
                warn!(dir = %dir.display(), %error, "could not delete the cancelled job's checkpoints");
            }
        }
    }

    /// Once the current run has completed a checkpoint, the checkpoints of
    /// the job's earlier runs can restore nothing newer (savepoints live
    /// apart): their directories are removed, in the background. Called
    /// when a run is the job's for good (not on probation).
    pub fn retire_earlier_runs(&self) {
        let Some(run) = &self.run else { return };
        let Some(checkpoints) = run
            .attempt
            .as_ref()
            .and_then(|a| a.checkpoint_metrics.clone())
        else {
            return;
        };
        let (job, run_id) = (self.job.clone(), run.handle.id.clone());
        let root = self.host.data.join("checkpoints");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                // Only this task still holds the counters: the attempt ended.
                if Arc::strong_count(&checkpoints) == 1 {
                    return;
                }
                if checkpoints.completed.load(Ordering::Relaxed) >= 1 {
                    break;
                }
            }
            let earlier: Vec<String> = job
                .record()
                .runs
                .iter()
                .map(|r| r.run_id.clone())
                .filter(|id| *id != run_id)
                .collect();
            let id = job.id.clone();
            tokio::task::spawn_blocking(move || {
                for run in earlier {
                    let dir = root.join(&run);
                    if dir.exists()
                        && let Err(error) = std::fs::remove_dir_all(&dir)
                    {
                        warn!(job = %id, dir = %dir.display(), %error, "could not remove an earlier run's checkpoints");
                    }
                }
            });
        });
    }
}

/// A job with no procedure in progress: it runs (or restarts, or starts).
pub(super) struct Running;

/// The driver's state machine: where a job's driver is.
pub(super) enum Step {
    Running(Running),
    Savepoint(savepoint::Taking),
    Stop(stop::Stopping),
    Cancel(stop::Cancelling),
    Shutdown(stop::ShuttingDown),
    Upgrade(Box<upgrade::Step>),
    /// The job ended (or the host stopped driving it): the driver answers
    /// what is left and returns.
    Ended,
}

impl Step {
    async fn next(self, ctx: &mut JobCtx) -> Step {
        match self {
            Step::Running(step) => step.next(ctx).await,
            Step::Savepoint(step) => step.next(ctx).await,
            Step::Stop(step) => step.next(ctx).await,
            Step::Cancel(step) => step.next(ctx).await,
            Step::Shutdown(step) => step.next(ctx).await,
            Step::Upgrade(step) => step.next(ctx).await,
            Step::Ended => Step::Ended,
        }
    }
}

impl Running {
    /// Takes commands and run events until a procedure starts or the job
    /// ends.
    pub async fn next(self, ctx: &mut JobCtx) -> Step {
        loop {
            match ctx.next().await {
                Message::Command(command) => return Self::command(ctx, command),
                Message::Run(event) => {
                    if let Some(step) = ctx.on_run_event(event) {
                        return step;
                    }
                }
            }
        }
    }

    /// Starts the procedure a command asks for.
    pub fn command(ctx: &mut JobCtx, command: Command) -> Step {
        match command {
            Command::Savepoint {
                operation,
                target,
                cut,
            } => savepoint::start(ctx, operation, target, cut),
            Command::Stop {
                operation,
                target,
                drain,
                aligned,
            } => stop::start(ctx, operation, target, drain, aligned),
            Command::Cancel { operation } => stop::cancel(ctx, Some(operation)),
            Command::Upgrade { operation, upgrade } => upgrade::start(ctx, operation, *upgrade),
            Command::Shutdown {
                savepoint,
                target,
                done,
            } => stop::shutdown(ctx, savepoint, target, done),
        }
    }
}

/// Drives the job from `first` (its first run, or its resume at the
/// host's start) until it ends.
pub(super) async fn drive(
    host: Arc<HostContext>,
    job: Arc<JobHandle>,
    commands: mpsc::UnboundedReceiver<Command>,
    first: Option<RunPlan>,
) {
    let (events_sender, events) = mpsc::unbounded_channel();
    let mut ctx = JobCtx {
        host,
        job,
        commands,
        events_sender,
        events,
        run: None,
    };
    let mut step = match first {
        Some(plan) => {
            ctx.start_run(plan);
            Step::Running(Running)
        }
        None => Step::Ended,
    };
    loop {
        step = match step {
            Step::Ended => break,
            step => step.next(&mut ctx).await,
        };
    }
    *ctx.job.live.lock().expect("not poisoned") = None;
    // An operation the job's end overtook fails rather than stay open.
    let open: Vec<String> = ctx
        .job
        .record()
        .operations
        .iter()
        .filter(|o| o.status == OperationStatus::Running)
        .map(|o| o.id.clone())
        .collect();
    for operation in open {
        let status = ctx.job.status();
        ctx.fail_operation(&operation, format!("the job ended ({status}) first"));
    }
    // Answer what came in as the job ended.
    ctx.commands.close();
    while let Ok(command) = ctx.commands.try_recv() {
        ctx.refuse(command, "the job ended first");
    }
}

/// How a job the host finds live at its start resumes: from the savepoint
/// it was stopped with at shutdown, else from its newest completed
/// checkpoint (or savepoint). Operations and upgrades the old host left
/// unfinished are closed as such. None: nothing to run (it was being
/// cancelled).
pub(super) fn resume_plan(ctx: &HostContext, handle: &JobHandle) -> Option<RunPlan> {
    let record = handle.record();
    // An upgrade whose old version had stopped: its new version never
    // passed probation (its commits were held), so the previous version
    // resumes from the upgrade's savepoint — a rollback.
    let rollback = match &record.resume_from {
        Some(_) => None,
        None => record.upgrades.iter().find_map(|u| {
            let to = u.rollback_to.clone().filter(|_| u.step.is_some())?;
            Some((u.operation.clone(), u.savepoint.clone()?, to))
        }),
    };
    let mut discarded = Vec::new();
    handle.update(|record| {
        for operation in &mut record.operations {
            if operation.status == OperationStatus::Running {
                operation.status = OperationStatus::Failed;
                operation.finished_ms = Some(now_ms());
                operation.error = Some("the host stopped before the operation finished".into());
            }
        }
        if let Some((operation, savepoint, _)) = &rollback {
            let reason = run::upgrade_reason(operation);
            for run in record.runs.iter_mut().filter(|r| r.reason == reason) {
                run.abandoned = true;
                discarded.push(run.run_id.clone());
            }
            if let Some(upgrade) = record.upgrade_mut(operation) {
                upgrade.error = Some(format!(
                    "the host stopped during the upgrade ({}), before the new version passed its probation; the previous version resumed from the upgrade's savepoint {savepoint}",
                    upgrade.step.as_deref().unwrap_or("?")
                ));
                upgrade.outcome = "rolled-back".to_string();
                upgrade.step = None;
                upgrade.rollback_to = None;
            }
        }
        for upgrade in &mut record.upgrades {
            if upgrade.step.is_some() {
                upgrade.error = Some(format!(
                    "the host stopped during the upgrade ({}); the job resumed from its newest restore point",
                    upgrade.step.as_deref().unwrap_or("?")
                ));
                upgrade.outcome = "abandoned".to_string();
                upgrade.step = None;
            }
        }
    });
    let refused = |error: TransitionError| {
        error!(job = %handle.id, %error, "cannot resume the job");
        handle.update(|r| r.last_error = Some(format!("internal error: {error}")));
    };
    let (restore, reason) = match &record.resume_from {
        Some(savepoint) => {
            handle.update(|r| r.resume_from = None);
            if let Err(error) = handle.transition(
                JobStatus::Created,
                format!(
                    "host started: resuming from the savepoint taken at its shutdown, {savepoint}"
                ),
            ) {
                refused(error);
                return None;
            }
            (
                Some(recorded_location(savepoint)),
                "resumed after a host shutdown",
            )
        }
        None if let Some((operation, savepoint, to)) = rollback => {
            if let Err(error) = handle.transition(
                JobStatus::Restarting,
                format!("host restarted during an upgrade's probation: the previous version resumes from its savepoint {savepoint}"),
            ) {
                refused(error);
                return None;
            }
            let mut plan = RunPlan::new(
                to.spec,
                Some(recorded_location(&savepoint)),
                to.allow_non_restored_state,
                format!("rollback after a host restart (operation {operation})"),
            );
            plan.discard_runs = discarded;
            return Some(plan);
        }
        None => {
            if record.status() == JobStatus::Cancelling {
                if let Err(error) =
                    handle.transition(JobStatus::Cancelled, "host restarted while cancelling")
                {
                    refused(error);
                }
                return None;
            }
            let point = newest_restore_point(ctx, &record);
            let from = point.as_ref().map_or_else(
                || "the beginning (no checkpoint)".to_string(),
                ToString::to_string,
            );
            if let Err(error) = handle.transition(
                JobStatus::Restarting,
                format!("host restarted: resuming from {from}"),
            ) {
                refused(error);
                return None;
            }
            (point, "resumed after a host restart")
        }
    };
    Some(RunPlan::new(
        record.spec.clone(),
        restore,
        record.allow_non_restored_state,
        reason,
    ))
}

/// A submitted job's first run (its id is the job id).
pub(super) fn first_plan(record: &JobRecord) -> RunPlan {
    let mut plan = RunPlan::new(
        record.spec.clone(),
        record.initial_restore.as_deref().map(recorded_location),
        record.allow_non_restored_state,
        "submitted",
    );
    plan.run_id = record.id.clone();
    plan
}

/// A location the job record holds (validated when it was recorded).
pub(super) fn recorded_location(text: &str) -> Location {
    Location::parse(text).unwrap_or_else(|_| Location::Local(PathBuf::from(text)))
}

pub(super) fn fail_operation(handle: &JobHandle, operation: &str, error: impl Into<String>) {
    let error = error.into();
    handle.finish_operation(operation, |o| {
        o.status = OperationStatus::Failed;
        o.error = Some(error);
    });
}

/// Remembers a savepoint the job wrote.
pub(super) fn record_savepoint(
    handle: &JobHandle,
    location: &Location,
    operation: Option<String>,
    also: impl FnOnce(&mut JobRecord),
) {
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
        also(record);
    });
}

/// Where a job the host finds live at its start resumes from: the newest
/// (by checkpoint id) valid checkpoint of its runs that did not fail a
/// probation, or savepoint of its runs (recorded, or found in a directory
/// a savepoint was asked into: one may have completed, its output
/// committed, just before the host died), or what its first run restored.
pub(super) fn newest_restore_point(ctx: &HostContext, record: &JobRecord) -> Option<Location> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    for run in record.runs.iter().filter(|r| !r.abandoned) {
        let dir = ctx.data.join("checkpoints").join(&run.run_id);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.filter_map(Result::ok) {
                if entry.file_name().to_string_lossy().starts_with("chk-") {
                    candidates.push(entry.path());
                }
            }
        }
    }
    candidates.extend(
        record
            .savepoints
            .iter()
            .filter_map(|s| recorded_location(&s.path).local().map(PathBuf::from)),
    );
    let runs: Vec<&str> = record
        .runs
        .iter()
        .filter(|r| !r.abandoned)
        .map(|r| r.run_id.as_str())
        .collect();
    let prefix = format!("savepoint-{}-", &record.id[..record.id.len().min(6)]);
    for target in &record.savepoint_targets {
        let Some(dir) = recorded_location(target).local().map(PathBuf::from) else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(&prefix) {
                continue;
            }
            // Only this job's runs' savepoints (another job's id may share
            // the first six characters).
            let ours = crate::checkpoint::metadata::read(&entry.path())
                .is_ok_and(|r| runs.contains(&r.metadata.job_id.as_str()));
            if ours {
                candidates.push(entry.path());
            }
        }
    }
    candidates.extend(
        record
            .initial_restore
            .iter()
            .filter_map(|s| recorded_location(s).local().map(PathBuf::from)),
    );
    let mut read: Vec<(u64, PathBuf)> = candidates
        .into_iter()
        .filter_map(|path| {
            crate::checkpoint::metadata::read(&path)
                .ok()
                .map(|r| (r.metadata.checkpoint, path))
        })
        .collect();
    read.sort_by_key(|(id, _)| std::cmp::Reverse(*id));
    read.dedup_by(|a, b| a.1 == b.1);
    let newest = read
        .into_iter()
        .map(|(_, path)| path)
        .find(|path| crate::checkpoint::savepoint::validate(path).is_ok())
        .map(Location::Local);
    // A remote restore point the job started from (it is never newer
    // than what the job wrote since).
    newest.or_else(|| {
        record
            .initial_restore
            .as_deref()
            .map(recorded_location)
            .filter(|l| l.local().is_none())
    })
}
