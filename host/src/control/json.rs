//! What the API's request types need beyond what serde and utoipa derive.
//!
//! JSON has one number type: `2` and `2.0` are the same value, and JSON
//! Schema's `integer` admits both, while serde reads only the first into a
//! `u32`. The count fields of a request read either ([`parallelism`],
//! [`count`]). And a map's values have bounds utoipa cannot attach to them
//! ([`parallelism_schema`]).

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Unexpected, Visitor};
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Type};

/// A whole number that JSON may write with a zero fraction (`3`, `3.0`).
#[derive(Debug, Clone, Copy)]
struct Whole(u64);

impl<'de> Deserialize<'de> for Whole {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WholeVisitor;
        impl Visitor<'_> for WholeVisitor {
            type Value = Whole;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a whole number of 0 or more")
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Whole, E> {
                Ok(Whole(value))
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Whole, E> {
                u64::try_from(value)
                    .map(Whole)
                    .map_err(|_| E::invalid_value(Unexpected::Signed(value), &self))
            }

            fn visit_f64<E: de::Error>(self, value: f64) -> Result<Whole, E> {
                // `u64::MAX as f64` rounds up to 2^64, the first value too large.
                if value.fract() == 0.0 && (0.0..u64::MAX as f64).contains(&value) {
                    Ok(Whole(value as u64))
                } else {
                    Err(E::invalid_value(Unexpected::Float(value), &self))
                }
            }
        }
        deserializer.deserialize_any(WholeVisitor)
    }
}

/// `UpgradeRequest::parallelism`: uid → parallelism, each a whole number
/// that fits a u32 (the range check against the job is the manager's).
pub fn parallelism<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, u32>, D::Error> {
    BTreeMap::<String, Whole>::deserialize(deserializer)?
        .into_iter()
        .map(|(uid, Whole(value))| match u32::try_from(value) {
            Ok(parallelism) => Ok((uid, parallelism)),
            Err(_) => Err(de::Error::custom(format!(
                "the parallelism {value} for `{uid}` is above {}",
                u32::MAX
            ))),
        })
        .collect()
}

/// An optional count (`UpgradeRequest::probation_checkpoints`).
pub fn count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    Ok(Option::<Whole>::deserialize(deserializer)?.map(|Whole(n)| n))
}

/// The schema of [`parallelism`]: an object of uids to 1..=u32::MAX.
pub fn parallelism_schema() -> utoipa::openapi::schema::Object {
    let value = ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
            utoipa::openapi::KnownFormat::Int32,
        )))
        .minimum(Some(1))
        .maximum(Some(u32::MAX));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "uid → new parallelism (at most the job's max_parallelism).",
        ))
        .additional_properties(Some(AdditionalProperties::RefOr(value.into())))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Request {
        #[serde(default, deserialize_with = "parallelism")]
        parallelism: BTreeMap<String, u32>,
        #[serde(default, deserialize_with = "count")]
        checkpoints: Option<u64>,
    }

    fn read(json: &str) -> Result<Request, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn counts_read_whole_numbers_however_json_writes_them() {
        let request = read(r#"{"parallelism": {"count": 3, "split": 2.0}, "checkpoints": 4.0}"#)
            .expect("whole numbers");
        assert_eq!(request.parallelism["count"], 3);
        assert_eq!(request.parallelism["split"], 2);
        assert_eq!(request.checkpoints, Some(4));
        assert_eq!(
            read(r#"{"checkpoints": null}"#).expect("null").checkpoints,
            None
        );
        assert!(read("{}").expect("defaults").parallelism.is_empty());
    }

    #[test]
    fn counts_refuse_fractions_negatives_and_overflow_saying_which() {
        let fraction = read(r#"{"parallelism": {"count": 2.5}}"#).expect_err("a fraction");
        assert!(fraction.contains("2.5"), "{fraction}");
        let negative = read(r#"{"checkpoints": -1}"#).expect_err("negative");
        assert!(negative.contains("-1"), "{negative}");
        let huge = read(r#"{"parallelism": {"count": 4294967296}}"#).expect_err("above u32");
        assert!(
            huge.contains("`count`") && huge.contains("4294967295"),
            "{huge}"
        );
        let text = read(r#"{"parallelism": {"count": "2"}}"#).expect_err("a string");
        assert!(text.contains("whole number"), "{text}");
    }
}
