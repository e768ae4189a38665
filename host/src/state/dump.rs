//! A canonical dump of cells by table name: what the memory backend writes
//! as its checkpoint, what a *delta* checkpoint holds (the cells changed
//! since the previous checkpoint, deletions as tombstones), and what restore
//! reads back, filtered by key group.
//!
//! Format: the line `weir-dump 1`, the table names (u32 count, then u32
//! length + UTF-8 each), then one entry per cell: table index (u32), key
//! group (u16), key (u32 length + bytes), value (u32 length + bytes; the
//! length `u32::MAX` and no bytes: the cell was deleted). Little-endian.

use std::io::{Read, Write};
use std::path::Path;

use super::StateError;

const MAGIC: &[u8] = b"weir-dump 1\n";
const TOMBSTONE: u32 = u32::MAX;

/// The name of a memory backend's dump inside a snapshot directory.
pub const DUMP_FILE: &str = "state.dump";
/// The name of a delta inside a snapshot directory.
pub const DELTA_FILE: &str = "state.delta";

/// A dump being encoded in memory.
#[derive(Debug, Clone)]
pub struct DumpBuffer {
    bytes: Vec<u8>,
    entries: usize,
}

impl DumpBuffer {
    pub fn new(tables: &[String]) -> Self {
        let mut bytes = Vec::with_capacity(4096);
        encode_header(&mut bytes, tables);
        Self { bytes, entries: 0 }
    }

    /// Appends a cell (`None`: deleted).
    pub fn push(&mut self, table: u32, group: u16, key: &[u8], value: Option<&[u8]>) {
        encode_entry(&mut self.bytes, table, group, key, value);
        self.entries += 1;
    }

    /// Appends every entry of `other` (encoded for the same tables).
    pub fn append(&mut self, other: &DumpBuffer) {
        let header = header_len(&other.bytes);
        self.bytes.extend_from_slice(&other.bytes[header..]);
        self.entries += other.entries;
    }

    pub fn entries(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Writes the dump to `path` and fsyncs it.
    pub fn write_to(&self, path: &Path) -> Result<(), StateError> {
        let error = |e: std::io::Error| StateError::Open {
            dir: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut file = std::fs::File::create(path).map_err(error)?;
        file.write_all(&self.bytes).map_err(error)?;
        file.sync_all().map_err(error)
    }
}

fn encode_header(out: &mut Vec<u8>, tables: &[String]) {
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(tables.len() as u32).to_le_bytes());
    for name in tables {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
    }
}

fn encode_entry(out: &mut Vec<u8>, table: u32, group: u16, key: &[u8], value: Option<&[u8]>) {
    out.extend_from_slice(&table.to_le_bytes());
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    match value {
        Some(value) => {
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value);
        }
        None => out.extend_from_slice(&TOMBSTONE.to_le_bytes()),
    }
}

/// A dump written as it is produced (savepoint files, which may be larger
/// than memory should hold).
pub struct DumpWriter<W: Write> {
    out: W,
    scratch: Vec<u8>,
}

impl<W: Write> DumpWriter<W> {
    pub fn new(mut out: W, tables: &[String]) -> std::io::Result<Self> {
        let mut scratch = Vec::with_capacity(256);
        encode_header(&mut scratch, tables);
        out.write_all(&scratch)?;
        Ok(Self { out, scratch })
    }

    /// Appends a cell (`None`: deleted).
    pub fn push(
        &mut self,
        table: u32,
        group: u16,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> std::io::Result<()> {
        self.scratch.clear();
        encode_entry(&mut self.scratch, table, group, key, value);
        self.out.write_all(&self.scratch)
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

fn header_len(bytes: &[u8]) -> usize {
    let mut at = MAGIC.len();
    let count = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
    at += 4;
    for _ in 0..count {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        at += 4 + len;
    }
    at
}

/// Reads a dump, calling `visit(table name, key group, key, value)` per
/// entry in order (`None`: deleted).
pub fn read(
    path: &Path,
    visit: impl FnMut(&str, u16, &[u8], Option<&[u8]>),
) -> Result<(), StateError> {
    let file = std::fs::File::open(path).map_err(|e| StateError::Open {
        dir: path.to_path_buf(),
        message: e.to_string(),
    })?;
    decode_from(std::io::BufReader::new(file), path, visit)
}

/// [`read`] for a dump already in memory; `path` names it in errors.
pub fn decode(
    bytes: &[u8],
    path: &Path,
    visit: impl FnMut(&str, u16, &[u8], Option<&[u8]>),
) -> Result<(), StateError> {
    decode_from(bytes, path, visit)
}

/// [`read`] from any reader (buffer it), one entry at a time; `path` names
/// it in errors.
pub fn decode_from(
    mut reader: impl Read,
    path: &Path,
    mut visit: impl FnMut(&str, u16, &[u8], Option<&[u8]>),
) -> Result<(), StateError> {
    let corrupt = |message: &str| StateError::Open {
        dir: path.to_path_buf(),
        message: format!("not a state dump: {message}"),
    };
    let mut magic = [0u8; MAGIC.len()];
    reader
        .read_exact(&mut magic)
        .ok()
        .filter(|()| magic == MAGIC)
        .ok_or_else(|| corrupt("bad header"))?;
    let mut u32_buf = [0u8; 4];
    let mut read_u32 = |reader: &mut dyn Read| -> Result<u32, StateError> {
        reader
            .read_exact(&mut u32_buf)
            .map_err(|_| corrupt("truncated"))?;
        Ok(u32::from_le_bytes(u32_buf))
    };
    let read_bytes = |reader: &mut dyn Read, len: usize, into: &mut Vec<u8>| {
        into.clear();
        let got = reader
            .take(len as u64)
            .read_to_end(into)
            .map_err(|e| corrupt(&e.to_string()))?;
        if got == len {
            Ok(())
        } else {
            Err(corrupt("truncated"))
        }
    };
    let count = read_u32(&mut reader)? as usize;
    let mut names = Vec::with_capacity(count.min(1024));
    let mut key = Vec::new();
    let mut value = Vec::new();
    for _ in 0..count {
        let len = read_u32(&mut reader)? as usize;
        read_bytes(&mut reader, len, &mut key)?;
        let name = std::str::from_utf8(&key).map_err(|_| corrupt("table name"))?;
        names.push(name.to_string());
    }
    loop {
        // A clean end of input may only come before an entry.
        let mut first = [0u8; 4];
        let mut filled = 0;
        while filled < 4 {
            match reader.read(&mut first[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(corrupt(&e.to_string())),
            }
        }
        match filled {
            0 => return Ok(()),
            4 => {}
            _ => return Err(corrupt("truncated")),
        }
        let table = u32::from_le_bytes(first) as usize;
        let mut group = [0u8; 2];
        reader
            .read_exact(&mut group)
            .map_err(|_| corrupt("truncated"))?;
        let group = u16::from_le_bytes(group);
        let key_len = read_u32(&mut reader)? as usize;
        read_bytes(&mut reader, key_len, &mut key)?;
        let present = match read_u32(&mut reader)? {
            TOMBSTONE => false,
            len => {
                read_bytes(&mut reader, len as usize, &mut value)?;
                true
            }
        };
        let name = names.get(table).ok_or_else(|| corrupt("table index"))?;
        visit(name, group, &key, present.then_some(value.as_slice()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_cells_and_tombstones() {
        let tables = vec!["op/a".to_string(), "op/b".to_string()];
        let mut first = DumpBuffer::new(&tables);
        first.push(0, 3, b"k1", Some(b"v1"));
        let mut second = DumpBuffer::new(&tables);
        second.push(1, 7, b"k2", None);
        second.push(0, 0, b"", Some(b""));
        first.append(&second);
        assert_eq!(first.entries(), 3);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DELTA_FILE);
        first.write_to(&path).expect("write");
        let mut seen = Vec::new();
        read(&path, |t, g, k, v| {
            seen.push((t.to_string(), g, k.to_vec(), v.map(<[u8]>::to_vec)))
        })
        .expect("read");
        assert_eq!(
            seen,
            vec![
                ("op/a".into(), 3, b"k1".to_vec(), Some(b"v1".to_vec())),
                ("op/b".into(), 7, b"k2".to_vec(), None),
                ("op/a".into(), 0, vec![], Some(vec![])),
            ]
        );
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() - 1]).expect("truncate");
        assert!(read(&path, |_, _, _, _| {}).is_err());
    }
}
