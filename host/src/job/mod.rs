//! Jobs: the job file ([`file`]), its validation into a [`JobGraph`] (unique
//! uids, edges valid, acyclic, parallelism within `max_parallelism`) and the
//! physical channel layout of each edge.
//!
//! Everything here is pure: no wasmtime, no RocksDB, no tokio. Paths are
//! resolved against the job file's directory.

pub mod connectors;
pub mod file;
mod graph;
pub mod restart;
pub mod stages;
mod validate;

pub use graph::{
    Edge, JobGraph, Limits, Node, NodeId, NodeKind, OperatorNode, SourceNode, TtlOverride,
};
pub use validate::{PluginFiles, PluginResolver};

use std::path::PathBuf;

pub use file::{
    BackendKind, CheckpointSettings, Delivery, Exchange, Isolation, JobFile, KafkaSink,
    KafkaSource, KafkaStart, LimitSettings, LineFormat, NatsKey, NatsSink, NatsSource, OnCancel,
    Partition, RestartSettings, SinkKind, SourceKind, StateSettings, WasiGrant, WatermarkSpec,
};

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
    fn kafka_connectors_validate_their_keys() {
        let text = r#"
name = "kafka job"
[[source]]
uid = "in"
kind = "kafka"
bootstrap = "127.0.0.1:9092,127.0.0.1:9093"
topics = ["a", "b"]
start = { timestamp = 1700000000000 }
parallelism = 3
key_header = "Word"
bounded = true
[[sink]]
uid = "out"
kind = "kafka"
bootstrap = "127.0.0.1:9092"
topic = "counts"
inputs = ["in"]
"#;
        let job = validate(text).expect("valid");
        let NodeKind::Source(SourceNode {
            kind: SourceKind::Kafka(source),
            ..
        }) = &job.nodes[0].kind
        else {
            panic!("a kafka source");
        };
        assert_eq!(source.topics, ["a", "b"]);
        assert_eq!(source.start, KafkaStart::Timestamp(1_700_000_000_000));
        assert_eq!(source.isolation, Isolation::ReadCommitted);
        let NodeKind::Sink(SinkKind::Kafka(sink)) = &job.nodes[1].kind else {
            panic!("a kafka sink");
        };
        assert_eq!(sink.delivery, Delivery::ExactlyOnce);
        assert_eq!(sink.transactional_id_prefix, "weir-kafka-job-out");
        let bad = text
            .replace("topics = [\"a\", \"b\"]", "topic = \"a b\"\nurl = \"x\"")
            .replace("start = { timestamp = 1700000000000 }", "start = \"soon\"")
            .replace(
                "bootstrap = \"127.0.0.1:9092\"\ntopic",
                "bootstrap = \"broker\"\ntopic",
            );
        let error = validate(&bad).expect_err("invalid").to_string();
        for wanted in [
            "source `in`: key `url` does not apply",
            "source `in`: topic \"a b\" is not a Kafka topic name",
            "source `in`: start = \"soon\": use \"earliest\"",
            "sink `out`: bootstrap \"broker\": each broker is host:port",
        ] {
            assert!(error.contains(wanted), "`{wanted}` in {error}");
        }
        let twice = format!(
            "{text}[[sink]]\nuid = \"copy\"\nkind = \"kafka\"\nbootstrap = \"h:1\"\ntopic = \"t\"\ntransactional_id_prefix = \"weir-kafka-job-out\"\ninputs = [\"in\"]\n"
        );
        let error = validate(&twice).expect_err("invalid").to_string();
        assert!(
            error.contains(
                "sink `copy`: transactional_id_prefix `weir-kafka-job-out` is sink `out`'s too"
            ),
            "{error}"
        );
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
