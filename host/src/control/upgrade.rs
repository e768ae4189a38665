//! The hot-upgrade procedure of the running host, in order:
//!
//! 1. **Check** ([`stop_for_upgrade`]): the new plugins are loaded
//!    (precompiled, cached) and checked against the job's newest completed
//!    checkpoint: restore rules, schema versions, a migrate export where a
//!    version changed. A refused upgrade leaves the job running, untouched.
//! 2. **Stop with a savepoint** (no drain), then swap the plugins: the only
//!    point at which a job's plugin code changes ([`after_stop`]). An
//!    upgrade that migrates state first restores and migrates the new
//!    version's state on a [`Standby`] and catches it up with checkpoints
//!    taken one after the other ([`follow_on_standby`]; rounds that do
//!    not converge slow the sources down), then stops with an incremental
//!    savepoint: only the changes since the last catch-up are migrated
//!    while the job is down. Otherwise the stop is prepared
//!    by base checkpoints ([`Savepointer::prepared_stop`]).
//! 3. **Probation** ([`watch_probation`]): the new version restores from the
//!    savepoint and runs with its sinks' commits held back until it has
//!    completed `probation_checkpoints` checkpoints (or the probation time
//!    passed without a failure). Then the held checkpoint commits.
//! 4. **Rollback** ([`roll_back`]): if the new version cannot start or fails
//!    during probation, it is not restarted: the old plugins restart from the
//!    same savepoint, and the new version's uncommitted output is discarded
//!    (its part files are named by its run id).
//!
//! Downtime is measured from the last record the old version's operators
//! took in to the first record the new (or rolled-back) version's took in
//! ([`ActivityWatch`], sampling the record counters every millisecond).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::driver::{self, PlanParts, RunPlan, Upgrade, fail_operation, live_checkpoints};
use super::jobs::JobHandle;
use super::lifecycle::JobStatus;
use super::record::*;
use super::{HostContext, now_ms};
use crate::checkpoint::coordinator::PREPARED_UNDER;
use crate::checkpoint::coordinator::Savepointer;
use crate::dataflow::runtime::{JobOutcome, NodeMetrics};
use crate::runner::Attempt as RunningJob;
use crate::runner::Standby;
use crate::runner::{PreparedJob, RunError, RunOptions};
use crate::types::Location;

/// How an upgrade's probation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProbationOutcome {
    Pending,
    Passed,
    Failed,
}

/// The new version's run, on probation.
pub(super) struct Probation {
    pub operation: String,
    /// What ran before (the rollback runs it again).
    pub previous: PlanParts,
    pub savepoint: Location,
    /// When the old version's operators took in their last record.
    pub last_record: Instant,
    pub duration: Duration,
    pub checkpoints: u64,
    pub to: String,
}

/// The old version again, after the new one failed.
pub(super) struct RollBack {
    pub operation: String,
    pub error: String,
    pub savepoint: Location,
    pub last_record: Instant,
}

/// Samples the record counters of a run's operators and sinks every
/// millisecond, remembering when they last moved.
pub(super) struct ActivityWatch {
    last: Arc<Mutex<Instant>>,
    task: tokio::task::JoinHandle<()>,
}

fn records_in(metrics: &[Arc<NodeMetrics>]) -> u64 {
    metrics
        .iter()
        .filter(|m| !m.is_source)
        .map(|m| m.records_in())
        .sum()
}

impl ActivityWatch {
    pub fn start(metrics: Vec<Arc<NodeMetrics>>) -> Self {
        let last = Arc::new(Mutex::new(Instant::now()));
        let moved = last.clone();
        let task = tokio::spawn(async move {
            let mut seen = records_in(&metrics);
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            loop {
                tick.tick().await;
                let now = records_in(&metrics);
                if now != seen {
                    seen = now;
                    *moved.lock().expect("not poisoned") = Instant::now();
                }
            }
        });
        Self { last, task }
    }

    /// Stops sampling; the last time records moved.
    pub fn stop(self) -> Instant {
        self.task.abort();
        *self.last.lock().expect("not poisoned")
    }
}

/// Resolves with the time the first record reached a run's operators (or
/// sinks), polling every millisecond, or None after `limit`.
async fn first_record(metrics: Vec<Arc<NodeMetrics>>, limit: Duration) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while Instant::now() < deadline {
        tick.tick().await;
        if records_in(&metrics) > 0 {
            return Some(Instant::now());
        }
    }
    None
}

fn millis(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}

fn update_upgrade(handle: &JobHandle, operation: &str, change: impl FnOnce(&mut UpgradeRecord)) {
    handle.update(|record| {
        if let Some(upgrade) = record
            .upgrades
            .iter_mut()
            .rev()
            .find(|u| u.operation == operation)
        {
            change(upgrade);
        }
    });
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

/// Steps 1 and 2: checks the new version against the newest checkpoint
/// and stops the job with a savepoint. `Err(())`: refused or the savepoint
/// failed (recorded; the job runs on).
pub(super) async fn stop_for_upgrade(
    ctx: &Arc<HostContext>,
    handle: &Arc<JobHandle>,
    plan: &RunPlan,
    operation: &str,
    upgrade: &mut Upgrade,
) -> Result<Location, ()> {
    let current = handle.record().spec;
    let before = driver::plugin_versions(ctx, &current);
    let after = driver::plugin_versions(ctx, &upgrade.spec);
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
    handle.update(|record| {
        record.upgrades.push(UpgradeRecord {
            operation: operation.to_string(),
            time_ms: now_ms(),
            change: describe(&changed, &current, &upgrade.spec),
            from: from.clone(),
            to: changed.clone(),
            outcome: "checking".to_string(),
            savepoint: None,
            downtime_ms: None,
            error: None,
            standby: None,
        });
    });
    // The restore point to check against: the newest completed checkpoint,
    // else what this run restored.
    let point = live_checkpoints(handle)
        .and_then(|c| c.latest())
        .map(|read| Location::Local(read.path))
        .or_else(|| plan.restore_point());
    let check = {
        let (ctx, spec, allow) = (
            ctx.clone(),
            upgrade.spec.clone(),
            upgrade.allow_non_restored_state,
        );
        let point = point.clone();
        tokio::task::spawn_blocking(move || {
            let options = RunOptions {
                restore: point,
                allow_non_restored_state: allow,
                ..Default::default()
            };
            driver::prepare(&ctx, &spec, &options, "upgrade-check".to_string())
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    };
    let refuse = |error: String| {
        let error = format!("upgrade refused, the job runs on unchanged: {error}");
        update_upgrade(handle, operation, |u| {
            u.outcome = "refused".to_string();
            u.error = Some(error.clone());
        });
        fail_operation(handle, operation, error);
    };
    let checked = match check {
        Ok(checked) => checked,
        Err(error) => {
            refuse(error);
            return Err(());
        }
    };
    upgrade.loaded = checked.loaded_plugins();
    let Some(savepointer) = handle
        .live
        .lock()
        .expect("not poisoned")
        .as_ref()
        .and_then(|l| l.savepointer.clone())
    else {
        fail_operation(handle, operation, "the job is between attempts; try again");
        update_upgrade(handle, operation, |u| u.outcome = "refused".to_string());
        return Err(());
    };
    handle.transition(
        JobStatus::Upgrading,
        format!(
            "upgrade: {} (operation {operation})",
            describe(&changed, &current, &upgrade.spec)
        ),
    );
    // A migrating upgrade restores and migrates the new version's state
    // ahead, while the old version runs on; the stop then leaves only the
    // changes since its last catch-up to migrate.
    if checked.checkpoints.is_some() && Standby::worth_it(&checked) {
        let root = checked
            .graph
            .state
            .dir
            .join("standby")
            .join(format!("{}-{operation}", handle.id));
        match follow_on_standby(&savepointer, checked, root).await {
            Ok((standby, summary)) => {
                info!(job = %handle.id, operation, "{summary}");
                update_upgrade(handle, operation, |u| u.standby = Some(summary));
                upgrade.standby = Some(standby);
            }
            Err(StandbyError::Refused(error)) => {
                savepointer.release_holds();
                refuse(error);
                handle.transition(JobStatus::Running, "the upgrade was refused");
                return Err(());
            }
            // The stop restores (and migrates) everything as usual.
            Err(StandbyError::Skipped(reason)) => {
                warn!(job = %handle.id, operation, %reason, "no standby for the upgrade");
            }
        }
    }
    let target = Location::Local(ctx.data.join("savepoints"));
    let stopped = match upgrade.standby {
        Some(_) => savepointer.incremental_stop(target).await,
        None => savepointer.prepared_stop(target, 3).await,
    };
    // The job runs on if the savepoint failed: as before.
    savepointer.release_holds();
    match stopped {
        Ok(path) => {
            update_upgrade(handle, operation, |u| {
                u.savepoint = Some(path.to_string());
                u.outcome = "on-probation".to_string();
            });
            Ok(path)
        }
        Err(error) => {
            let error =
                format!("the upgrade's savepoint failed, the job runs on unchanged: {error}");
            update_upgrade(handle, operation, |u| {
                u.outcome = "refused".to_string();
                u.error = Some(error.clone());
            });
            fail_operation(handle, operation, error);
            handle.transition(JobStatus::Running, "the upgrade's savepoint failed");
            Err(())
        }
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

/// Restores the new version's state (`job`, prepared against the running
/// job's newest checkpoint) under `root` from a checkpoint taken now, with
/// the job's bases held, then catches it up with further checkpoints
/// taken one after the other until one round took under
/// [`PREPARED_UNDER`]. Returns the standby and a line saying what it did.
async fn follow_on_standby(
    savepointer: &Savepointer,
    job: PreparedJob,
    root: PathBuf,
) -> Result<(Arc<Standby>, String), StandbyError> {
    let started = Instant::now();
    savepointer.hold_bases(true);
    let read = savepointer
        .checkpoint()
        .await
        .map_err(StandbyError::Skipped)?;
    let from = read.metadata.checkpoint;
    let standby = tokio::task::spawn_blocking(move || Standby::build(&job, &read, root))
        .await
        .map_err(|e| StandbyError::Refused(e.to_string()))?
        .map_err(|e| StandbyError::Refused(e.to_string()))?;
    let standby = Arc::new(standby);
    let restored = started.elapsed();
    let (mut rounds, mut last, mut previous) = (0, (0u64, Duration::ZERO), u64::MAX);
    let (mut pace, mut paced_since) = (100u32, None);
    while rounds < CATCH_UP_ROUNDS && !standby.is_empty() {
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
        if applied * 4 > previous * 3 && pace > MIN_PACE {
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

/// The old version has stopped with the savepoint: the new version's plan.
pub(super) fn after_stop(
    handle: &Arc<JobHandle>,
    previous: PlanParts,
    operation: String,
    upgrade: Upgrade,
    savepoint: Location,
    result: Result<JobOutcome, RunError>,
    last_record: Instant,
) -> Option<RunPlan> {
    *handle.live.lock().expect("not poisoned") = None;
    driver::record_savepoint(handle, &savepoint, Some(operation.clone()));
    handle.update(|record| {
        if let Some(op) = record.operation_mut(&operation) {
            op.savepoint = Some(savepoint.to_string());
        }
    });
    if let Err(error) = result {
        let message = error.to_string();
        fail_operation(
            handle,
            &operation,
            format!("the job failed while stopping for the upgrade: {message}"),
        );
        handle.transition(JobStatus::Failed, message);
        return None;
    }
    let to = handle
        .record()
        .upgrades
        .iter()
        .rev()
        .find(|u| u.operation == operation)
        .map(|u| u.change.clone())
        .unwrap_or_default();
    let allow = upgrade.allow_non_restored_state;
    Some(driver::probation_plan(
        upgrade.spec,
        savepoint.clone(),
        allow,
        upgrade.loaded,
        upgrade.standby,
        Probation {
            operation,
            previous,
            savepoint,
            last_record,
            duration: upgrade.probation,
            checkpoints: upgrade.probation_checkpoints,
            to,
        },
    ))
}

/// Step 3: watches the new version's first run; once it completed enough
/// checkpoints (or the probation time passed) without failing, the held
/// commits are released and the upgrade is done.
pub(super) fn watch_probation(
    handle: &Arc<JobHandle>,
    probation: &Probation,
    running: &RunningJob,
    release: watch::Sender<bool>,
    outcome: Arc<Mutex<ProbationOutcome>>,
) {
    let metrics = running.metrics().to_vec();
    let checkpoints = running.checkpoint_metrics();
    let handle = handle.clone();
    let (operation, last_record, duration, needed, to) = (
        probation.operation.clone(),
        probation.last_record,
        probation.duration,
        probation.checkpoints,
        probation.to.clone(),
    );
    tokio::spawn(async move {
        let started = Instant::now();
        let first = tokio::spawn(first_record(metrics, duration));
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            // The run ended (its prepared job, which holds the other end of
            // the hold, is gone) or the probation was decided elsewhere.
            if release.is_closed()
                || *outcome.lock().expect("not poisoned") != ProbationOutcome::Pending
            {
                return;
            }
            let completed = checkpoints
                .as_ref()
                .map_or(0, |c| c.completed.load(Ordering::Relaxed));
            if completed >= needed || started.elapsed() >= duration {
                break;
            }
        }
        let downtime = if first.is_finished() {
            first.await.ok().flatten().map(|at| millis(last_record, at))
        } else {
            first.abort();
            None
        };
        {
            let mut outcome = outcome.lock().expect("not poisoned");
            if *outcome != ProbationOutcome::Pending {
                return;
            }
            *outcome = ProbationOutcome::Passed;
        }
        let _ = release.send(false);
        finish_upgrade(&handle, &operation, downtime, &to);
    });
}

fn finish_upgrade(handle: &JobHandle, operation: &str, downtime: Option<f64>, to: &str) {
    update_upgrade(handle, operation, |u| {
        u.outcome = "upgraded".to_string();
        u.downtime_ms = downtime;
    });
    handle.finish_operation(operation, |o| {
        o.downtime_ms = downtime;
        o.outcome = Some(format!("upgraded: {to}"));
    });
    handle.transition(
        JobStatus::Running,
        format!("upgrade passed its probation: {to}"),
    );
}

/// A new version that ended (its sources finished) during probation
/// passed it.
pub(super) fn pass_if_pending(
    handle: &JobHandle,
    outcome: &Mutex<ProbationOutcome>,
    probation: &Option<&Probation>,
) {
    let Some(probation) = probation else { return };
    let mut outcome = outcome.lock().expect("not poisoned");
    if *outcome == ProbationOutcome::Pending {
        *outcome = ProbationOutcome::Passed;
        drop(outcome);
        finish_upgrade(handle, &probation.operation, None, &probation.to);
    }
}

/// Step 4: the new version failed; the old one restarts from the same
/// savepoint and the failed run's uncommitted output is discarded.
pub(super) fn roll_back(
    handle: &Arc<JobHandle>,
    probation: Probation,
    failed_run: String,
    error: String,
) -> RunPlan {
    handle.transition(
        JobStatus::RollingBack,
        format!("the new version failed during its probation: {error}"),
    );
    update_upgrade(handle, &probation.operation, |u| {
        u.outcome = "rolled-back".to_string();
        u.error = Some(error.clone());
    });
    handle.update(|record| {
        record.last_error = Some(error.clone());
        if let Some(run) = record.runs.iter_mut().find(|r| r.run_id == failed_run) {
            run.abandoned = true;
        }
    });
    let previous = probation.previous;
    driver::rollback_plan(
        previous.spec,
        probation.savepoint.clone(),
        previous.allow_non_restored_state,
        failed_run,
        RollBack {
            operation: probation.operation,
            error,
            savepoint: probation.savepoint,
            last_record: probation.last_record,
        },
    )
}

/// Finishes a rolled-back upgrade's operation (failed, with the error and
/// the downtime) once the old version took in its first record again.
pub(super) fn watch_rollback(handle: &Arc<JobHandle>, rollback: &RollBack, running: &RunningJob) {
    let metrics = running.metrics().to_vec();
    let handle = handle.clone();
    let (operation, error, last_record) = (
        rollback.operation.clone(),
        rollback.error.clone(),
        rollback.last_record,
    );
    tokio::spawn(async move {
        let downtime = first_record(metrics, Duration::from_secs(10))
            .await
            .map(|at| millis(last_record, at));
        update_upgrade(&handle, &operation, |u| u.downtime_ms = downtime);
        handle.finish_operation(&operation, |o| {
            o.status = OperationStatus::Failed;
            o.downtime_ms = downtime;
            o.outcome = Some("rolled-back".to_string());
            o.error = Some(format!(
                "the new version failed during its probation and was rolled back: {error}"
            ));
        });
    });
}

/// Where a job the host finds live at its start resumes from: the newest
/// (by checkpoint id) valid checkpoint of its runs that did not fail a
/// probation, or savepoint it took, or what its first run restored.
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
    candidates.extend(record.savepoints.iter().map(|s| PathBuf::from(&s.path)));
    candidates.extend(record.initial_restore.iter().map(PathBuf::from));
    let mut read: Vec<(u64, PathBuf)> = candidates
        .into_iter()
        .filter_map(|path| {
            crate::checkpoint::metadata::read(&path)
                .ok()
                .map(|r| (r.metadata.checkpoint, path))
        })
        .collect();
    read.sort_by_key(|(id, _)| std::cmp::Reverse(*id));
    read.into_iter()
        .map(|(_, path)| path)
        .find(|path| crate::checkpoint::savepoint::validate(path).is_ok())
        .map(Location::Local)
}
