//! The job state machine of the running host: [`JobStatus`] and the one
//! table of allowed transitions ([`JobStatus::can_become`]). Every change of
//! a job's status goes through [`Lifecycle::transition`], which checks it
//! against the table and appends it, with its time and cause, to the job's
//! history (persisted with the job record). A job's status is read from
//! here, never inferred from its tasks.
//!
//! ```text
//! created ─► running ◄──────────────┐──────────────────────┐
//!   │          │ ├─► failing ─► restarting ─► running     │
//!   │          │ │      └─► failed                          │
//!   │          │ ├─► savepointing ─► running                │
//!   │          │ ├─► stopping ─► stopped                    │
//!   │          │ ├─► cancelling ─► cancelled                │
//!   │          │ ├─► upgrading ─► running (new version) ────┘
//!   │          │ │      └─► rolling-back ─► running (old version)
//!   │          │ └─► finished
//!   └─► failed (cannot start)
//! ```

use serde::{Deserialize, Serialize};

/// A job's status on the running host (Flink's `JobStatus`, plus the
/// host's own operations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum JobStatus {
    /// Accepted; its plugins are loading and its state restoring.
    Created,
    Running,
    /// An attempt failed; the restart strategy is deciding.
    Failing,
    /// Waiting to restart from the newest completed checkpoint.
    Restarting,
    /// Failed for good (the restart strategy gave up, or it cannot start).
    Failed,
    /// Its sources ended and every record reached the sinks.
    Finished,
    Cancelling,
    Cancelled,
    /// A savepoint is being taken; the job keeps running.
    Savepointing,
    /// Stopping with a savepoint.
    Stopping,
    /// Stopped with a savepoint.
    Stopped,
    /// Being upgraded: checked, stopped with a savepoint, restarted with the
    /// new plugins, on probation.
    Upgrading,
    /// The new version failed; the old one restarts from the same savepoint.
    RollingBack,
}

impl JobStatus {
    /// Whether the job has ended (nothing runs, nothing resumes it).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Failed | JobStatus::Finished | JobStatus::Cancelled | JobStatus::Stopped
        )
    }

    /// Whether the host may move a job from `self` to `next`.
    pub fn can_become(self, next: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            Created => matches!(next, Running | Failed | Cancelling | Failing | Restarting),
            Running => matches!(
                next,
                Failing | Finished | Cancelling | Savepointing | Stopping | Upgrading | Restarting
            ),
            Failing => matches!(next, Restarting | Failed | Cancelling),
            Restarting => matches!(next, Running | Failing | Failed | Cancelling),
            // A host restarted after a crash resumes a job in any live
            // status: `restarting`, then `running`.
            Savepointing => matches!(next, Running | Failing | Cancelling | Finished | Restarting),
            Stopping => matches!(
                next,
                Stopped | Running | Failing | Failed | Cancelling | Restarting
            ),
            Cancelling => matches!(next, Cancelled | Failed),
            Upgrading => matches!(
                next,
                Running | RollingBack | Failing | Failed | Cancelling | Restarting
            ),
            RollingBack => matches!(next, Running | Failed | Cancelling | Restarting),
            // A host that stopped its jobs with a savepoint at shutdown
            // starts them again on its next start.
            Stopped => matches!(next, Created),
            Failed | Finished | Cancelled => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        use JobStatus::*;
        match self {
            Created => "created",
            Running => "running",
            Failing => "failing",
            Restarting => "restarting",
            Failed => "failed",
            Finished => "finished",
            Cancelling => "cancelling",
            Cancelled => "cancelled",
            Savepointing => "savepointing",
            Stopping => "stopping",
            Stopped => "stopped",
            Upgrading => "upgrading",
            RollingBack => "rolling-back",
        }
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One status change: when, from what, to what, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Transition {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub from: Option<JobStatus>,
    pub to: JobStatus,
    pub cause: String,
}

/// A transition the table does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a job cannot go from {from} to {to}")]
pub struct IllegalTransition {
    pub from: JobStatus,
    pub to: JobStatus,
}

/// A job's status and its history: the one owner of its transitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lifecycle {
    pub status: JobStatus,
    pub history: Vec<Transition>,
}

impl Lifecycle {
    /// A new job, `created`.
    pub fn new(now_ms: u64, cause: impl Into<String>) -> Self {
        Self {
            status: JobStatus::Created,
            history: vec![Transition {
                time_ms: now_ms,
                from: None,
                to: JobStatus::Created,
                cause: cause.into(),
            }],
        }
    }

    /// Moves to `to` if the table allows it, recording time and cause.
    /// Staying in the same status is no transition and is not recorded.
    pub fn transition(
        &mut self,
        to: JobStatus,
        now_ms: u64,
        cause: impl Into<String>,
    ) -> Result<(), IllegalTransition> {
        if self.status == to {
            return Ok(());
        }
        if !self.status.can_become(to) {
            return Err(IllegalTransition {
                from: self.status,
                to,
            });
        }
        let cause = cause.into();
        tracing::info!(from = %self.status, %to, %cause, "job status");
        self.history.push(Transition {
            time_ms: now_ms,
            from: Some(self.status),
            to,
            cause,
        });
        self.status = to;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::JobStatus::*;
    use super::*;

    const ALL: [JobStatus; 13] = [
        Created,
        Running,
        Failing,
        Restarting,
        Failed,
        Finished,
        Cancelling,
        Cancelled,
        Savepointing,
        Stopping,
        Stopped,
        Upgrading,
        RollingBack,
    ];

    #[test]
    fn terminal_states_lead_nowhere_except_a_resumed_stop() {
        for from in ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in ALL {
                let allowed = from == Stopped && to == Created;
                assert_eq!(from.can_become(to), allowed, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn every_status_is_reachable_from_created() {
        let mut reached = vec![Created];
        let mut frontier = vec![Created];
        while let Some(from) = frontier.pop() {
            for to in ALL {
                if from.can_become(to) && !reached.contains(&to) {
                    reached.push(to);
                    frontier.push(to);
                }
            }
        }
        assert_eq!(reached.len(), ALL.len(), "reached {reached:?}");
    }

    #[test]
    fn transitions_are_checked_and_recorded() {
        let mut life = Lifecycle::new(1, "submitted");
        life.transition(Running, 2, "started").expect("allowed");
        life.transition(Running, 3, "again").expect("same status");
        assert_eq!(
            life.transition(Created, 4, "back"),
            Err(IllegalTransition {
                from: Running,
                to: Created
            })
        );
        life.transition(Upgrading, 5, "upgrade").expect("allowed");
        life.transition(RollingBack, 6, "trap").expect("allowed");
        life.transition(Running, 7, "old version").expect("allowed");
        let path: Vec<_> = life.history.iter().map(|t| t.to).collect();
        assert_eq!(path, [Created, Running, Upgrading, RollingBack, Running]);
        assert_eq!(life.history[3].cause, "trap");
        assert_eq!(life.history[3].time_ms, 6);
    }

    #[test]
    fn statuses_serialize_in_kebab_case() {
        let text = serde_json::to_string(&RollingBack).expect("serialize");
        assert_eq!(text, "\"rolling-back\"");
        for status in ALL {
            assert_eq!(
                serde_json::to_string(&status).expect("serialize"),
                format!("\"{status}\"")
            );
        }
    }
}
