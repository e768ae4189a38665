//! [`WasmOperator`]: a dataflow [`Operator`] backed by one plugin instance.
//! It owns the instance's store (and through it the subtask's
//! [`TaskContext`]), sets the epoch deadline before every call, and turns
//! guest errors and traps into [`OperatorError`]s naming the call.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::Store;
use wasmtime::component::{Func, TypedFunc};

use super::bindings::{
    OperatorPlugin, WitBatchEntry, WitRecord, WitRecordBatch, WitTimeDomain, WitTimer,
};
use super::engine::{LoadedPlugin, ticks};
use super::host::{HostState, HostTrap};
use crate::dataflow::{FailureKind, FiredTimer, Operator, OperatorError, TaskContext, TimeDomain};
use crate::job::OperatorNode;
use crate::state::StateError;
use crate::types::{BatchEntry, RecordBatch};

/// What an operator export returns.
type CallResult = (Result<(), String>,);

/// `process-flat(input, data, entries)`.
type ProcessFlat<'a> = TypedFunc<(u32, &'a [u8], &'a [u32]), CallResult>;

pub struct WasmOperator {
    store: Store<HostState>,
    plugin: OperatorPlugin,
    /// The flat export's `process-flat`, when the plugin has it (and takes
    /// batches): used instead of `process-batch`.
    process_flat: Option<Func>,
    loaded: Arc<LoadedPlugin>,
    config: String,
    call_timeout: Duration,
    memory_bytes: u64,
}

impl WasmOperator {
    /// Instantiates the plugin for one subtask; `task` carries the subtask's
    /// keyed state (one table per declared state, in declaration order).
    pub fn instantiate(
        loaded: Arc<LoadedPlugin>,
        task: TaskContext,
        node: &OperatorNode,
    ) -> Result<Self, OperatorError> {
        let states: Arc<[_]> = Arc::from(loaded.info.states.clone());
        let host = HostState::new(task, states, &node.limits, &node.wasi);
        let mut store = Store::new(&loaded.engine, host);
        store.limiter(|state| &mut state.limits);
        store.set_epoch_deadline(ticks(node.limits.call_timeout));
        let failed = |e| {
            classify(
                e,
                "instantiate",
                node.limits.call_timeout,
                node.limits.memory_bytes,
            )
        };
        let instance = loaded
            .pre
            .instance_pre()
            .instantiate(&mut store)
            .map_err(failed)?;
        let plugin = OperatorPlugin::new(&mut store, &instance).map_err(failed)?;
        let process_flat = match loaded.flat.filter(|_| loaded.info.batch_input) {
            Some(index) => {
                let func = instance.get_func(&mut store, index).ok_or_else(|| {
                    OperatorError::new(FailureKind::Trap, "the flat export has no process-flat")
                })?;
                // Checked once here, so calls can skip the check.
                func.typed::<(u32, &[u8], &[u32]), CallResult>(&store)
                    .map_err(|e| {
                        OperatorError::new(
                            FailureKind::Trap,
                            format!(
                                "plugin `{}`: its {} export has the wrong type: {e:#}",
                                loaded.info.name,
                                super::flat::FLAT_INTERFACE
                            ),
                        )
                    })?;
                Some(func)
            }
            None => None,
        };
        Ok(Self {
            store,
            plugin,
            process_flat,
            loaded,
            config: node.config.clone(),
            call_timeout: node.limits.call_timeout,
            memory_bytes: node.limits.memory_bytes,
        })
    }

    pub fn plugin(&self) -> &LoadedPlugin {
        &self.loaded
    }

    /// Runs one export call under the epoch deadline. Callers run inside
    /// [`in_place`].
    fn call<R>(
        &mut self,
        what: &str,
        f: impl FnOnce(&OperatorPlugin, &mut Store<HostState>) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, OperatorError> {
        self.store.set_epoch_deadline(ticks(self.call_timeout));
        let plugin = &self.plugin;
        let store = &mut self.store;
        let result = f(plugin, store);
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(message)) => Err(OperatorError::new(
                FailureKind::Plugin,
                format!(
                    "plugin `{}` returned an error from {what}: {message}",
                    self.loaded.info.name
                ),
            )),
            Err(error) => Err(classify(error, what, self.call_timeout, self.memory_bytes)),
        }
    }
}

/// Runs Wasm calls in `block_in_place` on a multi-threaded runtime: WASI's
/// synchronous imports block on tokio internally, which the runtime allows
/// only outside it. A Wasm operator's chain runs on a thread of its own
/// (`dataflow::chain_thread`), where this only marks the thread as outside
/// the runtime for the call; on a worker thread (should an operator be
/// called there) it would hand the worker's core to another thread.
fn in_place<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Names what went wrong in a call that trapped.
fn classify(
    error: wasmtime::Error,
    what: &str,
    call_timeout: Duration,
    memory_bytes: u64,
) -> OperatorError {
    if let Some(host_trap) = error.downcast_ref::<HostTrap>() {
        return OperatorError::new(
            FailureKind::Trap,
            format!("plugin misused the host API in {what}: {host_trap}"),
        );
    }
    if let Some(state_error) = error.downcast_ref::<StateError>() {
        return OperatorError::new(
            FailureKind::State,
            format!("keyed state failed in {what}: {state_error}"),
        );
    }
    if let Some(wasmtime::Trap::Interrupt) = error.downcast_ref::<wasmtime::Trap>() {
        return OperatorError::new(
            FailureKind::Timeout,
            format!(
                "call to {what} ran longer than the call timeout of {} and was stopped (epoch deadline)",
                crate::human::duration(call_timeout)
            ),
        );
    }
    let detail = format!("{error:?}");
    if detail.contains("forcing trap when growing memory") {
        return OperatorError::new(
            FailureKind::Memory,
            format!(
                "plugin exceeded its memory limit of {} in {what}",
                crate::human::bytes(memory_bytes)
            ),
        );
    }
    // The trap itself (e.g. "wasm `unreachable` instruction executed"),
    // not the guest backtrace wasmtime wraps it in: that goes to the log.
    let cause = match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap
            .to_string()
            .trim_start_matches("wasm trap: ")
            .to_string(),
        None => error.root_cause().to_string(),
    };
    tracing::debug!(%what, "plugin trapped: {error:?}");
    OperatorError::new(
        FailureKind::Trap,
        format!("plugin trapped in {what}: {cause}"),
    )
}

impl WasmOperator {
    fn open_inner(&mut self) -> Result<(), OperatorError> {
        let config = self.config.clone();
        self.call("open", |plugin, store| {
            plugin.weir_operator_operator().call_open(store, &config)
        })
    }

    /// Makes `batch` the one `select-record` picks from, with no record
    /// selected yet.
    fn make_current(&mut self, batch: Arc<RecordBatch>) {
        let task = &mut self.store.data_mut().task;
        task.state.tick(task.watermark);
        if task.state.has_ttl()
            && let Some(newest) = batch.max_timestamp()
        {
            // Event-time writes the plugin hands back for the whole batch
            // at once are stamped with its newest record's time.
            task.state.stamp_event_time(newest.max(task.watermark));
        }
        task.current_batch = batch;
        task.current_key = None;
        task.current_timestamp = None;
    }

    fn process_batch_inner(&mut self, input: u32, batch: RecordBatch) -> Result<(), OperatorError> {
        if let Some(func) = self.process_flat {
            // The batch goes into the task (for `select-record`) and its
            // bytes, shared, to the call.
            let batch = Arc::new(batch);
            self.make_current(batch.clone());
            let entries = BatchEntry::as_words(batch.entries());
            let result = self.call("process-flat", |_, store| {
                // SAFETY: `func`'s type was checked against this one when
                // the operator was instantiated.
                let typed: ProcessFlat<'_> = unsafe { TypedFunc::new_unchecked(func) };
                typed
                    .call(store, (input, batch.data(), entries))
                    .map(|(result,)| result)
            });
            self.store.data_mut().task.current_key = None;
            return result;
        }
        if self.loaded.info.batch_input {
            let wit = WitRecordBatch {
                data: batch.data().to_vec(),
                entries: batch
                    .entries()
                    .iter()
                    .map(|e| WitBatchEntry {
                        key_offset: e.key_offset,
                        key_length: e.key_length,
                        value_offset: e.value_offset,
                        value_length: e.value_length,
                        timestamp: e.timestamp().unwrap_or(0),
                        has_timestamp: e.timestamp().is_some(),
                    })
                    .collect(),
            };
            self.make_current(Arc::new(batch));
            let result = self.call("process-batch", |plugin, store| {
                plugin
                    .weir_operator_operator()
                    .call_process_batch(store, input, &wit)
            });
            self.store.data_mut().task.current_key = None;
            result
        } else {
            let records: Vec<WitRecord> = batch
                .iter()
                .map(|r| WitRecord {
                    key: r.key.map(<[u8]>::to_vec),
                    value: r.value.to_vec(),
                    timestamp: r.timestamp,
                })
                .collect();
            self.make_current(Arc::new(batch));
            for (index, record) in records.iter().enumerate() {
                self.store.data_mut().task.select_record(index);
                self.call("process", |plugin, store| {
                    plugin
                        .weir_operator_operator()
                        .call_process(store, input, record)
                })?;
            }
            self.store.data_mut().task.current_key = None;
            Ok(())
        }
    }

    fn on_timer_inner(&mut self, timer: &FiredTimer) -> Result<(), OperatorError> {
        let wit = WitTimer {
            domain: match timer.domain {
                TimeDomain::EventTime => WitTimeDomain::EventTime,
                TimeDomain::ProcessingTime => WitTimeDomain::ProcessingTime,
            },
            timestamp: timer.timestamp,
            key: Some(timer.key.clone()),
        };
        let task = &mut self.store.data_mut().task;
        task.state.tick(task.watermark);
        let result = self.call("on-timer", |plugin, store| {
            plugin.weir_operator_operator().call_on_timer(store, &wit)
        });
        self.store.data_mut().task.current_key = None;
        result
    }

    fn close_inner(&mut self) -> Result<(), OperatorError> {
        self.call("close", |plugin, store| {
            plugin.weir_operator_operator().call_close(store)
        })
    }
}

impl Operator for WasmOperator {
    fn task(&mut self) -> &mut TaskContext {
        &mut self.store.data_mut().task
    }

    fn open(&mut self) -> Result<(), OperatorError> {
        in_place(|| self.open_inner())
    }

    fn process_batch(&mut self, input: u32, batch: RecordBatch) -> Result<(), OperatorError> {
        in_place(|| self.process_batch_inner(input, batch))
    }

    fn on_timer(&mut self, timer: &FiredTimer) -> Result<(), OperatorError> {
        in_place(|| self.on_timer_inner(timer))
    }

    fn close(&mut self) -> Result<(), OperatorError> {
        in_place(|| self.close_inner())
    }

    fn blocks_on_runtime(&self) -> bool {
        true
    }
}
