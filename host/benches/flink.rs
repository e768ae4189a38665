//! Weir against Apache Flink 2.3 on the same word count, each run as its own
//! process and measured from outside it.
//!
//! ```sh
//! cargo bench -p weir --bench flink                 # both state backends
//! cargo bench -p weir --bench flink -- memory       # Weir `memory` vs Flink `hashmap` only
//! cargo bench -p weir --bench flink -- rocksdb      # RocksDB on both sides only
//! WEIR_BENCH_RECORDS=300000 WEIR_BENCH_REPEATS=1 cargo bench -p weir --bench flink
//! ```
//!
//! The job, on both sides: a generator of `WEIR_BENCH_RECORDS` records
//! (default 10M) over `WEIR_BENCH_KEYS` words (default 100k), record i
//! carrying `word(xxh3_64_with_seed(i, SEED) % keys)` → partition by key →
//! a keyed count (Weir: the `count` component; Flink: a
//! `KeyedProcessFunction` with a `ValueState<Long>`) emitting `word n` per
//! record → a discarding sink. Parallelism 1, exactly-once checkpoints every
//! second into a temporary directory, state in memory (Weir `memory`, Flink
//! `hashmap`) or in RocksDB (incremental checkpoints on both sides). Flink
//! runs `benches/flink/WordCount.java` in a local MiniCluster (`java -cp …
//! WordCount run …`); Weir runs `weir run job.toml` with the real binary.
//!
//! Flink is installed on first use into `target/flink/` from the PyPI wheel
//! `apache-flink-libraries==2.3.0` (pinned by hash; `python3 -m pip`), and
//! the Java job is compiled there with `javac` (Java 17) whenever its source
//! changes. Before measuring, the bench checks that the Java port of the
//! generator produces Weir's words, and after each run that the job counted
//! what the Rust side computes for the same records: the number of distinct
//! words (both sides) and the largest count (Flink; Weir's summary reports
//! the records its `count` took in and the keys it holds).
//!
//! Each of `WEIR_BENCH_REPEATS` rounds (default 2) runs Weir memory, Flink
//! hashmap, Weir RocksDB, Flink RocksDB, in that order; the table shows
//! medians. Measured per run, from outside the process: wall time, CPU time
//! (user + system, from `wait4`'s rusage), peak RSS (`ru_maxrss`), and the
//! processing window: for Flink from its print when the first record reaches
//! the counter to its print when the job has finished; for Weir from its
//! `job … started` line (after the plugin is loaded, before the sources
//! start) to its `job … finished` line, as the bench receives them. Start to
//! first record: Flink's first-record print relative to the process spawn;
//! Weir cannot tell when its first record is counted, so it is the whole
//! wall time of the same job with one record (an upper bound), which also
//! warms Weir's compile cache before each measured run.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use weir::connectors::generator::{word, word_index};

const FLINK_VERSION: &str = "2.3.0";
/// pip's requirement for the wheel holding Flink's jars (329 MB).
const FLINK_WHEEL: &str = "apache-flink-libraries==2.3.0 \
    --hash=sha256:38ece876553286b3a285cf344c2d2038f8a7ca10da5df54d5107250386d64151";
/// The generator's seed on both sides.
const SEED: u64 = 42;
/// Records of the Java generator checked word for word against Weir's.
const WORDS_CHECKED: u64 = 10_000;

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Weir,
    Flink,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Weir => "Weir",
            Side::Flink => "Flink",
        }
    }
}

#[derive(Clone, Copy)]
enum Backend {
    Memory,
    RocksDb,
}

impl Backend {
    /// The row label, and what `-- FILTER` matches.
    fn label(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::RocksDb => "rocksdb",
        }
    }
    fn weir(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::RocksDb => "rocksdb",
        }
    }
    fn flink(self) -> &'static str {
        match self {
            Backend::Memory => "hashmap",
            Backend::RocksDb => "rocksdb",
        }
    }
    fn pair(self) -> String {
        format!("Weir {} / Flink {}", self.weir(), self.flink())
    }
}

/// One measured run of one job.
struct Measurement {
    system: Side,
    backend: Backend,
    wall: f64,
    /// Seconds of the processing window (see the top of the file).
    processing: f64,
    cpu: f64,
    peak_rss_bytes: u64,
    /// Seconds from spawn to the first record (Weir: the wall time of the
    /// one-record job).
    first_record: f64,
    /// Seconds from spawn to the start of the processing window.
    window_start: f64,
}

impl Measurement {
    fn rate(&self, records: u64) -> f64 {
        records as f64 / self.processing.max(1e-6)
    }
    fn per_cpu(&self, records: u64) -> f64 {
        records as f64 / self.cpu.max(1e-6)
    }
}

/// What a child process did, as seen from outside.
struct Finished {
    status: i32,
    wall: Duration,
    cpu: Duration,
    peak_rss_bytes: u64,
    spawned_at: SystemTime,
    /// Each line with the time since spawn at which the bench read it.
    stdout: Vec<(Duration, String)>,
    stderr: Vec<(Duration, String)>,
}

impl Finished {
    fn output(&self) -> String {
        let lines = self.stdout.iter().chain(&self.stderr);
        lines
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

struct Settings {
    records: u64,
    keys: u64,
    repeats: usize,
    filters: Vec<String>,
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

fn settings() -> Settings {
    let records: u64 = env_number("WEIR_BENCH_RECORDS", 10_000_000);
    assert!(records > 0, "WEIR_BENCH_RECORDS must be at least 1");
    Settings {
        records,
        keys: env_number("WEIR_BENCH_KEYS", 100_000),
        repeats: env_number("WEIR_BENCH_REPEATS", 2).max(1),
        filters: std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with("--"))
            .collect(),
    }
}

fn step(what: &str) {
    eprintln!("==> {what}");
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ sits in the workspace root")
        .to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace
/// root) or `target/`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace().join(dir),
        None => workspace().join("target"),
    }
}

/// Runs `command` to completion; panics with its output if it fails.
fn run_checked(command: &mut Command, what: &str) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start {command:?}: {e}"));
    if !output.status.success() {
        panic!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Removes install directories left by interrupted installs (their process
/// is gone).
fn remove_stale_installs(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(".install-")
            .or_else(|| name.strip_prefix(".classes-"));
        if let Some(pid) = pid
            && !Path::new("/proc").join(pid).exists()
        {
            step(&format!("removing {}, left by an interrupted run", name));
            std::fs::remove_dir_all(entry.path())
                .unwrap_or_else(|e| panic!("removing {}: {e}", entry.path().display()));
        }
    }
}

/// Flink's home in `root` (with `lib/`), installed from PyPI if missing:
/// downloaded and unpacked into `.install-<pid>/`, then renamed into place,
/// so a home that exists is complete.
fn install_flink(root: &Path) -> PathBuf {
    let home = root.join(format!("flink-{FLINK_VERSION}"));
    let dist = home
        .join("lib")
        .join(format!("flink-dist-{FLINK_VERSION}.jar"));
    if dist.is_file() {
        return home;
    }
    std::fs::create_dir_all(root).unwrap_or_else(|e| panic!("creating {}: {e}", root.display()));
    remove_stale_installs(root);
    let staging = root.join(format!(".install-{}", std::process::id()));
    std::fs::create_dir_all(&staging)
        .unwrap_or_else(|e| panic!("creating {}: {e}", staging.display()));
    step(&format!(
        "installing Flink {FLINK_VERSION} into {}",
        home.display()
    ));
    step("downloading apache-flink-libraries 2.3.0 (a 329 MB wheel) from PyPI with pip");
    let requirements = staging.join("requirements.txt");
    std::fs::write(&requirements, format!("{FLINK_WHEEL}\n")).expect("write requirements.txt");
    run_checked(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--no-deps", "--only-binary=:all:", "--require-hashes"])
            .arg("-d")
            .arg(&staging)
            .arg("-r")
            .arg(&requirements),
        "pip download apache-flink-libraries",
    );
    let wheel = staging.join("apache_flink_libraries-2.3.0-py2.py3-none-any.whl");
    assert!(wheel.is_file(), "pip did not leave {}", wheel.display());
    step("unpacking the wheel");
    let unpacked = staging.join("unpacked");
    run_checked(
        Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&unpacked),
        "unpacking the Flink wheel",
    );
    let pyflink = unpacked.join("pyflink");
    assert!(
        pyflink
            .join("lib")
            .join(dist.file_name().expect("name"))
            .is_file(),
        "the wheel has no pyflink/lib/flink-dist-{FLINK_VERSION}.jar"
    );
    step(&format!("moving pyflink/ into place as {}", home.display()));
    if let Err(e) = std::fs::rename(&pyflink, &home) {
        // Another bench run may have finished the same install first.
        assert!(
            dist.is_file(),
            "moving {} into place: {e}",
            pyflink.display()
        );
    }
    step("removing the download");
    std::fs::remove_dir_all(&staging)
        .unwrap_or_else(|e| panic!("removing {}: {e}", staging.display()));
    home
}

/// `home/lib/*`, the class path of Flink's jars (the RocksDB state backend
/// is in `flink-dist`).
fn flink_lib(home: &Path) -> String {
    format!("{}/lib/*", home.display())
}

/// `WordCount.java` compiled into `root/classes`, recompiled when its source
/// (or the Flink version) changed: a stamp file holds the source's hash.
fn compile_job(root: &Path, home: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/flink/WordCount.java");
    let text =
        std::fs::read(&source).unwrap_or_else(|e| panic!("reading {}: {e}", source.display()));
    let mut hasher = Sha256::new();
    hasher.update(FLINK_VERSION.as_bytes());
    hasher.update(&text);
    let hash = hex::encode(hasher.finalize());
    let classes = root.join("classes");
    let stamp = classes.join("source.sha256");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == hash) {
        return classes;
    }
    step(&format!(
        "compiling {} into {}",
        source.display(),
        classes.display()
    ));
    let staging = root.join(format!(".classes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    run_checked(
        Command::new("javac")
            .args(["-nowarn", "-cp", &flink_lib(home), "-d"])
            .arg(&staging)
            .arg(&source),
        "javac",
    );
    std::fs::write(staging.join("source.sha256"), &hash).expect("write the source stamp");
    if classes.exists() {
        std::fs::remove_dir_all(&classes)
            .unwrap_or_else(|e| panic!("removing {}: {e}", classes.display()));
    }
    std::fs::rename(&staging, &classes)
        .unwrap_or_else(|e| panic!("moving {} into place: {e}", staging.display()));
    classes
}

/// `java` with the job's class path.
fn java(classes: &Path, home: &Path) -> Command {
    let mut command = Command::new("java");
    command
        .arg("-cp")
        .arg(format!("{}:{}", classes.display(), flink_lib(home)));
    command
}

/// The Java generator produces Weir's words.
fn check_java_words(classes: &Path, home: &Path, keys: u64) {
    let out = run_checked(
        java(classes, home)
            .arg("WordCount")
            .arg("words")
            .arg(WORDS_CHECKED.to_string())
            .arg(keys.to_string())
            .arg(SEED.to_string()),
        "java WordCount words",
    );
    let mut lines = 0;
    for (i, line) in out.lines().enumerate() {
        let expected = format!("{i} {}", word(word_index(i as u64, keys, SEED)));
        assert_eq!(line, expected, "the Java generator differs from Weir's");
        lines += 1;
    }
    assert_eq!(
        lines, WORDS_CHECKED,
        "java WordCount words printed too few lines"
    );
    eprintln!("the Java generator matches Weir's on the first {WORDS_CHECKED} records");
}

/// Distinct words and the largest count of the generator's first `records`
/// records, computed here.
fn expected_counts(records: u64, keys: u64) -> (u64, u64) {
    let mut counts: HashMap<u64, u64> = HashMap::new();
    for i in 0..records {
        *counts.entry(word_index(i, keys, SEED)).or_insert(0) += 1;
    }
    let largest = counts.values().copied().max().unwrap_or(0);
    (counts.len() as u64, largest)
}

fn read_lines(
    stream: impl Read + Send + 'static,
    started: Instant,
) -> JoinHandle<Vec<(Duration, String)>> {
    std::thread::spawn(move || {
        BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
            .map(|line| (started.elapsed(), line))
            .collect()
    })
}

/// Waits for `pid` with `wait4`: its exit status and resource usage
/// (its own and its waited-for children's).
fn wait4(pid: u32) -> (i32, libc::rusage) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to locals; pid is our own child, not yet
        // waited for (std's Child is never waited on).
        let done = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if done == pid {
            return (status, usage);
        }
        let error = std::io::Error::last_os_error();
        assert!(
            error.kind() == std::io::ErrorKind::Interrupted,
            "wait4({pid}) failed: {error}"
        );
    }
}

fn seconds(time: libc::timeval) -> Duration {
    Duration::from_secs(time.tv_sec as u64) + Duration::from_micros(time.tv_usec as u64)
}

/// Runs `command`, reading its output line by line, and measures it.
#[expect(
    clippy::zombie_processes,
    reason = "reaped by `wait4`, not `Child::wait`"
)]
fn measure(command: &mut Command, what: &str) -> Finished {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawned_at = SystemTime::now();
    let started = Instant::now();
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start {command:?}: {e}"));
    let stdout = read_lines(child.stdout.take().expect("piped stdout"), started);
    let stderr = read_lines(child.stderr.take().expect("piped stderr"), started);
    let (status, usage) = wait4(child.id());
    let wall = started.elapsed();
    let finished = Finished {
        status: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        },
        wall,
        cpu: seconds(usage.ru_utime) + seconds(usage.ru_stime),
        // Kilobytes on Linux.
        peak_rss_bytes: usage.ru_maxrss as u64 * 1024,
        spawned_at,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    };
    if finished.status != 0 {
        panic!("{what} failed (status {status:#x}):\n{}", finished.output());
    }
    finished
}

/// The value after `name ` on the line of `lines` that starts with it.
fn printed<'a>(lines: &'a [(Duration, String)], name: &str) -> Option<&'a str> {
    lines
        .iter()
        .find_map(|(_, line)| line.strip_prefix(name)?.strip_prefix(' '))
}

/// Seconds from the spawn to the wall-clock time (ms since the epoch) the
/// job printed after `name`.
fn printed_time(finished: &Finished, name: &str) -> f64 {
    let value = printed(&finished.stdout, name)
        .unwrap_or_else(|| panic!("Flink printed no `{name}`:\n{}", finished.output()));
    let ms: u64 = value
        .parse()
        .unwrap_or_else(|_| panic!("Flink's `{name}` is not a time: {value}"));
    let spawned = finished
        .spawned_at
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    ms as f64 / 1000.0 - spawned.as_secs_f64()
}

fn printed_number(finished: &Finished, name: &str) -> u64 {
    let value = printed(&finished.stdout, name)
        .unwrap_or_else(|| panic!("Flink printed no `{name}`:\n{}", finished.output()));
    value
        .parse()
        .unwrap_or_else(|_| panic!("Flink's `{name}` is not a number: {value}"))
}

struct Expected {
    records: u64,
    keys: u64,
    distinct: u64,
    largest: u64,
}

fn run_flink(classes: &Path, home: &Path, backend: Backend, expected: &Expected) -> Measurement {
    let dir = tempfile::tempdir().expect("tempdir for Flink");
    let finished = measure(
        java(classes, home)
            .arg("WordCount")
            .arg("run")
            .arg(expected.records.to_string())
            .arg(expected.keys.to_string())
            .arg(SEED.to_string())
            .arg(backend.flink())
            .arg(dir.path()),
        &format!("the Flink job ({})", backend.flink()),
    );
    let counted = [
        ("records-counted", expected.records),
        ("distinct-words", expected.distinct),
        ("largest-count", expected.largest),
    ];
    for (name, want) in counted {
        let got = printed_number(&finished, name);
        assert_eq!(
            got,
            want,
            "Flink ({}) counted {name} {got}, expected {want}",
            backend.flink()
        );
    }
    let first_record = printed_time(&finished, "first-record-ms");
    let end = printed_time(&finished, "job-end-ms");
    Measurement {
        system: Side::Flink,
        backend,
        wall: finished.wall.as_secs_f64(),
        processing: end - first_record,
        cpu: finished.cpu.as_secs_f64(),
        peak_rss_bytes: finished.peak_rss_bytes,
        first_record,
        window_start: first_record,
    }
}

fn weir_job(dir: &Path, backend: Backend, records: u64, keys: u64) -> PathBuf {
    let toml = format!(
        r#"name = "wordcount"
parallelism = 1
[state]
backend = "{backend}"
dir = {state:?}
[checkpoint]
interval = "1s"
mode = "exactly-once"
dir = {checkpoints:?}
[[source]]
uid = "gen"
kind = "generator"
count = {records}
keys = {keys}
seed = {SEED}
[[operator]]
uid = "count"
plugin = {count:?}
inputs = [{{ from = "gen", partition = "key" }}]
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["count"]
"#,
        backend = backend.weir(),
        state = dir.join("state").display().to_string(),
        checkpoints = dir.join("checkpoints").display().to_string(),
        count = weir_tests::plugins::WORDCOUNT_COUNT,
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, toml).expect("write job.toml");
    path
}

/// `weir run` on a fresh job of `records` records.
fn weir_process(backend: Backend, records: u64, keys: u64) -> Finished {
    let dir = tempfile::tempdir().expect("tempdir for Weir");
    let job = weir_job(dir.path(), backend, records, keys);
    measure(
        Command::new(env!("CARGO_BIN_EXE_weir"))
            .arg("--cache-dir")
            .arg(weir_tests::compile_cache())
            .arg("run")
            .arg(&job),
        &format!("weir run ({}, {records} records)", backend.weir()),
    )
}

/// When the bench read Weir's stderr line containing `marker`.
fn weir_line_time(finished: &Finished, marker: &str) -> f64 {
    finished
        .stderr
        .iter()
        .find(|(_, line)| line.contains(marker))
        .map(|(at, _)| at.as_secs_f64())
        .unwrap_or_else(|| {
            panic!(
                "Weir printed no line with `{marker}`:\n{}",
                finished.output()
            )
        })
}

/// The number after `name ` in `line`.
fn number_after(line: &str, name: &str) -> Option<u64> {
    let rest = &line[line.find(name)? + name.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Checks Weir's summary line for `count`: the records it took in and the
/// keys (distinct words) its state holds.
fn check_weir_counts(finished: &Finished, backend: Backend, expected: &Expected) {
    let line = finished
        .stderr
        .iter()
        .map(|(_, line)| line.trim_start())
        .find(|line| line.starts_with("count ") && line.contains("operator"))
        .unwrap_or_else(|| {
            panic!(
                "Weir printed no summary for `count`:\n{}",
                finished.output()
            )
        });
    let took = number_after(line, "in  ").or_else(|| number_after(line, "in "));
    assert_eq!(
        took,
        Some(expected.records),
        "Weir ({}) `count` took in the wrong number of records: {line}",
        backend.weir()
    );
    let keys = number_after(line, "state `count`: ");
    assert_eq!(
        keys,
        Some(expected.distinct),
        "Weir ({}) holds the wrong number of words: {line}",
        backend.weir()
    );
}

fn run_weir(backend: Backend, expected: &Expected) -> Measurement {
    // One record: start to end of a job, and the compile cache warm.
    let one = weir_process(backend, 1, expected.keys);
    let finished = weir_process(backend, expected.records, expected.keys);
    check_weir_counts(&finished, backend, expected);
    let started = weir_line_time(&finished, "` started, job id");
    let ended = weir_line_time(&finished, "` finished in");
    Measurement {
        system: Side::Weir,
        backend,
        wall: finished.wall.as_secs_f64(),
        processing: ended - started,
        cpu: finished.cpu.as_secs_f64(),
        peak_rss_bytes: finished.peak_rss_bytes,
        first_record: one.wall.as_secs_f64(),
        window_start: started,
    }
}

fn human(rate: f64) -> String {
    if rate >= 1e6 {
        format!("{:.2}M", rate / 1e6)
    } else if rate >= 1e3 {
        format!("{:.0}k", rate / 1e3)
    } else {
        format!("{rate:.0}")
    }
}

fn megabytes(bytes: f64) -> String {
    format!("{:.0} MB", bytes / 1e6)
}

fn print_run(m: &Measurement, records: u64) {
    println!(
        "{:5} {:7}: wall {:.2} s, processing {:.2} s (from {:.2} s), {} records/s, CPU {:.2} s, {} records per CPU-s, peak RSS {}, start to first record {:.2} s",
        m.system.name(),
        match m.system {
            Side::Weir => m.backend.weir(),
            Side::Flink => m.backend.flink(),
        },
        m.wall,
        m.processing,
        m.window_start,
        human(m.rate(records)),
        m.cpu,
        human(m.per_cpu(records)),
        megabytes(m.peak_rss_bytes as f64),
        m.first_record,
    );
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn print_table(runs: &[Measurement], backends: &[Backend], settings: &Settings) {
    let records = settings.records;
    let of = |system: Side, backend: Backend, f: &dyn Fn(&Measurement) -> f64| {
        median(
            runs.iter()
                .filter(|m| m.system == system && m.backend.label() == backend.label())
                .map(f)
                .collect(),
        )
    };
    println!();
    println!(
        "{} records, {} keys, parallelism 1, exactly-once checkpoints every 1 s; medians of {} runs",
        settings.records, settings.keys, settings.repeats
    );
    println!();
    println!(
        "| state | Weir records/s | Flink records/s | Weir/Flink | Weir records per CPU-s | Flink records per CPU-s | ratio | Weir peak RSS | Flink peak RSS | start to first record Weir (1-record job) | Flink |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &backend in backends {
        let weir_rate = of(Side::Weir, backend, &|m| m.rate(records));
        let flink_rate = of(Side::Flink, backend, &|m| m.rate(records));
        let weir_cpu = of(Side::Weir, backend, &|m| m.per_cpu(records));
        let flink_cpu = of(Side::Flink, backend, &|m| m.per_cpu(records));
        println!(
            "| {} | {} | {} | {:.2} | {} | {} | {:.2} | {} | {} | {:.2} s | {:.2} s |",
            backend.pair(),
            human(weir_rate),
            human(flink_rate),
            weir_rate / flink_rate,
            human(weir_cpu),
            human(flink_cpu),
            weir_cpu / flink_cpu,
            megabytes(of(Side::Weir, backend, &|m| m.peak_rss_bytes as f64)),
            megabytes(of(Side::Flink, backend, &|m| m.peak_rss_bytes as f64)),
            of(Side::Weir, backend, &|m| m.first_record),
            of(Side::Flink, backend, &|m| m.first_record),
        );
    }
    println!();
    println!(
        "records/s: records over the processing window (Weir: its `started` to `finished` lines; Flink: first record at the counter to job end). Per CPU-s: records over the whole process's user + system CPU time, startup included."
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let settings = settings();
    let backends: Vec<Backend> = [Backend::Memory, Backend::RocksDb]
        .into_iter()
        .filter(|b| settings.filters.is_empty() || settings.filters.iter().any(|f| f == b.label()))
        .collect();
    assert!(
        !backends.is_empty(),
        "no benchmark matches {:?}; use `memory` or `rocksdb`",
        settings.filters
    );
    let root = target_dir().join("flink");
    let home = install_flink(&root);
    let classes = compile_job(&root, &home);
    check_java_words(&classes, &home, settings.keys);
    let (distinct, largest) = expected_counts(settings.records, settings.keys);
    let expected = Expected {
        records: settings.records,
        keys: settings.keys,
        distinct,
        largest,
    };
    eprintln!(
        "{} records over {} keys (seed {SEED}): {distinct} distinct words, largest count {largest}",
        settings.records, settings.keys
    );
    let mut runs = Vec::new();
    for round in 1..=settings.repeats {
        eprintln!("round {round} of {}", settings.repeats);
        for &backend in &backends {
            let weir = run_weir(backend, &expected);
            print_run(&weir, settings.records);
            runs.push(weir);
            let flink = run_flink(&classes, &home, backend, &expected);
            print_run(&flink, settings.records);
            runs.push(flink);
        }
    }
    print_table(&runs, &backends, &settings);
}
