//! The procedures that end a job's run: stop with a savepoint (`weir
//! stop`), cancel (`weir cancel`), and the host's shutdown.
//!
//! - stop: start → [`Stopping`] (the savepoint in flight; the sources stop
//!   once it completed) → stopped, or running again if the savepoint
//!   failed. A cancel supersedes it; the host's shutdown lets it finish.
//! - cancel: [`cancel`] → [`Cancelling`] (the run cancelled: its attempt,
//!   or the wait before the next) → cancelled. It supersedes any other
//!   procedure.
//! - shutdown: [`shutdown`] → [`ShuttingDown`] (a native savepoint the next
//!   start resumes from, or a cancel: the next start resumes from the
//!   newest checkpoint) → the driver returns.

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::driver::{Command, JobCtx, Message, Running, Step};
use super::lifecycle::JobStatus;
use super::run::{RunEvent, RunFailure};
use crate::dataflow::runtime::JobOutcome;
use crate::types::Location;

/// A stop-with-savepoint in flight.
pub(super) type Taken = JoinHandle<Result<Location, String>>;

/// Stopping with a savepoint.
pub(super) struct Stopping {
    operation: String,
    /// The savepoint, until it answered.
    taken: Option<Taken>,
}

/// Starts a stop with a savepoint of the running attempt.
pub(super) fn start(
    ctx: &mut JobCtx,
    operation: String,
    target: Location,
    drain: bool,
    aligned: bool,
) -> Step {
    let Some(savepointer) = ctx.savepointer() else {
        ctx.fail_operation(&operation, "the job is between attempts; try again");
        return Step::Running(Running);
    };
    let cause = format!(
        "stop with a savepoint requested{}{} (operation {operation})",
        if drain { ", draining" } else { "" },
        if aligned {
            ", aligned with the stages upstream"
        } else {
            ""
        }
    );
    if let Err(error) = ctx.transition(JobStatus::Stopping, cause) {
        ctx.fail_operation(&operation, error.to_string());
        return Step::Running(Running);
    }
    ctx.note_savepoint_target(&target);
    let taken = tokio::spawn(async move {
        match aligned {
            true => savepointer.aligned_stop(target).await,
            false => savepointer.savepoint(target, Some(drain)).await,
        }
    });
    Step::Stop(Stopping {
        operation,
        taken: Some(taken),
    })
}

/// Takes over a stop-with-savepoint already in flight (an upgrade's,
/// abandoned for this stop): the job stops with it, or takes its own if it
/// fails.
pub(super) fn adopt(ctx: &mut JobCtx, operation: String, taken: Taken) -> Step {
    if let Err(error) = ctx.transition(
        JobStatus::Stopping,
        format!("stop requested (operation {operation}): the upgrade's savepoint stops the job"),
    ) {
        ctx.fail_operation(&operation, error.to_string());
    }
    Step::Stop(Stopping {
        operation,
        taken: Some(taken),
    })
}

impl Stopping {
    pub async fn next(mut self, ctx: &mut JobCtx) -> Step {
        loop {
            tokio::select! {
                taken = wait(&mut self.taken) => {
                    self.taken = None;
                    if let Err(error) = taken {
                        ctx.fail_operation(
                            &self.operation,
                            format!("the savepoint failed, the job runs on: {error}"),
                        );
                        ctx.transition_from(JobStatus::Stopping, JobStatus::Running, "the stop's savepoint failed");
                        return Step::Running(Running);
                    }
                    // Completed: the sources stop, the run ends.
                }
                message = ctx.next() => match message {
                    Message::Command(Command::Shutdown { done, .. }) => {
                        // The job stops as asked; the host waits for it.
                        let taken = self.taken.take();
                        return Step::Shutdown(ShuttingDown::adopt(done, taken, Some(self.operation)));
                    }
                    Message::Command(command @ Command::Cancel { .. }) => {
                        ctx.fail_operation(&self.operation, "superseded by a cancel");
                        return Running::command(ctx, command);
                    }
                    Message::Command(command) => ctx.refuse(command, "the job is stopping"),
                    Message::Run(RunEvent::Ended { result, .. }) => {
                        return ctx.run_ended(result, Some(&self.operation));
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

/// The answer of a savepoint in flight; pending forever without one.
pub(super) async fn wait(taken: &mut Option<Taken>) -> Result<Location, String> {
    match taken {
        Some(taken) => taken.await.unwrap_or_else(|e| Err(e.to_string())),
        None => std::future::pending().await,
    }
}

/// Being cancelled.
pub(super) struct Cancelling {
    operation: Option<String>,
    /// The host shut down meanwhile: told once the job has ended.
    shutdown: Option<oneshot::Sender<()>>,
}

/// Cancels the job's run (its attempt, or the wait before the next one).
pub(super) fn cancel(ctx: &mut JobCtx, operation: Option<String>) -> Step {
    if let Err(error) = ctx.transition(JobStatus::Cancelling, "cancel requested") {
        if let Some(operation) = &operation {
            ctx.fail_operation(operation, error.to_string());
        }
        return Step::Running(Running);
    }
    if ctx.run.as_ref().is_none_or(|r| r.ended) {
        let _ = ctx.transition(JobStatus::Cancelled, "cancelled (nothing was running)");
        if let Some(operation) = &operation {
            ctx.job
                .finish_operation(operation, |o| o.outcome = Some("cancelled".to_string()));
        }
        return Step::Ended;
    }
    ctx.cancel_run();
    Step::Cancel(Cancelling {
        operation,
        shutdown: None,
    })
}

impl Cancelling {
    pub async fn next(mut self, ctx: &mut JobCtx) -> Step {
        loop {
            match ctx.next().await {
                Message::Command(Command::Shutdown { done, .. }) => self.shutdown = Some(done),
                Message::Command(command) => ctx.refuse(command, "the job is being cancelled"),
                Message::Run(RunEvent::Failed { error, decide, .. }) => {
                    ctx.record_failure(&error);
                    let _ = decide.send(Some("it was being cancelled".to_string()));
                }
                // A restart launched before the cancel arrived: the run's
                // cancel reaches it too.
                Message::Run(RunEvent::Launched { .. } | RunEvent::Restarting { .. }) => {
                    ctx.cancel_run()
                }
                Message::Run(RunEvent::Ended { result, .. }) => {
                    // However the run ended, the job was cancelled.
                    match &result {
                        Ok(outcome) => {
                            if let Some(location) = &outcome.savepoint {
                                ctx.record_savepoint(location, None);
                            }
                        }
                        Err(failure) => {
                            warn!(job = %ctx.job.id, %failure, "the job failed as it was cancelled");
                            let message = failure.to_string();
                            ctx.job.update(|r| r.last_error = Some(message));
                        }
                    }
                    let result = Ok(JobOutcome {
                        summaries: Vec::new(),
                        cancelled: true,
                        savepoint: None,
                    });
                    let step = ctx.run_ended(result, self.operation.as_deref());
                    if let Some(done) = self.shutdown.take() {
                        let _ = done.send(());
                    }
                    return step;
                }
            }
        }
    }
}

/// The host shuts down: the job stops with a savepoint its next start
/// resumes from, or is cancelled (resumed from its newest checkpoint).
pub(super) struct ShuttingDown {
    done: oneshot::Sender<()>,
    /// The stop-with-savepoint in flight, until it answered.
    taken: Option<Taken>,
    /// A user's stop that was in flight: the job ends stopped, as asked,
    /// rather than resumed at the next start.
    operation: Option<String>,
}

/// Stops the job for the host's shutdown.
pub(super) fn shutdown(
    ctx: &mut JobCtx,
    with_savepoint: bool,
    target: Location,
    done: oneshot::Sender<()>,
) -> Step {
    if ctx.run.as_ref().is_none_or(|r| r.ended) {
        let _ = done.send(());
        return Step::Ended;
    }
    let savepointer = ctx.savepointer().filter(|_| with_savepoint);
    let taken = match savepointer {
        Some(savepointer) => {
            let _ = ctx.transition(JobStatus::Stopping, "the host is shutting down");
            ctx.note_savepoint_target(&target);
            Some(tokio::spawn(async move {
                savepointer.native_savepoint(target, Some(false)).await
            }))
        }
        None => {
            info!(job = %ctx.job.id, "cancelled for the host's shutdown (no savepoint: between attempts, or on_shutdown = cancel); the next start resumes it from its newest checkpoint");
            ctx.cancel_run();
            None
        }
    };
    Step::Shutdown(ShuttingDown {
        done,
        taken,
        operation: None,
    })
}

impl ShuttingDown {
    /// Shuts down with a stop-with-savepoint already in flight.
    pub(super) fn adopt(
        done: oneshot::Sender<()>,
        taken: Option<Taken>,
        operation: Option<String>,
    ) -> Self {
        Self {
            done,
            taken,
            operation,
        }
    }

    pub async fn next(mut self, ctx: &mut JobCtx) -> Step {
        loop {
            tokio::select! {
                taken = wait(&mut self.taken) => {
                    self.taken = None;
                    if let Err(error) = taken {
                        warn!(job = %ctx.job.id, %error, "the shutdown's savepoint failed; cancelling (the next start resumes from the newest checkpoint)");
                        ctx.cancel_run();
                    }
                }
                message = ctx.next() => match message {
                    Message::Command(command) => ctx.refuse(command, "the host is shutting down"),
                    Message::Run(RunEvent::Failed { error, decide, .. }) => {
                        ctx.record_failure(&error);
                        let _ = decide.send(Some("the host is shutting down".to_string()));
                    }
                    Message::Run(RunEvent::Launched { .. }) => ctx.cancel_run(),
                    Message::Run(RunEvent::Restarting { .. }) => {}
                    Message::Run(RunEvent::Ended { result, .. }) => {
                        self.ended(ctx, result);
                        let _ = self.done.send(());
                        return Step::Ended;
                    }
                },
            }
        }
    }

    fn ended(&mut self, ctx: &mut JobCtx, result: Result<JobOutcome, RunFailure>) {
        let savepoint = result.as_ref().ok().and_then(|o| o.savepoint.clone());
        match (savepoint, self.operation.take()) {
            (Some(location), Some(operation)) => {
                ctx.run_ended(result, Some(&operation));
                info!(job = %ctx.job.id, savepoint = %location, "stopped as asked before the host's shutdown");
            }
            (Some(location), None) => {
                ctx.record_savepoint(&location, None);
                let text = location.to_string();
                ctx.job.update(|r| r.resume_from = Some(text.clone()));
                let _ = ctx.transition(
                    JobStatus::Stopped,
                    format!("host shut down: stopped with the savepoint {text}; the next host start resumes it"),
                );
            }
            (None, operation) => {
                if let Some(operation) = operation {
                    ctx.fail_operation(
                        &operation,
                        "the host shut down before the stop's savepoint completed",
                    );
                }
                info!(job = %ctx.job.id, "job cancelled for the host's shutdown; the next host start resumes it from its newest checkpoint");
            }
        }
    }
}
