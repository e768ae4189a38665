//! A savepoint built from data (`weir savepoint write`): the cells of one
//! operator's state, as `weir savepoint read` prints them, written as a
//! canonical savepoint that `weir run -s` restores like any other — how a
//! new job's state is seeded without code (Flink's State Processor API
//! needs a Java program for it).
//!
//! Every line is checked before anything is written: its state is the one
//! being written, its key group (when given) is its key's, its schema
//! version (when given) is the state's, its value fits the state's kind,
//! no key comes twice; each problem names the line.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::cells::CellLine;
use super::metadata::{self, CheckpointMetadata, OperatorSnapshot, SnapshotKind, StateRef};
use super::savepoint::CANONICAL;
use super::storage::Hashing;
use super::{CheckpointError, FileRef};
use crate::protocol::{Role, StateStats, SubtaskSnapshot};
use crate::state::codec;
use crate::state::dump::DumpWriter;
use crate::types::key_group;

/// What to build.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub uid: String,
    /// The state written, as the operator declares it.
    pub state: StateRef,
    /// The operator's plugin, when known (shown by `inspect`).
    pub plugin: Option<metadata::PluginRef>,
    /// Subtasks (one file per key-group range).
    pub parallelism: u32,
    /// The job's `max_parallelism` (a restore requires the same).
    pub max_parallelism: u32,
    /// Lines of an older schema version are accepted (their values are
    /// migrated by the caller: `--transform`).
    pub transform: bool,
}

/// One parsed input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCell {
    pub key_group: u16,
    pub key: Vec<u8>,
    /// The stored value, as the line gives it.
    pub value: Vec<u8>,
    /// The line's schema version when it is older than the state's (only
    /// with [`Bootstrap::transform`]): its value needs migrating.
    pub migrate_from: Option<u32>,
    /// Its last update as the line gives it (a TTL state's cell).
    pub updated_ms: Option<u64>,
}

/// Parses one input line into a cell. `line` is 1-based, for messages.
pub fn parse_line(spec: &Bootstrap, line: usize, text: &str) -> Result<ParsedCell, String> {
    use base64::Engine;
    let engine = base64::engine::general_purpose::STANDARD;
    let cell: CellLine =
        serde_json::from_str(text).map_err(|e| format!("line {line}: not a cell: {e}"))?;
    if cell.state != spec.state.name {
        return Err(format!(
            "line {line}: state `{}`, but this savepoint is written for state `{}`",
            cell.state, spec.state.name
        ));
    }
    let migrate_from = match cell.schema_version {
        Some(version) if version < spec.state.schema_version && spec.transform => Some(version),
        Some(version) if version != spec.state.schema_version => {
            let hint = if version < spec.state.schema_version && spec.plugin.is_some() {
                "; give --transform to migrate it with the plugin's migrate export"
            } else {
                ""
            };
            return Err(format!(
                "line {line}: a value of schema version {version}, but state `{}` is written at schema version {}{}{hint}",
                spec.state.name,
                spec.state.schema_version,
                match &spec.plugin {
                    Some(plugin) => format!(" (as {}@{} declares it)", plugin.name, plugin.version),
                    None => String::new(),
                }
            ));
        }
        _ => None,
    };
    let key = match (cell.key, cell.key_base64) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => engine
            .decode(b64)
            .map_err(|e| format!("line {line}: key_base64: {e}"))?,
        _ => {
            return Err(format!(
                "line {line}: give `key` or `key_base64`, one of them"
            ));
        }
    };
    let group = key_group::of_key(&key, spec.max_parallelism);
    if cell.key_group != group {
        return Err(format!(
            "line {line}: key {:?} is in key group {group} (max_parallelism {}), the line says {}",
            String::from_utf8_lossy(&key),
            spec.max_parallelism,
            cell.key_group
        ));
    }
    let compact = |v: &serde_json::Value| serde_json::to_vec(v).expect("JSON writes");
    let updated_ms = cell.updated_ms;
    let value = match (cell.value, cell.value_base64) {
        (None, Some(b64)) => engine
            .decode(b64)
            .map_err(|e| format!("line {line}: value_base64: {e}"))?,
        (Some(value), None) => match (spec.state.kind.as_str(), value) {
            ("list", serde_json::Value::Array(items)) => {
                codec::encode_list(&items.iter().map(compact).collect::<Vec<_>>())
            }
            ("map", serde_json::Value::Object(entries)) => codec::encode_map(
                &entries
                    .iter()
                    .map(|(k, v)| (k.as_bytes().to_vec(), compact(v)))
                    .collect(),
            ),
            ("list" | "map", other) => {
                return Err(format!(
                    "line {line}: state `{}` is a {} state; its value must be a JSON {}, not {other}",
                    spec.state.name,
                    spec.state.kind,
                    if spec.state.kind == "list" {
                        "array"
                    } else {
                        "object"
                    }
                ));
            }
            (_, value) => compact(&value),
        },
        _ => {
            return Err(format!(
                "line {line}: give `value` or `value_base64`, one of them"
            ));
        }
    };
    Ok(ParsedCell {
        key_group: group,
        key,
        value,
        migrate_from,
        updated_ms,
    })
}

/// Writes the cells (key group, key → stored value) as a new canonical
/// savepoint directory under `target`; returns it.
pub fn write(
    spec: &Bootstrap,
    cells: &BTreeMap<(u16, Vec<u8>), Vec<u8>>,
    target: &Path,
) -> Result<PathBuf, CheckpointError> {
    let job_id = format!("bootstrap-{}", spec.uid);
    let dir = super::savepoint::create_dir(None, target, &job_id)?;
    let table = format!("{}/{}", spec.uid, spec.state.name);
    let mut operator = OperatorSnapshot {
        role: Role::Operator,
        parallelism: spec.parallelism,
        plugin: spec.plugin.clone(),
        states: vec![spec.state.clone()],
        subtasks: Vec::new(),
    };
    for subtask in 0..spec.parallelism {
        let range = key_group::range_of(subtask, spec.parallelism, spec.max_parallelism);
        let name = format!("{}-{subtask}.state", spec.uid);
        let path = dir.join(&name);
        let io = |e: std::io::Error| CheckpointError::io(&path, e);
        let file = dir.create(&name).map_err(io)?;
        let mut writer = DumpWriter::new(
            Hashing::new(BufWriter::with_capacity(1 << 20, file)),
            std::slice::from_ref(&table),
        )
        .map_err(io)?;
        let mut stats = StateStats {
            name: spec.state.name.clone(),
            ..StateStats::default()
        };
        let first = (range.start as u16, Vec::new());
        for ((group, key), value) in cells.range(first..) {
            if u32::from(*group) >= range.end {
                break;
            }
            writer.push(0, *group, key, Some(value)).map_err(io)?;
            stats.keys += 1;
            stats.bytes += (key.len() + value.len()) as u64;
        }
        let mut hashing = writer.into_inner();
        hashing.flush().map_err(io)?;
        let (buffered, size, sha256) = hashing.finish();
        let file = buffered.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        operator.subtasks.push(SubtaskSnapshot {
            uid: spec.uid.clone(),
            subtask,
            key_groups: Some([range.start, range.end]),
            backend: Some(CANONICAL.to_string()),
            files: vec![FileRef {
                path: name.clone(),
                name,
                size,
                sha256,
            }],
            state_stats: vec![stats],
            ..SubtaskSnapshot::default()
        });
    }
    let mut metadata = CheckpointMetadata {
        kind: SnapshotKind::Savepoint,
        job_id,
        job_name: format!("bootstrapped {}", spec.uid),
        checkpoint: 1,
        completed_ms: crate::types::now_millis(),
        max_parallelism: spec.max_parallelism,
        operators: Default::default(),
        exchanges: Default::default(),
    };
    metadata.operators.insert(spec.uid.clone(), operator);
    dir.sync().map_err(|e| CheckpointError::io(dir.path(), e))?;
    metadata::write(&dir, &metadata)?;
    Ok(dir.path().to_path_buf())
}
