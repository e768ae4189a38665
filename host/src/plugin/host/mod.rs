//! The store data of a plugin instance ([`HostState`]) and the host side of
//! each WIT import, one file per interface: [`state`], [`timers`],
//! [`output`], [`log`].
//!
//! Host functions reach the subtask's [`TaskContext`] through the store;
//! every keyed call is scoped to `task.current_key`, which the operator sets
//! from the record or timer being processed. Misuse (an undeclared state, a
//! keyed call without a key) is a trap carrying a [`HostTrap`] message.

mod log;
mod output;
mod state;
mod timers;

use std::sync::Arc;

use wasmtime::StoreLimits;
use wasmtime::StoreLimitsBuilder;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::dataflow::{Collector, TaskContext, TaskInfo};
use crate::job::{Limits, WasiGrant};
use crate::plugin::engine::PluginEngine;
use crate::state::memory::MemoryBackend;
use crate::state::{KeyedState, StateDescriptor, StateKind, TableId};

/// A trap raised by the host because the guest misused an import.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct HostTrap(pub String);

pub(crate) fn trap(message: impl Into<String>) -> wasmtime::Error {
    wasmtime::Error::new(HostTrap(message.into()))
}

/// Everything a plugin instance's store holds.
pub struct HostState {
    pub task: TaskContext,
    /// Declared states; a state's index is its table id in `task.state`.
    states: Arc<[StateDescriptor]>,
    pub(crate) limits: StoreLimits,
    wasi: WasiCtx,
    table: ResourceTable,
    /// While `describe` runs: the TTLs the plugin declared (`declare-ttl`);
    /// None elsewhere (the call then traps).
    pub(crate) ttl_declarations: Option<Vec<(String, crate::state::ttl::StateTtl)>>,
}

impl HostState {
    pub fn new(
        task: TaskContext,
        states: Arc<[StateDescriptor]>,
        limits: &Limits,
        grants: &[WasiGrant],
    ) -> Self {
        Self {
            task,
            states,
            limits: store_limits(limits),
            wasi: PluginEngine::wasi_context(grants),
            table: ResourceTable::new(),
            ttl_declarations: None,
        }
    }

    /// A state with no task behind it, for reading a plugin's metadata.
    pub fn for_metadata(limits: Limits) -> Self {
        let info = TaskInfo {
            job: Arc::from("metadata"),
            uid: Arc::from("metadata"),
            subtask: 0,
            parallelism: 1,
            max_parallelism: 1,
        };
        let state = KeyedState::new(Vec::new(), Box::new(MemoryBackend::new(0)), 1, 1);
        let task = TaskContext::new(
            info,
            state,
            Collector::new(Vec::new(), 1, limits.max_record_bytes),
        );
        Self::new(task, Arc::from(Vec::new()), &limits, &[])
    }

    /// The table of a declared state of the expected kind, or a trap naming
    /// the state.
    fn table(&self, name: &str, kind: StateKind) -> wasmtime::Result<TableId> {
        let Some(index) = self.states.iter().position(|s| s.name == name) else {
            let declared: Vec<&str> = self.states.iter().map(|s| s.name.as_str()).collect();
            return Err(trap(format!(
                "state `{name}` is not declared in the plugin's metadata (declared: {declared:?})"
            )));
        };
        self.of_kind(index, kind)
    }

    /// The table of declared state number `index`, checked to be of `kind`.
    fn table_at(&self, index: u32, kind: StateKind) -> wasmtime::Result<TableId> {
        if index as usize >= self.states.len() {
            return Err(trap(format!(
                "state index {index} is not declared (the plugin declares {} states)",
                self.states.len()
            )));
        }
        self.of_kind(index as usize, kind)
    }

    /// Declared state `index` as a table, if it is of `kind`.
    fn of_kind(&self, index: usize, kind: StateKind) -> wasmtime::Result<TableId> {
        let state = &self.states[index];
        if state.kind != kind {
            return Err(trap(format!(
                "state `{}` is declared as {} state but used as {kind} state",
                state.name, state.kind
            )));
        }
        Ok(index)
    }

    /// The keyed state and the current key, or a trap if there is no key.
    fn keyed(
        &mut self,
        name: &str,
        kind: StateKind,
    ) -> wasmtime::Result<(&mut KeyedState, &[u8], TableId)> {
        let table = self.table(name, kind)?;
        let task = &mut self.task;
        let key = task.current_key.as_deref().ok_or_else(|| {
            trap(format!(
                "state `{name}` used without a current key (keyed state needs a keyed record or a timer; not open/close or unkeyed records)"
            ))
        })?;
        Ok((&mut task.state, key, table))
    }

    fn current_key(&self, what: &str) -> wasmtime::Result<&[u8]> {
        self.task.current_key.as_deref().ok_or_else(|| {
            trap(format!(
                "{what} needs a current key (a keyed record or a timer)"
            ))
        })
    }
}

fn store_limits(limits: &Limits) -> StoreLimits {
    StoreLimitsBuilder::new()
        .memory_size(limits.memory_bytes as usize)
        .trap_on_grow_failure(true)
        .instances(32)
        .tables(64)
        .memories(16)
        .build()
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl crate::plugin::bindings::weir::operator::types::Host for HostState {}

/// Maps a state-backend failure inside a host call to a trap that keeps the
/// [`crate::state::StateError`] for classification.
pub(crate) fn state_trap(error: crate::state::StateError) -> wasmtime::Error {
    wasmtime::Error::new(error)
}
