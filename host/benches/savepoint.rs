//! Savepoint write and restore throughput, and the downtime of
//! stop-with-savepoint + resume (run: `cargo bench -p weir --bench savepoint`).
//!
//! 1. State: for each size N (1M and 10M keys by default; `WEIR_BENCH_KEYS`
//!    takes a comma-separated list) one operator subtask's RocksDB state is
//!    filled with N word-count cells (a word, its count as JSON) and written
//!    as a savepoint the way the operator task does it (flush, RocksDB
//!    checkpoint by hard links, then the canonical `.state` file); then
//!    restored the way `weir run -s` does it: every file checksummed first,
//!    then the cells loaded into a fresh RocksDB at parallelism 1; and
//!    rescaled: loaded into two new subtasks (each half of the key groups,
//!    each scanning the stored file for its range) in parallel.
//! 2. Downtime: the word-count job (generator -> `count` component at p=2
//!    -> blackhole) runs until its state holds about `WEIR_BENCH_DOWNTIME_KEYS`
//!    keys (default 1M), is stopped with a savepoint, and resumed from it:
//!    the time from the stop request to the job's end, plus the time from
//!    the resumed start to its first record.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use weir::checkpoint::coordinator::operator_template;
use weir::checkpoint::metadata::{self, CheckpointMetadata, SnapshotKind, StateRef};
use weir::checkpoint::restore::{self, CellSink};
use weir::checkpoint::savepoint;
use weir::checkpoint::storage::SubtaskStorage;
use weir::job::JobGraph;
use weir::plugin::PluginEngine;
use weir::protocol::{
    LocalSnapshot, Role, SnapshotStats, SnapshotStore, TaskReport, TransferProgress,
};
use weir::runner::{self, RunOptions};
use weir::state::rocks::RocksBackend;
use weir::state::{KeyedState, StateBackend, StateKind, TableSpec};
use weir::types::{Barrier, BarrierKind, CheckpointId, OutDir, SavepointForm, SavepointTarget};

const MAX_PARALLELISM: u32 = 128;

fn word(i: u64) -> String {
    format!("w{i:08}")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn sizes(variable: &str, default: &str) -> Vec<u64> {
    std::env::var(variable)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// Fills, savepoints and restores N keys; prints one table row.
fn state_round_trip(runtime: &tokio::runtime::Runtime, keys: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = "count/count".to_string();
    let backend =
        RocksBackend::open(&dir.path().join("db"), std::slice::from_ref(&table)).expect("open");
    let mut state = KeyedState::new(
        vec![(table.clone(), StateKind::Value)],
        Box::new(backend),
        MAX_PARALLELISM,
        100_000,
    );
    for i in 0..keys {
        let count = 1 + i % 997;
        state
            .value_set(0, word(i).as_bytes(), count.to_string().into_bytes())
            .expect("set");
        if i % 50_000 == 0 {
            state.maybe_evict().expect("evict");
        }
    }
    state.flush().expect("flush");

    // Write, as the operator task does at a savepoint barrier.
    let target = dir.path().join("savepoint");
    std::fs::create_dir_all(&target).expect("mkdir");
    let out = OutDir::open(&target).expect("open");
    let barrier = Barrier {
        id: CheckpointId(1),
        kind: BarrierKind::Savepoint(Arc::new(SavepointTarget {
            dir: out.clone(),
            form: SavepointForm::Canonical,
            cut: None,
        })),
    };
    let (reports, mut acks) = mpsc::unbounded_channel();
    let storage = Arc::new(SubtaskStorage::new(
        dir.path().join("checkpoints"),
        "count",
        0,
        [0, MAX_PARALLELISM],
        dir.path().join("snapshots"),
        reports,
        Arc::default(),
    ));
    let started = Instant::now();
    let job = state
        .savepoint(storage.local_dir(&barrier))
        .expect("savepoint");
    let sync = started.elapsed();
    {
        let _guard = runtime.enter();
        storage.upload(
            &barrier,
            LocalSnapshot {
                state: job,
                timers: Vec::new(),
                finished: false,
            },
            SnapshotStats::default(),
            vec![TableSpec {
                name: table.clone(),
                ttl: None,
            }],
        );
    }
    let snapshot = match runtime.block_on(acks.recv()).expect("a report") {
        TaskReport::Ack { snapshot, .. } => snapshot,
        other => panic!("savepoint failed: {other:?}"),
    };
    let written = started.elapsed();
    let bytes = snapshot.files.iter().map(|f| f.size).sum::<u64>();
    let mut operator = operator_template(Role::Operator, 1);
    operator.states = vec![StateRef {
        name: "count".into(),
        kind: "value".into(),
        schema_version: 1,
        ttl: None,
    }];
    operator.subtasks.push(*snapshot);
    let mut metadata = CheckpointMetadata {
        kind: SnapshotKind::Savepoint,
        job_id: "bench".into(),
        job_name: "bench".into(),
        checkpoint: 1,
        completed_ms: 0,
        max_parallelism: MAX_PARALLELISM,
        operators: Default::default(),
        exchanges: Default::default(),
    };
    metadata.operators.insert("count".into(), operator);
    metadata::write(&out, &metadata).expect("_metadata");
    drop(state);

    // Restore, as `weir run -s` does: check every file, then load.
    let started = Instant::now();
    let read = savepoint::validate(&target).expect("valid");
    let verified = started.elapsed();
    let mut fresh = RocksBackend::open(&dir.path().join("restored"), std::slice::from_ref(&table))
        .expect("open");
    let progress = TransferProgress::default();
    let tables = [table];
    let mut sink = CellSink {
        range: 0..MAX_PARALLELISM,
        tables: &tables,
        backend: &mut fresh,
        progress: &progress,
        migrate: None,
        restamp: Default::default(),
    };
    let loaded = restore::load_cells(
        &read,
        "count",
        &read.metadata.operators["count"],
        &dir.path().join("work"),
        &mut sink,
    )
    .expect("load");
    let restored = started.elapsed();
    assert_eq!(loaded, keys, "every key restored");
    let mut counted = 0u64;
    fresh
        .scan(0, 0..MAX_PARALLELISM, &mut |_, _, _| counted += 1)
        .expect("scan");
    assert_eq!(counted, keys);
    drop(fresh);

    // Rescaled: the same savepoint into two new subtasks (key groups split
    // in halves), each streaming the cells of its range from the stored
    // file, in parallel as a job's start creates its subtasks.
    let started = Instant::now();
    let halves = [0..MAX_PARALLELISM / 2, MAX_PARALLELISM / 2..MAX_PARALLELISM];
    let rescaled: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = halves
            .iter()
            .enumerate()
            .map(|(subtask, range)| {
                let (read, tables, dir) = (&read, &tables, dir.path());
                scope.spawn(move || {
                    let mut backend =
                        RocksBackend::open(&dir.join(format!("rescaled-{subtask}")), tables)
                            .expect("open");
                    let progress = TransferProgress::default();
                    let mut sink = CellSink {
                        range: range.clone(),
                        tables,
                        backend: &mut backend,
                        progress: &progress,
                        migrate: None,
                        restamp: Default::default(),
                    };
                    restore::load_cells(
                        read,
                        "count",
                        &read.metadata.operators["count"],
                        &dir.join(format!("work-{subtask}")),
                        &mut sink,
                    )
                    .expect("load")
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("restores"))
            .sum()
    });
    let rescaled_in = started.elapsed();
    assert_eq!(rescaled, keys, "every key restored once across the two");

    // Read as data, as `weir savepoint read` does: every cell streamed
    // from the canonical file and written as a JSON line.
    let started = Instant::now();
    let mut out = std::io::BufWriter::new(std::io::sink());
    let selection = weir::checkpoint::cells::Selection {
        uid: "count",
        state: None,
        key: None,
    };
    let read_as_data = weir::checkpoint::cells::read_cells(
        &read,
        &read.metadata.operators["count"],
        selection,
        &dir.path().join("work-read"),
        &mut |cell| {
            let line = weir::checkpoint::cells::CellLine::of(&cell);
            serde_json::to_writer(&mut out, &line).expect("write");
            std::io::Write::write_all(&mut out, b"\n").expect("write");
            Ok(())
        },
    )
    .expect("read");
    let read_in = started.elapsed();
    assert_eq!(read_as_data, keys, "every key read once");
    let secs = |d: Duration| d.as_secs_f64();
    println!(
        "| {keys} | {:.1} | {:.0} | {:.2} | {:.0} | {:.2}M | {:.2} | {:.2} | {:.0} | {:.2}M | {:.2} | {:.2}M |",
        mib(bytes),
        sync.as_secs_f64() * 1000.0,
        secs(written),
        mib(bytes) / secs(written),
        keys as f64 / secs(written) / 1e6,
        secs(verified),
        secs(restored),
        mib(bytes) / secs(restored),
        keys as f64 / secs(restored) / 1e6,
        secs(rescaled_in),
        keys as f64 / secs(rescaled_in) / 1e6,
    );
    eprintln!(
        "{keys} keys read as data (weir savepoint read: cells to JSON lines): {:.2} s, {:.2}M keys/s",
        secs(read_in),
        keys as f64 / secs(read_in) / 1e6
    );
}

/// Runs the word count until about `keys` keys, stops it with a savepoint
/// and resumes it; prints one table row.
fn downtime(engine: &PluginEngine, keys: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("job.toml");
    std::fs::write(
        &path,
        format!(
            r#"
name = "wordcount"
max_parallelism = {MAX_PARALLELISM}
[[source]]
uid = "words"
kind = "generator"
keys = {keys}
[[operator]]
uid = "count"
plugin = {plugin:?}
inputs = [{{ from = "words", partition = "key" }}]
parallelism = 2
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["count"]
"#,
            plugin = weir_tests::plugins::WORDCOUNT_COUNT,
        ),
    )
    .expect("job file");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let job = runner::prepare(engine, JobGraph::load(&path).expect("job")).expect("prepare");
    let target = dir.path().join("savepoints");
    let stop_took = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    // 3 records per key: about 95% of the keys have state by then.
    let records = keys * 3;
    let outcome = runtime
        .block_on(runner::run(&job, &mut |running| {
            let metrics = running.metrics().to_vec();
            let savepointer = running.savepointer();
            let (target, stop_took) = (target.clone(), stop_took.clone());
            tokio::spawn(async move {
                while metrics
                    .iter()
                    .filter(|m| m.is_source)
                    .map(|m| m.records_out())
                    .sum::<u64>()
                    < records
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let started = Instant::now();
                savepointer
                    .savepoint(target, Some(false))
                    .await
                    .expect("savepoint");
                *stop_took.lock().expect("lock") = started.elapsed();
            });
        }))
        .expect("stops");
    let stopped_at = Instant::now();
    let savepoint = outcome
        .savepoint
        .and_then(|s| s.local().map(std::path::Path::to_path_buf))
        .expect("a local savepoint");
    let stop = *stop_took.lock().expect("lock") + stopped_at.elapsed();
    let inspection = savepoint::inspect(&metadata::read(&savepoint).expect("reads"));
    let saved_keys: u64 = inspection
        .operators
        .iter()
        .flat_map(|o| &o.states)
        .filter_map(|s| s.keys)
        .sum();

    let started = Instant::now();
    let graph = JobGraph::load(&path).expect("job");
    let options = RunOptions {
        restore: Some(savepoint.clone().into()),
        allow_non_restored_state: false,
        ..Default::default()
    };
    let resumed = runner::prepare_with(engine, graph, &options).expect("prepare");
    let first_record = Arc::new(std::sync::Mutex::new(None));
    let resume_took = first_record.clone();
    runtime
        .block_on(runner::run(&resumed, &mut |running| {
            let metrics = running.metrics().to_vec();
            let canceller = running.canceller();
            let first_record = first_record.clone();
            tokio::spawn(async move {
                while metrics
                    .iter()
                    .filter(|m| !m.is_source && !m.is_sink)
                    .map(|m| m.records_in())
                    .sum::<u64>()
                    == 0
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                *first_record.lock().expect("lock") = Some(started.elapsed());
                let _ = canceller.send(true);
            });
        }))
        .expect("resumes");
    let resume = resume_took.lock().expect("lock").expect("a first record");
    println!(
        "| {saved_keys} | {:.1} | {:.0} | {:.0} | {:.0} |",
        mib(inspection.bytes),
        stop.as_secs_f64() * 1000.0,
        resume.as_secs_f64() * 1000.0,
        (stop + resume).as_secs_f64() * 1000.0,
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if wanted("state") {
        println!();
        println!(
            "| keys | savepoint MiB | sync ms | write s | write MiB/s | write keys/s | restore: verify s | restore s (incl. verify) | restore MiB/s | restore keys/s | restore at p=2 s | at p=2 keys/s |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for keys in sizes("WEIR_BENCH_KEYS", "1000000,10000000") {
            state_round_trip(&runtime, keys);
        }
    }
    if wanted("downtime") {
        let engine = PluginEngine::new(Some(weir_tests::compile_cache())).expect("engine");
        println!();
        println!(
            "| keys in the savepoint | savepoint MiB | stop-with-savepoint ms | resume to first record ms | downtime ms |"
        );
        println!("|---:|---:|---:|---:|---:|");
        for keys in sizes("WEIR_BENCH_DOWNTIME_KEYS", "1000000") {
            downtime(&engine, keys);
        }
    }
}
