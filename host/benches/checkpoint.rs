//! Checkpoint duration and size as keyed state grows (run:
//! `cargo bench -p weir --bench checkpoint`).
//!
//! For each state size N (100k, 1M, 10M keys by default; `WEIR_BENCH_KEYS`
//! takes a comma-separated list) one operator subtask's RocksDB state is
//! filled with N keys and checkpointed (the first checkpoint copies
//! everything); then, per round, 1% of the keys are updated and a checkpoint
//! is taken the way the operator task takes it: the synchronous part (take
//! the changed cells from the cache) and the asynchronous one (write them,
//! RocksDB checkpoint by hard links, copy to storage: only new SST files go
//! to `shared/`).
//! Printed per size: the full checkpoint and the mean incremental one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use weir::checkpoint::storage::SubtaskStorage;
use weir::protocol::{LocalSnapshot, SnapshotStats, SnapshotStore, TaskReport};
use weir::state::rocks::RocksBackend;
use weir::state::{KeyedState, StateKind};
use weir::types::{Barrier, BaseRule, CheckpointId};

const ROUNDS: u64 = 3;

struct Taken {
    sync: Duration,
    asynchronous: Duration,
    bytes: u64,
    new_bytes: u64,
}

fn take(
    runtime: &tokio::runtime::Runtime,
    state: &mut KeyedState,
    storage: &Arc<SubtaskStorage>,
    reports: &mut mpsc::UnboundedReceiver<TaskReport>,
    id: u64,
) -> Taken {
    let barrier = Barrier::checkpoint(CheckpointId(id), BaseRule::Chain);
    let started = Instant::now();
    let job = state
        .snapshot(storage.local_dir(&barrier), storage.wants_base(&barrier))
        .expect("snapshot");
    let sync = started.elapsed();
    let _guard = runtime.enter();
    storage.upload(
        &barrier,
        LocalSnapshot {
            state: job,
            timers: Vec::new(),
            finished: false,
        },
        SnapshotStats::default(),
        Vec::new(),
    );
    match runtime.block_on(reports.recv()).expect("a report") {
        TaskReport::Ack { stats, .. } => Taken {
            sync,
            asynchronous: stats.asynchronous,
            bytes: stats.bytes,
            new_bytes: stats.new_bytes,
        },
        other => panic!("checkpoint failed: {other:?}"),
    }
}

fn key(i: u64) -> [u8; 12] {
    let mut out = *b"key-00000000";
    out[4..].copy_from_slice(&i.to_be_bytes());
    out
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let sizes: Vec<u64> = std::env::var("WEIR_BENCH_KEYS")
        .unwrap_or_else(|_| "100000,1000000,10000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!();
    println!(
        "| keys | full: sync ms | full: async ms | full size MiB | 1% update: sync ms | async ms | size MiB | incremental MiB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &keys in &sizes {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = "count/count".to_string();
        let backend =
            RocksBackend::open(&dir.path().join("db"), std::slice::from_ref(&table)).expect("open");
        let mut state = KeyedState::new(
            vec![(table, StateKind::Value)],
            Box::new(backend),
            128,
            100_000,
        );
        for i in 0..keys {
            state
                .value_set(0, &key(i), 1u64.to_le_bytes().to_vec())
                .expect("set");
            if i % 50_000 == 0 {
                state.maybe_evict().expect("evict");
            }
        }
        let (tx, mut reports) = mpsc::unbounded_channel();
        let storage = Arc::new(SubtaskStorage::new(
            dir.path().join("checkpoints"),
            "count",
            0,
            [0, 128],
            dir.path().join("snapshots"),
            tx,
            Arc::default(),
        ));
        let full = take(&runtime, &mut state, &storage, &mut reports, 1);
        let mut sum = Taken {
            sync: Duration::ZERO,
            asynchronous: Duration::ZERO,
            bytes: 0,
            new_bytes: 0,
        };
        let changed = (keys / 100).max(1);
        for round in 0..ROUNDS {
            for j in 0..changed {
                let i = xxhash_rust::xxh3::xxh3_64_with_seed(&j.to_le_bytes(), round) % keys;
                state
                    .value_set(0, &key(i), (round + 2).to_le_bytes().to_vec())
                    .expect("set");
            }
            state.maybe_evict().expect("evict");
            let taken = take(&runtime, &mut state, &storage, &mut reports, round + 2);
            sum.sync += taken.sync;
            sum.asynchronous += taken.asynchronous;
            sum.bytes += taken.bytes;
            sum.new_bytes += taken.new_bytes;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0 / 1.0;
        println!(
            "| {keys} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
            ms(full.sync),
            ms(full.asynchronous),
            mib(full.bytes),
            ms(sum.sync) / ROUNDS as f64,
            ms(sum.asynchronous) / ROUNDS as f64,
            mib(sum.bytes / ROUNDS),
            mib(sum.new_bytes / ROUNDS),
        );
    }
}
