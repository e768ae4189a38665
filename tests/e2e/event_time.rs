//! Event time: per-key tumbling windows fire through event-time timers as the
//! watermark passes, on out-of-order input; records behind the watermark go
//! to the `late` side output.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use weir_tests::plugins::TUMBLING_WINDOW;

use crate::support::{JobDir, engine, run, toml_path};

const BASE: i64 = 1_700_000_000_000;
pub(crate) const WINDOW: i64 = 10_000;

pub(crate) struct Events {
    pub csv: String,
    pub expected: BTreeMap<(String, i64), u64>,
    pub late: Vec<(String, i64)>,
}

/// 5000 events 100 ms apart over 5 keys, shuffled within blocks of 20 (2 s,
/// inside the 5 s out-of-orderness), and 3 records from the first window
/// injected thousands of records later (behind the watermark by then).
pub(crate) fn events() -> Events {
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

pub(crate) fn window_job(source: &str, checkpoint: &str) -> String {
    format!(
        r#"
name = "windows"
{checkpoint}
[[source]]
uid = "events"
{source}
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
    )
}

/// Every window fired once with its full count, exactly the late records late.
pub(crate) fn check_windows(out: &Path, events: &Events) {
    let mut fired = BTreeMap::new();
    for line in weir_tests::read_parts(&out.join("counts")) {
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

    let mut late: Vec<(String, i64)> = weir_tests::read_parts(&out.join("late"))
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

#[test]
fn tumbling_windows_fire_on_out_of_order_input() {
    let events = events();
    let job = JobDir::new();
    job.write("events.csv", &events.csv);
    let path = job.job(&window_job("kind = \"file\"\npath = \"events.csv\"", ""));
    run(&path).expect("job runs");
    check_windows(&job.path().join("out"), &events);
}

/// The first 1500 events arrive on a socket; once a checkpoint covers them
/// the job is cancelled (its uncommitted tail is discarded), and it resumes
/// from that checkpoint reading the whole file from the restored byte
/// offset. Open windows (map state) and their event-time timers come back
/// from the checkpoint: the output equals a straight run's.
#[test]
fn open_windows_and_their_timers_resume_from_a_checkpoint() {
    let events = events();
    let job = JobDir::new();
    job.write("events.csv", &events.csv);
    let split = events
        .csv
        .match_indices('\n')
        .nth(1499)
        .map(|(i, _)| i + 1)
        .expect("1500 lines");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    let first_half = events.csv[..split].to_string();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("the job connects");
        stream.write_all(first_half.as_bytes()).expect("send");
        // Keep the connection open: the job is cancelled, not ended.
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    });
    let checkpointing = "[checkpoint]\ninterval = \"50ms\"\ndir = \"checkpoints\"";
    let path = job.job(&window_job(
        &format!("kind = \"socket\"\naddress = \"{address}\""),
        checkpointing,
    ));
    let graph = weir::job::JobGraph::load(&path).expect("job");
    let prepared = weir::runner::prepare(engine(), graph).expect("prepare");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let covered = |read: &weir::checkpoint::metadata::ReadMetadata| {
        read.metadata.operators["events"].subtasks[0].position == Some(split as u64)
    };
    let outcome = runtime.block_on(async {
        let canceller = std::sync::Mutex::new(None);
        let mut hook = |running: &weir::runner::Attempt| {
            *canceller.lock().expect("lock") = Some(running.canceller());
        };
        let run = weir::runner::run(&prepared, &mut hook);
        tokio::pin!(run);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            tokio::select! {
                outcome = &mut run => break outcome,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {
                    let latest = prepared.checkpoints.as_ref().and_then(|c| c.latest());
                    if latest.as_ref().is_some_and(covered)
                        && let Some(cancel) = canceller.lock().expect("lock").as_ref()
                    {
                        let _ = cancel.send(true);
                    }
                    assert!(tokio::time::Instant::now() < deadline, "no checkpoint covered the first half");
                }
            }
        }
    });
    assert!(outcome.expect("cancelled cleanly").cancelled);
    drop(server);
    let latest = prepared
        .checkpoints
        .as_ref()
        .and_then(|c| c.latest())
        .expect("a checkpoint");
    assert!(covered(&latest));
    assert!(
        latest.metadata.operators["windows"]
            .subtasks
            .iter()
            .any(|s| s.timers.is_some()),
        "open windows have timers in the checkpoint"
    );

    let resumed = job.job(&window_job(
        "kind = \"file\"\npath = \"events.csv\"",
        checkpointing,
    ));
    let graph = weir::job::JobGraph::load(&resumed).expect("job");
    let options = weir::runner::RunOptions {
        restore: Some(latest.path.clone().into()),
        allow_non_restored_state: false,
        ..Default::default()
    };
    let prepared = weir::runner::prepare_with(engine(), graph, &options).expect("restores");
    runtime
        .block_on(weir::runner::run(&prepared, &mut |_| {}))
        .expect("the resumed job ends");
    check_windows(&job.path().join("out"), &events);
}
