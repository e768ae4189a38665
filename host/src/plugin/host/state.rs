//! Host side of `weir:operator/state`: keyed value, list and map state of the
//! current key, and `select-record` for the batch form.

use super::{HostState, state_trap, trap};
use crate::plugin::bindings::weir::operator::state::Host;
use crate::state::StateKind;

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
