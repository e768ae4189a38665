//! [`SmallBytes`]: the keys and the value-state values of `KeyedState`'s
//! cache. Up to [`INLINE`] bytes (most stream keys: words, ids; most
//! values: counts, small records) are stored in the cache's entry itself,
//! so a lookup compares bytes it has already loaded and a value is read
//! without following a pointer to another cache line; longer ones are
//! boxed. It hashes and compares exactly as the `[u8]` it holds, so the
//! cache is probed with plain byte slices.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

/// The longest key stored inline.
pub const INLINE: usize = 22;

#[derive(Clone)]
pub enum SmallBytes {
    Inline { len: u8, bytes: [u8; INLINE] },
    Boxed(Box<[u8]>),
}

impl Deref for SmallBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            SmallBytes::Inline { len, bytes } => &bytes[..*len as usize],
            SmallBytes::Boxed(bytes) => bytes,
        }
    }
}

impl SmallBytes {
    /// Replaces the bytes, reusing a boxed buffer of the same length.
    pub fn set(&mut self, value: &[u8]) {
        match self {
            SmallBytes::Boxed(bytes) if bytes.len() == value.len() => bytes.copy_from_slice(value),
            _ => *self = SmallBytes::from(value),
        }
    }
}

impl Borrow<[u8]> for SmallBytes {
    fn borrow(&self) -> &[u8] {
        self
    }
}

impl From<&[u8]> for SmallBytes {
    fn from(key: &[u8]) -> Self {
        if key.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..key.len()].copy_from_slice(key);
            SmallBytes::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            SmallBytes::Boxed(key.into())
        }
    }
}

impl PartialEq for SmallBytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for SmallBytes {}

impl Hash for SmallBytes {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state)
    }
}

impl std::fmt::Debug for SmallBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", &**self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn bytes_hash_and_compare_as_their_slice_inline_or_boxed() {
        let hasher = hashbrown::DefaultHashBuilder::default();
        for key in [&b""[..], b"word", &[7; INLINE], &[9; INLINE + 1]] {
            let cached = SmallBytes::from(key);
            assert_eq!(
                matches!(cached, SmallBytes::Inline { .. }),
                key.len() <= INLINE
            );
            assert_eq!(&*cached, key);
            assert_eq!(hasher.hash_one(&cached), hasher.hash_one(key));
        }
        let mut map: hashbrown::HashMap<SmallBytes, u32> = hashbrown::HashMap::default();
        map.entry_ref(&b"short"[..]).or_insert(1);
        map.entry_ref(&[1; 40][..]).or_insert(2);
        assert_eq!(map.get(&b"short"[..]), Some(&1));
        assert_eq!(map.get(&[1; 40][..]), Some(&2));
        assert_eq!(map.get(&b"shor"[..]), None);
        let mut value = SmallBytes::from(&b"1"[..]);
        for next in [&[2; 30][..], &[3; 30], b"4", &[5; 31]] {
            value.set(next);
            assert_eq!(&*value, next);
        }
    }
}
