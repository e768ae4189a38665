//! A savepoint's (or retained checkpoint's) keyed state read as data,
//! without any plugin: what `weir savepoint read` prints. Each cell comes
//! with its state's name and kind, its key group, its key and its value
//! as the state kind stores it (see [`crate::state::codec`]).
//!
//! A canonical savepoint's `.state` dumps are streamed straight from
//! storage, in (state, key group, key) order per subtask; any other form
//! (a native or incremental savepoint, a checkpoint's base and deltas) is
//! first restored into a scratch RocksDB with the restore's own code
//! ([`super::restore::load_cells`]), then scanned in the same order.

use std::ops::Range;
use std::path::Path;

use super::CheckpointError;
use super::metadata::{OperatorSnapshot, ReadMetadata};
use super::restore::{self, CellSink};
use super::savepoint::CANONICAL;
use crate::protocol::TransferProgress;
use crate::state::StateBackend;
use crate::state::dump;
use crate::state::rocks::RocksBackend;

/// One cell of keyed state.
#[derive(Debug, Clone, Copy)]
pub struct Cell<'a> {
    /// The state's declared name and kind (`value`, `list`, `map`).
    pub state: &'a str,
    pub kind: &'a str,
    /// The schema version its values were written with.
    pub schema_version: u32,
    pub key_group: u16,
    pub key: &'a [u8],
    /// The encoded cell (without its TTL stamp).
    pub value: &'a [u8],
    /// A TTL state's cell: its last update (ms).
    pub updated_ms: Option<u64>,
}

/// What to read: the operator, and optionally one of its states and one
/// key.
#[derive(Debug, Clone, Copy)]
pub struct Selection<'a> {
    pub uid: &'a str,
    pub state: Option<&'a str>,
    pub key: Option<&'a [u8]>,
}

/// Visits every selected cell of `selection.uid`'s keyed state in `read`
/// (the caller checked that the operator and state exist); `work` is a
/// scratch directory. Returns the number of cells visited.
pub fn read_cells(
    read: &ReadMetadata,
    op: &OperatorSnapshot,
    selection: Selection<'_>,
    work: &Path,
    visit: &mut dyn FnMut(Cell<'_>) -> Result<(), CheckpointError>,
) -> Result<u64, CheckpointError> {
    let tables: Vec<String> = op
        .states
        .iter()
        .map(|s| format!("{}/{}", selection.uid, s.name))
        .collect();
    let wanted: Vec<bool> = op
        .states
        .iter()
        .map(|s| selection.state.is_none_or(|name| name == s.name))
        .collect();
    let only_group = selection
        .key
        .map(|key| crate::types::key_group::of_key(key, read.metadata.max_parallelism));
    let visited = std::cell::Cell::new(0u64);
    let failed: std::cell::RefCell<Option<CheckpointError>> = std::cell::RefCell::new(None);
    let visit = std::cell::RefCell::new(visit);
    let now = crate::state::ttl::wall_millis();
    let emit = |table: usize, key_group: u16, key: &[u8], stored: &[u8]| {
        if !wanted[table] || selection.key.is_some_and(|k| k != key) || failed.borrow().is_some() {
            return;
        }
        let state = &op.states[table];
        // A TTL state's cell: its stamp split off; an expired one is not
        // read, as a restore would not restore it.
        let (value, updated_ms) = match &state.ttl {
            None => (stored, None),
            Some(ttl) => match crate::state::ttl::split(stored) {
                Some((stamp, _)) if ttl.dropped_offline(stamp, now) => return,
                Some((stamp, cell)) => (cell, Some(stamp)),
                None => {
                    *failed.borrow_mut() = Some(CheckpointError::Corrupt {
                        path: read.path.clone(),
                        message: format!(
                            "state `{}` has a TTL, but a cell of key {:?} is shorter than its stamp",
                            state.name,
                            String::from_utf8_lossy(key)
                        ),
                    });
                    return;
                }
            },
        };
        let cell = Cell {
            state: &state.name,
            kind: &state.kind,
            schema_version: state.schema_version,
            key_group,
            key,
            value,
            updated_ms,
        };
        match (visit.borrow_mut())(cell) {
            Ok(()) => visited.set(visited.get() + 1),
            Err(error) => *failed.borrow_mut() = Some(error),
        }
    };
    for subtask in &op.subtasks {
        let Some([start, end]) = subtask.key_groups else {
            continue;
        };
        let range: Range<u32> = match only_group {
            Some(group) if (start..end).contains(&u32::from(group)) => {
                u32::from(group)..u32::from(group) + 1
            }
            Some(_) => continue,
            None => start..end,
        };
        if subtask.files.is_empty() && subtask.deltas.is_empty() {
            continue;
        }
        if subtask.backend.as_deref() == Some(CANONICAL) && subtask.deltas.is_empty() {
            for file in &subtask.files {
                let path = read.resolve(file);
                let opened = read.open(file)?;
                dump::decode_from(
                    std::io::BufReader::with_capacity(1 << 20, opened),
                    &path,
                    |table, key_group, key, value| {
                        let (Some(index), Some(value)) =
                            (tables.iter().position(|t| t == table), value)
                        else {
                            return;
                        };
                        if range.contains(&u32::from(key_group)) {
                            emit(index, key_group, key, value);
                        }
                    },
                )
                .map_err(|e| CheckpointError::io(&path, e))?;
            }
        } else {
            let scratch = work.join(format!("read-{}-{}", selection.uid, subtask.subtask));
            let _ = std::fs::remove_dir_all(&scratch);
            let state_error = |e: crate::state::StateError| CheckpointError::io(&scratch, e);
            let mut backend = RocksBackend::open(&scratch, &tables).map_err(state_error)?;
            let progress = TransferProgress::default();
            let single = OperatorSnapshot {
                subtasks: vec![subtask.clone()],
                ..op.clone()
            };
            let mut sink = CellSink {
                range: range.clone(),
                tables: &tables,
                backend: &mut backend,
                progress: &progress,
                migrate: None,
                // Cells as stored: `emit` reads their stamps.
                restamp: Default::default(),
            };
            restore::load_cells(read, selection.uid, &single, work, &mut sink)?;
            for (table, _) in wanted.iter().enumerate().filter(|(_, w)| **w) {
                backend
                    .scan(table, range.clone(), &mut |key_group, key, value| {
                        emit(table, key_group, key, value)
                    })
                    .map_err(state_error)?;
            }
            drop(backend);
            let _ = std::fs::remove_dir_all(&scratch);
        }
        if let Some(error) = failed.borrow_mut().take() {
            return Err(error);
        }
    }
    Ok(visited.get())
}

/// A cell as one line of `weir savepoint read --format jsonl`: the key as
/// text where it is UTF-8 (else `key_base64`), the value as the JSON the
/// SDKs write where it is JSON (else `value_base64`, the stored bytes): a
/// list as an array of its items, a map as an object of its entries, when
/// every item, key and value reads so.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CellLine {
    pub state: String,
    /// The schema version of the value (`savepoint write` checks it
    /// against the plugin's; absent: the plugin's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<u32>,
    pub key_group: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    /// A TTL state's cell: its last update, in ms (processing time: since
    /// the Unix epoch; event time: the watermark then). `savepoint write`
    /// keeps it; absent there, the cell counts as written then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_ms: Option<u64>,
}

impl CellLine {
    pub fn of(cell: &Cell<'_>) -> Self {
        use base64::Engine;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let (key, key_base64) = match std::str::from_utf8(cell.key) {
            Ok(text) => (Some(text.to_string()), None),
            Err(_) => (None, Some(b64(cell.key))),
        };
        let value = decode_value(cell.kind, cell.value);
        let value_base64 = value.is_none().then(|| b64(cell.value));
        Self {
            state: cell.state.to_string(),
            schema_version: Some(cell.schema_version),
            key_group: cell.key_group,
            key,
            key_base64,
            value,
            value_base64,
            updated_ms: cell.updated_ms,
        }
    }
}

/// The stored bytes of a cell of `kind` as JSON, if they read so.
fn decode_value(kind: &str, bytes: &[u8]) -> Option<serde_json::Value> {
    use crate::state::codec;
    let json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).ok();
    match kind {
        "list" => codec::decode_list(bytes)
            .ok()?
            .iter()
            .map(|item| json(item))
            .collect::<Option<Vec<_>>>()
            .map(serde_json::Value::Array),
        "map" => codec::decode_map(bytes)
            .ok()?
            .iter()
            .map(|(k, v)| Some((String::from_utf8(k.clone()).ok()?, json(v)?)))
            .collect::<Option<serde_json::Map<_, _>>>()
            .map(serde_json::Value::Object),
        _ => json(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn line(kind: &str, key: &[u8], value: &[u8]) -> CellLine {
        CellLine::of(&Cell {
            state: "s",
            kind,
            schema_version: 1,
            key_group: 3,
            key,
            value,
            updated_ms: None,
        })
    }

    #[test]
    fn values_read_as_json_where_they_are_and_as_base64_where_not() {
        let counted = line("value", b"word", b"42");
        assert_eq!(counted.key.as_deref(), Some("word"));
        assert_eq!(counted.value, Some(serde_json::json!(42)));
        assert_eq!(counted.value_base64, None);
        let raw = line("value", &[0xff, 0x00], &[0x01, 0x02]);
        assert_eq!((raw.key, raw.key_base64.as_deref()), (None, Some("/wA=")));
        assert_eq!(
            (raw.value, raw.value_base64.as_deref()),
            (None, Some("AQI="))
        );
        let list = crate::state::codec::encode_list(&[b"1".to_vec(), b"\"a\"".to_vec()]);
        assert_eq!(
            line("list", b"k", &list).value,
            Some(serde_json::json!([1, "a"]))
        );
        let mut map = BTreeMap::new();
        map.insert(b"x".to_vec(), b"{\"n\":1}".to_vec());
        let map = crate::state::codec::encode_map(&map);
        assert_eq!(
            line("map", b"k", &map).value,
            Some(serde_json::json!({"x": {"n": 1}}))
        );
        // A list with an item that is not JSON keeps its stored bytes.
        let odd = crate::state::codec::encode_list(&[b"nope".to_vec()]);
        assert!(line("list", b"k", &odd).value_base64.is_some());
        let text = serde_json::to_string(&counted).expect("json");
        assert_eq!(
            text,
            r#"{"state":"s","schema_version":1,"key_group":3,"key":"word","value":42}"#
        );
    }
}
