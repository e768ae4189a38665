//! The batch encodings, both ways: the `record-batch` of `process-batch`
//! and the flat layout of `process-flat` and `emit-flat` (eight u32 words
//! per record, see `wit/operator.wit`). Pure code (no host calls), so it is
//! unit-tested natively.

use crate::bindings::weir::operator::types::BatchEntry;
use crate::{Error, Record};

/// u32 words per record in the flat layout.
pub(crate) const WORDS: usize = 8;

/// Key length word of a record without a key.
pub(crate) const NO_KEY: u32 = u32::MAX;

/// Flag bit: the record has a timestamp.
const HAS_TIMESTAMP: u32 = 1;

/// Main-output records are flushed to the host once the buffer holds this
/// many bytes, even in the middle of a batch.
pub(crate) const FLUSH_BYTES: usize = 1 << 20;

/// Above this capacity the buffer is shrunk after a flush, so one huge record
/// does not pin its memory for the life of the instance.
const KEEP_CAPACITY: usize = 4 * FLUSH_BYTES;

/// Decodes entry `index` of a `record-batch` into a record borrowing `data`.
pub(crate) fn decode_entry<'a>(
    data: &'a [u8],
    entry: &BatchEntry,
    index: usize,
) -> Result<Record<'a>, Error> {
    let key_length = match entry.key_length {
        -1 => NO_KEY,
        length => u32::try_from(length).map_err(|_| {
            Error::msg(format_args!(
                "malformed record batch: entry {index} has key length {length}"
            ))
        })?,
    };
    let words = [
        entry.key_offset,
        key_length,
        entry.value_offset,
        entry.value_length,
        u32::from(entry.has_timestamp) * HAS_TIMESTAMP,
        0,
        entry.timestamp as u64 as u32,
        (entry.timestamp as u64 >> 32) as u32,
    ];
    decode_flat(data, &words, index)
}

/// Decodes record `index` of a flat batch, whose eight words are `words`,
/// into a record borrowing `data`.
pub(crate) fn decode_flat<'a>(
    data: &'a [u8],
    words: &[u32],
    index: usize,
) -> Result<Record<'a>, Error> {
    let slice = |what: &str, offset: u32, length: u32| {
        let start = offset as usize;
        start
            .checked_add(length as usize)
            .and_then(|end| data.get(start..end))
            .ok_or_else(|| {
                Error::msg(format_args!(
                    "malformed record batch: entry {index} {what} {start}+{length} exceeds data length {}",
                    data.len()
                ))
            })
    };
    let &[
        key_offset,
        key_length,
        value_offset,
        value_length,
        flags,
        _,
        low,
        high,
    ] = words
    else {
        return Err(Error::msg(format_args!(
            "malformed record batch: entry {index} has {} words, not {WORDS}",
            words.len()
        )));
    };
    let key = match key_length {
        NO_KEY => None,
        length if length > i32::MAX as u32 => {
            return Err(Error::msg(format_args!(
                "malformed record batch: entry {index} has key length {length}"
            )));
        }
        length => Some(slice("key", key_offset, length)?),
    };
    let value = slice("value", value_offset, value_length)?;
    let timestamp =
        (flags & HAS_TIMESTAMP != 0).then_some((u64::from(high) << 32 | u64::from(low)) as i64);
    Ok(Record::new(key, value, timestamp))
}

/// An SDK-owned flat batch that main-output emits are appended to; its
/// allocations are reused from one call to the next.
pub(crate) struct EmitBuffer {
    data: Vec<u8>,
    entries: Vec<u32>,
}

impl EmitBuffer {
    pub(crate) const fn new() -> Self {
        Self {
            data: Vec::new(),
            entries: Vec::new(),
        }
    }

    /// Appends one record: its key bytes (if any) then its value bytes.
    pub(crate) fn push(&mut self, key: Option<&[u8]>, value: &[u8], timestamp: Option<i64>) {
        self.push_with(key, timestamp, |data| data.extend_from_slice(value));
    }

    /// Appends one record whose value `write` appends to the buffer.
    pub(crate) fn push_with(
        &mut self,
        key: Option<&[u8]>,
        timestamp: Option<i64>,
        write: impl FnOnce(&mut Vec<u8>),
    ) {
        let data = &mut self.data;
        let (key_offset, key_length) = match key {
            Some(key) => {
                let offset = offset_of(data);
                data.extend_from_slice(key);
                let length = i32::try_from(key.len()).expect("a record key is under 2 GiB");
                (offset, length as u32)
            }
            None => (offset_of(data), NO_KEY),
        };
        let value_offset = offset_of(data);
        write(data);
        let value_length = u32::try_from(data.len() - value_offset as usize)
            .expect("a record value is under 4 GiB");
        let stamp = timestamp.unwrap_or(0) as u64;
        self.entries.extend_from_slice(&[
            key_offset,
            key_length,
            value_offset,
            value_length,
            u32::from(timestamp.is_some()) * HAS_TIMESTAMP,
            0,
            stamp as u32,
            (stamp >> 32) as u32,
        ]);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the buffer has reached the mid-batch flush threshold.
    pub(crate) fn is_full(&self) -> bool {
        self.data.len() >= FLUSH_BYTES
    }

    /// The buffered records: (data, flat entries).
    pub(crate) fn parts(&self) -> (&[u8], &[u32]) {
        (&self.data, &self.entries)
    }

    /// Empties the buffer, keeping (a bounded amount of) its allocation.
    pub(crate) fn clear(&mut self) {
        self.data.clear();
        self.entries.clear();
        if self.data.capacity() > KEEP_CAPACITY {
            self.data.shrink_to(FLUSH_BYTES);
        }
    }
}

fn offset_of(data: &[u8]) -> u32 {
    // The buffer is flushed at FLUSH_BYTES, and a wasm32 address space holds
    // under 4 GiB, so an offset always fits.
    u32::try_from(data.len()).expect("emit buffer is under 4 GiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(buf: &EmitBuffer) -> Vec<Record<'_>> {
        let (data, entries) = buf.parts();
        entries
            .chunks(WORDS)
            .enumerate()
            .map(|(i, words)| decode_flat(data, words, i))
            .collect::<Result<_, _>>()
            .expect("valid batch")
    }

    #[test]
    fn emit_buffer_round_trips() {
        let mut buf = EmitBuffer::new();
        assert!(buf.is_empty());
        buf.push(Some(b"k1"), b"hello", Some(42));
        buf.push(None, b"", None);
        buf.push(Some(b""), b"v", Some(-7));
        assert!(!buf.is_empty());
        assert_eq!(buf.parts().0, b"k1hellov");
        let e = &buf.parts().1[WORDS..2 * WORDS];
        assert_eq!((e[1], e[2], e[3]), (NO_KEY, 7, 0));
        assert_eq!(e[4] & HAS_TIMESTAMP, 0);
        assert_eq!(
            records(&buf),
            [
                Record::new(Some(b"k1"), b"hello", Some(42)),
                Record::new(None, b"", None),
                Record::new(Some(b""), b"v", Some(-7)),
            ]
        );
    }

    #[test]
    fn a_value_written_in_place_is_one_record() {
        let mut buf = EmitBuffer::new();
        buf.push(Some(b"a"), b"x", None);
        buf.push_with(Some(b"word"), Some(5), |data| {
            use std::io::Write;
            let (word, count) = ("word", 42);
            write!(data, "{word} {count}").expect("writes");
        });
        assert_eq!(
            records(&buf),
            [
                Record::new(Some(b"a"), b"x", None),
                Record::new(Some(b"word"), b"word 42", Some(5)),
            ]
        );
    }

    #[test]
    fn clear_keeps_allocation() {
        let mut buf = EmitBuffer::new();
        buf.push(Some(b"key"), &[7; 1000], None);
        let cap = buf.data.capacity();
        buf.clear();
        assert!(buf.is_empty());
        assert!(buf.parts().0.is_empty());
        assert_eq!(buf.data.capacity(), cap);
    }

    #[test]
    fn full_at_threshold_and_shrinks_after_huge_record() {
        let mut buf = EmitBuffer::new();
        buf.push(None, &vec![0; FLUSH_BYTES - 1], None);
        assert!(!buf.is_full());
        buf.push(None, b"x", None);
        assert!(buf.is_full());
        buf.push(None, &vec![0; KEEP_CAPACITY], None);
        buf.clear();
        assert!(buf.data.capacity() <= KEEP_CAPACITY);
    }

    #[test]
    fn decodes_host_batch() {
        // Entries may share and reorder bytes of `data`.
        let data = b"wordvalue";
        let entries = [
            BatchEntry {
                key_offset: 0,
                key_length: 4,
                value_offset: 4,
                value_length: 5,
                timestamp: 1_700_000_000_000,
                has_timestamp: true,
            },
            BatchEntry {
                key_offset: 123,
                key_length: -1,
                value_offset: 0,
                value_length: 4,
                timestamp: 99,
                has_timestamp: false,
            },
        ];
        let r0 = decode_entry(data, &entries[0], 0).expect("valid");
        assert_eq!(r0.key(), Some(&b"word"[..]));
        assert_eq!(r0.value_str(), Ok("value"));
        assert_eq!(r0.timestamp(), Some(1_700_000_000_000));
        let r1 = decode_entry(data, &entries[1], 1).expect("valid");
        assert_eq!(
            (r1.key(), r1.value(), r1.timestamp()),
            (None, &b"word"[..], None)
        );
    }

    #[test]
    fn rejects_malformed_entries() {
        let data = b"abc";
        let base = BatchEntry {
            key_offset: 0,
            key_length: -1,
            value_offset: 0,
            value_length: 3,
            timestamp: 0,
            has_timestamp: false,
        };
        assert!(decode_entry(data, &base, 0).is_ok());
        let bad = [
            BatchEntry {
                value_length: 4,
                ..base
            },
            BatchEntry {
                value_offset: u32::MAX,
                value_length: u32::MAX,
                ..base
            },
            BatchEntry {
                key_length: -2,
                ..base
            },
            BatchEntry {
                key_offset: 2,
                key_length: 2,
                ..base
            },
        ];
        for (i, entry) in bad.iter().enumerate() {
            let err = decode_entry(data, entry, i).expect_err("malformed");
            assert!(err.message().contains(&format!("entry {i}")), "{err}");
        }
        let record = Record::new(None, &[0xff, 0xfe], None);
        assert!(record.value_str().is_err());
    }
}
