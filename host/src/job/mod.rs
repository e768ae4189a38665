//! Jobs: the job file ([`file`]), its validation into a [`JobGraph`] (unique
//! uids, edges valid, acyclic, parallelism within `max_parallelism`) and the
//! physical channel layout of each edge.
//!
//! Everything here is pure: no wasmtime, no RocksDB, no tokio. Paths are
//! resolved against the job file's directory.

pub mod file;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use file::{
    BackendKind, CheckpointSettings, Delivery, JobFile, LimitSettings, LineFormat, NatsKey,
    NatsSink, NatsSource, OnCancel, Partition, RestartSettings, SinkKind, SourceKind,
    StateSettings, WasiGrant, WatermarkSpec,
};
use file::{SinkKindName, SourceKindName};

use crate::types::Location;
use crate::types::key_group::MAX_MAX_PARALLELISM;

/// Errors reading or validating a job file. Each names the file; validation
/// lists every problem found, each naming the uid and key at fault.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cannot read job file {file}: {cause}")]
    Read {
        file: PathBuf,
        cause: std::io::Error,
    },
    #[error("job file {file} is not valid TOML for a job: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("job file {file} is invalid:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        file: PathBuf,
        problems: Vec<String>,
    },
}

/// Index of a node in [`JobGraph::nodes`].
pub type NodeId = usize;

/// A validated job: nodes in topological order, edges between them.
#[derive(Debug, Clone)]
pub struct JobGraph {
    pub name: String,
    pub file: PathBuf,
    pub max_parallelism: u32,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    pub checkpoint: CheckpointSettings,
    pub restart: RestartSettings,
    pub state: StateSettings,
    /// The directories the file source and sink open their paths through
    /// (the running host's job roots); `None`: paths open as given
    /// (`weir run`).
    pub roots: Option<std::sync::Arc<crate::roots::Roots>>,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub uid: String,
    pub parallelism: u32,
    pub kind: NodeKind,
    /// Edges into this node, in the order of its `inputs` (the input index).
    pub inputs: Vec<usize>,
    /// Edges out of this node.
    pub outputs: Vec<usize>,
}

#[derive(Debug, Clone)]
pub enum NodeKind {
    Source(SourceNode),
    Operator(OperatorNode),
    Sink(SinkKind),
}

#[derive(Debug, Clone)]
pub struct SourceNode {
    pub kind: SourceKind,
    pub format: Option<LineFormat>,
    pub watermark: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct OperatorNode {
    /// The plugin file, resolved against the job file's directory.
    pub plugin: PathBuf,
    /// The `config` table as JSON, handed to `open`.
    pub config: String,
    pub limits: Limits,
    pub wasi: Vec<WasiGrant>,
    /// May run in one task with its neighbours (`chain = false`: never).
    pub chain: bool,
}

/// Effective limits of one plugin instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub call_timeout: Duration,
    pub max_record_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 256 << 20,
            call_timeout: Duration::from_secs(5),
            max_record_bytes: 16 << 20,
        }
    }
}

impl Limits {
    fn overlay(self, settings: &LimitSettings) -> Self {
        Self {
            memory_bytes: settings.memory.map_or(self.memory_bytes, |b| b.0),
            call_timeout: settings.call_timeout.unwrap_or(self.call_timeout),
            max_record_bytes: settings
                .max_record_size
                .map_or(self.max_record_bytes, |b| b.0),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Edge {
    pub from: NodeId,
    pub to: NodeId,
    /// Position of this edge in the downstream node's `inputs`.
    pub input_index: u32,
    /// `None` for the main output.
    pub side_output: Option<String>,
    pub partition: Partition,
}

impl Edge {
    /// The (upstream subtask, downstream subtask) pairs this edge connects.
    pub fn channels(&self, from_parallelism: u32, to_parallelism: u32) -> Vec<(u32, u32)> {
        match self.partition {
            Partition::Forward => (0..from_parallelism).map(|i| (i, i)).collect(),
            Partition::Key | Partition::Rebalance => (0..from_parallelism)
                .flat_map(|i| (0..to_parallelism).map(move |j| (i, j)))
                .collect(),
        }
    }
}

impl JobGraph {
    /// Loads and validates a job file.
    pub fn load(path: &Path) -> Result<Self, JobError> {
        let file = JobFile::load(path)?;
        Self::validate(file, path)
    }

    pub fn node(&self, uid: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.uid == uid)
    }

    /// Directory relative paths of the job file are resolved against.
    pub fn base_dir(&self) -> PathBuf {
        base_dir(&self.file)
    }

    /// The edge out of `node` that joins it to the next operator of its
    /// chain, if any. Operators are chained (run in one task per subtask,
    /// records handed over without a channel) along a `forward` edge of
    /// the main output (so equal parallelism) into an operator that has no
    /// other input, unless either says `chain = false`. An operator chains
    /// to one successor at most: the first such edge.
    pub fn chained_edge(&self, node: NodeId) -> Option<usize> {
        let chains = |id: NodeId| matches!(&self.nodes[id].kind, NodeKind::Operator(o) if o.chain);
        if !chains(node) {
            return None;
        }
        self.nodes[node].outputs.iter().copied().find(|&edge_id| {
            let edge = &self.edges[edge_id];
            edge.partition == Partition::Forward
                && edge.side_output.is_none()
                && chains(edge.to)
                && self.nodes[edge.to].inputs.len() == 1
        })
    }

    /// Every operator, grouped into chains (each a path of
    /// [`JobGraph::chained_edge`]s, head first), in topological order of
    /// their heads. An operator that chains with nothing is a chain of one.
    pub fn chains(&self) -> Vec<Vec<NodeId>> {
        let next: Vec<Option<NodeId>> = (0..self.nodes.len())
            .map(|id| self.chained_edge(id).map(|edge| self.edges[edge].to))
            .collect();
        let mut chained_into = vec![false; self.nodes.len()];
        for to in next.iter().flatten() {
            chained_into[*to] = true;
        }
        let mut chains = Vec::new();
        for (head, node) in self.nodes.iter().enumerate() {
            if !matches!(node.kind, NodeKind::Operator(_)) || chained_into[head] {
                continue;
            }
            let mut chain = vec![head];
            while let Some(to) = next[*chain.last().expect("not empty")] {
                chain.push(to);
            }
            chains.push(chain);
        }
        chains
    }

    /// The chains of more than one operator, as `a → b → c` (what a job's
    /// summary shows).
    pub fn chain_names(&self) -> Vec<String> {
        self.chains()
            .into_iter()
            .filter(|chain| chain.len() > 1)
            .map(|chain| {
                chain
                    .iter()
                    .map(|&id| self.nodes[id].uid.as_str())
                    .collect::<Vec<_>>()
                    .join(" → ")
            })
            .collect()
    }

    /// Checks everything the runtime relies on and resolves paths; reports
    /// every problem at once. An operator's `plugin` is a file path,
    /// relative to the job file.
    pub fn validate(job: JobFile, path: &Path) -> Result<Self, JobError> {
        Self::validate_with(job, path, &PluginFiles)
    }

    /// [`JobGraph::validate`] with operators' `plugin` values resolved by
    /// `plugins` (the running host resolves `NAME[@VERSION]` from its store).
    pub fn validate_with(
        job: JobFile,
        path: &Path,
        plugins: &dyn PluginResolver,
    ) -> Result<Self, JobError> {
        let mut problems = Vec::new();
        let base = base_dir(path);
        let max_p = job.max_parallelism;
        if max_p == 0 || max_p > MAX_MAX_PARALLELISM {
            problems.push(format!(
                "max_parallelism = {max_p}: must be between 1 and {MAX_MAX_PARALLELISM}"
            ));
        }
        if job.name.trim().is_empty() {
            problems.push("name: must not be empty".to_string());
        }
        if job.sources.is_empty() {
            problems.push("no [[source]]: a job needs at least one source".to_string());
        }
        if job.sinks.is_empty() {
            problems.push("no [[sink]]: a job needs at least one sink".to_string());
        }
        if job.checkpoint.retained == 0 {
            problems.push("[checkpoint] retained = 0: must keep at least 1".to_string());
        }
        if job.checkpoint.interval.is_some_and(|i| i.is_zero()) {
            problems.push("[checkpoint] interval: must be greater than zero".to_string());
        }
        validate_restart(&job.restart, &mut problems);
        let job_limits = Limits::default().overlay(&job.limits);
        check_limits("[limits]", &job_limits, &mut problems);

        // Nodes, in file order: sources, operators, sinks.
        let mut nodes: Vec<Node> = Vec::new();
        let mut raw_inputs: Vec<Vec<file::InputSpec>> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut check_uid = |uid: &str, what: &str, problems: &mut Vec<String>| {
            if uid.is_empty()
                || !uid
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                problems.push(format!(
                    "{what} uid {uid:?}: use letters, digits, '-', '_' or '.'"
                ));
            }
            if !seen.insert(uid.to_string()) {
                problems.push(format!("uid `{uid}` is used more than once"));
            }
        };
        for source in &job.sources {
            check_uid(&source.uid, "source", &mut problems);
            let parallelism = source.parallelism.unwrap_or(1);
            let kind = source_kind(source, &base, &mut problems);
            if let Some(SourceKind::Nats(nats)) = &kind
                && parallelism > nats.partitions
            {
                problems.push(format!(
                    "source `{}`: parallelism = {parallelism} exceeds partitions = {} (a subtask reads whole partitions)",
                    source.uid, nats.partitions
                ));
            }
            if let Some(kind) = &kind
                && !matches!(kind, SourceKind::Generator { .. } | SourceKind::Nats(_))
                && parallelism != 1
            {
                problems.push(format!(
                    "source `{}`: parallelism = {parallelism}, but a {:?} source reads one stream (use 1)",
                    source.uid, source.kind
                ));
            }
            if let Some(format) = &source.format
                && format.delimiter.is_empty()
            {
                problems.push(format!(
                    "source `{}`: format.delimiter must not be empty",
                    source.uid
                ));
            }
            nodes.push(Node {
                uid: source.uid.clone(),
                parallelism,
                kind: NodeKind::Source(SourceNode {
                    kind: kind.unwrap_or(SourceKind::Generator {
                        count: Some(0),
                        rate: None,
                        keys: 1,
                        seed: 0,
                    }),
                    format: source.format.clone(),
                    watermark: source.watermark.as_ref().map(|w| w.out_of_orderness),
                }),
                inputs: Vec::new(),
                outputs: Vec::new(),
            });
            raw_inputs.push(Vec::new());
        }
        for operator in &job.operators {
            check_uid(&operator.uid, "operator", &mut problems);
            let limits = job_limits.overlay(&operator.limits);
            check_limits(
                &format!("operator `{}` limits", operator.uid),
                &limits,
                &mut problems,
            );
            if operator.inputs.is_empty() {
                problems.push(format!("operator `{}`: inputs is empty", operator.uid));
            }
            let plugin = match plugins.resolve(&operator.plugin, &base) {
                Ok(plugin) => plugin,
                Err(problem) => {
                    problems.push(format!("operator `{}`: {problem}", operator.uid));
                    PathBuf::new()
                }
            };
            nodes.push(Node {
                uid: operator.uid.clone(),
                parallelism: operator.parallelism.unwrap_or(job.parallelism),
                kind: NodeKind::Operator(OperatorNode {
                    plugin,
                    config: file::config_json(operator.config.as_ref()),
                    limits,
                    wasi: operator.wasi.clone(),
                    chain: operator.chain,
                }),
                inputs: Vec::new(),
                outputs: Vec::new(),
            });
            raw_inputs.push(operator.inputs.clone());
        }
        for sink in &job.sinks {
            check_uid(&sink.uid, "sink", &mut problems);
            if sink.inputs.is_empty() {
                problems.push(format!("sink `{}`: inputs is empty", sink.uid));
            }
            let kind = sink_kind(sink, &base, &mut problems);
            nodes.push(Node {
                uid: sink.uid.clone(),
                parallelism: sink.parallelism.unwrap_or(1),
                kind: NodeKind::Sink(kind.unwrap_or(SinkKind::Blackhole)),
                inputs: Vec::new(),
                outputs: Vec::new(),
            });
            raw_inputs.push(sink.inputs.clone());
        }
        for node in &nodes {
            if node.parallelism == 0 || (max_p > 0 && node.parallelism > max_p) {
                problems.push(format!(
                    "`{}`: parallelism = {} must be between 1 and max_parallelism ({max_p})",
                    node.uid, node.parallelism
                ));
            }
        }

        // Edges.
        let index: BTreeMap<&str, NodeId> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.uid.as_str(), i))
            .collect();
        let mut edges = Vec::new();
        for (to, inputs) in raw_inputs.iter().enumerate() {
            for (input_index, input) in inputs.iter().enumerate() {
                let (from_uid, side_output, partition) = input.parts();
                let to_uid = &nodes[to].uid;
                let Some(&from) = index.get(from_uid.as_str()) else {
                    problems.push(format!(
                        "`{to_uid}`: input `{from_uid}` names no source or operator"
                    ));
                    continue;
                };
                if matches!(nodes[from].kind, NodeKind::Sink(_)) {
                    problems.push(format!("`{to_uid}`: input `{from_uid}` is a sink"));
                    continue;
                }
                if side_output.is_some() && !matches!(nodes[from].kind, NodeKind::Operator(_)) {
                    problems.push(format!(
                        "`{to_uid}`: input `{from_uid}`: only operators have side outputs"
                    ));
                }
                let (p_from, p_to) = (nodes[from].parallelism, nodes[to].parallelism);
                let partition = partition.unwrap_or(if p_from == p_to {
                    Partition::Forward
                } else {
                    Partition::Rebalance
                });
                if partition == Partition::Forward && p_from != p_to {
                    problems.push(format!(
                        "`{to_uid}`: forward input from `{from_uid}` needs equal parallelism ({p_from} vs {p_to}); use partition = \"key\" or \"rebalance\""
                    ));
                }
                edges.push(Edge {
                    from,
                    to,
                    input_index: input_index as u32,
                    side_output,
                    partition,
                });
            }
        }
        for (id, edge) in edges.iter().enumerate() {
            nodes[edge.to].inputs.push(id);
            nodes[edge.from].outputs.push(id);
        }
        for node in &nodes {
            if !matches!(node.kind, NodeKind::Sink(_)) && node.outputs.is_empty() {
                problems.push(format!(
                    "`{}`: its output goes nowhere (no operator or sink reads it)",
                    node.uid
                ));
            }
        }

        // Topological order (Kahn); anything left over is on a cycle.
        let order = topological_order(&nodes, &edges);
        if order.len() != nodes.len() {
            let on_cycle: Vec<&str> = (0..nodes.len())
                .filter(|i| !order.contains(i))
                .map(|i| nodes[i].uid.as_str())
                .collect();
            problems.push(format!(
                "the job has a cycle through {}",
                on_cycle.join(", ")
            ));
        }

        if !problems.is_empty() {
            return Err(JobError::Invalid {
                file: path.to_path_buf(),
                problems,
            });
        }
        let (nodes, edges) = reorder(nodes, edges, &order);
        let mut state = job.state;
        state.dir = base.join(&state.dir);
        let mut checkpoint = job.checkpoint;
        // A local directory is relative to the job file.
        checkpoint.dir = checkpoint.dir.map(|dir| match dir {
            Location::Local(path) => Location::Local(base.join(path)),
            remote => remote,
        });
        Ok(JobGraph {
            name: job.name,
            file: path.to_path_buf(),
            max_parallelism: max_p,
            nodes,
            edges,
            checkpoint,
            restart: job.restart,
            state,
            roots: None,
        })
    }
}

fn base_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Turns an operator's `plugin` value into the component file to load.
pub trait PluginResolver {
    /// `base`: the job file's directory. `Err`: the problem, without the
    /// operator (the caller names it).
    fn resolve(&self, plugin: &str, base: &Path) -> Result<PathBuf, String>;
}

/// Plugins are files, relative to the job file (`weir run`).
#[derive(Debug, Clone, Copy)]
pub struct PluginFiles;

impl PluginResolver for PluginFiles {
    fn resolve(&self, plugin: &str, base: &Path) -> Result<PathBuf, String> {
        let path = base.join(plugin);
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!("plugin file {} does not exist", path.display()))
        }
    }
}

fn validate_restart(restart: &RestartSettings, problems: &mut Vec<String>) {
    if let Err(found) = crate::restart::RestartStrategy::from_settings(restart) {
        problems.extend(found);
    }
}

fn check_limits(what: &str, limits: &Limits, problems: &mut Vec<String>) {
    if limits.memory_bytes < (1 << 20) {
        problems.push(format!("{what}: memory must be at least 1MiB"));
    }
    if limits.call_timeout < Duration::from_millis(10) {
        problems.push(format!("{what}: call_timeout must be at least 10ms"));
    }
    if limits.max_record_bytes == 0 {
        problems.push(format!("{what}: max_record_size must be greater than zero"));
    }
}

fn check_rate(uid: &str, rate: Option<f64>, problems: &mut Vec<String>) {
    if let Some(rate) = rate
        && !(rate > 0.0 && rate.is_finite())
    {
        problems.push(format!("source `{uid}`: rate must be a positive number"));
    }
}

fn source_kind(
    source: &file::SourceSpec,
    base: &Path,
    problems: &mut Vec<String>,
) -> Option<SourceKind> {
    let uid = &source.uid;
    let mut stray = |key: &str, present: bool| {
        if present {
            problems.push(format!(
                "source `{uid}`: key `{key}` does not apply to a {:?} source",
                source.kind
            ));
        }
    };
    if source.kind != SourceKindName::Nats {
        stray("url", source.url.is_some());
        stray("stream", source.stream.is_some());
        stray("subject", source.subject.is_some());
        stray("partitions", source.partitions.is_some());
        stray("key_token", source.key_token.is_some());
        stray("key_header", source.key_header.is_some());
        stray("bounded", source.bounded.is_some());
    }
    match source.kind {
        SourceKindName::Nats => {
            stray("path", source.path.is_some());
            stray("address", source.address.is_some());
            stray("count", source.count.is_some());
            stray("keys", source.keys.is_some());
            stray("seed", source.seed.is_some());
            check_rate(uid, source.rate, problems);
            let endpoint = nats_endpoint(
                "source",
                uid,
                [&source.url, &source.stream, &source.subject],
                problems,
            );
            let partitions = source.partitions.unwrap_or(1);
            if partitions == 0 {
                problems.push(format!("source `{uid}`: partitions must be at least 1"));
            }
            let key = match (&source.key_token, &source.key_header) {
                (Some(_), Some(_)) => {
                    problems.push(format!(
                        "source `{uid}`: set key_token or key_header, not both"
                    ));
                    NatsKey::None
                }
                (Some(token), None) => NatsKey::Token(*token),
                (None, Some(header)) => NatsKey::Header(header.clone()),
                (None, None) => NatsKey::None,
            };
            if key != NatsKey::None && source.format.as_ref().is_some_and(|f| f.key.is_some()) {
                problems.push(format!(
                    "source `{uid}`: the key comes from format.key or from key_token/key_header, not both"
                ));
            }
            let (url, stream, subject) = endpoint?;
            Some(SourceKind::Nats(NatsSource {
                url,
                stream,
                subject,
                partitions,
                key,
                bounded: source.bounded.unwrap_or(false),
                rate: source.rate,
            }))
        }
        SourceKindName::File => {
            stray("address", source.address.is_some());
            stray("count", source.count.is_some());
            stray("keys", source.keys.is_some());
            stray("seed", source.seed.is_some());
            check_rate(uid, source.rate, problems);
            match &source.path {
                Some(path) => Some(SourceKind::File {
                    path: base.join(path),
                    rate: source.rate,
                }),
                None => {
                    problems.push(format!("source `{uid}`: a file source needs `path`"));
                    None
                }
            }
        }
        SourceKindName::Socket => {
            stray("path", source.path.is_some());
            stray("count", source.count.is_some());
            stray("rate", source.rate.is_some());
            stray("keys", source.keys.is_some());
            stray("seed", source.seed.is_some());
            match &source.address {
                Some(address) => Some(SourceKind::Socket {
                    address: address.clone(),
                }),
                None => {
                    problems.push(format!(
                        "source `{uid}`: a socket source needs `address` (host:port)"
                    ));
                    None
                }
            }
        }
        SourceKindName::Generator => {
            stray("path", source.path.is_some());
            stray("address", source.address.is_some());
            let keys = source.keys.unwrap_or(1000);
            if keys == 0 {
                problems.push(format!("source `{uid}`: keys must be at least 1"));
            }
            check_rate(uid, source.rate, problems);
            Some(SourceKind::Generator {
                count: source.count,
                rate: source.rate,
                keys,
                seed: source.seed.unwrap_or(0),
            })
        }
    }
}

fn sink_kind(sink: &file::SinkSpec, base: &Path, problems: &mut Vec<String>) -> Option<SinkKind> {
    let uid = &sink.uid;
    if sink.kind != SinkKindName::Nats {
        for (key, present) in [
            ("url", sink.url.is_some()),
            ("stream", sink.stream.is_some()),
            ("subject", sink.subject.is_some()),
            ("delivery", sink.delivery.is_some()),
        ] {
            if present {
                problems.push(format!(
                    "sink `{uid}`: key `{key}` does not apply to a {:?} sink",
                    sink.kind
                ));
            }
        }
    }
    match sink.kind {
        SinkKindName::Nats => {
            if sink.path.is_some() {
                problems.push(format!(
                    "sink `{uid}`: key `path` does not apply to a Nats sink"
                ));
            }
            let endpoint = nats_endpoint(
                "sink",
                uid,
                [&sink.url, &sink.stream, &sink.subject],
                problems,
            );
            let (url, stream, subject) = endpoint?;
            Some(SinkKind::Nats(NatsSink {
                url,
                stream,
                subject,
                delivery: sink.delivery.unwrap_or(Delivery::ExactlyOnce),
            }))
        }
        SinkKindName::Stdout | SinkKindName::Blackhole => {
            if sink.path.is_some() {
                problems.push(format!(
                    "sink `{}`: key `path` does not apply to a {:?} sink",
                    sink.uid, sink.kind
                ));
            }
            Some(if sink.kind == SinkKindName::Stdout {
                SinkKind::Stdout
            } else {
                SinkKind::Blackhole
            })
        }
        SinkKindName::File => match &sink.path {
            Some(path) => Some(SinkKind::File {
                path: base.join(path),
            }),
            None => {
                problems.push(format!("sink `{}`: a file sink needs `path`", sink.uid));
                None
            }
        },
    }
}

/// A nats connector's `url`, `stream` and `subject`: each required, the
/// subject literal. `role` is `source` or `sink`.
fn nats_endpoint(
    role: &str,
    uid: &str,
    [url, stream, subject]: [&Option<String>; 3],
    problems: &mut Vec<String>,
) -> Option<(String, String, String)> {
    let mut need = |key: &str, value: &Option<String>| match value {
        Some(v) if !v.is_empty() => Some(v.clone()),
        _ => {
            problems.push(format!("{role} `{uid}`: a nats {role} needs `{key}`"));
            None
        }
    };
    let (url, stream, subject) = (
        need("url", url),
        need("stream", stream),
        need("subject", subject),
    );
    if let Some(subject) = &subject
        && !nats_subject_ok(subject)
    {
        problems.push(format!(
            "{role} `{uid}`: subject {subject:?} must be dot-separated tokens without wildcards or spaces"
        ));
    }
    Some((url?, stream?, subject?))
}

/// A literal NATS subject: non-empty tokens, no wildcards or whitespace.
fn nats_subject_ok(subject: &str) -> bool {
    subject.split('.').all(|token| {
        !token.is_empty()
            && !token
                .chars()
                .any(|c| c == '*' || c == '>' || c.is_whitespace())
    })
}

fn topological_order(nodes: &[Node], edges: &[Edge]) -> Vec<NodeId> {
    let mut in_degree: Vec<usize> = nodes.iter().map(|n| n.inputs.len()).collect();
    let mut ready: Vec<NodeId> = (0..nodes.len()).filter(|&i| in_degree[i] == 0).collect();
    ready.reverse();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(node) = ready.pop() {
        order.push(node);
        for &edge in &nodes[node].outputs {
            let to = edges[edge].to;
            in_degree[to] -= 1;
            if in_degree[to] == 0 {
                ready.push(to);
            }
        }
    }
    order
}

/// Renumbers nodes into topological order, fixing up edge endpoints.
fn reorder(nodes: Vec<Node>, mut edges: Vec<Edge>, order: &[NodeId]) -> (Vec<Node>, Vec<Edge>) {
    let mut new_id = vec![0; nodes.len()];
    for (new, &old) in order.iter().enumerate() {
        new_id[old] = new;
    }
    for edge in &mut edges {
        edge.from = new_id[edge.from];
        edge.to = new_id[edge.to];
    }
    let mut slots: Vec<Option<Node>> = nodes.into_iter().map(Some).collect();
    let nodes = order.iter().filter_map(|&old| slots[old].take()).collect();
    (nodes, edges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(text: &str) -> Result<JobGraph, JobError> {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("p.wasm"), b"").expect("write");
        let path = dir.path().join("job.toml");
        let file = JobFile::parse(text, &path)?;
        JobGraph::validate(file, &path)
    }

    const GOOD: &str = r#"
name = "wc"
[[source]]
uid = "gen"
kind = "generator"
count = 10
[[operator]]
uid = "count"
plugin = "p.wasm"
inputs = [{ from = "gen", partition = "key" }]
parallelism = 3
[[sink]]
uid = "out"
kind = "stdout"
inputs = ["count"]
"#;

    #[test]
    fn good_job_validates_in_topological_order() {
        let job = validate(GOOD).expect("valid");
        let uids: Vec<_> = job.nodes.iter().map(|n| n.uid.as_str()).collect();
        assert_eq!(uids, ["gen", "count", "out"]);
        assert_eq!(job.edges[0].partition, Partition::Key);
        // count (p=3) -> out (p=1) defaults to rebalance.
        assert_eq!(job.edges[1].partition, Partition::Rebalance);
        assert_eq!(job.edges[0].channels(1, 3), vec![(0, 0), (0, 1), (0, 2)]);
    }

    #[test]
    fn every_problem_is_reported_with_its_uid() {
        let text = GOOD
            .replace(
                "inputs = [{ from = \"gen\", partition = \"key\" }]",
                "inputs = [\"nothing\"]",
            )
            .replace("plugin = \"p.wasm\"", "plugin = \"missing.wasm\"")
            .replace("uid = \"out\"", "uid = \"gen\"");
        let error = validate(&text).expect_err("invalid").to_string();
        assert!(error.contains("input `nothing` names no source"), "{error}");
        assert!(error.contains("missing.wasm does not exist"), "{error}");
        assert!(
            error.contains("uid `gen` is used more than once"),
            "{error}"
        );
    }

    #[test]
    fn nats_connectors_validate_their_keys() {
        let text = r#"
name = "nats"
[[source]]
uid = "in"
kind = "nats"
url = "nats://127.0.0.1:4222"
stream = "s"
subject = "lines"
partitions = 4
parallelism = 2
key_token = 3
[[sink]]
uid = "out"
kind = "nats"
url = "nats://127.0.0.1:4222"
stream = "o"
subject = "out.counts"
delivery = "at-least-once"
inputs = ["in"]
"#;
        let job = validate(text).expect("valid");
        let NodeKind::Source(SourceNode {
            kind: SourceKind::Nats(source),
            ..
        }) = &job.nodes[0].kind
        else {
            panic!("a nats source");
        };
        assert_eq!((source.partitions, &source.key), (4, &NatsKey::Token(3)));
        assert!(matches!(
            &job.nodes[1].kind,
            NodeKind::Sink(SinkKind::Nats(NatsSink {
                delivery: Delivery::AtLeastOnce,
                ..
            }))
        ));
        let bad = text
            .replace("parallelism = 2", "parallelism = 5\npath = \"x\"")
            .replace("subject = \"out.counts\"", "subject = \"out.*\"");
        let error = validate(&bad).expect_err("invalid").to_string();
        let missing = validate(&text.replace("stream = \"s\"\n", "")).expect_err("invalid");
        assert!(
            missing
                .to_string()
                .contains("source `in`: a nats source needs `stream`"),
            "{missing}"
        );
        for wanted in [
            "source `in`: key `path` does not apply",
            "source `in`: parallelism = 5 exceeds partitions = 4",
            "sink `out`: subject \"out.*\" must be dot-separated tokens",
        ] {
            assert!(error.contains(wanted), "`{wanted}` in {error}");
        }
    }

    #[test]
    fn cycles_are_rejected() {
        let text = r#"
name = "loop"
[[source]]
uid = "gen"
kind = "generator"
[[operator]]
uid = "a"
plugin = "p.wasm"
inputs = ["gen", "b"]
[[operator]]
uid = "b"
plugin = "p.wasm"
inputs = ["a"]
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["b"]
"#;
        let error = validate(text).expect_err("cycle").to_string();
        assert!(error.contains("cycle through a, b"), "{error}");
    }

    #[test]
    fn forward_needs_equal_parallelism_and_keys_must_fit() {
        let text = GOOD
            .replace("partition = \"key\"", "partition = \"forward\"")
            .replace("count = 10", "count = 10\npath = \"x\"");
        let error = validate(&text).expect_err("invalid").to_string();
        assert!(
            error.contains("forward input from `gen` needs equal parallelism"),
            "{error}"
        );
        assert!(error.contains("key `path` does not apply"), "{error}");
    }

    #[test]
    fn operators_chain_along_forward_edges_into_single_input_operators() {
        let text = r#"
name = "chains"
parallelism = 2
[[source]]
uid = "gen"
kind = "generator"
count = 10
[[operator]]
uid = "a"
plugin = "p.wasm"
inputs = ["gen"]
[[operator]]
uid = "b"
plugin = "p.wasm"
inputs = ["a"]
[[operator]]
uid = "c"
plugin = "p.wasm"
inputs = [{ from = "b", partition = "key" }]
[[operator]]
uid = "d"
plugin = "p.wasm"
inputs = ["c"]
[[operator]]
uid = "e"
plugin = "p.wasm"
inputs = ["d"]
chain = false
[[operator]]
uid = "f"
plugin = "p.wasm"
inputs = ["c:late"]
[[operator]]
uid = "g"
plugin = "p.wasm"
inputs = ["e", "f"]
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["g"]
"#;
        let job = validate(text).expect("valid");
        let names = |chain: &Vec<usize>| -> Vec<&str> {
            chain.iter().map(|&id| job.nodes[id].uid.as_str()).collect()
        };
        let chains: Vec<Vec<&str>> = job.chains().iter().map(names).collect();
        // gen → a: sources are not chained; a → b: forward; b → c: keyed;
        // c → d: forward main output; d → e: e opts out; c:late → f: a
        // side output; e, f → g: two inputs.
        assert_eq!(
            chains,
            vec![
                vec!["a", "b"],
                vec!["c", "d"],
                vec!["f"],
                vec!["e"],
                vec!["g"]
            ]
        );
        assert_eq!(job.chain_names(), ["a → b", "c → d"]);
    }
}
