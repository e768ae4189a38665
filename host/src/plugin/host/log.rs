//! Host side of `weir:operator/log`: plugin log lines become `tracing`
//! events inside the subtask's span.

use super::HostState;
use crate::plugin::bindings::weir::operator::log::{Host, Level};

impl Host for HostState {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let uid = &*self.task.info.uid;
        let subtask = self.task.info.subtask;
        match level {
            Level::Trace => tracing::trace!(target: "weir::plugin", uid, subtask, "{message}"),
            Level::Debug => tracing::debug!(target: "weir::plugin", uid, subtask, "{message}"),
            Level::Info => tracing::info!(target: "weir::plugin", uid, subtask, "{message}"),
            Level::Warn => tracing::warn!(target: "weir::plugin", uid, subtask, "{message}"),
            Level::Error => tracing::error!(target: "weir::plugin", uid, subtask, "{message}"),
        }
        Ok(())
    }
}
