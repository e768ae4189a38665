//! What the running host persists about a job (`jobs/<job id>/job.json`,
//! beside the submitted `job.toml`): what to run ([`JobSpec`]), its
//! [`Lifecycle`], its runs, restarts, operations, savepoints and upgrades.
//! These are boundary types: they are the API's answers too, and derive
//! its OpenAPI schema. Versioned (`format`); a record of an unknown format
//! is refused, naming the file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::lifecycle::{JobStatus, Lifecycle};
use crate::types::Location;

/// The record format this host writes.
pub const RECORD_FORMAT: u32 = 1;

/// What a job runs: the submitted job file and how its plugins resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobSpec {
    /// The job file's text (TOML).
    pub job_file: String,
    /// Its file name (messages name it).
    #[serde(default = "job_toml")]
    pub file_name: String,
    /// The directory the job file's relative paths (sources, sinks) are
    /// resolved against: where it was submitted from.
    #[schema(value_type = String)]
    pub base_dir: PathBuf,
    /// Each operator's `plugin` value → the sha256 it resolved to when the
    /// job was submitted (a name without a version resolves once, to the
    /// newest, and stays that across restarts).
    pub resolved: BTreeMap<String, String>,
    /// Upgrades: uid → sha256 of the plugin it runs instead.
    #[serde(default)]
    pub overrides: BTreeMap<String, String>,
    /// Upgrades: uid → parallelism instead of the job file's.
    #[serde(default)]
    pub parallelism: BTreeMap<String, u32>,
    /// Where its checkpoints and savepoints go when not the host's data
    /// dir: a movable job of a cluster, on the cluster's object storage
    /// (`s3://…/jobs/<job id>`), where any host can restore them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    /// A task of a staged cluster job's stage: the one subtask of every
    /// node it runs (see `JobGraph::set_task`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<u32>,
}

fn job_toml() -> String {
    "job.toml".to_string()
}

/// One run of the engine for this job: the first start, a resume after a
/// host restart, each side of an upgrade. Its checkpoints are under
/// `checkpoints/<run id>/`; the first run's id is the job id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunRecord {
    pub run_id: String,
    pub started_ms: u64,
    /// The checkpoint or savepoint it restored.
    pub restored_from: Option<String>,
    /// Why it started.
    pub reason: String,
    /// An upgrade's new version that failed its probation: its checkpoints
    /// are never restored.
    #[serde(default)]
    pub abandoned: bool,
}

/// A failed attempt and what the restart strategy did about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RestartRecord {
    pub time_ms: u64,
    /// The operator (uid) that failed.
    pub uid: String,
    pub error: String,
    /// Restart number (0: not restarted).
    pub attempt: u32,
}

pub use super::lifecycle::OperationKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OperationStatus {
    /// Accepted, not finished.
    Running,
    Succeeded,
    Failed,
}

/// A long operation on a job (savepoint, stop, cancel, upgrade). Kept with
/// the job for as long as the job is: results never expire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Operation {
    pub id: String,
    pub kind: OperationKind,
    pub status: OperationStatus,
    pub requested_ms: u64,
    pub finished_ms: Option<u64>,
    /// The savepoint it wrote (savepoint, stop, upgrade).
    pub savepoint: Option<String>,
    /// Upgrades: the last record of the old version to the first of the
    /// new one (or of the old one again, after a rollback).
    pub downtime_ms: Option<f64>,
    /// What happened, in a line (e.g. "rolled back to count@0.1.0").
    pub outcome: Option<String>,
    pub error: Option<String>,
}

/// A savepoint the host took of this job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SavepointRecord {
    pub path: String,
    /// Its checkpoint id (ids grow across the job's runs).
    pub checkpoint: u64,
    pub time_ms: u64,
    /// The operation that asked for it (none: the host's own, at shutdown).
    pub operation: Option<String>,
}

/// A plugin an operator ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PluginVersion {
    /// `name@version`.
    pub plugin: String,
    pub digest: String,
}

/// One upgrade: refused, done, or rolled back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UpgradeRecord {
    pub operation: String,
    pub time_ms: u64,
    /// What it changes, in a line (plugins, parallelism, the job file).
    #[serde(default)]
    pub change: String,
    /// By uid: what ran before and what was to run after.
    pub from: BTreeMap<String, PluginVersion>,
    pub to: BTreeMap<String, PluginVersion>,
    /// `checking` while it runs; then `refused`, `upgraded`,
    /// `rolled-back` or `abandoned` (a cancel, a stop, a failure or the
    /// host's shutdown came first).
    pub outcome: String,
    /// The step it is at while it runs (`checking`, `standby-building`,
    /// `standby-catching-up`, `stopping`, `restoring`, `on-probation`,
    /// `awaiting-release`, `rolling-back`); none once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub savepoint: Option<String>,
    pub downtime_ms: Option<f64>,
    pub error: Option<String>,
    /// A migrating upgrade: how the new version's state was made ready
    /// before the stop (restored and migrated on standby, then caught up
    /// with the job's checkpoints), in a line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
    /// What a rollback runs again, kept from the old version's stop until
    /// the upgrade ended: a host that restarts meanwhile resumes it from
    /// the upgrade's savepoint (the new version never passed probation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_to: Option<RollbackTo>,
}

/// The version an upgrade replaced, as a rollback runs it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RollbackTo {
    pub spec: JobSpec,
    pub allow_non_restored_state: bool,
}

/// Everything the host keeps about a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobRecord {
    pub format: u32,
    pub id: String,
    pub name: String,
    pub submitted_ms: u64,
    pub lifecycle: Lifecycle,
    pub spec: JobSpec,
    /// Where the first run restored from (`weir run -s` against a host).
    pub initial_restore: Option<String>,
    pub allow_non_restored_state: bool,
    pub runs: Vec<RunRecord>,
    pub restarts: Vec<RestartRecord>,
    /// The newest failure, naming the operator.
    pub last_error: Option<String>,
    pub operations: Vec<Operation>,
    pub savepoints: Vec<SavepointRecord>,
    pub upgrades: Vec<UpgradeRecord>,
    /// Set when the host stopped the job with this savepoint as it shut
    /// down: its next start resumes the job from it.
    pub resume_from: Option<String>,
    /// Every directory a savepoint of this job was asked into, recorded
    /// before its barrier went out: a host killed between a savepoint's
    /// completion (its output committed) and its record finds it there.
    #[serde(default)]
    pub savepoint_targets: Vec<String>,
    /// A movable job of a cluster: the generation of its assignment this
    /// host runs it under (its commits are fenced by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The job this one was forked from (`weir fork`), and the savepoint
    /// it started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<ForkRecord>,
    /// The forks started from this job's savepoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forks: Vec<ForkRecord>,
}

/// One fork: the other job, and the savepoint the fork started from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ForkRecord {
    pub job: String,
    pub savepoint: String,
    pub time_ms: u64,
}

impl JobRecord {
    /// A new job's record: no runs, operations or savepoints yet.
    pub fn new(
        id: String,
        name: String,
        submitted_ms: u64,
        lifecycle: Lifecycle,
        spec: JobSpec,
    ) -> Self {
        Self {
            format: RECORD_FORMAT,
            id,
            name,
            submitted_ms,
            lifecycle,
            spec,
            initial_restore: None,
            allow_non_restored_state: false,
            runs: Vec::new(),
            restarts: Vec::new(),
            last_error: None,
            operations: Vec::new(),
            savepoints: Vec::new(),
            upgrades: Vec::new(),
            resume_from: None,
            savepoint_targets: Vec::new(),
            generation: None,
            forked_from: None,
            forks: Vec::new(),
        }
    }

    pub fn status(&self) -> JobStatus {
        self.lifecycle.status()
    }

    pub fn operation_mut(&mut self, id: &str) -> Option<&mut Operation> {
        self.operations.iter_mut().find(|o| o.id == id)
    }

    /// The upgrade that operation `operation` is.
    pub fn upgrade_mut(&mut self, operation: &str) -> Option<&mut UpgradeRecord> {
        self.upgrades
            .iter_mut()
            .rev()
            .find(|u| u.operation == operation)
    }

    /// Remembers a savepoint target before its barrier goes out (see
    /// [`JobRecord::savepoint_targets`]).
    pub fn note_savepoint_target(&mut self, target: &Location) {
        let text = target.to_string();
        if !self.savepoint_targets.contains(&text) {
            self.savepoint_targets.push(text);
        }
    }

    /// The operation still running, if any (one at a time per job).
    pub fn running_operation(&self) -> Option<&Operation> {
        self.operations
            .iter()
            .find(|o| o.status == OperationStatus::Running)
    }
}

/// A job in the list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobSummary {
    pub id: String,
    pub name: String,
    pub status: JobStatus,
    pub submitted_ms: u64,
    /// Time of the newest status change.
    pub since_ms: u64,
    /// `uid=name@version` of each operator.
    pub plugins: Vec<String>,
    /// In a cluster: the id of the host that runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// In a cluster: whether that host is a live member (if not, the
    /// status is the last one it wrote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_live: Option<bool>,
    /// A cluster job that runs as stages: the jobs of its stages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<String>,
}

/// A node of the running job, with its counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OperatorView {
    pub uid: String,
    /// `source`, `operator` or `sink`.
    pub role: String,
    pub plugin: Option<PluginVersion>,
    pub parallelism: u32,
    /// The uids it reads from.
    pub inputs: Vec<String>,
    pub records_in: u64,
    pub records_out: u64,
    /// Time its subtasks spent processing, waiting for input and waiting
    /// for room downstream, summed over them, since the run started.
    pub busy_ms: f64,
    pub idle_ms: f64,
    pub backpressured_ms: f64,
    /// Keys with state, by state name: the running subtasks' estimates as
    /// of their latest barrier, else as counted by the newest restore
    /// point that counts them (savepoints do); empty when neither has.
    pub state_keys: BTreeMap<String, u64>,
}

/// A completed checkpoint of the current run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckpointView {
    pub id: u64,
    pub completed_ms: u64,
    pub duration_ms: f64,
    pub alignment_ms: f64,
    pub bytes: u64,
    pub new_bytes: u64,
}

/// `GET /api/jobs/{id}`: the record and the live view of its current run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobDetail {
    pub job: JobRecord,
    pub operators: Vec<OperatorView>,
    /// Completed and failed checkpoints of the current run.
    pub checkpoints_completed: u64,
    pub checkpoints_failed: u64,
    /// The current run's newest checkpoints, oldest first.
    pub checkpoints: Vec<CheckpointView>,
    /// A cluster job that runs as stages: each stage, where it runs and
    /// how it does (the fields above add the stages up).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageView>,
}

/// A stage of a staged cluster job, in its [`JobDetail`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StageView {
    /// The uid of its stage's first node.
    pub name: String,
    /// The movable job that runs this task of the stage.
    pub job: String,
    /// Which task of its stage it is (subtask `task` of each node), of
    /// how many.
    pub task: u32,
    pub tasks: u32,
    /// The submitted job's nodes it runs.
    pub uids: Vec<String>,
    /// The host that runs it (none: not in the cluster's job directory yet).
    pub host: Option<String>,
    pub status: Option<JobStatus>,
    pub checkpoints_completed: u64,
    /// Its newest failure.
    pub last_error: Option<String>,
}
