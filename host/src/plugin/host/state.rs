//! Host side of `weir:operator/state`: keyed value, list and map state of the
//! current key, and `select-record` for the batch form.

use super::{HostState, state_trap, trap};
use crate::plugin::bindings::WitTimeDomain;
use crate::plugin::bindings::weir::operator::state::{Host, TtlUpdate};
use crate::state::StateKind;
use crate::state::ttl::{self, StateTtl};

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

    fn declare_ttl(
        &mut self,
        state: String,
        millis: u64,
        update: TtlUpdate,
        domain: WitTimeDomain,
    ) -> wasmtime::Result<()> {
        let Some(declared) = self.ttl_declarations.as_mut() else {
            return Err(trap(format!(
                "declare-ttl (state `{state}`) may only be called from `describe`"
            )));
        };
        if millis == 0 {
            return Err(trap(format!(
                "declare-ttl: state `{state}` is given a TTL of zero"
            )));
        }
        let ttl = StateTtl {
            millis,
            update: match update {
                TtlUpdate::OnCreateAndWrite => ttl::TtlUpdate::OnCreateAndWrite,
                TtlUpdate::OnReadAndWrite => ttl::TtlUpdate::OnReadAndWrite,
            },
            time: match domain {
                WitTimeDomain::ProcessingTime => ttl::TtlTime::Processing,
                WitTimeDomain::EventTime => ttl::TtlTime::Event,
            },
        };
        declared.push((state, ttl));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::dataflow::output::Collector;
    use crate::dataflow::{TaskContext, TaskInfo};
    use crate::job::Limits;
    use crate::state::memory::MemoryBackend;
    use crate::state::{KeyedState, StateDescriptor};
    use crate::types::RecordBatch;

    fn host() -> HostState {
        let info = TaskInfo {
            job: Arc::from("test"),
            uid: Arc::from("count"),
            subtask: 0,
            parallelism: 1,
            max_parallelism: 128,
        };
        let tables = vec![
            ("count/count".to_string(), StateKind::Value),
            ("count/seen".to_string(), StateKind::List),
        ];
        let state = KeyedState::new(tables, Box::new(MemoryBackend::new(2)), 128, 1);
        let task = TaskContext::new(info, state, Collector::new(Vec::new(), 128, 1 << 20));
        let states: Arc<[StateDescriptor]> = Arc::from(vec![
            StateDescriptor {
                name: "count".into(),
                kind: StateKind::Value,
                schema_version: 1,
                ttl: None,
            },
            StateDescriptor {
                name: "seen".into(),
                kind: StateKind::List,
                schema_version: 1,
                ttl: None,
            },
        ]);
        HostState::new(task, states, &Limits::default(), &[])
    }

    fn batch(keys: &[Option<&[u8]>]) -> Arc<RecordBatch> {
        let mut batch = RecordBatch::new();
        for key in keys {
            batch.push(*key, b"v", None);
        }
        Arc::new(batch)
    }

    #[test]
    fn batched_value_state_shares_a_slot_per_key_and_writes_back_by_record() {
        let mut host = host();
        host.task.current_batch = batch(&[Some(b"a"), Some(b"b"), Some(b"a"), None]);
        let (data, words) = host.value_read_batch(0).expect("reads");
        assert!(data.is_empty());
        assert_eq!(
            words,
            [0, 0, NONE, 1, 0, NONE, 0, 0, NONE, NONE, 0, NONE],
            "records 0 and 2 share slot 0; record 3 has no key"
        );
        // "a" := 12, "b" cleared.
        host.value_write_batch(0, b"12".to_vec(), vec![0, 0, 2, 1, 0, NONE])
            .expect("writes");
        host.task.current_batch = batch(&[Some(b"b"), Some(b"a")]);
        let (data, words) = host.value_read_batch(0).expect("reads");
        assert_eq!(words, [0, 0, NONE, 1, 0, 2]);
        assert_eq!(data, b"12");
        // Per-record calls see the same cell.
        host.task.select_record(1);
        assert_eq!(
            host.value_get("count".into()).expect("gets"),
            Some(b"12".to_vec())
        );
    }

    #[test]
    fn malformed_batched_calls_trap_naming_what_is_wrong() {
        let mut host = host();
        host.task.current_batch = batch(&[Some(b"a"), None]);
        let message = |error: wasmtime::Error| error.to_string();
        let cases: [(u32, Vec<u8>, Vec<u32>, &str); 4] = [
            (0, Vec::new(), vec![0, 0], "not a multiple of 3"),
            (0, Vec::new(), vec![1, 0, 0], "slot 1 is no keyed record"),
            (0, Vec::new(), vec![7, 0, 0], "slot 7 is no keyed record"),
            (0, b"x".to_vec(), vec![0, 0, 2], "exceeds the 1 data bytes"),
        ];
        for (state, data, writes, expected) in cases {
            let error = message(
                host.value_write_batch(state, data, writes)
                    .expect_err("traps"),
            );
            assert!(error.contains(expected), "{error}");
        }
        let error = message(host.value_read_batch(1).expect_err("a list state"));
        assert!(error.contains("declared as list state"), "{error}");
        let error = message(host.value_read_batch(2).expect_err("no such state"));
        assert!(error.contains("state index 2 is not declared"), "{error}");
    }
}
