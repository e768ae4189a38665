//! `wordcount-split`: the first stage of the word-count example. Splits each
//! text line into lowercase words and emits every word keyed by itself.
//!
//! Config `fail_on = "WORD"` makes it fail (return an error) on that exact
//! word: the failure-recovery demo (restart from the last checkpoint).

use weir_sdk::{Config, Context, Error, Metadata, Operator, Record, export_operator};

/// Stateless splitter.
struct Split {
    fail_on: Option<String>,
}

impl Operator for Split {
    fn metadata() -> Metadata {
        Metadata::new("split", env!("CARGO_PKG_VERSION"))
    }

    fn open(config: &Config) -> Result<Self, Error> {
        Ok(Split {
            fail_on: config.get::<String>("fail_on")?,
        })
    }

    fn process(&mut self, ctx: &mut Context, _input: u32, record: Record<'_>) -> Result<(), Error> {
        let line = record.value_str()?;
        for word in line
            .split(|c: char| c.is_whitespace() || c.is_ascii_punctuation())
            .filter(|w| !w.is_empty())
        {
            if self.fail_on.as_deref() == Some(word) {
                return Err(Error::msg(format_args!(
                    "found the word {word:?} (config fail_on)"
                )));
            }
            let word = word.to_lowercase();
            ctx.emit(Some(word.as_bytes()), &word);
        }
        Ok(())
    }
}

export_operator!(Split);
