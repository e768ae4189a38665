//! The embedded runner: everything `weir run` does in one process. It loads
//! a job's plugins (validated, compiled, cached), checks a restore point
//! against the design's restore rules, opens per-subtask keyed state
//! (RocksDB by default) restored from it, implements the dataflow's
//! [`TaskFactory`] with the connectors and [`WasmOperator`]s, and restarts
//! failed attempts from the latest completed checkpoint as the job's
//! restart strategy allows.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{Instrument, debug, info, warn};

use crate::checkpoint::coordinator::{
    CheckpointMetrics, Coordinator, CoordinatorSettings, JobCheckpoints, Savepointer,
};
use crate::checkpoint::metadata::{
    CheckpointMetadata, OperatorSnapshot, PluginRef, ReadMetadata, StateRef,
};
use crate::checkpoint::remote;
use crate::checkpoint::standby::Standby;
use crate::checkpoint::storage::SubtaskStorage;
use crate::checkpoint::{CheckpointError, SnapshotKind, restore, savepoint};
use crate::connectors::file::FileSource;
use crate::connectors::generator::GeneratorSource;
use crate::connectors::nats::{NatsSink, NatsSource};
use crate::connectors::sinks::{BlackholeSink, FileSink, StdoutSink, recover_file_sink};
use crate::connectors::socket::SocketSource;
use crate::dataflow::metrics::JobMetrics;
use crate::dataflow::runtime::{self, JobOutcome, NodeMetrics, RunningJob};
use crate::dataflow::task::Reports;
use crate::dataflow::{
    Collector, Operator, OperatorError, Sink, Source, TaskContext, TaskError, TaskFactory, TaskInfo,
};
use crate::job::{BackendKind, JobGraph, Node, NodeKind, SinkKind, SourceKind};
use crate::plugin::migrate::Migrator;
use crate::plugin::{LoadedPlugin, PluginEngine, PluginError, WasmOperator};
use crate::protocol::{Role, SnapshotStore, SourcePace, TransferProgress};
use crate::restart::{RestartDecision, RestartStrategy, RestartTracker};
use crate::state::memory::MemoryBackend;
use crate::state::rocks::RocksBackend;
use crate::state::{KeyedState, StateBackend, Teardown};
use crate::types::{Location, S3Url, key_group};

/// Errors starting or running a job embedded.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Job(#[from] crate::job::JobError),
    #[error("operator `{uid}`: {cause}")]
    Plugin { uid: String, cause: PluginError },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("job `{job}` failed: {cause}")]
    Task { job: String, cause: TaskError },
    #[error("job `{job}` cannot start:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Connectors { job: String, problems: Vec<String> },
    #[error("job `{job}` failed for good ({reason}); the last failure: {cause}")]
    GaveUp {
        job: String,
        reason: String,
        cause: TaskError,
    },
}

impl RunError {
    /// The task failure behind this error, if it is one.
    pub fn task_error(&self) -> Option<&TaskError> {
        match self {
            RunError::Task { cause, .. } | RunError::GaveUp { cause, .. } => Some(cause),
            _ => None,
        }
    }
}

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
    /// While it reads `true`, completed checkpoints are not committed by
    /// the sinks (see [`Coordinator::commit_hold`]); set by the running
    /// host during an upgrade's probation.
    pub commit_hold: Option<tokio::sync::watch::Receiver<bool>>,
    /// The new version's state restored ahead by an upgrade (see
    /// [`Standby`]): subtasks it follows take their state from it.
    pub standby: Option<Arc<Standby>>,
    /// Ids of earlier runs whose uncommitted sink files this job discards
    /// when it starts (a version that failed its probation).
    pub discard_runs: Vec<String>,
    /// Savepoint directories are named after this id instead of
    /// `job_id` (the running host: after the job, not the run).
    pub savepoint_job_id: Option<String>,
    /// Whether operator subtasks count their keys when they end (a flush
    /// and a full scan, for `weir run`'s summary). The running host turns
    /// it off: it would hold up every stop and upgrade.
    pub count_keys_at_end: bool,
    /// Close each subtask's keyed state and remove the working state
    /// directory at the end on background threads, without waiting for
    /// them (a long-lived process: the running host, whose next run must
    /// not wait for a large cache to be freed or a directory to go).
    pub remove_state_in_background: bool,
    /// The keyed state of this job's subtasks closing in the background:
    /// an attempt, and the removal of the directory, wait for it.
    pub teardown: Arc<Teardown>,
    /// Restarts and failures across attempts (the running host shares one
    /// across a job's runs).
    pub metrics: Arc<JobMetrics>,
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
    fn restore_point(&self) -> Option<(ReadMetadata, bool)> {
        self.checkpoints
            .as_ref()
            .and_then(|c| c.latest())
            .map(|read| (read, true))
            .or_else(|| self.restore.clone().map(|read| (read, false)))
    }
}

/// A new random job id (32 hex digits, like Flink's).
pub fn new_job_id() -> String {
    crate::checkpoint::storage::random_hex(16)
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
                warn!("not restored (--allow-non-restored-state): {line}");
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
        commit_hold: None,
        standby: None,
        discard_runs: Vec::new(),
        savepoint_job_id: None,
        count_keys_at_end: true,
        remove_state_in_background: false,
        teardown: Arc::default(),
        metrics: Arc::default(),
        connectors_checked: Default::default(),
    })
}

/// Where savepoints for object storage are written before they are
/// uploaded (removed when the run ends).
fn savepoint_staging(job: &PreparedJob) -> PathBuf {
    job.graph
        .state
        .dir
        .join("savepoint-staging")
        .join(&job.job_id)
}

/// Where a restore point on object storage is downloaded to.
fn downloads_dir(graph: &JobGraph, job_id: &str) -> PathBuf {
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

/// Builds a native (Rust) operator for a subtask from its context: operators
/// compiled into the host, run by the same runtime as plugins (benchmarks
/// compare the two).
pub type NativeOperator = Arc<dyn Fn(TaskContext) -> Box<dyn Operator> + Send + Sync>;

struct Factory<'a> {
    job: &'a PreparedJob,
    native: &'a HashMap<String, NativeOperator>,
    /// The restore point of this attempt, and whether it is this job's own
    /// checkpoint (its shared files may then be referenced again).
    restore: Option<(&'a ReadMetadata, bool)>,
}

impl Factory<'_> {
    fn task_error(info: &TaskInfo, error: OperatorError) -> TaskError {
        TaskError {
            uid: info.uid.to_string(),
            subtask: info.subtask,
            error,
        }
    }

    fn restore_error(info: &TaskInfo, error: impl std::fmt::Display) -> TaskError {
        Self::task_error(
            info,
            OperatorError::new(
                crate::dataflow::FailureKind::State,
                format!("restoring state: {error}"),
            ),
        )
    }

    fn restored(&self, uid: &str) -> Option<(&ReadMetadata, &OperatorSnapshot)> {
        let (read, _) = self.restore?;
        Some((read, read.metadata.operators.get(uid)?))
    }

    /// Opens an operator subtask's keyed state, restored if the restore
    /// point has state for its uid: file for file when the key-group range
    /// and states are unchanged, else cell by cell for its key groups, with
    /// values of changed schema versions migrated by `plugin`.
    fn open_state(
        &self,
        node: &Node,
        info: &TaskInfo,
        plugin: &Arc<LoadedPlugin>,
        limits: &crate::job::Limits,
        storage: Option<&SubtaskStorage>,
    ) -> Result<KeyedState, TaskError> {
        let states = plugin.info.states.as_slice();
        let settings = &self.job.graph.state;
        let tables = crate::state::table_names(&node.uid, states.iter().map(|s| s.name.as_str()));
        let range = key_group::range_of(info.subtask, info.parallelism, info.max_parallelism);
        let key_groups = [range.start, range.end];
        let restored = self.restored(&node.uid);
        let mut migrator = match restored {
            Some((_, op)) => Migrator::for_restore(&node.uid, plugin, limits, op)
                .map_err(|e| Self::restore_error(info, e))?,
            None => None,
        };
        let dir = self
            .job
            .state_dir()
            .join(format!("{}-{}", node.uid, info.subtask));
        // The stored subtask restored file for file (or taken from the
        // standby), and how many of its deltas that state holds already.
        let mut restored_from = None;
        let mut backend: Box<dyn StateBackend> = if states.is_empty()
            || settings.backend == BackendKind::Memory
        {
            Box::new(MemoryBackend::new(states.len()))
        } else if let (Some((_, op)), Some(standby)) = (restored, &self.job.standby)
            && let Some((backend, stored, applied)) = standby
                .take(&node.uid, op, key_groups, &dir)
                .map_err(|e| Self::restore_error(info, e))?
        {
            debug!(uid = %node.uid, subtask = info.subtask, "state taken from the upgrade's standby");
            restored_from = Some((stored, applied));
            Box::new(backend)
        } else {
            if let Some((read, op)) = restored
                && migrator.is_none()
                && let Some(whole) = restore::whole_files(op, key_groups, states)
            {
                // Only the restore point the job was prepared with may be
                // trusted, not its own checkpoints (a restart).
                let trusted = self.job.restore_trusted && !self.restore.is_some_and(|(_, own)| own);
                restore::install_files(read, &whole.files, &dir, trusted)
                    .map_err(|e| Self::restore_error(info, e))?;
                if let (Some(storage), Some((_, true))) = (storage, self.restore) {
                    storage.seed(whole.files.iter().cloned());
                }
                restored_from = Some((whole, 0));
            }
            Box::new(
                RocksBackend::open(&dir, &tables).map_err(|e| Self::task_error(info, e.into()))?,
            )
        };
        let mut sink = restore::CellSink {
            range: range.clone(),
            tables: &tables,
            backend: backend.as_mut(),
            progress: &self.job.restore_progress,
            migrate: migrator
                .as_mut()
                .map(|m| m as &mut dyn restore::MigrateCells),
        };
        if let (Some((read, _)), Some((stored, applied))) = (restored, restored_from) {
            restore::apply_delta_files(read, &stored.deltas[applied..], &mut sink)
                .map_err(|e| Self::restore_error(info, e))?;
        }
        if let Some((read, op)) = restored
            && restored_from.is_none()
        {
            // Per new subtask: subtasks restore in parallel, several of
            // them from the same stored subtask when rescaling.
            let work = self
                .job
                .state_dir()
                .join("restore")
                .join(format!("{}-{}", node.uid, info.subtask));
            restore::load_cells(read, &node.uid, op, &work, &mut sink)
                .map_err(|e| Self::restore_error(info, e))?;
        }
        if let Some(migrator) = &migrator {
            info!(
                uid = %node.uid,
                subtask = info.subtask,
                values = migrator.migrated,
                states = ?migrator.describe(),
                "migrated state to the plugin's schema versions"
            );
        }
        let mut keyed = KeyedState::new(
            tables
                .into_iter()
                .zip(states.iter().map(|s| s.kind))
                .collect(),
            backend,
            info.max_parallelism,
            settings.cache_entries,
        );
        keyed.set_count_keys(self.job.count_keys_at_end);
        if self.job.remove_state_in_background {
            keyed.close_in_background(self.job.teardown.clone());
        }
        Ok(keyed)
    }
}

impl TaskFactory for Factory<'_> {
    fn source(&self, node: &Node, info: &TaskInfo) -> Result<Box<dyn Source>, TaskError> {
        let NodeKind::Source(source) = &node.kind else {
            unreachable!("source() is called for source nodes only")
        };
        let position = self
            .restore
            .and_then(|(read, _)| restore::source_position(read, &node.uid, info.subtask));
        Ok(match &source.kind {
            SourceKind::File { path, rate } => Box::new(FileSource::new(
                path.clone(),
                self.job.graph.roots.clone(),
                source.format.clone(),
                position.unwrap_or(0),
                *rate,
            )),
            SourceKind::Generator {
                count,
                rate,
                keys,
                seed,
            } => Box::new(GeneratorSource::new(
                *count,
                *rate,
                *keys,
                *seed,
                info.subtask,
                info.parallelism,
                position,
            )),
            // Not replayable: a restored socket source reads on from now.
            SourceKind::Socket { address } => {
                Box::new(SocketSource::new(address.clone(), source.format.clone()))
            }
            SourceKind::Nats(nats) => {
                let restored = self
                    .restore
                    .map(|(read, _)| restore::source_partitions(read, &node.uid))
                    .unwrap_or_default();
                Box::new(NatsSource::new(
                    nats.clone(),
                    source.format.clone(),
                    info.subtask,
                    info.parallelism,
                    &restored,
                ))
            }
        })
    }

    fn operator(
        &self,
        node: &Node,
        info: TaskInfo,
        output: Collector,
        reports: &Reports,
    ) -> Result<runtime::OperatorTask, TaskError> {
        let NodeKind::Operator(operator) = &node.kind else {
            unreachable!("operator() is called for operator nodes only")
        };
        let plugin = self.job.plugins[&node.uid].clone();
        if let Some(native) = self.native.get(&node.uid) {
            let keyed = KeyedState::new(
                Vec::new(),
                Box::new(MemoryBackend::new(0)),
                info.max_parallelism,
                1,
            );
            return Ok((native(TaskContext::new(info, keyed, output)), None));
        }
        let range = key_group::range_of(info.subtask, info.parallelism, info.max_parallelism);
        // Checkpoints (when on) and savepoints (always possible) go here.
        let storage = Arc::new(SubtaskStorage::new(
            checkpoint_root(&self.job.graph).join(&self.job.job_id),
            &node.uid,
            info.subtask,
            [range.start, range.end],
            self.job
                .state_dir()
                .join("snapshots")
                .join(format!("{}-{}", node.uid, info.subtask)),
            reports.clone(),
            self.job.savepoint_progress.clone(),
        ));
        let keyed = self.open_state(node, &info, &plugin, &operator.limits, Some(&storage))?;
        let mut task = TaskContext::new(info.clone(), keyed, output);
        if let Some((read, op)) = self.restored(&node.uid) {
            let max_parallelism = info.max_parallelism;
            restore::load_timers(read, op, |bytes| {
                task.timers.restore(bytes, |key| {
                    range.contains(&u32::from(key_group::of_key(key, max_parallelism)))
                })
            })
            .map_err(|e| Self::restore_error(&info, e))?;
            // Restored from a final checkpoint: its input had ended and
            // `close` ran before it.
            task.closed = op.subtasks.iter().any(|s| s.finished);
        }
        let wasm = WasmOperator::instantiate(plugin, task, operator)
            .map_err(|e| Self::task_error(&info, e))?;
        Ok((
            Box::new(wasm),
            Some(Box::new(storage) as Box<dyn SnapshotStore>),
        ))
    }

    fn sink(&self, node: &Node, info: &TaskInfo) -> Result<Box<dyn Sink>, TaskError> {
        let NodeKind::Sink(kind) = &node.kind else {
            unreachable!("sink() is called for sink nodes only")
        };
        let first = self
            .restore
            .map_or(1, |(read, _)| read.metadata.checkpoint + 1);
        Ok(match kind {
            SinkKind::Stdout => Box::new(StdoutSink),
            SinkKind::File { path } => Box::new(
                FileSink::create(
                    path,
                    self.job.graph.roots.as_deref(),
                    &self.job.job_id,
                    info.subtask,
                    first,
                )
                .map_err(|e| Self::task_error(info, e))?,
            ),
            SinkKind::Blackhole => Box::new(BlackholeSink::default()),
            SinkKind::Nats(nats) => {
                // The restored checkpoint's unpublished epochs: a stored
                // subtask's go to the new subtask it maps to.
                let recover = self
                    .restore
                    .and_then(|(read, _)| {
                        let op = read.metadata.operators.get(&node.uid)?;
                        Some(
                            op.subtasks
                                .iter()
                                .filter(|s| s.subtask % info.parallelism == info.subtask)
                                .flat_map(|s| s.pending.iter().map(|p| read.base.join(p)))
                                .collect(),
                        )
                    })
                    .unwrap_or_default();
                Box::new(
                    NatsSink::create(
                        nats.clone(),
                        &self.job.job_id,
                        &node.uid,
                        info.subtask,
                        &checkpoint_root(&self.job.graph).join(&self.job.job_id),
                        first,
                        recover,
                    )
                    .map_err(|e| Self::task_error(info, e))?,
                )
            }
        })
    }
}

/// The `_metadata` of this job without subtasks.
fn metadata_template(job: &PreparedJob) -> CheckpointMetadata {
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
    }
}

/// Before an attempt: a clean working directory, no leftovers of aborted
/// checkpoints, and every file sink's directory settled for the restore
/// point (its pending files committed, later in-progress files removed).
fn prepare_attempt(
    job: &PreparedJob,
    restore: Option<(&ReadMetadata, bool)>,
) -> Result<(), RunError> {
    // The previous attempt's state may still be closing in its directory.
    job.teardown.wait();
    let dir = job.state_dir();
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Some(checkpoints) = &job.checkpoints {
        checkpoints.collect_garbage();
    }
    if job
        .graph
        .nodes
        .iter()
        .any(|n| matches!(n.kind, NodeKind::Sink(SinkKind::Nats(_))))
    {
        // Spool files the restored checkpoint does not list were written
        // after it: the attempt replays them.
        let job_dir = checkpoint_root(&job.graph).join(&job.job_id);
        let keep: Vec<String> = restore
            .filter(|(read, _)| read.base == job_dir)
            .map(|(read, _)| {
                read.metadata
                    .operators
                    .values()
                    .flat_map(|op| &op.subtasks)
                    .flat_map(|s| s.pending.iter().cloned())
                    .collect()
            })
            .unwrap_or_default();
        crate::connectors::nats::settle_spool(&job_dir, &keep);
    }
    for node in &job.graph.nodes {
        let NodeKind::Sink(SinkKind::File { path }) = &node.kind else {
            continue;
        };
        let mut job_ids = vec![job.job_id.as_str()];
        job_ids.extend(job.discard_runs.iter().map(String::as_str));
        let mut pending = Vec::new();
        let mut missing_ok = false;
        if let Some((read, _)) = restore {
            // A savepoint's files were committed when it completed, and it
            // may be restored far from where its output went.
            missing_ok = read.metadata.kind == SnapshotKind::Savepoint;
            job_ids.push(read.metadata.job_id.as_str());
            if let Some(op) = read.metadata.operators.get(&node.uid) {
                pending.extend(op.subtasks.iter().flat_map(|s| s.pending.iter().cloned()));
            }
        }
        let roots = job.graph.roots.as_deref();
        let committed =
            recover_file_sink(path, roots, &job_ids, &pending, missing_ok).map_err(|error| {
                RunError::Task {
                    job: job.graph.name.clone(),
                    cause: TaskError {
                        uid: node.uid.clone(),
                        subtask: 0,
                        error,
                    },
                }
            })?;
        if committed > 0 {
            info!(uid = %node.uid, committed, "committed the restored checkpoint's pending files");
        }
    }
    Ok(())
}

/// A running attempt of a prepared job: its tasks, and the handles the
/// embedded CLI and the running host use while it runs (its coordinator's
/// [`Savepointer`], its checkpoint counters).
#[derive(Debug)]
pub struct Attempt {
    running: RunningJob,
    savepointer: Savepointer,
    checkpoints: Option<Arc<CheckpointMetrics>>,
    savepoint_progress: Arc<TransferProgress>,
}

impl Attempt {
    /// Live counters per node.
    pub fn metrics(&self) -> &[Arc<NodeMetrics>] {
        self.running.metrics()
    }

    /// Checkpoint counters (None: checkpointing is off).
    pub fn checkpoint_metrics(&self) -> Option<Arc<CheckpointMetrics>> {
        self.checkpoints.clone()
    }

    /// Keys and bytes of the savepoint being written (progress).
    pub fn savepoint_progress(&self) -> Arc<TransferProgress> {
        self.savepoint_progress.clone()
    }

    /// A handle that asks the attempt's coordinator for savepoints.
    pub fn savepointer(&self) -> Savepointer {
        self.savepointer.clone()
    }

    /// Asks the sources to stop; the rest of the job drains and ends.
    pub fn cancel(&self) {
        self.running.cancel();
    }

    /// A handle that can cancel the attempt from elsewhere.
    pub fn canceller(&self) -> tokio::sync::watch::Sender<bool> {
        self.running.canceller()
    }

    /// Waits for every task (see [`RunningJob::wait`]).
    pub async fn wait(self) -> Result<JobOutcome, TaskError> {
        self.running.wait().await
    }
}

/// Creates every subtask and starts the job on the current tokio runtime,
/// restored from the latest completed checkpoint of this job, else from the
/// restore point it was prepared with.
pub fn launch(job: &PreparedJob) -> Result<Attempt, RunError> {
    launch_with_native(job, &HashMap::new())
}

/// Like [`launch`], with the operators named in `native` (by uid) replaced
/// by native implementations.
pub fn launch_with_native(
    job: &PreparedJob,
    native: &HashMap<String, NativeOperator>,
) -> Result<Attempt, RunError> {
    let point = job.restore_point();
    let restore = point.as_ref().map(|(read, own)| (read, *own));
    prepare_attempt(job, restore)?;
    let factory = Factory {
        job,
        native,
        restore,
    };
    if restore.is_some() {
        job.restore_progress.start();
    }
    let settings = &job.graph.checkpoint;
    let coordinator = Coordinator {
        settings: CoordinatorSettings {
            interval: settings.interval,
            timeout: settings.timeout.unwrap_or(Duration::from_secs(600)),
            min_pause: settings.min_pause.unwrap_or_default(),
            tolerable_failures: settings.tolerable_failures,
        },
        store: job.checkpoints.clone(),
        template: metadata_template(job),
        pace: job.pace.clone(),
        savepoint_progress: job.savepoint_progress.clone(),
        first_id: job
            .restore
            .as_ref()
            .map_or(1, |r| r.metadata.checkpoint + 1),
        commit_hold: job.commit_hold.clone(),
        savepoint_job_id: job.savepoint_job_id.clone(),
        savepoint_staging: savepoint_staging(job),
    };
    let (savepointer, requests) = Savepointer::channel();
    let checkpoints = job.checkpoints.as_ref().map(|c| c.metrics.clone());
    let span = tracing::info_span!("coordinator", job = %job.job_id);
    let launched = runtime::launch(
        &job.graph,
        &job.job_id,
        &factory,
        job.pace.clone(),
        move |wiring| tokio::spawn(coordinator.run(wiring, requests).instrument(span)),
    );
    job.restore_progress.finish();
    let running = launched.map_err(|source| RunError::Task {
        job: job.graph.name.clone(),
        cause: source,
    })?;
    Ok(Attempt {
        running,
        savepointer,
        checkpoints,
        savepoint_progress: job.savepoint_progress.clone(),
    })
}

/// Called with each running attempt (e.g. to show progress or wire Ctrl-C).
pub type AttemptHook<'a> = &'a mut dyn FnMut(&Attempt);

/// Watches a run's attempts: told of each launch, asked at each failure
/// whether the restart strategy may decide, told of each restart.
pub trait RunObserver {
    /// An attempt is running.
    fn launched(&mut self, attempt: &Attempt);
    /// An attempt failed (or could not start). `Some(reason)`: do not
    /// restart; the run ends with this error. `None`: the restart strategy
    /// decides.
    fn failed(&mut self, _error: &TaskError) -> Option<String> {
        None
    }
    /// The restart strategy restarts the job after `delay` from `from`.
    fn restarting(&mut self, _error: &TaskError, _attempt: u32, _delay: Duration, _from: &str) {}
}

/// [`RunObserver`] for a plain hook: the restart is printed on stderr.
struct HookObserver<'a>(AttemptHook<'a>);

impl RunObserver for HookObserver<'_> {
    fn launched(&mut self, attempt: &Attempt) {
        (self.0)(attempt)
    }

    fn restarting(&mut self, error: &TaskError, attempt: u32, delay: Duration, from: &str) {
        eprintln!(
            "weir: {error}; restart {attempt} in {} from {from}",
            crate::human::duration(delay)
        );
    }
}

/// Runs a prepared job to its end: launches it, and on a failure restarts
/// every task from the latest completed checkpoint as the restart strategy
/// allows. Removes the working state directory at the end.
pub async fn run(
    job: &PreparedJob,
    hook: AttemptHook<'_>,
) -> Result<runtime::JobOutcome, RunError> {
    run_observed(job, &HashMap::new(), &mut HookObserver(hook)).await
}

/// [`run`] with native operators (see [`launch_with_native`]).
pub async fn run_with_native(
    job: &PreparedJob,
    native: &HashMap<String, NativeOperator>,
    hook: AttemptHook<'_>,
) -> Result<runtime::JobOutcome, RunError> {
    run_observed(job, native, &mut HookObserver(hook)).await
}

/// [`run_with_native`] with an observer of every attempt.
pub async fn run_observed<O: RunObserver + ?Sized>(
    job: &PreparedJob,
    native: &HashMap<String, NativeOperator>,
    observer: &mut O,
) -> Result<runtime::JobOutcome, RunError> {
    let strategy = RestartStrategy::from_settings(&job.graph.restart).map_err(|problems| {
        crate::job::JobError::Invalid {
            file: job.graph.file.clone(),
            problems,
        }
    })?;
    check_connectors(job).await?;
    let mut tracker = RestartTracker::new(strategy);
    let result = loop {
        let launched = launch_with_native(job, native);
        if let Some(standby) = &job.standby {
            // Its state went to the first attempt's subtasks, if anywhere.
            standby.release();
        }
        let attempt = match launched {
            Ok(running) => {
                observer.launched(&running);
                running.wait().await
            }
            Err(RunError::Task { cause, .. }) => Err(cause),
            Err(other) => break Err(other),
        };
        let error = match attempt {
            Ok(outcome) => break Ok(outcome),
            Err(error) => error,
        };
        job.metrics.failed(&error);
        if let Some(reason) = observer.failed(&error) {
            break Err(RunError::GaveUp {
                job: job.graph.name.clone(),
                reason,
                cause: error,
            });
        }
        // In [0, 1): 53 random bits.
        let jitter = (crate::checkpoint::storage::random_u64() >> 11) as f64 / (1u64 << 53) as f64;
        match tracker.on_failure(Instant::now(), jitter) {
            RestartDecision::Restart { delay, attempt } => {
                let from = job
                    .checkpoints
                    .as_ref()
                    .and_then(|c| c.latest())
                    .map(|r| format!("checkpoint {}", r.metadata.checkpoint))
                    .or_else(|| {
                        job.restore
                            .as_ref()
                            .map(|r| format!("the restore point {}", r.path.display()))
                    })
                    .unwrap_or_else(|| "the beginning (no checkpoint yet)".to_string());
                warn!(%error, attempt, ?delay, "job failed; restarting from {from}");
                observer.restarting(&error, attempt, delay, &from);
                job.metrics
                    .restarts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(delay).await;
            }
            RestartDecision::GiveUp { reason } => {
                break Err(RunError::GaveUp {
                    job: job.graph.name.clone(),
                    reason,
                    cause: error,
                });
            }
        }
    };
    let dir = job.state_dir();
    let teardown = job.teardown.clone();
    let staging =
        checkpoint_remote(&job.graph).map(|_| checkpoint_root(&job.graph).join(&job.job_id));
    let downloads = downloads_dir(&job.graph, &job.job_id);
    let savepoints = savepoint_staging(job);
    let remove = move || {
        // Durable copies are remote: the local staging of checkpoints and
        // savepoints and a downloaded restore point go.
        for local in staging.iter().chain([&downloads, &savepoints]) {
            if local.exists() {
                let _ = std::fs::remove_dir_all(local);
            }
        }
        teardown.wait();
        if dir.exists()
            && let Err(error) = std::fs::remove_dir_all(&dir)
        {
            warn!(dir = %dir.display(), %error, "could not remove the job's working state");
        }
    };
    if job.remove_state_in_background {
        if !crate::state::in_background("weir-state-remove", remove) {
            warn!(dir = %job.state_dir().display(), "no thread to remove the job's working state: it stays");
        }
    } else {
        remove();
    }
    if let Ok(outcome) = &result {
        info!(job = %job.graph.name, cancelled = outcome.cancelled, "job finished");
    }
    result
}

/// Checks the job's external connectors before anything is written: the
/// servers answer, their streams exist, settings they keep (a stream's
/// duplicate window) suit the job's. Once per prepared job.
pub async fn check_connectors(job: &PreparedJob) -> Result<(), RunError> {
    use std::sync::atomic::Ordering;
    if job.connectors_checked.load(Ordering::Relaxed) {
        return Ok(());
    }
    let strategy = RestartStrategy::from_settings(&job.graph.restart).map_err(|problems| {
        crate::job::JobError::Invalid {
            file: job.graph.file.clone(),
            problems,
        }
    })?;
    let mut problems = crate::connectors::nats::check(&job.graph, strategy.longest_delay())
        .await
        .err()
        .unwrap_or_default();
    if let Some(url) = checkpoint_remote(&job.graph) {
        let checked = match remote::Remote::open(url) {
            Ok(remote) => remote.check().await,
            Err(error) => Err(error),
        };
        if let Err(error) = checked {
            problems.push(format!("[checkpoint] dir {error}"));
        }
    }
    if !problems.is_empty() {
        return Err(RunError::Connectors {
            job: job.graph.name.clone(),
            problems,
        });
    }
    job.connectors_checked.store(true, Ordering::Relaxed);
    Ok(())
}

/// Loads, launches and runs a job file to its end: the library form of
/// `weir run` without progress output.
pub async fn run_file(engine: &PluginEngine, path: &Path) -> Result<runtime::JobOutcome, RunError> {
    let graph = JobGraph::load(path)?;
    let job = prepare(engine, graph)?;
    run(&job, &mut |_| {}).await
}
