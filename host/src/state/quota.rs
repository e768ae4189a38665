//! State quotas: `limits = { value_bytes, state_bytes }` of an operator,
//! checked by its subtasks' keyed state at every write. `value_bytes`
//! bounds one value (a value state's value, a list element, a map value),
//! exactly. `state_bytes` bounds what one subtask's state holds: the
//! backend's size (RocksDB's estimate of its live data and memtables, the
//! memory backend's count) plus an upper bound of what was written since it
//! was measured (every write's key and value, as if none overwrote
//! another); once that bound passes the limit, the cache is flushed and the
//! size measured again — at once while the state is far from its quota,
//! at most once per [`REMEASURE_EVERY`] writes once a measurement found it
//! within a quarter of it, so a job that stays just under its quota does
//! not flush on every write. A
//! write past a limit fails the subtask (a [`StateError::Quota`] naming the
//! operator, the state, the key and the limit), never the host.

use super::StateError;

/// Writes between two measurements of the backend's size once the
/// estimate came close to `state_bytes`.
pub const REMEASURE_EVERY: u64 = 1024;

/// An operator's state quotas (none: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateLimits {
    pub value_bytes: Option<u64>,
    pub state_bytes: Option<u64>,
}

/// A subtask's quota accounting.
#[derive(Debug, Default)]
pub(super) struct Quota {
    pub limits: StateLimits,
    /// The backend's size when last measured.
    measured: u64,
    /// Key and value bytes written since (an upper bound of the growth).
    written: u64,
    /// Writes since the last measurement.
    writes: u64,
    /// Whether it was measured at all.
    known: bool,
    /// The last measurement found the state within a quarter of its
    /// quota: measurements are spaced out.
    close: bool,
}

/// What a write asks of the quota.
#[derive(Debug)]
pub(super) enum Verdict {
    Fits,
    /// Over the bound: measure the backend (after a flush) and ask again
    /// with [`Quota::measured`].
    Measure,
}

impl Quota {
    pub fn new(limits: StateLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// A write of `key` and a value of `value` bytes into `table`.
    pub fn check(&mut self, table: &str, key: &[u8], value: usize) -> Result<Verdict, StateError> {
        if let Some(limit) = self.limits.value_bytes
            && value as u64 > limit
        {
            return Err(quota_error(
                table,
                key,
                format!(
                    "a value of {} is over value_bytes = {}",
                    crate::human::bytes(value as u64),
                    crate::human::bytes(limit)
                ),
            ));
        }
        let Some(limit) = self.limits.state_bytes else {
            return Ok(Verdict::Fits);
        };
        self.written += (key.len() + value) as u64;
        self.writes += 1;
        // Never measured (a restored backend may be large already), or the
        // bound passed: measured at once the first time, then (the state
        // close to its quota) at most every REMEASURE_EVERY writes.
        let over =
            self.measured + self.written > limit && (!self.close || self.writes >= REMEASURE_EVERY);
        match !self.known || over {
            true => Ok(Verdict::Measure),
            false => Ok(Verdict::Fits),
        }
    }

    /// The backend measured `bytes` (the cache flushed into it): the write
    /// that asked fits, or is the one past `state_bytes`.
    pub fn measured(&mut self, bytes: u64, table: &str, key: &[u8]) -> Result<(), StateError> {
        let limit = self.limits.state_bytes.unwrap_or(u64::MAX);
        self.measured = bytes;
        self.written = 0;
        self.writes = 0;
        self.known = true;
        self.close = bytes >= limit - limit / 4;
        if bytes > limit {
            return Err(quota_error(
                table,
                key,
                format!(
                    "the subtask's state holds {}, over state_bytes = {}",
                    crate::human::bytes(bytes),
                    crate::human::bytes(limit)
                ),
            ));
        }
        Ok(())
    }
}

/// `<uid>/<state>` and a key, as a quota error names them.
fn quota_error(table: &str, key: &[u8], what: String) -> StateError {
    let (uid, state) = table.split_once('/').unwrap_or(("?", table));
    let shown: String = String::from_utf8_lossy(key).chars().take(64).collect();
    StateError::Quota {
        uid: uid.to_string(),
        state: state.to_string(),
        key: shown,
        what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_over_value_bytes_is_refused_naming_everything() {
        let mut quota = Quota::new(StateLimits {
            value_bytes: Some(8),
            state_bytes: None,
        });
        assert!(matches!(
            quota.check("count/seen", b"k", 8),
            Ok(Verdict::Fits)
        ));
        let error = quota.check("count/seen", b"apple", 9).expect_err("over");
        assert_eq!(
            error.to_string(),
            "operator `count` state `seen`, key \"apple\": a value of 9 bytes is over value_bytes = 8 bytes"
        );
    }

    #[test]
    fn state_bytes_measures_once_the_bound_passes_and_then_at_most_every_so_many_writes() {
        let mut quota = Quota::new(StateLimits {
            value_bytes: None,
            state_bytes: Some(100),
        });
        // Unknown size: the first write asks for a measurement.
        assert!(matches!(
            quota.check("op/s", b"k", 10),
            Ok(Verdict::Measure)
        ));
        quota.measured(11, "op/s", b"k").expect("fits");
        for _ in 0..8 {
            assert!(matches!(quota.check("op/s", b"k", 10), Ok(Verdict::Fits)));
        }
        // 11 + 88 + 11 passes 100: far from the quota so far, measured at once.
        assert!(matches!(
            quota.check("op/s", b"k", 10),
            Ok(Verdict::Measure)
        ));
        // Within a quarter of it: the bound passes at the next write, but
        // the backend is measured again only on the REMEASURE_EVERYth write
        // since.
        quota.measured(90, "op/s", b"k").expect("fits");
        let mut writes = 0;
        while !matches!(quota.check("op/s", b"k", 10), Ok(Verdict::Measure)) {
            writes += 1;
            assert!(writes < 2 * REMEASURE_EVERY, "never measured again");
        }
        assert_eq!(writes + 1, REMEASURE_EVERY);
        // Overwrites kept it small: it fits.
        quota.measured(30, "op/s", b"k").expect("fits");
        let error = quota
            .measured(101, "op/s", b"key-7")
            .expect_err("over state_bytes");
        assert_eq!(
            error.to_string(),
            "operator `op` state `s`, key \"key-7\": the subtask's state holds 101 bytes, over state_bytes = 100 bytes"
        );
    }
}
