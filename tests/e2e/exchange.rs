//! Exchanges: a keyed edge carried through NATS JetStream. One job file
//! holds both sides (split → `exchange` sink; `exchange` source → count),
//! each side checkpointing its own input positions and pending output.

use std::path::Path;

use weir_tests::plugins::{WORDCOUNT_COUNT, WORDCOUNT_SPLIT};

use crate::checkpoints::{completed_checkpoints, delays};
use crate::support::{JobDir, spawn_weir, toml_path, weir};

fn server() -> Option<String> {
    weir_tests::nats::server().map(|s| s.url.clone())
}

/// lines (a file, paced) → split → exchange `name`; exchange `name` → count
/// (parallelism 2, keyed) → file sink `out`.
fn exchange_job(url: &str, name: &str, rate: u32) -> String {
    format!(
        r#"
name = "exchanged"
max_parallelism = 16

[checkpoint]
interval = "100ms"
dir = "checkpoints"
retained = 2

[[source]]
uid = "lines"
kind = "file"
path = "input.txt"
rate = {rate}

[[operator]]
uid = "split"
plugin = {split}
inputs = ["lines"]

[[sink]]
uid = "to-count"
kind = "exchange"
url = "{url}"
exchange = "{name}"
inputs = ["split"]

[[source]]
uid = "words"
kind = "exchange"
url = "{url}"
exchange = "{name}"
parallelism = 2

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
        split = toml_path(WORDCOUNT_SPLIT),
        count = toml_path(WORDCOUNT_COUNT),
    )
}

fn newest(dir: &Path) -> Option<String> {
    completed_checkpoints(&dir.join("checkpoints"))
        .pop()
        .map(|p| p.to_string_lossy().into_owned())
}

#[test]
fn a_keyed_edge_through_an_exchange_counts_exactly_once_through_sigkills() {
    let Some(url) = server() else { return };
    let job = JobDir::new();
    let text = weir_tests::sample_text(3000, 21);
    let expected = weir_tests::count_words(&text);
    job.write("input.txt", &text);
    let path = job.job(&exchange_job(&url, "xc.kills", 1000));
    let seed = crate::support::seed("WEIR_EXCHANGE_SEED", "exchange kill test");
    let mut resumed = 0;
    let mut finished = false;
    for (round, delay) in delays(seed).take(8).enumerate() {
        let mut args = vec!["run".to_string(), path.to_string_lossy().into_owned()];
        if let Some(newest) = newest(job.path()) {
            args.extend(["-s".to_string(), newest]);
            resumed += 1;
        }
        let mut child = spawn_weir(&args, job.path(), &[]);
        std::thread::sleep(delay);
        let ended_by_itself = child.try_wait().expect("wait").is_some();
        child.kill().ok(); // SIGKILL
        let output = child.wait_with_output().expect("reaped");
        assert!(
            !ended_by_itself || output.status.success(),
            "run {round} failed on its own: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        if ended_by_itself {
            finished = true;
            break;
        }
    }
    if !finished {
        let mut args = vec!["run", path.to_str().expect("utf-8")];
        let newest = newest(job.path());
        if let Some(newest) = &newest {
            args.extend(["-s", newest.as_str()]);
        }
        let ran = weir(&args, job.path());
        assert!(
            ran.status.success(),
            "the last run finishes: {}",
            String::from_utf8_lossy(&ran.stderr)
        );
    }
    assert!(
        resumed >= 3,
        "most runs resumed from a checkpoint ({resumed})"
    );
    let lines = weir_tests::read_parts(&job.path().join("out"));
    weir_tests::check_exact_updates(&lines, &expected)
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));

    // What the reader's committed checkpoints read was purged as they
    // committed: a run from the beginning on the same exchange is refused,
    // never fed what is left.
    let again = weir(&["run", path.to_str().expect("utf-8")], job.path());
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success(), "{said}");
    assert!(
        said.contains("exchange `xc.kills`: key group")
            && said.contains("was purged up to sequence")
            && said.contains("this start reads it from sequence 1"),
        "{said}"
    );
}

/// Event time crosses the exchange: the writers' watermarks reach the
/// windows downstream (the minimum over writers), so every window fires
/// once with its full count and exactly the late records are late.
#[test]
fn watermarks_cross_an_exchange_and_fire_the_windows_downstream() {
    let Some(url) = server() else { return };
    let events = crate::event_time::events();
    let job = JobDir::new();
    job.write("events.csv", &events.csv);
    let path = job.job(&format!(
        r#"
name = "exchanged-windows"
[checkpoint]
interval = "100ms"
dir = "checkpoints"

[[source]]
uid = "events"
kind = "file"
path = "events.csv"
rate = 1000
format = {{ delimiter = ",", key = 1, timestamp = 0 }}
watermark = {{ out_of_orderness = "5s" }}

[[sink]]
uid = "to-windows"
kind = "exchange"
url = "{url}"
exchange = "xc.windows"
inputs = ["events"]

[[source]]
uid = "keyed"
kind = "exchange"
url = "{url}"
exchange = "xc.windows"
parallelism = 2

[[operator]]
uid = "windows"
plugin = {plugin}
inputs = [{{ from = "keyed", partition = "key" }}]
parallelism = 2
config = {{ size_ms = {window} }}

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
        plugin = toml_path(weir_tests::plugins::TUMBLING_WINDOW),
        window = crate::event_time::WINDOW,
    ));
    let ran = weir(&["run", path.to_str().expect("utf-8")], job.path());
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    crate::event_time::check_windows(&job.path().join("out"), &events);
}

#[test]
fn bad_exchange_settings_are_named() {
    let job = JobDir::new();
    let path = job.job(
        r#"
name = "bad-exchange"
[[source]]
uid = "words"
kind = "exchange"
exchange = "no spaces"
[[sink]]
uid = "out"
kind = "exchange"
url = "nats://127.0.0.1:1"
inputs = ["words"]
"#,
    );
    let ran = weir(&["run", path.to_str().expect("utf-8")], job.path());
    let stderr = String::from_utf8_lossy(&ran.stderr);
    assert!(!ran.status.success());
    for expected in [
        "source `words`: an exchange source needs `url` (its NATS)",
        "source `words`: exchange \"no spaces\" must be dot-separated tokens",
        "sink `out`: an exchange sink needs `exchange` (its name)",
        "sink `out`: an exchange sink needs `[checkpoint] interval`",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
}
