//! Producing to Kafka: record batches in Produce requests, and the
//! transaction requests of a transactional producer whose producer id and
//! epoch we hold ourselves (so a restored sink can commit a transaction a
//! dead process pre-committed: `EndTxn` with the recorded ids, as Flink's
//! `KafkaSink` does through reflection into the Java client).

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::ResponseError;
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::messages::{
    AddPartitionsToTxnRequest, EndTxnRequest, FindCoordinatorRequest, InitProducerIdRequest,
    ListTransactionsRequest, ProduceRequest, ProducerId, TopicName, TransactionalId,
    add_partitions_to_txn_request::AddPartitionsToTxnTopic,
    produce_request::{PartitionProduceData, TopicProduceData},
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

use super::client::{Cluster, KafkaError, check_code};

/// How long a transaction may stay open on a broker that times
/// transactions out (Kafka's default `transaction.max.timeout.ms`): the sink
/// never relies on it, it commits or aborts every transaction itself.
pub const TRANSACTION_TIMEOUT_MS: i32 = 15 * 60 * 1000;
/// How long the transaction requests are retried while the coordinator
/// says "not now" (loading, moving, finishing the previous transaction).
const RETRY_FOR: Duration = Duration::from_secs(60);

/// A record to produce.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub key: Option<Bytes>,
    pub value: Bytes,
    /// Milliseconds since the epoch.
    pub timestamp: i64,
}

/// One transaction: its transactional id and the producer id and epoch
/// InitProducerId gave it (a new epoch per transaction, so these three
/// name exactly one transaction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnIds {
    pub transactional_id: String,
    pub producer_id: i64,
    pub epoch: i16,
}

const PENDING_TAG: &str = "kafka-txn";

impl TxnIds {
    /// As a checkpoint's pending entry: `kafka-txn <producer id> <epoch> <id>`.
    pub fn encode(&self) -> String {
        format!(
            "{PENDING_TAG} {} {} {}",
            self.producer_id, self.epoch, self.transactional_id
        )
    }

    /// A pending entry written by [`TxnIds::encode`]; None for others.
    pub fn decode(entry: &str) -> Option<Self> {
        let mut parts = entry.splitn(4, ' ');
        if parts.next()? != PENDING_TAG {
            return None;
        }
        Some(Self {
            producer_id: parts.next()?.parse().ok()?,
            epoch: parts.next()?.parse().ok()?,
            transactional_id: parts.next().filter(|id| !id.is_empty())?.to_string(),
        })
    }
}

/// Codes that mean "ask again shortly".
fn transient(code: Option<ResponseError>) -> bool {
    matches!(
        code,
        Some(
            ResponseError::CoordinatorLoadInProgress
                | ResponseError::CoordinatorNotAvailable
                | ResponseError::NotCoordinator
                | ResponseError::ConcurrentTransactions
                | ResponseError::RequestTimedOut
        )
    )
}

/// Sleeps before the next try, or says the retries are over.
async fn backoff(started: Instant, attempt: &mut u32) -> bool {
    if started.elapsed() > RETRY_FOR {
        return false;
    }
    *attempt += 1;
    let millis = (20u64 << (*attempt).min(5)).min(500);
    tokio::time::sleep(Duration::from_millis(millis)).await;
    true
}

/// The address of the transaction coordinator of `transactional_id`.
pub async fn coordinator(
    cluster: &mut Cluster,
    transactional_id: &str,
) -> Result<String, KafkaError> {
    let request = FindCoordinatorRequest::default()
        .with_key(StrBytes::from_string(transactional_id.to_string()))
        .with_key_type(1);
    let (started, mut attempt) = (Instant::now(), 0);
    loop {
        let response = cluster.send_any(&request, 3).await?;
        let result = check_code(response.error_code, || {
            format!("finding the transaction coordinator of `{transactional_id}`")
        });
        match result {
            Ok(()) => return Ok(format!("{}:{}", response.host.as_str(), response.port)),
            Err(error) => {
                if !(transient(error.code()) && backoff(started, &mut attempt).await) {
                    return Err(error);
                }
            }
        }
    }
}

/// Runs one transaction request against the coordinator of
/// `transactional_id`, asking again while the answer is transient.
macro_rules! with_coordinator {
    ($cluster:expr, $transactional_id:expr, $request:expr, $cap:expr, $what:expr, |$response:ident| $code:expr) => {{
        let (started, mut attempt) = (Instant::now(), 0u32);
        loop {
            let address = coordinator($cluster, $transactional_id).await?;
            let $response = $cluster.send_to(&address, &$request, $cap).await?;
            let result = check_code($code, || format!("{} `{}`", $what, $transactional_id));
            match result {
                Ok(()) => break $response,
                Err(error) => {
                    if !(transient(error.code()) && backoff(started, &mut attempt).await) {
                        return Err(error);
                    }
                }
            }
        }
    }};
}

/// A new producer id and epoch for `transactional_id`: fences any earlier
/// producer of that id and aborts the transaction it had open.
pub async fn init_producer(
    cluster: &mut Cluster,
    transactional_id: &str,
) -> Result<(i64, i16), KafkaError> {
    let request = InitProducerIdRequest::default()
        .with_transactional_id(Some(TransactionalId(StrBytes::from_string(
            transactional_id.to_string(),
        ))))
        .with_transaction_timeout_ms(TRANSACTION_TIMEOUT_MS)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    let response = with_coordinator!(
        cluster,
        transactional_id,
        request,
        4,
        "initialising the producer of",
        |response| response.error_code
    );
    Ok((response.producer_id.0, response.producer_epoch))
}

/// Adds `partitions` of `topic` to the transaction (before the first
/// produce to each).
pub async fn add_partitions(
    cluster: &mut Cluster,
    txn: &TxnIds,
    topic: &str,
    partitions: &[i32],
) -> Result<(), KafkaError> {
    let request = AddPartitionsToTxnRequest::default()
        .with_v3_and_below_transactional_id(TransactionalId(StrBytes::from_string(
            txn.transactional_id.clone(),
        )))
        .with_v3_and_below_producer_id(ProducerId(txn.producer_id))
        .with_v3_and_below_producer_epoch(txn.epoch)
        .with_v3_and_below_topics(vec![
            AddPartitionsToTxnTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(partitions.to_vec()),
        ]);
    with_coordinator!(
        cluster,
        &txn.transactional_id,
        request,
        3,
        "adding partitions to the transaction of",
        |response| response
            .results_by_topic_v3_and_below
            .iter()
            .flat_map(|t| &t.results_by_partition)
            .map(|p| p.partition_error_code)
            .find(|&code| code != 0)
            .unwrap_or(0)
    );
    Ok(())
}

/// Commits (`commit`) or aborts the transaction `txn`.
pub async fn end_txn(cluster: &mut Cluster, txn: &TxnIds, commit: bool) -> Result<(), KafkaError> {
    let request = EndTxnRequest::default()
        .with_transactional_id(TransactionalId(StrBytes::from_string(
            txn.transactional_id.clone(),
        )))
        .with_producer_id(ProducerId(txn.producer_id))
        .with_producer_epoch(txn.epoch)
        .with_committed(commit);
    let what = if commit {
        "committing the transaction of"
    } else {
        "aborting the transaction of"
    };
    with_coordinator!(
        cluster,
        &txn.transactional_id,
        request,
        4,
        what,
        |response| response.error_code
    );
    Ok(())
}

/// The transactional ids starting with `prefix` that have a transaction
/// open on any broker (ListTransactions, KIP-664). A broker that does not
/// answer it is skipped: the list is a second net, not the first.
pub async fn ongoing(cluster: &mut Cluster, prefix: &str) -> Vec<String> {
    let request = ListTransactionsRequest::default()
        .with_state_filters(vec![StrBytes::from_static_str("Ongoing")]);
    let mut found = Vec::new();
    for address in cluster.broker_addresses() {
        match cluster.send_to(&address, &request, 1).await {
            Ok(response) if response.error_code == 0 => found.extend(
                response
                    .transaction_states
                    .iter()
                    .map(|t| t.transactional_id.0.as_str().to_string())
                    .filter(|id| id.starts_with(prefix)),
            ),
            Ok(response) => {
                tracing::debug!(%address, code = response.error_code, "ListTransactions refused");
            }
            Err(error) => tracing::debug!(%address, %error, "ListTransactions not answered"),
        }
    }
    found.sort();
    found.dedup();
    found
}

/// How a batch is produced: in a transaction (its ids and the partition's
/// next sequence number) or plainly.
#[derive(Debug, Clone, Copy)]
pub enum Producing<'a> {
    Transactional { txn: &'a TxnIds, sequence: i32 },
    Plain,
}

/// The encoded record batch of `records`.
pub fn encode_batch(records: &[OutRecord], producing: Producing<'_>) -> Result<Bytes, String> {
    let (producer_id, epoch, sequence, transactional) = match producing {
        Producing::Transactional { txn, sequence } => (txn.producer_id, txn.epoch, sequence, true),
        Producing::Plain => (-1, -1, -1, false),
    };
    let records: Vec<Record> = records
        .iter()
        .enumerate()
        .map(|(i, r)| Record {
            transactional,
            control: false,
            partition_leader_epoch: -1,
            producer_id,
            producer_epoch: epoch,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: if transactional {
                sequence.wrapping_add(i as i32)
            } else {
                -1
            },
            timestamp: r.timestamp,
            key: r.key.clone(),
            value: Some(r.value.clone()),
            headers: IndexMap::new(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .map_err(|e| format!("cannot encode a record batch: {e}"))?;
    Ok(buf.freeze())
}

/// Produces `batch` (from [`encode_batch`]) to partition `partition` of
/// `topic` on its leader at `address`, waiting for every in-sync replica.
pub async fn produce(
    cluster: &mut Cluster,
    address: &str,
    topic: &str,
    partition: i32,
    batch: Bytes,
    transactional_id: Option<&str>,
) -> Result<(), KafkaError> {
    let request = ProduceRequest::default()
        .with_transactional_id(
            transactional_id.map(|id| TransactionalId(StrBytes::from_string(id.to_string()))),
        )
        .with_acks(-1)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(partition)
                        .with_records(Some(batch)),
                ]),
        ]);
    let response = cluster.send_to(address, &request, 9).await?;
    let code = response
        .responses
        .iter()
        .flat_map(|t| &t.partition_responses)
        .map(|p| p.error_code)
        .find(|&code| code != 0)
        .unwrap_or(0);
    check_code(code, || {
        format!("producing to topic `{topic}` partition {partition}")
    })
}

/// Kafka's default partitioner hash (murmur2, as the Java client's
/// `Utils.murmur2`): a keyed record goes to
/// `(murmur2(key) & 0x7fffffff) % partitions`.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() == 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner picks for `key`.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Kafka's own test vectors (clients' UtilsTest.testMurmur2).
        for (data, expected) in [
            (&b"21"[..], -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ] {
            assert_eq!(murmur2(data), expected, "{}", String::from_utf8_lossy(data));
        }
    }

    #[test]
    fn pending_entries_round_trip() {
        let txn = TxnIds {
            transactional_id: "weir-count job-out-0-1".into(),
            producer_id: 4711,
            epoch: 3,
        };
        assert_eq!(TxnIds::decode(&txn.encode()), Some(txn));
        assert_eq!(TxnIds::decode("pending/out-0-3"), None);
        assert_eq!(TxnIds::decode("kafka-txn 1 x id"), None);
    }
}
