// The operator of `wordcount-count-v2`, shared (through `include!`) with
// the test plugin that exports it without its migration.

use serde::{Deserialize, Serialize};
use weir_sdk::{Config, Context, Error, Metadata, Operator, Record, ValueState};

/// The state of one word. v1 stored the bare count (`u64`, schema
/// version 1); v2 adds when the word was last seen.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counted {
    pub count: u64,
    /// Event time of the word's latest record, if it had one (None for
    /// counts migrated from v1).
    pub last_seen: Option<i64>,
}

/// Keyed running count, same output as v1: `"<word> <count>"` per update.
pub struct CountV2 {
    state: ValueState<Counted>,
}

impl Operator for CountV2 {
    fn metadata() -> Metadata {
        Metadata::new("count", env!("CARGO_PKG_VERSION")).value_state("count", 2)
    }

    fn open(config: &Config) -> Result<Self, Error> {
        match config.get::<String>("emit")?.as_deref() {
            None | Some("updates") => {}
            Some(other) => {
                return Err(Error::msg(format_args!(
                    "config key `emit`: unsupported value {other:?} (the only mode is \"updates\")"
                )));
            }
        }
        Ok(CountV2 {
            state: ValueState::new("count"),
        })
    }

    fn process(&mut self, ctx: &mut Context, _input: u32, record: Record<'_>) -> Result<(), Error> {
        let mut counted = self.state.get()?.unwrap_or_default();
        counted.count += 1;
        counted.last_seen = record.timestamp().or(counted.last_seen);
        self.state.set(&counted)?;
        let word = match record.key() {
            Some(key) => std::str::from_utf8(key)?,
            None => record.value_str()?,
        };
        ctx.emit(record.key(), format!("{word} {}", counted.count));
        Ok(())
    }
}
