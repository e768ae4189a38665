//! Value state read and written once per batch: during `process-flat` the
//! first `get`, `set` or `clear` of a value state fetches that state for
//! every record of the batch in one host call (`value-read-batch`); reads
//! and writes then stay in the guest, records of one key sharing a slot (so
//! they see each other's writes, as with per-record calls), and what
//! changed goes back in one call (`value-write-batch`) before the batch
//! returns. A state that the previous batch used for fewer than half of
//! its records is not fetched whole: it takes the per-record calls, which
//! read only the keys used.

use std::cell::{Cell, RefCell};

use crate::Error;
use crate::bindings::weir::operator::state as host;

/// "None" in the batched calls' words: no key, no value, clear.
const NONE: u32 = u32::MAX;

/// A slot's write in this batch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Written {
    Not,
    Cleared,
    /// Offset and length in the state's `arena`.
    Value(u32, u32),
}

#[derive(Default)]
struct StateBatch {
    /// This batch's read (data, three words a record), once fetched.
    read: Option<(Vec<u8>, Vec<u32>)>,
    /// Values written in this batch, back to back (what goes to the host).
    arena: Vec<u8>,
    /// Written in this batch, by slot.
    written: Vec<Written>,
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
                let mut writes = Vec::with_capacity(state.dirty.len() * 3);
                for &slot in &state.dirty {
                    match state.written[slot as usize] {
                        Written::Value(offset, length) => {
                            writes.extend_from_slice(&[slot, offset, length])
                        }
                        _ => writes.extend_from_slice(&[slot, 0, NONE]),
                    }
                }
                host::value_write_batch(index as u32, &state.arena, &writes);
            }
            if state.used > 0 {
                state.fetch = state.used * 2 >= records;
            }
            state.read = None;
            state.arena.clear();
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
/// `hint`: the handle's remembered index of `name` among the declared
/// states (`u32::MAX` until found; the declared states do not change while
/// the operator is open).
fn with_slot<T>(
    name: &str,
    hint: &Cell<u32>,
    f: impl FnOnce(&mut StateBatch, usize, u32) -> Result<T, Error>,
) -> Outcome<T> {
    let Some(index) = crate::cursor::current() else {
        return Outcome::PerRecord;
    };
    BATCHED.with_borrow_mut(|batched| {
        let Some(records) = batched.records else {
            return Outcome::PerRecord;
        };
        let position = match hint.get() as usize {
            known if known < batched.names.len() => known,
            _ => match batched.names.iter().position(|n| n == name) {
                Some(found) => {
                    hint.set(found as u32);
                    found
                }
                None => return Outcome::PerRecord,
            },
        };
        let state = &mut batched.states[position];
        state.used += 1;
        if !state.fetch {
            return Outcome::PerRecord;
        }
        if state.read.is_none() {
            state.read = Some(host::value_read_batch(position as u32));
            state.written.resize(records, Written::Not);
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
    hint: &Cell<u32>,
    read: impl FnOnce(Option<&[u8]>) -> Result<T, Error>,
) -> Outcome<T> {
    with_slot(name, hint, |state, index, slot| {
        match state.written[slot as usize] {
            Written::Not => {}
            Written::Cleared => return read(None),
            Written::Value(offset, length) => {
                return read(Some(
                    &state.arena[offset as usize..(offset + length) as usize],
                ));
            }
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

/// Sets the current record's value of `name` to what `encode` appends to
/// the buffer it is given.
pub(crate) fn set(
    name: &str,
    hint: &Cell<u32>,
    encode: impl FnOnce(&mut Vec<u8>) -> Result<(), Error>,
) -> Outcome<()> {
    with_slot(name, hint, |state, _, slot| {
        let offset = state.arena.len();
        if let Err(error) = encode(&mut state.arena) {
            state.arena.truncate(offset);
            return Err(error);
        }
        let length = state.arena.len() - offset;
        write(state, slot, Written::Value(offset as u32, length as u32));
        Ok(())
    })
}

/// Clears the current record's value of `name`.
pub(crate) fn clear(name: &str, hint: &Cell<u32>) -> Outcome<()> {
    with_slot(name, hint, |state, _, slot| {
        write(state, slot, Written::Cleared);
        Ok(())
    })
}

fn write(state: &mut StateBatch, slot: u32, written: Written) {
    let entry = &mut state.written[slot as usize];
    if *entry == Written::Not {
        state.dirty.push(slot);
    }
    *entry = written;
}
