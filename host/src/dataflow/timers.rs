//! Per-key timers of one operator subtask. Event-time timers fire when the
//! watermark reaches them; processing-time timers when the wall clock does.
//! Registering the same (time, key) twice keeps one timer (Flink's rule).

use std::collections::BTreeSet;

use crate::types::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeDomain {
    EventTime,
    ProcessingTime,
}

/// A timer that is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiredTimer {
    pub domain: TimeDomain,
    pub timestamp: Timestamp,
    pub key: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct TimerService {
    event_time: BTreeSet<(Timestamp, Vec<u8>)>,
    processing_time: BTreeSet<(Timestamp, Vec<u8>)>,
}

impl TimerService {
    fn set(&mut self, domain: TimeDomain) -> &mut BTreeSet<(Timestamp, Vec<u8>)> {
        match domain {
            TimeDomain::EventTime => &mut self.event_time,
            TimeDomain::ProcessingTime => &mut self.processing_time,
        }
    }

    pub fn register(&mut self, domain: TimeDomain, timestamp: Timestamp, key: &[u8]) {
        self.set(domain).insert((timestamp, key.to_vec()));
    }

    pub fn delete(&mut self, domain: TimeDomain, timestamp: Timestamp, key: &[u8]) {
        self.set(domain).remove(&(timestamp, key.to_vec()));
    }

    /// Removes and returns the earliest timer of `domain` at or before `time`.
    pub fn pop_due(&mut self, domain: TimeDomain, time: Timestamp) -> Option<FiredTimer> {
        let set = self.set(domain);
        let first = set.first()?;
        if first.0 > time {
            return None;
        }
        let (timestamp, key) = set.pop_first()?;
        Some(FiredTimer {
            domain,
            timestamp,
            key,
        })
    }

    /// When the next processing-time timer is due.
    pub fn next_processing_time(&self) -> Option<Timestamp> {
        self.processing_time.first().map(|(t, _)| *t)
    }

    pub fn len(&self) -> usize {
        self.event_time.len() + self.processing_time.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_millis() -> Timestamp {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Timestamp)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_time_order_and_dedupes() {
        let mut timers = TimerService::default();
        timers.register(TimeDomain::EventTime, 20, b"b");
        timers.register(TimeDomain::EventTime, 10, b"a");
        timers.register(TimeDomain::EventTime, 10, b"a");
        timers.register(TimeDomain::EventTime, 30, b"c");
        timers.delete(TimeDomain::EventTime, 30, b"c");
        assert_eq!(timers.len(), 2);
        assert!(timers.pop_due(TimeDomain::EventTime, 9).is_none());
        let first = timers.pop_due(TimeDomain::EventTime, 25).expect("due");
        assert_eq!((first.timestamp, first.key.as_slice()), (10, &b"a"[..]));
        let second = timers.pop_due(TimeDomain::EventTime, 25).expect("due");
        assert_eq!(second.timestamp, 20);
        assert!(timers.pop_due(TimeDomain::EventTime, i64::MAX).is_none());
    }
}
