//! The `kafka` connectors against a real Kafka-protocol broker (noida-db,
//! `weir_tests::kafka`, one broker for the test binary), checked from the
//! outside by a second client (confluent-kafka) reading `read_committed`:
//! the word count Kafka → count → Kafka exactly-once, through SIGKILLs at
//! random moments; a restore at another source parallelism; and bad
//! settings failing the start with errors naming the connector.

use std::time::Duration;

use weir::connectors::generator::{word, word_index};
use weir_tests::kafka::KafkaServer;
use weir_tests::plugins::{WORDCOUNT_COUNT, WORDCOUNT_COUNT_V2, WORDCOUNT_SPLIT};

use crate::checkpoints::{completed_checkpoints, delays, kill_after_input_ended};
use crate::support::{JobDir, spawn_weir, stop_with_savepoint, toml_path, weir};

/// The shared broker; None when it cannot be had outside CI.
fn server() -> Option<&'static KafkaServer> {
    weir_tests::kafka::server()
}

/// `n` lines of four generator words each (60 distinct words).
fn input_lines(n: u64, seed: u64) -> Vec<String> {
    (0..n)
        .map(|i| {
            (0..4)
                .map(|j| word(word_index(i * 4 + j, 60, seed)))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Kafka `<name>-in` (6 partitions) → split → count → Kafka `<name>-out`.
fn count_job(bootstrap: &str, name: &str, parallelism: u32, rate: u32, extra_sink: &str) -> String {
    format!(
        r#"
name = "kafka-count"
max_parallelism = 32

[checkpoint]
interval = "150ms"
dir = "checkpoints"
retained = 2

[[source]]
uid = "lines"
kind = "kafka"
bootstrap = "{bootstrap}"
topic = "{name}-in"
parallelism = {parallelism}
bounded = true
rate = {rate}

[[operator]]
uid = "split"
plugin = {split}
inputs = ["lines"]
parallelism = 2

[[operator]]
uid = "count"
plugin = {count}
inputs = [{{ from = "split", partition = "key" }}]
parallelism = 2

[[sink]]
uid = "out"
kind = "kafka"
bootstrap = "{bootstrap}"
topic = "{name}-out"
transactional_id_prefix = "{name}"
parallelism = 2
inputs = ["count"]
{extra_sink}
"#,
        split = toml_path(WORDCOUNT_SPLIT),
        count = toml_path(WORDCOUNT_COUNT),
    )
}

/// Creates `<name>-in` (6 partitions) holding `lines` and an empty
/// `<name>-out` (3 partitions).
fn prepare_topics(kafka: &KafkaServer, name: &str, lines: &[String]) {
    kafka.create_topic(&format!("{name}-in"), 6);
    kafka.create_topic(&format!("{name}-out"), 3);
    kafka.produce_lines(&format!("{name}-in"), 6, lines);
}

/// `weir run` of the job, resumed from its newest completed checkpoint if
/// there is one.
fn run_args(job: &JobDir) -> Vec<String> {
    let mut args = vec![
        "run".to_string(),
        job.path().join("job.toml").to_string_lossy().into_owned(),
        "-q".into(),
    ];
    if let Some(newest) = completed_checkpoints(&job.path().join("checkpoints")).pop() {
        args.push("-s".into());
        args.push(
            newest
                .parent()
                .expect("chk dir")
                .to_string_lossy()
                .into_owned(),
        );
    }
    args
}

#[test]
fn kafka_word_count_is_exactly_once_read_committed_from_outside() {
    let Some(kafka) = server() else { return };
    let job = JobDir::new();
    let name = "kwc";
    let lines = input_lines(3_000, 1);
    let mut text = lines.join("\n");
    prepare_topics(kafka, name, &lines);
    // A committed and an aborted transaction in the input: the source reads
    // the first and skips the second.
    let input = format!("{name}-in");
    kafka.produce(
        &input,
        &[(0, None, "committed words"), (4, None, "committed")],
        Some("txn"),
    );
    text.push_str("\ncommitted words\ncommitted");
    kafka.produce(
        &input,
        &[(1, None, "aborted words"), (5, None, "never")],
        Some("abort"),
    );
    let expected = weir_tests::count_words(&text);
    job.job(&count_job(&kafka.bootstrap, name, 2, 1_000_000, ""));
    let run = weir(&["run", "job.toml", "-q"], job.path());
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let out = kafka.read_committed(&format!("{name}-out"));
    let values: Vec<String> = out.iter().map(|r| r.value.clone()).collect();
    weir_tests::check_exact_updates(&values, &expected).expect("every update once");
    // Keyed by word: each word's updates in one partition, in order.
    for record in &out {
        let key = record.key.as_deref().expect("keyed updates");
        assert!(record.value.starts_with(&format!("{key} ")), "{record:?}");
    }
}

#[test]
fn kafka_in_and_out_survive_sigkill_at_random_moments_exactly_once() {
    let Some(kafka) = server() else { return };
    let job = JobDir::new();
    let name = "kcrash";
    // Two subtasks at 1500 lines/s each for 10 s: 16 runs of 150–850 ms do
    // not finish it, the last run does.
    let lines = input_lines(30_000, 3);
    let expected = weir_tests::count_words(&lines.join("\n"));
    prepare_topics(kafka, name, &lines);
    job.job(&count_job(&kafka.bootstrap, name, 2, 1500, ""));
    let seed = crate::support::seed("WEIR_CRASH_SEED", "kafka crash test");
    let mut restores = 0;
    let mut kills = 0;
    for (run, delay) in delays(seed).take(16).enumerate() {
        let args = run_args(&job);
        restores += usize::from(args.len() > 3);
        let mut child = spawn_weir(&args, job.path(), &[]);
        std::thread::sleep(delay);
        let ended_by_itself = child.try_wait().expect("wait").is_some();
        child.kill().ok(); // SIGKILL
        let output = child.wait_with_output().expect("reaped");
        assert!(
            !ended_by_itself || output.status.success(),
            "run {run} failed on its own: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        if ended_by_itself {
            break;
        }
        kills += 1;
    }
    assert!(
        restores >= 8,
        "most runs resumed from a checkpoint ({restores})"
    );
    // Then near the end, unpaced: each run killed 0–100 ms after it said
    // its sources' input ended: before, during or after the final
    // checkpoint, between its completion and the sinks' commit, or after.
    std::fs::write(
        job.path().join("job.toml"),
        count_job(&kafka.bootstrap, name, 2, 1_000_000, ""),
    )
    .expect("rewrite");
    for extra in delays(seed ^ 0xE4D).take(3) {
        let extra = Duration::from_millis(extra.as_millis() as u64 % 100);
        let (_, ended) = kill_after_input_ended(&run_args(&job), job.path(), extra);
        kills += usize::from(!ended);
    }
    assert!(kills >= 15, "at least 15 SIGKILLs ({kills})");
    let args = run_args(&job);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let finished = weir(&args, job.path());
    assert!(
        finished.status.success(),
        "the final run ends well: {}",
        String::from_utf8_lossy(&finished.stderr)
    );
    // Read to the end: nothing is left open (an open transaction would
    // hold the read_committed end back and updates would be missing).
    weir_tests::check_exact_updates(&kafka.read_values(&format!("{name}-out")), &expected)
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    // The finished job resumed from its final checkpoint writes nothing.
    let args = run_args(&job);
    assert!(args.len() > 3, "the finished job left a checkpoint");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let again = weir(&args, job.path());
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    weir_tests::check_exact_updates(&kafka.read_values(&format!("{name}-out")), &expected)
        .unwrap_or_else(|e| panic!("seed {seed}, resumed after the end: {e}"));
}

#[test]
fn a_savepoint_restores_the_kafka_source_from_two_to_three_subtasks_with_a_new_count_version() {
    let Some(kafka) = server() else { return };
    let job = JobDir::new();
    let name = "krescale";
    let lines = input_lines(9_000, 5);
    let expected = weir_tests::count_words(&lines.join("\n"));
    prepare_topics(kafka, name, &lines);
    // Two subtasks at 1500 lines/s: stopped with a savepoint after ~1 s.
    job.job(&count_job(&kafka.bootstrap, name, 2, 1500, ""));
    let child = spawn_weir(
        &["run", "job.toml", "-q", "--savepoint-dir", "savepoints"],
        job.path(),
        &[],
    );
    std::thread::sleep(Duration::from_millis(1200));
    let savepoint = stop_with_savepoint(child, &job.path().join("savepoints"));
    let read = weir::checkpoint::metadata::read(&savepoint.join("_metadata"))
        .expect("the savepoint reads");
    let positions: usize = read.metadata.operators["lines"]
        .subtasks
        .iter()
        .map(|s| s.partitions.len())
        .sum();
    assert_eq!(positions, 6, "every partition's position");
    let published = kafka.read_values(&format!("{name}-out")).len();
    assert!(
        published > 0 && published < expected.values().sum::<u64>() as usize,
        "stopped midway ({published} updates)"
    );
    // Three subtasks now (partitions reassigned), and count v2, whose
    // state migrates from v1's.
    std::fs::write(
        job.path().join("job.toml"),
        count_job(&kafka.bootstrap, name, 3, 100_000, "")
            .replace(&toml_path(WORDCOUNT_COUNT), &toml_path(WORDCOUNT_COUNT_V2)),
    )
    .expect("rewrite");
    let savepoint = savepoint.to_string_lossy().into_owned();
    let resumed = weir(&["run", "job.toml", "-q", "-s", &savepoint], job.path());
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    weir_tests::check_exact_updates(&kafka.read_values(&format!("{name}-out")), &expected)
        .unwrap_or_else(|e| panic!("after the restore at parallelism 3 with count v2: {e}"));
    // The resumed run's checkpoints were taken with count v2.
    // The newest completed checkpoint (the list is in completion order).
    let newest = completed_checkpoints(&job.path().join("checkpoints"))
        .pop()
        .expect("the resumed run checkpointed");
    let read = weir::checkpoint::metadata::read(&newest).expect("reads");
    let plugin = read.metadata.operators["count"]
        .plugin
        .as_ref()
        .expect("count's plugin");
    assert_eq!(plugin.version, "0.2.0", "{newest:?}");
}

#[test]
fn bad_kafka_settings_fail_the_start_naming_the_connector() {
    let Some(kafka) = server() else { return };
    kafka.create_topic("kbad-in", 2);
    kafka.create_topic("kbad-out", 1);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let source = |bootstrap: &str, topic: &str| {
        format!(
            "[[source]]\nuid = \"lines\"\nkind = \"kafka\"\nbootstrap = \"{bootstrap}\"\ntopic = \"{topic}\"\n"
        )
    };
    let sink = |bootstrap: &str, topic: &str, uid: &str| {
        format!(
            "[[sink]]\nuid = \"{uid}\"\nkind = \"kafka\"\nbootstrap = \"{bootstrap}\"\ntopic = \"{topic}\"\ntransactional_id_prefix = \"kbad\"\ninputs = [\"lines\"]\n"
        )
    };
    let header = "name = \"bad\"\n[checkpoint]\ninterval = \"1s\"\ndir = \"checkpoints\"\n";
    let unreachable = format!("127.0.0.1:{closed}");
    let good = &kafka.bootstrap;
    let cases = [
        (
            format!(
                "{header}{}{}",
                source(&unreachable, "kbad-in"),
                sink(good, "kbad-out", "out")
            ),
            vec![
                "source `lines`".to_string(),
                format!("cannot connect to {unreachable}"),
            ],
        ),
        (
            format!(
                "{header}{}{}",
                source(good, "nowhere"),
                sink(good, "kbad-out", "out")
            ),
            vec![
                "source `lines`".into(),
                "topic `nowhere` does not exist".into(),
            ],
        ),
        (
            format!(
                "{header}{}{}",
                source(good, "kbad-in"),
                sink(good, "elsewhere", "out")
            ),
            vec![
                "sink `out`".into(),
                "topic `elsewhere` does not exist".into(),
            ],
        ),
        (
            format!(
                "{header}{}{}{}",
                source(good, "kbad-in"),
                sink(good, "kbad-out", "out"),
                sink(good, "kbad-out", "copy")
            ),
            vec![
                "sink `copy`".into(),
                "transactional_id_prefix `kbad` is sink `out`'s too".into(),
            ],
        ),
    ];
    for (toml, wanted) in cases {
        let job = JobDir::new();
        job.job(&toml);
        let run = weir(&["run", "job.toml", "-q"], job.path());
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "the start fails: {toml}");
        for part in &wanted {
            assert!(stderr.contains(part.as_str()), "`{part}` in: {stderr}");
        }
        assert_eq!(
            stderr.matches(wanted[1].as_str()).count(),
            1,
            "stated once: {stderr}"
        );
        assert!(
            !job.path().join("checkpoints").exists(),
            "nothing written: {stderr}"
        );
    }
}

#[test]
fn a_record_over_the_brokers_size_limit_fails_the_job_naming_the_sink() {
    let Some(kafka) = server() else { return };
    kafka.create_topic("kbig-out", 1);
    let job = JobDir::new();
    // One line of 8 MiB: over any broker's default message size limit.
    job.write("big.txt", format!("{}\n", "x".repeat(8 << 20)));
    job.job(&format!(
        r#"
name = "big"
[[source]]
uid = "lines"
kind = "file"
path = "big.txt"

[[sink]]
uid = "out"
kind = "kafka"
bootstrap = "{}"
topic = "kbig-out"
delivery = "at-least-once"
inputs = ["lines"]
"#,
        kafka.bootstrap
    ));
    let run = weir(&["run", "job.toml", "-q"], job.path());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "the job fails: {stderr}");
    assert!(stderr.contains("`out`"), "names the sink: {stderr}");
    assert!(stderr.contains("too large"), "says why: {stderr}");
}
