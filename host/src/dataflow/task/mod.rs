//! The loops of a job's subtasks, each one tokio task owning everything
//! it touches (a chain with a Wasm operator on a thread of its own):
//!
//! - [`source`]: a source subtask reads batches, emits watermarks, records
//!   its position and sends each barrier the coordinator triggers.
//! - [`chain`]: the operator subtasks of one chain, the head reading its
//!   channels; barrier alignment, snapshots and timers.
//! - [`sink`]: a sink subtask writes, makes its output pending at each
//!   barrier and commits what a completed checkpoint covers.

mod chain;
mod sink;
mod source;

pub use chain::{ChainLink, run_chain};
pub use sink::run_sink;
pub use source::{WATERMARK_BATCH_RECORDS, WatermarkGenerator, run_source};

use super::alignment::Alignment;
use super::input::InputGate;
use super::operator::{FailureKind, OperatorError, TaskError, TaskInfo};
use crate::protocol::{Role, TaskReport};
use crate::types::Barrier;
use tokio::sync::mpsc;
use tracing::debug;

/// A subtask's line to the checkpoint coordinator.
pub type Reports = mpsc::UnboundedSender<TaskReport>;

fn report_finished(reports: &Reports, info: &TaskInfo, role: Role) {
    let _ = reports.send(TaskReport::Finished {
        uid: info.uid.to_string(),
        subtask: info.subtask,
        role,
    });
}

/// What an operator subtask reports when it ends well.
#[derive(Debug, Clone, Default)]
pub struct TaskSummary {
    pub uid: String,
    pub subtask: u32,
    /// (state name, keys with state) of an operator.
    pub state_keys: Vec<(String, u64)>,
    pub state_backend: Option<String>,
}

fn fail(info: &TaskInfo) -> impl Fn(OperatorError) -> TaskError + '_ {
    move |error| TaskError {
        uid: info.uid.to_string(),
        subtask: info.subtask,
        error,
    }
}

/// Applies the aligner's answer to the gate; returns the barrier that is
/// now aligned, if any.
fn apply_alignment(outcome: Alignment, gate: &mut InputGate) -> Option<Barrier> {
    match outcome {
        Alignment::Continue => None,
        Alignment::Block(channel) => {
            gate.block(channel);
            None
        }
        Alignment::Aborted { checkpoint, block } => {
            debug!(
                checkpoint = checkpoint.0,
                "alignment aborted by a newer barrier"
            );
            gate.unblock_all();
            if let Some(channel) = block {
                gate.block(channel);
            }
            None
        }
        Alignment::Aligned { barrier, aborted } => {
            if let Some(aborted) = aborted {
                debug!(
                    checkpoint = aborted.0,
                    "alignment aborted by a newer barrier"
                );
            }
            gate.unblock_all();
            Some(barrier)
        }
    }
}

/// Turns a panic of a task into a task failure.
pub fn panic_error(uid: &str, subtask: u32, message: String) -> TaskError {
    TaskError {
        uid: uid.to_string(),
        subtask,
        error: OperatorError::new(FailureKind::Panic, format!("task panicked: {message}")),
    }
}
