//! Builds a running dataflow from a [`JobGraph`]: one bounded channel per
//! connected (upstream subtask, downstream subtask) pair of every edge, one
//! tokio task per subtask (per subtask of a chain of operators, see
//! [`JobGraph::chains`]; a chain with a Wasm operator runs on a thread of
//! its own, see [`ChainThread`]), and a [`RunningJob`] handle to watch,
//! cancel and await it. The first task failure cancels every other task; the error
//! reported is the cause, not the disconnections it led to. Each launch
//! wires the attempt's checkpoint coordinator (which the caller starts:
//! this module never names it) to the source subtasks (triggers), every
//! subtask (reports) and the sinks (commits), through the messages of
//! [`crate::protocol`].

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use super::alignment::Aligner;
use super::chain_thread::ChainThread;
use super::input::InputGate;
use super::operator::{FailureKind, Operator, OperatorError, Sink, Source, TaskError, TaskInfo};
use super::output::{Collector, OutputEdge};
use super::task::{self, ChainLink, Reports, TaskSummary, WatermarkGenerator};
use crate::job::{JobGraph, Node, NodeKind};
use crate::protocol::{
    CommitSignal, CoordinatorOutcome, CoordinatorWiring, SnapshotStore, SourcePace,
};
use crate::types::StreamEvent;

/// The input channels of one subtask: (input edge index, receiver).
type InputChannels = Vec<(u32, mpsc::Receiver<StreamEvent>)>;

/// Batches a channel buffers before its sender waits (backpressure).
pub const CHANNEL_CAPACITY: usize = 8;

pub use super::metrics::NodeMetrics;

/// An operator subtask and where its snapshots go (None: native operators
/// of benchmarks and tests, which keep no state).
pub type OperatorTask = (Box<dyn Operator>, Option<Box<dyn SnapshotStore>>);

/// Creates the logic of each subtask. The embedded runner implements it with
/// connectors and Wasm plugins; tests and benchmarks with native code.
pub trait TaskFactory: Send + Sync {
    fn source(&self, node: &Node, info: &TaskInfo) -> Result<Box<dyn Source>, TaskError>;
    /// The operator subtask, with its state restored, and where its
    /// snapshots go (None: checkpointing is off). Storage acks to `reports`.
    fn operator(
        &self,
        node: &Node,
        info: TaskInfo,
        output: Collector,
        reports: &Reports,
    ) -> Result<OperatorTask, TaskError>;
    fn sink(&self, node: &Node, info: &TaskInfo) -> Result<Box<dyn Sink>, TaskError>;
}

/// How a job that ran to its end (or was cancelled) ended.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub summaries: Vec<TaskSummary>,
    pub cancelled: bool,
    /// Set when the job was stopped with this savepoint.
    pub savepoint: Option<crate::types::Location>,
}

/// A job whose tasks are running.
pub struct RunningJob {
    tasks: JoinSet<Result<Vec<TaskSummary>, TaskError>>,
    /// The threads operator chains run on (see [`ChainThread`]).
    threads: Vec<ChainThread>,
    names: HashMap<tokio::task::Id, (String, u32)>,
    metrics: Vec<Arc<NodeMetrics>>,
    cancel: watch::Sender<bool>,
    coordinator: JoinHandle<CoordinatorOutcome>,
}

impl std::fmt::Debug for RunningJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningJob")
            .field("tasks", &self.names.len())
            .finish()
    }
}

/// Creates every subtask (instantiating plugins, opening state) and spawns
/// them on the current tokio runtime; `coordinator` starts the attempt's
/// checkpoint coordinator on the wiring (it ends when every task has gone).
/// Sources read at `pace`.
pub fn launch(
    graph: &JobGraph,
    job_id: &str,
    factory: &dyn TaskFactory,
    pace: Arc<SourcePace>,
    coordinator: impl FnOnce(CoordinatorWiring) -> JoinHandle<CoordinatorOutcome>,
) -> Result<RunningJob, TaskError> {
    let job: Arc<str> = Arc::from(job_id);
    let (reports, report_receiver) = mpsc::unbounded_channel();
    let (commit, commit_receiver) = watch::channel(CommitSignal::default());
    let mut triggers = Vec::new();
    let mut subtasks = Vec::new();
    let mut sink_subtasks = 0;
    // Channels: senders per (edge, upstream subtask), receivers per (node, subtask).
    let mut senders: HashMap<(usize, u32), Vec<mpsc::Sender<StreamEvent>>> = HashMap::new();
    let mut receivers: HashMap<(usize, u32), InputChannels> = HashMap::new();
    let chained: Vec<Option<usize>> = (0..graph.nodes.len())
        .map(|node| graph.chained_edge(node))
        .collect();
    let is_chained = |edge_id: usize| chained[graph.edges[edge_id].from] == Some(edge_id);
    for (edge_id, edge) in graph.edges.iter().enumerate() {
        if is_chained(edge_id) {
            continue;
        }
        let (p_from, p_to) = (
            graph.nodes[edge.from].parallelism,
            graph.nodes[edge.to].parallelism,
        );
        for (from, to) in edge.channels(p_from, p_to) {
            let (sender, receiver) = mpsc::channel(CHANNEL_CAPACITY);
            senders.entry((edge_id, from)).or_default().push(sender);
            receivers
                .entry((edge.to, to))
                .or_default()
                .push((edge.input_index, receiver));
        }
    }
    let (cancel, cancel_rx) = watch::channel(false);
    let metrics: Vec<Arc<NodeMetrics>> = graph
        .nodes
        .iter()
        .map(|node| {
            Arc::new(NodeMetrics::new(
                &node.uid,
                matches!(node.kind, NodeKind::Source(_)),
                matches!(node.kind, NodeKind::Sink(_)),
                node.parallelism,
            ))
        })
        .collect();
    let mut tasks = JoinSet::new();
    let mut names = HashMap::new();
    // Wire every subtask first (cheap), then create the operator subtasks
    // (which restore their state: the expensive part) in parallel, then
    // spawn everything.
    let mut wired = Vec::new();
    for (node_id, node) in graph.nodes.iter().enumerate() {
        for subtask in (0..node.parallelism).filter(|&s| graph.runs(s)) {
            let info = TaskInfo {
                job: job.clone(),
                uid: Arc::from(node.uid.as_str()),
                subtask,
                parallelism: node.parallelism,
                max_parallelism: graph.max_parallelism,
            };
            let max_record_bytes = match &node.kind {
                NodeKind::Operator(operator) => operator.limits.max_record_bytes,
                _ => u64::MAX,
            };
            let edges = node
                .outputs
                .iter()
                .map(|&edge_id| {
                    let edge = &graph.edges[edge_id];
                    if is_chained(edge_id) {
                        return OutputEdge::chained();
                    }
                    OutputEdge::new(
                        edge.side_output.clone(),
                        edge.partition,
                        graph.nodes[edge.to].parallelism,
                        senders.remove(&(edge_id, subtask)).unwrap_or_default(),
                    )
                })
                .collect();
            let output = Collector::new(edges, graph.max_parallelism, max_record_bytes);
            let chained_input = node.inputs.iter().find(|&&edge| is_chained(edge));
            let gate = match chained_input {
                Some(&edge) => InputGate::chained(graph.edges[edge].input_index),
                None => {
                    let mut inputs = receivers.remove(&(node_id, subtask)).unwrap_or_default();
                    inputs.sort_by_key(|(input, _)| *input);
                    InputGate::new(inputs)
                }
            };
            let aligner = Aligner::new(gate.channel_count(), graph.checkpoint.mode);
            subtasks.push((node.uid.clone(), subtask));
            wired.push(Wired {
                node,
                node_id,
                info,
                output,
                gate,
                aligner,
            });
        }
    }
    let mut operators = create_operators(factory, &mut wired, &reports)?;
    let mut links: HashMap<(usize, u32), ChainLink> = HashMap::new();
    for Wired {
        node,
        node_id,
        info,
        output,
        gate,
        aligner,
    } in wired
    {
        let node_metrics = metrics[node_id].clone();
        let subtask = info.subtask;
        let handle = match &node.kind {
            NodeKind::Source(source) => {
                let reader = factory.source(node, &info)?;
                let watermarks = source.watermark.map(WatermarkGenerator::new);
                let (trigger, trigger_receiver) = mpsc::unbounded_channel();
                triggers.push(trigger);
                tasks.spawn(alone(task::run_source(
                    info,
                    reader,
                    output,
                    watermarks,
                    node_metrics,
                    cancel_rx.clone(),
                    trigger_receiver,
                    reports.clone(),
                    pace.clone(),
                    commit_receiver.clone(),
                )))
            }
            NodeKind::Operator(_) => {
                let (operator, storage) = operators
                    .remove(&(node_id, subtask))
                    .expect("created above");
                let link = ChainLink {
                    operator,
                    gate,
                    aligner,
                    metrics: node_metrics,
                    storage,
                };
                links.insert((node_id, subtask), link);
                continue;
            }
            NodeKind::Sink(_) => {
                let sink = factory.sink(node, &info)?;
                sink_subtasks += 1;
                tasks.spawn(alone(task::run_sink(
                    info,
                    sink,
                    gate,
                    aligner,
                    node_metrics,
                    reports.clone(),
                    commit_receiver.clone(),
                )))
            }
        };
        names.insert(handle.id(), (node.uid.clone(), subtask));
    }
    let mut threads = Vec::new();
    for chain in graph.chains() {
        let uids: Vec<&str> = chain
            .iter()
            .map(|&id| graph.nodes[id].uid.as_str())
            .collect();
        for subtask in (0..graph.nodes[chain[0]].parallelism).filter(|&s| graph.runs(s)) {
            let chain_links = chain
                .iter()
                .map(|&id| links.remove(&(id, subtask)).expect("wired above"))
                .collect();
            let name = format!("weir-{}-{subtask}", graph.nodes[chain[0]].uid);
            let (thread, chain_task) =
                ChainThread::spawn(name.clone(), chain_links).map_err(|e| TaskError {
                    uid: graph.nodes[chain[0]].uid.clone(),
                    subtask,
                    error: OperatorError::new(
                        FailureKind::Panic,
                        format!("could not start its thread {name}: {e}"),
                    ),
                })?;
            threads.extend(thread);
            let handle = tasks.spawn(chain_task);
            names.insert(handle.id(), (uids.join(" → "), subtask));
        }
    }
    // Only tasks hold senders now: the coordinator ends when they are gone.
    drop(reports);
    let coordinator = coordinator(CoordinatorWiring {
        triggers,
        reports: report_receiver,
        commit,
        cancelled: cancel_rx,
        subtasks,
        sink_subtasks,
    });
    info!(job = %job_id, tasks = names.len(), "job launched");
    Ok(RunningJob {
        tasks,
        threads,
        names,
        metrics,
        cancel,
        coordinator,
    })
}

/// A task of one subtask (a source or sink) as the job's tasks are awaited.
async fn alone(
    task: impl std::future::Future<Output = Result<TaskSummary, TaskError>>,
) -> Result<Vec<TaskSummary>, TaskError> {
    task.await.map(|summary| vec![summary])
}

/// An operator subtask created by a worker: (its place in the work list,
/// (node, subtask), the operator or why it could not be created).
type Created = (usize, (usize, u32), Result<OperatorTask, TaskError>);

/// A subtask whose channels are wired, before its logic is created.
struct Wired<'a> {
    node: &'a Node,
    node_id: usize,
    info: TaskInfo,
    output: Collector,
    gate: InputGate,
    aligner: Aligner,
}

/// Creates every operator subtask (instantiating its plugin, restoring its
/// state), on up to as many threads as there are cores: restoring is most
/// of a start's time and subtasks restore independently. The collectors
/// move into the operators; the first error (in subtask order) wins.
fn create_operators(
    factory: &dyn TaskFactory,
    wired: &mut [Wired<'_>],
    reports: &Reports,
) -> Result<HashMap<(usize, u32), OperatorTask>, TaskError> {
    let work: Vec<(usize, u32, &Node, TaskInfo, Collector)> = wired
        .iter_mut()
        .filter(|w| matches!(w.node.kind, NodeKind::Operator(_)))
        .map(|w| {
            let output = std::mem::replace(&mut w.output, Collector::new(Vec::new(), 1, u64::MAX));
            (w.node_id, w.info.subtask, w.node, w.info.clone(), output)
        })
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(work.len())
        .max(1);
    let queue = std::sync::Mutex::new(work.into_iter().enumerate().collect::<Vec<_>>());
    let runtime = tokio::runtime::Handle::current();
    let mut created: Vec<Created> = Vec::new();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let _runtime = runtime.enter();
                    let mut done = Vec::new();
                    loop {
                        let next = queue.lock().expect("not poisoned").pop();
                        let Some((order, (node_id, subtask, node, info, output))) = next else {
                            break;
                        };
                        let result = factory.operator(node, info, output, reports);
                        done.push((order, (node_id, subtask), result));
                    }
                    done
                })
            })
            .collect();
        for worker in workers {
            match worker.join() {
                Ok(done) => created.extend(done),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });
    created.sort_by_key(|(order, _, _)| *order);
    let mut operators = HashMap::new();
    for (_, key, result) in created {
        operators.insert(key, result?);
    }
    Ok(operators)
}

impl RunningJob {
    pub fn metrics(&self) -> &[Arc<NodeMetrics>] {
        &self.metrics
    }

    /// Asks the sources to stop; the rest of the job drains and ends.
    pub fn cancel(&self) {
        let _ = self.cancel.send(true);
    }

    /// A handle that can cancel the job from elsewhere.
    pub fn canceller(&self) -> watch::Sender<bool> {
        self.cancel.clone()
    }

    /// Waits for every task. On the first failure the other tasks are
    /// aborted and the causing error is returned. A disconnection (a task
    /// whose neighbour went away) is a consequence: the neighbour's own
    /// error is on its way, so the others are aborted once it arrived (or
    /// after [`DISCONNECTED_GRACE`] without one), and it is the one
    /// reported.
    pub async fn wait(mut self) -> Result<JobOutcome, TaskError> {
        let mut summaries = Vec::new();
        let mut errors: Vec<TaskError> = Vec::new();
        let mut coordinator_running = true;
        let mut savepoint = None;
        let mut aborted = false;
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let joined = tokio::select! {
                joined = self.tasks.join_next_with_id() => match joined {
                    Some(joined) => joined,
                    None => break,
                },
                _ = sleep_until(grace), if !aborted => {
                    debug!("only disconnections so far; cancelling the job");
                    self.tasks.abort_all();
                    aborted = true;
                    continue;
                }
                result = &mut self.coordinator, if coordinator_running => {
                    coordinator_running = false;
                    let error = match result {
                        Ok(Ok(stopped)) => {
                            savepoint = stopped;
                            continue;
                        }
                        Ok(Err(error)) => coordinator_error(&error),
                        Err(join_error) => TaskError {
                            uid: COORDINATOR.to_string(),
                            subtask: 0,
                            error: super::operator::OperatorError::new(
                                FailureKind::Checkpoint,
                                format!("checkpoint coordinator stopped: {join_error}"),
                            ),
                        },
                    };
                    if !aborted {
                        warn!(message = %error.error, "checkpointing failed; cancelling the job");
                        self.tasks.abort_all();
                        aborted = true;
                    }
                    errors.push(error);
                    continue;
                }
            };
            let result = match joined {
                Ok((_, result)) => result,
                Err(join_error) if join_error.is_cancelled() => continue,
                Err(join_error) => {
                    let (uid, subtask) = self
                        .names
                        .get(&join_error.id())
                        .cloned()
                        .unwrap_or_else(|| ("?".to_string(), 0));
                    let message = join_error
                        .try_into_panic()
                        .ok()
                        .and_then(|payload| {
                            payload
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                        })
                        .unwrap_or_else(|| "unknown panic".to_string());
                    Err(task::panic_error(&uid, subtask, message))
                }
            };
            match result {
                Ok(ended) => summaries.extend(ended),
                Err(error) => {
                    if !aborted {
                        if error.kind() == FailureKind::Disconnected {
                            grace.get_or_insert_with(|| {
                                tokio::time::Instant::now() + DISCONNECTED_GRACE
                            });
                        } else {
                            debug!(%error, "task failed; cancelling the job");
                            self.tasks.abort_all();
                            aborted = true;
                        }
                    }
                    errors.push(error);
                }
            }
        }
        // Aborted chains close their operators on their threads.
        let threads = std::mem::take(&mut self.threads);
        if !threads.is_empty() {
            let _ = tokio::task::spawn_blocking(move || {
                threads.into_iter().for_each(ChainThread::join)
            })
            .await;
        }
        if coordinator_running {
            match (&mut self.coordinator).await {
                Ok(Ok(stopped)) => savepoint = stopped,
                Ok(Err(error)) => errors.push(coordinator_error(&error)),
                Err(_) => {}
            }
        }
        if let Some(error) = errors
            .iter()
            .find(|e| e.kind() != FailureKind::Disconnected)
            .or_else(|| errors.first())
        {
            return Err(error.clone());
        }
        Ok(JobOutcome {
            summaries,
            cancelled: *self.cancel.borrow(),
            savepoint,
        })
    }
}

/// How long a failing job's tasks may go on after the first disconnection
/// while the error that caused it is on its way (see [`RunningJob::wait`]).
pub const DISCONNECTED_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// What a failure of the checkpoint coordinator names as its uid.
const COORDINATOR: &str = "checkpoint coordinator";

/// The coordinator's failure (checkpoints failing past the tolerance, or
/// its commit fenced) as a task failure of the job.
fn coordinator_error(error: &crate::protocol::CoordinatorError) -> TaskError {
    let kind = match error {
        crate::protocol::CoordinatorError::Fenced { .. } => FailureKind::Fenced,
        _ => FailureKind::Checkpoint,
    };
    TaskError {
        uid: COORDINATOR.to_string(),
        subtask: 0,
        error: super::operator::OperatorError::new(kind, error.to_string()),
    }
}
