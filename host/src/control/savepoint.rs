//! The savepoint procedure (`weir savepoint JOB [DIR]`): the job runs on
//! while its coordinator takes a canonical savepoint — a task's part of a
//! staged job's savepoint names its cut (see
//! [`crate::types::SavepointTarget::cut`]).
//!
//! start → [`Taking`] → running. A cancel or the host's shutdown
//! supersedes it; a failure of the job fails it (the restart strategy
//! applies as ever).

use tokio::task::JoinHandle;

use super::driver::{Command, JobCtx, Message, Running, Step};
use super::lifecycle::JobStatus;
use super::run::RunEvent;
use crate::types::Location;

/// The savepoint is being taken.
pub(super) struct Taking {
    operation: String,
    taken: JoinHandle<Result<Location, String>>,
}

/// Starts a savepoint of the running attempt.
pub(super) fn start(
    ctx: &mut JobCtx,
    operation: String,
    target: Location,
    cut: Option<String>,
) -> Step {
    let Some(savepointer) = ctx.savepointer() else {
        ctx.fail_operation(&operation, "the job is between attempts; try again");
        return Step::Running(Running);
    };
    if !ctx.transition_from(
        JobStatus::Running,
        JobStatus::Savepointing,
        format!("savepoint requested (operation {operation})"),
    ) {
        let status = ctx.job.status();
        ctx.fail_operation(&operation, format!("the job is {status}; try again"));
        return Step::Running(Running);
    }
    ctx.note_savepoint_target(&target);
    let taken = tokio::spawn(async move {
        match cut {
            Some(cut) => savepointer.cut_savepoint(target, &cut).await,
            None => savepointer.savepoint(target, None).await,
        }
    });
    Step::Savepoint(Taking { operation, taken })
}

impl Taking {
    pub async fn next(mut self, ctx: &mut JobCtx) -> Step {
        loop {
            tokio::select! {
                taken = &mut self.taken => {
                    match taken.unwrap_or_else(|e| Err(e.to_string())) {
                        Ok(location) => {
                            ctx.record_savepoint(&location, Some(self.operation.clone()));
                            ctx.job.finish_operation(&self.operation, |o| {
                                o.savepoint = Some(location.to_string());
                            });
                        }
                        Err(error) => ctx.fail_operation(&self.operation, error),
                    }
                    // A failure meanwhile decided the status otherwise.
                    ctx.transition_from(JobStatus::Savepointing, JobStatus::Running, "savepoint done");
                    return Step::Running(Running);
                }
                message = ctx.next() => match message {
                    Message::Command(command @ (Command::Cancel { .. } | Command::Shutdown { .. })) => {
                        ctx.fail_operation(&self.operation, "superseded: the job was cancelled or the host shut down");
                        return Running::command(ctx, command);
                    }
                    Message::Command(command) => ctx.refuse(command, "the job is taking a savepoint; try again"),
                    // The savepoint, in flight, fails with the attempt; the
                    // answer above then ends this procedure.
                    Message::Run(RunEvent::Ended { result, .. }) => {
                        self.taken.abort();
                        ctx.fail_operation(&self.operation, "the job ended before the savepoint completed");
                        return ctx.run_ended(result, None);
                    }
                    Message::Run(event) => {
                        if let Some(step) = ctx.on_run_event(event) {
                            return step;
                        }
                    }
                },
            }
        }
    }
}
