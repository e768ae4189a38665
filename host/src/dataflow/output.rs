//! The [`Collector`]: where an operator's emitted records go. It holds one
//! [`OutputEdge`] per downstream edge, partitions each record onto that
//! edge's channels (forward, by key group, or round-robin) into per-channel
//! batches, and sends them when the task flushes (after each call), so a
//! slow consumer backpressures the producer through the bounded channels.
//! An edge to the next operator of a chain has no channel: what it sends
//! is queued in the collector, and the chain's task hands it over.

use std::collections::VecDeque;

use tokio::sync::mpsc::Sender;

use super::operator::{FailureKind, OperatorError};
use crate::job::Partition;
use crate::types::{RecordBatch, RecordRef, StreamEvent, key_group};

/// Records per batch before the collector sends it mid-call.
pub const BATCH_RECORDS: usize = 1024;

/// One downstream edge of this subtask.
#[derive(Debug)]
pub struct OutputEdge {
    pub side_output: Option<String>,
    partition: Partition,
    /// Downstream parallelism (for key partitioning).
    downstream_parallelism: u32,
    targets: Vec<Target>,
    next_target: usize,
}

#[derive(Debug)]
struct Target {
    /// `None`: the next operator of the chain (see [`Collector::next_chained`]).
    sender: Option<Sender<StreamEvent>>,
    pending: RecordBatch,
}

impl OutputEdge {
    /// `senders` are the edge's channels from this subtask, indexed by
    /// downstream subtask (a single one for forward edges).
    pub fn new(
        side_output: Option<String>,
        partition: Partition,
        downstream_parallelism: u32,
        senders: Vec<Sender<StreamEvent>>,
    ) -> Self {
        Self {
            side_output,
            partition,
            downstream_parallelism,
            targets: senders
                .into_iter()
                .map(|sender| Target {
                    sender: Some(sender),
                    pending: RecordBatch::new(),
                })
                .collect(),
            next_target: 0,
        }
    }

    /// The edge to the next operator of this subtask's chain.
    pub fn chained() -> Self {
        Self {
            side_output: None,
            partition: Partition::Forward,
            downstream_parallelism: 1,
            targets: vec![Target {
                sender: None,
                pending: RecordBatch::new(),
            }],
            next_target: 0,
        }
    }

    fn route(&mut self, key: Option<&[u8]>, max_parallelism: u32) -> Result<usize, OperatorError> {
        Ok(match self.partition {
            Partition::Forward => 0,
            Partition::Rebalance => {
                let target = self.next_target;
                self.next_target = (self.next_target + 1) % self.targets.len();
                target
            }
            Partition::Key => {
                let key = key.ok_or_else(|| {
                    OperatorError::new(
                        FailureKind::Plugin,
                        "emitted a record without a key onto a key-partitioned edge",
                    )
                })?;
                let group = key_group::of_key(key, max_parallelism);
                key_group::subtask_of(group, self.downstream_parallelism, max_parallelism) as usize
            }
        })
    }
}

/// All outputs of one subtask.
#[derive(Debug)]
pub struct Collector {
    edges: Vec<OutputEdge>,
    max_parallelism: u32,
    max_record_bytes: u64,
    emitted: u64,
    emitted_bytes: u64,
    /// Set when some pending batch reached [`BATCH_RECORDS`].
    full: bool,
    /// What was sent to the next operator of the chain, in order.
    chained: VecDeque<StreamEvent>,
}

impl Collector {
    pub fn new(edges: Vec<OutputEdge>, max_parallelism: u32, max_record_bytes: u64) -> Self {
        Self {
            edges,
            max_parallelism,
            max_record_bytes,
            emitted: 0,
            emitted_bytes: 0,
            full: false,
            chained: VecDeque::new(),
        }
    }

    /// Records emitted so far (to every output, counted once per emit).
    pub fn emitted(&self) -> u64 {
        self.emitted
    }

    /// Bytes of key and value of the records emitted so far.
    pub fn emitted_bytes(&self) -> u64 {
        self.emitted_bytes
    }

    /// Emits to the main output (`side_output = None`) or a named side output.
    pub fn emit(
        &mut self,
        side_output: Option<&str>,
        record: RecordRef<'_>,
    ) -> Result<(), OperatorError> {
        let size = record_size(record);
        if size > self.max_record_bytes {
            return Err(OperatorError::new(
                FailureKind::Plugin,
                format!(
                    "emitted a record of {}, over the limit of {}",
                    crate::human::bytes(size),
                    crate::human::bytes(self.max_record_bytes)
                ),
            ));
        }
        self.emitted += 1;
        self.emitted_bytes += size;
        for edge in &mut self.edges {
            if edge.side_output.as_deref() != side_output {
                continue;
            }
            let target = edge.route(record.key, self.max_parallelism)?;
            let pending = &mut edge.targets[target].pending;
            pending.push_record(record);
            if pending.len() >= BATCH_RECORDS {
                self.full = true;
            }
        }
        Ok(())
    }

    /// Emits a whole batch to the main output; a single forward channel
    /// takes it as is, without copying.
    pub fn emit_batch(&mut self, batch: RecordBatch) -> Result<(), OperatorError> {
        let single = self.edges.len() == 1
            && self.edges[0].side_output.is_none()
            && self.edges[0].targets.len() == 1
            && self.edges[0].targets[0].pending.is_empty()
            && self.edges[0].partition != Partition::Key;
        if single {
            // No record can exceed the limit if all of them together do not.
            let may_exceed = batch.data_len() as u64 > self.max_record_bytes;
            if may_exceed
                && let Some(record) = batch
                    .iter()
                    .find(|r| record_size(*r) > self.max_record_bytes)
            {
                return self.emit(None, record);
            }
            self.emitted += batch.len() as u64;
            self.emitted_bytes += batch.data_len() as u64;
            self.full |= batch.len() >= BATCH_RECORDS;
            self.edges[0].targets[0].pending = batch;
            return Ok(());
        }
        for record in batch.iter() {
            self.emit(None, record)?;
        }
        Ok(())
    }

    /// Whether enough is pending that the task should flush before going on.
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Sends every non-empty pending batch.
    pub async fn flush(&mut self) -> Result<(), OperatorError> {
        for edge in &mut self.edges {
            for target in &mut edge.targets {
                if target.pending.is_empty() {
                    continue;
                }
                let batch = StreamEvent::Records(target.pending.take());
                deliver(&target.sender, &mut self.chained, batch).await?;
            }
        }
        self.full = false;
        Ok(())
    }

    /// Flushes, then sends `event` (watermark, barrier, end of input) on
    /// every channel, so it follows every record emitted before it.
    pub async fn broadcast(&mut self, event: StreamEvent) -> Result<(), OperatorError> {
        self.flush().await?;
        for edge in &self.edges {
            for target in &edge.targets {
                deliver(&target.sender, &mut self.chained, event.clone()).await?;
            }
        }
        Ok(())
    }

    /// The next event sent to the next operator of the chain, oldest first.
    pub fn next_chained(&mut self) -> Option<StreamEvent> {
        self.chained.pop_front()
    }
}

/// Key plus value bytes of a record (what `max_record_size` limits).
fn record_size(record: RecordRef<'_>) -> u64 {
    (record.key.map_or(0, <[u8]>::len) + record.value.len()) as u64
}

/// Sends `event` on a target's channel, or queues it for the next operator
/// of the chain when the target has none.
async fn deliver(
    sender: &Option<Sender<StreamEvent>>,
    chained: &mut VecDeque<StreamEvent>,
    event: StreamEvent,
) -> Result<(), OperatorError> {
    match sender {
        Some(sender) => send(sender, event).await,
        None => {
            chained.push_back(event);
            Ok(())
        }
    }
}

async fn send(sender: &Sender<StreamEvent>, event: StreamEvent) -> Result<(), OperatorError> {
    sender.send(event).await.map_err(|_| {
        OperatorError::new(
            FailureKind::Disconnected,
            "a downstream task is gone (it failed or was cancelled)",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    #[tokio::test]
    async fn key_partitioning_routes_each_key_to_one_subtask() {
        let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..3).map(|_| mpsc::channel(16)).unzip();
        let edge = OutputEdge::new(None, Partition::Key, 3, senders);
        let mut collector = Collector::new(vec![edge], 128, 1 << 20);
        for i in 0..100u32 {
            let key = format!("k{}", i % 10);
            collector
                .emit(
                    None,
                    RecordRef {
                        key: Some(key.as_bytes()),
                        value: b"v",
                        timestamp: None,
                    },
                )
                .expect("emit");
        }
        collector
            .broadcast(StreamEvent::EndOfInput)
            .await
            .expect("flush");
        let mut owner = std::collections::HashMap::new();
        let mut total = 0;
        for (subtask, receiver) in receivers.iter_mut().enumerate() {
            while let Ok(event) = receiver.try_recv() {
                if let StreamEvent::Records(batch) = event {
                    for record in batch.iter() {
                        total += 1;
                        let key = record.key.expect("keyed").to_vec();
                        assert_eq!(*owner.entry(key).or_insert(subtask), subtask);
                    }
                }
            }
        }
        assert_eq!(total, 100);
    }

    #[tokio::test]
    async fn side_outputs_only_reach_their_edges() {
        let (main_tx, mut main_rx) = mpsc::channel(4);
        let (side_tx, mut side_rx) = mpsc::channel(4);
        let mut collector = Collector::new(
            vec![
                OutputEdge::new(None, Partition::Forward, 1, vec![main_tx]),
                OutputEdge::new(Some("late".into()), Partition::Forward, 1, vec![side_tx]),
            ],
            128,
            4,
        );
        let record = RecordRef {
            key: None,
            value: b"x",
            timestamp: Some(1),
        };
        collector.emit(None, record).expect("main");
        collector.emit(Some("late"), record).expect("side");
        collector.emit(Some("nobody"), record).expect("dropped");
        assert!(
            collector
                .emit(
                    None,
                    RecordRef {
                        key: None,
                        value: b"12345",
                        timestamp: None
                    }
                )
                .is_err()
        );
        collector.flush().await.expect("flush");
        assert!(matches!(main_rx.try_recv(), Ok(StreamEvent::Records(b)) if b.len() == 1));
        assert!(matches!(side_rx.try_recv(), Ok(StreamEvent::Records(b)) if b.len() == 1));
    }
}
