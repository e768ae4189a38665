//! A canonical dump of a state backend's tables: what the memory backend
//! writes as its checkpoint, and what restore reads back (by table name,
//! filtered by key group). Format: the line `weir-dump 1`, the table names
//! (u32 count, then u32 length + UTF-8 each), then one entry per cell:
//! table index (u32), key group (u16), key and value (u32 length + bytes
//! each). Integers are little-endian.

use std::io::{BufWriter, Read, Write};
use std::path::Path;

use super::StateError;

const MAGIC: &[u8] = b"weir-dump 1\n";

/// The name of the dump file inside a snapshot directory.
pub const DUMP_FILE: &str = "state.dump";

/// Writes a dump; `cells` calls its argument once per (table index, key
/// group, key, value).
pub fn write(
    path: &Path,
    tables: &[String],
    cells: impl FnOnce(&mut dyn FnMut(u32, u16, &[u8], &[u8])),
) -> Result<(), StateError> {
    let error = |e: std::io::Error| StateError::Open {
        dir: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut out = BufWriter::new(std::fs::File::create(path).map_err(error)?);
    let mut failed = None;
    let mut put = |out: &mut BufWriter<std::fs::File>, bytes: &[u8]| {
        if failed.is_none()
            && let Err(e) = out.write_all(bytes)
        {
            failed = Some(e);
        }
    };
    put(&mut out, MAGIC);
    put(&mut out, &(tables.len() as u32).to_le_bytes());
    for name in tables {
        put(&mut out, &(name.len() as u32).to_le_bytes());
        put(&mut out, name.as_bytes());
    }
    cells(&mut |table, group, key, value| {
        put(&mut out, &table.to_le_bytes());
        put(&mut out, &group.to_le_bytes());
        put(&mut out, &(key.len() as u32).to_le_bytes());
        put(&mut out, key);
        put(&mut out, &(value.len() as u32).to_le_bytes());
        put(&mut out, value);
    });
    if let Some(e) = failed {
        return Err(error(e));
    }
    out.flush().map_err(error)?;
    out.get_ref().sync_all().map_err(error)
}

/// Reads a dump, calling `visit(table name, key group, key, value)`.
pub fn read(path: &Path, mut visit: impl FnMut(&str, u16, &[u8], &[u8])) -> Result<(), StateError> {
    let corrupt = |message: &str| StateError::Open {
        dir: path.to_path_buf(),
        message: format!("not a state dump: {message}"),
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| StateError::Open {
            dir: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let mut rest = bytes
        .strip_prefix(MAGIC)
        .ok_or_else(|| corrupt("bad header"))?;
    let mut take = |n: usize| -> Result<&[u8], StateError> {
        if rest.len() < n {
            return Err(corrupt("truncated"));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize;
    let count = u32_of(take(4)?);
    let mut names = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let len = u32_of(take(4)?);
        let name = std::str::from_utf8(take(len)?).map_err(|_| corrupt("table name"))?;
        names.push(name.to_string());
    }
    while let Ok(table) = take(4) {
        let table = u32_of(table);
        let group = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes"));
        let key_len = u32_of(take(4)?);
        let key = take(key_len)?;
        let value_len = u32_of(take(4)?);
        let value = take(value_len)?;
        let name = names.get(table).ok_or_else(|| corrupt("table index"))?;
        visit(name, group, key, value);
    }
    Ok(())
}
