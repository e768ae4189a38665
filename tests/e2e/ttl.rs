//! State TTL: a state's time-to-live declared by its plugin (the SDK) and
//! overridden by the job file's `state_ttl`; expired cells read as absent
//! while the job runs (event time: deterministic), are dropped by a restore
//! (processing time), and are shown by `plugin inspect`, `savepoint
//! inspect` and `savepoint read`; bad `state_ttl` is refused naming what is
//! wrong.

use std::collections::BTreeMap;
use std::path::Path;

use weir_tests::plugins::TTL_COUNT;

use crate::support::{JobDir, run, toml_path, weir};

const BASE: i64 = 1_700_000_000_000;

/// Job `ttl`: `ttl-count` keyed on the input's first field (with the
/// second as event time when `timed`), `extra` appended to its
/// `[[operator]]`, writing `out`. The source's uid is the input file's
/// stem (a restore reading another input starts it afresh, with `-n`).
fn ttl_job(input: &str, timed: bool, extra: &str) -> String {
    let format = match timed {
        true => {
            "format = { delimiter = \",\", key = 1, timestamp = 0 }\nwatermark = { out_of_orderness = \"1s\" }"
        }
        false => "format = { delimiter = \",\", key = 0 }",
    };
    let uid = input.split('.').next().expect("a file name");
    format!(
        r#"
name = "ttl"
max_parallelism = 16
[checkpoint]
interval = "100ms"
[[source]]
uid = "{uid}"
kind = "file"
path = "{input}"
{format}
[[operator]]
uid = "count"
plugin = {plugin}
inputs = [{{ from = "{uid}", partition = "key" }}]
parallelism = 2
{extra}
[[sink]]
uid = "out"
kind = "file"
path = "out"
inputs = ["count"]
"#,
        plugin = toml_path(TTL_COUNT)
    )
}

/// Every output line `key count total`, by key, in order.
fn outputs(dir: &Path) -> BTreeMap<String, Vec<(u64, u64)>> {
    let mut by_key: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for line in weir_tests::read_parts(&dir.join("out")) {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 3, "`key count total`: {line:?}");
        let (count, total) = (
            fields[1].parse().expect("count"),
            fields[2].parse().expect("total"),
        );
        by_key
            .entry(fields[0].to_string())
            .or_default()
            .push((count, total));
    }
    for updates in by_key.values_mut() {
        updates.sort_by_key(|&(_, total)| total);
    }
    by_key
}

/// A copy of `dir` (its job, input, output and checkpoints).
fn copy_of(dir: &JobDir) -> JobDir {
    let copy = JobDir::new();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", dir.path().display()))
        .arg(copy.path())
        .status()
        .expect("cp runs");
    assert!(status.success(), "copying {}", dir.path().display());
    copy
}

/// The outputs `after` has that `before` had not (by key, in order).
fn new_outputs(before: &JobDir, after: &JobDir) -> BTreeMap<String, Vec<(u64, u64)>> {
    let old = outputs(before.path());
    let mut new = outputs(after.path());
    for (key, updates) in &mut new {
        let seen = old.get(key).map_or(&[][..], Vec::as_slice);
        updates.retain(|update| !seen.contains(update));
    }
    new
}

fn succeeded(output: &std::process::Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn an_event_time_ttl_expires_a_key_left_alone_while_the_others_go_on() {
    // Keys k0..k4 every 100 ms of event time (each every 500 ms), and key
    // `x` at 0 s, 1 s and then 250 s: past its 30 s TTL by the watermark.
    let mut rows: Vec<(i64, String)> = (0..3000)
        .map(|i| (BASE + i * 100, format!("k{}", i % 5)))
        .collect();
    rows.insert(0, (BASE, "x".to_string()));
    rows.insert(11, (BASE + 1_000, "x".to_string()));
    rows.insert(2501, (BASE + 250_000, "x".to_string()));
    let csv: String = rows
        .iter()
        .map(|(ts, key)| format!("{ts},{key}\n"))
        .collect();
    let job = JobDir::new();
    job.write("events.csv", csv);
    let path = job.job(&ttl_job(
        "events.csv",
        true,
        r#"state_ttl = { count = { ttl = "30s", time = "event" } }"#,
    ));
    run(&path).expect("job runs");
    let out = outputs(job.path());
    assert_eq!(
        out["x"],
        vec![(1, 1), (2, 2), (1, 3)],
        "x's count expired after 250 s of event time; its total did not"
    );
    for k in 0..5 {
        let updates = &out[&format!("k{k}")];
        assert_eq!(updates.len(), 600);
        assert!(
            updates.iter().all(|(count, total)| count == total),
            "k{k}, updated every 500 ms, never expired: {:?}",
            updates.iter().find(|(c, t)| c != t)
        );
    }
}

#[test]
fn a_restore_drops_expired_cells_and_state_ttl_overrides_the_plugins_declaration() {
    let inspect = succeeded(
        &weir(&["plugin", "inspect", TTL_COUNT], Path::new(".")),
        "plugin inspect",
    );
    assert!(
        inspect.contains(
            "state     count (value state, schema version 1, TTL 1h (on create and write, processing time))"
        ) && inspect.contains("state     total (value state, schema version 1)\n"),
        "{inspect}"
    );

    // Run 1: the plugin's 1 h TTL; every word's count in its final checkpoint.
    let first = JobDir::new();
    let words: String = (0..1000).map(|i| format!("w{}\n", i % 5)).collect();
    first.write("words.txt", words);
    first.job(&ttl_job("words.txt", false, ""));
    succeeded(&weir(&["run", "job.toml"], first.path()), "run 1");
    let chk =
        crate::checkpoints::completed_checkpoints(&first.path().join("weir-data/checkpoints"))
            .pop()
            .expect("a completed checkpoint");
    let chk = chk.to_string_lossy().into_owned();
    let inspected = succeeded(
        &weir(&["savepoint", "inspect", &chk], first.path()),
        "inspect",
    );
    assert!(
        inspected.contains("state   count  value state, schema version 1, TTL 1h (on create and write, processing time)"),
        "{inspected}"
    );
    let read = succeeded(
        &weir(
            &[
                "savepoint",
                "read",
                &chk,
                "--uid",
                "count",
                "--state",
                "count",
            ],
            first.path(),
        ),
        "savepoint read",
    );
    let cells: Vec<serde_json::Value> = read
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(cells.len(), 5, "{read}");
    for cell in &cells {
        assert_eq!(cell["value"], 200, "{cell}");
        assert!(
            cell["updated_ms"].as_u64().is_some(),
            "a TTL cell's stamp: {cell}"
        );
    }

    // Written back as data for the plugin: the TTL in `_metadata`, the
    // stamps kept.
    first.write("cells.jsonl", &read);
    let args = [
        "savepoint",
        "write",
        "--uid",
        "count",
        "--state",
        "count",
        "--from",
        "cells.jsonl",
        "--plugin",
        TTL_COUNT,
        "--max-parallelism",
        "16",
        "-o",
        "written",
    ];
    let written = succeeded(&weir(&args, first.path()), "savepoint write");
    let written = first
        .path()
        .join(written.trim())
        .to_string_lossy()
        .into_owned();
    let inspected = succeeded(
        &weir(&["savepoint", "inspect", &written], first.path()),
        "inspect",
    );
    assert!(inspected.contains("TTL 1h"), "{inspected}");
    let reread = succeeded(
        &weir(
            &["savepoint", "read", &written, "--uid", "count"],
            first.path(),
        ),
        "savepoint read",
    );
    let sorted = |text: &str| {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines.sort();
        lines
    };
    assert_eq!(
        sorted(&reread),
        sorted(&read),
        "read, written, read again alike"
    );

    // Run 2, restored with the count's TTL overridden to 1 s, well after
    // it: the counts were dropped on restore, the totals go on. (Each
    // restore runs in a copy of run 1's directory: the file sink commits
    // the checkpoint's pending part where run 1 left it.)
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let more: String = (0..10).map(|_| "w0\n".to_string()).collect();
    let second = copy_of(&first);
    second.write("more.txt", &more);
    second.job(&ttl_job(
        "more.txt",
        false,
        r#"state_ttl = { count = "1s" }"#,
    ));
    succeeded(
        &weir(&["run", "job.toml", "-s", &chk, "-n"], second.path()),
        "run 2",
    );
    let expected: Vec<(u64, u64)> = (1..=10).map(|n| (n, 200 + n)).collect();
    assert_eq!(new_outputs(&first, &second)["w0"], expected);

    // Run 3, restored with the TTL off: the counts go on, unstamped.
    let third = copy_of(&first);
    third.write("more.txt", &more);
    third.job(&ttl_job(
        "more.txt",
        false,
        r#"state_ttl = { count = "off" }"#,
    ));
    succeeded(
        &weir(&["run", "job.toml", "-s", &chk, "-n"], third.path()),
        "run 3",
    );
    let expected: Vec<(u64, u64)> = (1..=10).map(|n| (200 + n, 200 + n)).collect();
    assert_eq!(new_outputs(&first, &third)["w0"], expected);
    let chk3 =
        crate::checkpoints::completed_checkpoints(&third.path().join("weir-data/checkpoints"))
            .pop()
            .expect("a completed checkpoint");
    let chk3 = chk3.to_string_lossy().into_owned();
    let read = succeeded(
        &weir(
            &["savepoint", "read", &chk3, "--uid", "count", "--key", "w0"],
            third.path(),
        ),
        "savepoint read",
    );
    assert!(
        read.contains(r#""value":210"#) && !read.contains("updated_ms"),
        "no TTL, no stamp: {read}"
    );

    // Bad `state_ttl`: each named.
    let bad = JobDir::new();
    bad.write("more.txt", &more);
    for (setting, expected) in [
        (
            r#"state_ttl = { count = "soon" }"#,
            "operator `count` state_ttl `count`: \"soon\" is not a duration",
        ),
        (
            r#"state_ttl = { count = "0s" }"#,
            "operator `count` state_ttl `count`: \"0s\": a TTL must be longer than zero",
        ),
        (
            r#"state_ttl = { count = { ttl = "1h", time = "wall" } }"#,
            "operator `count` state_ttl `count`: time must be \"processing\" or \"event\"",
        ),
        (
            r#"state_ttl = { seen = "1h" }"#,
            "state_ttl names state `seen`, which plugin ttl-count 0.1.0",
        ),
    ] {
        bad.job(&ttl_job("more.txt", false, setting));
        let output = weir(&["run", "job.toml"], bad.path());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{setting}: refused");
        assert!(stderr.contains(expected), "{setting}: {stderr}");
        if setting.contains("seen") {
            assert!(stderr.contains("(its states: count, total)"), "{stderr}");
        }
    }
}
