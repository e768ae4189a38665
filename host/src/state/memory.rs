//! In-memory [`StateBackend`]: ordered maps, for tests and small jobs.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use super::{CellVisitor, StateBackend, StateError, TableId, WriteOp};

/// One table: (key group, key) -> encoded cell.
type Table = BTreeMap<(u16, Vec<u8>), Vec<u8>>;

#[derive(Debug, Default)]
pub struct MemoryBackend {
    tables: Vec<Table>,
    /// Bytes of keys and cells per table.
    bytes: Vec<u64>,
}

impl MemoryBackend {
    pub fn new(tables: usize) -> Self {
        Self {
            tables: (0..tables).map(|_| BTreeMap::new()).collect(),
            bytes: vec![0; tables],
        }
    }
}

impl StateBackend for MemoryBackend {
    fn get(
        &self,
        table: TableId,
        key_group: u16,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.tables[table].get(&(key_group, key.to_vec())).cloned())
    }

    fn write(&mut self, ops: Vec<WriteOp>) -> Result<(), StateError> {
        for op in ops {
            match op {
                WriteOp::Put {
                    table,
                    key_group,
                    key,
                    value,
                } => {
                    let (key_len, value_len) = (key.len() as u64, value.len() as u64);
                    let bytes = &mut self.bytes[table];
                    match self.tables[table].insert((key_group, key), value) {
                        // The key was there: only the cell changed.
                        Some(old) => *bytes = (*bytes + value_len).saturating_sub(old.len() as u64),
                        None => *bytes += key_len + value_len,
                    }
                }
                WriteOp::Delete {
                    table,
                    key_group,
                    key,
                } => {
                    let len = key.len() as u64;
                    if let Some(old) = self.tables[table].remove(&(key_group, key)) {
                        let bytes = &mut self.bytes[table];
                        *bytes = bytes.saturating_sub(len + old.len() as u64);
                    }
                }
            }
        }
        Ok(())
    }

    fn scan(
        &self,
        table: TableId,
        groups: Range<u32>,
        visit: &mut CellVisitor<'_>,
    ) -> Result<(), StateError> {
        for ((group, key), value) in &self.tables[table] {
            if groups.contains(&u32::from(*group)) {
                visit(*group, key, value);
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".to_string()
    }

    fn table_sizes(&self) -> Vec<(u64, u64)> {
        self.tables
            .iter()
            .zip(&self.bytes)
            .map(|(table, bytes)| (table.len() as u64, *bytes))
            .collect()
    }

    fn checkpoint(&mut self, dir: &Path, tables: &[String]) -> Result<String, StateError> {
        std::fs::create_dir_all(dir).map_err(|e| StateError::Open {
            dir: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut dump = super::dump::DumpBuffer::new(tables);
        for (index, table) in self.tables.iter().enumerate() {
            for ((group, key), value) in table {
                dump.push(index as u32, *group, key, Some(value));
            }
        }
        dump.write_to(&dir.join(super::dump::DUMP_FILE))?;
        Ok("memory".to_string())
    }
}
