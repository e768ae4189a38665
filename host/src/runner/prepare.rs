//! Preparing a job: its plugins loaded (each file once), its restore
//! point read and checked against the restore rules (nothing restored
//! yet), its checkpoint store set up: a [`PreparedJob`]. Also where a job's
//! checkpoints, staging and downloads live on the local disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use crate::checkpoint::coordinator::JobCheckpoints;
use crate::checkpoint::metadata::{CheckpointMetadata, PluginRef, ReadMetadata, StateRef};
use crate::checkpoint::remote;
use crate::checkpoint::{CheckpointError, SnapshotKind, restore, savepoint};
use crate::job::{JobGraph, NodeKind};
use crate::plugin::{LoadedPlugin, PluginEngine};
use crate::protocol::{Role, SourcePace, TransferProgress};
use crate::state::Teardown;
use crate::types::{Location, S3Url};

use super::{RunError, new_job_id};

/// How to start a job.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// A checkpoint or savepoint to restore (its directory or `_metadata`).
    pub restore: Option<Location>,
    /// Skip state of uids (or state names) the job no longer has.
    pub allow_non_restored_state: bool,
    /// The restore point is a savepoint this process has just written
    /// (each file hashed as it was stored): its `_metadata` is read, but
    /// its files are not read and hashed again. The running host's
    /// upgrades restore so; anything else is checked in full.
    pub trusted: bool,
    /// Plugins already loaded, by file (an upgrade's check loaded the new
    /// version's before the old one stopped): not loaded again.
    pub loaded: HashMap<PathBuf, Arc<LoadedPlugin>>,
}

/// A job whose plugins are loaded, ready to launch.
#[derive(Debug)]
pub struct PreparedJob {
    pub graph: JobGraph,
    pub job_id: String,
    pub plugins: HashMap<String, Arc<LoadedPlugin>>,
    /// The checkpoint or savepoint the first attempt restores.
    pub restore: Option<ReadMetadata>,
    /// `restore` was trusted, not checked file by file (see
    /// [`RunOptions::trusted`]).
    pub restore_trusted: bool,
    /// This job's checkpoints (None: checkpointing is off).
    pub checkpoints: Option<Arc<JobCheckpoints>>,
    /// The pace sources read at (shared by every attempt's coordinator
    /// and sources; slowed while an upgrade's standby catches up).
    pub pace: Arc<SourcePace>,
    /// Keys and bytes of the savepoint being written (progress).
    pub savepoint_progress: Arc<TransferProgress>,
    /// Keys and bytes restored so far (progress).
    pub restore_progress: Arc<TransferProgress>,
    /// The keyed state of this job's subtasks closing in the background:
    /// an attempt, and the removal of the directory, wait for it.
    pub teardown: Arc<Teardown>,
    /// [`check_connectors`] passed (the first run checks, once).
    pub connectors_checked: std::sync::atomic::AtomicBool,
}

impl PreparedJob {
    /// The job's plugins by file (see [`RunOptions::loaded`]).
    pub fn loaded_plugins(&self) -> HashMap<PathBuf, Arc<LoadedPlugin>> {
        self.graph
            .nodes
            .iter()
            .filter_map(|node| match &node.kind {
                NodeKind::Operator(operator) => Some((
                    operator.plugin.clone(),
                    self.plugins.get(&node.uid)?.clone(),
                )),
                _ => None,
            })
            .collect()
    }

    /// Where this run keeps its working state.
    pub fn state_dir(&self) -> PathBuf {
        self.graph.state.dir.join(&self.job_id)
    }

    /// Where an attempt restores from: the job's newest completed
    /// checkpoint, else the restore point it was started with.
    pub(super) fn restore_point(&self) -> Option<(ReadMetadata, bool)> {
        self.checkpoints
            .as_ref()
            .and_then(|c| c.latest())
            .map(|read| (read, true))
            .or_else(|| self.restore.clone().map(|read| (read, false)))
    }
}

/// Loads every plugin of the job (each file once).
pub fn prepare(engine: &PluginEngine, graph: JobGraph) -> Result<PreparedJob, RunError> {
    prepare_with(engine, graph, &RunOptions::default())
}

/// Loads every plugin of the job and checks the restore point, if any,
/// against the restore rules (nothing is restored yet).
pub fn prepare_with(
    engine: &PluginEngine,
    graph: JobGraph,
    options: &RunOptions,
) -> Result<PreparedJob, RunError> {
    prepare_as(engine, graph, options, new_job_id())
}

/// [`prepare_with`] under a given job id (the running host names its runs).
pub fn prepare_as(
    engine: &PluginEngine,
    graph: JobGraph,
    options: &RunOptions,
    job_id: String,
) -> Result<PreparedJob, RunError> {
    let mut by_file = options.loaded.clone();
    let mut plugins = HashMap::new();
    for node in &graph.nodes {
        if let NodeKind::Operator(operator) = &node.kind {
            let loaded = match by_file.get(&operator.plugin) {
                Some(loaded) => loaded.clone(),
                None => {
                    let loaded =
                        engine
                            .load(&operator.plugin)
                            .map_err(|source| RunError::Plugin {
                                uid: node.uid.clone(),
                                cause: source,
                            })?;
                    by_file.insert(operator.plugin.clone(), loaded.clone());
                    loaded
                }
            };
            // The job file's `state_ttl` over the plugin's declaration.
            let loaded = loaded
                .with_state_ttl(&operator.state_ttl)
                .map_err(|cause| RunError::Plugin {
                    uid: node.uid.clone(),
                    cause,
                })?;
            plugins.insert(node.uid.clone(), loaded);
        }
    }
    let downloaded;
    let restore_path = match &options.restore {
        Some(Location::S3(url)) => {
            // Downloaded, then checked like a local restore point.
            let into = downloads_dir(&graph, &job_id);
            let _ = std::fs::remove_dir_all(&into);
            downloaded = remote::block_on(remote::fetch(url, &into))?;
            Some(downloaded.as_path())
        }
        Some(Location::Local(path)) => Some(path.as_path()),
        None => None,
    };
    let restore = match restore_path {
        Some(path) => {
            // Every file is read and checked before anything is restored.
            let read = if options.trusted {
                crate::checkpoint::metadata::read(path)?
            } else {
                savepoint::validate(path)?
            };
            let declared: HashMap<String, restore::Declared> = plugins
                .iter()
                .map(|(uid, p)| {
                    let declared = restore::Declared {
                        states: p.info.states.clone(),
                        migrates: p.can_migrate(),
                    };
                    (uid.clone(), declared)
                })
                .collect();
            let skipped =
                restore::check(&read, &graph, &declared, options.allow_non_restored_state)?;
            for line in &skipped {
                match graph.task {
                    // A cluster task restores its stage's uids; the job's
                    // other stages restore the rest (what none restores
                    // was checked and named where the job was submitted).
                    Some(_) => tracing::debug!("not restored here: {line}"),
                    None => warn!("not restored (--allow-non-restored-state): {line}"),
                }
            }
            info!(checkpoint = read.metadata.checkpoint, from = %read.path.display(), "restoring");
            Some(read)
        }
        None => None,
    };
    let remote = checkpoint_remote(&graph)
        .map(|url| remote::Remote::open(url).map(|r| r.join(&job_id)))
        .transpose()
        .map_err(CheckpointError::from)?;
    let checkpoints = graph.checkpoint.interval.map(|_| {
        let first = restore.as_ref().map_or(1, |r| r.metadata.checkpoint + 1);
        let checkpoints = JobCheckpoints::new(
            checkpoint_root(&graph).join(&job_id),
            graph.checkpoint.retained as usize,
            first,
        );
        Arc::new(match remote {
            Some(remote) => checkpoints.with_remote(remote),
            None => checkpoints,
        })
    });
    Ok(PreparedJob {
        graph,
        job_id,
        plugins,
        restore_trusted: options.trusted && restore.is_some(),
        restore,
        checkpoints,
        pace: Arc::default(),
        savepoint_progress: Arc::default(),
        restore_progress: Arc::default(),
        teardown: Arc::default(),
        connectors_checked: Default::default(),
    })
}

/// Where savepoints for object storage are written before they are
/// uploaded (removed when the run ends).
pub(super) fn savepoint_staging(job: &PreparedJob) -> PathBuf {
    job.graph
        .state
        .dir
        .join("savepoint-staging")
        .join(&job.job_id)
}

/// Where a restore point on object storage is downloaded to.
pub(super) fn downloads_dir(graph: &JobGraph, job_id: &str) -> PathBuf {
    graph.state.dir.join("downloads").join(job_id)
}

/// `[checkpoint] dir` when it is on object storage (`s3://bucket/prefix`).
pub fn checkpoint_remote(graph: &JobGraph) -> Option<&S3Url> {
    match graph.checkpoint.dir.as_ref()? {
        Location::S3(url) => Some(url),
        Location::Local(_) => None,
    }
}

/// `[checkpoint] dir`, by default `weir-data/checkpoints` beside the job
/// file; for a dir on object storage, the local staging directory its
/// checkpoints are written to before they are mirrored
/// (`<state dir>/checkpoint-staging`).
pub fn checkpoint_root(graph: &JobGraph) -> PathBuf {
    if checkpoint_remote(graph).is_some() {
        return graph.state.dir.join("checkpoint-staging");
    }
    let local = graph.checkpoint.dir.as_ref().and_then(Location::local);
    local.map(Path::to_path_buf).unwrap_or_else(|| {
        graph
            .file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join("weir-data/checkpoints")
    })
}

/// The `_metadata` of this job without subtasks.
pub(super) fn metadata_template(job: &PreparedJob) -> CheckpointMetadata {
    let operators = job
        .graph
        .nodes
        .iter()
        .map(|node| {
            let role = match node.kind {
                NodeKind::Source(_) => Role::Source,
                NodeKind::Operator(_) => Role::Operator,
                NodeKind::Sink(_) => Role::Sink,
            };
            let mut op = crate::checkpoint::coordinator::operator_template(role, node.parallelism);
            if let Some(plugin) = job.plugins.get(&node.uid) {
                op.plugin = Some(PluginRef {
                    name: plugin.info.name.clone(),
                    version: plugin.info.version.clone(),
                    digest: plugin.digest.clone(),
                });
                op.states = plugin
                    .info
                    .states
                    .iter()
                    .map(|s| StateRef {
                        name: s.name.clone(),
                        kind: s.kind.to_string(),
                        schema_version: s.schema_version,
                        ttl: s.ttl,
                    })
                    .collect();
            }
            (node.uid.clone(), op)
        })
        .collect();
    CheckpointMetadata {
        kind: SnapshotKind::Checkpoint,
        job_id: job.job_id.clone(),
        job_name: job.graph.name.clone(),
        checkpoint: 0,
        completed_ms: 0,
        max_parallelism: job.graph.max_parallelism,
        operators,
        exchanges: Default::default(),
    }
}
