//! The running host (run: `cargo bench -p weir --bench host`; add a word
//! to run only the parts whose name contains it: `add`, `submit`,
//! `upgrade`, `api`). An in-process `weir serve` on a loopback port with a
//! fresh data dir, driven over HTTP:
//!
//! 1. `add`: `POST /api/plugins` (validate + precompile on arrival) of the
//!    Rust, Python and JavaScript `count` plugins, and the same file again.
//! 2. `submit`: submit → first record reaching an operator, with the
//!    plugins already precompiled in the store.
//! 3. `upgrade`: hot-upgrade downtime (last record of the old version to
//!    the first of the new one, as the host measures it) with 10k and 1M
//!    keys of state (`WEIR_BENCH_UPGRADE_KEYS`; the job runs until `count`
//!    took in four records a key, so ~98% of the keys hold state): `count`
//!    v1 → v2 (every value migrated), and a job-file change that keeps the
//!    plugins; each `WEIR_BENCH_UPGRADE_RUNS` times (3) on a fresh host.
//!    The job runs flat out unless `WEIR_BENCH_UPGRADE_RATE` caps its
//!    source at that many records a second (per source subtask).
//! 4. `api`: latency of `GET /api/jobs/{id}` and `GET /api/jobs` while two
//!    jobs run flat out.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use weir::control::{HostSettings, RunningHost};
use weir_tests::languages::{self, JAVASCRIPT, PYTHON};
use weir_tests::plugins::{WORDCOUNT_COUNT, WORDCOUNT_COUNT_V2, WORDCOUNT_SPLIT};

struct Bench {
    host: RunningHost,
    url: String,
    http: reqwest::Client,
    _data: tempfile::TempDir,
}

impl Bench {
    async fn start() -> Bench {
        let data = tempfile::tempdir().expect("tempdir");
        let mut settings = HostSettings::new(data.path().to_path_buf());
        settings.listen = "127.0.0.1:0".parse().expect("address");
        let host = RunningHost::start(settings).await.expect("host starts");
        let url = format!("http://{}", host.address);
        Bench {
            host,
            url,
            http: reqwest::Client::new(),
            _data: data,
        }
    }

    async fn add(&self, file: &Path) -> (u16, Value) {
        let bytes = std::fs::read(file).expect("plugin");
        let response = self
            .http
            .post(format!("{}/api/plugins?file=plugin.wasm", self.url))
            .body(bytes)
            .send()
            .await
            .expect("upload");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON"))
    }

    async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("JSON")
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .expect("post");
        let status = response.status();
        let value: Value = response.json().await.expect("JSON");
        assert!(status.is_success(), "{path}: {status} {value}");
        value
    }

    async fn submit(&self, dir: &Path, toml: &str) -> String {
        let record = self
            .post(
                "/api/jobs",
                serde_json::json!({ "job_file": toml, "base_dir": dir }),
            )
            .await;
        record["id"].as_str().expect("id").to_string()
    }

    async fn wait_operation(&self, job: &str, operation: &str) -> Value {
        loop {
            let current = self
                .get(&format!("/api/jobs/{job}/operations/{operation}"))
                .await;
            if current["status"] != "running" {
                return current;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn records_in(&self, job: &str) -> u64 {
        let detail = self.get(&format!("/api/jobs/{job}")).await;
        detail["operators"]
            .as_array()
            .map(|ops| {
                ops.iter()
                    .filter(|o| o["role"] == "operator")
                    .map(|o| o["records_in"].as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0)
    }

    async fn count_records_in(&self, job: &str) -> u64 {
        let detail = self.get(&format!("/api/jobs/{job}")).await;
        detail["operators"]
            .as_array()
            .and_then(|ops| ops.iter().find(|o| o["uid"] == "count"))
            .and_then(|o| o["records_in"].as_u64())
            .unwrap_or(0)
    }
}

fn wordcount(keys: u64, counter: &str, parallelism: u32, rate: Option<u64>) -> String {
    let rate = rate.map(|r| format!("rate = {r}")).unwrap_or_default();
    format!(
        r#"
name = "bench"
max_parallelism = 128
[checkpoint]
interval = "1s"
[[source]]
uid = "words"
kind = "generator"
keys = {keys}
{rate}
[[operator]]
uid = "split"
plugin = "split"
inputs = ["words"]
[[operator]]
uid = "count"
plugin = "{counter}"
inputs = [{{ from = "split", partition = "key" }}]
parallelism = {parallelism}
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["count"]
"#
    )
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

async fn plugin_add() {
    let weir = Path::new(env!("CARGO_BIN_EXE_weir"));
    let mut plugins = vec![("Rust", std::path::PathBuf::from(WORDCOUNT_COUNT))];
    for (label, language) in [("Python", PYTHON), ("JavaScript", JAVASCRIPT)] {
        let plugin = languages::plugin(language, weir)
            .unwrap_or_else(|| panic!("the {label} toolchain is missing"));
        plugins.push((label, plugin));
    }
    println!();
    println!("| plugin add | size | validate + precompile (201) | same file again (200) |");
    println!("|---|---:|---:|---:|");
    for (label, file) in plugins {
        let bench = Bench::start().await;
        let size = std::fs::metadata(&file).expect("plugin").len();
        let started = Instant::now();
        let (status, _) = bench.add(&file).await;
        let first = started.elapsed();
        assert_eq!(status, 201);
        let started = Instant::now();
        let (status, _) = bench.add(&file).await;
        let again = started.elapsed();
        assert_eq!(status, 200);
        println!(
            "| {label} count | {} | {} | {} |",
            weir::human::bytes(size),
            ms(first),
            ms(again)
        );
        bench.host.shutdown().await;
    }
}

async fn submit_to_first_record() {
    let bench = Bench::start().await;
    for plugin in [WORDCOUNT_SPLIT, WORDCOUNT_COUNT] {
        bench.add(Path::new(plugin)).await;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let id = bench
            .submit(dir.path(), &wordcount(1000, "count", 2, Some(10_000)))
            .await;
        while bench.records_in(&id).await == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        times.push(started.elapsed());
        let cancel = bench
            .post(&format!("/api/jobs/{id}/cancel"), serde_json::json!({}))
            .await;
        bench
            .wait_operation(&id, cancel["id"].as_str().expect("id"))
            .await;
    }
    times.sort();
    println!();
    println!("| submit → first record (precompiled plugins, 5 runs) | median | best | worst |");
    println!("|---|---:|---:|---:|");
    println!(
        "| generator → split → count (p=2) → blackhole | {} | {} | {} |",
        ms(times[2]),
        ms(times[0]),
        ms(times[4])
    );
    bench.host.shutdown().await;
}

async fn upgrade_downtime() {
    let sizes: Vec<u64> = std::env::var("WEIR_BENCH_UPGRADE_KEYS")
        .unwrap_or_else(|_| "10000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let runs: usize = std::env::var("WEIR_BENCH_UPGRADE_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .max(1);
    println!();
    println!(
        "| keys of state | upgrade | downtime, median of {runs} | best | worst | whole operation (median) |"
    );
    println!("|---:|---|---:|---:|---:|---:|");
    for keys in sizes {
        for (label, request) in [
            (
                "count v1 → v2 (migrated)",
                serde_json::json!({ "plugins": { "count": "count@0.2.0" } }),
            ),
            ("job file changed, same plugins", Value::Null),
        ] {
            let mut downtimes = Vec::new();
            let mut wholes = Vec::new();
            for _ in 0..runs {
                let (downtime, whole) = upgrade_once(keys, &request).await;
                downtimes.push(downtime);
                wholes.push(whole);
            }
            downtimes.sort_by(f64::total_cmp);
            wholes.sort();
            println!(
                "| {keys} | {label} | {:.0} ms | {:.0} ms | {:.0} ms | {} |",
                downtimes[runs / 2],
                downtimes[0],
                downtimes[runs - 1],
                ms(wholes[runs / 2])
            );
        }
    }
}

/// One upgrade of a fresh job with `keys` keys of state: its downtime (ms)
/// and the whole operation's time.
async fn upgrade_once(keys: u64, request: &Value) -> (f64, Duration) {
    let bench = Bench::start().await;
    for plugin in [WORDCOUNT_SPLIT, WORDCOUNT_COUNT, WORDCOUNT_COUNT_V2] {
        bench.add(Path::new(plugin)).await;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let rate = std::env::var("WEIR_BENCH_UPGRADE_RATE").ok().map(|r| {
        r.parse()
            .expect("WEIR_BENCH_UPGRADE_RATE: records a second")
    });
    let toml = wordcount(keys, "count@0.1.0", 2, rate);
    let id = bench.submit(dir.path(), &toml).await;
    // Four records a key: ~98% of the keys hold state.
    while bench.count_records_in(&id).await < keys * 4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let request = if request.is_null() {
        serde_json::json!({ "job_file": {
            "job_file": toml.replace("name = \"bench\"", "name = \"bench-2\""),
            "base_dir": dir.path(),
        } })
    } else {
        request.clone()
    };
    let started = Instant::now();
    let operation = bench
        .post(&format!("/api/jobs/{id}/upgrade"), request)
        .await;
    let done = bench
        .wait_operation(&id, operation["id"].as_str().expect("id"))
        .await;
    let whole = started.elapsed();
    assert_eq!(done["status"], "succeeded", "{done:#}");
    let job = bench.get(&format!("/api/jobs/{id}")).await;
    if let Some(standby) = job["job"]["upgrades"][0]["standby"].as_str() {
        eprintln!("{keys} keys: {standby}");
    }
    bench.host.shutdown().await;
    (done["downtime_ms"].as_f64().unwrap_or(f64::NAN), whole)
}

async fn api_latency() {
    let bench = Bench::start().await;
    for plugin in [WORDCOUNT_SPLIT, WORDCOUNT_COUNT] {
        bench.add(Path::new(plugin)).await;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let first = bench
        .submit(dir.path(), &wordcount(100_000, "count", 2, None))
        .await;
    bench
        .submit(dir.path(), &wordcount(100_000, "count", 2, None))
        .await;
    while bench.records_in(&first).await == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!();
    println!("| API while two jobs run flat out (200 calls) | p50 | p99 | max |");
    println!("|---|---:|---:|---:|");
    for (label, path) in [
        ("GET /api/jobs/{id}", format!("/api/jobs/{first}")),
        ("GET /api/jobs", "/api/jobs".to_string()),
    ] {
        let mut times = Vec::new();
        for _ in 0..200 {
            let started = Instant::now();
            bench.get(&path).await;
            times.push(started.elapsed());
        }
        times.sort();
        println!(
            "| {label} | {:.2} ms | {:.2} ms | {:.2} ms |",
            times[99].as_secs_f64() * 1000.0,
            times[197].as_secs_f64() * 1000.0,
            times[199].as_secs_f64() * 1000.0
        );
    }
    bench.host.shutdown().await;
}

fn main() {
    // RUST_LOG=weir=info shows the host's log on stderr.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let wanted = |name: &str| args.is_empty() || args.iter().any(|a| name.contains(a.as_str()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        if wanted("add") {
            plugin_add().await;
        }
        if wanted("submit") {
            submit_to_first_record().await;
        }
        if wanted("upgrade") {
            upgrade_downtime().await;
        }
        if wanted("api") {
            api_latency().await;
        }
    });
}
