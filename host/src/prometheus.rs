//! The Prometheus (OpenMetrics text) exposition of what a running job and
//! the running host count: served at `/metrics` by `weir serve` and by
//! `weir run --metrics ADDR:PORT`. Each scrape encodes a fresh registry
//! from the live counters ([`crate::dataflow::metrics`], the coordinator's
//! [`CheckpointMetrics`], [`JobMetrics`]); nothing here is on the record
//! path.
//!
//! Labels: `job` (the host's job id, or the job's name in an embedded
//! run), `operator` (uid), `subtask`, and `state`, `kind`, `phase`,
//! `status` where a metric needs them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::checkpoint::coordinator::CheckpointMetrics;
use crate::dataflow::metrics::{JobMetrics, NodeMetrics, SubtaskMetrics};

/// The content type of [`encode_samples`]' output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What one job shows.
pub struct JobSample<'a> {
    /// The `job` label.
    pub job: &'a str,
    /// The running attempt's nodes (empty between attempts).
    pub nodes: &'a [Arc<NodeMetrics>],
    pub checkpoints: Option<&'a CheckpointMetrics>,
    pub metrics: &'a JobMetrics,
    /// Upgrades that passed their probation, and those rolled back (the
    /// running host's).
    pub upgrades: u64,
    pub rollbacks: u64,
}

/// What the running host shows about itself.
pub struct HostSample {
    /// Jobs by status (`running`, `failed`, …).
    pub jobs: BTreeMap<String, u64>,
    /// Plugins (name@version) in the store.
    pub plugins: u64,
}

type Labels = Vec<(&'static str, String)>;
type FloatCounter = Counter<f64, AtomicU64>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// The metric families, registered once per scrape.
struct Families {
    records_in: Family<Labels, Counter>,
    records_out: Family<Labels, Counter>,
    bytes_in: Family<Labels, Counter>,
    bytes_out: Family<Labels, Counter>,
    busy: Family<Labels, FloatCounter>,
    idle: Family<Labels, FloatCounter>,
    backpressured: Family<Labels, FloatCounter>,
    plugin_time: Family<Labels, FloatCounter>,
    watermark: Family<Labels, Gauge>,
    watermark_lag: Family<Labels, FloatGauge>,
    state_keys: Family<Labels, Gauge>,
    state_bytes: Family<Labels, Gauge>,
    cache_hits: Family<Labels, Counter>,
    cache_misses: Family<Labels, Counter>,
    checkpoints_completed: Family<Labels, Counter>,
    checkpoints_failed: Family<Labels, Counter>,
    checkpoints_aborted: Family<Labels, Counter>,
    checkpoint_duration: Family<Labels, FloatGauge>,
    checkpoint_size: Family<Labels, Gauge>,
    checkpoint_incremental_size: Family<Labels, Gauge>,
    checkpoint_age: Family<Labels, FloatGauge>,
    restarts: Family<Labels, Counter>,
    failures: Family<Labels, Counter>,
    upgrades: Family<Labels, Counter>,
    rollbacks: Family<Labels, Counter>,
    jobs: Family<Labels, Gauge>,
    plugins: Gauge,
}

impl Families {
    fn register(registry: &mut Registry) -> Self {
        let families = Self {
            records_in: Family::default(),
            records_out: Family::default(),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            busy: Family::default(),
            idle: Family::default(),
            backpressured: Family::default(),
            plugin_time: Family::default(),
            watermark: Family::default(),
            watermark_lag: Family::default(),
            state_keys: Family::default(),
            state_bytes: Family::default(),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            checkpoints_completed: Family::default(),
            checkpoints_failed: Family::default(),
            checkpoints_aborted: Family::default(),
            checkpoint_duration: Family::default(),
            checkpoint_size: Family::default(),
            checkpoint_incremental_size: Family::default(),
            checkpoint_age: Family::default(),
            restarts: Family::default(),
            failures: Family::default(),
            upgrades: Family::default(),
            rollbacks: Family::default(),
            jobs: Family::default(),
            plugins: Gauge::default(),
        };
        let f = &families;
        let r = registry;
        r.register(
            "weir_records_in",
            "Records a subtask took in",
            f.records_in.clone(),
        );
        r.register(
            "weir_records_out",
            "Records a subtask emitted",
            f.records_out.clone(),
        );
        r.register(
            "weir_bytes_in",
            "Bytes of key and value a subtask took in",
            f.bytes_in.clone(),
        );
        r.register(
            "weir_bytes_out",
            "Bytes of key and value a subtask emitted",
            f.bytes_out.clone(),
        );
        r.register(
            "weir_busy_seconds",
            "Time a subtask spent processing (rate: busy time per second)",
            f.busy.clone(),
        );
        r.register(
            "weir_idle_seconds",
            "Time a subtask waited for input",
            f.idle.clone(),
        );
        r.register(
            "weir_backpressured_seconds",
            "Time a subtask waited for room downstream",
            f.backpressured.clone(),
        );
        r.register(
            "weir_plugin_call_seconds",
            "Time inside the operator's plugin calls",
            f.plugin_time.clone(),
        );
        r.register(
            "weir_watermark_milliseconds",
            "A subtask's current event-time watermark",
            f.watermark.clone(),
        );
        r.register(
            "weir_watermark_lag_seconds",
            "Wall-clock time minus the watermark",
            f.watermark_lag.clone(),
        );
        r.register(
            "weir_state_keys",
            "Keys with state per table in the backend (estimate, as of the latest barrier)",
            f.state_keys.clone(),
        );
        r.register(
            "weir_state_bytes",
            "Bytes per table in the backend (estimate, as of the latest barrier)",
            f.state_bytes.clone(),
        );
        r.register(
            "weir_state_cache_hits",
            "Keyed-state lookups the cache answered",
            f.cache_hits.clone(),
        );
        r.register(
            "weir_state_cache_misses",
            "Keyed-state lookups that went to the backend",
            f.cache_misses.clone(),
        );
        r.register(
            "weir_checkpoints_completed",
            "Completed checkpoints",
            f.checkpoints_completed.clone(),
        );
        r.register(
            "weir_checkpoints_failed",
            "Failed checkpoints (declined, timed out)",
            f.checkpoints_failed.clone(),
        );
        r.register(
            "weir_checkpoints_aborted",
            "Checkpoints given up because the sources ended",
            f.checkpoints_aborted.clone(),
        );
        r.register(
            "weir_checkpoint_last_duration_seconds",
            "The newest completed checkpoint's duration: total, alignment, sync, async",
            f.checkpoint_duration.clone(),
        );
        r.register(
            "weir_checkpoint_last_size_bytes",
            "Bytes the newest completed checkpoint references",
            f.checkpoint_size.clone(),
        );
        r.register(
            "weir_checkpoint_last_incremental_size_bytes",
            "Bytes written for the newest completed checkpoint",
            f.checkpoint_incremental_size.clone(),
        );
        r.register(
            "weir_checkpoint_last_completed_age_seconds",
            "Time since the newest checkpoint completed",
            f.checkpoint_age.clone(),
        );
        r.register(
            "weir_restarts",
            "Restarts of a job after a failure",
            f.restarts.clone(),
        );
        r.register(
            "weir_failures",
            "Failed attempts by failing operator and kind (error, trap, timeout, memory, ...)",
            f.failures.clone(),
        );
        r.register(
            "weir_upgrades",
            "Upgrades that passed their probation",
            f.upgrades.clone(),
        );
        r.register(
            "weir_rollbacks",
            "Upgrades rolled back",
            f.rollbacks.clone(),
        );
        r.register("weir_jobs", "Jobs of the host by status", f.jobs.clone());
        r.register(
            "weir_plugins",
            "Plugins (name@version) in the host's store",
            f.plugins.clone(),
        );
        families
    }

    fn subtask(&self, labels: &Labels, subtask: &SubtaskMetrics, now_ms: i64) {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let seconds = |counter: &AtomicU64| load(counter) as f64 / 1e9;
        self.records_in
            .get_or_create(labels)
            .inc_by(load(&subtask.records_in));
        self.records_out
            .get_or_create(labels)
            .inc_by(load(&subtask.records_out));
        self.bytes_in
            .get_or_create(labels)
            .inc_by(load(&subtask.bytes_in));
        self.bytes_out
            .get_or_create(labels)
            .inc_by(load(&subtask.bytes_out));
        self.busy
            .get_or_create(labels)
            .inc_by(seconds(&subtask.busy_ns));
        self.idle
            .get_or_create(labels)
            .inc_by(seconds(&subtask.idle_ns));
        self.backpressured
            .get_or_create(labels)
            .inc_by(seconds(&subtask.backpressured_ns));
        self.plugin_time
            .get_or_create(labels)
            .inc_by(seconds(&subtask.plugin_ns));
        if let Some(watermark) = subtask.watermark() {
            self.watermark.get_or_create(labels).set(watermark);
            let lag = now_ms.saturating_sub(watermark) as f64 / 1e3;
            self.watermark_lag.get_or_create(labels).set(lag.max(0.0));
        }
        let (hits, misses) = (load(&subtask.cache_hits), load(&subtask.cache_misses));
        if hits + misses > 0 {
            self.cache_hits.get_or_create(labels).inc_by(hits);
            self.cache_misses.get_or_create(labels).inc_by(misses);
        }
        let tables = subtask.state.lock().unwrap_or_else(|p| p.into_inner());
        for table in tables.iter() {
            let state = table.table.rsplit('/').next().unwrap_or(&table.table);
            let mut labels = labels.clone();
            labels.push(("state", state.to_string()));
            self.state_keys
                .get_or_create(&labels)
                .set(clamp(table.keys));
            self.state_bytes
                .get_or_create(&labels)
                .set(clamp(table.bytes));
        }
    }

    fn job(&self, job: &JobSample<'_>, now_ms: i64) {
        let labels: Labels = vec![("job", job.job.to_string())];
        for node in job.nodes {
            for (index, subtask) in node.subtasks.iter().enumerate() {
                let labels: Labels = vec![
                    ("job", job.job.to_string()),
                    ("operator", node.uid.clone()),
                    ("subtask", index.to_string()),
                ];
                self.subtask(&labels, subtask, now_ms);
            }
        }
        if let Some(checkpoints) = job.checkpoints {
            let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
            self.checkpoints_completed
                .get_or_create(&labels)
                .inc_by(load(&checkpoints.completed));
            self.checkpoints_failed
                .get_or_create(&labels)
                .inc_by(load(&checkpoints.failed));
            self.checkpoints_aborted
                .get_or_create(&labels)
                .inc_by(load(&checkpoints.aborted));
            if let Some(last) = checkpoints.recent().last() {
                for (phase, duration) in [
                    ("total", last.duration),
                    ("alignment", last.alignment),
                    ("sync", last.sync),
                    ("async", last.asynchronous),
                ] {
                    let mut labels = labels.clone();
                    labels.push(("phase", phase.to_string()));
                    self.checkpoint_duration
                        .get_or_create(&labels)
                        .set(duration.as_secs_f64());
                }
                self.checkpoint_size
                    .get_or_create(&labels)
                    .set(clamp(last.bytes));
                self.checkpoint_incremental_size
                    .get_or_create(&labels)
                    .set(clamp(last.new_bytes));
                let age = now_ms.saturating_sub(last.completed_ms as i64) as f64 / 1e3;
                self.checkpoint_age.get_or_create(&labels).set(age.max(0.0));
            }
        }
        self.restarts
            .get_or_create(&labels)
            .inc_by(job.metrics.restarts.load(Ordering::Relaxed));
        for ((operator, kind), count) in job.metrics.failures() {
            let labels: Labels = vec![
                ("job", job.job.to_string()),
                ("operator", operator),
                ("kind", kind.to_string()),
            ];
            self.failures.get_or_create(&labels).inc_by(count);
        }
        self.upgrades.get_or_create(&labels).inc_by(job.upgrades);
        self.rollbacks.get_or_create(&labels).inc_by(job.rollbacks);
    }
}

fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The exposition of `jobs` (and of the host, when there is one).
pub fn encode_samples(host: Option<&HostSample>, jobs: &[JobSample<'_>]) -> String {
    let mut registry = Registry::default();
    let families = Families::register(&mut registry);
    let now_ms = crate::dataflow::now_millis();
    for job in jobs {
        families.job(job, now_ms);
    }
    if let Some(host) = host {
        for (status, count) in &host.jobs {
            families
                .jobs
                .get_or_create(&vec![("status", status.clone())])
                .set(clamp(*count));
        }
        families.plugins.set(clamp(host.plugins));
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_and_the_host_encode_with_their_labels() {
        let node = Arc::new(NodeMetrics::new("count", false, false, 2));
        node.subtask(1).took_in(5, 40);
        node.subtask(1).busy(std::time::Duration::from_millis(250));
        let checkpoints = CheckpointMetrics::default();
        checkpoints.completed.store(3, Ordering::Relaxed);
        let metrics = JobMetrics::default();
        let job = JobSample {
            job: "abc",
            nodes: &[node],
            checkpoints: Some(&checkpoints),
            metrics: &metrics,
            upgrades: 1,
            rollbacks: 0,
        };
        let host = HostSample {
            jobs: BTreeMap::from([("running".to_string(), 1)]),
            plugins: 4,
        };
        let text = encode_samples(Some(&host), &[job]);
        for line in [
            "weir_records_in_total{job=\"abc\",operator=\"count\",subtask=\"1\"} 5",
            "weir_bytes_in_total{job=\"abc\",operator=\"count\",subtask=\"1\"} 40",
            "weir_busy_seconds_total{job=\"abc\",operator=\"count\",subtask=\"1\"} 0.25",
            "weir_checkpoints_completed_total{job=\"abc\"} 3",
            "weir_upgrades_total{job=\"abc\"} 1",
            "weir_jobs{status=\"running\"} 1",
            "weir_plugins 4",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
