//! The validated job: its nodes (sources, operators with their plugin and
//! limits, sinks), the edges between them and each edge's channel layout,
//! and the chains of operators that run in one task.

use super::validate::base_dir;
use super::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::types::ttl::{StateTtl, TtlTime, TtlUpdate};

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
    /// Run only this subtask of every node ([`JobGraph::set_task`]): one
    /// **task** of a cluster job's stage, which runs, checkpoints and
    /// fails over apart from the stage's other tasks. `None`: every
    /// subtask.
    pub task: Option<u32>,
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
    /// The job file's `state_ttl`, by state name.
    pub state_ttl: BTreeMap<String, TtlOverride>,
}

/// A state's TTL as an operator's `state_ttl` sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtlOverride {
    /// `"off"`: no TTL, whatever the plugin declares.
    Off,
    /// A TTL; what refreshes it and its time default to the plugin's
    /// declaration, else on create and write, processing time.
    Ttl {
        ttl: Duration,
        update: Option<TtlUpdate>,
        time: Option<TtlTime>,
    },
}

impl TtlOverride {
    /// The TTL a state has with this override over the plugin's `declared`.
    pub fn apply(&self, declared: Option<StateTtl>) -> Option<StateTtl> {
        match *self {
            TtlOverride::Off => None,
            TtlOverride::Ttl { ttl, update, time } => Some(StateTtl::new(
                ttl,
                update.or(declared.map(|d| d.update)).unwrap_or_default(),
                time.or(declared.map(|d| d.time)).unwrap_or_default(),
            )),
        }
    }

    /// Reads one entry of `state_ttl`; the error says what is wrong with it.
    pub fn parse(value: &toml::Value) -> Result<Self, String> {
        let ttl = |text: &str| match text.trim() {
            "off" => Ok(None),
            text => crate::types::ttl::parse_duration(text).map(Some),
        };
        match value {
            toml::Value::String(text) => Ok(match ttl(text)? {
                None => TtlOverride::Off,
                Some(ttl) => TtlOverride::Ttl {
                    ttl,
                    update: None,
                    time: None,
                },
            }),
            toml::Value::Table(table) => {
                if let Some(key) = table
                    .keys()
                    .find(|k| !["ttl", "update", "time"].contains(&k.as_str()))
                {
                    return Err(format!("unknown key `{key}` (expected ttl, update, time)"));
                }
                let Some(toml::Value::String(text)) = table.get("ttl") else {
                    return Err("`ttl` is missing or not a string (e.g. ttl = \"1h\")".to_string());
                };
                let Some(ttl) = ttl(text)? else {
                    return Err(
                        "ttl = \"off\" takes no update or time: write NAME = \"off\"".to_string(),
                    );
                };
                let update = match table.get("update").map(|v| v.as_str()) {
                    None => None,
                    Some(Some("on-create-and-write")) => Some(TtlUpdate::OnCreateAndWrite),
                    Some(Some("on-read-and-write")) => Some(TtlUpdate::OnReadAndWrite),
                    Some(_) => {
                        return Err(
                            "update must be \"on-create-and-write\" or \"on-read-and-write\""
                                .to_string(),
                        );
                    }
                };
                let time = match table.get("time").map(|v| v.as_str()) {
                    None => None,
                    Some(Some("processing")) => Some(TtlTime::Processing),
                    Some(Some("event")) => Some(TtlTime::Event),
                    Some(_) => return Err("time must be \"processing\" or \"event\"".to_string()),
                };
                Ok(TtlOverride::Ttl { ttl, update, time })
            }
            other => Err(format!(
                "expected a duration such as \"1h\", \"off\", or a table {{ ttl = \"1h\", ... }}, not {}",
                other.type_str()
            )),
        }
    }
}

/// Effective limits of one plugin instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub call_timeout: Duration,
    pub max_record_bytes: u64,
    /// State quotas (keyed state checks them: `state::quota`); none:
    /// unlimited.
    pub value_bytes: Option<u64>,
    pub state_bytes: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 256 << 20,
            call_timeout: Duration::from_secs(5),
            max_record_bytes: 16 << 20,
            value_bytes: None,
            state_bytes: None,
        }
    }
}

impl Limits {
    pub(super) fn overlay(self, settings: &LimitSettings) -> Self {
        Self {
            memory_bytes: settings.memory.map_or(self.memory_bytes, |b| b.0),
            call_timeout: settings.call_timeout.unwrap_or(self.call_timeout),
            max_record_bytes: settings
                .max_record_size
                .map_or(self.max_record_bytes, |b| b.0),
            value_bytes: settings.value_bytes.map(|b| b.0).or(self.value_bytes),
            state_bytes: settings.state_bytes.map(|b| b.0).or(self.state_bytes),
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

    /// Makes this graph run only subtask `task` of each node: task
    /// `task` of a stage (design: "Beyond one machine"), owning the key
    /// groups subtask `task` owns. Only a graph whose nodes share one
    /// parallelism and are joined by `forward` edges alone can be run so
    /// (subtask *i* then reads from subtask *i* only): a stage's.
    pub fn set_task(&mut self, task: u32) -> Result<(), String> {
        let cut: Vec<String> = self
            .edges
            .iter()
            .filter(|e| e.partition != Partition::Forward)
            .map(|e| format!("{} → {}", self.nodes[e.from].uid, self.nodes[e.to].uid))
            .collect();
        if !cut.is_empty() {
            return Err(format!(
                "task {task}: only a job whose edges are all `forward` runs as tasks, and {} is not",
                cut.join(", ")
            ));
        }
        let parallelism: std::collections::BTreeSet<u32> =
            self.nodes.iter().map(|n| n.parallelism).collect();
        match parallelism.iter().collect::<Vec<_>>()[..] {
            [&p] if task < p => {
                self.task = Some(task);
                Ok(())
            }
            [&p] => Err(format!(
                "task {task}: the job's nodes run {p} subtasks (tasks 0 to {})",
                p - 1
            )),
            _ => Err(format!(
                "task {task}: the job's nodes run at parallelism {}, not one",
                parallelism
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// Whether this run runs subtask `subtask` (see [`JobGraph::task`]).
    pub fn runs(&self, subtask: u32) -> bool {
        self.task.is_none_or(|task| task == subtask)
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
}
