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

    /// Every timer as bytes, for a checkpoint: per timer a domain byte, the
    /// time (i64 LE), the key length (u32 LE) and the key.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (domain, set) in [(0u8, &self.event_time), (1u8, &self.processing_time)] {
            for (timestamp, key) in set {
                out.push(domain);
                out.extend_from_slice(&timestamp.to_le_bytes());
                out.extend_from_slice(&(key.len() as u32).to_le_bytes());
                out.extend_from_slice(key);
            }
        }
        out
    }

    /// Adds the timers of an [`encode`](Self::encode)d snapshot whose key
    /// `keep` accepts (a subtask keeps its own key groups).
    pub fn restore(&mut self, bytes: &[u8], keep: impl Fn(&[u8]) -> bool) -> Result<(), String> {
        let mut rest = bytes;
        let mut take = |n: usize| -> Result<&[u8], String> {
            if rest.len() < n {
                return Err("truncated timers".to_string());
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        while let Ok(domain) = take(1) {
            let domain = match domain[0] {
                0 => TimeDomain::EventTime,
                1 => TimeDomain::ProcessingTime,
                other => return Err(format!("unknown timer domain {other}")),
            };
            let timestamp = i64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
            let key = take(len)?;
            if keep(key) {
                self.register(domain, timestamp, key);
            }
        }
        Ok(())
    }
}

pub use crate::types::now_millis;

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

    #[test]
    fn encodes_and_restores_filtered_by_key() {
        let mut timers = TimerService::default();
        timers.register(TimeDomain::EventTime, -5, b"a");
        timers.register(TimeDomain::ProcessingTime, 7, b"bb");
        timers.register(TimeDomain::EventTime, 9, b"");
        let bytes = timers.encode();
        let mut all = TimerService::default();
        all.restore(&bytes, |_| true).expect("restore");
        assert_eq!(all.encode(), bytes);
        let mut some = TimerService::default();
        some.restore(&bytes, |k| k == b"bb").expect("restore");
        assert_eq!(some.len(), 1);
        assert_eq!(some.next_processing_time(), Some(7));
        assert!(all.restore(&bytes[..bytes.len() - 1], |_| true).is_err());
    }
}
