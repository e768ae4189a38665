//! The cluster's job directory: which host runs which job, so that any
//! host lists every job and answers for any of them. Each host writes its
//! jobs' summaries (id, name, status, plugins) with its id and API into
//! the key-value bucket `<name>-jobs` (key `j.<job id>`), checking every
//! half second for changes. The API lists the directory, and forwards a
//! request about a job another host runs to that host (see
//! `control::api`'s `forward`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::ClusterError;
use crate::control::record::JobSummary;

/// How often a host looks for changes of its jobs to write.
const PUBLISH_EVERY: Duration = Duration::from_millis(500);

/// A job in the directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEntry {
    pub summary: JobSummary,
    /// The host that runs it, and its API.
    pub host: String,
    pub api: String,
    /// A movable job's assignment generation as its writer knew it: an
    /// entry is never overwritten by one of a lower generation (a host
    /// woken from a freeze, its assignments not read again yet, would
    /// otherwise write the job back under its own name after its new
    /// owner did, and the directory would name a host that let it go).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// This host's jobs, asked at each look.
pub type LocalJobs = Arc<dyn Fn() -> Vec<JobSummary> + Send + Sync>;

/// The directory, as one host sees it.
pub struct JobDirectory {
    cluster: String,
    host: String,
    api: String,
    bucket: kv::Store,
    /// What this host last wrote, by job id.
    written: Mutex<HashMap<String, JobSummary>>,
    /// Who owns the movable jobs: a job assigned to another host is not
    /// written from here (a released job's last changes would hide its
    /// new owner's).
    assignments: Option<Arc<super::assign::Assignments>>,
}

impl std::fmt::Debug for JobDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobDirectory")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

fn key(id: &str) -> String {
    format!("j.{id}")
}

impl JobDirectory {
    pub(super) async fn open(
        js: &jetstream::Context,
        name: &str,
        host: &str,
        api: &str,
        replicas: usize,
        assignments: Option<Arc<super::assign::Assignments>>,
    ) -> Result<Arc<Self>, ClusterError> {
        let bucket = super::open_bucket(
            js,
            kv::Config {
                bucket: bucket_name(name),
                description: format!("weir cluster {name}: which host runs which job"),
                history: 1,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await
        .map_err(|message| ClusterError::Buckets {
            name: name.to_string(),
            message,
        })?;
        Ok(Arc::new(Self {
            cluster: name.to_string(),
            host: host.to_string(),
            api: api.to_string(),
            bucket,
            written: Mutex::new(HashMap::new()),
            assignments,
        }))
    }

    /// This host's id.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Writes the summaries of `jobs` that changed since the last write.
    pub async fn publish(&self, jobs: Vec<JobSummary>) {
        for summary in jobs {
            let assigned = self
                .assignments
                .as_ref()
                .and_then(|a| a.owner_and_generation(&summary.id));
            if assigned
                .as_ref()
                .is_some_and(|(owner, _)| *owner != self.host)
            {
                continue;
            }
            let unchanged = self
                .written
                .lock()
                .expect("not poisoned")
                .get(&summary.id)
                .is_some_and(|w| *w == summary);
            if unchanged {
                continue;
            }
            let entry = JobEntry {
                summary: summary.clone(),
                host: self.host.clone(),
                api: self.api.clone(),
                generation: assigned.map(|(_, generation)| generation),
            };
            match self.write(&entry).await {
                Ok(true) => {
                    self.written
                        .lock()
                        .expect("not poisoned")
                        .insert(summary.id.clone(), summary);
                }
                Ok(false) => {
                    debug!(cluster = %self.cluster, job = %summary.id, "not writing the job to the directory: a newer owner wrote it");
                }
                Err(error) => {
                    warn!(cluster = %self.cluster, job = %summary.id, %error, "cannot write the job to the cluster's directory");
                }
            }
        }
    }

    /// Writes `entry`; a movable job's only with a compare-and-set over
    /// an entry of no higher generation. `Ok(false)`: a newer one is there.
    async fn write(&self, entry: &JobEntry) -> Result<bool, String> {
        let id = &entry.summary.id;
        let value = Bytes::from(serde_json::to_vec(entry).map_err(|e| e.to_string())?);
        let Some(generation) = entry.generation else {
            self.bucket
                .put(key(id), value)
                .await
                .map_err(|e| e.to_string())?;
            return Ok(true);
        };
        for _ in 0..5 {
            let current = self
                .bucket
                .entry(key(id))
                .await
                .map_err(|e| e.to_string())?;
            let revision = match current {
                Some(found) if found.operation == kv::Operation::Put => {
                    let theirs = serde_json::from_slice::<JobEntry>(&found.value)
                        .ok()
                        .and_then(|e| e.generation);
                    if theirs.is_some_and(|theirs| theirs > generation) {
                        return Ok(false);
                    }
                    found.revision
                }
                Some(found) => found.revision,
                None => 0,
            };
            match self.bucket.update(key(id), value.clone(), revision).await {
                Ok(_) => return Ok(true),
                // Written meanwhile: look again.
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(error) => return Err(error.to_string()),
            }
        }
        Err(format!(
            "job {id}: its entry kept changing while this host wrote it"
        ))
    }

    /// Writes this host's jobs as they change, until aborted.
    pub(super) async fn follow(self: Arc<Self>, jobs: LocalJobs) {
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.publish(jobs()).await;
        }
    }

    /// Every job of the cluster.
    pub async fn list(&self) -> Result<Vec<JobEntry>, ClusterError> {
        let read = |e: String| ClusterError::Buckets {
            name: self.cluster.clone(),
            message: format!("cannot read bucket `{}-jobs`: {e}", self.cluster),
        };
        let mut keys = self.bucket.keys().await.map_err(|e| read(e.to_string()))?;
        let mut entries = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| read(e.to_string()))?;
            if let Some(bytes) = self
                .bucket
                .get(&key)
                .await
                .map_err(|e| read(e.to_string()))?
                && let Ok(entry) = serde_json::from_slice::<JobEntry>(&bytes)
            {
                entries.push(entry);
            }
        }
        Ok(entries)
    }

    /// The entry of job `id`, if the cluster has it.
    pub async fn find(&self, id: &str) -> Result<Option<JobEntry>, ClusterError> {
        if !super::is_plain_name(id) {
            return Ok(None);
        }
        entry_in(&self.bucket, id)
            .await
            .map_err(|e| ClusterError::Buckets {
                name: self.cluster.clone(),
                message: format!("cannot read bucket `{}`: {e}", bucket_name(&self.cluster)),
            })
    }
}

/// The key-value bucket of cluster `name`'s job directory.
pub(super) fn bucket_name(name: &str) -> String {
    format!("{name}-jobs")
}

/// Job `id`'s entry in the directory's `bucket`, if it has one.
pub(super) async fn entry_in(
    bucket: &kv::Store,
    id: &str,
) -> Result<Option<JobEntry>, kv::EntryError> {
    let bytes = bucket.get(key(id)).await?;
    Ok(bytes.and_then(|b| serde_json::from_slice(&b).ok()))
}
