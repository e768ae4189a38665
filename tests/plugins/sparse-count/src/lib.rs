//! `sparse-count-plugin`: a test plugin built on weir-sdk; counts the
//! records of each key that starts with config `prefix` (every key if
//! absent) in a value state and emits `"<key> <count>"` for them, and
//! drops the other records. With a rare prefix most records of a batch
//! never touch the state, so the SDK serves it with per-record calls
//! instead of fetching it for the whole batch.

use weir_sdk::{Config, Context, Error, Metadata, Operator, Record, ValueState, export_operator};

struct SparseCount {
    prefix: Vec<u8>,
    count: ValueState<u64>,
}

impl Operator for SparseCount {
    fn metadata() -> Metadata {
        Metadata::new("sparse-count", env!("CARGO_PKG_VERSION")).value_state("count", 1)
    }

    fn open(config: &Config) -> Result<Self, Error> {
        Ok(SparseCount {
            prefix: config
                .get::<String>("prefix")?
                .unwrap_or_default()
                .into_bytes(),
            count: ValueState::new("count"),
        })
    }

    fn process(&mut self, ctx: &mut Context, _input: u32, record: Record<'_>) -> Result<(), Error> {
        let key = record.key().unwrap_or_default();
        if !key.starts_with(&self.prefix) {
            return Ok(());
        }
        let count = self.count.get()?.unwrap_or(0) + 1;
        self.count.set(&count)?;
        ctx.emit(
            record.key(),
            format!("{} {count}", std::str::from_utf8(key)?),
        );
        Ok(())
    }
}

export_operator!(SparseCount);
