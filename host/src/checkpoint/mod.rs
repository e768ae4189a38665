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
//! messages of [`crate::protocol`]; this module never names `dataflow`.

pub mod bootstrap;
pub mod cells;
pub mod coordinator;
pub mod metadata;
pub mod remote;
pub mod restore;
pub mod retention;
pub mod savepoint;

pub mod storage;

use std::path::PathBuf;

use crate::types::CheckpointId;

pub use metadata::{CheckpointMetadata, FileRef, SnapshotKind, StateStats, SubtaskSnapshot};

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
