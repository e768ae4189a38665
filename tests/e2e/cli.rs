//! The `weir` binary: the demo job runs embedded and prints its summary; bad
//! job files and failing plugins end with exit code 1 and a message naming
//! the file, key or operator.

use weir_tests::plugins::{
    FAULTS, TUMBLING_WINDOW, WORDCOUNT_COUNT, WORDCOUNT_COUNT_V2, WORDCOUNT_SPLIT,
};

use crate::support::total;
use crate::support::{JobDir, scrape, toml_path, weir};

/// Copies an example's job file and inputs into a temp dir, with its plugins
/// in `plugins/` as the demo script puts them.
fn example(name: &str, plugins: &[(&str, &str)]) -> JobDir {
    let job = JobDir::new();
    let source = weir_tests::workspace().join("examples").join(name);
    for entry in std::fs::read_dir(&source).expect("example dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, job.path().join(path.file_name().expect("name"))).expect("copy");
        }
    }
    std::fs::create_dir_all(job.path().join("plugins")).expect("mkdir");
    for (file, built) in plugins {
        std::fs::copy(built, job.path().join("plugins").join(file)).expect("copy plugin");
    }
    job
}

#[test]
fn the_wordcount_example_runs_embedded() {
    let job = example(
        "wordcount",
        &[
            ("split.wasm", WORDCOUNT_SPLIT),
            ("count.wasm", WORDCOUNT_COUNT),
        ],
    );
    let output = weir(&["run", "job.toml"], job.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "weir run failed: {stderr}");
    assert!(stderr.contains("job `wordcount` finished"), "{stderr}");
    assert!(
        stderr.contains("state `count`"),
        "summary shows the keyed state: {stderr}"
    );
    assert!(stderr.contains("(rocksdb)"), "{stderr}");
    let input = std::fs::read_to_string(job.path().join("input.txt")).expect("input");
    let lines = weir_tests::read_parts(&job.path().join("out"));
    assert_eq!(
        weir_tests::final_counts(&lines),
        weir_tests::count_words(&input)
    );
    assert!(
        !job.path()
            .join("weir-data/state")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "a finished run leaves no working state behind"
    );
}

#[test]
fn the_union_example_counts_both_sources() {
    let job = example(
        "wordcount",
        &[
            ("split.wasm", WORDCOUNT_SPLIT),
            ("count.wasm", WORDCOUNT_COUNT),
        ],
    );
    let output = weir(&["run", "union.toml", "-q"], job.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "weir run failed: {stderr}");
    let mut input = std::fs::read_to_string(job.path().join("input.txt")).expect("input");
    input.push('\n');
    input.push_str(&std::fs::read_to_string(job.path().join("more.txt")).expect("more"));
    let lines = weir_tests::read_parts(&job.path().join("out-union"));
    weir_tests::check_exact_updates(&lines, &weir_tests::count_words(&input)).expect("exact");
}

#[test]
fn the_tumbling_window_example_runs_embedded() {
    let job = example(
        "tumbling-window",
        &[("tumbling-window.wasm", TUMBLING_WINDOW)],
    );
    let output = weir(&["run", "job.toml"], job.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "weir run failed: {stderr}");
    let counts = weir_tests::read_parts(&job.path().join("out/counts"));
    let total: u64 = counts
        .iter()
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|c| c.parse::<u64>().ok())
                .expect("count")
        })
        .sum();
    let late = weir_tests::read_parts(&job.path().join("out/late"));
    let events = std::fs::read_to_string(job.path().join("events.csv")).expect("events");
    assert_eq!(
        total + late.len() as u64,
        events.lines().count() as u64,
        "every event is counted or late"
    );
    assert_eq!(late.len(), 2, "the two very late events: {late:?}");
}

#[test]
fn a_stdout_sink_prints_records_and_the_summary_goes_to_stderr() {
    let job = JobDir::new();
    job.write("input.txt", "to be or not to be\n");
    job.job(&format!(
        r#"
name = "stdout"
[[source]]
uid = "lines"
kind = "file"
path = "input.txt"
[[operator]]
uid = "split"
plugin = {split}
inputs = ["lines"]
[[sink]]
uid = "print"
kind = "stdout"
inputs = ["split"]
"#,
        split = toml_path(WORDCOUNT_SPLIT)
    ));
    let output = weir(&["run", "job.toml"], job.path());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "to\nbe\nor\nnot\nto\nbe\n"
    );
}

#[test]
fn a_bad_job_file_names_the_file_and_the_key() {
    let job = JobDir::new();
    job.job("name = \"x\"\n[checkpoint]\nintervall = \"1s\"\n");
    let output = weir(&["run", "job.toml"], job.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("job.toml"), "{stderr}");
    assert!(stderr.contains("intervall"), "{stderr}");
}

#[test]
fn an_invalid_job_lists_every_problem() {
    let job = JobDir::new();
    job.job(
        r#"
name = "x"
max_parallelism = 4
[[source]]
uid = "lines"
kind = "file"
[[operator]]
uid = "op"
plugin = "nowhere.wasm"
inputs = ["missing"]
parallelism = 8
[[sink]]
uid = "out"
kind = "stdout"
inputs = ["op"]
"#,
    );
    let output = weir(&["run", "job.toml"], job.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    for needle in [
        "a file source needs `path`",
        "nowhere.wasm does not exist",
        "input `missing` names no source or operator",
        "`op`: parallelism = 8 must be between 1 and max_parallelism (4)",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in: {stderr}");
    }
}

/// Every fault of the test suite's faults plugin ends `weir run` with an
/// error that names the operator and states its cause once, sizes and
/// durations as people write them.
#[test]
fn every_plugin_fault_states_its_cause_once() {
    let job = JobDir::new();
    job.write("input.txt", "boom\n");
    for (fault, cause) in [
        ("alloc", "memory limit of 64 MiB"),
        (
            "trap",
            "plugin trapped in process: wasm `unreachable` instruction executed",
        ),
        ("panic", "plugin trapped in process"),
        ("loop", "call timeout of 300 ms"),
        ("error", "failing on purpose"),
    ] {
        job.job(&format!(
            r#"
name = "evil"
[[source]]
uid = "lines"
kind = "file"
path = "input.txt"
[[operator]]
uid = "evil"
plugin = {faults}
inputs = ["lines"]
config = {{ fault = "{fault}" }}
limits = {{ call_timeout = "300ms", memory = "64MiB" }}
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["evil"]
"#,
            faults = toml_path(FAULTS)
        ));
        let output = weir(&["run", "job.toml", "-q"], job.path());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{fault}: {stderr}");
        // What weir says (a guest's own panic message and the job id
        // line aside): one line, naming the operator, the cause once.
        let said: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("job `") && !l.contains("panicked at"))
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(said.len(), 1, "{fault}: one error line: {stderr}");
        let line = said[0];
        assert!(line.starts_with("error: "), "{fault}: {line}");
        assert!(line.contains("`evil` (subtask 0)"), "{fault}: {line}");
        assert_eq!(
            line.matches(cause).count(),
            1,
            "{fault}: {cause:?} once in {line}"
        );
        assert_eq!(line.matches("failed:").count(), 1, "{fault}: {line}");
    }
}

#[test]
fn a_job_file_typo_names_the_key_and_what_is_allowed() {
    let job = JobDir::new();
    job.job(&format!(
        r#"
name = "typo"
[[source]]
uid = "words"
kind = "generator"
count = 10
[[operator]]
uid = "count"
plugin = {count}
inputs = [{{ from = "words", partition = "keys" }}]
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["count"]
"#,
        count = toml_path(WORDCOUNT_COUNT)
    ));
    let output = weir(&["run", "job.toml"], job.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("job.toml"), "names the file: {stderr}");
    assert!(
        stderr.contains(
            "partition = \"keys\" is not a partitioning; use one of: forward, key, rebalance"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("did not match any variant"), "{stderr}");
}

#[test]
fn a_looping_plugin_ends_the_run_with_an_error_naming_the_operator() {
    let job = JobDir::new();
    job.write("input.txt", "boom\n");
    job.job(&format!(
        r#"
name = "looping"
[[source]]
uid = "lines"
kind = "file"
path = "input.txt"
[[operator]]
uid = "spinner"
plugin = {faults}
inputs = ["lines"]
config = {{ fault = "loop" }}
limits = {{ call_timeout = "200ms" }}
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["spinner"]
"#,
        faults = toml_path(FAULTS)
    ));
    let output = weir(&["run", "job.toml"], job.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("`spinner`"), "{stderr}");
    assert!(stderr.contains("call timeout"), "{stderr}");
}

#[test]
fn plugin_inspect_prints_the_declared_states() {
    let job = JobDir::new();
    let output = weir(&["plugin", "inspect", WORDCOUNT_COUNT], job.path());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("plugin    count"), "{stdout}");
    assert!(
        stdout.contains("state     count (value state, schema version 1)"),
        "{stdout}"
    );
}

/// Spawns `weir ARGS`, and once the job has started (its plugins loaded)
/// waits `after` and sends SIGTERM; returns its output.
fn run_then_sigterm(
    args: &[&str],
    dir: &std::path::Path,
    after: std::time::Duration,
) -> std::process::Output {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .current_dir(dir)
        .env("WEIR_CACHE_DIR", weir_tests::compile_cache())
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("weir starts");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut seen = String::new();
    while !seen.contains("started, job id") {
        let mut line = String::new();
        if stderr.read_line(&mut line).expect("read stderr") == 0 {
            break;
        }
        seen.push_str(&line);
    }
    std::thread::sleep(after);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut rest).expect("read stderr");
        rest
    });
    let mut output = child.wait_with_output().expect("weir ends");
    seen.push_str(&rest.join().expect("reader"));
    output.stderr = seen.into_bytes();
    output
}

#[test]
fn an_embedded_run_serves_its_metrics() {
    use std::io::BufRead;
    let job = example(
        "wordcount",
        &[
            ("split.wasm", WORDCOUNT_SPLIT),
            ("count.wasm", WORDCOUNT_COUNT),
        ],
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", "stream.toml", "--metrics", "127.0.0.1:0"])
        .current_dir(job.path())
        .env("WEIR_CACHE_DIR", weir_tests::compile_cache())
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("weir starts");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut url = None;
    let mut seen = String::new();
    while url.is_none() {
        let mut line = String::new();
        if stderr.read_line(&mut line).expect("read stderr") == 0 {
            break;
        }
        url = line
            .trim()
            .strip_prefix("metrics at ")
            .and_then(|u| u.strip_suffix("/metrics"))
            .map(str::to_string);
        seen.push_str(&line);
    }
    let url = url.unwrap_or_else(|| panic!("no metrics address in: {seen}"));
    let started = std::time::Instant::now();
    let job_label = [("job", "wordstream")];
    let count = [("job", "wordstream"), ("operator", "count")];
    loop {
        let scrape = scrape(&url);
        let records = total(&scrape, "weir_records_in_total", &count);
        let checkpoints = total(&scrape, "weir_checkpoints_completed_total", &job_label);
        if records > 0.0 && checkpoints >= 1.0 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "no records and checkpoints at {url}: {records} records, {checkpoints} checkpoints"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The example's upgrade path as its README shows it: the wordcount with
/// `count` v1 is stopped with a savepoint, and `upgrade.toml` (count v2 at
/// parallelism 3) resumes it; the final counts are the input's.
#[test]
fn the_wordcount_example_upgrades_count_through_a_savepoint() {
    let job = example(
        "wordcount",
        &[
            ("split.wasm", WORDCOUNT_SPLIT),
            ("count.wasm", WORDCOUNT_COUNT),
            ("count-v2.wasm", WORDCOUNT_COUNT_V2),
        ],
    );
    let toml = std::fs::read_to_string(job.path().join("job.toml")).expect("job");
    let paced = toml.replace("path = \"input.txt\"", "path = \"input.txt\"\nrate = 5");
    assert_ne!(paced, toml, "the source is paced");
    std::fs::write(job.path().join("job.toml"), paced).expect("write");
    let output = run_then_sigterm(
        &["run", "job.toml", "--savepoint-dir", "savepoints"],
        job.path(),
        std::time::Duration::from_millis(600),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let savepoint = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        savepoint.starts_with("savepoints/"),
        "{savepoint:?} {stderr}"
    );
    let resumed = weir(&["run", "upgrade.toml", "-s", &savepoint], job.path());
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("plugin count 0.2.0"), "{stderr}");
    let input = std::fs::read_to_string(job.path().join("input.txt")).expect("input");
    let lines = weir_tests::read_parts(&job.path().join("out"));
    weir_tests::check_exact_updates(&lines, &weir_tests::count_words(&input))
        .expect("v2 carries on every count of v1");
}

/// `weir run --savepoint-dir` stopped by SIGTERM prints the savepoint's
/// path; `weir savepoint inspect` reads it (text and JSON) without plugins;
/// a copy elsewhere restores with `-s`; `--dispose` deletes it, and refuses
/// a directory that is not a savepoint.
#[test]
fn sigterm_stops_with_a_savepoint_that_inspect_reads_and_dispose_deletes() {
    let job = JobDir::new();
    job.job(&format!(
        r#"
name = "sigterm"
[[source]]
uid = "words"
kind = "generator"
count = 40000
rate = 10000
keys = 30
[[operator]]
uid = "count"
plugin = {count}
inputs = [{{ from = "words", partition = "key" }}]
parallelism = 2
[[sink]]
uid = "out"
kind = "file"
path = "out"
inputs = ["count"]
"#,
        count = toml_path(WORDCOUNT_COUNT)
    ));
    let output = run_then_sigterm(
        &["run", "job.toml", "--savepoint-dir", "savepoints"],
        job.path(),
        std::time::Duration::from_millis(700),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("stopped with a savepoint"), "{stderr}");
    let printed = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(printed.starts_with("savepoints/savepoint-"), "{printed:?}");
    let savepoint = job.path().join(&printed);
    assert!(savepoint.join("_metadata").is_file());

    let inspect = weir(&["savepoint", "inspect", &printed], job.path());
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    assert!(text.starts_with("savepoint"), "{text}");
    assert!(text.contains("plugin  count 0.1.0"), "{text}");
    assert!(
        text.contains("state   count  value state, schema version 1  30 keys"),
        "{text}"
    );
    assert!(text.contains("position per subtask"), "{text}");

    // A copy elsewhere, given as its `_metadata`, restores.
    let elsewhere = JobDir::new();
    let copy = elsewhere.path().join("sp");
    std::fs::create_dir_all(&copy).expect("mkdir");
    for entry in std::fs::read_dir(&savepoint).expect("dir").flatten() {
        std::fs::copy(entry.path(), copy.join(entry.file_name())).expect("copy");
    }
    let json = weir(
        &[
            "savepoint",
            "inspect",
            "--json",
            &copy.join("_metadata").to_string_lossy(),
        ],
        job.path(),
    );
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(value["kind"], "savepoint");
    let count = value["operators"]
        .as_array()
        .expect("operators")
        .iter()
        .find(|o| o["uid"] == "count")
        .expect("count");
    assert_eq!(count["states"][0]["keys"], 30);
    let resumed = weir(
        &["run", "-q", "job.toml", "-s", &copy.to_string_lossy()],
        job.path(),
    );
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let lines = weir_tests::read_parts(&job.path().join("out"));
    assert_eq!(lines.len(), 40000, "every update once across the stop");

    let dispose = weir(&["savepoint", "--dispose", &printed], job.path());
    assert!(
        dispose.status.success(),
        "{}",
        String::from_utf8_lossy(&dispose.stderr)
    );
    assert!(!savepoint.exists(), "disposed of");
    let not_one = weir(&["savepoint", "--dispose", "out"], job.path());
    assert!(!not_one.status.success());
    let stderr = String::from_utf8_lossy(&not_one.stderr);
    assert!(stderr.contains("_metadata"), "{stderr}");
    assert!(job.path().join("out").is_dir(), "nothing deleted");
}

/// `weir savepoint read` prints an operator's state as data, without the
/// plugin: from a canonical savepoint (SIGTERM mid-run: each word's count
/// is its last committed update) and from a checkpoint's RocksDB base and
/// deltas (a bounded job's final checkpoint: every word's full count), as
/// JSON lines and CSV, one key or all; a wrong uid or state names what
/// there is.
#[test]
fn savepoints_read_and_written_as_data_without_the_plugin() {
    use std::collections::BTreeMap;
    let job_toml = |count: u64, rate: u64| {
        format!(
            r#"
name = "read"
max_parallelism = 16
[checkpoint]
interval = "100ms"
[[source]]
uid = "words"
kind = "generator"
count = {count}
rate = {rate}
keys = 30
seed = 7
[[operator]]
uid = "count"
plugin = {plugin}
inputs = [{{ from = "words", partition = "key" }}]
parallelism = 2
[[sink]]
uid = "out"
kind = "file"
path = "out"
inputs = ["count"]
"#,
            plugin = toml_path(WORDCOUNT_COUNT)
        )
    };
    let read_counts = |args: &[&str], dir: &std::path::Path| -> BTreeMap<String, u64> {
        let output = weir(args, dir);
        assert!(
            output.status.success(),
            "weir {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| {
                let cell: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
                assert_eq!(cell["state"], "count", "{line}");
                assert!(cell["key_group"].as_u64().is_some_and(|g| g < 16), "{line}");
                (
                    cell["key"].as_str().expect("a text key").to_string(),
                    cell["value"].as_u64().expect("a JSON count"),
                )
            })
            .collect()
    };

    // A canonical savepoint taken at SIGTERM.
    let job = JobDir::new();
    job.job(&job_toml(400_000, 20_000));
    let output = run_then_sigterm(
        &["run", "job.toml", "--savepoint-dir", "savepoints"],
        job.path(),
        std::time::Duration::from_millis(1500),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let savepoint = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let committed = crate::host::check_exactly_once(&job.path().join("out"));
    let read = read_counts(
        &["savepoint", "read", &savepoint, "--uid", "count"],
        job.path(),
    );
    assert_eq!(
        read, committed,
        "the savepoint holds what the sink committed"
    );

    // One key; CSV.
    let (word, n) = committed.iter().next().expect("a word");
    let one = read_counts(
        &[
            "savepoint",
            "read",
            &savepoint,
            "--uid",
            "count",
            "--key",
            word,
        ],
        job.path(),
    );
    assert_eq!(one, BTreeMap::from([(word.clone(), *n)]));
    let csv = weir(
        &[
            "savepoint",
            "read",
            &savepoint,
            "--uid",
            "count",
            "--state",
            "count",
            "--format",
            "csv",
        ],
        job.path(),
    );
    let csv = String::from_utf8_lossy(&csv.stdout);
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("state,key_group,key,value"));
    assert_eq!(lines.count(), committed.len());
    assert!(csv.contains(&format!(",{word},{n}\n")), "{csv}");

    // Bad input names what there is.
    let bad = weir(
        &["savepoint", "read", &savepoint, "--uid", "nope"],
        job.path(),
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        stderr.contains("no operator `nope`; the operators with keyed state are: count"),
        "{stderr}"
    );
    let bad = weir(
        &[
            "savepoint",
            "read",
            &savepoint,
            "--uid",
            "count",
            "--state",
            "nope",
        ],
        job.path(),
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("operator `count` has no state `nope`; its states are: count"),
        "{stderr}"
    );

    // Read → write → restore: the state read, written as a new savepoint
    // at another parallelism (no source positions: the generator starts
    // over), restored into a new run, which adds its counts to it.
    let lines = weir(
        &["savepoint", "read", &savepoint, "--uid", "count"],
        job.path(),
    );
    job.write("state.jsonl", &lines.stdout);
    let written = weir(
        &[
            "savepoint",
            "write",
            "--uid",
            "count",
            "--state",
            "count",
            "--from",
            "state.jsonl",
            "--plugin",
            WORDCOUNT_COUNT,
            "--parallelism",
            "3",
            "--max-parallelism",
            "16",
            "-o",
            "bootstrapped",
        ],
        job.path(),
    );
    assert!(
        written.status.success(),
        "{}",
        String::from_utf8_lossy(&written.stderr)
    );
    let seeded = String::from_utf8_lossy(&written.stdout).trim().to_string();
    assert_eq!(
        read_counts(
            &["savepoint", "read", &seeded, "--uid", "count"],
            job.path()
        ),
        committed,
        "written as read"
    );
    let resumed = JobDir::new();
    let more = 6000;
    resumed.job(&job_toml(more, 100_000));
    let seeded_path = job.path().join(&seeded).to_string_lossy().into_owned();
    let output = weir(&["run", "job.toml", "-s", &seeded_path], resumed.path());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for line in weir_tests::read_parts(&resumed.path().join("out")) {
        let (word, n) = line.rsplit_once(' ').expect("word count");
        let n: u64 = n.parse().expect("count");
        let entry = last.entry(word.to_string()).or_default();
        *entry = (*entry).max(n);
    }
    let mut expected = committed.clone();
    let mut added = BTreeMap::new();
    crate::checkpoints::generator_counts(more, 30, 7, &mut added);
    for (word, n) in added {
        *expected.entry(word).or_default() += n;
    }
    assert_eq!(last, expected, "the run counted on from the written state");

    // The same lines for count v2, whose state `count` is at schema
    // version 2: refused as they are, migrated offline with --transform.
    let for_v2 = |extra: &[&str]| {
        let mut args = vec![
            "savepoint",
            "write",
            "--uid",
            "count",
            "--state",
            "count",
            "--from",
            "state.jsonl",
            "--plugin",
            WORDCOUNT_COUNT_V2,
            "--max-parallelism",
            "16",
            "-o",
        ];
        args.extend_from_slice(extra);
        weir(&args, job.path())
    };
    let refused = for_v2(&["unmigrated"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains(
            "line 1: a value of schema version 1, but state `count` is written at schema version 2"
        ) && stderr.contains("give --transform to migrate it with the plugin's migrate export"),
        "{stderr}"
    );
    let migrated = for_v2(&["migrated", "--transform"]);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let migrated_dir = String::from_utf8_lossy(&migrated.stdout).trim().to_string();
    let lines = weir(
        &["savepoint", "read", &migrated_dir, "--uid", "count"],
        job.path(),
    );
    let mut v2: BTreeMap<String, u64> = BTreeMap::new();
    for line in String::from_utf8_lossy(&lines.stdout).lines() {
        let cell: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert_eq!(cell["schema_version"], 2, "{line}");
        assert!(cell["value"]["last_seen"].is_null(), "{line}");
        v2.insert(
            cell["key"].as_str().expect("a key").to_string(),
            cell["value"]["count"].as_u64().expect("v2's count"),
        );
    }
    assert_eq!(v2, committed, "every count migrated into count v2's value");

    // Bad lines are named, every one, and nothing is written.
    job.write(
        "bad.jsonl",
        "{\"state\":\"count\",\"key_group\":3,\"key\":\"bo\",\"value\":1}\n\
         {\"state\":\"other\",\"key_group\":0,\"key\":\"x\",\"value\":1}\n\
         {\"state\":\"count\",\"schema_version\":2,\"key_group\":0,\"key\":\"y\",\"value\":1}\n",
    );
    let bad = weir(
        &[
            "savepoint",
            "write",
            "--uid",
            "count",
            "--state",
            "count",
            "--from",
            "bad.jsonl",
            "--max-parallelism",
            "16",
            "-o",
            "never",
        ],
        job.path(),
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    let bo_group = weir::types::key_group::of_key(b"bo", 16);
    if bo_group != 3 {
        assert!(
            stderr.contains(&format!(
                "line 1: key \"bo\" is in key group {bo_group} (max_parallelism 16), the line says 3"
            )),
            "{stderr}"
        );
    }
    assert!(
        stderr.contains("line 2: state `other`, but this savepoint is written for state `count`"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "line 3: a value of schema version 2, but state `count` is written at schema version 1"
        ),
        "{stderr}"
    );
    assert!(!job.path().join("never").exists(), "nothing written");

    // A bounded job's final checkpoint: RocksDB base and deltas.
    let bounded = JobDir::new();
    let records = 30_000;
    bounded.job(&job_toml(records, 100_000));
    let output = weir(&["run", "job.toml"], bounded.path());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The newest completed checkpoint (its `_metadata`).
    let chk =
        crate::checkpoints::completed_checkpoints(&bounded.path().join("weir-data/checkpoints"))
            .pop()
            .expect("a completed checkpoint");
    let chk = chk.to_string_lossy().into_owned();
    let mut expected = BTreeMap::new();
    crate::checkpoints::generator_counts(records, 30, 7, &mut expected);
    let read = read_counts(
        &["savepoint", "read", &chk, "--uid", "count"],
        bounded.path(),
    );
    assert_eq!(
        read, expected,
        "the final checkpoint holds every word's full count"
    );
}
