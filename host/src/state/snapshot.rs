//! Snapshots of keyed state: the synchronous part a barrier takes (a delta
//! of the changed cells, or a base: the stale cells written and a RocksDB
//! checkpoint of hard links), and the [`SnapshotJob`] that finishes it on a
//! blocking thread while the task goes on.

use super::dump::DumpBuffer;
use super::*;
use crate::types::key_group;
use std::path::PathBuf;
use std::sync::mpsc;

/// The part of a snapshot that runs off the task's thread.
pub struct SnapshotJob {
    dir: PathBuf,
    kind: JobKind,
}

enum JobKind {
    /// Writes the cells the backend lacks, then copies the backend.
    Base {
        backend: SharedBackend,
        ops: Vec<WriteOp>,
        tables: Vec<String>,
        done: mpsc::Sender<Result<(), String>>,
    },
    /// Writes the changed cells to a file.
    Delta(DumpBuffer),
}

/// The format of a delta snapshot.
pub const DELTA_FORMAT: &str = "delta";

impl std::fmt::Debug for SnapshotJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, changes) = match &self.kind {
            JobKind::Base { ops, .. } => ("base", ops.len()),
            JobKind::Delta(delta) => ("delta", delta.entries()),
        };
        f.debug_struct("SnapshotJob")
            .field("kind", &kind)
            .field("changes", &changes)
            .field("dir", &self.dir)
            .finish()
    }
}

impl SnapshotJob {
    /// Makes the snapshot in the job's directory. Returns the directory and
    /// its format: the backend's (`rocksdb`, `memory`) for a base,
    /// [`DELTA_FORMAT`] for a delta.
    pub fn run(self) -> Result<(PathBuf, String), StateError> {
        let Self { dir, kind } = self;
        let (backend, mut ops, tables, done) = match kind {
            JobKind::Delta(delta) => {
                std::fs::create_dir_all(&dir).map_err(|e| StateError::Open {
                    dir: dir.clone(),
                    message: e.to_string(),
                })?;
                delta.write_to(&dir.join(dump::DELTA_FILE))?;
                return Ok((dir, DELTA_FORMAT.to_string()));
            }
            JobKind::Base {
                backend,
                ops,
                tables,
                done,
            } => (backend, ops, tables, done),
        };
        // In backend-key order, RocksDB's memtable inserts each key next to
        // the previous one instead of searching its skip list from the top.
        ops.sort_unstable_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        let mut backend = backend.lock().unwrap_or_else(|p| p.into_inner());
        if !ops.is_empty()
            && let Err(error) = backend.write(ops)
        {
            let _ = done.send(Err(error.to_string()));
            return Err(error);
        }
        let copy = backend.checkpoint(&dir, &tables);
        drop(backend);
        let _ = done.send(Ok(()));
        copy.map(|format| (dir, format))
    }
}

/// Waits for an in-flight snapshot job, if any.
pub(super) fn settle(
    pending: &mut Option<mpsc::Receiver<Result<(), String>>>,
) -> Result<(), StateError> {
    match pending.take() {
        None => Ok(()),
        Some(done) => match done.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StateError::Snapshot(message)),
            Err(_) => Err(StateError::Snapshot(
                "the snapshot job ended without applying its changes".to_string(),
            )),
        },
    }
}

impl KeyedState {
    /// Deletes the expired cells of TTL states from a backend that does not
    /// drop them itself (the memory backend), recording each deletion for
    /// the next delta. Returns how many it deleted.
    pub(super) fn sweep_expired(&mut self) -> Result<u64, StateError> {
        if !self.any_ttl || self.backend_lock().event_clock().is_some() {
            return Ok(0);
        }
        let mut deletes = Vec::new();
        {
            let backend = self.backend_lock();
            for (id, table) in self.tables.iter().enumerate() {
                let Some(ttl) = table.ttl else { continue };
                // The wall clock now, not the last batch's: an idle job
                // still sweeps.
                let now = match ttl.time {
                    super::ttl::TtlTime::Processing => {
                        super::ttl::wall_millis().max(self.clock.processing)
                    }
                    super::ttl::TtlTime::Event => self.clock.event,
                };
                backend.scan(
                    id,
                    0..self.max_parallelism,
                    &mut |key_group, key, stored| {
                        if let Some((stamp, _)) = super::ttl::split(stored)
                            && ttl.expired(stamp, now)
                        {
                            deletes.push(WriteOp::Delete {
                                table: id,
                                key_group,
                                key: key.to_vec(),
                            });
                        }
                    },
                )?;
            }
        }
        if deletes.is_empty() {
            return Ok(0);
        }
        let names = self.table_names();
        let carried = self.carried.get_or_insert_with(|| DumpBuffer::new(&names));
        for op in &deletes {
            if let WriteOp::Delete {
                table,
                key_group,
                key,
            } = op
            {
                carried.push(*table as u32, *key_group, key, None);
            }
        }
        let swept = deletes.len() as u64;
        self.backend_lock().write(deletes)?;
        Ok(swept)
    }

    /// Takes every cell changed since the last snapshot (including those
    /// evicted meanwhile) as a delta.
    pub(super) fn take_changed(&mut self) -> DumpBuffer {
        self.changed_cells(true)
    }

    /// Every cell changed since the last snapshot (including those evicted
    /// meanwhile) as a delta; `reset`: they are no longer marked changed.
    pub(super) fn changed_cells(&mut self, reset: bool) -> DumpBuffer {
        let names = self.table_names();
        let carried = match reset {
            true => self.carried.take(),
            false => self.carried.clone(),
        };
        let mut delta = carried.unwrap_or_else(|| DumpBuffer::new(&names));
        let mut scratch = Vec::new();
        for (table_id, table) in self.tables.iter_mut().enumerate() {
            for (key, slot) in table.cache.iter_mut().filter(|(_, s)| s.changed()) {
                let key_group = key_group::of_key(key, self.max_parallelism);
                let stamp = table.ttl.map(|_| slot.stamp());
                let value = slot.cell.as_ref().map(|cell| {
                    encode_stored_into(cell, stamp, &mut scratch);
                    scratch.as_slice()
                });
                delta.push(table_id as u32, key_group, key, value);
                slot.set_changed(!reset);
            }
        }
        delta
    }

    /// The synchronous part of a snapshot (see [`KeyedState`]): a base when
    /// `base`, else a delta. None without tables.
    pub fn snapshot(
        &mut self,
        dir: PathBuf,
        base: bool,
    ) -> Result<Option<SnapshotJob>, StateError> {
        if self.tables.is_empty() {
            return Ok(None);
        }
        settle(&mut self.pending)?;
        self.sweep_expired()?;
        if !base {
            return Ok(Some(SnapshotJob {
                dir,
                kind: JobKind::Delta(self.take_changed()),
            }));
        }
        // A base holds everything: the next delta starts from here.
        self.carried = None;
        for table in &mut self.tables {
            for slot in table.cache.values_mut() {
                slot.set_changed(false);
            }
        }
        Ok(Some(self.base_job(dir)))
    }

    /// A *base* job: the stale cells go to the backend, then it is copied;
    /// until the job ran, the backend is the job's.
    pub(super) fn base_job(&mut self, dir: PathBuf) -> SnapshotJob {
        let ops = self.take_stale();
        let (done, receiver) = mpsc::channel();
        self.pending = Some(receiver);
        SnapshotJob {
            dir,
            kind: JobKind::Base {
                backend: self.backend.clone(),
                ops,
                tables: self.table_names(),
                done,
            },
        }
    }

    /// The synchronous part of a savepoint: a *base* job (the cells the
    /// backend lacks are written, then the backend is copied) that leaves
    /// the changes since the last checkpoint in place, so the next
    /// checkpoint's delta still holds them. None without tables.
    pub fn savepoint(&mut self, dir: PathBuf) -> Result<Option<SnapshotJob>, StateError> {
        if self.tables.is_empty() {
            return Ok(None);
        }
        settle(&mut self.pending)?;
        self.sweep_expired()?;
        Ok(Some(self.base_job(dir)))
    }

    /// The synchronous part of an incremental savepoint: a *delta* of the
    /// cells changed since the last snapshot, copied: the changes stay
    /// marked, so the next checkpoint's delta still holds them. None
    /// without tables.
    pub fn savepoint_delta(&mut self, dir: PathBuf) -> Result<Option<SnapshotJob>, StateError> {
        if self.tables.is_empty() {
            return Ok(None);
        }
        settle(&mut self.pending)?;
        let delta = self.changed_cells(false);
        Ok(Some(SnapshotJob {
            dir,
            kind: JobKind::Delta(delta),
        }))
    }
}
