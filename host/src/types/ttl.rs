//! What a state's time-to-live is: how long, what refreshes it, and in
//! which time (plain data: the job file declares it, keyed state applies it
//! in `state::ttl`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// When a state's cells expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateTtl {
    /// How long a cell lives after its last update, in milliseconds.
    pub millis: u64,
    pub update: TtlUpdate,
    pub time: TtlTime,
}

/// What refreshes a cell's TTL (Flink's `UpdateType`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TtlUpdate {
    /// Creating or writing the cell (the default).
    #[default]
    OnCreateAndWrite,
    /// Also reading it.
    OnReadAndWrite,
}

/// The time a TTL is measured in. In event time a cell is stamped with the
/// event time of its last update (the record's timestamp; for writes a
/// plugin hands back for a whole batch at once, the batch's newest; else
/// the watermark) and expires once the watermark has passed that by the
/// TTL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TtlTime {
    /// The host's wall clock (the default).
    #[default]
    Processing,
    /// The task's watermark.
    Event,
}

impl StateTtl {
    pub fn new(ttl: Duration, update: TtlUpdate, time: TtlTime) -> Self {
        Self {
            millis: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            update,
            time,
        }
    }

    /// Whether a cell last updated at `stamp` has expired at `now`.
    #[inline]
    pub fn expired(&self, stamp: u64, now: u64) -> bool {
        now.saturating_sub(stamp) >= self.millis
    }

    /// Whether a cell last updated at `stamp` is dropped where no
    /// watermark is known (a restore, a savepoint's writer, `savepoint
    /// read`) at wall-clock `now`: processing-time TTLs only.
    pub fn dropped_offline(&self, stamp: u64, now: u64) -> bool {
        self.time == TtlTime::Processing && self.expired(stamp, now)
    }
}

impl std::fmt::Display for StateTtl {
    /// e.g. `1h (on create and write, processing time)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ttl = humantime::format_duration(Duration::from_millis(self.millis));
        let update = match self.update {
            TtlUpdate::OnCreateAndWrite => "on create and write",
            TtlUpdate::OnReadAndWrite => "on read and write",
        };
        let time = match self.time {
            TtlTime::Processing => "processing time",
            TtlTime::Event => "event time",
        };
        write!(f, "{ttl} ({update}, {time})")
    }
}

/// Parses a TTL as the job file and SDKs write it: `"10s"`, `"1h"`,
/// `"30d"` (humantime). Zero is refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration ({e}; e.g. \"10s\", \"1h\", \"30d\")"))?;
    if ttl.is_zero() {
        return Err(format!("{text:?}: a TTL must be longer than zero"));
    }
    if ttl.as_millis() == 0 {
        return Err(format!("{text:?}: a TTL is counted in milliseconds"));
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_expires_once_its_ttl_has_passed_since_its_last_update() {
        let t = StateTtl::new(
            Duration::from_secs(1),
            TtlUpdate::default(),
            TtlTime::default(),
        );
        assert!(!t.expired(5000, 5999));
        assert!(t.expired(5000, 6000));
        assert!(
            !t.expired(5000, 10),
            "a clock behind the stamp expires nothing"
        );
    }

    #[test]
    fn durations_parse_and_zero_is_refused() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration(" 1h "), Ok(Duration::from_secs(3600)));
        assert!(
            parse_duration("0s")
                .expect_err("refused")
                .contains("longer than zero")
        );
        assert!(
            parse_duration("soon")
                .expect_err("refused")
                .contains("\"soon\" is not a duration")
        );
        assert!(
            parse_duration("10us")
                .expect_err("refused")
                .contains("milliseconds")
        );
    }

    #[test]
    fn a_ttl_reads_as_people_write_it() {
        let t = StateTtl::new(
            Duration::from_secs(3600),
            TtlUpdate::OnReadAndWrite,
            TtlTime::Event,
        );
        assert_eq!(t.to_string(), "1h (on read and write, event time)");
    }
}
