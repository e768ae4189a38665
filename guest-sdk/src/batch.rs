//! The flat `record-batch` encoding, both ways. Pure code (no host calls), so
//! it is unit-tested natively.

use crate::bindings::weir::operator::types::{BatchEntry, RecordBatch};
use crate::{Error, Record};

/// Main-output records are flushed to the host once the buffer holds this
/// many bytes, even in the middle of a batch.
pub(crate) const FLUSH_BYTES: usize = 1 << 20;

/// Above this capacity the buffer is shrunk after a flush, so one huge record
/// does not pin its memory for the life of the instance.
const KEEP_CAPACITY: usize = 4 * FLUSH_BYTES;

/// Decodes entry `index` of a batch into a record borrowing `data`.
pub(crate) fn decode_entry<'a>(
    data: &'a [u8],
    entry: &BatchEntry,
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
    let key = match entry.key_length {
        -1 => None,
        length => {
            let length = u32::try_from(length).map_err(|_| {
                Error::msg(format_args!(
                    "malformed record batch: entry {index} has key length {length}"
                ))
            })?;
            Some(slice("key", entry.key_offset, length)?)
        }
    };
    let value = slice("value", entry.value_offset, entry.value_length)?;
    let timestamp = entry.has_timestamp.then_some(entry.timestamp);
    Ok(Record::new(key, value, timestamp))
}

/// An SDK-owned `record-batch` that main-output emits are appended to; its
/// allocation is reused from one call to the next.
pub(crate) struct EmitBuffer {
    batch: RecordBatch,
}

impl EmitBuffer {
    pub(crate) const fn new() -> Self {
        Self {
            batch: RecordBatch {
                data: Vec::new(),
                entries: Vec::new(),
            },
        }
    }

    /// Appends one record: its key bytes (if any) then its value bytes.
    pub(crate) fn push(&mut self, key: Option<&[u8]>, value: &[u8], timestamp: Option<i64>) {
        let data = &mut self.batch.data;
        let (key_offset, key_length) = match key {
            Some(key) => {
                let offset = offset_of(data);
                data.extend_from_slice(key);
                let length = i32::try_from(key.len()).expect("a record key is under 2 GiB");
                (offset, length)
            }
            None => (offset_of(data), -1),
        };
        let value_offset = offset_of(data);
        data.extend_from_slice(value);
        let value_length = u32::try_from(value.len()).expect("a record value is under 4 GiB");
        self.batch.entries.push(BatchEntry {
            key_offset,
            key_length,
            value_offset,
            value_length,
            timestamp: timestamp.unwrap_or(0),
            has_timestamp: timestamp.is_some(),
        });
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.batch.entries.is_empty()
    }

    /// Whether the buffer has reached the mid-batch flush threshold.
    pub(crate) fn is_full(&self) -> bool {
        self.batch.data.len() >= FLUSH_BYTES
    }

    pub(crate) fn batch(&self) -> &RecordBatch {
        &self.batch
    }

    /// Empties the buffer, keeping (a bounded amount of) its allocation.
    pub(crate) fn clear(&mut self) {
        self.batch.data.clear();
        self.batch.entries.clear();
        if self.batch.data.capacity() > KEEP_CAPACITY {
            self.batch.data.shrink_to(FLUSH_BYTES);
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

    fn records(batch: &RecordBatch) -> Vec<Record<'_>> {
        batch
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| decode_entry(&batch.data, e, i))
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
        assert_eq!(buf.batch().data, b"k1hellov");
        let e = buf.batch().entries[1];
        assert_eq!((e.key_length, e.value_offset, e.value_length), (-1, 7, 0));
        assert!(!e.has_timestamp);
        assert_eq!(
            records(buf.batch()),
            [
                Record::new(Some(b"k1"), b"hello", Some(42)),
                Record::new(None, b"", None),
                Record::new(Some(b""), b"v", Some(-7)),
            ]
        );
    }

    #[test]
    fn clear_keeps_allocation() {
        let mut buf = EmitBuffer::new();
        buf.push(Some(b"key"), &[7; 1000], None);
        let cap = buf.batch().data.capacity();
        buf.clear();
        assert!(buf.is_empty());
        assert!(buf.batch().data.is_empty());
        assert_eq!(buf.batch().data.capacity(), cap);
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
        assert!(buf.batch().data.capacity() <= KEEP_CAPACITY);
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
