//! The job manager: every job of the running host, by id. It accepts
//! submissions (validating the job file and resolving its plugins before
//! anything is stored), answers queries, turns operations (savepoint, stop,
//! cancel, upgrade) into persisted [`Operation`]s handed to the job's
//! driver ([`super::driver`]), resumes live jobs when the host starts, and
//! stops them when it shuts down.
//!
//! Each job's files: `jobs/<id>/job.toml` (as submitted) and
//! `jobs/<id>/job.json` (its [`JobRecord`], rewritten atomically on every
//! change).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::driver::{self, Command};
use super::lifecycle::{JobStatus, Lifecycle, TransitionError};
use super::record::*;
use super::run::RunPlan;
use super::views;
use super::{ControlError, HostContext, cluster, confine, now_ms};
use crate::dataflow::metrics::JobMetrics;
use crate::job::{JobFile, JobGraph, NodeKind, PluginResolver};
use crate::prometheus::{HostSample, JobSample};
use crate::types::Location;

/// `POST /api/jobs`: a job file to run.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubmitRequest {
    /// The job file's text (TOML).
    pub job_file: String,
    /// Its file name, for messages (`job.toml`).
    #[serde(default)]
    pub file_name: Option<String>,
    /// The directory its relative paths resolve against (absolute).
    #[schema(value_type = String, pattern = "^/")]
    pub base_dir: PathBuf,
    /// `plugin` values that are files the client uploaded first → their
    /// sha256. Other values are `NAME[@VERSION]` from the store.
    #[serde(default)]
    pub plugins: BTreeMap<String, String>,
    /// Restore from this savepoint or retained checkpoint.
    #[serde(default)]
    pub from_savepoint: Option<String>,
    #[serde(default)]
    pub allow_non_restored_state: bool,
}

/// `POST /api/jobs/{id}/upgrade`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UpgradeRequest {
    /// uid → `NAME@VERSION`, `NAME` or `sha256:<digest>` (a file the
    /// client uploaded).
    #[serde(default)]
    pub plugins: BTreeMap<String, String>,
    /// uid → new parallelism.
    #[serde(default, deserialize_with = "super::json::parallelism")]
    #[schema(schema_with = super::json::parallelism_schema)]
    pub parallelism: BTreeMap<String, u32>,
    /// A new job file (its plugins resolve as on submission).
    #[serde(default)]
    pub job_file: Option<SubmitRequest>,
    #[serde(default)]
    pub allow_non_restored_state: bool,
    /// How long the new version is on probation at most (e.g. "60s");
    /// it passes earlier once it completed `probation_checkpoints`.
    #[serde(default)]
    #[schema(
        pattern = r"^\s*[0-9]+(\.[0-9]+)?\s*[a-zA-Zµ]+(\s*[0-9]+(\.[0-9]+)?\s*[a-zA-Zµ]+)*\s*$"
    )]
    pub probation: Option<String>,
    #[serde(default, deserialize_with = "super::json::count")]
    pub probation_checkpoints: Option<u64>,
    /// The new version's commits stay held after its probation passed,
    /// until `POST …/operations/{op}/release` (or `…/roll-back`; none
    /// within the probation's length and a minute more: rolled back). A staged job's upgrade asks it of
    /// each task, so that a stage passes or rolls back as one.
    #[serde(default)]
    pub await_release: bool,
}

/// The step of an upgrade whose probation passed, its commits held until
/// it is released ([`UpgradeRequest::await_release`]).
pub(super) const AWAITING_RELEASE: &str = "awaiting-release";

/// `POST /api/jobs/{id}/operations/{op}/roll-back`: why, in a line.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RollBackRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /api/jobs/{id}/savepoints` and `/stop`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SavepointRequest {
    /// Where the savepoint directory is created (default: the data dir's
    /// `savepoints/`).
    #[serde(default)]
    pub target_dir: Option<String>,
    /// Stop: advance the watermark to the end first.
    #[serde(default)]
    pub drain: bool,
    /// Stop (a stage of a staged job, as the staged job's stop asks): the
    /// sources send the savepoint's barrier only once every stage writing
    /// to this one has stopped and all it wrote was read, so the stages'
    /// savepoints form one cut.
    #[serde(default)]
    pub aligned: bool,
    /// Savepoint (a task of a staged job, as the staged job's savepoint
    /// asks): the name of the cut its savepoint is part of. The sources
    /// reading an exchange send the barrier once every writer marked the
    /// cut; the exchanges' writers mark it after this savepoint's epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<String>,
}

/// A job of the host: its record (persisted on every change), the live
/// view of its current run, and its driver's command channel.
pub struct JobHandle {
    pub id: String,
    record: Mutex<JobRecord>,
    pub(super) live: Mutex<Option<driver::Live>>,
    /// Restarts and failures across the job's runs (for `/metrics`).
    pub(super) metrics: Arc<JobMetrics>,
    commands: mpsc::UnboundedSender<Command>,
    pub(super) ctx: Arc<HostContext>,
    /// Its driver runs (a record loaded but not resumed has none).
    driven: std::sync::atomic::AtomicBool,
    /// A verdict on an upgrade awaiting release, until its probation
    /// step takes it.
    verdict: Mutex<Option<Verdict>>,
}

/// What a staged job's driver says of a task's upgrade on probation
/// (`POST …/operations/{op}/release` or `…/roll-back`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Verdict {
    pub operation: String,
    /// Release the held commits (else roll back).
    pub pass: bool,
    /// Why it is rolled back, in a line.
    pub reason: String,
}

impl std::fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobHandle").field("id", &self.id).finish()
    }
}

impl JobHandle {
    /// A copy of the record.
    pub fn record(&self) -> JobRecord {
        self.record.lock().expect("not poisoned").clone()
    }

    /// Changes the record and persists it.
    pub fn update<T>(&self, change: impl FnOnce(&mut JobRecord) -> T) -> T {
        let mut record = self.record.lock().expect("not poisoned");
        let result = change(&mut record);
        persist(&self.ctx, &record);
        result
    }

    /// Moves the job to `to` if the state machine allows it, and persists
    /// the change; a refusal changes nothing and is the caller's to handle.
    #[must_use = "a refused transition is an error the caller must handle"]
    pub fn transition(
        &self,
        to: JobStatus,
        cause: impl Into<String>,
    ) -> Result<(), TransitionError> {
        self.update(|record| record.lifecycle.transition(to, now_ms(), cause))
    }

    /// Moves the job from `expected` to `to` (checked and changed under
    /// the record's lock), and persists the change.
    #[must_use = "a refused transition is an error the caller must handle"]
    pub fn transition_from(
        &self,
        expected: JobStatus,
        to: JobStatus,
        cause: impl Into<String>,
    ) -> Result<(), TransitionError> {
        self.update(|record| {
            record
                .lifecycle
                .transition_from(expected, to, now_ms(), cause)
        })
    }

    pub fn status(&self) -> JobStatus {
        self.record.lock().expect("not poisoned").status()
    }

    /// The verdict on upgrade `operation`, if one came (taken once).
    pub(super) fn take_verdict(&self, operation: &str) -> Option<Verdict> {
        let mut verdict = self.verdict.lock().expect("not poisoned");
        match verdict.as_ref() {
            Some(v) if v.operation == operation => verdict.take(),
            _ => None,
        }
    }

    /// Finishes an operation.
    pub fn finish_operation(&self, id: &str, change: impl FnOnce(&mut Operation)) {
        self.update(|record| {
            if let Some(operation) = record.operation_mut(id) {
                change(operation);
                operation.finished_ms = Some(now_ms());
                if operation.status == OperationStatus::Running {
                    operation.status = OperationStatus::Succeeded;
                }
            }
        });
    }
}

fn persist(ctx: &HostContext, record: &JobRecord) {
    let path = Path::new("jobs").join(&record.id).join("job.json");
    let result = serde_json::to_vec_pretty(record)
        .map_err(|e| e.to_string())
        .and_then(|bytes| ctx.data.write(&path, &bytes).map_err(|e| e.to_string()));
    if let Err(error) = result {
        tracing::error!(job = %record.id, %error, "cannot persist the job record");
    }
}

/// Every job of the host.
pub struct JobManager {
    ctx: Arc<HostContext>,
    jobs: Mutex<BTreeMap<String, Arc<JobHandle>>>,
    drivers: tokio::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for JobManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobManager").finish_non_exhaustive()
    }
}

impl JobManager {
    pub fn new(ctx: Arc<HostContext>) -> Self {
        Self {
            ctx,
            jobs: Mutex::default(),
            drivers: tokio::sync::Mutex::default(),
        }
    }

    /// The host this manager runs jobs for.
    pub(super) fn context(&self) -> Arc<HostContext> {
        self.ctx.clone()
    }

    pub(super) fn get(&self, id: &str) -> Result<Arc<JobHandle>, ControlError> {
        self.jobs
            .lock()
            .expect("not poisoned")
            .get(id)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("no job {id} on this host")))
    }

    /// Loads every job record of the data dir; jobs that were live when
    /// the host stopped (or crashed) resume from their newest completed
    /// checkpoint (or the savepoint the host stopped them with).
    pub async fn resume_all(self: &Arc<Self>) -> Result<usize, ControlError> {
        let mut resumed = 0;
        for id in self.ctx.data.list("jobs").map_err(internal)? {
            let path = Path::new("jobs").join(&id).join("job.json");
            let Some(bytes) = self.ctx.data.read(&path).map_err(internal)? else {
                continue;
            };
            let record: JobRecord = match serde_json::from_slice(&bytes) {
                Ok(record) => record,
                Err(error) => {
                    tracing::error!(file = %self.ctx.data.join(&path).display(), %error, "skipping a job record that cannot be read");
                    continue;
                }
            };
            if record.format != RECORD_FORMAT {
                tracing::error!(file = %self.ctx.data.join(&path).display(), format = record.format, "skipping a job record of an unknown format");
                continue;
            }
            // A movable cluster job resumes only if the cluster still
            // assigns it here (the assignments' follower adopts it).
            let movable = record.generation.is_some() && self.ctx.cluster.get().is_some();
            let live = (!record.status().is_terminal() || record.resume_from.is_some()) && !movable;
            let entry = self.insert(record);
            if live {
                let plan = driver::resume_plan(&self.ctx, &entry.0);
                self.spawn_driver(entry, plan).await;
                resumed += 1;
            }
        }
        Ok(resumed)
    }

    fn insert(&self, record: JobRecord) -> (Arc<JobHandle>, mpsc::UnboundedReceiver<Command>) {
        let (commands, receiver) = mpsc::unbounded_channel();
        let handle = Arc::new(JobHandle {
            id: record.id.clone(),
            record: Mutex::new(record),
            live: Mutex::default(),
            metrics: Arc::default(),
            commands,
            ctx: self.ctx.clone(),
            driven: Default::default(),
            verdict: Mutex::default(),
        });
        self.jobs
            .lock()
            .expect("not poisoned")
            .insert(handle.id.clone(), handle.clone());
        (handle, receiver)
    }

    async fn spawn_driver(
        &self,
        (handle, commands): (Arc<JobHandle>, mpsc::UnboundedReceiver<Command>),
        plan: Option<RunPlan>,
    ) {
        let span = tracing::info_span!("job", id = %handle.id, name = %handle.record().name);
        handle
            .driven
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let ctx = self.ctx.clone();
        let task = tokio::spawn(
            async move {
                driver::drive(ctx, handle.clone(), commands, plan).await;
                handle
                    .driven
                    .store(false, std::sync::atomic::Ordering::SeqCst);
            }
            .instrument(span),
        );
        self.drivers.lock().await.push(task);
    }

    /// Validates a job file, resolves its plugins, stores it and starts it.
    pub async fn submit(&self, request: SubmitRequest) -> Result<JobRecord, ControlError> {
        let spec = resolve_spec(&self.ctx, &request)?;
        self.start(
            spec,
            request.from_savepoint,
            request.allow_non_restored_state,
            |_| {},
        )
        .await
    }

    /// Stores and starts a job running `spec` (restoring `from_savepoint`
    /// if given); `also` completes its record before it is stored (a
    /// fork's lineage).
    pub(super) async fn start(
        &self,
        spec: JobSpec,
        from_savepoint: Option<String>,
        allow_non_restored_state: bool,
        also: impl FnOnce(&mut JobRecord),
    ) -> Result<JobRecord, ControlError> {
        let id = crate::runner::new_job_id();
        if let Some((name, stages)) = self.cut(&id, &spec).await? {
            return self
                .start_staged(
                    id,
                    name,
                    spec,
                    stages,
                    from_savepoint,
                    allow_non_restored_state,
                )
                .await;
        }
        self.start_as(id, spec, from_savepoint, allow_non_restored_state, also)
            .await
    }

    /// The name of a movable job of a cluster and the stages it is cut
    /// into at its `key` and `rebalance` edges (none: not such a job, or it
    /// has no such edge).
    async fn cut(
        &self,
        id: &str,
        spec: &JobSpec,
    ) -> Result<Option<(String, Vec<crate::job::stages::Stage>)>, ControlError> {
        let path = spec.base_dir.join(&spec.file_name);
        let Some(cluster) = self.ctx.cluster.get().filter(|c| {
            c.assignments().is_some()
                && c.job_storage(id).is_some()
                && JobFile::parse(&spec.job_file, &path)
                    .is_ok_and(|file| cluster::assign::movable(&file))
        }) else {
            return Ok(None);
        };
        let ctx = self.ctx.clone();
        let check = spec.clone();
        let graph = tokio::task::spawn_blocking(move || build_graph(&ctx, &check))
            .await
            .map_err(internal)??;
        let stages = crate::job::stages::cut(
            &spec.job_file,
            &path,
            &graph,
            id,
            cluster.nats_url(),
            cluster.replicas(),
        )
        .map_err(bad_request)?;
        Ok((!stages.is_empty()).then_some((graph.name, stages)))
    }

    /// Starts a job cut into `stages`: each stage a movable job of its own
    /// (`<id>-<n>`), placed on the live hosts with the fewest jobs; the
    /// job's [`StagedJob`](cluster::staged::StagedJob) ties them together.
    /// Every stage is checked before anything is stored.
    async fn start_staged(
        &self,
        id: String,
        name: String,
        spec: JobSpec,
        stages: Vec<crate::job::stages::Stage>,
        from_savepoint: Option<String>,
        allow_non_restored_state: bool,
    ) -> Result<JobRecord, ControlError> {
        let cluster = self.ctx.cluster.get().expect("cut: a cluster job");
        let assignments = cluster.assignments().expect("cut: with assignments");
        let names: Vec<String> = stages.iter().map(|s| s.name.clone()).collect();
        // From a savepoint, each stage restores its own uids and leaves the
        // others' to their stages: what none restores is checked here.
        let allow_each = match &from_savepoint {
            Some(savepoint) => {
                check_staged_restore(&spec, &stages, savepoint, allow_non_restored_state).await?;
                true
            }
            None => allow_non_restored_state,
        };
        // Each stage of parallelism p runs as p tasks (job `<id>-<stage>-<i>`).
        let mut tasks = Vec::new();
        for (n, stage) in stages.iter().enumerate() {
            let stage_spec = JobSpec {
                job_file: stage.job_file.clone(),
                ..spec.clone()
            };
            let ctx = self.ctx.clone();
            let check = stage_spec.clone();
            let graph = tokio::task::spawn_blocking(move || build_graph(&ctx, &check))
                .await
                .map_err(internal)??;
            let parallelism = graph.nodes.first().map_or(1, |node| node.parallelism);
            for task in 0..parallelism {
                let job = format!("{id}-{n}-{task}");
                let task_spec = JobSpec {
                    storage: cluster.job_storage(&job),
                    task: Some(task),
                    ..stage_spec.clone()
                };
                let reference = cluster::staged::StageRef {
                    name: stage.name.clone(),
                    job: job.clone(),
                    task,
                    tasks: parallelism,
                    uids: stage.uids.clone(),
                    exchanges: stage.exchanges.clone(),
                };
                tasks.push((reference, graph.name.clone(), task_spec));
            }
        }
        let unavailable = |e: cluster::ClusterError| ControlError::Unavailable(e.to_string());
        let jobs: Vec<String> = tasks.iter().map(|(r, _, _)| r.job.clone()).collect();
        let hosts = assignments.place(&jobs, &[]).await.map_err(unavailable)?;
        let now = now_ms();
        let staged = cluster::staged::StagedJob {
            job: id.clone(),
            name: name.clone(),
            submitted_ms: now,
            spec: spec.clone(),
            stages: tasks
                .iter()
                .map(|(reference, _, _)| reference.clone())
                .collect(),
            operations: Vec::new(),
            exchanges_deleted: false,
        };
        assignments
            .staged()
            .create(&staged)
            .await
            .map_err(unavailable)?;
        for ((reference, stage_name, task_spec), host) in tasks.into_iter().zip(hosts) {
            let job = reference.job;
            tracing::info!(job = %id, task = %job, stage = %reference.name, %host, "placing a task of the job");
            if host == assignments.host() {
                self.start_as(job, task_spec, from_savepoint.clone(), allow_each, |_| {})
                    .await?;
                continue;
            }
            assignments
                .create(&cluster::assign::Assignment {
                    job,
                    name: stage_name,
                    submitted_ms: now,
                    spec: task_spec,
                    allow_non_restored_state: allow_each,
                    initial_restore: from_savepoint.clone(),
                    host,
                    generation: 1,
                    restore: None,
                    ended: false,
                    reason: format!(
                        "task {} of stage {} of job {id}, placed at submission",
                        reference.task, reference.name
                    ),
                })
                .await
                .map_err(unavailable)?;
        }
        Ok(JobRecord::new(
            id,
            name,
            now,
            Lifecycle::new(
                now,
                format!("submitted: runs as stages {}", names.join(", ")),
            ),
            spec,
        ))
    }

    /// [`Self::start`] of a job that runs whole, as job `id`.
    async fn start_as(
        &self,
        id: String,
        mut spec: JobSpec,
        from_savepoint: Option<String>,
        allow_non_restored_state: bool,
        also: impl FnOnce(&mut JobRecord),
    ) -> Result<JobRecord, ControlError> {
        // A movable job of a cluster with object storage keeps its
        // checkpoints there, and is assigned to this host (generation 1).
        let cluster = self.ctx.cluster.get().filter(|_| {
            JobFile::parse(&spec.job_file, &spec.base_dir.join(&spec.file_name))
                .is_ok_and(|file| cluster::assign::movable(&file))
        });
        let assignments = cluster.and_then(|c| Some((c.assignments()?, c.job_storage(&id)?)));
        if let Some((_, storage)) = &assignments {
            spec.storage = Some(storage.clone());
        }
        let ctx = self.ctx.clone();
        let check_spec = spec.clone();
        let from = from_savepoint.clone();
        let (graph, initial_restore) = tokio::task::spawn_blocking(move || {
            build_graph_restoring(&ctx, &check_spec, from.as_deref())
        })
        .await
        .map_err(internal)??;
        let now = now_ms();
        let mut record = JobRecord {
            initial_restore,
            allow_non_restored_state,
            generation: assignments.as_ref().map(|_| 1),
            ..JobRecord::new(
                id.clone(),
                graph.name.clone(),
                now,
                Lifecycle::new(now, "submitted"),
                spec,
            )
        };
        also(&mut record);
        if let Some((assignments, _)) = &assignments {
            assignments
                .create(&cluster::assign::Assignment {
                    job: id.clone(),
                    name: record.name.clone(),
                    submitted_ms: now,
                    spec: record.spec.clone(),
                    allow_non_restored_state: record.allow_non_restored_state,
                    initial_restore: record.initial_restore.clone(),
                    host: assignments.host().to_string(),
                    generation: 1,
                    restore: None,
                    ended: false,
                    reason: "submitted".to_string(),
                })
                .await
                .map_err(|e| ControlError::Unavailable(e.to_string()))?;
        }
        let dir = Path::new("jobs").join(&id);
        self.ctx.data.create_dir_all(&dir).map_err(internal)?;
        self.ctx
            .data
            .write(dir.join("job.toml"), record.spec.job_file.as_bytes())
            .map_err(internal)?;
        persist(&self.ctx, &record);
        let plan = Some(driver::first_plan(&record));
        let entry = self.insert(record.clone());
        self.spawn_driver(entry, plan).await;
        Ok(record)
    }

    /// A snapshot of every job's handle (the lock is not held after).
    fn handles(&self) -> Vec<Arc<JobHandle>> {
        self.jobs
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// The Prometheus exposition of every job and the host.
    pub fn prometheus(&self) -> String {
        let handles = self.handles();
        let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
        let mut views = Vec::new();
        for handle in &handles {
            let record = handle.record();
            *by_status.entry(record.status().to_string()).or_default() += 1;
            let count = |outcome: &str| {
                record
                    .upgrades
                    .iter()
                    .filter(|u| u.outcome == outcome)
                    .count() as u64
            };
            let (upgrades, rollbacks) = (count("upgraded"), count("rolled-back"));
            let live = handle.live.lock().expect("not poisoned");
            let (nodes, checkpoints) = live
                .as_ref()
                .map(|l| (l.metrics.clone(), l.checkpoint_metrics.clone()))
                .unwrap_or_default();
            views.push((handle, nodes, checkpoints, upgrades, rollbacks));
        }
        let samples: Vec<JobSample<'_>> = views
            .iter()
            .map(
                |(handle, nodes, checkpoints, upgrades, rollbacks)| JobSample {
                    job: &handle.id,
                    nodes,
                    checkpoints: checkpoints.as_deref(),
                    metrics: &handle.metrics,
                    upgrades: *upgrades,
                    rollbacks: *rollbacks,
                },
            )
            .collect();
        let host = HostSample {
            jobs: by_status,
            plugins: self.ctx.store.list().len() as u64,
        };
        crate::prometheus::encode_samples(Some(&host), &samples)
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<JobSummary> {
        let jobs = self.handles();
        let mut list: Vec<JobSummary> = jobs
            .iter()
            .map(|handle| {
                let record = handle.record();
                JobSummary {
                    plugins: views::plugin_versions(&self.ctx, &record.spec)
                        .into_iter()
                        .map(|(uid, p)| format!("{uid}={}", p.plugin))
                        .collect(),
                    since_ms: record
                        .lifecycle
                        .history()
                        .last()
                        .map_or(record.submitted_ms, |t| t.time_ms),
                    status: record.status(),
                    id: record.id,
                    name: record.name,
                    submitted_ms: record.submitted_ms,
                    host: None,
                    host_live: None,
                    stages: Vec::new(),
                }
            })
            .collect();
        list.sort_by_key(|job| std::cmp::Reverse(job.submitted_ms));
        list
    }

    /// This host's jobs and how many of them run: what a cluster member
    /// reports as its load.
    pub fn load(&self) -> (usize, usize) {
        let list = self.list();
        let running = list
            .iter()
            .filter(|j| j.status == super::lifecycle::JobStatus::Running)
            .count();
        (list.len(), running)
    }

    /// Whether this host has job `id`.
    pub fn contains(&self, id: &str) -> bool {
        self.get(id).is_ok()
    }

    pub fn detail(&self, id: &str) -> Result<JobDetail, ControlError> {
        let handle = self.get(id)?;
        Ok(views::detail(&self.ctx, &handle))
    }

    pub fn operation(&self, id: &str, operation: &str) -> Result<Operation, ControlError> {
        let record = self.get(id)?.record();
        record
            .operations
            .iter()
            .find(|o| o.id == operation)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("job {id} has no operation {operation}")))
    }

    /// Releases (`pass`) or rolls back upgrade `operation` of job `id`,
    /// asked to await release: the operation as it stands.
    pub fn verdict(
        &self,
        id: &str,
        operation: &str,
        pass: bool,
        reason: Option<String>,
    ) -> Result<Operation, ControlError> {
        let handle = self.get(id)?;
        let record = handle.record();
        let found = self.operation(id, operation)?;
        let upgrade = record
            .upgrades
            .iter()
            .find(|u| u.operation == operation)
            .ok_or_else(|| {
                ControlError::Conflict(format!(
                    "operation {operation} of job {id} is not an upgrade"
                ))
            })?;
        let step = upgrade.step.as_deref();
        // A roll-back is taken at any step before the new version's own
        // roll-back: before the stop the upgrade ends there; after it,
        // once the new version restored, without a probation.
        let ready = match pass {
            true => step == Some(AWAITING_RELEASE),
            false => step.is_some_and(|s| s != "rolling-back"),
        };
        if !ready {
            return Err(ControlError::Conflict(format!(
                "upgrade {operation} of job {id} is {}: it can be {} only {}",
                step.map_or_else(
                    || format!("over ({})", upgrade.outcome),
                    |s| format!("at step `{s}`")
                ),
                if pass { "released" } else { "rolled back" },
                if pass {
                    "once its probation passed (step `awaiting-release`)"
                } else {
                    "while it is under way"
                }
            )));
        }
        let reason = reason.unwrap_or_else(|| "asked to roll back".to_string());
        *handle.verdict.lock().expect("not poisoned") = Some(Verdict {
            operation: operation.to_string(),
            pass,
            reason,
        });
        Ok(found)
    }

    pub fn savepoints(&self, id: &str) -> Result<Vec<SavepointRecord>, ControlError> {
        Ok(self.get(id)?.record().savepoints)
    }

    /// The live jobs using each plugin digest.
    pub fn users(&self) -> HashMap<String, Vec<String>> {
        let jobs = self.handles();
        let mut users: HashMap<String, Vec<String>> = HashMap::new();
        for handle in jobs {
            let record = handle.record();
            if record.status().is_terminal() {
                continue;
            }
            for version in views::plugin_versions(&self.ctx, &record.spec).into_values() {
                let entry = users.entry(version.digest).or_default();
                if !entry.contains(&record.id) {
                    entry.push(record.id.clone());
                }
            }
        }
        users
    }

    /// The live jobs that run the plugin `digest`.
    pub fn users_of(&self, digest: &str) -> Vec<String> {
        self.users().remove(digest).unwrap_or_default()
    }

    /// Records a new operation and hands it to the job's driver. 409 while
    /// another operation runs or the job is not running.
    fn start_operation(
        &self,
        id: &str,
        kind: OperationKind,
        command: impl FnOnce(String) -> Command,
    ) -> Result<Operation, ControlError> {
        let handle = self.get(id)?;
        let operation = handle.update(|record| {
            let status = record.status();
            if !status.accepts(kind) {
                return Err(ControlError::Conflict(format!(
                    "job {id} is {status}: {} is not possible now",
                    kind.article_name()
                )));
            }
            if let Some(running) = record.running_operation()
                && !kind.supersedes(running.kind)
            {
                return Err(ControlError::Conflict(format!(
                    "job {id} is busy with {} (operation {}); wait for it to finish",
                    running.kind.article_name(),
                    running.id
                )));
            }
            let operation = Operation {
                id: crate::checkpoint::storage::random_hex(8),
                kind,
                status: OperationStatus::Running,
                requested_ms: now_ms(),
                finished_ms: None,
                savepoint: None,
                downtime_ms: None,
                outcome: None,
                error: None,
            };
            record.operations.push(operation.clone());
            Ok(operation)
        })?;
        if handle.commands.send(command(operation.id.clone())).is_err() {
            handle.finish_operation(&operation.id, |o| {
                o.status = OperationStatus::Failed;
                o.error = Some("the job's driver has stopped".to_string());
            });
            return Err(ControlError::Conflict(format!("job {id} is not running")));
        }
        Ok(operation)
    }

    /// A savepoint's target: the request's `target_dir` (object storage,
    /// or a directory inside the job roots), else the job's default.
    fn target(&self, id: &str, dir: Option<&str>) -> Result<Location, ControlError> {
        match dir {
            Some(text) => match Location::parse(text)
                .map_err(|e| ControlError::BadRequest(format!("target_dir: {e}")))?
            {
                Location::Local(_) if self.get(id)?.record().spec.storage.is_some() => {
                    Err(ControlError::BadRequest(format!(
                        "target_dir {text}: job {id} can move between the cluster's hosts, and the host that resumes it must read its savepoints: give an s3:// target_dir, or none for {}",
                        default_target(&self.ctx, &self.get(id)?.record())
                    )))
                }
                Location::Local(path) => confine::confine_path(&self.ctx, "target_dir", &path)
                    .map(Location::Local)
                    .map_err(ControlError::BadRequest),
                remote => Ok(remote),
            },
            None => Ok(default_target(&self.ctx, &self.get(id)?.record())),
        }
    }

    pub fn savepoint(
        &self,
        id: &str,
        request: &SavepointRequest,
    ) -> Result<Operation, ControlError> {
        let target = self.target(id, request.target_dir.as_deref())?;
        let cut = request.cut.clone();
        self.start_operation(id, OperationKind::Savepoint, |operation| {
            Command::Savepoint {
                operation,
                target,
                cut,
            }
        })
    }

    pub fn stop(&self, id: &str, request: &SavepointRequest) -> Result<Operation, ControlError> {
        let target = self.target(id, request.target_dir.as_deref())?;
        let (drain, aligned) = (request.drain, request.aligned);
        if drain && aligned {
            return Err(ControlError::BadRequest(
                "drain and aligned: an aligned stop cannot drain (the end of input it sends would end the stages downstream)".to_string(),
            ));
        }
        self.start_operation(id, OperationKind::Stop, |operation| Command::Stop {
            operation,
            target,
            drain,
            aligned,
        })
    }

    pub fn cancel(&self, id: &str) -> Result<Operation, ControlError> {
        self.start_operation(id, OperationKind::Cancel, |operation| Command::Cancel {
            operation,
        })
    }

    /// Checks the request's shape (uids, parallelism, plugins exist), then
    /// hands it to the driver, which checks it against the newest
    /// checkpoint before anything stops.
    pub fn upgrade(&self, id: &str, request: UpgradeRequest) -> Result<Operation, ControlError> {
        let handle = self.get(id)?;
        let current = handle.record().spec;
        let mut spec = match &request.job_file {
            Some(file) => JobSpec {
                storage: current.storage.clone(),
                ..resolve_spec(&self.ctx, file)?
            },
            None => current.clone(),
        };
        if request.plugins.is_empty()
            && request.parallelism.is_empty()
            && request.job_file.is_none()
        {
            return Err(ControlError::BadRequest(
                "an upgrade needs --plugin UID=..., --parallelism UID=N or --job-file".to_string(),
            ));
        }
        let graph = build_graph(&self.ctx, &spec)?;
        let mut problems = Vec::new();
        for (uid, reference) in &request.plugins {
            match graph.node(uid).map(|n| &n.kind) {
                Some(NodeKind::Operator(_)) => match self.ctx.store.resolve(reference) {
                    Ok(stored) => {
                        spec.overrides.insert(uid.clone(), stored.digest);
                    }
                    Err(error) => problems.push(format!("--plugin {uid}: {error}")),
                },
                Some(_) => problems.push(format!("--plugin {uid}: `{uid}` is not an operator")),
                None => problems.push(format!("--plugin {uid}: the job has no uid `{uid}`")),
            }
        }
        for (uid, parallelism) in &request.parallelism {
            if graph.node(uid).is_none() {
                problems.push(format!("--parallelism {uid}: the job has no uid `{uid}`"));
            } else if *parallelism == 0 || *parallelism > graph.max_parallelism {
                problems.push(format!(
                    "--parallelism {uid}={parallelism}: must be between 1 and max_parallelism ({})",
                    graph.max_parallelism
                ));
            } else {
                spec.parallelism.insert(uid.clone(), *parallelism);
            }
        }
        let probation = match &request.probation {
            Some(text) => Some(humantime::parse_duration(text).map_err(|e| {
                ControlError::BadRequest(format!("probation {text:?}: {e} (e.g. \"30s\")"))
            })?),
            None => None,
        };
        if !problems.is_empty() {
            return Err(ControlError::BadRequest(problems.join("; ")));
        }
        if spec == current {
            return Err(ControlError::BadRequest(format!(
                "the upgrade changes nothing: job {id} already runs these plugins and parallelism"
            )));
        }
        let upgrade = super::upgrade::Upgrade {
            spec,
            allow_non_restored_state: request.allow_non_restored_state,
            probation: probation.unwrap_or(self.ctx.settings.probation),
            probation_checkpoints: request
                .probation_checkpoints
                .unwrap_or(self.ctx.settings.probation_checkpoints),
            await_release: request.await_release,
        };
        self.start_operation(id, OperationKind::Upgrade, |operation| Command::Upgrade {
            operation,
            upgrade: Box::new(upgrade),
        })
    }

    /// The jobs as the cluster's assignments follower compares them.
    fn local_jobs(&self) -> Vec<cluster::assign::LocalJob> {
        self.handles()
            .iter()
            .map(|handle| {
                let record = handle.record();
                cluster::assign::LocalJob {
                    id: record.id.clone(),
                    generation: record.generation,
                    driven: handle.driven.load(std::sync::atomic::Ordering::SeqCst),
                    ended: record.status().is_terminal() && record.resume_from.is_none(),
                }
            })
            .collect()
    }

    /// Starts a movable job the cluster assigned to this host, from the
    /// restore point its previous owner committed last. A record of it
    /// this host kept (it ran the job before a restart) keeps its history.
    async fn adopt(&self, assignment: cluster::assign::Assignment) -> Result<(), ControlError> {
        let existing = self.get(&assignment.job).ok();
        if let Some(handle) = &existing
            && handle.driven.load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(ControlError::Conflict(format!(
                "job {} still runs here under generation {:?}",
                assignment.job,
                handle.record().generation
            )));
        }
        let kept = existing
            .map(|h| h.record())
            .filter(|r| !r.status().is_terminal());
        let now = now_ms();
        let restore = assignment
            .restore
            .clone()
            .or_else(|| assignment.initial_restore.clone());
        let from = restore
            .as_deref()
            .unwrap_or("the beginning (no checkpoint)");
        let cause = format!("{}: resuming from {from}", assignment.reason);
        let mut record = match kept {
            Some(mut record) => {
                record.spec = assignment.spec.clone();
                record.generation = Some(assignment.generation);
                record.resume_from = None;
                record
                    .lifecycle
                    .transition(JobStatus::Restarting, now, cause.clone())
                    .map_err(internal)?;
                record
            }
            None => JobRecord {
                initial_restore: assignment.initial_restore.clone(),
                allow_non_restored_state: assignment.allow_non_restored_state,
                generation: Some(assignment.generation),
                ..JobRecord::new(
                    assignment.job.clone(),
                    assignment.name.clone(),
                    assignment.submitted_ms,
                    Lifecycle::new(now, cause.clone()),
                    assignment.spec.clone(),
                )
            },
        };
        record.last_error = None;
        let dir = Path::new("jobs").join(&record.id);
        self.ctx.data.create_dir_all(&dir).map_err(internal)?;
        self.ctx
            .data
            .write(dir.join("job.toml"), record.spec.job_file.as_bytes())
            .map_err(internal)?;
        persist(&self.ctx, &record);
        let plan = RunPlan::new(
            record.spec.clone(),
            restore.as_deref().map(driver::recorded_location),
            record.allow_non_restored_state,
            assignment.reason.clone(),
        );
        let entry = self.insert(record);
        self.spawn_driver(entry, Some(plan)).await;
        Ok(())
    }

    /// Ends a job that runs elsewhere now: cancelled if it runs (its
    /// commits are fenced already; the cancel discards what it holds),
    /// then forgotten with its files.
    async fn release(&self, id: &str, reason: &str) {
        let Ok(handle) = self.get(id) else { return };
        handle.update(|r| r.last_error = Some(reason.to_string()));
        if handle.driven.load(std::sync::atomic::Ordering::SeqCst) && !handle.status().is_terminal()
        {
            let _ = self.cancel(id);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while handle.driven.load(std::sync::atomic::Ordering::SeqCst)
                && !handle.status().is_terminal()
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let removed = {
            let mut jobs = self.jobs.lock().expect("not poisoned");
            match jobs.get(id) {
                Some(current) if Arc::ptr_eq(current, &handle) => jobs.remove(id).is_some(),
                _ => false,
            }
        };
        if removed {
            let dir = self.ctx.data.join(Path::new("jobs").join(id));
            if let Err(error) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(job = %id, dir = %dir.display(), %error, "cannot remove a released job's files");
            }
            tracing::info!(job = %id, %reason, "released the job: it runs on another host");
        }
    }

    /// Stops every live job (with a savepoint, or by cancelling it) and
    /// waits for the drivers.
    pub async fn shutdown(&self, with_savepoint: bool) {
        let jobs: Vec<_> = self
            .jobs
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect();
        let mut waits = Vec::new();
        for handle in jobs {
            let (done, wait) = oneshot::channel();
            if handle
                .commands
                .send(Command::Shutdown {
                    savepoint: with_savepoint,
                    target: default_target(&self.ctx, &handle.record()),
                    done,
                })
                .is_ok()
            {
                waits.push(wait);
            }
        }
        for wait in waits {
            let _ = tokio::time::timeout(Duration::from_secs(120), wait).await;
        }
        for task in self.drivers.lock().await.drain(..) {
            task.abort();
        }
    }
}

pub(super) fn internal(error: impl std::fmt::Display) -> ControlError {
    ControlError::Internal(error.to_string())
}

/// A submission's spec: each operator's `plugin` resolved to a digest.
pub(super) fn resolve_spec(
    ctx: &HostContext,
    request: &SubmitRequest,
) -> Result<JobSpec, ControlError> {
    let path = job_path(&request.base_dir, request.file_name.as_deref());
    if !request.base_dir.is_absolute() {
        return Err(ControlError::BadRequest(format!(
            "base_dir {} must be absolute",
            request.base_dir.display()
        )));
    }
    let file = JobFile::parse(&request.job_file, &path).map_err(bad_request)?;
    let mut resolved = BTreeMap::new();
    let mut problems = Vec::new();
    for operator in &file.operators {
        if resolved.contains_key(&operator.plugin) {
            continue;
        }
        let found = match request.plugins.get(&operator.plugin) {
            Some(digest) => ctx.store.resolve(&format!("sha256:{digest}")),
            None => ctx.store.resolve(&operator.plugin),
        };
        match found {
            Ok(stored) => {
                resolved.insert(operator.plugin.clone(), stored.digest);
            }
            Err(error) => problems.push(format!("operator `{}`: {error}", operator.uid)),
        }
    }
    if !problems.is_empty() {
        return Err(ControlError::BadRequest(format!(
            "job file {} is invalid:\n{}",
            path.display(),
            problems
                .iter()
                .map(|p| format!("  - {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        )));
    }
    Ok(JobSpec {
        job_file: request.job_file.clone(),
        file_name: path.file_name().map_or_else(
            || "job.toml".to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        base_dir: request.base_dir.clone(),
        resolved,
        overrides: BTreeMap::new(),
        parallelism: BTreeMap::new(),
        storage: None,
        task: None,
    })
}

/// Where a job's savepoints go unless asked elsewhere: beside its
/// checkpoints on the cluster's storage (a movable cluster job), else the
/// data dir's `savepoints/`.
pub(super) fn default_target(ctx: &HostContext, record: &JobRecord) -> Location {
    record
        .spec
        .storage
        .as_deref()
        .and_then(|storage| Location::parse(&format!("{storage}/savepoints")).ok())
        .unwrap_or_else(|| Location::Local(ctx.data.join("savepoints")))
}

fn job_path(base_dir: &Path, file_name: Option<&str>) -> PathBuf {
    let name = file_name
        .and_then(|n| Path::new(n).file_name())
        .map(|n| n.to_owned())
        .unwrap_or_else(|| "job.toml".into());
    base_dir.join(name)
}

fn bad_request(error: impl std::fmt::Display) -> ControlError {
    ControlError::BadRequest(error.to_string())
}

/// Resolves `plugin` values through the spec's digests and the store.
struct StoreResolver<'a> {
    ctx: &'a HostContext,
    resolved: &'a BTreeMap<String, String>,
}

impl PluginResolver for StoreResolver<'_> {
    fn resolve(&self, plugin: &str, _base: &Path) -> Result<PathBuf, String> {
        let digest = match plugin.strip_prefix("sha256:") {
            Some(digest) => digest,
            None => self.resolved.get(plugin).ok_or_else(|| {
                format!("plugin {plugin} was not resolved when the job was submitted")
            })?,
        };
        let path = self.ctx.store.blob_path(digest);
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "plugin {plugin} (sha256 {digest}) is no longer in the plugin store"
            ))
        }
    }
}

/// The job graph a spec runs: the job file with the spec's upgrades
/// applied, validated, its plugins from the store, its paths inside the
/// job roots ([`confine`]), its checkpoints and working state in the data
/// dir.
pub(super) fn build_graph(ctx: &HostContext, spec: &JobSpec) -> Result<JobGraph, ControlError> {
    build_graph_restoring(ctx, spec, None).map(|(graph, _)| graph)
}

/// [`build_graph`], with a submission's `from_savepoint` checked too
/// (returned resolved).
fn build_graph_restoring(
    ctx: &HostContext,
    spec: &JobSpec,
    from_savepoint: Option<&str>,
) -> Result<(JobGraph, Option<String>), ControlError> {
    let path = spec.base_dir.join(&spec.file_name);
    let mut file = JobFile::parse(&spec.job_file, &path).map_err(bad_request)?;
    // The host's quotas where the job sets none.
    let defaults = ctx.settings.state_limits;
    if file.limits.value_bytes.is_none() {
        file.limits.value_bytes = defaults.value_bytes.map(crate::job::file::ByteSize);
    }
    if file.limits.state_bytes.is_none() {
        file.limits.state_bytes = defaults.state_bytes.map(crate::job::file::ByteSize);
    }
    for operator in &mut file.operators {
        if let Some(digest) = spec.overrides.get(&operator.uid) {
            operator.plugin = format!("sha256:{digest}");
        }
        if let Some(parallelism) = spec.parallelism.get(&operator.uid) {
            operator.parallelism = Some(*parallelism);
        }
    }
    for sink in &mut file.sinks {
        if let Some(parallelism) = spec.parallelism.get(&sink.uid) {
            sink.parallelism = Some(*parallelism);
        }
    }
    for source in &mut file.sources {
        if let Some(parallelism) = spec.parallelism.get(&source.uid) {
            source.parallelism = Some(*parallelism);
        }
    }
    let resolver = StoreResolver {
        ctx,
        resolved: &spec.resolved,
    };
    let mut placement = confine::check(ctx, &file, &spec.base_dir);
    let restore = from_savepoint.map(|from| placement.restore_point(ctx, from));
    let validated = JobGraph::validate_with(file, &path, &resolver);
    let mut graph = placement
        .apply(ctx, validated, &path)
        .map_err(bad_request)?;
    if let Some(task) = spec.task {
        graph.set_task(task).map_err(|problem| {
            bad_request(crate::job::JobError::Invalid {
                file: path.clone(),
                problems: vec![problem],
            })
        })?;
    }
    graph.checkpoint.dir = Some(match spec.storage.as_deref().map(Location::parse) {
        Some(Ok(remote)) => remote,
        _ => Location::Local(ctx.data.join("checkpoints")),
    });
    graph.state.dir = ctx.data.join("state");
    Ok((graph, restore))
}

/// Checks `savepoint` restores the staged job `spec` cut into `stages`:
/// on object storage (each stage's host reads it), no state of an
/// exchange (a stage's own savepoint: its positions are another job's
/// exchange's), and every uid with state one of the stages' unless
/// `allow_non_restored_state`. The rest (states, schemas) each stage's
/// restore checks as a job's does.
async fn check_staged_restore(
    spec: &JobSpec,
    stages: &[crate::job::stages::Stage],
    savepoint: &str,
    allow_non_restored_state: bool,
) -> Result<(), ControlError> {
    let file = spec.base_dir.join(&spec.file_name);
    let names = || {
        stages
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Ok(Location::S3(url)) = Location::parse(savepoint) else {
        return Err(ControlError::BadRequest(format!(
            "from_savepoint {savepoint}: {} runs as stages ({}) on the cluster's hosts, which each read the savepoint: give an s3:// one (a savepoint a single host took into an s3:// directory restores here too)",
            file.display(),
            names()
        )));
    };
    let metadata = crate::checkpoint::remote::metadata(&url)
        .await
        .map_err(|e| ControlError::BadRequest(format!("from_savepoint {savepoint}: {e}")))?;
    let exchanges: Vec<&str> = stages
        .iter()
        .flat_map(|s| &s.exchanges)
        .filter(|uid| metadata.operators.contains_key(uid.as_str()))
        .map(String::as_str)
        .collect();
    if !exchanges.is_empty() {
        return Err(ControlError::BadRequest(format!(
            "from_savepoint {savepoint}: it holds exchange {} of a stage (one stage's savepoint: its positions are in another job's exchange); restore the cluster savepoint that holds it, the directory its stop named",
            exchanges.join(", ")
        )));
    }
    let skipped = crate::checkpoint::restore::not_restored(
        &metadata,
        stages
            .iter()
            .flat_map(|s| s.uids.iter().map(String::as_str)),
    );
    if !skipped.is_empty() && !allow_non_restored_state {
        return Err(ControlError::BadRequest(format!(
            "from_savepoint {savepoint}: {}; start with --allow-non-restored-state (-n) to skip it",
            skipped.join("; ")
        )));
    }
    for line in &skipped {
        tracing::warn!(%savepoint, "not restored (--allow-non-restored-state): {line}");
    }
    Ok(())
}

/// The job manager as the cluster's assignments follower sees it.
pub struct ClusterOwner(pub std::sync::Weak<JobManager>);

impl cluster::assign::Owner for ClusterOwner {
    fn local_jobs(&self) -> Vec<cluster::assign::LocalJob> {
        self.0.upgrade().map(|m| m.local_jobs()).unwrap_or_default()
    }

    fn can_run(&self, spec: &JobSpec) -> Result<(), String> {
        let Some(manager) = self.0.upgrade() else {
            return Err("the host is shutting down".to_string());
        };
        let missing: Vec<&str> = spec
            .resolved
            .values()
            .chain(spec.overrides.values())
            .filter(|digest| !manager.ctx.store.blob_path(digest).is_file())
            .map(String::as_str)
            .collect();
        match missing.is_empty() {
            true => Ok(()),
            false => Err(format!(
                "plugin(s) sha256 {} not in this host's store yet",
                missing.join(", ")
            )),
        }
    }

    fn adopt(
        &self,
        assignment: cluster::assign::Assignment,
    ) -> cluster::assign::BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            match self.0.upgrade() {
                Some(manager) => manager.adopt(assignment).await.map_err(|e| e.to_string()),
                None => Err("the host is shutting down".to_string()),
            }
        })
    }

    fn release(&self, id: String, reason: String) -> cluster::assign::BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(manager) = self.0.upgrade() {
                manager.release(&id, &reason).await;
            }
        })
    }
}
