//! The TTL soak (issue: "a key-churning source, a new key every record,
//! TTL 10 s, 30 minutes keeps the state's key count and the checkpoint size
//! flat; shown by the metrics"). Runs the real `weir run` on the word
//! count's `count` with RocksDB state, a generator of a new key (almost)
//! every record at `WEIR_SOAK_RATE` records/s (default 20000),
//! `state_ttl = { count = "10s" }` and checkpoints every 10 s, for
//! `WEIR_SOAK_SECS` (default 1800), and prints, every
//! `WEIR_SOAK_EVERY` seconds (default 60), what its Prometheus endpoint
//! says: the count table's keys (RocksDB's estimate) and bytes, and the
//! newest checkpoint's size, beside the keys written so far.
//!
//! `cargo bench -p weir --bench ttl_soak` (`WEIR_SOAK_SECS=120` for a
//! short look; `WEIR_SOAK_TTL=off` for the same job without a TTL, the
//! control).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The sum of every sample of metric `name` whose labels contain `filter`.
fn metric(text: &str, name: &str, filter: &str) -> Option<f64> {
    let samples: Vec<f64> = text
        .lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter(|line| line.contains(filter))
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

fn scrape(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response.split_once("\r\n\r\n")?.1.to_string())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn main() {
    let seconds = env_u64("WEIR_SOAK_SECS", 1800);
    let rate = env_u64("WEIR_SOAK_RATE", 20_000);
    let every = env_u64("WEIR_SOAK_EVERY", 60);
    let ttl = std::env::var("WEIR_SOAK_TTL").unwrap_or_else(|_| "10s".to_string());
    let dir = tempfile::tempdir().expect("tempdir");
    let job = format!(
        r#"
name = "ttl-soak"
[checkpoint]
interval = "10s"
[state]
backend = "rocksdb"
[[source]]
uid = "gen"
kind = "generator"
count = {count}
rate = {rate}
keys = 1000000000000
[[operator]]
uid = "count"
plugin = {plugin:?}
inputs = [{{ from = "gen", partition = "key" }}]
state_ttl = {{ count = "{ttl}" }}
[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["count"]
"#,
        count = rate * seconds,
        plugin = weir_tests::plugins::WORDCOUNT_COUNT,
    );
    std::fs::write(dir.path().join("job.toml"), job).expect("write the job");
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", "job.toml", "--metrics", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("weir runs");
    println!(
        "TTL soak: new key every record at {rate}/s, TTL {ttl}, RocksDB, checkpoints every 10s, {seconds} s"
    );
    println!(
        "{:>8} {:>14} {:>16} {:>14} {:>18}",
        "time", "keys written", "state keys", "state bytes", "checkpoint bytes"
    );
    let started = Instant::now();
    let mut next = every;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        if let Some(status) = child.try_wait().expect("wait") {
            println!("weir run ended: {status}");
            break;
        }
        let elapsed = started.elapsed().as_secs();
        if elapsed < next {
            continue;
        }
        next += every;
        let Some(text) = scrape(port) else { continue };
        let records = metric(&text, "weir_records_out_total", "operator=\"gen\"").unwrap_or(0.0);
        let keys = metric(&text, "weir_state_keys", "state=\"count\"").unwrap_or(0.0);
        let bytes = metric(&text, "weir_state_bytes", "state=\"count\"").unwrap_or(0.0);
        let checkpoint = metric(&text, "weir_checkpoint_last_size_bytes", "").unwrap_or(0.0);
        println!(
            "{:>7}s {:>14} {:>16} {:>11.1} MiB {:>15.1} MiB",
            elapsed,
            records as u64,
            keys as u64,
            bytes / (1 << 20) as f64,
            checkpoint / (1 << 20) as f64
        );
        if elapsed >= seconds {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}
