//! Validating a job file into a [`JobGraph`]: unique uids, edges that
//! exist and fit, no cycle, parallelism within `max_parallelism`, limits,
//! restart settings and connector settings that make sense; every problem
//! reported at once, each naming the uid and key at fault. Paths resolve
//! against the job file's directory; plugins through a [`PluginResolver`].

use super::connectors::{sink_kind, source_kind};
use super::*;
use crate::types::Location;
use crate::types::key_group::MAX_MAX_PARALLELISM;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(super) fn base_dir(path: &Path) -> PathBuf {
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

pub(super) fn validate_restart(restart: &RestartSettings, problems: &mut Vec<String>) {
    if let Err(found) = crate::job::restart::RestartStrategy::from_settings(restart) {
        problems.extend(found);
    }
}

pub(super) fn check_limits(what: &str, limits: &Limits, problems: &mut Vec<String>) {
    if limits.memory_bytes < (1 << 20) {
        problems.push(format!("{what}: memory must be at least 1MiB"));
    }
    if limits.call_timeout < Duration::from_millis(10) {
        problems.push(format!("{what}: call_timeout must be at least 10ms"));
    }
    if limits.max_record_bytes == 0 {
        problems.push(format!("{what}: max_record_size must be greater than zero"));
    }
    if limits.value_bytes == Some(0) {
        problems.push(format!("{what}: value_bytes must be greater than zero"));
    }
    if let (Some(state), Some(value)) = (limits.state_bytes, limits.value_bytes)
        && state < value
    {
        problems.push(format!(
            "{what}: state_bytes ({}) is smaller than one value (value_bytes = {})",
            crate::human::bytes(state),
            crate::human::bytes(value)
        ));
    }
    if limits.state_bytes == Some(0) {
        problems.push(format!("{what}: state_bytes must be greater than zero"));
    }
}

pub(super) fn check_rate(uid: &str, rate: Option<f64>, problems: &mut Vec<String>) {
    if let Some(rate) = rate
        && !(rate > 0.0 && rate.is_finite())
    {
        problems.push(format!("source `{uid}`: rate must be a positive number"));
    }
}

pub(super) fn topological_order(nodes: &[Node], edges: &[Edge]) -> Vec<NodeId> {
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
pub(super) fn reorder(
    nodes: Vec<Node>,
    mut edges: Vec<Edge>,
    order: &[NodeId],
) -> (Vec<Node>, Vec<Edge>) {
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

impl JobGraph {
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
                && !matches!(
                    kind,
                    SourceKind::Generator { .. }
                        | SourceKind::Nats(_)
                        | SourceKind::Kafka(_)
                        | SourceKind::Exchange(_)
                )
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
            let mut state_ttl = BTreeMap::new();
            for (state, value) in &operator.state_ttl {
                match TtlOverride::parse(value) {
                    Ok(ttl) => {
                        state_ttl.insert(state.clone(), ttl);
                    }
                    Err(problem) => problems.push(format!(
                        "operator `{}` state_ttl `{state}`: {problem}",
                        operator.uid
                    )),
                }
            }
            nodes.push(Node {
                uid: operator.uid.clone(),
                parallelism: operator.parallelism.unwrap_or(job.parallelism),
                kind: NodeKind::Operator(OperatorNode {
                    plugin,
                    config: file::config_json(operator.config.as_ref()),
                    limits,
                    wasi: operator.wasi.clone(),
                    chain: operator.chain,
                    state_ttl,
                }),
                inputs: Vec::new(),
                outputs: Vec::new(),
            });
            raw_inputs.push(operator.inputs.clone());
        }
        // Kafka sinks' transactional id prefixes: two sinks sharing one
        // would fence each other's transactions.
        let mut prefixes: BTreeMap<String, String> = BTreeMap::new();
        for sink in &job.sinks {
            check_uid(&sink.uid, "sink", &mut problems);
            if sink.inputs.is_empty() {
                problems.push(format!("sink `{}`: inputs is empty", sink.uid));
            }
            let kind = sink_kind(sink, &base, &job.name, &mut problems);
            if sink.kind == super::file::SinkKindName::Exchange && job.checkpoint.interval.is_none()
            {
                problems.push(format!(
                    "sink `{}`: an exchange sink needs `[checkpoint] interval` (it publishes each checkpoint's records once it completes)",
                    sink.uid
                ));
            }
            if let Some(SinkKind::Kafka(kafka)) = &kind
                && let Some(other) =
                    prefixes.insert(kafka.transactional_id_prefix.clone(), sink.uid.clone())
            {
                problems.push(format!(
                    "sink `{}`: transactional_id_prefix `{}` is sink `{other}`'s too (their transactions would fence each other)",
                    sink.uid, kafka.transactional_id_prefix
                ));
            }
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
            task: None,
        })
    }
}
