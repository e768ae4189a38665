//! Throughput benchmarks, printed as a table (run: `cargo bench -p weir`).
//!
//! 1. A stateless map (ASCII uppercase) as a Wasm component (the SDK's
//!    `MapInPlace`) versus the same logic as a native Rust operator, both
//!    as the twin that copies each record into a new batch and as one that
//!    rewrites values in place, in the same runtime: generator -> map ->
//!    blackhole; alternating, medians.
//! 2. The wordcount `count` component with RocksDB keyed state on a
//!    generator of 10M records over 100k distinct keys, parallelism 1,
//!    without checkpoints and with exactly-once checkpoints every second
//!    (alternating, `WEIR_BENCH_REPEATS` times each, default 3; medians).
//! 3. `state`: the word count with `memory` and with `rocksdb` state, no
//!    checkpoints (medians).
//! 4. `chain`: three Wasm maps in a row, chained (one task per subtask,
//!    the default) and unchained (`chain = false`), beside one map;
//!    alternating, medians.
//! 5. `metrics`: the Wasm map and the RocksDB wordcount with the tasks'
//!    metrics timing (busy, idle, back-pressured, plugin time) off and on,
//!    alternating; medians.
//! 6. `ttl`: the word count with `memory` and `rocksdb` state, without and
//!    with a TTL on its count (`state_ttl = { count = "1h" }`), alternating;
//!    medians.
//!
//! Set `WEIR_BENCH_RECORDS` to scale the record counts (default 10M); pass
//! words to run only the benchmarks whose names contain one of them
//! (`cargo bench -p weir --bench throughput -- map`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use weir::dataflow::{Operator, OperatorError, TaskContext};
use weir::job::JobGraph;
use weir::plugin::PluginEngine;
use weir::runner::{self, NativeOperator};
use weir::types::{RecordBatch, RecordRef};

/// The native twin of `tests/plugins/uppercase`.
struct NativeUppercase {
    task: TaskContext,
    scratch: Vec<u8>,
}

impl Operator for NativeUppercase {
    fn task(&mut self) -> &mut TaskContext {
        &mut self.task
    }
    fn process_batch(&mut self, _input: u32, batch: RecordBatch) -> Result<(), OperatorError> {
        for record in batch.iter() {
            self.scratch.clear();
            self.scratch
                .extend(record.value.iter().map(u8::to_ascii_uppercase));
            self.task.output.emit(
                None,
                RecordRef {
                    key: record.key,
                    value: &self.scratch,
                    timestamp: record.timestamp,
                },
            )?;
        }
        Ok(())
    }
}

/// The native twin of `tests/plugins/uppercase` as it runs in Wasm: each
/// value rewritten where it lies in the batch, the batch passed on whole.
struct NativeUppercaseInPlace {
    task: TaskContext,
}

impl Operator for NativeUppercaseInPlace {
    fn task(&mut self) -> &mut TaskContext {
        &mut self.task
    }
    fn process_batch(&mut self, _input: u32, batch: RecordBatch) -> Result<(), OperatorError> {
        let (mut data, entries) = batch.into_parts();
        for entry in &entries {
            let start = entry.value_offset as usize;
            data[start..start + entry.value_length as usize].make_ascii_uppercase();
        }
        let batch = RecordBatch::from_parts(data, entries)
            .map_err(|e| OperatorError::new(weir::dataflow::FailureKind::Plugin, e))?;
        self.task.output.emit_batch(batch)
    }
}

struct Measurement {
    name: String,
    records: u64,
    seconds: f64,
    /// User + system CPU time of the whole process during the run.
    cpu_seconds: f64,
}

/// CPU time (user + system, every thread) this process has used so far,
/// from `/proc/self/stat` (clock ticks of 10 ms).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat format")
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields[i].parse::<f64>().expect("ticks");
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    (ticks(11) + ticks(12)) / 100.0
}

fn run(
    engine: &PluginEngine,
    dir: &Path,
    name: &str,
    toml: &str,
    native: &HashMap<String, NativeOperator>,
    records: u64,
) -> Measurement {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).expect("write job");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let graph = JobGraph::load(&path).expect("valid job");
    let job = runner::prepare(engine, graph).expect("plugins load");
    let started = Instant::now();
    let cpu = cpu_seconds();
    runtime.block_on(async {
        runner::run_with_native(&job, native, &mut |_| {})
            .await
            .expect("job runs")
    });
    Measurement {
        name: name.to_string(),
        records,
        seconds: started.elapsed().as_secs_f64(),
        cpu_seconds: cpu_seconds() - cpu,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let records: u64 = std::env::var("WEIR_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let engine = PluginEngine::new(Some(weir_tests::compile_cache())).expect("engine");
    let dir = tempfile::tempdir().expect("tempdir");
    let map_job = |plugin: &str| {
        format!(
            r#"
name = "map"
[[source]]
uid = "gen"
kind = "generator"
count = {records}
keys = 100000
[[operator]]
uid = "map"
plugin = {plugin:?}
inputs = ["gen"]
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["map"]
"#
        )
    };
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let uppercase = weir_tests::plugins::UPPERCASE;
    let mut native = HashMap::new();
    native.insert(
        "map".to_string(),
        Arc::new(|task| {
            Box::new(NativeUppercase {
                task,
                scratch: Vec::new(),
            }) as Box<dyn Operator>
        }) as NativeOperator,
    );
    let mut results = Vec::new();
    // Warm-up run so both sides find the compiled plugin cached.
    run(
        &engine,
        dir.path(),
        "warm-up",
        &map_job(uppercase).replace(&format!("count = {records}"), "count = 100000"),
        &HashMap::new(),
        100_000,
    );
    // The pairs below run `repeats` times, alternating, and each reports
    // its median: the machine's noise between runs is larger than the
    // differences measured.
    let repeats: usize = std::env::var("WEIR_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let median = |mut runs: Vec<Measurement>| {
        runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        let times: Vec<String> = runs.iter().map(|m| format!("{:.2}", m.seconds)).collect();
        eprintln!("{}: {} s", runs[0].name, times.join(", "));
        runs.swap_remove(runs.len() / 2)
    };
    let mut map_rates = Vec::new();
    if wanted("map") {
        let mut native_in_place = HashMap::new();
        native_in_place.insert(
            "map".to_string(),
            Arc::new(|task| Box::new(NativeUppercaseInPlace { task }) as Box<dyn Operator>)
                as NativeOperator,
        );
        let variants = [
            ("stateless map, Wasm component (in place)", HashMap::new()),
            (
                "stateless map, native Rust (copy per record)",
                native.clone(),
            ),
            ("stateless map, native Rust (in place)", native_in_place),
        ];
        let mut runs: Vec<Vec<Measurement>> = variants.iter().map(|_| Vec::new()).collect();
        for _ in 0..repeats {
            for (i, (name, operators)) in variants.iter().enumerate() {
                runs[i].push(run(
                    &engine,
                    dir.path(),
                    name,
                    &map_job(uppercase),
                    operators,
                    records,
                ));
            }
        }
        for measured in runs {
            let measured = median(measured);
            map_rates.push(measured.records as f64 / measured.seconds);
            results.push(measured);
        }
    }
    let wordcount = format!(
        r#"
name = "wordcount"
[state]
backend = "rocksdb"
dir = {state:?}
[[source]]
uid = "gen"
kind = "generator"
count = {records}
keys = 100000
[[operator]]
uid = "count"
plugin = {count:?}
inputs = [{{ from = "gen", partition = "key" }}]
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["count"]
"#,
        state = dir.path().join("state").display().to_string(),
        count = weir_tests::plugins::WORDCOUNT_COUNT,
    );
    let rate = |m: &Measurement| m.records as f64 / m.seconds;
    if wanted("wordcount") {
        let checkpointed = wordcount.replace(
            "[state]",
            &format!(
                "[checkpoint]\ninterval = \"1s\"\nmode = \"exactly-once\"\ndir = {:?}\n[state]",
                dir.path().join("checkpoints").display().to_string()
            ),
        );
        let mut plain = Vec::new();
        let mut with_checkpoints = Vec::new();
        for _ in 0..repeats {
            plain.push(run(
                &engine,
                dir.path(),
                "wordcount, RocksDB state, p=1",
                &wordcount,
                &HashMap::new(),
                records,
            ));
            with_checkpoints.push(run(
                &engine,
                dir.path(),
                "wordcount, RocksDB state, p=1, exactly-once checkpoints every 1s",
                &checkpointed,
                &HashMap::new(),
                records,
            ));
        }
        results.push(median(plain));
        results.push(median(with_checkpoints));
        let n = results.len();
        println!(
            "checkpointed / unchecked wordcount throughput (medians of {repeats}): {:.3}",
            rate(&results[n - 1]) / rate(&results[n - 2])
        );
    }
    if wanted("state") {
        // The word count's record path with each backend, no checkpoints:
        // what reaching state costs besides storage.
        for backend in ["memory", "rocksdb"] {
            let job =
                wordcount.replace("backend = \"rocksdb\"", &format!("backend = \"{backend}\""));
            let runs = (0..repeats)
                .map(|_| {
                    run(
                        &engine,
                        dir.path(),
                        &format!("wordcount, {backend} state, p=1"),
                        &job,
                        &HashMap::new(),
                        records,
                    )
                })
                .collect();
            results.push(median(runs));
        }
    }
    if wanted("ttl") {
        // The word count with and without a TTL on its count (1 h: nothing
        // expires, every cell is stamped and checked), alternating.
        for backend in ["memory", "rocksdb"] {
            let job =
                wordcount.replace("backend = \"rocksdb\"", &format!("backend = \"{backend}\""));
            let with_ttl = job.replace(
                "inputs = [{ from = \"gen\", partition = \"key\" }]",
                "inputs = [{ from = \"gen\", partition = \"key\" }]\nstate_ttl = { count = \"1h\" }",
            );
            assert_ne!(job, with_ttl, "the TTL is set");
            let (mut plain, mut ttl) = (Vec::new(), Vec::new());
            for _ in 0..repeats {
                plain.push(run(
                    &engine,
                    dir.path(),
                    &format!("wordcount, {backend} state, p=1, no TTL"),
                    &job,
                    &HashMap::new(),
                    records,
                ));
                ttl.push(run(
                    &engine,
                    dir.path(),
                    &format!("wordcount, {backend} state, p=1, TTL 1h"),
                    &with_ttl,
                    &HashMap::new(),
                    records,
                ));
            }
            results.push(median(plain));
            results.push(median(ttl));
            let n = results.len();
            println!(
                "{backend}: with TTL / without (medians of {repeats}): {:.3}",
                rate(&results[n - 1]) / rate(&results[n - 2])
            );
        }
    }
    if wanted("chain") {
        // map → map2 → map3 → blackhole; `chain = false` on map2 breaks
        // both links.
        let three_maps = |chain: bool| {
            let mut job = map_job(uppercase).replace(
                "uid = \"out\"\nkind = \"blackhole\"\ninputs = [\"map\"]",
                "uid = \"out\"\nkind = \"blackhole\"\ninputs = [\"map3\"]",
            );
            for (uid, input, opt_out) in [("map2", "map", !chain), ("map3", "map2", false)] {
                job.push_str(&format!(
                    "[[operator]]\nuid = \"{uid}\"\nplugin = {uppercase:?}\ninputs = [\"{input}\"]\nchain = {}\n",
                    !opt_out
                ));
            }
            job
        };
        // The same at parallelism 2 (the generator rebalances to the maps).
        let at_p2 =
            |job: String| job.replacen("name = \"map\"", "name = \"map\"\nparallelism = 2", 1);
        let jobs = [
            ("one Wasm map", map_job(uppercase)),
            ("three Wasm maps, chained", three_maps(true)),
            ("three Wasm maps, unchained", three_maps(false)),
            ("three Wasm maps, chained, p=2", at_p2(three_maps(true))),
            ("three Wasm maps, unchained, p=2", at_p2(three_maps(false))),
        ];
        let mut runs: Vec<Vec<Measurement>> = jobs.iter().map(|_| Vec::new()).collect();
        for _ in 0..repeats {
            for ((name, job), runs) in jobs.iter().zip(&mut runs) {
                runs.push(run(
                    &engine,
                    dir.path(),
                    name,
                    job,
                    &HashMap::new(),
                    records,
                ));
            }
        }
        let medians: Vec<Measurement> = runs.into_iter().map(median).collect();
        let per_cpu = |m: &Measurement| m.records as f64 / m.cpu_seconds.max(0.01);
        println!(
            "three maps chained / unchained (medians of {repeats}): throughput {:.2} (p=2: {:.2}), records per CPU-second {:.2} (p=2: {:.2})",
            rate(&medians[1]) / rate(&medians[2]),
            rate(&medians[3]) / rate(&medians[4]),
            per_cpu(&medians[1]) / per_cpu(&medians[2]),
            per_cpu(&medians[3]) / per_cpu(&medians[4]),
        );
        results.extend(medians);
    }
    if wanted("metrics") {
        // What timing every task's work (busy, idle, back-pressured, plugin
        // time) costs: the same job with it off and on. Record counters
        // are always on.
        for (label, job) in [
            ("stateless map, Wasm", map_job(uppercase)),
            ("wordcount, RocksDB state, p=1", wordcount.clone()),
        ] {
            let (mut off, mut on) = (Vec::new(), Vec::new());
            for _ in 0..repeats {
                for (timing, runs) in [(false, &mut off), (true, &mut on)] {
                    weir::dataflow::metrics::set_timing(timing);
                    let state = if timing { "on" } else { "off" };
                    runs.push(run(
                        &engine,
                        dir.path(),
                        &format!("{label}, metrics timing {state}"),
                        &job,
                        &HashMap::new(),
                        records,
                    ));
                }
            }
            let (off, on) = (median(off), median(on));
            println!(
                "{label}: metrics timing on / off throughput (medians of {repeats}): {:.3}",
                rate(&on) / rate(&off)
            );
            results.push(off);
            results.push(on);
        }
    }
    println!();
    println!("| benchmark | records | seconds | records/s | CPU s | records per CPU-second |");
    println!("|---|---:|---:|---:|---:|---:|");
    for m in &results {
        println!(
            "| {} | {} | {:.2} | {:.0} | {:.2} | {:.0} |",
            m.name,
            m.records,
            m.seconds,
            m.records as f64 / m.seconds,
            m.cpu_seconds,
            m.records as f64 / m.cpu_seconds.max(0.01)
        );
    }
    if let [wasm, copying, in_place] = map_rates[..] {
        println!();
        println!(
            "Wasm map / native map throughput (medians of {repeats}): {:.2}x the native map that copies each record, {:.2}x the native map in place",
            wasm / copying,
            wasm / in_place
        );
    }
}
