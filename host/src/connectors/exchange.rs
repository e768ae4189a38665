//! Exchanges: a keyed edge carried through NATS JetStream, so the operators
//! on its two sides may run apart (other tasks, other hosts) and each side
//! checkpoints alone.
//!
//! An exchange `NAME` is the JetStream stream `weir-NAME` (dots as `_`),
//! created by whichever side connects first, with one subject per key
//! group: `weir.NAME.<key group>`.
//!
//! **Writing** (the `exchange` sink, [`super::nats::NatsSink`] in exchange
//! mode): each checkpoint epoch's records go, as they come, into their key
//! group's open message ([`EpochSpool`]), up to [`MESSAGE_RECORDS`] records
//! or about [`MESSAGE_BYTES`] in the compact layout of [`decode_into`],
//! never one record per message; a full message is framed into the epoch's
//! spool file at once (the open messages hold about [`OPEN_BYTES`] at most
//! together, as seen after each batch: beyond, all of them are framed as
//! they are). At the barrier the open messages are framed too, then the
//! epoch's highest watermark, whether the input ended and a checksum; the
//! file is fsynced and the checkpoint lists it as pending. When the
//! checkpoint completes the epoch is published from the file, read back
//! whole and published as it is framed, without touching a record, each
//! message with the id `<job>:<uid>:<subtask>:<epoch>:<key group>:<n>`,
//! which JetStream de-duplicates on a republish: a restored writer
//! publishes the same file again, the same messages under the same ids. A
//! watermark that advanced in the epoch, and the end, follow the epoch's
//! records as one empty message per key group, so every reader of every
//! key group hears from every writer. Headers: [`PRODUCER`]
//! (`<subtask>/<parallelism>`), [`WATERMARK`], [`END`]. Spool files of
//! version 1 (records, grouped when published) are still read on a
//! restore, grouped by their own limits so that their ids name the same
//! records, and readers still take the version 1 message layout (flat
//! batches).
//!
//! **Reading** ([`ExchangeSource`]): subtask i reads the key groups subtask
//! i of a keyed edge would get (`key_group::range_of`), through one ordered
//! consumer filtering their subjects, and records per key group the stream
//! sequence of the last message it emitted ([`Source::partitions`]; a
//! restore at another parallelism hands each key group's position to its
//! new reader). Its watermark is the minimum over the writers; it ends once
//! every writer ended on each of its key groups (those counts are
//! checkpointed with the positions, under `END_BASE + key group`, and
//! which writers' last message paused, under `PAUSED_BASE + key group`
//! per word of 32 writers).
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
//! **Cuts** (a staged job's savepoint taken while it runs on, so that its
//! tasks' savepoints form one cut): every task takes a savepoint that
//! names the cut ([`crate::types::SavepointTarget::cut`]). A writer, once
//! its savepoint's epoch is committed and published, publishes one empty
//! [`CUT`] message per key group, then its *cut record* (subject
//! `weir.NAME.c<writer>`, the cut's name), and publishes nothing more
//! until every writer's cut record names the cut: so in the stream every
//! message before the cut comes before every message after it. A reader
//! asked for the cut sends its barrier once, on each of its key groups,
//! every writer marked it (or ended) ([`Source::cut_ready`]), and takes
//! nothing after the last marker until then: its savepoint holds exactly
//! what the writers' savepoints published. A writer that waited
//! [`CUT_HOLD`] for the others gives up: it publishes one
//! [`CUT_ABANDONED`] message per key group before anything after the cut,
//! and a reader that reads one never reaches that cut (the savepoint
//! fails; the job runs on). A reader that reached a cut and is not asked
//! for it within [`CUT_HOLD`] reads on. A writer whose input ended
//! publishes [`ENDED_RECORD`] as its cut record once its end went out: it
//! has marked every cut to come (a finished task's part of a cluster
//! savepoint is its final checkpoint).
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
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, Context, consumer};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::dataflow::operator::SourceFuture;
use crate::dataflow::{FailureKind, OperatorError, Source, SourceStatus};
use crate::job::Exchange;
use crate::types::{
    BatchEntry, CheckpointId, ENTRY_WORDS, MAX_WATERMARK, RecordBatch, RecordRef, Timestamp,
    key_group,
};
use xxhash_rust::xxh3::{Xxh3Default, xxh3_64};

/// How often a reader purges what its committed checkpoints read at most.
pub const PURGE_EVERY: Duration = Duration::from_secs(5);

/// Records per exchange message at most.
pub const MESSAGE_RECORDS: usize = 4096;
/// Bytes of a message body at most (a message may hold one larger
/// record).
pub const MESSAGE_BYTES: usize = 256 << 10;
/// Bytes of open messages an epoch being spooled holds at most.
pub const OPEN_BYTES: usize = 64 << 20;
/// The limits a version 1 spool file's records are grouped by (its ids
/// name the messages they make).
const V1_MESSAGE_RECORDS: usize = 1024;
const V1_MESSAGE_BYTES: usize = 512 << 10;
/// The header naming a message's writer: `<subtask>/<parallelism>`.
pub const PRODUCER: &str = "Weir-Producer";
/// The header carrying a writer's watermark (ms).
pub const WATERMARK: &str = "Weir-Watermark";
/// The header marking a writer's end of input.
pub const END: &str = "Weir-End";
/// The first line of an exchange spool file: this, then the ids' prefix.
pub const SPOOL_HEADER: &str = "weir-exchange-pending 2 ";
/// The first line of a version 1 spool file (records, not messages).
const SPOOL_HEADER_V1: &str = "weir-exchange-pending 1 ";
/// Partition keys at and above this hold a key group's end counts, not a
/// position (key groups are below 2^16).
const END_BASE: u32 = 1 << 20;
/// Partition keys at and above this hold which writers' last message on a
/// key group said they paused: writers `32w..32w + 32` of group `g` at
/// `PAUSED_BASE + (w << 16) + g` ([`pack_paused`]).
const PAUSED_BASE: u32 = 2 << 20;
/// How long an exchange stream keeps message ids.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The first bytes of a message body.
const MAGIC: &[u8; 4] = b"WXB2";
/// The first bytes of a version 1 message body (a flat batch).
const MAGIC_FLAT: &[u8; 4] = b"WXB1";
/// A record's flag: a timestamp follows.
const HAS_TIMESTAMP: u8 = 1;

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

    /// The subject of writer `writer`'s cut record (see "Cuts").
    pub fn cut_subject(&self, writer: u32) -> String {
        format!("weir.{}.c{writer}", self.name)
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

/// Appends one record to a message body: a flags byte ([`HAS_TIMESTAMP`]),
/// the timestamp if any (i64), then the key and the value, each as its
/// length (LEB128) and its bytes.
fn encode_record(out: &mut Vec<u8>, key: &[u8], value: &[u8], timestamp: Option<Timestamp>) {
    match timestamp {
        Some(timestamp) => {
            out.push(HAS_TIMESTAMP);
            out.extend_from_slice(&timestamp.to_le_bytes());
        }
        None => out.push(0),
    }
    put_length(out, key.len());
    out.extend_from_slice(key);
    put_length(out, value.len());
    out.extend_from_slice(value);
}

/// `length` as LEB128: seven bits a byte, the lowest first.
fn put_length(out: &mut Vec<u8>, mut length: usize) {
    while length >= 0x80 {
        out.push(length as u8 | 0x80);
        length >>= 7;
    }
    out.push(length as u8);
}

/// A message body's start: the magic, then a record count to fill in.
fn start_body(out: &mut Vec<u8>) {
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&0u32.to_le_bytes());
}

/// Fills in a body's record count.
fn finish_body(body: &mut [u8], records: u32) {
    body[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&records.to_le_bytes());
}

/// `batch` (keyed records) as a message body: the magic, the record count
/// (u32), then each record ([`encode_record`]), all little-endian.
pub fn encode_batch(batch: &RecordBatch) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + batch.len() * 3 + batch.data_len());
    start_body(&mut out);
    for record in batch.iter() {
        let key = record.key.unwrap_or_default();
        encode_record(&mut out, key, record.value, record.timestamp);
    }
    finish_body(&mut out, batch.len() as u32);
    out
}

/// Bytes read front to back, every read checked.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let slice = self
            .at
            .checked_add(n)
            .and_then(|end| self.bytes.get(self.at..end))
            .ok_or("truncated")?;
        self.at += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    /// A LEB128 length of at most five bytes.
    fn length(&mut self) -> Result<usize, String> {
        let mut length = 0usize;
        for shift in (0..35).step_by(7) {
            let [byte] = self.array()?;
            length |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(length);
            }
        }
        Err("a length of more than five bytes".into())
    }

    /// One record of a message body ([`encode_record`]).
    fn record(&mut self) -> Result<RecordRef<'a>, String> {
        let [flags] = self.array()?;
        let timestamp = match flags & HAS_TIMESTAMP {
            0 => None,
            _ => Some(i64::from_le_bytes(self.array()?)),
        };
        let length = self.length()?;
        let key = self.take(length)?;
        let length = self.length()?;
        let value = self.take(length)?;
        Ok(RecordRef {
            key: Some(key),
            value,
            timestamp,
        })
    }

    fn is_empty(&self) -> bool {
        self.at == self.bytes.len()
    }
}

/// Calls `each` with every record of `records` (a body after its magic
/// and count), checking there are `count` and nothing after them.
fn each_record<'a>(
    records: &'a [u8],
    count: usize,
    mut each: impl FnMut(RecordRef<'a>),
) -> Result<(), String> {
    let mut cursor = Cursor {
        bytes: records,
        at: 0,
    };
    for index in 0..count {
        each(
            cursor
                .record()
                .map_err(|e| format!("record {index}: {e}"))?,
        );
    }
    if !cursor.is_empty() {
        return Err(format!("bytes after its {count} records"));
    }
    Ok(())
}

/// Appends a message body's records to `batch` (a version 1 body too);
/// a body found bad leaves the batch as it was. Returns how many.
pub fn decode_into(body: &[u8], batch: &mut RecordBatch) -> Result<usize, String> {
    if body.starts_with(MAGIC_FLAT) {
        let records = decode_flat(body)?;
        for record in records.iter() {
            batch.push_record(record);
        }
        return Ok(records.len());
    }
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or("not an exchange message (no magic)")?;
    let (count, records) = rest.split_at_checked(4).ok_or("truncated record count")?;
    let count = u32::from_le_bytes(count.try_into().expect("4 bytes")) as usize;
    if !batch.is_empty() {
        // Checked first: records already in the batch stay as they are.
        each_record(records, count, |_| {})?;
        each_record(records, count, |record| batch.push_record(record))?;
        return Ok(count);
    }
    // The body's bytes bound the records' data (and their number: three
    // bytes a record at least).
    *batch = RecordBatch::with_capacity(count.min(body.len() / 3), body.len());
    each_record(records, count, |record| batch.push_record(record))
        .inspect_err(|_| batch.clear())?;
    Ok(count)
}

/// A version 1 message body (a flat batch: the magic, the record count,
/// the entries' flat words and the data) back as a batch.
fn decode_flat(body: &[u8]) -> Result<RecordBatch, String> {
    let rest = body
        .strip_prefix(MAGIC_FLAT)
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

/// Spool file frames: a message, and the epoch's close.
const FRAME_MESSAGE: u8 = 1;
const FRAME_CLOSE: u8 = 2;
/// Close frame flags.
const CLOSE_WATERMARK: u8 = 1;
const CLOSE_END: u8 = 2;

fn spool_error(path: &Path, error: impl std::fmt::Display) -> OperatorError {
    connector_error(format!("spool file {}: {error}", path.display()))
}

/// An exchange writer's epoch being spooled (see "Writing").
///
/// The file: a header line ([`SPOOL_HEADER`], then the ids' prefix), the
/// message frames (`1`, key group: u32, index among the key group's: u32,
/// body length: u32, body), then the close frame (`2`, flags: 1 a
/// watermark, 2 the end; the watermark: i64), then the xxh3-64 of every
/// byte before it (u64); little-endian.
pub struct EpochSpool {
    path: PathBuf,
    file: BufWriter<File>,
    checksum: Xxh3Default,
    max_parallelism: u32,
    /// By key group: its open message.
    open: Vec<OpenMessage>,
    /// Bytes the open messages hold (allocated) together, and how many
    /// they may ([`OPEN_BYTES`]).
    open_bytes: usize,
    open_limit: usize,
    /// The highest watermark taken in.
    watermark: Option<Timestamp>,
    end: bool,
}

/// A key group's message being filled.
#[derive(Default)]
struct OpenMessage {
    body: Vec<u8>,
    records: u32,
    /// The key group's messages framed before it.
    index: u32,
    /// The size of the last one framed (the next is made that large at
    /// once, not grown to it).
    last_size: usize,
}

impl EpochSpool {
    /// Creates spool file `path` for an epoch whose message ids start with
    /// `id_prefix`.
    pub fn create(
        path: PathBuf,
        id_prefix: &str,
        max_parallelism: u32,
    ) -> Result<Self, OperatorError> {
        let io = |e: std::io::Error| spool_error(&path, e);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        // Smaller than a full message, which then goes to the file as is.
        let file = BufWriter::with_capacity(64 << 10, File::create(&path).map_err(io)?);
        let mut spool = Self {
            path,
            file,
            checksum: Xxh3Default::new(),
            max_parallelism,
            open: (0..max_parallelism)
                .map(|_| OpenMessage::default())
                .collect(),
            open_bytes: 0,
            open_limit: OPEN_BYTES,
            watermark: None,
            end: false,
        };
        spool.write(format!("{SPOOL_HEADER}{id_prefix}\n").as_bytes())?;
        Ok(spool)
    }

    /// Writes `bytes` to the file and into its checksum.
    fn write(&mut self, bytes: &[u8]) -> Result<(), OperatorError> {
        self.checksum.update(bytes);
        self.file
            .write_all(bytes)
            .map_err(|e| spool_error(&self.path, e))
    }

    /// Takes in `batch`'s records (records without a key are refused: an
    /// exchange is keyed).
    pub fn push_batch(&mut self, batch: &RecordBatch) -> Result<(), OperatorError> {
        for record in batch.iter() {
            let key = record.key.ok_or_else(|| {
                OperatorError::new(
                    FailureKind::Plugin,
                    "a record without a key reached an exchange (its key group decides its subject)",
                )
            })?;
            let group = usize::from(key_group::of_key(key, self.max_parallelism));
            // At most: flags, timestamp, two lengths.
            let size = 1 + 8 + 10 + key.len() + record.value.len();
            let open = &self.open[group];
            if open.records > 0 && open.body.len() + size > MESSAGE_BYTES {
                self.frame(group)?;
            }
            let open = &mut self.open[group];
            let before = open.body.capacity();
            if open.body.is_empty() {
                open.body.reserve(open.last_size.max(size + 8));
                start_body(&mut open.body);
            }
            encode_record(&mut open.body, key, record.value, record.timestamp);
            open.records += 1;
            self.open_bytes += open.body.capacity() - before;
            if open.records as usize >= MESSAGE_RECORDS {
                self.frame(group)?;
            }
        }
        if self.open_bytes > self.open_limit {
            self.frame_all()?;
        }
        Ok(())
    }

    /// Frames key group `group`'s open message, if it holds records.
    fn frame(&mut self, group: usize) -> Result<(), OperatorError> {
        let open = &mut self.open[group];
        if open.records == 0 {
            return Ok(());
        }
        let mut body = std::mem::take(&mut open.body);
        finish_body(&mut body, open.records);
        let index = open.index;
        open.index += 1;
        open.records = 0;
        open.last_size = body.len();
        self.open_bytes -= body.capacity();
        let mut head = [0u8; 13];
        head[0] = FRAME_MESSAGE;
        head[1..5].copy_from_slice(&(group as u32).to_le_bytes());
        head[5..9].copy_from_slice(&index.to_le_bytes());
        head[9..].copy_from_slice(&(body.len() as u32).to_le_bytes());
        self.write(&head)?;
        self.write(&body)
    }

    /// Frames every open message, in key group order.
    fn frame_all(&mut self) -> Result<(), OperatorError> {
        (0..self.open.len()).try_for_each(|group| self.frame(group))
    }

    /// Takes in a watermark (the epoch publishes the highest).
    pub fn watermark(&mut self, watermark: Timestamp) {
        self.watermark = Some(self.watermark.map_or(watermark, |w| w.max(watermark)));
    }

    /// Takes in the end of input, with the end-of-input watermark.
    pub fn end(&mut self) {
        self.watermark(MAX_WATERMARK);
        self.end = true;
    }

    /// Frames the open messages and the close, then fsyncs the file.
    /// Returns its path.
    pub fn close(mut self) -> Result<PathBuf, OperatorError> {
        self.frame_all()?;
        let mut flags = 0;
        if self.watermark.is_some() {
            flags |= CLOSE_WATERMARK;
        }
        if self.end {
            flags |= CLOSE_END;
        }
        let mut close = [0u8; 10];
        close[0] = FRAME_CLOSE;
        close[1] = flags;
        close[2..].copy_from_slice(&self.watermark.unwrap_or(0).to_le_bytes());
        self.write(&close)?;
        let checksum = self.checksum.digest().to_le_bytes();
        let io = |e: std::io::Error| spool_error(&self.path, e);
        self.file.write_all(&checksum).map_err(io)?;
        self.file.flush().map_err(io)?;
        self.file.get_ref().sync_all().map_err(io)?;
        Ok(self.path)
    }
}

/// One message of an epoch: its key group, body and headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub group: u32,
    /// Index of the message among its key group's in this epoch.
    pub index: u32,
    /// The records ([`decode_into`]); empty for a control message.
    pub body: Bytes,
    pub watermark: Option<Timestamp>,
    pub end: bool,
}

/// A spool file, read whole, as its ids' prefix and the messages to
/// publish, in order: each as framed, then (if the epoch's watermark
/// advanced or its input ended) one control message per key group of
/// `0..max_parallelism`. A version 1 file is grouped as it was then.
pub fn read_spool(file: &Bytes, max_parallelism: u32) -> Result<(&str, Vec<Message>), String> {
    let newline = file
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("truncated header")?;
    let header = std::str::from_utf8(&file[..newline]).ok();
    let strip = |version: &str| header?.strip_prefix(version).filter(|p| !p.is_empty());
    if let Some(prefix) = strip(SPOOL_HEADER) {
        return Ok((prefix, framed_messages(file, newline + 1, max_parallelism)?));
    }
    let prefix = strip(SPOOL_HEADER_V1).ok_or("not an exchange spool file")?;
    Ok((
        prefix,
        epoch_messages_v1(&file[newline + 1..], max_parallelism)?,
    ))
}

/// A version 2 spool file's messages: its frames from `start` on.
fn framed_messages(
    file: &Bytes,
    start: usize,
    max_parallelism: u32,
) -> Result<Vec<Message>, String> {
    let (covered, checksum) = file
        .len()
        .checked_sub(8)
        .map(|at| file.split_at(at))
        .ok_or("truncated")?;
    if xxh3_64(covered) != u64::from_le_bytes(checksum.try_into().expect("8 bytes")) {
        return Err("damaged (its checksum does not match)".into());
    }
    let mut cursor = Cursor {
        bytes: covered,
        at: start,
    };
    let mut messages = Vec::new();
    let mut counts = vec![0u32; max_parallelism as usize];
    loop {
        match cursor.array()? {
            [FRAME_MESSAGE] => {
                let group = u32::from_le_bytes(cursor.array()?);
                let index = u32::from_le_bytes(cursor.array()?);
                let length = u32::from_le_bytes(cursor.array()?) as usize;
                let count = counts
                    .get_mut(group as usize)
                    .ok_or_else(|| format!("key group {group} of {max_parallelism}"))?;
                if index != *count {
                    return Err(format!(
                        "key group {group}: message {index} where {count} was due"
                    ));
                }
                *count += 1;
                let from = cursor.at;
                cursor.take(length)?;
                messages.push(Message {
                    group,
                    index,
                    body: file.slice(from..from + length),
                    watermark: None,
                    end: false,
                });
            }
            [FRAME_CLOSE] => {
                let [flags] = cursor.array()?;
                let watermark = i64::from_le_bytes(cursor.array()?);
                if !cursor.is_empty() {
                    return Err("bytes after the close frame".into());
                }
                let watermark = (flags & CLOSE_WATERMARK != 0).then_some(watermark);
                messages.extend(control_messages(&counts, watermark, flags & CLOSE_END != 0));
                return Ok(messages);
            }
            [other] => return Err(format!("unknown frame {other}")),
        }
    }
}

/// One control message per key group, numbered after the key group's
/// `counts` messages, if the watermark advanced or the input ended.
fn control_messages(counts: &[u32], watermark: Option<Timestamp>, end: bool) -> Vec<Message> {
    if watermark.is_none() && !end {
        return Vec::new();
    }
    (0u32..)
        .zip(counts)
        .map(|(group, &index)| Message {
            group,
            index,
            body: Bytes::new(),
            watermark,
            end,
        })
        .collect()
}

/// Version 1 spool record tags.
const TAG_RECORD: u8 = 0;
const TAG_WATERMARK: u8 = 1;
const TAG_END: u8 = 2;

/// A version 1 spool file's body (records, each with its key group, and
/// watermarks and the end, as they came) as the messages to publish: each
/// key group's records in batches of the version 1 limits, then the
/// control messages.
fn epoch_messages_v1(body: &[u8], max_parallelism: u32) -> Result<Vec<Message>, String> {
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
                    b.len() >= V1_MESSAGE_RECORDS
                        || (!b.is_empty()
                            && b.data_len() + key.len() + value.len() > V1_MESSAGE_BYTES)
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
    let mut counts = vec![0u32; max_parallelism as usize];
    for (group, batches) in groups {
        let count = counts
            .get_mut(usize::from(group))
            .ok_or_else(|| format!("key group {group} of {max_parallelism}"))?;
        for batch in batches {
            messages.push(Message {
                group: u32::from(group),
                index: *count,
                body: Bytes::from(encode_batch(&batch)),
                watermark: None,
                end: false,
            });
            *count += 1;
        }
    }
    messages.extend(control_messages(&counts, watermark, end));
    Ok(messages)
}

/// A writer's last word before it stopped (not ended: a stop with a
/// savepoint), with the checkpoint it stopped at: see "Stopping" above.
pub const PAUSED: &str = "Weir-Paused";

/// A writer's marker of a cut (its name), one per key group: see "Cuts"
/// above.
pub const CUT: &str = "Weir-Cut";
/// A writer gave up waiting for the others to mark the cut (its name):
/// no reader reaches it.
pub const CUT_ABANDONED: &str = "Weir-Cut-Abandoned";
/// The cut record of a writer whose input ended (no cut's name: a cut is
/// named by its savepoint directory): it published everything it ever
/// will, so it counts as having marked every cut.
pub const ENDED_RECORD: &[u8] = b"\0ended";
/// How long a writer waits for every writer to mark a cut, and a reader
/// that reached one for its barrier.
pub const CUT_HOLD: Duration = Duration::from_secs(60);

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
    /// Publishes an epoch's messages ([`read_spool`]) with the ids
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
            let mut build = jetstream::message::PublishMessage::build()
                .payload(message.body.clone())
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
        let published = self.send_all(js, built).await?;
        if messages.iter().any(|m| m.end) {
            self.send_cut_record(js, id_prefix, "ended", ENDED_RECORD)
                .await?;
        }
        Ok(published)
    }

    /// Publishes this writer's cut record (see "Cuts"): `payload` (a
    /// cut's name, or [`ENDED_RECORD`]), id `<id_prefix>:cut:<id>`.
    async fn send_cut_record(
        &self,
        js: &Context,
        id_prefix: &str,
        id: &str,
        payload: &[u8],
    ) -> Result<(), OperatorError> {
        let failed = |e: &dyn std::fmt::Display| {
            connector_error(format!(
                "exchange `{}`: cannot publish the cut record of writer {}: {e}",
                self.exchange.name, self.subtask
            ))
        };
        let record = jetstream::message::PublishMessage::build()
            .payload(bytes::Bytes::copy_from_slice(payload))
            .message_id(format!("{id_prefix}:cut:{id}"));
        js.send_publish(self.exchange.cut_subject(self.subtask), record)
            .await
            .map_err(|e| failed(&e))?
            .await
            .map_err(|e| failed(&e))?;
        Ok(())
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

    /// Marks cut `cut` after everything this writer published (see
    /// "Cuts"): a [`CUT`] message per key group (ids
    /// `<id_prefix>:Weir-Cut:<cut>:<key group>`), its cut record, then waits
    /// until every writer's cut record names the cut (or says it ended),
    /// for up to [`CUT_HOLD`]; a wait that runs out abandons the cut.
    pub async fn mark_cut(
        &self,
        js: &Context,
        id_prefix: &str,
        cut: &str,
    ) -> Result<(), OperatorError> {
        let name = &self.exchange.name;
        self.send_markers(js, id_prefix, CUT, cut).await?;
        let failed = |e: &dyn std::fmt::Display| {
            connector_error(format!("exchange `{name}`: cannot mark cut `{cut}`: {e}"))
        };
        self.send_cut_record(js, id_prefix, cut, cut.as_bytes())
            .await?;
        let stream = self.exchange.open(js).await.map_err(|e| failed(&e))?;
        let started = Instant::now();
        // Asked again only of the writers not seen marking it yet (this
        // one's record was just acknowledged).
        let mut waiting: Vec<u32> = (0..self.parallelism)
            .filter(|&w| w != self.subtask)
            .collect();
        loop {
            let marked = futures::future::join_all(waiting.iter().map(|&writer| {
                let stream = &stream;
                async move {
                    stream
                        .get_last_raw_message_by_subject(&self.exchange.cut_subject(writer))
                        .await
                        .is_ok_and(|m| {
                            m.payload.as_ref() == cut.as_bytes()
                                || m.payload.as_ref() == ENDED_RECORD
                        })
                }
            }))
            .await;
            let mut marked = marked.into_iter();
            waiting.retain(|_| !marked.next().unwrap_or(false));
            if waiting.is_empty() {
                return Ok(());
            }
            if started.elapsed() >= CUT_HOLD {
                let waiting: Vec<String> = waiting.iter().map(u32::to_string).collect();
                warn!(exchange = %name, cut, writers = %waiting.join(", "), "the cut was not marked by every writer in time; abandoning it (the savepoint fails, the job runs on)");
                return self
                    .send_markers(js, id_prefix, CUT_ABANDONED, cut)
                    .await
                    .map(|_| ());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One empty message per key group with header `header` = `cut`.
    async fn send_markers(
        &self,
        js: &Context,
        id_prefix: &str,
        header: &str,
        cut: &str,
    ) -> Result<u64, OperatorError> {
        let producer = format!("{}/{}", self.subtask, self.parallelism);
        let built = (0..self.max_parallelism).map(|group| {
            let build = jetstream::message::PublishMessage::build()
                .payload(bytes::Bytes::new())
                .message_id(format!("{id_prefix}:{header}:{cut}:{group}"))
                .header(PRODUCER, producer.as_str())
                .header(header, cut);
            (group, build)
        });
        self.send_all(js, built).await
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

/// The writers of `writers` that paused on key group `group`, as
/// partition keys and numbers: per word of 32 writers with one paused, the
/// count above and a bit per writer below.
fn pack_paused(group: u32, writers: u32, paused: &BTreeSet<u32>) -> Vec<(u32, u64)> {
    let mut words: BTreeMap<u32, u32> = BTreeMap::new();
    for &writer in paused {
        *words.entry(writer / 32).or_default() |= 1 << (writer % 32);
    }
    words
        .into_iter()
        .map(|(word, bits)| {
            let key = PAUSED_BASE + (word << 16) + group;
            (key, (u64::from(writers) << 32) | u64::from(bits))
        })
        .collect()
}

/// A partition key at or above [`PAUSED_BASE`] and its number: the key
/// group, the count of writers, and the paused writers it holds.
fn unpack_paused(key: u32, packed: u64) -> (u32, u32, impl Iterator<Item = u32>) {
    let (word, group) = ((key - PAUSED_BASE) >> 16, (key - PAUSED_BASE) & 0xFFFF);
    let bits = packed as u32;
    let paused = (0..32)
        .filter(move |w| bits & (1 << w) != 0)
        .map(move |w| word * 32 + w);
    (group, (packed >> 32) as u32, paused)
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
    /// Cuts being read, by name (see "Cuts"; a few at most).
    cuts: BTreeMap<String, CutSeen>,
    /// Key group → the writers seen ending on it (this run).
    ended_by: BTreeMap<u32, BTreeSet<u32>>,
}

/// What a reader saw of a cut.
#[derive(Debug)]
struct CutSeen {
    /// Key group → the writers that marked it.
    marked: BTreeMap<u32, BTreeSet<u32>>,
    /// A writer gave it up.
    abandoned: bool,
    /// When its first marker was read.
    seen: Instant,
    /// When every writer had marked every key group: the reader holds
    /// there until its barrier goes (or [`CUT_HOLD`] passed).
    reached: Option<Instant>,
}

/// Cuts a reader remembers at most (the oldest is forgotten).
const CUTS_KEPT: usize = 8;

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
        let mut paused: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for (&key, &packed) in restored.range(PAUSED_BASE..) {
            let (group, of, who) = unpack_paused(key, packed);
            if groups.contains(&group) {
                writers = of;
                paused.entry(group).or_default().extend(who);
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
            cuts: BTreeMap::new(),
            ended_by: BTreeMap::new(),
        }
    }

    /// Takes in writer `writer`'s marker of cut `name` on key group
    /// `group` (or that it `abandoned` the cut); notes when the cut is
    /// reached.
    fn take_cut(&mut self, name: &str, group: u32, writer: u32, abandoned: bool) {
        if !self.cuts.contains_key(name) && self.cuts.len() >= CUTS_KEPT {
            let oldest = self
                .cuts
                .iter()
                .min_by_key(|(_, cut)| cut.seen)
                .map(|(name, _)| name.clone());
            self.cuts.remove(&oldest.expect("not empty"));
        }
        let cut = self.cuts.entry(name.to_string()).or_insert(CutSeen {
            marked: BTreeMap::new(),
            abandoned: false,
            seen: Instant::now(),
            reached: None,
        });
        cut.abandoned |= abandoned;
        cut.marked.entry(group).or_default().insert(writer);
        self.note_reached();
    }

    /// Marks the cuts every writer marked (or ended) on each key group,
    /// unless one was abandoned, as reached.
    fn note_reached(&mut self) {
        let (groups, writers, ended_by) = (self.groups.clone(), self.writers, &self.ended_by);
        for cut in self.cuts.values_mut() {
            if cut.reached.is_some() || cut.abandoned || writers == 0 {
                continue;
            }
            let complete = groups.clone().all(|g| {
                let marked = cut.marked.get(&g);
                let ended = ended_by.get(&g);
                (0..writers).all(|w| {
                    marked.is_some_and(|m| m.contains(&w)) || ended.is_some_and(|e| e.contains(&w))
                })
            });
            if complete {
                cut.reached = Some(Instant::now());
            }
        }
    }

    /// Until when this reader holds at a reached cut, if it does.
    fn holding(&self) -> Option<Instant> {
        self.cuts
            .values()
            .filter_map(|cut| cut.reached)
            .min()
            .map(|reached| reached + CUT_HOLD)
    }

    /// Reads on past the cuts held for [`CUT_HOLD`]: no barrier came.
    fn let_go_of_held_cuts(&mut self) {
        let name = &self.exchange.name;
        self.cuts.retain(|cut, seen| {
            let held_out = seen.reached.is_some_and(|at| at.elapsed() >= CUT_HOLD);
            if held_out {
                warn!(exchange = %name, cut, "the cut was reached but no savepoint asked for it in time; reading on");
            }
            !held_out
        });
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
        // Messages of up to MESSAGE_RECORDS records each.
        let (tx, rx) = mpsc::channel(256);
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
            self.read += decode_into(&message.payload, batch).map_err(bad)? as u64;
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
            self.ended_by.entry(group).or_default().insert(writer);
        }
        self.last.insert(group, sequence);
        match (header(CUT), header(CUT_ABANDONED)) {
            (Some(cut), _) => self.take_cut(&cut, group, writer, false),
            (None, Some(cut)) => self.take_cut(&cut, group, writer, true),
            (None, None) if header(END).is_some() => self.note_reached(),
            (None, None) => {}
        }
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
        // At a reached cut nothing after it is taken until its barrier
        // went (cancel-safe: the trigger interrupts the wait).
        if let Some(until) = self.holding() {
            tokio::time::sleep_until(until.into()).await;
            self.let_go_of_held_cuts();
        }
        let items = self.items.as_mut().expect("started above");
        // Cancel-safe: a message is either still in the channel or taken
        // in with its sequence recorded.
        let Some(first) = items.recv().await else {
            return Err(connector_error("the exchange's reader stopped"));
        };
        self.take(first, batch)?;
        while batch.len() < max && !self.ended() && self.holding().is_none() {
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
        // Emitted before the restored checkpoint (read again when the
        // client recreates a consumer that had delivered nothing yet: it
        // starts from the stream's first message, see `nats`).
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
        for (&group, paused) in &self.paused {
            positions.extend(pack_paused(group, self.writers, paused));
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

    fn cut_ready(&mut self, cut: &str) -> bool {
        if self.ended() {
            return true;
        }
        let reached = self.cuts.get(cut).is_some_and(|c| c.reached.is_some());
        if reached {
            // The barrier goes now: read on after it.
            self.cuts.remove(cut);
        }
        reached
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

    /// A version 1 message body: a flat batch.
    fn encode_flat(batch: &RecordBatch) -> Vec<u8> {
        let mut out = MAGIC_FLAT.to_vec();
        out.extend_from_slice(&(batch.len() as u32).to_le_bytes());
        for word in BatchEntry::as_words(batch.entries()) {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(batch.data());
        out
    }

    /// Appends `batch` to a version 1 spool file's body.
    fn spool_v1(out: &mut Vec<u8>, batch: &RecordBatch, max_parallelism: u32) {
        for record in batch.iter() {
            let key = record.key.expect("keyed");
            out.push(TAG_RECORD);
            out.extend_from_slice(&key_group::of_key(key, max_parallelism).to_le_bytes());
            match record.timestamp {
                Some(t) => {
                    out.push(1);
                    out.extend_from_slice(&t.to_le_bytes());
                }
                None => out.push(0),
            }
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(&(record.value.len() as u32).to_le_bytes());
            out.extend_from_slice(record.value);
        }
    }

    /// Each message's (key group, index, records).
    fn shape(messages: &[Message]) -> Vec<(u32, u32, usize)> {
        messages
            .iter()
            .filter(|m| !m.body.is_empty())
            .map(|m| {
                let records = decode_into(&m.body, &mut RecordBatch::new()).expect("decodes");
                (m.group, m.index, records)
            })
            .collect()
    }

    /// `MESSAGE_RECORDS + 10` records of one key, then one of another.
    fn two_keys(per_message: usize) -> RecordBatch {
        let mut batch = RecordBatch::new();
        for i in 0..(per_message as u32 + 10) {
            batch.push(Some(b"same"), &i.to_le_bytes(), Some(i64::from(i)));
        }
        batch.push(Some(b"other"), b"x", None);
        batch
    }

    #[test]
    fn a_batch_crosses_as_compact_records_and_a_flat_batch_still_decodes() {
        let mut batch = RecordBatch::new();
        batch.push(Some(b"k1"), b"v1", Some(-5));
        batch.push(Some(b""), &[7; 300], None);
        batch.push(Some(b"k3"), b"", Some(i64::MAX));
        for body in [encode_batch(&batch), encode_flat(&batch)] {
            let mut decoded = RecordBatch::new();
            decoded.push(Some(b"before"), b"b", None);
            assert_eq!(decode_into(&body, &mut decoded), Ok(3));
            assert_eq!(
                decoded.iter().skip(1).collect::<Vec<_>>(),
                batch.iter().collect::<Vec<_>>()
            );
        }
        let body = encode_batch(&batch);
        let mut untouched = RecordBatch::new();
        assert!(decode_into(b"nope", &mut untouched).is_err());
        assert!(
            decode_into(&body[..body.len() - 1], &mut untouched).is_err(),
            "data cut"
        );
        let mut longer = body.clone();
        longer.push(0);
        assert!(decode_into(&longer, &mut untouched).is_err(), "bytes after");
        let mut more = body.clone();
        finish_body(&mut more, 4);
        assert!(
            decode_into(&more, &mut untouched).is_err(),
            "a record short"
        );
        assert!(untouched.is_empty(), "nothing taken in from a bad body");
        let mut holding = RecordBatch::new();
        holding.push(Some(b"k"), b"v", None);
        assert!(decode_into(&more, &mut holding).is_err());
        assert_eq!(holding.len(), 1, "the records before stay as they were");
    }

    #[test]
    fn an_epoch_is_spooled_as_messages_per_key_group_then_control_messages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let max = 8;
        let path = dir.path().join("pending").join("x-0-3");
        let mut spool = EpochSpool::create(path.clone(), "job:x:0:3", max).expect("created");
        spool
            .push_batch(&two_keys(MESSAGE_RECORDS))
            .expect("spooled");
        spool.watermark(9);
        spool.watermark(7);
        let closed = spool.close().expect("closed");
        assert_eq!(closed, path);
        let file = Bytes::from(std::fs::read(&path).expect("read"));
        let (prefix, messages) = read_spool(&file, max).expect("reads");
        assert_eq!(prefix, "job:x:0:3");
        let same = u32::from(key_group::of_key(b"same", max));
        let other = u32::from(key_group::of_key(b"other", max));
        // The full message as it filled, then the open ones by key group.
        let mut tails = vec![(same, 1, 10), (other, 0, 1)];
        tails.sort();
        let mut expected = vec![(same, 0, MESSAGE_RECORDS)];
        if same == other {
            tails = vec![(same, 1, 11)];
        }
        expected.extend(tails);
        assert_eq!(shape(&messages), expected);
        let control: Vec<&Message> = messages.iter().filter(|m| m.body.is_empty()).collect();
        assert_eq!(control.len(), max as usize, "one per key group");
        assert!(control.iter().all(|m| m.watermark == Some(9) && !m.end));
        let after_same = control.iter().find(|m| m.group == same).expect("same");
        assert_eq!(after_same.index, 2, "numbered after the group's records");
        // Damaged or cut short: refused.
        let mut damaged = file.to_vec();
        damaged[40] ^= 1;
        assert!(read_spool(&Bytes::from(damaged), max).is_err());
        assert!(read_spool(&file.slice(..file.len() - 1), max).is_err());
        // Unkeyed records cannot be routed.
        let mut unkeyed = RecordBatch::new();
        unkeyed.push(None, b"v", None);
        let mut spool = EpochSpool::create(path, "p", max).expect("created");
        assert!(spool.push_batch(&unkeyed).is_err());
    }

    #[test]
    fn open_messages_over_the_limit_are_framed_as_they_are() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("o");
        let max = 64;
        let mut spool = EpochSpool::create(path.clone(), "p", max).expect("created");
        spool.open_limit = 1 << 10;
        let keys: Vec<String> = (0..200).map(|i| format!("key-{i}")).collect();
        let mut batch = RecordBatch::new();
        for key in &keys {
            batch.push(Some(key.as_bytes()), b"v", None);
        }
        spool.push_batch(&batch).expect("spooled");
        assert_eq!(spool.open_bytes, 0, "all framed");
        spool.push_batch(&batch).expect("spooled");
        spool.close().expect("closed");
        let file = Bytes::from(std::fs::read(&path).expect("read"));
        let (_, messages) = read_spool(&file, max).expect("reads");
        // Every record, each key group's messages numbered in order.
        let mut records = RecordBatch::new();
        let mut next = vec![0u32; max as usize];
        for message in &messages {
            assert_eq!(message.index, next[message.group as usize]);
            next[message.group as usize] += 1;
            decode_into(&message.body, &mut records).expect("decodes");
        }
        assert_eq!(records.len(), 2 * keys.len());
        assert!(messages.len() > max as usize, "framed before the close too");
    }

    #[test]
    fn an_epoch_that_ended_says_so_on_every_key_group_even_without_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = EpochSpool::create(dir.path().join("e"), "p", 4).expect("created");
        spool.watermark(3);
        spool.end();
        let file = Bytes::from(std::fs::read(spool.close().expect("closed")).expect("read"));
        let (_, messages) = read_spool(&file, 4).expect("reads");
        let expected: Vec<Message> = (0..4)
            .map(|group| Message {
                group,
                index: 0,
                body: Bytes::new(),
                watermark: Some(MAX_WATERMARK),
                end: true,
            })
            .collect();
        assert_eq!(messages, expected);
    }

    #[test]
    fn a_version_1_spool_file_is_grouped_as_it_was_then() {
        let max = 8;
        let mut file = format!("{SPOOL_HEADER_V1}job:x:0:2\n").into_bytes();
        spool_v1(&mut file, &two_keys(V1_MESSAGE_RECORDS), max);
        file.push(TAG_WATERMARK);
        file.extend_from_slice(&5i64.to_le_bytes());
        file.push(TAG_END);
        let file = Bytes::from(file);
        let (prefix, messages) = read_spool(&file, max).expect("reads");
        assert_eq!(prefix, "job:x:0:2");
        let same = u32::from(key_group::of_key(b"same", max));
        let other = u32::from(key_group::of_key(b"other", max));
        let mut expected = vec![(same, 0, V1_MESSAGE_RECORDS), (same, 1, 10), (other, 0, 1)];
        if same == other {
            expected = vec![(same, 0, V1_MESSAGE_RECORDS), (same, 1, 11)];
        }
        expected.sort();
        assert_eq!(shape(&messages), expected);
        let control: Vec<&Message> = messages.iter().filter(|m| m.body.is_empty()).collect();
        assert_eq!(control.len(), max as usize);
        assert!(control.iter().all(|m| m.watermark == Some(5) && m.end));
        assert!(read_spool(&file.slice(..file.len() - 2), max).is_err());
        assert!(read_spool(&Bytes::from_static(b"weir-nats-pending 1 p\n"), max).is_err());
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

    #[tokio::test]
    async fn a_cut_is_reached_once_every_writer_marked_or_ended_each_key_group_unless_abandoned() {
        let exchange = Exchange {
            url: "nats://127.0.0.1:1".into(),
            name: "job.edge".into(),
            replicas: 1,
        };
        let mut source = ExchangeSource::new(exchange, 0, 2, 4, &BTreeMap::new());
        assert_eq!(source.groups, 0..2);
        source.writers = 2;
        source.take_cut("a", 0, 0, false);
        source.take_cut("a", 1, 0, false);
        source.take_cut("a", 0, 1, false);
        assert!(
            source.holding().is_none(),
            "writer 1 has not marked key group 1"
        );
        assert!(!source.cut_ready("a"));
        // Writer 1 ended on key group 1 instead: nothing more comes from it.
        source.ended_by.entry(1).or_default().insert(1);
        source.note_reached();
        assert!(source.holding().is_some(), "holds at the cut");
        // Held: nothing after the cut is taken until its barrier went.
        let (tx, rx) = mpsc::channel(4);
        tx.send(Item::Failed("after the cut".into()))
            .await
            .expect("sent");
        source.items = Some(rx);
        let mut batch = RecordBatch::new();
        let held = tokio::time::timeout(Duration::from_millis(200), source.fill(&mut batch, 8));
        assert!(held.await.is_err(), "took a message past the cut");
        assert!(source.cut_ready("a"), "every writer marked or ended");
        assert!(source.holding().is_none(), "reads on after the barrier");
        let next = source.fill(&mut batch, 8).await;
        assert!(next.is_err_and(|e| e.to_string().contains("after the cut")));
        assert!(!source.cut_ready("a"), "a cut is passed once");

        // A writer that gave up waiting for the others abandons it: never
        // reached, whatever comes after.
        source.take_cut("b", 0, 1, true);
        for (group, writer) in [(0, 0), (1, 0), (1, 1)] {
            source.take_cut("b", group, writer, false);
        }
        assert!(source.holding().is_none());
        assert!(!source.cut_ready("b"));
        // A few cuts are remembered at most, the oldest forgotten.
        for n in 0..CUTS_KEPT {
            source.take_cut(&format!("c{n}"), 0, 0, false);
        }
        assert_eq!(source.cuts.len(), CUTS_KEPT);
        assert!(!source.cuts.contains_key("b"));
    }

    #[test]
    fn pauses_of_any_number_of_writers_are_checkpointed_per_key_group() {
        let exchange = Exchange {
            url: "nats://127.0.0.1:1".into(),
            name: "job.edge".into(),
            replicas: 1,
        };
        let many = BTreeSet::from([0, 5, 31, 32, 100, 1023]);
        let packed = pack_paused(7, 1024, &many);
        assert_eq!(
            packed.len(),
            4,
            "a number per word of 32 writers with a pause: {packed:?}"
        );
        assert!(pack_paused(7, 4, &BTreeSet::new()).is_empty());
        // Subtask 0 of 2 (key groups 0..8 of 16) checkpoints its groups'
        // pauses; a reader restored from them (with another subtask's)
        // knows its own groups' only.
        let mut source = ExchangeSource::new(exchange.clone(), 0, 2, 16, &BTreeMap::new());
        source.writers = 1024;
        source.paused.insert(3, many.clone());
        source.paused.insert(4, BTreeSet::from([1]));
        let mut positions = source.partitions().expect("partitioned");
        positions.extend(pack_paused(9, 1024, &BTreeSet::from([2])));
        let restored = ExchangeSource::new(exchange.clone(), 0, 2, 16, &positions);
        assert_eq!(restored.writers, 1024);
        assert_eq!(
            restored.paused,
            BTreeMap::from([(3, many), (4, BTreeSet::from([1]))])
        );
        let other = ExchangeSource::new(exchange, 1, 2, 16, &positions);
        assert_eq!(other.paused, BTreeMap::from([(9, BTreeSet::from([2]))]));
    }
}
