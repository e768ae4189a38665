//! The `nats` source and sink: a partitioned NATS JetStream stream in, a
//! JetStream subject out.
//!
//! **Source.** The stream's subjects are split into `partitions`: partition
//! p is `<subject>.<p>.>`. Source subtask s reads the partitions p with
//! `p % parallelism == s`, each through its own ordered consumer
//! (ephemeral, no acks, one filter subject: nats-server serves a consumer
//! filtering several wildcards slowly once a stream holds many distinct
//! subjects, ~1k messages/s at 200k of them) over one connection, and
//! records, per partition, the stream sequence of the last message it
//! emitted ([`Source::partitions`]). A restore starts each partition just
//! after it, at any parallelism: partitions are reassigned, their positions
//! travel with them. A message at or before its partition's position is
//! skipped, never emitted: the client recreates an ordered consumer that
//! had delivered nothing yet (a node died, heartbeats were missed) from
//! the stream's first message, not from where it was asked to start. `bounded` ends a subtask once it has read what the
//! stream held for its partitions when it started.
//!
//! **Sink, exactly-once.** The records of each checkpoint epoch go into a
//! spool file `pending/<uid>-<subtask>-<epoch>-<instance>` under the job's checkpoint
//! directory (in exchange mode as the messages they make, see
//! [`super::exchange`]); at the barrier it is fsynced and acked as pending. When the
//! checkpoint completes, the epoch is published, each message with the id
//! `<job>:<uid>:<subtask>:<epoch>:<index>` (`Nats-Msg-Id`), and the file is
//! deleted once every publish was acknowledged. The publishing runs in the
//! background while the sink takes the next epoch's records, one
//! publication at a time in epoch order: the next commit (and the end)
//! waits for the one before, and until it has ended its files stay listed
//! as pending in the checkpoints taken meanwhile. A restored attempt
//! republishes the restored checkpoint's pending epochs first: JetStream
//! drops what it already stored, as long as the stream's duplicate window
//! covers the time since the first publish ([`check`] refuses a window
//! shorter than the job's restart delay). An epoch not acknowledged (a
//! node down, a leader election) is published again the same way, within
//! half the window ([`publish_spool`]), before the task fails. **At-least-once** publishes as
//! records arrive and waits for the acknowledgements at each barrier.
//!
//! The [`Sink`] hooks are synchronous: the sink runs its publishes on the
//! tokio runtime it was created on, spawned or inside `block_in_place`.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, Context, consumer};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::exchange::{EpochSpool, Producer};
use super::{Pace, push_fields};
use crate::dataflow::operator::SourceFuture;
use crate::dataflow::{FailureKind, OperatorError, Sink, Source, SourceStatus};
use crate::job::{Delivery, JobGraph, LineFormat, NatsKey, NodeKind, SinkKind, SourceKind};
use crate::types::{CheckpointId, RecordBatch};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Publishes awaiting their acknowledgement at most.
const IN_FLIGHT: usize = 4096;
/// The header a sink puts a keyed record's key in.
pub const KEY_HEADER: &str = "Weir-Key";
/// The first line of a spool file: this, then the message ids' prefix.
const SPOOL_HEADER: &str = "weir-nats-pending 1 ";

fn connector_error(message: impl Into<String>) -> OperatorError {
    OperatorError::new(FailureKind::Connector, message)
}

/// `url` (or a comma-separated list of them) without passwords, for
/// messages.
pub fn redact(url: &str) -> String {
    if url.contains(',') {
        return url
            .split(',')
            .map(|u| redact(u.trim()))
            .collect::<Vec<_>>()
            .join(",");
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

/// Connects to `url` (credentials may be in it: `nats://user:pass@host`;
/// the servers of a NATS cluster comma-separated, any one of them up is
/// enough).
pub(super) async fn connect(url: &str) -> Result<Context, String> {
    let options = async_nats::ConnectOptions::new()
        .connection_timeout(CONNECT_TIMEOUT)
        .name("weir");
    let servers: Vec<String> = url.split(',').map(|u| u.trim().to_string()).collect();
    let client = async_nats::connect_with_options(servers.as_slice(), options)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", redact(url)))?;
    Ok(jetstream::new(client))
}

/// Finds `stream` on the server, or says it is not there.
async fn stream(js: &Context, url: &str, name: &str) -> Result<jetstream::stream::Stream, String> {
    js.get_stream(name).await.map_err(|e| {
        if matches!(
            e.kind(),
            jetstream::context::GetStreamErrorKind::JetStream(_)
        ) && e.to_string().contains("not found")
        {
            format!("stream `{name}` does not exist on {}", redact(url))
        } else {
            format!("cannot look up stream `{name}` on {}: {e}", redact(url))
        }
    })
}

/// Checks every `nats` and `exchange` connector of `graph` before anything
/// starts: the server answers (credentials accepted), the streams exist
/// (an exchange's is made), a sink's subject is stored by its stream, and
/// an exactly-once sink's stream keeps message ids longer than
/// `restart_delay`. Returns every problem,
/// each naming the connector's uid.
pub async fn check(graph: &JobGraph, restart_delay: Duration) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    for node in &graph.nodes {
        let uid = &node.uid;
        match &node.kind {
            NodeKind::Source(crate::job::SourceNode {
                kind: SourceKind::Exchange(exchange),
                ..
            })
            | NodeKind::Sink(SinkKind::Exchange(exchange)) => {
                let role = if matches!(node.kind, NodeKind::Source(_)) {
                    "source"
                } else {
                    "sink"
                };
                let opened = async {
                    let js = connect(&exchange.url).await?;
                    exchange.open(&js).await.map(|_| ())
                };
                if let Err(problem) = opened.await {
                    problems.push(format!("{role} `{uid}`: {problem}"));
                }
            }
            NodeKind::Source(source) => {
                let SourceKind::Nats(nats) = &source.kind else {
                    continue;
                };
                let found = async {
                    let js = connect(&nats.url).await?;
                    stream(&js, &nats.url, &nats.stream).await
                };
                if let Err(problem) = found.await {
                    problems.push(format!("source `{uid}`: {problem}"));
                }
            }
            NodeKind::Sink(SinkKind::Nats(nats)) => {
                let checked = async {
                    let js = connect(&nats.url).await?;
                    let stream = stream(&js, &nats.url, &nats.stream).await?;
                    match js.stream_by_subject(nats.subject.as_str()).await {
                        Ok(owner) if owner == nats.stream => {}
                        Ok(owner) => {
                            return Err(format!(
                                "subject `{}` is stored by stream `{owner}`, not `{}`",
                                nats.subject, nats.stream
                            ));
                        }
                        Err(_) => {
                            return Err(format!(
                                "stream `{}` does not store subject `{}` (no stream does)",
                                nats.stream, nats.subject
                            ));
                        }
                    }
                    let window = stream.cached_info().config.duplicate_window;
                    if nats.delivery == Delivery::ExactlyOnce && window <= restart_delay {
                        return Err(format!(
                            "stream `{}` keeps message ids for {} (duplicate_window), not longer than the restart delay of {}: a republish after a restart could store records twice; raise the window or lower the delay",
                            nats.stream,
                            crate::human::duration(window),
                            crate::human::duration(restart_delay)
                        ));
                    }
                    Ok(())
                };
                if let Err(problem) = checked.await {
                    problems.push(format!("sink `{uid}`: {problem}"));
                }
            }
            _ => {}
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// One message for the source, or how its reader ended.
enum Item {
    Message {
        partition: u32,
        sequence: u64,
        message: Box<jetstream::Message>,
        time_ms: i64,
    },
    /// Bounded: everything the stream held for a partition at the start
    /// was read.
    End,
    Failed(String),
}

/// A `nats` source subtask.
pub struct NatsSource {
    config: crate::job::NatsSource,
    format: Option<LineFormat>,
    /// The partitions this subtask reads → the last sequence emitted.
    last: BTreeMap<u32, u64>,
    read: u64,
    items: Option<mpsc::Receiver<Item>>,
    reader: Option<tokio::task::JoinHandle<()>>,
    /// Partitions read to their end (bounded): all of them, the source
    /// ended.
    partitions_ended: usize,
    pace: Pace,
}

impl NatsSource {
    /// Subtask `subtask` of `parallelism`, restored at `restored`
    /// (partition → last sequence emitted; every stored subtask's).
    pub fn new(
        config: crate::job::NatsSource,
        format: Option<LineFormat>,
        subtask: u32,
        parallelism: u32,
        restored: &BTreeMap<u32, u64>,
    ) -> Self {
        let last = (0..config.partitions)
            .filter(|p| p % parallelism == subtask)
            .map(|p| (p, restored.get(&p).copied().unwrap_or(0)))
            .collect();
        let pace = Pace::new(config.rate);
        Self {
            config,
            format,
            last,
            read: 0,
            items: None,
            reader: None,
            partitions_ended: 0,
            pace,
        }
    }

    fn start(&mut self) {
        let (tx, rx) = mpsc::channel(8192);
        let config = self.config.clone();
        let last = self.last.clone();
        self.reader = Some(tokio::spawn(async move {
            if let Err(error) = read(&config, &last, &tx).await {
                let _ = tx.send(Item::Failed(error)).await;
            }
        }));
        self.items = Some(rx);
    }

    /// Every partition read to its end (none owned: at once).
    fn ended(&self) -> bool {
        self.partitions_ended == self.last.len()
    }

    /// Appends one item; `Ok(false)` once the input ended.
    fn take(&mut self, item: Item, batch: &mut RecordBatch) -> Result<bool, OperatorError> {
        match item {
            Item::Message {
                partition,
                sequence,
                message,
                time_ms,
            } => {
                let key: Option<Vec<u8>> = match &self.config.key {
                    NatsKey::None => None,
                    NatsKey::Token(index) => message
                        .subject
                        .split('.')
                        .nth(*index)
                        .map(|t| t.as_bytes().to_vec()),
                    NatsKey::Header(name) => message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(name.as_str()))
                        .map(|v| v.as_str().as_bytes().to_vec()),
                };
                let stream = &self.config.stream;
                push_fields(
                    batch,
                    &message.payload,
                    self.format.as_ref(),
                    key.as_deref(),
                    Some(time_ms),
                    || format!("stream `{stream}` message {sequence}"),
                )?;
                self.last.insert(partition, sequence);
                self.read += 1;
                self.pace.produced(1);
                Ok(true)
            }
            Item::End => {
                self.partitions_ended += 1;
                Ok(!self.ended())
            }
            Item::Failed(error) => Err(connector_error(error)),
        }
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
        let max = self.pace.next(max).await;
        let items = self.items.as_mut().expect("started above");
        // Cancel-safe: a message is either still in the channel or in the
        // batch with its sequence recorded.
        let Some(first) = items.recv().await else {
            return Err(connector_error("the stream's reader stopped"));
        };
        if !self.take(first, batch)? {
            return Ok(SourceStatus::Ended);
        }
        while batch.len() < max {
            let Some(items) = self.items.as_mut() else {
                break;
            };
            match items.try_recv() {
                Ok(item) => {
                    if !self.take(item, batch)? {
                        return Ok(SourceStatus::Ended);
                    }
                }
                Err(_) => break,
            }
        }
        Ok(SourceStatus::More)
    }
}

impl Drop for NatsSource {
    fn drop(&mut self) {
        if let Some(reader) = &self.reader {
            reader.abort();
        }
    }
}

/// Reads the partitions in `last` (each after its sequence) into `tx`,
/// one ordered consumer each over one connection.
async fn read(
    config: &crate::job::NatsSource,
    last: &BTreeMap<u32, u64>,
    tx: &mpsc::Sender<Item>,
) -> Result<(), String> {
    let js = connect(&config.url).await?;
    let stream = stream(&js, &config.url, &config.stream).await?;
    // Dropped (the source ends or fails): every partition's reader stops.
    let mut readers = tokio::task::JoinSet::new();
    for (&partition, &after) in last {
        let (stream, config, tx) = (stream.clone(), config.clone(), tx.clone());
        readers.spawn(async move { read_partition(&stream, &config, partition, after, &tx).await });
    }
    while let Some(joined) = readers.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error),
            Err(error) => return Err(format!("stream `{}`: {error}", config.stream)),
        }
    }
    Ok(())
}

/// Reads partition `partition` of the stream after sequence `after` into
/// `tx` (bounded: up to what it held at the start, then [`Item::End`]).
async fn read_partition(
    stream: &jetstream::stream::Stream,
    config: &crate::job::NatsSource,
    partition: u32,
    after: u64,
    tx: &mpsc::Sender<Item>,
) -> Result<(), String> {
    let ordered = consumer::pull::OrderedConfig {
        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
            start_sequence: after + 1,
        },
        filter_subject: format!("{}.{partition}.>", config.subject),
        ..Default::default()
    };
    let consumer = stream
        .create_consumer(ordered)
        .await
        .map_err(|e| format!("cannot read stream `{}`: {e}", config.stream))?;
    let mut remaining = config.bounded.then(|| consumer.cached_info().num_pending);
    if remaining == Some(0) {
        let _ = tx.send(Item::End).await;
        return Ok(());
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("cannot read stream `{}`: {e}", config.stream))?;
    let mut restarted = false;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| format!("reading stream `{}`: {e}", config.stream))?;
        let info = message.info().map_err(|e| {
            format!(
                "a message of stream `{}` has no metadata: {e}",
                config.stream
            )
        })?;
        let (sequence, time_ms) = (
            info.stream_sequence,
            (info.published.unix_timestamp_nanos() / 1_000_000) as i64,
        );
        // Read before the restored position: an ordered consumer that had
        // delivered nothing yet when it was recreated (a node died, two
        // heartbeats were missed) starts again from the stream's first
        // message, not from `after`.
        if sequence <= after {
            if !restarted {
                restarted = true;
                tracing::warn!(stream = %config.stream, partition, after, "the partition's reader was recreated from the stream's start: skipping what comes before its position");
            }
            continue;
        }
        if let Some(left) = &mut remaining {
            *left = left.saturating_sub(1);
        }
        let item = Item::Message {
            partition,
            sequence,
            message: Box::new(message),
            time_ms,
        };
        if tx.send(item).await.is_err() {
            return Ok(());
        }
        if remaining == Some(0) {
            let _ = tx.send(Item::End).await;
            return Ok(());
        }
    }
    Err(format!("stream `{}`: the consumer ended", config.stream))
}

impl Source for NatsSource {
    fn next_batch<'a>(&'a mut self, batch: &'a mut RecordBatch, max: usize) -> SourceFuture<'a> {
        Box::pin(self.fill(batch, max))
    }

    fn position(&self) -> u64 {
        self.read
    }

    fn partitions(&self) -> Option<BTreeMap<u32, u64>> {
        Some(self.last.clone())
    }
}

/// A spool file's name under the job's checkpoint directory: `instance`
/// is random per sink (per attempt), so a restarted attempt, whose epochs
/// take up the numbers of the failed attempt's uncommitted ones, never
/// writes a file under a name an earlier attempt used (and mirrored) with
/// other records.
fn spool_name(uid: &str, subtask: u32, epoch: u64, instance: &str) -> String {
    format!("pending/{uid}-{subtask}-{epoch}-{instance}")
}

/// The name a checkpoint lists spool file `path` under: the file's own.
fn listed_name(path: &Path) -> String {
    format!(
        "pending/{}",
        path.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    )
}

/// A `nats` sink subtask.
pub struct NatsSink {
    config: crate::job::NatsSink,
    runtime: tokio::runtime::Handle,
    js: Option<Context>,
    /// `<job>:<uid>:<subtask>`, the start of every message id.
    id_prefix: String,
    uid: String,
    subtask: u32,
    /// The job's checkpoint directory (spool files go into `pending/`).
    job_dir: PathBuf,
    /// The epoch (checkpoint) the records written now belong to.
    next: u64,
    /// Random per sink: its spool files' names are its own.
    instance: String,
    current: Option<(PathBuf, BufWriter<File>)>,
    /// Exchange mode: the epoch being spooled, in place of `current`.
    epoch: Option<EpochSpool>,
    /// (epoch, spool file) written, not yet published.
    pending: Vec<(u64, PathBuf)>,
    /// Exchange mode: (epoch, cut) to mark once the epoch is published
    /// (see `exchange`, "Cuts").
    cuts: Vec<(u64, String)>,
    /// Spool files of the restored checkpoint, republished first.
    recover: Vec<PathBuf>,
    /// Committed epochs being published in the background.
    publishing: Option<Publishing>,
    /// At-least-once: publishes not yet acknowledged.
    in_flight: VecDeque<jetstream::context::PublishAckFuture>,
    /// How long the stream keeps message ids (read at connect): how long
    /// an unacknowledged epoch may be published again.
    window: Duration,
    /// Exchange mode: records go to their key group's subject of this
    /// exchange (see [`super::exchange`]).
    exchange: Option<Producer>,
    /// Exchange mode: the end of input is spooled.
    end_spooled: bool,
}

impl NatsSink {
    /// Subtask `subtask` of sink `uid` of job `job_id`, whose checkpoints go
    /// to `job_dir`; its first epoch is `first`. `recover`: the restored
    /// checkpoint's spool files this subtask republishes.
    pub fn create(
        config: crate::job::NatsSink,
        job_id: &str,
        uid: &str,
        subtask: u32,
        job_dir: &Path,
        first: u64,
        recover: Vec<PathBuf>,
    ) -> Result<Self, OperatorError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| connector_error("a nats sink needs a tokio runtime"))?;
        Ok(Self {
            config,
            runtime,
            js: None,
            id_prefix: format!("{job_id}:{uid}:{subtask}"),
            uid: uid.to_string(),
            subtask,
            job_dir: job_dir.to_path_buf(),
            next: first.max(1),
            instance: crate::checkpoint::storage::random_hex(4),
            current: None,
            epoch: None,
            pending: Vec::new(),
            cuts: Vec::new(),
            recover,
            publishing: None,
            in_flight: VecDeque::new(),
            window: Duration::ZERO,
            exchange: None,
            end_spooled: false,
        })
    }

    /// An `exchange` sink subtask: [`Self::create`] writing `producer`'s
    /// exchange.
    pub fn exchange(
        producer: Producer,
        job_id: &str,
        uid: &str,
        job_dir: &Path,
        first: u64,
        recover: Vec<PathBuf>,
    ) -> Result<Self, OperatorError> {
        let exchange = &producer.exchange;
        let config = crate::job::NatsSink {
            url: exchange.url.clone(),
            stream: exchange.stream(),
            subject: format!("weir.{}.*", exchange.name),
            delivery: Delivery::ExactlyOnce,
        };
        let subtask = producer.subtask;
        let mut sink = Self::create(config, job_id, uid, subtask, job_dir, first, recover)?;
        sink.exchange = Some(producer);
        Ok(sink)
    }

    fn block_on<T>(&self, work: impl Future<Output = T>) -> T {
        tokio::task::block_in_place(|| self.runtime.block_on(work))
    }

    /// Connects, then republishes the restored epochs, once.
    fn ready(&mut self) -> Result<(), OperatorError> {
        if self.js.is_some() {
            return Ok(());
        }
        let (url, name) = (self.config.url.clone(), self.config.stream.clone());
        let exchange = self.exchange.as_ref().map(|p| p.exchange.clone());
        let (js, window) = self
            .block_on(async {
                let js = connect(&url).await?;
                let stream = match &exchange {
                    Some(exchange) => exchange.open(&js).await?,
                    None => stream(&js, &url, &name).await?,
                };
                let window = stream.cached_info().config.duplicate_window;
                Ok::<_, String>((js, window))
            })
            .map_err(connector_error)?;
        self.js = Some(js);
        self.window = window;
        for file in std::mem::take(&mut self.recover) {
            match File::open(&file) {
                Ok(_) => {
                    let published =
                        self.block_on(publish_spool(self.js(), &self.target(), &file, window))?;
                    tracing::info!(file = %file.display(), published, "republished a restored checkpoint's pending records");
                    let _ = std::fs::remove_file(&file);
                }
                // Deleted only after every record was acknowledged.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(connector_error(format!(
                        "cannot read {}: {e}",
                        file.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Exchange mode: spools the end of input (with the end-of-input
    /// watermark), once: every reader of every key group hears of it.
    fn spool_end(&mut self) -> Result<(), OperatorError> {
        if !self.end_spooled {
            self.open_epoch()?.end();
            self.end_spooled = true;
        }
        Ok(())
    }

    /// Where the epochs go.
    fn target(&self) -> Target {
        match &self.exchange {
            Some(producer) => Target::Exchange(producer.clone()),
            None => Target::Subject(self.config.subject.clone()),
        }
    }

    fn js(&self) -> &Context {
        self.js.as_ref().expect("connected by ready()")
    }

    fn open_current(&mut self) -> Result<&mut BufWriter<File>, OperatorError> {
        if self.current.is_none() {
            let path = self.job_dir.join(spool_name(
                &self.uid,
                self.subtask,
                self.next,
                &self.instance,
            ));
            let io =
                |e: std::io::Error| connector_error(format!("spool file {}: {e}", path.display()));
            std::fs::create_dir_all(path.parent().expect("in pending/")).map_err(io)?;
            let mut out = BufWriter::with_capacity(256 << 10, File::create(&path).map_err(io)?);
            writeln!(out, "{SPOOL_HEADER}{}:{}", self.id_prefix, self.next).map_err(io)?;
            self.current = Some((path, out));
        }
        Ok(&mut self.current.as_mut().expect("opened above").1)
    }

    /// Exchange mode: the epoch being spooled, its file made if need be.
    fn open_epoch(&mut self) -> Result<&mut EpochSpool, OperatorError> {
        if self.epoch.is_none() {
            let path = self.job_dir.join(spool_name(
                &self.uid,
                self.subtask,
                self.next,
                &self.instance,
            ));
            let max_parallelism = self.exchange.as_ref().map_or(1, |p| p.max_parallelism);
            let prefix = format!("{}:{}", self.id_prefix, self.next);
            self.epoch = Some(EpochSpool::create(path, &prefix, max_parallelism)?);
        }
        Ok(self.epoch.as_mut().expect("opened above"))
    }

    /// Closes the epoch at checkpoint `checkpoint`'s barrier: the spool
    /// files the checkpoint lists as pending, each under its own name (the
    /// first epoch of a restarted attempt is numbered from its restore
    /// point, the checkpoints from where the failed attempt left them).
    /// Epochs still being published are listed too: a restore from this
    /// checkpoint republishes what they had not delivered.
    fn close_epoch(&mut self, checkpoint: u64) -> Result<Vec<String>, OperatorError> {
        self.close_current(checkpoint)?;
        self.next = checkpoint + 1;
        let publishing = self.publishing.iter().flat_map(|p| &p.epochs);
        Ok(publishing
            .chain(&self.pending)
            .map(|(_, path)| listed_name(path))
            .collect())
    }

    /// Closes the current spool file (fsynced) as pending for `epoch`.
    fn close_current(&mut self, epoch: u64) -> Result<(), OperatorError> {
        if let Some(spool) = self.epoch.take() {
            self.pending.push((epoch, spool.close()?));
        }
        if let Some((path, mut out)) = self.current.take() {
            let io =
                |e: std::io::Error| connector_error(format!("spool file {}: {e}", path.display()));
            out.flush().map_err(io)?;
            out.get_ref().sync_all().map_err(io)?;
            self.pending.push((epoch, path));
        }
        Ok(())
    }

    /// Starts publishing the pending epochs up to `epoch` in the
    /// background, once the publication before has ended.
    fn publish_through(&mut self, epoch: u64) -> Result<(), OperatorError> {
        self.settle_publishing(true)?;
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(n, _)| *n <= epoch);
        self.pending = rest;
        let (cuts, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.cuts)
            .into_iter()
            .partition(|(n, _)| *n <= epoch);
        self.cuts = rest;
        if due.is_empty() && cuts.is_empty() {
            return Ok(());
        }
        let (js, target, window) = (self.js().clone(), self.target(), self.window);
        let files: Vec<(u64, PathBuf)> = due.clone();
        let prefix = self.id_prefix.clone();
        let task = self.runtime.spawn(async move {
            // Each cut right after its epoch, before any later one.
            let mut cuts = VecDeque::from(cuts);
            let mark = |cut: String| {
                let (js, target, prefix) = (&js, &target, &prefix);
                async move {
                    match target {
                        Target::Exchange(producer) => producer.mark_cut(js, prefix, &cut).await,
                        Target::Subject(_) => Ok(()),
                    }
                }
            };
            for (epoch, path) in files {
                while let Some((_, cut)) = cuts.pop_front_if(|(at, _)| *at < epoch) {
                    mark(cut).await?;
                }
                publish_spool(&js, &target, &path, window).await?;
                let _ = std::fs::remove_file(&path);
            }
            for (_, cut) in cuts {
                mark(cut).await?;
            }
            Ok(())
        });
        self.publishing = Some(Publishing { epochs: due, task });
        Ok(())
    }

    /// Ends the background publication once it has ended, or (`wait`)
    /// waits for it; either way its error, if any, is the sink's.
    fn settle_publishing(&mut self, wait: bool) -> Result<(), OperatorError> {
        let Some(publishing) = self.publishing.take_if(|p| wait || p.task.is_finished()) else {
            return Ok(());
        };
        match self.block_on(publishing.task) {
            Ok(result) => result,
            Err(e) => Err(connector_error(format!(
                "publishing to `{}` failed: {e}",
                self.config.subject
            ))),
        }
    }

    fn await_in_flight(&mut self) -> Result<(), OperatorError> {
        let acks = std::mem::take(&mut self.in_flight);
        let subject = self.config.subject.clone();
        self.block_on(async move {
            for ack in acks {
                await_ack(ack, &subject).await?;
            }
            Ok(())
        })
    }
}

/// Committed epochs being published, in order, by a spawned task.
struct Publishing {
    /// (epoch, spool file), listed as pending until the task has ended.
    epochs: Vec<(u64, PathBuf)>,
    task: tokio::task::JoinHandle<Result<(), OperatorError>>,
}

impl Drop for NatsSink {
    fn drop(&mut self) {
        // A failing attempt: what is left unpublished stays in its spool
        // file, which the checkpoint restored next lists.
        if let Some(publishing) = &self.publishing {
            publishing.task.abort();
        }
    }
}

/// Publishes a spool file's records with their message ids and waits for
/// every acknowledgement. Returns how many were published.
///
/// A publish not acknowledged (a NATS node died, the stream is electing a
/// leader) is retried, the whole file again with the same message ids, so
/// the stream stores each record once — as long as the retry starts within
/// half of the stream's duplicate `window` of the file's closing (its
/// modification time, before its first publish). After that the error is
/// the task's, and the restart strategy takes over.
async fn publish_spool(
    js: &Context,
    target: &Target,
    path: &Path,
    window: Duration,
) -> Result<u64, OperatorError> {
    let bad = |what: &str| connector_error(format!("spool file {}: {what}", path.display()));
    let bytes = bytes::Bytes::from(
        tokio::fs::read(path)
            .await
            .map_err(|e| bad(&e.to_string()))?,
    );
    let closed = tokio::fs::metadata(path)
        .await
        .and_then(|m| m.modified())
        .map_err(|e| bad(&e.to_string()))?;
    // Read once, published as often as it takes.
    let (id_prefix, epoch) = match target {
        Target::Subject(subject) => {
            let newline = bytes
                .iter()
                .position(|&b| b == b'\n')
                .ok_or_else(|| bad("truncated header"))?;
            let id_prefix = std::str::from_utf8(&bytes[..newline])
                .ok()
                .and_then(|h| h.strip_prefix(SPOOL_HEADER))
                .filter(|p| !p.is_empty())
                .ok_or_else(|| bad("not a spool file of this sink"))?;
            let records = decode_records(&bytes.slice(newline + 1..)).map_err(|e| bad(&e))?;
            (id_prefix, Epoch::Records { subject, records })
        }
        Target::Exchange(producer) => {
            let (id_prefix, messages) =
                super::exchange::read_spool(&bytes, producer.max_parallelism)
                    .map_err(|e| bad(&e))?;
            (id_prefix, Epoch::Messages { producer, messages })
        }
    };
    let retry_until = closed + window / 2;
    let mut backoff = RETRY_FIRST;
    loop {
        let published = match &epoch {
            Epoch::Records { subject, records } => {
                publish_records(js, subject, id_prefix, records).await
            }
            Epoch::Messages { producer, messages } => {
                producer.publish(js, id_prefix, messages).await
            }
        };
        match published {
            Ok(published) => return Ok(published),
            Err(e) if std::time::SystemTime::now() + backoff < retry_until => {
                let subject = target.name();
                tracing::warn!(%subject, file = %path.display(), error = %e, retry_in = ?backoff, "publish not acknowledged; publishing the epoch again (the stream drops what it stored)");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Where a sink's epochs are published.
#[derive(Debug, Clone)]
enum Target {
    /// Every record to this subject.
    Subject(String),
    /// Each record to its key group's subject of an exchange.
    Exchange(Producer),
}

impl Target {
    /// The subject or exchange, for messages.
    fn name(&self) -> &str {
        match self {
            Target::Subject(subject) => subject,
            Target::Exchange(producer) => &producer.exchange.name,
        }
    }
}

/// A spool file read for publishing.
enum Epoch<'a> {
    Records {
        subject: &'a str,
        records: Vec<SpooledRecord>,
    },
    Messages {
        producer: &'a Producer,
        messages: Vec<super::exchange::Message>,
    },
}

/// The first wait before a publish is retried, and the longest.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Publishes `records` with the ids `<id_prefix>:<index>`, waiting for
/// every acknowledgement.
async fn publish_records(
    js: &Context,
    subject: &str,
    id_prefix: &str,
    records: &[SpooledRecord],
) -> Result<u64, OperatorError> {
    let mut acks = VecDeque::new();
    let mut published = 0u64;
    for (index, (key, value)) in records.iter().enumerate() {
        let mut message = jetstream::message::PublishMessage::build()
            .payload(value.clone())
            .message_id(format!("{id_prefix}:{index}"));
        if let Some(key) = key {
            message = message.header(KEY_HEADER, String::from_utf8_lossy(key).as_ref());
        }
        let ack = js
            .send_publish(subject.to_string(), message)
            .await
            .map_err(|e| connector_error(format!("cannot publish to `{subject}`: {e}")))?;
        acks.push_back(ack);
        if acks.len() >= IN_FLIGHT {
            await_ack(acks.pop_front().expect("non-empty"), subject).await?;
        }
        published += 1;
    }
    for ack in acks {
        await_ack(ack, subject).await?;
    }
    Ok(published)
}

async fn await_ack(
    ack: jetstream::context::PublishAckFuture,
    subject: &str,
) -> Result<(), OperatorError> {
    ack.await
        .map(|_| ())
        .map_err(|e| connector_error(format!("publish to `{subject}` not acknowledged: {e}")))
}

/// Appends one record to a spool file's body.
fn encode_record(out: &mut impl Write, key: Option<&[u8]>, value: &[u8]) -> std::io::Result<()> {
    match key {
        Some(key) => {
            out.write_all(&(key.len() as u32).to_le_bytes())?;
            out.write_all(key)?;
        }
        None => out.write_all(&u32::MAX.to_le_bytes())?,
    }
    out.write_all(&(value.len() as u32).to_le_bytes())?;
    out.write_all(value)
}

/// A spooled record: its key, its value (a slice of the file's bytes).
type SpooledRecord = (Option<Vec<u8>>, bytes::Bytes);

/// The records of a spool file's body.
fn decode_records(body: &bytes::Bytes) -> Result<Vec<SpooledRecord>, String> {
    /// The next `n` bytes from `at` on, `at` moved past them.
    fn take(body: &[u8], at: &mut usize, n: usize) -> Result<std::ops::Range<usize>, String> {
        if body.len() - *at < n {
            return Err("truncated record".into());
        }
        *at += n;
        Ok(*at - n..*at)
    }
    fn length(body: &[u8], at: &mut usize) -> Result<u32, String> {
        let range = take(body, at, 4)?;
        Ok(u32::from_le_bytes(body[range].try_into().expect("4 bytes")))
    }
    let mut at = 0usize;
    let mut records = Vec::new();
    while at < body.len() {
        let key = match length(body, &mut at)? {
            u32::MAX => None,
            n => Some(body[take(body, &mut at, n as usize)?].to_vec()),
        };
        let n = length(body, &mut at)? as usize;
        records.push((key, body.slice(take(body, &mut at, n)?)));
    }
    Ok(records)
}

impl Sink for NatsSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), OperatorError> {
        self.ready()?;
        match self.config.delivery {
            Delivery::ExactlyOnce if self.exchange.is_some() => {
                self.open_epoch()?.push_batch(batch)
            }
            Delivery::ExactlyOnce => {
                let out = self.open_current()?;
                for record in batch.iter() {
                    encode_record(out, record.key, record.value)
                        .map_err(|e| connector_error(format!("spool file: {e}")))?;
                }
                Ok(())
            }
            Delivery::AtLeastOnce => {
                let subject = self.config.subject.clone();
                let js = self.js().clone();
                let mut in_flight = std::mem::take(&mut self.in_flight);
                let result = self.block_on(async {
                    for record in batch.iter() {
                        let mut message = jetstream::message::PublishMessage::build()
                            .payload(record.value.to_vec().into());
                        if let Some(key) = record.key {
                            message =
                                message.header(KEY_HEADER, String::from_utf8_lossy(key).as_ref());
                        }
                        let ack = js
                            .send_publish(subject.clone(), message)
                            .await
                            .map_err(|e| {
                                connector_error(format!("cannot publish to `{subject}`: {e}"))
                            })?;
                        in_flight.push_back(ack);
                        if in_flight.len() >= IN_FLIGHT {
                            await_ack(in_flight.pop_front().expect("non-empty"), &subject).await?;
                        }
                    }
                    Ok(())
                });
                self.in_flight = in_flight;
                result
            }
        }
    }

    fn watermark(&mut self, watermark: crate::types::Timestamp) -> Result<(), OperatorError> {
        if self.exchange.is_some() {
            if watermark == crate::types::MAX_WATERMARK {
                // The input ended: said at once, not after the job's final
                // checkpoint, which may wait for this exchange's readers.
                return self.spool_end();
            }
            self.open_epoch()?.watermark(watermark);
        }
        Ok(())
    }

    fn prepare_commit(&mut self, checkpoint: CheckpointId) -> Result<Vec<String>, OperatorError> {
        self.ready()?;
        match self.config.delivery {
            Delivery::AtLeastOnce => {
                self.await_in_flight()?;
                Ok(Vec::new())
            }
            Delivery::ExactlyOnce => {
                self.settle_publishing(false)?;
                self.close_epoch(checkpoint.0)
            }
        }
    }

    fn commit(&mut self, checkpoint: CheckpointId) -> Result<(), OperatorError> {
        self.ready()?;
        self.publish_through(checkpoint.0)
    }

    fn cut(&mut self, checkpoint: CheckpointId, cut: &str) {
        if self.exchange.is_some() {
            self.cuts.push((checkpoint.0, cut.to_string()));
        }
    }

    fn finish(&mut self) -> Result<(), OperatorError> {
        self.ready()?;
        // An exchange's end is spooled when the input's end-of-input
        // watermark arrives ([`Sink::watermark`]), never here: a job stopped
        // with a savepoint finishes too, and its readers must not hear of
        // an end (the stage resumes from the savepoint elsewhere).
        let epoch = self.next;
        self.close_current(epoch)?;
        self.await_in_flight()
    }

    fn end(&mut self, commit: bool) -> Result<(), OperatorError> {
        if commit {
            self.ready()?;
            self.publish_through(u64::MAX)?;
        } else {
            for (_, path) in std::mem::take(&mut self.pending) {
                let _ = std::fs::remove_file(path);
            }
        }
        // What was committed is published before the sink ends.
        self.settle_publishing(true)?;
        // An exchange's writer stopped with its input not ended (a stop
        // with a savepoint) tells its readers it paused after all that.
        match (&self.exchange, commit && !self.end_spooled) {
            (Some(producer), true) => {
                let (producer, js) = (producer.clone(), self.js().clone());
                let (prefix, stopped_at) = (self.id_prefix.clone(), self.next.saturating_sub(1));
                self.block_on(async move { producer.pause(&js, &prefix, stopped_at).await })
            }
            _ => Ok(()),
        }
    }
}

/// Settles a job's spool directory before an attempt starts: every spool
/// file that `keep` (the restored checkpoint's pending files, relative to
/// `job_dir`) does not list was written after that checkpoint, and the
/// attempt replays it.
pub fn settle_spool(job_dir: &Path, keep: &[String]) {
    let Ok(entries) = std::fs::read_dir(job_dir.join("pending")) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = format!("pending/{}", entry.file_name().to_string_lossy());
        if !keep.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_epoch_is_listed_under_its_spool_files_name_however_checkpoints_are_numbered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = crate::job::NatsSink {
            url: "nats://127.0.0.1:1".into(),
            stream: "s".into(),
            subject: "a".into(),
            delivery: crate::job::file::Delivery::ExactlyOnce,
        };
        // Restored from checkpoint 4: its first epoch is 5, but the run's
        // checkpoints went on to 7 (5 and 6, of the failed attempt, never
        // completed).
        let attempt = || {
            NatsSink::create(config.clone(), "run", "out", 0, dir.path(), 5, Vec::new())
                .expect("a sink")
        };
        let mut sink = attempt();
        sink.open_current().expect("spooled");
        let listed = sink.close_epoch(7).expect("closed");
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert!(
            dir.path().join(&listed[0]).is_file(),
            "the checkpoint lists the file written: {listed:?}"
        );
        sink.open_current().expect("spooled");
        let both = sink.close_epoch(8).expect("closed");
        assert_eq!(both.len(), 2);
        assert!(
            both.iter().all(|name| dir.path().join(name).is_file()),
            "{both:?}"
        );
        // Another attempt from the same restore point spools its first
        // epoch under a name of its own.
        let mut again = attempt();
        again.open_current().expect("spooled");
        let other = again.close_epoch(7).expect("closed");
        assert_ne!(other, listed, "never the earlier attempt's file");
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact("nats://u:pw@h:4222"), "nats://u:***@h:4222");
        assert_eq!(redact("nats://h:4222"), "nats://h:4222");
    }

    #[test]
    fn spooled_records_decode_as_written() {
        let mut body = Vec::new();
        encode_record(&mut body, Some(b"k"), b"value one").expect("write");
        encode_record(&mut body, None, b"").expect("write");
        let body = bytes::Bytes::from(body);
        let records = decode_records(&body).expect("decodes");
        assert_eq!(
            records,
            vec![
                (Some(b"k".to_vec()), bytes::Bytes::from_static(b"value one")),
                (None, bytes::Bytes::new())
            ]
        );
        assert!(decode_records(&body.slice(..body.len() - 1)).is_err());
        assert!(decode_records(&body.slice(..3)).is_err());
    }
}
