//! Shared helpers: a job directory with plugins, running a job embedded on a
//! multi-threaded runtime, and running the `weir` binary.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use weir::dataflow::runtime::JobOutcome;
use weir::plugin::PluginEngine;
use weir::runner::RunError;

/// One engine for the whole test binary; compiled plugins are cached on disk.
pub fn engine() -> &'static PluginEngine {
    static ENGINE: OnceLock<PluginEngine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        PluginEngine::new(Some(weir_tests::compile_cache())).expect("the wasmtime engine starts")
    })
}

/// A temporary directory holding a job file and its inputs.
pub struct JobDir {
    pub dir: tempfile::TempDir,
}

impl JobDir {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&path, contents).expect("write");
        path
    }

    /// Writes `job.toml` and returns its path.
    pub fn job(&self, toml: &str) -> PathBuf {
        self.write("job.toml", toml)
    }
}

/// A fresh multi-threaded runtime of two workers (the machine's cores).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs a job file embedded, to its end, on a fresh multi-threaded runtime.
pub fn run(job: &Path) -> Result<JobOutcome, RunError> {
    runtime().block_on(weir::runner::run_file(engine(), job))
}

/// Runs the real `weir` binary with the shared compile cache.
pub fn weir(args: &[&str], dir: &Path) -> Output {
    weir_env(args, dir, &[])
}

/// [`weir`] with extra environment (an S3 endpoint and credentials).
pub fn weir_env(args: &[&str], dir: &Path, env: &[(&str, String)]) -> Output {
    weir_command(args, dir, env)
        .output()
        .expect("the weir binary runs")
}

/// The `weir` binary started in the background (stdout dropped, stderr
/// piped), for a test to signal or kill.
pub fn spawn_weir<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    dir: &Path,
    env: &[(&str, String)],
) -> std::process::Child {
    weir_command(args, dir, env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("weir starts")
}

fn weir_command<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    dir: &Path,
    env: &[(&str, String)],
) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_weir"));
    command
        .args(args)
        .current_dir(dir)
        .env("WEIR_CACHE_DIR", weir_tests::compile_cache())
        .env_remove("RUST_LOG")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    command
}

pub fn toml_path(path: &str) -> String {
    format!("{path:?}")
}

/// One HTTP/1.1 request over a plain socket: (status, head, body as sent).
pub(crate) fn http_raw(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, String, String) {
    let address = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).expect("connect to the host");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if !body.is_empty() && body[0] == b'{' {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("send");
    // A host that answers early (413 on Content-Length) may close before
    // the whole body is sent: its answer is still there to read.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

/// `GET /metrics`, parsed by a Prometheus text-format parser.
pub(crate) fn scrape(base: &str) -> prometheus_parse::Scrape {
    let (status, head, body) = http_raw(base, "GET", "/metrics", None, &[]);
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("openmetrics-text"), "{head}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("Prometheus text format")
}

/// The sum of `metric`'s samples whose labels include every `(key, value)`.
pub(crate) fn total(
    scrape: &prometheus_parse::Scrape,
    metric: &str,
    labels: &[(&str, &str)],
) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// A random test's seed: `var` from the environment (to repeat a run),
/// else the clock; printed with `what` so a failure can be repeated.
pub fn seed(var: &str, what: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    eprintln!("{what} seed {seed} ({var} to repeat)");
    seed
}

/// SIGTERMs `child` (a `weir run … --savepoint-dir DIR`), asserts it
/// stopped with a savepoint, and returns the one savepoint in `dir`.
pub(crate) fn stop_with_savepoint(child: std::process::Child, dir: &Path) -> std::path::PathBuf {
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let stopped = child.wait_with_output().expect("reaped");
    assert!(
        stopped.status.success(),
        "stop with a savepoint: {}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    std::fs::read_dir(dir)
        .expect("the savepoint directory")
        .flatten()
        .next()
        .expect("one savepoint")
        .path()
}
