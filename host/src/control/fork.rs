//! `weir fork JOB`: a second job started from a savepoint of a running
//! one, with changes (a new job file, other plugins, a name), while the
//! job runs on and keeps its output — the A/B test the savepoint
//! literature calls "fork". Reads top to bottom:
//!
//! 1. The fork's spec: the job file given, else the job's own (with the
//!    upgrades it runs), its plugins pinned to the digests the job runs,
//!    the plugins asked for instead, and its name (default `<name>-fork`).
//! 2. Its sinks must write elsewhere than the job's: the same file
//!    directory, JetStream subject, Kafka topic or Kafka transactional id
//!    prefix is refused, each named (two jobs committing into one target
//!    would each see the other's output, and Kafka would fence one).
//! 3. A savepoint of the job (an operation of the job like any other; the
//!    job keeps running).
//! 4. The fork is submitted from it, and the lineage recorded on both:
//!    the fork's `forked_from`, the job's `forks`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::jobs::{JobManager, SavepointRequest, SubmitRequest, build_graph, resolve_spec};
use super::record::{ForkRecord, JobRecord, JobSpec, OperationStatus};
use super::{ControlError, now_ms};
use crate::job::{JobGraph, NodeKind, SinkKind};

/// `POST /api/jobs/{id}/fork`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ForkRequest {
    /// The fork's job file (its sinks must write elsewhere than the
    /// job's); default: the job's own.
    #[serde(default)]
    pub job_file: Option<SubmitRequest>,
    /// uid → the plugin the fork runs instead (`NAME@VERSION`, `NAME` or
    /// `sha256:<digest>`).
    #[serde(default)]
    pub plugins: BTreeMap<String, String>,
    /// The fork's name (default: the job's, with `-fork`).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub allow_non_restored_state: bool,
}

/// How long a fork waits for the job's savepoint.
const SAVEPOINT_WAIT: Duration = Duration::from_secs(600);

impl JobManager {
    /// Forks job `id` (see the module); returns the fork's record.
    pub async fn fork(&self, id: &str, request: ForkRequest) -> Result<JobRecord, ControlError> {
        let original = self.get(id)?.record();
        let spec = fork_spec(self, &original, &request)?;
        let ctx = self.context();
        let (theirs, ours) = (original.spec.clone(), spec.clone());
        let (theirs, ours) = tokio::task::spawn_blocking(move || {
            Ok::<_, ControlError>((build_graph(&ctx, &theirs)?, build_graph(&ctx, &ours)?))
        })
        .await
        .map_err(super::jobs::internal)??;
        let collisions = colliding_sinks(&theirs, &ours);
        if !collisions.is_empty() {
            return Err(ControlError::BadRequest(format!(
                "a fork of job {id} must write elsewhere than the job (give it a job file with other sink targets, --job-file):\n{}",
                collisions
                    .iter()
                    .map(|c| format!("  - {c}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )));
        }
        let savepoint = self.savepoint_and_wait(id).await?;
        let lineage = |job: &str| ForkRecord {
            job: job.to_string(),
            savepoint: savepoint.clone(),
            time_ms: now_ms(),
        };
        let fork = self
            .start(
                spec,
                Some(savepoint.clone()),
                request.allow_non_restored_state,
                |record| record.forked_from = Some(lineage(id)),
            )
            .await?;
        if let Ok(handle) = self.get(id) {
            handle.update(|record| record.forks.push(lineage(&fork.id)));
        }
        tracing::info!(job = %id, fork = %fork.id, %savepoint, "forked the job");
        Ok(fork)
    }

    /// Takes a savepoint of job `id` and waits for it: its location.
    async fn savepoint_and_wait(&self, id: &str) -> Result<String, ControlError> {
        let operation = self.savepoint(id, &SavepointRequest::default())?;
        let deadline = tokio::time::Instant::now() + SAVEPOINT_WAIT;
        loop {
            let current = self.operation(id, &operation.id)?;
            match current.status {
                OperationStatus::Succeeded => {
                    return current.savepoint.ok_or_else(|| {
                        ControlError::Internal(format!(
                            "job {id}: savepoint operation {} succeeded without a savepoint",
                            operation.id
                        ))
                    });
                }
                OperationStatus::Failed => {
                    return Err(ControlError::Conflict(format!(
                        "job {id}: the fork's savepoint failed: {}",
                        current.error.unwrap_or_default()
                    )));
                }
                OperationStatus::Running if tokio::time::Instant::now() > deadline => {
                    return Err(ControlError::Conflict(format!(
                        "job {id}: the fork's savepoint (operation {}) did not complete in {}",
                        operation.id,
                        crate::human::duration(SAVEPOINT_WAIT)
                    )));
                }
                OperationStatus::Running => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
    }
}

/// The fork's spec: see the module's step 1.
fn fork_spec(
    manager: &JobManager,
    original: &JobRecord,
    request: &ForkRequest,
) -> Result<JobSpec, ControlError> {
    let ctx = manager.context();
    let mut spec = match &request.job_file {
        Some(file) => resolve_spec(&ctx, file)?,
        None => original.spec.clone(),
    };
    spec.storage = None;
    let mut problems = Vec::new();
    for (uid, reference) in &request.plugins {
        match ctx.store.resolve(reference) {
            Ok(stored) => {
                spec.overrides.insert(uid.clone(), stored.digest);
            }
            Err(error) => problems.push(format!("--plugin {uid}: {error}")),
        }
    }
    if !problems.is_empty() {
        return Err(ControlError::BadRequest(problems.join("; ")));
    }
    let name = request
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-fork", original.name));
    spec.job_file = renamed(&spec.job_file, &name).map_err(|e| {
        ControlError::BadRequest(format!("the fork's job file {}: {e}", spec.file_name))
    })?;
    Ok(spec)
}

/// `text` (a job file) with its `name` set to `name`.
fn renamed(text: &str, name: &str) -> Result<String, String> {
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    table.insert("name".to_string(), toml::Value::String(name.to_string()));
    toml::to_string(&table).map_err(|e| e.to_string())
}

/// Where a sink writes, as a collision is named.
fn targets(sink: &SinkKind) -> Vec<String> {
    match sink {
        SinkKind::File { path } => vec![format!("the directory {}", path.display())],
        SinkKind::Nats(nats) => vec![format!(
            "JetStream subject `{}` of stream `{}` at {}",
            nats.subject,
            nats.stream,
            crate::connectors::nats::redact(&nats.url)
        )],
        SinkKind::Kafka(kafka) => vec![
            format!("Kafka topic `{}` at {}", kafka.topic, kafka.bootstrap),
            format!(
                "Kafka transactional ids `{}-…`",
                kafka.transactional_id_prefix
            ),
        ],
        SinkKind::Exchange(exchange) => vec![format!(
            "exchange `{}` at {}",
            exchange.name,
            crate::connectors::nats::redact(&exchange.url)
        )],
        SinkKind::Stdout | SinkKind::Blackhole => Vec::new(),
    }
}

/// Each sink of `fork` that writes where a sink of `job` does, named.
fn colliding_sinks(job: &JobGraph, fork: &JobGraph) -> Vec<String> {
    let sinks = |graph: &JobGraph| -> Vec<(String, String)> {
        graph
            .nodes
            .iter()
            .filter_map(|node| match &node.kind {
                NodeKind::Sink(sink) => Some(
                    targets(sink)
                        .into_iter()
                        .map(|target| (node.uid.clone(), target))
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .flatten()
            .collect()
    };
    let theirs = sinks(job);
    let mut collisions = Vec::new();
    for (uid, target) in sinks(fork) {
        if let Some((their_uid, _)) = theirs.iter().find(|(_, t)| *t == target) {
            collisions.push(format!(
                "sink `{uid}` writes to {target}, as the job's sink `{their_uid}` does"
            ));
        }
    }
    collisions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renamed_job_file_keeps_everything_else() {
        let text = "name = \"wc\"\n[[source]]\nuid = \"in\"\nkind = \"generator\"\n";
        let renamed = renamed(text, "wc-b").expect("renames");
        let table: toml::Table = renamed.parse().expect("TOML");
        assert_eq!(table["name"].as_str(), Some("wc-b"));
        assert_eq!(table["source"][0]["uid"].as_str(), Some("in"));
    }
}
