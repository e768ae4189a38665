//! Sources and sinks.
//!
//! | connector | position in a checkpoint | guarantee (with checkpoints) |
//! |---|---|---|
//! | `file` source | byte offset of the next line | replayable: exactly-once |
//! | `generator` source | next sequence number of the subtask | replayable: exactly-once |
//! | `socket` source | bytes read (not used on restore) | not replayable: at-most-once. A restarted attempt reconnects and reads on; lines read after the last completed checkpoint are lost, state stays exactly-once for the lines it kept |
//! | `stdout` sink | — | at-least-once: prints as records arrive, so a restart reprints what followed the last checkpoint |
//! | `file` sink | pending part files | exactly-once: two-phase commit, files renamed into place when the checkpoint covering them completes |
//! | `blackhole` sink | — | discards, counts |
//! | `nats` source | per partition, the last stream sequence emitted | replayable: exactly-once, at any parallelism (partitions are reassigned on restore) |
//! | `nats` sink, `delivery = "exactly-once"` | pending spool files | exactly-once: an epoch is published when its checkpoint completes (in the background, while the next epoch is spooled), each message with a deterministic `Nats-Msg-Id`; a recovery republishes the restored checkpoint's epochs and JetStream drops what it stored already. Holds while the stream's `duplicate_window` exceeds the time from a commit's first publish to the recovery's republish: the start fails when it is not longer than the restart delay (a resume by hand must come within it) |
//! | `nats` sink, `delivery = "at-least-once"` | — | at-least-once: publishes as records arrive, every publish acknowledged before the checkpoint's ack |
//! | `kafka` source | per partition, the next offset to read | replayable: exactly-once, at any parallelism (partitions are assigned by the job and reassigned on restore); `read_committed` by default |
//! | `kafka` sink, `delivery = "exactly-once"` | the pre-committed transactions (transactional id, producer id, epoch) | exactly-once: a Kafka transaction per subtask per checkpoint, flushed at the barrier, committed when the checkpoint completes; a restore commits what its checkpoint recorded, then fences the sink's transactional ids so the broker aborts what was written after it |
//! | `kafka` sink, `delivery = "at-least-once"` | — | at-least-once: produced as records arrive, every produce acknowledged before the checkpoint's ack |
//! | `exchange` source | per key group, the last stream sequence emitted (and how many writers ended on it) | replayable: exactly-once, at any parallelism (key groups are reassigned on restore) |
//! | `exchange` sink | pending spool files | exactly-once, as the `nats` sink: an epoch's records, batched per key group, are published when its checkpoint completes, with deterministic message ids |
//!
//! Sources are interrupted by checkpoint triggers in the middle of
//! `next_batch`; each keeps its position consistent with the records it has
//! appended at every await (a partly read line stays buffered, uncounted).

pub mod exchange;
pub mod file;
pub mod generator;
pub mod kafka;
pub mod nats;
pub mod sinks;
pub mod socket;

use crate::dataflow::{FailureKind, OperatorError};
use crate::job::LineFormat;
use crate::types::RecordBatch;

/// A line without its trailing `\n` or `\r\n`.
/// Paces a source to `rate` records per second (None: as fast as
/// possible): record n of the run is due at n / rate seconds.
#[derive(Debug)]
pub struct Pace {
    rate: Option<f64>,
    started: std::time::Instant,
    produced: u64,
}

impl Pace {
    pub fn new(rate: Option<f64>) -> Self {
        Self {
            rate,
            started: std::time::Instant::now(),
            produced: 0,
        }
    }

    /// Waits until the next record is due; returns how many of `max` the
    /// next batch may take (a twentieth of a second's worth when paced).
    /// Cancel-safe: nothing changes until the records are counted.
    pub async fn next(&self, max: usize) -> usize {
        let Some(rate) = self.rate else {
            return max;
        };
        let due = std::time::Duration::from_secs_f64(self.produced as f64 / rate);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
        max.min(((rate / 20.0).ceil() as usize).max(1))
    }

    /// Counts records produced.
    pub fn produced(&mut self, records: u64) {
        self.produced += records;
    }
}

pub fn strip_line_ending(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Appends one text line to `batch`, keyed and timestamped per `format`.
/// `line` has no trailing newline. `describe` names the line in errors.
pub fn push_line(
    batch: &mut RecordBatch,
    line: &[u8],
    format: Option<&LineFormat>,
    describe: impl Fn() -> String,
) -> Result<(), OperatorError> {
    push_fields(batch, line, format, None, None, describe)
}

/// [`push_line`] with a key and timestamp for the record where `format`
/// takes none from its fields (a message's key and time).
pub fn push_fields(
    batch: &mut RecordBatch,
    line: &[u8],
    format: Option<&LineFormat>,
    key: Option<&[u8]>,
    timestamp: Option<i64>,
    describe: impl Fn() -> String,
) -> Result<(), OperatorError> {
    let Some(format) = format else {
        batch.push(key, line, timestamp);
        return Ok(());
    };
    if line.is_empty() {
        return Ok(());
    }
    let text = std::str::from_utf8(line).map_err(|_| {
        OperatorError::new(
            FailureKind::Connector,
            format!("{} is not UTF-8", describe()),
        )
    })?;
    let fields: Vec<&str> = text.split(format.delimiter.as_str()).collect();
    let field = |index: usize, what: &str| {
        fields.get(index).map(|f| f.trim()).ok_or_else(|| {
            OperatorError::new(
                FailureKind::Connector,
                format!(
                    "{}: has {} fields, no field {index} for the {what}",
                    describe(),
                    fields.len()
                ),
            )
        })
    };
    let field_key = format.key.map(|i| field(i, "key")).transpose()?;
    let timestamp = format
        .timestamp
        .map(|i| {
            let raw = field(i, "timestamp")?;
            raw.parse::<i64>().map_err(|_| {
                OperatorError::new(
                    FailureKind::Connector,
                    format!(
                        "{}: timestamp field {i} is {raw:?}, not milliseconds",
                        describe()
                    ),
                )
            })
        })
        .transpose()?
        .or(timestamp);
    batch.push(field_key.map(str::as_bytes).or(key), line, timestamp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_keyed_and_timestamped_by_format() {
        let format = LineFormat {
            delimiter: ",".into(),
            key: Some(1),
            timestamp: Some(0),
        };
        let mut batch = RecordBatch::new();
        push_line(&mut batch, b"1000, acct-1 ,5.00", Some(&format), || {
            "line 1".into()
        })
        .expect("ok");
        let record = batch.get(0).expect("record");
        assert_eq!(record.key, Some(&b"acct-1"[..]));
        assert_eq!(record.timestamp, Some(1000));
        let error = push_line(&mut batch, b"soon,acct", Some(&format), || {
            "input.csv line 2".into()
        })
        .expect_err("bad timestamp");
        assert!(
            error.message.contains("input.csv line 2"),
            "{}",
            error.message
        );
    }
}
