//! The hot-upgrade procedure, one step after the other:
//!
//! 1. [`Check`]: the new plugins are loaded (precompiled, cached) and
//!    checked against the job's newest completed checkpoint: restore
//!    rules, schema versions, a migrate export where a version changed. A
//!    refused upgrade leaves the job running, untouched.
//! 2. [`Standby`] (an upgrade that migrates state): the new version's
//!    state is restored and migrated from a checkpoint taken now, then
//!    caught up with further checkpoints until a round is quick (rounds
//!    that do not converge slow the sources down), while the old version
//!    runs on: the stop then has only the last changes to migrate.
//! 3. [`StopOld`]: the old version stops with a savepoint (incremental on
//!    a standby's chain, else prepared by base checkpoints). The only
//!    point at which a job's plugin code changes.
//! 4. [`Restore`]: the new version restores from that savepoint, its
//!    sinks' commits held.
//! 5. [`Probation`]: it runs until it completed `probation_checkpoints`
//!    checkpoints (or the probation time passed) without failing; then the
//!    held commits go out and the upgrade is done — or, asked to await
//!    release (a task of a staged job's stage), it holds them until
//!    released or told to roll back (`JobManager::verdict`; told so before
//!    the stop, steps 1–2 end the upgrade there, the job untouched; after
//!    it, the probation rolls back at once). Its outcome is decided
//!    here alone: a failure reaches this step as a question (restart?),
//!    answered in order with the checkpoints it counts.
//! 6. [`RollBack`]: the new version could not start or failed on
//!    probation: the old plugins restart from the same savepoint, and the
//!    new version's uncommitted output is discarded (its files are named
//!    by its run id).
//!
//! At every step a cancel, a stop, the host's shutdown or a task failure
//! is handled there: before the stop the upgrade is abandoned (a standby
//! dropped, its files removed) and the job goes on or ends as asked; after
//! it, the new version's run is cancelled and the job ends at the
//! upgrade's savepoint, running the previous version when it resumes.
//!
//! Downtime is measured from the last record the old version's operators
//! took in to the first record the new (or rolled-back) version's took in
//! ([`ActivityWatch`], sampling the record counters every millisecond).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::driver::{Command, JobCtx, Message, Running, Step as DriverStep};
use super::lifecycle::JobStatus;
use super::now_ms;
use super::record::*;
use super::run::{self, RunEvent, RunFailure, RunPlan};
use super::stop;
use super::views::plugin_versions;
use crate::checkpoint::coordinator::{PREPARED_UNDER, Savepointer};
use crate::dataflow::runtime::{JobOutcome, NodeMetrics};
use crate::failpoints;
use crate::protocol::TransferProgress;
use crate::runner::{PreparedJob, RunOptions, Standby as StandbyState};
use crate::types::Location;

/// An upgrade the job manager accepted in shape.
#[derive(Clone)]
pub(super) struct Upgrade {
    pub spec: JobSpec,
    pub allow_non_restored_state: bool,
    pub probation: Duration,
    pub probation_checkpoints: u64,
    /// Once its probation passed, the new version awaits a verdict
    /// (`JobManager::verdict`), its commits held: a staged job's stage
    /// passes or rolls back as one.
    pub await_release: bool,
}

/// How long a new version whose probation passed awaits its release,
/// beyond its probation's length (a sibling task may have started its
/// probation that much later), before it rolls back: whoever was to
/// release it is gone.
const RELEASE_PATIENCE: Duration = Duration::from_secs(60);

/// What every step of one upgrade carries.
#[derive(Clone)]
struct Procedure {
    operation: String,
    upgrade: Upgrade,
    /// What ran before: a rollback runs it again, an abandoned upgrade
    /// leaves it.
    previous_spec: JobSpec,
    previous_allow: bool,
    /// What it changes, in a line.
    change: String,
}

/// Plugins the check loaded, by file: the new version's run reuses them.
type Loaded = std::collections::HashMap<std::path::PathBuf, Arc<crate::plugin::LoadedPlugin>>;

/// Where the upgrade is.
pub(super) enum Step {
    Check(Check),
    Standby(Standby),
    StopOld(StopOld),
    Restore(Restore),
    Probation(Probation),
    RollBack(RollBack),
}

impl Step {
    pub async fn next(self, ctx: &mut JobCtx) -> DriverStep {
        match self {
            Step::Check(step) => step.next(ctx).await,
            Step::Standby(step) => step.next(ctx).await,
            Step::StopOld(step) => step.next(ctx).await,
            Step::Restore(step) => step.next(ctx).await,
            Step::Probation(step) => step.next(ctx).await,
            Step::RollBack(step) => step.next(ctx).await,
        }
    }
}

fn update_upgrade(ctx: &JobCtx, operation: &str, change: impl FnOnce(&mut UpgradeRecord)) {
    ctx.job.update(|record| {
        if let Some(upgrade) = record.upgrade_mut(operation) {
            change(upgrade);
        }
    });
}

impl Procedure {
    /// The step it is at, as the record shows it.
    fn at(&self, ctx: &JobCtx, step: &str) {
        self.at_and(ctx, step, |_| {});
    }

    /// [`Self::at`], with `also` changed in the same write of the record
    /// (each write is an fsync, and the job waits on some).
    fn at_and(&self, ctx: &JobCtx, step: &str, also: impl FnOnce(&mut JobRecord)) {
        ctx.job.update(|record| {
            self.step_in(record, step);
            also(record);
        });
    }

    /// Sets the step the record shows (and logs it).
    fn step_in(&self, record: &mut JobRecord, step: &str) {
        info!(job = %record.id, operation = %self.operation, step, "upgrade");
        if let Some(upgrade) = record.upgrade_mut(&self.operation) {
            upgrade.step = Some(step.to_string());
        }
    }

    /// Refused before anything stopped: the job runs on unchanged.
    fn refuse(&self, ctx: &JobCtx, error: impl std::fmt::Display) {
        self.close(
            ctx,
            "refused",
            format!("upgrade refused, the job runs on unchanged: {error}"),
        );
    }

    /// Given up because something else came first.
    fn abandon(&self, ctx: &JobCtx, why: impl std::fmt::Display) {
        self.close(ctx, "abandoned", format!("upgrade abandoned: {why}"));
    }

    /// Whether a roll-back was asked before the old version stopped (a
    /// sibling task of its stage failed): if so the upgrade ends there,
    /// the job running on unchanged.
    fn rolled_back_early(&self, ctx: &JobCtx) -> bool {
        let Some(verdict) = ctx.job.take_verdict(&self.operation) else {
            return false;
        };
        if verdict.pass {
            return false;
        }
        self.close(
            ctx,
            "rolled-back",
            format!(
                "upgrade rolled back before the old version stopped, which runs on unchanged: {}",
                verdict.reason
            ),
        );
        true
    }

    /// Ends the upgrade with `outcome` and fails its operation with `error`.
    fn close(&self, ctx: &JobCtx, outcome: &str, error: String) {
        update_upgrade(ctx, &self.operation, |u| {
            u.outcome = outcome.to_string();
            u.step = None;
            u.rollback_to = None;
            u.error = Some(error.clone());
        });
        ctx.fail_operation(&self.operation, error);
    }

    /// What the job does about a message that interrupts the upgrade
    /// before the old version stopped: the upgrade is abandoned and the
    /// message handled as the running job would. `None`: the step goes on.
    fn before_stop(&self, ctx: &mut JobCtx, message: Message) -> Option<DriverStep> {
        match message {
            Message::Command(command @ Command::Cancel { .. }) => {
                self.abandon(ctx, "the job was cancelled");
                Some(Running::command(ctx, command))
            }
            Message::Command(command @ Command::Stop { .. }) => {
                self.abandon(ctx, "the job was stopped");
                Some(Running::command(ctx, command))
            }
            Message::Command(command @ Command::Shutdown { .. }) => {
                self.abandon(ctx, "the host shut down");
                Some(Running::command(ctx, command))
            }
            Message::Command(command) => {
                ctx.refuse(command, "the job is being upgraded");
                None
            }
            Message::Run(RunEvent::Failed { error, decide, .. }) => {
                // The restart strategy applies at once.
                self.abandon(ctx, format!("{error}"));
                ctx.on_run_event(RunEvent::Failed {
                    run: String::new(),
                    error,
                    decide,
                });
                Some(DriverStep::Running(Running))
            }
            Message::Run(event @ RunEvent::Ended { .. }) => {
                self.abandon(ctx, "the job's run ended first");
                ctx.on_run_event(event)
            }
            Message::Run(event) => ctx.on_run_event(event),
        }
    }

    /// What the job does about a command that interrupts the upgrade after
    /// the old version stopped with `savepoint` (the new version restoring
    /// or running; `started`: its run was started): a cancel cancels; a
    /// stop or the host's shutdown cancels the new run and ends the job at
    /// the savepoint, running the previous version when it resumes.
    /// `Some`: what comes next.
    fn after_stop(
        &self,
        ctx: &mut JobCtx,
        command: Command,
        savepoint: &Location,
        started: bool,
    ) -> Option<DriverStep> {
        let ending = match command {
            Command::Cancel { operation } => {
                self.abandon(ctx, "the job was cancelled");
                if started {
                    return Some(Running::command(ctx, Command::Cancel { operation }));
                }
                let _ = ctx.transition(JobStatus::Cancelling, "cancel requested");
                Ending::Cancelled(operation)
            }
            Command::Stop { operation, .. } => {
                self.abandon(ctx, "the job was stopped");
                Ending::Stopped(operation)
            }
            Command::Shutdown { done, .. } => {
                self.abandon(ctx, "the host shut down");
                Ending::Shutdown(done)
            }
            other => {
                ctx.refuse(other, "the job is being upgraded");
                return None;
            }
        };
        let rollback = RollBack::ending(self, savepoint.clone(), ending);
        if !started {
            return Some(rollback.ended(ctx));
        }
        ctx.cancel_run();
        Some(DriverStep::Upgrade(Box::new(Step::RollBack(rollback))))
    }

    fn to(&self) -> String {
        self.change.clone()
    }
}

/// What an upgrade changes, in a line: the plugins it swaps, the
/// parallelism it changes, a new job file.
fn describe(
    plugins: &BTreeMap<String, PluginVersion>,
    before: &JobSpec,
    after: &JobSpec,
) -> String {
    let mut parts: Vec<String> = plugins
        .iter()
        .map(|(uid, p)| format!("{uid}={}", p.plugin))
        .collect();
    parts.extend(
        after
            .parallelism
            .iter()
            .filter(|(uid, n)| before.parallelism.get(*uid) != Some(n))
            .map(|(uid, n)| format!("{uid} parallelism {n}")),
    );
    if before.job_file != after.job_file {
        parts.push("a new job file".to_string());
    }
    parts.join(", ")
}

/// Step 1: checking the new version.
pub(super) struct Check {
    procedure: Procedure,
    checking: JoinHandle<Result<PreparedJob, String>>,
}

/// Starts an upgrade of the running job: records it, and checks the new
/// version against the newest checkpoint (on a blocking thread).
pub(super) fn start(ctx: &mut JobCtx, operation: String, upgrade: Upgrade) -> DriverStep {
    let (previous_spec, previous_allow) = match &ctx.run {
        Some(run) => (run.spec.clone(), run.allow_non_restored_state),
        None => {
            let record = ctx.job.record();
            (record.spec, record.allow_non_restored_state)
        }
    };
    let before = plugin_versions(&ctx.host, &previous_spec);
    let after = plugin_versions(&ctx.host, &upgrade.spec);
    let changed: BTreeMap<_, _> = after
        .iter()
        .filter(|(uid, p)| before.get(*uid) != Some(p))
        .map(|(uid, p)| (uid.clone(), p.clone()))
        .collect();
    let from: BTreeMap<_, _> = before
        .iter()
        .filter(|(uid, _)| changed.contains_key(*uid))
        .map(|(uid, p)| (uid.clone(), p.clone()))
        .collect();
    let change = describe(&changed, &previous_spec, &upgrade.spec);
    ctx.job.update(|record| {
        record.upgrades.push(UpgradeRecord {
            operation: operation.clone(),
            time_ms: now_ms(),
            change: change.clone(),
            from,
            to: changed,
            outcome: "checking".to_string(),
            step: Some("checking".to_string()),
            savepoint: None,
            downtime_ms: None,
            error: None,
            standby: None,
            rollback_to: None,
        });
    });
    // The restore point to check against: the newest completed
    // checkpoint, else what this run restored.
    let point = ctx
        .run
        .as_ref()
        .and_then(|r| r.attempt.as_ref())
        .and_then(|a| a.checkpoints.as_ref())
        .and_then(|c| c.latest())
        .map(|read| Location::Local(read.path))
        .or_else(|| ctx.run.as_ref().and_then(|r| r.restore.clone()));
    let checking = {
        let (host, spec, allow) = (
            ctx.host.clone(),
            upgrade.spec.clone(),
            upgrade.allow_non_restored_state,
        );
        tokio::spawn(async move {
            failpoints::pause("upgrade.checking").await;
            tokio::task::spawn_blocking(move || {
                let options = RunOptions {
                    restore: point,
                    allow_non_restored_state: allow,
                    ..Default::default()
                };
                run::prepare(&host, &spec, &options, "upgrade-check".to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
        })
    };
    DriverStep::Upgrade(Box::new(Step::Check(Check {
        procedure: Procedure {
            operation,
            upgrade,
            previous_spec,
            previous_allow,
            change,
        },
        checking,
    })))
}

/// How often a step before the stop looks for a verdict to roll back
/// (`JobManager::verdict`).
const VERDICT_LOOK: Duration = Duration::from_millis(50);

impl Check {
    async fn next(mut self, ctx: &mut JobCtx) -> DriverStep {
        let mut look = tokio::time::interval(VERDICT_LOOK);
        loop {
            tokio::select! {
                checked = &mut self.checking => {
                    let checked = checked.unwrap_or_else(|e| Err(e.to_string()));
                    return self.checked(ctx, checked);
                }
                _ = look.tick() => {
                    if self.procedure.rolled_back_early(ctx) {
                        self.checking.abort();
                        return DriverStep::Running(Running);
                    }
                }
                message = ctx.next() => {
                    if let Some(step) = self.procedure.before_stop(ctx, message) {
                        self.checking.abort();
                        return step;
                    }
                }
            }
        }
    }

    fn checked(self, ctx: &mut JobCtx, checked: Result<PreparedJob, String>) -> DriverStep {
        let procedure = self.procedure;
        let checked = match checked {
            Ok(checked) => checked,
            Err(error) => {
                procedure.refuse(ctx, error);
                return DriverStep::Running(Running);
            }
        };
        let Some(savepointer) = ctx.savepointer() else {
            procedure.refuse(ctx, "the job is between attempts; try again");
            return DriverStep::Running(Running);
        };
        if !ctx.transition_from(
            JobStatus::Running,
            JobStatus::Upgrading,
            format!(
                "upgrade: {} (operation {})",
                procedure.change, procedure.operation
            ),
        ) {
            let status = ctx.job.status();
            procedure.refuse(ctx, format!("the job is {status}; try again"));
            return DriverStep::Running(Running);
        }
        let activity = ActivityWatch::start(ctx.metrics());
        let loaded = checked.loaded_plugins();
        if checked.checkpoints.is_some() && StandbyState::worth_it(&checked) {
            return Standby::start(ctx, procedure, checked, savepointer, activity);
        }
        StopOld::start(ctx, procedure, None, loaded, savepointer, activity)
    }
}

/// Catch-up rounds at most before the stop.
const CATCH_UP_ROUNDS: u32 = 8;

/// The slowest the sources are paced to (percent of their speed) while a
/// standby catches up.
const MIN_PACE: u32 = 25;

/// Why an upgrade has no standby.
enum StandbyError {
    /// The new version cannot restore the job's state (a migration
    /// failed): the upgrade is refused.
    Refused(String),
    /// No checkpoint to follow (one failed, the job is ending): the
    /// upgrade goes on without.
    Skipped(String),
}

/// A standby built, caught up, and what was done, in a line.
type Followed = Result<(Arc<StandbyState>, String), StandbyError>;

/// Step 2: the new version's state restored ahead, then caught up.
pub(super) struct Standby {
    procedure: Procedure,
    loaded: Loaded,
    savepointer: Savepointer,
    activity: ActivityWatch,
    following: Following,
}

/// The standby's work in flight. Dropped (the upgrade abandoned), it stops:
/// the restore at its next chunk, and what it wrote is removed.
struct Following {
    task: JoinHandle<Followed>,
    progress: Arc<TransferProgress>,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.progress.abandon();
        self.task.abort();
    }
}

impl Standby {
    fn start(
        ctx: &mut JobCtx,
        procedure: Procedure,
        checked: PreparedJob,
        savepointer: Savepointer,
        activity: ActivityWatch,
    ) -> DriverStep {
        procedure.at(ctx, "standby-building");
        let loaded = checked.loaded_plugins();
        let root = checked
            .graph
            .state
            .dir
            .join("standby")
            .join(format!("{}-{}", ctx.job.id, procedure.operation));
        let progress = Arc::new(TransferProgress::default());
        let task = tokio::spawn(follow_on_standby(
            ctx.job.clone(),
            procedure.operation.clone(),
            savepointer.clone(),
            checked,
            root,
            progress.clone(),
        ));
        DriverStep::Upgrade(Box::new(Step::Standby(Standby {
            procedure,
            loaded,
            savepointer,
            activity,
            following: Following { task, progress },
        })))
    }

    async fn next(mut self, ctx: &mut JobCtx) -> DriverStep {
        let mut look = tokio::time::interval(VERDICT_LOOK);
        loop {
            tokio::select! {
                followed = &mut self.following.task => {
                    let followed = followed
                        .unwrap_or_else(|e| Err(StandbyError::Refused(e.to_string())));
                    return self.followed(ctx, followed);
                }
                _ = look.tick() => {
                    if self.procedure.rolled_back_early(ctx) {
                        // Dropping the standby stops it and removes its
                        // files, as an abandoned upgrade's.
                        self.savepointer.release_holds();
                        ctx.transition_from(
                            JobStatus::Upgrading,
                            JobStatus::Running,
                            "the upgrade was rolled back before the stop",
                        );
                        return DriverStep::Running(Running);
                    }
                }
                message = ctx.next() => {
                    if let Some(step) = self.procedure.before_stop(ctx, message) {
                        // Dropping the standby stops it and removes its
                        // files; the job's bases and pace are its own again.
                        self.savepointer.release_holds();
                        return step;
                    }
                }
            }
        }
    }

    fn followed(self, ctx: &mut JobCtx, followed: Followed) -> DriverStep {
        let Standby {
            procedure,
            loaded,
            savepointer,
            activity,
            following: _following,
        } = self;
        match followed {
            Ok((standby, summary)) => {
                info!(job = %ctx.job.id, operation = %procedure.operation, "{summary}");
                let standby = (standby, summary);
                StopOld::start(ctx, procedure, Some(standby), loaded, savepointer, activity)
            }
            Err(StandbyError::Refused(error)) => {
                savepointer.release_holds();
                procedure.refuse(ctx, error);
                ctx.transition_from(
                    JobStatus::Upgrading,
                    JobStatus::Running,
                    "the upgrade was refused",
                );
                DriverStep::Running(Running)
            }
            // The stop restores (and migrates) everything as usual.
            Err(StandbyError::Skipped(reason)) => {
                warn!(job = %ctx.job.id, operation = %procedure.operation, %reason, "no standby for the upgrade");
                StopOld::start(ctx, procedure, None, loaded, savepointer, activity)
            }
        }
    }
}

/// Restores the new version's state (`job`, prepared against the running
/// job's newest checkpoint) under `root` from a checkpoint taken now, with
/// the job's bases held, then catches it up with further checkpoints
/// taken one after the other until one round took under
/// [`PREPARED_UNDER`]. Returns the standby and a line saying what it did.
async fn follow_on_standby(
    job: Arc<super::jobs::JobHandle>,
    operation: String,
    savepointer: Savepointer,
    checked: PreparedJob,
    root: std::path::PathBuf,
    progress: Arc<TransferProgress>,
) -> Followed {
    let started = Instant::now();
    savepointer.hold_bases(true);
    let read = savepointer
        .checkpoint()
        .await
        .map_err(StandbyError::Skipped)?;
    let from = read.metadata.checkpoint;
    let standby =
        tokio::task::spawn_blocking(move || StandbyState::build(&checked, &read, root, progress))
            .await
            .map_err(|e| StandbyError::Refused(e.to_string()))?
            .map_err(|e| StandbyError::Refused(e.to_string()))?;
    let standby = Arc::new(standby);
    let restored = started.elapsed();
    failpoints::pause("upgrade.standby-building").await;
    job.update(|record| {
        if let Some(upgrade) = record.upgrade_mut(&operation) {
            upgrade.step = Some("standby-catching-up".to_string());
        }
    });
    let (mut rounds, mut last, mut previous) = (0, (0u64, Duration::ZERO), u64::MAX);
    let (mut pace, mut paced_since) = (100u32, None);
    while rounds < CATCH_UP_ROUNDS && !standby.is_empty() {
        failpoints::pause("upgrade.standby-catching-up").await;
        let asked = Instant::now();
        let read = savepointer
            .checkpoint()
            .await
            .map_err(StandbyError::Skipped)?;
        let round = Instant::now();
        let following = standby.clone();
        let applied = tokio::task::spawn_blocking(move || following.catch_up(&read))
            .await
            .map_err(|e| StandbyError::Refused(e.to_string()))?
            .map_err(|e| StandbyError::Refused(e.to_string()))?;
        rounds += 1;
        last = (applied, round.elapsed());
        debug!(
            round = rounds,
            checkpoint_ms = (round - asked).as_millis() as u64,
            applied,
            took_ms = last.1.as_millis() as u64,
            pace,
            "standby caught up"
        );
        if last.1 < PREPARED_UNDER {
            break;
        }
        // Not converging (the job changes state about as fast as the
        // standby migrates it): the sources slow down, as a live
        // migration throttles a guest whose memory changes faster than it
        // is copied, until a round is quick.
        if applied.saturating_mul(4) > previous.saturating_mul(3) && pace > MIN_PACE {
            pace = (pace / 2).max(MIN_PACE);
            savepointer.pace_sources(pace);
            paced_since.get_or_insert_with(Instant::now);
        }
        previous = applied;
    }
    if standby.is_empty() {
        return Err(StandbyError::Skipped(
            "no subtask kept its key-group range on RocksDB".to_string(),
        ));
    }
    let mut summary = format!(
        "{} subtasks restored on standby from checkpoint {from} in {} ms, then {rounds} catch-up rounds, the last applying {} changes in {} ms",
        standby.len(),
        restored.as_millis(),
        last.0,
        last.1.as_millis(),
    );
    if let Some(since) = paced_since {
        summary.push_str(&format!(
            "; sources slowed down to {pace}% for the last {} ms",
            since.elapsed().as_millis()
        ));
    }
    Ok((standby, summary))
}

/// Step 3: the old version stops with a savepoint.
pub(super) struct StopOld {
    procedure: Procedure,
    standby: Option<Arc<StandbyState>>,
    loaded: Loaded,
    activity: ActivityWatch,
    /// The stop's savepoint, until it answered.
    taken: Option<stop::Taken>,
    /// Once it completed.
    savepoint: Option<Location>,
}

impl StopOld {
    /// `standby`: the standby caught up, and what it did.
    fn start(
        ctx: &mut JobCtx,
        procedure: Procedure,
        standby: Option<(Arc<StandbyState>, String)>,
        loaded: Loaded,
        savepointer: Savepointer,
        activity: ActivityWatch,
    ) -> DriverStep {
        // Where the job's other savepoints go: a movable cluster job's on
        // the cluster's storage, so that a host that takes the job over
        // while the new version is on probation restores the previous
        // version from it (the job's restore point until the probation
        // releases a commit).
        let target = super::jobs::default_target(&ctx.host, &ctx.job.record());
        // One write of the record: the sources run on (the standby's
        // changes grow) until the stop's barrier goes out.
        let (standby, summary) = standby.unzip();
        procedure.at_and(ctx, "stopping", |record| {
            record.note_savepoint_target(&target);
            if let (Some(upgrade), Some(summary)) =
                (record.upgrade_mut(&procedure.operation), summary)
            {
                upgrade.standby = Some(summary);
            }
        });
        let (stopping, incremental) = (savepointer.clone(), standby.is_some());
        let taken = tokio::spawn(async move {
            failpoints::pause("upgrade.stopping").await;
            let stopped = match incremental {
                true => stopping.incremental_stop(target).await,
                false => stopping.prepared_stop(target, 3).await,
            };
            // The job runs on if the savepoint failed: as before.
            stopping.release_holds();
            stopped
        });
        DriverStep::Upgrade(Box::new(Step::StopOld(StopOld {
            procedure,
            standby,
            loaded,
            activity,
            taken: Some(taken),
            savepoint: None,
        })))
    }

    async fn next(mut self, ctx: &mut JobCtx) -> DriverStep {
        loop {
            tokio::select! {
                taken = stop::wait(&mut self.taken) => {
                    self.taken = None;
                    match taken {
                        Ok(savepoint) => {
                            update_upgrade(ctx, &self.procedure.operation, |u| {
                                u.savepoint = Some(savepoint.to_string());
                            });
                            self.savepoint = Some(savepoint);
                            // The sources stop; the run ends.
                        }
                        Err(error) => {
                            self.procedure.refuse(ctx, format!("the upgrade's savepoint failed: {error}"));
                            ctx.transition_from(JobStatus::Upgrading, JobStatus::Running, "the upgrade's savepoint failed");
                            return DriverStep::Running(Running);
                        }
                    }
                }
                message = ctx.next() => match message {
                    Message::Command(Command::Stop { operation, .. }) => {
                        // The upgrade's own savepoint stops the job.
                        self.procedure.abandon(ctx, "the job was stopped");
                        return match self.taken.take() {
                            Some(taken) => stop::adopt(ctx, operation, taken),
                            None => stop::adopt(ctx, operation, tokio::spawn(std::future::ready(
                                self.savepoint.clone().ok_or_else(|| "no savepoint".to_string()),
                            ))),
                        };
                    }
                    Message::Command(Command::Shutdown { done, .. }) => {
                        self.procedure.abandon(ctx, "the host shut down");
                        let taken = self.taken.take();
                        return DriverStep::Shutdown(stop::ShuttingDown::adopt(done, taken, None));
                    }
                    Message::Run(RunEvent::Ended { result, .. }) => return self.stopped(ctx, result),
                    message => {
                        if let Some(step) = self.procedure.before_stop(ctx, message) {
                            return step;
                        }
                    }
                },
            }
        }
    }

    /// The old version's run ended: with the savepoint, the new one
    /// restores from it.
    fn stopped(self, ctx: &mut JobCtx, result: Result<JobOutcome, RunFailure>) -> DriverStep {
        let last_record = self.activity.stop();
        let savepoint = match result {
            Ok(outcome) if outcome.savepoint.is_some() => outcome.savepoint.expect("checked"),
            Ok(_) => {
                self.procedure.abandon(ctx, "the job's sources ended first");
                return ctx.run_ended(
                    Ok(JobOutcome {
                        summaries: Vec::new(),
                        cancelled: false,
                        savepoint: None,
                    }),
                    None,
                );
            }
            Err(failure) => {
                let message = failure.to_string();
                ctx.fail_operation(
                    &self.procedure.operation,
                    format!("the job failed while stopping for the upgrade: {message}"),
                );
                update_upgrade(ctx, &self.procedure.operation, |u| {
                    u.outcome = "abandoned".to_string();
                    u.step = None;
                });
                return ctx.run_ended(Err(failure), None);
            }
        };
        // One write of the record, as the new version waits for it.
        let (procedure, text) = (&self.procedure, savepoint.to_string());
        ctx.record_savepoint_and(&savepoint, Some(procedure.operation.clone()), |record| {
            if let Some(op) = record.operation_mut(&procedure.operation) {
                op.savepoint = Some(text.clone());
            }
            if let Some(upgrade) = record.upgrade_mut(&procedure.operation) {
                upgrade.rollback_to = Some(RollbackTo {
                    spec: procedure.previous_spec.clone(),
                    allow_non_restored_state: procedure.previous_allow,
                });
            }
            procedure.step_in(record, "restoring");
        });
        Restore::start(
            self.procedure,
            savepoint,
            self.standby,
            self.loaded,
            last_record,
        )
    }
}

/// Step 4: the new version restores from the savepoint.
pub(super) struct Restore {
    procedure: Procedure,
    savepoint: Location,
    last_record: Instant,
    release: watch::Sender<bool>,
    /// The new version's run, until it is started.
    plan: Option<Box<RunPlan>>,
}

impl Restore {
    fn start(
        procedure: Procedure,
        savepoint: Location,
        standby: Option<Arc<StandbyState>>,
        loaded: Loaded,
        last_record: Instant,
    ) -> DriverStep {
        let (release, hold) = watch::channel(true);
        let mut plan = RunPlan::new(
            procedure.upgrade.spec.clone(),
            Some(savepoint.clone()),
            procedure.upgrade.allow_non_restored_state,
            run::upgrade_reason(&procedure.operation),
        );
        plan.loaded = loaded;
        plan.standby = standby;
        plan.commit_hold = Some(hold);
        plan.watch_first_record = true;
        // Written by this host a moment ago: not hashed again.
        plan.trusted = true;
        DriverStep::Upgrade(Box::new(Step::Restore(Restore {
            procedure,
            savepoint,
            last_record,
            release,
            plan: Some(Box::new(plan)),
        })))
    }

    async fn next(mut self, ctx: &mut JobCtx) -> DriverStep {
        if let Some(plan) = self.plan.take() {
            // Nothing runs until the new version starts: what comes in
            // meanwhile (during a fault test's pause) ends the job at the
            // savepoint.
            let pause = failpoints::pause("upgrade.restoring");
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    message = ctx.next() => {
                        if let Message::Command(command) = message
                            && let Some(step) = self.procedure.after_stop(ctx, command, &self.savepoint, false)
                        {
                            return step;
                        }
                    }
                }
            }
            ctx.start_run(*plan);
        }
        loop {
            match ctx.next().await {
                Message::Command(command) => {
                    if let Some(step) =
                        self.procedure
                            .after_stop(ctx, command, &self.savepoint, true)
                    {
                        return step;
                    }
                }
                Message::Run(RunEvent::Launched { .. }) => return Probation::start(ctx, self),
                Message::Run(RunEvent::Failed { error, decide, .. }) => {
                    ctx.record_failure(&error);
                    let _ =
                        decide.send(Some("it failed during the upgrade's probation".to_string()));
                    let cause = error.to_string();
                    return RollBack::start(
                        ctx,
                        self.procedure,
                        self.savepoint,
                        self.last_record,
                        cause,
                        false,
                    );
                }
                Message::Run(RunEvent::Restarting { .. }) => {}
                Message::Run(RunEvent::Ended { result, .. }) => {
                    let cause = match result {
                        Err(failure) => failure.cause(),
                        Ok(_) => "the new version ended before it ran".to_string(),
                    };
                    return RollBack::start(
                        ctx,
                        self.procedure,
                        self.savepoint,
                        self.last_record,
                        cause,
                        true,
                    );
                }
            }
        }
    }
}

/// Step 5: the new version on probation.
pub(super) struct Probation {
    procedure: Procedure,
    savepoint: Location,
    last_record: Instant,
    release: watch::Sender<bool>,
    started: Instant,
    first_record: Option<run::FirstRecord>,
    checkpoints: Option<Arc<crate::checkpoint::coordinator::CheckpointMetrics>>,
    /// Since when it awaits release (its probation passed).
    awaiting: Option<Instant>,
}

impl Probation {
    fn start(ctx: &mut JobCtx, restore: Restore) -> DriverStep {
        restore.procedure.at(ctx, "on-probation");
        let attempt = ctx.run.as_ref().and_then(|r| r.attempt.clone());
        let first_record = attempt.as_ref().and_then(|a| a.first_record.clone());
        let checkpoints = attempt.and_then(|a| a.checkpoint_metrics);
        DriverStep::Upgrade(Box::new(Step::Probation(Probation {
            procedure: restore.procedure,
            savepoint: restore.savepoint,
            last_record: restore.last_record,
            release: restore.release,
            started: Instant::now(),
            first_record,
            checkpoints,
            awaiting: None,
        })))
    }

    async fn next(mut self, ctx: &mut JobCtx) -> DriverStep {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Some(verdict) = ctx.job.take_verdict(&self.procedure.operation) {
                        if verdict.pass {
                            return self.passed(ctx);
                        }
                        return self.roll_back(ctx, verdict.reason);
                    }
                    let completed = self
                        .checkpoints
                        .as_ref()
                        .map_or(0, |c| c.completed.load(Ordering::Relaxed));
                    let due = completed >= self.procedure.upgrade.probation_checkpoints
                        || self.started.elapsed() >= self.procedure.upgrade.probation;
                    match (due, self.procedure.upgrade.await_release, self.awaiting) {
                        (false, _, _) => {}
                        (true, false, _) => return self.passed(ctx),
                        (true, true, None) => {
                            self.awaiting = Some(Instant::now());
                            self.procedure.at(ctx, super::jobs::AWAITING_RELEASE);
                        }
                        (true, true, Some(since))
                            if since.elapsed() >= self.procedure.upgrade.probation + RELEASE_PATIENCE =>
                        {
                            let why = format!(
                                "its probation passed, but no release came within {}",
                                crate::human::duration(self.procedure.upgrade.probation + RELEASE_PATIENCE)
                            );
                            return self.roll_back(ctx, why);
                        }
                        (true, true, Some(_)) => {}
                    }
                }
                message = ctx.next() => match message {
                    Message::Command(command) => {
                        if let Some(step) = self.procedure.after_stop(ctx, command, &self.savepoint, true) {
                            return step;
                        }
                    }
                    // The probation's outcome is decided here: a failure
                    // first is the new version's failure.
                    Message::Run(RunEvent::Failed { error, decide, .. }) => {
                        ctx.record_failure(&error);
                        let _ = decide.send(Some("it failed during the upgrade's probation".to_string()));
                        return RollBack::start(ctx, self.procedure, self.savepoint, self.last_record, error.to_string(), false);
                    }
                    Message::Run(RunEvent::Ended { result: Ok(outcome), .. }) if !outcome.cancelled => {
                        // Its sources ended: it passed.
                        let step_after = self.passed(ctx);
                        drop(step_after);
                        return ctx.run_ended(Ok(outcome), None);
                    }
                    Message::Run(RunEvent::Ended { result, .. }) => {
                        let cause = match result {
                            Err(failure) => failure.cause(),
                            Ok(_) => "the new version was cancelled".to_string(),
                        };
                        return RollBack::start(ctx, self.procedure, self.savepoint, self.last_record, cause, true);
                    }
                    Message::Run(RunEvent::Launched { .. } | RunEvent::Restarting { .. }) => {}
                },
            }
        }
    }

    /// Rolled back though the new version did not fail (its stage's
    /// other task did, or no release came): its run is cancelled, then
    /// the previous version restarts from the savepoint.
    fn roll_back(self, ctx: &mut JobCtx, why: String) -> DriverStep {
        ctx.cancel_run();
        RollBack::start(
            ctx,
            self.procedure,
            self.savepoint,
            self.last_record,
            why,
            false,
        )
    }

    /// Probation passed: the held commits go out, the upgrade is done, and
    /// the earlier runs' checkpoints retire.
    fn passed(self, ctx: &mut JobCtx) -> DriverStep {
        let downtime = self
            .first_record
            .as_ref()
            .and_then(run::FirstRecord::now)
            .map(|at| millis(self.last_record, at));
        let _ = self.release.send(false);
        let to = self.procedure.to();
        update_upgrade(ctx, &self.procedure.operation, |u| {
            u.outcome = "upgraded".to_string();
            u.step = None;
            u.rollback_to = None;
            u.downtime_ms = downtime;
        });
        ctx.job.finish_operation(&self.procedure.operation, |o| {
            o.downtime_ms = downtime;
            o.outcome = Some(format!("upgraded: {to}"));
        });
        ctx.transition_from(
            JobStatus::Upgrading,
            JobStatus::Running,
            format!("upgrade passed its probation: {to}"),
        );
        ctx.retire_earlier_runs();
        DriverStep::Running(Running)
    }
}

/// How the upgrade's end goes once the run before it ended.
enum Ending {
    /// The previous version runs again.
    Running,
    /// A cancel came: the job ends cancelled.
    Cancelled(String),
    /// A stop came during the upgrade: the job stops at the savepoint.
    Stopped(String),
    /// The host shut down: the job resumes from the savepoint.
    Shutdown(oneshot::Sender<()>),
}

/// Step 6: the new version failed (or the upgrade was cut short after the
/// stop): its run ends, then the previous version runs again from the
/// savepoint, or the job ends there.
pub(super) struct RollBack {
    procedure: Procedure,
    savepoint: Location,
    last_record: Instant,
    error: String,
    /// The failed version's run, whose output is discarded.
    failed_run: Option<String>,
    /// The previous version's run was started (its end is the job's).
    started: bool,
    ending: Ending,
}

impl RollBack {
    /// The new version failed; `ended`: its run has ended already.
    fn start(
        ctx: &mut JobCtx,
        procedure: Procedure,
        savepoint: Location,
        last_record: Instant,
        error: String,
        ended: bool,
    ) -> DriverStep {
        procedure.at(ctx, "rolling-back");
        let _ = ctx.transition(
            JobStatus::RollingBack,
            format!("the new version failed during its probation: {error}"),
        );
        let failed_run = ctx.run.as_ref().map(|r| r.handle.id.clone());
        update_upgrade(ctx, &procedure.operation, |u| {
            u.outcome = "rolled-back".to_string();
            u.error = Some(error.clone());
        });
        ctx.job.update(|record| {
            record.last_error = Some(error.clone());
            if let Some(run) = record
                .runs
                .iter_mut()
                .find(|r| Some(&r.run_id) == failed_run.as_ref())
            {
                run.abandoned = true;
            }
        });
        let step = RollBack {
            procedure,
            savepoint,
            last_record,
            error,
            failed_run,
            started: false,
            ending: Ending::Running,
        };
        if ended {
            return step.ended(ctx);
        }
        DriverStep::Upgrade(Box::new(Step::RollBack(step)))
    }

    /// The upgrade cut short after the stop: once the new version's run
    /// (cancelled) ended, the job ends as `ending` says.
    fn ending(procedure: &Procedure, savepoint: Location, ending: Ending) -> RollBack {
        RollBack {
            procedure: procedure.clone(),
            savepoint,
            last_record: Instant::now(),
            error: String::new(),
            failed_run: None,
            started: false,
            ending,
        }
    }

    /// The run before the previous version's ended: what comes next.
    fn ended(mut self, ctx: &mut JobCtx) -> DriverStep {
        match std::mem::replace(&mut self.ending, Ending::Running) {
            Ending::Running => {
                let mut plan = RunPlan::new(
                    self.procedure.previous_spec.clone(),
                    Some(self.savepoint.clone()),
                    self.procedure.previous_allow,
                    format!("rollback (operation {})", self.procedure.operation),
                );
                plan.discard_runs.extend(self.failed_run.clone());
                plan.watch_first_record = true;
                ctx.start_run(plan);
                self.started = true;
                DriverStep::Upgrade(Box::new(Step::RollBack(self)))
            }
            Ending::Cancelled(operation) => {
                self.revert(ctx, None);
                ctx.job
                    .finish_operation(&operation, |o| o.outcome = Some("cancelled".to_string()));
                let _ = ctx.transition(JobStatus::Cancelled, "cancelled during an upgrade");
                DriverStep::Ended
            }
            Ending::Stopped(operation) => {
                self.revert(ctx, None);
                let text = self.savepoint.to_string();
                ctx.job.finish_operation(&operation, |o| {
                    o.savepoint = Some(text.clone());
                    o.outcome = Some("stopped".to_string());
                });
                self.stopped(
                    ctx,
                    format!("stopped during an upgrade, at its savepoint {text} (the previous version resumes from it)"),
                );
                DriverStep::Ended
            }
            Ending::Shutdown(done) => {
                let text = self.savepoint.to_string();
                self.revert(ctx, Some(text.clone()));
                self.stopped(
                    ctx,
                    format!("host shut down during an upgrade: stopped at its savepoint {text}; the next host start resumes the previous version from it"),
                );
                let _ = done.send(());
                DriverStep::Ended
            }
        }
    }

    /// The job runs the previous version when it resumes (from
    /// `resume_from`, at the host's next start).
    fn revert(&self, ctx: &JobCtx, resume_from: Option<String>) {
        let (previous, operation) = (
            self.procedure.previous_spec.clone(),
            &self.procedure.operation,
        );
        ctx.job.update(|r| {
            r.spec = previous;
            if let Some(upgrade) = r.upgrade_mut(operation) {
                upgrade.rollback_to = None;
            }
            if resume_from.is_some() {
                r.resume_from = resume_from;
            }
        });
    }

    fn stopped(&self, ctx: &JobCtx, cause: String) {
        let _ = ctx.transition(JobStatus::Stopping, cause.clone());
        let _ = ctx.transition(JobStatus::Stopped, cause);
    }

    async fn next(mut self, ctx: &mut JobCtx) -> DriverStep {
        loop {
            match (self.started, ctx.next().await) {
                (false, Message::Command(command)) => match command {
                    Command::Cancel { operation } => {
                        self.procedure.abandon(ctx, "the job was cancelled");
                        let _ = ctx.transition(JobStatus::Cancelling, "cancel requested");
                        self.ending = Ending::Cancelled(operation);
                    }
                    Command::Stop { operation, .. } => self.ending = Ending::Stopped(operation),
                    Command::Shutdown { done, .. } => self.ending = Ending::Shutdown(done),
                    other => ctx.refuse(other, "the job is rolling back"),
                },
                (true, Message::Command(command)) => match command {
                    command @ Command::Cancel { .. } => return Running::command(ctx, command),
                    // The previous version is restoring: the job stops at
                    // the savepoint instead.
                    Command::Stop { operation, .. } => {
                        self.cut_short(ctx, Ending::Stopped(operation))
                    }
                    Command::Shutdown { done, .. } => self.cut_short(ctx, Ending::Shutdown(done)),
                    other => ctx.refuse(other, "the job is rolling back"),
                },
                (false, Message::Run(RunEvent::Failed { error, decide, .. })) => {
                    // The failed version's run: it does not restart.
                    ctx.record_failure(&error);
                    let _ =
                        decide.send(Some("it failed during the upgrade's probation".to_string()));
                }
                (false, Message::Run(RunEvent::Ended { result, .. })) => {
                    if let Err(failure) = &result {
                        debug!(job = %ctx.job.id, %failure, "the upgrade's new version ended");
                    }
                    return self.ended(ctx);
                }
                (false, Message::Run(_)) => {}
                (true, Message::Run(RunEvent::Launched { .. })) => {
                    let _ = ctx.transition(
                        JobStatus::Running,
                        format!(
                            "rolled back: the previous version runs again from {}",
                            self.savepoint
                        ),
                    );
                    self.report(ctx);
                    ctx.retire_earlier_runs();
                    return DriverStep::Running(Running);
                }
                (true, Message::Run(RunEvent::Ended { result, .. })) => {
                    // The previous version could not run either.
                    let why = match &result {
                        Err(failure) => failure.to_string(),
                        Ok(_) => "it ended".to_string(),
                    };
                    ctx.fail_operation(
                        &self.procedure.operation,
                        format!("{}; the rollback failed too: {why}", self.error),
                    );
                    return ctx.run_ended(result, None);
                }
                (true, Message::Run(event)) => {
                    if let Some(step) = ctx.on_run_event(event) {
                        return step;
                    }
                }
            }
        }
    }

    /// Cancels the previous version's run, still restoring: the job ends
    /// at the savepoint as `ending` says once it ended.
    fn cut_short(&mut self, ctx: &mut JobCtx, ending: Ending) {
        ctx.fail_operation(
            &self.procedure.operation,
            "upgrade abandoned: the job was stopped as it rolled back",
        );
        ctx.cancel_run();
        self.started = false;
        self.failed_run = None;
        self.ending = ending;
    }

    /// Finishes the rolled-back upgrade's operation (failed, with the error
    /// and the downtime) once the previous version took in its first
    /// record again.
    fn report(&self, ctx: &JobCtx) {
        let first_record = ctx.first_record();
        let job = ctx.job.clone();
        let (operation, error, last_record) = (
            self.procedure.operation.clone(),
            self.error.clone(),
            self.last_record,
        );
        tokio::spawn(async move {
            let downtime = match first_record {
                Some(first) => first.within(Duration::from_secs(10)).await,
                None => None,
            }
            .map(|at| millis(last_record, at));
            job.update(|record| {
                if let Some(upgrade) = record.upgrade_mut(&operation) {
                    upgrade.downtime_ms = downtime;
                    upgrade.step = None;
                    upgrade.rollback_to = None;
                }
            });
            job.finish_operation(&operation, |o| {
                o.status = OperationStatus::Failed;
                o.downtime_ms = downtime;
                o.outcome = Some("rolled-back".to_string());
                o.error = Some(format!(
                    "the new version failed during its probation and was rolled back: {error}"
                ));
            });
        });
    }
}

/// Samples the record counters of a run's operators and sinks every
/// millisecond, remembering when they last moved.
pub(super) struct ActivityWatch {
    last: Arc<Mutex<Instant>>,
    task: JoinHandle<()>,
}

impl ActivityWatch {
    pub fn start(metrics: Vec<Arc<NodeMetrics>>) -> Self {
        let last = Arc::new(Mutex::new(Instant::now()));
        let moved = last.clone();
        let task = tokio::spawn(async move {
            let mut seen = run::records_in(&metrics);
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            loop {
                tick.tick().await;
                let now = run::records_in(&metrics);
                if now != seen {
                    seen = now;
                    *moved.lock().expect("not poisoned") = Instant::now();
                }
            }
        });
        Self { last, task }
    }

    /// Stops sampling; the last time records moved.
    pub fn stop(&self) -> Instant {
        self.task.abort();
        *self.last.lock().expect("not poisoned")
    }
}

impl Drop for ActivityWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn millis(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}
