//! The embedded runner: everything `weir run` does in one process. It loads
//! a job's plugins (validated, compiled, cached), opens per-subtask keyed
//! state (RocksDB by default), and implements the dataflow's
//! [`TaskFactory`] with the connectors and [`WasmOperator`]s.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tracing::{info, warn};

use crate::connectors::file::FileSource;
use crate::connectors::generator::GeneratorSource;
use crate::connectors::sinks::{BlackholeSink, FileSink, StdoutSink};
use crate::connectors::socket::SocketSource;
use crate::dataflow::runtime::{self, RunningJob};
use crate::dataflow::{
    Collector, Operator, OperatorError, Sink, Source, TaskContext, TaskError, TaskFactory, TaskInfo,
};
use crate::job::{BackendKind, JobGraph, Node, NodeKind, SinkKind, SourceKind};
use crate::plugin::{LoadedPlugin, PluginEngine, PluginError, WasmOperator};
use crate::state::memory::MemoryBackend;
use crate::state::rocks::RocksBackend;
use crate::state::{KeyedState, StateBackend};

/// Errors starting or running a job embedded.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Job(#[from] crate::job::JobError),
    #[error("operator `{uid}`: {source}")]
    Plugin {
        uid: String,
        #[source]
        source: PluginError,
    },
    #[error("job `{job}` failed: {source}")]
    Task {
        job: String,
        #[source]
        source: TaskError,
    },
}

/// A job whose plugins are loaded, ready to launch.
#[derive(Debug)]
pub struct PreparedJob {
    pub graph: JobGraph,
    pub job_id: String,
    pub plugins: HashMap<String, Arc<LoadedPlugin>>,
}

impl PreparedJob {
    /// Where this run keeps its working state.
    pub fn state_dir(&self) -> PathBuf {
        self.graph.state.dir.join(&self.job_id)
    }
}

/// A new random job id (32 hex digits, like Flink's).
pub fn new_job_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let pid = u64::from(std::process::id());
    let a = xxhash_rust::xxh3::xxh3_64_with_seed(&nanos.to_le_bytes(), pid);
    let b = xxhash_rust::xxh3::xxh3_64_with_seed(&nanos.to_le_bytes(), a ^ 0x9e37_79b9_7f4a_7c15);
    format!("{a:016x}{b:016x}")
}

/// Loads every plugin of the job (each file once).
pub fn prepare(engine: &PluginEngine, graph: JobGraph) -> Result<PreparedJob, RunError> {
    let mut by_file: HashMap<PathBuf, Arc<LoadedPlugin>> = HashMap::new();
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
                                source,
                            })?;
                    by_file.insert(operator.plugin.clone(), loaded.clone());
                    loaded
                }
            };
            plugins.insert(node.uid.clone(), loaded);
        }
    }
    Ok(PreparedJob {
        graph,
        job_id: new_job_id(),
        plugins,
    })
}

/// Builds a native (Rust) operator for a subtask from its context: operators
/// compiled into the host, run by the same runtime as plugins (benchmarks
/// compare the two).
pub type NativeOperator = Arc<dyn Fn(TaskContext) -> Box<dyn Operator> + Send + Sync>;

struct Factory<'a> {
    job: &'a PreparedJob,
    native: &'a HashMap<String, NativeOperator>,
}

impl Factory<'_> {
    fn task_error(info: &TaskInfo, error: OperatorError) -> TaskError {
        TaskError {
            uid: info.uid.to_string(),
            subtask: info.subtask,
            error,
        }
    }
}

impl TaskFactory for Factory<'_> {
    fn source(&self, node: &Node, info: &TaskInfo) -> Result<Box<dyn Source>, TaskError> {
        let NodeKind::Source(source) = &node.kind else {
            unreachable!("source() is called for source nodes only")
        };
        Ok(match &source.kind {
            SourceKind::File { path } => {
                Box::new(FileSource::new(path.clone(), source.format.clone(), 0))
            }
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
                None,
            )),
            SourceKind::Socket { address } => {
                Box::new(SocketSource::new(address.clone(), source.format.clone()))
            }
        })
    }

    fn operator(
        &self,
        node: &Node,
        info: TaskInfo,
        output: Collector,
    ) -> Result<Box<dyn Operator>, TaskError> {
        let NodeKind::Operator(operator) = &node.kind else {
            unreachable!("operator() is called for operator nodes only")
        };
        let plugin = self.job.plugins[&node.uid].clone();
        let states = &plugin.info.states;
        if let Some(native) = self.native.get(&node.uid) {
            let keyed = KeyedState::new(
                Vec::new(),
                Box::new(MemoryBackend::new(0)),
                info.max_parallelism,
                1,
            );
            return Ok(native(TaskContext::new(info, keyed, output)));
        }
        let settings = &self.job.graph.state;
        let tables: Vec<String> = states
            .iter()
            .map(|s| format!("{}/{}", node.uid, s.name))
            .collect();
        let backend: Box<dyn StateBackend> = if states.is_empty()
            || settings.backend == BackendKind::Memory
        {
            Box::new(MemoryBackend::new(states.len()))
        } else {
            let dir = self
                .job
                .state_dir()
                .join(format!("{}-{}", node.uid, info.subtask));
            Box::new(
                RocksBackend::open(&dir, &tables).map_err(|e| Self::task_error(&info, e.into()))?,
            )
        };
        let keyed = KeyedState::new(
            tables
                .into_iter()
                .zip(states.iter().map(|s| s.kind))
                .collect(),
            backend,
            info.max_parallelism,
            settings.cache_entries,
        );
        let task = TaskContext::new(info.clone(), keyed, output);
        let wasm = WasmOperator::instantiate(plugin, task, operator)
            .map_err(|e| Self::task_error(&info, e))?;
        Ok(Box::new(wasm))
    }

    fn sink(&self, node: &Node, info: &TaskInfo) -> Result<Box<dyn Sink>, TaskError> {
        let NodeKind::Sink(kind) = &node.kind else {
            unreachable!("sink() is called for sink nodes only")
        };
        Ok(match kind {
            SinkKind::Stdout => Box::new(StdoutSink),
            SinkKind::File { path } => Box::new(
                FileSink::create(path, info.subtask).map_err(|e| Self::task_error(info, e))?,
            ),
            SinkKind::Blackhole => Box::new(BlackholeSink::default()),
        })
    }
}

/// Creates every subtask and starts the job on the current tokio runtime.
pub fn launch(job: &PreparedJob) -> Result<RunningJob, RunError> {
    launch_with_native(job, &HashMap::new())
}

/// Like [`launch`], with the operators named in `native` (by uid) replaced
/// by native implementations.
pub fn launch_with_native(
    job: &PreparedJob,
    native: &HashMap<String, NativeOperator>,
) -> Result<RunningJob, RunError> {
    let factory = Factory { job, native };
    runtime::launch(&job.graph, &job.job_id, &factory).map_err(|source| RunError::Task {
        job: job.graph.name.clone(),
        source,
    })
}

/// Waits for a launched job, then removes its working state directory (a
/// finished run has nothing to resume from it).
pub async fn finish(
    job: &PreparedJob,
    running: RunningJob,
) -> Result<runtime::JobOutcome, RunError> {
    let result = running.wait().await;
    let dir = job.state_dir();
    if dir.exists()
        && let Err(error) = std::fs::remove_dir_all(&dir)
    {
        warn!(dir = %dir.display(), %error, "could not remove the job's working state");
    }
    match result {
        Ok(outcome) => {
            info!(job = %job.graph.name, cancelled = outcome.cancelled, "job finished");
            Ok(outcome)
        }
        Err(source) => Err(RunError::Task {
            job: job.graph.name.clone(),
            source,
        }),
    }
}

/// Loads, launches and runs a job file to its end: the library form of
/// `weir run` without progress output.
pub async fn run_file(
    engine: &PluginEngine,
    path: &std::path::Path,
) -> Result<runtime::JobOutcome, RunError> {
    let graph = JobGraph::load(path)?;
    let job = prepare(engine, graph)?;
    let running = launch(&job)?;
    finish(&job, running).await
}
