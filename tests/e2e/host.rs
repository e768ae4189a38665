//! The running host, end to end: a real `weir serve` on a random loopback
//! port with its own data dir, driven by the real `weir` client verbs and by
//! raw HTTP where the test is about the API's answers. Plugins are the real
//! components the build script compiled.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use weir_tests::plugins::{
    COUNT_V2_NO_MIGRATE, COUNT_V2_TRAP, FAULTS, WORDCOUNT_COUNT, WORDCOUNT_COUNT_V2,
    WORDCOUNT_SPLIT,
};

use crate::checkpoints::generator_counts;
use crate::support::{JobDir, http_raw, scrape, total};

/// A `weir serve` child process. Killed (SIGKILL) when dropped.
pub(crate) struct Host {
    child: Option<Child>,
    pub(crate) url: String,
    token: Option<PathBuf>,
}

impl Host {
    pub(crate) fn start(data: &Path, extra: &[&str]) -> Host {
        Self::start_with(data, extra, None)
    }

    /// A host whose job roots are the data dir's parent (the test's job
    /// directory, where its job files, inputs and outputs are).
    pub(crate) fn start_with(data: &Path, extra: &[&str], token: Option<&Path>) -> Host {
        let root = data.parent().expect("the data dir is in the job directory");
        let mut args = vec!["--root", root.to_str().expect("a UTF-8 path")];
        args.extend(extra);
        Self::start_exact(data, &args, token)
    }

    /// A host with exactly these flags (its roots: `--root`, the
    /// config's, or the data dir).
    fn start_exact(data: &Path, extra: &[&str], token: Option<&Path>) -> Host {
        Self::spawn(data, extra, token, &[])
    }

    /// [`Host::start`] with environment variables set for the host
    /// process (a fault test's `WEIR_FAILPOINTS`).
    pub(crate) fn start_env(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Host {
        let root = data.parent().expect("the data dir is in the job directory");
        let mut args = vec!["--root", root.to_str().expect("a UTF-8 path")];
        args.extend(extra);
        Self::spawn(data, &args, None, env)
    }

    fn spawn(data: &Path, extra: &[&str], token: Option<&Path>, env: &[(&str, &str)]) -> Host {
        let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .args(extra)
            .env_remove("RUST_LOG")
            .env_remove("WEIR_HOST")
            .env_remove("WEIR_FAILPOINTS")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(token) = token {
            command.arg("--token-file").arg(token);
        }
        let mut child = command.spawn().expect("weir serve starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("weir serve prints where it listens");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Host {
            child: Some(child),
            url,

            token: token.map(Path::to_path_buf),
        }
    }

    /// Runs a client verb of the real binary against this host.
    pub(crate) fn weir(&self, args: &[&str], dir: &Path) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
        command
            .args(args)
            .current_dir(dir)
            .env("WEIR_HOST", &self.url)
            .env_remove("RUST_LOG");
        if let Some(token) = &self.token {
            command.env("WEIR_TOKEN_FILE", token);
        }
        command.output().expect("the weir binary runs")
    }

    /// A client verb that must succeed; its stdout.
    pub(crate) fn ok(&self, args: &[&str], dir: &Path) -> String {
        let output = self.weir(args, dir);
        assert!(
            output.status.success(),
            "weir {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    pub(crate) fn job(&self, id: &str) -> Value {
        let (status, body) = http(
            &self.url,
            "GET",
            &format!("/api/jobs/{id}"),
            self.token_value().as_deref(),
            &[],
        );
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("job JSON")
    }

    pub(crate) fn token_value(&self) -> Option<String> {
        self.token.as_ref().map(|t| {
            std::fs::read_to_string(t)
                .expect("token")
                .trim()
                .to_string()
        })
    }

    /// Waits until the job's status is `status`.
    pub(crate) fn wait_status(&self, id: &str, status: &str, limit: Duration) -> Value {
        let started = Instant::now();
        loop {
            let job = self.job(id);
            if job["job"]["lifecycle"]["status"] == status {
                return job;
            }
            assert!(
                started.elapsed() < limit,
                "job {id} did not become {status} in {limit:?}: {job:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the job has completed at least `n` checkpoints in its
    /// current run.
    pub(crate) fn wait_checkpoints(&self, id: &str, n: u64, limit: Duration) {
        let started = Instant::now();
        while self.job(id)["checkpoints_completed"].as_u64().unwrap_or(0) < n {
            assert!(
                started.elapsed() < limit,
                "job {id}: no {n} checkpoints in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether its process is still there (not killed by the test).
    pub(crate) fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the host process.
    pub(crate) fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let pid = child.id().to_string();
            let status = Command::new("kill")
                .args([&format!("-{signal}"), &pid])
                .status()
                .expect("kill runs");
            assert!(status.success(), "kill -{signal} {pid}");
        }
    }

    /// SIGTERM, and waits for the host to exit.
    pub(crate) fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let started = Instant::now();
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    assert!(status.success(), "weir serve exited with {status}");
                    return;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "weir serve did not stop"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP/1.1 request over a plain socket: (status, body).
pub(crate) fn http(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let (status, _, body) = http_raw(base, method, path, token, body);
    let body = body.as_str();
    // Chunked bodies: take the JSON between the chunk sizes.
    let body = match (body.find('{'), body.find('[')) {
        (Some(a), Some(b)) => &body[a.min(b)..],
        (Some(a), None) => &body[a..],
        (None, Some(b)) => &body[b..],
        (None, None) => body,
    };
    let body = body.trim_end().trim_end_matches('0').trim_end();
    (status, body.to_string())
}

/// A job directory with the word count's plugins copied in.
pub(crate) fn plugin_dir() -> JobDir {
    let dir = JobDir::new();
    for (name, path) in [
        ("split.wasm", WORDCOUNT_SPLIT),
        ("count.wasm", WORDCOUNT_COUNT),
        ("count-v2.wasm", WORDCOUNT_COUNT_V2),
        ("count-v2-no-migrate.wasm", COUNT_V2_NO_MIGRATE),
        ("count-v2-trap.wasm", COUNT_V2_TRAP),
        ("faults.wasm", FAULTS),
    ] {
        std::fs::copy(path, dir.path().join(name)).expect("copy plugin");
    }
    dir
}

/// Generator (`count` records or unbounded, `rate`/s) → split → count →
/// exactly-once file sink `out/`, checkpoints every `interval`.
pub(crate) fn wordcount(
    name: &str,
    count: Option<u64>,
    rate: u64,
    split: &str,
    counter: &str,
    interval: &str,
) -> String {
    let count = count.map(|c| format!("count = {c}")).unwrap_or_default();
    format!(
        r#"
name = "{name}"
max_parallelism = 32

[checkpoint]
interval = "{interval}"

[restart]
strategy = "fixed-delay"
attempts = 5
delay = "200ms"

[[source]]
uid = "words"
kind = "generator"
{count}
rate = {rate}
keys = 30
seed = 7

[[operator]]
uid = "split"
plugin = "{split}"
inputs = ["words"]

[[operator]]
uid = "count"
plugin = "{counter}"
inputs = [{{ from = "split", partition = "key" }}]

[[sink]]
uid = "out"
kind = "file"
path = "out-{name}"
inputs = ["count"]
"#
    )
}

/// A job whose operator `uid` (the faults plugin) fails with `fault` on
/// every attempt, restarted every 100 ms (call timeout 300 ms).
fn faulty(name: &str, uid: &str, fault: &str) -> String {
    format!(
        r#"
name = "{name}"

[restart]
strategy = "fixed-delay"
attempts = 1000
delay = "100ms"

[[source]]
uid = "words"
kind = "generator"
rate = 100
keys = 5

[[operator]]
uid = "{uid}"
plugin = "faults.wasm"
config = {{ fault = "{fault}" }}
limits = {{ call_timeout = "300ms" }}
inputs = ["words"]

[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["{uid}"]
"#
    )
}

/// Every word's committed updates are exactly 1..=N, each once. Returns
/// word → N.
pub(crate) fn check_exactly_once(dir: &Path) -> BTreeMap<String, u64> {
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in weir_tests::read_parts(dir) {
        let (word, count) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad output line {line:?}"));
        seen.entry(word.to_string())
            .or_default()
            .push(count.parse().expect("a count"));
    }
    assert!(!seen.is_empty(), "no committed output in {}", dir.display());
    seen.into_iter()
        .map(|(word, mut counts)| {
            counts.sort_unstable();
            let n = counts.len() as u64;
            assert_eq!(
                counts,
                (1..=n).collect::<Vec<_>>(),
                "word `{word}`: its updates are not 1..{n} exactly once"
            );
            (word, n)
        })
        .collect()
}

/// The statuses a job went through, in order (from `GET /api/jobs/{id}`).
pub(crate) fn statuses(job: &Value) -> Vec<&str> {
    job["job"]["lifecycle"]["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|t| t["to"].as_str())
        .collect()
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn hot_upgrade_refused_rolled_back_and_done_keeps_exactly_once() {
    let dir = plugin_dir();
    let data = dir.path().join("data");
    let host = Host::start(&data, &[]);
    // Plugins deployed to the store first; the job names them from there.
    let added = host.ok(
        &["plugin", "add", "split.wasm", "count.wasm", "count-v2.wasm"],
        dir.path(),
    );
    assert!(
        added.contains("count@0.1.0") && added.contains("count@0.2.0"),
        "{added}"
    );
    dir.write(
        "job.toml",
        wordcount("upgrade", None, 1500, "split", "count@0.1.0", "1s"),
    );
    let id = host.ok(&["run", "job.toml"], dir.path()).trim().to_string();
    host.wait_status(&id, "running", Duration::from_secs(30));
    host.wait_checkpoints(&id, 1, Duration::from_secs(30));

    // A v2 that changed the state's schema without a migrate export: refused
    // before anything stops.
    let refused = host.weir(
        &["upgrade", &id, "--plugin", "count=count-v2-no-migrate.wasm"],
        dir.path(),
    );
    assert!(!refused.status.success(), "the upgrade must be refused");
    let message = stderr(&refused);
    assert!(message.contains("upgrade refused"), "{message}");
    assert!(message.contains("no migrate export"), "{message}");
    let job = host.job(&id);
    assert_eq!(job["job"]["lifecycle"]["status"], "running");
    assert_eq!(
        job["job"]["savepoints"].as_array().map(Vec::len),
        Some(0),
        "nothing stopped"
    );
    assert_eq!(job["job"]["runs"].as_array().map(Vec::len), Some(1));

    // A v2 that restores, then traps on its 1000th record: rolled back to
    // v1 from the same savepoint; the command fails naming the error. (At
    // 1,500 records/s and a checkpoint a second, ~3,000 records precede the
    // barrier of its second checkpoint, and barriers travel in-band: it
    // traps on probation, not after.)
    let rolled = host.weir(
        &[
            "upgrade",
            &id,
            "--plugin",
            "count=count-v2-trap.wasm",
            "--probation",
            "30s",
        ],
        dir.path(),
    );
    assert!(
        !rolled.status.success(),
        "a rolled-back upgrade exits non-zero"
    );
    let message = stderr(&rolled);
    assert!(message.contains("rolled back"), "{message}");
    assert!(message.contains("`count`"), "names the operator: {message}");
    let job = host.wait_status(&id, "running", Duration::from_secs(30));
    let upgrades = job["job"]["upgrades"].as_array().expect("upgrades");
    assert_eq!(upgrades[0]["outcome"], "refused");
    assert_eq!(upgrades[1]["outcome"], "rolled-back");
    let count = job["operators"]
        .as_array()
        .expect("operators")
        .iter()
        .find(|o| o["uid"] == "count")
        .expect("count")
        .clone();
    assert_eq!(count["plugin"]["plugin"], "count@0.1.0", "v1 runs again");
    let history = statuses(&job);
    assert!(
        history
            .windows(3)
            .any(|w| w == ["upgrading", "rolling-back", "running"]),
        "{history:?}"
    );
    host.wait_checkpoints(&id, 1, Duration::from_secs(30));

    // The real v2, with its migration, while input flows.
    host.ok(
        &["upgrade", &id, "--plugin", "count=count@0.2.0"],
        dir.path(),
    );
    let job = host.wait_status(&id, "running", Duration::from_secs(30));
    let last = job["job"]["upgrades"]
        .as_array()
        .expect("upgrades")
        .last()
        .cloned()
        .expect("one");
    assert_eq!(last["outcome"], "upgraded", "{last:#}");
    assert!(
        last["downtime_ms"].as_f64().is_some(),
        "downtime measured: {last:#}"
    );
    // The migration ran ahead, on standby, while v1 ran on.
    assert!(
        last["standby"]
            .as_str()
            .is_some_and(|s| s.contains("restored on standby")),
        "a migrating upgrade prepares its state on standby: {last:#}"
    );
    host.wait_checkpoints(&id, 2, Duration::from_secs(30));
    // The upgraded run has its own checkpoints: the earlier runs' go.
    let runs: Vec<String> = job["job"]["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| r["run_id"].as_str().expect("run id").to_string())
        .collect();
    let checkpoints = dir.path().join("data").join("checkpoints");
    let (current, earlier) = runs.split_last().expect("runs");
    let started = Instant::now();
    while earlier.iter().any(|run| checkpoints.join(run).exists()) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "earlier runs' checkpoints stay: {earlier:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(checkpoints.join(current).exists(), "the current run's stay");

    // Stop with a savepoint: every word's update stream is 1..N exactly
    // once across the refused, rolled-back and completed upgrades.
    let savepoint = host.ok(&["stop", &id], dir.path());
    assert!(savepoint.trim().contains("savepoint-"), "{savepoint}");
    host.wait_status(&id, "stopped", Duration::from_secs(30));
    let counts = check_exactly_once(&dir.path().join("out-upgrade"));
    assert!(
        counts.values().sum::<u64>() > 1000,
        "the job ran across all of it: {counts:?}"
    );
    let savepoints: Value = serde_json::from_str(
        &http(
            &host.url,
            "GET",
            &format!("/api/jobs/{id}/savepoints"),
            None,
            &[],
        )
        .1,
    )
    .expect("JSON");
    assert_eq!(
        savepoints.as_array().map(Vec::len),
        Some(3),
        "rollback, upgrade, stop: {savepoints:#}"
    );
}

#[test]
fn a_killed_host_resumes_every_running_job_exactly_once() {
    let dir = plugin_dir();
    let data = dir.path().join("data");
    let mut host = Host::start(&data, &[]);
    let records = 12_000;
    let mut ids = Vec::new();
    for name in ["first", "second"] {
        dir.write(
            &format!("{name}.toml"),
            wordcount(
                name,
                Some(records),
                2500,
                "split.wasm",
                "count.wasm",
                "300ms",
            ),
        );
        ids.push(
            host.ok(&["run", &format!("{name}.toml")], dir.path())
                .trim()
                .to_string(),
        );
    }
    for id in &ids {
        host.wait_checkpoints(id, 2, Duration::from_secs(30));
    }
    host.kill();
    let host = Host::start(&data, &[]);
    let mut expected = BTreeMap::new();
    generator_counts(records, 30, 7, &mut expected);
    for (id, name) in ids.iter().zip(["first", "second"]) {
        let job = host.wait_status(id, "finished", Duration::from_secs(90));
        let runs = job["job"]["runs"].as_array().expect("runs");
        assert_eq!(runs.len(), 2, "resumed once: {runs:?}");
        assert!(
            runs[1]["restored_from"]
                .as_str()
                .is_some_and(|p| p.contains("chk-")),
            "resumed from a checkpoint: {runs:?}"
        );
        let counts = check_exactly_once(&dir.path().join(format!("out-{name}")));
        assert_eq!(counts, expected, "job {name}: final counts");
    }
}

#[test]
fn a_looping_plugin_fails_only_its_own_job() {
    let dir = plugin_dir();
    let data = dir.path().join("data");
    let host = Host::start(&data, &[]);
    dir.write(
        "healthy.toml",
        wordcount("healthy", None, 1000, "split.wasm", "count.wasm", "200ms"),
    );
    dir.write("looping.toml", faulty("looping", "spinner", "loop"));
    let healthy = host
        .ok(&["run", "healthy.toml"], dir.path())
        .trim()
        .to_string();
    let looping = host
        .ok(&["run", "looping.toml"], dir.path())
        .trim()
        .to_string();
    host.wait_checkpoints(&healthy, 2, Duration::from_secs(30));
    let before = host.job(&healthy)["checkpoints_completed"]
        .as_u64()
        .unwrap_or(0);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(4) {
        let asked = Instant::now();
        let (status, _) = http(&host.url, "GET", "/api/jobs", None, &[]);
        assert_eq!(status, 200);
        slowest = slowest.max(asked.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        slowest < Duration::from_secs(2),
        "the API kept answering (slowest {slowest:?})"
    );
    let after = host.job(&healthy);
    assert_eq!(after["job"]["lifecycle"]["status"], "running");
    let completed = after["checkpoints_completed"].as_u64().unwrap_or(0);
    assert!(
        completed >= before + 5,
        "healthy checkpoints went on: {before} -> {completed}"
    );
    let looping = host.job(&looping);
    let restarts = looping["job"]["restarts"].as_array().map_or(0, Vec::len);
    assert!(restarts >= 2, "the looping job restarts: {looping:#}");
    let error = looping["job"]["last_error"].as_str().unwrap_or("");
    assert!(error.contains("`spinner`"), "names the operator: {error}");
}

#[test]
fn metrics_count_records_checkpoints_and_plugin_faults() {
    let dir = plugin_dir();
    let host = Host::start(&dir.path().join("data"), &[]);
    dir.write(
        "healthy.toml",
        wordcount("healthy", None, 1000, "split.wasm", "count.wasm", "200ms"),
    );
    dir.write("trapping.toml", faulty("trapping", "trapper", "trap"));
    let healthy = host
        .ok(&["run", "healthy.toml"], dir.path())
        .trim()
        .to_string();
    let trapping = host
        .ok(&["run", "trapping.toml"], dir.path())
        .trim()
        .to_string();
    host.wait_checkpoints(&healthy, 2, Duration::from_secs(30));
    let job = [("job", healthy.as_str())];
    let count = [("job", healthy.as_str()), ("operator", "count")];
    let first = scrape(&host.url);
    let records = total(&first, "weir_records_in_total", &count);
    let checkpoints = total(&first, "weir_checkpoints_completed_total", &job);
    assert!(records > 0.0, "count took in records");
    // Two more checkpoints (200 ms apart) and more records.
    let done = host.job(&healthy)["checkpoints_completed"]
        .as_u64()
        .unwrap_or(0);
    host.wait_checkpoints(&healthy, done + 2, Duration::from_secs(30));
    let second = scrape(&host.url);
    assert!(
        total(&second, "weir_records_in_total", &count) > records,
        "records-in grows"
    );
    assert!(
        total(&second, "weir_checkpoints_completed_total", &job) >= checkpoints + 2.0,
        "the checkpoint counter grows"
    );
    // The word count runs at parallelism 1.
    let subtask = [
        ("job", healthy.as_str()),
        ("operator", "count"),
        ("subtask", "0"),
    ];
    assert!(total(&second, "weir_busy_seconds_total", &subtask) > 0.0);
    assert!(total(&second, "weir_bytes_in_total", &subtask) > 0.0);
    assert!(
        total(&second, "weir_state_keys", &subtask) > 0.0,
        "keys of state"
    );
    let faults = [
        ("job", trapping.as_str()),
        ("operator", "trapper"),
        ("kind", "trap"),
    ];
    assert!(
        total(&second, "weir_failures_total", &faults) >= 1.0,
        "the trapping plugin's faults are counted"
    );
    assert!(
        total(
            &second,
            "weir_restarts_total",
            &[("job", trapping.as_str())]
        ) >= 1.0
    );
    assert!(total(&second, "weir_jobs", &[("status", "running")]) >= 1.0);
    assert!(
        total(&second, "weir_plugins", &[]) >= 3.0,
        "split, count, faults"
    );
}

/// The dashboard in headless Chromium: the token asked for and used, the
/// running job found and opened, its operators drawn, its checkpoint count
/// rising, "Savepoint" pressed and the savepoint listed. A screenshot of
/// the job page is left at `target/dashboard-job.png`.
#[test]
fn the_dashboard_shows_a_running_job_takes_a_savepoint_and_links_its_fork() {
    let Some(driver) = weir_tests::browser::chromedriver() else {
        return;
    };
    let dir = plugin_dir();
    let token = dir.write("token", "dashboard-secret\n");
    let host = Host::start_with(&dir.path().join("data"), &[], Some(&token));
    dir.write(
        "healthy.toml",
        wordcount("healthy", None, 1000, "split.wasm", "count.wasm", "200ms"),
    );
    let job = host
        .ok(&["run", "healthy.toml"], dir.path())
        .trim()
        .to_string();
    host.wait_checkpoints(&job, 1, Duration::from_secs(30));
    // A fork of it, writing elsewhere: the dashboard shows the lineage.
    dir.write(
        "forked.toml",
        wordcount("forked", None, 1000, "split.wasm", "count.wasm", "200ms"),
    );
    let fork = host
        .ok(&["fork", &job, "--job-file", "forked.toml"], dir.path())
        .trim()
        .to_string();
    let screenshot = weir_tests::workspace()
        .join("target")
        .join("dashboard-job.png");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(drive_dashboard(
        &driver.url,
        &host.url,
        &job,
        &fork,
        &screenshot,
    ));
}

/// The element `locator` finds, waiting up to 20 s for it.
pub(crate) async fn wait_for(
    browser: &fantoccini::Client,
    locator: String,
) -> fantoccini::elements::Element {
    browser
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(fantoccini::Locator::Css(&locator))
        .await
        .unwrap_or_else(|e| panic!("the page shows {locator}: {e}"))
}

/// The text of the element `locator` finds, or `None` while there is none.
/// The page re-renders its view as answers arrive: an element found a
/// moment ago may be gone by the time its text is read (stale), which is
/// `None` too, a read to repeat.
async fn read_text(browser: &fantoccini::Client, locator: &str) -> Option<String> {
    let element = browser.find(fantoccini::Locator::Css(locator)).await.ok()?;
    element.text().await.ok()
}

/// The text of the element `locator` finds once `accept` takes it, read
/// again (through re-renders) for up to 20 s.
pub(crate) async fn text_when(
    browser: &fantoccini::Client,
    locator: &str,
    accept: impl Fn(&str) -> bool,
) -> String {
    let started = Instant::now();
    let mut last = None;
    loop {
        if let Some(text) = read_text(browser, locator).await {
            if accept(&text) {
                return text;
            }
            last = Some(text);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the page's {locator} reads {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks the element `locator` finds, finding it again if a re-render
/// replaced it between the find and the click; up to 20 s.
pub(crate) async fn click(browser: &fantoccini::Client, locator: &str) {
    let started = Instant::now();
    loop {
        let result = wait_for(browser, locator.to_string()).await.click().await;
        match result {
            Ok(_) => return,
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(20),
                "click {locator}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A headless Chromium session through ChromeDriver at `driver` (its
/// profile in `profile`).
pub(crate) async fn browser(driver: &str, profile: &Path) -> fantoccini::Client {
    let mut args: Vec<String> = weir_tests::browser::CHROMIUM_ARGS
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".to_string(),
        serde_json::json!({ "binary": "/usr/bin/chromium", "args": args }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    fantoccini::ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(driver)
        .await
        .expect("a Chromium session")
}

async fn drive_dashboard(driver: &str, host: &str, job: &str, fork: &str, screenshot: &Path) {
    use fantoccini::Locator;
    let profile = tempfile::tempdir().expect("profile dir");
    let browser = browser(driver, profile.path()).await;
    let wait = |locator: &str| wait_for(&browser, locator.to_string());
    browser.goto(&format!("{host}/")).await.expect("open /");
    // The host has a token: the page asks for it.
    wait("#token-form:not([hidden]) #token")
        .await
        .send_keys("dashboard-secret")
        .await
        .expect("type the token");
    browser
        .find(Locator::Css("#token-form button"))
        .await
        .expect("the token button")
        .click()
        .await
        .expect("use the token");
    click(&browser, &format!("#jobs tr[data-job=\"{job}\"] a")).await;
    for uid in ["words", "split", "count", "out"] {
        wait(&format!("#graph g.operator[data-uid=\"{uid}\"]")).await;
    }
    let count = |browser: fantoccini::Client| async move {
        read_text(&browser, "#checkpoint-count")
            .await?
            .trim()
            .parse::<u64>()
            .ok()
    };
    // Until the job's first answer arrived the count shows a placeholder.
    let started = Instant::now();
    let first = loop {
        if let Some(first) = count(browser.clone()).await {
            break first;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the checkpoint count never shows a number"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut later = first;
    while later <= first {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the checkpoint count stays at {first}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        later = count(browser.clone()).await.unwrap_or(first);
    }
    // The graph shows rates once two samples were taken.
    text_when(
        &browser,
        "#graph g.operator[data-uid=\"count\"] text.rate",
        |rate| rate.starts_with("in "),
    )
    .await;
    click(&browser, "#savepoint").await;
    wait("#savepoints tbody tr td code").await;
    text_when(&browser, "#message", |message| {
        message.contains("Savepoint requested")
    })
    .await;
    let png = browser.screenshot().await.expect("a screenshot");
    std::fs::write(screenshot, png).expect("write the screenshot");
    // The job lists its fork; the fork's page links back to it.
    click(&browser, &format!("#lineage a[href=\"#/jobs/{fork}\"]")).await;
    text_when(
        &browser,
        &format!("#lineage a[href=\"#/jobs/{job}\"]"),
        |lineage| lineage.trim() == job,
    )
    .await;
    browser.close().await.expect("close the session");
}

#[test]
fn the_watched_directory_adds_good_plugins_and_rejects_bad_ones() {
    let dir = plugin_dir();
    let data = dir.path().join("data");
    let host = Host::start(&data, &[]);
    let incoming = data.join("plugins/incoming");
    std::fs::copy(WORDCOUNT_SPLIT, incoming.join("split.wasm")).expect("drop a plugin");
    std::fs::write(incoming.join("junk.wasm"), b"this is not wasm").expect("drop junk");
    let started = Instant::now();
    let reason = data.join("plugins/rejected/junk.wasm.reason.txt");
    loop {
        let list = host.ok(&["plugin", "list"], dir.path());
        // The rejected file and the reason beside it land one after the other.
        if list.contains("split@")
            && reason.exists()
            && data.join("plugins/rejected/junk.wasm").exists()
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not picked up: {list}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let why = std::fs::read_to_string(&reason).expect("reason");
    assert!(
        why.contains("junk.wasm") && why.contains("not a valid WebAssembly component"),
        "{why}"
    );
    assert!(data.join("plugins/rejected/junk.wasm").exists());
    assert!(
        !incoming.join("split.wasm").exists(),
        "taken out of incoming/"
    );
    assert!(!incoming.join("junk.wasm").exists());
}

#[test]
fn bad_requests_get_the_right_status_and_say_why() {
    let dir = plugin_dir();
    let data = dir.path().join("data");
    let token = dir.write("token", "s3cret\n");
    dir.write("host.toml", "max_plugin_size = \"20MiB\"\n");
    let host = Host::start_with(
        &data,
        &[
            "--config",
            &dir.path().join("host.toml").display().to_string(),
        ],
        Some(&token),
    );
    let auth = Some("s3cret");
    // 401: no token, wrong token.
    assert_eq!(http(&host.url, "GET", "/api/jobs", None, &[]).0, 401);
    assert_eq!(
        http(&host.url, "GET", "/api/jobs", Some("wrong"), &[]).0,
        401
    );
    // The OpenAPI document is served.
    let (status, body) = http(&host.url, "GET", "/api/openapi.json", auth, &[]);
    assert_eq!(status, 200);
    let document: Value = serde_json::from_str(&body).expect("OpenAPI JSON");
    assert!(
        document["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.")),
        "{document}"
    );
    // 404: unknown job and plugin.
    let (status, body) = http(&host.url, "GET", "/api/jobs/nope", auth, &[]);
    assert_eq!(status, 404);
    assert!(body.contains("no job nope"), "{body}");
    assert_eq!(
        http(&host.url, "DELETE", "/api/plugins/nope@1.0", auth, &[]).0,
        404
    );
    // 413: over the configured limit, and nothing is left behind.
    let (status, body) = http(
        &host.url,
        "POST",
        "/api/plugins?file=big.wasm",
        auth,
        &vec![0u8; 21 << 20],
    );
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("big.wasm") && body.contains("20 MiB"),
        "{body}"
    );
    // 400: not a component, missing import.
    let (status, body) = http(
        &host.url,
        "POST",
        "/api/plugins?file=junk.wasm",
        auth,
        b"\0asm junk",
    );
    assert_eq!(status, 400);
    assert!(body.contains("junk.wasm"), "{body}");
    let missing = std::fs::read(weir_tests::plugins::MISSING_IMPORT).expect("plugin");
    let (status, body) = http(
        &host.url,
        "POST",
        "/api/plugins?file=missing.wasm",
        auth,
        &missing,
    );
    assert_eq!(status, 400);
    assert!(
        body.contains("imports something the host does not offer"),
        "{body}"
    );
    assert!(
        std::fs::read_dir(data.join("plugins/blobs"))
            .expect("blobs")
            .next()
            .is_none(),
        "nothing stored"
    );
    // 201 then 200 for the same file; 409 for another file under a taken
    // name@version.
    let count = std::fs::read(WORDCOUNT_COUNT).expect("plugin");
    assert_eq!(
        http(
            &host.url,
            "POST",
            "/api/plugins?file=count.wasm",
            auth,
            &count
        )
        .0,
        201
    );
    assert_eq!(
        http(
            &host.url,
            "POST",
            "/api/plugins?file=count.wasm",
            auth,
            &count
        )
        .0,
        200
    );
    let v2 = std::fs::read(WORDCOUNT_COUNT_V2).expect("plugin");
    assert_eq!(
        http(
            &host.url,
            "POST",
            "/api/plugins?file=count-v2.wasm",
            auth,
            &v2
        )
        .0,
        201
    );
    let other = std::fs::read(COUNT_V2_TRAP).expect("plugin");
    let (status, _) = http(
        &host.url,
        "POST",
        "/api/plugins?file=trap.wasm",
        auth,
        &other,
    );
    assert_eq!(status, 201, "a new version is fine");
    // 400: a malformed job file says what `weir run` says.
    let bad = r#"{"job_file": "name = \"x\"\n[[source]]\nuid = \"s\"\nkind = \"nope\"\n", "base_dir": "/tmp"}"#;
    let (status, body) = http(&host.url, "POST", "/api/jobs", auth, bad.as_bytes());
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("job.toml"), "names the file: {body}");
    let local = JobDir::new();
    local.job("name = \"x\"\n[[source]]\nuid = \"s\"\nkind = \"nope\"\n");
    let embedded = stderr(&crate::support::weir(&["run", "job.toml"], local.path()));
    let answer: Value = serde_json::from_str(&body).expect("error JSON");
    let message = answer["error"].as_str().expect("error");
    let (_, reason) = message.split_once("job.toml").expect("names job.toml");
    assert!(
        embedded.contains(reason),
        "the same message as `weir run`: {embedded} vs {message}"
    );
    // 409: removing a plugin a running job uses; a savepoint of an ended job.
    dir.write(
        "job.toml",
        wordcount(
            "uses-count",
            Some(200_000),
            2000,
            "split.wasm",
            "count@0.1.0",
            "1s",
        ),
    );
    let id = host.ok(&["run", "job.toml"], dir.path()).trim().to_string();
    let (status, body) = http(&host.url, "DELETE", "/api/plugins/count@0.1.0", auth, &[]);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains(&id), "names the job: {body}");
    host.ok(&["cancel", &id], dir.path());
    host.wait_status(&id, "cancelled", Duration::from_secs(30));
    let (status, body) = http(
        &host.url,
        "POST",
        &format!("/api/jobs/{id}/savepoints"),
        auth,
        b"{}",
    );
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains(&format!(
            "job {id} is cancelled: a savepoint is not possible now"
        )),
        "{body}"
    );
    assert_eq!(
        http(&host.url, "DELETE", "/api/plugins/count@0.1.0", auth, &[]).0,
        200
    );
    // A host on a non-loopback address without a token refuses to start.
    let refused = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("other"))
        .env_remove("WEIR_TOKEN_FILE")
        .output()
        .expect("weir runs");
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("without a bearer token"),
        "{}",
        stderr(&refused)
    );
}

#[test]
fn sigterm_stops_jobs_with_a_savepoint_and_the_next_start_resumes_them() {
    let dir = plugin_dir();
    let data = dir.path().join("data");
    let mut host = Host::start(&data, &[]);
    let records = 8_000;
    dir.write(
        "job.toml",
        wordcount(
            "graceful",
            Some(records),
            2000,
            "split.wasm",
            "count.wasm",
            "500ms",
        ),
    );
    let id = host.ok(&["run", "job.toml"], dir.path()).trim().to_string();
    host.wait_checkpoints(&id, 1, Duration::from_secs(30));
    host.terminate();
    let host = Host::start(&data, &[]);
    let job = host.wait_status(&id, "finished", Duration::from_secs(60));
    let history = statuses(&job);
    assert!(
        history.windows(2).any(|w| w == ["stopped", "created"]),
        "{history:?}"
    );
    let mut expected = BTreeMap::new();
    generator_counts(records, 30, 7, &mut expected);
    assert_eq!(
        check_exactly_once(&dir.path().join("out-graceful")),
        expected
    );
}

/// A file source → file sink job (no operator).
fn copy_job(name: &str, source: &str, sink: &str, extra: &str) -> String {
    format!(
        r#"
name = "{name}"

[[source]]
uid = "lines"
kind = "file"
path = {source:?}

[[sink]]
uid = "out"
kind = "file"
path = {sink:?}
inputs = ["lines"]
{extra}"#
    )
}

#[test]
fn a_job_stays_inside_the_hosts_roots() {
    let dir = plugin_dir();
    let root = dir.path().join("root");
    dir.write("root/input.txt", "one\ntwo\nthree\n");
    std::os::unix::fs::symlink("/etc", root.join("etc-link")).expect("symlink");
    let outside = JobDir::new();
    let outside_out = outside.path().join("out");
    dir.write(
        "host.toml",
        format!("[jobs]\nroots = [{:?}]\n", root.display().to_string()),
    );
    let host = Host::start_exact(
        &dir.path().join("data"),
        &[
            "--config",
            dir.path().join("host.toml").to_str().expect("UTF-8"),
        ],
        None,
    );
    let roots = format!("roots ({}", root.display());
    let refused = |job: &str, wanted: &[&str]| {
        std::fs::write(root.join("job.toml"), job).expect("write job");
        let output = host.weir(&["run", "job.toml"], &root);
        let message = stderr(&output);
        assert!(!output.status.success(), "submitted: {job}");
        assert!(message.contains("HTTP 400"), "{message}");
        for wanted in wanted {
            assert!(message.contains(wanted), "`{wanted}` in {message}");
        }
    };
    // The password file copied out, as the issue tried: both paths named,
    // each with the roots, in one answer.
    refused(
        &copy_job(
            "steal",
            "/etc/passwd",
            &outside_out.display().to_string(),
            "",
        ),
        &[
            "[[source]] uid \"lines\" path /etc/passwd: outside the host's job roots",
            &format!(
                "[[sink]] uid \"out\" path {}: outside",
                outside_out.display()
            ),
            &roots,
        ],
    );
    assert!(!outside_out.exists(), "nothing was written outside");
    // A symlink inside a root that points out.
    refused(
        &copy_job("link", "etc-link/passwd", "out", ""),
        &[&format!(
            "[[source]] uid \"lines\" path {}: leads to /etc/passwd, outside",
            root.join("etc-link/passwd").display()
        )],
    );
    // `..` out of the root, through existing directories and after a
    // missing one.
    refused(
        &copy_job("dots", "input.txt", "../escaped", ""),
        &[&format!(
            "path {}: leads to {}, outside",
            root.join("../escaped").display(),
            dir.path().join("escaped").display()
        )],
    );
    refused(
        &copy_job("missing-dots", "input.txt", "new/../../escaped", ""),
        &[&format!(
            "has `..` after {}, which does not exist",
            root.join("new").display()
        )],
    );
    // The host's environment is not a plugin's to read unless allowed.
    std::fs::copy(dir.path().join("split.wasm"), root.join("split.wasm")).expect("copy");
    refused(
        &copy_job("env", "input.txt", "out", "")
            .replace("inputs = [\"lines\"]", "inputs = [\"split\"]")
            .replace(
                "[[sink]]",
                "[[operator]]\nuid = \"split\"\nplugin = \"split.wasm\"\ninputs = [\"lines\"]\nwasi = [\"env\"]\n\n[[sink]]",
            ),
        &["[[operator]] uid \"split\" wasi \"env\"", "allow_wasi_env"],
    );
    // A restore point outside.
    std::fs::write(
        root.join("job.toml"),
        copy_job("ok", "input.txt", "out", ""),
    )
    .expect("job");
    let output = host.weir(&["run", "job.toml", "-s", "/etc"], &root);
    assert!(
        stderr(&output).contains("from_savepoint /etc: outside the host's job roots"),
        "{}",
        stderr(&output)
    );
    // Inside the roots the job runs.
    let id = host.ok(&["run", "job.toml"], &root).trim().to_string();
    host.wait_status(&id, "finished", Duration::from_secs(60));
    assert_eq!(
        weir_tests::read_parts(&root.join("out")),
        vec!["one", "two", "three"]
    );
    // A savepoint's target outside the roots is refused before the job's
    // status is looked at; inside, the finished job says it takes none.
    let request = |target: &Path| {
        let body = serde_json::json!({ "target_dir": target }).to_string();
        http(
            &host.url,
            "POST",
            &format!("/api/jobs/{id}/savepoints"),
            None,
            body.as_bytes(),
        )
    };
    let (status, body) = request(outside.path());
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains(&format!("target_dir {}: outside", outside.path().display())),
        "{body}"
    );
    let (status, body) = request(&root.join("savepoints"));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("a savepoint is not possible now"), "{body}");
    // Output whose reader is gone ends quietly: no panic, no error.
    for args in [vec!["job", id.as_str()], vec!["list"]] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let output = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(&args)
            .env("WEIR_HOST", &host.url)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("weir runs");
        assert!(
            output.status.success() && output.stderr.is_empty(),
            "weir {args:?} into a closed pipe: {} {}",
            output.status,
            stderr(&output)
        );
        let piped = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{:?} {} | head -1",
                env!("CARGO_BIN_EXE_weir"),
                args.join(" ")
            ))
            .env("WEIR_HOST", &host.url)
            .output()
            .expect("sh runs");
        assert!(
            piped.status.success() && !stderr(&piped).contains("panicked"),
            "{}",
            stderr(&piped)
        );
        assert_eq!(String::from_utf8_lossy(&piped.stdout).lines().count(), 1);
    }
}

#[test]
fn weir_run_embedded_reads_and_writes_anywhere() {
    let elsewhere = JobDir::new();
    let input = elsewhere.write("input.txt", "a\nb\n");
    let out = elsewhere.path().join("out");
    let dir = JobDir::new();
    dir.job(&copy_job(
        "anywhere",
        input.to_str().expect("UTF-8"),
        out.to_str().expect("UTF-8"),
        "",
    ));
    let output = crate::support::weir(&["run", "job.toml"], dir.path());
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(weir_tests::read_parts(&out), vec!["a", "b"]);
}

#[test]
fn a_fork_starts_from_a_savepoint_of_the_running_job_and_writes_to_its_own_sinks() {
    let dir = plugin_dir();
    let host = Host::start(&dir.path().join("data"), &[]);
    let records = 12_000;
    dir.write(
        "ab.toml",
        wordcount(
            "ab",
            Some(records),
            2000,
            "split.wasm",
            "count.wasm",
            "200ms",
        ),
    );
    let id = host.ok(&["run", "ab.toml"], dir.path()).trim().to_string();
    host.wait_checkpoints(&id, 2, Duration::from_secs(60));

    // Its own job file again: its sink would write where the job's does.
    let refused = host.weir(&["fork", &id], dir.path());
    assert!(!refused.status.success());
    let message = stderr(&refused);
    assert!(
        message.contains(&format!(
            "a fork of job {id} must write elsewhere than the job (give it a job file with other sink targets, --job-file)"
        )) && message.contains("sink `out` writes to the directory")
            && message.contains("out-ab, as the job's sink `out` does"),
        "{message}"
    );
    let unknown = host.weir(&["fork", "nosuchjob"], dir.path());
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("no job nosuchjob"),
        "{}",
        stderr(&unknown)
    );

    // The same job writing to `out-b`: forked under another name.
    dir.write(
        "b.toml",
        wordcount(
            "b",
            Some(records),
            2000,
            "split.wasm",
            "count.wasm",
            "200ms",
        ),
    );
    let fork = host
        .ok(
            &["fork", &id, "--job-file", "b.toml", "--name", "ab-b"],
            dir.path(),
        )
        .trim()
        .to_string();
    assert_ne!(fork, id);

    // Both run to the end; the job's output is whole and exactly once.
    let mut expected = BTreeMap::new();
    generator_counts(records, 30, 7, &mut expected);
    let job = host.wait_status(&id, "finished", Duration::from_secs(90));
    assert_eq!(check_exactly_once(&dir.path().join("out-ab")), expected);
    let forked = host.wait_status(&fork, "finished", Duration::from_secs(90));
    // The fork counted on from the savepoint: each word's updates after it,
    // once each, up to the same totals.
    let mut updates: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in weir_tests::read_parts(&dir.path().join("out-b")) {
        let (word, n) = line.rsplit_once(' ').expect("word count");
        updates
            .entry(word.to_string())
            .or_default()
            .push(n.parse().expect("count"));
    }
    let mut finals = BTreeMap::new();
    let mut resumed_midway = false;
    for (word, mut counts) in updates {
        counts.sort_unstable();
        let (first, last) = (counts[0], *counts.last().expect("one"));
        assert_eq!(
            counts,
            (first..=last).collect::<Vec<_>>(),
            "word `{word}`: the fork's updates, once each"
        );
        resumed_midway |= first > 1;
        finals.insert(word, last);
    }
    assert_eq!(finals, expected, "the fork's totals");
    assert!(
        resumed_midway,
        "the fork started from the savepoint, not from the beginning"
    );

    // Lineage on both, and in `weir job`.
    let savepoint = forked["job"]["forked_from"]["savepoint"]
        .as_str()
        .expect("forked_from")
        .to_string();
    assert_eq!(forked["job"]["forked_from"]["job"], id.as_str());
    assert_eq!(forked["job"]["name"], "ab-b");
    assert_eq!(job["job"]["forks"][0]["job"], fork.as_str());
    assert_eq!(job["job"]["forks"][0]["savepoint"], savepoint.as_str());
    assert!(
        forked["job"]["runs"][0]["restored_from"]
            .as_str()
            .is_some_and(|r| r.starts_with(&savepoint)),
        "{forked:#}"
    );
    let shown = host.ok(&["job", &fork], dir.path());
    assert!(shown.contains(&format!("forked from {id}")), "{shown}");
}
