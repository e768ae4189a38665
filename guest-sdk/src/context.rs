//! The operator's view of the host during a call: emitting records, timers,
//! time and logging.

use serde::Serialize;

use crate::batch::EmitBuffer;
use crate::bindings::weir::operator::types::Record as WitRecord;
use crate::bindings::weir::operator::{log, output, timers};
use crate::{Error, OutRecord};

/// Passed to [`Operator`](crate::Operator) callbacks. Timer calls are scoped
/// by the host to the key of the record (or timer) being processed.
///
/// Main-output records are buffered by the SDK and handed to the host in one
/// `emit-flat` call when the callback returns (or once ~1 MiB accumulates);
/// side-output records go to the host immediately.
pub struct Context {
    out: EmitBuffer,
    default_timestamp: Option<i64>,
}

impl Context {
    pub(crate) const fn new() -> Self {
        Self {
            out: EmitBuffer::new(),
            default_timestamp: None,
        }
    }

    /// Sets the timestamp given to emitted records that have none.
    pub(crate) fn set_default_timestamp(&mut self, timestamp: Option<i64>) {
        self.default_timestamp = timestamp;
    }

    /// Sends the buffered main-output records to the host.
    pub(crate) fn flush(&mut self) {
        if !self.out.is_empty() {
            let (data, entries) = self.out.parts();
            output::emit_flat(data, entries);
            self.out.clear();
        }
    }

    /// Drops buffered records (the callback failed; the task will fail).
    pub(crate) fn discard(&mut self) {
        self.out.clear();
    }

    /// Emits a record to the main output. Its timestamp is that of the
    /// record being processed (or of the event-time timer firing).
    pub fn emit(&mut self, key: Option<&[u8]>, value: impl AsRef<[u8]>) {
        self.push(key, value.as_ref(), None);
    }

    /// Emits a record whose value is formatted straight into the output
    /// buffer, without a `String` per record:
    /// `ctx.emit_fmt(record.key(), format_args!("{word} {count}"))`.
    pub fn emit_fmt(&mut self, key: Option<&[u8]>, value: std::fmt::Arguments<'_>) {
        self.out.push_with(key, self.default_timestamp, |data| {
            // Writing into a Vec cannot fail.
            let _ = std::fmt::write(&mut Bytes(data), value);
        });
        if self.out.is_full() {
            self.flush();
        }
    }

    /// Emits a record whose value `write` appends to the buffer it is
    /// given (the output buffer itself: no copy, no allocation per record).
    pub fn emit_with(&mut self, key: Option<&[u8]>, write: impl FnOnce(&mut Vec<u8>)) {
        self.out.push_with(key, self.default_timestamp, write);
        if self.out.is_full() {
            self.flush();
        }
    }

    /// Emits a record built with [`OutRecord`] to the main output.
    pub fn emit_record(&mut self, record: OutRecord) {
        self.push(record.key.as_deref(), &record.value, record.timestamp);
    }

    /// Emits `value` serialized as JSON to the main output.
    pub fn emit_json<T: Serialize + ?Sized>(
        &mut self,
        key: Option<&[u8]>,
        value: &T,
    ) -> Result<(), Error> {
        let value = serde_json::to_vec(value)?;
        self.push(key, &value, None);
        Ok(())
    }

    /// Emits a record to the side output `side_output`. Records to a side
    /// output no job edge reads are dropped by the host.
    pub fn emit_to(&mut self, side_output: &str, record: OutRecord) {
        let record = WitRecord {
            key: record.key,
            value: record.value,
            timestamp: record.timestamp.or(self.default_timestamp),
        };
        output::emit_to(side_output, &record);
    }

    fn push(&mut self, key: Option<&[u8]>, value: &[u8], timestamp: Option<i64>) {
        self.out
            .push(key, value, timestamp.or(self.default_timestamp));
        if self.out.is_full() {
            self.flush();
        }
    }

    /// Registers an event-time timer for the current key: `on_timer` runs
    /// once the watermark reaches `timestamp`.
    pub fn register_event_time_timer(&self, timestamp: i64) {
        crate::cursor::sync();
        timers::register_event_time_timer(timestamp);
    }

    /// Deletes the current key's event-time timer at `timestamp`, if any.
    pub fn delete_event_time_timer(&self, timestamp: i64) {
        crate::cursor::sync();
        timers::delete_event_time_timer(timestamp);
    }

    /// Registers a processing-time (wall-clock ms) timer for the current key.
    pub fn register_processing_time_timer(&self, timestamp: i64) {
        crate::cursor::sync();
        timers::register_processing_time_timer(timestamp);
    }

    /// Deletes the current key's processing-time timer at `timestamp`, if any.
    pub fn delete_processing_time_timer(&self, timestamp: i64) {
        crate::cursor::sync();
        timers::delete_processing_time_timer(timestamp);
    }

    /// The task's current watermark (ms): records at or before it are late.
    pub fn current_watermark(&self) -> i64 {
        timers::current_watermark()
    }

    /// Wall-clock ms since the Unix epoch, as the host sees it.
    pub fn current_processing_time(&self) -> i64 {
        timers::current_processing_time()
    }

    /// Logs at info level through the host's logger.
    pub fn log_info(&self, message: impl AsRef<str>) {
        log::log(log::Level::Info, message.as_ref());
    }

    /// Logs at warn level through the host's logger.
    pub fn log_warn(&self, message: impl AsRef<str>) {
        log::log(log::Level::Warn, message.as_ref());
    }

    /// Logs at debug level through the host's logger.
    pub fn log_debug(&self, message: impl AsRef<str>) {
        log::log(log::Level::Debug, message.as_ref());
    }
}

/// `fmt::Write` straight into a byte buffer.
struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}
