//! Encoding of list and map cells as stored in a backend. A value cell is
//! stored as its raw bytes; a list as `u32 count, (u32 len, bytes)*`; a map as
//! `u32 count, (u32 key len, key, u32 value len, value)*` in key order.
//! All integers little-endian. Decoding checks every length.

use std::collections::BTreeMap;

/// The encoded bytes do not describe a list or map.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what} cell: {detail}")]
pub struct CodecError {
    pub what: &'static str,
    pub detail: String,
}

pub fn encode_list(items: &[Vec<u8>]) -> Vec<u8> {
    let size = 4 + items.iter().map(|i| 4 + i.len()).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for item in items {
        put_bytes(&mut out, item);
    }
    out
}

pub fn decode_list(bytes: &[u8]) -> Result<Vec<Vec<u8>>, CodecError> {
    let mut reader = Reader::new(bytes, "list");
    let count = reader.u32()?;
    let mut items = Vec::with_capacity((count as usize).min(bytes.len() / 4));
    for _ in 0..count {
        items.push(reader.bytes()?.to_vec());
    }
    reader.finish()?;
    Ok(items)
}

pub fn encode_map(map: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<u8> {
    let size = 4 + map
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(map.len() as u32).to_le_bytes());
    for (key, value) in map {
        put_bytes(&mut out, key);
        put_bytes(&mut out, value);
    }
    out
}

pub fn decode_map(bytes: &[u8]) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, CodecError> {
    let mut reader = Reader::new(bytes, "map");
    let count = reader.u32()?;
    let mut map = BTreeMap::new();
    for _ in 0..count {
        let key = reader.bytes()?.to_vec();
        let value = reader.bytes()?.to_vec();
        map.insert(key, value);
    }
    reader.finish()?;
    Ok(map)
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { bytes, at: 0, what }
    }

    fn error(&self, detail: String) -> CodecError {
        CodecError {
            what: self.what,
            detail,
        }
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        let end = self.at + 4;
        let slice = self
            .bytes
            .get(self.at..end)
            .ok_or_else(|| self.error(format!("truncated at byte {}", self.at)))?;
        self.at = end;
        Ok(u32::from_le_bytes([slice[0], slice[1], slice[2], slice[3]]))
    }

    fn bytes(&mut self) -> Result<&'a [u8], CodecError> {
        let length = self.u32()? as usize;
        let end = self
            .at
            .checked_add(length)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                self.error(format!(
                    "item of {length} bytes at byte {} overruns the {} bytes",
                    self.at,
                    self.bytes.len()
                ))
            })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn finish(&self) -> Result<(), CodecError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(self.error(format!("{} trailing bytes", self.bytes.len() - self.at)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn list_round_trips(items in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 0..20)) {
            prop_assert_eq!(decode_list(&encode_list(&items)).expect("decodes"), items);
        }

        #[test]
        fn map_round_trips(map in proptest::collection::btree_map(proptest::collection::vec(any::<u8>(), 0..8), proptest::collection::vec(any::<u8>(), 0..8), 0..20)) {
            prop_assert_eq!(decode_map(&encode_map(&map)).expect("decodes"), map);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_list(&bytes);
            let _ = decode_map(&bytes);
        }
    }

    #[test]
    fn truncation_is_an_error() {
        let encoded = encode_list(&[b"abc".to_vec(), b"de".to_vec()]);
        for cut in 0..encoded.len() {
            assert!(decode_list(&encoded[..cut]).is_err(), "cut at {cut}");
        }
    }
}
