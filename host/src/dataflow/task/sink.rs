//! A sink subtask: writes every batch; two-phase commit at each barrier
//! and completed checkpoint; at the end of its input, commits the rest or
//! discards it as the job's end says.

use crate::dataflow::alignment::Aligner;
use crate::dataflow::input::{Delivery, InputGate};
use crate::dataflow::metrics::Stopwatch;
use crate::dataflow::operator::{OperatorError, Sink, TaskError, TaskInfo};
use crate::dataflow::runtime::NodeMetrics;
use crate::protocol::{CommitSignal, Role, SnapshotStats, SubtaskSnapshot, TaskReport};
use crate::types::{Barrier, BarrierKind, CheckpointId, StreamEvent};
use std::sync::Arc;
use tokio::sync::watch;
use tracing::Instrument;

use super::{Reports, TaskSummary, apply_alignment, fail, report_finished};
/// A sink subtask: writes every batch. Two-phase commit: once checkpoint n
/// is aligned the sink makes what it wrote durable but pending and acks the
/// pending files; it commits them when the coordinator says n completed.
/// At end of input it waits for the job's end: commit the rest (the job
/// ended) or discard it (cancelled, to resume from the latest checkpoint).
pub async fn run_sink(
    info: TaskInfo,
    mut sink: Box<dyn Sink>,
    mut gate: InputGate,
    mut aligner: Aligner,
    metrics: Arc<NodeMetrics>,
    reports: Reports,
    mut commit: watch::Receiver<CommitSignal>,
) -> Result<TaskSummary, TaskError> {
    let span =
        tracing::info_span!("sink", job = %info.job, uid = %info.uid, subtask = info.subtask);
    async move {
        let fail = fail(&info);
        let mut committed = 0u64;
        let mut coordinator = true;
        let mine = metrics.subtask(info.subtask);
        loop {
            let waiting = Stopwatch::start();
            tokio::select! {
                delivery = gate.next() => {
                    mine.idle(waiting.elapsed());
                    // A disconnection fails the sink before it finishes:
                    // only a real end of input commits the rest.
                    let Some(Delivery { channel, event, .. }) = delivery.map_err(&fail)? else { break };
                    let aligned = match event {
                        StreamEvent::Records(batch) => {
                            let started = Stopwatch::start();
                            sink.write(&batch).map_err(&fail)?;
                            mine.took_in(batch.len(), batch.data_len());
                            mine.busy(started.elapsed());
                            None
                        }
                        StreamEvent::Barrier(barrier) => {
                            apply_alignment(aligner.on_barrier(channel, &barrier), &mut gate)
                        }
                        StreamEvent::EndOfInput => {
                            gate.end(channel);
                            apply_alignment(aligner.on_end_of_input(channel), &mut gate)
                        }
                        StreamEvent::Watermark(watermark) => {
                            if let Some(advanced) = gate.advance_watermark(channel, watermark) {
                                sink.watermark(advanced).map_err(&fail)?;
                            }
                            None
                        }
                    };
                    if let Some(Barrier { id: checkpoint, kind }) = aligned {
                        if let BarrierKind::Savepoint(target) = &kind
                            && let Some(cut) = &target.cut
                        {
                            sink.cut(checkpoint, cut);
                        }
                        let pending = sink.prepare_commit(checkpoint).map_err(&fail)?;
                        let _ = reports.send(TaskReport::Ack {
                            checkpoint,
                            snapshot: Box::new(SubtaskSnapshot {
                                uid: info.uid.to_string(),
                                subtask: info.subtask,
                                pending,
                                ..SubtaskSnapshot::default()
                            }),
                            stats: SnapshotStats::default(),
                        });
                    }
                }
                changed = commit.changed(), if coordinator => {
                    if changed.is_err() {
                        coordinator = false;
                        continue;
                    }
                    let signal = *commit.borrow_and_update();
                    commit_completed(sink.as_mut(), signal, &mut committed).map_err(&fail)?;
                }
            }
        }
        sink.finish().map_err(&fail)?;
        report_finished(&reports, &info, Role::Sink);
        loop {
            let signal = *commit.borrow_and_update();
            commit_completed(sink.as_mut(), signal, &mut committed).map_err(&fail)?;
            if let Some(end) = signal.end {
                sink.end(end).map_err(&fail)?;
                break;
            }
            if commit.changed().await.is_err() {
                // The coordinator is gone: the attempt is failing. Commit nothing more.
                break;
            }
        }
        Ok(TaskSummary {
            uid: info.uid.to_string(),
            subtask: info.subtask,
            ..TaskSummary::default()
        })
    }
    .instrument(span)
    .await
}

/// Commits what a newly completed checkpoint covers, once.
fn commit_completed(
    sink: &mut dyn Sink,
    signal: CommitSignal,
    committed: &mut u64,
) -> Result<(), OperatorError> {
    if signal.completed > *committed {
        *committed = signal.completed;
        sink.commit(CheckpointId(signal.completed))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::FailureKind;
    use crate::types::RecordBatch;

    use tokio::sync::mpsc;

    /// What a sink was asked to do.
    struct Recording(Arc<std::sync::Mutex<Vec<String>>>);

    impl Sink for Recording {
        fn write(&mut self, batch: &RecordBatch) -> Result<(), OperatorError> {
            self.0
                .lock()
                .expect("not poisoned")
                .push(format!("write {}", batch.len()));
            Ok(())
        }
        fn commit(&mut self, checkpoint: CheckpointId) -> Result<(), OperatorError> {
            self.0
                .lock()
                .expect("not poisoned")
                .push(format!("commit {}", checkpoint.0));
            Ok(())
        }
        fn finish(&mut self) -> Result<(), OperatorError> {
            self.0.lock().expect("not poisoned").push("finish".into());
            Ok(())
        }
        fn end(&mut self, commit: bool) -> Result<(), OperatorError> {
            self.0
                .lock()
                .expect("not poisoned")
                .push(format!("end {commit}"));
            Ok(())
        }
    }

    /// The duplicate a rolled-back upgrade once committed under load: the
    /// task upstream of a sink failed, the sink took the closed channel
    /// for its end of input, reported itself finished, and the coordinator
    /// (still running) told it to commit the rest, held epochs included,
    /// which the restarted attempt then wrote again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sink_whose_upstream_vanished_fails_without_finishing_or_committing() {
        let (input, receiver) = mpsc::channel(4);
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (reports, mut reported) = mpsc::unbounded_channel();
        let (commit, committed) = watch::channel(CommitSignal::default());
        let info = TaskInfo {
            job: Arc::from("test"),
            uid: Arc::from("out"),
            subtask: 0,
            parallelism: 1,
            max_parallelism: 128,
        };
        let sink = tokio::spawn(run_sink(
            info,
            Box::new(Recording(calls.clone())),
            InputGate::new(vec![(0, receiver)]),
            Aligner::new(1, crate::job::file::CheckpointMode::ExactlyOnce),
            Arc::new(NodeMetrics::new("out", false, true, 1)),
            reports,
            committed,
        ));
        let mut batch = RecordBatch::new();
        batch.push(Some(b"a"), b"1", None);
        input.send(StreamEvent::Records(batch)).await.expect("send");
        // The coordinator stand-in: would end the job with a commit as
        // soon as the sink says it finished.
        let coordinator = tokio::spawn(async move {
            while let Some(report) = reported.recv().await {
                if let TaskReport::Finished { .. } = report {
                    commit.send_modify(|s| s.end = Some(true));
                    return true;
                }
            }
            false
        });
        drop(input);
        let error = sink.await.expect("joins").expect_err("a disconnection");
        assert_eq!(error.error.kind, FailureKind::Disconnected, "{error}");
        assert!(
            !coordinator.await.expect("joins"),
            "the sink did not report itself finished"
        );
        assert_eq!(*calls.lock().expect("not poisoned"), ["write 1"]);
    }
}
