//! The operator subtasks of one chain in one task: the head reads its
//! channels, each operator hands what it sends the next on, in order;
//! barriers are aligned, snapshots taken and forwarded once per
//! checkpoint; timers fire as the watermark and the clock advance.

use crate::dataflow::alignment::{Aligner, Alignment};
use crate::dataflow::input::{Delivery, InputGate};
use crate::dataflow::metrics::{Stopwatch, SubtaskMetrics};
use crate::dataflow::operator::{Operator, OperatorError, TaskError, TaskInfo};
use crate::dataflow::runtime::NodeMetrics;
use crate::dataflow::timers::{TimeDomain, now_millis};
use crate::protocol::{LocalSnapshot, SnapshotStats, SnapshotStore};
use crate::types::{Barrier, BarrierKind, CheckpointId, SavepointForm, StreamEvent, Timestamp};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{Instrument, debug};

use super::{TaskSummary, apply_alignment, fail};
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
    storage.upload(barrier, local, stats, task.state.table_specs());
}

async fn flush_output(operator: &mut dyn Operator) -> Result<(), OperatorError> {
    operator.task().output.flush().await
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::Collector;
    use crate::dataflow::FailureKind;
    use crate::types::RecordBatch;

    use crate::dataflow::output::OutputEdge;
    use crate::dataflow::{FiredTimer, TaskContext};
    use crate::job::Partition;
    use crate::state::KeyedState;
    use crate::state::memory::MemoryBackend;
    use tokio::sync::mpsc;

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
}
