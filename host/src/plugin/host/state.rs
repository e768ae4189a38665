//! Host side of `weir:operator/state`: keyed value, list and map state of the
//! current key, and `select-record` for the batch form.

use super::{HostState, state_trap, trap};
use crate::plugin::bindings::weir::operator::state::Host;
use crate::state::StateKind;

/// "None" in the batched calls' words: no key, no value, clear.
const NONE: u32 = u32::MAX;

impl Host for HostState {
    fn select_record(&mut self, index: u32) -> wasmtime::Result<()> {
        if self.task.select_record(index as usize) {
            Ok(())
        } else {
            Err(trap(format!(
                "select-record({index}) is outside the batch of {} records",
                self.task.current_batch.len()
            )))
        }
    }

    fn value_read_batch(&mut self, state: u32) -> wasmtime::Result<(Vec<u8>, Vec<u32>)> {
        let table = self.table_at(state, StateKind::Value)?;
        let task = &mut self.task;
        let batch = &task.current_batch;
        let mut data = Vec::new();
        let mut words = Vec::with_capacity(batch.len() * 3);
        let mut slots: hashbrown::HashMap<&[u8], u32> =
            hashbrown::HashMap::with_capacity(batch.len());
        for (index, record) in batch.iter().enumerate() {
            let Some(key) = record.key else {
                words.extend_from_slice(&[NONE, 0, NONE]);
                continue;
            };
            let index = index as u32;
            let slot = *slots.entry(key).or_insert(index);
            if slot != index {
                let first = slot as usize * 3;
                let (offset, length) = (words[first + 1], words[first + 2]);
                words.extend_from_slice(&[slot, offset, length]);
                continue;
            }
            let offset = u32::try_from(data.len()).map_err(|_| {
                trap("value-read-batch: the batch's values exceed 4 GiB".to_string())
            })?;
            let length = match task.state.value_ref(table, key).map_err(state_trap)? {
                Some(value) => {
                    data.extend_from_slice(value);
                    value.len() as u32
                }
                None => NONE,
            };
            words.extend_from_slice(&[slot, offset, length]);
        }
        Ok((data, words))
    }

    fn value_write_batch(
        &mut self,
        state: u32,
        data: Vec<u8>,
        writes: Vec<u32>,
    ) -> wasmtime::Result<()> {
        let table = self.table_at(state, StateKind::Value)?;
        if !writes.len().is_multiple_of(3) {
            return Err(trap(format!(
                "value-write-batch: {} words is not a multiple of 3",
                writes.len()
            )));
        }
        let task = &mut self.task;
        for write in writes.chunks_exact(3) {
            let (slot, offset, length) = (write[0], write[1], write[2]);
            let key = task
                .current_batch
                .get(slot as usize)
                .and_then(|record| record.key)
                .ok_or_else(|| {
                    trap(format!(
                        "value-write-batch: slot {slot} is no keyed record of the batch of {}",
                        task.current_batch.len()
                    ))
                })?;
            if length == NONE {
                task.state.clear(table, key).map_err(state_trap)?;
                continue;
            }
            let value = (offset as usize)
                .checked_add(length as usize)
                .and_then(|end| data.get(offset as usize..end))
                .ok_or_else(|| {
                    trap(format!(
                        "value-write-batch: value {offset}+{length} exceeds the {} data bytes",
                        data.len()
                    ))
                })?;
            task.state
                .value_set_from(table, key, value)
                .map_err(state_trap)?;
        }
        Ok(())
    }

    fn value_get(&mut self, state: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let (keyed, key, table) = self.keyed(&state, StateKind::Value)?;
        keyed.value_get(table, key).map_err(state_trap)
    }

    fn value_set(&mut self, state: String, value: Vec<u8>) -> wasmtime::Result<()> {
        let (keyed, key, table) = self.keyed(&state, StateKind::Value)?;
        keyed.value_set(table, key, value).map_err(state_trap)
    }

    fn value_clear(&mut self, state: String) -> wasmtime::Result<()> {
        let (keyed, key, table) = self.keyed(&state, StateKind::Value)?;
        keyed.clear(table, key).map_err(state_trap)
    }

    fn list_get(&mut self, state: String) -> wasmtime::Result<Vec<Vec<u8>>> {
        let (keyed, key, table) = self.keyed(&state, StateKind::List)?;
        keyed.list_get(table, key).map_err(state_trap)
    }

    fn list_add(&mut self, state: String, value: Vec<u8>) -> wasmtime::Result<()> {
        let (keyed, key, table) = self.keyed(&state, StateKind::List)?;
        keyed.list_add(table, key, value).map_err(state_trap)
    }

    fn list_update(&mut self, state: String, values: Vec<Vec<u8>>) -> wasmtime::Result<()> {
        let (keyed, key, table) = self.keyed(&state, StateKind::List)?;
        keyed.list_update(table, key, values).map_err(state_trap)
    }

    fn list_clear(&mut self, state: String) -> wasmtime::Result<()> {
        let (keyed, key, table) = self.keyed(&state, StateKind::List)?;
        keyed.clear(table, key).map_err(state_trap)
    }

    fn map_get(&mut self, state: String, map_key: Vec<u8>) -> wasmtime::Result<Option<Vec<u8>>> {
        let (keyed, key, table) = self.keyed(&state, StateKind::Map)?;
        keyed.map_get(table, key, &map_key).map_err(state_trap)
    }

    fn map_put(&mut self, state: String, map_key: Vec<u8>, value: Vec<u8>) -> wasmtime::Result<()> {
        let (keyed, key, table) = self.keyed(&state, StateKind::Map)?;
        keyed
            .map_put(table, key, map_key, value)
            .map_err(state_trap)
    }

    fn map_remove(&mut self, state: String, map_key: Vec<u8>) -> wasmtime::Result<()> {
        let (keyed, key, table) = self.keyed(&state, StateKind::Map)?;
        keyed.map_remove(table, key, &map_key).map_err(state_trap)
    }

    fn map_contains(&mut self, state: String, map_key: Vec<u8>) -> wasmtime::Result<bool> {
        let (keyed, key, table) = self.keyed(&state, StateKind::Map)?;
        keyed.map_contains(table, key, &map_key).map_err(state_trap)
    }

    fn map_entries(&mut self, state: String) -> wasmtime::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let (keyed, key, table) = self.keyed(&state, StateKind::Map)?;
        keyed.map_entries(table, key).map_err(state_trap)
    }

    fn map_keys(&mut self, state: String) -> wasmtime::Result<Vec<Vec<u8>>> {
        let (keyed, key, table) = self.keyed(&state, StateKind::Map)?;
        keyed.map_keys(table, key).map_err(state_trap)
    }

    fn map_clear(&mut self, state: String) -> wasmtime::Result<()> {
        let (keyed, key, table) = self.keyed(&state, StateKind::Map)?;
        keyed.clear(table, key).map_err(state_trap)
    }
}
