//! How sizes and durations read in messages and listings: as people
//! write them (`256 MiB`, `1.5 KiB`, `300 ms`, `5 s`, `2 min 30 s`).

use std::time::Duration;

/// `n` bytes in the largest binary unit it reaches: whole when exact
/// (`256 MiB`), else with one decimal (`1.5 KiB`); `12 bytes` below 1 KiB.
pub fn bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if n >= size {
            return if n.is_multiple_of(size) {
                format!("{} {unit}", n / size)
            } else {
                format!("{:.1} {unit}", n as f64 / size as f64)
            };
        }
    }
    format!("{n} bytes")
}

/// A duration: `300 ms` below a second, `5 s` or `1.5 s` below a minute,
/// `2 min` or `2 min 30 s` above.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms} ms");
    }
    let secs = d.as_secs();
    if secs < 60 {
        return if ms.is_multiple_of(1000) {
            format!("{secs} s")
        } else {
            format!("{:.1} s", d.as_secs_f64())
        };
    }
    match secs % 60 {
        0 => format!("{} min", secs / 60),
        rest => format!("{} min {rest} s", secs / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_as_people_write_them() {
        assert_eq!(bytes(268_435_456), "256 MiB");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(12), "12 bytes");
        assert_eq!(duration(Duration::from_millis(300)), "300 ms");
        assert_eq!(duration(Duration::from_secs(5)), "5 s");
        assert_eq!(duration(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(duration(Duration::from_secs(150)), "2 min 30 s");
    }
}
