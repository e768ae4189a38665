//! Typed handles on the host's keyed state. Values and map keys are encoded
//! as JSON (see the crate docs for the exact cross-language contract).

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;
use crate::batch_state::{self, Outcome};
use crate::bindings::weir::operator::state as host;

/// Encodes a state value or map key: compact JSON as `serde_json` writes it.
pub(crate) fn encode<T: Serialize + ?Sized>(state: &str, value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value)
        .map_err(|e| Error::msg(format_args!("state `{state}`: cannot encode as JSON: {e}")))
}

/// [`encode`], appended to `buffer`.
pub(crate) fn encode_into<T: Serialize + ?Sized>(
    state: &str,
    value: &T,
    buffer: &mut Vec<u8>,
) -> Result<(), Error> {
    serde_json::to_writer(buffer, value)
        .map_err(|e| Error::msg(format_args!("state `{state}`: cannot encode as JSON: {e}")))
}

/// Decodes bytes the host stored under state `state`.
pub(crate) fn decode<T: DeserializeOwned>(state: &str, bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::msg(format_args!(
            "state `{state}`: cannot decode stored JSON: {e}"
        ))
    })
}

/// A single value per key, e.g. a running count.
///
/// ```ignore
/// let count: ValueState<u64> = ValueState::new("count");
/// let n = count.get()?.unwrap_or(0) + 1;
/// count.set(&n)?;
/// ```
pub struct ValueState<T> {
    name: String,
    /// Its index among the declared states, once looked up.
    index: Cell<u32>,
    _type: PhantomData<fn() -> T>,
}

/// A list of values per key.
pub struct ListState<T> {
    name: String,
    _type: PhantomData<fn() -> T>,
}

/// A map per key. Entries are stored under the JSON encoding of `K`, so keys
/// need a canonical JSON form (integers, strings, tuples and structs of those;
/// not `HashMap`s).
pub struct MapState<K, V> {
    name: String,
    _type: PhantomData<fn() -> (K, V)>,
}

macro_rules! handle_common {
    ($ty:ident < $($p:ident),+ > $(, $field:ident: $init:expr)*) => {
        impl<$($p),+> $ty<$($p),+> {
            /// A handle on the state declared in
            /// [`Operator::metadata`](crate::Operator::metadata) as `name`.
            /// Handles are cheap; create them once, e.g. in `open`.
            pub fn new(name: impl Into<String>) -> Self {
                Self { name: name.into(), $($field: $init,)* _type: PhantomData }
            }

            /// The declared state name.
            pub fn name(&self) -> &str {
                &self.name
            }
        }

        impl<$($p),+> fmt::Debug for $ty<$($p),+> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_tuple(stringify!($ty)).field(&self.name).finish()
            }
        }

        impl<$($p),+> Clone for $ty<$($p),+> {
            fn clone(&self) -> Self {
                Self::new(self.name.clone())
            }
        }
    };
}
handle_common!(ValueState<T>, index: Cell::new(u32::MAX));
handle_common!(ListState<T>);
handle_common!(MapState<K, V>);

impl<T: Serialize + DeserializeOwned> ValueState<T> {
    /// The current key's value, if set.
    pub fn get(&self) -> Result<Option<T>, Error> {
        let read = |bytes: Option<&[u8]>| bytes.map(|b| decode(&self.name, b)).transpose();
        if let Outcome::Done(value) = batch_state::get(&self.name, &self.index, read) {
            return value;
        }
        crate::cursor::sync();
        host::value_get(&self.name)
            .map(|bytes| decode(&self.name, &bytes))
            .transpose()
    }

    /// Replaces the current key's value.
    pub fn set(&self, value: &T) -> Result<(), Error> {
        let in_place = |buffer: &mut Vec<u8>| encode_into(&self.name, value, buffer);
        if let Outcome::Done(done) = batch_state::set(&self.name, &self.index, in_place) {
            return done;
        }
        crate::cursor::sync();
        host::value_set(&self.name, &encode(&self.name, value)?);
        Ok(())
    }

    /// Removes the current key's value.
    pub fn clear(&self) {
        if let Outcome::PerRecord = batch_state::clear(&self.name, &self.index) {
            crate::cursor::sync();
            host::value_clear(&self.name);
        }
    }
}

impl<T: Serialize + DeserializeOwned> ListState<T> {
    /// The current key's list (empty if never written).
    pub fn get(&self) -> Result<Vec<T>, Error> {
        crate::cursor::sync();
        host::list_get(&self.name)
            .iter()
            .map(|bytes| decode(&self.name, bytes))
            .collect()
    }

    /// Appends to the current key's list.
    pub fn add(&self, value: &T) -> Result<(), Error> {
        crate::cursor::sync();
        host::list_add(&self.name, &encode(&self.name, value)?);
        Ok(())
    }

    /// Replaces the current key's list.
    pub fn update(&self, values: &[T]) -> Result<(), Error> {
        let encoded = values
            .iter()
            .map(|v| encode(&self.name, v))
            .collect::<Result<Vec<_>, _>>()?;
        crate::cursor::sync();
        host::list_update(&self.name, &encoded);
        Ok(())
    }

    /// Empties the current key's list.
    pub fn clear(&self) {
        crate::cursor::sync();
        host::list_clear(&self.name);
    }
}

impl<K: Serialize + DeserializeOwned, V: Serialize + DeserializeOwned> MapState<K, V> {
    /// The value under `key` in the current key's map.
    pub fn get(&self, key: &K) -> Result<Option<V>, Error> {
        crate::cursor::sync();
        host::map_get(&self.name, &encode(&self.name, key)?)
            .map(|bytes| decode(&self.name, &bytes))
            .transpose()
    }

    /// Inserts or replaces `key`.
    pub fn put(&self, key: &K, value: &V) -> Result<(), Error> {
        crate::cursor::sync();
        host::map_put(
            &self.name,
            &encode(&self.name, key)?,
            &encode(&self.name, value)?,
        );
        Ok(())
    }

    /// Removes `key` (no-op if absent).
    pub fn remove(&self, key: &K) -> Result<(), Error> {
        crate::cursor::sync();
        host::map_remove(&self.name, &encode(&self.name, key)?);
        Ok(())
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &K) -> Result<bool, Error> {
        crate::cursor::sync();
        Ok(host::map_contains(&self.name, &encode(&self.name, key)?))
    }

    /// All entries of the current key's map, in the host's order.
    pub fn entries(&self) -> Result<Vec<(K, V)>, Error> {
        crate::cursor::sync();
        host::map_entries(&self.name)
            .iter()
            .map(|(k, v)| Ok((decode(&self.name, k)?, decode(&self.name, v)?)))
            .collect()
    }

    /// All keys of the current key's map, in the host's order.
    pub fn keys(&self) -> Result<Vec<K>, Error> {
        crate::cursor::sync();
        host::map_keys(&self.name)
            .iter()
            .map(|k| decode(&self.name, k))
            .collect()
    }

    /// Empties the current key's map.
    pub fn clear(&self) {
        crate::cursor::sync();
        host::map_clear(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug>(value: T, json: &str) {
        let bytes = encode("s", &value).expect("encodes");
        assert_eq!(std::str::from_utf8(&bytes), Ok(json));
        assert_eq!(decode::<T>("s", &bytes).expect("decodes"), value);
    }

    #[test]
    fn json_codec_is_the_documented_contract() {
        round_trip(42u64, "42");
        round_trip(-60_000i64, "-60000");
        round_trip("héllo \"w\"".to_owned(), r#""héllo \"w\"""#);
        round_trip(vec![1u8, 2], "[1,2]");
        round_trip((1i64, "a".to_owned()), r#"[1,"a"]"#);
        round_trip(Some(true), "true");
        round_trip(None::<u32>, "null");

        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Window {
            start: i64,
            count: u64,
        }
        round_trip(Window { start: 0, count: 3 }, r#"{"start":0,"count":3}"#);
    }

    #[test]
    fn decode_errors_name_the_state() {
        let err = decode::<u64>("count", b"\"x\"").expect_err("type mismatch");
        assert!(err.message().starts_with("state `count`:"), "{err}");
        let err = decode::<u64>("count", b"\xff").expect_err("not JSON");
        assert!(err.message().contains("count"), "{err}");
        // Python's json.dumps(ensure_ascii=True) escapes; both decode alike.
        assert_eq!(
            decode::<String>("s", br#""h\u00e9""#).expect("decodes"),
            "hé"
        );
    }

    #[test]
    fn handles_are_cheap_values() {
        let s: MapState<i64, u64> = MapState::new("windows");
        assert_eq!(s.clone().name(), "windows");
        assert_eq!(format!("{s:?}"), r#"MapState("windows")"#);
        let v: ValueState<u64> = ValueState::new(String::from("count"));
        assert_eq!(v.name(), "count");
    }
}
