//! The progress line of `weir run` on a terminal (records in and out, rate)
//! and the summary printed when a job ends.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint::coordinator::CheckpointMetrics;
use crate::dataflow::NodeMetrics;
use crate::dataflow::runtime::JobOutcome;
use crate::protocol::TransferProgress;
use crate::runner::PreparedJob;

pub struct Progress {
    bar: ProgressBar,
    stop: Arc<std::sync::atomic::AtomicBool>,
    attempt: Arc<Mutex<Option<Attempt>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the progress line watches of the running attempt.
struct Attempt {
    metrics: Vec<Arc<NodeMetrics>>,
    checkpoints: Option<Arc<CheckpointMetrics>>,
    savepoints: Arc<TransferProgress>,
}

fn totals(metrics: &[Arc<NodeMetrics>]) -> (u64, u64) {
    let read = metrics
        .iter()
        .filter(|m| m.is_source)
        .map(|m| m.records_out())
        .sum();
    let written = metrics
        .iter()
        .filter(|m| m.is_sink)
        .map(|m| m.records_in())
        .sum();
    (read, written)
}

impl Progress {
    /// Starts the line; it shows the restore while attempts start, and the
    /// attempt given to [`Progress::attach`] once one runs.
    pub fn start(restore: Arc<TransferProgress>) -> Self {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let attempt: Arc<Mutex<Option<Attempt>>> = Arc::default();
        let (thread_bar, thread_stop, thread_attempt) =
            (bar.clone(), stop.clone(), attempt.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut last = (Instant::now(), 0u64, 0u64);
            while !thread_stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let attempt = thread_attempt.lock().expect("not poisoned");
                let message = if let Some((keys, bytes)) = restore.snapshot() {
                    format!(
                        "restoring state: {keys} keys, {}",
                        crate::human::bytes(bytes)
                    )
                } else if let Some(attempt) = attempt.as_ref() {
                    if let Some((keys, bytes)) = attempt.savepoints.snapshot() {
                        format!(
                            "writing the savepoint: {keys} keys, {}",
                            crate::human::bytes(bytes)
                        )
                    } else {
                        let (read, written) = totals(&attempt.metrics);
                        let now = Instant::now();
                        let seconds = now.duration_since(last.0).as_secs_f64().max(1e-3);
                        let read_rate = read.saturating_sub(last.1) as f64 / seconds;
                        let write_rate = written.saturating_sub(last.2) as f64 / seconds;
                        last = (now, read, written);
                        let checkpointed = attempt
                            .checkpoints
                            .as_ref()
                            .map(|c| {
                                format!("  checkpoints {}", c.completed.load(Ordering::Relaxed))
                            })
                            .unwrap_or_default();
                        format!(
                            "in {read} records ({}/s)  out {written} records ({}/s){checkpointed}  ({:.0}s)",
                            human(read_rate),
                            human(write_rate),
                            started.elapsed().as_secs_f64()
                        )
                    }
                } else {
                    "starting".to_string()
                };
                drop(attempt);
                thread_bar.set_message(message);
                thread_bar.tick();
            }
        });
        Self {
            bar,
            stop,
            attempt,
            thread: Some(thread),
        }
    }

    /// Watches a newly started attempt.
    pub fn attach(&self, running: &crate::runner::Attempt) {
        *self.attempt.lock().expect("not poisoned") = Some(Attempt {
            metrics: running.metrics().to_vec(),
            checkpoints: running.checkpoint_metrics(),
            savepoints: running.savepoint_progress(),
        });
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.bar.finish_and_clear();
    }
}

fn human(rate: f64) -> String {
    if rate >= 1e6 {
        format!("{:.2}M", rate / 1e6)
    } else if rate >= 1e3 {
        format!("{:.1}k", rate / 1e3)
    } else {
        format!("{rate:.0}")
    }
}

/// Prints what each node did, and the state each operator holds, to stderr.
pub fn print_summary(
    job: &PreparedJob,
    metrics: &[Arc<NodeMetrics>],
    outcome: &JobOutcome,
    elapsed: Duration,
) {
    let (read, _) = totals(metrics);
    let seconds = elapsed.as_secs_f64();
    eprintln!(
        "job `{}` {} in {seconds:.2}s ({} records/s from sources), job id {}",
        job.graph.name,
        if outcome.savepoint.is_some() {
            "stopped with a savepoint"
        } else if outcome.cancelled {
            "stopped"
        } else {
            "finished"
        },
        human(read as f64 / seconds.max(1e-3)),
        job.job_id
    );
    if let Some(checkpoints) = &job.checkpoints {
        let completed = checkpoints.metrics.completed.load(Ordering::Relaxed);
        let failed = checkpoints.metrics.failed.load(Ordering::Relaxed);
        let latest = checkpoints
            .latest()
            .map(|read| format!(", latest {}", checkpoints.shown(&read)))
            .unwrap_or_default();
        eprintln!("  checkpoints: {completed} completed, {failed} aborted{latest}");
    }
    for (node, m) in job.graph.nodes.iter().zip(metrics) {
        let role = if m.is_source {
            "source"
        } else if m.is_sink {
            "sink"
        } else {
            "operator"
        };
        let mut line = format!("  {:<12} {role:<8} p={}", node.uid, node.parallelism);
        if !m.is_source {
            line.push_str(&format!("  in {}", m.records_in()));
        }
        if !m.is_sink {
            line.push_str(&format!("  out {}", m.records_out()));
        }
        if let Some(plugin) = job.plugins.get(&node.uid) {
            line.push_str(&format!(
                "  plugin {} {}",
                plugin.info.name, plugin.info.version
            ));
        }
        let mut keys: Vec<(String, u64)> = Vec::new();
        let mut backend = None;
        for summary in outcome.summaries.iter().filter(|s| s.uid == node.uid) {
            backend = backend.or(summary
                .state_backend
                .as_ref()
                .map(|b| b.split(" at ").next().unwrap_or(b).to_string()));
            for (name, count) in &summary.state_keys {
                match keys.iter_mut().find(|(n, _)| n == name) {
                    Some(entry) => entry.1 += count,
                    None => keys.push((name.clone(), *count)),
                }
            }
        }
        for (name, count) in keys {
            let state = name.rsplit('/').next().unwrap_or(&name);
            line.push_str(&format!("  state `{state}`: {count} keys"));
        }
        if let Some(backend) = backend {
            line.push_str(&format!(" ({backend})"));
        }
        eprintln!("{line}");
    }
    for chain in job.graph.chain_names() {
        eprintln!("  chained: {chain} (one task per subtask)");
    }
}
