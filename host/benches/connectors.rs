//! Real streams and shared storage, printed as tables (run:
//! `cargo bench -p weir --bench connectors`; it installs and starts
//! nats-server and SeaweedFS on loopback as the tests do).
//!
//! 1. `nats`: the word count's `count` component (RocksDB state,
//!    exactly-once checkpoints every second, parallelism 2) over
//!    `WEIR_BENCH_RECORDS` words (default 1M) of 100k distinct ones:
//!    JetStream in (6 partitions, keyed by a subject token) → count →
//!    JetStream out (exactly-once), against the same words from a file
//!    into the file sink. Whole runs, start to end; alternating,
//!    `WEIR_BENCH_REPEATS` times each (default 3), medians.
//! 2. `s3`: checkpoints of a count over `WEIR_BENCH_KEYS` keys (default
//!    1M): every checkpoint of the run on the local disk against the same
//!    job with `[checkpoint] dir` on S3 (SeaweedFS on loopback): the first
//!    (a full base) and the median of the rest, end to end (trigger to
//!    `_metadata` on S3).
//!
//! 3. `kafka`: the same word count with Kafka in (6 partitions, keyed by
//!    the word) and out (exactly-once: a transaction per subtask per
//!    checkpoint), on noida-db on loopback, against files; with the
//!    broker's CPU time during the Kafka run.
//!
//! 4. `exchange`: the word count's keyed edge through JetStream (an
//!    `exchange` sink and source in one job on the test NATS server)
//!    against the same job in-process: `WEIR_BENCH_RECORDS` generated
//!    words (default 1M) of 100k distinct ones → count (RocksDB,
//!    parallelism 2, a checkpoint a second) → blackhole. Whole runs,
//!    alternating, medians of `WEIR_BENCH_REPEATS` (3).
//!
//! Pass words to run only some (`cargo bench -p weir --bench connectors -- s3`).

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use weir::connectors::generator::{word, word_index};
use weir::job::JobGraph;
use weir::plugin::PluginEngine;
use weir::runner;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs a job file to its end; returns the prepared job (for its
/// checkpoint records) and the wall time.
fn run(engine: &PluginEngine, path: &Path) -> (runner::PreparedJob, Duration) {
    let graph = JobGraph::load(path).expect("a valid job");
    let job = runner::prepare(engine, graph).expect("prepared");
    let started = Instant::now();
    runtime()
        .block_on(runner::run(&job, &mut |_| {}))
        .expect("the job runs");
    (job, started.elapsed())
}

const COUNT_JOB_TAIL: &str = r#"
[[operator]]
uid = "count"
plugin = "{count}"
inputs = [{ from = "in", partition = "key" }]
parallelism = 2
"#;

fn nats(engine: &PluginEngine, records: u64, repeats: u64) {
    let Some(server) = weir_tests::nats::server() else {
        panic!("nats-server is needed for this benchmark");
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let words: Vec<String> = (0..records)
        .map(|i| word(word_index(i, 100_000, 9)))
        .collect();
    std::fs::write(dir.path().join("words.txt"), words.join("\n") + "\n").expect("input");
    let url = &server.url;
    runtime().block_on(async {
        let js = jetstream::new(async_nats::connect(url).await.expect("connects"));
        for (name, subjects) in [("bench-in", "bench.in.>"), ("bench-out", "bench.out")] {
            let _ = js.delete_stream(name).await;
            js.create_stream(jetstream::stream::Config {
                name: name.into(),
                subjects: vec![subjects.into()],
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .expect("a stream");
        }
        let mut acks = Vec::new();
        for (i, w) in words.iter().enumerate() {
            let subject = format!("bench.in.{}.{w}", i % 6);
            acks.push(
                js.publish(subject, w.clone().into())
                    .await
                    .expect("publish"),
            );
            if acks.len() >= 4096 {
                for ack in acks.drain(..) {
                    ack.await.expect("acknowledged");
                }
            }
        }
        for ack in acks {
            ack.await.expect("acknowledged");
        }
    });
    let count = weir_tests::plugins::WORDCOUNT_COUNT;
    let tail = COUNT_JOB_TAIL.replace("{count}", count);
    let head = |name: &str| {
        format!(
            "name = \"{name}\"\nmax_parallelism = 128\n[checkpoint]\ninterval = \"1s\"\ndir = \"checkpoints\"\n[state]\nbackend = \"rocksdb\"\n"
        )
    };
    let nats_job = format!(
        "{}[[source]]\nuid = \"in\"\nkind = \"nats\"\nurl = \"{url}\"\nstream = \"bench-in\"\nsubject = \"bench.in\"\npartitions = 6\nparallelism = 2\nkey_token = 3\nbounded = true\n{tail}[[sink]]\nuid = \"out\"\nkind = \"nats\"\nurl = \"{url}\"\nstream = \"bench-out\"\nsubject = \"bench.out\"\ninputs = [\"count\"]\n",
        head("nats")
    );
    let file_job = format!(
        "{}[[source]]\nuid = \"in\"\nkind = \"file\"\npath = \"words.txt\"\nformat = {{ key = 0 }}\n{tail}[[sink]]\nuid = \"out\"\nkind = \"file\"\npath = \"out\"\ninputs = [\"count\"]\n",
        head("files")
    );
    let nats_path = dir.path().join("nats.toml");
    let file_path = dir.path().join("files.toml");
    std::fs::write(&nats_path, nats_job).expect("job");
    std::fs::write(&file_path, file_job).expect("job");
    let published = || {
        runtime().block_on(async {
            let js = jetstream::new(async_nats::connect(url).await.expect("connects"));
            let mut out = js.get_stream("bench-out").await.expect("the output stream");
            out.info().await.expect("its state").state.messages
        })
    };
    let (mut on_nats, mut on_files) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        let before = published();
        let (_, took) = run(engine, &nats_path);
        assert_eq!(
            published() - before,
            records,
            "every update reaches the output stream once"
        );
        on_nats.push(records as f64 / took.as_secs_f64());
        let (_, took) = run(engine, &file_path);
        on_files.push(records as f64 / took.as_secs_f64());
        let _ = std::fs::remove_dir_all(dir.path().join("out"));
    }
    let (n, f) = (median(on_nats), median(on_files));
    println!(
        "\nword count, {records} words, 100k keys, p=2, exactly-once checkpoints every 1 s ({repeats} runs each, medians)"
    );
    println!("| in → count → out | records/s | vs files |");
    println!("|---|---:|---:|");
    println!("| JetStream → count → JetStream | {n:.0} | {:.2}× |", n / f);
    println!("| file → count → file | {f:.0} | 1.00× |");
}

/// The CPU seconds (user + system) process `pid` used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command's `)`: state is field 3; utime, stime are 14, 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The pid of the process whose command line holds `needle`.
fn pid_with(needle: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(needle).then_some(pid)
        })
}

fn kafka(engine: &PluginEngine, records: u64, repeats: u64) {
    let Some(server) = weir_tests::kafka::server() else {
        panic!("noida-db is needed for this benchmark");
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let words: Vec<String> = (0..records)
        .map(|i| word(word_index(i, 100_000, 9)))
        .collect();
    std::fs::write(dir.path().join("words.txt"), words.join("\n") + "\n").expect("input");
    server.create_topic("bench-in", 6);
    let keyed: Vec<(i32, Option<&str>, &str)> = words
        .iter()
        .enumerate()
        .map(|(i, w)| ((i % 6) as i32, Some(w.as_str()), w.as_str()))
        .collect();
    for chunk in keyed.chunks(200_000) {
        server.produce("bench-in", chunk, None);
    }
    let port = server.bootstrap.rsplit(':').next().unwrap_or("");
    let broker = pid_with(&format!("--kafka-port {port}"));
    let bootstrap = &server.bootstrap;
    let count = weir_tests::plugins::WORDCOUNT_COUNT;
    let tail = COUNT_JOB_TAIL.replace("{count}", count);
    let head = |name: &str| {
        format!(
            "name = \"{name}\"\nmax_parallelism = 128\n[checkpoint]\ninterval = \"1s\"\ndir = \"checkpoints\"\n[state]\nbackend = \"rocksdb\"\n"
        )
    };
    let file_job = format!(
        "{}[[source]]\nuid = \"in\"\nkind = \"file\"\npath = \"words.txt\"\nformat = {{ key = 0 }}\n{tail}[[sink]]\nuid = \"out\"\nkind = \"file\"\npath = \"out\"\ninputs = [\"count\"]\n",
        head("files")
    );
    let file_path = dir.path().join("files.toml");
    std::fs::write(&file_path, file_job).expect("job");
    let (mut on_kafka, mut on_files, mut broker_share) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..repeats {
        // A new output topic and transactional ids per run.
        let out = format!("bench-out-{round}");
        server.create_topic(&out, 3);
        let kafka_job = format!(
            "{}[[source]]\nuid = \"in\"\nkind = \"kafka\"\nbootstrap = \"{bootstrap}\"\ntopic = \"bench-in\"\nparallelism = 2\nbounded = true\n{tail}[[sink]]\nuid = \"out\"\nkind = \"kafka\"\nbootstrap = \"{bootstrap}\"\ntopic = \"{out}\"\ntransactional_id_prefix = \"bench-{round}\"\ninputs = [\"count\"]\n",
            head("kafka")
        );
        let kafka_path = dir.path().join(format!("kafka-{round}.toml"));
        std::fs::write(&kafka_path, kafka_job).expect("job");
        let before = broker.map(cpu_seconds);
        let (_, took) = run(engine, &kafka_path);
        if let (Some(pid), Some(before)) = (broker, before) {
            broker_share.push((cpu_seconds(pid) - before) / took.as_secs_f64());
        }
        assert_eq!(
            server.read_committed(&out).len() as u64,
            records,
            "every update committed to {out} once"
        );
        on_kafka.push(records as f64 / took.as_secs_f64());
        let (_, took) = run(engine, &file_path);
        on_files.push(records as f64 / took.as_secs_f64());
        let _ = std::fs::remove_dir_all(dir.path().join("out"));
        let _ = std::fs::remove_dir_all(dir.path().join("checkpoints"));
    }
    let (k, f) = (median(on_kafka), median(on_files));
    let share = if broker_share.is_empty() {
        "not measured (broker process not found)".to_string()
    } else {
        format!("{:.0}% of one core", median(broker_share) * 100.0)
    };
    println!(
        "\nword count, {records} words, 100k keys, p=2, exactly-once checkpoints every 1 s ({repeats} runs each, medians)"
    );
    println!("| in → count → out | records/s | vs files |");
    println!("|---|---:|---:|");
    println!(
        "| Kafka → count → Kafka (noida-db) | {k:.0} | {:.2}× |",
        k / f
    );
    println!("| file → count → file | {f:.0} | 1.00× |");
    println!("broker (noida-db) CPU during the Kafka runs: {share}");
}

fn s3(engine: &PluginEngine, keys: u64) {
    let Some(server) = weir_tests::s3::server() else {
        panic!("SeaweedFS is needed for this benchmark");
    };
    server.bucket("weir-bench");
    for (name, value) in server.env() {
        // SAFETY: set before this benchmark starts any job thread.
        unsafe { std::env::set_var(name, value) };
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let count = weir_tests::plugins::WORDCOUNT_COUNT;
    let job = |checkpoints: &str| {
        format!(
            "name = \"ckpt\"\nmax_parallelism = 128\n[checkpoint]\ninterval = \"2s\"\ndir = \"{checkpoints}\"\nretained = 2\n[state]\nbackend = \"rocksdb\"\n[[source]]\nuid = \"in\"\nkind = \"generator\"\ncount = {}\nkeys = {keys}\nrate = {}\n{}[[sink]]\nuid = \"out\"\nkind = \"blackhole\"\ninputs = [\"count\"]\n",
            keys * 3,
            keys * 3 / 8,
            COUNT_JOB_TAIL.replace("{count}", count)
        )
    };
    println!(
        "\ncheckpoints of a count over {keys} keys (RocksDB, p=2, one every 2 s over ~8 s of input)"
    );
    println!(
        "| checkpoint dir | first (base) | median of the rest | checkpoints | bytes referenced (last) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (label, location) in [
        ("local disk", "checkpoints".to_string()),
        (
            "S3 (SeaweedFS, loopback)",
            format!("s3://weir-bench/{}", runner::new_job_id()),
        ),
    ] {
        let path = dir.path().join("ckpt.toml");
        std::fs::write(&path, job(&location)).expect("job");
        let (prepared, _) = run(engine, &path);
        let records = prepared
            .checkpoints
            .as_ref()
            .expect("checkpointing is on")
            .metrics
            .recent();
        let first = records
            .first()
            .map_or(0.0, |r| r.duration.as_secs_f64() * 1e3);
        let rest: Vec<f64> = records
            .iter()
            .skip(1)
            .map(|r| r.duration.as_secs_f64() * 1e3)
            .collect();
        let rest = if rest.is_empty() { 0.0 } else { median(rest) };
        let bytes = records.last().map_or(0, |r| r.bytes);
        println!(
            "| {label} | {first:.0} ms | {rest:.0} ms | {} | {} |",
            records.len(),
            weir::human::bytes(bytes)
        );
    }
}

fn exchange(engine: &PluginEngine, records: u64, repeats: u64) {
    let Some(server) = weir_tests::nats::server() else {
        panic!("nats-server is needed for this benchmark");
    };
    let url = &server.url;
    let dir = tempfile::tempdir().expect("tempdir");
    let count = weir_tests::plugins::WORDCOUNT_COUNT;
    let head = format!(
        "name = \"exchange-bench\"\nmax_parallelism = 128\n[checkpoint]\ninterval = \"1s\"\ndir = \"checkpoints\"\n[state]\nbackend = \"rocksdb\"\n[[source]]\nuid = \"words\"\nkind = \"generator\"\ncount = {records}\nkeys = 100000\nseed = 9\nparallelism = 2\n"
    );
    let count_op = |from: &str| {
        format!(
            "[[operator]]\nuid = \"count\"\nplugin = \"{count}\"\ninputs = [{{ from = \"{from}\", partition = \"key\" }}]\nparallelism = 2\n[[sink]]\nuid = \"out\"\nkind = \"blackhole\"\ninputs = [\"count\"]\n"
        )
    };
    let in_process = dir.path().join("in-process.toml");
    std::fs::write(&in_process, format!("{head}{}", count_op("words"))).expect("job");
    let mut local = Vec::new();
    let mut through = Vec::new();
    for repeat in 0..repeats {
        let (_, took) = run(engine, &in_process);
        local.push(records as f64 / took.as_secs_f64());
        let name = format!("bench.x{repeat}");
        let exchanged = dir.path().join(format!("exchange-{repeat}.toml"));
        std::fs::write(
            &exchanged,
            format!(
                "{head}[[sink]]\nuid = \"to-count\"\nkind = \"exchange\"\nurl = \"{url}\"\nexchange = \"{name}\"\ninputs = [\"words\"]\n[[source]]\nuid = \"keyed\"\nkind = \"exchange\"\nurl = \"{url}\"\nexchange = \"{name}\"\nparallelism = 2\n{}",
                count_op("keyed")
            ),
        )
        .expect("job");
        let (_, took) = run(engine, &exchanged);
        through.push(records as f64 / took.as_secs_f64());
        runtime().block_on(async {
            let js = jetstream::new(async_nats::connect(url.as_str()).await.expect("connects"));
            let exchange = weir::job::Exchange {
                url: url.clone(),
                name: name.clone(),
                replicas: 1,
            };
            let _ = js.delete_stream(exchange.stream()).await;
        });
    }
    let (local, through) = (median(local), median(through));
    println!(
        "exchange: {records} words, 100k keys, count at parallelism 2, RocksDB, checkpoints every 1 s; whole runs, medians of {repeats}"
    );
    println!("| keyed edge | records/s | vs in-process |");
    println!("|---|---:|---:|");
    println!("| in-process | {local:.0} | 1.00 |");
    println!(
        "| through a JetStream exchange | {through:.0} | {:.2} |",
        through / local
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
    let engine = PluginEngine::new(Some(weir_tests::compile_cache())).expect("engine");
    if wanted("nats") {
        nats(
            &engine,
            env_or("WEIR_BENCH_RECORDS", 1_000_000),
            env_or("WEIR_BENCH_REPEATS", 3),
        );
    }
    if wanted("kafka") {
        kafka(
            &engine,
            env_or("WEIR_BENCH_RECORDS", 1_000_000),
            env_or("WEIR_BENCH_REPEATS", 3),
        );
    }
    if wanted("exchange") {
        exchange(
            &engine,
            env_or("WEIR_BENCH_RECORDS", 1_000_000),
            env_or("WEIR_BENCH_REPEATS", 3),
        );
    }
    if wanted("s3") {
        s3(&engine, env_or("WEIR_BENCH_KEYS", 1_000_000));
    }
}
