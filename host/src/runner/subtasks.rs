//! The subtasks of an attempt: the dataflow's [`TaskFactory`] with the
//! connectors (sources and sinks) and Wasm operators, each operator
//! subtask's keyed state opened and restored (file for file, from an
//! upgrade's standby, or cell by cell, migrated where needed); and, before
//! an attempt, the sinks' directories settled for its restore point.

use std::collections::HashMap;
use std::sync::Arc;

use tracing::{debug, info};

use crate::checkpoint::metadata::{OperatorSnapshot, ReadMetadata};
use crate::checkpoint::storage::SubtaskStorage;
use crate::checkpoint::{SnapshotKind, restore};
use crate::connectors::exchange::{ExchangeSource, Producer};
use crate::connectors::file::FileSource;
use crate::connectors::generator::GeneratorSource;
use crate::connectors::kafka::{sink::KafkaSink, source::KafkaSource};
use crate::connectors::nats::{NatsSink, NatsSource};
use crate::connectors::sinks::{BlackholeSink, FileSink, StdoutSink, recover_file_sink};
use crate::connectors::socket::SocketSource;
use crate::dataflow::runtime::{self};
use crate::dataflow::task::Reports;
use crate::dataflow::{
    Collector, Operator, OperatorError, Sink, Source, TaskContext, TaskError, TaskFactory, TaskInfo,
};
use crate::job::{BackendKind, Node, NodeKind, SinkKind, SourceKind};
use crate::plugin::migrate::Migrator;
use crate::plugin::{LoadedPlugin, WasmOperator};
use crate::protocol::SnapshotStore;
use crate::state::memory::MemoryBackend;
use crate::state::rocks::RocksBackend;
use crate::state::{KeyedState, StateBackend};
use crate::types::key_group;

use super::{PreparedJob, RunError, RunSettings, checkpoint_root};

/// Builds a native (Rust) operator for a subtask from its context: operators
/// compiled into the host, run by the same runtime as plugins (benchmarks
/// compare the two).
pub type NativeOperator = Arc<dyn Fn(TaskContext) -> Box<dyn Operator> + Send + Sync>;

pub(super) struct Factory<'a> {
    pub job: &'a PreparedJob,
    pub settings: &'a RunSettings,
    pub native: &'a HashMap<String, NativeOperator>,
    /// The restore point of this attempt, and whether it is this job's own
    /// checkpoint (its shared files may then be referenced again).
    pub restore: Option<(&'a ReadMetadata, bool)>,
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
        let ttls: Vec<_> = states.iter().map(|s| s.ttl).collect();
        let restamp = restored
            .map(|(_, op)| restore::Restamp::new(op, states))
            .unwrap_or_default();
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
        } else if let (Some((_, op)), Some(standby)) = (restored, &self.settings.standby)
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
                && restamp.keeps_format()
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
                RocksBackend::open_expiring(&dir, &tables, &ttls)
                    .map_err(|e| Self::task_error(info, e.into()))?,
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
            restamp,
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
        keyed.set_ttls(&ttls);
        keyed.set_count_keys(self.settings.count_keys_at_end);
        keyed.set_limits(crate::state::quota::StateLimits {
            value_bytes: limits.value_bytes,
            state_bytes: limits.state_bytes,
        });
        if self.settings.remove_state_in_background {
            keyed.close_in_background(self.job.teardown.clone());
        }
        Ok(keyed)
    }
}

impl Factory<'_> {
    /// The restored checkpoint's unpublished epochs of spooling sink
    /// `node` (`nats`, `exchange`): a stored subtask's go to the new
    /// subtask it maps to.
    fn recover_spools(&self, node: &Node, info: &TaskInfo) -> Vec<std::path::PathBuf> {
        self.restore
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
            .unwrap_or_default()
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
            SourceKind::Exchange(exchange) => {
                let restored = self
                    .restore
                    .map(|(read, _)| restore::source_partitions(read, &node.uid))
                    .unwrap_or_default();
                Box::new(ExchangeSource::new(
                    exchange.clone(),
                    info.subtask,
                    info.parallelism,
                    info.max_parallelism,
                    &restored,
                ))
            }
            SourceKind::Kafka(kafka) => {
                // Restored: every stored subtask's partition positions
                // (None: a fresh start, or a restore point without this
                // source).
                let restored = self.restore.and_then(|(read, _)| {
                    read.metadata.operators.get(&node.uid)?;
                    Some(restore::source_partitions(read, &node.uid))
                });
                Box::new(KafkaSource::new(
                    kafka.clone(),
                    source.format.clone(),
                    info.subtask,
                    info.parallelism,
                    restored,
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
            SinkKind::Exchange(exchange) => Box::new(
                NatsSink::exchange(
                    Producer {
                        exchange: exchange.clone(),
                        subtask: info.subtask,
                        parallelism: info.parallelism,
                        max_parallelism: info.max_parallelism,
                    },
                    &self.job.job_id,
                    &node.uid,
                    &checkpoint_root(&self.job.graph).join(&self.job.job_id),
                    first,
                    self.recover_spools(node, info),
                )
                .map_err(|e| Self::task_error(info, e))?,
            ),
            SinkKind::Nats(nats) => {
                let recover = self.recover_spools(node, info);
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
            SinkKind::Kafka(kafka) => {
                // The restore point's subtasks of this sink and what each
                // recorded as pre-committed.
                let stored: Vec<(u32, Vec<String>)> = self
                    .restore
                    .and_then(|(read, _)| read.metadata.operators.get(&node.uid))
                    .map(|op| {
                        op.subtasks
                            .iter()
                            .map(|s| (s.subtask, s.pending.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                Box::new(
                    KafkaSink::create(kafka.clone(), info.subtask, info.parallelism, &stored)
                        .map_err(|e| Self::task_error(info, e))?,
                )
            }
        })
    }
}

/// Before an attempt: a clean working directory, no leftovers of aborted
/// checkpoints, and every file sink's directory settled for the restore
/// point (its pending files committed, later in-progress files removed).
pub(super) fn prepare_attempt(
    job: &PreparedJob,
    settings: &RunSettings,
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
    if job.graph.nodes.iter().any(|n| {
        matches!(
            n.kind,
            NodeKind::Sink(SinkKind::Nats(_) | SinkKind::Exchange(_))
        )
    }) {
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
        job_ids.extend(settings.discard_runs.iter().map(String::as_str));
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
