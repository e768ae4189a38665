//! The API's answers about a staged cluster job (see
//! [`cluster::staged`](super::cluster::staged)): no host runs it as one,
//! so any host answers for it by asking its tasks' hosts (each request
//! goes to the host the cluster's job directory names, as `forward` sends
//! requests about another host's job).
//!
//! - `GET /api/jobs/{id}`: the tasks' details added up — status
//!   ([`status_of`]), operators, the fewest checkpoints any task completed
//!   — and each task with its stage and host.
//! - `POST …/cancel`, `…/stop`: asked of every task; the answer is one
//!   operation whose outcome is theirs ([`outcome_of`]); a task that has
//!   ended already has nothing to do. A stop is *aligned* (each task's
//!   sources wait until the tasks writing to it stopped and all they
//!   published was read) and its savepoints go into one directory, whose
//!   `_metadata` — the **cluster savepoint**, the submitted job's operators
//!   ([`cluster_savepoint`]) — is written once they all completed: it
//!   restores on one host with `weir run -s`, or on the cluster.
//! - `POST …/upgrade` with new plugins: each task of each stage whose uids
//!   the request names is upgraded on its own — checked, stopped with a
//!   savepoint, restarted with the new plugins, on probation — and awaits
//!   release once its probation passed; a stage's tasks are released once
//!   all await it, and rolled back once one failed ([`judge`]), so a stage
//!   passes or rolls back as one, while the other stages run on untouched;
//!   the operation ends once every task's has.
//! - `weir rescale` (an upgrade asking a parallelism): one stage at a
//!   time, its tasks replaced by as many as the new parallelism asks
//!   ([`rescale`]). A stage's nodes are joined by forward edges, so they
//!   share one parallelism: `UID=N` rescales every node of UID's stage
//!   (its exchanges' sources and sinks among them); the stages upstream
//!   and downstream keep theirs (an exchange is read by key group).
//! - `POST …/savepoints`: a savepoint of every task while the job runs on,
//!   into one directory as a stop's, each task's part of one *cut*
//!   ([`savepoint`]); its `_metadata` is written as a stop's is.
//! - `GET …/operations/{op}`: that operation as its tasks' say now.
//! - forks of a staged job as a whole, and an upgrade with a new job file,
//!   are refused (409), naming its tasks' jobs, which take them one by
//!   one.

mod rescale;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::ControlError;
use super::api::FORWARDED_BY;
use super::cluster::Cluster;
use super::cluster::jobs::JobDirectory;
use super::cluster::staged::{
    StageOperation, StageRef, StageRescale, StagedJob, StagedJobs, StagedOperation,
    cluster_savepoint, outcome_of, status_of,
};
use super::jobs::{SavepointRequest, UpgradeRequest};
use super::lifecycle::{JobStatus, Lifecycle, OperationKind};
use super::record::{JobDetail, JobRecord, JobSummary, Operation, OperationStatus, StageView};
use crate::types::Location;

/// Requests to the hosts of a staged job's stages.
struct Stages<'a> {
    directory: &'a JobDirectory,
    authorization: Option<header::HeaderValue>,
}

impl Stages<'_> {
    /// `method` on `/api/jobs/<job><rest>` at the host that runs `job`:
    /// that host's id and its answer.
    async fn call(
        &self,
        job: &str,
        method: Method,
        rest: &str,
        body: Option<Bytes>,
    ) -> Result<(String, StatusCode, Bytes), String> {
        let entry = self
            .directory
            .find(job)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("job {job} is not in the cluster's job directory yet"))?;
        static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
        let client = CLIENT.get_or_init(reqwest::Client::new);
        let mut request = client
            .request(method, format!("{}/api/jobs/{job}{rest}", entry.api))
            .header(FORWARDED_BY, self.directory.host())
            .timeout(std::time::Duration::from_secs(30));
        if let Some(value) = &self.authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        if let Some(body) = body {
            request = request
                .header(header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request.send().await.map_err(|e| {
            format!(
                "job {job} runs on host `{}` at {}, which does not answer: {e}",
                entry.host, entry.api
            )
        })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| e.to_string())?;
        Ok((entry.host, status, bytes))
    }

    /// Job `job`'s host and its detail, if that host answers with one.
    async fn detail(&self, job: &str) -> Option<(String, JobDetail)> {
        let (host, status, bytes) = self.call(job, Method::GET, "", None).await.ok()?;
        (status == StatusCode::OK)
            .then(|| serde_json::from_slice(&bytes).ok().map(|d| (host, d)))
            .flatten()
    }
}

/// Where a staged job is kept: the cluster's job directory, its staged
/// jobs, and the job's object storage (`<cluster s3>/jobs/<job id>`).
pub(super) struct Place {
    pub directory: Arc<JobDirectory>,
    pub store: StagedJobs,
    pub storage: Option<String>,
    pub cluster: Arc<Cluster>,
}

/// Answers `method` on `/api/jobs/<staged.job><rest>`.
pub(super) async fn answer(
    place: Place,
    staged: StagedJob,
    method: &Method,
    rest: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let Place {
        directory,
        store,
        storage,
        cluster,
    } = place;
    let authorization = headers.get(header::AUTHORIZATION).cloned();
    let stages = Stages {
        directory: &directory,
        authorization: authorization.clone(),
    };
    let store = &store;
    let result = match (method.clone(), rest) {
        (Method::GET, "") => detail(&stages, store, &cluster, &staged)
            .await
            .map(|d| Json(d).into_response()),
        (Method::POST, "/cancel") => operate(&stages, store, &staged, OperationKind::Cancel, body)
            .await
            .map(|o| (StatusCode::ACCEPTED, Json(o)).into_response()),
        (Method::POST, "/stop") => {
            stop(&stages, store, &cluster, storage.as_deref(), &staged, &body)
                .await
                .map(|o| (StatusCode::ACCEPTED, Json(o)).into_response())
        }
        (Method::POST, "/upgrade") => upgrade(&stages, store, storage.as_deref(), &staged, &body)
            .await
            .map(|o| {
                drive(
                    directory.clone(),
                    store.clone(),
                    cluster.clone(),
                    authorization.clone(),
                    staged.job.clone(),
                    o.id.clone(),
                );
                (StatusCode::ACCEPTED, Json(o)).into_response()
            }),
        (Method::GET, rest) if rest.starts_with("/operations/") => {
            let id = &rest["/operations/".len()..];
            operation(&stages, store, &cluster, &staged, id)
                .await
                .map(|o| Json(o).into_response())
        }
        (Method::POST, "/savepoints") => {
            savepoint(&stages, store, &cluster, storage.as_deref(), &staged, &body)
                .await
                .map(|o| (StatusCode::ACCEPTED, Json(o)).into_response())
        }
        (_, "/fork") => Err(ControlError::Conflict(format!(
            "job {} runs as stages on the cluster's hosts ({}): {} of a staged job as a whole is not supported yet; ask it of each stage's job",
            staged.job,
            named(&staged),
            &rest[1..]
        ))),
        _ => Err(ControlError::NotFound(format!(
            "no route {method} /api/jobs/{}{rest} for a staged job",
            staged.job
        ))),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `lines: job <id>, count: job <id>`.
fn named(staged: &StagedJob) -> String {
    staged
        .stages
        .iter()
        .map(|s| format!("{}: job {}", label(s), s.job))
        .collect::<Vec<_>>()
        .join(", ")
}

fn label(task: &StageRef) -> String {
    task.label()
}

async fn detail(
    stages: &Stages<'_>,
    store: &StagedJobs,
    cluster: &Cluster,
    staged: &StagedJob,
) -> Result<JobDetail, ControlError> {
    let mut hosts = Vec::new();
    let mut details = Vec::new();
    let mut statuses: Vec<Option<JobStatus>> = Vec::new();
    for stage in &staged.stages {
        let (host, detail, status) = match stages.detail(&stage.job).await {
            Some((host, detail)) => {
                let status = detail.job.lifecycle.status();
                (Some(host), Some(detail), Some(status))
            }
            // Its host does not answer (now): the directory still names
            // it, with the status it last wrote.
            None => {
                let entry = stages.directory.find(&stage.job).await.ok().flatten();
                let status = entry.as_ref().map(|e| e.summary.status);
                (entry.map(|e| e.host), None, status)
            }
        };
        hosts.push(host);
        details.push(detail);
        statuses.push(status);
    }
    let status = status_of(&statuses);
    let since_ms = details
        .iter()
        .flatten()
        .filter_map(|d| d.job.lifecycle.history().last().map(|t| t.time_ms))
        .max()
        .unwrap_or(staged.submitted_ms);
    let views: Vec<StageView> = staged
        .stages
        .iter()
        .zip(&details)
        .zip(hosts)
        .zip(&statuses)
        .map(|(((stage, detail), host), status)| StageView {
            name: stage.name.clone(),
            job: stage.job.clone(),
            task: stage.task,
            tasks: stage.tasks,
            uids: stage.uids.clone(),
            host,
            status: *status,
            checkpoints_completed: detail.as_ref().map_or(0, |d| d.checkpoints_completed),
            last_error: detail.as_ref().and_then(|d| d.job.last_error.clone()),
        })
        .collect();
    let mut operations = Vec::new();
    for asked in &staged.operations {
        operations.push(operation(stages, store, cluster, staged, &asked.id).await?);
    }
    let last_error = views
        .iter()
        .find_map(|v| Some(format!("stage {}: {}", v.name, v.last_error.as_ref()?)));
    let record = JobRecord {
        last_error,
        operations,
        ..JobRecord::new(
            staged.job.clone(),
            staged.name.clone(),
            staged.submitted_ms,
            Lifecycle::view(
                status,
                since_ms,
                format!("what its stages add up to ({})", named(staged)),
            ),
            staged.spec.clone(),
        )
    };
    Ok(JobDetail {
        job: record,
        operators: details
            .iter()
            .flatten()
            .flat_map(|d| d.operators.clone())
            .collect(),
        checkpoints_completed: views
            .iter()
            .map(|v| v.checkpoints_completed)
            .min()
            .unwrap_or(0),
        checkpoints_failed: details.iter().flatten().map(|d| d.checkpoints_failed).sum(),
        checkpoints: Vec::new(),
        stages: views,
    })
}

/// Asks `kind` of every stage; records what each answered.
async fn operate(
    stages: &Stages<'_>,
    store: &StagedJobs,
    staged: &StagedJob,
    kind: OperationKind,
    body: Bytes,
) -> Result<Operation, ControlError> {
    let path = match kind {
        OperationKind::Cancel => "/cancel",
        _ => "/stop",
    };
    let body = (!body.is_empty()).then_some(body);
    let requests = staged
        .stages
        .iter()
        .map(|stage| (stage, body.clone()))
        .collect();
    ask(stages, store, staged, kind, path, requests, Kept::default()).await
}

/// Stops every stage with a savepoint into one cluster savepoint
/// directory (`<target>/savepoint-<job6>-<12 hex>`, the target an `s3://`
/// one, by default `<the job's storage>/savepoints`), each stop *aligned*:
/// a stage's sources send the barrier only once the stages writing to it
/// stopped and all they published was read, so the savepoints form one
/// cut. The directory's `_metadata` ([`cluster_savepoint`]) is written
/// once every stage's completed ([`operation`]).
async fn stop(
    stages: &Stages<'_>,
    store: &StagedJobs,
    cluster: &Cluster,
    storage: Option<&str>,
    staged: &StagedJob,
    body: &Bytes,
) -> Result<Operation, ControlError> {
    let request = request_of(body, "stop")?;
    if request.drain {
        return Err(ControlError::BadRequest(format!(
            "job {} runs as stages ({}): a stop of a staged job cannot drain (the end of input a drain sends would end the stages downstream before their savepoints)",
            staged.job,
            named(staged)
        )));
    }
    let savepoint = savepoint_dir(staged, &request, storage)?;
    let request = SavepointRequest {
        target_dir: Some(savepoint.clone()),
        aligned: true,
        ..SavepointRequest::default()
    };
    ask_into(
        stages,
        store,
        cluster,
        staged,
        OperationKind::Stop,
        request,
        savepoint,
    )
    .await
}

/// Takes a savepoint of every task while the job runs on, into one cluster
/// savepoint directory as a stop does ([`stop`]), each task's savepoint
/// part of one *cut* named by the directory: each exchange's writers mark
/// the cut after their savepoint's epoch and publish nothing after it
/// until all did; each reader sends its barrier once every writer of its
/// key groups marked it (see `connectors::exchange`, "Cuts"), so the
/// savepoints hold exactly what crossed the exchanges before the cut. The
/// directory's `_metadata` ([`cluster_savepoint`]) is written once every
/// task's completed ([`operation`]).
async fn savepoint(
    stages: &Stages<'_>,
    store: &StagedJobs,
    cluster: &Cluster,
    storage: Option<&str>,
    staged: &StagedJob,
    body: &Bytes,
) -> Result<Operation, ControlError> {
    let request = request_of(body, "savepoint")?;
    let savepoint = savepoint_dir(staged, &request, storage)?;
    let cut = savepoint
        .rsplit('/')
        .next()
        .unwrap_or(&savepoint)
        .to_string();
    let request = SavepointRequest {
        target_dir: Some(savepoint.clone()),
        cut: Some(cut),
        ..SavepointRequest::default()
    };
    ask_into(
        stages,
        store,
        cluster,
        staged,
        OperationKind::Savepoint,
        request,
        savepoint,
    )
    .await
}

/// Asks every task for a stop or savepoint (`kind`) with `request`, whose
/// savepoints go into cluster savepoint `savepoint`; one operation of the
/// whole. A task that has finished (its input ended) is not asked: its
/// part is its final checkpoint, copied into the directory first
/// ([`finished_part`]).
async fn ask_into(
    stages: &Stages<'_>,
    store: &StagedJobs,
    cluster: &Cluster,
    staged: &StagedJob,
    kind: OperationKind,
    request: SavepointRequest,
    savepoint: String,
) -> Result<Operation, ControlError> {
    let finished = refuse_unready(stages, staged, kind).await?;
    let mut parts = std::collections::BTreeMap::new();
    for task in finished {
        let part = finished_part(cluster, staged, task, &savepoint).await?;
        parts.insert(task.job.clone(), part);
    }
    let body = serde_json::to_vec(&request).map_err(|e| ControlError::Internal(e.to_string()))?;
    let body = Some(Bytes::from(body));
    let requests = staged
        .stages
        .iter()
        .map(|stage| (stage, body.clone()))
        .collect();
    let path = match kind {
        OperationKind::Stop => "/stop",
        _ => "/savepoints",
    };
    ask(
        stages,
        store,
        staged,
        kind,
        path,
        requests,
        Kept {
            savepoint: Some(savepoint),
            rescale: None,
            parts,
        },
    )
    .await
}

/// The part of cluster savepoint `savepoint` of `task`, which finished:
/// its final checkpoint (the restore point it committed last) copied into
/// a new directory inside it as a self-contained savepoint. Returns that
/// directory. Nothing is asked of any task if it cannot be copied (what
/// was copied is deleted).
async fn finished_part(
    cluster: &Cluster,
    staged: &StagedJob,
    task: &StageRef,
    savepoint: &str,
) -> Result<String, ControlError> {
    let named = format!(
        "job {}: {} (job {}) finished",
        staged.job,
        label(task),
        task.job
    );
    let assignments = cluster.assignments().ok_or_else(|| {
        ControlError::Unavailable(format!(
            "{named}, and this host has no cluster assignments to find its final checkpoint in"
        ))
    })?;
    let restore = assignments
        .assignment(&task.job)
        .await
        .map_err(|e| ControlError::Unavailable(format!("{named}: its final checkpoint: {e}")))?
        .and_then(|a| a.restore);
    let Some(Ok(Location::S3(from))) = restore.as_deref().map(Location::parse) else {
        return Err(ControlError::Conflict(format!(
            "{named}, and its final checkpoint is not on the cluster's object storage ({}); no task was asked",
            restore.as_deref().unwrap_or("it committed none"),
        )));
    };
    let part = in_dir(savepoint, &task.job);
    let Ok(Location::S3(into)) = Location::parse(&part) else {
        return Err(ControlError::Internal(format!(
            "{part} is not an s3:// location"
        )));
    };
    if let Err(error) = crate::checkpoint::remote::copy_as_savepoint(&from, &into).await {
        if let Ok(remote) = crate::checkpoint::remote::Remote::open(&into) {
            let _ = remote.delete_all("").await;
        }
        return Err(ControlError::Unavailable(format!(
            "{named}, and its final checkpoint {from} could not be copied into the cluster savepoint: {error}; no task was asked"
        )));
    }
    Ok(part)
}

/// Refuses a stop or savepoint (`kind`) of the whole, before any task is
/// asked, unless every task runs or has finished (its input ended: its
/// part is its final checkpoint), and one runs: a task that is starting,
/// restarting or busy with another operation (a task moved by a failover)
/// would take none — while the others stop, for a savepoint that cannot
/// be written. A task whose host does not answer is left to the request
/// itself. Returns the finished tasks.
async fn refuse_unready<'a>(
    stages: &Stages<'_>,
    staged: &'a StagedJob,
    kind: OperationKind,
) -> Result<Vec<&'a StageRef>, ControlError> {
    let (mut finished, mut busy) = (Vec::new(), Vec::new());
    for task in &staged.stages {
        let Some((_, detail)) = stages.detail(&task.job).await else {
            continue;
        };
        let named = format!("{} (job {})", label(task), task.job);
        match detail.job.status() {
            JobStatus::Running => {}
            JobStatus::Finished => finished.push(task),
            status => busy.push(format!("{named} is {status}")),
        }
    }
    let what = match kind {
        OperationKind::Stop => "stop",
        _ => "savepoint",
    };
    if finished.len() == staged.stages.len() {
        return Err(ControlError::Conflict(format!(
            "job {} has finished (every task's input ended): there is nothing left to {}",
            staged.job,
            match kind {
                OperationKind::Stop => "stop",
                _ => "take a savepoint of",
            }
        )));
    }
    if !busy.is_empty() {
        return Err(ControlError::Conflict(format!(
            "job {}: {}: a {what} of the whole needs every task running (or finished); try again once they run (no {what} was asked of any task)",
            staged.job,
            busy.join(", ")
        )));
    }
    Ok(finished)
}

/// A stop's or savepoint's body (`what`), none being the defaults.
fn request_of(body: &Bytes, what: &str) -> Result<SavepointRequest, ControlError> {
    match body.is_empty() {
        true => Ok(SavepointRequest::default()),
        false => serde_json::from_slice(body)
            .map_err(|e| ControlError::BadRequest(format!("the {what}'s body: {e}"))),
    }
}

/// A new cluster savepoint directory of `staged`:
/// `<target>/savepoint-<job6>-<12 hex>`, the target the request's (an
/// `s3://` one) or `<the job's storage>/savepoints`.
fn savepoint_dir(
    staged: &StagedJob,
    request: &SavepointRequest,
    storage: Option<&str>,
) -> Result<String, ControlError> {
    let target = match (request.target_dir.as_deref(), storage) {
        (Some(text), _) => match Location::parse(text)
            .map_err(|e| ControlError::BadRequest(format!("target_dir: {e}")))?
        {
            Location::S3(url) => url.to_string(),
            Location::Local(_) => {
                return Err(ControlError::BadRequest(format!(
                    "target_dir {text}: job {} runs as stages on the cluster's hosts, and each writes its part of the savepoint: give an s3:// target_dir, or none for {}",
                    staged.job,
                    storage.map_or("the job's storage".to_string(), |s| format!(
                        "{s}/savepoints"
                    ))
                )));
            }
        },
        (None, Some(storage)) => format!("{storage}/savepoints"),
        (None, None) => {
            return Err(ControlError::Unavailable(format!(
                "job {}: the cluster has no object storage for its savepoint",
                staged.job
            )));
        }
    };
    Ok(in_dir(&target, &staged.job))
}

/// `<target>/savepoint-<job6>-<12 hex>`: a new cluster savepoint directory
/// of job `job`.
fn in_dir(target: &str, job: &str) -> String {
    format!(
        "{}/savepoint-{}-{}",
        target.trim_end_matches('/'),
        job.chars().take(6).collect::<String>(),
        crate::checkpoint::storage::random_hex(6)
    )
}

/// Splits an upgrade of the whole into upgrades of the stages it touches:
/// new plugins go to every task of their stages, each upgraded on its own
/// (checked, stopped with a savepoint, restarted, on probation) and
/// awaiting release once its probation passed, so that a stage passes or
/// rolls back as one ([`judge`]); a new parallelism of one stage is a
/// rescale of it ([`rescale`]), asked alone. Answers the operation (to be
/// driven on: [`drive`]).
async fn upgrade(
    stages: &Stages<'_>,
    store: &StagedJobs,
    storage: Option<&str>,
    staged: &StagedJob,
    body: &[u8],
) -> Result<Operation, ControlError> {
    let request: UpgradeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        UpgradeRequest::default()
    } else {
        serde_json::from_slice(body).map_err(|e| {
            ControlError::BadRequest(format!("the request body is not valid JSON for it: {e}"))
        })?
    };
    if request.job_file.is_some() {
        return Err(ControlError::Conflict(format!(
            "job {} runs as stages on the cluster's hosts ({}): an upgrade to a new job file is not supported yet for a staged job; upgrade its plugins and parallelism, or each stage's job",
            staged.job,
            named(staged)
        )));
    }
    if request.plugins.is_empty() && request.parallelism.is_empty() {
        return Err(ControlError::BadRequest(
            "an upgrade needs --plugin UID=... or --parallelism UID=N".to_string(),
        ));
    }
    // The stage (its first task) that runs `uid`.
    let stage_of = |uid: &str| {
        staged
            .stages
            .iter()
            .find(|s| s.uids.iter().any(|u| u == uid))
    };
    let mut problems = Vec::new();
    let mut split: std::collections::BTreeMap<String, UpgradeRequest> = Default::default();
    for (uid, reference) in &request.plugins {
        match stage_of(uid) {
            Some(stage) => {
                split
                    .entry(stage.name.clone())
                    .or_default()
                    .plugins
                    .insert(uid.clone(), reference.clone());
            }
            None => problems.push(format!("--plugin {uid}: the job has no uid `{uid}`")),
        }
    }
    let mut rescales: std::collections::BTreeMap<String, (String, u32)> = Default::default();
    for (uid, &parallelism) in &request.parallelism {
        let Some(stage) = stage_of(uid) else {
            problems.push(format!("--parallelism {uid}: the job has no uid `{uid}`"));
            continue;
        };
        match rescales.get(&stage.name) {
            Some((other, n)) if *n != parallelism => problems.push(format!(
                "--parallelism {uid}={parallelism}: `{uid}` and `{other}` run in stage {} ({}), whose nodes share one parallelism, and {other}={n} asks another",
                stage.name,
                stage.uids.join(", ")
            )),
            _ => {
                rescales.insert(stage.name.clone(), (uid.clone(), parallelism));
            }
        }
    }
    if parallelism_zero(&request) {
        problems.push("--parallelism: a stage runs at least one task".to_string());
    }
    if !problems.is_empty() {
        return Err(ControlError::BadRequest(problems.join("; ")));
    }
    if !rescales.is_empty() {
        if rescales.len() > 1 || !split.is_empty() {
            return Err(ControlError::BadRequest(format!(
                "job {} runs as stages: rescale one stage at a time, and upgrade plugins apart from a rescale (asked: {})",
                staged.job,
                rescales
                    .keys()
                    .chain(split.keys())
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let (stage, (_, parallelism)) = rescales.into_iter().next().expect("one");
        return rescale::start(stages, store, storage, staged, &stage, parallelism).await;
    }
    let mut requests = Vec::new();
    for (stage, mut part) in split {
        part.allow_non_restored_state = request.allow_non_restored_state;
        part.probation = request.probation.clone();
        part.probation_checkpoints = request.probation_checkpoints;
        part.await_release = true;
        let body = serde_json::to_vec(&part).map_err(|e| ControlError::Internal(e.to_string()))?;
        let body = Bytes::from(body);
        for task in staged.stages.iter().filter(|s| s.name == stage) {
            requests.push((task, Some(body.clone())));
        }
    }
    ask(
        stages,
        store,
        staged,
        OperationKind::Upgrade,
        "/upgrade",
        requests,
        Kept::default(),
    )
    .await
}

/// How long the host that took an operation of a staged job follows it
/// in the background ([`drive`]) before leaving it to whoever asks about
/// it next.
const DRIVE_FOR: Duration = Duration::from_secs(600);

/// Follows operation `id` of staged job `job` in the background until it
/// ended or [`DRIVE_FOR`] passed, as a GET of it does: a rescale advanced
/// step by step, an upgrade's stages released or rolled back as one. Any
/// host asked about the operation does the same meanwhile.
fn drive(
    directory: Arc<JobDirectory>,
    store: StagedJobs,
    cluster: Arc<Cluster>,
    authorization: Option<header::HeaderValue>,
    job: String,
    id: String,
) {
    tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let stages = Stages {
            directory: &directory,
            authorization,
        };
        while started.elapsed() < DRIVE_FOR {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let Ok(Some(staged)) = store.get(&job).await else {
                continue;
            };
            match operation(&stages, &store, &cluster, &staged, &id).await {
                Ok(found) if found.status == OperationStatus::Running => {}
                Ok(found) => {
                    tracing::info!(job = %job, operation = %id, status = ?found.status, "the staged job's operation ended");
                    return;
                }
                Err(_) => return,
            }
        }
    });
}

/// How often the cluster's coordinator looks at the staged jobs'
/// operations ([`steward`]).
const STEWARD_EVERY: Duration = Duration::from_secs(1);

/// On the cluster's coordinator, every [`STEWARD_EVERY`]: carries on each
/// staged job's operations that still run, as [`drive`] does on the host
/// that took one, so that an operation whose host died still ends — a
/// rescale between its tasks' stops and its new tasks, an upgrade whose
/// stages await their verdicts, a stop whose cluster savepoint awaits its
/// `_metadata`. An operation seen ended is not asked about again. Asks the
/// tasks' hosts with this host's token (a cluster's hosts share one).
pub(super) fn steward(cluster: Arc<Cluster>, token: Option<String>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let authorization =
            token.and_then(|t| header::HeaderValue::from_str(&format!("Bearer {t}")).ok());
        let mut ended = std::collections::HashSet::new();
        let mut tick = tokio::time::interval(STEWARD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !cluster.is_coordinator() {
                continue;
            }
            let (Some(assignments), Some(directory)) = (cluster.assignments(), cluster.jobs())
            else {
                continue;
            };
            let store = assignments.staged();
            let Ok(all) = store.list().await else {
                continue;
            };
            let stages = Stages {
                directory: &directory,
                authorization: authorization.clone(),
            };
            for staged in &all {
                for asked in &staged.operations {
                    if ended.contains(&asked.id) {
                        continue;
                    }
                    if let Ok(found) = operation(&stages, &store, &cluster, staged, &asked.id).await
                        && found.status != OperationStatus::Running
                    {
                        ended.insert(asked.id.clone());
                    }
                }
            }
        }
    })
}

/// An upgrade's stages pass or roll back as one: once a task of a stage
/// failed (rolled back, moved, or refused the upgrade), the stage's tasks
/// still on probation are rolled back; once every task of a stage awaits
/// release (its probation passed), each is released. Each look asks again
/// what did not take (a task not yet on probation), and any host may look.
async fn judge(
    stages: &Stages<'_>,
    staged: &StagedJob,
    asked: &StagedOperation,
    found: &[Option<Operation>],
) {
    type Task<'a> = (&'a StageRef, &'a str, Option<&'a Operation>);
    let mut by_stage: std::collections::BTreeMap<&str, (Vec<Task>, Option<String>)> =
        Default::default();
    for (part, found) in asked.stages.iter().zip(found) {
        let Some(task) = staged.stages.iter().find(|s| s.job == part.job) else {
            continue;
        };
        let (tasks, failed) = by_stage.entry(task.name.as_str()).or_default();
        let named = format!("{} (job {})", label(task), task.job);
        match (&part.operation, found) {
            (None, _) => {
                let why = part.skipped.as_deref().unwrap_or("it was not asked");
                failed.get_or_insert(format!("{named} did not take the upgrade: {why}"));
            }
            (Some(_), Some(op)) if op.status == OperationStatus::Failed => {
                let why = op.error.as_deref().unwrap_or("it failed");
                failed.get_or_insert(format!("{named}: {why}"));
            }
            (Some(operation), found) => tasks.push((task, operation, found.as_ref())),
        }
    }
    for (stage, (tasks, failed)) in by_stage {
        let running: Vec<&Task> = tasks
            .iter()
            .filter(|(_, _, found)| found.is_some_and(|o| o.status == OperationStatus::Running))
            .collect();
        if running.is_empty() {
            continue;
        }
        if let Some(why) = failed {
            let reason = format!("stage {stage} rolls back as one: {why}");
            let body = serde_json::to_vec(&super::jobs::RollBackRequest {
                reason: Some(reason),
            })
            .ok()
            .map(Bytes::from);
            for (task, operation, _) in running {
                let path = format!("/operations/{operation}/roll-back");
                let _ = stages
                    .call(&task.job, Method::POST, &path, body.clone())
                    .await;
            }
            continue;
        }
        if tasks.iter().any(|(_, _, found)| found.is_none()) {
            // A task's answer is missing (its host does not answer now).
            continue;
        }
        let mut awaiting = true;
        for (task, operation, _) in &running {
            let step = stages.detail(&task.job).await.and_then(|(_, detail)| {
                let upgrade = detail
                    .job
                    .upgrades
                    .iter()
                    .find(|u| u.operation == *operation)?;
                upgrade.step.clone()
            });
            if step.as_deref() != Some(super::jobs::AWAITING_RELEASE) {
                awaiting = false;
                break;
            }
        }
        if awaiting {
            for (task, operation, _) in running {
                let path = format!("/operations/{operation}/release");
                let _ = stages.call(&task.job, Method::POST, &path, None).await;
            }
        }
    }
}

fn parallelism_zero(request: &UpgradeRequest) -> bool {
    request.parallelism.values().any(|&n| n == 0)
}

/// What an operation of the whole keeps beside its tasks' answers.
#[derive(Default)]
struct Kept {
    /// The cluster savepoint its tasks' savepoints go into.
    savepoint: Option<String>,
    /// The rescale it is.
    rescale: Option<StageRescale>,
    /// Finished tasks (job id) → their parts of the cluster savepoint,
    /// copied already: not asked.
    parts: std::collections::BTreeMap<String, String>,
}

/// Posts each request to `path` of its stage's job; records what each
/// answered as one operation of the whole.
async fn ask(
    stages: &Stages<'_>,
    store: &StagedJobs,
    staged: &StagedJob,
    kind: OperationKind,
    path: &str,
    requests: Vec<(&StageRef, Option<Bytes>)>,
    kept: Kept,
) -> Result<Operation, ControlError> {
    let Kept {
        savepoint,
        rescale,
        mut parts,
    } = kept;
    let mut asked = Vec::new();
    let mut refusals = Vec::new();
    for (stage, body) in requests {
        if let Some(part) = parts.remove(&stage.job) {
            asked.push(StageOperation {
                job: stage.job.clone(),
                operation: None,
                skipped: None,
                part: Some(part),
            });
            continue;
        }
        let answer = stages.call(&stage.job, Method::POST, path, body).await;
        let (operation, skipped) = match answer {
            Ok((_, StatusCode::ACCEPTED, bytes)) => {
                match serde_json::from_slice::<Operation>(&bytes) {
                    Ok(operation) => (Some(operation.id), None),
                    Err(e) => (None, Some(format!("its answer is not an operation: {e}"))),
                }
            }
            Ok((_, status, bytes)) => {
                let error = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_string))
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
                if status == StatusCode::BAD_REQUEST {
                    return Err(ControlError::BadRequest(error));
                }
                (None, Some(error))
            }
            Err(error) => (None, Some(error)),
        };
        if let Some(reason) = &skipped {
            refusals.push(format!(
                "stage {} (job {}): {reason}",
                label(stage),
                stage.job
            ));
        }
        asked.push(StageOperation {
            job: stage.job.clone(),
            operation,
            skipped,
            part: None,
        });
    }
    if asked
        .iter()
        .all(|a| a.operation.is_none() && a.part.is_none())
    {
        return Err(ControlError::Conflict(format!(
            "job {}: no stage took the {}: {}",
            staged.job,
            &path[1..],
            refusals.join("; ")
        )));
    }
    let operation = StagedOperation {
        id: crate::checkpoint::storage::random_hex(8),
        kind,
        requested_ms: super::now_ms(),
        stages: asked,
        savepoint,
        rescale,
    };
    store
        .add_operation(&staged.job, operation.clone())
        .await
        .map_err(|e| ControlError::Unavailable(e.to_string()))?;
    Ok(Operation {
        id: operation.id,
        kind,
        status: OperationStatus::Running,
        requested_ms: operation.requested_ms,
        finished_ms: None,
        savepoint: None,
        downtime_ms: None,
        outcome: None,
        error: None,
    })
}

async fn operation(
    stages: &Stages<'_>,
    store: &StagedJobs,
    cluster: &Cluster,
    staged: &StagedJob,
    id: &str,
) -> Result<Operation, ControlError> {
    let asked = staged
        .operations
        .iter()
        .find(|o| o.id == id)
        .ok_or_else(|| {
            ControlError::NotFound(format!("job {} has no operation {id}", staged.job))
        })?;
    if let Some(rescale) = &asked.rescale {
        return Ok(rescale::advance(stages, store, cluster, staged, asked, rescale).await);
    }
    let mut found = Vec::new();
    for stage in &asked.stages {
        if let Some(part) = &stage.part {
            found.push(Some(finished_operation(asked, part)));
            continue;
        }
        let Some(operation) = &stage.operation else {
            found.push(None);
            continue;
        };
        let answer = stages
            .call(
                &stage.job,
                Method::GET,
                &format!("/operations/{operation}"),
                None,
            )
            .await;
        found.push(match answer {
            Ok((_, StatusCode::OK, bytes)) => serde_json::from_slice(&bytes).ok(),
            Ok((host, StatusCode::NOT_FOUND, _)) => Some(lost(asked, operation, &host)),
            _ => None,
        });
    }
    if asked.kind == OperationKind::Upgrade {
        judge(stages, staged, asked, &found).await;
    }
    let mut outcome = outcome_of(asked, &staged.stages, &found);
    if let (Some(savepoint), OperationStatus::Succeeded) = (&asked.savepoint, outcome.status) {
        match assemble(staged, savepoint, &found).await {
            Ok(()) => {
                outcome.outcome = outcome
                    .outcome
                    .map(|stages| format!("cluster savepoint {savepoint} ({stages})"));
                outcome.savepoint = Some(savepoint.clone());
            }
            Err(error) => {
                outcome.status = OperationStatus::Failed;
                outcome.error = Some(format!(
                    "every task's savepoint completed, but the cluster savepoint {savepoint} could not be written: {error}"
                ));
            }
        }
    }
    Ok(outcome)
}

/// The part a finished task took in operation `asked`: its final
/// checkpoint, copied into `part` when the operation was asked.
fn finished_operation(asked: &StagedOperation, part: &str) -> Operation {
    Operation {
        id: asked.id.clone(),
        kind: asked.kind,
        status: OperationStatus::Succeeded,
        requested_ms: asked.requested_ms,
        finished_ms: Some(asked.requested_ms),
        savepoint: Some(part.to_string()),
        downtime_ms: None,
        outcome: Some("finished before it: its final checkpoint".to_string()),
        error: None,
    }
}

/// A task's operation `operation` that the host running the task now
/// (`host`) does not have: the task moved during it (its host's lease
/// lapsed, or a rebalance), which ended it unfinished — failed, so that
/// the operation of the whole ends instead of waiting for it forever.
fn lost(asked: &StagedOperation, operation: &str, host: &str) -> Operation {
    Operation {
        id: operation.to_string(),
        kind: asked.kind,
        status: OperationStatus::Failed,
        requested_ms: asked.requested_ms,
        finished_ms: Some(super::now_ms()),
        savepoint: None,
        downtime_ms: None,
        outcome: None,
        error: Some(format!(
            "its operation {operation} is not on host `{host}`, which runs the task now: the task moved to it during the operation (its host's lease lapsed, or a rebalance), which left the operation unfinished{}",
            match asked.kind {
                // The new version's commits were held: the task's restore
                // point is still the upgrade's savepoint.
                OperationKind::Upgrade =>
                    "; it resumed there from its newest committed restore point, as the version that wrote it (the previous version, if the new one had not passed its probation)",
                _ => "",
            }
        )),
    }
}

/// Writes the `_metadata` of cluster savepoint `savepoint` from its
/// stages' (`found`: each stage's stop, in order). Any host may, any
/// number of times: the bytes are the same, and a conditional put keeps
/// the first.
async fn assemble(
    staged: &StagedJob,
    savepoint: &str,
    found: &[Option<Operation>],
) -> Result<(), String> {
    use crate::checkpoint::metadata::{self, METADATA_FILE};
    let Ok(Location::S3(url)) = Location::parse(savepoint) else {
        return Err(format!("{savepoint} is not an s3:// location"));
    };
    let remote = crate::checkpoint::remote::Remote::open(&url).map_err(|e| e.to_string())?;
    let mut parts = Vec::new();
    for (stage, stop) in staged.stages.iter().zip(found) {
        let Some(taken) = stop.as_ref().and_then(|o| o.savepoint.as_deref()) else {
            return Err(format!(
                "stage {} (job {}) took no savepoint",
                stage.name, stage.job
            ));
        };
        let Some(dir) = taken
            .strip_prefix(savepoint)
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|dir| metadata::is_inside(dir))
        else {
            return Err(format!(
                "stage {} (job {}): its savepoint {taken} is not inside {savepoint}",
                stage.name, stage.job
            ));
        };
        let relative = format!("{dir}/{METADATA_FILE}");
        let bytes = remote.get(&relative).await.map_err(|e| e.to_string())?;
        let read = metadata::decode(
            &bytes,
            std::path::Path::new(&format!("{taken}/{METADATA_FILE}")),
        )
        .map_err(|e| e.to_string())?;
        parts.push((dir.to_string(), read));
    }
    let merged = cluster_savepoint(staged, &parts)?;
    let bytes = metadata::encode(&merged).map_err(|e| e.to_string())?;
    remote
        .put_new(METADATA_FILE, bytes)
        .await
        .map_err(|e| e.to_string())
}

/// The staged jobs as `GET /api/jobs` lists them, from `list` (every
/// job of the cluster, the stages' among them).
pub(super) async fn summaries(
    store: &StagedJobs,
    list: &[JobSummary],
) -> Result<Vec<JobSummary>, ControlError> {
    let all = store
        .list()
        .await
        .map_err(|e| ControlError::Unavailable(e.to_string()))?;
    Ok(all
        .into_iter()
        .map(|staged| {
            let found: Vec<Option<&JobSummary>> = staged
                .stages
                .iter()
                .map(|s| list.iter().find(|j| j.id == s.job))
                .collect();
            let statuses: Vec<Option<JobStatus>> =
                found.iter().map(|f| f.map(|j| j.status)).collect();
            let mut plugins: Vec<String> = found
                .iter()
                .flatten()
                .flat_map(|j| j.plugins.clone())
                .collect();
            plugins.sort();
            plugins.dedup();
            JobSummary {
                status: status_of(&statuses),
                since_ms: found
                    .iter()
                    .flatten()
                    .map(|j| j.since_ms)
                    .max()
                    .unwrap_or(staged.submitted_ms),
                plugins,
                host: None,
                host_live: None,
                stages: staged.stages.iter().map(|s| s.job.clone()).collect(),
                id: staged.job,
                name: staged.name,
                submitted_ms: staged.submitted_ms,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::cluster::staged::asked_of;

    #[test]
    fn an_upgrade_whose_task_moved_ends_naming_the_move() {
        let task = |i: u32| StageRef {
            name: "count".into(),
            job: format!("j-1-{i}"),
            task: i,
            tasks: 2,
            uids: vec!["count".into()],
            exchanges: vec![],
        };
        let names = vec![task(0), task(1)];
        let asked = asked_of(&names, OperationKind::Upgrade);
        let rolled_back = Operation {
            status: OperationStatus::Failed,
            error: Some("rolled back".into()),
            finished_ms: Some(2),
            ..lost(&asked, "o", "h")
        };
        // One task rolled back; the other's host died and the task moved:
        // its upgrade is gone, and the whole ends instead of waiting.
        let outcome = outcome_of(
            &asked,
            &names,
            &[Some(rolled_back), Some(lost(&asked, "o", "host-2"))],
        );
        assert_eq!(outcome.status, OperationStatus::Failed);
        let error = outcome.error.expect("an error");
        assert!(
            error.contains("stage count task 1 (job j-1-1): its operation o is not on host `host-2`, which runs the task now: the task moved to it during the operation"),
            "{error}"
        );
    }
}
