//! Time-to-live of keyed state: what a state's TTL is ([`StateTtl`]), the
//! clock its cells expire by ([`TtlClock`]), and the stamp each cell of a
//! state with a TTL carries in the backend, in checkpoints and in
//! savepoints: the time of its last update, 8 bytes little-endian
//! (milliseconds), before the encoded cell. A state without a TTL stores
//! its cells unstamped, exactly as before TTL existed.
//!
//! A TTL covers one cell: a key's value, its whole list or its whole map;
//! any write to it refreshes it (and, with [`TtlUpdate::OnReadAndWrite`],
//! any read). Expired cells are never returned ([`super::KeyedState`]
//! reads them as absent and deletes them), are dropped by RocksDB's
//! compaction filter ([`compaction_decision`]) and the memory backend's
//! sweep at each snapshot, are left out of canonical savepoints, and are
//! dropped when a checkpoint or savepoint is restored ([`restamp`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::types::ttl::{StateTtl, TtlTime, TtlUpdate, parse_duration};

/// Bytes of the last-update stamp before a TTL state's encoded cell.
pub const STAMP_BYTES: usize = 8;

/// The task's current times, as TTLs read them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TtlClock {
    /// Wall-clock milliseconds since the Unix epoch.
    pub processing: u64,
    /// The task's watermark in milliseconds (0 before the first): what
    /// event-time cells expire by.
    pub event: u64,
    /// The event time a write is stamped with: the current record's
    /// timestamp, else the watermark.
    pub event_write: u64,
}

impl TtlClock {
    /// The wall clock now, no watermark yet.
    pub fn wall() -> Self {
        Self {
            processing: wall_millis(),
            ..Self::default()
        }
    }

    /// The time cells of a TTL in `time` expire by.
    #[inline]
    pub fn now(&self, time: TtlTime) -> u64 {
        match time {
            TtlTime::Processing => self.processing,
            TtlTime::Event => self.event,
        }
    }

    /// The time a write to a cell of a TTL in `time` is stamped with.
    #[inline]
    pub fn write_time(&self, time: TtlTime) -> u64 {
        match time {
            TtlTime::Processing => self.processing,
            TtlTime::Event => self.event_write,
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn wall_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A watermark read as a TTL time: none yet (negative) is 0.
pub fn event_millis(watermark: i64) -> u64 {
    u64::try_from(watermark).unwrap_or(0)
}

/// The task's watermark, shared with the backend's compaction filter.
#[derive(Debug, Default)]
pub struct EventClock(AtomicU64);

impl EventClock {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, millis: u64) {
        self.0.store(millis, Ordering::Relaxed);
    }
}

/// What a backend that drops expired cells itself needs of one table.
#[derive(Debug, Clone)]
pub struct Expiry {
    pub ttl: StateTtl,
    pub event: Arc<EventClock>,
}

impl Expiry {
    /// Whether a stored (stamped) cell has expired now.
    pub fn expired(&self, stored: &[u8]) -> bool {
        let Some((stamp, _)) = split(stored) else {
            return false;
        };
        let now = match self.ttl.time {
            TtlTime::Processing => wall_millis(),
            TtlTime::Event => self.event.get(),
        };
        self.ttl.expired(stamp, now)
    }
}

/// Appends `stamp` to `out` (a stamped cell's first bytes).
#[inline]
pub fn put_stamp(out: &mut Vec<u8>, stamp: u64) {
    out.extend_from_slice(&stamp.to_le_bytes());
}

/// `cell` with `stamp` before it.
pub fn stamped(stamp: u64, cell: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(STAMP_BYTES + cell.len());
    put_stamp(&mut out, stamp);
    out.extend_from_slice(cell);
    out
}

/// A stored cell of a TTL state as (stamp, encoded cell); None when it is
/// shorter than a stamp.
#[inline]
pub fn split(stored: &[u8]) -> Option<(u64, &[u8])> {
    let (stamp, cell) = stored.split_first_chunk::<STAMP_BYTES>()?;
    Some((u64::from_le_bytes(*stamp), cell))
}

/// A stored cell as a restore writes it into a state whose TTL is `new`,
/// from a checkpoint where the state's TTL was `old`: its stamp kept (or,
/// newly stamped, the restore's time), `migrate` applied to the encoded
/// cell. None: it has expired (by the new TTL, else the old; processing
/// time only: a restore knows no watermark).
pub fn restamp(
    old: Option<&StateTtl>,
    new: Option<&StateTtl>,
    now: u64,
    stored: Vec<u8>,
    migrate: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, String>,
) -> Result<Option<Vec<u8>>, String> {
    let (stamp, cell) = match old {
        Some(_) => {
            let (stamp, cell) = split(&stored).ok_or_else(|| {
                format!(
                    "a cell of {} bytes is shorter than its TTL stamp",
                    stored.len()
                )
            })?;
            (Some(stamp), cell.to_vec())
        }
        None => (None, stored),
    };
    if let (Some(stamp), Some(rule)) = (stamp, new.or(old))
        && rule.dropped_offline(stamp, now)
    {
        return Ok(None);
    }
    let cell = migrate(cell)?;
    Ok(Some(match new {
        Some(_) => stamped(stamp.unwrap_or(now), &cell),
        None => cell,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ttl(millis: u64) -> StateTtl {
        StateTtl {
            millis,
            update: TtlUpdate::OnCreateAndWrite,
            time: TtlTime::Processing,
        }
    }

    #[test]
    fn stamps_round_trip_and_short_cells_are_refused() {
        let cell = stamped(42, b"abc");
        assert_eq!(split(&cell), Some((42, &b"abc"[..])));
        assert_eq!(split(b"short"), None);
    }

    #[test]
    fn a_restore_keeps_stamps_drops_expired_cells_and_stamps_new_ttls() {
        let keep = |cell| Ok(cell);
        let (old, new) = (ttl(1000), ttl(10_000));
        // Kept: the new TTL is longer, the stamp stays.
        let cell = restamp(Some(&old), Some(&new), 5000, stamped(1000, b"v"), keep);
        assert_eq!(cell, Ok(Some(stamped(1000, b"v"))));
        // Expired by the TTL it now has.
        let cell = restamp(Some(&new), Some(&old), 5000, stamped(1000, b"v"), keep);
        assert_eq!(cell, Ok(None));
        // A TTL removed: unstamped, expired ones (by the old TTL) dropped.
        let cell = restamp(Some(&old), None, 1500, stamped(1000, b"v"), keep);
        assert_eq!(cell, Ok(Some(b"v".to_vec())));
        assert_eq!(
            restamp(Some(&old), None, 2500, stamped(1000, b"v"), keep),
            Ok(None)
        );
        // A TTL added: stamped with the restore's time.
        let cell = restamp(None, Some(&new), 7000, b"v".to_vec(), keep);
        assert_eq!(cell, Ok(Some(stamped(7000, b"v"))));
        // Migration sees the cell without its stamp.
        let cell = restamp(Some(&new), Some(&new), 5000, stamped(4000, b"v"), |cell| {
            assert_eq!(cell, b"v");
            Ok(b"w".to_vec())
        });
        assert_eq!(cell, Ok(Some(stamped(4000, b"w"))));
        // Event time: a restore knows no watermark and drops nothing.
        let event = StateTtl {
            time: TtlTime::Event,
            ..old
        };
        let cell = restamp(Some(&event), Some(&event), 99_999, stamped(1, b"v"), keep);
        assert_eq!(cell, Ok(Some(stamped(1, b"v"))));
        assert!(restamp(Some(&old), None, 0, b"v".to_vec(), keep).is_err());
    }
}
