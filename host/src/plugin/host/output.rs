//! Host side of `weir:operator/output`: records the plugin emits go to the
//! subtask's collector (main output or a named side output).

use super::{HostState, trap};
use crate::plugin::bindings::weir::operator::output::Host;
use crate::plugin::bindings::{WitRecord, WitRecordBatch};
use crate::types::{BatchEntry, RecordBatch, RecordRef};

impl Host for HostState {
    fn emit(&mut self, record: WitRecord) -> wasmtime::Result<()> {
        self.task
            .output
            .emit(None, record_ref(&record))
            .map_err(|e| trap(e.message))
    }

    fn emit_to(&mut self, side_output: String, record: WitRecord) -> wasmtime::Result<()> {
        self.task
            .output
            .emit(Some(&side_output), record_ref(&record))
            .map_err(|e| trap(e.message))
    }

    fn emit_batch(&mut self, batch: WitRecordBatch) -> wasmtime::Result<()> {
        let entries = batch
            .entries
            .iter()
            .map(|e| {
                BatchEntry::new(
                    e.key_offset,
                    e.key_length,
                    e.value_offset,
                    e.value_length,
                    e.has_timestamp.then_some(e.timestamp),
                )
            })
            .collect();
        self.emit_parts("emit-batch", batch.data, Ok(entries))
    }

    fn emit_flat(&mut self, data: Vec<u8>, entries: Vec<u32>) -> wasmtime::Result<()> {
        self.emit_parts(
            "emit-flat",
            data,
            BatchEntry::from_words(&entries).map(<[_]>::to_vec),
        )
    }
}

impl HostState {
    /// Emits the records of a batch a plugin handed over through `call`,
    /// once its entries are checked against its data.
    fn emit_parts(
        &mut self,
        call: &str,
        data: Vec<u8>,
        entries: Result<Vec<BatchEntry>, String>,
    ) -> wasmtime::Result<()> {
        let batch = entries
            .and_then(|entries| RecordBatch::from_parts(data, entries))
            .map_err(|message| trap(format!("{call}: {message}")))?;
        self.task
            .output
            .emit_batch(batch)
            .map_err(|e| trap(e.message))
    }
}

fn record_ref(record: &WitRecord) -> RecordRef<'_> {
    RecordRef {
        key: record.key.as_deref(),
        value: &record.value,
        timestamp: record.timestamp,
    }
}
