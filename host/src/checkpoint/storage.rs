//! Checkpoint storage, a subtask's side. After the synchronous part of a
//! snapshot (a consistent copy of the state in a local directory, made of
//! hard links for RocksDB), [`SubtaskStorage::upload`] copies it to the
//! job's checkpoint directory on a blocking thread while the task goes on
//! processing, then acks to the coordinator.
//!
//! Incremental, two ways:
//! - A checkpoint's keyed state is a *base* plus *deltas* (see
//!   [`crate::state::KeyedState`]). Most checkpoints only store a delta: the
//!   cells changed since the previous one. Every [`MAX_DELTAS`] checkpoints,
//!   or once the deltas outgrow the base, the next one is a new base.
//! - A base is a RocksDB checkpoint. SST files never change once written,
//!   so each is copied once, to `shared/<uid>-<subtask>-<instance>-<file>`,
//!   and later bases that still contain it reference the same copy.
//!
//! Base files and deltas live under `shared/` (later checkpoints reference
//! them); `instance` is random per state instance, so a restarted attempt
//! never overwrites a file an earlier attempt uploaded. Timers are private
//! to the checkpoint: `chk-<n>/<uid>-<subtask>/timers`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::debug;

use super::CheckpointError;
use crate::protocol::{
    FileRef, LocalSnapshot, SnapshotStats, SnapshotStore, SubtaskSnapshot, TaskReport,
    TransferProgress,
};
use crate::state::{DELTA_FORMAT, SnapshotJob, TableSpec};
use crate::types::{Barrier, BarrierKind, BaseRule, CheckpointId, OutDir, SavepointForm};

/// The name of the timers file in a subtask's private directory.
pub const TIMERS_FILE: &str = "timers";

/// Deltas after which the next snapshot is a new base.
pub const MAX_DELTAS: usize = 10;

/// The base and deltas the next checkpoint builds on.
#[derive(Debug, Clone)]
struct Chain {
    format: String,
    base: Vec<FileRef>,
    base_bytes: u64,
    deltas: Vec<FileRef>,
    delta_bytes: u64,
}

/// Where a snapshot goes.
#[derive(Debug)]
enum Target {
    /// Checkpoint storage: a delta or a base in `shared/`, timers private.
    Checkpoint,
    /// A savepoint directory: the state in the `form` asked for (its
    /// tables `<uid>/<state>` in order) and the timers.
    Savepoint {
        dir: OutDir,
        tables: Vec<TableSpec>,
        form: SavepointForm,
    },
}

/// One operator subtask's access to checkpoint storage.
#[derive(Debug)]
pub struct SubtaskStorage {
    /// `<checkpoint dir>/<job id>`.
    job_dir: PathBuf,
    uid: String,
    subtask: u32,
    key_groups: [u32; 2],
    instance: String,
    /// Where synchronous snapshots are made (`<local state>/snapshots`).
    local_root: PathBuf,
    /// SST files already in shared storage, by local file name.
    uploaded: Mutex<HashMap<String, FileRef>>,
    /// The stored base and deltas (None: the next snapshot must be a base).
    chain: Mutex<Option<Chain>>,
    /// Uploads run one at a time, in checkpoint order.
    serial: Mutex<()>,
    reports: mpsc::UnboundedSender<TaskReport>,
    /// Keys and bytes of the savepoint being written (progress).
    savepoint_progress: Arc<TransferProgress>,
}

impl SubtaskStorage {
    pub fn new(
        job_dir: PathBuf,
        uid: &str,
        subtask: u32,
        key_groups: [u32; 2],
        local_root: PathBuf,
        reports: mpsc::UnboundedSender<TaskReport>,
        savepoint_progress: Arc<TransferProgress>,
    ) -> Self {
        Self {
            job_dir,
            uid: uid.to_string(),
            subtask,
            key_groups,
            instance: random_hex(6),
            local_root,
            uploaded: Mutex::new(HashMap::new()),
            chain: Mutex::new(None),
            serial: Mutex::new(()),
            reports,
            savepoint_progress,
        }
    }

    /// A savepoint's part, in the savepoint directory `dir`: the state in
    /// canonical form, or the backend's files of a full base (`native`),
    /// or (`copy` is a delta) the checkpoint chain linked in plus that
    /// delta; and the timers. Returns the snapshot and its bytes.
    fn store_savepoint(
        &self,
        dir: &OutDir,
        copy: Option<&(PathBuf, String)>,
        tables: &[TableSpec],
        form: SavepointForm,
        timers: &[u8],
    ) -> Result<(SubtaskSnapshot, u64), CheckpointError> {
        let mut snapshot = SubtaskSnapshot {
            uid: self.uid.clone(),
            subtask: self.subtask,
            key_groups: Some(self.key_groups),
            ..SubtaskSnapshot::default()
        };
        let stem = format!("{}-{}", self.uid, self.subtask);
        let native = form != SavepointForm::Canonical;
        if let Some((copy, _)) = copy.filter(|(_, format)| format == DELTA_FORMAT) {
            let chain = self.chain.lock().expect("not poisoned").clone();
            let Some(chain) = chain else {
                return Err(CheckpointError::io(
                    copy,
                    "the checkpoint chain this savepoint extends is gone (a checkpoint failed meanwhile)",
                ));
            };
            let link = |file: &FileRef| {
                let rel = format!(
                    "{stem}-{}",
                    file.path.rsplit('/').next().unwrap_or(&file.name)
                );
                link_known(&self.job_dir.join(&file.path), dir, rel, file)
            };
            snapshot.files = chain.base.iter().map(link).collect::<Result<_, _>>()?;
            snapshot.deltas = chain.deltas.iter().map(link).collect::<Result<_, _>>()?;
            let source = copy.join(crate::state::dump::DELTA_FILE);
            snapshot.deltas.push(copy_in(
                &source,
                dir,
                format!("{stem}-savepoint.delta"),
                "delta",
            )?);
            sync_dir(dir)?;
            snapshot.backend = Some(chain.format);
        } else if let Some((copy, format)) = copy.filter(|_| native) {
            for name in file_names(copy)? {
                let (source, rel) = (copy.join(&name), format!("{stem}-{name}"));
                let file = match self.known_sst(&name) {
                    Some(known) => link_known(&source, dir, rel, &known)?,
                    None => link_in(&source, dir, rel, &name)?,
                };
                snapshot.files.push(file);
            }
            sync_dir(dir)?;
            snapshot.backend = Some(format.clone());
        } else if let Some((copy, format)) = copy {
            let (file, stats) = super::savepoint::write_state(
                copy,
                format,
                tables,
                self.key_groups[0]..self.key_groups[1],
                dir,
                &format!("{stem}.state"),
                &self.savepoint_progress,
            )?;
            snapshot.backend = Some(super::savepoint::CANONICAL.to_string());
            snapshot.files = vec![file];
            snapshot.state_stats = stats;
        }
        if !timers.is_empty() {
            let name = format!("{stem}.timers");
            snapshot.timers = Some(write_file(dir, name.clone(), &name, timers)?);
        }
        let bytes = snapshot
            .files
            .iter()
            .chain(snapshot.timers.as_ref())
            .map(|f| f.size)
            .sum();
        Ok((snapshot, bytes))
    }

    /// The stored reference of an SST this state instance's checkpoints
    /// already hold, by its local name.
    fn known_sst(&self, name: &str) -> Option<FileRef> {
        if !name.ends_with(".sst") {
            return None;
        }
        self.uploaded
            .lock()
            .expect("not poisoned")
            .get(name)
            .cloned()
    }

    /// Shared files this state instance already has in storage (restored
    /// from a checkpoint of the same job): they are not uploaded again.
    pub fn seed(&self, files: impl IntoIterator<Item = FileRef>) {
        let mut uploaded = self.uploaded.lock().expect("not poisoned");
        for file in files.into_iter().filter(FileRef::is_shared) {
            uploaded.insert(file.name.clone(), file);
        }
    }

    /// Declines checkpoint n (its synchronous part failed).
    fn decline_id(&self, checkpoint: CheckpointId, reason: String) {
        let _ = self.reports.send(TaskReport::Decline {
            checkpoint,
            uid: self.uid.clone(),
            subtask: self.subtask,
            reason,
        });
    }

    /// On a blocking thread: makes the consistent copy of the state (the
    /// snapshot job), stores it for `target`, and acks (or declines) barrier
    /// n.
    fn upload_to(
        self: &Arc<Self>,
        checkpoint: CheckpointId,
        local: LocalSnapshot,
        stats: SnapshotStats,
        target: Target,
    ) {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let _span = tracing::info_span!(
                "snapshot",
                uid = %this.uid,
                subtask = this.subtask,
                checkpoint = checkpoint.0
            )
            .entered();
            let started = Instant::now();
            // A failed checkpoint's changes are in no stored delta: the next
            // checkpoint starts a new base. (Savepoints are not in the chain.)
            let forget_chain = || {
                if matches!(target, Target::Checkpoint) {
                    *this.chain.lock().expect("not poisoned") = None;
                }
            };
            // The job runs first and at once: the task waits for it before
            // it touches its state backend again.
            let state = match local.state.map(SnapshotJob::run).transpose() {
                Ok(state) => state,
                Err(error) => {
                    forget_chain();
                    this.decline_id(checkpoint, error.to_string());
                    return;
                }
            };
            let _serial = this.serial.lock().expect("not poisoned");
            let stored = match &target {
                Target::Checkpoint => this.store(checkpoint, state.as_ref(), &local.timers),
                Target::Savepoint { dir, tables, form } => this
                    .store_savepoint(dir, state.as_ref(), tables, *form, &local.timers)
                    .map(|(snapshot, bytes)| (snapshot, bytes, bytes)),
            };
            if let Some((dir, _)) = &state {
                let _ = std::fs::remove_dir_all(dir);
            }
            let report = match stored {
                Ok((snapshot, bytes, new_bytes)) => TaskReport::Ack {
                    checkpoint,
                    snapshot: Box::new(SubtaskSnapshot {
                        finished: local.finished,
                        ..snapshot
                    }),
                    stats: SnapshotStats {
                        asynchronous: started.elapsed(),
                        bytes,
                        new_bytes,
                        ..stats
                    },
                },
                Err(error) => {
                    forget_chain();
                    TaskReport::Decline {
                        checkpoint,
                        uid: this.uid.clone(),
                        subtask: this.subtask,
                        reason: error.to_string(),
                    }
                }
            };
            // The coordinator may be gone (the attempt failed): nothing to do.
            let _ = this.reports.send(report);
        });
    }

    fn store(
        &self,
        checkpoint: CheckpointId,
        state: Option<&(PathBuf, String)>,
        timers: &[u8],
    ) -> Result<(SubtaskSnapshot, u64, u64), CheckpointError> {
        let private_rel = format!("chk-{}/{}-{}", checkpoint.0, self.uid, self.subtask);
        let shared_path = self.job_dir.join("shared");
        std::fs::create_dir_all(&shared_path).map_err(|e| CheckpointError::io(&shared_path, e))?;
        let job_dir =
            OutDir::open(&self.job_dir).map_err(|e| CheckpointError::io(&self.job_dir, e))?;
        let shared =
            OutDir::open(&shared_path).map_err(|e| CheckpointError::io(&shared_path, e))?;
        let mut snapshot = SubtaskSnapshot {
            uid: self.uid.clone(),
            subtask: self.subtask,
            key_groups: Some(self.key_groups),
            ..SubtaskSnapshot::default()
        };
        let (mut bytes, mut new_bytes) = (0, 0);
        let prefix = format!("shared/{}-{}-{}", self.uid, self.subtask, self.instance);
        if let Some((dir, format)) = state {
            let mut chain = self.chain.lock().expect("not poisoned");
            if format == DELTA_FORMAT {
                let Some(current) = chain.as_mut() else {
                    return Err(CheckpointError::io(dir, "a delta without a stored base"));
                };
                let source = dir.join(crate::state::dump::DELTA_FILE);
                let rel = format!("{prefix}-{}.delta", checkpoint.0);
                let delta = copy_in(&source, &job_dir, rel, "delta")?;
                new_bytes += delta.size;
                current.delta_bytes += delta.size;
                current.deltas.push(delta);
            } else {
                let mut base = Vec::new();
                for name in file_names(dir)? {
                    let source = dir.join(&name);
                    let file = match self.known_sst(&name) {
                        Some(file) => file,
                        None => {
                            // SST names are unique in a database; other
                            // files (MANIFEST, OPTIONS) are per base.
                            let rel = if name.ends_with(".sst") {
                                format!("{prefix}-{name}")
                            } else {
                                format!("{prefix}-{}-{name}", checkpoint.0)
                            };
                            let file = link_in(&source, &job_dir, rel, &name)?;
                            new_bytes += file.size;
                            if name.ends_with(".sst") {
                                self.uploaded
                                    .lock()
                                    .expect("not poisoned")
                                    .insert(name.clone(), file.clone());
                            }
                            file
                        }
                    };
                    base.push(file);
                }
                sync_dir(&shared)?;
                *chain = Some(Chain {
                    format: format.clone(),
                    base_bytes: base.iter().map(|f| f.size).sum(),
                    base,
                    deltas: Vec::new(),
                    delta_bytes: 0,
                });
            }
            let current = chain.as_ref().expect("set above");
            snapshot.backend = Some(current.format.clone());
            snapshot.files = current.base.clone();
            snapshot.deltas = current.deltas.clone();
            bytes += current.base_bytes + current.delta_bytes;
        }
        if !timers.is_empty() {
            job_dir
                .create_dir_all(&private_rel)
                .map_err(|e| CheckpointError::io(job_dir.join(&private_rel), e))?;
            let rel = format!("{private_rel}/{TIMERS_FILE}");
            let file = write_file(&job_dir, rel, TIMERS_FILE, timers)?;
            bytes += file.size;
            new_bytes += file.size;
            snapshot.timers = Some(file);
        }
        debug!(
            checkpoint = checkpoint.0,
            bytes, new_bytes, "snapshot stored"
        );
        Ok((snapshot, bytes, new_bytes))
    }
}

impl SnapshotStore for Arc<SubtaskStorage> {
    fn local_dir(&self, barrier: &Barrier) -> PathBuf {
        self.local_root.join(format!("chk-{}", barrier.id.0))
    }

    /// A base when the barrier forces one, the subtask has none, or
    /// (unless bases are held) its chain grew long; a savepoint's copy is
    /// always a full one but for an incremental savepoint.
    fn wants_base(&self, barrier: &Barrier) -> bool {
        let rule = match &barrier.kind {
            BarrierKind::Checkpoint { base } => *base,
            BarrierKind::Final | BarrierKind::Savepoint(_) => BaseRule::Chain,
        };
        if rule == BaseRule::Forced {
            return true;
        }
        match &*self.chain.lock().expect("not poisoned") {
            None => true,
            Some(_) if rule == BaseRule::Held => false,
            Some(chain) => {
                chain.deltas.len() >= MAX_DELTAS
                    || chain.delta_bytes > chain.base_bytes.max(1 << 20)
            }
        }
    }

    fn has_chain(&self) -> bool {
        self.chain.lock().expect("not poisoned").is_some()
    }

    fn decline(&self, barrier: &Barrier, reason: String) {
        self.decline_id(barrier.id, reason);
    }

    fn upload(
        &self,
        barrier: &Barrier,
        local: LocalSnapshot,
        stats: SnapshotStats,
        tables: Vec<TableSpec>,
    ) {
        let target = match &barrier.kind {
            BarrierKind::Savepoint(target) => Target::Savepoint {
                dir: target.dir.clone(),
                tables,
                form: target.form,
            },
            BarrierKind::Checkpoint { .. } | BarrierKind::Final => Target::Checkpoint,
        };
        self.upload_to(barrier.id, local, stats, target);
    }
}

/// [`copy_in`] for a file that is never written again (a RocksDB SST):
/// hard-linked instead of copied where the file system allows, hashed by
/// reading it. Other files are copied.
fn link_in(
    source: &Path,
    base: &OutDir,
    rel: String,
    name: &str,
) -> Result<FileRef, CheckpointError> {
    if !name.ends_with(".sst") {
        return copy_in(source, base, rel, name);
    }
    if base.hard_link_from(source, &rel).is_err() {
        return copy_in(source, base, rel, name);
    }
    let target = base.join(&rel);
    let input = base
        .open_file(&rel)
        .map_err(|e| CheckpointError::io(&target, e))?;
    let (size, sha256) = hash_open(input, &target)?;
    Ok(FileRef {
        path: rel,
        name: name.to_string(),
        size,
        sha256,
    })
}

/// Hard-links an SST that checkpoint storage already holds (`known`: its
/// size and sha256, stored under the same local name, and RocksDB never
/// rewrites an SST) to `<base>/<rel>` without reading it again. Falls back
/// to [`link_in`] when the sizes differ or no link can be made.
fn link_known(
    source: &Path,
    base: &OutDir,
    rel: String,
    known: &FileRef,
) -> Result<FileRef, CheckpointError> {
    let same_size = std::fs::metadata(source).is_ok_and(|m| m.len() == known.size);
    if same_size && base.hard_link_from(source, &rel).is_ok() {
        return Ok(FileRef {
            path: rel,
            name: known.name.clone(),
            size: known.size,
            sha256: known.sha256.clone(),
        });
    }
    link_in(source, base, rel, &known.name)
}

/// Size and sha256 of an open file (`source` names it in errors).
pub fn hash_open(input: std::fs::File, source: &Path) -> Result<(u64, String), CheckpointError> {
    let mut reader = Hashing::new(input);
    std::io::copy(&mut reader, &mut std::io::sink()).map_err(|e| CheckpointError::io(source, e))?;
    let (_, size, sha256) = reader.finish();
    Ok((size, sha256))
}

/// The names in a local snapshot directory, sorted.
fn file_names(dir: &Path) -> Result<Vec<String>, CheckpointError> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| CheckpointError::io(dir, e))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// Makes the entries of `dir` (new names, hard links) durable.
pub(crate) fn sync_dir(dir: &OutDir) -> Result<(), CheckpointError> {
    dir.sync().map_err(|e| CheckpointError::io(dir.path(), e))
}

/// Copies `source` to `<base>/<rel>` (via a temp name, fsynced), hashing it.
fn copy_in(
    source: &Path,
    base: &OutDir,
    rel: String,
    name: &str,
) -> Result<FileRef, CheckpointError> {
    let target = base.join(&rel);
    let temp = format!("{rel}.inprogress");
    let input = std::fs::File::open(source).map_err(|e| CheckpointError::io(source, e))?;
    let output = base
        .create(&temp)
        .map_err(|e| CheckpointError::io(base.join(&temp), e))?;
    let (size, sha256) = copy_open_hashed(input, source, output, &base.join(&temp))?;
    base.rename(&temp, &rel)
        .map_err(|e| CheckpointError::io(&target, e))?;
    Ok(FileRef {
        path: rel,
        name: name.to_string(),
        size,
        sha256,
    })
}

/// Reads or writes through to `inner`, counting and hashing the bytes that
/// pass: how every stored file gets (and is checked against) its size and
/// sha256 without a second read.
pub struct Hashing<T> {
    inner: T,
    hasher: Sha256,
    size: u64,
}

impl<T> Hashing<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    /// The inner reader or writer, and the size and sha256 (hex) of what
    /// passed.
    pub fn finish(self) -> (T, u64, String) {
        (self.inner, self.size, hex::encode(self.hasher.finalize()))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Copies the open file `input` (`source` names it in errors) into the
/// created file `output` (`target` names it), fsyncs the copy, and
/// returns its size and sha256.
pub fn copy_open_hashed(
    input: std::fs::File,
    source: &Path,
    output: std::fs::File,
    target: &Path,
) -> Result<(u64, String), CheckpointError> {
    let mut reader = Hashing::new(input);
    // A large writer buffer: `io::copy` reads straight into it.
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, output);
    std::io::copy(&mut reader, &mut writer).map_err(|e| CheckpointError::io(source, e))?;
    let output = writer
        .into_inner()
        .map_err(|e| CheckpointError::io(target, e.into_error()))?;
    output
        .sync_all()
        .map_err(|e| CheckpointError::io(target, e))?;
    let (_, size, sha256) = reader.finish();
    Ok((size, sha256))
}

/// Writes `bytes` to `<base>/<rel>` and fsyncs it; the reference names it
/// `name`.
pub fn write_file(
    base: &OutDir,
    rel: String,
    name: &str,
    bytes: &[u8],
) -> Result<FileRef, CheckpointError> {
    let path = base.join(&rel);
    let mut file = base
        .create(&rel)
        .map_err(|e| CheckpointError::io(&path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| CheckpointError::io(&path, e))?;
    Ok(FileRef {
        path: rel,
        name: name.to_string(),
        size: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(bytes)),
    })
}

/// A random number (ids, jitter): the clock, the process and a counter,
/// hashed. Not for secrets.
pub fn random_u64() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seed = u64::from(std::process::id()) ^ count.rotate_left(32);
    xxhash_rust::xxh3::xxh3_64_with_seed(&nanos.to_le_bytes(), seed)
}

/// `len` random bytes as hex (ids of jobs and state instances).
pub fn random_hex(len: usize) -> String {
    let mut out = String::new();
    while out.len() < len * 2 {
        out.push_str(&format!("{:016x}", random_u64()));
    }
    out.truncate(len * 2);
    out
}
