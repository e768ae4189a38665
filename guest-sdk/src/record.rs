//! Records in (borrowed from the host's buffer), records out, and timers.

use crate::Error;

/// One input record, borrowed from the batch the host handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    key: Option<&'a [u8]>,
    value: &'a [u8],
    timestamp: Option<i64>,
}

impl<'a> Record<'a> {
    pub(crate) fn new(key: Option<&'a [u8]>, value: &'a [u8], timestamp: Option<i64>) -> Self {
        Self {
            key,
            value,
            timestamp,
        }
    }

    /// The partitioning key; `None` on unkeyed streams.
    pub fn key(&self) -> Option<&'a [u8]> {
        self.key
    }

    /// The value bytes.
    pub fn value(&self) -> &'a [u8] {
        self.value
    }

    /// The value as UTF-8 text.
    pub fn value_str(&self) -> Result<&'a str, Error> {
        Ok(std::str::from_utf8(self.value)?)
    }

    /// Event time in milliseconds since the Unix epoch, if the record has one.
    pub fn timestamp(&self) -> Option<i64> {
        self.timestamp
    }
}

/// A record to emit, built with [`OutRecord::new`] and the builder methods.
///
/// Without [`timestamp`](OutRecord::timestamp) it gets the timestamp of the
/// record being processed (or of the event-time timer firing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Vec<u8>,
    pub(crate) timestamp: Option<i64>,
}

impl OutRecord {
    /// An unkeyed record with this value.
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: None,
            value: value.into(),
            timestamp: None,
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the event time (ms since the Unix epoch).
    pub fn timestamp(mut self, timestamp: i64) -> Self {
        self.timestamp = Some(timestamp);
        self
    }
}

/// Which clock a timer follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeDomain {
    /// Fires when the task's watermark passes the timestamp.
    EventTime,
    /// Fires when the host's wall clock passes the timestamp.
    ProcessingTime,
}

/// A timer firing, passed to [`Operator::on_timer`](crate::Operator::on_timer).
/// State calls during `on_timer` are scoped to `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timer {
    /// The clock the timer was registered on.
    pub domain: TimeDomain,
    /// The timestamp it was registered for (ms).
    pub timestamp: i64,
    /// The key it was registered under.
    pub key: Option<Vec<u8>>,
}
