//! A cluster of hosts (run: `cargo bench -p weir --bench cluster`; add a
//! word to run only the parts whose name contains it: `failover`,
//! `rescale`, `upgrade`).
//!
//! `failover`: two `weir serve --cluster` processes on loopback, on the
//! NATS server and SeaweedFS the tests start (`weir_tests`), the default
//! 3 s lease. A generator (300k words/s) → split → count → blackhole job (RocksDB state,
//! a checkpoint a second, to the cluster's S3) with K keys of state
//! (`WEIR_BENCH_FAILOVER_KEYS`, default 100000 and 1000000). The job runs
//! as stages (cut at its keyed edge), `count`'s as two tasks (one per
//! subtask, each its half of the key groups); the host of the first
//! `count` task is SIGKILLed once that task took in four records a key of
//! its half and a checkpoint completed after that. Measured from the
//! SIGKILL: that task running on the other host (its lease lapsed, the
//! task moved, its state restored from S3), and its `count` taking in
//! records again. Each
//! `WEIR_BENCH_FAILOVER_RUNS` times (3), each in a cluster of its own.
//!
//! `rescale`: the same two hosts and job (100k keys), `count` rescaled
//! 2 → 3 (`weir rescale`: the count stage's two tasks stopped with
//! savepoints, merged, and restored by three new tasks) once its first
//! task took in four records a key of its half. Measured: the count
//! stage's downtime (from the request until every new task runs, as the
//! operation reports it), the whole operation, and the upstream stage's
//! throughput (`split`'s records out a second) over the 3 s before and
//! over the operation. `WEIR_BENCH_RESCALE_RUNS` times (3).
//!
//! `upgrade`: the same, `count` upgraded to 0.2.0 (its state migrated) as
//! a rolling upgrade of the count stage: each task stopped with a
//! savepoint to S3, restored from it as 0.2.0, on probation until one
//! checkpoint, then released with its stage's other task. Measured as the
//! rescale is.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use weir_tests::plugins::{WORDCOUNT_COUNT, WORDCOUNT_COUNT_V2, WORDCOUNT_SPLIT};

/// A `weir serve` process, SIGKILLed when dropped.
struct Host {
    child: Child,
    url: String,
}

impl Host {
    fn start(data: &Path, config: &Path, env: &[(&'static str, String)]) -> Host {
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("weir serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("weir serve says where it listens");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Host { child, url }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Adds plugin file `path` to `host`'s store.
async fn add_plugin(http: &reqwest::Client, host: &Host, path: &str) {
    let response = http
        .post(format!("{}/api/plugins?file=plugin.wasm", host.url))
        .body(std::fs::read(path).expect("plugin"))
        .send()
        .await
        .expect("upload");
    assert!(
        response.status().is_success(),
        "{:?}",
        response.text().await
    );
}

/// Waits until `host`'s store lists `n` plugins.
async fn wait_plugins(http: &reqwest::Client, host: &Host, n: usize) {
    while get(http, host, "/api/plugins")
        .await
        .1
        .as_array()
        .map(Vec::len)
        != Some(n)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// `GET path` of `host`: (status, JSON).
async fn get(http: &reqwest::Client, host: &Host, path: &str) -> (u16, Value) {
    match http.get(format!("{}{path}", host.url)).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

fn count_view(detail: &Value) -> Option<&Value> {
    detail["operators"]
        .as_array()?
        .iter()
        .find(|o| o["uid"] == "count")
}

fn job(keys: u64) -> String {
    format!(
        r#"
name = "failover"
max_parallelism = 128
[checkpoint]
interval = "1s"
[state]
backend = "rocksdb"
[[source]]
uid = "words"
kind = "generator"
keys = {keys}
rate = 300000
[[operator]]
uid = "split"
plugin = "split"
inputs = ["words"]
[[operator]]
uid = "count"
plugin = "count@0.1.0"
inputs = [{{ from = "split", partition = "key" }}]
parallelism = 2
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["count"]
"#
    )
}

/// Two hosts of a cluster of their own with the word count of `keys`
/// keys running as stages.
struct Cluster {
    /// Its hosts (SIGKILLed when dropped), and its directory.
    hosts: Vec<Option<Host>>,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
    /// The staged job.
    id: String,
}

impl Cluster {
    async fn start(what: &str, run: usize, keys: u64) -> Cluster {
        // Started (and the bucket made) in `main`, outside the runtime.
        let nats = weir_tests::nats::server().expect("nats-server is needed for this benchmark");
        let s3 = weir_tests::s3::server().expect("SeaweedFS is needed for this benchmark");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("host.toml");
        let name = format!("bench-{what}-{}-{run}-{keys}", std::process::id());
        std::fs::write(
            &config,
            format!(
                "[cluster]\nnats = [\"{}\"]\nname = \"{name}\"\ns3 = \"s3://weir-bench/{name}\"\n",
                nats.url
            ),
        )
        .expect("config");
        let env = s3.env();
        let hosts = vec![
            Some(Host::start(&dir.path().join("a"), &config, &env)),
            Some(Host::start(&dir.path().join("b"), &config, &env)),
        ];
        let http = client();
        let a = hosts[0].as_ref().expect("a");
        for plugin in [WORDCOUNT_SPLIT, WORDCOUNT_COUNT] {
            add_plugin(&http, a, plugin).await;
        }
        // b has them too before the job is submitted.
        wait_plugins(&http, hosts[1].as_ref().expect("b"), 2).await;
        let response: Value = http
            .post(format!("{}/api/jobs", a.url))
            .json(&serde_json::json!({ "job_file": job(keys), "base_dir": dir.path() }))
            .send()
            .await
            .expect("submit")
            .json()
            .await
            .expect("JSON");
        let id = response["id"].as_str().expect("a job id").to_string();
        Cluster {
            hosts,
            _dir: dir,
            http,
            id,
        }
    }

    /// Stage `name`'s job and the index of the host that runs it.
    async fn stage(&self, name: &str) -> (String, usize) {
        let a = self.hosts[0].as_ref().expect("a");
        let (stage, owner) = loop {
            let (_, detail) = get(&self.http, a, &format!("/api/jobs/{}", self.id)).await;
            let found = detail["stages"].as_array().and_then(|stages| {
                stages
                    .iter()
                    .find(|s| s["name"] == name)
                    .and_then(|s| Some((s["job"].as_str()?, s["host"].as_str()?)))
                    .map(|(job, host)| (job.to_string(), host.to_string()))
            });
            if let Some(found) = found {
                break found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (_, members) = get(&self.http, a, "/api/hosts").await;
        let owner_api = members["hosts"]
            .as_array()
            .and_then(|hosts| hosts.iter().find(|h| h["id"] == owner.as_str()))
            .and_then(|h| h["api"].as_str())
            .expect("the stage's host is a member")
            .to_string();
        let at = self
            .hosts
            .iter()
            .position(|h| h.as_ref().is_some_and(|h| h.url == owner_api))
            .expect("one of the two");
        (stage, at)
    }

    fn host(&self, i: usize) -> &Host {
        self.hosts[i].as_ref().expect("a live host")
    }

    /// What operator `uid` of `job` (on `host`) counted: (records in,
    /// records out).
    async fn records(&self, host: usize, job: &str, uid: &str) -> (u64, u64) {
        let (_, detail) = get(&self.http, self.host(host), &format!("/api/jobs/{job}")).await;
        let op = detail["operators"]
            .as_array()
            .and_then(|ops| ops.iter().find(|o| o["uid"] == uid).cloned())
            .unwrap_or(Value::Null);
        (
            op["records_in"].as_u64().unwrap_or(0),
            op["records_out"].as_u64().unwrap_or(0),
        )
    }

    /// Waits until `count` (stage `stage` on `host`) took in `n` records.
    async fn count_took(&self, host: usize, stage: &str, n: u64) {
        while self.records(host, stage, "count").await.0 < n {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One failover of a job with `keys` keys: (to running, to processing).
async fn failover_once(run: usize, keys: u64) -> (Duration, Duration) {
    let mut cluster = Cluster::start("failover", run, keys).await;
    let (stage, victim) = cluster.stage("count").await;
    let (http, id) = (cluster.http.clone(), cluster.id.clone());
    let owner = cluster.host(victim);
    // Four records a key of its half, then a checkpoint after that.
    cluster.count_took(victim, &stage, keys * 2).await;
    let (_, detail) = get(&http, owner, &format!("/api/jobs/{stage}")).await;
    let done = detail["checkpoints_completed"].as_u64().unwrap_or(0);
    while get(&http, owner, &format!("/api/jobs/{stage}")).await.1["checkpoints_completed"]
        .as_u64()
        .unwrap_or(0)
        < done + 1
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took: u64 = count_view(&get(&http, owner, &format!("/api/jobs/{stage}")).await.1)
        .and_then(|c| c["records_in"].as_u64())
        .unwrap_or(0);
    cluster.hosts[victim].take(); // SIGKILL
    let killed = Instant::now();
    let survivor = cluster.host(1 - victim);
    let mut running = None;
    let processing = loop {
        let (status, detail) = get(&http, survivor, &format!("/api/jobs/{stage}")).await;
        if status == 200 && detail["job"]["lifecycle"]["status"] == "running" {
            running.get_or_insert_with(|| killed.elapsed());
            let took = count_view(&detail).and_then(|c| c["records_in"].as_u64());
            if took.unwrap_or(0) > 0 {
                break killed.elapsed();
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(120),
            "stage {stage} of job {id} did not move to the other host: {status} {detail}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!(
        "run {run}, {keys} keys ({took} words counted at the kill): running after {running:?}, processing after {processing:?}"
    );
    cluster.hosts.clear();
    (running.expect("running before processing"), processing)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

async fn failover() {
    let keys: Vec<u64> = match std::env::var("WEIR_BENCH_FAILOVER_KEYS") {
        Ok(text) => vec![text.parse().expect("WEIR_BENCH_FAILOVER_KEYS: a number")],
        Err(_) => vec![100_000, 1_000_000],
    };
    let runs: usize = std::env::var("WEIR_BENCH_FAILOVER_RUNS")
        .ok()
        .map(|r| r.parse().expect("WEIR_BENCH_FAILOVER_RUNS: a number"))
        .unwrap_or(3);
    println!(
        "\nfailover: SIGKILL of the job's host → running / processing on the other (2 hosts, lease 3 s, median of {runs})"
    );
    println!("| keys of state | to running | to processing | runs (to processing) |");
    println!("|---|---|---|---|");
    for keys in keys {
        let mut results: Vec<(Duration, Duration)> = Vec::new();
        for run in 0..runs {
            results.push(failover_once(run, keys).await);
        }
        let all = results
            .iter()
            .map(|(_, p)| ms(*p))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {keys} | {} | {} | {all} |",
            ms(median(results.iter().map(|r| r.0).collect())),
            ms(median(results.iter().map(|r| r.1).collect())),
        );
    }
}

/// One operation of the whole (`request`, the body of `POST …/upgrade`)
/// on `cluster`'s job, once its first count task took in four records a
/// key of its half: (the count stage's downtime, the whole operation,
/// `split`'s records out a second before, and during it).
async fn operation_once(
    cluster: &Cluster,
    what: &str,
    run: usize,
    request: Value,
) -> (Duration, Duration, f64, f64) {
    let (count, at) = cluster.stage("count").await;
    let (words, upstream) = cluster.stage("words").await;
    cluster.count_took(at, &count, RESCALE_KEYS * 2).await;
    let rate = |from: (Instant, u64), to: (Instant, u64)| {
        (to.1 - from.1) as f64 / (to.0 - from.0).as_secs_f64()
    };
    let out = || async {
        (
            Instant::now(),
            cluster.records(upstream, &words, "split").await.1,
        )
    };
    let before = out().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = out().await;
    let http = &cluster.http;
    let a = cluster.host(0);
    let response = http
        .post(format!("{}/api/jobs/{}/upgrade", a.url, cluster.id))
        .json(&request)
        .send()
        .await
        .expect("the operation");
    assert_eq!(
        response.status().as_u16(),
        202,
        "{:?}",
        response.text().await
    );
    let operation: Value = response.json().await.expect("JSON");
    let op = operation["id"]
        .as_str()
        .expect("an operation id")
        .to_string();
    let done = loop {
        let (_, now) = get(
            http,
            a,
            &format!("/api/jobs/{}/operations/{op}", cluster.id),
        )
        .await;
        if now["status"] != "running" && !now["status"].is_null() {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ended = out().await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let downtime = done["downtime_ms"].as_f64().expect("a downtime");
    let took = ended.0 - started.0;
    eprintln!(
        "{what} run {run}: count downtime {downtime:.0} ms, operation {took:?}, split out {:.0}/s before, {:.0}/s during",
        rate(before, started),
        rate(started, ended)
    );
    (
        Duration::from_secs_f64(downtime / 1000.0),
        took,
        rate(before, started),
        rate(started, ended),
    )
}

/// Keys of state in the rescale's and the upgrade's job.
const RESCALE_KEYS: u64 = 100_000;

/// One rescale of `count` 2 → 3.
async fn rescale_once(run: usize) -> (Duration, Duration, f64, f64) {
    let cluster = Cluster::start("rescale", run, RESCALE_KEYS).await;
    let request = serde_json::json!({ "parallelism": { "count": 3 }, "probation_checkpoints": 1 });
    operation_once(&cluster, "rescale", run, request).await
}

/// One rolling upgrade of `count` to 0.2.0 (its state migrated).
async fn upgrade_once(run: usize) -> (Duration, Duration, f64, f64) {
    let cluster = Cluster::start("upgrade", run, RESCALE_KEYS).await;
    add_plugin(&cluster.http, cluster.host(0), WORDCOUNT_COUNT_V2).await;
    // b has it too before the upgrade is asked.
    wait_plugins(&cluster.http, cluster.host(1), 3).await;
    let request =
        serde_json::json!({ "plugins": { "count": "count@0.2.0" }, "probation_checkpoints": 1 });
    operation_once(&cluster, "upgrade", run, request).await
}

/// Runs `once` `runs` times and prints the medians as a table row.
async fn operations<F, Fut>(title: &str, runs: usize, once: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = (Duration, Duration, f64, f64)>,
{
    println!("\n{title} (2 hosts, 100k keys, generator 300k words/s, median of {runs})");
    println!(
        "| count stage downtime | whole operation | split out/s before | split out/s during | runs (downtime) |"
    );
    println!("|---|---|---|---|---|");
    let mut results = Vec::new();
    for run in 0..runs {
        results.push(once(run).await);
    }
    let median_f = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "| {} | {} | {:.0} | {:.0} | {} |",
        ms(median(results.iter().map(|r| r.0).collect())),
        ms(median(results.iter().map(|r| r.1).collect())),
        median_f(results.iter().map(|r| r.2).collect()),
        median_f(results.iter().map(|r| r.3).collect()),
        results
            .iter()
            .map(|r| ms(r.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// `WEIR_BENCH_RESCALE_RUNS`, or 3.
fn operation_runs() -> usize {
    std::env::var("WEIR_BENCH_RESCALE_RUNS")
        .ok()
        .map(|r| r.parse().expect("WEIR_BENCH_RESCALE_RUNS: a number"))
        .unwrap_or(3)
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
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    if wanted("failover") {
        weir_tests::nats::server().expect("nats-server is needed for this benchmark");
        weir_tests::s3::server()
            .expect("SeaweedFS is needed for this benchmark")
            .bucket("weir-bench");
        runtime.block_on(failover());
    }
    for (name, title) in [
        ("rescale", "rescale: count 2 → 3 of the staged word count"),
        (
            "upgrade",
            "upgrade: count 0.1.0 → 0.2.0 (state migrated) of the staged word count, rolling",
        ),
    ] {
        if !wanted(name) {
            continue;
        }
        weir_tests::nats::server().expect("nats-server is needed for this benchmark");
        weir_tests::s3::server()
            .expect("SeaweedFS is needed for this benchmark")
            .bucket("weir-bench");
        runtime.block_on(async {
            match name {
                "rescale" => operations(title, operation_runs(), rescale_once).await,
                _ => operations(title, operation_runs(), upgrade_once).await,
            }
        });
    }
}
