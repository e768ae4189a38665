//! Live counters of a running attempt, per node and subtask: what the
//! progress line, the running host's job view and the Prometheus endpoint
//! read. Tasks update them once per batch (relaxed atomics), never per
//! record; time is accounted in nanoseconds as *busy* (processing),
//! *idle* (waiting for input) or *back-pressured* (waiting for room
//! downstream), as Flink's `busyTimeMsPerSecond` and friends.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Whether tasks time their work (on unless a benchmark measures what
/// the timing costs).
static TIMING: AtomicBool = AtomicBool::new(true);

/// Turns the busy/idle/back-pressured/plugin timing on or off for the
/// whole process (the throughput benchmark compares both).
pub fn set_timing(on: bool) {
    TIMING.store(on, Ordering::Relaxed);
}

/// A clock for one stretch of a task's work: reads the time only while
/// timing is on.
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch(Option<Instant>);

impl Stopwatch {
    pub fn start() -> Self {
        Self(TIMING.load(Ordering::Relaxed).then(Instant::now))
    }

    /// Time since the start (zero while timing is off).
    pub fn elapsed(&self) -> Duration {
        self.0.map_or(Duration::ZERO, |started| started.elapsed())
    }
}

/// Live counters of one node: one [`SubtaskMetrics`] per subtask.
#[derive(Debug)]
pub struct NodeMetrics {
    pub uid: String,
    pub is_source: bool,
    pub is_sink: bool,
    pub subtasks: Vec<SubtaskMetrics>,
}

impl NodeMetrics {
    pub fn new(uid: &str, is_source: bool, is_sink: bool, parallelism: u32) -> Self {
        Self {
            uid: uid.to_string(),
            is_source,
            is_sink,
            subtasks: (0..parallelism)
                .map(|_| SubtaskMetrics::default())
                .collect(),
        }
    }

    /// Subtask `index`'s counters.
    pub fn subtask(&self, index: u32) -> &SubtaskMetrics {
        &self.subtasks[index as usize]
    }

    fn sum(&self, counter: impl Fn(&SubtaskMetrics) -> &AtomicU64) -> u64 {
        self.subtasks
            .iter()
            .map(|s| counter(s).load(Ordering::Relaxed))
            .sum()
    }

    /// Records taken in by every subtask.
    pub fn records_in(&self) -> u64 {
        self.sum(|s| &s.records_in)
    }

    /// Records emitted by every subtask.
    pub fn records_out(&self) -> u64 {
        self.sum(|s| &s.records_out)
    }
}

pub use crate::state::TableMetrics;

/// Live counters of one subtask.
#[derive(Debug)]
pub struct SubtaskMetrics {
    pub records_in: AtomicU64,
    pub records_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub busy_ns: AtomicU64,
    pub idle_ns: AtomicU64,
    pub backpressured_ns: AtomicU64,
    /// Time inside the operator's plugin calls (process, timers).
    pub plugin_ns: AtomicU64,
    /// The current watermark (`i64::MIN`: none yet).
    pub watermark: AtomicI64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Keyed state per table, refreshed at every snapshot.
    pub state: Mutex<Vec<TableMetrics>>,
}

impl Default for SubtaskMetrics {
    fn default() -> Self {
        Self {
            records_in: AtomicU64::new(0),
            records_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            idle_ns: AtomicU64::new(0),
            backpressured_ns: AtomicU64::new(0),
            plugin_ns: AtomicU64::new(0),
            watermark: AtomicI64::new(i64::MIN),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            state: Mutex::new(Vec::new()),
        }
    }
}

impl SubtaskMetrics {
    pub fn took_in(&self, records: usize, bytes: usize) {
        self.records_in.fetch_add(records as u64, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn emitted(&self, records: u64, bytes: u64) {
        self.records_out.fetch_add(records, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn busy(&self, time: Duration) {
        self.busy_ns.fetch_add(nanos(time), Ordering::Relaxed);
    }

    pub fn idle(&self, time: Duration) {
        self.idle_ns.fetch_add(nanos(time), Ordering::Relaxed);
    }

    pub fn backpressured(&self, time: Duration) {
        self.backpressured_ns
            .fetch_add(nanos(time), Ordering::Relaxed);
    }

    pub fn in_plugin(&self, time: Duration) {
        self.plugin_ns.fetch_add(nanos(time), Ordering::Relaxed);
    }

    /// The watermark, if one arrived.
    pub fn watermark(&self) -> Option<i64> {
        Some(self.watermark.load(Ordering::Relaxed)).filter(|w| *w != i64::MIN)
    }
}

/// Counters of a job across its attempts (and, in the running host,
/// across its runs).
#[derive(Debug, Default)]
pub struct JobMetrics {
    pub restarts: AtomicU64,
    /// Failed attempts by (uid of the failing task, kind of failure).
    failures: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl JobMetrics {
    /// An attempt failed with `error`.
    pub fn failed(&self, error: &super::TaskError) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        *failures
            .entry((error.uid.clone(), error.kind().name()))
            .or_default() += 1;
    }

    /// Failed attempts by (uid, kind).
    pub fn failures(&self) -> BTreeMap<(String, &'static str), u64> {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn nanos(time: Duration) -> u64 {
    u64::try_from(time.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_totals_sum_their_subtasks() {
        let node = NodeMetrics::new("count", false, false, 3);
        node.subtask(0).took_in(10, 100);
        node.subtask(2).took_in(5, 50);
        node.subtask(1).emitted(7, 70);
        assert_eq!(node.records_in(), 15);
        assert_eq!(node.records_out(), 7);
        assert_eq!(node.subtask(2).bytes_in.load(Ordering::Relaxed), 50);
        assert_eq!(node.subtask(0).watermark(), None);
        node.subtask(0).watermark.store(42, Ordering::Relaxed);
        assert_eq!(node.subtask(0).watermark(), Some(42));
    }
}
