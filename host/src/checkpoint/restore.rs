//! Restoring a job from a completed checkpoint (the savepoint issue reuses
//! this): the design's restore rules, checked before anything is restored,
//! and materialising one subtask's state, timers, source position or sink
//! files from the checkpoint's files.
//!
//! Rules ([`check`]):
//! - a uid in both the checkpoint and the job: its state is restored,
//!   redistributed by key group when the parallelism changed;
//! - a uid only in the job: starts empty;
//! - a uid with state only in the checkpoint, or a state name only in the
//!   checkpoint: the start fails naming each, unless
//!   `--allow-non-restored-state`, which skips and logs them;
//! - a state whose schema version changed: migrated through the plugin's
//!   migrate export while it is restored ([`MigrateCells`]); without one
//!   the start fails, naming the uid and state;
//! - a changed `max_parallelism`, a state whose kind changed, a uid that
//!   changed role, or a source whose parallelism changed: the start fails,
//!   naming the uid and state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::metadata::{CheckpointMetadata, OperatorSnapshot, ReadMetadata};
use super::savepoint::CANONICAL;
use super::storage::{Hashing, copy_open_hashed};
use super::{CheckpointError, FileRef, SubtaskSnapshot};
use crate::job::{JobGraph, NodeKind};
use crate::protocol::Role;
use crate::protocol::TransferProgress;
use crate::state::rocks::RocksBackend;
use crate::state::ttl::StateTtl;
use crate::state::{CellChunk, StateBackend, StateDescriptor, TableId, WriteOp, dump, table_names};

/// Whether a node snapshot holds anything to restore.
fn has_state(op: &OperatorSnapshot) -> bool {
    op.subtasks.iter().any(|s| {
        !s.files.is_empty()
            || !s.deltas.is_empty()
            || s.timers.is_some()
            || s.position.is_some()
            || !s.partitions.is_empty()
            || !s.pending.is_empty()
    })
}

/// What an operator of the new job declares.
#[derive(Debug, Clone, Default)]
pub struct Declared {
    pub states: Vec<StateDescriptor>,
    /// Its plugin exports schema migration.
    pub migrates: bool,
}

/// The uids with state in `metadata` that none of `uids` is: what a job
/// run as several (a staged job's stages, each restoring its own uids)
/// would leave behind, one line each as [`check`] says them.
pub fn not_restored<'a>(
    metadata: &CheckpointMetadata,
    uids: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let uids: HashSet<&str> = uids.into_iter().collect();
    metadata
        .operators
        .iter()
        .filter(|(uid, op)| !uids.contains(uid.as_str()) && has_state(op))
        .map(|(uid, _)| format!("uid `{uid}` is in the checkpoint but not in the job"))
        .collect()
}

/// Checks the restore rules for `graph` (whose operators declare what
/// `declared` says, by uid). Returns what `allow_non_restored` skipped, one
/// line each, for the log.
pub fn check(
    read: &ReadMetadata,
    graph: &JobGraph,
    declared: &HashMap<String, Declared>,
    allow_non_restored: bool,
) -> Result<Vec<String>, CheckpointError> {
    let metadata = &read.metadata;
    let mut problems = Vec::new();
    let mut skippable = Vec::new();
    if metadata.max_parallelism != graph.max_parallelism {
        problems.push(format!(
            "max_parallelism changed from {} to {} (state is split into that many key groups; it cannot change)",
            metadata.max_parallelism, graph.max_parallelism
        ));
    }
    for (uid, op) in &metadata.operators {
        let Some(node) = graph.nodes.iter().find(|n| &n.uid == uid) else {
            if has_state(op) {
                skippable.push(format!(
                    "uid `{uid}` is in the checkpoint but not in the job"
                ));
            }
            continue;
        };
        let role = match node.kind {
            NodeKind::Source(_) => Role::Source,
            NodeKind::Operator(_) => Role::Operator,
            NodeKind::Sink(_) => Role::Sink,
        };
        if role != op.role {
            problems.push(format!(
                "uid `{uid}` was a {:?} and is now a {role:?}",
                op.role
            ));
            continue;
        }
        if role == Role::Source
            && node.parallelism != op.parallelism
            && op.subtasks.iter().any(|s| s.position.is_some())
        {
            problems.push(format!(
                "source `{uid}`: parallelism changed from {} to {} (source positions are per subtask)",
                op.parallelism, node.parallelism
            ));
        }
        let new = declared.get(uid);
        let new_states = new.map(|d| d.states.as_slice()).unwrap_or(&[]);
        let migrates = new.is_some_and(|d| d.migrates);
        for old in &op.states {
            match new_states.iter().find(|s| s.name == old.name) {
                None => skippable.push(format!(
                    "state `{}` of uid `{uid}` is in the checkpoint but the operator no longer declares it",
                    old.name
                )),
                Some(new) if new.kind.to_string() != old.kind => problems.push(format!(
                    "uid `{uid}` state `{}`: kind changed from {} to {}",
                    old.name, old.kind, new.kind
                )),
                Some(new) if new.schema_version != old.schema_version && !migrates => {
                    problems.push(format!(
                        "uid `{uid}` state `{}`: schema version changed from {} to {} and the plugin has no migrate export (weir:operator/migration)",
                        old.name, old.schema_version, new.schema_version
                    ))
                }
                Some(_) => {}
            }
        }
    }
    if !skippable.is_empty() && !allow_non_restored {
        problems.push(format!(
            "{}; start with --allow-non-restored-state (-n) to skip it",
            skippable.join("; ")
        ));
    }
    if problems.is_empty() {
        Ok(skippable)
    } else {
        Err(CheckpointError::Restore {
            path: read.path.clone(),
            problems,
        })
    }
}

/// The states of `op` whose stored schema version differs from what the
/// operator declares now, as (table in `states` order, stored version).
pub fn changed_schemas(op: &OperatorSnapshot, states: &[StateDescriptor]) -> Vec<(usize, u32)> {
    states
        .iter()
        .enumerate()
        .filter_map(|(table, new)| {
            let old = op.states.iter().find(|s| s.name == new.name)?;
            (old.schema_version != new.schema_version).then_some((table, old.schema_version))
        })
        .collect()
}

/// The snapshot subtask whose state a new subtask can take over file for
/// file: same key-group range, a RocksDB checkpoint, and exactly the states
/// the operator declares now (callers migrating a state do not use it).
pub fn whole_files<'a>(
    op: &'a OperatorSnapshot,
    key_groups: [u32; 2],
    states: &[StateDescriptor],
) -> Option<&'a SubtaskSnapshot> {
    let old: HashSet<&str> = op.states.iter().map(|s| s.name.as_str()).collect();
    let new: HashSet<&str> = states.iter().map(|s| s.name.as_str()).collect();
    if old != new {
        return None;
    }
    op.subtasks
        .iter()
        .find(|s| s.key_groups == Some(key_groups) && s.backend.as_deref() == Some("rocksdb"))
}

/// Copies a snapshot's state files into `dir`, checking each checksum.
/// SST files (never written again) are hard-linked instead where the file
/// system allows and the stored file is a plain file inside the snapshot
/// (the one opened through its directory handle), then checked by reading;
/// `trusted` (a savepoint this process has just written, see
/// `RunOptions::trusted`): a linked SST's size is checked, not its hash.
pub fn install_files(
    read: &ReadMetadata,
    files: &[FileRef],
    dir: &Path,
    trusted: bool,
) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|e| CheckpointError::io(dir, e))?;
    for file in files {
        let source = read.resolve(file);
        let opened = read.open(file)?;
        let target = dir.join(&file.name);
        let linked = file.name.ends_with(".sst")
            && same_file(&opened, &source)
            && std::fs::hard_link(&source, &target).is_ok();
        let (size, sha256) = if linked && trusted {
            let size = opened
                .metadata()
                .map_err(|e| CheckpointError::io(&source, e))?
                .len();
            (size, file.sha256.clone())
        } else if linked {
            super::storage::hash_open(opened, &source)?
        } else {
            let output =
                std::fs::File::create(&target).map_err(|e| CheckpointError::io(&target, e))?;
            copy_open_hashed(opened, &source, output, &target)?
        };
        file.check(&source, size, &sha256)?;
    }
    Ok(())
}

/// Whether `path` names the very file `opened` is (no link in between).
#[cfg(unix)]
fn same_file(opened: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (opened.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => b.is_file() && a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_opened: &std::fs::File, _path: &Path) -> bool {
    false
}

/// Reads a stored file whole, checking its size and sha256.
fn read_verified(
    read: &ReadMetadata,
    file: &FileRef,
) -> Result<(PathBuf, Vec<u8>), CheckpointError> {
    let path = read.resolve(file);
    let mut reader = Hashing::new(read.open(file)?);
    let mut bytes = Vec::new();
    reader
        .read_to_end(&mut bytes)
        .map_err(|e| CheckpointError::io(&path, e))?;
    let (_, size, sha256) = reader.finish();
    file.check(&path, size, &sha256)?;
    Ok((path, bytes))
}

/// Merged delta changes past which the puts are loaded in bulk (as table
/// files) rather than written.
const LOAD_CHUNK: usize = 64 * 1024;

/// Cells handed to the backend at a time while loading a base in bulk (a
/// RocksDB table file each).
const BULK_CHUNK: usize = 256 * 1024;

/// Rewrites the stored cells of states whose schema version changed (the
/// plugin's migrate export, called per value).
pub trait MigrateCells: Send {
    /// Whether cells of `table` (in the new table order) need migrating.
    fn needs(&self, table: usize) -> bool;
    /// The cell in the encoding the plugin declares now. The error names
    /// the operator and state.
    fn migrate(&mut self, table: usize, cell: Vec<u8>) -> Result<Vec<u8>, String>;
}

/// How a restore rewrites the stored cells of states with a TTL (when
/// stored, or now): stamps kept, added (the restore's time) or removed,
/// expired cells dropped ([`crate::state::ttl::restamp`]).
#[derive(Debug, Clone, Default)]
pub struct Restamp {
    /// By table (new order): (the TTL stored, the TTL now) where either is set.
    tables: Vec<Option<(Option<StateTtl>, Option<StateTtl>)>>,
    /// Wall-clock ms the restore drops expired cells by.
    now: u64,
}

impl Restamp {
    /// For restoring `op`'s stored states into `states` (the operator's
    /// declaration now, its TTLs included).
    pub fn new(op: &OperatorSnapshot, states: &[StateDescriptor]) -> Self {
        let tables = states
            .iter()
            .map(|new| {
                let old = op
                    .states
                    .iter()
                    .find(|s| s.name == new.name)
                    .and_then(|s| s.ttl);
                (old.is_some() || new.ttl.is_some()).then_some((old, new.ttl))
            })
            .collect();
        Self {
            tables,
            now: crate::state::ttl::wall_millis(),
        }
    }

    fn get(&self, table: usize) -> Option<(Option<StateTtl>, Option<StateTtl>)> {
        self.tables.get(table).copied().flatten()
    }

    /// Whether the stored cells of every table are stamped as the
    /// operator's are now (so its files can be taken over as they are).
    pub fn keeps_format(&self) -> bool {
        self.tables
            .iter()
            .flatten()
            .all(|(old, new)| old.is_some() == new.is_some())
    }
}

/// Where restored cells go: one subtask's new backend, for its key groups
/// `range` and its tables (`<uid>/<state>`, in the backend's order); cells
/// of changed schemas are migrated, and cells of TTL states restamped
/// ([`Restamp`]), on the way.
pub struct CellSink<'a> {
    pub range: Range<u32>,
    pub tables: &'a [String],
    pub backend: &'a mut dyn StateBackend,
    pub progress: &'a TransferProgress,
    pub migrate: Option<&'a mut dyn MigrateCells>,
    pub restamp: Restamp,
}

impl CellSink<'_> {
    /// A transfer abandoned (an upgrade's standby dropped) stops here.
    fn check_abandoned(&self, path: &Path) -> Result<(), CheckpointError> {
        match self.progress.is_abandoned() {
            true => Err(CheckpointError::io(path, "the restore was abandoned")),
            false => Ok(()),
        }
    }

    fn index(&self) -> HashMap<String, usize> {
        self.tables
            .iter()
            .enumerate()
            .map(|(i, name)| (name.clone(), i))
            .collect()
    }

    /// Loads a base's `chunk` in bulk; cells of a state that migrates go
    /// through [`CellSink::write`]. `path` names the source in errors.
    fn load_chunk(&mut self, chunk: CellChunk, path: &Path) -> Result<(), CheckpointError> {
        self.check_abandoned(path)?;
        let rewrites = chunk.iter().any(|(table, ..)| self.rewrites(table));
        if rewrites {
            return self.write(chunk.to_ops(), path, true);
        }
        self.backend
            .load_chunk(&chunk)
            .map_err(|e| CheckpointError::io(path, e))
    }

    /// Migrates (where needed) and writes `ops`; `path` names the file they
    /// came from in errors. `bulk`: they are a base's cells, loaded in
    /// bulk ([`StateBackend::load`]); else a delta's changes, written.
    fn write(
        &mut self,
        mut ops: Vec<WriteOp>,
        path: &Path,
        bulk: bool,
    ) -> Result<(), CheckpointError> {
        self.check_abandoned(path)?;
        if ops
            .iter()
            .any(|op| matches!(op, WriteOp::Put { table, .. } if self.rewrites(*table)))
        {
            ops = self.rewrite(ops, bulk, path)?;
        }
        match bulk {
            true => self.backend.load(ops),
            false => self.backend.write(ops),
        }
        .map_err(|e| CheckpointError::io(path, e))
    }
}

impl CellSink<'_> {
    /// Whether cells of `table` are rewritten on the way (migrated or
    /// restamped).
    fn rewrites(&self, table: TableId) -> bool {
        self.restamp.get(table).is_some() || self.migrate.as_deref().is_some_and(|m| m.needs(table))
    }

    /// `ops` with their puts migrated and restamped; an expired cell is
    /// left out of a `bulk` load, and deleted by a delta's writes (an older
    /// copy may be in the backend).
    fn rewrite(
        &mut self,
        ops: Vec<WriteOp>,
        bulk: bool,
        path: &Path,
    ) -> Result<Vec<WriteOp>, CheckpointError> {
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            let WriteOp::Put {
                table,
                key_group,
                key,
                value,
            } = op
            else {
                out.push(op);
                continue;
            };
            let migrate = self.migrate.as_deref_mut().filter(|m| m.needs(table));
            let migrated = |cell: Vec<u8>| match migrate {
                Some(migrate) => migrate.migrate(table, cell),
                None => Ok(cell),
            };
            let value = match self.restamp.get(table) {
                Some((old, new)) => crate::state::ttl::restamp(
                    old.as_ref(),
                    new.as_ref(),
                    self.restamp.now,
                    value,
                    migrated,
                )
                .map_err(|message| {
                    CheckpointError::io(path, format!("table `{}`: {message}", self.tables[table]))
                })?,
                None => {
                    Some(migrated(value).map_err(|message| CheckpointError::io(path, message))?)
                }
            };
            match value {
                Some(value) => out.push(WriteOp::Put {
                    table,
                    key_group,
                    key,
                    value,
                }),
                None if !bulk => out.push(WriteOp::Delete {
                    table,
                    key_group,
                    key,
                }),
                None => {}
            }
        }
        Ok(out)
    }
}

/// Streams to `visit` the cells a stored dump (a memory base,
/// a savepoint `.state` file or a delta) holds for the tables `index_of`
/// names (by their index) and the key groups `range`; the file's size and
/// sha256 are checked as it is read. Returns the file's path (for errors)
/// and the number of cells.
fn read_dump(
    read: &ReadMetadata,
    file: &FileRef,
    range: &Range<u32>,
    index_of: &HashMap<String, usize>,
    progress: &TransferProgress,
    mut visit: impl FnMut(TableId, u16, &[u8], Option<&[u8]>, &Path) -> Result<(), CheckpointError>,
) -> Result<(PathBuf, u64), CheckpointError> {
    let path = read.resolve(file);
    let mut reader = Hashing::new(std::io::BufReader::with_capacity(1 << 20, read.open(file)?));
    let mut cells = 0u64;
    let mut failed: Option<CheckpointError> = None;
    dump::decode_from(&mut reader, &path, |name, key_group, key, value| {
        let Some(&table) = index_of.get(name) else {
            return;
        };
        if failed.is_some() || !range.contains(&u32::from(key_group)) {
            return;
        }
        progress.add(1, (key.len() + value.map_or(0, <[u8]>::len)) as u64);
        cells += 1;
        if let Err(error) = visit(table, key_group, key, value, &path) {
            failed = Some(error);
        }
    })
    .map_err(|e| CheckpointError::io(&path, e))?;
    if let Some(error) = failed {
        return Err(error);
    }
    let (_, size, sha256) = reader.finish();
    file.check(&path, size, &sha256)?;
    Ok((path, cells))
}

/// Loads into `sink`, in bulk, the cells a stored base dump (a savepoint's
/// canonical file, a memory backend's copy) holds for its tables and key
/// groups (see [`read_dump`]): decoded here while another thread loads
/// the chunk before. Returns the number of cells.
fn load_dump(
    read: &ReadMetadata,
    file: &FileRef,
    range: &Range<u32>,
    sink: &mut CellSink<'_>,
) -> Result<u64, CheckpointError> {
    let (index_of, progress) = (sink.index(), sink.progress);
    let path = read.resolve(file);
    load_pipelined(sink, &path, |queue| {
        let mut chunk = CellChunk::with_capacity(BULK_CHUNK);
        let (_, cells) = read_dump(
            read,
            file,
            range,
            &index_of,
            progress,
            |table, group, key, value, _| {
                // A base holds live cells only; a deletion in one would have
                // nothing to delete in the new backend.
                if let Some(value) = value {
                    chunk.push(table, group, key, value);
                }
                queue_if_full(&mut chunk, queue).map(drop)
            },
        )?;
        queue(chunk)?;
        Ok(cells)
    })
}

/// The queue [`load_pipelined`] hands its producer.
type ChunkQueue<'q> = dyn FnMut(CellChunk) -> Result<(), CheckpointError> + 'q;

/// Hands `chunk` to `queue` once it holds [`BULK_CHUNK`] cells (a new one
/// takes its place). Returns how many cells it handed.
fn queue_if_full(
    chunk: &mut CellChunk,
    queue: &mut ChunkQueue<'_>,
) -> Result<u64, CheckpointError> {
    if chunk.len() < BULK_CHUNK {
        return Ok(0);
    }
    let full = std::mem::replace(chunk, CellChunk::with_capacity(BULK_CHUNK));
    let cells = full.len() as u64;
    queue(full)?;
    Ok(cells)
}

/// Runs `produce` here, handing it a queue of chunks of a base's cells
/// that another thread migrates and loads in bulk meanwhile (decoding or
/// scanning the next chunk overlaps loading the one before). `path` names
/// the source in errors. A writer's error is returned first.
fn load_pipelined<T>(
    sink: &mut CellSink<'_>,
    path: &Path,
    produce: impl FnOnce(&mut ChunkQueue<'_>) -> Result<T, CheckpointError>,
) -> Result<T, CheckpointError> {
    std::thread::scope(|scope| {
        let (chunks, received) = std::sync::mpsc::sync_channel::<CellChunk>(1);
        let writer = std::thread::Builder::new()
            .name("restore-load".to_string())
            .spawn_scoped(scope, || {
                for chunk in received {
                    sink.load_chunk(chunk, path)?;
                }
                Ok::<_, CheckpointError>(())
            })
            .map_err(|e| CheckpointError::io(path, e))?;
        let produced = produce(&mut |chunk| {
            // Closed: the writer failed (its error is the one returned).
            chunks
                .send(chunk)
                .map_err(|_| CheckpointError::io(path, "the restore's writer stopped"))
        });
        drop(chunks);
        writer.join().expect("the restore writer panicked")?;
        produced
    })
}

/// Changes merged from deltas before they are written (past it, the
/// merged changes are written and merging starts again).
const MERGE_LIMIT: usize = 1 << 20;

/// The latest change of each cell, from deltas applied in order.
#[derive(Default)]
struct Merged(HashMap<(usize, u16, Vec<u8>), Option<Vec<u8>>>);

impl Merged {
    fn add(&mut self, table: TableId, key_group: u16, key: &[u8], value: Option<&[u8]>) {
        self.0
            .insert((table, key_group, key.to_vec()), value.map(<[u8]>::to_vec));
    }

    /// Migrates (where needed) and writes the merged changes, each cell
    /// once: the puts sorted (in bulk, as table files, when there are
    /// many), then the deletions.
    fn write(&mut self, sink: &mut CellSink<'_>, path: &Path) -> Result<(), CheckpointError> {
        let (mut puts, mut deletes) = (Vec::new(), Vec::new());
        for ((table, key_group, key), value) in self.0.drain() {
            let into = if value.is_some() {
                &mut puts
            } else {
                &mut deletes
            };
            into.push(WriteOp::of_cell(table, key_group, key, value));
        }
        puts.sort_unstable_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        let bulk = puts.len() >= LOAD_CHUNK;
        sink.write(puts, path, bulk)?;
        sink.write(deletes, path, false)
    }
}

/// Loads into `sink` the cells of its key groups from every snapshot
/// subtask that holds some of them; a stored state not among the sink's
/// tables is skipped. `work` is a scratch directory. Returns the number of
/// cells loaded.
pub fn load_cells(
    read: &ReadMetadata,
    uid: &str,
    op: &OperatorSnapshot,
    work: &Path,
    sink: &mut CellSink<'_>,
) -> Result<u64, CheckpointError> {
    let index_of = sink.index();
    let range = sink.range.clone();
    let mut loaded = 0u64;
    for subtask in &op.subtasks {
        let Some([start, end]) = subtask.key_groups else {
            continue;
        };
        let overlap = start.max(range.start)..end.min(range.end);
        if overlap.is_empty() || (subtask.files.is_empty() && subtask.deltas.is_empty()) {
            continue;
        }
        let scratch = work.join(format!("restore-{uid}-{}", subtask.subtask));
        let state_error = |e: crate::state::StateError| CheckpointError::io(&scratch, e);
        match subtask.backend.as_deref() {
            Some("rocksdb") => {
                let _ = std::fs::remove_dir_all(&scratch);
                install_files(read, &subtask.files, &scratch, false)?;
                let old_tables = table_names(uid, op.states.iter().map(|s| s.name.as_str()));
                let source = RocksBackend::open(&scratch, &old_tables).map_err(state_error)?;
                let progress = sink.progress;
                loaded += load_pipelined(sink, &scratch, |queue| {
                    let (mut chunk, mut scanned) = (CellChunk::with_capacity(BULK_CHUNK), 0u64);
                    for (old_index, name) in old_tables.iter().enumerate() {
                        let Some(&table) = index_of.get(name.as_str()) else {
                            continue;
                        };
                        // A few key groups at a time bounds the memory used.
                        let mut group = overlap.start;
                        while group < overlap.end {
                            let groups = group..(group + 4).min(overlap.end);
                            source
                                .scan(old_index, groups.clone(), &mut |key_group, key, value| {
                                    chunk.push(table, key_group, key, value);
                                })
                                .map_err(state_error)?;
                            let handed = queue_if_full(&mut chunk, queue)?;
                            scanned += handed;
                            progress.add(handed, 0);
                            group = groups.end;
                        }
                    }
                    scanned += chunk.len() as u64;
                    progress.add(chunk.len() as u64, 0);
                    queue(chunk)?;
                    Ok(scanned)
                })?;
                drop(source);
                let _ = std::fs::remove_dir_all(&scratch);
            }
            // One dump (a savepoint's canonical file, or a memory
            // backend's copy), streamed from storage.
            Some(CANONICAL | "memory") => {
                for file in &subtask.files {
                    loaded += load_dump(read, file, &overlap, sink)?;
                }
            }
            other => {
                return Err(CheckpointError::Corrupt {
                    path: read.path.clone(),
                    message: format!(
                        "uid `{uid}` subtask {}: unknown state format {other:?}",
                        subtask.subtask
                    ),
                });
            }
        }
        loaded += apply_deltas(read, subtask, overlap, sink)?;
    }
    Ok(loaded)
}

/// Applies a snapshot subtask's deltas, in order, to `sink`: the cells of
/// the key groups `range` (and the sink's). Returns the number of changes
/// applied.
pub fn apply_deltas(
    read: &ReadMetadata,
    subtask: &SubtaskSnapshot,
    range: Range<u32>,
    sink: &mut CellSink<'_>,
) -> Result<u64, CheckpointError> {
    let range = range.start.max(sink.range.start)..range.end.min(sink.range.end);
    apply_in(read, &subtask.deltas, &range, sink)
}

/// Applies `deltas` (stored files of one subtask, in order) to `sink`:
/// the cells of its key groups. Returns the number of changes applied.
pub fn apply_delta_files(
    read: &ReadMetadata,
    deltas: &[FileRef],
    sink: &mut CellSink<'_>,
) -> Result<u64, CheckpointError> {
    let range = sink.range.clone();
    apply_in(read, deltas, &range, sink)
}

/// Applies `deltas` merged: a cell changed in several of them is
/// migrated and written once, with its latest change.
fn apply_in(
    read: &ReadMetadata,
    deltas: &[FileRef],
    range: &Range<u32>,
    sink: &mut CellSink<'_>,
) -> Result<u64, CheckpointError> {
    let mut applied = 0u64;
    let mut merged = Merged::default();
    let mut last = read.path.clone();
    let (index_of, progress) = (sink.index(), sink.progress);
    for delta in deltas {
        let (path, cells) = read_dump(
            read,
            delta,
            range,
            &index_of,
            progress,
            |table, group, key, value, path| {
                merged.add(table, group, key, value);
                if merged.0.len() >= MERGE_LIMIT {
                    merged.write(sink, path)?;
                }
                Ok(())
            },
        )?;
        applied += cells;
        last = path;
    }
    merged.write(sink, &last)?;
    Ok(applied)
}

/// Hands `restore` the encoded timers of every stored subtask of `op`,
/// each file checked first (the caller keeps the timers of its own key
/// groups).
pub fn load_timers(
    read: &ReadMetadata,
    op: &OperatorSnapshot,
    mut restore: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), CheckpointError> {
    for subtask in &op.subtasks {
        let Some(file) = &subtask.timers else {
            continue;
        };
        let (path, bytes) = read_verified(read, file)?;
        restore(&bytes).map_err(|message| CheckpointError::Corrupt { path, message })?;
    }
    Ok(())
}

/// The restored positions of a partitioned source: every stored
/// subtask's partitions (a new subtask takes the ones it now reads).
pub fn source_partitions(read: &ReadMetadata, uid: &str) -> BTreeMap<u32, u64> {
    read.metadata
        .operators
        .get(uid)
        .into_iter()
        .flat_map(|op| &op.subtasks)
        .flat_map(|s| s.partitions.iter().map(|(&p, &seq)| (p, seq)))
        .collect()
}

/// The restored position of a source subtask.
pub fn source_position(read: &ReadMetadata, uid: &str, subtask: u32) -> Option<u64> {
    read.metadata
        .operators
        .get(uid)?
        .subtasks
        .iter()
        .find(|s| s.subtask == subtask)?
        .position
}
