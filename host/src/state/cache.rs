//! The keyed state's write-back cache: cells decoded once and kept
//! (keys and values up to 22 bytes inline), the per-record and batched
//! state calls, flushing stale cells to the backend in one batch, eviction,
//! and the counts the metrics show.

use super::small::SmallBytes;
use super::snapshot::settle;
use super::*;
use crate::types::key_group;
use hashbrown::HashMap;
use hashbrown::hash_map::EntryRef;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

impl Slot {
    fn touch(&mut self) {
        self.stale = true;
        self.changed = true;
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
            quota: super::quota::Quota::default(),
        }
    }

    /// Checks every write against `limits` (see [`super::quota`]).
    pub fn set_limits(&mut self, limits: super::quota::StateLimits) {
        self.quota = super::quota::Quota::new(limits);
    }

    /// A write of a `value`-byte value for `key` into `table`, checked
    /// against the quotas (the backend measured when the bound asks).
    fn admit(&mut self, table: TableId, key: &[u8], value: usize) -> Result<(), StateError> {
        use super::quota::Verdict;
        let name = &self.tables[table].name;
        match self.quota.check(name, key, value)? {
            Verdict::Fits => Ok(()),
            Verdict::Measure => {
                self.flush()?;
                let bytes: u64 = self.backend_lock().table_sizes().iter().map(|t| t.1).sum();
                let name = &self.tables[table].name;
                self.quota
                    .measured(bytes + (key.len() + value) as u64, name, key)
            }
        }
    }

    /// Whether [`KeyedState::key_counts`] counts keys (by default it does);
    /// without, it answers nothing and touches nothing.
    pub fn set_count_keys(&mut self, count: bool) {
        self.count_keys = count;
    }

    pub(super) fn backend_lock(&self) -> std::sync::MutexGuard<'_, Box<dyn StateBackend>> {
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
    pub(super) fn slot(&mut self, table: TableId, key: &[u8]) -> Result<&mut Slot, StateError> {
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
        self.admit(table, key, value.len())?;
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
        self.admit(table, key, value.len())?;
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
        self.admit(table, key, value.len())?;
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
        for value in &values {
            self.admit(table, key, value.len())?;
        }
        let slot = self.slot(table, key)?;
        slot.cell = (!values.is_empty()).then_some(Cell::List(values));
        slot.touch();
        Ok(())
    }

    pub(super) fn map_mut(
        &mut self,
        table: TableId,
        key: &[u8],
    ) -> Result<&mut MapCell, StateError> {
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

    pub(super) fn map_ref(
        &mut self,
        table: TableId,
        key: &[u8],
    ) -> Result<Option<&MapCell>, StateError> {
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
        self.admit(table, key, map_key.len() + value.len())?;
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
    pub(super) fn take_stale(&mut self) -> Vec<WriteOp> {
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

    /// Writes every stale cell to the backend in one atomic batch.
    pub fn flush(&mut self) -> Result<(), StateError> {
        settle(&mut self.pending)?;
        let ops = self.take_stale();
        if !ops.is_empty() {
            self.backend_lock().write(ops)?;
        }
        Ok(())
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
