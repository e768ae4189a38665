//! RocksDB [`StateBackend`]: one embedded database per operator subtask, one
//! column family per table (`<operator uid>/<state name>`), keys prefixed by
//! key group.
//!
//! Tuned for the keyed-state access pattern: bloom filters and a block cache
//! for point reads, a large memtable, writes in one `WriteBatch` per flush,
//! and no write-ahead log (durability comes from checkpoints, not the WAL).

use std::ops::Range;
use std::path::{Path, PathBuf};

use rocksdb::compaction_filter::Decision as CompactionDecision;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType,
    IngestExternalFileOptions, Options, SstFileWriter, WriteBatch, WriteOptions,
};

use super::ttl::{EventClock, Expiry, StateTtl};
use super::{
    CellChunk, CellVisitor, StateBackend, StateError, TableId, WriteOp, backend_key,
    backend_key_into,
};
use std::sync::Arc;

pub struct RocksBackend {
    db: DB,
    dir: PathBuf,
    tables: Vec<String>,
    write_options: WriteOptions,
    /// The column families' options (table files for bulk loads are
    /// written with them).
    cf_options: Options,
    /// Table files written for bulk loads so far (their names).
    loaded_files: u64,
    /// Set when compaction filters drop the expired cells of its TTL
    /// tables: the watermark they read.
    event: Option<Arc<EventClock>>,
}

impl RocksBackend {
    /// Opens (creating if needed) the database at `dir` with one column
    /// family per table name.
    pub fn open(dir: &Path, tables: &[String]) -> Result<Self, StateError> {
        Self::open_expiring(dir, tables, &[])
    }

    /// [`RocksBackend::open`] for a subtask's live state: a table with a
    /// TTL in `ttls` (by table index) has its expired cells dropped by a
    /// compaction filter (event time: by the watermark
    /// [`StateBackend::event_clock`] is told).
    pub fn open_expiring(
        dir: &Path,
        tables: &[String],
        ttls: &[Option<StateTtl>],
    ) -> Result<Self, StateError> {
        let event = Arc::new(EventClock::default());
        let expiry: Vec<Option<Expiry>> = ttls
            .iter()
            .map(|ttl| {
                ttl.map(|ttl| Expiry {
                    ttl,
                    event: event.clone(),
                })
            })
            .collect();
        let open_error = |message: String| StateError::Open {
            dir: dir.to_path_buf(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_error(e.to_string()))?;
        let cache = Cache::new_lru_cache(64 << 20);
        let mut table_options = BlockBasedOptions::default();
        table_options.set_bloom_filter(10.0, false);
        table_options.set_block_cache(&cache);
        // Index and filter blocks stay with the open table, not in the block
        // cache: a filter block bigger than a cache shard is never cached,
        // and every point read then re-read it from disk (measured: 10M keys
        // took minutes to load).
        table_options.set_cache_index_and_filter_blocks(false);
        let mut cf_options = Options::default();
        cf_options.set_block_based_table_factory(&table_options);
        cf_options.set_write_buffer_size(64 << 20);
        cf_options.set_compression_type(DBCompressionType::Lz4);
        cf_options.set_prefix_extractor(rocksdb::SliceTransform::create_fixed_prefix(2));
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_max_background_jobs(2);
        let descriptors: Vec<_> = tables
            .iter()
            .enumerate()
            .map(|(index, name)| {
                let mut options = cf_options.clone();
                if let Some(Some(expiry)) = expiry.get(index) {
                    // Every table file is compacted again (through the
                    // filter) once it is a TTL old, at least a minute: a
                    // job whose keys churn keeps its state its live size.
                    let seconds = (expiry.ttl.millis / 1000).clamp(60, 30 * 24 * 3600);
                    options.set_periodic_compaction_seconds(seconds);
                    let expiry = expiry.clone();
                    options.set_compaction_filter("weir-ttl", move |_, _: &[u8], value: &[u8]| {
                        match expiry.expired(value) {
                            true => CompactionDecision::Remove,
                            false => CompactionDecision::Keep,
                        }
                    });
                }
                ColumnFamilyDescriptor::new(name, options)
            })
            .collect();
        let db = DB::open_cf_descriptors(&db_options, dir, descriptors)
            .map_err(|e| open_error(e.to_string()))?;
        let mut write_options = WriteOptions::default();
        write_options.disable_wal(true);
        Ok(Self {
            db,
            dir: dir.to_path_buf(),
            tables: tables.to_vec(),
            write_options,
            cf_options,
            loaded_files: 0,
            event: expiry.iter().any(Option::is_some).then_some(event),
        })
    }

    /// The directory the database lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Flushes and compacts every table whole (tests and benchmarks: its
    /// compaction filters then drop every expired cell).
    pub fn compact_all(&self) -> Result<(), StateError> {
        for table in 0..self.tables.len() {
            let cf = self.cf(table)?;
            self.db.flush_cf(cf).map_err(|e| self.io_error(table, e))?;
            self.db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    fn cf(&self, table: TableId) -> Result<&rocksdb::ColumnFamily, StateError> {
        let name = &self.tables[table];
        self.db.cf_handle(name).ok_or_else(|| StateError::Io {
            table: name.clone(),
            message: "column family missing".to_string(),
        })
    }

    fn io_error(&self, table: TableId, error: rocksdb::Error) -> StateError {
        StateError::Io {
            table: self.tables[table].clone(),
            message: error.to_string(),
        }
    }
}

impl RocksBackend {
    /// Writes `puts` (of one table, sorted, one per key) as a table file
    /// and ingests it.
    fn ingest<'c>(
        &mut self,
        table: TableId,
        puts: impl Iterator<Item = (u16, &'c [u8], &'c [u8])>,
    ) -> Result<(), StateError> {
        let path = self.dir.join(format!("load-{}.sst", self.loaded_files));
        self.loaded_files += 1;
        let error = |e: rocksdb::Error| StateError::Io {
            table: self.tables[table].clone(),
            message: format!("bulk load: {e}"),
        };
        let mut writer = SstFileWriter::create(&self.cf_options);
        writer.open(&path).map_err(error)?;
        let mut backend_key = Vec::new();
        for (key_group, key, value) in puts {
            backend_key_into(&mut backend_key, key_group, key);
            writer.put(&backend_key, value).map_err(error)?;
        }
        writer.finish().map_err(error)?;
        let mut options = IngestExternalFileOptions::default();
        options.set_move_files(true);
        let cf = self.cf(table)?;
        let ingested = self
            .db
            .ingest_external_file_cf_opts(cf, &options, vec![&path])
            .map_err(error);
        let _ = std::fs::remove_file(&path);
        ingested
    }
}

impl StateBackend for RocksBackend {
    fn get(
        &self,
        table: TableId,
        key_group: u16,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StateError> {
        let cf = self.cf(table)?;
        self.db
            .get_cf(cf, backend_key(key_group, key))
            .map_err(|e| self.io_error(table, e))
    }

    fn write(&mut self, ops: Vec<WriteOp>) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        let mut first_table = 0;
        for (index, op) in ops.iter().enumerate() {
            match op {
                WriteOp::Put {
                    table,
                    key_group,
                    key,
                    value,
                } => {
                    if index == 0 {
                        first_table = *table;
                    }
                    batch.put_cf(self.cf(*table)?, backend_key(*key_group, key), value);
                }
                WriteOp::Delete {
                    table,
                    key_group,
                    key,
                } => {
                    if index == 0 {
                        first_table = *table;
                    }
                    batch.delete_cf(self.cf(*table)?, backend_key(*key_group, key));
                }
            }
        }
        self.db
            .write_opt(batch, &self.write_options)
            .map_err(|e| self.io_error(first_table, e))
    }

    /// One sorted table file per table, ingested whole (moved into the
    /// database, placed at the lowest level it does not overlap): no
    /// memtable, no flush, no compaction of what a restore loads.
    fn load(&mut self, mut ops: Vec<WriteOp>) -> Result<(), StateError> {
        if ops.iter().any(|op| matches!(op, WriteOp::Delete { .. })) {
            return self.write(ops);
        }
        // A canonical dump or a database scan comes sorted, one put a key.
        if !ops.is_sorted_by(|a, b| a.sort_key() < b.sort_key()) {
            // Stable: of two puts of one key the later stays.
            ops.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
            ops.dedup_by(|later, earlier| {
                let same = later.sort_key() == earlier.sort_key();
                if same {
                    std::mem::swap(later, earlier);
                }
                same
            });
        }
        let mut start = 0;
        while start < ops.len() {
            let table = ops[start].sort_key().0;
            let end = start + ops[start..].partition_point(|op| op.sort_key().0 == table);
            self.ingest(
                table,
                ops[start..end].iter().filter_map(|op| match op {
                    WriteOp::Put {
                        key_group,
                        key,
                        value,
                        ..
                    } => Some((*key_group, key.as_slice(), value.as_slice())),
                    WriteOp::Delete { .. } => None,
                }),
            )?;
            start = end;
        }
        Ok(())
    }

    fn load_chunk(&mut self, chunk: &CellChunk) -> Result<(), StateError> {
        if !chunk.is_sorted() {
            return self.load(chunk.to_ops());
        }
        // Sorted by table first: one table file a run of a table's cells.
        let mut cells = chunk.iter().peekable();
        while let Some(&(table, ..)) = cells.peek() {
            let mut run = std::iter::from_fn(|| cells.next_if(|c| c.0 == table))
                .map(|(_, group, key, value)| (group, key, value));
            self.ingest(table, &mut run)?;
        }
        Ok(())
    }

    fn scan(
        &self,
        table: TableId,
        groups: Range<u32>,
        visit: &mut CellVisitor<'_>,
    ) -> Result<(), StateError> {
        let cf = self.cf(table)?;
        let start = (groups.start as u16).to_be_bytes();
        let mut read_options = rocksdb::ReadOptions::default();
        read_options.set_total_order_seek(true);
        // Scans (savepoints, restores, key counts) read everything once:
        // read ahead, and keep the block cache for point reads.
        read_options.fill_cache(false);
        read_options.set_readahead_size(4 << 20);
        // The raw iterator lends each key and value: no copy per cell.
        let mut iter = self.db.raw_iterator_cf_opt(cf, read_options);
        iter.seek(start);
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if key.len() >= 2 {
                let group = u16::from_be_bytes([key[0], key[1]]);
                if u32::from(group) >= groups.end {
                    break;
                }
                visit(group, &key[2..], value);
            }
            iter.next();
        }
        iter.status().map_err(|e| self.io_error(table, e))
    }

    fn event_clock(&self) -> Option<Arc<EventClock>> {
        self.event.clone()
    }

    fn describe(&self) -> String {
        format!("rocksdb at {}", self.dir.display())
    }

    fn table_sizes(&self) -> Vec<(u64, u64)> {
        let property = |cf: &rocksdb::ColumnFamily, name: &str| {
            self.db
                .property_int_value_cf(cf, name)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        (0..self.tables.len())
            .map(|table| match self.cf(table) {
                Ok(cf) => (
                    property(cf, "rocksdb.estimate-num-keys"),
                    property(cf, "rocksdb.estimate-live-data-size")
                        + property(cf, "rocksdb.cur-size-all-mem-tables"),
                ),
                Err(_) => (0, 0),
            })
            .collect()
    }

    /// A RocksDB checkpoint: flushes the memtables (writes skip the WAL),
    /// hard-links the live SST files and copies MANIFEST, CURRENT, OPTIONS.
    fn checkpoint(&mut self, dir: &Path, _tables: &[String]) -> Result<String, StateError> {
        let error = |e: rocksdb::Error| StateError::Open {
            dir: dir.to_path_buf(),
            message: format!("checkpoint: {e}"),
        };
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StateError::Open {
                dir: parent.to_path_buf(),
                message: e.to_string(),
            })?;
        }
        if dir.exists() {
            let _ = std::fs::remove_dir_all(dir);
        }
        rocksdb::checkpoint::Checkpoint::new(&self.db)
            .and_then(|c| c.create_checkpoint(dir))
            .map_err(error)?;
        Ok("rocksdb".to_string())
    }
}
