//! The job file: TOML as the design's contract fixes it, deserialised into
//! plain types. Unknown keys are errors (a typo must not be silently ignored);
//! every error names the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::JobError;

/// A parsed job file, before validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub name: String,
    #[serde(default = "default_max_parallelism")]
    pub max_parallelism: u32,
    /// Default parallelism of operators and sinks that do not set one.
    #[serde(default = "one")]
    pub parallelism: u32,
    #[serde(default)]
    pub checkpoint: CheckpointSettings,
    #[serde(default)]
    pub restart: RestartSettings,
    #[serde(default)]
    pub state: StateSettings,
    #[serde(default)]
    pub limits: LimitSettings,
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceSpec>,
    #[serde(default, rename = "operator")]
    pub operators: Vec<OperatorSpec>,
    #[serde(default, rename = "sink")]
    pub sinks: Vec<SinkSpec>,
}

fn default_max_parallelism() -> u32 {
    128
}

fn one() -> u32 {
    1
}

/// `[checkpoint]`: driven by the checkpoint coordinator. No `interval`: no
/// periodic checkpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSettings {
    #[serde(default, with = "humantime_serde_opt")]
    pub interval: Option<Duration>,
    #[serde(default)]
    pub mode: CheckpointMode,
    /// A local directory (relative to the job file) or `s3://bucket/prefix`.
    #[serde(default)]
    pub dir: Option<crate::types::Location>,
    #[serde(default = "default_retained")]
    pub retained: u32,
    #[serde(default, with = "humantime_serde_opt")]
    pub timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub min_pause: Option<Duration>,
    /// Checkpoint failures in a row that do not fail the job.
    #[serde(default)]
    pub tolerable_failures: u32,
    /// What a cancelled job leaves: its retained checkpoints (`retain`, to
    /// resume from with `-s`) or nothing (`delete`). Flink's
    /// externalized-checkpoint retention.
    #[serde(default)]
    pub on_cancel: OnCancel,
}

/// `[checkpoint] on_cancel`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnCancel {
    #[default]
    Retain,
    Delete,
}

impl Default for CheckpointSettings {
    fn default() -> Self {
        Self {
            interval: None,
            mode: CheckpointMode::default(),
            dir: None,
            retained: default_retained(),
            timeout: None,
            min_pause: None,
            tolerable_failures: 0,
            on_cancel: OnCancel::Retain,
        }
    }
}

fn default_retained() -> u32 {
    3
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointMode {
    #[default]
    ExactlyOnce,
    AtLeastOnce,
}

/// `[restart]`: which restart strategy applies after a failure, with its
/// settings (see [`crate::job::restart`] for which keys go with which strategy).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartSettings {
    #[serde(default)]
    pub strategy: RestartStrategyKind,
    /// fixed-delay, exponential-delay: restarts allowed.
    pub attempts: Option<u32>,
    /// fixed-delay, failure-rate: wait before restarting.
    #[serde(default, with = "humantime_serde_opt")]
    pub delay: Option<Duration>,
    /// failure-rate: failures allowed within `interval`.
    pub max_failures: Option<u32>,
    /// failure-rate: the window failures are counted in.
    #[serde(default, with = "humantime_serde_opt")]
    pub interval: Option<Duration>,
    /// exponential-delay: the first delay.
    #[serde(default, with = "humantime_serde_opt")]
    pub initial_delay: Option<Duration>,
    /// exponential-delay: the longest delay.
    #[serde(default, with = "humantime_serde_opt")]
    pub max_delay: Option<Duration>,
    /// exponential-delay: growth per failure.
    pub multiplier: Option<f64>,
    /// exponential-delay: a run this long without failure resets the delay.
    #[serde(default, with = "humantime_serde_opt")]
    pub reset_after: Option<Duration>,
    /// exponential-delay: each delay is spread by ± this fraction.
    pub jitter: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartStrategyKind {
    #[default]
    None,
    FixedDelay,
    FailureRate,
    ExponentialDelay,
}

/// `[state]`: where keyed state lives while the job runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    #[serde(default)]
    pub backend: BackendKind,
    /// Working directory of the RocksDB backend, relative to the job file.
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
    /// Entries each subtask keeps in its write-back cache in front of the backend.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self {
            backend: BackendKind::default(),
            dir: default_state_dir(),
            cache_entries: default_cache_entries(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("weir-data/state")
}

fn default_cache_entries() -> usize {
    1_000_000
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    #[default]
    Rocksdb,
    Memory,
}

/// `[limits]` (job-wide) or `limits = {...}` on an operator (overrides).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Linear memory per plugin instance, e.g. "64MiB".
    pub memory: Option<ByteSize>,
    /// Longest a single call into a plugin may run, e.g. "5s".
    #[serde(default, with = "humantime_serde_opt")]
    pub call_timeout: Option<Duration>,
    /// Largest record (key + value) a plugin may emit.
    pub max_record_size: Option<ByteSize>,
    /// Largest value one state write may store (a value, a list element,
    /// a map key and value), e.g. "1MiB".
    pub value_bytes: Option<ByteSize>,
    /// Most bytes of keyed state one subtask of an operator may hold, e.g.
    /// "1GiB".
    pub state_bytes: Option<ByteSize>,
}

/// A byte count written as `"64MiB"`, `"512KiB"`, `"1GB"` or a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(text) => parse_byte_size(&text).map(ByteSize).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid size {text:?} (expected e.g. \"64MiB\", \"512KiB\" or a number of bytes)"
                ))
            }),
        }
    }
}

fn parse_byte_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().ok()?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

/// `[[source]]`. Which of the kind-specific keys apply is checked by
/// validation, so a key of the wrong kind is named in the error.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    pub uid: String,
    pub kind: SourceKindName,
    pub parallelism: Option<u32>,
    /// Split each line into fields to take the key and event time from.
    pub format: Option<LineFormat>,
    /// Bounded out-of-orderness watermarks from the records' timestamps.
    pub watermark: Option<WatermarkSpec>,
    /// file: the text file, relative to the job file.
    pub path: Option<PathBuf>,
    /// socket: `host:port` of a server sending text lines.
    pub address: Option<String>,
    /// generator: number of records (omit for unbounded).
    pub count: Option<u64>,
    /// generator, file, nats, kafka: records per second (omit for as fast as possible).
    pub rate: Option<f64>,
    /// generator: number of distinct words.
    pub keys: Option<u64>,
    /// generator: seed of the word choice.
    pub seed: Option<u64>,
    /// nats: the server, `nats://host:port` (a NATS cluster's servers
    /// comma-separated).
    pub url: Option<String>,
    /// nats: the JetStream stream read.
    pub stream: Option<String>,
    /// nats: the subject prefix; partition p is `<subject>.<p>.>`.
    pub subject: Option<String>,
    /// nats: how many partitions the subjects are split into.
    pub partitions: Option<u32>,
    /// nats: the record key is this token of the subject (0-based).
    pub key_token: Option<usize>,
    /// nats, kafka: the record key is this header's value.
    pub key_header: Option<String>,
    /// nats, kafka: end at the end of the stream (the topics) as of the start.
    pub bounded: Option<bool>,
    /// kafka: the brokers to start from, `host:port[,host:port…]`.
    pub bootstrap: Option<String>,
    /// kafka: the topic read (or `topics`).
    pub topic: Option<String>,
    /// kafka: the topics read.
    pub topics: Option<Vec<String>>,
    /// kafka: where a fresh start reads from: `"earliest"`, `"latest"` or
    /// `{ timestamp = <ms> }`.
    pub start: Option<StartSpec>,
    /// kafka: `read_committed` (default) or `read_uncommitted`.
    pub isolation: Option<Isolation>,
    /// exchange: the exchange read (dot-separated tokens), as its sink
    /// names it.
    pub exchange: Option<String>,
    /// exchange: copies of its stream on a NATS cluster (made with them by
    /// whichever side comes first; default 1).
    pub replicas: Option<usize>,
}

/// A kafka source's `start` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StartSpec {
    Named(String),
    At { timestamp: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKindName {
    File,
    Generator,
    Socket,
    Nats,
    Kafka,
    Exchange,
}

/// A validated source kind with its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    /// Text lines of a file; position = byte offset. `rate`: lines per
    /// second (omit for as fast as possible).
    File { path: PathBuf, rate: Option<f64> },
    /// Deterministic words: record i carries word(hash(seed, i) % keys).
    Generator {
        count: Option<u64>,
        rate: Option<f64>,
        keys: u64,
        seed: u64,
    },
    /// Text lines read from a TCP server (like `nc -lk PORT`).
    Socket { address: String },
    /// Messages of a partitioned JetStream stream.
    Nats(NatsSource),
    /// Records of Kafka topics.
    Kafka(KafkaSource),
    /// The key groups of an exchange this subtask owns.
    Exchange(Exchange),
}

/// An exchange: a keyed edge carried through NATS JetStream, written by an
/// `exchange` sink, read by an `exchange` source (see
/// `connectors::exchange`).
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    /// `nats://host:port` (a NATS cluster's servers comma-separated).
    pub url: String,
    /// Dot-separated tokens: the subjects are `weir.<name>.<key group>`.
    pub name: String,
    /// Copies of its stream (a NATS cluster's nodes, 1 to 5).
    pub replicas: usize,
}

/// A `kafka` source's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSource {
    /// `host:port[,host:port…]`.
    pub bootstrap: String,
    pub topics: Vec<String>,
    /// Where a fresh start reads from (a restore reads on from its positions).
    pub start: KafkaStart,
    pub isolation: Isolation,
    /// The record key is this header's value (else the record's key).
    pub key_header: Option<String>,
    /// End at the topics' end offsets as of the subtask's start.
    pub bounded: bool,
    /// Records per second per subtask at most (omit for as fast as possible).
    pub rate: Option<f64>,
}

/// Where a fresh `kafka` source starts in each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaStart {
    Earliest,
    Latest,
    /// The first record at or after this time (ms), else the end.
    Timestamp(i64),
}

/// Which records of transactions a `kafka` source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Only committed transactions' records (and non-transactional ones).
    ReadCommitted,
    /// Every record, aborted transactions' too.
    ReadUncommitted,
}

/// A `kafka` sink's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSink {
    /// `host:port[,host:port…]`.
    pub bootstrap: String,
    pub topic: String,
    pub delivery: Delivery,
    /// Every record to this partition (else by key hash, Kafka's murmur2;
    /// unkeyed records round robin).
    pub partition: Option<i32>,
    /// Transactional ids are `<prefix>-<subtask>-<slot>`.
    pub transactional_id_prefix: String,
}

/// A `nats` source's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct NatsSource {
    pub url: String,
    pub stream: String,
    /// Partition p is the subjects `<subject>.<p>.>`.
    pub subject: String,
    pub partitions: u32,
    pub key: NatsKey,
    /// End at the stream's end as of the subtask's start.
    pub bounded: bool,
    /// Messages per second per subtask at most (omit for as fast as possible).
    pub rate: Option<f64>,
}

/// Where a `nats` source takes a record's key from (a `format` may take it
/// from a field instead).
#[derive(Debug, Clone, PartialEq)]
pub enum NatsKey {
    None,
    /// This token of the subject (0-based).
    Token(usize),
    Header(String),
}

/// A `nats` sink's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct NatsSink {
    pub url: String,
    /// The stream the subject belongs to (checked at the start, with its
    /// duplicate window).
    pub stream: String,
    pub subject: String,
    pub delivery: Delivery,
}

/// A sink's guarantee where it has a choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// Published when the checkpoint covering it completes, de-duplicated
    /// by message id on a republish.
    ExactlyOnce,
    /// Published as records arrive; a restart republishes what followed
    /// the last checkpoint.
    AtLeastOnce,
}

/// How a text line becomes a keyed, timestamped record.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineFormat {
    #[serde(default = "default_delimiter")]
    pub delimiter: String,
    /// Index of the field used as the key.
    pub key: Option<usize>,
    /// Index of the field holding event time in ms.
    pub timestamp: Option<usize>,
}

fn default_delimiter() -> String {
    ",".to_string()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatermarkSpec {
    #[serde(with = "humantime_serde_req")]
    pub out_of_orderness: Duration,
}

/// `[[operator]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorSpec {
    pub uid: String,
    /// A file path relative to the job file (or NAME[@VERSION] of a host's store).
    pub plugin: String,
    #[serde(default)]
    pub inputs: Vec<InputSpec>,
    pub parallelism: Option<u32>,
    /// Handed to the plugin's `open` as JSON.
    pub config: Option<toml::Table>,
    #[serde(default)]
    pub limits: LimitSettings,
    /// WASI capabilities granted to this plugin (none by default).
    #[serde(default)]
    pub wasi: Vec<WasiGrant>,
    /// Time-to-live per state, overriding the plugin's declaration:
    /// `state_ttl = { NAME = "1h" }`, `"off"`, or a table
    /// `{ ttl = "1h", update = "on-read-and-write", time = "event" }`
    /// (checked by validation, which names the operator and state).
    #[serde(default)]
    pub state_ttl: BTreeMap<String, toml::Value>,
    /// `false`: never run this operator in one task with its neighbours
    /// (see [`JobGraph::chains`](super::JobGraph::chains)).
    #[serde(default = "chained_by_default")]
    pub chain: bool,
}

fn chained_by_default() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WasiGrant {
    /// The plugin's stdout and stderr go to the host's stderr.
    Stdio,
    /// The real wall and monotonic clocks (otherwise they read zero).
    Clocks,
    /// The plugin sees the host's environment variables.
    Env,
}

/// `[[sink]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSpec {
    pub uid: String,
    pub kind: SinkKindName,
    #[serde(default)]
    pub inputs: Vec<InputSpec>,
    pub parallelism: Option<u32>,
    /// file: the output directory, relative to the job file.
    pub path: Option<PathBuf>,
    /// nats: the server, `nats://host:port` (a NATS cluster's servers
    /// comma-separated).
    pub url: Option<String>,
    /// nats: the JetStream stream that stores `subject`.
    pub stream: Option<String>,
    /// nats: the subject published to.
    pub subject: Option<String>,
    /// nats, kafka: `exactly-once` (default) or `at-least-once`.
    pub delivery: Option<Delivery>,
    /// kafka: the brokers to start from, `host:port[,host:port…]`.
    pub bootstrap: Option<String>,
    /// kafka: the topic written.
    pub topic: Option<String>,
    /// kafka: every record to this partition (else by key hash).
    pub partition: Option<i32>,
    /// kafka: transactional ids are `<prefix>-<subtask>-<slot>` (default
    /// `weir-<job name>-<uid>`).
    pub transactional_id_prefix: Option<String>,
    /// exchange: the exchange written (dot-separated tokens).
    pub exchange: Option<String>,
    /// exchange: copies of its stream on a NATS cluster (default 1).
    pub replicas: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SinkKindName {
    Stdout,
    File,
    Blackhole,
    Nats,
    Kafka,
    Exchange,
}

/// A validated sink kind with its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    /// Lines `value` (or `key<TAB>value` for keyed records) on stdout.
    Stdout,
    /// One part file per subtask in the directory `path`.
    File { path: PathBuf },
    /// Discards and counts.
    Blackhole,
    /// Publishes each record's value to a JetStream subject.
    Nats(NatsSink),
    /// Produces each record (key, value, time) to a Kafka topic.
    Kafka(KafkaSink),
    /// Publishes each record (key, value, time) to its key group's subject
    /// of an exchange, exactly-once.
    Exchange(Exchange),
}

/// An input edge: `"uid"`, `"uid:side-output"` or a table.
#[derive(Debug, Clone)]
pub enum InputSpec {
    Name(String),
    Table(InputTable),
}

/// A string or a table, each with its own errors (an untagged enum would
/// answer any mistake inside the table with "did not match any variant").
impl<'de> Deserialize<'de> for InputSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = InputSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "an input: \"uid\", \"uid:side-output\" or { from, partition, side_output }",
                )
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<InputSpec, E> {
                Ok(InputSpec::Name(value.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<InputSpec, A::Error> {
                InputTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(InputSpec::Table)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputTable {
    pub from: String,
    pub partition: Option<Partition>,
    pub side_output: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partition {
    /// Subtask i feeds subtask i (equal parallelism).
    Forward,
    /// By key group of the record's key.
    Key,
    /// Round-robin over the downstream subtasks.
    Rebalance,
}

impl std::str::FromStr for Partition {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "forward" => Ok(Partition::Forward),
            "key" => Ok(Partition::Key),
            "rebalance" => Ok(Partition::Rebalance),
            other => Err(format!(
                "partition = {other:?} is not a partitioning; use one of: forward, key, rebalance"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Partition {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl InputSpec {
    /// (upstream uid, side output, partition) with `"uid:side"` shorthand expanded.
    pub fn parts(&self) -> (String, Option<String>, Option<Partition>) {
        match self {
            InputSpec::Name(name) => match name.split_once(':') {
                Some((uid, side)) => (uid.to_string(), Some(side.to_string()), None),
                None => (name.clone(), None, None),
            },
            InputSpec::Table(table) => (
                table.from.clone(),
                table.side_output.clone(),
                table.partition,
            ),
        }
    }
}

impl JobFile {
    /// Reads and parses a job file. Errors name the file (and, through the
    /// TOML error, the line and key at fault).
    pub fn load(path: &Path) -> Result<Self, JobError> {
        let text = std::fs::read_to_string(path).map_err(|source| JobError::Read {
            file: path.to_path_buf(),
            cause: source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, JobError> {
        toml::from_str(text).map_err(|error| JobError::Parse {
            file: path.to_path_buf(),
            message: error.to_string(),
        })
    }
}

pub(crate) mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|text| super::humantime_serde_req::parse(&text))
            .transpose()
    }
}

mod humantime_serde_req {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        parse(&String::deserialize(d)?)
    }

    /// `"1s"`, `"250ms"`, `"5m"`: humantime durations.
    pub fn parse<E: serde::de::Error>(text: &str) -> Result<Duration, E> {
        humantime::parse_duration(text)
            .map_err(|error| E::custom(format!("invalid duration {text:?}: {error}")))
    }
}

/// Turns an operator's `config` table into the JSON handed to `open`.
pub fn config_json(config: Option<&toml::Table>) -> String {
    match config {
        None => "{}".to_string(),
        Some(table) => {
            let value: serde_json::Value = toml_to_json(&toml::Value::Table(table.clone()));
            value.to_string()
        }
    }
}

fn toml_to_json(value: &toml::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        toml::Value::String(s) => J::String(s.clone()),
        toml::Value::Integer(i) => J::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(items) => J::Array(items.iter().map(toml_to_json).collect()),
        toml::Value::Table(table) => J::Object(
            table
                .iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect::<serde_json::Map<_, _>>(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN_EXAMPLE: &str = r#"
name = "wordcount"
max_parallelism = 128

[checkpoint]
interval = "1s"
mode = "exactly-once"
dir = "weir-data/checkpoints"
retained = 3

[restart]
strategy = "fixed-delay"
attempts = 3
delay = "1s"

[[source]]
uid = "lines"
kind = "file"
path = "input.txt"

[[operator]]
uid = "split"
plugin = "plugins/split.wasm"
inputs = ["lines"]
parallelism = 2

[[operator]]
uid = "count"
plugin = "plugins/count.wasm"
inputs = [{ from = "split", partition = "key" }]
config = { emit = "updates" }

[[sink]]
uid = "out"
kind = "file"
path = "out/"
inputs = ["count"]
"#;

    #[test]
    fn parses_the_design_example() {
        let job = JobFile::parse(DESIGN_EXAMPLE, Path::new("job.toml")).expect("parses");
        assert_eq!(job.name, "wordcount");
        assert_eq!(job.checkpoint.interval, Some(Duration::from_secs(1)));
        assert_eq!(job.restart.strategy, RestartStrategyKind::FixedDelay);
        assert_eq!(job.operators.len(), 2);
        assert_eq!(job.operators[1].inputs[0].parts().2, Some(Partition::Key));
        assert_eq!(
            config_json(job.operators[1].config.as_ref()),
            r#"{"emit":"updates"}"#
        );
        assert_eq!(job.sinks[0].kind, SinkKindName::File);
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let text = DESIGN_EXAMPLE.replace("retained = 3", "retaind = 3");
        let error = JobFile::parse(&text, Path::new("jobs/wc.toml"))
            .expect_err("typo")
            .to_string();
        assert!(error.contains("jobs/wc.toml"), "{error}");
        assert!(error.contains("retaind"), "{error}");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_byte_size("10 KB"), Some(10_000));
        assert_eq!(parse_byte_size("12"), Some(12));
        assert_eq!(parse_byte_size("12 parsecs"), None);
    }
}
