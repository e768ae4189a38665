//! `wordcount-count-v2` (with its migration from v1) that traps — a Wasm
//! `unreachable` — on the 1000th record an instance processes: an upgrade
//! that restores fine and then fails during its probation, so the running
//! host rolls it back.

include!("../../../../examples/wordcount/count-v2/src/operator.rs");

use weir_sdk::{Migrate, Timer, export_operator};

/// Records before the trap.
const TRAP_AT: u64 = 1000;

pub struct CountV2Trap {
    inner: CountV2,
    processed: u64,
}

impl Operator for CountV2Trap {
    fn metadata() -> Metadata {
        CountV2::metadata()
    }

    fn open(config: &Config) -> Result<Self, Error> {
        Ok(CountV2Trap {
            inner: CountV2::open(config)?,
            processed: 0,
        })
    }

    fn process(&mut self, ctx: &mut Context, input: u32, record: Record<'_>) -> Result<(), Error> {
        self.processed += 1;
        if self.processed == TRAP_AT {
            // A trap, not an error value: the instance is gone.
            std::process::abort();
        }
        self.inner.process(ctx, input, record)
    }

    fn on_timer(&mut self, ctx: &mut Context, timer: Timer) -> Result<(), Error> {
        self.inner.on_timer(ctx, timer)
    }
}

include!("../../../../examples/wordcount/count-v2/src/migrate.rs");

impl Migrate for CountV2Trap {
    fn migrate(state: &str, from_version: u32, value: &[u8]) -> Result<Vec<u8>, Error> {
        CountV2::migrate(state, from_version, value)
    }
}

export_operator!(CountV2Trap, migrate);
