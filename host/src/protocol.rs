//! The checkpoint protocol between a job's subtasks and its coordinator,
//! in one place both sides use (neither `dataflow` nor `checkpoint`
//! imports the other): the coordinator's [`Trigger`] to each source
//! subtask, each subtask's [`TaskReport`] (its part of a checkpoint, a
//! [`SubtaskSnapshot`], or why it has none), the [`CommitSignal`] sinks
//! commit by, the pace sources read at ([`SourcePace`]), and the
//! [`SnapshotStore`] an operator subtask hands its snapshot to. The
//! barrier itself travels with the records ([`crate::types::Barrier`]).
//!
//! [`SubtaskSnapshot`] and [`FileRef`] are also the per-subtask part of
//! `_metadata` (see `checkpoint::metadata`): what a subtask acks is what is
//! persisted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::state::SnapshotJob;
use crate::types::{Barrier, BarrierKind, CheckpointId, Location};

/// What the coordinator asks of a source subtask: to record its position
/// and send `barrier` into every output channel.
#[derive(Debug)]
pub struct Trigger {
    pub barrier: Barrier,
    /// Set for stop-with-savepoint: the source stops after the barrier
    /// once the savepoint completed (and reads on if it failed).
    pub stop: Option<StopAfter>,
    /// Set for a task's part of a cluster savepoint (the barrier's
    /// [`SavepointTarget::cut`](crate::types::SavepointTarget::cut)): the
    /// source sends the barrier only once it reached the cut.
    pub cut: Option<CutAt>,
}

/// How a source sends a cut's barrier: once
/// [`Source::cut_ready`](crate::dataflow::Source::cut_ready) says it
/// reached cut `name`, or never, if the savepoint fails first.
#[derive(Debug)]
pub struct CutAt {
    pub name: std::sync::Arc<str>,
    /// Whether the savepoint completed (false: it failed or was aborted).
    pub outcome: tokio::sync::oneshot::Receiver<bool>,
}

impl Trigger {
    /// The final checkpoint's trigger: the source ends after its barrier.
    pub fn is_last(&self) -> bool {
        self.barrier.kind == BarrierKind::Final
    }
}

/// How a source stops after a savepoint's barrier.
#[derive(Debug)]
pub struct StopAfter {
    /// First advance the watermark to the end, so every event-time timer
    /// fires before the savepoint (Flink's `stop --drain`).
    pub drain: bool,
    /// Send the barrier only once the source is ready for an aligned stop
    /// ([`Source::stop_ready`](crate::dataflow::Source::stop_ready)): the
    /// stop of a staged job, whose stages' savepoints must form one cut.
    pub aligned: bool,
    /// Whether the savepoint completed.
    pub outcome: tokio::sync::oneshot::Receiver<bool>,
}

/// Counters of a long state transfer (a savepoint being written, a
/// restore), for the progress line; and a way to abandon it (an upgrade's
/// standby dropped: the restore stops at its next chunk).
#[derive(Debug, Default)]
pub struct TransferProgress {
    pub keys: AtomicU64,
    pub bytes: AtomicU64,
    /// Set while a transfer runs.
    pub active: std::sync::atomic::AtomicBool,
    abandoned: std::sync::atomic::AtomicBool,
}

impl TransferProgress {
    /// Asks the transfer to stop: it fails at its next chunk.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Relaxed);
    }

    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Relaxed)
    }

    pub fn add(&self, keys: u64, bytes: u64) {
        self.keys.fetch_add(keys, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Option<(u64, u64)> {
        self.active.load(Ordering::Relaxed).then(|| {
            (
                self.keys.load(Ordering::Relaxed),
                self.bytes.load(Ordering::Relaxed),
            )
        })
    }

    pub fn start(&self) {
        self.keys.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        self.active.store(true, Ordering::Relaxed);
    }

    pub fn finish(&self) {
        self.active.store(false, Ordering::Relaxed);
    }
}

/// What a subtask tells the coordinator.
#[derive(Debug)]
pub enum TaskReport {
    /// The subtask's part of checkpoint n is stored.
    Ack {
        checkpoint: CheckpointId,
        snapshot: Box<SubtaskSnapshot>,
        stats: SnapshotStats,
    },
    /// The subtask could not take its part of checkpoint n.
    Decline {
        checkpoint: CheckpointId,
        uid: String,
        subtask: u32,
        reason: String,
    },
    /// A source's input ended; it still takes part in checkpoints until
    /// the final one (or the job's end).
    InputEnded { uid: String, subtask: u32 },
    /// The subtask reached the end of its input (a source: after the final
    /// checkpoint's barrier, or its input ended without checkpoints; a
    /// sink: every upstream task has finished). It takes no further
    /// checkpoints.
    Finished {
        uid: String,
        subtask: u32,
        role: Role,
    },
}

/// What part a subtask plays in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Source,
    Operator,
    Sink,
}

/// What the coordinator tells the sinks (two-phase commit). A `watch` value:
/// it holds everything a sink needs, so a missed intermediate value loses
/// nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitSignal {
    /// The newest completed checkpoint (0: none yet).
    pub completed: u64,
    /// Set once every sink has finished: `Some(true)` commits what no
    /// checkpoint covers (the job ended), `Some(false)` discards it (the job
    /// was cancelled and will resume from its latest checkpoint).
    pub end: Option<bool>,
}

/// Timings and sizes of one subtask's snapshot.
#[derive(Debug, Clone, Copy, Default)]
pub struct SnapshotStats {
    /// From the first barrier to alignment.
    pub alignment: Duration,
    /// The synchronous part (flush, consistent view, timers).
    pub sync: Duration,
    /// The asynchronous copy to checkpoint storage.
    pub asynchronous: Duration,
    /// Bytes the checkpoint references for this subtask.
    pub bytes: u64,
    /// Bytes written for this checkpoint (not reused from earlier ones).
    pub new_bytes: u64,
}

/// One subtask's part of a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubtaskSnapshot {
    pub uid: String,
    pub subtask: u32,
    /// Key-group range `[start, end)` of an operator subtask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_groups: Option<[u32; 2]>,
    /// The format of the base `files`: `rocksdb` (a RocksDB checkpoint) or
    /// `memory` (one dump file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The base: the keyed state as of an earlier (or this) checkpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileRef>,
    /// Changes since the base, oldest first: dumps of the cells changed
    /// between two checkpoints (deletions as tombstones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<FileRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timers: Option<FileRef>,
    /// A source's position (byte offset, next sequence number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// A partitioned source's position: partition → the last sequence
    /// number emitted from it (a restore reads on after it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub partitions: BTreeMap<u32, u64>,
    /// A sink's written but uncommitted files, committed once this
    /// checkpoint is complete (names relative to the sink's directory).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    /// Per declared state: keys and bytes in `files` (savepoints).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state_stats: Vec<StateStats>,
    /// An operator subtask that had closed (its input ended: the final
    /// checkpoint); restored, it is not closed again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub finished: bool,
}

/// How much of one state a savepoint's subtask file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateStats {
    pub name: String,
    /// Keys with state.
    pub keys: u64,
    /// Bytes of keys and encoded values.
    pub bytes: u64,
}

/// A stored file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    /// Relative to the job's checkpoint directory (a checkpoint) or to the
    /// savepoint directory.
    pub path: String,
    /// The file's name in the subtask's local state directory.
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// The speed sources read at, in percent of their own, shared by the
/// coordinator (which sets it when asked: an upgrade's standby that cannot
/// keep up with the job's changes slows the input until it does) and
/// every source subtask of the job. 100: not slowed.
#[derive(Debug)]
pub struct SourcePace(AtomicU32);

impl Default for SourcePace {
    fn default() -> Self {
        Self(AtomicU32::new(100))
    }
}

impl SourcePace {
    /// Sources read at `percent` (1–100) of the rate they read at before.
    pub fn set(&self, percent: u32) {
        self.0.store(percent.clamp(1, 100), Ordering::Relaxed);
    }

    /// The pace in percent (100: as fast as they can).
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What the synchronous part of an operator subtask's snapshot produced.
#[derive(Debug)]
pub struct LocalSnapshot {
    /// Makes the consistent copy of the keyed state (None: no keyed state).
    pub state: Option<SnapshotJob>,
    /// Encoded timers (empty: none).
    pub timers: Vec<u8>,
    /// The operator had closed (the final checkpoint).
    pub finished: bool,
}

/// Where an operator subtask's snapshots go: checkpoint storage, which
/// copies each snapshot out on a blocking thread and acks or declines the
/// barrier to the coordinator.
pub trait SnapshotStore: Send + Sync {
    /// Where the synchronous part of `barrier`'s snapshot puts its copy.
    fn local_dir(&self, barrier: &Barrier) -> PathBuf;
    /// Whether the snapshot for `barrier` must be a base (the state's
    /// files) rather than a delta.
    fn wants_base(&self, barrier: &Barrier) -> bool;
    /// Whether the subtask has a stored base a delta can extend (what an
    /// incremental savepoint extends).
    fn has_chain(&self) -> bool;
    /// The synchronous part failed: `barrier`'s checkpoint has no part
    /// from this subtask.
    fn decline(&self, barrier: &Barrier, reason: String);
    /// Stores `local` for `barrier` in the background (its state's
    /// `tables`, `<uid>/<state>` with their TTLs, in declaration order),
    /// then acks.
    fn upload(
        &self,
        barrier: &Barrier,
        local: LocalSnapshot,
        stats: SnapshotStats,
        tables: Vec<crate::state::TableSpec>,
    );
}

/// What the coordinator of an attempt is wired to.
#[derive(Debug)]
pub struct CoordinatorWiring {
    /// One trigger channel per source subtask.
    pub triggers: Vec<mpsc::UnboundedSender<Trigger>>,
    pub reports: mpsc::UnboundedReceiver<TaskReport>,
    pub commit: watch::Sender<CommitSignal>,
    /// Set when the job is cancelled.
    pub cancelled: watch::Receiver<bool>,
    /// Every subtask that acks a checkpoint: (uid, subtask).
    pub subtasks: Vec<(String, u32)>,
    pub sink_subtasks: usize,
}

/// Why an attempt's checkpointing failed the attempt (the coordinator's
/// error, which the job's tasks are torn down for).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordinatorError {
    /// The sources had ended: no later checkpoint can cover the output.
    #[error("the final checkpoint {id} failed ({reason})")]
    FinalCheckpoint { id: u64, reason: String },
    #[error(
        "checkpoint {id} failed ({reason}); {failures} failures in a row, tolerable_failures = {tolerable}"
    )]
    TooManyFailures {
        id: u64,
        reason: String,
        failures: u32,
        tolerable: u32,
    },
    /// The commit gate refused a completed checkpoint: another owner runs
    /// the job now (a cluster moved it), so this attempt commits nothing.
    #[error("fenced: {reason}")]
    Fenced { reason: String },
}

/// How an attempt's coordinator ended: `Some(savepoint)` when the job was
/// stopped with that savepoint.
pub type CoordinatorOutcome = Result<Option<Location>, CoordinatorError>;
