//! Value state read and written once per batch: during `process-flat` the
//! first `get`, `set` or `clear` of a value state fetches that state for
//! every record of the batch in one host call (`value-read-batch`); reads
//! and writes then stay in the guest, records of one key sharing a slot (so
//! they see each other's writes, as with per-record calls), and what
//! changed goes back in one call (`value-write-batch`) before the batch
//! returns. A state that the previous batch used for fewer than half of
//! its records is not fetched whole: it takes the per-record calls, which
//! read only the keys used.

use std::cell::RefCell;

use crate::Error;
use crate::bindings::weir::operator::state as host;

/// "None" in the batched calls' words: no key, no value, clear.
const NONE: u32 = u32::MAX;

#[derive(Default)]
struct StateBatch {
    /// This batch's read (data, three words a record), once fetched.
    read: Option<(Vec<u8>, Vec<u32>)>,
    /// Written in this batch, by slot: `Some(None)` is a clear.
    written: Vec<Option<Option<Vec<u8>>>>,
    /// Slots written, in first-write order.
    dirty: Vec<u32>,
    /// Calls on the state in this batch.
    used: usize,
    /// Whether this batch fetches it whole (decided by the last batch).
    fetch: bool,
}

#[derive(Default)]
struct Batched {
    /// Inside `process-flat`: the batch's record count.
    records: Option<usize>,
    /// Declared state names, in declaration order (their indexes).
    names: Vec<String>,
    states: Vec<StateBatch>,
}

thread_local! {
    static BATCHED: RefCell<Batched> = RefCell::new(Batched::default());
}

/// The operator opened: its declared states, in order.
pub(crate) fn declare(names: Vec<String>) {
    BATCHED.with_borrow_mut(|batched| {
        batched.states = names
            .iter()
            .map(|_| StateBatch {
                fetch: true,
                ..StateBatch::default()
            })
            .collect();
        batched.names = names;
        batched.records = None;
    });
}

/// A flat batch of `records` starts.
pub(crate) fn begin(records: usize) {
    BATCHED.with_borrow_mut(|batched| batched.records = Some(records));
}

/// The batch ends: what changed goes back to the host (unless `keep` is
/// false: the batch failed), and each state's way for the next batch is
/// chosen from how much of this one used it.
pub(crate) fn end(keep: bool) {
    BATCHED.with_borrow_mut(|batched| {
        let records = batched.records.take().unwrap_or(0);
        for (index, state) in batched.states.iter_mut().enumerate() {
            if keep && !state.dirty.is_empty() {
                let mut data = Vec::new();
                let mut writes = Vec::with_capacity(state.dirty.len() * 3);
                for &slot in &state.dirty {
                    match state.written[slot as usize].take().flatten() {
                        Some(value) => {
                            writes.extend_from_slice(&[
                                slot,
                                data.len() as u32,
                                value.len() as u32,
                            ]);
                            data.extend_from_slice(&value);
                        }
                        None => writes.extend_from_slice(&[slot, 0, NONE]),
                    }
                }
                host::value_write_batch(index as u32, &data, &writes);
            }
            if state.used > 0 {
                state.fetch = state.used * 2 >= records;
            }
            state.read = None;
            state.written.clear();
            state.dirty.clear();
            state.used = 0;
        }
    });
}

/// What a batched call found: the state is not batched now (use the
/// per-record call), or the call's result.
pub(crate) enum Outcome<T> {
    PerRecord,
    Done(Result<T, Error>),
}

/// Runs `f` on the current record's slot of value state `name` in this
/// batch: (the batch's read, the slot's writes, the record's words).
fn with_slot<T>(
    name: &str,
    f: impl FnOnce(&mut StateBatch, usize, u32) -> Result<T, Error>,
) -> Outcome<T> {
    let Some(index) = crate::cursor::current() else {
        return Outcome::PerRecord;
    };
    BATCHED.with_borrow_mut(|batched| {
        let Some(records) = batched.records else {
            return Outcome::PerRecord;
        };
        let Some(position) = batched.names.iter().position(|n| n == name) else {
            return Outcome::PerRecord;
        };
        let state = &mut batched.states[position];
        state.used += 1;
        if !state.fetch {
            return Outcome::PerRecord;
        }
        if state.read.is_none() {
            state.read = Some(host::value_read_batch(position as u32));
            state.written.resize(records, None);
        }
        let words = &state.read.as_ref().expect("fetched").1;
        let Some(&slot) = words.get(index as usize * 3) else {
            return Outcome::Done(Err(Error::msg(format_args!(
                "state `{name}`: record {index} is outside the batch"
            ))));
        };
        if slot == NONE {
            // No key: the per-record call fails the way it always has.
            return Outcome::PerRecord;
        }
        Outcome::Done(f(state, index as usize, slot))
    })
}

/// The current record's value of state `name`, handed to `read`.
pub(crate) fn get<T>(
    name: &str,
    read: impl FnOnce(Option<&[u8]>) -> Result<T, Error>,
) -> Outcome<T> {
    with_slot(name, |state, index, slot| {
        if let Some(written) = &state.written[slot as usize] {
            return read(written.as_deref());
        }
        let (data, words) = state.read.as_ref().expect("fetched");
        let (offset, length) = (words[index * 3 + 1] as usize, words[index * 3 + 2]);
        if length == NONE {
            return read(None);
        }
        let value = data.get(offset..offset + length as usize).ok_or_else(|| {
            Error::msg(format_args!(
                "state `{name}`: the host's batch read is malformed"
            ))
        })?;
        read(Some(value))
    })
}

/// Sets (`Some`) or clears (`None`) the current record's value of `name`;
/// hands `value` back when the state is not batched now.
pub(crate) fn put(name: &str, value: Option<Vec<u8>>) -> Result<(), Option<Vec<u8>>> {
    let mut value = Some(value);
    let outcome = with_slot(name, |state, _, slot| {
        let written = &mut state.written[slot as usize];
        if written.is_none() {
            state.dirty.push(slot);
        }
        *written = value.take();
        Ok(())
    });
    match outcome {
        Outcome::Done(_) => Ok(()),
        Outcome::PerRecord => Err(value.take().flatten()),
    }
}
