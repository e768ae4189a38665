//! The loops of source, operator and sink subtasks. Each runs as one tokio
//! task; everything it touches is owned by it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug};

use super::alignment::{Aligner, Alignment};
use super::input::{Delivery, InputGate};
use super::metrics::{Stopwatch, SubtaskMetrics};
use super::operator::{
    FailureKind, Operator, OperatorError, Sink, Source, SourceStatus, TaskError, TaskInfo,
};
use super::output::{BATCH_RECORDS, Collector};
use super::runtime::NodeMetrics;
use super::timers::{TimeDomain, now_millis};
use crate::protocol::{
    CommitSignal, LocalSnapshot, Role, SnapshotStats, SnapshotStore, SourcePace, StopAfter,
    SubtaskSnapshot, TaskReport, Trigger,
};
use crate::types::{
    Barrier, BarrierKind, CheckpointId, MAX_WATERMARK, RecordBatch, SavepointForm, StreamEvent,
    Timestamp,
};

/// A subtask's line to the checkpoint coordinator.
pub type Reports = mpsc::UnboundedSender<TaskReport>;

fn report_finished(reports: &Reports, info: &TaskInfo, role: Role) {
    let _ = reports.send(TaskReport::Finished {
        uid: info.uid.to_string(),
        subtask: info.subtask,
        role,
    });
}

/// What an operator subtask reports when it ends well.
#[derive(Debug, Clone, Default)]
pub struct TaskSummary {
    pub uid: String,
    pub subtask: u32,
    /// (state name, keys with state) of an operator.
    pub state_keys: Vec<(String, u64)>,
    pub state_backend: Option<String>,
}

fn fail(info: &TaskInfo) -> impl Fn(OperatorError) -> TaskError + '_ {
    move |error| TaskError {
        uid: info.uid.to_string(),
        subtask: info.subtask,
        error,
    }
}

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
        while !cancelled {
            let mut barrier = None;
            let waiting = Stopwatch::start();
            let mut reading = Duration::ZERO;
            let status = tokio::select! {
                biased;
                _ = cancel.changed() => { cancelled = true; SourceStatus::Ended }
                trigger = triggers.recv(), if triggers_open => {
                    match trigger {
                        Some(trigger) => barrier = Some(trigger),
                        None => triggers_open = false,
                    }
                    SourceStatus::More
                }
                status = Polled::new(source.next_batch(&mut batch, max), &mut reading) => status.map_err(&fail)?,
            };
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
            if let Some(trigger) = barrier {
                source_barrier(&info, SourceAt::of(source.as_ref()), &mut output, &reports, &trigger)
                    .await
                    .map_err(&fail)?;
                let Trigger { barrier, stop } = trigger;
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
            // stop changes nothing: the input ended anyway).
            while let Ok(trigger) = triggers.try_recv() {
                source_barrier(&info, SourceAt::of(source.as_ref()), &mut output, &reports, &trigger)
                    .await
                    .map_err(&fail)?;
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
                };
                let Some(trigger) = trigger else {
                    triggers_open = false;
                    continue;
                };
                source_barrier(&info, SourceAt::of(source.as_ref()), &mut output, &reports, &trigger)
                    .await
                    .map_err(&fail)?;
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

/// One operator subtask of a chain, with what its loop needs.
pub struct ChainLink {
    pub operator: Box<dyn Operator>,
    /// The head's channels; for a later link, [`InputGate::chained`].
    pub gate: InputGate,
    pub aligner: Aligner,
    pub metrics: Arc<NodeMetrics>,
    pub storage: Option<Box<dyn SnapshotStore>>,
}

/// A chain's operator subtask while it runs.
struct Link {
    operator: Box<dyn Operator>,
    gate: InputGate,
    aligner: Aligner,
    metrics: Arc<NodeMetrics>,
    storage: Option<Box<dyn SnapshotStore>>,
    info: TaskInfo,
    alignment: AlignmentClock,
    span: tracing::Span,
    /// Set once it closed and sent end of input on.
    summary: Option<TaskSummary>,
}

/// What woke a chain's task.
enum Woken {
    Input(Option<Delivery>),
    Clock,
}

/// The operator subtasks of one chain (a single operator is a chain of
/// one), in one tokio task: the head reads its channels; what each
/// operator sends to the next is handed over in order, without a channel,
/// before the head reads again. Each operator processes batches in arrival
/// order, fires timers as the watermark and the clock advance, and
/// forwards watermarks and end of input, exactly as if it ran alone.
///
/// Once checkpoint n is aligned, an operator takes its snapshot: the
/// synchronous part here (flush, a consistent copy of the state, timers),
/// the copy to storage on a blocking thread; then barrier n goes on (to
/// the next operator of the chain, which is aligned by it at once).
pub async fn run_chain(chain: Vec<ChainLink>) -> Result<Vec<TaskSummary>, TaskError> {
    let mut links: Vec<Link> = chain.into_iter().map(Link::new).collect();
    for link in &mut links {
        link.open().await?;
    }
    cascade(&mut links, 0).await?;
    loop {
        let next_timer = links
            .iter_mut()
            .filter_map(|link| link.operator.task().timers.next_processing_time())
            .min();
        let waiting = Stopwatch::start();
        let woken = tokio::select! {
            delivery = links[0].gate.next() => {
                Woken::Input(delivery.map_err(|e| links[0].fail(e))?)
            }
            _ = sleep_until_millis(next_timer) => Woken::Clock,
        };
        let waited = waiting.elapsed();
        for link in &links {
            link.mine().idle(waited);
        }
        match woken {
            Woken::Input(Some(delivery)) => {
                links[0].handle(delivery).await?;
                cascade(&mut links, 0).await?;
            }
            Woken::Input(None) => break,
            Woken::Clock => {
                for at in 0..links.len() {
                    links[at].fire_processing_timers().await?;
                    cascade(&mut links, at).await?;
                }
            }
        }
    }
    // Every channel delivered end of input, so the head finished (and
    // the chain after it, through the cascade).
    Ok(links.into_iter().filter_map(|link| link.summary).collect())
}

/// Hands what operator `from` of the chain sent on to the next one, and so
/// on to the chain's end.
async fn cascade(links: &mut [Link], from: usize) -> Result<(), TaskError> {
    for at in from..links.len().saturating_sub(1) {
        while let Some(event) = links[at].operator.task().output.next_chained() {
            let next = &mut links[at + 1];
            let delivery = Delivery {
                channel: 0,
                input: next.gate.input_of(0),
                event,
            };
            next.handle(delivery).await?;
        }
    }
    Ok(())
}

impl Link {
    fn new(link: ChainLink) -> Self {
        let ChainLink {
            mut operator,
            gate,
            aligner,
            metrics,
            storage,
        } = link;
        let info = operator.task().info.clone();
        let span = tracing::info_span!("operator", job = %info.job, uid = %info.uid, subtask = info.subtask);
        Self {
            operator,
            gate,
            aligner,
            metrics,
            storage,
            info,
            alignment: AlignmentClock::default(),
            span,
            summary: None,
        }
    }

    fn mine(&self) -> &SubtaskMetrics {
        self.metrics.subtask(self.info.subtask)
    }

    fn fail(&self, error: OperatorError) -> TaskError {
        fail(&self.info)(error)
    }

    async fn open(&mut self) -> Result<(), TaskError> {
        let span = self.span.clone();
        async {
            self.operator.open()?;
            flush_output(self.operator.as_mut()).await
        }
        .instrument(span)
        .await
        .map_err(|e| self.fail(e))
    }

    async fn fire_processing_timers(&mut self) -> Result<(), TaskError> {
        if self
            .operator
            .task()
            .timers
            .next_processing_time()
            .is_none_or(|due| due > now_millis())
        {
            return Ok(());
        }
        let span = self.span.clone();
        let operator = self.operator.as_mut();
        let mine = self.metrics.subtask(self.info.subtask);
        async {
            let started = Stopwatch::start();
            let before = emitted(operator);
            fire_processing_timers(operator)?;
            account(mine, operator, before, started.elapsed());
            let flushing = Stopwatch::start();
            flush_output(operator).await?;
            mine.backpressured(flushing.elapsed());
            Ok(())
        }
        .instrument(span)
        .await
        .map_err(|e| self.fail(e))
    }

    /// Handles one event from the gate.
    async fn handle(&mut self, delivery: Delivery) -> Result<(), TaskError> {
        let span = self.span.clone();
        self.handle_event(delivery)
            .instrument(span)
            .await
            .map_err(|e| self.fail(e))
    }

    async fn handle_event(&mut self, delivery: Delivery) -> Result<(), OperatorError> {
        let Delivery {
            channel,
            input,
            event,
        } = delivery;
        let operator = self.operator.as_mut();
        let mine = self.metrics.subtask(self.info.subtask);
        match event {
            StreamEvent::Records(batch) => {
                let started = Stopwatch::start();
                mine.took_in(batch.len(), batch.data_len());
                let before = emitted(operator);
                operator.process_batch(input, batch)?;
                account(mine, operator, before, started.elapsed());
                let state = &mut operator.task().state;
                state.maybe_evict()?;
                let (hits, misses) = state.take_cache_counts();
                mine.cache_hits.fetch_add(hits, Ordering::Relaxed);
                mine.cache_misses.fetch_add(misses, Ordering::Relaxed);
                mine.busy(started.elapsed());
                let flushing = Stopwatch::start();
                flush_output(operator).await?;
                mine.backpressured(flushing.elapsed());
            }
            StreamEvent::Watermark(watermark) => {
                if let Some(advanced) = self.gate.advance_watermark(channel, watermark) {
                    let started = Stopwatch::start();
                    let before = emitted(operator);
                    advance_watermark(operator, advanced).await?;
                    account(mine, operator, before, started.elapsed());
                    mine.watermark.store(advanced, Ordering::Relaxed);
                }
            }
            StreamEvent::Barrier(barrier) => {
                self.alignment.barrier(barrier.id);
                let outcome = self.aligner.on_barrier(channel, &barrier);
                self.forward_aligned(outcome).await?;
            }
            StreamEvent::EndOfInput => {
                self.gate.end(channel);
                let outcome = self.aligner.on_end_of_input(channel);
                self.forward_aligned(outcome).await?;
                if self.gate.live_channels() == 0 {
                    self.finish_operator().await?;
                }
            }
        }
        Ok(())
    }

    async fn forward_aligned(&mut self, outcome: Alignment) -> Result<(), OperatorError> {
        forward_aligned(
            self.operator.as_mut(),
            outcome,
            &mut self.gate,
            &self.storage,
            &self.alignment,
            self.metrics.subtask(self.info.subtask),
        )
        .await
    }

    async fn finish_operator(&mut self) -> Result<(), OperatorError> {
        close_once(self.operator.as_mut())?;
        let task = self.operator.task();
        task.output.broadcast(StreamEvent::EndOfInput).await?;
        let state_keys = task.state.key_counts()?;
        debug!("operator finished");
        self.summary = Some(TaskSummary {
            uid: self.info.uid.to_string(),
            subtask: self.info.subtask,
            state_backend: (task.state.table_count() > 0).then(|| task.state.describe_backend()),
            state_keys,
        });
        Ok(())
    }
}

/// Applies the aligner's answer to the gate; returns the barrier that is
/// now aligned, if any.
fn apply_alignment(outcome: Alignment, gate: &mut InputGate) -> Option<Barrier> {
    match outcome {
        Alignment::Continue => None,
        Alignment::Block(channel) => {
            gate.block(channel);
            None
        }
        Alignment::Aborted { checkpoint, block } => {
            debug!(
                checkpoint = checkpoint.0,
                "alignment aborted by a newer barrier"
            );
            gate.unblock_all();
            if let Some(channel) = block {
                gate.block(channel);
            }
            None
        }
        Alignment::Aligned { barrier, aborted } => {
            if let Some(aborted) = aborted {
                debug!(
                    checkpoint = aborted.0,
                    "alignment aborted by a newer barrier"
                );
            }
            gate.unblock_all();
            Some(barrier)
        }
    }
}

/// When the first barrier of the checkpoint being aligned arrived.
#[derive(Debug, Default)]
struct AlignmentClock {
    current: Option<(CheckpointId, Instant)>,
}

impl AlignmentClock {
    fn barrier(&mut self, checkpoint: CheckpointId) {
        if self.current.is_none_or(|(id, _)| id < checkpoint) {
            self.current = Some((checkpoint, Instant::now()));
        }
    }

    fn elapsed(&self, checkpoint: CheckpointId) -> Duration {
        match self.current {
            Some((id, started)) if id == checkpoint => started.elapsed(),
            _ => Duration::ZERO,
        }
    }
}

/// Applies the aligner's answer and, once a checkpoint is aligned, takes
/// the operator's snapshot and sends the barrier downstream once.
async fn forward_aligned(
    operator: &mut dyn Operator,
    outcome: Alignment,
    gate: &mut InputGate,
    storage: &Option<Box<dyn SnapshotStore>>,
    alignment: &AlignmentClock,
    metrics: &SubtaskMetrics,
) -> Result<(), OperatorError> {
    match apply_alignment(outcome, gate) {
        Some(aligned) => {
            // The final checkpoint follows the end of every input: the
            // operator closes first, so what `close` emits and changes is
            // covered by it (and a restore of it does not close again).
            if aligned.kind == BarrierKind::Final {
                close_once(operator)?;
                flush_output(operator).await?;
            }
            // The state's size as of this barrier (before a snapshot job
            // takes the backend).
            if let Some(tables) = operator.task().state.table_metrics() {
                *metrics.state.lock().unwrap_or_else(|p| p.into_inner()) = tables;
            }
            if let Some(storage) = storage {
                let waited = alignment.elapsed(aligned.id);
                snapshot_operator(operator, storage.as_ref(), &aligned, waited);
            }
            operator
                .task()
                .output
                .broadcast(StreamEvent::Barrier(aligned))
                .await
        }
        None => Ok(()),
    }
}

/// Calls the operator's `close` unless it ran already (at the final
/// checkpoint, or before the checkpoint it was restored from).
fn close_once(operator: &mut dyn Operator) -> Result<(), OperatorError> {
    if operator.task().closed {
        return Ok(());
    }
    operator.task().closed = true;
    operator.close()
}

/// The synchronous part of an operator's snapshot for `barrier` (a
/// checkpoint's delta or base, or a savepoint's copy in the form it asks
/// for); hands the copy to storage, which acks or declines the barrier
/// when it is done.
fn snapshot_operator(
    operator: &mut dyn Operator,
    storage: &dyn SnapshotStore,
    barrier: &Barrier,
    alignment: Duration,
) {
    let _span = tracing::info_span!("checkpoint", id = barrier.id.0).entered();
    let started = Instant::now();
    let task = operator.task();
    let local_dir = storage.local_dir(barrier);
    let state = match &barrier.kind {
        BarrierKind::Savepoint(target)
            if target.form == SavepointForm::Incremental && storage.has_chain() =>
        {
            task.state.savepoint_delta(local_dir)
        }
        BarrierKind::Savepoint(_) => task.state.savepoint(local_dir),
        BarrierKind::Checkpoint { .. } | BarrierKind::Final => {
            task.state.snapshot(local_dir, storage.wants_base(barrier))
        }
    };
    let state = match state {
        Ok(state) => state,
        Err(error) => return storage.decline(barrier, error.to_string()),
    };
    let local = LocalSnapshot {
        state,
        timers: task.timers.encode(),
        finished: task.closed,
    };
    let stats = SnapshotStats {
        alignment,
        sync: started.elapsed(),
        ..SnapshotStats::default()
    };
    storage.upload(barrier, local, stats, task.state.table_names());
}

async fn flush_output(operator: &mut dyn Operator) -> Result<(), OperatorError> {
    operator.task().output.flush().await
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

/// Records and bytes the operator emitted so far.
fn emitted(operator: &mut dyn Operator) -> (u64, u64) {
    let output = &operator.task().output;
    (output.emitted(), output.emitted_bytes())
}

/// Counts what the operator emitted since `before` and the time its
/// plugin took.
fn account(
    metrics: &SubtaskMetrics,
    operator: &mut dyn Operator,
    before: (u64, u64),
    took: Duration,
) {
    let (records, bytes) = emitted(operator);
    metrics.emitted(records - before.0, bytes - before.1);
    metrics.in_plugin(took);
}

async fn advance_watermark(
    operator: &mut dyn Operator,
    watermark: Timestamp,
) -> Result<(), OperatorError> {
    operator.task().watermark = watermark;
    while let Some(timer) = operator
        .task()
        .timers
        .pop_due(TimeDomain::EventTime, watermark)
    {
        operator.task().select_timer(&timer);
        operator.on_timer(&timer)?;
        if operator.task().output.is_full() {
            operator.task().output.flush().await?;
        }
    }
    operator
        .task()
        .output
        .broadcast(StreamEvent::Watermark(watermark))
        .await
}

fn fire_processing_timers(operator: &mut dyn Operator) -> Result<(), OperatorError> {
    let now = now_millis();
    while let Some(timer) = operator
        .task()
        .timers
        .pop_due(TimeDomain::ProcessingTime, now)
    {
        operator.task().select_timer(&timer);
        operator.on_timer(&timer)?;
    }
    Ok(())
}

async fn sleep_until_millis(deadline: Option<Timestamp>) {
    match deadline {
        Some(deadline) => {
            let wait = deadline.saturating_sub(now_millis()).max(0) as u64;
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        None => std::future::pending().await,
    }
}

/// A sink subtask: writes every batch. Two-phase commit: once checkpoint n
/// is aligned the sink makes what it wrote durable but pending and acks the
/// pending files; it commits them when the coordinator says n completed.
/// At end of input it waits for the job's end: commit the rest (the job
/// ended) or discard it (cancelled, to resume from the latest checkpoint).
pub async fn run_sink(
    info: TaskInfo,
    mut sink: Box<dyn Sink>,
    mut gate: InputGate,
    mut aligner: Aligner,
    metrics: Arc<NodeMetrics>,
    reports: Reports,
    mut commit: watch::Receiver<CommitSignal>,
) -> Result<TaskSummary, TaskError> {
    let span =
        tracing::info_span!("sink", job = %info.job, uid = %info.uid, subtask = info.subtask);
    async move {
        let fail = fail(&info);
        let mut committed = 0u64;
        let mut coordinator = true;
        let mine = metrics.subtask(info.subtask);
        loop {
            let waiting = Stopwatch::start();
            tokio::select! {
                delivery = gate.next() => {
                    mine.idle(waiting.elapsed());
                    // A disconnection fails the sink before it finishes:
                    // only a real end of input commits the rest.
                    let Some(Delivery { channel, event, .. }) = delivery.map_err(&fail)? else { break };
                    let aligned = match event {
                        StreamEvent::Records(batch) => {
                            let started = Stopwatch::start();
                            sink.write(&batch).map_err(&fail)?;
                            mine.took_in(batch.len(), batch.data_len());
                            mine.busy(started.elapsed());
                            None
                        }
                        StreamEvent::Barrier(barrier) => {
                            apply_alignment(aligner.on_barrier(channel, &barrier), &mut gate)
                        }
                        StreamEvent::EndOfInput => {
                            gate.end(channel);
                            apply_alignment(aligner.on_end_of_input(channel), &mut gate)
                        }
                        StreamEvent::Watermark(_) => None,
                    };
                    if let Some(Barrier { id: checkpoint, .. }) = aligned {
                        let pending = sink.prepare_commit(checkpoint).map_err(&fail)?;
                        let _ = reports.send(TaskReport::Ack {
                            checkpoint,
                            snapshot: Box::new(SubtaskSnapshot {
                                uid: info.uid.to_string(),
                                subtask: info.subtask,
                                pending,
                                ..SubtaskSnapshot::default()
                            }),
                            stats: SnapshotStats::default(),
                        });
                    }
                }
                changed = commit.changed(), if coordinator => {
                    if changed.is_err() {
                        coordinator = false;
                        continue;
                    }
                    let signal = *commit.borrow_and_update();
                    commit_completed(sink.as_mut(), signal, &mut committed).map_err(&fail)?;
                }
            }
        }
        sink.finish().map_err(&fail)?;
        report_finished(&reports, &info, Role::Sink);
        loop {
            let signal = *commit.borrow_and_update();
            commit_completed(sink.as_mut(), signal, &mut committed).map_err(&fail)?;
            if let Some(end) = signal.end {
                sink.end(end).map_err(&fail)?;
                break;
            }
            if commit.changed().await.is_err() {
                // The coordinator is gone: the attempt is failing. Commit nothing more.
                break;
            }
        }
        Ok(TaskSummary {
            uid: info.uid.to_string(),
            subtask: info.subtask,
            ..TaskSummary::default()
        })
    }
    .instrument(span)
    .await
}

/// Commits what a newly completed checkpoint covers, once.
fn commit_completed(
    sink: &mut dyn Sink,
    signal: CommitSignal,
    committed: &mut u64,
) -> Result<(), OperatorError> {
    if signal.completed > *committed {
        *committed = signal.completed;
        sink.commit(CheckpointId(signal.completed))?;
    }
    Ok(())
}

/// Turns a panic of a task into a task failure.
pub fn panic_error(uid: &str, subtask: u32, message: String) -> TaskError {
    TaskError {
        uid: uid.to_string(),
        subtask,
        error: OperatorError::new(FailureKind::Panic, format!("task panicked: {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::output::OutputEdge;
    use crate::dataflow::{FiredTimer, TaskContext};
    use crate::job::Partition;
    use crate::state::KeyedState;
    use crate::state::memory::MemoryBackend;
    use tokio::sync::mpsc;

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

    /// Registers a processing-time timer 20 ms ahead per record; emits the
    /// key when it fires.
    struct Ticker {
        task: TaskContext,
    }

    impl Operator for Ticker {
        fn task(&mut self) -> &mut TaskContext {
            &mut self.task
        }
        fn process_batch(&mut self, _input: u32, batch: RecordBatch) -> Result<(), OperatorError> {
            let count = batch.len();
            self.task.current_batch = Arc::new(batch);
            for index in 0..count {
                self.task.select_record(index);
                let key = self.task.current_key.clone().expect("keyed");
                self.task
                    .timers
                    .register(TimeDomain::ProcessingTime, now_millis() + 20, &key);
            }
            Ok(())
        }
        fn on_timer(&mut self, timer: &FiredTimer) -> Result<(), OperatorError> {
            assert_eq!(timer.domain, TimeDomain::ProcessingTime);
            assert_eq!(self.task.current_key.as_deref(), Some(timer.key.as_slice()));
            self.task.output.emit(
                None,
                crate::types::RecordRef {
                    key: Some(&timer.key),
                    value: b"fired",
                    timestamp: None,
                },
            )
        }
    }

    fn ticker(uid: &str, output: OutputEdge) -> ChainLink {
        let info = TaskInfo {
            job: Arc::from("test"),
            uid: Arc::from(uid),
            subtask: 0,
            parallelism: 1,
            max_parallelism: 128,
        };
        let collector = Collector::new(vec![output], 128, 1 << 20);
        let state = KeyedState::new(Vec::new(), Box::new(MemoryBackend::new(0)), 128, 1);
        ChainLink {
            operator: Box::new(Ticker {
                task: TaskContext::new(info, state, collector),
            }),
            gate: InputGate::chained(0),
            aligner: Aligner::new(1, crate::job::file::CheckpointMode::ExactlyOnce),
            metrics: Arc::new(NodeMetrics::new(uid, false, false, 1)),
            storage: None,
        }
    }

    /// Feeds records keyed `a` and `b` to a chain of `length` tickers, each
    /// of which re-emits a key once its timer fired; the chain's end must
    /// see both keys without further input, then end with every operator.
    async fn timers_fire_along_a_chain(length: usize) {
        let (input, receiver) = mpsc::channel(4);
        let (sender, mut output) = mpsc::channel(16);
        let mut chain: Vec<ChainLink> = (0..length)
            .map(|at| {
                let edge = if at + 1 == length {
                    OutputEdge::new(None, Partition::Forward, 1, vec![sender.clone()])
                } else {
                    OutputEdge::chained()
                };
                ticker(&format!("ticker-{at}"), edge)
            })
            .collect();
        drop(sender);
        chain[0].gate = InputGate::new(vec![(0, receiver)]);
        let task = tokio::spawn(run_chain(chain));
        let mut batch = RecordBatch::new();
        batch.push(Some(b"a"), b"1", None);
        batch.push(Some(b"b"), b"2", None);
        input.send(StreamEvent::Records(batch)).await.expect("send");
        let mut fired = Vec::new();
        while fired.len() < 2 {
            let event = tokio::time::timeout(Duration::from_secs(10), output.recv())
                .await
                .expect("timers fire without further input")
                .expect("channel open");
            if let StreamEvent::Records(batch) = event {
                fired.extend(batch.iter().map(|r| r.key.expect("keyed").to_vec()));
            }
        }
        fired.sort();
        assert_eq!(fired, vec![b"a".to_vec(), b"b".to_vec()]);
        input.send(StreamEvent::EndOfInput).await.expect("send");
        let summaries = task.await.expect("joins").expect("operators end well");
        let uids: Vec<String> = summaries.iter().map(|s| s.uid.clone()).collect();
        let expected: Vec<String> = (0..length).map(|at| format!("ticker-{at}")).collect();
        assert_eq!(uids, expected);
        assert!(
            matches!(output.recv().await, Some(StreamEvent::EndOfInput)),
            "end of input reaches the chain's end"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn processing_time_timers_fire_from_the_clock_without_input() {
        timers_fire_along_a_chain(1).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chained_operator_gets_what_the_one_before_sent_and_fires_its_own_timers() {
        timers_fire_along_a_chain(3).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chain_whose_upstream_vanished_fails_and_sends_no_end_of_input() {
        let (input, receiver) = mpsc::channel(4);
        let (sender, mut output) = mpsc::channel(16);
        let mut chain = vec![ticker(
            "ticker",
            OutputEdge::new(None, Partition::Forward, 1, vec![sender]),
        )];
        chain[0].gate = InputGate::new(vec![(0, receiver)]);
        let task = tokio::spawn(run_chain(chain));
        drop(input);
        let error = task.await.expect("joins").expect_err("a disconnection");
        assert_eq!(error.error.kind, FailureKind::Disconnected, "{error}");
        while let Some(event) = output.recv().await {
            assert!(
                !matches!(event, StreamEvent::EndOfInput),
                "a failed upstream is not an end of input"
            );
        }
    }

    /// What a sink was asked to do.
    struct Recording(Arc<std::sync::Mutex<Vec<String>>>);

    impl Sink for Recording {
        fn write(&mut self, batch: &RecordBatch) -> Result<(), OperatorError> {
            self.0
                .lock()
                .expect("not poisoned")
                .push(format!("write {}", batch.len()));
            Ok(())
        }
        fn commit(&mut self, checkpoint: CheckpointId) -> Result<(), OperatorError> {
            self.0
                .lock()
                .expect("not poisoned")
                .push(format!("commit {}", checkpoint.0));
            Ok(())
        }
        fn finish(&mut self) -> Result<(), OperatorError> {
            self.0.lock().expect("not poisoned").push("finish".into());
            Ok(())
        }
        fn end(&mut self, commit: bool) -> Result<(), OperatorError> {
            self.0
                .lock()
                .expect("not poisoned")
                .push(format!("end {commit}"));
            Ok(())
        }
    }

    /// The duplicate a rolled-back upgrade once committed under load: the
    /// task upstream of a sink failed, the sink took the closed channel
    /// for its end of input, reported itself finished, and the coordinator
    /// (still running) told it to commit the rest, held epochs included,
    /// which the restarted attempt then wrote again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sink_whose_upstream_vanished_fails_without_finishing_or_committing() {
        let (input, receiver) = mpsc::channel(4);
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (reports, mut reported) = mpsc::unbounded_channel();
        let (commit, committed) = watch::channel(CommitSignal::default());
        let info = TaskInfo {
            job: Arc::from("test"),
            uid: Arc::from("out"),
            subtask: 0,
            parallelism: 1,
            max_parallelism: 128,
        };
        let sink = tokio::spawn(run_sink(
            info,
            Box::new(Recording(calls.clone())),
            InputGate::new(vec![(0, receiver)]),
            Aligner::new(1, crate::job::file::CheckpointMode::ExactlyOnce),
            Arc::new(NodeMetrics::new("out", false, true, 1)),
            reports,
            committed,
        ));
        let mut batch = RecordBatch::new();
        batch.push(Some(b"a"), b"1", None);
        input.send(StreamEvent::Records(batch)).await.expect("send");
        // The coordinator stand-in: would end the job with a commit as
        // soon as the sink says it finished.
        let coordinator = tokio::spawn(async move {
            while let Some(report) = reported.recv().await {
                if let TaskReport::Finished { .. } = report {
                    commit.send_modify(|s| s.end = Some(true));
                    return true;
                }
            }
            false
        });
        drop(input);
        let error = sink.await.expect("joins").expect_err("a disconnection");
        assert_eq!(error.error.kind, FailureKind::Disconnected, "{error}");
        assert!(
            !coordinator.await.expect("joins"),
            "the sink did not report itself finished"
        );
        assert_eq!(*calls.lock().expect("not poisoned"), ["write 1"]);
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
