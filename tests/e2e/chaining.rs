//! Operator chaining: the golden word count and the event-time example
//! give the same output chained (the default) and unchained (`chain =
//! false`), with checkpoints, and through a savepoint taken chained and
//! restored unchained, and the other way round.

use std::path::Path;

use weir::job::JobGraph;
use weir::runner::RunOptions;
use weir_tests::plugins::{TUMBLING_WINDOW, UPPERCASE, WORDCOUNT_COUNT, WORDCOUNT_SPLIT};

use crate::checkpoints::completed_checkpoints;
use crate::event_time::{WINDOW, check_windows, events};
use crate::savepoints::{WORDS, copy_dir, expected_words, options, run, run_and_stop, sorted};
use crate::support::{JobDir, toml_path};

/// Checkpoints every 100 ms, under `checkpoints/<out>`.
fn checkpoints(out: &str) -> String {
    format!("[checkpoint]\ninterval = \"100ms\"\ndir = \"checkpoints/{out}\"")
}

/// The newest checkpoint of the run writing `out` holds state of every
/// operator in `uids`, each under its own uid.
fn check_checkpointed(job: &JobDir, out: &str, uids: &[&str]) {
    let completed = completed_checkpoints(&job.path().join("checkpoints").join(out));
    let newest = completed.last().expect("checkpoints completed");
    let read = weir::checkpoint::metadata::read(newest).expect("reads");
    for uid in uids {
        assert!(
            read.metadata.operators.contains_key(*uid),
            "{out}: `{uid}` is in {}",
            newest.display()
        );
    }
}

fn chains(path: &Path) -> Vec<String> {
    JobGraph::load(path).expect("job file").chain_names()
}

/// generator words → `split` → `upper` (forward) → `count` (by key) →
/// `shout` (forward) → file sink, every operator at p=2: `split → upper`
/// and `count → shout` chain unless `chained` is false.
fn wordcount_job(chained: bool, out: &str, checkpoint: &str) -> String {
    let chain = if chained { "" } else { "chain = false" };
    format!(
        r#"
name = "chained-wordcount"
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
uid = "upper"
plugin = {upper}
inputs = ["split"]
parallelism = 2
{chain}

[[operator]]
uid = "count"
plugin = {count}
inputs = [{{ from = "upper", partition = "key" }}]
parallelism = 2

[[operator]]
uid = "shout"
plugin = {upper}
inputs = ["count"]
parallelism = 2
{chain}

[[sink]]
uid = "out"
kind = "file"
path = "{out}"
inputs = ["shout"]
"#,
        split = toml_path(WORDCOUNT_SPLIT),
        upper = toml_path(UPPERCASE),
        count = toml_path(WORDCOUNT_COUNT),
    )
}

#[test]
fn the_word_count_gives_the_same_output_chained_and_unchained_through_savepoints_either_way() {
    let job = JobDir::new();
    let expected = expected_words()
        .into_iter()
        .map(|(word, n)| (word.to_ascii_uppercase(), n))
        .collect();

    let chained = job.write(
        "chained.toml",
        wordcount_job(true, "chained", &checkpoints("chained")),
    );
    assert_eq!(chains(&chained), ["split → upper", "count → shout"]);
    run(&chained, RunOptions::default()).expect("chained run");
    let golden = sorted(weir_tests::read_parts(&job.path().join("chained")));
    weir_tests::check_exact_updates(&golden, &expected).expect("the chained run is exact");
    check_checkpointed(&job, "chained", &["split", "upper", "count", "shout"]);

    let unchained = job.write(
        "unchained.toml",
        wordcount_job(false, "unchained", &checkpoints("unchained")),
    );
    assert!(chains(&unchained).is_empty());
    run(&unchained, RunOptions::default()).expect("unchained run");
    assert!(
        sorted(weir_tests::read_parts(&job.path().join("unchained"))) == golden,
        "unchained: the chained run's output"
    );
    check_checkpointed(&job, "unchained", &["split", "upper", "count", "shout"]);

    for (first, then) in [(true, false), (false, true)] {
        let name = |chained: bool| if chained { "chained" } else { "unchained" };
        let out = format!("{}-then-{}", name(first), name(then));
        let stopped = job.write(
            &format!("{out}-first.toml"),
            wordcount_job(first, &out, &checkpoints(&format!("{out}-first"))),
        );
        let savepoint = run_and_stop(&stopped, WORDS / 3, &job.path().join("savepoints"), false);
        let resumed = job.write(
            &format!("{out}-then.toml"),
            wordcount_job(then, &out, &checkpoints(&out)),
        );
        run(&resumed, options(Some(&savepoint), false)).expect("resumes");
        check_checkpointed(&job, &out, &["count", "shout"]);
        assert!(
            sorted(weir_tests::read_parts(&job.path().join(&out))) == golden,
            "savepoint taken {} and restored {}: the same output",
            name(first),
            name(then)
        );
    }
}

/// events → `windows` (by key) → `upper` (forward, chained unless
/// `chained` is false) → `counts`; `windows:late` → `late`.
fn window_job(chained: bool, out: &str, checkpoint: &str) -> String {
    let chain = if chained { "" } else { "chain = false" };
    format!(
        r#"
name = "chained-windows"
{checkpoint}
[[source]]
uid = "events"
kind = "file"
path = "events.csv"
rate = 5000
format = {{ delimiter = ",", key = 1, timestamp = 0 }}
watermark = {{ out_of_orderness = "5s" }}

[[operator]]
uid = "windows"
plugin = {windows}
inputs = [{{ from = "events", partition = "key" }}]
parallelism = 2
config = {{ size_ms = {WINDOW} }}

[[operator]]
uid = "upper"
plugin = {upper}
inputs = ["windows"]
parallelism = 2
{chain}

[[sink]]
uid = "counts"
kind = "file"
path = "{out}/counts"
inputs = ["upper"]

[[sink]]
uid = "late"
kind = "file"
path = "{out}/late"
inputs = ["windows:late"]
"#,
        windows = toml_path(TUMBLING_WINDOW),
        upper = toml_path(UPPERCASE),
    )
}

/// The windows' output in `out`, sorted, after `upper` (so the keys are
/// upper case); checked against the events once lowered again.
fn window_output(job: &JobDir, out: &str, events: &crate::event_time::Events) -> Vec<String> {
    let counts = sorted(weir_tests::read_parts(&job.path().join(out).join("counts")));
    let lowered = job.path().join(format!("{out}-lowered"));
    std::fs::create_dir_all(lowered.join("counts")).expect("mkdir");
    let text: String = counts
        .iter()
        .map(|line| format!("{}\n", line.to_ascii_lowercase()))
        .collect();
    std::fs::write(lowered.join("counts").join("part-0"), text).expect("write");
    copy_dir(&job.path().join(out).join("late"), &lowered.join("late"));
    check_windows(&lowered, events);
    counts
}

#[test]
fn event_time_windows_give_the_same_output_chained_and_unchained_through_savepoints_either_way() {
    let events = events();
    let job = JobDir::new();
    job.write("events.csv", &events.csv);

    let chained = job.write(
        "chained.toml",
        window_job(true, "chained", &checkpoints("chained")),
    );
    assert_eq!(chains(&chained), ["windows → upper"]);
    run(&chained, RunOptions::default()).expect("chained run");
    let golden = window_output(&job, "chained", &events);
    check_checkpointed(&job, "chained", &["windows", "upper"]);

    let unchained = job.write(
        "unchained.toml",
        window_job(false, "unchained", &checkpoints("unchained")),
    );
    assert!(chains(&unchained).is_empty());
    run(&unchained, RunOptions::default()).expect("unchained run");
    assert_eq!(window_output(&job, "unchained", &events), golden);
    check_checkpointed(&job, "unchained", &["windows", "upper"]);

    // Stopped well before the late records (3000+), as in the savepoint
    // tests: open windows and their timers travel in the savepoint.
    for (first, then) in [(true, false), (false, true)] {
        let name = |chained: bool| if chained { "chained" } else { "unchained" };
        let out = format!("{}-then-{}", name(first), name(then));
        let stopped = job.write(
            &format!("{out}-first.toml"),
            window_job(first, &out, &checkpoints(&format!("{out}-first"))),
        );
        let savepoint = run_and_stop(&stopped, 1000, &job.path().join("savepoints"), false);
        let resumed = job.write(
            &format!("{out}-then.toml"),
            window_job(then, &out, &checkpoints(&out)),
        );
        run(&resumed, options(Some(&savepoint), false)).expect("resumes");
        check_checkpointed(&job, &out, &["windows", "upper"]);
        assert_eq!(
            window_output(&job, &out, &events),
            golden,
            "savepoint taken {} and restored {}",
            name(first),
            name(then)
        );
    }
}
