//! Savepoints end to end: golden runs (straight, with checkpoints, stopped
//! with a savepoint at p=2 and resumed at p=3 and p=1 give the same output),
//! `--drain`, plugin upgrades with and without a migration, a removed
//! operator, relocation, and damaged savepoints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use weir::checkpoint::metadata::{self, SnapshotKind};
use weir::checkpoint::savepoint;
use weir::dataflow::runtime::JobOutcome;
use weir::runner::Attempt;
use weir::runner::{self, RunError, RunOptions};
use weir_tests::plugins::{
    COUNT_V2_NO_MIGRATE, WORDCOUNT_COUNT, WORDCOUNT_COUNT_V2, WORDCOUNT_SPLIT,
};

use crate::checkpoints::generator_counts;
use crate::event_time::{check_windows, events, window_job};
use crate::support::{JobDir, engine, runtime, toml_path};

pub(crate) fn options(restore: Option<&Path>, allow_non_restored_state: bool) -> RunOptions {
    RunOptions {
        restore: restore.map(|p| p.to_path_buf().into()),
        allow_non_restored_state,
        ..Default::default()
    }
}

/// Runs a job to its end.
pub(crate) fn run(path: &Path, options: RunOptions) -> Result<JobOutcome, RunError> {
    let graph = weir::job::JobGraph::load(path).map_err(RunError::from)?;
    let job = runner::prepare_with(engine(), graph, &options)?;
    runtime().block_on(runner::run(&job, &mut |_| {}))
}

/// Runs a job and stops it with a savepoint under `target` once its sources
/// have emitted `after` records (drained first with `drain`). Returns the
/// savepoint directory.
pub(crate) fn run_and_stop(path: &Path, after: u64, target: &Path, drain: bool) -> PathBuf {
    run_and_stop_from(path, RunOptions::default(), after, target, drain)
}

/// [`run_and_stop`] for a job started with `options` (e.g. restored).
pub(crate) fn run_and_stop_from(
    path: &Path,
    options: RunOptions,
    after: u64,
    target: &Path,
    drain: bool,
) -> PathBuf {
    run_and_stop_as(path, options, after, target, drain, false)
}

/// [`run_and_stop_from`], the savepoint native (the backend's files) when
/// `native`.
fn run_and_stop_as(
    path: &Path,
    options: RunOptions,
    after: u64,
    target: &Path,
    drain: bool,
    native: bool,
) -> PathBuf {
    let graph = weir::job::JobGraph::load(path).expect("job file");
    let job = runner::prepare_with(engine(), graph, &options).expect("prepare");
    let target = target.to_path_buf();
    let outcome = runtime()
        .block_on(runner::run(&job, &mut |running: &Attempt| {
            let metrics = running.metrics().to_vec();
            let savepointer = running.savepointer();
            let target = target.clone();
            tokio::spawn(async move {
                loop {
                    let read: u64 = metrics
                        .iter()
                        .filter(|m| m.is_source)
                        .map(|m| m.records_out())
                        .sum();
                    if read >= after {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let taken = if native {
                    savepointer.native_savepoint(target, Some(drain)).await
                } else {
                    savepointer.savepoint(target, Some(drain)).await
                };
                taken.expect("the savepoint completes");
            });
        }))
        .expect("the job stops");
    let dir = outcome.savepoint.expect("stopped with a savepoint");
    assert!(!outcome.cancelled);
    dir.local().expect("a local savepoint").to_path_buf()
}

/// Copies every file of `from` into `to` (a sink's committed output going
/// along with a savepoint).
pub(crate) fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
}

pub(crate) fn sorted(mut lines: Vec<String>) -> Vec<String> {
    lines.sort();
    lines
}

pub(crate) const WORDS: u64 = 6000;

/// The word count (generator words → `split` → `count` → file sink) at
/// `count` parallelism `p`, writing to `out`.
pub(crate) fn wordcount_job(p: u32, out: &str, checkpoint: &str, count_plugin: &str) -> String {
    format!(
        r#"
name = "wordcount"
max_parallelism = 64
{checkpoint}

[[source]]
uid = "words"
kind = "generator"
count = {WORDS}
rate = 6000
keys = 50
seed = 7

[[operator]]
uid = "split"
plugin = {split}
inputs = ["words"]
parallelism = 2

[[operator]]
uid = "count"
plugin = {count}
inputs = [{{ from = "split", partition = "key" }}]
parallelism = {p}

[[sink]]
uid = "out"
kind = "file"
path = "{out}"
inputs = ["count"]
"#,
        split = toml_path(WORDCOUNT_SPLIT),
        count = toml_path(count_plugin),
    )
}

pub(crate) fn expected_words() -> BTreeMap<String, u64> {
    let mut expected = BTreeMap::new();
    generator_counts(WORDS, 50, 7, &mut expected);
    expected
}

/// The word count run straight through at p=2 in `job`: its sorted output.
fn straight_output(job: &JobDir) -> Vec<String> {
    let straight = job.write(
        "straight.toml",
        wordcount_job(2, "straight", "", WORDCOUNT_COUNT),
    );
    run(&straight, RunOptions::default()).expect("straight run");
    sorted(weir_tests::read_parts(&job.path().join("straight")))
}

/// The golden test: the word count straight through, with checkpoints, and
/// stopped with a savepoint at p=2 then resumed at p=3 and at p=1: every
/// run's final output is the straight run's.
#[test]
fn wordcount_resumes_from_a_savepoint_at_other_parallelism_with_the_straight_output() {
    let job = JobDir::new();
    let golden = straight_output(&job);
    weir_tests::check_exact_updates(&golden, &expected_words()).expect("straight run is exact");

    let checkpointed = job.write(
        "checkpointed.toml",
        wordcount_job(
            2,
            "checkpointed",
            "[checkpoint]\ninterval = \"100ms\"\ndir = \"checkpoints\"",
            WORDCOUNT_COUNT,
        ),
    );
    run(&checkpointed, RunOptions::default()).expect("checkpointed run");
    assert_eq!(
        sorted(weir_tests::read_parts(&job.path().join("checkpointed"))),
        golden
    );

    let first = job.write("p2.toml", wordcount_job(2, "p2", "", WORDCOUNT_COUNT));
    let savepoint = run_and_stop(&first, WORDS / 3, &job.path().join("savepoints"), false);
    let read = metadata::read(&savepoint).expect("a savepoint");
    assert_eq!(read.metadata.kind, SnapshotKind::Savepoint);
    let position = read.metadata.operators["words"].subtasks[0]
        .position
        .expect("a position");
    assert!(
        position > 0 && position < WORDS,
        "stopped mid-stream at {position}"
    );
    for p in [3, 1] {
        let out = format!("p2-then-p{p}");
        copy_dir(&job.path().join("p2"), &job.path().join(&out));
        let resumed = job.write(
            &format!("p{p}.toml"),
            wordcount_job(p, &out, "", WORDCOUNT_COUNT),
        );
        run(&resumed, options(Some(&savepoint), false)).expect("resumes");
        assert!(
            sorted(weir_tests::read_parts(&job.path().join(&out))) == golden,
            "stopped at p=2 and resumed at p={p}: the straight run's output"
        );
    }
}

/// A native savepoint (each subtask's RocksDB files, what the running
/// host's upgrades take) restores file for file at the same parallelism,
/// cell by cell at another, and migrated into count v2: the straight run's
/// output every time.
#[test]
fn a_native_savepoint_restores_at_any_parallelism_and_migrates() {
    let job = JobDir::new();
    let golden = straight_output(&job);
    let first = job.write("p2.toml", wordcount_job(2, "p2", "", WORDCOUNT_COUNT));
    let savepoint = run_and_stop_as(
        &first,
        RunOptions::default(),
        WORDS / 3,
        &job.path().join("savepoints"),
        false,
        true,
    );
    let read = metadata::read(&savepoint).expect("a savepoint");
    let count = &read.metadata.operators["count"];
    assert!(
        count
            .subtasks
            .iter()
            .all(|s| s.backend.as_deref() == Some("rocksdb")),
        "native: the backend's files"
    );
    for (p, plugin) in [
        (2, WORDCOUNT_COUNT),
        (3, WORDCOUNT_COUNT),
        (3, WORDCOUNT_COUNT_V2),
    ] {
        let out = format!(
            "native-p{p}-{}",
            if plugin == WORDCOUNT_COUNT {
                "v1"
            } else {
                "v2"
            }
        );
        copy_dir(&job.path().join("p2"), &job.path().join(&out));
        let resumed = job.write(&format!("{out}.toml"), wordcount_job(p, &out, "", plugin));
        run(&resumed, options(Some(&savepoint), false)).expect("resumes");
        assert!(
            sorted(weir_tests::read_parts(&job.path().join(&out))) == golden,
            "{out}: the straight run's output"
        );
    }
}

/// The event-time example the same way: open windows (map state) and their
/// timers travel in the savepoint and fire after the resumption.
#[test]
fn event_time_windows_resume_from_a_savepoint_at_other_parallelism() {
    let events = events();
    let job = JobDir::new();
    job.write("events.csv", &events.csv);
    let source = "kind = \"file\"\npath = \"events.csv\"\nrate = 5000";
    let checkpointing = "[checkpoint]\ninterval = \"100ms\"\ndir = \"checkpoints\"";
    let at = |p: u32, out: &str, checkpoint: &str| {
        window_job(source, checkpoint)
            .replace("parallelism = 2", &format!("parallelism = {p}"))
            .replace("out/", &format!("{out}/"))
    };
    let straight = job.write("straight.toml", at(2, "straight", ""));
    run(&straight, RunOptions::default()).expect("straight");
    check_windows(&job.path().join("straight"), &events);
    let checkpointed = job.write("checkpointed.toml", at(2, "checkpointed", checkpointing));
    run(&checkpointed, RunOptions::default()).expect("checkpointed");
    check_windows(&job.path().join("checkpointed"), &events);

    // Stopped well before the late records (3000+): the watermark restarts
    // from the beginning after a restore, as in Flink.
    let first = job.write("p2.toml", at(2, "p2", ""));
    let savepoint = run_and_stop(&first, 1000, &job.path().join("savepoints"), false);
    let inspection = savepoint::inspect(&metadata::read(&savepoint).expect("reads"));
    let windows = inspection
        .operators
        .iter()
        .find(|o| o.uid == "windows")
        .expect("windows");
    assert!(windows.timer_bytes > 0, "open windows' timers are saved");
    for p in [3, 1] {
        let out = format!("p2-then-p{p}");
        for sink in ["counts", "late"] {
            copy_dir(
                &job.path().join("p2").join(sink),
                &job.path().join(&out).join(sink),
            );
        }
        let resumed = job.write(&format!("p{p}.toml"), at(p, &out, ""));
        run(&resumed, options(Some(&savepoint), false)).expect("resumes");
        check_windows(&job.path().join(&out), &events);
    }
}

/// `--drain`: the watermark goes to the end before the savepoint, so every
/// open window fires and the savepoint holds no timers.
#[test]
fn a_drained_stop_fires_every_window_before_the_savepoint() {
    let events = events();
    let job = JobDir::new();
    job.write("events.csv", &events.csv);
    let toml = window_job("kind = \"file\"\npath = \"events.csv\"\nrate = 5000", "");
    let path = job.job(&toml);
    let savepoint = run_and_stop(&path, 1000, &job.path().join("savepoints"), true);
    let read = metadata::read(&savepoint).expect("reads");
    let windows = &read.metadata.operators["windows"];
    assert!(
        windows.subtasks.iter().all(|s| s.timers.is_none()),
        "every timer fired"
    );
    let position = read.metadata.operators["events"].subtasks[0]
        .position
        .expect("position") as usize;
    let read_lines = events.csv[..position].lines().count() as u64;
    let fired: u64 = weir_tests::read_parts(&job.path().join("out/counts"))
        .iter()
        .map(|line| {
            line.rsplit(' ')
                .next()
                .expect("count")
                .parse::<u64>()
                .expect("n")
        })
        .sum();
    let late = weir_tests::read_parts(&job.path().join("out/late")).len() as u64;
    assert_eq!(
        fired + late,
        read_lines,
        "every event read before the stop is in a fired window"
    );
}

/// Upgrade: `count` v1 (state `u64`) is savepointed and resumed with v2
/// (a struct state, schema version 2, with a migration): the counts carry
/// on. A v2 without the migration export fails with the documented error.
#[test]
fn an_upgraded_plugin_migrates_the_state_and_counts_carry_on() {
    let job = JobDir::new();
    let v1 = job.write("v1.toml", wordcount_job(2, "out", "", WORDCOUNT_COUNT));
    let savepoint = run_and_stop(&v1, WORDS / 2, &job.path().join("savepoints"), false);

    let unmigrated = job.write(
        "nomigrate.toml",
        wordcount_job(2, "out", "", COUNT_V2_NO_MIGRATE),
    );
    let error = run(&unmigrated, options(Some(&savepoint), false))
        .expect_err("no migrate export")
        .to_string();
    for needle in [
        "uid `count` state `count`",
        "schema version changed from 1 to 2",
        "no migrate export",
    ] {
        assert!(error.contains(needle), "{needle:?} in {error}");
    }

    let v2 = job.write("v2.toml", wordcount_job(3, "out", "", WORDCOUNT_COUNT_V2));
    run(&v2, options(Some(&savepoint), false)).expect("v2 migrates and resumes");
    let lines = weir_tests::read_parts(&job.path().join("out"));
    weir_tests::check_exact_updates(&lines, &expected_words())
        .expect("v2 continues every count where v1 left it");
}

/// A savepoint of a three-operator job restored into a two-operator job:
/// the start fails naming the removed uid and pointing at
/// `--allow-non-restored-state`; with it, the job runs and its counts carry
/// on.
#[test]
fn a_removed_operator_fails_the_restore_unless_allowed() {
    let job = JobDir::new();
    let three = wordcount_job(2, "out", "", WORDCOUNT_COUNT)
        + &format!(
            r#"
[[operator]]
uid = "recount"
plugin = {count}
inputs = [{{ from = "count", partition = "key" }}]

[[sink]]
uid = "recounted"
kind = "blackhole"
inputs = ["recount"]
"#,
            count = toml_path(WORDCOUNT_COUNT)
        );
    let path = job.write("three.toml", &three);
    let savepoint = run_and_stop(&path, WORDS / 2, &job.path().join("savepoints"), false);
    let two = job.write("two.toml", wordcount_job(2, "out", "", WORDCOUNT_COUNT));
    let error = run(&two, options(Some(&savepoint), false))
        .expect_err("recount is gone")
        .to_string();
    assert!(error.contains("uid `recount`"), "{error}");
    assert!(error.contains("--allow-non-restored-state"), "{error}");
    assert!(
        !error.contains("uid `recounted`"),
        "a stateless sink is no loss: {error}"
    );
    run(&two, options(Some(&savepoint), true)).expect("-n skips it");
    let lines = weir_tests::read_parts(&job.path().join("out"));
    weir_tests::check_exact_updates(&lines, &expected_words()).expect("counts carry on");
}

/// A savepoint directory moved elsewhere restores: every path inside is
/// relative to it.
#[test]
fn a_moved_savepoint_restores() {
    let job = JobDir::new();
    let path = job.write("job.toml", wordcount_job(2, "out", "", WORDCOUNT_COUNT));
    let savepoint = run_and_stop(&path, WORDS / 2, &job.path().join("savepoints"), false);
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let moved = elsewhere.path().join("archive").join("sp");
    std::fs::create_dir_all(moved.parent().expect("parent")).expect("mkdir");
    std::fs::rename(&savepoint, &moved).expect("move");
    assert!(!savepoint.exists());
    run(&path, options(Some(&moved.join("_metadata")), false)).expect("restores");
    let lines = weir_tests::read_parts(&job.path().join("out"));
    weir_tests::check_exact_updates(&lines, &expected_words()).expect("counts carry on");
}

/// Damage: every truncation of `_metadata` and of a data file, and a sample
/// of single-byte flips of both, fail validation naming the file; a full
/// start on a damaged savepoint restores nothing; a `_metadata` that points
/// outside the savepoint is rejected.
#[test]
fn a_damaged_savepoint_fails_naming_the_file_and_restores_nothing() {
    let job = JobDir::new();
    let toml = wordcount_job(2, "out", "", WORDCOUNT_COUNT).replace("keys = 50", "keys = 8");
    let path = job.write("job.toml", &toml);
    let savepoint = run_and_stop(&path, 300, &job.path().join("savepoints"), false);
    let read = savepoint::validate(&savepoint).expect("intact");
    let meta = read.path.clone();
    let data = read.resolve(
        read.metadata.operators["count"]
            .subtasks
            .iter()
            .flat_map(|s| &s.files)
            .next()
            .expect("a state file"),
    );
    for file in [&meta, &data] {
        let original = std::fs::read(file).expect("read");
        let name = file
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let mut damaged: Vec<Vec<u8>> = (0..original.len())
            .map(|n| original[..n].to_vec())
            .collect();
        for at in (0..original.len()).step_by((original.len() / 40).max(1)) {
            let mut flipped = original.clone();
            flipped[at] ^= 1 << (at % 8);
            damaged.push(flipped);
        }
        for bytes in &damaged {
            std::fs::write(file, bytes).expect("damage");
            let error = savepoint::validate(&savepoint)
                .expect_err("damage is caught")
                .to_string();
            assert!(error.contains(&name), "names {name}: {error}");
        }
        // Through the real start: fails before anything runs or is written.
        std::fs::write(file, &original[..original.len() / 2]).expect("truncate");
        let before = weir_tests::read_parts(&job.path().join("out")).len();
        let error = run(&path, options(Some(&savepoint), false))
            .expect_err("a damaged savepoint")
            .to_string();
        assert!(error.contains(&name), "{error}");
        assert_eq!(
            weir_tests::read_parts(&job.path().join("out")).len(),
            before
        );
        assert!(
            !job.path().join("weir-data").join("state").exists() || {
                std::fs::read_dir(job.path().join("weir-data/state"))
                    .map_or(true, |mut d| d.next().is_none())
            }
        );
        std::fs::write(file, &original).expect("restore");
    }
    savepoint::validate(&savepoint).expect("intact again");

    // A data file that is a symlink to an identical file outside the
    // savepoint directory is not followed out of it.
    let outside_copy = job.path().join("outside-copy");
    std::fs::copy(&data, &outside_copy).expect("copy");
    let original = std::fs::read(&data).expect("read");
    std::fs::remove_file(&data).expect("remove");
    std::os::unix::fs::symlink(&outside_copy, &data).expect("symlink");
    let error = savepoint::validate(&savepoint)
        .expect_err("the symlink leads outside")
        .to_string();
    let name = data
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(error.contains(&name), "{error}");
    std::fs::remove_file(&data).expect("remove the link");
    std::fs::write(&data, original).expect("put it back");
    savepoint::validate(&savepoint).expect("intact again");

    // A reference leaving the directory, with a valid checksum.
    let mut escaped = read.metadata.clone();
    let op = escaped.operators.get_mut("count").expect("count");
    op.subtasks[0].files[0].path = "../../etc/passwd".into();
    let outside = job.path().join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    let out = weir::types::OutDir::open(&outside).expect("open");
    metadata::write(&out, &escaped).expect("write");
    let error = savepoint::validate(&outside)
        .expect_err("escapes")
        .to_string();
    assert!(error.contains("outside the savepoint directory"), "{error}");
}

/// A stop-with-savepoint of an operator's state survives a look with
/// `inspect`: key counts per state, plugin, source positions.
#[test]
fn inspect_reports_keys_bytes_plugins_and_positions() {
    let job = JobDir::new();
    let path = job.write("job.toml", wordcount_job(2, "out", "", WORDCOUNT_COUNT));
    let savepoint = run_and_stop(&path, WORDS / 2, &job.path().join("savepoints"), false);
    let read = metadata::read(&savepoint).expect("reads");
    let inspection = savepoint::inspect(&read);
    let count = inspection
        .operators
        .iter()
        .find(|o| o.uid == "count")
        .expect("count");
    let plugin = count.plugin.as_ref().expect("plugin");
    assert_eq!(
        (plugin.name.as_str(), plugin.version.as_str()),
        ("count", "0.1.0")
    );
    assert_eq!(plugin.digest.len(), 64);
    let state = &count.states[0];
    assert_eq!(
        (
            state.name.as_str(),
            state.kind.as_str(),
            state.schema_version
        ),
        ("count", "value", 1)
    );
    let position = read.metadata.operators["words"].subtasks[0]
        .position
        .expect("position");
    let mut seen = BTreeMap::new();
    generator_counts(position, 50, 7, &mut seen);
    assert_eq!(state.keys, Some(seen.len() as u64), "one key per word seen");
    assert!(state.bytes.is_some_and(|b| b > 0));
    let words = inspection
        .operators
        .iter()
        .find(|o| o.uid == "words")
        .expect("words");
    assert_eq!(words.positions, vec![position]);
}
