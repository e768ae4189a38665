//! The optional flat export of `weir:operator`: `process-flat` takes a
//! batch's entries as eight u32 per record, so each list crosses the
//! boundary as one copy (wasmtime lowers and lifts integer lists as a
//! block) instead of a store or load per field of every entry. A
//! [`BatchEntry`](crate::types::BatchEntry) is laid out as those words, so
//! the host neither encodes nor decodes them.

use wasmtime::component::{Component, ComponentExportIndex};

/// The optional export's name in a component.
pub const FLAT_INTERFACE: &str = "weir:operator/flat-operator@0.1.0";

/// The `process-flat` function of a component's flat export, if it has one.
pub fn find(component: &Component) -> Option<ComponentExportIndex> {
    let interface = component.get_export_index(None, FLAT_INTERFACE)?;
    component.get_export_index(Some(&interface), "process-flat")
}

#[cfg(test)]
mod tests {
    use crate::types::{BatchEntry, ENTRY_WORDS, RecordBatch};

    #[test]
    fn entries_are_the_flat_words_both_ways() {
        let mut batch = RecordBatch::new();
        batch.push(Some(b"key"), b"value", Some(-1_700_000_000_123));
        batch.push(None, b"", None);
        batch.push(Some(b""), b"v", Some(i64::MAX));
        let words = BatchEntry::as_words(batch.entries());
        assert_eq!(words.len(), 3 * ENTRY_WORDS);
        assert_eq!(&words[..4], &[0, 3, 3, 5]);
        assert_eq!(words[ENTRY_WORDS + 1], u32::MAX, "no key");
        assert_eq!(words[ENTRY_WORDS + 4] & 1, 0, "no timestamp");
        let stamp = -1_700_000_000_123i64 as u64;
        assert_eq!(&words[4..8], &[1, 0, stamp as u32, (stamp >> 32) as u32]);
        let entries = BatchEntry::from_words(words).expect("whole entries");
        assert_eq!(entries, batch.entries());
        let again =
            RecordBatch::from_parts(batch.data().to_vec(), entries.to_vec()).expect("in bounds");
        assert_eq!(
            again.iter().collect::<Vec<_>>(),
            batch.iter().collect::<Vec<_>>()
        );
        assert!(
            BatchEntry::from_words(&words[1..]).is_err(),
            "a partial entry"
        );
        let mut bad = words.to_vec();
        bad[1] = 0x8000_0000;
        let entries = BatchEntry::from_words(&bad).expect("whole entries");
        let error = RecordBatch::from_parts(batch.data().to_vec(), entries.to_vec())
            .expect_err("a key length over i32");
        assert!(error.contains("entry 0"), "{error}");
    }
}
