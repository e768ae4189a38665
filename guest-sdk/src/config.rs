//! The operator's configuration: the job file's `config` table, as JSON.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Error;

/// The job file's `config` table for this operator, as the host passed it
/// (JSON; `{}` when the job sets none).
#[derive(Debug, Clone)]
pub struct Config {
    raw: String,
    value: Value,
}

impl Config {
    /// Parses a configuration; an empty string is the empty object `{}`.
    pub fn from_json(raw: &str) -> Result<Self, Error> {
        let raw = if raw.trim().is_empty() { "{}" } else { raw };
        let value = serde_json::from_str(raw)
            .map_err(|e| Error::msg(format_args!("config is not valid JSON: {e}")))?;
        Ok(Self {
            raw: raw.to_owned(),
            value,
        })
    }

    /// The value of top-level key `key`, or `None` when it is absent or
    /// `null`. The error names the key when the value does not deserialize
    /// as `T`.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Error> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => T::deserialize(v)
                .map(Some)
                .map_err(|e| Error::msg(format_args!("config key `{key}`: {e}"))),
        }
    }

    /// The whole configuration deserialized as `T` (typically a
    /// `#[derive(Deserialize)]` struct with `#[serde(default)]` fields).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, Error> {
        T::deserialize(&self.value).map_err(|e| Error::msg(format_args!("config: {e}")))
    }

    /// The raw JSON text.
    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_empty_object() -> Result<(), Error> {
        let config = Config::from_json("")?;
        assert_eq!(config.as_str(), "{}");
        assert_eq!(config.get::<u64>("size_ms")?, None);
        Ok(())
    }

    #[test]
    fn get_and_parse() -> Result<(), Error> {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Cfg {
            size_ms: i64,
            #[serde(default)]
            emit: Option<String>,
        }
        let config = Config::from_json(r#"{"size_ms": 1000, "flag": null}"#)?;
        assert_eq!(config.get::<i64>("size_ms")?, Some(1000));
        assert_eq!(config.get::<bool>("flag")?, None);
        assert_eq!(
            config.parse::<Cfg>()?,
            Cfg {
                size_ms: 1000,
                emit: None
            }
        );
        let err = config.get::<String>("size_ms").err().map(|e| e.to_string());
        assert!(err.is_some_and(|m| m.contains("`size_ms`")));
        assert!(Config::from_json("{oops").is_err());
        Ok(())
    }
}
