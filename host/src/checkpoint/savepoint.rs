//! The savepoint format: what `weir run --savepoint-dir` writes and
//! `weir run -s` reads, independent of the parallelism, the machine and the
//! directory it was taken in.
//!
//! Layout (the design's contract):
//! `<target dir>/savepoint-<first 6 of job id>-<12 random hex>/` holding
//! `_metadata` ([`super::metadata`], header `weir-savepoint 1 sha256=…`) and,
//! per operator subtask, `<uid>-<subtask>.state` (its key-group range) and
//! `<uid>-<subtask>.timers`. Every path in `_metadata` is relative to the
//! savepoint directory; every file carries its size and sha256.
//!
//! A `.state` file is a [`crate::state::dump`] in canonical form: tables
//! `<uid>/<state>` in declaration order, then each table's cells in
//! (key group, key) order, value encodings as the state kind defines them.
//! It does not depend on RocksDB's files, so any backend restores it at any
//! parallelism (each new subtask reads the cells of its key groups).
//!
//! Reading validates everything first ([`verify_files`]): the header and
//! checksum of `_metadata`, that no path leaves the directory, and the size
//! and sha256 of every data file, before a single cell is restored.

use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::types::OutDir;

use serde::Serialize;

use super::metadata::{self, ReadMetadata, SnapshotKind};
use super::storage::{Hashing, random_hex};
use super::{CheckpointError, FileRef, StateStats};
use crate::protocol::{Role, TransferProgress};
use crate::roots::Roots;
use crate::state::StateBackend;
use crate::state::TableSpec;
use crate::state::dump::{self, DUMP_FILE, DumpWriter};
use crate::state::rocks::RocksBackend;
use crate::state::ttl::StateTtl;

/// The `backend` of a savepoint subtask: one canonical `.state` dump.
pub const CANONICAL: &str = "canonical";

/// Creates a new, empty savepoint directory under `target` (and `target`
/// itself if need be). A target inside one of `roots` (the running host's
/// job roots, against which the host checked it when asked) is opened
/// through that root's handle, so neither `..` nor a symlink swapped in
/// since leads out of it; any other (the host's own `savepoints/`, or
/// `weir run` without roots) is opened as its path says.
pub fn create_dir(
    roots: Option<&Roots>,
    target: &Path,
    job_id: &str,
) -> Result<OutDir, CheckpointError> {
    let within = roots.filter(|roots| roots.holds(target));
    let parent =
        crate::roots::open_dir(within, target, true).map_err(|e| CheckpointError::io(target, e))?;
    let prefix: String = job_id.chars().take(6).collect();
    let name = format!("savepoint-{prefix}-{}", random_hex(6));
    OutDir::create_in(parent, target, &name).map_err(|e| CheckpointError::io(target.join(&name), e))
}

/// Writes one subtask's keyed state as a canonical `.state` file named
/// `name` in the savepoint directory `dir`. `copy` is the consistent copy
/// a snapshot job made (`format` `rocksdb` or `memory`); `specs` are its
/// tables (`<uid>/<state>` and TTL, in declaration order); only the key
/// groups `range` are written, without the cells a TTL dropped. Returns the file and the keys and bytes per state.
pub fn write_state(
    copy: &Path,
    format: &str,
    specs: &[TableSpec],
    range: Range<u32>,
    dir: &OutDir,
    name: &str,
    progress: &TransferProgress,
) -> Result<(FileRef, Vec<StateStats>), CheckpointError> {
    let tables: Vec<String> = specs.iter().map(|t| t.name.clone()).collect();
    let path = dir.join(name);
    let io = |e: std::io::Error| CheckpointError::io(&path, e);
    let file = dir.create(name).map_err(io)?;
    let hashing = Hashing::new(BufWriter::with_capacity(1 << 20, file));
    let mut writer = DumpWriter::new(hashing, &tables).map_err(io)?;
    let mut stats: Vec<StateStats> = tables
        .iter()
        .map(|t| StateStats {
            name: t.split_once('/').map_or(t.as_str(), |(_, s)| s).to_string(),
            ..StateStats::default()
        })
        .collect();
    let mut failed: Option<std::io::Error> = None;
    let now = crate::state::ttl::wall_millis();
    let mut push = |table: usize, group: u16, key: &[u8], value: &[u8]| {
        if failed.is_some() || !range.contains(&u32::from(group)) {
            return;
        }
        // An expired cell of a TTL state is left out.
        if let Some(ttl) = &specs[table].ttl
            && crate::state::ttl::split(value)
                .is_some_and(|(stamp, _)| ttl.dropped_offline(stamp, now))
        {
            return;
        }
        if let Err(e) = writer.push(table as u32, group, key, Some(value)) {
            failed = Some(e);
            return;
        }
        let bytes = (key.len() + value.len()) as u64;
        stats[table].keys += 1;
        stats[table].bytes += bytes;
        progress.add(1, bytes);
    };
    let state_error = |e: crate::state::StateError| CheckpointError::io(copy, e);
    match format {
        "rocksdb" => {
            let source = RocksBackend::open(copy, &tables).map_err(state_error)?;
            for table in 0..tables.len() {
                source
                    .scan(table, range.clone(), &mut |group, key, value| {
                        push(table, group, key, value)
                    })
                    .map_err(state_error)?;
            }
        }
        // The memory backend's copy is already in table, key-group, key order.
        "memory" => {
            dump::read(&copy.join(DUMP_FILE), |table, group, key, value| {
                if let (Some(index), Some(value)) = (tables.iter().position(|t| t == table), value)
                {
                    push(index, group, key, value);
                }
            })
            .map_err(state_error)?;
        }
        other => {
            return Err(CheckpointError::io(
                copy,
                format!("cannot write a savepoint from a `{other}` copy"),
            ));
        }
    }
    if let Some(error) = failed {
        return Err(io(error));
    }
    let mut hashing = writer.into_inner();
    hashing.flush().map_err(io)?;
    let (buffered, size, sha256) = hashing.finish();
    let file = buffered.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    let file = FileRef {
        path: name.to_string(),
        name: name.to_string(),
        size,
        sha256,
    };
    Ok((file, stats))
}

/// Checks the size and sha256 of every file `_metadata` references, reading
/// each whole: a restore calls it before it restores anything.
pub fn verify_files(read: &ReadMetadata) -> Result<(), CheckpointError> {
    for file in read.metadata.files() {
        let path = read.resolve(file);
        let mut reader = Hashing::new(std::io::BufReader::with_capacity(1 << 20, read.open(file)?));
        std::io::copy(&mut reader, &mut std::io::sink())
            .map_err(|e| CheckpointError::io(&path, e))?;
        let (_, size, sha256) = reader.finish();
        file.check(&path, size, &sha256)?;
    }
    Ok(())
}

/// Reads a restore point (savepoint or checkpoint, its directory or
/// `_metadata`) and checks every file it references, reading each whole:
/// what `weir run -s` does before it restores anything.
pub fn validate(path: &Path) -> Result<ReadMetadata, CheckpointError> {
    let read = metadata::read(path)?;
    verify_files(&read)?;
    Ok(read)
}

/// Deletes a savepoint after checking that `path` is one: its `_metadata`
/// and every file it references; the directory too once empty. Returns the
/// directory.
pub fn dispose(path: &Path) -> Result<PathBuf, CheckpointError> {
    let read = metadata::read(path)?;
    if read.metadata.kind != SnapshotKind::Savepoint {
        return Err(CheckpointError::Corrupt {
            path: read.path,
            message: "this is a checkpoint, not a savepoint; the host retires checkpoints itself"
                .to_string(),
        });
    }
    let dir = cap_std::fs::Dir::open_ambient_dir(&read.base, cap_std::ambient_authority())
        .map_err(|e| CheckpointError::io(&read.base, e))?;
    for file in read.metadata.files() {
        let path = read.resolve(file);
        match dir.remove_file(&file.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CheckpointError::io(&path, e)),
        }
    }
    std::fs::remove_file(&read.path).map_err(|e| CheckpointError::io(&read.path, e))?;
    // Anything else in the directory is not ours: it stays.
    let _ = std::fs::remove_dir(&read.base);
    Ok(read.base)
}

/// What `weir savepoint inspect` shows, readable without any plugin.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub path: PathBuf,
    pub kind: SnapshotKind,
    pub job_id: String,
    pub job_name: String,
    pub checkpoint: u64,
    pub completed_ms: i64,
    pub max_parallelism: u32,
    pub bytes: u64,
    pub operators: Vec<OperatorInspection>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OperatorInspection {
    pub uid: String,
    pub role: Role,
    pub parallelism: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin: Option<metadata::PluginRef>,
    pub states: Vec<StateInspection>,
    /// A source's position per subtask (byte offset or sequence number).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub positions: Vec<u64>,
    /// A partitioned source's position: partition → last sequence emitted.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub partitions: std::collections::BTreeMap<u32, u64>,
    /// Event-time and processing-time timers stored, in bytes.
    pub timer_bytes: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StateInspection {
    pub name: String,
    pub kind: String,
    pub schema_version: u32,
    /// Its time-to-live when the snapshot was taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<StateTtl>,
    /// None when the snapshot does not record it (a checkpoint, a native
    /// savepoint).
    pub keys: Option<u64>,
    pub bytes: Option<u64>,
}

/// Summarises a read `_metadata` for `weir savepoint inspect`.
pub fn inspect(read: &ReadMetadata) -> Inspection {
    let m = &read.metadata;
    let operators = m
        .operators
        .iter()
        .map(|(uid, op)| {
            let states = op
                .states
                .iter()
                .map(|state| {
                    let stats: Vec<&StateStats> = op
                        .subtasks
                        .iter()
                        .flat_map(|s| s.state_stats.iter().filter(|t| t.name == state.name))
                        .collect();
                    // Canonical savepoints count keys and bytes; checkpoints
                    // and native savepoints (backend files) do not.
                    let recorded = m.kind == SnapshotKind::Savepoint
                        && op.subtasks.iter().all(|s| {
                            s.backend.is_none() || s.backend.as_deref() == Some(CANONICAL)
                        });
                    StateInspection {
                        name: state.name.clone(),
                        kind: state.kind.clone(),
                        schema_version: state.schema_version,
                        ttl: state.ttl,
                        keys: recorded.then(|| stats.iter().map(|s| s.keys).sum()),
                        bytes: recorded.then(|| stats.iter().map(|s| s.bytes).sum()),
                    }
                })
                .collect();
            let files = op
                .subtasks
                .iter()
                .flat_map(|s| s.files.iter().chain(&s.deltas).chain(s.timers.as_ref()));
            OperatorInspection {
                uid: uid.clone(),
                role: op.role,
                parallelism: op.parallelism,
                plugin: op.plugin.clone(),
                states,
                positions: op.subtasks.iter().filter_map(|s| s.position).collect(),
                partitions: op
                    .subtasks
                    .iter()
                    .flat_map(|s| s.partitions.iter().map(|(&p, &seq)| (p, seq)))
                    .collect(),
                timer_bytes: op
                    .subtasks
                    .iter()
                    .filter_map(|s| s.timers.as_ref())
                    .map(|f| f.size)
                    .sum(),
                bytes: files.map(|f| f.size).sum(),
            }
        })
        .collect();
    Inspection {
        path: read.base.clone(),
        kind: m.kind,
        job_id: m.job_id.clone(),
        job_name: m.job_name.clone(),
        checkpoint: m.checkpoint,
        completed_ms: m.completed_ms,
        max_parallelism: m.max_parallelism,
        bytes: m.size(),
        operators,
    }
}

#[cfg(test)]
mod tests {
    use super::super::storage::write_file;
    use super::*;
    use crate::state::WriteOp;
    use crate::state::memory::MemoryBackend;
    use sha2::{Digest, Sha256};

    #[test]
    fn writes_canonical_cells_of_the_range_with_stats() {
        let tables = vec!["op/a".to_string(), "op/b".to_string()];
        let mut backend = MemoryBackend::new(2);
        let put = |table, key_group, key: &[u8], value: &[u8]| WriteOp::Put {
            table,
            key_group,
            key: key.to_vec(),
            value: value.to_vec(),
        };
        backend
            .write(vec![
                put(1, 5, b"z", b"1"),
                put(0, 9, b"y", b"22"),
                put(0, 2, b"x", b"333"),
                put(0, 70, b"out", b"of range"),
            ])
            .expect("write");
        let work = tempfile::tempdir().expect("tempdir");
        let copy = work.path().join("copy");
        let format = backend.checkpoint(&copy, &tables).expect("copy");
        let progress = TransferProgress::default();
        let out = OutDir::open(work.path()).expect("open");
        let (file, stats) = write_state(
            &copy,
            &format,
            &tables
                .iter()
                .map(|name| TableSpec {
                    name: name.clone(),
                    ttl: None,
                })
                .collect::<Vec<_>>(),
            0..64,
            &out,
            "op-0.state",
            &progress,
        )
        .expect("write");
        let mut seen = Vec::new();
        dump::read(&work.path().join(&file.path), |t, g, k, v| {
            seen.push((t.to_string(), g, k.to_vec(), v.map(<[u8]>::to_vec)))
        })
        .expect("read");
        assert_eq!(
            seen,
            vec![
                ("op/a".into(), 2, b"x".to_vec(), Some(b"333".to_vec())),
                ("op/a".into(), 9, b"y".to_vec(), Some(b"22".to_vec())),
                ("op/b".into(), 5, b"z".to_vec(), Some(b"1".to_vec())),
            ]
        );
        assert_eq!(stats[0].name, "a");
        assert_eq!((stats[0].keys, stats[0].bytes), (2, 7));
        assert_eq!((stats[1].keys, stats[1].bytes), (1, 2));
        let bytes = std::fs::read(work.path().join(&file.path)).expect("read");
        assert_eq!(file.size, bytes.len() as u64);
        assert_eq!(file.sha256, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(progress.keys.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    #[test]
    fn a_new_directory_is_named_after_the_job() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = create_dir(None, root.path(), "abcdef0123").expect("create");
        let name = dir
            .path()
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with("savepoint-abcdef-"), "{name}");
        assert_eq!(name.len(), "savepoint-abcdef-".len() + 12);
        assert!(dir.path().is_dir());
    }

    /// A target inside the host's job roots is written through the root's
    /// handle: a symlink out, there when asked or swapped in after the
    /// directory was made, leads nowhere.
    #[test]
    fn a_target_inside_the_roots_stays_inside() {
        let temp = tempfile::tempdir().expect("tempdir");
        let base = temp.path().canonicalize().expect("canonical");
        let (root, outside) = (base.join("root"), base.join("outside"));
        std::fs::create_dir_all(root.join("sp")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        let roots = Roots::open(std::slice::from_ref(&root)).expect("roots");

        // A symlink out of the root where the target is: refused.
        std::os::unix::fs::symlink(&outside, root.join("out")).expect("symlink");
        assert!(create_dir(Some(&roots), &root.join("out"), "abcdef").is_err());
        assert!(create_dir(Some(&roots), &root.join("out/deeper"), "abcdef").is_err());
        assert_eq!(std::fs::read_dir(&outside).expect("list").count(), 0);

        // Made inside; then its parent is swapped for a symlink out: the
        // files still land in the directory that was made.
        let dir = create_dir(Some(&roots), &root.join("sp"), "abcdef").expect("create");
        let name = dir.path().file_name().expect("name").to_owned();
        std::fs::rename(root.join("sp"), root.join("moved")).expect("move");
        std::os::unix::fs::symlink(&outside, root.join("sp")).expect("symlink");
        write_file(&dir, "part".into(), "part", b"state").expect("write");
        let metadata = metadata::CheckpointMetadata {
            kind: SnapshotKind::Savepoint,
            job_id: "abcdef".into(),
            job_name: "job".into(),
            checkpoint: 1,
            completed_ms: 0,
            max_parallelism: 8,
            operators: Default::default(),
            exchanges: Default::default(),
        };
        metadata::write(&dir, &metadata).expect("metadata");
        assert_eq!(std::fs::read_dir(&outside).expect("list").count(), 0);
        let landed = root.join("moved").join(&name);
        assert_eq!(std::fs::read(landed.join("part")).expect("read"), b"state");
        assert!(landed.join(metadata::METADATA_FILE).is_file());
        dir.remove().expect("remove");
        assert!(!landed.exists());
    }
}
