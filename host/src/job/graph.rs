//! The validated job: its nodes (sources, operators with their plugin and
//! limits, sinks), the edges between them and each edge's channel layout,
//! and the chains of operators that run in one task.

use super::validate::base_dir;
use super::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
