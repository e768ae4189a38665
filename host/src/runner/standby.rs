//! An upgrade's **standby**: the new version's keyed state, restored (and
//! migrated, where a state's schema version changed) from the job's newest
//! checkpoint while the old version runs on, then kept up with the deltas
//! of each checkpoint after it. The upgrade stops the job with an
//! incremental savepoint (the same chain plus the changes since its last
//! checkpoint), and the new version's subtasks take their state from the
//! standby, applying only the deltas it has not: the values migrated at
//! the stop are the few changed since the last catch-up, not every value.
//!
//! Each follower is one operator subtask whose key-group range is the
//! same in the stored and the new job, on RocksDB. It is tied to the
//! stored base it was restored from (the files' sha256) and to the deltas
//! applied since, in order; a restore whose stored subtask has another
//! base, or deltas that do not start with those, does not use it (the
//! subtask restores as usual). Bases are held while a standby follows
//! ([`BaseRule::Held`](crate::types::BaseRule::Held)),
//! so the chain it follows stays the job's.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::{debug, info};

use super::PreparedJob;
use crate::checkpoint::metadata::{OperatorSnapshot, ReadMetadata};
use crate::checkpoint::restore::{self, CellSink, MigrateCells};
use crate::checkpoint::{CheckpointError, FileRef, SubtaskSnapshot};
use crate::job::{BackendKind, Limits, NodeKind};
use crate::plugin::LoadedPlugin;
use crate::plugin::migrate::Migrator;
use crate::protocol::TransferProgress;
use crate::state::rocks::RocksBackend;
use crate::state::{StateBackend, in_background, table_names};
use crate::types::key_group;

/// One operator subtask's state on standby.
struct Follower {
    key_groups: [u32; 2],
    tables: Vec<String>,
    backend: RocksBackend,
    migrator: Option<Migrator>,
    /// How its TTL states' cells are restamped.
    restamp: restore::Restamp,
    /// The sha256 of each file of the stored base it was restored from,
    /// sorted.
    base: Vec<String>,
    /// The sha256 of each delta applied since, in order.
    applied: Vec<String>,
}

/// The new version's state, following the running job's checkpoints.
pub struct Standby {
    root: PathBuf,
    followers: Mutex<HashMap<Key, Follower>>,
    /// Counts what it restores and applies; abandoned, they stop.
    progress: Arc<TransferProgress>,
}

impl std::fmt::Debug for Standby {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standby")
            .field("root", &self.root)
            .field("subtasks", &self.lock().len())
            .finish()
    }
}

fn shas(files: &[FileRef]) -> Vec<String> {
    files.iter().map(|f| f.sha256.clone()).collect()
}

fn sorted_shas(files: &[FileRef]) -> Vec<String> {
    let mut shas = shas(files);
    shas.sort();
    shas
}

/// The stored subtask of `op` with exactly the key groups `range`, on
/// RocksDB.
fn stored_subtask(op: &OperatorSnapshot, key_groups: [u32; 2]) -> Option<&SubtaskSnapshot> {
    op.subtasks
        .iter()
        .find(|s| s.key_groups == Some(key_groups) && s.backend.as_deref() == Some("rocksdb"))
}

/// A follower's operator uid and subtask.
type Key = (String, u32);

impl Follower {
    /// Restores operator `uid`'s subtask (key groups `range`, state as
    /// `plugin` declares it) from `read` under `root`, migrating values
    /// where a schema version changed.
    #[allow(clippy::too_many_arguments)]
    fn restore(
        progress: &TransferProgress,
        read: &ReadMetadata,
        root: &Path,
        (uid, subtask): (&str, u32),
        limits: &Limits,
        plugin: &Arc<LoadedPlugin>,
        op: &OperatorSnapshot,
        range: Range<u32>,
    ) -> Result<Self, CheckpointError> {
        let name = format!("{uid}-{subtask}");
        let dir = root.join(&name);
        let fail = |e: String| CheckpointError::io(&dir, e);
        let tables = table_names(uid, plugin.info.states.iter().map(|s| s.name.as_str()));
        let mut migrator = Migrator::for_restore(uid, plugin, limits, op).map_err(fail)?;
        let ttls: Vec<_> = plugin.info.states.iter().map(|s| s.ttl).collect();
        let mut backend =
            RocksBackend::open_expiring(&dir, &tables, &ttls).map_err(|e| fail(e.to_string()))?;
        let restamp = restore::Restamp::new(op, &plugin.info.states);
        let mut sink = CellSink {
            range: range.clone(),
            tables: &tables,
            backend: &mut backend,
            progress,
            migrate: migrator.as_mut().map(|m| m as &mut dyn MigrateCells),
            restamp: restamp.clone(),
        };
        let work = root.join("restore").join(&name);
        let cells = restore::load_cells(read, uid, op, &work, &mut sink)?;
        let key_groups = [range.start, range.end];
        let stored = stored_subtask(op, key_groups).expect("the caller checked");
        debug!(uid, subtask, cells, "standby restored");
        Ok(Self {
            key_groups,
            tables,
            backend,
            migrator,
            restamp,
            base: sorted_shas(&stored.files),
            applied: shas(&stored.deltas),
        })
    }

    /// The deltas of `stored` this follower has not applied, if it follows
    /// it (same base, deltas starting with the applied ones).
    fn unapplied<'a>(&self, stored: &'a SubtaskSnapshot) -> Option<&'a [FileRef]> {
        let deltas = shas(&stored.deltas);
        (sorted_shas(&stored.files) == self.base && deltas.starts_with(&self.applied))
            .then(|| &stored.deltas[self.applied.len()..])
    }

    /// Applies `deltas` (of `stored`, in `read`): migrated where needed.
    fn apply(
        &mut self,
        read: &ReadMetadata,
        deltas: &[FileRef],
        progress: &TransferProgress,
    ) -> Result<u64, CheckpointError> {
        let mut sink = CellSink {
            range: self.key_groups[0]..self.key_groups[1],
            tables: &self.tables,
            backend: &mut self.backend,
            progress,
            migrate: self.migrator.as_mut().map(|m| m as &mut dyn MigrateCells),
            restamp: self.restamp.clone(),
        };
        let applied = restore::apply_delta_files(read, deltas, &mut sink)?;
        self.applied.extend(shas(deltas));
        Ok(applied)
    }
}

impl Standby {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Follower>> {
        self.followers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Restores, under `root`, every operator subtask of `job` (the new
    /// version, its plugins loaded) whose key-group range `read` (a
    /// checkpoint of the running job) holds on RocksDB, migrating values
    /// where a schema version changed; subtasks in parallel. An error
    /// (a migration the new plugin refuses, a damaged file) names the
    /// operator and state. `progress` counts what it restored; abandoning
    /// it stops the restore at its next chunk (the caller dropped the
    /// upgrade): the error then says so, and what was restored is removed.
    pub fn build(
        job: &PreparedJob,
        read: &ReadMetadata,
        root: PathBuf,
        progress: Arc<TransferProgress>,
    ) -> Result<Self, CheckpointError> {
        let _ = std::fs::remove_dir_all(&root);
        let mut work = Vec::new();
        if job.graph.state.backend == BackendKind::Rocksdb {
            for node in &job.graph.nodes {
                let (NodeKind::Operator(operator), Some(plugin), Some(op)) = (
                    &node.kind,
                    job.plugins.get(&node.uid),
                    read.metadata.operators.get(&node.uid),
                ) else {
                    continue;
                };
                if plugin.info.states.is_empty() {
                    continue;
                }
                for subtask in (0..node.parallelism).filter(|&s| job.graph.runs(s)) {
                    let range =
                        key_group::range_of(subtask, node.parallelism, job.graph.max_parallelism);
                    if stored_subtask(op, [range.start, range.end]).is_some() {
                        work.push((node, operator, plugin, op, subtask, range));
                    }
                }
            }
        }
        let built: Vec<Result<(Key, Follower), CheckpointError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = work
                .iter()
                .map(|&(node, operator, plugin, op, subtask, ref range)| {
                    let (root, progress) = (&root, &*progress);
                    spawn_named(scope, "standby-restore", move || {
                        let follower = Follower::restore(
                            progress,
                            read,
                            root,
                            (&node.uid, subtask),
                            &operator.limits,
                            plugin,
                            op,
                            range.clone(),
                        )?;
                        Ok(((node.uid.clone(), subtask), follower))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a standby restore panicked"))
                .collect()
        });
        let standby = Self {
            root,
            followers: Mutex::new(HashMap::new()),
            progress,
        };
        for result in built {
            let (key, follower) = result?;
            standby.lock().insert(key, follower);
        }
        info!(
            checkpoint = read.metadata.checkpoint,
            subtasks = standby.lock().len(),
            "standby state restored"
        );
        Ok(standby)
    }

    /// Whether restoring `job` (prepared with the running job's
    /// checkpoint as its restore point) migrates some state: what a
    /// standby saves an upgrade's downtime from.
    pub fn worth_it(job: &PreparedJob) -> bool {
        let Some(read) = &job.restore else {
            return false;
        };
        job.graph.state.backend == BackendKind::Rocksdb
            && job.plugins.iter().any(|(uid, plugin)| {
                read.metadata
                    .operators
                    .get(uid)
                    .is_some_and(|op| !restore::changed_schemas(op, &plugin.info.states).is_empty())
            })
    }

    /// Drops every follower not taken (on background threads): once a
    /// run's subtasks exist, what is left is of no use.
    pub fn release(&self) {
        for (_, follower) in std::mem::take(&mut *self.lock()) {
            drop_in_background(follower);
        }
    }

    /// The number of subtasks on standby.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies the deltas of checkpoint `read` each follower has not;
    /// subtasks in parallel. A follower whose stored subtask changed base
    /// (or is gone) is dropped. Returns the changes applied.
    pub fn catch_up(&self, read: &ReadMetadata) -> Result<u64, CheckpointError> {
        let progress = &*self.progress;
        let mut followers = self.lock();
        let mut dropped = Vec::new();
        let results: Vec<Result<u64, CheckpointError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = followers
                .iter_mut()
                .filter_map(|((uid, subtask), follower)| {
                    let unapplied = read
                        .metadata
                        .operators
                        .get(uid)
                        .and_then(|op| stored_subtask(op, follower.key_groups))
                        .and_then(|stored| follower.unapplied(stored));
                    let Some(deltas) = unapplied else {
                        dropped.push((uid.clone(), *subtask));
                        return None;
                    };
                    Some(spawn_named(scope, "standby-catch-up", move || {
                        follower.apply(read, deltas, progress)
                    }))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a standby catch-up panicked"))
                .collect()
        });
        for key in dropped {
            debug!(uid = %key.0, subtask = key.1, "standby no longer follows: its base changed");
            followers.remove(&key);
        }
        results.into_iter().sum()
    }

    /// The state of operator `uid`'s subtask with key groups `key_groups`,
    /// if a follower has it for `op` (the restore point): made a RocksDB
    /// copy at `dir` (hard links) and opened. Returns the backend, the
    /// stored subtask and how many of its deltas the copy holds already
    /// (the rest are the caller's to apply).
    pub fn take<'a>(
        &self,
        uid: &str,
        op: &'a OperatorSnapshot,
        key_groups: [u32; 2],
        dir: &Path,
    ) -> Result<Option<(RocksBackend, &'a SubtaskSnapshot, usize)>, CheckpointError> {
        let Some(stored) = stored_subtask(op, key_groups) else {
            return Ok(None);
        };
        let Some(mut follower) = self.lock().remove(&(uid.to_string(), stored.subtask)) else {
            return Ok(None);
        };
        if follower.key_groups != key_groups || follower.unapplied(stored).is_none() {
            return Ok(None);
        }
        let applied = follower.applied.len();
        let tables = follower.tables.clone();
        follower
            .backend
            .checkpoint(dir, &tables)
            .map_err(|e| CheckpointError::io(dir, e))?;
        drop_in_background(follower);
        let backend = RocksBackend::open(dir, &tables).map_err(|e| CheckpointError::io(dir, e))?;
        Ok(Some((backend, stored, applied)))
    }
}

/// A scoped thread named `name` (profiles tell standby work apart from
/// the running job's).
fn spawn_named<'scope, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    name: &str,
    work: impl FnOnce() -> T + Send + 'scope,
) -> std::thread::ScopedJoinHandle<'scope, T> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn_scoped(scope, work)
        .expect("a thread starts")
}

fn drop_in_background(follower: Follower) {
    let dir = follower.backend.dir().to_path_buf();
    in_background("standby", move || {
        drop(follower);
        let _ = std::fs::remove_dir_all(dir);
    });
}

impl Drop for Standby {
    fn drop(&mut self) {
        let followers = std::mem::take(&mut *self.lock());
        let root = self.root.clone();
        in_background("standby", move || {
            drop(followers);
            let _ = std::fs::remove_dir_all(root);
        });
    }
}
