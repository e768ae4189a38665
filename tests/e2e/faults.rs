//! Plugins that misbehave — loop forever, allocate without bound, trap,
//! return an error — and files that are not plugins: each ends with an error
//! naming the operator (or file) and what went wrong, while the host stays in
//! control and can run the next job.

use weir::dataflow::FailureKind;
use weir::runner::RunError;
use weir_tests::plugins::{FAULTS, MISSING_IMPORT, WORDCOUNT_COUNT};

use crate::support::{JobDir, run, toml_path};

fn faulty_job(job: &JobDir, fault: &str, limits: &str) -> std::path::PathBuf {
    let input: String =
        (0..500).map(|i| format!("line {i}\n")).collect::<String>() + "boom\nafter\n";
    job.write("input.txt", input);
    job.job(&format!(
        r#"
name = "faulty"
[[source]]
uid = "lines"
kind = "file"
path = "input.txt"
[[operator]]
uid = "flaky"
plugin = {plugin}
inputs = ["lines"]
config = {{ fault = "{fault}", on = "boom" }}
limits = {{ {limits} }}
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["flaky"]
"#,
        plugin = toml_path(FAULTS)
    ))
}

fn expect_failure(fault: &str, limits: &str, kind: FailureKind, needle: &str) {
    let job = JobDir::new();
    let path = faulty_job(&job, fault, limits);
    let error = run(&path).expect_err("the job must fail");
    let Some(source) = error.task_error() else {
        panic!("expected a task failure, got {error}");
    };
    assert_eq!(source.uid, "flaky", "{error}");
    assert_eq!(source.kind(), kind, "{error}");
    let message = error.to_string();
    assert!(message.contains("`flaky`"), "names the operator: {message}");
    assert!(
        message.contains(needle),
        "says what went wrong ({needle}): {message}"
    );
    // The host is still in control: the same engine runs the next job.
    let fine = JobDir::new();
    let path = faulty_job(&fine, "none", "");
    run(&path).expect("a healthy job runs after a faulty one");
}

#[test]
fn a_plugin_that_loops_forever_hits_its_call_timeout() {
    expect_failure(
        "loop",
        r#"call_timeout = "300ms""#,
        FailureKind::Timeout,
        "call timeout of 300 ms",
    );
}

#[test]
fn a_plugin_that_allocates_without_bound_hits_its_memory_limit() {
    expect_failure(
        "alloc",
        r#"memory = "32MiB""#,
        FailureKind::Memory,
        "memory limit of 32 MiB",
    );
}

#[test]
fn a_plugin_that_traps_fails_the_task() {
    expect_failure("trap", "", FailureKind::Trap, "trapped in process");
}

#[test]
fn a_plugin_error_fails_the_task_with_the_plugins_message() {
    expect_failure(
        "error",
        "",
        FailureKind::Plugin,
        "failing on purpose on record boom",
    );
}

fn plugin_job(job: &JobDir, plugin: &std::path::Path) -> std::path::PathBuf {
    job.write("input.txt", "a b c\n");
    job.job(&format!(
        r#"
name = "bad-plugin"
[[source]]
uid = "lines"
kind = "file"
path = "input.txt"
[[operator]]
uid = "op"
plugin = {plugin}
inputs = ["lines"]
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["op"]
"#,
        plugin = toml_path(&plugin.display().to_string())
    ))
}

fn expect_plugin_rejected(bytes: &[u8], needle: &str) {
    let job = JobDir::new();
    let plugin = job.write("bad.wasm", bytes);
    let error = run(&plugin_job(&job, &plugin)).expect_err("rejected");
    let message = error.to_string();
    assert!(matches!(error, RunError::Plugin { .. }), "{message}");
    assert!(message.contains("operator `op`"), "{message}");
    assert!(
        message.contains(&plugin.display().to_string()),
        "names the file: {message}"
    );
    assert!(message.contains(needle), "{needle}: {message}");
}

#[test]
fn a_file_that_is_not_wasm_is_rejected() {
    expect_plugin_rejected(
        b"#!/bin/sh\necho not a plugin\n",
        "not a valid WebAssembly component",
    );
}

#[test]
fn a_core_module_is_not_a_component() {
    // The smallest valid core module: magic and version 1.
    expect_plugin_rejected(b"\0asm\x01\0\0\0", "not a valid WebAssembly component");
}

#[test]
fn a_truncated_component_is_rejected() {
    let real = std::fs::read(WORDCOUNT_COUNT).expect("built plugin");
    expect_plugin_rejected(&real[..real.len() / 2], "not a valid WebAssembly component");
}

#[test]
fn a_plugin_importing_what_the_host_lacks_is_rejected_naming_the_import() {
    let bytes = std::fs::read(MISSING_IMPORT).expect("built plugin");
    expect_plugin_rejected(&bytes, "weir:missing/nowhere");
}

fn probe(fault: &str, input: &str, wasi: &str) -> Vec<String> {
    let job = JobDir::new();
    job.write("input.txt", input);
    let path = job.job(&format!(
        r#"
name = "sandbox"
[[source]]
uid = "lines"
kind = "file"
path = "input.txt"
[[operator]]
uid = "probe"
plugin = {plugin}
inputs = ["lines"]
config = {{ fault = "{fault}" }}
wasi = [{wasi}]
[[sink]]
uid = "out"
kind = "file"
path = "out"
inputs = ["probe"]
"#,
        plugin = toml_path(FAULTS)
    ));
    run(&path).expect("job runs");
    weir_tests::read_parts(&job.path().join("out"))
}

#[test]
fn plugins_see_no_clock_unless_granted() {
    assert_eq!(
        probe("clock", "now\n", ""),
        vec!["0"],
        "the wall clock reads zero"
    );
    let granted: u128 = probe("clock", "now\n", r#""clocks""#)[0]
        .parse()
        .expect("millis");
    assert!(
        granted > 1_600_000_000_000,
        "granted clocks are real: {granted}"
    );
}

#[test]
fn plugins_see_no_filesystem() {
    let secret = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(secret.path(), "host secret").expect("write");
    let input = format!("{}\n/etc/passwd\n", secret.path().display());
    for line in probe("fs", &input, r#""stdio", "env", "clocks""#) {
        assert!(
            line.starts_with("denied"),
            "a plugin read a host file: {line}"
        );
    }
}

#[test]
fn a_panicking_plugin_fails_the_task_not_the_host() {
    expect_failure("panic", "", FailureKind::Trap, "trapped in process");
}

/// `lines` lines `key <i>` keyed by their second field into the faults
/// plugin (which keeps each record's value as state `seen`), with `limits`
/// on it; line 300's value is 200 bytes.
fn quota_job(job: &JobDir, lines: usize, limits: &str) -> std::path::PathBuf {
    let input: String = (0..lines)
        .map(|i| match i {
            300 => format!("key {i} {}\n", "x".repeat(200 - 8)),
            _ => format!("key {i}\n"),
        })
        .collect();
    job.write("input.txt", input);
    job.job(&format!(
        r#"
name = "quota"
[state]
backend = "memory"
[[source]]
uid = "lines"
kind = "file"
path = "input.txt"
format = {{ delimiter = " ", key = 1 }}
[[operator]]
uid = "flaky"
plugin = {plugin}
inputs = [{{ from = "lines", partition = "key" }}]
limits = {{ {limits} }}
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["flaky"]
"#,
        plugin = toml_path(FAULTS)
    ))
}

#[test]
fn a_write_past_a_state_quota_fails_the_job_naming_operator_state_key_and_limit() {
    // One value too large.
    let job = JobDir::new();
    let error = run(&quota_job(&job, 500, r#"value_bytes = "128""#)).expect_err("over value_bytes");
    let source = error.task_error().expect("a task failure");
    assert_eq!(
        (source.uid.as_str(), source.kind()),
        ("flaky", FailureKind::State),
        "{error}"
    );
    assert!(
        error.to_string().contains(
            "operator `flaky` state `seen`, key \"300\": a value of 200 bytes is over value_bytes = 128 bytes"
        ),
        "{error}"
    );
    // Too much state: 3000 keys of ~11 bytes each in a 2 KiB quota (the
    // overshoot is bounded by 1024 writes past the quota).
    let job = JobDir::new();
    let error =
        run(&quota_job(&job, 3000, r#"state_bytes = "2KiB""#)).expect_err("over state_bytes");
    let message = error.to_string();
    assert!(
        message.contains("operator `flaky` state `seen`, key \"")
            && message.contains("the subtask's state holds")
            && message.contains("over state_bytes = 2 KiB"),
        "{message}"
    );
    // Room enough: the same job runs.
    let job = JobDir::new();
    run(&quota_job(
        &job,
        3000,
        r#"value_bytes = "256", state_bytes = "1MiB""#,
    ))
    .expect("fits");
}

#[test]
fn bad_state_quotas_are_refused_naming_the_operator() {
    let job = JobDir::new();
    let error = run(&quota_job(
        &job,
        10,
        r#"value_bytes = "1MiB", state_bytes = "1KiB""#,
    ))
    .expect_err("refused");
    assert!(
        error.to_string().contains(
            "operator `flaky` limits: state_bytes (1 KiB) is smaller than one value (value_bytes = 1 MiB)"
        ),
        "{error}"
    );
    let error = run(&quota_job(&job, 10, r#"value_bytes = 0"#)).expect_err("refused");
    assert!(
        error
            .to_string()
            .contains("operator `flaky` limits: value_bytes must be greater than zero"),
        "{error}"
    );
    let error = run(&quota_job(&job, 10, r#"state_bytes = "lots""#)).expect_err("refused");
    assert!(
        error.to_string().contains("invalid size \"lots\""),
        "{error}"
    );
}
