//! `ttl-count-plugin`: a test plugin built on weir-sdk; per key, a count in
//! a value state with a time-to-live of one hour (declared with the SDK;
//! job files override it with `state_ttl`) and a total in one without.
//! Emits `"<key> <count> <total>"` for every record: once the count has
//! expired it starts again from 1 while the total goes on.

use std::time::Duration;

use weir_sdk::{
    Config, Context, Error, Metadata, Operator, Record, StateTtl, ValueState, export_operator,
};

struct TtlCount {
    count: ValueState<u64>,
    total: ValueState<u64>,
}

impl Operator for TtlCount {
    fn metadata() -> Metadata {
        Metadata::new("ttl-count", env!("CARGO_PKG_VERSION"))
            .value_state("count", 1)
            .ttl(StateTtl::after(Duration::from_secs(3600)))
            .value_state("total", 1)
    }

    fn open(_config: &Config) -> Result<Self, Error> {
        Ok(TtlCount {
            count: ValueState::new("count"),
            total: ValueState::new("total"),
        })
    }

    fn process(&mut self, ctx: &mut Context, _input: u32, record: Record<'_>) -> Result<(), Error> {
        let count = self.count.get()?.unwrap_or(0) + 1;
        self.count.set(&count)?;
        let total = self.total.get()?.unwrap_or(0) + 1;
        self.total.set(&total)?;
        let key = std::str::from_utf8(record.key().unwrap_or_default())?;
        ctx.emit(record.key(), format!("{key} {count} {total}"));
        Ok(())
    }
}

export_operator!(TtlCount);
