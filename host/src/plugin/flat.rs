//! The flat batch layout of `weir:operator/flat-operator` and `emit-flat`:
//! a batch's entries as eight u32 per record, so each list crosses the
//! boundary as one copy (wasmtime lowers and lifts integer lists as a
//! block) instead of a store or load per field of every entry.

use wasmtime::component::{Component, ComponentExportIndex};

use crate::types::BatchEntry;

/// The optional export's name in a component.
pub const FLAT_INTERFACE: &str = "weir:operator/flat-operator@0.1.0";

/// The `process-flat` function of a component's flat export, if it has one.
pub fn find(component: &Component) -> Option<ComponentExportIndex> {
    let interface = component.get_export_index(None, FLAT_INTERFACE)?;
    component.get_export_index(Some(&interface), "process-flat")
}

/// u32 words per record.
pub const WORDS: usize = 8;

/// Key length word of a record without a key.
const NO_KEY: u32 = u32::MAX;

/// Flag bit: the record has a timestamp.
const HAS_TIMESTAMP: u32 = 1;

/// Writes `entries` in the flat layout into `words` (cleared first, its
/// allocation reused).
pub fn encode(entries: &[BatchEntry], words: &mut Vec<u32>) {
    words.clear();
    words.reserve(entries.len() * WORDS);
    for entry in entries {
        let key_length = u32::try_from(entry.key_length).unwrap_or(NO_KEY);
        let timestamp = entry.timestamp.unwrap_or(0) as u64;
        words.extend_from_slice(&[
            entry.key_offset,
            key_length,
            entry.value_offset,
            entry.value_length,
            u32::from(entry.timestamp.is_some()) * HAS_TIMESTAMP,
            0,
            timestamp as u32,
            (timestamp >> 32) as u32,
        ]);
    }
}

/// Reads entries in the flat layout. Bounds are checked by
/// [`RecordBatch::from_parts`](crate::types::RecordBatch::from_parts).
pub fn decode(words: &[u32]) -> Result<Vec<BatchEntry>, String> {
    if !words.len().is_multiple_of(WORDS) {
        return Err(format!(
            "{} entry words is not a multiple of {WORDS}",
            words.len()
        ));
    }
    let mut entries = Vec::with_capacity(words.len() / WORDS);
    for (index, w) in words.chunks_exact(WORDS).enumerate() {
        let key_length = match w[1] {
            NO_KEY => -1,
            length => i32::try_from(length)
                .map_err(|_| format!("entry {index} has key length {length}"))?,
        };
        let timestamp = (u64::from(w[7]) << 32 | u64::from(w[6])) as i64;
        entries.push(BatchEntry {
            key_offset: w[0],
            key_length,
            value_offset: w[2],
            value_length: w[3],
            timestamp: (w[4] & HAS_TIMESTAMP != 0).then_some(timestamp),
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::RecordBatch;

    #[test]
    fn entries_round_trip_through_the_flat_layout() {
        let mut batch = RecordBatch::new();
        batch.push(Some(b"key"), b"value", Some(-1_700_000_000_123));
        batch.push(None, b"", None);
        batch.push(Some(b""), b"v", Some(i64::MAX));
        let mut words = vec![7; 3];
        encode(batch.entries(), &mut words);
        assert_eq!(words.len(), 3 * WORDS);
        assert_eq!(words[WORDS + 1], NO_KEY);
        let entries = decode(&words).expect("decodes");
        assert_eq!(entries, batch.entries());
        let again = RecordBatch::from_parts(batch.data().to_vec(), entries).expect("in bounds");
        assert_eq!(
            again.iter().collect::<Vec<_>>(),
            batch.iter().collect::<Vec<_>>()
        );
        assert!(decode(&words[1..]).is_err(), "a partial entry");
        words[1] = 0x8000_0000;
        assert!(decode(&words).is_err(), "a key length over i32");
    }
}
