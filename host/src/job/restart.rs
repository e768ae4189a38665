//! Restart strategies: after a job attempt fails, whether to restart it (and
//! after what delay) or to fail the job for good. Pure logic on a clock the
//! caller passes in, so every strategy is tested without sleeping.
//!
//! | strategy | keys (job file `[restart]`) | gives up when |
//! |---|---|---|
//! | `none` | — | the first failure |
//! | `fixed-delay` | `attempts` (3), `delay` (1s) | more than `attempts` failures |
//! | `failure-rate` | `max_failures` (3), `interval` (60s), `delay` (1s) | more than `max_failures` within `interval` |
//! | `exponential-delay` | `initial_delay` (1s), `max_delay` (60s), `multiplier` (2.0), `reset_after` (1h), `jitter` (0.1), `attempts` (unlimited) | more than `attempts` failures, if set |
//!
//! Exponential delay doubles (by `multiplier`) after each failure up to
//! `max_delay`, and starts over at `initial_delay` once the job ran
//! `reset_after` without failing; `jitter` spreads each delay by ±that
//! fraction.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::job::file::{RestartSettings, RestartStrategyKind};

/// A validated restart strategy.
#[derive(Debug, Clone, PartialEq)]
pub enum RestartStrategy {
    None,
    FixedDelay {
        attempts: u32,
        delay: Duration,
    },
    FailureRate {
        max_failures: u32,
        interval: Duration,
        delay: Duration,
    },
    ExponentialDelay {
        initial_delay: Duration,
        max_delay: Duration,
        multiplier: f64,
        reset_after: Duration,
        jitter: f64,
        attempts: Option<u32>,
    },
}

/// What to do about a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum RestartDecision {
    /// Restart every task from the latest completed checkpoint after `delay`.
    Restart { delay: Duration, attempt: u32 },
    /// Fail the job for good; the reason says which limit was reached.
    GiveUp { reason: String },
}

impl RestartStrategy {
    /// The longest a restart may wait (what a sink's de-duplication must
    /// outlast).
    pub fn longest_delay(&self) -> Duration {
        match self {
            RestartStrategy::None => Duration::ZERO,
            RestartStrategy::FixedDelay { delay, .. }
            | RestartStrategy::FailureRate { delay, .. } => *delay,
            RestartStrategy::ExponentialDelay {
                max_delay, jitter, ..
            } => max_delay.mul_f64(1.0 + jitter),
        }
    }

    /// Builds the strategy from the job file's `[restart]`, naming any key
    /// that does not apply to the chosen strategy or has a bad value.
    pub fn from_settings(settings: &RestartSettings) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let kind = settings.strategy;
        let mut stray = |key: &str, present: bool| {
            if present {
                problems.push(format!(
                    "[restart] key `{key}` does not apply to strategy \"{}\"",
                    kind.name()
                ));
            }
        };
        let s = settings;
        let strategy = match kind {
            RestartStrategyKind::None => {
                stray("attempts", s.attempts.is_some());
                stray("delay", s.delay.is_some());
                stray("max_failures", s.max_failures.is_some());
                stray("interval", s.interval.is_some());
                Self::none_exponential_strays(s, &mut stray);
                RestartStrategy::None
            }
            RestartStrategyKind::FixedDelay => {
                stray("max_failures", s.max_failures.is_some());
                stray("interval", s.interval.is_some());
                Self::none_exponential_strays(s, &mut stray);
                RestartStrategy::FixedDelay {
                    attempts: s.attempts.unwrap_or(3),
                    delay: s.delay.unwrap_or(Duration::from_secs(1)),
                }
            }
            RestartStrategyKind::FailureRate => {
                stray("attempts", s.attempts.is_some());
                Self::none_exponential_strays(s, &mut stray);
                RestartStrategy::FailureRate {
                    max_failures: s.max_failures.unwrap_or(3),
                    interval: s.interval.unwrap_or(Duration::from_secs(60)),
                    delay: s.delay.unwrap_or(Duration::from_secs(1)),
                }
            }
            RestartStrategyKind::ExponentialDelay => {
                stray("delay", s.delay.is_some());
                stray("max_failures", s.max_failures.is_some());
                stray("interval", s.interval.is_some());
                RestartStrategy::ExponentialDelay {
                    initial_delay: s.initial_delay.unwrap_or(Duration::from_secs(1)),
                    max_delay: s.max_delay.unwrap_or(Duration::from_secs(60)),
                    multiplier: s.multiplier.unwrap_or(2.0),
                    reset_after: s.reset_after.unwrap_or(Duration::from_secs(3600)),
                    jitter: s.jitter.unwrap_or(0.1),
                    attempts: s.attempts,
                }
            }
        };
        match &strategy {
            RestartStrategy::FailureRate {
                max_failures: 0, ..
            } => {
                problems.push("[restart] max_failures must be at least 1".to_string());
            }
            RestartStrategy::FailureRate { interval, .. } if interval.is_zero() => {
                problems.push("[restart] interval must be greater than zero".to_string());
            }
            RestartStrategy::ExponentialDelay {
                initial_delay,
                max_delay,
                multiplier,
                jitter,
                ..
            } => {
                if !(*multiplier >= 1.0 && multiplier.is_finite()) {
                    problems.push(format!(
                        "[restart] multiplier = {multiplier}: must be at least 1.0"
                    ));
                }
                if !(0.0..=1.0).contains(jitter) {
                    problems.push(format!(
                        "[restart] jitter = {jitter}: must be between 0.0 and 1.0"
                    ));
                }
                if max_delay < initial_delay {
                    problems.push(
                        "[restart] max_delay must not be less than initial_delay".to_string(),
                    );
                }
            }
            _ => {}
        }
        if problems.is_empty() {
            Ok(strategy)
        } else {
            Err(problems)
        }
    }

    fn none_exponential_strays(s: &RestartSettings, stray: &mut impl FnMut(&str, bool)) {
        stray("initial_delay", s.initial_delay.is_some());
        stray("max_delay", s.max_delay.is_some());
        stray("multiplier", s.multiplier.is_some());
        stray("reset_after", s.reset_after.is_some());
        stray("jitter", s.jitter.is_some());
    }
}

impl RestartStrategyKind {
    pub fn name(self) -> &'static str {
        match self {
            RestartStrategyKind::None => "none",
            RestartStrategyKind::FixedDelay => "fixed-delay",
            RestartStrategyKind::FailureRate => "failure-rate",
            RestartStrategyKind::ExponentialDelay => "exponential-delay",
        }
    }
}

/// Applies a strategy to a job's failures over time.
#[derive(Debug, Clone)]
pub struct RestartTracker {
    strategy: RestartStrategy,
    /// Failures so far (all of them; the failure-rate window is `recent`).
    failures: u32,
    recent: VecDeque<Instant>,
    last_failure: Option<Instant>,
    /// Exponential delay's current backoff.
    backoff: Option<Duration>,
}

impl RestartTracker {
    pub fn new(strategy: RestartStrategy) -> Self {
        Self {
            strategy,
            failures: 0,
            recent: VecDeque::new(),
            last_failure: None,
            backoff: None,
        }
    }

    pub fn strategy(&self) -> &RestartStrategy {
        &self.strategy
    }

    /// A job attempt failed at `now`. `random` is a number in [0, 1) used for
    /// jitter.
    pub fn on_failure(&mut self, now: Instant, random: f64) -> RestartDecision {
        self.failures += 1;
        let previous = self.last_failure.replace(now);
        let attempt = self.failures;
        match &self.strategy {
            RestartStrategy::None => RestartDecision::GiveUp {
                reason: "the restart strategy is \"none\"".to_string(),
            },
            RestartStrategy::FixedDelay { attempts, delay } => {
                if attempt > *attempts {
                    RestartDecision::GiveUp {
                        reason: format!(
                            "failed {attempt} times; fixed-delay allows {attempts} restarts"
                        ),
                    }
                } else {
                    RestartDecision::Restart {
                        delay: *delay,
                        attempt,
                    }
                }
            }
            RestartStrategy::FailureRate {
                max_failures,
                interval,
                delay,
            } => {
                self.recent.push_back(now);
                while self
                    .recent
                    .front()
                    .is_some_and(|first| now.duration_since(*first) > *interval)
                {
                    self.recent.pop_front();
                }
                if self.recent.len() as u32 > *max_failures {
                    RestartDecision::GiveUp {
                        reason: format!(
                            "{} failures within {}; failure-rate allows {max_failures}",
                            self.recent.len(),
                            crate::human::duration(*interval)
                        ),
                    }
                } else {
                    RestartDecision::Restart {
                        delay: *delay,
                        attempt,
                    }
                }
            }
            RestartStrategy::ExponentialDelay {
                initial_delay,
                max_delay,
                multiplier,
                reset_after,
                jitter,
                attempts,
            } => {
                if let Some(limit) = attempts
                    && attempt > *limit
                {
                    return RestartDecision::GiveUp {
                        reason: format!(
                            "failed {attempt} times; exponential-delay allows {limit} restarts"
                        ),
                    };
                }
                let quiet = previous.is_none_or(|p| now.duration_since(p) >= *reset_after);
                let backoff = match self.backoff {
                    Some(current) if !quiet => current.mul_f64(*multiplier).min(*max_delay),
                    _ => *initial_delay,
                };
                self.backoff = Some(backoff);
                let spread = 1.0 + jitter * (2.0 * random.clamp(0.0, 1.0) - 1.0);
                RestartDecision::Restart {
                    delay: backoff.mul_f64(spread.max(0.0)).min(*max_delay),
                    attempt,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(strategy: RestartStrategyKind) -> RestartSettings {
        RestartSettings {
            strategy,
            ..RestartSettings::default()
        }
    }

    fn restarts(decision: &RestartDecision) -> bool {
        matches!(decision, RestartDecision::Restart { .. })
    }

    #[test]
    fn none_gives_up_at_once() {
        let mut tracker = RestartTracker::new(RestartStrategy::None);
        assert!(!restarts(&tracker.on_failure(Instant::now(), 0.5)));
    }

    #[test]
    fn fixed_delay_restarts_attempts_times_then_gives_up() {
        let mut s = settings(RestartStrategyKind::FixedDelay);
        s.attempts = Some(3);
        s.delay = Some(Duration::from_millis(10));
        let mut tracker = RestartTracker::new(RestartStrategy::from_settings(&s).expect("valid"));
        let now = Instant::now();
        for attempt in 1..=3 {
            assert_eq!(
                tracker.on_failure(now, 0.5),
                RestartDecision::Restart {
                    delay: Duration::from_millis(10),
                    attempt
                }
            );
        }
        let RestartDecision::GiveUp { reason } = tracker.on_failure(now, 0.5) else {
            panic!("the 4th failure must fail the job");
        };
        assert!(reason.contains("failed 4 times"), "{reason}");
    }

    #[test]
    fn failure_rate_counts_failures_within_the_interval() {
        let mut s = settings(RestartStrategyKind::FailureRate);
        s.max_failures = Some(2);
        s.interval = Some(Duration::from_secs(10));
        let mut tracker = RestartTracker::new(RestartStrategy::from_settings(&s).expect("valid"));
        let start = Instant::now();
        assert!(restarts(&tracker.on_failure(start, 0.5)));
        assert!(restarts(
            &tracker.on_failure(start + Duration::from_secs(11), 0.5)
        ));
        assert!(restarts(
            &tracker.on_failure(start + Duration::from_secs(22), 0.5)
        ));
        assert!(restarts(
            &tracker.on_failure(start + Duration::from_secs(23), 0.5)
        ));
        assert!(!restarts(
            &tracker.on_failure(start + Duration::from_secs(24), 0.5)
        ));
    }

    #[test]
    fn exponential_delay_grows_caps_and_resets_after_quiet() {
        let mut s = settings(RestartStrategyKind::ExponentialDelay);
        s.initial_delay = Some(Duration::from_secs(1));
        s.max_delay = Some(Duration::from_secs(5));
        s.reset_after = Some(Duration::from_secs(100));
        s.jitter = Some(0.0);
        let mut tracker = RestartTracker::new(RestartStrategy::from_settings(&s).expect("valid"));
        let start = Instant::now();
        let delays: Vec<u64> = (0..5)
            .map(
                |i| match tracker.on_failure(start + Duration::from_secs(i), 0.5) {
                    RestartDecision::Restart { delay, .. } => delay.as_secs(),
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 5, 5]);
        match tracker.on_failure(start + Duration::from_secs(500), 0.5) {
            RestartDecision::Restart { delay, .. } => {
                assert_eq!(delay.as_secs(), 1, "reset after a quiet period")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn jitter_spreads_the_delay_within_bounds() {
        let strategy = RestartStrategy::ExponentialDelay {
            initial_delay: Duration::from_secs(10),
            max_delay: Duration::from_secs(60),
            multiplier: 2.0,
            reset_after: Duration::from_secs(3600),
            jitter: 0.2,
            attempts: None,
        };
        for random in [0.0, 0.5, 0.999] {
            let mut tracker = RestartTracker::new(strategy.clone());
            let RestartDecision::Restart { delay, .. } = tracker.on_failure(Instant::now(), random)
            else {
                panic!("restarts");
            };
            assert!(
                delay >= Duration::from_secs(8) && delay <= Duration::from_secs(12),
                "{delay:?}"
            );
        }
    }

    #[test]
    fn keys_of_another_strategy_are_named() {
        let mut s = settings(RestartStrategyKind::FixedDelay);
        s.max_failures = Some(2);
        s.multiplier = Some(0.5);
        let problems = RestartStrategy::from_settings(&s).expect_err("invalid");
        assert!(
            problems.iter().any(|p| p.contains("`max_failures`")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("`multiplier`")),
            "{problems:?}"
        );
    }
}
