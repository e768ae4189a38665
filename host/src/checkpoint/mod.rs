//! Checkpoints: asynchronous barrier snapshotting and restore.
//!
//! - [`coordinator`]: one per running attempt of a job. Triggers checkpoint n
//!   at the sources, collects every subtask's ack, writes `_metadata`, tells
//!   the sinks to commit, applies retention; times out and aborts.
//! - [`storage`]: a subtask's side: stores its state snapshot asynchronously
//!   (a delta of the changed cells, or a RocksDB base whose SST files are
//!   copied once, under `shared/`), then acks.
//! - [`retention`]: reference counts of shared files, so retention never
//!   deletes a file a retained checkpoint still uses (pure, property-tested).
//! - [`metadata`]: the `_metadata` file: what a completed checkpoint holds,
//!   keyed by operator uid; written atomically, read with checks.
//! - [`restore`]: the design's restore rules (map state by uid, refuse to drop
//!   state unless allowed) and materialising a subtask's state from files.
//! - [`savepoint`]: the savepoint format: a self-contained directory of
//!   canonical state files (one per key-group range), written when the user
//!   asks, read and validated whole before anything is restored.
//!
//! The layout is the design's contract:
//! `<checkpoint dir>/<job id>/chk-<n>/_metadata`, private files (timers)
//! under `chk-<n>/<uid>-<subtask>/`, shared (incremental) files — bases and
//! deltas — under `<checkpoint dir>/<job id>/shared/`.
//!
//! Between the dataflow tasks and the coordinator travel only the plain
//! messages of this file ([`TaskReport`], [`CommitSignal`]).

pub mod coordinator;
pub mod metadata;
pub mod remote;
pub mod restore;
pub mod retention;
pub mod savepoint;
pub mod standby;
pub mod storage;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::types::CheckpointId;

pub use metadata::{CheckpointMetadata, FileRef, SnapshotKind, StateStats, SubtaskSnapshot};

/// What the coordinator asks of a source subtask.
#[derive(Debug)]
pub struct Trigger {
    pub checkpoint: CheckpointId,
    /// Set for stop-with-savepoint: the source stops after the barrier
    /// once the savepoint completed (and reads on if it failed).
    pub stop: Option<StopAfter>,
    /// The final checkpoint, taken once every source's input ended: it
    /// covers the job's whole output, and the source ends after its
    /// barrier.
    pub last: bool,
}

/// How a source stops after a savepoint's barrier.
#[derive(Debug)]
pub struct StopAfter {
    /// First advance the watermark to the end, so every event-time timer
    /// fires before the savepoint (Flink's `stop --drain`).
    pub drain: bool,
    /// Whether the savepoint completed.
    pub outcome: tokio::sync::oneshot::Receiver<bool>,
}

/// The form a savepoint's keyed state takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SavepointForm {
    /// One canonical `.state` dump per subtask: relocatable, readable at
    /// any parallelism and by any backend.
    #[default]
    Canonical,
    /// The backend's own files of a full base: quick to write and to
    /// reopen file for file where the key-group range is unchanged.
    Native,
    /// The subtask's checkpoint chain (its latest base and the deltas
    /// since, linked in) plus one delta of the changes since its last
    /// checkpoint: the least to write at the barrier, and a restore that
    /// already holds the chain's state (an upgrade's
    /// [`standby`](standby)) applies only the new
    /// deltas. A subtask without a chain writes [`SavepointForm::Native`].
    Incremental,
}

/// The savepoints in flight, by checkpoint id: where operator subtasks
/// write their part of barrier n instead of checkpoint storage.
#[derive(Debug, Default)]
pub struct SavepointTargets {
    /// By checkpoint id: the savepoint directory and the form its state
    /// takes.
    dirs: Mutex<HashMap<u64, (PathBuf, SavepointForm)>>,
    /// While set, checkpoints are deltas (unless a subtask has no base or
    /// one is forced): an upgrade's standby follows the chain's deltas.
    bases_held: std::sync::atomic::AtomicBool,
    /// The speed sources read at, in percent of their own (100: not
    /// slowed): an upgrade's standby that cannot keep up with the job's
    /// changes slows the input until it does.
    source_pace: std::sync::atomic::AtomicU32,
    /// A checkpoint every operator subtask takes as a base (its cache
    /// written to its backend): one that prepares a savepoint.
    base: AtomicU64,
    /// The final checkpoint (0: none yet).
    last: AtomicU64,
    /// Keys and bytes written so far (progress).
    pub progress: TransferProgress,
}

impl SavepointTargets {
    /// Checkpoint n is the final one: every operator subtask closes when
    /// it aligns it, before its snapshot.
    pub fn set_final(&self, checkpoint: CheckpointId) {
        self.last.store(checkpoint.0, Ordering::Relaxed);
    }

    /// Whether checkpoint n is the final one.
    pub fn is_final(&self, checkpoint: CheckpointId) -> bool {
        self.last.load(Ordering::Relaxed) == checkpoint.0
    }

    /// Checkpoint n is to be a base in every operator subtask.
    pub fn force_base(&self, checkpoint: CheckpointId) {
        self.base.store(checkpoint.0, Ordering::Relaxed);
    }

    /// Whether checkpoint n was asked to be a base.
    pub fn base_forced(&self, checkpoint: CheckpointId) -> bool {
        self.base.load(Ordering::Relaxed) == checkpoint.0
    }

    /// While `held`, subtasks with a base take deltas only (see
    /// [`SubtaskStorage::wants_base`](storage::SubtaskStorage::wants_base)).
    pub fn hold_bases(&self, held: bool) {
        self.bases_held.store(held, Ordering::Relaxed);
    }

    pub fn bases_held(&self) -> bool {
        self.bases_held.load(Ordering::Relaxed)
    }

    /// Sources read at `percent` (1–100) of the rate they read at before
    /// (see `dataflow::task::Pacer`).
    pub fn pace_sources(&self, percent: u32) {
        self.source_pace
            .store(percent.clamp(1, 100), Ordering::Relaxed);
    }

    /// The pace sources read at, in percent (100: as fast as they can; 0
    /// is the default, never set).
    pub fn source_pace(&self) -> u32 {
        match self.source_pace.load(Ordering::Relaxed) {
            0 => 100,
            percent => percent,
        }
    }

    pub fn insert(&self, checkpoint: CheckpointId, dir: PathBuf, form: SavepointForm) {
        self.dirs
            .lock()
            .expect("not poisoned")
            .insert(checkpoint.0, (dir, form));
    }

    pub fn remove(&self, checkpoint: CheckpointId) {
        self.dirs
            .lock()
            .expect("not poisoned")
            .remove(&checkpoint.0);
    }

    /// The savepoint directory of barrier n, if n is a savepoint, and the
    /// form of its state.
    pub fn get(&self, checkpoint: CheckpointId) -> Option<(PathBuf, SavepointForm)> {
        self.dirs
            .lock()
            .expect("not poisoned")
            .get(&checkpoint.0)
            .cloned()
    }
}

/// Counters of a long state transfer (a savepoint being written, a
/// restore), for the progress line.
#[derive(Debug, Default)]
pub struct TransferProgress {
    pub keys: AtomicU64,
    pub bytes: AtomicU64,
    /// Set while a transfer runs.
    pub active: std::sync::atomic::AtomicBool,
}

impl TransferProgress {
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

/// Errors of checkpoint storage, metadata and restore. Each names the file,
/// uid or state at fault.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: not a checkpoint or savepoint: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("cannot restore from {path}: {problems}", problems = .problems.join("; "))]
    Restore {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error(transparent)]
    Remote(#[from] remote::RemoteError),
}

impl CheckpointError {
    pub(crate) fn io(path: impl Into<PathBuf>, error: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.into(),
            message: error.to_string(),
        }
    }
}

/// The directory name of checkpoint n.
pub fn checkpoint_dir_name(id: CheckpointId) -> String {
    format!("chk-{}", id.0)
}
