//! The `kafka` sink: exactly-once through Kafka transactions (two-phase
//! commit on the job's checkpoints), or at-least-once. See the module doc
//! of [`super`] for the protocol; the hooks are synchronous and run their
//! requests on the tokio runtime the sink was created on
//! (`block_in_place`).

use std::collections::{BTreeMap, HashMap, HashSet};

use bytes::Bytes;
use kafka_protocol::ResponseError;

use super::client::{Cluster, KafkaError, PartitionInfo};
use super::describe;
use super::producer::{self, OutRecord, Producing, TxnIds};
use crate::dataflow::{FailureKind, OperatorError, Sink};
use crate::job::Delivery;
use crate::types::{CheckpointId, RecordBatch};

/// Slots every restore fences per subtask taken over, at least (and the
/// highest slot its restore point recorded, plus [`SLOTS_AFTER`]). A
/// subtask takes the lowest free slot for each transaction: one is usual
/// (checkpoints run one at a time), more while checkpoints fail or an
/// upgrade's probation holds the commits.
pub const POOL: u32 = 4;
/// Slots a subtask may have taken after its restore point beyond the ones
/// it recorded (the transaction pre-committed for a checkpoint that did not
/// complete, and the one open after it), fenced too.
const SLOTS_AFTER: u32 = 3;
/// A partition's buffered records are produced once they reach this size
/// (well below a broker's default 1 MiB `max.message.bytes`).
const FLUSH_BYTES: usize = 512 << 10;

fn connector_error(message: impl Into<String>) -> OperatorError {
    OperatorError::new(FailureKind::Connector, message)
}

/// The transactional id of slot `slot` of subtask `subtask`.
pub fn transactional_id(prefix: &str, subtask: u32, slot: u32) -> String {
    format!("{prefix}-{subtask}-{slot}")
}

/// A transaction this subtask has open or pre-committed.
#[derive(Debug)]
struct Txn {
    ids: TxnIds,
    slot: u32,
    /// Partitions added to the transaction.
    added: HashSet<i32>,
    /// Per partition, the next sequence number.
    sequences: HashMap<i32, i32>,
}

/// What a restored subtask settles before it writes: the transactions its
/// restore point recorded as pre-committed (committed), and the stored
/// subtasks whose transactional ids it fences.
#[derive(Debug, Default)]
struct Recovery {
    commit: Vec<TxnIds>,
    /// (stored subtask, slots to fence from 0).
    fence: Vec<(u32, u32)>,
    /// The sink's parallelism now: any transaction of ours still open after
    /// the fencing whose subtask maps to this one (ListTransactions: an
    /// earlier run at a higher parallelism, a slot beyond the fenced ones)
    /// is fenced too.
    parallelism: u32,
}

/// The (subtask, slot) of one of the sink's transactional ids.
fn parse_id(prefix: &str, id: &str) -> Option<(u32, u32)> {
    let rest = id.strip_prefix(prefix)?.strip_prefix('-')?;
    let (subtask, slot) = rest.split_once('-')?;
    Some((subtask.parse().ok()?, slot.parse().ok()?))
}

/// A `kafka` sink subtask.
pub struct KafkaSink {
    config: crate::job::KafkaSink,
    runtime: tokio::runtime::Handle,
    subtask: u32,
    cluster: Option<Cluster>,
    partitions: Vec<PartitionInfo>,
    recovery: Option<Recovery>,
    /// Records not yet produced, per partition, with their bytes.
    buffers: BTreeMap<i32, (Vec<OutRecord>, usize)>,
    /// The partition unkeyed records go to (round robin per batch).
    next_unkeyed: usize,
    /// Exactly-once: the transaction records are written into now.
    open: Option<Txn>,
    /// Exactly-once: pre-committed transactions and the checkpoint each
    /// was pre-committed at, oldest first.
    pending: Vec<(u64, Txn)>,
}

impl KafkaSink {
    /// Subtask `subtask` of `parallelism`. `stored`: the restore point's
    /// subtasks of this sink (index, pending entries); empty on a fresh
    /// start.
    pub fn create(
        config: crate::job::KafkaSink,
        subtask: u32,
        parallelism: u32,
        stored: &[(u32, Vec<String>)],
    ) -> Result<Self, OperatorError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| connector_error("a kafka sink needs a tokio runtime"))?;
        let recovery = (config.delivery == Delivery::ExactlyOnce).then(|| {
            let stored_parallelism = stored.iter().map(|(s, _)| s + 1).max().unwrap_or(0);
            let commit: Vec<TxnIds> = stored
                .iter()
                .filter(|(s, _)| s % parallelism == subtask)
                .flat_map(|(_, pending)| pending.iter().filter_map(|p| TxnIds::decode(p)))
                .collect();
            let fence = (0..stored_parallelism.max(parallelism))
                .filter(|s| s % parallelism == subtask)
                .map(|s| {
                    let recorded = commit
                        .iter()
                        .filter_map(|t| {
                            parse_id(&config.transactional_id_prefix, &t.transactional_id)
                        })
                        .filter(|&(of, _)| of == s)
                        .map(|(_, slot)| slot + 1 + SLOTS_AFTER)
                        .max()
                        .unwrap_or(0);
                    (s, recorded.max(POOL))
                })
                .collect();
            Recovery {
                commit,
                fence,
                parallelism,
            }
        });
        Ok(Self {
            config,
            runtime,
            subtask,
            cluster: None,
            partitions: Vec::new(),
            recovery,
            buffers: BTreeMap::new(),
            next_unkeyed: subtask as usize,
            open: None,
            pending: Vec::new(),
        })
    }

    fn block_on<T>(&self, work: impl Future<Output = T>) -> T {
        tokio::task::block_in_place(|| self.runtime.block_on(work))
    }

    fn error(&self, error: KafkaError) -> OperatorError {
        let fenced = matches!(
            error.code(),
            Some(ResponseError::ProducerFenced | ResponseError::InvalidProducerEpoch)
        );
        if fenced {
            return connector_error(format!(
                "{}: another producer took over this sink's transactional id (does another job or sink use the prefix `{}`? set `transactional_id_prefix`)",
                describe(&self.config.bootstrap, error),
                self.config.transactional_id_prefix
            ));
        }
        if matches!(
            error.code(),
            Some(ResponseError::MessageTooLarge | ResponseError::RecordListTooLarge)
        ) {
            return connector_error(format!(
                "{}: the broker refused the records as too large (a record must fit its max.message.bytes)",
                describe(&self.config.bootstrap, error)
            ));
        }
        connector_error(describe(&self.config.bootstrap, error))
    }

    /// Connects, learns the topic's partitions and (exactly-once, once)
    /// settles the restore point's transactions: commits the recorded ones,
    /// then fences every slot of the subtasks this one takes over.
    fn ready(&mut self) -> Result<(), OperatorError> {
        if self.cluster.is_some() {
            return Ok(());
        }
        let bootstrap = self.config.bootstrap.clone();
        let topic = self.config.topic.clone();
        let prefix = self.config.transactional_id_prefix.clone();
        let recovery = self.recovery.take().unwrap_or_default();
        let subtask = self.subtask;
        let result = self.block_on(async move {
            let mut cluster = Cluster::connect(&bootstrap).await?;
            let topics = cluster.topics(std::slice::from_ref(&topic)).await?;
            let partitions = match topics.into_iter().next() {
                Some((_, Ok(partitions))) if !partitions.is_empty() => partitions,
                Some((_, Err(code))) => {
                    return Err(KafkaError::Broker {
                        context: format!("topic `{topic}`"),
                        code,
                    });
                }
                _ => {
                    return Err(KafkaError::Broker {
                        context: format!("topic `{topic}`"),
                        code: ResponseError::UnknownTopicOrPartition,
                    });
                }
            };
            for txn in &recovery.commit {
                match producer::end_txn(&mut cluster, txn, true).await {
                    Ok(()) => {
                        tracing::info!(id = %txn.transactional_id, producer = txn.producer_id, epoch = txn.epoch, "committed a transaction the restored checkpoint had pre-committed");
                    }
                    // A later epoch of the id exists: the slot was reused,
                    // which happens only after this transaction committed.
                    Err(error)
                        if matches!(
                            error.code(),
                            Some(
                                ResponseError::ProducerFenced
                                    | ResponseError::InvalidProducerEpoch
                            )
                        ) =>
                    {
                        tracing::debug!(id = %txn.transactional_id, %error, "the restored checkpoint's transaction had been committed");
                    }
                    Err(error) if error.code() == Some(ResponseError::InvalidTxnState) => {
                        tracing::warn!(id = %txn.transactional_id, %error, "the restored checkpoint's transaction had already ended");
                    }
                    Err(error) => return Err(error),
                }
            }
            for &(stored, slots) in &recovery.fence {
                for slot in 0..slots {
                    producer::init_producer(&mut cluster, &transactional_id(&prefix, stored, slot))
                        .await?;
                }
            }
            if recovery.parallelism > 0 {
                for id in producer::ongoing(&mut cluster, &format!("{prefix}-")).await {
                    if parse_id(&prefix, &id)
                        .is_some_and(|(stored, _)| stored % recovery.parallelism == subtask)
                    {
                        tracing::info!(%id, "fencing a transaction an earlier run left open");
                        producer::init_producer(&mut cluster, &id).await?;
                    }
                }
            }
            Ok::<_, KafkaError>((cluster, partitions))
        });
        let (cluster, partitions) = result.map_err(|e| self.error(e))?;
        if let Some(fixed) = self.config.partition
            && !partitions.iter().any(|p| p.index == fixed)
        {
            return Err(connector_error(format!(
                "topic `{}` has no partition {fixed}",
                self.config.topic
            )));
        }
        self.cluster = Some(cluster);
        self.partitions = partitions;
        Ok(())
    }

    fn partition_of(&self, key: Option<&[u8]>) -> i32 {
        if let Some(fixed) = self.config.partition {
            return fixed;
        }
        let count = self.partitions.len().max(1);
        match key {
            Some(key) => {
                let index = producer::partition_for_key(key, count as i32);
                self.partitions
                    .get(index as usize)
                    .map_or(index, |p| p.index)
            }
            None => self.partitions[self.next_unkeyed % count].index,
        }
    }

    /// Starts a transaction on the lowest free slot, with a new epoch.
    fn begin(&mut self) -> Result<(), OperatorError> {
        if self.open.is_some() {
            return Ok(());
        }
        let taken: HashSet<u32> = self.pending.iter().map(|(_, t)| t.slot).collect();
        let slot = (0..).find(|s| !taken.contains(s)).unwrap_or(0);
        let id = transactional_id(&self.config.transactional_id_prefix, self.subtask, slot);
        let mut cluster = self.cluster.take().expect("ready() connected");
        let result = self.block_on(async {
            let ids = producer::init_producer(&mut cluster, &id).await;
            (cluster, ids)
        });
        let (cluster, ids) = result;
        self.cluster = Some(cluster);
        let (producer_id, epoch) = ids.map_err(|e| self.error(e))?;
        self.open = Some(Txn {
            ids: TxnIds {
                transactional_id: id,
                producer_id,
                epoch,
            },
            slot,
            added: HashSet::new(),
            sequences: HashMap::new(),
        });
        Ok(())
    }

    /// Produces the buffered records of `partition` (in the open
    /// transaction when exactly-once).
    fn flush_partition(&mut self, partition: i32) -> Result<(), OperatorError> {
        let Some((records, _)) = self.buffers.remove(&partition) else {
            return Ok(());
        };
        if records.is_empty() {
            return Ok(());
        }
        if self.config.delivery == Delivery::ExactlyOnce {
            self.begin()?;
        }
        let leader = self
            .partitions
            .iter()
            .find(|p| p.index == partition)
            .map_or(-1, |p| p.leader);
        let topic = self.config.topic.clone();
        let mut cluster = self.cluster.take().expect("ready() connected");
        let mut open = self.open.take();
        let result = self.block_on(async {
            let address = cluster.broker(leader)?;
            let (batch, transactional_id) = match &mut open {
                Some(txn) => {
                    if !txn.added.contains(&partition) {
                        producer::add_partitions(&mut cluster, &txn.ids, &topic, &[partition])
                            .await?;
                        txn.added.insert(partition);
                    }
                    let sequence = txn.sequences.entry(partition).or_insert(0);
                    let batch = producer::encode_batch(
                        &records,
                        Producing::Transactional {
                            txn: &txn.ids,
                            sequence: *sequence,
                        },
                    );
                    *sequence = sequence.wrapping_add(records.len() as i32);
                    (batch, Some(txn.ids.transactional_id.clone()))
                }
                None => (producer::encode_batch(&records, Producing::Plain), None),
            };
            let batch = batch.map_err(|message| KafkaError::Connection {
                address: address.clone(),
                message,
            })?;
            producer::produce(
                &mut cluster,
                &address,
                &topic,
                partition,
                batch,
                transactional_id.as_deref(),
            )
            .await
        });
        self.cluster = Some(cluster);
        self.open = open;
        result.map_err(|e| self.error(e))
    }

    fn flush_all(&mut self) -> Result<(), OperatorError> {
        let partitions: Vec<i32> = self.buffers.keys().copied().collect();
        for partition in partitions {
            self.flush_partition(partition)?;
        }
        Ok(())
    }

    /// Commits (or aborts) `txns` in order.
    fn end_txns(&mut self, txns: Vec<Txn>, commit: bool) -> Result<(), OperatorError> {
        if txns.is_empty() {
            return Ok(());
        }
        let mut cluster = self.cluster.take().expect("ready() connected");
        let result = self.block_on(async {
            for txn in &txns {
                producer::end_txn(&mut cluster, &txn.ids, commit).await?;
            }
            Ok::<(), KafkaError>(())
        });
        self.cluster = Some(cluster);
        result.map_err(|e| self.error(e))
    }
}

impl Sink for KafkaSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), OperatorError> {
        self.ready()?;
        let now = crate::types::now_millis();
        for record in batch.iter() {
            let partition = self.partition_of(record.key);
            let size = record.value.len() + record.key.map_or(0, <[u8]>::len) + 16;
            // A produce request stays under the broker's size limit unless
            // one record alone exceeds it.
            if self
                .buffers
                .get(&partition)
                .is_some_and(|(_, bytes)| *bytes > 0 && bytes + size > FLUSH_BYTES)
            {
                self.flush_partition(partition)?;
            }
            let (records, bytes) = self.buffers.entry(partition).or_default();
            records.push(OutRecord {
                key: record.key.map(Bytes::copy_from_slice),
                value: Bytes::copy_from_slice(record.value),
                timestamp: record.timestamp.unwrap_or(now),
            });
            *bytes += size;
        }
        self.next_unkeyed = self.next_unkeyed.wrapping_add(1);
        Ok(())
    }

    fn prepare_commit(&mut self, checkpoint: CheckpointId) -> Result<Vec<String>, OperatorError> {
        self.ready()?;
        self.flush_all()?;
        if self.config.delivery == Delivery::AtLeastOnce {
            return Ok(Vec::new());
        }
        if let Some(txn) = self.open.take() {
            self.pending.push((checkpoint.0, txn));
        }
        Ok(self.pending.iter().map(|(_, t)| t.ids.encode()).collect())
    }

    fn commit(&mut self, checkpoint: CheckpointId) -> Result<(), OperatorError> {
        self.ready()?;
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(n, _)| *n <= checkpoint.0);
        self.pending = rest;
        self.end_txns(due.into_iter().map(|(_, t)| t).collect(), true)
    }

    fn finish(&mut self) -> Result<(), OperatorError> {
        self.ready()?;
        self.flush_all()
    }

    fn end(&mut self, commit: bool) -> Result<(), OperatorError> {
        self.ready()?;
        if commit {
            self.flush_all()?;
        } else {
            self.buffers.clear();
        }
        let mut txns: Vec<Txn> = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        txns.extend(self.open.take());
        self.end_txns(txns, commit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink_config() -> crate::job::KafkaSink {
        crate::job::KafkaSink {
            bootstrap: "127.0.0.1:9".into(),
            topic: "out".into(),
            delivery: Delivery::ExactlyOnce,
            partition: None,
            transactional_id_prefix: "weir-job-out".into(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_restored_subtask_commits_and_fences_what_it_takes_over() {
        let txn = |s: u32| TxnIds {
            transactional_id: transactional_id("weir-job-out", s, 0),
            producer_id: 100 + i64::from(s),
            epoch: 2,
        };
        // Stored at parallelism 3, restored at 2: subtask 0 takes 0 and 2.
        let stored: Vec<(u32, Vec<String>)> = (0..3)
            .map(|s| (s, vec![txn(s).encode(), "pending/other".into()]))
            .collect();
        let sink = KafkaSink::create(sink_config(), 0, 2, &stored).expect("created");
        let recovery = sink.recovery.expect("exactly-once");
        assert_eq!(recovery.commit, vec![txn(0), txn(2)]);
        assert_eq!(recovery.fence, vec![(0, POOL), (2, POOL)]);
        // Stored at 1, restored at 3: subtask 2 fences its own ids only.
        let sink = KafkaSink::create(sink_config(), 2, 3, &stored[..1]).expect("created");
        let recovery = sink.recovery.expect("exactly-once");
        assert!(recovery.commit.is_empty());
        assert_eq!(recovery.fence, vec![(2, POOL)]);
        // A high slot recorded: fenced up to it and a few after.
        let high = TxnIds {
            transactional_id: transactional_id("weir-job-out", 0, 9),
            producer_id: 7,
            epoch: 1,
        };
        let sink =
            KafkaSink::create(sink_config(), 0, 1, &[(0, vec![high.encode()])]).expect("created");
        assert_eq!(sink.recovery.expect("exactly-once").fence, vec![(0, 13)]);
        assert_eq!(parse_id("weir-job-out", "weir-job-out-3-1"), Some((3, 1)));
        assert_eq!(parse_id("weir-job-out", "weir-job-out-x-3-1"), None);
    }
}
