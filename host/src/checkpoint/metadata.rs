//! The `_metadata` file of a completed checkpoint or savepoint, keyed by
//! operator uid.
//!
//! On disk: one header line `weir-checkpoint <format version> sha256=<hex>`
//! (`weir-savepoint` for a savepoint) followed by the JSON body the checksum
//! covers. It is written to a temp name, fsynced and renamed, so a reader
//! sees a whole file or none; a directory without `_metadata` never counts.
//! Every file path in it is relative: to the job's checkpoint directory
//! (`<dir>/<job id>`) for a checkpoint, to the savepoint's own directory for
//! a savepoint (so a savepoint can be moved). A path that would leave that
//! directory is rejected on reading.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::CheckpointError;
pub use crate::protocol::{FileRef, Role, StateStats, SubtaskSnapshot};
use crate::types::OutDir;

pub const METADATA_FILE: &str = "_metadata";
pub const FORMAT_VERSION: u32 = 1;

/// Whether a snapshot is a checkpoint (automatic, owned by the host) or a
/// savepoint (taken by the user, portable, never deleted by the host).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    #[default]
    Checkpoint,
    Savepoint,
}

impl SnapshotKind {
    /// The first word of `_metadata`.
    fn magic(self) -> &'static str {
        match self {
            SnapshotKind::Checkpoint => "weir-checkpoint",
            SnapshotKind::Savepoint => "weir-savepoint",
        }
    }
}

impl std::fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SnapshotKind::Checkpoint => "checkpoint",
            SnapshotKind::Savepoint => "savepoint",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMetadata {
    /// Set from the header's first word, not stored in the body.
    #[serde(skip)]
    pub kind: SnapshotKind,
    pub job_id: String,
    pub job_name: String,
    pub checkpoint: u64,
    /// Wall-clock milliseconds when it completed.
    pub completed_ms: i64,
    pub max_parallelism: u32,
    pub operators: BTreeMap<String, OperatorSnapshot>,
    /// A cluster savepoint's exchanges (a staged job stopped whole), by
    /// the uid of the exchange's reader: key group → the stream sequence
    /// read up to, which is all its writers published before their
    /// savepoints. For the record: the exchanges' operators are not among
    /// `operators`, and a restore starts on new exchanges.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exchanges: BTreeMap<String, BTreeMap<u32, u64>>,
}

/// One node of the job (source, operator or sink), by uid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorSnapshot {
    pub role: Role,
    pub parallelism: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<PluginRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub states: Vec<StateRef>,
    pub subtasks: Vec<SubtaskSnapshot>,
}

/// The plugin an operator ran with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginRef {
    pub name: String,
    pub version: String,
    pub digest: String,
}

/// A declared state of an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateRef {
    pub name: String,
    /// `value`, `list` or `map`.
    pub kind: String,
    pub schema_version: u32,
    /// Its time-to-live when the snapshot was taken: its cells are stored
    /// after their last-update stamp (`state::ttl`). Absent: no TTL, cells
    /// unstamped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<crate::state::ttl::StateTtl>,
}

impl FileRef {
    pub fn is_shared(&self) -> bool {
        self.path.starts_with("shared/")
    }

    /// Checks the size and sha256 read from the file at `path` against
    /// this reference.
    pub fn check(&self, path: &Path, size: u64, sha256: &str) -> Result<(), CheckpointError> {
        if size == self.size && sha256 == self.sha256 {
            return Ok(());
        }
        Err(CheckpointError::Corrupt {
            path: path.to_path_buf(),
            message: format!(
                "{size} bytes with sha256 {sha256}; _metadata says {} bytes with sha256 {} (the file is truncated, damaged or foreign)",
                self.size, self.sha256
            ),
        })
    }
}

impl CheckpointMetadata {
    /// Every file the checkpoint references.
    pub fn files(&self) -> impl Iterator<Item = &FileRef> {
        self.operators
            .values()
            .flat_map(|op| &op.subtasks)
            .flat_map(|s| s.files.iter().chain(&s.deltas).chain(s.timers.as_ref()))
    }

    /// The shared files the checkpoint references (paths).
    pub fn shared_files(&self) -> Vec<String> {
        let mut shared: Vec<String> = self
            .files()
            .filter(|f| f.is_shared())
            .map(|f| f.path.clone())
            .collect();
        shared.sort();
        shared.dedup();
        shared
    }

    /// Total bytes the checkpoint references.
    pub fn size(&self) -> u64 {
        self.files().map(|f| f.size).sum()
    }
}

impl OperatorSnapshot {
    /// Its subtasks' files as a `_metadata` in the directory above
    /// `dir` names them: each path below `dir` (a spooling sink's
    /// pending epochs, kept in the snapshot's directory, too).
    pub fn relocate(&mut self, dir: &str) {
        let below = |path: &mut String| *path = format!("{dir}/{path}");
        for subtask in &mut self.subtasks {
            subtask.files.iter_mut().for_each(|f| below(&mut f.path));
            subtask.deltas.iter_mut().for_each(|f| below(&mut f.path));
            subtask.timers.iter_mut().for_each(|f| below(&mut f.path));
            subtask
                .pending
                .iter_mut()
                .filter(|p| p.starts_with("pending/"))
                .for_each(below);
        }
    }
}

/// One savepoint of job `job_id` (`job_name`) from its **tasks'**
/// (`parts`: each task's savepoint directory, relative to the merged
/// one's, and its `_metadata`): every task runs the same nodes, each
/// node's subtask *i* in task *i* (see `JobGraph::task`). The merged one
/// holds each node's subtasks from every task, its files' paths below
/// the task's directory; it restores the job at its parallelism or
/// another, whole or as tasks again. Every subtask must be in exactly
/// one part.
pub fn merge_tasks(
    job_id: &str,
    job_name: &str,
    parts: &[(String, CheckpointMetadata)],
) -> Result<CheckpointMetadata, String> {
    let Some((_, first)) = parts.first() else {
        return Err(format!("job {job_id}: no task savepoint to merge"));
    };
    let mut merged = CheckpointMetadata {
        kind: SnapshotKind::Savepoint,
        job_id: job_id.to_string(),
        job_name: job_name.to_string(),
        checkpoint: 0,
        completed_ms: 0,
        max_parallelism: first.max_parallelism,
        operators: BTreeMap::new(),
        exchanges: BTreeMap::new(),
    };
    for (dir, part) in parts {
        let at = |what: String| format!("the task savepoint in {dir}: {what}");
        if part.kind != SnapshotKind::Savepoint {
            return Err(at(format!("a {}, not a savepoint", part.kind)));
        }
        if part.max_parallelism != merged.max_parallelism {
            return Err(at(format!(
                "max_parallelism {}, another task's {}",
                part.max_parallelism, merged.max_parallelism
            )));
        }
        let (ours, theirs): (Vec<&String>, Vec<&String>) = (
            part.operators.keys().collect(),
            first.operators.keys().collect(),
        );
        if ours != theirs {
            return Err(at(format!(
                "uids {}, another task's {}",
                join(&ours),
                join(&theirs)
            )));
        }
        merged.checkpoint = merged.checkpoint.max(part.checkpoint);
        merged.completed_ms = merged.completed_ms.max(part.completed_ms);
        merged.exchanges.extend(part.exchanges.clone());
        for (uid, op) in &part.operators {
            let mut op = op.clone();
            op.relocate(dir);
            let Some(into) = merged.operators.get_mut(uid) else {
                merged.operators.insert(uid.clone(), op);
                continue;
            };
            if (into.role, into.parallelism, &into.plugin) != (op.role, op.parallelism, &op.plugin)
            {
                return Err(at(format!(
                    "uid `{uid}` ran otherwise than in another task (role, parallelism or plugin)"
                )));
            }
            for subtask in op.subtasks {
                if into.subtasks.iter().any(|s| s.subtask == subtask.subtask) {
                    return Err(at(format!(
                        "subtask {} of uid `{uid}` is in another task's savepoint too",
                        subtask.subtask
                    )));
                }
                into.subtasks.push(subtask);
            }
        }
    }
    for (uid, op) in &mut merged.operators {
        op.subtasks.sort_by_key(|s| s.subtask);
        let missing: Vec<String> = (0..op.parallelism)
            .filter(|i| !op.subtasks.iter().any(|s| s.subtask == *i))
            .map(|i| i.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "job {job_id}: subtask(s) {} of uid `{uid}` are in no task's savepoint",
                missing.join(", ")
            ));
        }
    }
    Ok(merged)
}

fn join(uids: &[&String]) -> String {
    uids.iter()
        .map(|u| format!("`{u}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes `_metadata` into `dir` atomically: temp file, fsync, rename, fsync
/// of the directory. Returns its path.
pub fn write(dir: &OutDir, metadata: &CheckpointMetadata) -> Result<PathBuf, CheckpointError> {
    let bytes = encode(metadata).map_err(|e| CheckpointError::io(dir.path(), e))?;
    let path = dir.join(METADATA_FILE);
    let temp = format!("{METADATA_FILE}.inprogress");
    let result = (|| {
        let mut file = dir.create(&temp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        dir.rename(&temp, METADATA_FILE)?;
        dir.sync()
    })();
    result.map_err(|e| CheckpointError::io(&path, e))?;
    Ok(path)
}

/// `_metadata`'s bytes: the header line, then the JSON body it checksums.
pub fn encode(metadata: &CheckpointMetadata) -> std::io::Result<Vec<u8>> {
    let body = serde_json::to_vec_pretty(metadata)?;
    let digest = hex::encode(Sha256::digest(&body));
    let magic = metadata.kind.magic();
    let mut bytes = format!("{magic} {FORMAT_VERSION} sha256={digest}\n").into_bytes();
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// A read `_metadata` and the directory its paths are relative to.
#[derive(Debug, Clone)]
pub struct ReadMetadata {
    pub metadata: CheckpointMetadata,
    /// The `_metadata` file.
    pub path: PathBuf,
    /// The directory file paths are relative to: `<dir>/<job id>` for a
    /// checkpoint, the savepoint directory for a savepoint.
    pub base: PathBuf,
}

impl ReadMetadata {
    /// Where a referenced file is (for messages; read it with [`Self::open`]).
    pub fn resolve(&self, file: &FileRef) -> PathBuf {
        self.base.join(&file.path)
    }

    /// Opens a referenced file through a capability handle on the base
    /// directory (cap-std): neither its path nor a symlink inside the
    /// directory can reach a file outside it.
    pub fn open(&self, file: &FileRef) -> Result<std::fs::File, CheckpointError> {
        let path = self.resolve(file);
        let dir = cap_std::fs::Dir::open_ambient_dir(&self.base, cap_std::ambient_authority())
            .map_err(|e| CheckpointError::io(&self.base, e))?;
        dir.open(&file.path)
            .map(cap_std::fs::File::into_std)
            .map_err(|e| CheckpointError::io(&path, e))
    }
}

/// Reads and checks `_metadata`, given it or its directory. The header,
/// checksum, format version and every file path are checked; file contents
/// are checked when they are restored.
pub fn read(path: &Path) -> Result<ReadMetadata, CheckpointError> {
    let path = if path.is_dir() {
        path.join(METADATA_FILE)
    } else {
        path.to_path_buf()
    };
    let corrupt = |message: String| CheckpointError::Corrupt {
        path: path.clone(),
        message,
    };
    let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => corrupt(format!(
            "no {METADATA_FILE} (a checkpoint without it never completed)"
        )),
        _ => CheckpointError::io(&path, e),
    })?;
    let metadata = decode(&bytes, &path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let base = match metadata.kind {
        SnapshotKind::Checkpoint => dir.parent().unwrap_or(Path::new(".")).to_path_buf(),
        SnapshotKind::Savepoint => dir.to_path_buf(),
    };
    Ok(ReadMetadata {
        metadata,
        path,
        base,
    })
}

/// Checks and decodes `_metadata`'s bytes (read from `path`, named in
/// errors): header, checksum, format version and every file path.
pub fn decode(bytes: &[u8], path: &Path) -> Result<CheckpointMetadata, CheckpointError> {
    let corrupt = |message: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    let newline = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| corrupt("no header line".into()))?;
    let header = std::str::from_utf8(&bytes[..newline])
        .map_err(|_| corrupt("the header is not text".into()))?;
    let mut words = header.split(' ');
    let kind = match words.next() {
        Some(word) if word == SnapshotKind::Checkpoint.magic() => SnapshotKind::Checkpoint,
        Some(word) if word == SnapshotKind::Savepoint.magic() => SnapshotKind::Savepoint,
        _ => {
            return Err(corrupt(
                "the header does not start with `weir-checkpoint` or `weir-savepoint`".into(),
            ));
        }
    };
    let version: u32 = words
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| corrupt("the header has no format version".into()))?;
    if version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {version}; this weir reads version {FORMAT_VERSION}"
        )));
    }
    let expected = words
        .next()
        .and_then(|w| w.strip_prefix("sha256="))
        .ok_or_else(|| corrupt("the header has no checksum".into()))?;
    let body = &bytes[newline + 1..];
    if hex::encode(Sha256::digest(body)) != expected {
        return Err(corrupt(
            "checksum mismatch (the file is truncated or damaged)".into(),
        ));
    }
    let mut metadata: CheckpointMetadata =
        serde_json::from_slice(body).map_err(|e| corrupt(format!("bad JSON: {e}")))?;
    metadata.kind = kind;
    for file in metadata.files() {
        if !is_inside(&file.path) {
            return Err(corrupt(format!(
                "file reference `{}` points outside the {kind} directory",
                file.path
            )));
        }
    }
    Ok(metadata)
}

/// Whether a relative path stays inside its base: no root, no `..`.
pub fn is_inside(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CheckpointMetadata {
        let mut operators = BTreeMap::new();
        operators.insert(
            "count".to_string(),
            OperatorSnapshot {
                role: Role::Operator,
                parallelism: 1,
                plugin: Some(PluginRef {
                    name: "count".into(),
                    version: "0.1.0".into(),
                    digest: "ab".into(),
                }),
                states: vec![StateRef {
                    name: "count".into(),
                    kind: "value".into(),
                    schema_version: 1,
                    ttl: None,
                }],
                subtasks: vec![SubtaskSnapshot {
                    uid: "count".into(),
                    subtask: 0,
                    key_groups: Some([0, 128]),
                    backend: Some("rocksdb".into()),
                    files: vec![FileRef {
                        path: "shared/count-0-x-000009.sst".into(),
                        name: "000009.sst".into(),
                        size: 10,
                        sha256: "00".into(),
                    }],
                    ..SubtaskSnapshot::default()
                }],
            },
        );
        CheckpointMetadata {
            kind: SnapshotKind::Checkpoint,
            job_id: "j".into(),
            job_name: "wordcount".into(),
            checkpoint: 3,
            completed_ms: 1,
            max_parallelism: 128,
            operators,
            exchanges: Default::default(),
        }
    }

    #[test]
    fn round_trips_and_rejects_damage() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("job").join("chk-3");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = write(&OutDir::open(&dir).expect("open"), &sample()).expect("write");
        let read_back = read(&dir).expect("read");
        assert_eq!(read_back.metadata, sample());
        assert_eq!(read_back.base, root.path().join("job"));
        assert_eq!(read_back.metadata.shared_files().len(), 1);

        let bytes = std::fs::read(&path).expect("read");
        for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).expect("write");
            let error = read(&path).expect_err("truncated").to_string();
            assert!(error.contains("_metadata"), "{error}");
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x20;
        std::fs::write(&path, &flipped).expect("write");
        assert!(read(&path).is_err());
    }

    #[test]
    fn rejects_paths_leaving_the_directory() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("job").join("chk-1");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut metadata = sample();
        let op = metadata.operators.get_mut("count").expect("op");
        op.subtasks[0].files[0].path = "../../etc/passwd".into();
        write(&OutDir::open(&dir).expect("open"), &metadata).expect("write");
        let error = read(&dir).expect_err("escapes").to_string();
        assert!(error.contains("outside"), "{error}");
        assert!(!is_inside("/abs"));
        assert!(is_inside("shared/a.sst"));
    }
}
