//! `wordcount-count`: the second stage of the word-count example. Keeps a
//! running count per word (key) and emits `"<word> <count>"` on every update.

use weir_sdk::{Config, Context, Error, Metadata, Operator, Record, ValueState, export_operator};

/// Keyed running count.
struct Count {
    count: ValueState<u64>,
}

impl Operator for Count {
    fn metadata() -> Metadata {
        Metadata::new("count", env!("CARGO_PKG_VERSION")).value_state("count", 1)
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
        Ok(Count {
            count: ValueState::new("count"),
        })
    }

    fn process(&mut self, ctx: &mut Context, _input: u32, record: Record<'_>) -> Result<(), Error> {
        let count = self.count.get()?.unwrap_or(0) + 1;
        self.count.set(&count)?;
        let word = match record.key() {
            Some(key) => std::str::from_utf8(key)?,
            None => record.value_str()?,
        };
        // `word count`, written straight into the output buffer.
        ctx.emit_with(record.key(), |value| {
            value.extend_from_slice(word.as_bytes());
            value.push(b' ');
            value.extend_from_slice(itoa::Buffer::new().format(count).as_bytes());
        });
        Ok(())
    }
}

export_operator!(Count);
