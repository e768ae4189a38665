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
    /// Marks the cell written at `now` (its TTL's time; 0 without one).
    fn touch(&mut self, now: u64) {
        self.meta = STALE | CHANGED | (now & STAMP);
    }

    /// Applies a TTL to a cell read by `clock`: an expired cell reads as
    /// absent (and its deletion reaches the backend and the next delta);
    /// on read-and-write, a live one is refreshed.
    #[inline]
    fn expire(&mut self, ttl: &super::ttl::StateTtl, clock: &super::ttl::TtlClock) {
        if self.cell.is_none() {
            return;
        }
        let written = clock.write_time(ttl.time);
        if ttl.expired(self.stamp(), clock.now(ttl.time)) {
            self.cell = None;
            self.touch(written);
        } else if ttl.update == super::ttl::TtlUpdate::OnReadAndWrite && self.stamp() != written {
            self.touch(written);
        }
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
                    ttl: None,
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
            clock: super::ttl::TtlClock::wall(),
            event_clock: Arc::default(),
            any_ttl: false,
        }
    }

    /// Gives tables time-to-lives (in table order; before any cell is
    /// read). A backend that drops expired cells itself is kept told the
    /// watermark ([`KeyedState::set_clock`]).
    pub fn set_ttls(&mut self, ttls: &[Option<super::ttl::StateTtl>]) {
        for (table, ttl) in self.tables.iter_mut().zip(ttls) {
            table.ttl = *ttl;
        }
        self.any_ttl = self.tables.iter().any(|t| t.ttl.is_some());
        let event = self.backend_lock().event_clock();
        if let Some(event) = event {
            self.event_clock = event;
        }
    }

    /// Whether any table has a TTL.
    pub fn has_ttl(&self) -> bool {
        self.any_ttl
    }

    /// Reads the clock TTLs expire by (the wall clock, and `watermark`):
    /// the task calls it before each batch and timer. Nothing without a TTL.
    #[inline]
    pub fn tick(&mut self, watermark: i64) {
        if self.any_ttl {
            let event = super::ttl::event_millis(watermark);
            self.set_clock(super::ttl::TtlClock {
                processing: super::ttl::wall_millis(),
                event,
                event_write: event,
            });
        }
    }

    /// The times TTLs are measured in from now on (the task sets them as
    /// it goes: the wall clock per batch, the watermark as it advances).
    #[inline]
    pub fn set_clock(&mut self, clock: super::ttl::TtlClock) {
        if clock.event != self.clock.event {
            self.event_clock.set(clock.event);
        }
        self.clock = clock;
    }

    /// The time a write to `table` is stamped with (0 without a TTL).
    #[inline]
    fn now(&self, table: TableId) -> u64 {
        match &self.tables[table].ttl {
            Some(ttl) => self.clock.write_time(ttl.time),
            None => 0,
        }
    }

    /// The event time of the record being processed: what event-time
    /// writes are stamped with until the next.
    #[inline]
    pub fn stamp_event_time(&mut self, timestamp: i64) {
        if self.any_ttl {
            self.clock.event_write = super::ttl::event_millis(timestamp);
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
    /// miss. One hash lookup on a hit. A TTL state's expired cell reads as
    /// absent.
    pub(super) fn slot(&mut self, table: TableId, key: &[u8]) -> Result<&mut Slot, StateError> {
        let Self {
            tables,
            backend,
            pending,
            max_parallelism,
            cached,
            hits,
            misses,
            clock,
            ..
        } = self;
        let Table {
            name,
            kind,
            ttl,
            cache,
        } = &mut tables[table];
        let slot = match cache.entry_ref(key) {
            EntryRef::Occupied(occupied) => {
                *hits += 1;
                occupied.into_mut()
            }
            EntryRef::Vacant(vacant) => {
                *misses += 1;
                settle(pending)?;
                let group = key_group::of_key(key, *max_parallelism);
                let stored = backend
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(table, group, key)?;
                let corrupt = |cause| StateError::Corrupt {
                    table: name.clone(),
                    cause,
                };
                let (stamp, cell) = match (stored, ttl.is_some()) {
                    (None, _) => (0, None),
                    (Some(bytes), false) => (0, Some(decode_cell(*kind, bytes).map_err(corrupt)?)),
                    (Some(bytes), true) => {
                        let (stamp, cell) = super::ttl::split(&bytes).ok_or_else(|| {
                            corrupt(codec::CodecError {
                                what: "TTL",
                                detail: format!("{} bytes, shorter than a stamp", bytes.len()),
                            })
                        })?;
                        let cell = decode_cell(*kind, cell.to_vec()).map_err(corrupt)?;
                        (stamp, Some(cell))
                    }
                };
                *cached += 1;
                vacant.insert(Slot::new(cell, stamp))
            }
        };
        if let Some(ttl) = ttl {
            slot.expire(ttl, clock);
        }
        Ok(slot)
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
        let now = self.now(table);
        self.admit(table, key, value.len())?;
        let slot = self.slot(table, key)?;
        slot.cell = Some(Cell::Value(SmallBytes::from(value.as_slice())));
        slot.touch(now);
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
        let now = self.now(table);
        self.admit(table, key, value.len())?;
        let slot = self.slot(table, key)?;
        match &mut slot.cell {
            Some(Cell::Value(buffer)) => buffer.set(value),
            cell => *cell = Some(Cell::Value(SmallBytes::from(value))),
        }
        slot.touch(now);
        Ok(())
    }

    /// Removes the key's state in `table`, whatever its kind.
    pub fn clear(&mut self, table: TableId, key: &[u8]) -> Result<(), StateError> {
        let now = self.now(table);
        let slot = self.slot(table, key)?;
        if slot.cell.is_some() {
            slot.cell = None;
            slot.touch(now);
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
        let now = self.now(table);
        self.admit(table, key, value.len())?;
        let slot = self.slot(table, key)?;
        match &mut slot.cell {
            Some(Cell::List(items)) => items.push(value),
            cell => *cell = Some(Cell::List(vec![value])),
        }
        slot.touch(now);
        Ok(())
    }

    pub fn list_update(
        &mut self,
        table: TableId,
        key: &[u8],
        values: Vec<Vec<u8>>,
    ) -> Result<(), StateError> {
        let now = self.now(table);
        for value in &values {
            self.admit(table, key, value.len())?;
        }
        let slot = self.slot(table, key)?;
        slot.cell = (!values.is_empty()).then_some(Cell::List(values));
        slot.touch(now);
        Ok(())
    }

    pub(super) fn map_mut(
        &mut self,
        table: TableId,
        key: &[u8],
    ) -> Result<&mut MapCell, StateError> {
        let now = self.now(table);
        let slot = self.slot(table, key)?;
        if !matches!(slot.cell, Some(Cell::Map(_))) {
            slot.cell = Some(Cell::Map(BTreeMap::new()));
        }
        slot.touch(now);
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
        let now = self.now(table);
        let slot = self.slot(table, key)?;
        if let Some(Cell::Map(map)) = &mut slot.cell
            && map.remove(map_key).is_some()
        {
            if map.is_empty() {
                slot.cell = None;
            }
            slot.touch(now);
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
            for (key, slot) in table.cache.iter_mut().filter(|(_, s)| s.stale()) {
                let key_group = key_group::of_key(key, self.max_parallelism);
                let stamp = table.ttl.map(|_| slot.stamp());
                ops.push(match &slot.cell {
                    Some(cell) => WriteOp::Put {
                        table: table_id,
                        key_group,
                        key: key.to_vec(),
                        value: encode_stored(cell, stamp),
                    },
                    None => WriteOp::Delete {
                        table: table_id,
                        key_group,
                        key: key.to_vec(),
                    },
                });
                slot.set_stale(false);
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

    /// Tables with their TTLs, in table order.
    pub fn table_specs(&self) -> Vec<TableSpec> {
        self.tables
            .iter()
            .map(|t| TableSpec {
                name: t.name.clone(),
                ttl: t.ttl,
            })
            .collect()
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
