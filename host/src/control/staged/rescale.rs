//! Rescaling one stage of a staged cluster job (`weir rescale JOB
//! --parallelism UID=N`): a stage runs as one task per subtask, each a
//! movable job of its own (see [`cluster::staged`]), so a new parallelism
//! is new tasks.
//!
//! 1. Every task of the stage stops with a savepoint into one directory,
//!    `<the job's storage>/savepoints/rescale-<job6>-<hex>` ([`start`]).
//! 2. Once they all stopped, their savepoints are merged into that
//!    directory's `_metadata` (`checkpoint::metadata::merge_tasks`), N new
//!    tasks (jobs `<job>-<stage>-<operation>-<i>`) are assigned to the live
//!    hosts, each restoring the key groups subtask *i* of N owns, and the
//!    staged job lists them in the old ones' place ([`advance`]).
//! 3. The operation succeeds once every new task runs; its downtime is
//!    from the request until then.
//!
//! If a task's stop fails, the tasks that did stop are started again from
//! their own savepoints, at the old parallelism, and the operation fails
//! naming the task that would not stop. The stages upstream and downstream
//! run on throughout: exchanges are read by key group, whoever writes them.
//!
//! Each step may be taken again, by any host, any number of times (the
//! merged `_metadata` is a conditional put, each new task's assignment is
//! created once): the host that took the request drives the rescale in
//! the background, the cluster's coordinator carries it on if that host
//! died (`staged::steward`), and any host asked about the operation
//! advances it too.

use axum::http::Method;
use bytes::Bytes;

use super::{Kept, Stages, ask};
use crate::checkpoint::metadata::{self, METADATA_FILE};
use crate::control::ControlError;
use crate::control::cluster::Cluster;
use crate::control::cluster::assign::{Assignment, stage_of};
use crate::control::cluster::staged::{
    StageRef, StageRescale, StagedJob, StagedJobs, StagedOperation,
};
use crate::control::jobs::SavepointRequest;
use crate::control::lifecycle::{JobStatus, OperationKind};
use crate::control::record::{JobSpec, Operation, OperationStatus};
use crate::types::Location;

/// Stops every task of stage `stage` of `staged` with a savepoint into one
/// directory, to restart it at `parallelism`; answers the operation.
pub(super) async fn start(
    stages: &Stages<'_>,
    store: &StagedJobs,
    storage: Option<&str>,
    staged: &StagedJob,
    stage: &str,
    parallelism: u32,
) -> Result<Operation, ControlError> {
    let old: Vec<StageRef> = staged
        .stages
        .iter()
        .filter(|s| s.name == stage)
        .cloned()
        .collect();
    let going = staged.operations.iter().find(|o| {
        o.rescale
            .as_ref()
            .is_some_and(|r| r.stage == stage && r.started.is_empty())
    });
    if let Some(going) = going {
        return Err(ControlError::Conflict(format!(
            "stage {stage} of job {} is being rescaled already (operation {})",
            staged.job, going.id
        )));
    }
    let from = old.first().map_or(0, |s| s.tasks);
    if from == parallelism {
        return Err(ControlError::BadRequest(format!(
            "stage {stage} of job {} runs at parallelism {parallelism} already",
            staged.job
        )));
    }
    let Some(storage) = storage else {
        return Err(ControlError::Unavailable(format!(
            "job {}: the cluster has no object storage for the rescale's savepoints",
            staged.job
        )));
    };
    let savepoint = format!(
        "{}/savepoints/rescale-{}-{}",
        storage.trim_end_matches('/'),
        staged.job.chars().take(6).collect::<String>(),
        crate::checkpoint::storage::random_hex(6)
    );
    let body = serde_json::to_vec(&SavepointRequest {
        target_dir: Some(savepoint.clone()),
        ..SavepointRequest::default()
    })
    .map_err(|e| ControlError::Internal(e.to_string()))?;
    let body = Some(Bytes::from(body));
    let requests = old.iter().map(|task| (task, body.clone())).collect();
    let rescale = StageRescale {
        stage: stage.to_string(),
        from,
        to: parallelism,
        old: old.clone(),
        savepoint,
        started: Vec::new(),
        failed: None,
        ended: None,
    };
    ask(
        stages,
        store,
        staged,
        OperationKind::Upgrade,
        "/stop",
        requests,
        Kept {
            rescale: Some(rescale),
            ..Kept::default()
        },
    )
    .await
}

/// What the rescale stands at, as far as this host could take it.
pub(super) async fn advance(
    stages: &Stages<'_>,
    store: &StagedJobs,
    cluster: &Cluster,
    staged: &StagedJob,
    asked: &StagedOperation,
    rescale: &StageRescale,
) -> Operation {
    if let Some(ended) = &rescale.ended {
        return ended.clone();
    }
    let operation = outcome(stages, store, cluster, staged, asked, rescale).await;
    if operation.status != OperationStatus::Running {
        // Recorded once: later looks answer the same.
        let (id, ended) = (asked.id.clone(), operation.clone());
        let recorded = store
            .change(&staged.job, |job| {
                if let Some(r) = job
                    .operations
                    .iter_mut()
                    .find(|o| o.id == id)
                    .and_then(|o| o.rescale.as_mut())
                    .filter(|r| r.ended.is_none())
                {
                    r.ended = Some(ended.clone());
                }
            })
            .await;
        if let Err(error) = recorded {
            tracing::warn!(job = %staged.job, operation = %asked.id, %error, "cannot record the rescale's end");
        }
    }
    operation
}

/// [`advance`], short of recording the end.
async fn outcome(
    stages: &Stages<'_>,
    store: &StagedJobs,
    cluster: &Cluster,
    staged: &StagedJob,
    asked: &StagedOperation,
    rescale: &StageRescale,
) -> Operation {
    let mut operation = Operation {
        id: asked.id.clone(),
        kind: asked.kind,
        status: OperationStatus::Running,
        requested_ms: asked.requested_ms,
        finished_ms: None,
        savepoint: None,
        downtime_ms: None,
        outcome: None,
        error: None,
    };
    let result = match rescale.started.is_empty() {
        true => restart(stages, store, cluster, staged, asked, rescale).await,
        false => Ok(Some(rescale.clone())),
    };
    let rescale = match result {
        Ok(Some(rescale)) => rescale,
        Ok(None) => return operation,
        Err(error) => {
            operation.status = OperationStatus::Failed;
            operation.finished_ms = Some(crate::control::now_ms());
            operation.error = Some(error);
            return operation;
        }
    };
    // The tasks started: done once each runs.
    let mut since = asked.requested_ms;
    for task in &rescale.started {
        let entry = stages.directory.find(&task.job).await.ok().flatten();
        match entry.map(|e| e.summary) {
            // Running (or already through its input).
            Some(summary) if matches!(summary.status, JobStatus::Running | JobStatus::Finished) => {
                since = since.max(summary.since_ms);
            }
            Some(summary) if summary.status.is_terminal() => {
                operation.status = OperationStatus::Failed;
                operation.finished_ms = Some(summary.since_ms);
                operation.error = Some(format!(
                    "stage {} task {} (job {}) {} after the rescale",
                    task.name, task.task, task.job, summary.status
                ));
                return operation;
            }
            _ => return operation,
        }
    }
    operation.finished_ms = Some(since);
    match &rescale.failed {
        Some(error) => {
            operation.status = OperationStatus::Failed;
            operation.error = Some(error.clone());
        }
        None => {
            operation.status = OperationStatus::Succeeded;
            operation.savepoint = Some(rescale.savepoint.clone());
            operation.downtime_ms = Some(since.saturating_sub(asked.requested_ms) as f64);
            operation.outcome = Some(format!(
                "{}: rescaled from {} to {} tasks ({})",
                rescale.stage,
                rescale.from,
                rescale.to,
                rescale
                    .started
                    .iter()
                    .map(|t| t.job.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
    }
    operation
}

/// Once every old task stopped: starts the new ones (or, if a stop
/// failed, the stopped ones again) and records them. `Ok(None)`: still
/// stopping.
async fn restart(
    stages: &Stages<'_>,
    store: &StagedJobs,
    cluster: &Cluster,
    staged: &StagedJob,
    asked: &StagedOperation,
    rescale: &StageRescale,
) -> Result<Option<StageRescale>, String> {
    let mut taken = Vec::new();
    let mut refused = Vec::new();
    for (task, stop) in rescale.old.iter().zip(&asked.stages) {
        let what = format!("stage {} task {} (job {})", task.name, task.task, task.job);
        if let Some(reason) = &stop.skipped {
            refused.push(format!("{what}: {reason}"));
            taken.push(None);
            continue;
        }
        let Some(id) = &stop.operation else {
            taken.push(None);
            continue;
        };
        let answer = stages
            .call(&task.job, Method::GET, &format!("/operations/{id}"), None)
            .await;
        let found: Option<Operation> = match answer {
            Ok((_, axum::http::StatusCode::OK, bytes)) => serde_json::from_slice(&bytes).ok(),
            _ => None,
        };
        match found {
            Some(op) if op.status == OperationStatus::Succeeded => taken.push(op.savepoint),
            Some(op) if op.status == OperationStatus::Failed => {
                refused.push(format!(
                    "{what}: {}",
                    op.error.as_deref().unwrap_or("its stop failed")
                ));
                taken.push(None);
            }
            _ => return Ok(None),
        }
    }
    let assignments = cluster
        .assignments()
        .ok_or_else(|| "this host follows no assignments".to_string())?;
    let template = assignments
        .assignment(&rescale.old[0].job)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("job {} has no assignment", rescale.old[0].job))?;
    let mut next = rescale.clone();
    // The old tasks the started ones replace: every one, or (a stop
    // failed) those that stopped.
    let replaced: Vec<String> = rescale
        .old
        .iter()
        .zip(&taken)
        .filter(|(_, savepoint)| refused.is_empty() || savepoint.is_some())
        .map(|(task, _)| task.job.clone())
        .collect();
    let merged = match refused.is_empty() {
        true => Some(merge(staged, rescale, &taken).await),
        false => None,
    };
    let plan: Vec<(u32, u32, String)> = match merged {
        Some(Ok(savepoint)) => (0..rescale.to)
            .map(|i| (i, rescale.to, savepoint.clone()))
            .collect(),
        // A stop failed, or the savepoints would not merge: the tasks that
        // stopped run on from their own savepoints, at the old parallelism.
        failed => {
            let why = match failed {
                Some(Err(error)) => format!("cannot merge its tasks' savepoints: {error}"),
                _ => refused.join("; "),
            };
            next.failed = Some(format!(
                "the rescale of stage {} failed: {why}; the tasks that stopped run on at parallelism {}",
                rescale.stage, rescale.from
            ));
            rescale
                .old
                .iter()
                .zip(&taken)
                .filter_map(|(task, savepoint)| Some((task.task, rescale.from, savepoint.clone()?)))
                .collect()
        }
    };
    let stage = stage_prefix(&rescale.old[0].job);
    let jobs: Vec<String> = plan
        .iter()
        .map(|(task, _, _)| format!("{stage}-{}-{task}", asked.id))
        .collect();
    let hosts = assignments
        .place(&jobs, &replaced)
        .await
        .map_err(|e| e.to_string())?;
    for (((task, tasks, restore), host), job) in plan.into_iter().zip(hosts).zip(jobs) {
        let mut spec: JobSpec = template.spec.clone();
        for uid in rescale.old[0].uids.iter().chain(&rescale.old[0].exchanges) {
            spec.parallelism.insert(uid.clone(), tasks);
        }
        spec.task = Some(task);
        spec.storage = cluster.job_storage(&job);
        assignments
            .create_once(&Assignment {
                job: job.clone(),
                name: template.name.clone(),
                submitted_ms: crate::control::now_ms(),
                spec,
                allow_non_restored_state: false,
                initial_restore: Some(restore),
                host,
                generation: 1,
                restore: None,
                ended: false,
                reason: format!(
                    "task {task} of stage {} of job {}, rescaled from {} to {tasks} tasks",
                    rescale.stage, staged.job, rescale.from
                ),
            })
            .await
            .map_err(|e| e.to_string())?;
        next.started.push(StageRef {
            job,
            task,
            tasks,
            ..rescale.old[0].clone()
        });
    }
    // The staged job lists the started tasks in the old ones' place (in
    // stage order), once.
    let (id, recorded) = (asked.id.clone(), next.clone());
    store
        .change(&staged.job, |job| {
            let Some(op) = job.operations.iter_mut().find(|o| o.id == id) else {
                return;
            };
            if op.rescale.as_ref().is_some_and(|r| !r.started.is_empty()) {
                return;
            }
            op.rescale = Some(recorded.clone());
            // In the place of the old tasks it stopped.
            let old = |s: &StageRef| replaced.contains(&s.job);
            let Some(at) = job.stages.iter().position(old) else {
                return;
            };
            job.stages.retain(|s| !old(s));
            job.stages.splice(at..at, recorded.started.iter().cloned());
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(Some(next))
}

/// `<job>-<stage n>` of a task's job id `<job>-<stage n>-…`.
fn stage_prefix(task_job: &str) -> String {
    stage_of(task_job).unwrap_or_else(|| task_job.to_string())
}

/// Merges the old tasks' savepoints (`taken`, in task order) into the
/// rescale's directory; answers it.
async fn merge(
    staged: &StagedJob,
    rescale: &StageRescale,
    taken: &[Option<String>],
) -> Result<String, String> {
    let Ok(Location::S3(url)) = Location::parse(&rescale.savepoint) else {
        return Err(format!("{} is not an s3:// location", rescale.savepoint));
    };
    let remote = crate::checkpoint::remote::Remote::open(&url).map_err(|e| e.to_string())?;
    let mut parts = Vec::new();
    for (task, savepoint) in rescale.old.iter().zip(taken) {
        let Some(dir) = savepoint
            .as_deref()
            .and_then(|s| s.strip_prefix(rescale.savepoint.as_str()))
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|dir| metadata::is_inside(dir))
        else {
            return Err(format!(
                "stage {} task {} (job {}): its savepoint {savepoint:?} is not inside {}",
                task.name, task.task, task.job, rescale.savepoint
            ));
        };
        let bytes = remote
            .get(&format!("{dir}/{METADATA_FILE}"))
            .await
            .map_err(|e| e.to_string())?;
        let read = metadata::decode(
            &bytes,
            std::path::Path::new(&format!("{}/{dir}/{METADATA_FILE}", rescale.savepoint)),
        )
        .map_err(|e| e.to_string())?;
        parts.push((dir.to_string(), read));
    }
    let name = format!("{}/{}", staged.name, rescale.stage);
    let merged = metadata::merge_tasks(&staged.job, &name, &parts)?;
    let bytes = metadata::encode(&merged).map_err(|e| e.to_string())?;
    // Another host may have written it: the same bytes.
    match remote.put_new(METADATA_FILE, bytes).await {
        Ok(()) => Ok(rescale.savepoint.clone()),
        Err(_) if remote.get(METADATA_FILE).await.is_ok() => Ok(rescale.savepoint.clone()),
        Err(error) => Err(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tasks_stage_is_its_job_ids_first_two_parts() {
        assert_eq!(stage_prefix("abc123-1-0"), "abc123-1");
        assert_eq!(stage_prefix("abc123-1-0f3e-2"), "abc123-1");
    }
}
