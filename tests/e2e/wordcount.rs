//! The wordcount of two Wasm operators, checked against an independent count
//! at several parallelisms, with RocksDB and in-memory state.

use weir_tests::plugins::{SPARSE_COUNT, WORDCOUNT_COUNT, WORDCOUNT_SPLIT};

use crate::support::{JobDir, run, toml_path};

fn wordcount_job(split_parallelism: u32, count_parallelism: u32, backend: &str) -> String {
    format!(
        r#"
name = "wordcount"
max_parallelism = 128

[state]
backend = "{backend}"

[[source]]
uid = "lines"
kind = "file"
path = "input.txt"

[[operator]]
uid = "split"
plugin = {split}
inputs = ["lines"]
parallelism = {split_parallelism}

[[operator]]
uid = "count"
plugin = {count}
inputs = [{{ from = "split", partition = "key" }}]
parallelism = {count_parallelism}
config = {{ emit = "updates" }}

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

fn check_wordcount(parallelism: u32, backend: &str) {
    let text = weir_tests::sample_text(3000, u64::from(parallelism));
    let expected = weir_tests::count_words(&text);
    let job = JobDir::new();
    job.write("input.txt", &text);
    let path = job.job(&wordcount_job(parallelism, parallelism, backend));
    let outcome =
        run(&path).unwrap_or_else(|e| panic!("wordcount at parallelism {parallelism} failed: {e}"));
    assert!(!outcome.cancelled);

    let lines = weir_tests::read_parts(&job.path().join("out"));
    let total: u64 = expected.values().sum();
    assert_eq!(lines.len() as u64, total, "one update per word occurrence");
    assert_eq!(
        weir_tests::final_counts(&lines),
        expected,
        "parallelism {parallelism}, {backend}"
    );

    // The state holds one key per distinct word, spread over the subtasks.
    let keys: u64 = outcome
        .summaries
        .iter()
        .filter(|s| s.uid == "count")
        .flat_map(|s| s.state_keys.iter().map(|(_, n)| *n))
        .sum();
    assert_eq!(keys, expected.len() as u64);
    if backend == "rocksdb" {
        assert!(
            outcome
                .summaries
                .iter()
                .filter(|s| s.uid == "count")
                .all(|s| s
                    .state_backend
                    .as_deref()
                    .is_some_and(|b| b.starts_with("rocksdb"))),
            "count keeps its state in RocksDB"
        );
    }
}

#[test]
fn wordcount_equals_an_independent_count_at_parallelism_1() {
    check_wordcount(1, "rocksdb");
}

#[test]
fn wordcount_equals_an_independent_count_at_parallelism_2() {
    check_wordcount(2, "rocksdb");
}

#[test]
fn wordcount_equals_an_independent_count_at_parallelism_4() {
    check_wordcount(4, "rocksdb");
}

#[test]
fn wordcount_with_in_memory_state() {
    check_wordcount(3, "memory");
}

#[test]
fn generator_feeds_keyed_count_deterministically() {
    let job = JobDir::new();
    let path = job.job(&format!(
        r#"
name = "generated"
[[source]]
uid = "words"
kind = "generator"
count = 20000
keys = 300
seed = 42
parallelism = 2

[[operator]]
uid = "count"
plugin = {count}
inputs = [{{ from = "words", partition = "key" }}]
parallelism = 3

[[sink]]
uid = "out"
kind = "file"
path = "out"
inputs = ["count"]
"#,
        count = toml_path(WORDCOUNT_COUNT)
    ));
    run(&path).expect("job runs");
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..20000u64 {
        let word =
            weir::connectors::generator::word(weir::connectors::generator::word_index(i, 300, 42));
        *expected.entry(word).or_insert(0u64) += 1;
    }
    let lines = weir_tests::read_parts(&job.path().join("out"));
    assert_eq!(lines.len(), 20000);
    assert_eq!(weir_tests::final_counts(&lines), expected);
}

#[test]
fn socket_source_reads_lines_until_the_server_closes() {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    let text = weir_tests::sample_text(200, 9);
    let sent = text.clone();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        for chunk in sent.as_bytes().chunks(777) {
            stream.write_all(chunk).expect("write");
        }
    });
    let job = JobDir::new();
    let path = job.job(&format!(
        r#"
name = "socket-wordcount"
[[source]]
uid = "lines"
kind = "socket"
address = "{address}"
[[operator]]
uid = "split"
plugin = {split}
inputs = ["lines"]
[[operator]]
uid = "count"
plugin = {count}
inputs = [{{ from = "split", partition = "key" }}]
[[sink]]
uid = "out"
kind = "file"
path = "out"
inputs = ["count"]
"#,
        split = toml_path(WORDCOUNT_SPLIT),
        count = toml_path(WORDCOUNT_COUNT)
    ));
    run(&path).expect("job runs");
    server.join().expect("server");
    let lines = weir_tests::read_parts(&job.path().join("out"));
    assert_eq!(
        weir_tests::final_counts(&lines),
        weir_tests::count_words(&text)
    );
}

/// Value state read and written once per batch (the SDK's batched calls)
/// or per record (the SDK's choice for a state most records of a batch do
/// not use): exact per-key counts either way, with keys repeating inside
/// batches, through checkpoints.
#[test]
fn value_state_counts_exactly_whether_batched_or_per_record() {
    const RECORDS: u64 = 40_000;
    let mut all = std::collections::BTreeMap::new();
    crate::checkpoints::generator_counts(RECORDS, 50, 7, &mut all);
    // "" counts every record (the state is fetched per batch); "ka" about
    // one in twelve (after the first batch, per-record calls).
    for prefix in ["", "ka"] {
        let job = JobDir::new();
        let path = job.job(&format!(
            r#"
name = "sparse-count"
[checkpoint]
interval = "50ms"
dir = "checkpoints"
[[source]]
uid = "words"
kind = "generator"
count = {RECORDS}
rate = 40000
keys = 50
seed = 7
[[operator]]
uid = "count"
plugin = {plugin}
inputs = [{{ from = "words", partition = "key" }}]
parallelism = 2
config = {{ prefix = "{prefix}" }}
[[sink]]
uid = "out"
kind = "file"
path = "out"
inputs = ["count"]
"#,
            plugin = toml_path(SPARSE_COUNT),
        ));
        run(&path).expect("job runs");
        let expected: std::collections::BTreeMap<String, u64> = all
            .iter()
            .filter(|(word, _)| word.starts_with(prefix))
            .map(|(word, n)| (word.clone(), *n))
            .collect();
        assert!(!expected.is_empty() && (prefix.is_empty() || expected.len() < all.len() / 4));
        let lines = weir_tests::read_parts(&job.path().join("out"));
        weir_tests::check_exact_updates(&lines, &expected)
            .unwrap_or_else(|problems| panic!("prefix {prefix:?}: {problems}"));
    }
}
