//! Cutting a job into **stages** (design: "Beyond one machine"): a
//! cluster job runs as stages joined by exchanges, so that each stage can
//! run, fail and move on its own host.
//!
//! A stage is a set of nodes joined by `forward` edges (chains and every
//! other forward edge stay inside one stage, on the single-host engine);
//! each `key` or `rebalance` edge between two stages becomes an
//! **exchange** (see `connectors::exchange`): in the upstream stage an
//! `exchange` sink reading what the edge read, in the downstream stage an
//! `exchange` source in the edge's place (uid `<to>.input-<n>`: the edge
//! is input `n` of node `to`; its sink is `<to>.input-<n>.out`), the
//! exchange named `<job id>.<to>-<n>`. Each stage is a job file of its own, written from
//! the original's TOML (every key of every node kept as written), named
//! `<name>/<stage>` after its first node in topological order.

use std::collections::BTreeMap;
use std::path::Path;

use super::{JobError, JobGraph, Partition};

/// One stage of a cut job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The uid of its first node (topological order).
    pub name: String,
    /// The original job's nodes it runs.
    pub uids: Vec<String>,
    /// The exchanges' sources and sinks its job file adds.
    pub exchanges: Vec<String>,
    /// Its job file (TOML).
    pub job_file: String,
}

/// An edge cut between stages, as the stages' files name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutEdge {
    pub from: String,
    pub to: String,
    /// The uid of the exchange's source (downstream); its sink's is
    /// `<uid>.out`.
    pub uid: String,
    /// The exchange's name.
    pub exchange: String,
}

/// The uid of the exchange that carries input `input` of node `to`.
pub fn exchange_uid(to: &str, input: u32) -> String {
    format!("{to}.input-{input}")
}

/// The uid of the sink that publishes into exchange `uid`.
fn sink_uid(uid: &str) -> String {
    format!("{uid}.out")
}

/// Job `job_id`'s edges that `cut` cuts, with the uids and exchanges that
/// replace them.
pub fn cut_edges(graph: &JobGraph, job_id: &str) -> Vec<CutEdge> {
    graph
        .edges
        .iter()
        .filter(|e| e.partition != Partition::Forward)
        .map(|e| {
            let to = &graph.nodes[e.to].uid;
            CutEdge {
                from: graph.nodes[e.from].uid.clone(),
                to: to.clone(),
                uid: exchange_uid(to, e.input_index),
                exchange: format!("{job_id}.{}-{}", to.replace('.', "_"), e.input_index),
            }
        })
        .collect()
}

/// Cuts job `graph` (validated from `text`, the job file at `path`) into
/// stages whose exchanges are on the NATS servers `url` (their streams
/// keeping `replicas` copies) and named after `job_id`. A job without a `key` or `rebalance` edge is one stage: the
/// answer is empty, and the job runs whole.
pub fn cut(
    text: &str,
    path: &Path,
    graph: &JobGraph,
    job_id: &str,
    url: &str,
    replicas: usize,
) -> Result<Vec<Stage>, JobError> {
    let invalid = |problems: Vec<String>| JobError::Invalid {
        file: path.to_path_buf(),
        problems,
    };
    let edges = cut_edges(graph, job_id);
    if edges.is_empty() {
        return Ok(Vec::new());
    }
    if graph.checkpoint.interval.is_none() {
        let names: Vec<String> = edges
            .iter()
            .map(|e| format!("{} → {}", e.from, e.to))
            .collect();
        return Err(invalid(vec![format!(
            "a cluster job runs as stages joined by exchanges at its key and rebalance edges ({}), and an exchange publishes each checkpoint's records once it completed: set `[checkpoint] interval`",
            names.join(", ")
        )]));
    }

    // Stages: the nodes joined by forward edges (union-find).
    let mut parent: Vec<usize> = (0..graph.nodes.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for edge in graph
        .edges
        .iter()
        .filter(|e| e.partition == Partition::Forward)
    {
        let (a, b) = (root(&mut parent, edge.from), root(&mut parent, edge.to));
        parent[a.max(b)] = a.min(b);
    }
    // Nodes are in topological order: a stage is named after, and ordered
    // by, its first node.
    let mut heads: Vec<usize> = Vec::new();
    let stage_of: Vec<usize> = (0..graph.nodes.len())
        .map(|node| {
            let head = root(&mut parent, node);
            heads.iter().position(|h| *h == head).unwrap_or_else(|| {
                heads.push(head);
                heads.len() - 1
            })
        })
        .collect();

    let uids: Vec<&str> = graph.nodes.iter().map(|n| n.uid.as_str()).collect();
    let clashes: Vec<String> = edges
        .iter()
        .filter(|e| uids.contains(&e.uid.as_str()) || uids.contains(&sink_uid(&e.uid).as_str()))
        .map(|e| {
            format!(
                "uid `{}` or `{}` names the exchange that carries `{}` → `{}` between the job's stages: rename it",
                e.uid, sink_uid(&e.uid), e.from, e.to
            )
        })
        .collect();
    if !clashes.is_empty() {
        return Err(invalid(clashes));
    }

    let document: toml::Table = text.parse().map_err(|e: toml::de::Error| JobError::Parse {
        file: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let tables = |key: &str| -> Vec<toml::Table> {
        document
            .get(key)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_table().cloned()).collect())
            .unwrap_or_default()
    };
    let uid_of = |t: &toml::Table| t.get("uid").and_then(|v| v.as_str()).map(str::to_string);
    let index: BTreeMap<&str, usize> = uids.iter().enumerate().map(|(i, u)| (*u, i)).collect();
    let stage_of_uid = |uid: &str| index.get(uid).map(|&i| stage_of[i]);

    let mut stages = Vec::new();
    for (k, &head) in heads.iter().enumerate() {
        let mut file = document.clone();
        let name = document
            .get("name")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        file.insert(
            "name".into(),
            format!("{name}/{}", graph.nodes[head].uid).into(),
        );
        let mut sections: BTreeMap<&str, Vec<toml::Value>> = BTreeMap::new();
        for key in ["source", "operator", "sink"] {
            let mut kept = Vec::new();
            for mut table in tables(key) {
                let Some(uid) = uid_of(&table) else { continue };
                if stage_of_uid(&uid) != Some(k) {
                    continue;
                }
                // Inputs that come through an exchange read its source.
                if let Some(node) = index.get(uid.as_str()).map(|&i| &graph.nodes[i])
                    && let Some(inputs) = table.get_mut("inputs").and_then(|v| v.as_array_mut())
                {
                    for &edge_id in &node.inputs {
                        let edge = &graph.edges[edge_id];
                        if edge.partition == Partition::Forward {
                            continue;
                        }
                        let mut input = toml::Table::new();
                        input.insert("from".into(), exchange_uid(&uid, edge.input_index).into());
                        input.insert("partition".into(), "forward".into());
                        inputs[edge.input_index as usize] = input.into();
                    }
                }
                kept.push(toml::Value::Table(table));
            }
            sections.insert(key, kept);
        }
        let mut exchanges = Vec::new();
        for (edge, cut) in graph
            .edges
            .iter()
            .filter(|e| e.partition != Partition::Forward)
            .zip(&edges)
        {
            let exchange = |uid: String, parallelism: u32| {
                let mut table = toml::Table::new();
                table.insert("uid".into(), uid.into());
                table.insert("kind".into(), "exchange".into());
                table.insert("url".into(), url.into());
                table.insert("exchange".into(), cut.exchange.clone().into());
                table.insert("parallelism".into(), i64::from(parallelism).into());
                table.insert("replicas".into(), (replicas as i64).into());
                table
            };
            if stage_of[edge.from] == k {
                exchanges.push(sink_uid(&cut.uid));
                let mut sink = exchange(sink_uid(&cut.uid), graph.nodes[edge.from].parallelism);
                let mut input = toml::Table::new();
                input.insert("from".into(), cut.from.clone().into());
                if let Some(side) = &edge.side_output {
                    input.insert("side_output".into(), side.clone().into());
                }
                input.insert("partition".into(), "forward".into());
                sink.insert(
                    "inputs".into(),
                    toml::Value::Array(vec![toml::Value::Table(input)]),
                );
                sections
                    .get_mut("sink")
                    .expect("inserted")
                    .push(toml::Value::Table(sink));
            }
            if stage_of[edge.to] == k {
                exchanges.push(cut.uid.clone());
                let source = exchange(cut.uid.clone(), graph.nodes[edge.to].parallelism);
                sections
                    .get_mut("source")
                    .expect("inserted")
                    .push(toml::Value::Table(source));
            }
        }
        for (key, values) in sections {
            if values.is_empty() {
                file.remove(key);
            } else {
                file.insert(key.into(), toml::Value::Array(values));
            }
        }
        let mut members: Vec<String> = (0..graph.nodes.len())
            .filter(|&i| stage_of[i] == k)
            .map(|i| graph.nodes[i].uid.clone())
            .collect();
        members.sort_by_key(|uid| index[uid.as_str()]);
        stages.push(Stage {
            name: graph.nodes[head].uid.clone(),
            uids: members,
            exchanges,
            job_file: toml::to_string(&file).map_err(|e| JobError::Parse {
                file: path.to_path_buf(),
                message: format!("cannot write a stage's job file: {e}"),
            })?,
        });
    }
    Ok(stages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobFile, NodeKind};

    fn graph(text: &str, dir: &Path) -> JobGraph {
        std::fs::write(dir.join("p.wasm"), b"").expect("write");
        let path = dir.join("job.toml");
        let file = JobFile::parse(text, &path).expect("parses");
        JobGraph::validate(file, &path).expect("valid")
    }

    const WORDCOUNT: &str = r#"
name = "wc"
max_parallelism = 32
[checkpoint]
interval = "1s"
[[source]]
uid = "lines"
kind = "generator"
count = 100
parallelism = 2
[[operator]]
uid = "split"
plugin = "p.wasm"
inputs = ["lines"]
parallelism = 2
config = { lower = true }
[[operator]]
uid = "count"
plugin = "p.wasm"
inputs = [{ from = "split", partition = "key" }]
parallelism = 3
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["count"]
parallelism = 3
"#;

    #[test]
    fn a_keyed_edge_cuts_a_job_into_two_stages_joined_by_an_exchange() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job.toml");
        let g = graph(WORDCOUNT, dir.path());
        let stages = cut(WORDCOUNT, &path, &g, "j1", "nats://127.0.0.1:4222", 3).expect("cuts");
        assert_eq!(stages.len(), 2);
        assert_eq!(stages[0].name, "lines");
        assert_eq!(stages[0].uids, ["lines", "split"]);
        assert_eq!(stages[1].name, "count");
        assert_eq!(stages[1].uids, ["count", "out"]);
        assert_eq!(stages[0].exchanges, ["count.input-0.out"]);
        assert_eq!(stages[1].exchanges, ["count.input-0"]);

        // Each stage is a valid job of its own: the upstream ends in the
        // exchange, the downstream starts from it, at the edge's
        // parallelisms; every other key is kept.
        let up = graph(&stages[0].job_file, dir.path());
        assert_eq!(up.name, "wc/lines");
        assert_eq!(up.max_parallelism, 32);
        let sink = up.node("count.input-0.out").expect("the exchange's sink");
        assert_eq!(sink.parallelism, 2);
        assert!(matches!(
            &sink.kind,
            NodeKind::Sink(crate::job::SinkKind::Exchange(e)) if e.name == "j1.count-0" && e.url == "nats://127.0.0.1:4222" && e.replicas == 3
        ));
        assert!(stages[0].job_file.contains("lower = true"));
        let down = graph(&stages[1].job_file, dir.path());
        let source = down.node("count.input-0").expect("the exchange's source");
        assert_eq!(source.parallelism, 3);
        let count = down.node("count").expect("count");
        assert_eq!(down.edges[count.inputs[0]].partition, Partition::Forward);
        assert!(down.edges.iter().all(|e| e.partition == Partition::Forward));
        assert!(up.edges.iter().all(|e| e.partition == Partition::Forward));
    }

    #[test]
    fn a_job_without_key_or_rebalance_edges_is_not_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = WORDCOUNT
            .replace("{ from = \"split\", partition = \"key\" }", "\"split\"")
            .replace("parallelism = 3", "parallelism = 2");
        let g = graph(&text, dir.path());
        let stages = cut(
            &text,
            &dir.path().join("job.toml"),
            &g,
            "j",
            "nats://x:1",
            1,
        )
        .expect("ok");
        assert!(stages.is_empty());
    }

    #[test]
    fn side_outputs_and_second_inputs_cross_in_their_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = r#"
name = "join"
[checkpoint]
interval = "1s"
[[source]]
uid = "a"
kind = "generator"
[[source]]
uid = "b"
kind = "generator"
[[operator]]
uid = "parse"
plugin = "p.wasm"
inputs = ["a"]
[[operator]]
uid = "join"
plugin = "p.wasm"
inputs = ["parse", { from = "b", partition = "key" }, { from = "parse", side_output = "late", partition = "rebalance" }]
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["join"]
"#;
        let g = graph(text, dir.path());
        let stages = cut(text, &dir.path().join("job.toml"), &g, "j", "nats://x:1", 1).expect("ok");
        let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b"], "{stages:#?}");
        assert_eq!(stages[0].uids, ["a", "parse", "join", "out"]);
        let first = graph(&stages[0].job_file, dir.path());
        let join = first.node("join").expect("join");
        let from: Vec<&str> = join
            .inputs
            .iter()
            .map(|&e| first.nodes[first.edges[e].from].uid.as_str())
            .collect();
        assert_eq!(from, ["parse", "join.input-1", "join.input-2"]);
        // The side output goes into its exchange upstream, in the same stage.
        let late = first.node("join.input-2.out").expect("sink");
        let edge = &first.edges[late.inputs[0]];
        assert_eq!(edge.side_output.as_deref(), Some("late"));
        let second = graph(&stages[1].job_file, dir.path());
        assert!(second.node("join.input-1.out").is_some());
        assert!(second.node("b").is_some());
    }

    #[test]
    fn a_cut_job_without_checkpoints_or_with_a_clashing_uid_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job.toml");
        let text = WORDCOUNT.replace("[checkpoint]\ninterval = \"1s\"", "");
        let g = graph(&text, dir.path());
        let error = cut(&text, &path, &g, "j", "nats://x:1", 1).expect_err("refused");
        assert!(
            error
                .to_string()
                .contains("key and rebalance edges (split → count)")
                && error.to_string().contains("set `[checkpoint] interval`"),
            "{error}"
        );
        let text = WORDCOUNT.replace("uid = \"out\"", "uid = \"count.input-0\"");
        let g = graph(&text, dir.path());
        let error = cut(&text, &path, &g, "j", "nats://x:1", 1).expect_err("refused");
        assert!(
            error
                .to_string()
                .contains("uid `count.input-0` or `count.input-0.out` names the exchange that carries `split` → `count`"),
            "{error}"
        );
    }
}
