//! Event time: per-key tumbling windows fire through event-time timers as the
//! watermark passes, on out-of-order input; records behind the watermark go
//! to the `late` side output.

use std::collections::BTreeMap;

use weir_tests::plugins::TUMBLING_WINDOW;

use crate::support::{JobDir, run, toml_path};

const BASE: i64 = 1_700_000_000_000;
const WINDOW: i64 = 10_000;

struct Events {
    csv: String,
    expected: BTreeMap<(String, i64), u64>,
    late: Vec<(String, i64)>,
}

/// 5000 events 100 ms apart over 5 keys, shuffled within blocks of 20 (2 s,
/// inside the 5 s out-of-orderness), and 3 records from the first window
/// injected thousands of records later (behind the watermark by then).
fn events() -> Events {
    let mut rows: Vec<(i64, String)> = (0..5000)
        .map(|i| (BASE + i * 100 + (i * 7919) % 50, format!("acct-{}", i % 5)))
        .collect();
    let mut x = 12345u64;
    for block in rows.chunks_mut(20) {
        for i in (1..block.len()).rev() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            block.swap(i, (x >> 33) as usize % (i + 1));
        }
    }
    let mut expected = BTreeMap::new();
    for (ts, key) in &rows {
        let start = ts - ts.rem_euclid(WINDOW);
        *expected.entry((key.clone(), start)).or_insert(0) += 1;
    }
    let late = vec![
        ("acct-1".to_string(), BASE + 50),
        ("acct-3".to_string(), BASE + 1_000),
        ("acct-1".to_string(), BASE + 9_999),
    ];
    for (n, (key, ts)) in late.iter().enumerate() {
        rows.insert(3000 + n * 500, (*ts, key.clone()));
    }
    let csv = rows
        .iter()
        .enumerate()
        .map(|(i, (ts, key))| format!("{ts},{key},{}.{:02}\n", i % 97, i % 100))
        .collect();
    Events {
        csv,
        expected,
        late,
    }
}

#[test]
fn tumbling_windows_fire_on_out_of_order_input() {
    let events = events();
    let job = JobDir::new();
    job.write("events.csv", &events.csv);
    let path = job.job(&format!(
        r#"
name = "windows"
[[source]]
uid = "events"
kind = "file"
path = "events.csv"
format = {{ delimiter = ",", key = 1, timestamp = 0 }}
watermark = {{ out_of_orderness = "5s" }}

[[operator]]
uid = "windows"
plugin = {plugin}
inputs = [{{ from = "events", partition = "key" }}]
parallelism = 2
config = {{ size_ms = {WINDOW} }}

[[sink]]
uid = "counts"
kind = "file"
path = "out/counts"
inputs = ["windows"]

[[sink]]
uid = "late"
kind = "file"
path = "out/late"
inputs = ["windows:late"]
"#,
        plugin = toml_path(TUMBLING_WINDOW)
    ));
    run(&path).expect("job runs");

    let mut fired = BTreeMap::new();
    for line in weir_tests::read_parts(&job.path().join("out/counts")) {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 4, "`key start end count`: {line:?}");
        let start: i64 = fields[1].parse().expect("start");
        let end: i64 = fields[2].parse().expect("end");
        assert_eq!(end - start, WINDOW);
        let count: u64 = fields[3].parse().expect("count");
        let previous = fired.insert((fields[0].to_string(), start), count);
        assert!(previous.is_none(), "window fired twice: {line}");
    }
    assert_eq!(
        fired, events.expected,
        "every window fires once with its full count"
    );

    let mut late: Vec<(String, i64)> = weir_tests::read_parts(&job.path().join("out/late"))
        .iter()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            assert_eq!(fields.get(2), Some(&"late"), "{line:?}");
            (fields[0].to_string(), fields[1].parse().expect("ts"))
        })
        .collect();
    late.sort();
    let mut expected_late = events.late.clone();
    expected_late.sort();
    assert_eq!(
        late, expected_late,
        "exactly the records behind the watermark are late"
    );
}
