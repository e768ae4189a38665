//! [`CacheKey`]: the key of a cell in `KeyedState`'s cache. Keys up to
//! [`INLINE`] bytes (most stream keys: words, ids) are stored in the
//! cache's entry itself, so a lookup compares bytes it has already loaded
//! instead of following a pointer to another cache line; longer keys are
//! boxed. It hashes and compares exactly as the `[u8]` it holds, so the
//! cache is probed with plain byte slices.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

/// The longest key stored inline.
pub const INLINE: usize = 22;

#[derive(Clone)]
pub enum CacheKey {
    Inline { len: u8, bytes: [u8; INLINE] },
    Boxed(Box<[u8]>),
}

impl Deref for CacheKey {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            CacheKey::Inline { len, bytes } => &bytes[..*len as usize],
            CacheKey::Boxed(bytes) => bytes,
        }
    }
}

impl Borrow<[u8]> for CacheKey {
    fn borrow(&self) -> &[u8] {
        self
    }
}

impl From<&[u8]> for CacheKey {
    fn from(key: &[u8]) -> Self {
        if key.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..key.len()].copy_from_slice(key);
            CacheKey::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            CacheKey::Boxed(key.into())
        }
    }
}

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for CacheKey {}

impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state)
    }
}

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", &**self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn a_key_hashes_and_compares_as_its_bytes_inline_or_boxed() {
        let hasher = hashbrown::DefaultHashBuilder::default();
        for key in [&b""[..], b"word", &[7; INLINE], &[9; INLINE + 1]] {
            let cached = CacheKey::from(key);
            assert_eq!(
                matches!(cached, CacheKey::Inline { .. }),
                key.len() <= INLINE
            );
            assert_eq!(&*cached, key);
            assert_eq!(hasher.hash_one(&cached), hasher.hash_one(key));
        }
        let mut map: hashbrown::HashMap<CacheKey, u32> = hashbrown::HashMap::default();
        map.entry_ref(&b"short"[..]).or_insert(1);
        map.entry_ref(&[1; 40][..]).or_insert(2);
        assert_eq!(map.get(&b"short"[..]), Some(&1));
        assert_eq!(map.get(&[1; 40][..]), Some(&2));
        assert_eq!(map.get(&b"shor"[..]), None);
    }
}
