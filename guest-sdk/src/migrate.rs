//! Schema evolution: the optional `migration` export of the WIT contract.
//! An operator whose state encoding changed bumps the state's schema version
//! in its [`Metadata`](crate::Metadata), implements [`Migrate`] and exports
//! itself with `export_operator!(MyOperator, migrate)`. When a job restores
//! a savepoint or checkpoint holding the state at an older version, the host
//! calls [`Migrate::migrate`] for every stored value (each element of a
//! list state, each value of a map state) before the operator opens.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;

/// How an operator rewrites state values written by older versions of it.
pub trait Migrate {
    /// `value` as stored at schema version `from_version` of the state named
    /// `state`; returns it in the encoding the operator declares now. Use
    /// [`migrate_value`] for the typed conversion. An error fails the start
    /// of the job, naming the operator and state.
    fn migrate(state: &str, from_version: u32, value: &[u8]) -> Result<Vec<u8>, Error>;
}

/// Decodes `value` as the old type, converts it with `convert` and encodes
/// the result: a typed migration from `Old` to `New` over the SDK's state
/// encoding (JSON).
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// #[derive(Serialize, Deserialize, Debug, PartialEq)]
/// struct Counted { count: u64, last_seen: Option<i64> }
///
/// let v1 = serde_json::to_vec(&41u64).unwrap();
/// let v2 = weir_sdk::migrate_value(&v1, |count: u64| Counted { count, last_seen: None }).unwrap();
/// let back: Counted = serde_json::from_slice(&v2).unwrap();
/// assert_eq!(back, Counted { count: 41, last_seen: None });
/// ```
pub fn migrate_value<Old: DeserializeOwned, New: Serialize>(
    value: &[u8],
    convert: impl FnOnce(Old) -> New,
) -> Result<Vec<u8>, Error> {
    let old: Old = serde_json::from_slice(value).map_err(|e| {
        Error::msg(format_args!(
            "the stored value does not decode as {}: {e}",
            std::any::type_name::<Old>()
        ))
    })?;
    Ok(serde_json::to_vec(&convert(old))?)
}

/// The error for a state or version an operator cannot migrate.
pub fn unknown_migration(state: &str, from_version: u32) -> Error {
    Error::msg(format_args!(
        "no migration for state `{state}` from schema version {from_version}"
    ))
}
