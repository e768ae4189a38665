//! Exchanges: a keyed edge carried through NATS JetStream, so the operators
//! on its two sides may run apart (other tasks, other hosts) and each side
//! checkpoints alone.
//!
//! An exchange `NAME` is the JetStream stream `weir-NAME` (dots as `_`),
//! created by whichever side connects first, with one subject per key
//! group: `weir.NAME.<key group>`.
//!
//! **Writing** (the `exchange` sink, [`super::nats::NatsSink`] in exchange
//! mode): each checkpoint epoch's records are spooled with their key group
//! and time, and the watermarks and the end of input as they come; when the
//! checkpoint completes the epoch is published as it is spooled, per key
//! group in messages of up to [`MESSAGE_RECORDS`] records (the flat batch
//! layout, [`encode_batch`]), never one record per message, each with the
//! id `<job>:<uid>:<subtask>:<epoch>:<key group>:<n>`, which JetStream
//! de-duplicates on a republish. A watermark that advanced in the epoch,
//! and the end, follow the epoch's records as one empty message per key
//! group, so every reader of every key group hears from every writer.
//! Headers: [`PRODUCER`] (`<subtask>/<parallelism>`), [`WATERMARK`],
//! [`END`].
//!
//! **Reading** ([`ExchangeSource`]): subtask i reads the key groups subtask
//! i of a keyed edge would get (`key_group::range_of`), through one ordered
//! consumer filtering their subjects, and records per key group the stream
//! sequence of the last message it emitted ([`Source::partitions`]; a
//! restore at another parallelism hands each key group's position to its
//! new reader). Its watermark is the minimum over the writers; it ends once
//! every writer ended on each of its key groups (those counts are
//! checkpointed with the positions, under `END_BASE + key group`, and
//! which writers' last message paused, under `PAUSED_BASE + key group`).
//!
//! **Stopping** (a staged job stopped as a whole, so that its stages'
//! savepoints form one cut): a writer stopped with a savepoint publishes,
//! after everything it committed, one [`PAUSED`] message per key group. A
//! reader asked for an *aligned* stop (the stop's trigger says so) sends
//! its barrier only once, on each of its key groups, every writer's last
//! message said it paused or ended ([`Source::stop_ready`]): its savepoint
//! then holds exactly what the writers' savepoints published, nothing in
//! flight, so the stages' savepoints restore together as one job, on one
//! host too. Any other message from a writer (it resumed) takes its pause
//! back.
//!
//! **Purging**: once a checkpoint of the reader is committed (the job's
//! restore point: it never restores an earlier one of its own accord), what
//! each key group read up to it is purged from the stream, at most every
//! [`PURGE_EVERY`], in the background: first the key group's *floor*
//! (subject `weir.NAME.f<key group>`, the last purged sequence, one kept),
//! then its messages up to it. A reader that starts from positions below a
//! floor (an older savepoint or checkpoint, or a new job on an exchange
//! another one read) fails naming the key group and both sequences, never
//! reading on with records missing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::ops::Range;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, Context, consumer};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::dataflow::operator::SourceFuture;
use crate::dataflow::{FailureKind, OperatorError, Source, SourceStatus};
use crate::job::Exchange;
use crate::types::{BatchEntry, CheckpointId, ENTRY_WORDS, RecordBatch, Timestamp, key_group};

/// How often a reader purges what its committed checkpoints read at most.
pub const PURGE_EVERY: Duration = Duration::from_secs(5);

/// Records per exchange message at most.
pub const MESSAGE_RECORDS: usize = 1024;
/// Bytes of record data per exchange message at most (a message may hold
/// one larger record).
const MESSAGE_BYTES: usize = 512 << 10;
/// The header naming a message's writer: `<subtask>/<parallelism>`.
pub const PRODUCER: &str = "Weir-Producer";
/// The header carrying a writer's watermark (ms).
pub const WATERMARK: &str = "Weir-Watermark";
/// The header marking a writer's end of input.
pub const END: &str = "Weir-End";
/// The first line of an exchange spool file: this, then the ids' prefix.
pub const SPOOL_HEADER: &str = "weir-exchange-pending 1 ";
/// Partition keys at and above this hold a key group's end counts, not a
/// position (key groups are below 2^16).
const END_BASE: u32 = 1 << 20;
/// Partition keys at and above this hold which writers' last message on a
/// key group said they paused ([`pack_paused`]).
const PAUSED_BASE: u32 = 2 << 20;
/// How long an exchange stream keeps message ids.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The first bytes of a message body.
const MAGIC: &[u8; 4] = b"WXB1";

fn connector_error(message: impl Into<String>) -> OperatorError {
    OperatorError::new(FailureKind::Connector, message)
}

impl Exchange {
    /// The JetStream stream that holds the exchange.
    pub fn stream(&self) -> String {
        format!("weir-{}", self.name.replace('.', "_"))
    }

    /// The subject of key group `group`.
    pub fn subject(&self, group: u32) -> String {
        format!("weir.{}.{group}", self.name)
    }

    /// The subject of key group `group`'s purge floor.
    pub fn floor_subject(&self, group: u32) -> String {
        format!("weir.{}.f{group}", self.name)
    }

    /// The stream, made if it is not there yet (either side may come first).
    ///
    /// Every task on either side opens it, often at once, and a clustered
    /// JetStream may take a while to place a replicated stream: a request
    /// that timed out (or found JetStream unavailable, as while it elects
    /// a leader) is asked again for up to 30 s.
    pub async fn open(&self, js: &Context) -> Result<jetstream::stream::Stream, String> {
        use jetstream::context::CreateStreamErrorKind as Kind;
        let name = self.stream();
        let started = std::time::Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            let opened = js
                .get_or_create_stream(jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![format!("weir.{}.*", self.name)],
                    duplicate_window: DUPLICATE_WINDOW,
                    num_replicas: self.replicas,
                    description: Some(format!("weir exchange {}", self.name)),
                    ..Default::default()
                })
                .await;
            match opened {
                Ok(stream) => return Ok(stream),
                Err(e)
                    if matches!(e.kind(), Kind::TimedOut | Kind::JetStreamUnavailable)
                        && started.elapsed() + backoff < OPEN_FOR =>
                {
                    warn!(exchange = %self.name, error = %e, "cannot open the exchange's stream yet; asking again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    return Err(format!(
                        "exchange `{}`: cannot open stream `{name}` on {}: {e}",
                        self.name,
                        super::nats::redact(&self.url)
                    ));
                }
            }
        }
    }
}

/// How long [`Exchange::open`] asks again after a request timed out.
const OPEN_FOR: Duration = Duration::from_secs(30);

/// `batch` as a message body: the magic, the record count, the entries'
/// flat words (little-endian) and the data.
pub fn encode_batch(batch: &RecordBatch) -> Vec<u8> {
    let words = BatchEntry::as_words(batch.entries());
    let mut out = Vec::with_capacity(8 + words.len() * 4 + batch.data_len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(batch.len() as u32).to_le_bytes());
    for word in words {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.extend_from_slice(batch.data());
    out
}

/// A message body back as a batch (every offset checked).
pub fn decode_batch(body: &[u8]) -> Result<RecordBatch, String> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or("not an exchange message (no magic)")?;
    let (count, rest) = rest.split_at_checked(4).ok_or("truncated record count")?;
    let count = u32::from_le_bytes(count.try_into().expect("4 bytes")) as usize;
    let (words, data) = rest
        .split_at_checked(count * ENTRY_WORDS * 4)
        .ok_or("truncated entries")?;
    let words: Vec<u32> = words
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
        .collect();
    let entries = BatchEntry::from_words(&words)?.to_vec();
    RecordBatch::from_parts(data.to_vec(), entries)
}

/// Spool record tags.
const TAG_RECORD: u8 = 0;
const TAG_WATERMARK: u8 = 1;
const TAG_END: u8 = 2;

/// Appends `batch`'s records to a spool file's body, each with its key
/// group (records without a key are refused: an exchange is keyed).
pub fn spool_batch(
    out: &mut impl Write,
    batch: &RecordBatch,
    max_parallelism: u32,
) -> Result<(), OperatorError> {
    let io = |e: std::io::Error| connector_error(format!("spool file: {e}"));
    for record in batch.iter() {
        let key = record.key.ok_or_else(|| {
            OperatorError::new(
                FailureKind::Plugin,
                "a record without a key reached an exchange (its key group decides its subject)",
            )
        })?;
        let group = key_group::of_key(key, max_parallelism);
        out.write_all(&[TAG_RECORD]).map_err(io)?;
        out.write_all(&group.to_le_bytes()).map_err(io)?;
        match record.timestamp {
            Some(t) => {
                out.write_all(&[1]).map_err(io)?;
                out.write_all(&t.to_le_bytes()).map_err(io)?;
            }
            None => out.write_all(&[0]).map_err(io)?,
        }
        out.write_all(&(key.len() as u32).to_le_bytes())
            .map_err(io)?;
        out.write_all(key).map_err(io)?;
        out.write_all(&(record.value.len() as u32).to_le_bytes())
            .map_err(io)?;
        out.write_all(record.value).map_err(io)?;
    }
    Ok(())
}

/// Appends a watermark to a spool file's body.
pub fn spool_watermark(out: &mut impl Write, watermark: Timestamp) -> std::io::Result<()> {
    out.write_all(&[TAG_WATERMARK])?;
    out.write_all(&watermark.to_le_bytes())
}

/// Appends the end of input to a spool file's body.
pub fn spool_end(out: &mut impl Write) -> std::io::Result<()> {
    out.write_all(&[TAG_END])
}

/// One message of an epoch: its key group, body and headers.
#[derive(Debug, PartialEq)]
pub struct Message {
    pub group: u32,
    /// Index of the message among its key group's in this epoch.
    pub index: usize,
    pub batch: Option<RecordBatch>,
    pub watermark: Option<Timestamp>,
    pub end: bool,
}

/// A spool file's body as the messages to publish, in order: each key
/// group's records in batches, then (if the epoch's watermark advanced or
/// its input ended) one control message per key group of
/// `0..max_parallelism`.
pub fn epoch_messages(body: &[u8], max_parallelism: u32) -> Result<Vec<Message>, String> {
    let mut groups: BTreeMap<u16, Vec<RecordBatch>> = BTreeMap::new();
    let mut watermark = None;
    let mut end = false;
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Result<&[u8], String> {
        let slice = body
            .get(*at..*at + n)
            .ok_or_else(|| "truncated spool record".to_string())?;
        *at += n;
        Ok(slice)
    };
    while at < body.len() {
        match take(&mut at, 1)?[0] {
            TAG_RECORD => {
                let group = u16::from_le_bytes(take(&mut at, 2)?.try_into().expect("2"));
                let timestamp = match take(&mut at, 1)?[0] {
                    0 => None,
                    _ => Some(i64::from_le_bytes(take(&mut at, 8)?.try_into().expect("8"))),
                };
                let n = u32::from_le_bytes(take(&mut at, 4)?.try_into().expect("4")) as usize;
                let key = take(&mut at, n)?;
                let n = u32::from_le_bytes(take(&mut at, 4)?.try_into().expect("4")) as usize;
                let value = take(&mut at, n)?;
                let batches = groups.entry(group).or_default();
                let full = |b: &RecordBatch| {
                    b.len() >= MESSAGE_RECORDS
                        || (!b.is_empty() && b.data_len() + key.len() + value.len() > MESSAGE_BYTES)
                };
                if batches.last().is_none_or(full) {
                    batches.push(RecordBatch::new());
                }
                batches
                    .last_mut()
                    .expect("pushed above")
                    .push(Some(key), value, timestamp);
            }
            TAG_WATERMARK => {
                let w = i64::from_le_bytes(take(&mut at, 8)?.try_into().expect("8"));
                watermark = Some(watermark.map_or(w, |m: i64| m.max(w)));
            }
            TAG_END => end = true,
            other => return Err(format!("unknown spool record tag {other}")),
        }
    }
    let mut messages = Vec::new();
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for (group, batches) in groups {
        let group = u32::from(group);
        for batch in batches {
            let index = counts.entry(group).or_default();
            messages.push(Message {
                group,
                index: *index,
                batch: Some(batch),
                watermark: None,
                end: false,
            });
            *index += 1;
        }
    }
    if watermark.is_some() || end {
        for group in 0..max_parallelism {
            messages.push(Message {
                group,
                index: counts.get(&group).copied().unwrap_or(0),
                batch: None,
                watermark,
                end,
            });
        }
    }
    Ok(messages)
}

/// A writer's last word before it stopped (not ended: a stop with a
/// savepoint), with the checkpoint it stopped at: see "Stopping" above.
pub const PAUSED: &str = "Weir-Paused";

/// Who writes an exchange: sink subtask `subtask` of `parallelism`, keying
/// by `max_parallelism` key groups.
#[derive(Debug, Clone)]
pub struct Producer {
    pub exchange: Exchange,
    pub subtask: u32,
    pub parallelism: u32,
    pub max_parallelism: u32,
}

impl Producer {
    /// Publishes an epoch's messages ([`epoch_messages`]) with the ids
    /// `<id_prefix>:<key group>:<n>`, waiting for every acknowledgement.
    /// Returns how many messages were published.
    pub async fn publish(
        &self,
        js: &Context,
        id_prefix: &str,
        messages: &[Message],
    ) -> Result<u64, OperatorError> {
        let producer = format!("{}/{}", self.subtask, self.parallelism);
        let built = messages.iter().map(|message| {
            let payload = message.batch.as_ref().map(encode_batch).unwrap_or_default();
            let mut build = jetstream::message::PublishMessage::build()
                .payload(payload.into())
                .message_id(format!("{id_prefix}:{}:{}", message.group, message.index))
                .header(PRODUCER, producer.as_str());
            if let Some(watermark) = message.watermark {
                build = build.header(WATERMARK, watermark.to_string().as_str());
            }
            if message.end {
                build = build.header(END, "1");
            }
            (message.group, build)
        });
        self.send_all(js, built).await
    }

    /// Tells every key group's readers this writer stopped after
    /// checkpoint `stopped_at` (everything it wrote before is published):
    /// one empty [`PAUSED`] message per key group, ids
    /// `<id_prefix>:paused:<checkpoint>:<key group>`.
    pub async fn pause(
        &self,
        js: &Context,
        id_prefix: &str,
        stopped_at: u64,
    ) -> Result<(), OperatorError> {
        let producer = format!("{}/{}", self.subtask, self.parallelism);
        let built = (0..self.max_parallelism).map(|group| {
            let build = jetstream::message::PublishMessage::build()
                .payload(bytes::Bytes::new())
                .message_id(format!("{id_prefix}:paused:{stopped_at}:{group}"))
                .header(PRODUCER, producer.as_str())
                .header(PAUSED, stopped_at.to_string().as_str());
            (group, build)
        });
        self.send_all(js, built).await.map(|_| ())
    }

    /// Publishes each (key group, message) to its key group's subject, up
    /// to 256 unacknowledged at once, and waits for every acknowledgement.
    /// Returns how many were published.
    async fn send_all(
        &self,
        js: &Context,
        messages: impl Iterator<Item = (u32, jetstream::message::PublishMessage)>,
    ) -> Result<u64, OperatorError> {
        let mut acks = VecDeque::new();
        let mut published = 0u64;
        for (group, build) in messages {
            let ack = js
                .send_publish(self.exchange.subject(group), build)
                .await
                .map_err(|e| {
                    connector_error(format!(
                        "cannot publish to exchange `{}`: {e}",
                        self.exchange.name
                    ))
                })?;
            acks.push_back(ack);
            if acks.len() >= 256 {
                self.await_ack(acks.pop_front().expect("non-empty")).await?;
            }
            published += 1;
        }
        for ack in acks {
            self.await_ack(ack).await?;
        }
        Ok(published)
    }

    async fn await_ack(
        &self,
        ack: jetstream::context::PublishAckFuture,
    ) -> Result<(), OperatorError> {
        ack.await.map(|_| ()).map_err(|e| {
            connector_error(format!(
                "publish to exchange `{}` not acknowledged: {e}",
                self.exchange.name
            ))
        })
    }
}

/// One message for the source, or how its reader ended.
enum Item {
    Message {
        group: u32,
        sequence: u64,
        message: Box<jetstream::Message>,
    },
    Failed(String),
}

/// A key group's end count as checkpointed: writers, and how many ended.
fn pack_ends(writers: u32, ended: u32) -> u64 {
    (u64::from(writers) << 32) | u64::from(ended)
}

fn unpack_ends(packed: u64) -> (u32, u32) {
    ((packed >> 32) as u32, packed as u32)
}

/// The writers of `writers` that paused, as one number: the count above,
/// a bit per writer below (none: more than 32 writers, not kept; a
/// restored reader then hears of their pauses no more).
fn pack_paused(writers: u32, paused: &BTreeSet<u32>) -> Option<u64> {
    (writers <= 32 && paused.iter().all(|w| *w < 32)).then(|| {
        let bits = paused.iter().fold(0u32, |bits, w| bits | (1 << w));
        (u64::from(writers) << 32) | u64::from(bits)
    })
}

fn unpack_paused(packed: u64) -> (u32, BTreeSet<u32>) {
    let bits = packed as u32;
    let paused = (0..32).filter(|w| bits & (1 << w) != 0).collect();
    ((packed >> 32) as u32, paused)
}

/// An `exchange` source subtask: see the module's "Reading".
pub struct ExchangeSource {
    exchange: Exchange,
    groups: Range<u32>,
    /// Key group → the sequence of the last message emitted.
    last: BTreeMap<u32, u64>,
    /// Key group → (writers, writers that ended on it).
    ends: BTreeMap<u32, (u32, u32)>,
    /// Key group → the writers whose last message on it said they paused.
    paused: BTreeMap<u32, BTreeSet<u32>>,
    /// Each writer's watermark (by subtask), and how many writers there
    /// are (as the newest message said).
    watermarks: BTreeMap<u32, Timestamp>,
    writers: u32,
    /// The watermark last handed out.
    emitted: Timestamp,
    read: u64,
    items: Option<mpsc::Receiver<Item>>,
    reader: Option<tokio::task::JoinHandle<()>>,
    /// Each checkpoint's positions until it is committed, oldest first.
    taken: VecDeque<(u64, BTreeMap<u32, u64>)>,
    /// Committed positions for the purging task (the newest wins), and
    /// when it was last handed some.
    purge: Option<watch::Sender<BTreeMap<u32, u64>>>,
    purged_at: Option<Instant>,
}

impl ExchangeSource {
    /// Subtask `subtask` of `parallelism` over `max_parallelism` key
    /// groups, restored at `restored` (every stored subtask's positions).
    pub fn new(
        exchange: Exchange,
        subtask: u32,
        parallelism: u32,
        max_parallelism: u32,
        restored: &BTreeMap<u32, u64>,
    ) -> Self {
        let groups = key_group::range_of(subtask, parallelism, max_parallelism);
        let last = groups
            .clone()
            .map(|g| (g, restored.get(&g).copied().unwrap_or(0)))
            .collect();
        let ends = groups
            .clone()
            .filter_map(|g| Some((g, unpack_ends(*restored.get(&(END_BASE + g))?))))
            .collect();
        // A reader restored while its writers stood paused (a stop in
        // flight) knows it, though they publish nothing more.
        let mut writers = 0;
        let mut paused = BTreeMap::new();
        for g in groups.clone() {
            if let Some(&packed) = restored.get(&(PAUSED_BASE + g)) {
                let (of, who) = unpack_paused(packed);
                writers = of;
                paused.insert(g, who);
            }
        }
        Self {
            exchange,
            groups,
            last,
            ends,
            paused,
            watermarks: BTreeMap::new(),
            writers,
            emitted: i64::MIN,
            read: 0,
            items: None,
            reader: None,
            taken: VecDeque::new(),
            purge: None,
            purged_at: None,
        }
    }

    /// Every writer ended on each of this subtask's key groups.
    fn ended(&self) -> bool {
        self.groups.clone().all(|g| {
            self.ends
                .get(&g)
                .is_some_and(|&(writers, ended)| writers > 0 && ended >= writers)
        })
    }

    /// Every writer of each of this subtask's key groups paused (or ended)
    /// after all it wrote there, and this reader read it all.
    fn all_paused(&self) -> bool {
        self.writers > 0
            && self.groups.clone().all(|g| {
                let ended = self.ends.get(&g).map_or(0, |&(_, ended)| ended);
                let paused = self.paused.get(&g).map_or(0, BTreeSet::len) as u32;
                paused + ended >= self.writers
            })
    }

    fn start(&mut self) {
        let (tx, rx) = mpsc::channel(1024);
        let (exchange, last) = (self.exchange.clone(), self.last.clone());
        self.reader = Some(tokio::spawn(async move {
            if let Err(error) = read(&exchange, &last, &tx).await {
                let _ = tx.send(Item::Failed(error)).await;
            }
        }));
        self.items = Some(rx);
    }

    /// Appends one message's records; takes in its watermark and end.
    fn take(&mut self, item: Item, batch: &mut RecordBatch) -> Result<(), OperatorError> {
        let (group, sequence, message) = match item {
            Item::Message {
                group,
                sequence,
                message,
            } => (group, sequence, message),
            Item::Failed(error) => return Err(connector_error(error)),
        };
        let name = &self.exchange.name;
        let bad = |what: String| {
            connector_error(format!(
                "exchange `{name}` message {sequence} (key group {group}): {what}"
            ))
        };
        let header = |key: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(key))
                .map(|v| v.as_str().to_string())
        };
        let (writer, writers) = header(PRODUCER)
            .and_then(|p| {
                let (s, n) = p.split_once('/')?;
                Some((s.parse::<u32>().ok()?, n.parse::<u32>().ok()?))
            })
            .ok_or_else(|| bad(format!("no valid {PRODUCER} header")))?;
        if !message.payload.is_empty() {
            let records = decode_batch(&message.payload).map_err(bad)?;
            for record in records.iter() {
                batch.push_record(record);
            }
            self.read += records.len() as u64;
        }
        if writers != self.writers {
            // Another parallelism upstream (a rescale): start over.
            self.writers = writers;
            self.watermarks.retain(|w, _| *w < writers);
            for paused in self.paused.values_mut() {
                paused.retain(|w| *w < writers);
            }
        }
        let paused = self.paused.entry(group).or_default();
        match header(PAUSED) {
            Some(_) => paused.insert(writer),
            None => paused.remove(&writer),
        };
        if let Some(watermark) = header(WATERMARK) {
            let watermark: Timestamp = watermark
                .parse()
                .map_err(|_| bad(format!("{WATERMARK} {watermark:?} is not milliseconds")))?;
            let entry = self.watermarks.entry(writer).or_insert(watermark);
            *entry = (*entry).max(watermark);
        }
        if header(END).is_some() {
            let entry = self.ends.entry(group).or_insert((writers, 0));
            *entry = (writers, entry.1 + 1);
        }
        self.last.insert(group, sequence);
        Ok(())
    }

    async fn fill(
        &mut self,
        batch: &mut RecordBatch,
        max: usize,
    ) -> Result<SourceStatus, OperatorError> {
        if self.ended() {
            return Ok(SourceStatus::Ended);
        }
        if self.items.is_none() {
            self.start();
        }
        let items = self.items.as_mut().expect("started above");
        // Cancel-safe: a message is either still in the channel or taken
        // in with its sequence recorded.
        let Some(first) = items.recv().await else {
            return Err(connector_error("the exchange's reader stopped"));
        };
        self.take(first, batch)?;
        while batch.len() < max && !self.ended() {
            let Some(Ok(item)) = self.items.as_mut().map(mpsc::Receiver::try_recv) else {
                break;
            };
            self.take(item, batch)?;
        }
        Ok(if self.ended() {
            SourceStatus::Ended
        } else {
            SourceStatus::More
        })
    }
}

impl Drop for ExchangeSource {
    fn drop(&mut self) {
        if let Some(reader) = &self.reader {
            reader.abort();
        }
        // The purger ends once the sender is gone (a purge under way
        // finishes: each step stands alone).
        self.purge.take();
    }
}

/// Purges each key group below the positions it is handed (see the
/// module's "Purging"), until its sender is dropped. Best effort: a purge
/// that fails is logged and tried again with the next positions.
async fn purge(exchange: Exchange, mut positions: watch::Receiver<BTreeMap<u32, u64>>) {
    let mut floors: BTreeMap<u32, u64> = BTreeMap::new();
    let mut stream = None;
    let name = exchange.name.clone();
    while positions.changed().await.is_ok() {
        let wanted = positions.borrow_and_update().clone();
        if stream.is_none() {
            let opened = match super::nats::connect(&exchange.url).await {
                Ok(js) => exchange.open(&js).await.map(|s| (js, s)),
                Err(error) => Err(error),
            };
            match opened {
                Ok(opened) => stream = Some(opened),
                Err(error) => {
                    warn!(exchange = %name, %error, "cannot purge the exchange");
                    continue;
                }
            }
        }
        let (js, opened) = stream.as_ref().expect("opened above");
        for (&group, &position) in &wanted {
            if position == 0 || floors.get(&group).is_some_and(|f| *f >= position) {
                continue;
            }
            let floor = exchange.floor_subject(group);
            let step = async {
                js.publish(floor.clone(), position.to_string().into())
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                opened
                    .purge()
                    .filter(exchange.subject(group))
                    .sequence(position + 1)
                    .await
                    .map_err(|e| e.to_string())?;
                opened
                    .purge()
                    .filter(floor.clone())
                    .keep(1)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            };
            match step.await {
                Ok(()) => {
                    floors.insert(group, position);
                }
                Err(error) => {
                    warn!(exchange = %name, group, %error, "cannot purge the exchange's key group");
                    break;
                }
            }
        }
    }
}

/// Fails when a key group of `last` starts below its purge floor.
async fn check_floors(
    exchange: &Exchange,
    stream: &jetstream::stream::Stream,
    last: &BTreeMap<u32, u64>,
) -> Result<(), String> {
    let floors = futures::future::join_all(last.iter().map(|(&group, &position)| async move {
        let floor = stream
            .get_last_raw_message_by_subject(&exchange.floor_subject(group))
            .await
            .ok()
            .and_then(|m| std::str::from_utf8(&m.payload).ok()?.parse::<u64>().ok());
        (group, position, floor)
    }))
    .await;
    match floors
        .into_iter()
        .find(|(_, position, floor)| floor.is_some_and(|f| f > *position))
    {
        Some((group, position, Some(floor))) => Err(format!(
            "exchange `{}`: key group {group} was purged up to sequence {floor} once a later checkpoint of its reader was committed, and this start reads it from sequence {}: restore from the reader's newest checkpoint (a new job cannot read an exchange another job read)",
            exchange.name,
            position + 1
        )),
        _ => Ok(()),
    }
}

/// Reads the key groups in `last`, each after its sequence, through one
/// ordered consumer from the lowest of them on.
async fn read(
    exchange: &Exchange,
    last: &BTreeMap<u32, u64>,
    tx: &mpsc::Sender<Item>,
) -> Result<(), String> {
    if last.is_empty() {
        return Ok(());
    }
    let js = super::nats::connect(&exchange.url).await?;
    let stream = exchange.open(&js).await?;
    check_floors(exchange, &stream, last).await?;
    let from = last.values().min().copied().unwrap_or(0) + 1;
    let config = consumer::pull::OrderedConfig {
        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
            start_sequence: from,
        },
        filter_subjects: last.keys().map(|&g| exchange.subject(g)).collect(),
        ..Default::default()
    };
    let name = &exchange.name;
    let consumer = stream
        .create_consumer(config)
        .await
        .map_err(|e| format!("cannot read exchange `{name}`: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("cannot read exchange `{name}`: {e}"))?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| format!("reading exchange `{name}`: {e}"))?;
        let sequence = message
            .info()
            .map_err(|e| format!("a message of exchange `{name}` has no metadata: {e}"))?
            .stream_sequence;
        let group = message
            .subject
            .rsplit('.')
            .next()
            .and_then(|g| g.parse::<u32>().ok())
            .filter(|g| last.contains_key(g))
            .ok_or_else(|| format!("exchange `{name}`: a message on {}", message.subject))?;
        // Emitted before the restored checkpoint.
        if sequence <= last[&group] {
            continue;
        }
        let item = Item::Message {
            group,
            sequence,
            message: Box::new(message),
        };
        if tx.send(item).await.is_err() {
            return Ok(());
        }
    }
    Err(format!("exchange `{name}`: the consumer ended"))
}

impl Source for ExchangeSource {
    fn next_batch<'a>(&'a mut self, batch: &'a mut RecordBatch, max: usize) -> SourceFuture<'a> {
        Box::pin(self.fill(batch, max))
    }

    fn position(&self) -> u64 {
        self.read
    }

    fn partitions(&self) -> Option<BTreeMap<u32, u64>> {
        let mut positions = self.last.clone();
        for (&group, &(writers, ended)) in &self.ends {
            positions.insert(END_BASE + group, pack_ends(writers, ended));
        }
        for (&group, paused) in self.paused.iter().filter(|(_, p)| !p.is_empty()) {
            if let Some(packed) = pack_paused(self.writers, paused) {
                positions.insert(PAUSED_BASE + group, packed);
            }
        }
        Some(positions)
    }

    fn checkpointed(&mut self, checkpoint: CheckpointId) {
        // Bounded: a reader whose checkpoints never commit keeps the newest.
        if self.taken.len() >= 64 {
            self.taken.pop_front();
        }
        self.taken.push_back((checkpoint.0, self.last.clone()));
    }

    fn committed(&mut self, checkpoint: CheckpointId) {
        let mut newest = None;
        while self
            .taken
            .front()
            .is_some_and(|(id, _)| *id <= checkpoint.0)
        {
            newest = self.taken.pop_front().map(|(_, positions)| positions);
        }
        let Some(positions) = newest else { return };
        if self.purged_at.is_some_and(|at| at.elapsed() < PURGE_EVERY) {
            return;
        }
        self.purged_at = Some(Instant::now());
        if self.purge.is_none() {
            let (tx, rx) = watch::channel(BTreeMap::new());
            tokio::spawn(purge(self.exchange.clone(), rx));
            self.purge = Some(tx);
        }
        if let Some(purge) = &self.purge {
            let _ = purge.send(positions);
        }
    }

    fn stop_ready(&mut self) -> bool {
        self.ended() || self.all_paused()
    }

    fn watermark(&mut self) -> Option<Timestamp> {
        if self.writers == 0 || self.watermarks.len() < self.writers as usize {
            return None;
        }
        let minimum = self.watermarks.values().copied().min()?;
        (minimum > self.emitted).then(|| {
            self.emitted = minimum;
            minimum
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_crosses_as_its_flat_layout() {
        let mut batch = RecordBatch::new();
        batch.push(Some(b"k1"), b"v1", Some(5));
        batch.push(Some(b"k2"), b"value two", None);
        let decoded = decode_batch(&encode_batch(&batch)).expect("decodes");
        assert_eq!(decoded.entries(), batch.entries());
        assert_eq!(decoded.data(), batch.data());
        assert!(decode_batch(b"nope").is_err());
        let body = encode_batch(&batch);
        assert!(decode_batch(&body[..body.len() - 1]).is_err(), "data cut");
    }

    #[test]
    fn an_epoch_becomes_batches_per_key_group_then_control_messages() {
        let max = 8;
        let mut batch = RecordBatch::new();
        for i in 0..(MESSAGE_RECORDS as u32 + 10) {
            batch.push(Some(b"same"), &i.to_le_bytes(), Some(i64::from(i)));
        }
        batch.push(Some(b"other"), b"x", None);
        let mut body = Vec::new();
        spool_batch(&mut body, &batch, max).expect("spooled");
        spool_watermark(&mut body, 7).expect("spooled");
        spool_watermark(&mut body, 9).expect("spooled");
        spool_end(&mut body).expect("spooled");
        let messages = epoch_messages(&body, max).expect("reads");
        let same = u32::from(key_group::of_key(b"same", max));
        let other = u32::from(key_group::of_key(b"other", max));
        let records: Vec<(u32, usize, usize)> = messages
            .iter()
            .filter_map(|m| Some((m.group, m.index, m.batch.as_ref()?.len())))
            .collect();
        let mut expected = vec![(same, 0, MESSAGE_RECORDS), (same, 1, 10), (other, 0, 1)];
        if same == other {
            expected = vec![(same, 0, MESSAGE_RECORDS), (same, 1, 11)];
        }
        expected.sort();
        assert_eq!(records, expected);
        let control: Vec<&Message> = messages.iter().filter(|m| m.batch.is_none()).collect();
        assert_eq!(control.len(), max as usize, "one per key group");
        assert!(control.iter().all(|m| m.watermark == Some(9) && m.end));
        let after_same = control.iter().find(|m| m.group == same).expect("same");
        assert_eq!(after_same.index, 2, "numbered after the group's records");
        // Unkeyed records cannot be routed.
        let mut unkeyed = RecordBatch::new();
        unkeyed.push(None, b"v", None);
        assert!(spool_batch(&mut Vec::new(), &unkeyed, max).is_err());
        assert!(epoch_messages(&body[..body.len() - 2], max).is_err());
    }

    #[tokio::test]
    async fn a_committed_checkpoints_positions_go_to_the_purger_at_most_every_five_seconds() {
        let exchange = Exchange {
            url: "nats://127.0.0.1:1".into(),
            name: "job.edge".into(),
            replicas: 1,
        };
        let mut source = ExchangeSource::new(exchange, 0, 1, 4, &BTreeMap::from([(1, 5)]));
        source.checkpointed(CheckpointId(1));
        source.last.insert(1, 9);
        source.checkpointed(CheckpointId(2));
        source.last.insert(1, 12);
        source.checkpointed(CheckpointId(3));
        // Checkpoint 2 commits (1 was subsumed): its positions are purged
        // below, 3's wait for their own commit.
        source.committed(CheckpointId(2));
        let purge = source.purge.as_ref().expect("the purger started");
        assert_eq!(purge.borrow()[&1], 9);
        assert_eq!(purge.borrow()[&0], 0, "a key group read nothing yet");
        assert_eq!(source.taken.len(), 1);
        // 3 commits within five seconds: nothing more is purged yet.
        source.committed(CheckpointId(3));
        assert_eq!(source.purge.as_ref().expect("purger").borrow()[&1], 9);
        assert!(source.taken.is_empty());
        // A commit of a checkpoint this source never took changes nothing.
        source.committed(CheckpointId(7));
        assert!(source.taken.is_empty());
    }

    #[test]
    fn a_reader_owns_its_key_groups_and_checkpoints_their_ends() {
        let exchange = Exchange {
            url: "nats://127.0.0.1:1".into(),
            name: "job.edge".into(),
            replicas: 1,
        };
        assert_eq!(exchange.stream(), "weir-job_edge");
        assert_eq!(exchange.subject(5), "weir.job.edge.5");
        let restored = BTreeMap::from([(3, 40), (4, 41), (END_BASE + 4, pack_ends(2, 1))]);
        let source = ExchangeSource::new(exchange, 1, 2, 8, &restored);
        assert_eq!(source.groups, 4..8);
        let positions = source.partitions().expect("partitioned");
        assert_eq!(positions.get(&4), Some(&41));
        assert_eq!(positions.get(&5), Some(&0));
        assert_eq!(positions.get(&3), None, "not this subtask's");
        assert_eq!(positions.get(&(END_BASE + 4)), Some(&pack_ends(2, 1)));
        assert!(!source.ended());
    }

    #[test]
    fn an_aligned_stop_waits_until_every_writer_paused_or_ended_on_each_key_group() {
        let exchange = Exchange {
            url: "nats://127.0.0.1:1".into(),
            name: "job.edge".into(),
            replicas: 1,
        };
        let restored = BTreeMap::from([(END_BASE + 1, pack_ends(2, 1))]);
        let mut source = ExchangeSource::new(exchange, 0, 2, 4, &restored);
        assert_eq!(source.groups, 0..2);
        assert!(!source.stop_ready(), "no writer heard of yet");
        source.writers = 2;
        source.paused.insert(0, BTreeSet::from([0, 1]));
        assert!(
            !source.stop_ready(),
            "key group 1: one writer ended, one runs"
        );
        source.paused.insert(1, BTreeSet::from([1]));
        assert!(
            source.stop_ready(),
            "key group 1: one ended, the other paused"
        );
        // Checkpointed so, a reader restored from it is ready at once: its
        // writers publish nothing more while they stand paused.
        let positions = source.partitions().expect("partitioned");
        let mut restored = ExchangeSource::new(source.exchange.clone(), 0, 2, 4, &positions);
        assert!(restored.stop_ready(), "restored mid-stop: {positions:?}");
        source.paused.get_mut(&0).expect("paused").remove(&0);
        assert!(!source.stop_ready(), "writer 0 resumed on key group 0");
    }

    #[test]
    fn pauses_pack_up_to_32_writers() {
        let paused = BTreeSet::from([0, 5, 31]);
        let packed = pack_paused(32, &paused).expect("fits");
        assert_eq!(unpack_paused(packed), (32, paused));
        assert_eq!(pack_paused(33, &BTreeSet::from([1])), None);
    }
}
