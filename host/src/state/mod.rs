//! Keyed state: the [`StateBackend`] trait (a store of encoded cells keyed by
//! table, key group and key), its RocksDB ([`rocks`]) and in-memory
//! ([`memory`]) implementations, and [`KeyedState`], the per-subtask view the
//! operator calls go through, with a write-back cache of hot keys in front of
//! the backend.
//!
//! A *table* is one declared state of one operator (RocksDB: one column
//! family named `<operator uid>/<state name>`). Backend keys are
//! `key group (u16, big-endian) ++ key`, so a key-group range is one scan.

pub mod codec;
pub mod dump;
pub mod memory;
pub mod rocks;
mod small;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, mpsc};

use hashbrown::HashMap;
use hashbrown::hash_map::EntryRef;

use crate::types::key_group;
use dump::DumpBuffer;
use small::SmallBytes;

/// Index of a table in the backend (the order tables were opened in).
pub type TableId = usize;

/// The contents of one key's map state, in key order.
pub type MapCell = BTreeMap<Vec<u8>, Vec<u8>>;

/// A (map key, value) pair of map state.
pub type MapEntry = (Vec<u8>, Vec<u8>);

/// Called with (key group, key, encoded cell) for each cell a scan visits.
pub type CellVisitor<'a> = dyn FnMut(u16, &[u8], &[u8]) + 'a;

/// What kind of keyed state a table holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateKind {
    Value,
    List,
    Map,
}

impl std::fmt::Display for StateKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StateKind::Value => "value",
            StateKind::List => "list",
            StateKind::Map => "map",
        })
    }
}

/// A state an operator declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDescriptor {
    pub name: String,
    pub kind: StateKind,
    pub schema_version: u32,
}

/// The backend tables of operator `uid`'s states, in order: `<uid>/<state>`.
pub fn table_names<'a>(uid: &str, states: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    states
        .into_iter()
        .map(|state| format!("{uid}/{state}"))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open state backend at {dir}: {message}")]
    Open { dir: PathBuf, message: String },
    #[error("state backend I/O on `{table}`: {message}")]
    Io { table: String, message: String },
    #[error("state `{table}` holds a corrupt cell: {cause}")]
    Corrupt {
        table: String,
        cause: codec::CodecError,
    },
    #[error("writing a snapshot's changes to the state backend failed: {0}")]
    Snapshot(String),
}

/// One write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    Put {
        table: TableId,
        key_group: u16,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        table: TableId,
        key_group: u16,
        key: Vec<u8>,
    },
}

impl WriteOp {
    /// The write of a cell: its value, or (None) its deletion.
    pub fn of_cell(table: TableId, key_group: u16, key: Vec<u8>, value: Option<Vec<u8>>) -> Self {
        match value {
            Some(value) => WriteOp::Put {
                table,
                key_group,
                key,
                value,
            },
            None => WriteOp::Delete {
                table,
                key_group,
                key,
            },
        }
    }

    /// (table, key group, key): the order of backend keys within a table.
    pub fn sort_key(&self) -> (TableId, u16, &[u8]) {
        match self {
            WriteOp::Put {
                table,
                key_group,
                key,
                ..
            }
            | WriteOp::Delete {
                table,
                key_group,
                key,
            } => (*table, *key_group, key),
        }
    }
}

/// Restored cells (puts) in one contiguous buffer, in the order added:
/// what a bulk load takes without an allocation per cell. Knows whether
/// they came strictly sorted by (table, key group, key).
#[derive(Debug, Default)]
pub struct CellChunk {
    bytes: Vec<u8>,
    /// (table, key group, key end, value end) in `bytes`; each cell's key
    /// starts where the cell before it ends.
    cells: Vec<(TableId, u16, u32, u32)>,
    sorted: bool,
}

impl CellChunk {
    pub fn with_capacity(cells: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(cells * 32),
            cells: Vec::with_capacity(cells),
            sorted: true,
        }
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Appends a cell.
    pub fn push(&mut self, table: TableId, key_group: u16, key: &[u8], value: &[u8]) {
        if self.sorted && !self.cells.is_empty() {
            let last = self.cell(self.cells.len() - 1);
            self.sorted = (last.0, last.1, last.2) < (table, key_group, key);
        }
        self.bytes.extend_from_slice(key);
        let key_end = self.bytes.len() as u32;
        self.bytes.extend_from_slice(value);
        self.cells
            .push((table, key_group, key_end, self.bytes.len() as u32));
    }

    /// Whether the cells came strictly sorted (one a key).
    pub fn is_sorted(&self) -> bool {
        self.sorted
    }

    /// Cell `i`: (table, key group, key, value).
    fn cell(&self, i: usize) -> (TableId, u16, &[u8], &[u8]) {
        let start = match i {
            0 => 0,
            _ => self.cells[i - 1].3 as usize,
        };
        let (table, group, key_end, value_end) = self.cells[i];
        let (key_end, value_end) = (key_end as usize, value_end as usize);
        (
            table,
            group,
            &self.bytes[start..key_end],
            &self.bytes[key_end..value_end],
        )
    }

    /// The cells: (table, key group, key, value).
    pub fn iter(&self) -> impl Iterator<Item = (TableId, u16, &[u8], &[u8])> {
        (0..self.cells.len()).map(|i| self.cell(i))
    }

    /// The cells as writes.
    pub fn to_ops(&self) -> Vec<WriteOp> {
        self.iter()
            .map(|(table, key_group, key, value)| WriteOp::Put {
                table,
                key_group,
                key: key.to_vec(),
                value: value.to_vec(),
            })
            .collect()
    }
}

/// A store of encoded cells. Implementations own one subtask's tables.
pub trait StateBackend: Send {
    fn get(
        &self,
        table: TableId,
        key_group: u16,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StateError>;
    /// Applies the writes atomically, in order.
    fn write(&mut self, ops: Vec<WriteOp>) -> Result<(), StateError>;
    /// Adds restored cells in bulk (a restore filling a new backend;
    /// deltas come after through [`StateBackend::write`]). By default a
    /// write; RocksDB sorts them into table files it ingests whole, without
    /// the memtable.
    fn load(&mut self, ops: Vec<WriteOp>) -> Result<(), StateError> {
        self.write(ops)
    }
    /// [`StateBackend::load`] of a chunk of cells.
    fn load_chunk(&mut self, chunk: &CellChunk) -> Result<(), StateError> {
        self.load(chunk.to_ops())
    }
    /// Visits every cell of `table` whose key group lies in `groups`, in
    /// (key group, key) order.
    fn scan(
        &self,
        table: TableId,
        groups: Range<u32>,
        visit: &mut CellVisitor<'_>,
    ) -> Result<(), StateError>;
    /// Human-readable description, e.g. "rocksdb at weir-data/state/…".
    fn describe(&self) -> String;
    /// Writes a consistent copy of every table (named `tables`, in table
    /// order) into the new directory `dir`: the synchronous part of a
    /// snapshot. Returns the format: `rocksdb` (a RocksDB checkpoint, SST
    /// files hard-linked) or `memory` (one [`dump`]).
    fn checkpoint(&mut self, dir: &Path, tables: &[String]) -> Result<String, StateError>;
    /// (keys, bytes) of each table, in table order: cheap estimates (for
    /// metrics), not a scan.
    fn table_sizes(&self) -> Vec<(u64, u64)>;
}

/// Backend key: key group big-endian, then the key.
pub fn backend_key(key_group: u16, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + key.len());
    backend_key_into(&mut out, key_group, key);
    out
}

/// [`backend_key`] into `out` (cleared first), reusing its allocation.
pub fn backend_key_into(out: &mut Vec<u8>, key_group: u16, key: &[u8]) {
    out.clear();
    out.extend_from_slice(&key_group.to_be_bytes());
    out.extend_from_slice(key);
}

/// Decoded contents of one (state, key).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cell {
    Value(SmallBytes),
    List(Vec<Vec<u8>>),
    Map(MapCell),
}

#[derive(Debug)]
struct Slot {
    /// `None`: the key has no state in this table.
    cell: Option<Cell>,
    /// The backend does not hold this cell yet.
    stale: bool,
    /// Changed since the last snapshot.
    changed: bool,
}

impl Slot {
    fn touch(&mut self) {
        self.stale = true;
        self.changed = true;
    }
}

struct Table {
    name: String,
    kind: StateKind,
    cache: HashMap<SmallBytes, Slot>,
}

/// The keyed state of one operator subtask: every declared state, a
/// write-back cache, and the backend behind it. Keys passed in are the
/// record keys; key groups are derived here.
///
/// Snapshots keep the task's pause short; [`KeyedState::snapshot`] returns
/// a [`SnapshotJob`] to run on another thread, of one of two kinds:
/// - a *delta*: the cells changed since the previous snapshot, encoded as a
///   [`dump`] (deletions as tombstones). The backend is not involved.
/// - a *base*: the cells the backend does not hold yet; the job writes them
///   and makes a consistent copy of the backend. Until it has, the backend
///   belongs to the job: the task keeps serving cached keys and waits for it
///   before it touches the backend (a cache miss, an eviction, the next
///   snapshot), so the copy holds exactly the state at the barrier.
///
/// A checkpoint's state is its latest base plus the deltas since, in order.
pub struct KeyedState {
    tables: Vec<Table>,
    backend: SharedBackend,
    /// Set while a snapshot job owns the backend; says whether it applied
    /// the changes it took.
    pending: Option<mpsc::Receiver<Result<(), String>>>,
    /// Changed cells evicted from the cache since the last snapshot.
    carried: Option<DumpBuffer>,
    max_parallelism: u32,
    cache_limit: usize,
    cached: usize,
    /// Whether [`KeyedState::key_counts`] counts (a flush and a full scan:
    /// `weir run`'s summary wants it; the running host does not, and a
    /// stop's downtime would include it).
    count_keys: bool,
    /// Set: dropping this state closes it on a background thread.
    teardown: Option<Arc<Teardown>>,
    /// Cache lookups since [`KeyedState::take_cache_counts`].
    hits: u64,
    misses: u64,
}

/// Closes keyed state on background threads (freeing a cache of millions
/// of cells and closing RocksDB take a large fraction of a second, which
/// a stop should not wait for), and lets whoever owns the working
/// directory wait until every close is done before it reuses or removes
/// it.
#[derive(Debug, Default)]
pub struct Teardown {
    open: Mutex<usize>,
    closed: Condvar,
}

impl Teardown {
    fn begin(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    fn end(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        *open -= 1;
        if *open == 0 {
            self.closed.notify_all();
        }
    }

    /// Blocks until every state handed to this teardown has closed.
    pub fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        while *open > 0 {
            open = self.closed.wait(open).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The size of one table of a subtask's keyed state (for metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct TableMetrics {
    /// `<uid>/<state>`.
    pub table: String,
    /// Keys with state in the backend (RocksDB: its estimate).
    pub keys: u64,
    /// Bytes the table takes in the backend (RocksDB: live SST data plus
    /// memtables).
    pub bytes: u64,
}

/// A subtask's backend, shared with the snapshot job that may own it.
type SharedBackend = Arc<Mutex<Box<dyn StateBackend>>>;

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
fn settle(pending: &mut Option<mpsc::Receiver<Result<(), String>>>) -> Result<(), StateError> {
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

impl std::fmt::Debug for KeyedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedState")
            .field(
                "tables",
                &self.tables.iter().map(|t| &t.name).collect::<Vec<_>>(),
            )
            .field("backend", &self.describe_backend())
            .finish()
    }
}

impl KeyedState {
    /// `tables` are (table name, kind) in the backend's table order.
    pub fn new(
        tables: Vec<(String, StateKind)>,
        backend: Box<dyn StateBackend>,
        max_parallelism: u32,
        cache_limit: usize,
    ) -> Self {
        Self {
            tables: tables
                .into_iter()
                .map(|(name, kind)| Table {
                    name,
                    kind,
                    cache: HashMap::default(),
                })
                .collect(),
            backend: Arc::new(Mutex::new(backend)),
            pending: None,
            carried: None,
            max_parallelism,
            cache_limit: cache_limit.max(1),
            cached: 0,
            count_keys: true,
            teardown: None,
            hits: 0,
            misses: 0,
        }
    }

    /// When dropped, this state closes on a background thread, tracked by
    /// `teardown`.
    pub fn close_in_background(&mut self, teardown: Arc<Teardown>) {
        self.teardown = Some(teardown);
    }

    /// Whether [`KeyedState::key_counts`] counts keys (by default it does);
    /// without, it answers nothing and touches nothing.
    pub fn set_count_keys(&mut self, count: bool) {
        self.count_keys = count;
    }

    fn backend_lock(&self) -> std::sync::MutexGuard<'_, Box<dyn StateBackend>> {
        self.backend.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn table_count(&self) -> usize {
        self.tables.len()
    }

    pub fn kind(&self, table: TableId) -> StateKind {
        self.tables[table].kind
    }

    /// e.g. "rocksdb at weir-data/state/…".
    pub fn describe_backend(&self) -> String {
        self.backend_lock().describe()
    }

    /// The cached slot of (table, key), loading it from the backend on a
    /// miss. One hash lookup on a hit.
    fn slot(&mut self, table: TableId, key: &[u8]) -> Result<&mut Slot, StateError> {
        let Self {
            tables,
            backend,
            pending,
            max_parallelism,
            cached,
            hits,
            misses,
            ..
        } = self;
        let Table { name, kind, cache } = &mut tables[table];
        match cache.entry_ref(key) {
            EntryRef::Occupied(occupied) => {
                *hits += 1;
                Ok(occupied.into_mut())
            }
            EntryRef::Vacant(vacant) => {
                *misses += 1;
                settle(pending)?;
                let group = key_group::of_key(key, *max_parallelism);
                let cell = backend
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(table, group, key)?
                    .map(|bytes| decode_cell(*kind, bytes))
                    .transpose()
                    .map_err(|source| StateError::Corrupt {
                        table: name.clone(),
                        cause: source,
                    })?;
                *cached += 1;
                Ok(vacant.insert(Slot {
                    cell,
                    stale: false,
                    changed: false,
                }))
            }
        }
    }

    /// [`KeyedState::value_get`], lent instead of copied.
    pub fn value_ref(&mut self, table: TableId, key: &[u8]) -> Result<Option<&[u8]>, StateError> {
        Ok(match &self.slot(table, key)?.cell {
            Some(Cell::Value(value)) => Some(value),
            _ => None,
        })
    }

    pub fn value_get(&mut self, table: TableId, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.value_ref(table, key)?.map(<[u8]>::to_vec))
    }

    pub fn value_set(
        &mut self,
        table: TableId,
        key: &[u8],
        value: Vec<u8>,
    ) -> Result<(), StateError> {
        let slot = self.slot(table, key)?;
        slot.cell = Some(Cell::Value(SmallBytes::from(value.as_slice())));
        slot.touch();
        Ok(())
    }

    /// [`KeyedState::value_set`] from borrowed bytes: the cell's buffer is
    /// reused when it has one.
    pub fn value_set_from(
        &mut self,
        table: TableId,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), StateError> {
        let slot = self.slot(table, key)?;
        match &mut slot.cell {
            Some(Cell::Value(buffer)) => buffer.set(value),
            cell => *cell = Some(Cell::Value(SmallBytes::from(value))),
        }
        slot.touch();
        Ok(())
    }

    /// Removes the key's state in `table`, whatever its kind.
    pub fn clear(&mut self, table: TableId, key: &[u8]) -> Result<(), StateError> {
        let slot = self.slot(table, key)?;
        if slot.cell.is_some() {
            slot.cell = None;
            slot.touch();
        }
        Ok(())
    }

    pub fn list_get(&mut self, table: TableId, key: &[u8]) -> Result<Vec<Vec<u8>>, StateError> {
        Ok(match &self.slot(table, key)?.cell {
            Some(Cell::List(items)) => items.clone(),
            _ => Vec::new(),
        })
    }

    pub fn list_add(
        &mut self,
        table: TableId,
        key: &[u8],
        value: Vec<u8>,
    ) -> Result<(), StateError> {
        let slot = self.slot(table, key)?;
        match &mut slot.cell {
            Some(Cell::List(items)) => items.push(value),
            cell => *cell = Some(Cell::List(vec![value])),
        }
        slot.touch();
        Ok(())
    }

    pub fn list_update(
        &mut self,
        table: TableId,
        key: &[u8],
        values: Vec<Vec<u8>>,
    ) -> Result<(), StateError> {
        let slot = self.slot(table, key)?;
        slot.cell = (!values.is_empty()).then_some(Cell::List(values));
        slot.touch();
        Ok(())
    }

    fn map_mut(&mut self, table: TableId, key: &[u8]) -> Result<&mut MapCell, StateError> {
        let slot = self.slot(table, key)?;
        if !matches!(slot.cell, Some(Cell::Map(_))) {
            slot.cell = Some(Cell::Map(BTreeMap::new()));
        }
        slot.touch();
        match &mut slot.cell {
            Some(Cell::Map(map)) => Ok(map),
            _ => unreachable!("cell was set to a map above"),
        }
    }

    fn map_ref(&mut self, table: TableId, key: &[u8]) -> Result<Option<&MapCell>, StateError> {
        Ok(match &self.slot(table, key)?.cell {
            Some(Cell::Map(map)) => Some(map),
            _ => None,
        })
    }

    pub fn map_get(
        &mut self,
        table: TableId,
        key: &[u8],
        map_key: &[u8],
    ) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self
            .map_ref(table, key)?
            .and_then(|m| m.get(map_key).cloned()))
    }

    pub fn map_contains(
        &mut self,
        table: TableId,
        key: &[u8],
        map_key: &[u8],
    ) -> Result<bool, StateError> {
        Ok(self
            .map_ref(table, key)?
            .is_some_and(|m| m.contains_key(map_key)))
    }

    pub fn map_put(
        &mut self,
        table: TableId,
        key: &[u8],
        map_key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<(), StateError> {
        self.map_mut(table, key)?.insert(map_key, value);
        Ok(())
    }

    pub fn map_remove(
        &mut self,
        table: TableId,
        key: &[u8],
        map_key: &[u8],
    ) -> Result<(), StateError> {
        let slot = self.slot(table, key)?;
        if let Some(Cell::Map(map)) = &mut slot.cell
            && map.remove(map_key).is_some()
        {
            if map.is_empty() {
                slot.cell = None;
            }
            slot.touch();
        }
        Ok(())
    }

    pub fn map_entries(&mut self, table: TableId, key: &[u8]) -> Result<Vec<MapEntry>, StateError> {
        Ok(self
            .map_ref(table, key)?
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }

    pub fn map_keys(&mut self, table: TableId, key: &[u8]) -> Result<Vec<Vec<u8>>, StateError> {
        Ok(self
            .map_ref(table, key)?
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default())
    }

    /// Takes every stale cell as a write: the backend will hold it.
    fn take_stale(&mut self) -> Vec<WriteOp> {
        let mut ops = Vec::new();
        for (table_id, table) in self.tables.iter_mut().enumerate() {
            for (key, slot) in table.cache.iter_mut().filter(|(_, s)| s.stale) {
                let key_group = key_group::of_key(key, self.max_parallelism);
                ops.push(match &slot.cell {
                    Some(cell) => WriteOp::Put {
                        table: table_id,
                        key_group,
                        key: key.to_vec(),
                        value: encode_cell(cell),
                    },
                    None => WriteOp::Delete {
                        table: table_id,
                        key_group,
                        key: key.to_vec(),
                    },
                });
                slot.stale = false;
            }
        }
        ops
    }

    /// Takes every cell changed since the last snapshot (including those
    /// evicted meanwhile) as a delta.
    fn take_changed(&mut self) -> DumpBuffer {
        self.changed_cells(true)
    }

    /// Every cell changed since the last snapshot (including those evicted
    /// meanwhile) as a delta; `reset`: they are no longer marked changed.
    fn changed_cells(&mut self, reset: bool) -> DumpBuffer {
        let names = self.table_names();
        let carried = match reset {
            true => self.carried.take(),
            false => self.carried.clone(),
        };
        let mut delta = carried.unwrap_or_else(|| DumpBuffer::new(&names));
        let mut scratch = Vec::new();
        for (table_id, table) in self.tables.iter_mut().enumerate() {
            for (key, slot) in table.cache.iter_mut().filter(|(_, s)| s.changed) {
                let key_group = key_group::of_key(key, self.max_parallelism);
                let value = slot.cell.as_ref().map(|cell| {
                    encode_cell_into(cell, &mut scratch);
                    scratch.as_slice()
                });
                delta.push(table_id as u32, key_group, key, value);
                slot.changed = !reset;
            }
        }
        delta
    }

    /// Writes every stale cell to the backend in one atomic batch.
    pub fn flush(&mut self) -> Result<(), StateError> {
        settle(&mut self.pending)?;
        let ops = self.take_stale();
        if !ops.is_empty() {
            self.backend_lock().write(ops)?;
        }
        Ok(())
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
                slot.changed = false;
            }
        }
        Ok(Some(self.base_job(dir)))
    }

    /// A *base* job: the stale cells go to the backend, then it is copied;
    /// until the job ran, the backend is the job's.
    fn base_job(&mut self, dir: PathBuf) -> SnapshotJob {
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

    /// Cache hits and misses since the last call.
    pub fn take_cache_counts(&mut self) -> (u64, u64) {
        (
            std::mem::take(&mut self.hits),
            std::mem::take(&mut self.misses),
        )
    }

    /// Keys and bytes of each table in the backend (estimates; cells
    /// only in the cache are not counted), or None while a snapshot job
    /// holds the backend.
    pub fn table_metrics(&self) -> Option<Vec<TableMetrics>> {
        let backend = self.backend.try_lock().ok()?;
        Some(
            self.tables
                .iter()
                .zip(backend.table_sizes())
                .map(|(table, (keys, bytes))| TableMetrics {
                    table: table.name.clone(),
                    keys,
                    bytes,
                })
                .collect(),
        )
    }

    /// Table names, in table order.
    pub fn table_names(&self) -> Vec<String> {
        self.tables.iter().map(|t| t.name.clone()).collect()
    }

    /// Flushes and empties the cache once it holds more than its limit.
    pub fn maybe_evict(&mut self) -> Result<(), StateError> {
        if self.cached > self.cache_limit {
            self.flush()?;
            // The next delta still needs what changed since the last snapshot.
            let changed = self.take_changed();
            self.carried = Some(changed);
            for table in &mut self.tables {
                table.cache.clear();
            }
            self.cached = 0;
        }
        Ok(())
    }

    /// Number of keys with state in each table, after a flush.
    pub fn key_counts(&mut self) -> Result<Vec<(String, u64)>, StateError> {
        if !self.count_keys {
            return Ok(Vec::new());
        }
        self.flush()?;
        let mut counts = Vec::with_capacity(self.tables.len());
        let backend = self.backend_lock();
        for (id, table) in self.tables.iter().enumerate() {
            let mut count = 0u64;
            backend.scan(id, 0..self.max_parallelism, &mut |_, _, _| count += 1)?;
            counts.push((table.name.clone(), count));
        }
        Ok(counts)
    }
}

/// State on its way to closing: closed (then counted as closed) when
/// dropped, on whichever thread that is.
struct Closing {
    state: Option<(Vec<Table>, SharedBackend)>,
    teardown: Arc<Teardown>,
}

impl Drop for Closing {
    fn drop(&mut self) {
        drop(self.state.take());
        self.teardown.end();
    }
}

impl Drop for KeyedState {
    fn drop(&mut self) {
        let Some(teardown) = self.teardown.take() else {
            return;
        };
        teardown.begin();
        // The backend closes with its last handle: the one `Closing` holds.
        let backend = std::mem::replace(
            &mut self.backend,
            Arc::new(Mutex::new(Box::new(memory::MemoryBackend::new(0)))),
        );
        let closing = Closing {
            state: Some((std::mem::take(&mut self.tables), backend)),
            teardown,
        };
        // If no thread can start, the closure (and the state) drops here.
        in_background("weir-state-close", move || drop(closing));
    }
}

/// Runs `work` on a new thread of the lowest CPU priority, so cleanup
/// yields to the runs that start meanwhile. Returns false (and `work` is
/// dropped uncalled) when no thread could start.
pub fn in_background(name: &str, work: impl FnOnce() + Send + 'static) -> bool {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            lowest_priority();
            work()
        })
        .is_ok()
}

/// Gives the calling thread the lowest CPU priority (Linux: nice 19, which
/// applies per thread). Elsewhere it does nothing.
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: `gettid` takes no arguments and cannot fail; `setpriority`
    // on the calling thread's id only changes that thread's nice value
    // (an error, e.g. not permitted, leaves it as it was).
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

fn decode_cell(kind: StateKind, bytes: Vec<u8>) -> Result<Cell, codec::CodecError> {
    Ok(match kind {
        StateKind::Value => Cell::Value(SmallBytes::from(bytes.as_slice())),
        StateKind::List => Cell::List(codec::decode_list(&bytes)?),
        StateKind::Map => Cell::Map(codec::decode_map(&bytes)?),
    })
}

fn encode_cell_into(cell: &Cell, out: &mut Vec<u8>) {
    out.clear();
    match cell {
        Cell::Value(value) => out.extend_from_slice(value),
        other => out.extend_from_slice(&encode_cell(other)),
    }
}

fn encode_cell(cell: &Cell) -> Vec<u8> {
    match cell {
        Cell::Value(value) => value.to_vec(),
        Cell::List(items) => codec::encode_list(items),
        Cell::Map(map) => codec::encode_map(map),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One value state `op/v` in memory behind a cache of 2 keys (a
    /// third evicts).
    fn two_key_cache() -> KeyedState {
        KeyedState::new(
            vec![("op/v".into(), StateKind::Value)],
            Box::new(memory::MemoryBackend::new(1)),
            128,
            2,
        )
    }

    fn keyed(backend: Box<dyn StateBackend>, cache: usize) -> KeyedState {
        KeyedState::new(
            vec![
                ("op/v".into(), StateKind::Value),
                ("op/l".into(), StateKind::List),
                ("op/m".into(), StateKind::Map),
            ],
            backend,
            128,
            cache,
        )
    }

    fn exercise(state: &mut KeyedState) {
        state.value_set(0, b"a", b"1".to_vec()).expect("set");
        assert_eq!(state.value_get(0, b"a").expect("get"), Some(b"1".to_vec()));
        assert_eq!(state.value_get(0, b"b").expect("get"), None);
        state.list_add(1, b"a", b"x".to_vec()).expect("add");
        state.list_add(1, b"a", b"y".to_vec()).expect("add");
        state
            .map_put(2, b"a", b"k1".to_vec(), b"v1".to_vec())
            .expect("put");
        state
            .map_put(2, b"a", b"k2".to_vec(), b"v2".to_vec())
            .expect("put");
        state.map_remove(2, b"a", b"k1").expect("remove");
        state.flush().expect("flush");
        state.maybe_evict().expect("evict");
        assert_eq!(
            state.list_get(1, b"a").expect("get"),
            vec![b"x".to_vec(), b"y".to_vec()]
        );
        assert!(state.map_contains(2, b"a", b"k2").expect("contains"));
        assert!(!state.map_contains(2, b"a", b"k1").expect("contains"));
        assert_eq!(state.map_keys(2, b"a").expect("keys"), vec![b"k2".to_vec()]);
        state.clear(0, b"a").expect("clear");
        state.flush().expect("flush");
        let counts = state.key_counts().expect("counts");
        assert_eq!(
            counts,
            vec![("op/v".into(), 0), ("op/l".into(), 1), ("op/m".into(), 1)]
        );
    }

    #[test]
    fn memory_backend_through_cache() {
        let mut state = keyed(Box::new(memory::MemoryBackend::new(3)), 1);
        exercise(&mut state);
    }

    #[test]
    fn rocksdb_backend_through_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = rocks::RocksBackend::open(
            dir.path(),
            &["op/v".to_string(), "op/l".to_string(), "op/m".to_string()],
        )
        .expect("open");
        let mut state = keyed(Box::new(backend), 1);
        exercise(&mut state);
    }

    #[test]
    fn a_bulk_load_ingests_table_files_and_later_writes_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tables = ["op/v".to_string(), "op/l".to_string(), "op/m".to_string()];
        let mut backend = rocks::RocksBackend::open(dir.path(), &tables).expect("open");
        let group = |key: &[u8]| key_group::of_key(key, 128);
        let put = |table: TableId, key: &[u8], value: &[u8]| WriteOp::Put {
            table,
            key_group: group(key),
            key: key.to_vec(),
            value: value.to_vec(),
        };
        // Unsorted, two tables, one key twice: the later put stays.
        let cells = vec![
            put(0, b"b", b"2"),
            put(0, b"a", b"1"),
            put(2, b"a", b"m"),
            put(0, b"a", b"1b"),
        ];
        backend.load(cells).expect("bulk load");
        backend
            .write(vec![put(0, b"b", b"3")])
            .expect("a delta after");
        let get = |table, key: &[u8]| backend.get(table, group(key), key).expect("get");
        assert_eq!(get(0, b"a"), Some(b"1b".to_vec()));
        assert_eq!(get(0, b"b"), Some(b"3".to_vec()));
        assert_eq!(get(2, b"a"), Some(b"m".to_vec()));
        let mut keys = 0;
        backend
            .scan(0, 0..128, &mut |_, _, _| keys += 1)
            .expect("scan");
        assert_eq!(keys, 2);
        let leftovers = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("load-"))
            .count();
        assert_eq!(
            leftovers, 0,
            "the loaded table files moved into the database"
        );
    }

    #[test]
    fn state_closed_in_the_background_is_waited_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tables = ["op/v".to_string(), "op/l".to_string(), "op/m".to_string()];
        let backend = rocks::RocksBackend::open(dir.path(), &tables).expect("open");
        let mut state = keyed(Box::new(backend), 100);
        state.value_set(0, b"k", b"v".to_vec()).expect("set");
        state.flush().expect("flush");
        let teardown = Arc::new(Teardown::default());
        state.close_in_background(teardown.clone());
        drop(state);
        teardown.wait();
        // Closed: the database opens again (RocksDB locks an open one) and
        // holds the flushed cell.
        let reopened = rocks::RocksBackend::open(dir.path(), &tables).expect("closed");
        let group = key_group::of_key(b"k", 128);
        assert_eq!(
            reopened.get(0, group, b"k").expect("get"),
            Some(b"v".to_vec())
        );
    }

    #[test]
    fn a_delta_holds_exactly_the_changes_since_the_last_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A cache of 2 keys: the third key evicts, and evicted changes must
        // still reach the delta.
        let mut state = two_key_cache();
        state.value_set(0, b"a", b"1".to_vec()).expect("set");
        state.value_set(0, b"b", b"1".to_vec()).expect("set");
        let base = state
            .snapshot(dir.path().join("base"), true)
            .expect("snapshot")
            .expect("tables");
        assert_eq!(base.run().expect("base").1, "memory");
        state.value_set(0, b"a", b"2".to_vec()).expect("set");
        state.clear(0, b"b").expect("clear");
        state.value_set(0, b"c", b"3".to_vec()).expect("set");
        state.maybe_evict().expect("evicts");
        state
            .value_set(0, b"c", b"4".to_vec())
            .expect("set after eviction");
        let delta = state
            .snapshot(dir.path().join("delta"), false)
            .expect("snapshot")
            .expect("tables");
        let (path, format) = delta.run().expect("delta");
        assert_eq!(format, DELTA_FORMAT);
        let mut seen = Vec::new();
        dump::read(&path.join(dump::DELTA_FILE), |table, _, key, value| {
            seen.push((table.to_string(), key.to_vec(), value.map(<[u8]>::to_vec)))
        })
        .expect("read");
        // In order: the evicted changes, then the one after eviction.
        let last = |key: &[u8]| {
            seen.iter()
                .rev()
                .find(|(_, k, _)| k == key)
                .map(|(_, _, v)| v.clone())
        };
        assert_eq!(last(b"a"), Some(Some(b"2".to_vec())));
        assert_eq!(last(b"b"), Some(None), "a deletion is a tombstone");
        assert_eq!(last(b"c"), Some(Some(b"4".to_vec())));
        // Nothing changed since: the next delta is empty.
        let empty = state
            .snapshot(dir.path().join("empty"), false)
            .expect("snapshot")
            .expect("tables");
        let (path, _) = empty.run().expect("delta");
        let mut count = 0;
        dump::read(&path.join(dump::DELTA_FILE), |_, _, _, _| count += 1).expect("read");
        assert_eq!(count, 0);
    }

    /// The cells of a delta file, as (key, value or None), in order.
    fn delta_cells(job: SnapshotJob) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let (path, format) = job.run().expect("delta");
        assert_eq!(format, DELTA_FORMAT);
        let mut seen = Vec::new();
        dump::read(&path.join(dump::DELTA_FILE), |_, _, key, value| {
            seen.push((key.to_vec(), value.map(<[u8]>::to_vec)))
        })
        .expect("read");
        seen
    }

    #[test]
    fn an_incremental_savepoint_copies_the_changes_and_the_next_delta_still_has_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut state = two_key_cache();
        state.value_set(0, b"a", b"1".to_vec()).expect("set");
        let base = state
            .snapshot(dir.path().join("base"), true)
            .expect("snapshot")
            .expect("tables");
        base.run().expect("base");
        state.value_set(0, b"a", b"2".to_vec()).expect("set");
        state.value_set(0, b"b", b"1".to_vec()).expect("set");
        state.value_set(0, b"c", b"1".to_vec()).expect("set");
        // `a` and `b` evicted: carried, not in the cache.
        state.maybe_evict().expect("evicts");
        state.clear(0, b"c").expect("clear");
        let savepoint = state
            .savepoint_delta(dir.path().join("savepoint"))
            .expect("savepoint")
            .expect("tables");
        let mut expected = vec![
            (b"a".to_vec(), Some(b"2".to_vec())),
            (b"b".to_vec(), Some(b"1".to_vec())),
            (b"c".to_vec(), None),
        ];
        let sorted = |mut cells: Vec<(Vec<u8>, Option<Vec<u8>>)>| {
            // The last change of each key, by key.
            cells.reverse();
            cells.sort_by(|a, b| a.0.cmp(&b.0));
            cells.dedup_by(|a, b| a.0 == b.0);
            cells
        };
        expected.sort();
        assert_eq!(sorted(delta_cells(savepoint)), expected);
        let delta = state
            .snapshot(dir.path().join("delta"), false)
            .expect("snapshot")
            .expect("tables");
        assert_eq!(
            sorted(delta_cells(delta)),
            expected,
            "the checkpoint after the savepoint still holds its changes"
        );
    }

    #[test]
    fn a_chunk_of_cells_loads_in_bulk_sorted_or_not() {
        let mut chunk = CellChunk::with_capacity(4);
        chunk.push(0, 1, b"a", b"1");
        chunk.push(0, 1, b"b", b"22");
        chunk.push(1, 0, b"a", b"");
        assert!(chunk.is_sorted());
        let cells: Vec<_> = chunk
            .iter()
            .map(|(t, g, k, v)| (t, g, k.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(
            cells,
            vec![
                (0, 1, b"a".to_vec(), b"1".to_vec()),
                (0, 1, b"b".to_vec(), b"22".to_vec()),
                (1, 0, b"a".to_vec(), Vec::new()),
            ]
        );
        let mut unsorted = CellChunk::with_capacity(2);
        unsorted.push(0, 2, b"x", b"1");
        unsorted.push(0, 1, b"y", b"2");
        assert!(!unsorted.is_sorted());
        let dir = tempfile::tempdir().expect("tempdir");
        let mut db =
            rocks::RocksBackend::open(dir.path(), &["op/a".into(), "op/b".into()]).expect("open");
        db.load_chunk(&chunk)
            .expect("sorted: table files per table");
        db.load_chunk(&unsorted).expect("unsorted: sorted first");
        assert_eq!(db.get(0, 1, b"b").expect("get"), Some(b"22".to_vec()));
        assert_eq!(db.get(1, 0, b"a").expect("get"), Some(Vec::new()));
        assert_eq!(db.get(0, 1, b"y").expect("get"), Some(b"2".to_vec()));
        assert_eq!(db.get(0, 2, b"x").expect("get"), Some(b"1".to_vec()));
        assert_eq!(db.get(1, 1, b"a").expect("get"), None);
    }

    #[test]
    fn scan_visits_only_requested_key_groups_in_order() {
        let mut backend = memory::MemoryBackend::new(1);
        for (group, key) in [(3u16, "c"), (1, "a"), (2, "b"), (5, "e")] {
            backend
                .write(vec![WriteOp::Put {
                    table: 0,
                    key_group: group,
                    key: key.into(),
                    value: vec![],
                }])
                .expect("write");
        }
        let mut seen = Vec::new();
        backend
            .scan(0, 1..4, &mut |g, k, _| seen.push((g, k.to_vec())))
            .expect("scan");
        assert_eq!(
            seen,
            vec![(1, b"a".to_vec()), (2, b"b".to_vec()), (3, b"c".to_vec())]
        );
    }
}
