//! A chain subtask with a Wasm operator runs on a thread of its own
//! (Flink's thread per task), inside the runtime's `block_on` rather than
//! as a task on a worker.
//!
//! Why: WASI's synchronous imports block on tokio, which a worker thread
//! allows only inside `block_in_place`, and on a worker that hands the
//! worker's core to another thread around every call (a thread wake-up per
//! batch, the largest cost of a stateless Wasm map). Under `block_on` on a
//! thread of its own, `block_in_place` only marks the thread as outside
//! the runtime. The chain's channels, timers and storage work as on a
//! worker: the thread has the runtime's context.
//!
//! The job sees a task like any other ([`ChainThread::spawn`]): it resolves
//! to the chain's result, a panic resumes in it, and aborting it cancels the
//! chain at its next await. [`ChainThread::join`] waits for the thread
//! itself, so an aborted chain's operators (and their state) are closed
//! before a job's end is reported.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::oneshot;

use super::operator::TaskError;
use super::task::{ChainLink, TaskSummary, run_chain};

/// What a chain subtask resolves to.
pub type ChainResult = Result<Vec<TaskSummary>, TaskError>;

/// The task the job awaits for a chain subtask.
pub type ChainTask = Pin<Box<dyn Future<Output = ChainResult> + Send>>;

/// A chain subtask's thread.
pub struct ChainThread {
    thread: std::thread::JoinHandle<()>,
}

impl ChainThread {
    /// Starts `chain` on a thread named `name` when one of its operators
    /// blocks on the runtime (the Wasm ones: see
    /// [`Operator::blocks_on_runtime`](super::operator::Operator::blocks_on_runtime))
    /// and the runtime is multi-threaded, and returns the thread and the
    /// task the job awaits. Otherwise (native operators, a test's
    /// current-thread runtime) the chain is the task itself.
    pub fn spawn(
        name: String,
        chain: Vec<ChainLink>,
    ) -> std::io::Result<(Option<ChainThread>, ChainTask)> {
        let handle = Handle::current();
        let blocks = chain.iter().any(|link| link.operator.blocks_on_runtime());
        if !blocks || handle.runtime_flavor() != RuntimeFlavor::MultiThread {
            return Ok((None, Box::pin(run_chain(chain))));
        }
        let (result_tx, result_rx) = oneshot::channel();
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                handle.block_on(async move {
                    tokio::select! {
                        result = run_chain(chain) => Some(result),
                        // The task was aborted (its sender dropped).
                        _ = cancel_rx => None,
                    }
                })
            }));
            let _ = result_tx.send(outcome);
        })?;
        let task = async move {
            // Dropped with this future: an abort cancels the chain.
            let _cancel = cancel_tx;
            match result_rx.await {
                Ok(Ok(Some(result))) => result,
                Ok(Err(panic)) => std::panic::resume_unwind(panic),
                // Cancelled, which only an abort of this future does.
                Ok(Ok(None)) | Err(_) => unreachable!("the chain thread ended without a result"),
            }
        };
        Ok((Some(ChainThread { thread }), Box::pin(task)))
    }

    /// Waits for the thread to end (call from a blocking context).
    pub fn join(self) {
        // A panic was resumed in the task already.
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::*;
    use crate::dataflow::alignment::Aligner;
    use crate::dataflow::input::InputGate;
    use crate::dataflow::metrics::NodeMetrics;
    use crate::dataflow::output::{Collector, OutputEdge};
    use crate::dataflow::{Operator, OperatorError, TaskContext, TaskInfo};
    use crate::job::Partition;
    use crate::state::KeyedState;
    use crate::state::memory::MemoryBackend;
    use crate::types::{RecordBatch, StreamEvent};

    /// Blocks on the runtime as a WASI import does (inside
    /// `block_in_place`), notes the thread it ran on, passes batches on,
    /// and panics on a record whose value is `panic`.
    struct Blocking {
        task: TaskContext,
        threads: Arc<Mutex<Vec<String>>>,
        dropped: Arc<AtomicBool>,
    }

    impl Operator for Blocking {
        fn task(&mut self) -> &mut TaskContext {
            &mut self.task
        }
        fn process_batch(&mut self, _input: u32, batch: RecordBatch) -> Result<(), OperatorError> {
            let name = std::thread::current().name().unwrap_or("").to_string();
            self.threads.lock().expect("not poisoned").push(name);
            tokio::task::block_in_place(|| Handle::current().block_on(tokio::task::yield_now()));
            assert!(batch.iter().all(|r| r.value != b"panic"), "told to panic");
            self.task.output.emit_batch(batch)
        }
        fn blocks_on_runtime(&self) -> bool {
            true
        }
    }

    impl Drop for Blocking {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    struct Probe {
        threads: Arc<Mutex<Vec<String>>>,
        dropped: Arc<AtomicBool>,
        input: mpsc::Sender<StreamEvent>,
        output: mpsc::Receiver<StreamEvent>,
        chain: Vec<ChainLink>,
    }

    fn probe() -> Probe {
        let (input, receiver) = mpsc::channel(4);
        let (sender, output) = mpsc::channel(4);
        let info = TaskInfo {
            job: Arc::from("test"),
            uid: Arc::from("blocking"),
            subtask: 0,
            parallelism: 1,
            max_parallelism: 128,
        };
        let edge = OutputEdge::new(None, Partition::Forward, 1, vec![sender]);
        let collector = Collector::new(vec![edge], 128, 1 << 20);
        let state = KeyedState::new(Vec::new(), Box::new(MemoryBackend::new(0)), 128, 1);
        let threads = Arc::new(Mutex::new(Vec::new()));
        let dropped = Arc::new(AtomicBool::new(false));
        let link = ChainLink {
            operator: Box::new(Blocking {
                task: TaskContext::new(info, state, collector),
                threads: threads.clone(),
                dropped: dropped.clone(),
            }),
            gate: InputGate::new(vec![(0, receiver)]),
            aligner: Aligner::new(1, crate::job::file::CheckpointMode::ExactlyOnce),
            metrics: Arc::new(NodeMetrics::new("blocking", false, false, 1)),
            storage: None,
        };
        Probe {
            threads,
            dropped,
            input,
            output,
            chain: vec![link],
        }
    }

    fn records(value: &[u8]) -> StreamEvent {
        let mut batch = RecordBatch::new();
        batch.push(None, value, None);
        StreamEvent::Records(batch)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocking_chain_runs_on_its_own_thread_where_blocking_on_the_runtime_works() {
        let mut probe = probe();
        let (thread, task) =
            ChainThread::spawn("weir-blocking-0".into(), probe.chain).expect("starts");
        let task = tokio::spawn(task);
        probe.input.send(records(b"a")).await.expect("send");
        let Some(StreamEvent::Records(batch)) = probe.output.recv().await else {
            panic!("the batch is passed on");
        };
        assert_eq!(batch.get(0).map(|r| r.value), Some(&b"a"[..]));
        probe
            .input
            .send(StreamEvent::EndOfInput)
            .await
            .expect("send");
        let summaries = task.await.expect("joins").expect("ends well");
        assert_eq!(summaries.len(), 1);
        thread.expect("a thread of its own").join();
        assert_eq!(
            *probe.threads.lock().expect("not poisoned"),
            ["weir-blocking-0"]
        );
        assert!(probe.dropped.load(Ordering::SeqCst));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aborting_the_task_cancels_the_chain_and_join_waits_for_its_operators() {
        let probe = probe();
        let (thread, task) =
            ChainThread::spawn("weir-blocking-0".into(), probe.chain).expect("starts");
        let task = tokio::spawn(task);
        // The chain waits for input that never comes, until aborted.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!probe.dropped.load(Ordering::SeqCst));
        task.abort();
        assert!(task.await.expect_err("aborted").is_cancelled());
        let thread = thread.expect("a thread of its own");
        let joined = tokio::task::spawn_blocking(move || thread.join());
        tokio::time::timeout(Duration::from_secs(10), joined)
            .await
            .expect("the cancelled chain ends")
            .expect("joins");
        assert!(
            probe.dropped.load(Ordering::SeqCst),
            "the operator is closed"
        );
        drop(probe.input);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_on_the_thread_resumes_in_the_task() {
        let probe = probe();
        let (thread, task) =
            ChainThread::spawn("weir-blocking-0".into(), probe.chain).expect("starts");
        let task = tokio::spawn(task);
        probe.input.send(records(b"panic")).await.expect("send");
        let error = task.await.expect_err("panicked");
        let payload = error.into_panic();
        let message = payload.downcast_ref::<&str>().copied().unwrap_or_default();
        assert_eq!(message, "told to panic");
        thread.expect("a thread of its own").join();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn on_a_current_thread_runtime_the_chain_is_the_task() {
        let probe = probe();
        let (thread, task) =
            ChainThread::spawn("weir-blocking-0".into(), probe.chain).expect("starts");
        assert!(thread.is_none());
        probe
            .input
            .send(StreamEvent::EndOfInput)
            .await
            .expect("send");
        task.await.expect("ends at its end of input");
    }
}
