//! The traits a subtask's logic implements ([`Operator`], [`Source`],
//! [`Sink`]), the [`TaskContext`] an operator owns (its keyed state, timers,
//! output and current key), and task errors.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::output::Collector;
use super::timers::{FiredTimer, TimerService};
use crate::state::KeyedState;
use crate::types::{CheckpointId, MIN_WATERMARK, RecordBatch, Timestamp};

/// Which subtask this is.
#[derive(Debug, Clone)]
pub struct TaskInfo {
    pub job: Arc<str>,
    pub uid: Arc<str>,
    pub subtask: u32,
    pub parallelism: u32,
    pub max_parallelism: u32,
}

/// Why a task failed; decides nothing yet, but lets the restart strategy and
/// the user tell a plugin's fault from the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The plugin returned an error.
    Plugin,
    /// The plugin trapped (unreachable, out of bounds, misuse of an import).
    Trap,
    /// A call ran past its epoch deadline.
    Timeout,
    /// The plugin hit its memory limit.
    Memory,
    /// Reading or writing keyed state failed.
    State,
    /// A source or sink failed.
    Connector,
    /// A neighbouring task went away (a consequence, not a cause).
    Disconnected,
    /// The task panicked.
    Panic,
    /// Checkpoints failed more often in a row than tolerated.
    Checkpoint,
    /// Another owner runs the job now (a cluster moved it): this attempt
    /// must end without committing, and never restart here.
    Fenced,
}

impl FailureKind {
    /// Its name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Plugin => "error",
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::Memory => "memory",
            FailureKind::State => "state",
            FailureKind::Connector => "connector",
            FailureKind::Disconnected => "disconnected",
            FailureKind::Panic => "panic",
            FailureKind::Checkpoint => "checkpoint",
            FailureKind::Fenced => "fenced",
        }
    }
}

/// An error from an operator, source or sink call.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct OperatorError {
    pub kind: FailureKind,
    pub message: String,
}

impl OperatorError {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<crate::state::StateError> for OperatorError {
    fn from(error: crate::state::StateError) -> Self {
        Self::new(FailureKind::State, error.to_string())
    }
}

/// A failed subtask, named by operator uid and subtask index.
#[derive(Debug, Clone, thiserror::Error)]
#[error("`{uid}` (subtask {subtask}) failed: {error}")]
pub struct TaskError {
    pub uid: String,
    pub subtask: u32,
    pub error: OperatorError,
}

impl TaskError {
    pub fn kind(&self) -> FailureKind {
        self.error.kind
    }
}

/// Everything an operator subtask owns besides its logic. Host functions of
/// a Wasm operator reach it through the store; native operators own it
/// directly.
#[derive(Debug)]
pub struct TaskContext {
    pub info: TaskInfo,
    pub state: KeyedState,
    pub timers: TimerService,
    pub output: Collector,
    /// Key of the record or timer being processed, if any.
    pub current_key: Option<Vec<u8>>,
    /// Timestamp of the record or timer being processed.
    pub current_timestamp: Option<Timestamp>,
    pub watermark: Timestamp,
    /// The batch being processed, for `select-record` (shared with the
    /// call that hands its bytes to the plugin).
    pub current_batch: Arc<RecordBatch>,
    /// `close` ran (at the final checkpoint, or before the restored one):
    /// it does not run again.
    pub closed: bool,
}

impl TaskContext {
    pub fn new(info: TaskInfo, state: KeyedState, output: Collector) -> Self {
        Self {
            info,
            state,
            timers: TimerService::default(),
            output,
            current_key: None,
            current_timestamp: None,
            watermark: MIN_WATERMARK,
            current_batch: Arc::new(RecordBatch::new()),
            closed: false,
        }
    }

    /// Makes record `index` of the current batch the current record.
    pub fn select_record(&mut self, index: usize) -> bool {
        let Some(record) = self.current_batch.get(index) else {
            return false;
        };
        match record.key {
            Some(key) => {
                let buffer = self.current_key.get_or_insert_with(Vec::new);
                buffer.clear();
                buffer.extend_from_slice(key);
            }
            None => self.current_key = None,
        }
        self.current_timestamp = record.timestamp;
        if let Some(timestamp) = record.timestamp {
            self.state.stamp_event_time(timestamp);
        }
        true
    }

    /// Makes a firing timer's key and time current.
    pub fn select_timer(&mut self, timer: &FiredTimer) {
        self.current_key = Some(timer.key.clone());
        self.current_timestamp = Some(timer.timestamp);
    }
}

/// The per-record logic of an operator subtask.
pub trait Operator: Send {
    /// The context this operator owns (the "view" of its host state).
    fn task(&mut self) -> &mut TaskContext;
    /// Runs once before the first batch (nothing by default).
    fn open(&mut self) -> Result<(), OperatorError> {
        Ok(())
    }
    /// Processes a batch from input edge `input`. Records are processed in
    /// order and see each other's state updates.
    fn process_batch(&mut self, input: u32, batch: RecordBatch) -> Result<(), OperatorError>;
    /// A timer of the current key fired (an operator that registers no
    /// timers keeps the default, which does nothing).
    fn on_timer(&mut self, timer: &FiredTimer) -> Result<(), OperatorError> {
        let _ = timer;
        Ok(())
    }
    /// Runs once after the last batch (nothing by default).
    fn close(&mut self) -> Result<(), OperatorError> {
        Ok(())
    }
    /// Whether its calls may block on the tokio runtime (WASI's synchronous
    /// imports do), so that its chain runs on a thread of its own (see
    /// [`chain_thread`](super::chain_thread)) instead of a worker.
    fn blocks_on_runtime(&self) -> bool {
        false
    }
}

/// Whether a source has more to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceStatus {
    More,
    Ended,
}

pub type SourceFuture<'a> =
    Pin<Box<dyn Future<Output = Result<SourceStatus, OperatorError>> + Send + 'a>>;

/// A source subtask's reader.
pub trait Source: Send {
    /// Appends up to `max` records to `batch`.
    fn next_batch<'a>(&'a mut self, batch: &'a mut RecordBatch, max: usize) -> SourceFuture<'a>;
    /// Where the source stands (byte offset, sequence number), for display
    /// and for checkpoints.
    fn position(&self) -> u64;
    /// A partitioned source's position instead: per partition it reads,
    /// the last sequence number it emitted. Partitions are redistributed
    /// when the source's parallelism changes, so `position` is not used.
    fn partitions(&self) -> Option<std::collections::BTreeMap<u32, u64>> {
        None
    }
    /// A watermark the source read with its input (an exchange's writers'),
    /// once it advanced: the source task sends it on after the records
    /// read before it.
    fn watermark(&mut self) -> Option<crate::types::Timestamp> {
        None
    }
    /// Checkpoint `checkpoint` took this source's position (just read).
    fn checkpointed(&mut self, _checkpoint: CheckpointId) {}
    /// Checkpoint `checkpoint` completed and was committed: the job
    /// restores from it or a later one, so what the source read before it
    /// is not read again (an exchange purges it).
    fn committed(&mut self, _checkpoint: CheckpointId) {}
    /// Whether an aligned stop's barrier may go now: everything upstream
    /// of this source that stops with it has stopped, and the source has
    /// read all it wrote (an exchange source: every writer of its key
    /// groups paused). Until then the source task reads on and asks again
    /// after each batch.
    fn stop_ready(&mut self) -> bool {
        true
    }
    /// Whether the barrier of cluster savepoint `cut` may go now (see
    /// [`SavepointTarget::cut`](crate::types::SavepointTarget::cut)): the
    /// source has read everything upstream published before the cut and
    /// nothing after (an exchange source: every writer of its key groups
    /// marked the cut). Until then the source task reads on and asks again
    /// after each batch. A yes is final: the barrier goes before the next
    /// batch is read.
    fn cut_ready(&mut self, _cut: &str) -> bool {
        true
    }
}

/// A sink subtask's writer. Exactly-once sinks implement the two-phase
/// commit hooks; the others write as records arrive.
pub trait Sink: Send {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), OperatorError>;
    /// The sink's input watermark advanced to `watermark` (after every
    /// record written before it). Only sinks that carry it on care.
    fn watermark(&mut self, _watermark: crate::types::Timestamp) -> Result<(), OperatorError> {
        Ok(())
    }
    /// Checkpoint n is aligned here: make everything written so far durable
    /// but uncommitted. Returns what is pending (names for the checkpoint's
    /// `_metadata`, so a restore can commit them).
    /// Checkpoint n, about to be prepared, is a task's part of cluster
    /// savepoint `cut` (see
    /// [`SavepointTarget::cut`](crate::types::SavepointTarget::cut)): an
    /// exchange's writer marks the cut once it committed n. Others ignore
    /// it.
    fn cut(&mut self, _checkpoint: CheckpointId, _cut: &str) {}
    fn prepare_commit(&mut self, _checkpoint: CheckpointId) -> Result<Vec<String>, OperatorError> {
        Ok(Vec::new())
    }
    /// Checkpoint n completed: commit what was prepared for it and before.
    fn commit(&mut self, _checkpoint: CheckpointId) -> Result<(), OperatorError> {
        Ok(())
    }
    /// Called once at end of input: flush what was written since the last
    /// checkpoint (still uncommitted).
    fn finish(&mut self) -> Result<(), OperatorError>;
    /// The job ended: commit (`true`) or discard (`false`) what no completed
    /// checkpoint covers.
    fn end(&mut self, _commit: bool) -> Result<(), OperatorError> {
        Ok(())
    }
}
