//! The batch cursor: which entry of the batch being processed the host scopes
//! keyed calls (state, timers) to. It is selected lazily, right before the
//! first keyed call for a record, so an operator that uses no state or timers
//! pays no host call per record.

use std::cell::Cell;

use crate::bindings::weir::operator::state::select_record;

thread_local! {
    /// The entry being processed, if keyed calls must select it first.
    static WANTED: Cell<Option<u32>> = const { Cell::new(None) };
    /// The entry the host currently has selected.
    static SELECTED: Cell<Option<u32>> = const { Cell::new(None) };
}

/// A new batch starts: the host has no record selected.
pub(crate) fn begin_batch() {
    WANTED.set(None);
    SELECTED.set(None);
}

/// Entry `index` of the batch is being processed.
pub(crate) fn want(index: u32) {
    WANTED.set(Some(index));
}

/// The batch entry being processed, if in a batch.
pub(crate) fn current() -> Option<u32> {
    WANTED.get()
}

/// Outside a batch (per-record calls, timers) the host scopes calls itself.
pub(crate) fn end_batch() {
    begin_batch();
}

/// Makes the host's current record the one being processed. Called before
/// every keyed import.
pub(crate) fn sync() {
    if let Some(wanted) = WANTED.get()
        && SELECTED.get() != Some(wanted)
    {
        select_record(wanted);
        SELECTED.set(Some(wanted));
    }
}
