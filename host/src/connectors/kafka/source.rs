//! The `kafka` source: the partitions of its topics assigned to its
//! subtasks by the job (no consumer group), read with Fetch requests from
//! their leaders, each partition's next offset in the checkpoint.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use kafka_protocol::ResponseError;
use kafka_protocol::messages::{
    FetchRequest, ListOffsetsRequest, TopicName,
    fetch_request::{FetchPartition, FetchTopic},
    fetch_response::AbortedTransaction,
    list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic},
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::RecordBatchDecoder;
use tokio::sync::mpsc;

use super::client::{CONSUMER, Cluster, KafkaError};
use super::{describe, partition_key, subtask_of, topic_hash};
use crate::connectors::{Pace, push_fields};
use crate::dataflow::operator::SourceFuture;
use crate::dataflow::{FailureKind, OperatorError, Source, SourceStatus};
use crate::job::{Isolation, KafkaStart, LineFormat};
use crate::types::RecordBatch;

/// Bytes a fetch asks for, per partition and in all.
const PARTITION_MAX_BYTES: i32 = 1 << 20;
const FETCH_MAX_BYTES: i32 = 16 << 20;
/// How long a broker may hold a fetch that found nothing new.
const FETCH_WAIT_MS: i32 = 500;

fn connector_error(message: impl Into<String>) -> OperatorError {
    OperatorError::new(FailureKind::Connector, message)
}

/// A record read from a partition.
struct InRecord {
    offset: i64,
    timestamp: Option<i64>,
    key: Option<Bytes>,
    value: Bytes,
}

/// What one fetch gave for one partition: its records (read_committed:
/// the committed ones) and the offset after the last batch seen (past
/// control records and aborted transactions).
struct Fetched {
    key: u32,
    topic: Arc<str>,
    partition: i32,
    records: VecDeque<InRecord>,
    next: u64,
}

enum Item {
    /// The partitions this subtask reads, each with the offset it starts at.
    Assigned(Vec<(u32, u64)>),
    Records(Fetched),
    /// Bounded: every partition was read to the end it had at the start.
    End,
    Failed(String),
}

/// A `kafka` source subtask.
pub struct KafkaSource {
    config: crate::job::KafkaSource,
    format: Option<LineFormat>,
    subtask: u32,
    parallelism: u32,
    /// Every stored subtask's positions (partition key → next offset), and
    /// whether this run was restored (partitions it lacks start earliest).
    restored: Option<BTreeMap<u32, u64>>,
    /// The partitions this subtask reads → the next offset to read.
    next: BTreeMap<u32, u64>,
    read: u64,
    items: Option<mpsc::Receiver<Item>>,
    reader: Option<tokio::task::JoinHandle<()>>,
    current: Option<Fetched>,
    ended: bool,
    pace: Pace,
}

impl KafkaSource {
    /// Subtask `subtask` of `parallelism`; `restored`: the positions of the
    /// restore point (every stored subtask's), None on a fresh start.
    pub fn new(
        config: crate::job::KafkaSource,
        format: Option<LineFormat>,
        subtask: u32,
        parallelism: u32,
        restored: Option<BTreeMap<u32, u64>>,
    ) -> Self {
        // Until the reader has listed the partitions, the restored
        // positions this subtask owns are its positions already.
        let next = restored
            .iter()
            .flatten()
            .filter(|&(&key, _)| subtask_of(key, parallelism) == subtask)
            .map(|(&k, &v)| (k, v))
            .collect();
        let pace = Pace::new(config.rate);
        Self {
            config,
            format,
            subtask,
            parallelism,
            restored,
            next,
            read: 0,
            items: None,
            reader: None,
            current: None,
            ended: false,
            pace,
        }
    }

    fn start(&mut self) {
        let (tx, rx) = mpsc::channel(16);
        let reader = Reader {
            config: self.config.clone(),
            subtask: self.subtask,
            parallelism: self.parallelism,
            restored: self.restored.clone(),
        };
        self.reader = Some(tokio::spawn(async move {
            if let Err(error) = reader.run(&tx).await {
                let _ = tx.send(Item::Failed(error)).await;
            }
        }));
        self.items = Some(rx);
    }

    /// Appends records of the current fetch up to `max` in all.
    fn take_current(&mut self, batch: &mut RecordBatch, max: usize) -> Result<(), OperatorError> {
        let Some(current) = &mut self.current else {
            return Ok(());
        };
        while batch.len() < max {
            let Some(record) = current.records.pop_front() else {
                break;
            };
            let (topic, partition, offset) = (&current.topic, current.partition, record.offset);
            push_fields(
                batch,
                &record.value,
                self.format.as_ref(),
                record.key.as_deref(),
                record.timestamp,
                || format!("topic `{topic}` partition {partition} offset {offset}"),
            )?;
            self.next.insert(current.key, offset as u64 + 1);
            self.read += 1;
            self.pace.produced(1);
        }
        if current.records.is_empty() {
            self.next.insert(current.key, current.next);
            self.current = None;
        }
        Ok(())
    }

    /// Takes one item; `Ok(false)` once the input ended.
    fn take(&mut self, item: Item) -> Result<bool, OperatorError> {
        match item {
            Item::Assigned(partitions) => {
                for (key, offset) in partitions {
                    self.next.entry(key).or_insert(offset);
                }
                Ok(true)
            }
            Item::Records(fetched) => {
                self.current = Some(fetched);
                Ok(true)
            }
            Item::End => {
                self.ended = true;
                Ok(false)
            }
            Item::Failed(error) => Err(connector_error(error)),
        }
    }

    async fn fill(
        &mut self,
        batch: &mut RecordBatch,
        max: usize,
    ) -> Result<SourceStatus, OperatorError> {
        if self.items.is_none() {
            self.start();
        }
        let max = self.pace.next(max).await;
        loop {
            self.take_current(batch, max)?;
            if batch.len() >= max {
                return Ok(SourceStatus::More);
            }
            if self.ended {
                return Ok(SourceStatus::Ended);
            }
            let items = self.items.as_mut().expect("started above");
            // Cancel-safe: an item is either still in the channel or taken
            // whole (its records counted into the position as they are
            // appended).
            let item = if batch.is_empty() {
                match items.recv().await {
                    Some(item) => item,
                    None => return Err(connector_error("the topic's reader stopped")),
                }
            } else {
                match items.try_recv() {
                    Ok(item) => item,
                    Err(_) => return Ok(SourceStatus::More),
                }
            };
            if !self.take(item)? && self.current.is_none() {
                return Ok(SourceStatus::Ended);
            }
        }
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        if let Some(reader) = &self.reader {
            reader.abort();
        }
    }
}

impl Source for KafkaSource {
    fn next_batch<'a>(&'a mut self, batch: &'a mut RecordBatch, max: usize) -> SourceFuture<'a> {
        Box::pin(self.fill(batch, max))
    }

    fn position(&self) -> u64 {
        self.read
    }

    fn partitions(&self) -> Option<BTreeMap<u32, u64>> {
        Some(self.next.clone())
    }
}

/// A partition this subtask reads.
struct Owned {
    key: u32,
    topic: Arc<str>,
    partition: i32,
    leader: i32,
    next: u64,
    /// Bounded: the end offset at the start.
    end: Option<u64>,
}

/// The reader task: lists the partitions, resolves where each starts and
/// fetches from their leaders.
struct Reader {
    config: crate::job::KafkaSource,
    subtask: u32,
    parallelism: u32,
    restored: Option<BTreeMap<u32, u64>>,
}

impl Reader {
    async fn run(self, tx: &mpsc::Sender<Item>) -> Result<(), String> {
        let bootstrap = self.config.bootstrap.clone();
        let mut cluster = Cluster::connect(&bootstrap)
            .await
            .map_err(|e| describe(&bootstrap, e))?;
        let mut owned = self.assigned(&mut cluster).await?;
        self.resolve_starts(&mut cluster, &mut owned).await?;
        if self.config.bounded {
            let ends = list_offsets(&mut cluster, &owned, -1, self.config.isolation)
                .await
                .map_err(|e| describe(&bootstrap, e))?;
            for (partition, end) in owned.iter_mut().zip(ends) {
                partition.end = Some(end);
            }
        }
        if tx
            .send(Item::Assigned(
                owned.iter().map(|o| (o.key, o.next)).collect(),
            ))
            .await
            .is_err()
        {
            return Ok(());
        }
        owned.retain(|o| o.end.is_none_or(|end| o.next < end));
        while !owned.is_empty() {
            let fetched = self
                .fetch_round(&mut cluster, &mut owned)
                .await
                .map_err(|e| describe(&bootstrap, e))?;
            for fetched in fetched {
                if tx.send(Item::Records(fetched)).await.is_err() {
                    return Ok(());
                }
            }
            owned.retain(|o| o.end.is_none_or(|end| o.next < end));
        }
        let _ = tx.send(Item::End).await;
        Ok(())
    }

    /// The partitions of the source's topics this subtask reads.
    async fn assigned(&self, cluster: &mut Cluster) -> Result<Vec<Owned>, String> {
        let bootstrap = &self.config.bootstrap;
        let topics = cluster
            .topics(&self.config.topics)
            .await
            .map_err(|e| describe(bootstrap, e))?;
        let mut owned = Vec::new();
        for (topic, partitions) in topics {
            let partitions = partitions.map_err(|code| missing_topic(bootstrap, &topic, code))?;
            let name: Arc<str> = Arc::from(topic.as_str());
            for partition in partitions {
                let key = partition_key(topic_hash(&topic), partition.index).ok_or_else(|| {
                    format!(
                        "topic `{topic}` has partition {}: this source reads partitions below 65536",
                        partition.index
                    )
                })?;
                if subtask_of(key, self.parallelism) == self.subtask {
                    owned.push(Owned {
                        key,
                        topic: name.clone(),
                        partition: partition.index,
                        leader: partition.leader,
                        next: 0,
                        end: None,
                    });
                }
            }
        }
        Ok(owned)
    }

    /// Where each partition starts: its restored position; on a restore, a
    /// partition without one (added since) at its earliest offset; on a
    /// fresh start, at `start`.
    async fn resolve_starts(
        &self,
        cluster: &mut Cluster,
        owned: &mut [Owned],
    ) -> Result<(), String> {
        let mut unknown: Vec<usize> = Vec::new();
        for (i, partition) in owned.iter_mut().enumerate() {
            match self.restored.as_ref().and_then(|r| r.get(&partition.key)) {
                Some(&next) => partition.next = next,
                None => unknown.push(i),
            }
        }
        if unknown.is_empty() {
            return Ok(());
        }
        let at = match (&self.restored, self.config.start) {
            (Some(_), _) | (None, KafkaStart::Earliest) => -2,
            (None, KafkaStart::Latest) => -1,
            (None, KafkaStart::Timestamp(ms)) => ms,
        };
        let bootstrap = &self.config.bootstrap;
        let subset: Vec<&Owned> = unknown.iter().map(|&i| &owned[i]).collect();
        let offsets = list_offsets_of(cluster, &subset, at, self.config.isolation)
            .await
            .map_err(|e| describe(bootstrap, e))?;
        let mut latest_needed = Vec::new();
        for (&i, offset) in unknown.iter().zip(offsets) {
            match offset {
                Some(offset) => owned[i].next = offset,
                // No record at or after the timestamp: start at the end.
                None => latest_needed.push(i),
            }
        }
        if !latest_needed.is_empty() {
            let subset: Vec<&Owned> = latest_needed.iter().map(|&i| &owned[i]).collect();
            let offsets = list_offsets_of(cluster, &subset, -1, self.config.isolation)
                .await
                .map_err(|e| describe(bootstrap, e))?;
            for (&i, offset) in latest_needed.iter().zip(offsets) {
                owned[i].next = offset.unwrap_or(0);
            }
        }
        Ok(())
    }

    /// One Fetch per leader of the partitions in `owned`; advances their
    /// `next`.
    async fn fetch_round(
        &self,
        cluster: &mut Cluster,
        owned: &mut [Owned],
    ) -> Result<Vec<Fetched>, KafkaError> {
        let mut leaders: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
        for (i, partition) in owned.iter().enumerate() {
            leaders.entry(partition.leader).or_default().push(i);
        }
        let committed = self.config.isolation == Isolation::ReadCommitted;
        let mut out = Vec::new();
        let mut stale_leaders = false;
        for (leader, indexes) in leaders {
            let address = match cluster.broker(leader) {
                Ok(address) => address,
                Err(_) => {
                    stale_leaders = true;
                    continue;
                }
            };
            let mut topics: Vec<FetchTopic> = Vec::new();
            for &i in &indexes {
                let partition = &owned[i];
                let fetch = FetchPartition::default()
                    .with_partition(partition.partition)
                    .with_fetch_offset(partition.next as i64)
                    .with_partition_max_bytes(PARTITION_MAX_BYTES);
                match topics
                    .iter_mut()
                    .find(|t| t.topic.0.as_str() == &*partition.topic)
                {
                    Some(topic) => topic.partitions.push(fetch),
                    None => topics.push(
                        FetchTopic::default()
                            .with_topic(topic_name(&partition.topic))
                            .with_partitions(vec![fetch]),
                    ),
                }
            }
            let request = FetchRequest::default()
                .with_replica_id(CONSUMER)
                .with_max_wait_ms(FETCH_WAIT_MS)
                .with_min_bytes(1)
                .with_max_bytes(FETCH_MAX_BYTES)
                .with_isolation_level(i8::from(committed))
                .with_topics(topics);
            let response = cluster.send_to(&address, &request, 12).await?;
            if response.error_code != 0 {
                return Err(KafkaError::broker(
                    format!("fetching from {address}"),
                    response.error_code,
                ));
            }
            for topic in response.responses {
                for data in topic.partitions {
                    let Some(&i) = indexes.iter().find(|&&i| {
                        &*owned[i].topic == topic.topic.0.as_str()
                            && owned[i].partition == data.partition_index
                    }) else {
                        continue;
                    };
                    let partition = &mut owned[i];
                    match ResponseError::try_from_code(data.error_code) {
                        None => {}
                        Some(
                            ResponseError::NotLeaderOrFollower
                            | ResponseError::LeaderNotAvailable
                            | ResponseError::FencedLeaderEpoch
                            | ResponseError::UnknownLeaderEpoch
                            | ResponseError::UnknownTopicOrPartition,
                        ) => {
                            stale_leaders = true;
                            continue;
                        }
                        Some(ResponseError::OffsetOutOfRange) => {
                            return Err(KafkaError::broker(
                                format!(
                                    "topic `{}` partition {}: offset {} is no longer (or not yet) in the log (log start {}, end {})",
                                    partition.topic,
                                    partition.partition,
                                    partition.next,
                                    data.log_start_offset,
                                    data.high_watermark
                                ),
                                data.error_code,
                            ));
                        }
                        Some(_) => {
                            return Err(KafkaError::broker(
                                format!(
                                    "fetching topic `{}` partition {}",
                                    partition.topic, partition.partition
                                ),
                                data.error_code,
                            ));
                        }
                    }
                    let aborted = if committed {
                        data.aborted_transactions.unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    let records = data.records.unwrap_or_default();
                    let (records, next) = decode_partition(
                        records,
                        partition.next,
                        aborted,
                        self.config.key_header.as_deref(),
                    )
                    .map_err(|message| KafkaError::Connection {
                        address: address.clone(),
                        message: format!(
                            "topic `{}` partition {}: {message}",
                            partition.topic, partition.partition
                        ),
                    })?;
                    // Bounded: nothing at or after the end seen at the start.
                    let (mut records, mut next) = (records, next);
                    if let Some(end) = partition.end {
                        records.retain(|r| (r.offset as u64) < end);
                        next = next.min(end.max(partition.next));
                    }
                    if next > partition.next || !records.is_empty() {
                        partition.next = next;
                        out.push(Fetched {
                            key: partition.key,
                            topic: partition.topic.clone(),
                            partition: partition.partition,
                            records,
                            next,
                        });
                    }
                }
            }
        }
        if stale_leaders {
            // Leadership moved: ask again where the partitions are.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let names: Vec<String> = self.config.topics.clone();
            let topics = cluster.topics(&names).await?;
            let leaders: HashMap<(String, i32), i32> = topics
                .into_iter()
                .filter_map(|(name, partitions)| Some((name, partitions.ok()?)))
                .flat_map(|(name, partitions)| {
                    partitions
                        .into_iter()
                        .map(move |p| ((name.clone(), p.index), p.leader))
                })
                .collect();
            for partition in owned.iter_mut() {
                if let Some(&leader) =
                    leaders.get(&(partition.topic.to_string(), partition.partition))
                {
                    partition.leader = leader;
                }
            }
        }
        Ok(out)
    }
}

fn topic_name(topic: &str) -> TopicName {
    TopicName(StrBytes::from_string(topic.to_string()))
}

pub(super) fn missing_topic(bootstrap: &str, topic: &str, code: ResponseError) -> String {
    match code {
        ResponseError::UnknownTopicOrPartition => {
            format!("topic `{topic}` does not exist on {bootstrap}")
        }
        ResponseError::TopicAuthorizationFailed => {
            format!("topic `{topic}` on {bootstrap}: not authorised ({code})")
        }
        code => format!("topic `{topic}` on {bootstrap}: {code}"),
    }
}

/// The offsets at `at` (-2 earliest, -1 latest, else a time in ms) of
/// every partition in `owned`, in order.
async fn list_offsets(
    cluster: &mut Cluster,
    owned: &[Owned],
    at: i64,
    isolation: Isolation,
) -> Result<Vec<u64>, KafkaError> {
    let all: Vec<&Owned> = owned.iter().collect();
    Ok(list_offsets_of(cluster, &all, at, isolation)
        .await?
        .into_iter()
        .map(|o| o.unwrap_or(0))
        .collect())
}

/// [`list_offsets`] of some partitions; None where no offset answers `at`
/// (no record at or after a time).
async fn list_offsets_of(
    cluster: &mut Cluster,
    owned: &[&Owned],
    at: i64,
    isolation: Isolation,
) -> Result<Vec<Option<u64>>, KafkaError> {
    let mut answers: HashMap<(Arc<str>, i32), Option<u64>> = HashMap::new();
    let mut leaders: BTreeMap<i32, Vec<&Owned>> = BTreeMap::new();
    for partition in owned {
        leaders.entry(partition.leader).or_default().push(partition);
    }
    for (leader, partitions) in leaders {
        let address = cluster.broker(leader)?;
        let mut topics: Vec<ListOffsetsTopic> = Vec::new();
        for partition in &partitions {
            let asked = ListOffsetsPartition::default()
                .with_partition_index(partition.partition)
                .with_current_leader_epoch(-1)
                .with_timestamp(at);
            match topics
                .iter_mut()
                .find(|t| t.name.0.as_str() == &*partition.topic)
            {
                Some(topic) => topic.partitions.push(asked),
                None => topics.push(
                    ListOffsetsTopic::default()
                        .with_name(topic_name(&partition.topic))
                        .with_partitions(vec![asked]),
                ),
            }
        }
        let request = ListOffsetsRequest::default()
            .with_replica_id(CONSUMER)
            .with_isolation_level(i8::from(isolation == Isolation::ReadCommitted))
            .with_topics(topics);
        let response = cluster.send_to(&address, &request, 7).await?;
        for topic in response.topics {
            for answer in topic.partitions {
                let name: Arc<str> = Arc::from(topic.name.0.as_str());
                if answer.error_code != 0 {
                    return Err(KafkaError::broker(
                        format!(
                            "listing the offsets of topic `{name}` partition {}",
                            answer.partition_index
                        ),
                        answer.error_code,
                    ));
                }
                let offset = (answer.offset >= 0).then_some(answer.offset as u64);
                answers.insert((name, answer.partition_index), offset);
            }
        }
    }
    owned
        .iter()
        .map(|p| {
            answers
                .get(&(p.topic.clone(), p.partition))
                .copied()
                .ok_or_else(|| {
                    KafkaError::broker(
                        format!(
                            "listing the offsets of topic `{}` partition {}: no answer",
                            p.topic, p.partition
                        ),
                        -1,
                    )
                })
        })
        .collect()
}

/// The records at or after `from` in a partition's fetched `data` (whole
/// record batches; a partial batch at the end is left for the next fetch)
/// and the offset after the last whole batch. `aborted`: under
/// read_committed, the aborted transactions the broker listed: a
/// transactional batch of a producer whose aborted transaction began at or
/// before it is skipped until that producer's abort marker.
fn decode_partition(
    mut data: Bytes,
    from: u64,
    mut aborted: Vec<AbortedTransaction>,
    key_header: Option<&str>,
) -> Result<(VecDeque<InRecord>, u64), String> {
    aborted.sort_by_key(|a| a.first_offset);
    let mut aborted: VecDeque<AbortedTransaction> = aborted.into();
    let mut aborting: HashSet<i64> = HashSet::new();
    let mut records = VecDeque::new();
    let mut next = from;
    // Batch header: base offset (8), length (4), leader epoch (4), magic
    // (1), crc (4), attributes (2), last offset delta (4), …
    while data.len() >= 12 {
        let base = (&data[0..8]).get_i64();
        let length = (&data[8..12]).get_i32();
        if length < 0 {
            return Err(format!("a record batch of length {length}"));
        }
        let total = 12 + length as usize;
        if data.len() < total {
            break;
        }
        let mut batch = data.split_to(total);
        if total < 27 {
            return Err(format!("a record batch of {total} bytes"));
        }
        let magic = batch[16];
        if magic != 2 {
            return Err(format!(
                "a record batch in message format v{magic} (only v2, Kafka 0.11 and later, is read)"
            ));
        }
        let last = base + i64::from((&batch[23..27]).get_i32());
        let set = RecordBatchDecoder::decode(&mut batch).map_err(|e| e.to_string())?;
        let end = (last + 1).max(0) as u64;
        if end <= next {
            continue;
        }
        let Some(first) = set.records.first() else {
            next = end;
            continue;
        };
        let (producer, transactional, control) =
            (first.producer_id, first.transactional, first.control);
        if transactional {
            while aborted.front().is_some_and(|a| a.first_offset <= last) {
                let started = aborted.pop_front().expect("checked above");
                aborting.insert(started.producer_id.0);
            }
        }
        if control {
            // Its key: version (i16), type (i16): 0 abort, 1 commit.
            let abort = first
                .key
                .as_ref()
                .is_some_and(|k| k.len() >= 4 && (&k[2..4]).get_i16() == 0);
            if abort {
                aborting.remove(&producer);
            }
            next = end;
            continue;
        }
        if transactional && aborting.contains(&producer) {
            next = end;
            continue;
        }
        for record in set.records {
            if record.offset < next as i64 {
                continue;
            }
            let key = match key_header {
                None => record.key,
                Some(name) => record
                    .headers
                    .iter()
                    .find(|(k, _)| k.as_str() == name)
                    .and_then(|(_, v)| v.clone()),
            };
            records.push_back(InRecord {
                offset: record.offset,
                timestamp: (record.timestamp >= 0).then_some(record.timestamp),
                key,
                value: record.value.unwrap_or_default(),
            });
        }
        next = end;
    }
    Ok((records, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use kafka_protocol::indexmap::IndexMap;
    use kafka_protocol::messages::ProducerId;
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };

    fn batch(
        out: &mut BytesMut,
        base: i64,
        producer: i64,
        values: &[&str],
        transactional: bool,
        marker: Option<bool>,
    ) {
        let records: Vec<Record> = values
            .iter()
            .enumerate()
            .map(|(i, v)| Record {
                transactional,
                control: marker.is_some(),
                partition_leader_epoch: -1,
                producer_id: producer,
                producer_epoch: 0,
                timestamp_type: TimestampType::Creation,
                offset: base + i as i64,
                sequence: i as i32,
                timestamp: 1000 + base + i as i64,
                key: match marker {
                    Some(commit) => Some(Bytes::from(vec![0, 0, 0, u8::from(commit)])),
                    None => Some(Bytes::from(v.to_string())),
                },
                value: Some(Bytes::from(v.to_string())),
                headers: IndexMap::new(),
            })
            .collect();
        RecordBatchEncoder::encode(
            out,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .expect("encodes");
    }

    fn values(records: &VecDeque<InRecord>) -> Vec<String> {
        records
            .iter()
            .map(|r| String::from_utf8_lossy(&r.value).into_owned())
            .collect()
    }

    #[test]
    fn read_committed_skips_aborted_transactions_and_markers() {
        let mut data = BytesMut::new();
        batch(&mut data, 0, -1, &["plain"], false, None);
        batch(&mut data, 1, 7, &["a1", "a2"], true, None); // aborted
        batch(&mut data, 3, 8, &["c1"], true, None); // committed
        batch(&mut data, 4, 7, &["marker"], true, Some(false)); // abort 7
        batch(&mut data, 5, 8, &["marker"], true, Some(true)); // commit 8
        batch(&mut data, 6, 7, &["later"], true, None); // 7 again, committed later
        let aborted = vec![
            AbortedTransaction::default()
                .with_producer_id(ProducerId(7))
                .with_first_offset(1),
        ];
        let whole = data.freeze();
        let (records, next) =
            decode_partition(whole.clone(), 0, aborted.clone(), None).expect("decodes");
        assert_eq!(values(&records), ["plain", "c1", "later"]);
        assert_eq!(next, 7);
        // From the middle of a batch, and with a partial batch at the end.
        let cut = whole.slice(..whole.len() - 3);
        let (records, next) = decode_partition(cut, 2, aborted, None).expect("decodes");
        assert_eq!(values(&records), ["c1"]);
        assert_eq!(next, 6);
        // read_uncommitted: no aborted list, every data record.
        let (records, _) = decode_partition(whole, 0, Vec::new(), None).expect("decodes");
        assert_eq!(values(&records), ["plain", "a1", "a2", "c1", "later"]);
    }
}
