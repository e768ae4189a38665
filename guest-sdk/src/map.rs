//! [`MapInPlace`]: a stateless one-to-one map that rewrites each record's
//! value where it lies in the batch the host handed over, and hands the
//! same buffer back: no copy, decode or emit per record.

use crate::batch::{NO_KEY, WORDS};
use crate::{Config, Context, Error, Metadata, Operator, Record};

/// A stateless map that keeps every record's key, timestamp and value
/// length, and rewrites the value's bytes in place (ASCII case, masking,
/// fixed-width fields). Export it with
/// [`export_map_in_place!`](crate::export_map_in_place).
///
/// A batch crosses the boundary as two copies (in and out) and the SDK
/// calls [`map_in_place`](MapInPlace::map_in_place) on each value where it
/// lies: nothing is decoded, buffered or emitted per record. A map that
/// changes a value's length, drops records or uses state or timers is an
/// [`Operator`].
pub trait MapInPlace: Sized + 'static {
    /// The plugin's name and version. It declares no state.
    fn metadata() -> Metadata;

    /// Builds the map from the job's `config` table.
    fn open(config: &Config) -> Result<Self, Error>;

    /// Rewrites one record's `value` in place.
    fn map_in_place(&mut self, key: Option<&[u8]>, value: &mut [u8]) -> Result<(), Error>;
}

/// The [`Operator`] a [`MapInPlace`] runs as. Hosts that hand over records
/// one at a time (or as a `record-batch`) get the same output through
/// `process`, one copy per record.
#[doc(hidden)]
pub struct InPlace<M> {
    map: M,
    /// `process`'s copy of a value (allocation reused).
    scratch: Vec<u8>,
}

impl<M: MapInPlace> Operator for InPlace<M> {
    fn metadata() -> Metadata {
        M::metadata()
    }

    fn open(config: &Config) -> Result<Self, Error> {
        if !M::metadata().state_names().is_empty() {
            return Err(Error::msg(
                "a MapInPlace has no keyed state; declare states on an Operator instead",
            ));
        }
        Ok(Self {
            map: M::open(config)?,
            scratch: Vec::new(),
        })
    }

    fn process(&mut self, ctx: &mut Context, _input: u32, record: Record<'_>) -> Result<(), Error> {
        self.scratch.clear();
        self.scratch.extend_from_slice(record.value());
        self.map.map_in_place(record.key(), &mut self.scratch)?;
        ctx.emit(record.key(), &self.scratch);
        Ok(())
    }

    fn map_batch_in_place(
        &mut self,
        data: &mut [u8],
        entries: &[u32],
    ) -> Option<Result<(), Error>> {
        Some(map_batch(&mut self.map, data, entries))
    }
}

/// Calls `map` on the value of every record of a flat batch, where it lies
/// in `data`. It checks the entries itself rather than through
/// `batch::decode_flat`'s checks: sharing them (returning ranges) made the
/// map benchmark ~30% slower (0.37 s → 0.5 s for 10M records, session 11).
fn map_batch<M: MapInPlace>(map: &mut M, data: &mut [u8], entries: &[u32]) -> Result<(), Error> {
    // A key copied out of `data`: only when it overlaps its value (a
    // hand-built batch may share bytes; `&` and `&mut` must not alias).
    let mut key_copy = Vec::new();
    for (index, words) in entries.chunks_exact(WORDS).enumerate() {
        let (key_offset, key_length) = (words[0] as usize, words[1]);
        let (value_offset, value_length) = (words[2] as usize, words[3] as usize);
        let out_of_bounds = |what: &str, start: usize, length: usize| {
            Error::msg(format_args!(
                "malformed record batch: entry {index} {what} {start}+{length} exceeds data length {}",
                data.len()
            ))
        };
        let value_end = value_offset
            .checked_add(value_length)
            .filter(|&end| end <= data.len())
            .ok_or_else(|| out_of_bounds("value", value_offset, value_length))?;
        if key_length == NO_KEY {
            map.map_in_place(None, &mut data[value_offset..value_end])?;
            continue;
        }
        let key_end = key_offset
            .checked_add(key_length as usize)
            .filter(|&end| end <= data.len() && key_length <= i32::MAX as u32)
            .ok_or_else(|| out_of_bounds("key", key_offset, key_length as usize))?;
        if key_end <= value_offset {
            let (head, tail) = data.split_at_mut(value_offset);
            map.map_in_place(Some(&head[key_offset..key_end]), &mut tail[..value_length])?;
        } else if value_end <= key_offset {
            let (head, tail) = data.split_at_mut(key_offset);
            map.map_in_place(
                Some(&tail[..key_end - key_offset]),
                &mut head[value_offset..value_end],
            )?;
        } else {
            key_copy.clear();
            key_copy.extend_from_slice(&data[key_offset..key_end]);
            map.map_in_place(Some(&key_copy), &mut data[value_offset..value_end])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::EmitBuffer;

    /// Uppercases values and records the keys it saw.
    struct Upper(Vec<Option<Vec<u8>>>);

    impl MapInPlace for Upper {
        fn metadata() -> Metadata {
            Metadata::new("upper", "1")
        }
        fn open(_: &Config) -> Result<Self, Error> {
            Ok(Upper(Vec::new()))
        }
        fn map_in_place(&mut self, key: Option<&[u8]>, value: &mut [u8]) -> Result<(), Error> {
            self.0.push(key.map(<[u8]>::to_vec));
            value.make_ascii_uppercase();
            Ok(())
        }
    }

    #[test]
    fn values_are_mapped_where_they_lie_and_keys_are_seen() {
        let mut buf = EmitBuffer::new();
        buf.push(Some(b"k1"), b"abc", Some(1));
        buf.push(None, b"de", None);
        buf.push(Some(b""), b"f", None);
        let (data, entries) = buf.parts();
        let mut data = data.to_vec();
        let mut upper = Upper(Vec::new());
        map_batch(&mut upper, &mut data, entries).expect("maps");
        assert_eq!(data, b"k1ABCDEF");
        assert_eq!(upper.0, [Some(b"k1".to_vec()), None, Some(Vec::new())]);
    }

    #[test]
    fn a_key_after_or_overlapping_its_value_is_passed_intact() {
        // Entry 0: value "ab" at 0, key "cd" at 2; entry 1: key and value
        // both "ab" (the same bytes).
        let mut data = b"abcd".to_vec();
        let entries = [2, 2, 0, 2, 0, 0, 0, 0, 0, 2, 0, 2, 0, 0, 0, 0];
        let mut upper = Upper(Vec::new());
        map_batch(&mut upper, &mut data, &entries).expect("maps");
        assert_eq!(data, b"ABcd");
        assert_eq!(upper.0, [Some(b"cd".to_vec()), Some(b"AB".to_vec())]);
    }

    #[test]
    fn entries_outside_the_data_are_errors_naming_the_entry() {
        let mut data = b"abc".to_vec();
        let mut upper = Upper(Vec::new());
        let value = [NO_KEY, NO_KEY, 1, 3, 0, 0, 0, 0];
        let error = map_batch(&mut upper, &mut data, &value).expect_err("value past the end");
        assert!(error.to_string().contains("entry 0 value 1+3"), "{error}");
        let key = [0, 0, 0, 0, 0, 0, 0, 0, 2, 5, 0, 1, 0, 0, 0, 0];
        let error = map_batch(&mut upper, &mut data, &key).expect_err("key past the end");
        assert!(error.to_string().contains("entry 1 key 2+5"), "{error}");
    }
}
