//! What the API shows of a job beyond its record: the plugin versions its
//! operators run, and the live view of its current run (operators with
//! their counters and state sizes, recent checkpoints).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use super::HostContext;
use super::jobs::JobHandle;
use super::record::*;
use crate::dataflow::metrics::SubtaskMetrics;
use crate::job::NodeKind;

/// uid → plugin (name@version and digest) a spec runs.
pub(super) fn plugin_versions(
    ctx: &HostContext,
    spec: &JobSpec,
) -> BTreeMap<String, PluginVersion> {
    let Ok(file) = crate::job::JobFile::parse(&spec.job_file, &spec.base_dir.join(&spec.file_name))
    else {
        return BTreeMap::new();
    };
    let names: HashMap<String, String> = ctx
        .store
        .list()
        .into_iter()
        .map(|p| (p.digest.clone(), p.reference()))
        .collect();
    file.operators
        .iter()
        .filter_map(|op| {
            let digest = spec
                .overrides
                .get(&op.uid)
                .or_else(|| spec.resolved.get(&op.plugin))?
                .clone();
            let plugin = names
                .get(&digest)
                .cloned()
                .unwrap_or_else(|| format!("sha256:{}", &digest[..12.min(digest.len())]));
            Some((op.uid.clone(), PluginVersion { plugin, digest }))
        })
        .collect()
}

/// The record plus the live view of the current run.
/// A time counter (ns) summed over subtasks, in milliseconds.
fn total_ms(subtasks: &[SubtaskMetrics], counter: impl Fn(&SubtaskMetrics) -> &AtomicU64) -> f64 {
    subtasks
        .iter()
        .map(|s| counter(s).load(Ordering::Relaxed) as f64 / 1e6)
        .sum()
}

pub(super) fn detail(ctx: &HostContext, handle: &JobHandle) -> JobDetail {
    let record = handle.record();
    let versions = plugin_versions(ctx, &record.spec);
    let live = handle.live.lock().expect("not poisoned");
    // Key counts: from the newest restore point that has them (savepoints
    // count; incremental checkpoints do not scan the state).
    let counts = |read: &crate::checkpoint::metadata::ReadMetadata| {
        read.metadata
            .operators
            .values()
            .flat_map(|op| &op.subtasks)
            .any(|s| !s.state_stats.is_empty())
    };
    let latest =
        live.as_ref()
            .and_then(|l| l.checkpoints.as_ref())
            .and_then(|c| c.latest())
            .filter(counts)
            .or_else(|| {
                record.savepoints.last().and_then(|s| {
                    crate::checkpoint::metadata::read(std::path::Path::new(&s.path)).ok()
                })
            });
    let mut operators = Vec::new();
    if let Some(live) = live.as_ref() {
        for (node_id, (node, metrics)) in live.graph.nodes.iter().zip(&live.metrics).enumerate() {
            let role = match node.kind {
                NodeKind::Source(_) => "source",
                NodeKind::Operator(_) => "operator",
                NodeKind::Sink(_) => "sink",
            };
            let mut state_keys = BTreeMap::new();
            for subtask in &metrics.subtasks {
                for table in subtask.state.lock().expect("not poisoned").iter() {
                    let name = table.table.rsplit('/').next().unwrap_or(&table.table);
                    *state_keys.entry(name.to_string()).or_insert(0) += table.keys;
                }
            }
            if state_keys.is_empty()
                && let Some(op) = latest
                    .as_ref()
                    .and_then(|l| l.metadata.operators.get(&node.uid))
            {
                for subtask in &op.subtasks {
                    for stats in &subtask.state_stats {
                        *state_keys.entry(stats.name.clone()).or_insert(0) += stats.keys;
                    }
                }
            }
            operators.push(OperatorView {
                uid: node.uid.clone(),
                role: role.to_string(),
                plugin: versions.get(&node.uid).cloned(),
                parallelism: node.parallelism,
                inputs: live
                    .graph
                    .edges
                    .iter()
                    .filter(|e| e.to == node_id)
                    .map(|e| live.graph.nodes[e.from].uid.clone())
                    .collect(),
                records_in: metrics.records_in(),
                records_out: metrics.records_out(),
                busy_ms: total_ms(&metrics.subtasks, |s| &s.busy_ns),
                idle_ms: total_ms(&metrics.subtasks, |s| &s.idle_ns),
                backpressured_ms: total_ms(&metrics.subtasks, |s| &s.backpressured_ns),
                state_keys,
            });
        }
    }
    let metrics = live.as_ref().and_then(|l| l.checkpoint_metrics.clone());
    JobDetail {
        job: record,
        operators,
        checkpoints_completed: metrics
            .as_ref()
            .map_or(0, |m| m.completed.load(Ordering::Relaxed)),
        checkpoints_failed: metrics
            .as_ref()
            .map_or(0, |m| m.failed.load(Ordering::Relaxed)),
        checkpoints: metrics
            .map(|m| {
                m.recent()
                    .into_iter()
                    .map(|c| CheckpointView {
                        id: c.id,
                        completed_ms: c.completed_ms,
                        duration_ms: c.duration.as_secs_f64() * 1000.0,
                        alignment_ms: c.alignment.as_secs_f64() * 1000.0,
                        bytes: c.bytes,
                        new_bytes: c.new_bytes,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        stages: Vec::new(),
    }
}
