//! The job state machine of the running host: [`JobStatus`], the one table
//! of allowed transitions ([`JobStatus::can_become`]) and, beside it, which
//! operations a status accepts ([`JobStatus::accepts`]) and which running
//! operation a new one may supersede ([`OperationKind::supersedes`]). A
//! status changes only through [`Lifecycle::transition`] or
//! [`Lifecycle::transition_from`], which check the table, append the
//! change with its time and cause to the job's history (persisted with the
//! job record), and refuse an illegal one with an error the caller must
//! handle. A job's status is read from here, never inferred from its tasks.
//!
//! ```text
//! created ─► running ◄──────────────┐──────────────────────┐
//!   │          │ ├─► failing ─► restarting ─► running     │
//!   │          │ │      └─► failed                          │
//!   │          │ ├─► savepointing ─► running                │
//!   │          │ ├─► stopping ─► stopped                    │
//!   │          │ ├─► cancelling ─► cancelled                │
//!   │          │ ├─► upgrading ─► running (new version) ────┘
//!   │          │ │      ├─► rolling-back ─► running (old version)
//!   │          │ │      └─► stopping (the upgrade abandoned)
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

/// What a user can ask of a job: each is an operation, persisted with the
/// job and answered by its driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OperationKind {
    Savepoint,
    Stop,
    Cancel,
    Upgrade,
}

impl OperationKind {
    pub const ALL: [OperationKind; 4] = [
        OperationKind::Savepoint,
        OperationKind::Stop,
        OperationKind::Cancel,
        OperationKind::Upgrade,
    ];

    /// Whether this operation may be asked for while `running` has not
    /// finished, taking its place: a cancel ends whatever runs; a stop
    /// abandons an upgrade (the job stops at the upgrade's savepoint, or
    /// takes one). Any other pair waits its turn (409).
    pub fn supersedes(self, running: OperationKind) -> bool {
        match self {
            OperationKind::Cancel => running != OperationKind::Cancel,
            OperationKind::Stop => running == OperationKind::Upgrade,
            OperationKind::Savepoint | OperationKind::Upgrade => false,
        }
    }

    /// Its name in messages ("a savepoint", "an upgrade").
    pub fn article_name(self) -> &'static str {
        match self {
            OperationKind::Savepoint => "a savepoint",
            OperationKind::Stop => "a stop",
            OperationKind::Cancel => "a cancel",
            OperationKind::Upgrade => "an upgrade",
        }
    }
}

impl JobStatus {
    pub const ALL: [JobStatus; 13] = [
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Failing,
        JobStatus::Restarting,
        JobStatus::Failed,
        JobStatus::Finished,
        JobStatus::Cancelling,
        JobStatus::Cancelled,
        JobStatus::Savepointing,
        JobStatus::Stopping,
        JobStatus::Stopped,
        JobStatus::Upgrading,
        JobStatus::RollingBack,
    ];

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
            // An upgrade abandoned for a stop: the job stops (with the
            // upgrade's savepoint, or one of its own).
            Upgrading => matches!(
                next,
                Running | RollingBack | Failing | Failed | Cancelling | Restarting | Stopping
            ),
            RollingBack => matches!(next, Running | Failed | Cancelling | Restarting | Stopping),
            // A host that stopped its jobs with a savepoint at shutdown
            // starts them again on its next start.
            Stopped => matches!(next, Created),
            Failed | Finished | Cancelled => false,
        }
    }

    /// Whether a job in this status takes operation `kind` now (409
    /// otherwise). Operations start transitions, so this table lives
    /// beside [`JobStatus::can_become`]: a savepoint or an upgrade needs a
    /// running job; a stop, a running job or one being upgraded (the
    /// upgrade is abandoned); a cancel, any job that has not ended and is
    /// not being cancelled already.
    pub fn accepts(self, kind: OperationKind) -> bool {
        use JobStatus::*;
        match kind {
            OperationKind::Savepoint | OperationKind::Upgrade => self == Running,
            OperationKind::Stop => matches!(self, Running | Upgrading | RollingBack),
            OperationKind::Cancel => !self.is_terminal() && self != Cancelling,
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

/// A status change refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The table does not allow it.
    #[error("a job cannot go from {from} to {to}")]
    Illegal { from: JobStatus, to: JobStatus },
    /// [`Lifecycle::transition_from`]: the job is no longer (or not yet)
    /// in the status the caller expected.
    #[error("the job is {actual}, not {expected}: it does not become {to}")]
    NotIn {
        expected: JobStatus,
        actual: JobStatus,
        to: JobStatus,
    },
}

/// A job's status and its history: the one owner of its transitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lifecycle {
    status: JobStatus,
    history: Vec<Transition>,
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

    /// What a job that no host drives as one shows (a cluster job's
    /// stages, see `cluster::staged`): the status its parts add up to,
    /// since `since_ms`. A view: never stored, never moved on.
    pub fn view(status: JobStatus, since_ms: u64, cause: impl Into<String>) -> Self {
        Self {
            status,
            history: vec![Transition {
                time_ms: since_ms,
                from: None,
                to: status,
                cause: cause.into(),
            }],
        }
    }

    pub fn status(&self) -> JobStatus {
        self.status
    }

    /// Every change, oldest first.
    pub fn history(&self) -> &[Transition] {
        &self.history
    }

    /// Moves to `to` if the table allows it, recording time and cause.
    /// Staying in the same status is no transition and is not recorded.
    #[must_use = "a refused transition is an error the caller must handle"]
    pub fn transition(
        &mut self,
        to: JobStatus,
        now_ms: u64,
        cause: impl Into<String>,
    ) -> Result<(), TransitionError> {
        if self.status == to {
            return Ok(());
        }
        if !self.status.can_become(to) {
            return Err(TransitionError::Illegal {
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

    /// Moves from `expected` to `to`: "check the status, then change it"
    /// as one step (the caller holds the record's lock across both).
    #[must_use = "a refused transition is an error the caller must handle"]
    pub fn transition_from(
        &mut self,
        expected: JobStatus,
        to: JobStatus,
        now_ms: u64,
        cause: impl Into<String>,
    ) -> Result<(), TransitionError> {
        if self.status != expected {
            return Err(TransitionError::NotIn {
                expected,
                actual: self.status,
                to,
            });
        }
        self.transition(to, now_ms, cause)
    }
}

#[cfg(test)]
mod tests {
    use super::JobStatus::*;
    use super::OperationKind as Op;
    use super::*;

    #[test]
    fn terminal_states_lead_nowhere_except_a_resumed_stop() {
        for from in JobStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in JobStatus::ALL {
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
            for to in JobStatus::ALL {
                if from.can_become(to) && !reached.contains(&to) {
                    reached.push(to);
                    frontier.push(to);
                }
            }
        }
        assert_eq!(reached.len(), JobStatus::ALL.len(), "reached {reached:?}");
    }

    /// Every (status, operation) pair, against the one table written out
    /// by hand: a change to `accepts` must change this too.
    #[test]
    fn every_status_accepts_exactly_its_operations() {
        let table: [(JobStatus, [bool; 4]); 13] = [
            //              savepoint stop   cancel upgrade
            (Created, [false, false, true, false]),
            (Running, [true, true, true, true]),
            (Failing, [false, false, true, false]),
            (Restarting, [false, false, true, false]),
            (Failed, [false, false, false, false]),
            (Finished, [false, false, false, false]),
            (Cancelling, [false, false, false, false]),
            (Cancelled, [false, false, false, false]),
            (Savepointing, [false, false, true, false]),
            (Stopping, [false, false, true, false]),
            (Stopped, [false, false, false, false]),
            (Upgrading, [false, true, true, false]),
            (RollingBack, [false, true, true, false]),
        ];
        assert_eq!(
            table.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            JobStatus::ALL,
            "the table covers every status"
        );
        for (status, accepted) in table {
            for (kind, expected) in Op::ALL.into_iter().zip(accepted) {
                assert_eq!(status.accepts(kind), expected, "{status} accepts {kind:?}");
                // What a status accepts it can also carry out: the
                // operation's first transition is in the table.
                if expected {
                    let first = match kind {
                        Op::Savepoint => Savepointing,
                        Op::Stop => Stopping,
                        Op::Cancel => Cancelling,
                        Op::Upgrade => Upgrading,
                    };
                    assert!(
                        status == first || status.can_become(first),
                        "{status} accepts {kind:?} but cannot become {first}"
                    );
                }
            }
        }
    }

    #[test]
    fn only_a_cancel_or_a_stop_of_an_upgrade_supersedes_a_running_operation() {
        for new in Op::ALL {
            for running in Op::ALL {
                let expected = matches!(
                    (new, running),
                    (Op::Cancel, Op::Savepoint | Op::Stop | Op::Upgrade) | (Op::Stop, Op::Upgrade)
                );
                assert_eq!(
                    new.supersedes(running),
                    expected,
                    "{new:?} over {running:?}"
                );
            }
        }
    }

    #[test]
    fn transitions_are_checked_and_recorded() {
        let mut life = Lifecycle::new(1, "submitted");
        life.transition(Running, 2, "started").expect("allowed");
        life.transition(Running, 3, "again").expect("same status");
        assert_eq!(
            life.transition(Created, 4, "back"),
            Err(TransitionError::Illegal {
                from: Running,
                to: Created
            })
        );
        life.transition(Upgrading, 5, "upgrade").expect("allowed");
        life.transition(RollingBack, 6, "trap").expect("allowed");
        life.transition(Running, 7, "old version").expect("allowed");
        let path: Vec<_> = life.history().iter().map(|t| t.to).collect();
        assert_eq!(path, [Created, Running, Upgrading, RollingBack, Running]);
        assert_eq!(life.history()[3].cause, "trap");
        assert_eq!(life.history()[3].time_ms, 6);
    }

    #[test]
    fn transition_from_checks_and_changes_in_one_step() {
        let mut life = Lifecycle::new(1, "submitted");
        life.transition(Running, 2, "started").expect("allowed");
        assert_eq!(
            life.transition_from(Savepointing, Running, 3, "savepoint done"),
            Err(TransitionError::NotIn {
                expected: Savepointing,
                actual: Running,
                to: Running
            })
        );
        life.transition_from(Running, Savepointing, 4, "savepoint")
            .expect("was running");
        life.transition_from(Savepointing, Running, 5, "savepoint done")
            .expect("was savepointing");
        assert_eq!(life.status(), Running);
        assert_eq!(life.history().len(), 4);
    }

    #[test]
    fn statuses_serialize_in_kebab_case() {
        let text = serde_json::to_string(&RollingBack).expect("serialize");
        assert_eq!(text, "\"rolling-back\"");
        for status in JobStatus::ALL {
            assert_eq!(
                serde_json::to_string(&status).expect("serialize"),
                format!("\"{status}\"")
            );
        }
    }
}
