//! Staged jobs: a movable cluster job with `key` or `rebalance` edges is
//! cut into stages joined by exchanges (`job::stages`), and each stage of
//! parallelism *p* runs as *p* **tasks**: task *i* runs subtask *i* of
//! every node of the stage (the key groups subtask *i* owns; see
//! `JobGraph::set_task`) as a movable job of its own — its own
//! assignment, generation and fence ([`super::assign`]), its own
//! checkpoints — so a stage's tasks spread over the hosts, and a host's
//! death restarts only the tasks it ran, from their own newest
//! checkpoints, while the others run on. The tasks are spread over the
//! live hosts when the job is submitted.
//!
//! What ties them together is the job's [`StagedJob`] in the bucket
//! `<name>-assignments` (key `s.<job id>`): its id, name and spec as
//! submitted, its tasks stage by stage ([`StageRef`]; job ids
//! `<job id>-<stage n>-<task>`, a rescaled stage's
//! `<job id>-<stage n>-<operation>-<task>`), and the operations asked of
//! the whole job. No host drives a staged job as one: its status is what
//! its tasks' add up to ([`status_of`]); a cancel or a stop goes to every
//! task, and its outcome is theirs ([`outcome_of`]).

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::ClusterError;
use crate::control::lifecycle::{JobStatus, OperationKind};
use crate::control::record::{JobSpec, Operation, OperationStatus};

/// A cluster job that runs as stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagedJob {
    pub job: String,
    pub name: String,
    pub submitted_ms: u64,
    /// As submitted (its stages' specs are cut from it).
    pub spec: JobSpec,
    pub stages: Vec<StageRef>,
    /// Operations asked of the whole job, oldest first.
    #[serde(default)]
    pub operations: Vec<StagedOperation>,
    /// Every stage had ended for good, and the streams of its exchanges
    /// were deleted (no restore reads them: a savepoint of the job holds
    /// none of their state).
    #[serde(default)]
    pub exchanges_deleted: bool,
}

/// One **task** of a stage of a [`StagedJob`]: a stage of parallelism
/// *p* runs as *p* tasks, task *i* running subtask *i* of each of the
/// stage's nodes (the key groups subtask *i* owns) as a movable job of
/// its own, so the tasks of one stage spread over the hosts and fail
/// over one by one. [`StagedJob::stages`] lists them stage by stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StageRef {
    /// The uid of its stage's first node.
    pub name: String,
    /// The movable job that runs this task.
    pub job: String,
    /// Which task of its stage it is, of how many (the stage's
    /// parallelism).
    #[serde(default)]
    pub task: u32,
    #[serde(default = "one")]
    pub tasks: u32,
    /// The submitted job's nodes it runs.
    pub uids: Vec<String>,
    /// The exchanges' sources and sinks its job file adds (a rescale of
    /// the stage rescales them too).
    #[serde(default)]
    pub exchanges: Vec<String>,
}

impl StageRef {
    /// `count` (a stage of one task), `count task 1` (one of several).
    pub fn label(&self) -> String {
        match self.tasks {
            1 => self.name.clone(),
            _ => format!("{} task {}", self.name, self.task),
        }
    }
}

/// An operation asked of a staged job: one per stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagedOperation {
    pub id: String,
    pub kind: OperationKind,
    pub requested_ms: u64,
    pub stages: Vec<StageOperation>,
    /// A stop's cluster savepoint ([`cluster_savepoint`]): the directory
    /// every stage's savepoint goes into, and whose `_metadata` is written
    /// once they all completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub savepoint: Option<String>,
    /// A rescale of one stage (see `control::rescale`): `stages` are its
    /// old tasks' stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescale: Option<StageRescale>,
}

/// A stage's rescale: its tasks stopped with savepoints into one
/// directory, merged, and restored by as many new tasks as the new
/// parallelism asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRescale {
    /// The stage's name (its first node's uid).
    pub stage: String,
    pub from: u32,
    pub to: u32,
    /// The tasks it stopped.
    pub old: Vec<StageRef>,
    /// The directory their savepoints go into, whose `_metadata` is their
    /// merge.
    pub savepoint: String,
    /// The tasks started in their place (none yet: the old ones are still
    /// stopping): the new parallelism's, or, when a stop failed, the
    /// stopped ones again, each from its own savepoint.
    #[serde(default)]
    pub started: Vec<StageRef>,
    /// Why it failed (the tasks then started are the old ones, resumed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// How it ended, once it did (the started tasks may finish or fail
    /// over later: that is not the rescale's outcome).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<Operation>,
}

/// What became of an operation's request to one stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageOperation {
    /// The stage's job.
    pub job: String,
    /// The stage's own operation, if the stage took the request.
    pub operation: Option<String>,
    /// Why the stage did not take it (it had ended already, for a cancel
    /// or a stop: nothing to do).
    pub skipped: Option<String>,
    /// A stop's or savepoint's part of a task that had finished (its
    /// input ended): its final checkpoint, copied into the cluster
    /// savepoint's directory as a savepoint (the task was not asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
}

/// A staged job's status from its stages' (none: a stage not yet in the
/// cluster's job directory, as just after submission): failed if any
/// stage failed; once every stage ended, cancelled, stopped or finished
/// (the first that any stage is, in that order); while any runs on, the
/// first status in the order cancelling, stopping, failing, restarting,
/// created that any stage has, else running.
pub fn status_of(stages: &[Option<JobStatus>]) -> JobStatus {
    let any = |s: JobStatus| stages.contains(&Some(s));
    if any(JobStatus::Failed) {
        return JobStatus::Failed;
    }
    let ended = stages.iter().all(|s| s.is_some_and(JobStatus::is_terminal));
    if ended {
        return [JobStatus::Cancelled, JobStatus::Stopped]
            .into_iter()
            .find(|s| any(*s))
            .unwrap_or(JobStatus::Finished);
    }
    if stages.contains(&None) {
        return JobStatus::Created;
    }
    [
        JobStatus::Cancelling,
        JobStatus::Stopping,
        JobStatus::Failing,
        JobStatus::RollingBack,
        JobStatus::Upgrading,
        JobStatus::Restarting,
        JobStatus::Created,
    ]
    .into_iter()
    .find(|s| any(*s))
    .unwrap_or(JobStatus::Running)
}

/// A staged operation as one operation: running while a stage's runs,
/// failed as soon as a stage's failed (an upgrade: once every stage's
/// ended; each failure named by its stage), else
/// succeeded; `stages` are the stages' operations in `operation.stages`'
/// order (none: not found, or skipped).
pub fn outcome_of(
    operation: &StagedOperation,
    names: &[StageRef],
    stages: &[Option<Operation>],
) -> Operation {
    let name = |job: &str| {
        names
            .iter()
            .find(|s| s.job == job)
            .map_or(job.to_string(), StageRef::label)
    };
    let mut running = false;
    let mut errors = Vec::new();
    let mut done = Vec::new();
    let mut finished_ms = operation.requested_ms;
    let mut downtime_ms: Option<f64> = None;
    for (asked, found) in operation.stages.iter().zip(stages) {
        if let Some(reason) = &asked.skipped {
            done.push(format!("{}: {reason}", name(&asked.job)));
            continue;
        }
        let Some(op) = found else {
            running = true;
            continue;
        };
        match op.status {
            OperationStatus::Running => running = true,
            OperationStatus::Failed => errors.push(format!(
                "stage {} (job {}): {}",
                name(&asked.job),
                asked.job,
                op.error.as_deref().unwrap_or("failed")
            )),
            OperationStatus::Succeeded => {
                finished_ms = finished_ms.max(op.finished_ms.unwrap_or(0));
                if let Some(down) = op.downtime_ms {
                    downtime_ms = Some(downtime_ms.map_or(down, |d| d.max(down)));
                }
                let what = match (&op.savepoint, &op.outcome) {
                    (Some(savepoint), Some(outcome)) => {
                        format!("savepoint {savepoint} ({outcome})")
                    }
                    (Some(savepoint), None) => format!("savepoint {savepoint}"),
                    (None, Some(outcome)) => outcome.clone(),
                    (None, None) => "done".to_string(),
                };
                done.push(format!("{}: {what}", name(&asked.job)));
            }
        }
    }
    let failed = !errors.is_empty();
    // An upgrade ends once every task's has (each rolls back on its own:
    // the job settles only then); a stop or cancel fails at once.
    let wait_all = operation.kind == OperationKind::Upgrade;
    let status = if failed && !(wait_all && running) {
        OperationStatus::Failed
    } else if running {
        OperationStatus::Running
    } else {
        OperationStatus::Succeeded
    };
    let ended = status != OperationStatus::Running;
    Operation {
        id: operation.id.clone(),
        kind: operation.kind,
        status,
        requested_ms: operation.requested_ms,
        finished_ms: ended.then_some(finished_ms),
        savepoint: None,
        // The longest a stage stood still (an upgrade, a rescale).
        downtime_ms: downtime_ms.filter(|_| ended && !failed),
        outcome: (ended && !failed).then(|| done.join("; ")),
        error: failed.then(|| errors.join("; ")),
    }
}

/// The `_metadata` of a cluster savepoint: `staged` stopped whole, each
/// stage's savepoint (`stages`: its directory, relative to the cluster
/// savepoint's, and its `_metadata`, in the order of `staged.stages`) a
/// directory inside it. Its operators are the submitted job's, each
/// stage's with its files' paths below the stage's directory; the
/// exchanges' operators are left out and their readers' positions kept
/// apart (`exchanges`), so it restores the submitted job as it was
/// written — on one host (`weir run -s`), or on the cluster, cut again
/// onto new exchanges. The stages stopped aligned, so nothing was in
/// flight between them.
pub fn cluster_savepoint(
    staged: &StagedJob,
    stages: &[(String, crate::checkpoint::metadata::CheckpointMetadata)],
) -> Result<crate::checkpoint::metadata::CheckpointMetadata, String> {
    use crate::checkpoint::metadata::{CheckpointMetadata, Role, SnapshotKind};
    if stages.len() != staged.stages.len() {
        return Err(format!(
            "job {}: {} stage savepoints for {} stages",
            staged.job,
            stages.len(),
            staged.stages.len()
        ));
    }
    let mut merged = CheckpointMetadata {
        kind: SnapshotKind::Savepoint,
        job_id: staged.job.clone(),
        job_name: staged.name.clone(),
        checkpoint: 0,
        completed_ms: 0,
        max_parallelism: stages.first().map_or(0, |(_, m)| m.max_parallelism),
        operators: Default::default(),
        exchanges: Default::default(),
    };
    for (stage, (dir, metadata)) in staged.stages.iter().zip(stages) {
        if metadata.max_parallelism != merged.max_parallelism {
            return Err(format!(
                "stage {} (job {}): max_parallelism {}, another stage's {}",
                stage.name, stage.job, metadata.max_parallelism, merged.max_parallelism
            ));
        }
        merged.checkpoint = merged.checkpoint.max(metadata.checkpoint);
        merged.completed_ms = merged.completed_ms.max(metadata.completed_ms);
        for uid in &stage.uids {
            let mut op = metadata.operators.get(uid).cloned().ok_or_else(|| {
                format!(
                    "stage {} (job {}): its savepoint {dir} has no uid `{uid}`",
                    stage.name, stage.job
                )
            })?;
            op.relocate(dir);
            // A stage's tasks each hold their own subtask of its nodes.
            match merged.operators.get_mut(uid) {
                None => {
                    merged.operators.insert(uid.clone(), op);
                }
                Some(into) => {
                    for subtask in op.subtasks {
                        if into.subtasks.iter().any(|s| s.subtask == subtask.subtask) {
                            return Err(format!(
                                "stage {} (job {}): subtask {} of uid `{uid}` is in two tasks' savepoints",
                                stage.name, stage.job, subtask.subtask
                            ));
                        }
                        into.subtasks.push(subtask);
                    }
                }
            }
        }
        for uid in &stage.exchanges {
            let Some(op) = metadata
                .operators
                .get(uid)
                .filter(|op| op.role == Role::Source)
            else {
                continue;
            };
            let positions: Vec<(u32, u64)> = op
                .subtasks
                .iter()
                .flat_map(|s| s.partitions.iter().map(|(&g, &n)| (g, n)))
                .collect();
            merged
                .exchanges
                .entry(uid.clone())
                .or_default()
                .extend(positions);
        }
    }
    for (uid, op) in &mut merged.operators {
        op.subtasks.sort_by_key(|s| s.subtask);
        if let Some(missing) =
            (0..op.parallelism).find(|i| !op.subtasks.iter().any(|s| s.subtask == *i))
        {
            return Err(format!(
                "job {}: subtask {missing} of uid `{uid}` is in no task's savepoint",
                staged.job
            ));
        }
    }
    Ok(merged)
}

fn one() -> u32 {
    1
}

fn key(job: &str) -> String {
    format!("s.{job}")
}

/// The staged jobs of a cluster, in its assignments bucket.
#[derive(Debug, Clone)]
pub struct StagedJobs {
    cluster: String,
    bucket: kv::Store,
}

impl StagedJobs {
    pub(super) fn new(cluster: &str, bucket: kv::Store) -> Self {
        Self {
            cluster: cluster.to_string(),
            bucket,
        }
    }

    fn error(&self, e: impl std::fmt::Display) -> ClusterError {
        ClusterError::Buckets {
            name: self.cluster.clone(),
            message: format!("bucket `{}-assignments`: {e}", self.cluster),
        }
    }

    /// Records a staged job (before its stages are assigned).
    pub async fn create(&self, staged: &StagedJob) -> Result<(), ClusterError> {
        let bytes = Bytes::from(serde_json::to_vec(staged).map_err(|e| self.error(e))?);
        self.bucket
            .create(key(&staged.job), bytes)
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    async fn entry(&self, job: &str) -> Result<Option<(StagedJob, u64)>, ClusterError> {
        if !super::is_plain_name(job) {
            return Ok(None);
        }
        let entry = self
            .bucket
            .entry(key(job))
            .await
            .map_err(|e| self.error(e))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| {
                serde_json::from_slice::<StagedJob>(&e.value)
                    .ok()
                    .map(|s| (s, e.revision))
            }))
    }

    /// Staged job `job`, if the cluster has one of that id.
    pub async fn get(&self, job: &str) -> Result<Option<StagedJob>, ClusterError> {
        Ok(self.entry(job).await?.map(|(s, _)| s))
    }

    /// Every staged job.
    pub async fn list(&self) -> Result<Vec<StagedJob>, ClusterError> {
        let mut keys = self.bucket.keys().await.map_err(|e| self.error(e))?;
        let mut all = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| self.error(e))?;
            if let Some(job) = key.strip_prefix("s.")
                && let Some(staged) = self.get(job).await?
            {
                all.push(staged);
            }
        }
        Ok(all)
    }

    /// Adds `operation` to staged job `job`.
    pub async fn add_operation(
        &self,
        job: &str,
        operation: StagedOperation,
    ) -> Result<(), ClusterError> {
        self.change(job, |staged| staged.operations.push(operation.clone()))
            .await
    }

    /// Records that staged job `job`'s exchanges were deleted.
    pub async fn exchanges_deleted(&self, job: &str) -> Result<(), ClusterError> {
        self.change(job, |staged| staged.exchanges_deleted = true)
            .await
    }

    /// Changes staged job `job` by `change` (a compare-and-set, asked again
    /// while something else changes it).
    pub async fn change(
        &self,
        job: &str,
        change: impl Fn(&mut StagedJob),
    ) -> Result<(), ClusterError> {
        for _ in 0..10 {
            let Some((mut staged, revision)) = self.entry(job).await? else {
                return Err(self.error(format!("staged job {job} is gone")));
            };
            change(&mut staged);
            let bytes = Bytes::from(serde_json::to_vec(&staged).map_err(|e| self.error(e))?);
            match self.bucket.update(key(job), bytes, revision).await {
                Ok(_) => return Ok(()),
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(error) => return Err(self.error(error)),
            }
        }
        Err(self.error(format!(
            "staged job {job}: its entry kept changing while this host wrote it"
        )))
    }
}

/// An operation `kind` (id `op`, requested at 1 ms) that every one of
/// `tasks` took as its operation `o`.
#[cfg(test)]
pub(in crate::control) fn asked_of(tasks: &[StageRef], kind: OperationKind) -> StagedOperation {
    StagedOperation {
        id: "op".into(),
        kind,
        requested_ms: 1,
        stages: tasks
            .iter()
            .map(|s| StageOperation {
                job: s.job.clone(),
                operation: Some("o".into()),
                skipped: None,
                part: None,
            })
            .collect(),
        savepoint: None,
        rescale: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_jobs_status_is_what_its_stages_add_up_to() {
        use JobStatus::*;
        let of = |s: &[Option<JobStatus>]| status_of(s);
        assert_eq!(of(&[Some(Running), Some(Running)]), Running);
        assert_eq!(of(&[Some(Running), None]), Created);
        assert_eq!(of(&[Some(Running), Some(Restarting)]), Restarting);
        assert_eq!(of(&[Some(Finished), Some(Running)]), Running);
        assert_eq!(of(&[Some(Finished), Some(Finished)]), Finished);
        assert_eq!(of(&[Some(Finished), Some(Cancelled)]), Cancelled);
        assert_eq!(of(&[Some(Stopped), Some(Finished)]), Stopped);
        assert_eq!(of(&[Some(Running), Some(Failed)]), Failed);
        assert_eq!(of(&[Some(Cancelling), Some(Cancelled)]), Cancelling);
    }

    fn op(status: OperationStatus, error: Option<&str>) -> Operation {
        Operation {
            id: "x".into(),
            kind: OperationKind::Stop,
            status,
            requested_ms: 1,
            finished_ms: Some(5),
            savepoint: Some("s3://b/sp".into()),
            downtime_ms: None,
            outcome: None,
            error: error.map(str::to_string),
        }
    }

    /// A staged job's spec, as the tests need none of it.
    fn spec() -> JobSpec {
        JobSpec {
            job_file: String::new(),
            file_name: "job.toml".into(),
            base_dir: "/".into(),
            resolved: Default::default(),
            overrides: Default::default(),
            parallelism: Default::default(),
            storage: None,
            task: None,
        }
    }

    #[test]
    fn a_cluster_savepoint_holds_the_submitted_jobs_operators_below_their_stages_dirs() {
        use crate::checkpoint::metadata::{
            CheckpointMetadata, FileRef, OperatorSnapshot, Role, SnapshotKind, SubtaskSnapshot,
        };
        let file = |path: &str| FileRef {
            path: path.into(),
            name: "f".into(),
            size: 1,
            sha256: "00".into(),
        };
        let op = |role, subtask: SubtaskSnapshot| OperatorSnapshot {
            role,
            parallelism: 1,
            plugin: None,
            states: Vec::new(),
            subtasks: vec![subtask],
        };
        let stage = |checkpoint, operators: Vec<(&str, OperatorSnapshot)>| CheckpointMetadata {
            kind: SnapshotKind::Savepoint,
            job_id: "j-0".into(),
            job_name: "wc/lines".into(),
            checkpoint,
            completed_ms: checkpoint as i64 * 10,
            max_parallelism: 32,
            operators: operators
                .into_iter()
                .map(|(uid, op)| (uid.to_string(), op))
                .collect(),
            exchanges: Default::default(),
        };
        let upstream = stage(
            7,
            vec![
                (
                    "lines",
                    op(
                        Role::Source,
                        SubtaskSnapshot {
                            partitions: [(0, 40)].into(),
                            ..Default::default()
                        },
                    ),
                ),
                (
                    "count.input-0.out",
                    op(Role::Sink, SubtaskSnapshot::default()),
                ),
            ],
        );
        let downstream = stage(
            3,
            vec![
                (
                    "count.input-0",
                    op(
                        Role::Source,
                        SubtaskSnapshot {
                            partitions: [(0, 12), (1, 15)].into(),
                            ..Default::default()
                        },
                    ),
                ),
                (
                    "count",
                    op(
                        Role::Operator,
                        SubtaskSnapshot {
                            files: vec![file("count-0.state")],
                            timers: Some(file("count-0.timers")),
                            ..Default::default()
                        },
                    ),
                ),
                (
                    "out",
                    op(
                        Role::Sink,
                        SubtaskSnapshot {
                            pending: vec!["pending/out-0-3".into(), "tx-7".into()],
                            ..Default::default()
                        },
                    ),
                ),
            ],
        );
        let staged = StagedJob {
            job: "j".into(),
            name: "wc".into(),
            submitted_ms: 1,
            spec: spec(),
            stages: vec![
                StageRef {
                    name: "lines".into(),
                    job: "j-0".into(),
                    task: 0,
                    tasks: 1,
                    uids: vec!["lines".into()],
                    exchanges: vec!["count.input-0.out".into()],
                },
                StageRef {
                    name: "count".into(),
                    job: "j-1".into(),
                    task: 0,
                    tasks: 1,
                    uids: vec!["count".into(), "out".into()],
                    exchanges: vec!["count.input-0".into()],
                },
            ],
            operations: Vec::new(),
            exchanges_deleted: false,
        };
        let parts = vec![
            ("savepoint-j0-a".to_string(), upstream),
            ("savepoint-j1-b".to_string(), downstream.clone()),
        ];
        let merged = cluster_savepoint(&staged, &parts).expect("merged");
        assert_eq!(merged.kind, SnapshotKind::Savepoint);
        assert_eq!(
            (merged.job_id.as_str(), merged.job_name.as_str()),
            ("j", "wc")
        );
        assert_eq!((merged.checkpoint, merged.completed_ms), (7, 70));
        let uids: Vec<&str> = merged.operators.keys().map(String::as_str).collect();
        assert_eq!(uids, ["count", "lines", "out"], "no exchange among them");
        let count = &merged.operators["count"].subtasks[0];
        assert_eq!(count.files[0].path, "savepoint-j1-b/count-0.state");
        assert_eq!(
            count.timers.as_ref().map(|t| t.path.as_str()),
            Some("savepoint-j1-b/count-0.timers")
        );
        assert_eq!(
            merged.operators["out"].subtasks[0].pending,
            ["savepoint-j1-b/pending/out-0-3", "tx-7"],
            "spool files are in the stage's directory; a transaction id is no path"
        );
        assert_eq!(
            merged.operators["lines"].subtasks[0].partitions,
            [(0, 40)].into()
        );
        assert_eq!(merged.exchanges["count.input-0"], [(0, 12), (1, 15)].into());

        // A stage savepoint that lacks a stage's uid, or keys otherwise,
        // is no part of it.
        let short = vec![parts[0].clone()];
        assert!(cluster_savepoint(&staged, &short).is_err());
        let mut other = downstream;
        other.max_parallelism = 64;
        let wrong = vec![parts[0].clone(), ("savepoint-j1-b".to_string(), other)];
        let error = cluster_savepoint(&staged, &wrong).expect_err("refused");
        assert!(
            error.contains("stage count (job j-1): max_parallelism 64"),
            "{error}"
        );
    }

    #[test]
    fn a_cluster_savepoint_joins_a_stages_tasks_subtasks() {
        use crate::checkpoint::metadata::{
            CheckpointMetadata, OperatorSnapshot, Role, SnapshotKind, SubtaskSnapshot,
        };
        let task = |i: u32| CheckpointMetadata {
            kind: SnapshotKind::Savepoint,
            job_id: format!("j-0-{i}"),
            job_name: "wc/count".into(),
            checkpoint: 4 + u64::from(i),
            completed_ms: 1,
            max_parallelism: 8,
            operators: [(
                "count".to_string(),
                OperatorSnapshot {
                    role: Role::Operator,
                    parallelism: 2,
                    plugin: None,
                    states: Vec::new(),
                    subtasks: vec![SubtaskSnapshot {
                        subtask: i,
                        key_groups: Some([i * 4, i * 4 + 4]),
                        ..Default::default()
                    }],
                },
            )]
            .into(),
            exchanges: Default::default(),
        };
        let reference = |i: u32| StageRef {
            name: "count".into(),
            job: format!("j-0-{i}"),
            task: i,
            tasks: 2,
            uids: vec!["count".into()],
            exchanges: vec![],
        };
        let staged = StagedJob {
            job: "j".into(),
            name: "wc".into(),
            submitted_ms: 1,
            spec: spec(),
            stages: vec![reference(0), reference(1)],
            operations: Vec::new(),
            exchanges_deleted: false,
        };
        let parts = vec![("a".to_string(), task(0)), ("b".to_string(), task(1))];
        let merged = cluster_savepoint(&staged, &parts).expect("merged");
        let subtasks: Vec<u32> = merged.operators["count"]
            .subtasks
            .iter()
            .map(|s| s.subtask)
            .collect();
        assert_eq!(subtasks, [0, 1]);
        assert_eq!(merged.checkpoint, 5);
        // The same task twice is refused: a subtask would be missing.
        let twice = vec![("a".to_string(), task(0)), ("b".to_string(), task(0))];
        let error = cluster_savepoint(&staged, &twice).expect_err("refused");
        assert!(
            error.contains("subtask 0 of uid `count` is in two tasks' savepoints"),
            "{error}"
        );
    }

    #[test]
    fn a_staged_operation_ends_when_every_stages_ended_and_names_each_failure() {
        let names = vec![
            StageRef {
                name: "lines".into(),
                job: "j-0".into(),
                task: 0,
                tasks: 1,
                uids: vec![],
                exchanges: vec![],
            },
            StageRef {
                name: "count".into(),
                job: "j-1".into(),
                task: 0,
                tasks: 1,
                uids: vec![],
                exchanges: vec![],
            },
        ];
        let asked = asked_of(&names, OperationKind::Stop);
        let running = outcome_of(
            &asked,
            &names,
            &[Some(op(OperationStatus::Succeeded, None)), None],
        );
        assert_eq!(running.status, OperationStatus::Running);
        let done = outcome_of(
            &asked,
            &names,
            &[
                Some(op(OperationStatus::Succeeded, None)),
                Some(op(OperationStatus::Succeeded, None)),
            ],
        );
        assert_eq!(done.status, OperationStatus::Succeeded);
        assert_eq!(
            done.outcome.as_deref(),
            Some("lines: savepoint s3://b/sp; count: savepoint s3://b/sp")
        );
        assert_eq!(done.downtime_ms, None);
        let rescaled = outcome_of(
            &asked,
            &names,
            &[
                Some(op(OperationStatus::Succeeded, None)),
                Some(Operation {
                    downtime_ms: Some(120.0),
                    ..op(OperationStatus::Succeeded, None)
                }),
            ],
        );
        assert_eq!(rescaled.downtime_ms, Some(120.0), "the longest stage's");
        let failed = outcome_of(
            &asked,
            &names,
            &[
                Some(op(OperationStatus::Failed, Some("no barrier"))),
                Some(op(OperationStatus::Running, None)),
            ],
        );
        assert_eq!(failed.status, OperationStatus::Failed);
        assert_eq!(
            failed.error.as_deref(),
            Some("stage lines (job j-0): no barrier")
        );
        // An upgrade's tasks each roll back on their own: it ends with the
        // last of them.
        let upgrade = StagedOperation {
            kind: OperationKind::Upgrade,
            ..asked.clone()
        };
        let some_failed = [
            Some(op(OperationStatus::Failed, Some("rolled back"))),
            Some(op(OperationStatus::Running, None)),
        ];
        let going = outcome_of(&upgrade, &names, &some_failed);
        assert_eq!(going.status, OperationStatus::Running);
        let ended = outcome_of(
            &upgrade,
            &names,
            &[
                Some(op(OperationStatus::Failed, Some("rolled back"))),
                Some(op(OperationStatus::Succeeded, None)),
            ],
        );
        assert_eq!(ended.status, OperationStatus::Failed);
    }
}
