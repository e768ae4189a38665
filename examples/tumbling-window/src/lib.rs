//! `tumbling-window`: counts records per key in event-time tumbling windows
//! of `size_ms`, emitting each window's count when the watermark passes its
//! end; records for windows already closed go to the `late` side output.

use weir_sdk::{
    Config, Context, Error, MapState, Metadata, Operator, OutRecord, Record, Timer, ValueState,
    export_operator,
};

/// Per-key event-time tumbling window count.
struct TumblingWindow {
    size_ms: i64,
    /// Window start (ms) -> records counted in it.
    windows: MapState<i64, u64>,
    /// Records dropped as late.
    late: ValueState<u64>,
}

impl Operator for TumblingWindow {
    fn metadata() -> Metadata {
        Metadata::new("tumbling-window", env!("CARGO_PKG_VERSION"))
            .map_state("windows", 1)
            .value_state("late", 1)
    }

    fn open(config: &Config) -> Result<Self, Error> {
        let size_ms = config.get::<i64>("size_ms")?.unwrap_or(60_000);
        if size_ms <= 0 {
            return Err(Error::msg(format_args!(
                "config key `size_ms` must be positive, got {size_ms}"
            )));
        }
        Ok(TumblingWindow {
            size_ms,
            windows: MapState::new("windows"),
            late: ValueState::new("late"),
        })
    }

    fn process(&mut self, ctx: &mut Context, _input: u32, record: Record<'_>) -> Result<(), Error> {
        let key = String::from_utf8_lossy(record.key().unwrap_or_default());
        let ts = record.timestamp().ok_or_else(|| match record.key() {
            Some(_) => Error::msg(format_args!(
                "tumbling-window: record with key {key:?} has no timestamp"
            )),
            None => Error::msg("tumbling-window: record without key has no timestamp"),
        })?;
        let start = ts - ts.rem_euclid(self.size_ms);
        let last = start.saturating_add(self.size_ms - 1);
        if last <= ctx.current_watermark() {
            let late = self.late.get()?.unwrap_or(0) + 1;
            self.late.set(&late)?;
            let mut out = OutRecord::new(format!("{key} {ts} late"));
            if let Some(k) = record.key() {
                out = out.key(k);
            }
            ctx.emit_to("late", out);
        } else {
            let count = self.windows.get(&start)?.unwrap_or(0) + 1;
            self.windows.put(&start, &count)?;
            ctx.register_event_time_timer(last);
        }
        Ok(())
    }

    fn on_timer(&mut self, ctx: &mut Context, timer: Timer) -> Result<(), Error> {
        let start = timer.timestamp + 1 - self.size_ms;
        let Some(count) = self.windows.get(&start)? else {
            return Ok(());
        };
        self.windows.remove(&start)?;
        let end = start.saturating_add(self.size_ms);
        let key = timer.key.unwrap_or_default();
        let value = format!("{} {start} {end} {count}", String::from_utf8_lossy(&key));
        ctx.emit_record(OutRecord::new(value).key(key).timestamp(end - 1));
        Ok(())
    }
}

export_operator!(TumblingWindow);
