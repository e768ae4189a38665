//! A source subtask: reads batches, emits watermarks, and at each trigger
//! records its position and sends the barrier; paced when asked.

use crate::dataflow::metrics::Stopwatch;
use crate::dataflow::operator::{OperatorError, Source, SourceStatus, TaskError, TaskInfo};
use crate::dataflow::output::{BATCH_RECORDS, Collector};
use crate::dataflow::runtime::NodeMetrics;
use crate::protocol::{
    CommitSignal, Role, SnapshotStats, SourcePace, StopAfter, SubtaskSnapshot, TaskReport, Trigger,
};
use crate::types::{CheckpointId, MAX_WATERMARK, RecordBatch, StreamEvent, Timestamp};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug};

use super::{Reports, TaskSummary, fail, report_finished};
/// Records a source with a watermark strategy reads between two watermarks:
/// watermarks follow the data closely, so lateness is decided at a fine,
/// deterministic granularity.
pub const WATERMARK_BATCH_RECORDS: usize = 64;

/// Generates bounded-out-of-orderness watermarks from record timestamps.
#[derive(Debug)]
pub struct WatermarkGenerator {
    out_of_orderness: i64,
    max_timestamp: Option<Timestamp>,
    emitted: Timestamp,
}

impl WatermarkGenerator {
    pub fn new(out_of_orderness: Duration) -> Self {
        Self {
            out_of_orderness: out_of_orderness.as_millis() as i64,
            max_timestamp: None,
            emitted: i64::MIN,
        }
    }

    pub fn observe(&mut self, timestamp: Option<Timestamp>) {
        if let Some(t) = timestamp {
            self.max_timestamp = Some(self.max_timestamp.map_or(t, |m| m.max(t)));
        }
    }

    /// The new watermark (`max timestamp - out_of_orderness - 1`) if it advanced.
    pub fn advance(&mut self) -> Option<Timestamp> {
        let candidate = self
            .max_timestamp?
            .saturating_sub(self.out_of_orderness)
            .saturating_sub(1);
        (candidate > self.emitted).then(|| {
            self.emitted = candidate;
            candidate
        })
    }
}

/// A source subtask: reads batches until the source ends or the job is
/// cancelled, emitting watermarks after each batch when configured. When the
/// coordinator triggers checkpoint n, it acks its position (everything
/// emitted so far, nothing more) and sends barrier n on every output
/// channel. `next_batch` may be interrupted by a trigger, so sources keep
/// their position consistent with the records they appended at every await.
///
/// Stop-with-savepoint: a trigger that says `stop` (after the watermark is
/// advanced to the end, with `drain`) sends its barrier and waits for the
/// savepoint; once it completed the source ends without reading more (and
/// without the end-of-input watermark), else it reads on.
#[allow(clippy::too_many_arguments)]
pub async fn run_source(
    info: TaskInfo,
    mut source: Box<dyn Source>,
    mut output: Collector,
    mut watermarks: Option<WatermarkGenerator>,
    metrics: Arc<NodeMetrics>,
    mut cancel: watch::Receiver<bool>,
    mut triggers: mpsc::UnboundedReceiver<Trigger>,
    reports: Reports,
    pace: Arc<SourcePace>,
    mut commits: watch::Receiver<CommitSignal>,
) -> Result<TaskSummary, TaskError> {
    let span =
        tracing::info_span!("source", job = %info.job, uid = %info.uid, subtask = info.subtask);
    async move {
        let fail = fail(&info);
        let mut batch = RecordBatch::with_capacity(BATCH_RECORDS, 64 * BATCH_RECORDS);
        let mut cancelled = *cancel.borrow();
        let max = if watermarks.is_some() {
            WATERMARK_BATCH_RECORDS
        } else {
            BATCH_RECORDS
        };
        let mut triggers_open = true;
        let mut stopped = false;
        let mine = metrics.subtask(info.subtask);
        let mut pacer = Pacer::new(pace);
        let mut committing = true;
        let mut committed = 0u64;
        // An aligned stop's trigger the source is not ready for yet.
        let mut deferred: Option<Trigger> = None;
        while !cancelled {
            let mut barrier = None;
            let mut commit_changed = false;
            let waiting = Stopwatch::start();
            let mut reading = Duration::ZERO;
            let status = tokio::select! {
                biased;
                _ = cancel.changed() => { cancelled = true; SourceStatus::Ended }
                trigger = triggers.recv(), if triggers_open && deferred.is_none() => {
                    match trigger {
                        Some(trigger) => barrier = Some(trigger),
                        None => triggers_open = false,
                    }
                    SourceStatus::More
                }
                changed = commits.changed(), if committing => {
                    match changed {
                        Ok(()) => commit_changed = true,
                        Err(_) => committing = false,
                    }
                    SourceStatus::More
                }
                () = given_up(&mut deferred) => {
                    debug!("the savepoint failed before this source was ready for its barrier; reading on");
                    deferred = None;
                    SourceStatus::More
                }
                status = Polled::new(source.next_batch(&mut batch, max), &mut reading) => status.map_err(&fail)?,
            };
            if commit_changed {
                tell_committed(source.as_mut(), &mut commits, &mut committed);
            }
            // Reading is busy while the source computes, idle while it
            // waits (for data, or for its rate).
            mine.busy(reading);
            mine.idle(waiting.elapsed().saturating_sub(reading));
            if !batch.is_empty() {
                let batch_records = batch.len() as u64;
                mine.emitted(batch_records, batch.data_len() as u64);
                if let Some(generator) = &mut watermarks {
                    generator.observe(batch.max_timestamp());
                }
                output.emit_batch(batch.take()).map_err(&fail)?;
                let flushing = Stopwatch::start();
                output.flush().await.map_err(&fail)?;
                mine.backpressured(flushing.elapsed());
                if let Some(pause) = pacer.after(batch_records) {
                    tokio::time::sleep(pause).await;
                }
                if let Some(watermark) = watermarks.as_mut().and_then(WatermarkGenerator::advance) {
                    output
                        .broadcast(StreamEvent::Watermark(watermark))
                        .await
                        .map_err(&fail)?;
                }
            }
            if let Some(watermark) = source.watermark() {
                output
                    .broadcast(StreamEvent::Watermark(watermark))
                    .await
                    .map_err(&fail)?;
            }
            // An aligned stop waits until the source is ready for it,
            // reading on meanwhile.
            let barrier = match barrier.or_else(|| deferred.take()) {
                Some(trigger) if !ready_for(&trigger, source.as_mut()) => {
                    deferred = Some(trigger);
                    None
                }
                other => other,
            };
            if let Some(trigger) = barrier {
                source_barrier(&info, SourceAt::of(source.as_ref()), &mut output, &reports, &trigger)
                    .await
                    .map_err(&fail)?;
                source.checkpointed(trigger.barrier.id);
                let Trigger { barrier, stop, .. } = trigger;
                let checkpoint = barrier.id;
                if let Some(StopAfter { outcome, .. }) = stop {
                    let completed = tokio::select! {
                        biased;
                        _ = cancel.changed() => { cancelled = true; false }
                        outcome = outcome => outcome.unwrap_or(false),
                    };
                    if completed {
                        stopped = true;
                        break;
                    }
                    debug!(
                        checkpoint = checkpoint.0,
                        "the savepoint failed; reading on"
                    );
                }
            }
            if status == SourceStatus::Ended {
                break;
            }
        }
        if !cancelled && !stopped {
            // Triggers that arrived with the last batch still take part (a
            // stop changes nothing: the input ended anyway), a deferred
            // one first.
            while let Some(trigger) = deferred.take().or_else(|| triggers.try_recv().ok()) {
                source_barrier(&info, SourceAt::of(source.as_ref()), &mut output, &reports, &trigger)
                    .await
                    .map_err(&fail)?;
                source.checkpointed(trigger.barrier.id);
            }
            // A bounded input that ended: every event-time timer may fire.
            output
                .broadcast(StreamEvent::Watermark(MAX_WATERMARK))
                .await
                .map_err(&fail)?;
            // Stay in the checkpoint protocol until the final checkpoint,
            // which covers everything the job emitted (or until the
            // coordinator lets go: checkpointing is off, the job ends).
            let _ = reports.send(TaskReport::InputEnded {
                uid: info.uid.to_string(),
                subtask: info.subtask,
            });
            while triggers_open {
                let trigger = tokio::select! {
                    biased;
                    _ = cancel.changed() => break,
                    trigger = triggers.recv() => trigger,
                    changed = commits.changed(), if committing => {
                        match changed {
                            Ok(()) => tell_committed(source.as_mut(), &mut commits, &mut committed),
                            Err(_) => committing = false,
                        }
                        continue;
                    }
                };
                let Some(trigger) = trigger else {
                    triggers_open = false;
                    continue;
                };
                source_barrier(&info, SourceAt::of(source.as_ref()), &mut output, &reports, &trigger)
                    .await
                    .map_err(&fail)?;
                source.checkpointed(trigger.barrier.id);
                if trigger.is_last() {
                    break;
                }
                if let Some(StopAfter { outcome, .. }) = trigger.stop
                    && outcome.await.unwrap_or(false)
                {
                    break;
                }
            }
        }
        report_finished(&reports, &info, Role::Source);
        output
            .broadcast(StreamEvent::EndOfInput)
            .await
            .map_err(&fail)?;
        debug!(cancelled, stopped, "source finished");
        Ok(TaskSummary {
            uid: info.uid.to_string(),
            subtask: info.subtask,
            ..TaskSummary::default()
        })
    }
    .instrument(span)
    .await
}

/// Slows a source, when asked (its job's [`SourcePace`]), to a
/// share of the rate it read at before: the rate is measured over windows
/// of [`Pacer::WINDOW`] while the source runs free, and a paced source
/// pauses after a batch until its records since the pace was set are not
/// ahead of that share.
struct Pacer {
    pace: Arc<SourcePace>,
    window: Instant,
    window_records: u64,
    /// Records a second before the pace was set.
    rate: f64,
    /// The pace in force, since when, and the records read since.
    paced: Option<(u32, Instant, u64)>,
}

impl Pacer {
    const WINDOW: Duration = Duration::from_millis(250);

    fn new(pace: Arc<SourcePace>) -> Self {
        Self {
            pace,
            window: Instant::now(),
            window_records: 0,
            rate: 0.0,
            paced: None,
        }
    }

    /// After a batch of `records`: how long to pause, if at all.
    fn after(&mut self, records: u64) -> Option<Duration> {
        let percent = self.pace.get();
        if percent >= 100 {
            if self.paced.take().is_some() {
                // The rate while paced says nothing of the source's own.
                (self.window, self.window_records) = (Instant::now(), 0);
            }
            self.window_records += records;
            let elapsed = self.window.elapsed();
            if elapsed >= Self::WINDOW {
                self.rate = self.window_records as f64 / elapsed.as_secs_f64();
                self.window = Instant::now();
                self.window_records = 0;
            }
            return None;
        }
        let allowed = self.rate * f64::from(percent) / 100.0;
        if allowed <= 0.0 {
            return None;
        }
        let (pace, since, count) = self.paced.get_or_insert((percent, Instant::now(), 0));
        if *pace != percent {
            (*pace, *since, *count) = (percent, Instant::now(), 0);
        }
        *count += records;
        Duration::from_secs_f64(*count as f64 / allowed).checked_sub(since.elapsed())
    }
}

/// Where a source stands, taken before its barrier goes out.
struct SourceAt {
    position: Option<u64>,
    partitions: std::collections::BTreeMap<u32, u64>,
}

impl SourceAt {
    fn of(source: &dyn Source) -> Self {
        match source.partitions() {
            Some(partitions) => Self {
                position: None,
                partitions,
            },
            None => Self {
                position: Some(source.position()),
                partitions: Default::default(),
            },
        }
    }
}

/// Whether `trigger` is an aligned stop's (see [`Source::stop_ready`]).
fn is_aligned(trigger: &Trigger) -> bool {
    trigger.stop.as_ref().is_some_and(|s| s.aligned)
}

/// Whether `trigger`'s barrier may go now: an aligned stop's once the
/// source is ready for it ([`Source::stop_ready`]), a cut's once the source
/// reached the cut ([`Source::cut_ready`], asked last: its yes is final),
/// any other at once.
fn ready_for(trigger: &Trigger, source: &mut dyn Source) -> bool {
    if is_aligned(trigger) && !source.stop_ready() {
        return false;
    }
    match &trigger.cut {
        Some(cut) => source.cut_ready(&cut.name),
        None => true,
    }
}

/// Resolves once the savepoint of a deferred trigger (an aligned stop's,
/// a cut's) has an outcome (it can only have failed: this source has not
/// sent its barrier); pending while none is deferred.
async fn given_up(deferred: &mut Option<Trigger>) {
    let Some(trigger) = deferred.as_mut() else {
        return std::future::pending().await;
    };
    match (&mut trigger.stop, &mut trigger.cut) {
        (Some(stop), _) => {
            let _ = (&mut stop.outcome).await;
        }
        (None, Some(cut)) => {
            let _ = (&mut cut.outcome).await;
        }
        (None, None) => std::future::pending().await,
    }
}

/// Tells `source` of the newest committed checkpoint, once each.
fn tell_committed(
    source: &mut dyn Source,
    commits: &mut watch::Receiver<CommitSignal>,
    committed: &mut u64,
) {
    let newest = commits.borrow_and_update().completed;
    if newest > *committed {
        *committed = newest;
        source.committed(CheckpointId(newest));
    }
}

/// Acks a source's position for the triggered checkpoint n and sends
/// barrier n; a drained stop sends the maximum watermark first (every
/// event-time timer fires before the snapshot).
async fn source_barrier(
    info: &TaskInfo,
    at: SourceAt,
    output: &mut Collector,
    reports: &Reports,
    trigger: &Trigger,
) -> Result<(), OperatorError> {
    let checkpoint = trigger.barrier.id;
    if trigger.stop.as_ref().is_some_and(|s| s.drain) {
        output
            .broadcast(StreamEvent::Watermark(MAX_WATERMARK))
            .await?;
    }
    let _ = reports.send(TaskReport::Ack {
        checkpoint,
        snapshot: Box::new(SubtaskSnapshot {
            uid: info.uid.to_string(),
            subtask: info.subtask,
            position: at.position,
            partitions: at.partitions,
            ..SubtaskSnapshot::default()
        }),
        stats: SnapshotStats::default(),
    });
    output
        .broadcast(StreamEvent::Barrier(trigger.barrier.clone()))
        .await
}

/// A future that adds the time spent polling it (working, not waiting)
/// to `spent`.
struct Polled<'a, F> {
    inner: F,
    spent: &'a mut Duration,
}

impl<'a, F: std::future::Future + Unpin> Polled<'a, F> {
    fn new(inner: F, spent: &'a mut Duration) -> Self {
        Self { inner, spent }
    }
}

impl<F: std::future::Future + Unpin> std::future::Future for Polled<'_, F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let started = Stopwatch::start();
        let polled = std::pin::Pin::new(&mut self.inner).poll(cx);
        *self.spent += started.elapsed();
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_source_pauses_to_read_at_its_share_of_the_rate_before() {
        let pace = Arc::new(SourcePace::default());
        let mut pacer = Pacer::new(pace.clone());
        assert_eq!(pacer.after(100), None, "not paced: no pause");
        pacer.rate = 1000.0;
        pace.set(50);
        // 100 records at 500 a second are due 200 ms after the pace began.
        let pause = pacer.after(100).expect("paced");
        assert!(
            pause > Duration::from_millis(180) && pause <= Duration::from_millis(200),
            "{pause:?}"
        );
        let pause = pacer.after(100).expect("paced");
        assert!(pause > Duration::from_millis(380), "cumulative: {pause:?}");
        // A new pace counts from when it was set.
        pace.set(25);
        let pause = pacer.after(50).expect("paced");
        assert!(pause > Duration::from_millis(180), "{pause:?}");
        pace.set(100);
        assert_eq!(pacer.after(100), None, "full speed again");
    }

    #[test]
    fn watermark_generator_trails_the_max_timestamp() {
        let mut generator = WatermarkGenerator::new(Duration::from_millis(100));
        assert_eq!(generator.advance(), None);
        generator.observe(Some(1000));
        generator.observe(Some(900));
        assert_eq!(generator.advance(), Some(899));
        assert_eq!(generator.advance(), None);
        generator.observe(Some(950));
        assert_eq!(
            generator.advance(),
            None,
            "an older record does not move it"
        );
        generator.observe(Some(2000));
        assert_eq!(generator.advance(), Some(1899));
    }
}
