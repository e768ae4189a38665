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
pub mod restore;
pub mod retention;
pub mod storage;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::types::CheckpointId;

pub use metadata::{CheckpointMetadata, FileRef, SubtaskSnapshot};

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
    /// The subtask reached the end of its input (a source: its input ended;
    /// a sink: every upstream task has finished). It takes no further
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
