//! Operators in other languages: each language's `count` (built by its
//! example's `build.sh` with the real toolchain) runs the word count with
//! the Rust `split` and gives the Rust job's output; and the headline: a
//! word count stopped with a savepoint resumes with `count` in another
//! language, its state carrying on (Rust → Python → JavaScript → C → Zig).

use std::path::{Path, PathBuf};

use weir_tests::languages::{C, JAVASCRIPT, Language, PYTHON, PYTHON_V2, ZIG};
use weir_tests::plugins::{WORDCOUNT_COUNT, WORDCOUNT_SPLIT};

use crate::savepoints::{WORDS, expected_words, options, run, run_and_stop_from, wordcount_job};
use crate::support::{JobDir, engine, toml_path};

/// A file of text → `split` (Rust, p=2) → `count` (the given plugin, p=2)
/// → file sink; returns the sorted output lines.
fn file_wordcount(job: &JobDir, count_plugin: &Path, out: &str) -> Vec<String> {
    let toml = format!(
        r#"
name = "wordcount"
[[source]]
uid = "lines"
kind = "file"
path = "input.txt"
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
config = {{ emit = "updates" }}
[[sink]]
uid = "out"
kind = "file"
path = "{out}"
inputs = ["count"]
"#,
        split = toml_path(WORDCOUNT_SPLIT),
        count = toml_path(&count_plugin.to_string_lossy()),
    );
    let path = job.write(&format!("{out}.toml"), toml);
    run(&path, options(None, false)).expect("the word count runs");
    let mut lines = weir_tests::read_parts(&job.path().join(out));
    lines.sort();
    lines
}

/// The plugin of `language`, built with its real toolchain (None: skipped
/// locally because the toolchain cannot be installed).
fn plugin(language: Language) -> Option<PathBuf> {
    weir_tests::languages::plugin(language, Path::new(env!("CARGO_BIN_EXE_weir")))
}

fn same_output_as_rust(language: Language) {
    let Some(plugin) = plugin(language) else {
        return;
    };
    let job = JobDir::new();
    let text = weir_tests::sample_text(300, 11);
    job.write("input.txt", &text);
    let rust = file_wordcount(&job, Path::new(WORDCOUNT_COUNT), "rust");
    weir_tests::check_exact_updates(&rust, &weir_tests::count_words(&text))
        .expect("the Rust job is exact");
    // The Rust SDK's plugin takes the flat path; the other languages'
    // (built against the contract's first edition, Zig's by hand with its
    // `@0.1.0` names) cross as `record-batch` and still load and run.
    assert!(
        engine()
            .load(Path::new(WORDCOUNT_COUNT))
            .expect("loads")
            .takes_flat_batches()
    );
    let loaded = engine().load(&plugin).expect("loads");
    assert!(
        !loaded.takes_flat_batches(),
        "{} takes record batches",
        language.name
    );
    // Each SDK declares the count's TTL (`declare-ttl` from `describe`).
    let ttl = loaded.info.states[0].ttl.map(|ttl| ttl.to_string());
    assert_eq!(
        ttl.as_deref(),
        Some("30days (on create and write, processing time)"),
        "{}'s count declares its TTL",
        language.name
    );
    let other = file_wordcount(&job, &plugin, "other");
    assert!(
        other == rust,
        "the {} count's output equals the Rust count's ({} and {} lines)",
        language.name,
        other.len(),
        rust.len()
    );
}

#[test]
fn python_count_gives_the_rust_output() {
    same_output_as_rust(PYTHON);
}

#[test]
fn javascript_count_gives_the_rust_output() {
    same_output_as_rust(JAVASCRIPT);
}

#[test]
fn c_count_gives_the_rust_output() {
    same_output_as_rust(C);
}

#[test]
fn zig_count_gives_the_rust_output() {
    same_output_as_rust(ZIG);
}

/// The word count starts with the Rust `count`, is stopped with a
/// savepoint, resumes with the Python `count`, is stopped again, resumes
/// with the JavaScript one, then the C one, and ends with the Zig one:
/// every count continues exactly (each update `w n` once across the five
/// runs).
#[test]
fn a_savepoint_moves_counts_across_languages() {
    let mut chain: Vec<(String, PathBuf)> = vec![("Rust".into(), PathBuf::from(WORDCOUNT_COUNT))];
    for language in [PYTHON, JAVASCRIPT, C, ZIG] {
        let Some(plugin) = plugin(language) else {
            return;
        };
        chain.push((language.name.to_string(), plugin));
    }
    let job = JobDir::new();
    let savepoints = job.path().join("savepoints");
    let mut restore: Option<PathBuf> = None;
    for (stage, (name, plugin)) in chain.iter().enumerate() {
        let path = job.write(
            &format!("{stage}.toml"),
            wordcount_job(2, "out", "", &plugin.to_string_lossy()),
        );
        let start = options(restore.as_deref(), false);
        if stage + 1 < chain.len() {
            let savepoint = run_and_stop_from(&path, start, WORDS / 6, &savepoints, false);
            let read = weir::checkpoint::metadata::read(&savepoint).expect("reads");
            let position = read.metadata.operators["words"].subtasks[0]
                .position
                .expect("position");
            assert!(position < WORDS, "{name} stopped mid-stream ({position})");
            restore = Some(savepoint);
        } else {
            run(&path, start).expect("the last language runs to the end");
        }
    }
    let lines = weir_tests::read_parts(&job.path().join("out"));
    weir_tests::check_exact_updates(&lines, &expected_words())
        .expect("counts continue exactly across Rust, Python, JavaScript, C and Zig");
}

/// Schema migration in another language: a word count savepointed with the
/// Rust `count` v1 (a bare integer) resumes with the Python `count` v2
/// (an object, schema version 2), whose migrate export converts every
/// stored count: the counts carry on.
#[test]
fn a_python_plugin_migrates_rust_state() {
    let Some(v2) = plugin(PYTHON_V2) else {
        return;
    };
    let job = JobDir::new();
    let savepoints = job.path().join("savepoints");
    let v1 = job.write("v1.toml", wordcount_job(2, "out", "", WORDCOUNT_COUNT));
    let savepoint = run_and_stop_from(&v1, options(None, false), WORDS / 3, &savepoints, false);
    let path = job.write(
        "v2.toml",
        wordcount_job(3, "out", "", &v2.to_string_lossy()),
    );
    run(&path, options(Some(&savepoint), false)).expect("the Python v2 migrates and resumes");
    let lines = weir_tests::read_parts(&job.path().join("out"));
    weir_tests::check_exact_updates(&lines, &expected_words())
        .expect("counts continue through the Python migration");
}
