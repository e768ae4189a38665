//! Upgrades on a running host under adverse conditions: with other work
//! on the machine, at every step of the procedure. The committed output
//! of each job is checked word by word: every word's updates run 1..N,
//! each once, across every upgrade, rollback and restart.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::host::{Host, check_exactly_once, http, plugin_dir, statuses, stderr, wordcount};
use crate::support::JobDir;

/// Processes that keep the machine's cores busy (`yes > /dev/null`), as
/// other work would; killed when dropped.
struct CpuHogs(Vec<Child>);

impl CpuHogs {
    fn start(count: usize) -> Self {
        Self(
            (0..count)
                .map(|_| {
                    Command::new("yes")
                        .stdout(Stdio::null())
                        .spawn()
                        .expect("`yes` starts")
                })
                .collect(),
        )
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        for hog in &mut self.0 {
            let _ = hog.kill();
            let _ = hog.wait();
        }
    }
}

/// Rounds of [`upgrades_under_contention_never_duplicate_or_lose_a_record`].
const CONTENTION_ROUNDS: usize = 10;

/// The scenario in which a rolled-back upgrade once committed a duplicate
/// under load (the failed version's sink took its upstream's failure for
/// the end of its input and committed what its probation held), run
/// round after round beside two CPU hogs: a job is upgraded to a version
/// that traps during its probation (rolled back), then to one that
/// passes, then stopped; its committed output must be exactly once.
#[test]
fn upgrades_under_contention_never_duplicate_or_lose_a_record() {
    let _hogs = CpuHogs::start(2);
    let dir = plugin_dir();
    // Probation passes after four checkpoints: the trapping version traps
    // (on its 1000th record, ~0.7 s of input) well before.
    dir.write("host.toml", "probation_checkpoints = 4\n");
    let config = dir.path().join("host.toml");
    let config = config.to_str().expect("UTF-8 path");
    let host = Host::start(&dir.path().join("data"), &["--config", config]);
    host.ok(
        &["plugin", "add", "split.wasm", "count.wasm", "count-v2.wasm"],
        dir.path(),
    );
    for round in 0..CONTENTION_ROUNDS {
        let name = format!("contended-{round}");
        dir.write(
            "job.toml",
            wordcount(&name, None, 1500, "split", "count@0.1.0", "300ms"),
        );
        let id = host.ok(&["run", "job.toml"], dir.path()).trim().to_string();
        host.wait_status(&id, "running", Duration::from_secs(60));
        host.wait_checkpoints(&id, 1, Duration::from_secs(60));
        let rolled = host.weir(
            &[
                "upgrade",
                &id,
                "--plugin",
                "count=count-v2-trap.wasm",
                "--probation",
                "60s",
            ],
            dir.path(),
        );
        let message = stderr(&rolled);
        assert!(
            !rolled.status.success() && message.contains("rolled back"),
            "round {round}: the trapping version is rolled back: {message}"
        );
        host.wait_status(&id, "running", Duration::from_secs(60));
        host.wait_checkpoints(&id, 1, Duration::from_secs(60));
        host.ok(
            &["upgrade", &id, "--plugin", "count=count@0.2.0"],
            dir.path(),
        );
        host.wait_status(&id, "running", Duration::from_secs(60));
        host.ok(&["stop", &id], dir.path());
        host.wait_status(&id, "stopped", Duration::from_secs(60));
        let counts = check_exactly_once(&dir.path().join(format!("out-{name}")));
        assert!(
            counts.values().sum::<u64>() > 1000,
            "round {round}: the job ran across both upgrades: {counts:?}"
        );
    }
}

/// The newest upgrade of a job, as the API shows it.
fn last_upgrade(host: &Host, id: &str) -> Value {
    host.job(id)["job"]["upgrades"]
        .as_array()
        .and_then(|u| u.last().cloned())
        .unwrap_or(Value::Null)
}

/// Waits until the job's newest upgrade is at `step`.
fn wait_step(host: &Host, id: &str, step: &str, limit: Duration) {
    let started = Instant::now();
    loop {
        let upgrade = last_upgrade(host, id);
        if upgrade["step"] == step {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "job {id}'s upgrade never reached {step}: {upgrade:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `done` every 10 ms for up to `limit`; how long it took.
fn time_until(limit: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Whether `dir` is gone or empty.
fn empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

/// A host for fault tests: the word count plugins added, upgrades on a
/// probation that lasts (a test ends it), `env` for the host process.
fn fault_host(dir: &JobDir, env: &[(&str, &str)]) -> Host {
    dir.write(
        "host.toml",
        "probation = \"120s\"\nprobation_checkpoints = 100000\n",
    );
    let config = dir.path().join("host.toml");
    let host = Host::start_env(
        &dir.path().join("data"),
        &["--config", config.to_str().expect("UTF-8 path")],
        env,
    );
    host.ok(
        &["plugin", "add", "split.wasm", "count.wasm", "count-v2.wasm"],
        dir.path(),
    );
    host
}

/// The word count on count 0.1.0 (whose state 0.2.0 migrates), running
/// with a checkpoint done; its id.
fn running_wordcount(host: &Host, dir: &JobDir, name: &str) -> String {
    dir.write(
        "job.toml",
        wordcount(name, None, 1500, "split", "count@0.1.0", "500ms"),
    );
    let id = host.ok(&["run", "job.toml"], dir.path()).trim().to_string();
    host.wait_status(&id, "running", Duration::from_secs(60));
    host.wait_checkpoints(&id, 1, Duration::from_secs(60));
    id
}

/// The plugin `count` runs now.
fn count_plugin(host: &Host, id: &str) -> String {
    host.job(id)["operators"]
        .as_array()
        .and_then(|ops| ops.iter().find(|o| o["uid"] == "count").cloned())
        .and_then(|count| count["plugin"]["plugin"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// SIGKILL at each step of a migrating upgrade (each held there by a
/// failpoint, or by a probation that lasts), then a restart on the same
/// data dir: the job comes back running the previous version, never
/// stuck upgrading, the upgrade closed — abandoned before the old version
/// stopped, rolled back from its savepoint after (the new version never
/// passed its probation) — and its committed output exactly once.
#[test]
fn a_host_killed_at_each_step_of_a_migrating_upgrade_resumes_the_previous_version_exactly_once() {
    let steps = [
        ("checking", Some("upgrade.checking=30s")),
        ("standby-building", Some("upgrade.standby-building=30s")),
        (
            "standby-catching-up",
            Some("upgrade.standby-catching-up=30s"),
        ),
        ("stopping", Some("upgrade.stopping=30s")),
        ("restoring", Some("upgrade.restoring=30s")),
        ("on-probation", None),
    ];
    for (step, failpoint) in steps {
        let dir = plugin_dir();
        let env: Vec<(&str, &str)> = failpoint
            .map(|f| vec![("WEIR_FAILPOINTS", f)])
            .unwrap_or_default();
        let mut host = fault_host(&dir, &env);
        let name = format!("killed-{step}");
        let id = running_wordcount(&host, &dir, &name);
        host.ok(
            &["upgrade", &id, "--plugin", "count=count@0.2.0", "--detach"],
            dir.path(),
        );
        wait_step(&host, &id, step, Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(300));
        host.kill();

        let host = fault_host(&dir, &[]);
        let job = host.wait_status(&id, "running", Duration::from_secs(60));
        let history = statuses(&job);
        assert!(
            !history.ends_with(&["upgrading"]),
            "{step}: not stuck upgrading: {history:?}"
        );
        let upgrade = last_upgrade(&host, &id);
        let stopped = matches!(step, "restoring" | "on-probation");
        let closed = if stopped { "rolled-back" } else { "abandoned" };
        assert!(
            upgrade["step"].is_null() && upgrade["outcome"] == closed,
            "{step}: the upgrade is closed as {closed}: {upgrade:#}"
        );
        assert_eq!(
            count_plugin(&host, &id),
            "count@0.1.0",
            "{step}: the previous version runs"
        );
        if stopped {
            let runs = job["job"]["runs"].as_array().expect("runs");
            let last = runs.last().expect("a run");
            assert_eq!(
                last["restored_from"], upgrade["savepoint"],
                "{step}: resumed from the upgrade's savepoint: {runs:#?}"
            );
        }
        host.wait_checkpoints(&id, 1, Duration::from_secs(60));
        host.ok(&["stop", &id], dir.path());
        host.wait_status(&id, "stopped", Duration::from_secs(60));
        let counts = check_exactly_once(&dir.path().join(format!("out-{name}")));
        assert!(
            counts.values().sum::<u64>() > 0,
            "{step}: the job ran: {counts:?}"
        );
    }
}

/// An upgrade asked to await release (as a staged job's stages are): once
/// its probation passed it holds its commits until released, then is
/// upgraded; rolled back instead, the previous version runs again from
/// the savepoint, naming why; a verdict out of turn is refused, naming
/// the step; the output exactly once either way.
#[test]
fn an_upgrade_awaiting_release_is_released_or_rolled_back_as_told() {
    let dir = plugin_dir();
    let host = fault_host(&dir, &[]);
    let token = host.token_value();
    let post =
        |path: &str, body: &str| http(&host.url, "POST", path, token.as_deref(), body.as_bytes());
    for pass in [true, false] {
        let name = format!("verdict-{pass}");
        let id = running_wordcount(&host, &dir, &name);
        let op = upgrade_awaiting_release(&host, &id, "1s");
        wait_step(&host, &id, "awaiting-release", Duration::from_secs(60));
        // Held: well past its probation, it is still awaiting.
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(last_upgrade(&host, &id)["step"], "awaiting-release");
        let verdict = match pass {
            true => post(&format!("/api/jobs/{id}/operations/{op}/release"), ""),
            false => post(
                &format!("/api/jobs/{id}/operations/{op}/roll-back"),
                r#"{"reason": "its stage's other task failed"}"#,
            ),
        };
        assert_eq!(verdict.0, 202, "{}", verdict.1);
        let started = Instant::now();
        while !last_upgrade(&host, &id)["step"].is_null() {
            assert!(started.elapsed() < Duration::from_secs(60), "never ended");
            std::thread::sleep(Duration::from_millis(50));
        }
        let upgrade = last_upgrade(&host, &id);
        let (outcome, plugin) = match pass {
            true => ("upgraded", "count@0.2.0"),
            false => ("rolled-back", "count@0.1.0"),
        };
        assert_eq!(upgrade["outcome"], outcome, "{upgrade:#}");
        assert_eq!(count_plugin(&host, &id), plugin);
        if !pass {
            assert!(
                upgrade["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("its stage's other task failed")),
                "{upgrade:#}"
            );
        }
        let (status, text) = post(&format!("/api/jobs/{id}/operations/{op}/release"), "");
        assert_eq!(status, 409, "{text}");
        assert!(
            text.contains(&format!("upgrade {op} of job {id} is over ({outcome})")),
            "{text}"
        );
        host.wait_status(&id, "running", Duration::from_secs(60));
        host.wait_checkpoints(&id, 1, Duration::from_secs(60));
        host.ok(&["stop", &id], dir.path());
        host.wait_status(&id, "stopped", Duration::from_secs(60));
        check_exactly_once(&dir.path().join(format!("out-{name}")));
    }
}

/// Asks an upgrade of job `id`'s count to 0.2.0 through the API, on
/// probation for `probation` and awaiting release (as a staged job's
/// task is asked): its operation's id.
fn upgrade_awaiting_release(host: &Host, id: &str, probation: &str) -> String {
    let body = format!(
        r#"{{"plugins": {{"count": "count@0.2.0"}}, "probation": "{probation}", "await_release": true}}"#
    );
    let token = host.token_value();
    let path = format!("/api/jobs/{id}/upgrade");
    let (status, text) = http(&host.url, "POST", &path, token.as_deref(), body.as_bytes());
    assert_eq!(status, 202, "{text}");
    let operation: Value = serde_json::from_str(&text).expect("an operation");
    operation["id"].as_str().expect("an id").to_string()
}

/// A task of a staged job's stage told to roll back before its probation
/// (a sibling failed early): while its new version is checked, the
/// upgrade ends there and the job never stops; once the old version
/// stopped, the new one rolls back as soon as it restored — neither waits
/// for a probation. Each step held by a failpoint.
#[test]
fn an_upgrade_told_to_roll_back_before_its_probation_rolls_back_at_once() {
    for (step, held) in [
        ("checking", "upgrade.checking=60s"),
        ("restoring", "upgrade.restoring=2s"),
    ] {
        let dir = plugin_dir();
        let host = fault_host(&dir, &[("WEIR_FAILPOINTS", held)]);
        let token = host.token_value();
        let post = |path: &str, body: &str| {
            http(&host.url, "POST", path, token.as_deref(), body.as_bytes())
        };
        let name = format!("early-{step}");
        let id = running_wordcount(&host, &dir, &name);
        let op = upgrade_awaiting_release(&host, &id, "60s");
        wait_step(&host, &id, step, Duration::from_secs(60));
        let (status, text) = post(
            &format!("/api/jobs/{id}/operations/{op}/roll-back"),
            r#"{"reason": "its stage's other task failed"}"#,
        );
        assert_eq!(status, 202, "{step}: {text}");
        // Well before the check's pause or the probation would end.
        let ended = time_until(Duration::from_secs(30), || {
            last_upgrade(&host, &id)["step"].is_null()
        });
        let upgrade = last_upgrade(&host, &id);
        assert!(ended.is_some(), "{step}: still under way: {upgrade:#}");
        assert_eq!(upgrade["outcome"], "rolled-back", "{step}: {upgrade:#}");
        let error = upgrade["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("its stage's other task failed")
                && (step != "checking"
                    || error.contains("rolled back before the old version stopped")),
            "{step}: {upgrade:#}"
        );
        assert_eq!(count_plugin(&host, &id), "count@0.1.0", "{step}");
        host.wait_status(&id, "running", Duration::from_secs(60));
        host.wait_checkpoints(&id, 1, Duration::from_secs(60));
        host.ok(&["stop", &id], dir.path());
        host.wait_status(&id, "stopped", Duration::from_secs(60));
        check_exactly_once(&dir.path().join(format!("out-{name}")));
    }
}

/// A cancel, a stop and the host's SIGTERM while an upgrade's standby is
/// built (its files there, held by a failpoint for 60 s): none waits for
/// the build — a cancel or stop answered within a second, the SIGTERM's
/// exit within a few — the upgrade abandoned, the standby's files
/// removed, and the committed output exactly once.
#[test]
fn cancel_stop_and_sigterm_during_a_standby_build_do_not_wait_for_it_and_leave_nothing() {
    for how in ["cancel", "stop", "sigterm"] {
        let dir = plugin_dir();
        let data = dir.path().join("data");
        let mut host = fault_host(&dir, &[("WEIR_FAILPOINTS", "upgrade.standby-building=60s")]);
        let name = format!("interrupted-{how}");
        let id = running_wordcount(&host, &dir, &name);
        host.ok(
            &["upgrade", &id, "--plugin", "count=count@0.2.0", "--detach"],
            dir.path(),
        );
        wait_step(&host, &id, "standby-building", Duration::from_secs(60));
        // Built (held by the failpoint): its files are there.
        let standby = data.join("state").join("standby");
        assert!(
            time_until(Duration::from_secs(30), || !empty(&standby)).is_some(),
            "{how}: the standby's files never appeared in {}",
            standby.display()
        );
        let token = host.token_value();
        let asked = Instant::now();
        let answered = match how {
            "cancel" | "stop" => {
                let path = format!("/api/jobs/{id}/{how}");
                let body = if how == "stop" { "{}" } else { "" };
                let (status, text) =
                    http(&host.url, "POST", &path, token.as_deref(), body.as_bytes());
                assert_eq!(status, 202, "{how}: {text}");
                let ended = if how == "cancel" {
                    "cancelled"
                } else {
                    "stopped"
                };
                time_until(Duration::from_secs(30), || {
                    host.job(&id)["job"]["lifecycle"]["status"] == ended
                })
                .unwrap_or_else(|| panic!("{how}: the job never became {ended}"))
            }
            _ => {
                host.terminate();
                asked.elapsed()
            }
        };
        // A cancel or stop is answered within a second; a SIGTERM's
        // answer is the host's exit, after a savepoint of the job it
        // stopped (1.2–1.3 s with the whole suite, or CPU hogs, beside
        // it): within a few, either way well short of the standby build's
        // 60 s it did not wait for.
        let bound = match how {
            "sigterm" => Duration::from_secs(5),
            _ => Duration::from_secs(1),
        };
        assert!(
            answered < bound,
            "{how} during the standby build took {answered:?}"
        );
        if how == "sigterm" {
            host = fault_host(&dir, &[]);
            host.wait_status(&id, "running", Duration::from_secs(60));
        }
        let upgrade = last_upgrade(&host, &id);
        assert_eq!(upgrade["outcome"], "abandoned", "{how}: {upgrade:#}");
        assert!(
            time_until(Duration::from_secs(10), || empty(&standby)).is_some(),
            "{how}: the standby's files stay in {}",
            standby.display()
        );
        if how != "cancel" {
            if how == "sigterm" {
                host.wait_checkpoints(&id, 1, Duration::from_secs(60));
                host.ok(&["stop", &id], dir.path());
                host.wait_status(&id, "stopped", Duration::from_secs(60));
            }
            check_exactly_once(&dir.path().join(format!("out-{name}")));
        }
    }
}

/// A subtask that fails while an upgrade's standby is built: the restart
/// strategy applies at once (failing, restarting, running), and the
/// upgrade is abandoned naming the failure, its standby removed.
#[test]
fn a_subtask_failing_during_a_standby_build_restarts_the_job_and_abandons_the_upgrade() {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    let poison = Arc::new(AtomicBool::new(false));
    let sending = poison.clone();
    // Words every few milliseconds, to every connection (the source
    // connects again after a restart); once asked, one `poison` line.
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let poison = sending.clone();
            std::thread::spawn(move || {
                loop {
                    let line = match poison.swap(false, Ordering::SeqCst) {
                        true => "poison\n",
                        false => "alpha beta gamma delta\n",
                    };
                    if stream.write_all(line.as_bytes()).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
        }
    });
    let dir = plugin_dir();
    let data = dir.path().join("data");
    let host = fault_host(&dir, &[("WEIR_FAILPOINTS", "upgrade.standby-building=60s")]);
    dir.write(
        "job.toml",
        format!(
            r#"
name = "poisoned"

[checkpoint]
interval = "500ms"

[restart]
strategy = "fixed-delay"
attempts = 5
delay = "100ms"

[[source]]
uid = "lines"
kind = "socket"
address = "{address}"

[[operator]]
uid = "guard"
plugin = "faults.wasm"
config = {{ fault = "trap", on = "poison" }}
inputs = ["lines"]

[[operator]]
uid = "split"
plugin = "split"
inputs = ["guard"]

[[operator]]
uid = "count"
plugin = "count@0.1.0"
inputs = [{{ from = "split", partition = "key" }}]

[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["count"]
"#
        ),
    );
    let id = host.ok(&["run", "job.toml"], dir.path()).trim().to_string();
    host.wait_status(&id, "running", Duration::from_secs(60));
    host.wait_checkpoints(&id, 1, Duration::from_secs(60));
    host.ok(
        &["upgrade", &id, "--plugin", "count=count@0.2.0", "--detach"],
        dir.path(),
    );
    wait_step(&host, &id, "standby-building", Duration::from_secs(60));
    poison.store(true, Ordering::SeqCst);
    let restarted = time_until(Duration::from_secs(10), || {
        statuses(&host.job(&id)).contains(&"restarting")
    });
    assert!(
        restarted.is_some_and(|t| t < Duration::from_secs(2)),
        "the restart strategy applies at once: {restarted:?}"
    );
    let job = host.wait_status(&id, "running", Duration::from_secs(60));
    let history = statuses(&job);
    assert!(
        history
            .windows(3)
            .any(|w| w == ["failing", "restarting", "running"]),
        "{history:?}"
    );
    let upgrade = last_upgrade(&host, &id);
    assert_eq!(upgrade["outcome"], "abandoned", "{upgrade:#}");
    let error = upgrade["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("`guard`"),
        "names the failed operator: {error}"
    );
    let operation = job["job"]["operations"]
        .as_array()
        .and_then(|o| o.last().cloned())
        .unwrap_or(Value::Null);
    assert_eq!(operation["status"], "failed", "{operation:#}");
    assert!(
        time_until(Duration::from_secs(10), || empty(
            &data.join("state").join("standby")
        ))
        .is_some(),
        "the standby's files are removed"
    );
    assert_eq!(
        count_plugin(&host, &id),
        "count@0.1.0",
        "the old version runs on"
    );
    host.ok(&["cancel", &id], dir.path());
}

/// A stop while the new version is on probation: its run is cancelled
/// (what it held is never committed), and the job stops at the upgrade's
/// savepoint with the previous version's plugins, the upgrade abandoned.
#[test]
fn a_stop_during_probation_ends_the_job_at_the_upgrades_savepoint_with_the_old_version() {
    let dir = plugin_dir();
    let host = fault_host(&dir, &[]);
    let id = running_wordcount(&host, &dir, "stopped-on-probation");
    host.ok(
        &["upgrade", &id, "--plugin", "count=count@0.2.0", "--detach"],
        dir.path(),
    );
    wait_step(&host, &id, "on-probation", Duration::from_secs(60));
    // The new version runs (and holds its commits) for a while.
    host.wait_checkpoints(&id, 2, Duration::from_secs(60));
    let savepoint = host.ok(&["stop", &id], dir.path());
    let job = host.wait_status(&id, "stopped", Duration::from_secs(60));
    let upgrade = last_upgrade(&host, &id);
    assert_eq!(upgrade["outcome"], "abandoned", "{upgrade:#}");
    assert_eq!(
        savepoint.trim(),
        upgrade["savepoint"].as_str().unwrap_or_default(),
        "the job stopped at the upgrade's savepoint"
    );
    let (status, list) = http(
        &host.url,
        "GET",
        "/api/jobs",
        host.token_value().as_deref(),
        &[],
    );
    assert_eq!(status, 200, "{list}");
    let list: Value = serde_json::from_str(&list).expect("JSON");
    let plugins = list
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["id"] == id.as_str()).cloned())
        .map(|j| j["plugins"].to_string())
        .unwrap_or_default();
    assert!(
        plugins.contains("count=count@0.1.0"),
        "the previous version is the job's again: {plugins}"
    );
    assert!(
        statuses(&job).ends_with(&["stopping", "stopped"]),
        "{:?}",
        statuses(&job)
    );
    check_exactly_once(&dir.path().join("out-stopped-on-probation"));
}
