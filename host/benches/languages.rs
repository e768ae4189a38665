//! The word count's `count` operator in every guest language, compared
//! (run: `cargo bench -p weir --bench languages`): component size, first
//! load (Cranelift compile) without and with the compile cache, and
//! records/s of the same job (generator → `count` at parallelism 1 with
//! RocksDB state → blackhole). Each language's plugin is built by its
//! example's `build.sh` with the real toolchain (cached under
//! `target/lang/`). `WEIR_BENCH_RECORDS` sets the records of the fast
//! languages (default 2M; the interpreted ones run a tenth of it).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use weir::job::JobGraph;
use weir::plugin::PluginEngine;
use weir::runner;
use weir_tests::languages::{self, C, JAVASCRIPT, Language, PYTHON, ZIG};

fn job(dir: &Path, plugin: &Path, records: u64) -> PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            r#"
name = "count"
[[source]]
uid = "words"
kind = "generator"
count = {records}
keys = 10000
[[operator]]
uid = "count"
plugin = {plugin:?}
inputs = [{{ from = "words", partition = "key" }}]
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["count"]
"#
        ),
    )
    .expect("job file");
    path
}

fn load_times(plugin: &Path) -> (Duration, Duration) {
    let uncached = PluginEngine::new(None).expect("engine");
    let cold = uncached.load(plugin).expect("loads").load_time;
    let cache = tempfile::tempdir().expect("tempdir");
    PluginEngine::new(Some(cache.path().to_path_buf()))
        .expect("engine")
        .load(plugin)
        .expect("compiles and stores");
    let warm = PluginEngine::new(Some(cache.path().to_path_buf()))
        .expect("engine")
        .load(plugin)
        .expect("loads from the cache");
    assert!(warm.from_cache);
    (cold, warm.load_time)
}

fn records_per_second(engine: &PluginEngine, plugin: &Path, records: u64) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = job(dir.path(), plugin, records);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let job = runner::prepare(engine, JobGraph::load(&path).expect("job")).expect("prepare");
    let started = Instant::now();
    runtime
        .block_on(runner::run(&job, &mut |_| {}))
        .expect("runs");
    records as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let records: u64 = std::env::var("WEIR_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let weir = Path::new(env!("CARGO_BIN_EXE_weir"));
    let mut plugins: Vec<(&str, PathBuf, u64)> = vec![(
        "Rust (weir-sdk)",
        PathBuf::from(weir_tests::plugins::WORDCOUNT_COUNT),
        records,
    )];
    let others: [(Language, &str, u64); 4] = [
        (PYTHON, "Python (componentize-py)", records / 10),
        (JAVASCRIPT, "JavaScript (ComponentizeJS)", records / 10),
        (C, "C (clang, wit-bindgen C)", records),
        (ZIG, "Zig (canonical ABI by hand)", records),
    ];
    for (language, label, n) in others {
        let plugin = languages::plugin(language, weir)
            .unwrap_or_else(|| panic!("the {} toolchain is missing", language.name));
        plugins.push((label, plugin, n));
    }
    let engine = PluginEngine::new(Some(weir_tests::compile_cache())).expect("engine");
    println!();
    println!(
        "| language | component | first load, no cache | first load, cached | records | records/s | µs/record |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (label, plugin, n) in plugins {
        let size = std::fs::metadata(&plugin).expect("plugin").len();
        let (cold, warm) = load_times(&plugin);
        engine.load(&plugin).expect("warm the shared cache");
        let rate = records_per_second(&engine, &plugin, n);
        let size = if size >= 1 << 20 {
            format!("{:.1} MB", size as f64 / (1u64 << 20) as f64)
        } else {
            format!("{:.0} KB", size as f64 / 1024.0)
        };
        println!(
            "| {label} | {size} | {:.2} s | {:.0} ms | {n} | {} | {:.2} |",
            cold.as_secs_f64(),
            warm.as_secs_f64() * 1000.0,
            if rate >= 1e6 {
                format!("{:.2}M", rate / 1e6)
            } else {
                format!("{:.1}k", rate / 1e3)
            },
            1e6 / rate
        );
    }
}
