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

mod cache;
pub mod quota;
mod snapshot;
mod teardown;
pub mod ttl;

pub use snapshot::{DELTA_FORMAT, SnapshotJob};
pub use teardown::{Teardown, in_background};

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};

use hashbrown::HashMap;

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
    /// Its time-to-live (the plugin's declaration, or the job file's
    /// `state_ttl`); none: its cells live until cleared.
    pub ttl: Option<ttl::StateTtl>,
}

/// A table as a snapshot stores it: its name (`<uid>/<state>`) and its
/// TTL (its cells are stamped, and expired ones left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub name: String,
    pub ttl: Option<ttl::StateTtl>,
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
    /// A write past the operator's `value_bytes` or `state_bytes`.
    #[error("operator `{uid}` state `{state}`, key {key:?}: {what}")]
    Quota {
        uid: String,
        state: String,
        key: String,
        what: String,
    },
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
    /// Set when it drops the expired cells of TTL states itself (RocksDB's
    /// compaction filter): the watermark it reads for event-time TTLs,
    /// which [`KeyedState`] keeps current. Else [`KeyedState`] sweeps
    /// expired cells at snapshots.
    fn event_clock(&self) -> Option<Arc<ttl::EventClock>> {
        None
    }
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

/// A cached cell: 40 bytes, its flags packed into its stamp's word.
#[derive(Debug)]
struct Slot {
    /// `None`: the key has no state in this table.
    cell: Option<Cell>,
    /// Bit 63: the backend does not hold this cell yet (stale); bit 62:
    /// changed since the last snapshot; bits 0–61: a TTL state's last
    /// update, in ms (see [`ttl`]), else 0.
    meta: u64,
}

const STALE: u64 = 1 << 63;
const CHANGED: u64 = 1 << 62;
const STAMP: u64 = CHANGED - 1;

impl Slot {
    fn new(cell: Option<Cell>, stamp: u64) -> Self {
        Self {
            cell,
            meta: stamp & STAMP,
        }
    }

    /// The backend does not hold this cell yet.
    fn stale(&self) -> bool {
        self.meta & STALE != 0
    }

    fn set_stale(&mut self, stale: bool) {
        self.meta = (self.meta & !STALE) | if stale { STALE } else { 0 };
    }

    /// Changed since the last snapshot.
    fn changed(&self) -> bool {
        self.meta & CHANGED != 0
    }

    fn set_changed(&mut self, changed: bool) {
        self.meta = (self.meta & !CHANGED) | if changed { CHANGED } else { 0 };
    }

    /// A TTL state's last update (ms).
    fn stamp(&self) -> u64 {
        self.meta & STAMP
    }
}

struct Table {
    name: String,
    kind: StateKind,
    /// Its time-to-live: its cells are stamped and expire.
    ttl: Option<ttl::StateTtl>,
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
    /// The operator's state quotas and their accounting.
    quota: quota::Quota,
    /// The times TTL states expire by (set by the task as it goes).
    clock: ttl::TtlClock,
    /// The watermark, shared with a backend that drops expired cells.
    event_clock: Arc<ttl::EventClock>,
    /// Some table has a TTL (else the clock is never read).
    any_ttl: bool,
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

fn decode_cell(kind: StateKind, bytes: Vec<u8>) -> Result<Cell, codec::CodecError> {
    Ok(match kind {
        StateKind::Value => Cell::Value(SmallBytes::from(bytes.as_slice())),
        StateKind::List => Cell::List(codec::decode_list(&bytes)?),
        StateKind::Map => Cell::Map(codec::decode_map(&bytes)?),
    })
}

/// A cell as the backend stores it: after its stamp when its state has
/// a TTL.
fn encode_stored_into(cell: &Cell, stamp: Option<u64>, out: &mut Vec<u8>) {
    out.clear();
    if let Some(stamp) = stamp {
        ttl::put_stamp(out, stamp);
    }
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

/// [`encode_stored_into`] into a new buffer.
fn encode_stored(cell: &Cell, stamp: Option<u64>) -> Vec<u8> {
    match stamp {
        None => encode_cell(cell),
        Some(_) => {
            let mut out = Vec::new();
            encode_stored_into(cell, stamp, &mut out);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::key_group;

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

    fn ttl(millis: u64, update: ttl::TtlUpdate) -> Option<ttl::StateTtl> {
        Some(ttl::StateTtl {
            millis,
            update,
            time: ttl::TtlTime::Processing,
        })
    }

    fn at(state: &mut KeyedState, processing: u64) {
        state.set_clock(ttl::TtlClock {
            processing,
            ..ttl::TtlClock::default()
        });
    }

    #[test]
    fn an_expired_cell_reads_as_absent_and_its_deletion_reaches_the_backend_and_the_delta() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut state = keyed(Box::new(memory::MemoryBackend::new(3)), 100);
        let on_write = ttl::TtlUpdate::OnCreateAndWrite;
        state.set_ttls(&[ttl(1000, on_write), ttl(1000, on_write), None]);
        at(&mut state, 10_000);
        state.value_set(0, b"a", b"1".to_vec()).expect("set");
        state.list_add(1, b"a", b"x".to_vec()).expect("add");
        state
            .map_put(2, b"a", b"k".to_vec(), b"v".to_vec())
            .expect("put");
        state.flush().expect("flush");
        // Stored after its stamp.
        let group = crate::types::key_group::of_key(b"a", 128);
        let stored = state.backend_lock().get(0, group, b"a").expect("get");
        assert_eq!(stored, Some(ttl::stamped(10_000, b"1")));
        at(&mut state, 10_999);
        assert_eq!(state.value_get(0, b"a").expect("get"), Some(b"1".to_vec()));
        // A read does not refresh on create-and-write.
        at(&mut state, 11_000);
        assert_eq!(state.value_get(0, b"a").expect("get"), None);
        assert!(state.list_get(1, b"a").expect("get").is_empty());
        assert!(state.map_contains(2, b"a", b"k").expect("no TTL"));
        let delta = state
            .snapshot(dir.path().join("delta"), false)
            .expect("snapshot")
            .expect("tables");
        let cells = delta_cells(delta);
        assert!(
            cells.contains(&(b"a".to_vec(), None)),
            "a tombstone: {cells:?}"
        );
        state.flush().expect("flush");
        assert_eq!(state.backend_lock().get(0, group, b"a").expect("get"), None);
    }

    #[test]
    fn a_write_refreshes_and_on_read_and_write_a_read_does_too() {
        let mut state = keyed(Box::new(memory::MemoryBackend::new(3)), 100);
        state.set_ttls(&[
            ttl(1000, ttl::TtlUpdate::OnReadAndWrite),
            ttl(1000, ttl::TtlUpdate::OnCreateAndWrite),
            None,
        ]);
        at(&mut state, 0);
        state.value_set(0, b"r", b"1".to_vec()).expect("set");
        state.list_add(1, b"w", b"x".to_vec()).expect("add");
        for now in [900, 1800, 2700] {
            at(&mut state, now);
            assert!(
                state.value_get(0, b"r").expect("get").is_some(),
                "read at {now}"
            );
            state
                .list_add(1, b"w", b"y".to_vec())
                .expect("a write refreshes");
        }
        at(&mut state, 3699);
        assert!(state.value_get(0, b"r").expect("get").is_some());
        assert_eq!(state.list_get(1, b"w").expect("get").len(), 4);
        at(&mut state, 4699);
        assert_eq!(state.value_get(0, b"r").expect("get"), None);
        assert!(state.list_get(1, b"w").expect("get").is_empty());
    }

    #[test]
    fn a_memory_snapshot_sweeps_expired_cells_out_of_the_backend() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut state = two_key_cache();
        state.set_ttls(&[ttl(1000, ttl::TtlUpdate::OnCreateAndWrite)]);
        at(&mut state, 0);
        for key in [b"a", b"b", b"c"] {
            state.value_set(0, key, b"1".to_vec()).expect("set");
        }
        state.maybe_evict().expect("evicted: in the backend only");
        at(&mut state, 500);
        state.value_set(0, b"c", b"2".to_vec()).expect("refreshed");
        at(&mut state, 1200);
        let base = state
            .snapshot(dir.path().join("base"), true)
            .expect("snapshot")
            .expect("tables");
        let (path, _) = base.run().expect("base");
        let mut keys = Vec::new();
        dump::read(&path.join(dump::DUMP_FILE), |_, _, key, _| {
            keys.push(key.to_vec())
        })
        .expect("read");
        assert_eq!(keys, vec![b"c".to_vec()]);
    }

    #[test]
    fn rocksdb_compaction_drops_expired_cells() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tables = ["op/v".to_string(), "op/w".to_string()];
        let on_write = ttl::TtlUpdate::OnCreateAndWrite;
        let ttls = [ttl(60_000, on_write), None];
        let backend = rocks::RocksBackend::open_expiring(dir.path(), &tables, &ttls).expect("open");
        let now = ttl::wall_millis();
        let put = |table, key: &[u8], value: Vec<u8>| WriteOp::Put {
            table,
            key_group: crate::types::key_group::of_key(key, 128),
            key: key.to_vec(),
            value,
        };
        let mut backend: Box<dyn StateBackend> = Box::new(backend);
        backend
            .write(vec![
                put(0, b"old", ttl::stamped(now - 120_000, b"1")),
                put(0, b"new", ttl::stamped(now, b"1")),
                put(1, b"old", b"no TTL".to_vec()),
            ])
            .expect("write");
        let count = |backend: &dyn StateBackend, table| {
            let mut n = 0;
            backend
                .scan(table, 0..128, &mut |_, _, _| n += 1)
                .expect("scan");
            n
        };
        assert_eq!(count(backend.as_ref(), 0), 2, "not compacted yet");
        let reopened = {
            drop(backend);
            rocks::RocksBackend::open_expiring(dir.path(), &tables, &ttls).expect("reopen")
        };
        reopened.compact_all().expect("compact");
        assert_eq!(count(&reopened, 0), 1, "the expired cell is dropped");
        assert_eq!(count(&reopened, 1), 1, "a table without TTL keeps all");
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
