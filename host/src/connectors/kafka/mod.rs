//! The `kafka` source and sink, speaking the Kafka protocol themselves
//! (`kafka-protocol`'s codecs, [`client`]): any broker of the standard
//! protocol (Apache Kafka, Redpanda, …; the tests run noida-db).
//!
//! **Source** ([`source`]). The partitions of the source's topics are
//! assigned by the job, not by a consumer group: partition p of topic t is
//! read by subtask `(hash(t) + p) % parallelism` (Flink's rule, stable when
//! partitions are added). Each subtask fetches from the partitions' leaders
//! and records, per partition, the next offset to read
//! ([`Source::partitions`](crate::dataflow::Source::partitions), keyed by
//! [`partition_key`]); a restore merges every stored subtask's positions, so
//! it may change the parallelism, and a partition added since starts at its
//! earliest offset. `read_committed` (the default) skips aborted
//! transactions and control records.
//!
//! **Sink, exactly-once** ([`sink`]): one Kafka transaction per subtask per
//! checkpoint epoch, flushed (every produce acknowledged) at the barrier and
//! recorded in the checkpoint as pre-committed (its transactional id,
//! producer id and epoch), committed with `EndTxn` when the checkpoint
//! completes. Transactional ids are `<prefix>-<subtask>-<slot>`, a
//! transaction taking the lowest slot no pre-committed one holds, each with
//! a fresh epoch (InitProducerId), so the recorded triple names one
//! transaction. A restored subtask first commits what its restore point
//! recorded, then fences (InitProducerId) the slots of the subtasks it
//! takes over (at least [`sink::POOL`], more if it recorded higher ones),
//! then any other transaction of theirs the brokers list as open
//! (ListTransactions): the broker aborts what they had open at once, so
//! nothing relies on the broker timing transactions out.
//! **At-least-once** produces as records arrive and waits for the
//! acknowledgements at each barrier.

pub mod client;
pub mod producer;
pub mod sink;
pub mod source;

use crate::job::{JobGraph, NodeKind, SinkKind, SourceKind};
use client::{Cluster, KafkaError};

pub use crate::job::connectors::kafka_topic_hash as topic_hash;

/// The key of partition `partition` of the topic hashed `hash` in a
/// checkpoint's partition map: `hash << 16 | partition`. None for
/// partitions beyond 65535.
pub fn partition_key(hash: u16, partition: i32) -> Option<u32> {
    let partition = u16::try_from(partition).ok()?;
    Some(u32::from(hash) << 16 | u32::from(partition))
}

/// The source subtask (of `parallelism`) that reads the partition keyed
/// `key`.
pub fn subtask_of(key: u32, parallelism: u32) -> u32 {
    ((key >> 16) + (key & 0xFFFF)) % parallelism.max(1)
}

pub(crate) fn describe(bootstrap: &str, error: KafkaError) -> String {
    match error {
        KafkaError::Connection { .. } => error.to_string(),
        KafkaError::Broker { .. } => format!("Kafka at {bootstrap}: {error}"),
    }
}

/// Checks every `kafka` connector of `graph` before anything starts: the
/// bootstrap broker answers, the topics exist, a source has a partition
/// for each subtask, a sink's fixed partition exists. Returns every
/// problem, each naming the connector's uid.
pub async fn check(graph: &JobGraph) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    for node in &graph.nodes {
        let uid = &node.uid;
        let (role, bootstrap, topics) = match &node.kind {
            NodeKind::Source(source) => match &source.kind {
                SourceKind::Kafka(kafka) => ("source", &kafka.bootstrap, kafka.topics.clone()),
                _ => continue,
            },
            NodeKind::Sink(SinkKind::Kafka(kafka)) => {
                ("sink", &kafka.bootstrap, vec![kafka.topic.clone()])
            }
            _ => continue,
        };
        let found = async {
            let mut cluster = Cluster::connect(bootstrap)
                .await
                .map_err(|e| vec![describe(bootstrap, e)])?;
            cluster
                .topics(&topics)
                .await
                .map_err(|e| vec![describe(bootstrap, e)])
        };
        let topics = match found.await {
            Ok(topics) => topics,
            Err(found) => {
                problems.extend(found.into_iter().map(|p| format!("{role} `{uid}`: {p}")));
                continue;
            }
        };
        let (mut total, mut missing) = (0usize, false);
        for (topic, partitions) in &topics {
            match partitions {
                Ok(partitions) => total += partitions.len(),
                Err(code) => {
                    missing = true;
                    problems.push(format!(
                        "{role} `{uid}`: {}",
                        source::missing_topic(bootstrap, topic, *code)
                    ));
                }
            }
        }
        if role == "source" && !missing && total < node.parallelism as usize {
            problems.push(format!(
                "source `{uid}`: parallelism = {} exceeds the {total} partitions of its topics (a subtask reads whole partitions)",
                node.parallelism
            ));
        }
        if let NodeKind::Sink(SinkKind::Kafka(kafka)) = &node.kind
            && let (Some(fixed), Some((_, Ok(partitions)))) = (kafka.partition, topics.first())
            && !partitions.iter().any(|p| p.index == fixed)
        {
            problems.push(format!(
                "sink `{uid}`: topic `{}` has no partition {fixed} ({} partitions)",
                kafka.topic,
                partitions.len()
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_spread_over_subtasks_and_keys_keep_topic_and_partition() {
        let hash = topic_hash("words");
        let key = partition_key(hash, 5).expect("small partition");
        assert_eq!((key >> 16) as u16, hash);
        assert_eq!(key & 0xFFFF, 5);
        assert_eq!(partition_key(hash, 70_000), None);
        // Six partitions over three subtasks: two each.
        let mut per = [0; 3];
        for p in 0..6 {
            per[subtask_of(partition_key(hash, p).expect("small"), 3) as usize] += 1;
        }
        assert_eq!(per, [2, 2, 2]);
    }
}
