//! A cluster of hosts, its first step (membership): real `weir serve
//! --cluster` processes on the real NATS server the connector tests use
//! (`weir_tests::nats`), each test under its own cluster name. Three hosts
//! see each other and one coordinator; the coordinator SIGKILLed, another
//! takes over once its lease lapses; a restarted host comes back under its
//! id; a stopped host leaves at once; a plugin added on one host is on
//! every host (and refused under a taken name@version as another file);
//! any host lists every job and answers for any of them; a movable job
//! moves off a SIGKILLed, a SIGSTOPped and a SIGTERMed host, the frozen
//! one fenced when it wakes, every count published once;
//! bad settings are refused at start, each naming its cause.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::checkpoints::generator_counts;
use crate::host::{Host, check_exactly_once, http, plugin_dir, wordcount};
use crate::support::{JobDir, weir_env};

fn nats() -> Option<String> {
    weir_tests::nats::server().map(|s| s.url.clone())
}

/// `GET /api/hosts` of `host`.
fn hosts(host: &Host) -> Value {
    let (status, body) = http(&host.url, "GET", "/api/hosts", None, &[]);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("hosts JSON")
}

/// The ids of the members `view` lists.
fn ids(view: &Value) -> Vec<String> {
    view["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| h["id"].as_str().expect("id").to_string())
        .collect()
}

/// Waits until `host` lists `n` members and a coordinator that `accept`s.
fn wait_for(host: &Host, n: usize, limit: Duration, accept: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let view = hosts(host);
        if view["hosts"].as_array().map(Vec::len) == Some(n)
            && !view["coordinator"].is_null()
            && accept(&view["coordinator"])
        {
            return view;
        }
        assert!(
            started.elapsed() < limit,
            "{} did not list {n} hosts and a coordinator in {limit:?}: {view:#}",
            host.url
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// This host's own id, as it lists itself.
fn own_id(host: &Host) -> String {
    let view = hosts(host);
    view["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .find(|h| h["this"] == true)
        .and_then(|h| h["id"].as_str())
        .expect("the host lists itself")
        .to_string()
}

fn member(dir: &Path, i: usize, url: &str, name: &str) -> Host {
    let data = dir.join(format!("data-{i}"));
    Host::start(&data, &["--cluster", url, "--cluster-name", name])
}

#[test]
fn three_hosts_share_one_coordinator_and_fail_over_when_it_dies() {
    let Some(url) = nats() else { return };
    let dir = JobDir::new();
    let name = "members";
    let mut members: Vec<Host> = (0..3).map(|i| member(dir.path(), i, &url, name)).collect();
    let limit = Duration::from_secs(20);
    let view = wait_for(&members[0], 3, limit, |_| true);
    for host in &members[1..] {
        let other = wait_for(host, 3, limit, |_| true);
        assert_eq!(ids(&other), ids(&view), "every host sees the same members");
        assert_eq!(other["coordinator"], view["coordinator"]);
    }
    assert_eq!(view["cluster"], name);
    let coordinator = view["coordinator"]["host"]
        .as_str()
        .expect("coordinator")
        .to_string();
    let term = view["coordinator"]["term"].as_u64().expect("term");
    assert!(ids(&view).contains(&coordinator), "{view:#}");
    for entry in view["hosts"].as_array().expect("hosts") {
        assert_eq!(entry["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(entry["coordinator"], entry["id"] == coordinator.as_str());
    }

    // `weir hosts` on any host prints every member and the coordinator.
    let printed = members[1].ok(&["hosts"], dir.path());
    assert!(
        printed.contains(&format!(
            "cluster {name}: 3 hosts, coordinator {coordinator}"
        )),
        "{printed}"
    );
    for id in ids(&view) {
        assert!(printed.contains(&id), "{printed}");
    }

    // SIGKILL the coordinator: its lease lapses, another host takes over
    // with a higher term, and it drops out of the members.
    let index = members
        .iter()
        .position(|h| own_id(h) == coordinator)
        .expect("the coordinator is one of the three");
    let killed = Instant::now();
    members[index].kill();
    let survivor = &members[(index + 1) % 3];
    let after = wait_for(survivor, 2, Duration::from_secs(30), |c| {
        c["host"] != coordinator.as_str() && c["term"].as_u64().unwrap_or(0) > term
    });
    eprintln!(
        "coordinator {coordinator} SIGKILLed: {} took over in {:?}",
        after["coordinator"]["host"],
        killed.elapsed()
    );
    assert!(!ids(&after).contains(&coordinator), "{after:#}");

    // Restarted on its data dir, it rejoins under its id (after waiting
    // out its previous lease).
    members[index] = member(dir.path(), index, &url, name);
    assert_eq!(own_id(&members[index]), coordinator);
    let rejoined = wait_for(&members[index], 3, limit, |_| true);
    assert_eq!(ids(&rejoined), ids(&view));

    // A host stopped with SIGTERM leaves at once: its entry is deleted as
    // it goes (a delete marker in the bucket), not left to expire.
    let leaving = (index + 2) % 3;
    let left_id = own_id(&members[leaving]);
    members[leaving].terminate();
    let operation = crate::support::runtime().block_on(async {
        let client = async_nats::connect(url.as_str()).await.expect("connect");
        let bucket = async_nats::jetstream::new(client)
            .get_key_value(format!("{name}-members"))
            .await
            .expect("bucket");
        bucket
            .entry(format!("hosts.{left_id}"))
            .await
            .expect("entry")
            .map(|e| e.operation)
    });
    assert_eq!(
        operation,
        Some(async_nats::jetstream::kv::Operation::Delete),
        "a stopped host deletes its entry"
    );
    let remaining = wait_for(&members[index], 2, Duration::from_secs(20), |_| true);
    assert!(!ids(&remaining).contains(&left_id), "{remaining:#}");
}

/// `weir serve` with these arguments and environment must fail; its
/// stderr.
fn refused(dir: &Path, args: &[&str], env: &[(&str, String)]) -> String {
    let mut all = vec!["serve", "--listen", "127.0.0.1:0"];
    all.extend(args);
    let output = weir_env(&all, dir, env);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "weir {all:?} should have failed: {stderr}"
    );
    stderr
}

#[test]
fn bad_cluster_settings_are_refused_at_start_naming_the_cause() {
    let Some(url) = nats() else { return };
    let dir = JobDir::new();
    let data = |i: usize| dir.path().join(format!("data-{i}"));
    let data_arg = |i: usize| data(i).to_string_lossy().into_owned();

    // NATS that does not answer.
    let port = weir_tests::servers::free_port();
    let nowhere = format!("nats://127.0.0.1:{port}");
    let d0 = data_arg(0);
    let stderr = refused(dir.path(), &["--data-dir", &d0, "--cluster", &nowhere], &[]);
    assert!(
        stderr.contains(&format!(
            "cluster `weir`: cannot reach its NATS at {nowhere}"
        )),
        "{stderr}"
    );

    // A name the buckets cannot take.
    let stderr = refused(
        dir.path(),
        &[
            "--data-dir",
            &d0,
            "--cluster",
            &url,
            "--cluster-name",
            "no spaces",
        ],
        &[],
    );
    assert!(
        stderr.contains("\"no spaces\" is not a cluster name"),
        "{stderr}"
    );

    // A member that runs another Weir version (its entry written as an
    // older host would).
    let name = "versions";
    crate::support::runtime().block_on(async {
        let client = async_nats::connect(url.as_str()).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let members = js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: format!("{name}-members"),
                history: 1,
                max_age: Duration::from_secs(60),
                storage: async_nats::jetstream::stream::StorageType::Memory,
                ..Default::default()
            })
            .await
            .expect("bucket");
        let old = serde_json::json!({
            "id": "old-host", "api": "http://127.0.0.1:1", "version": "0.0.1",
            "instance": "abc", "started_ms": 0, "renewed_ms": 0, "jobs": 0, "running": 0
        });
        members
            .put("hosts.old-host", old.to_string().into())
            .await
            .expect("put");
    });
    let stderr = refused(
        dir.path(),
        &["--data-dir", &d0, "--cluster", &url, "--cluster-name", name],
        &[],
    );
    assert!(
        stderr.contains(&format!(
            "cluster `{name}`: host `old-host` runs weir 0.0.1, this host weir {}",
            env!("CARGO_PKG_VERSION")
        )),
        "{stderr}"
    );

    // Two clusters under one name: the first host's config names one
    // storage, the second's another.
    let config = |i: usize, s3: &str| {
        let file = dir.path().join(format!("host-{i}.toml"));
        std::fs::write(
            &file,
            format!("[cluster]\nnats = [\"{url}\"]\nname = \"shared\"\ns3 = \"{s3}\"\n"),
        )
        .expect("config");
        file.to_string_lossy().into_owned()
    };
    let Some(s3) = crate::s3::server() else {
        return;
    };
    let env: Vec<(&str, String)> = s3.env();
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let first = config(1, &format!("s3://{}/shared", crate::s3::BUCKET));
    let mut host = Host::start_env(&data(1), &["--config", &first], &env_ref);
    assert_eq!(hosts(&host)["cluster"], "shared");
    let second = config(2, &format!("s3://{}/other", crate::s3::BUCKET));
    let d2 = data_arg(2);
    let stderr = refused(dir.path(), &["--data-dir", &d2, "--config", &second], &env);
    assert!(
        stderr.contains(&format!(
            "cluster `shared` keeps its checkpoints and savepoints on s3://{}/shared, this host's config says s3://{}/other",
            crate::s3::BUCKET,
            crate::s3::BUCKET
        )),
        "{stderr}"
    );
    host.terminate();

    // Storage whose bucket does not exist.
    let missing = dir.path().join("missing.toml");
    std::fs::write(
        &missing,
        format!(
            "[cluster]\nnats = [\"{url}\"]\nname = \"nobucket\"\ns3 = \"s3://no-such-bucket/x\"\n"
        ),
    )
    .expect("config");
    let d3 = data_arg(3);
    let missing = missing.to_string_lossy().into_owned();
    let stderr = refused(dir.path(), &["--data-dir", &d3, "--config", &missing], &env);
    assert!(
        stderr.contains("cluster `nobucket`: its storage s3://no-such-bucket/x")
            && stderr.contains("the bucket does not exist"),
        "{stderr}"
    );
}

/// The `name@version`s of `host`'s plugin store.
fn plugins(host: &Host) -> Vec<String> {
    let (status, body) = http(&host.url, "GET", "/api/plugins", None, &[]);
    assert_eq!(status, 200, "{body}");
    let list: Value = serde_json::from_str(&body).expect("plugins JSON");
    let mut refs: Vec<String> = list
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| {
            format!(
                "{}@{}",
                p["name"].as_str().unwrap_or(""),
                p["version"].as_str().unwrap_or("")
            )
        })
        .collect();
    refs.sort();
    refs
}

/// Waits until `host`'s store holds exactly `expected`.
fn wait_plugins(host: &Host, expected: &[&str], limit: Duration) {
    let started = Instant::now();
    loop {
        let now = plugins(host);
        if now == expected {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{}: plugins {now:?}, not {expected:?} within {limit:?}",
            host.url
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_plugin_added_on_one_host_is_on_every_host() {
    let Some(url) = nats() else { return };
    let dir = plugin_dir();
    let name = "plugins";
    let a = member(dir.path(), 0, &url, name);
    let b = member(dir.path(), 1, &url, name);
    a.ok(&["plugin", "add", "split.wasm", "count.wasm"], dir.path());
    let both = ["count@0.1.0", "split@0.1.0"];
    wait_plugins(&b, &both, Duration::from_secs(20));

    // A job on the other host runs with them, exactly once.
    let records = 3000;
    dir.write(
        "job.toml",
        wordcount(
            "shared",
            Some(records),
            20_000,
            "split@0.1.0",
            "count@0.1.0",
            "200ms",
        ),
    );
    let id = b.ok(&["run", "job.toml"], dir.path()).trim().to_string();
    b.wait_status(&id, "finished", Duration::from_secs(90));
    let mut expected = BTreeMap::new();
    generator_counts(records, 30, 7, &mut expected);
    assert_eq!(check_exactly_once(&dir.path().join("out-shared")), expected);

    // Another file under a name@version the cluster has is refused, and
    // not kept.
    let mut other = std::fs::read(weir_tests::plugins::WORDCOUNT_COUNT).expect("plugin");
    // A custom section at the end: the same plugin, another file.
    other.extend_from_slice(&[0x00, 0x05, 0x04, b'w', b'e', b'i', b'r']);
    let (status, body) = http(
        &b.url,
        "POST",
        "/api/plugins?file=other-count.wasm",
        None,
        &other,
    );
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains(
            "other-count.wasm: plugin count@0.1.0 is already in the store as another file"
        ),
        "{body}"
    );
    assert_eq!(plugins(&b), both);

    // A host whose own store has that other file cannot join: the hosts
    // would run different code under one name.
    let alone_data = dir.path().join("alone");
    let mut alone = Host::start(&alone_data, &[]);
    std::fs::write(dir.path().join("other-count.wasm"), &other).expect("write");
    alone.ok(&["plugin", "add", "other-count.wasm"], dir.path());
    alone.terminate();
    let alone_arg = alone_data.to_string_lossy().into_owned();
    let stderr = refused(
        dir.path(),
        &[
            "--data-dir",
            &alone_arg,
            "--cluster",
            &url,
            "--cluster-name",
            name,
        ],
        &[],
    );
    let a_id = own_id(&a);
    assert!(
        stderr.contains(&format!(
            "cluster `{name}` has plugin count@0.1.0 as sha256"
        )) && stderr.contains(&format!(
            "(added by host `{a_id}`), this host's store as sha256"
        )),
        "{stderr}"
    );

    // A host that joins later takes in every plugin; one removed on a
    // host is removed on every host.
    let c = member(dir.path(), 2, &url, name);
    wait_plugins(&c, &both, Duration::from_secs(20));
    a.ok(&["plugin", "remove", "split@0.1.0"], dir.path());
    for host in [&a, &b, &c] {
        wait_plugins(host, &["count@0.1.0"], Duration::from_secs(20));
    }
}

#[test]
fn any_host_lists_every_job_and_answers_for_it() {
    let Some(url) = nats() else { return };
    let dir = plugin_dir();
    let name = "jobs";
    let a = member(dir.path(), 0, &url, name);
    let b = member(dir.path(), 1, &url, name);
    let a_id = own_id(&a);
    a.ok(&["plugin", "add", "split.wasm", "count.wasm"], dir.path());
    dir.write(
        "job.toml",
        wordcount("remote", None, 2_000, "split@0.1.0", "count@0.1.0", "200ms"),
    );
    let id = a.ok(&["run", "job.toml"], dir.path()).trim().to_string();
    a.wait_status(&id, "running", Duration::from_secs(60));

    // The other host lists it, naming the host that runs it.
    let started = Instant::now();
    loop {
        let listed = b.ok(&["list"], dir.path());
        if listed.contains(&id) {
            assert!(listed.contains(&format!("on {a_id}")), "{listed}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "b never listed {id}: {listed}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // It answers for it: the job's detail, a savepoint, a stop.
    let detail = b.job(&id);
    assert_eq!(detail["job"]["id"], id.as_str(), "{detail:#}");
    b.wait_checkpoints(&id, 2, Duration::from_secs(60));
    let savepoint = b.ok(&["savepoint", &id], dir.path());
    assert!(savepoint.contains("savepoint-"), "{savepoint}");
    b.ok(&["stop", &id], dir.path());
    a.wait_status(&id, "stopped", Duration::from_secs(60));
    assert_eq!(b.job(&id)["job"]["lifecycle"]["status"], "stopped");
    // A job no host has is still a 404.
    let (status, body) = http(&b.url, "GET", "/api/jobs/nosuchjob", None, &[]);
    assert_eq!(status, 404, "{body}");

    // Its host gone, the job is listed as on a host that is not live, and
    // a request about it says which host does not answer.
    let mut a = a;
    a.kill();
    let started = Instant::now();
    while hosts(&b)["hosts"].as_array().map(Vec::len) != Some(1) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a never dropped out"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Each listing reads the members again: the lease lapses there on the
    // bucket's clock, a moment after the count above may have seen it.
    let started = Instant::now();
    loop {
        let listed = b.ok(&["list"], dir.path());
        if listed.contains(&format!("on {a_id} (not live)")) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{listed}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = http(&b.url, "GET", &format!("/api/jobs/{id}"), None, &[]);
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!(
            "job {id} runs on host `{a_id}` at {}, which does not answer",
            a.url
        )),
        "{body}"
    );
}

/// Where the cluster says job `id` runs, and its status, as `host` lists it.
fn placement(host: &Host, id: &str) -> Option<(String, String, bool)> {
    placement_answer(host, id).1
}

/// [`placement`], with the status `GET /api/jobs` answered.
fn placement_answer(host: &Host, id: &str) -> (u16, Option<(String, String, bool)>) {
    let (status, body) = http(&host.url, "GET", "/api/jobs", None, &[]);
    if status != 200 {
        return (status, None);
    }
    (status, listed_in(&body, id))
}

fn listed_in(body: &str, id: &str) -> Option<(String, String, bool)> {
    let list: Value = serde_json::from_str(body).ok()?;
    list.as_array()?.iter().find(|j| j["id"] == id).map(|j| {
        (
            j["host"].as_str().unwrap_or_default().to_string(),
            j["status"].as_str().unwrap_or_default().to_string(),
            j["host_live"].as_bool().unwrap_or(false),
        )
    })
}

/// Waits until `host` lists job `id` running on a live host other than
/// `not`; returns that host's id.
fn wait_moved(host: &Host, id: &str, not: &str, limit: Duration) -> String {
    let started = Instant::now();
    loop {
        if let Some((owner, status, live)) = placement(host, id)
            && owner != not
            && live
            && status == "running"
        {
            return owner;
        }
        assert!(
            started.elapsed() < limit,
            "job {id} did not move off {not} in {limit:?}: {:?}",
            placement(host, id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `n` generated lines (seed `seed`) in the input stream of cluster test
/// `name`'s word count (`crate::nats::count_job`); the counts they make.
fn count_input(url: &str, name: &str, n: u64, seed: u64) -> BTreeMap<String, u64> {
    let lines = crate::nats::input_lines(n, seed);
    crate::nats::prepare_streams(url, name, &lines);
    weir_tests::count_words(&lines.join("\n"))
}

/// Waits until `hosts[via]` says job `id` finished, checks that cluster
/// test `name`'s output stream holds every count of `expected` once, and
/// stops the hosts.
fn finishes_exactly_once(
    hosts: &mut [Host],
    via: usize,
    id: &str,
    url: &str,
    name: &str,
    expected: &BTreeMap<String, u64>,
) {
    hosts[via].wait_status(id, "finished", Duration::from_secs(120));
    if let Err(error) = weir_tests::check_exact_updates(&crate::nats::output(url, name), expected) {
        // Kept for the post-mortem: which task and checkpoint published
        // each update.
        let dump =
            std::env::temp_dir().join(format!("weir-{name}-output-{}.tsv", std::process::id()));
        let lines = crate::nats::output_with_ids(url, name);
        let _ = std::fs::write(&dump, lines.join("\n"));
        panic!(
            "{error}; the output stream, with message ids: {}",
            dump.display()
        );
    }
    for host in hosts {
        host.terminate();
    }
}

/// Three hosts of cluster `name` with storage on the test S3 (its own
/// prefix), each with its data dir in `dir`, and what restarts one.
struct Movable {
    url: String,
    prefix: String,
    config: String,
    env: Vec<(&'static str, String)>,
}

impl Movable {
    /// On the test NATS server.
    fn new(dir: &Path, name: &str) -> Option<Movable> {
        Self::on(dir, name, &[nats()?], 1)
    }

    /// On the NATS servers `urls`, its buckets keeping `replicas` copies.
    fn on(dir: &Path, name: &str, urls: &[String], replicas: usize) -> Option<Movable> {
        let s3 = crate::s3::server()?;
        let prefix = crate::s3::prefix(&format!("cluster-{name}"));
        let config = dir.join(format!("{name}.toml"));
        let servers = urls
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &config,
            format!(
                "[cluster]\nnats = [{servers}]\nname = \"{name}\"\ns3 = \"s3://{}/{prefix}\"\nreplicas = {replicas}\n",
                crate::s3::BUCKET
            ),
        )
        .expect("config");
        Some(Movable {
            url: urls.join(","),
            prefix,
            config: config.to_string_lossy().into_owned(),
            env: s3.env(),
        })
    }

    /// Starts hosts 0..n and waits until host 0 lists them all and a
    /// coordinator; their ids.
    fn hosts(&self, dir: &Path, n: usize) -> (Vec<Host>, Vec<String>) {
        let hosts: Vec<Host> = (0..n).map(|i| self.host(dir, i)).collect();
        let ids = hosts.iter().map(own_id).collect();
        wait_for(&hosts[0], n, Duration::from_secs(30), |_| true);
        (hosts, ids)
    }

    /// Starts (or restarts: the same data dir, the same id) host `i`.
    fn host(&self, dir: &Path, i: usize) -> Host {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Host::start_env(
            &dir.join(format!("data-{i}")),
            &["--config", &self.config],
            &env,
        )
    }
}

#[test]
fn a_dead_or_frozen_host_loses_its_jobs_to_the_others_exactly_once() {
    let dir = plugin_dir();
    let name = "failover";
    let Some(cluster) = Movable::new(dir.path(), name) else {
        return;
    };
    let (url, prefix) = (cluster.url.clone(), cluster.prefix.clone());
    let (mut hosts, ids) = cluster.hosts(dir.path(), 3);

    // JetStream in → split → count → JetStream out, two source subtasks at
    // 800 lines/s each: about 40 s of input.
    let expected = count_input(&url, name, 64_000, 11);
    dir.write(
        "job.toml",
        crate::nats::count_job(&url, name, 2, 800, "checkpoints"),
    );
    let job = hosts[0]
        .ok(&["run", "job.toml"], dir.path())
        .trim()
        .to_string();
    // The stage that counts (a movable job of its own) is the one followed
    // from host to host; the others move as their hosts fail too.
    let at = |owner: &str| ids.iter().position(|i| i == owner).expect("a member");
    let placed = placed_stages(&hosts[0], &job, Duration::from_secs(60));
    let (_, id, first) = placed
        .into_iter()
        .find(|s| s.0 == "count")
        .expect("a count stage");
    let first = at(&first);
    hosts[first].wait_status(&id, "running", Duration::from_secs(60));
    hosts[first].wait_checkpoints(&id, 3, Duration::from_secs(60));

    // Its host SIGKILLed: a survivor restores it from the cluster's
    // storage and runs it on, within seconds.
    hosts[first].kill();
    let killed = Instant::now();
    let second = wait_moved(
        &hosts[(first + 1) % 3],
        &id,
        &ids[first],
        Duration::from_secs(30),
    );
    let failover = killed.elapsed();
    eprintln!("failover after SIGKILL: {failover:?} (to {second})");
    let owner = &hosts[at(&second)];
    owner.wait_checkpoints(&id, 2, Duration::from_secs(60));
    let restored = owner.job(&id);
    assert!(
        restored["job"]["runs"][0]["restored_from"]
            .as_str()
            .is_some_and(
                |r| r.starts_with(&format!("s3://{}/{prefix}/jobs/{id}/", crate::s3::BUCKET))
            ),
        "the new owner restored the checkpoint the old one committed: {restored:#}"
    );

    // Its new host frozen (SIGSTOP) until the job moved to the third; when
    // it wakes, its commits are fenced and it lets the job go.
    let frozen = at(&second);
    let third = 3 - frozen - first; // the one host neither killed nor frozen
    hosts[frozen].signal("STOP");
    let stopped = Instant::now();
    let moved = wait_moved(&hosts[third], &id, &second, Duration::from_secs(30));
    eprintln!(
        "failover after SIGSTOP: {:?} (to {moved})",
        stopped.elapsed()
    );
    assert_eq!(moved, ids[third]);
    hosts[third].wait_checkpoints(&id, 1, Duration::from_secs(60));
    hosts[frozen].signal("CONT");
    // The woken host releases the job: it lists it on its new owner.
    let started = Instant::now();
    let mut answered = BTreeMap::<u16, u32>::new();
    loop {
        let (status, listed) = placement_answer(&hosts[frozen], &id);
        *answered.entry(status).or_default() += 1;
        if listed
            .as_ref()
            .is_some_and(|(owner, _, _)| *owner == ids[third])
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{}", {
            // What each host's job list says of the job (an error, or
            // the job not in it), and what the woken host answers for it.
            let views: Vec<String> = [frozen, third]
                .iter()
                .map(|&h| {
                    let (status, body) = http(&hosts[h].url, "GET", "/api/jobs", None, &[]);
                    let entry = serde_json::from_str::<Value>(&body)
                        .ok()
                        .and_then(|list| list.as_array()?.iter().find(|j| j["id"] == id).cloned());
                    format!("host {h} ({}): GET /api/jobs {status}: {entry:?}", ids[h])
                })
                .collect();
            let (status, body) = http(
                &hosts[frozen].url,
                "GET",
                &format!("/api/jobs/{id}"),
                None,
                &[],
            );
            format!(
                "the woken host kept the job: {listed:?} (its answers to GET /api/jobs meanwhile, by status: {answered:?}); {}; the woken host's GET /api/jobs/{id}: {status} {}",
                views.join("; "),
                body.chars().take(400).collect::<String>()
            )
        });
        std::thread::sleep(Duration::from_millis(100));
    }

    // Its savepoints go where any host can read them.
    let local = hosts[third].weir(&["savepoint", &id, "here"], dir.path());
    assert!(!local.status.success());
    assert!(
        crate::host::stderr(&local).contains(&format!(
            "/here: job {id} can move between the cluster's hosts, and the host that resumes it must read its savepoints: give an s3:// target_dir, or none for s3://{}/{prefix}/jobs/{id}/savepoints",
            crate::s3::BUCKET
        )),
        "{}",
        crate::host::stderr(&local)
    );

    // Its host stopped with SIGTERM: it stops the job with a savepoint and
    // leaves; the one host left resumes the job from that savepoint.
    assert_eq!(
        placement(&hosts[third], &id).map(|p| p.1).as_deref(),
        Some("running"),
        "the input lasts longer than this test's faults"
    );
    hosts[third].terminate();
    let last = wait_moved(&hosts[frozen], &id, &ids[third], Duration::from_secs(30));
    assert_eq!(last, ids[frozen]);
    let resumed = hosts[frozen].job(&id);
    let runs = resumed["job"]["runs"].as_array().expect("runs");
    assert!(
        runs.last()
            .and_then(|r| r["restored_from"].as_str())
            .is_some_and(|r| r.starts_with(&format!(
                "s3://{}/{prefix}/jobs/{id}/savepoints/savepoint-",
                crate::s3::BUCKET
            ))),
        "resumed from the savepoint of the host's shutdown: {resumed:#}"
    );

    // The job finishes there; every count was published once.
    finishes_exactly_once(&mut hosts, frozen, &job, &url, name, &expected);
}

#[test]
fn hosts_killed_and_restarted_at_random_lose_and_repeat_nothing() {
    let dir = plugin_dir();
    let name = "chaos";
    let Some(cluster) = Movable::new(dir.path(), name) else {
        return;
    };
    let url = cluster.url.clone();
    let (mut hosts, ids) = cluster.hosts(dir.path(), 3);
    // Two source subtasks at 800 lines/s each: about 45 s of input.
    let expected = count_input(&url, name, 72_000, 5);
    dir.write(
        "job.toml",
        crate::nats::count_job(&url, name, 2, 800, "checkpoints"),
    );
    let id = hosts[0]
        .ok(&["run", "job.toml"], dir.path())
        .trim()
        .to_string();
    hosts[0].wait_checkpoints(&id, 2, Duration::from_secs(60));
    let seed = crate::support::seed("WEIR_CHAOS_SEED", "cluster chaos");
    let random = |i: u64| xxhash_rust::xxh3::xxh3_64_with_seed(&i.to_le_bytes(), seed);
    // Ten times: SIGKILL a host (the owner of one of the job's stages, as
    // the cluster lists it, in seven rounds of ten; any host in the
    // others), leave it dead 0.3–2.3 s, restart it under the same id.
    let mut owners_killed = 0;
    for round in 0..10u64 {
        let live = (0..3)
            .find(|i| hosts[*i].is_running())
            .expect("a live host");
        // The owner of one of the job's stages, picked at random.
        let stages = stages(&hosts[live], &id);
        let owner = stages
            .get((random(1_000 + round) % stages.len().max(1) as u64) as usize)
            .and_then(|s| placement(&hosts[live], &s.1))
            .map(|p| p.0);
        let victim = match owner.as_ref().and_then(|o| ids.iter().position(|i| i == o)) {
            Some(owner) if round % 3 != 2 => {
                owners_killed += 1;
                owner
            }
            _ => (random(round * 3 + 1) % 3) as usize,
        };
        hosts[victim].kill();
        std::thread::sleep(Duration::from_millis(300 + random(round * 3 + 2) % 2000));
        hosts[victim] = cluster.host(dir.path(), victim);
        eprintln!(
            "round {round}: killed and restarted {} (owner: {owner:?})",
            ids[victim]
        );
    }
    assert!(
        owners_killed >= 3,
        "the owner was killed {owners_killed} times"
    );
    // The job finishes wherever it runs; every count published once.
    let started = Instant::now();
    loop {
        let status = placement(&hosts[0], &id).map(|p| p.1);
        if status.as_deref() == Some("finished") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "job {id} did not finish: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    weir_tests::check_exact_updates(&crate::nats::output(&url, name), &expected)
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    for host in &mut hosts {
        host.terminate();
    }
}

/// The stages of staged job `id` as `host` details them: (name, job, host).
fn stages(host: &Host, id: &str) -> Vec<(String, String, Option<String>)> {
    host.job(id)["stages"]
        .as_array()
        .map(|stages| {
            stages
                .iter()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap_or_default().to_string(),
                        s["job"].as_str().unwrap_or_default().to_string(),
                        s["host"].as_str().map(str::to_string),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until every stage of staged job `id` is listed on a host, and
/// answers them.
fn placed_stages(host: &Host, id: &str, limit: Duration) -> Vec<(String, String, String)> {
    let started = Instant::now();
    loop {
        let found = stages(host, id);
        if !found.is_empty() && found.iter().all(|s| s.2.is_some()) {
            return found
                .into_iter()
                .map(|(name, job, host)| (name, job, host.expect("placed")))
                .collect();
        }
        assert!(
            started.elapsed() < limit,
            "job {id}: its stages were not all placed in {limit:?}: {found:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_keyed_job_runs_as_stages_on_different_hosts_and_a_stage_fails_over_alone() {
    let dir = plugin_dir();
    let name = "staged";
    let Some(cluster) = Movable::new(dir.path(), name) else {
        return;
    };
    let url = cluster.url.clone();
    let (mut hosts, ids) = cluster.hosts(dir.path(), 3);
    // JetStream in → split → (by key) count → JetStream out: about 30 s of
    // input at 2 × 800 lines/s.
    let expected = count_input(&url, name, 48_000, 23);
    dir.write(
        "job.toml",
        crate::nats::count_job(&url, name, 2, 800, "checkpoints"),
    );
    let id = hosts[0]
        .ok(&["run", "job.toml"], dir.path())
        .trim()
        .to_string();

    // Cut at the keyed edge (split → count) and the rebalance edge into
    // the sink of parallelism 1 (count → out): three stages, of 2, 2 and 1
    // tasks (one per subtask), spread over the three hosts.
    let placed = placed_stages(&hosts[1], &id, Duration::from_secs(60));
    let names: Vec<&str> = placed.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(
        names,
        ["lines", "lines", "count", "count", "out"],
        "{placed:?}"
    );
    let at = |owner: &str| ids.iter().position(|i| i == owner).expect("a member");
    let mut on: Vec<usize> = placed.iter().map(|s| at(&s.2)).collect();
    on.sort();
    on.dedup();
    assert_eq!(on, [0, 1, 2], "tasks on every host: {placed:?}");
    assert_ne!(
        placed[2].2, placed[3].2,
        "the count stage's two tasks on two hosts: {placed:?}"
    );
    let counting = placed[2].clone();
    let upstream = placed[..2]
        .iter()
        .find(|s| s.2 != counting.2)
        .expect("a lines task on another host than the count task")
        .clone();
    hosts[2].wait_status(&id, "running", Duration::from_secs(60));
    hosts[at(&counting.2)].wait_checkpoints(&counting.1, 3, Duration::from_secs(60));
    let listed = hosts[2].ok(&["list"], dir.path());
    let jobs: Vec<&str> = placed.iter().map(|s| s.1.as_str()).collect();
    assert!(
        listed.contains(&format!("as stages {}", jobs.join(" "))),
        "{listed}"
    );
    let shown = hosts[2].ok(&["job", &id], dir.path());
    assert!(
        shown.contains(&format!("stage count        task 0/2  job {}", counting.1)),
        "{shown}"
    );

    // The host of a count task SIGKILLed: the tasks it ran move alone,
    // each restoring its own checkpoint; a lines task elsewhere runs on
    // where it ran, never restarted.
    let upstream_runs = |hosts: &[Host]| {
        hosts[at(&upstream.2)].job(&upstream.1)["job"]["runs"]
            .as_array()
            .map(Vec::len)
    };
    let runs_before = upstream_runs(&hosts);
    let victim = at(&counting.2);
    hosts[victim].kill();
    let killed = Instant::now();
    let survivor = at(&upstream.2);
    let moved = wait_moved(
        &hosts[survivor],
        &counting.1,
        &counting.2,
        Duration::from_secs(30),
    );
    eprintln!(
        "stage failover after SIGKILL: {:?} (to {moved})",
        killed.elapsed()
    );
    let owner = &hosts[at(&moved)];
    owner.wait_checkpoints(&counting.1, 2, Duration::from_secs(60));
    let restored = owner.job(&counting.1);
    assert!(
        restored["job"]["runs"][0]["restored_from"]
            .as_str()
            .is_some(),
        "the stage restored its own checkpoint: {restored:#}"
    );
    assert_eq!(
        upstream_runs(&hosts),
        runs_before,
        "the upstream stage ran on untouched"
    );

    // The job finishes; every count was published once.
    finishes_exactly_once(&mut hosts, survivor, &id, &url, name, &expected);
}

/// Three hosts of cluster test `name`, plugin file `plugin` (if any)
/// added on one and seen on every host, and the word count submitted to
/// host 0, cut into stages (about 40 s of input at 2 × 800 lines/s, seed
/// `seed`).
struct StagedCount {
    hosts: Vec<Host>,
    ids: Vec<String>,
    url: String,
    expected: BTreeMap<String, u64>,
    id: String,
    placed: Vec<(String, String, String)>,
}

impl StagedCount {
    fn start(dir: &JobDir, name: &str, plugin: Option<&str>, seed: u64) -> Option<StagedCount> {
        let cluster = Movable::new(dir.path(), name)?;
        let url = cluster.url.clone();
        let (hosts, ids) = cluster.hosts(dir.path(), 3);
        if let Some(plugin) = plugin {
            hosts[0].ok(&["plugin", "add", plugin], dir.path());
            let everywhere = plugins(&hosts[0]);
            let everywhere: Vec<&str> = everywhere.iter().map(String::as_str).collect();
            for host in &hosts[1..] {
                wait_plugins(host, &everywhere, Duration::from_secs(30));
            }
        }
        let expected = count_input(&url, name, 64_000, seed);
        dir.write(
            "job.toml",
            crate::nats::count_job(&url, name, 2, 800, "checkpoints"),
        );
        let id = hosts[0]
            .ok(&["run", "job.toml"], dir.path())
            .trim()
            .to_string();
        let placed = placed_stages(&hosts[0], &id, Duration::from_secs(60));
        Some(StagedCount {
            hosts,
            ids,
            url,
            expected,
            id,
            placed,
        })
    }
}

#[test]
fn one_stage_is_rescaled_and_upgraded_with_a_rollback_while_the_others_run_on() {
    let dir = plugin_dir();
    // The version that traps on its 1000th record, on every host first.
    let Some(StagedCount {
        mut hosts,
        ids,
        url,
        expected,
        id,
        placed,
    }) = StagedCount::start(&dir, "staged-upgrade", Some("count-v2-trap.wasm"), 29)
    else {
        return;
    };
    let name = "staged-upgrade";
    let at = |owner: &str| ids.iter().position(|i| i == owner).expect("a member");
    let stage = |name: &str| {
        placed
            .iter()
            .find(|s| s.0 == name)
            .expect("a stage")
            .clone()
    };
    let (lines_stage, count_stage, out_stage) = (stage("lines"), stage("count"), stage("out"));
    hosts[0].wait_status(&id, "running", Duration::from_secs(60));
    hosts[at(&count_stage.2)].wait_checkpoints(&count_stage.1, 2, Duration::from_secs(60));
    let runs = |(_, job, host): &(String, String, String)| {
        hosts[at(host)].job(job)["job"]["runs"]
            .as_array()
            .map(Vec::len)
    };
    let untouched = [runs(&lines_stage), runs(&out_stage)];

    // Rescale 2 → 3: only the count stage's two tasks stop, and three new
    // ones restore their key groups from the savepoints merged; the
    // upstream and downstream stages run on.
    let rescaled = hosts[1].weir(&["rescale", &id, "--parallelism", "count=3"], dir.path());
    let said = crate::host::stderr(&rescaled);
    assert!(rescaled.status.success(), "{said}");
    assert!(said.contains("count: rescaled from 2 to 3 tasks"), "{said}");
    let now = placed_stages(&hosts[1], &id, Duration::from_secs(60));
    let counts: Vec<_> = now.iter().filter(|s| s.0 == "count").cloned().collect();
    assert_eq!(counts.len(), 3, "{now:?}");
    assert!(!counts.iter().any(|c| c.1 == count_stage.1), "{now:?}");
    for (_, job, host) in &counts {
        let detail = hosts[at(host)].job(job);
        for op in detail["operators"].as_array().expect("operators") {
            assert_eq!(op["parallelism"], 3, "{op:#}");
        }
        assert!(
            detail["job"]["runs"][0]["restored_from"]
                .as_str()
                .is_some_and(|r| r.contains("/savepoints/rescale-")),
            "{detail:#}"
        );
    }
    assert_eq!([runs(&lines_stage), runs(&out_stage)], untouched);

    // An upgrade whose new version traps in its probation: each count task
    // is rolled back, alone.
    let (_, first_count, owner) = counts[0].clone();
    hosts[at(&owner)].wait_checkpoints(&first_count, 1, Duration::from_secs(60));
    let rolled = hosts[2].weir(
        &[
            "upgrade",
            &id,
            "--plugin",
            "count=count-v2-trap.wasm",
            "--probation",
            "60s",
            "--probation-checkpoints",
            "30",
        ],
        dir.path(),
    );
    let said = crate::host::stderr(&rolled);
    assert!(!rolled.status.success(), "{said}");
    assert!(
        said.contains("stage count task ") && said.contains("rolled back"),
        "{said}"
    );
    assert_eq!([runs(&lines_stage), runs(&out_stage)], untouched);
    // The job runs on (each rolled-back task settling back to running).
    hosts[0].wait_status(&id, "running", Duration::from_secs(30));

    // It finishes with every count once.
    finishes_exactly_once(&mut hosts, 0, &id, &url, name, &expected);
}

#[test]
fn a_rescale_whose_host_died_is_carried_on_by_the_coordinator() {
    let dir = plugin_dir();
    let name = "rescale-orphaned";
    let Some(StagedCount {
        mut hosts,
        ids,
        url,
        expected,
        id,
        placed,
    }) = StagedCount::start(&dir, name, None, 37)
    else {
        return;
    };
    let at = |owner: &str| ids.iter().position(|i| i == owner).expect("a member");
    let counting: Vec<usize> = placed
        .iter()
        .filter(|s| s.0 == "count")
        .map(|s| at(&s.2))
        .collect();
    // The host asked runs no count task: its death leaves the stage's
    // tasks to stop as asked.
    let asker = (0..3)
        .find(|i| !counting.contains(i))
        .unwrap_or_else(|| panic!("the count tasks share a host: {placed:?}"));
    let survivor = (asker + 1) % 3;
    hosts[survivor].wait_status(&id, "running", Duration::from_secs(60));
    for (_, job, host) in placed.iter().filter(|s| s.0 == "count") {
        hosts[at(host)].wait_checkpoints(job, 2, Duration::from_secs(60));
    }
    let operation = hosts[asker]
        .ok(
            &["rescale", &id, "--parallelism", "count=3", "--detach"],
            dir.path(),
        )
        .trim()
        .to_string();
    hosts[asker].kill();
    let killed = Instant::now();
    // No one asks about the operation (a look at it, or at the job, would
    // carry it on as well): the cluster's coordinator does. The job list
    // shows the new tasks as their hosts run them.
    let prefix = format!("{id}-");
    let new_task = format!("-{operation}-");
    loop {
        let (status, body) = http(&hosts[survivor].url, "GET", "/api/jobs", None, &[]);
        let running = match status {
            200 => serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|list| list.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter(|j| {
                    j["id"]
                        .as_str()
                        .is_some_and(|job| job.starts_with(&prefix) && job.contains(&new_task))
                        && j["status"] == "running"
                })
                .count(),
            _ => 0,
        };
        if running == 3 {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(90),
            "the rescale was not carried on: {running} new tasks run; {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "rescale carried on by the coordinator: {:?} after its host died",
        killed.elapsed()
    );
    // The operation ends as they run (the next look at it sees them).
    let started = Instant::now();
    let answer = loop {
        let (status, body) = http(
            &hosts[survivor].url,
            "GET",
            &format!("/api/jobs/{id}/operations/{operation}"),
            None,
            &[],
        );
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).expect("an operation");
        if answer["status"] != "running" || started.elapsed() > Duration::from_secs(30) {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(answer["status"], "succeeded", "{answer:#}");

    // It finishes with every count once.
    finishes_exactly_once(&mut hosts, survivor, &id, &url, name, &expected);
}

/// The step task job `job` of a staged job's upgrade is at on its host
/// (none once it ended, or before it began).
fn upgrade_step(host: &Host, job: &str) -> Option<String> {
    let detail = host.job(job);
    let upgrades = detail["job"]["upgrades"].as_array()?;
    upgrades.last()?["step"].as_str().map(str::to_string)
}

/// The plugin operator `uid` of job `job` runs on `host`.
fn plugin_of(host: &Host, job: &str, uid: &str) -> String {
    host.job(job)["operators"]
        .as_array()
        .and_then(|ops| ops.iter().find(|o| o["uid"] == uid).cloned())
        .and_then(|op| op["plugin"]["plugin"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn a_task_moved_while_its_upgrade_is_on_probation_resumes_the_previous_version_exactly_once() {
    let dir = plugin_dir();
    let name = "probation-move";
    let Some(StagedCount {
        mut hosts,
        ids,
        url,
        expected,
        id,
        placed: _,
    }) = StagedCount::start(&dir, name, Some("count-v2.wasm"), 31)
    else {
        return;
    };
    let at = |owner: &str| ids.iter().position(|i| i == owner).expect("a member");
    hosts[0].wait_status(&id, "running", Duration::from_secs(60));

    let asker = std::thread::scope(|scope| {
        // Asked again if the stage rolled back before the chosen task's
        // probation because another task moved (under load a host's lease
        // may lapse on its own).
        let mut attempt = 0;
        let (task, owner, victim, asker, upgrade) = loop {
            attempt += 1;
            let placed = placed_stages(&hosts[0], &id, Duration::from_secs(60));
            let (_, task, owner) = placed
                .iter()
                .find(|s| s.0 == "count")
                .expect("a count task")
                .clone();
            let victim = at(&owner);
            // The upgrade is asked of, and followed through, another host.
            let asker = (victim + 1) % 3;
            hosts[victim].wait_checkpoints(&task, 2, Duration::from_secs(60));
            // A probation longer than the host's freeze: the new version's
            // commits are held all along.
            let (all, job, dir) = (&hosts, &id, &dir);
            let upgrade = scope.spawn(move || {
                all[asker].weir(
                    &[
                        "upgrade",
                        job,
                        "--plugin",
                        "count=count@0.2.0",
                        "--probation",
                        "25s",
                        "--probation-checkpoints",
                        "100000",
                    ],
                    dir.path(),
                )
            });
            let started = Instant::now();
            while !upgrade.is_finished()
                && upgrade_step(&hosts[victim], &task).as_deref() != Some("on-probation")
            {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "task {task} never reached its probation: {:?}",
                    hosts[victim].job(&task)["job"]["upgrades"]
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            if !upgrade.is_finished() {
                break (task, owner, victim, asker, upgrade);
            }
            let early = upgrade.join().expect("the upgrade's CLI");
            let said = crate::host::stderr(&early);
            assert!(
                attempt < 3 && said.contains("task moved to it during the operation"),
                "task {task} never reached its probation: {said}"
            );
            hosts[0].wait_status(&id, "running", Duration::from_secs(60));
        };
        assert_eq!(plugin_of(&hosts[victim], &task, "count"), "count@0.2.0");
        // Its host frozen until the task moved, then woken: fenced.
        hosts[victim].signal("STOP");
        let moved = wait_moved(&hosts[asker], &task, &owner, Duration::from_secs(30));
        hosts[victim].signal("CONT");
        let taker = &hosts[at(&moved)];
        // It resumed as the previous version, from the upgrade's savepoint
        // on the cluster's storage (the new version's commits were held:
        // its restore point was still that savepoint).
        assert_eq!(
            plugin_of(taker, &task, "count"),
            "count@0.1.0",
            "the previous version resumed"
        );
        let resumed = taker.job(&task);
        let from = resumed["job"]["runs"]
            .as_array()
            .and_then(|runs| runs.last())
            .and_then(|run| run["restored_from"].as_str())
            .unwrap_or_default()
            .to_string();
        assert!(
            from.starts_with("s3://") && from.contains("/savepoints/savepoint-"),
            "restored from the upgrade's savepoint on S3, not {from:?}: {resumed:#}"
        );
        // The upgrade of the whole ends failed, naming the move; the stage
        // rolls back as one: the other count task, its probation passed,
        // is rolled back too instead of released.
        let upgraded = upgrade.join().expect("the upgrade's CLI");
        let said = crate::host::stderr(&upgraded);
        assert!(!upgraded.status.success(), "{said}");
        assert!(
            said.contains("task moved to it during the operation")
                && said
                    .contains("the previous version, if the new one had not passed its probation")
                && said.contains("stage count rolls back as one"),
            "{said}"
        );
        asker
    });
    for (stage, job, host) in placed_stages(&hosts[asker], &id, Duration::from_secs(30)) {
        if stage == "count" {
            let plugin = plugin_of(&hosts[at(&host)], &job, "count");
            assert_eq!(plugin, "count@0.1.0", "task {job} on {host}");
        }
    }

    // It finishes with every count once.
    finishes_exactly_once(&mut hosts, asker, &id, &url, name, &expected);
}

/// An unbounded generator → split → (by key) count → blackhole: two
/// stages, checkpoints every 200 ms unless `checkpoint` says otherwise.
fn unbounded_count(name: &str, checkpoint: &str) -> String {
    format!(
        r#"
name = "{name}"
max_parallelism = 32
{checkpoint}

[[source]]
uid = "gen"
kind = "generator"
rate = 2000
keys = 50
parallelism = 2

[[operator]]
uid = "split"
plugin = {split}
inputs = ["gen"]
parallelism = 2

[[operator]]
uid = "count"
plugin = {count}
inputs = [{{ from = "split", partition = "key" }}]
parallelism = 2

[[sink]]
uid = "out"
kind = "blackhole"
inputs = ["count"]
parallelism = 2
"#,
        split = crate::support::toml_path(weir_tests::plugins::WORDCOUNT_SPLIT),
        count = crate::support::toml_path(weir_tests::plugins::WORDCOUNT_COUNT),
    )
}

#[test]
fn a_staged_job_is_stopped_and_cancelled_whole_and_names_what_it_cannot_do_yet() {
    let dir = plugin_dir();
    let name = "staged-ops";
    let Some(cluster) = Movable::new(dir.path(), name) else {
        return;
    };
    let (mut hosts, _) = cluster.hosts(dir.path(), 2);
    let every = "[checkpoint]\ninterval = \"200ms\"";

    // Without checkpoints a keyed cluster job cannot be cut: refused,
    // naming the edge and the setting.
    dir.write("plain.toml", unbounded_count("plain", ""));
    let refused = hosts[0].weir(&["run", "plain.toml"], dir.path());
    assert!(!refused.status.success());
    let said = crate::host::stderr(&refused);
    assert!(
        said.contains("plain.toml")
            && said.contains("key and rebalance edges (split → count)")
            && said.contains("set `[checkpoint] interval`"),
        "{said}"
    );

    // Stopped whole: every stage stops with a savepoint of its own.
    dir.write("stop.toml", unbounded_count("stop-me", every));
    let id = hosts[0]
        .ok(&["run", "stop.toml"], dir.path())
        .trim()
        .to_string();
    // Two stages of two tasks each, on both hosts (a stage's tasks go
    // apart; under load a host's lease may lapse for a moment, its tasks
    // go to the other, and the rebalance after it is back spreads them
    // again).
    let started = Instant::now();
    let placed = loop {
        let placed = placed_stages(&hosts[1], &id, Duration::from_secs(60));
        assert_eq!(placed.len(), 4, "{placed:?}");
        if placed[0].2 != placed[1].2 {
            break placed;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the gen stage's tasks never went apart: {placed:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    hosts[1].wait_status(&id, "running", Duration::from_secs(60));
    hosts[1].wait_checkpoints(&id, 2, Duration::from_secs(60));

    // What a staged job cannot do as a whole yet is refused, naming its
    // stages' jobs.
    let fork = hosts[1].weir(&["fork", &id], dir.path());
    assert!(!fork.status.success());
    let said = crate::host::stderr(&fork);
    assert!(
        said.contains(&format!(
            "job {id} runs as stages on the cluster's hosts (gen task 0: job {}, gen task 1: job {}, count task 0: job {}, count task 1: job {}): fork of a staged job as a whole is not supported yet",
            placed[0].1, placed[1].1, placed[2].1, placed[3].1
        )),
        "{said}"
    );

    // The dashboard lists the staged job, and on its page each task with
    // its stage and host.
    if let Some(driver) = weir_tests::browser::chromedriver() {
        crate::support::runtime().block_on(dashboard_shows_tasks(
            &driver.url,
            &hosts[0].url,
            &id,
            &placed,
            |job| placement(&hosts[1], job).map(|(host, _, _)| host),
        ));
    }

    // A rescale goes one stage at a time.
    let two = hosts[0].weir(
        &[
            "rescale",
            &id,
            "--parallelism",
            "gen=3",
            "--parallelism",
            "count=3",
        ],
        dir.path(),
    );
    assert!(!two.status.success());
    let said = crate::host::stderr(&two);
    assert!(
        said.contains("rescale one stage at a time") && said.contains("count, gen"),
        "{said}"
    );

    let stopped = hosts[1].weir(&["stop", &id], dir.path());
    let said = crate::host::stderr(&stopped);
    assert!(stopped.status.success(), "{said}");
    assert!(
        said.contains("gen task 1: savepoint s3://")
            && said.contains("count task 0: savepoint s3://"),
        "{said}"
    );
    let detail = hosts[0].wait_status(&id, "stopped", Duration::from_secs(30));
    for stage in detail["stages"].as_array().expect("stages") {
        assert_eq!(stage["status"], "stopped", "{detail:#}");
    }

    // Cancelled whole.
    dir.write("cancel.toml", unbounded_count("cancel-me", every));
    let id = hosts[1]
        .ok(&["run", "cancel.toml"], dir.path())
        .trim()
        .to_string();
    hosts[0].wait_status(&id, "running", Duration::from_secs(60));
    hosts[0].ok(&["cancel", &id], dir.path());
    hosts[1].wait_status(&id, "cancelled", Duration::from_secs(30));
    // A second cancel: nothing left to cancel, each stage says why.
    let again = hosts[0].weir(&["cancel", &id], dir.path());
    assert!(!again.status.success());
    assert!(
        crate::host::stderr(&again).contains(&format!("job {id}: no stage took the cancel")),
        "{}",
        crate::host::stderr(&again)
    );
    for host in &mut hosts {
        host.terminate();
    }
}

/// The dashboard at `url`: staged job `id` in the job list, and on its
/// page each of its tasks (`placed`: stage, job, host) in the tasks table
/// with its host — or the host `owner` says runs it now (under load a
/// host's lease may lapse for a moment and its tasks move).
async fn dashboard_shows_tasks(
    driver: &str,
    url: &str,
    id: &str,
    placed: &[(String, String, String)],
    owner: impl Fn(&str) -> Option<String>,
) {
    let profile = tempfile::tempdir().expect("profile dir");
    let browser = crate::host::browser(driver, profile.path()).await;
    browser.goto(&format!("{url}/")).await.expect("open /");
    let listed = format!("#jobs tr[data-job=\"{id}\"] td.host");
    crate::host::text_when(&browser, &listed, |t| {
        t == format!("{} tasks", placed.len())
    })
    .await;
    crate::host::click(&browser, &format!("#jobs tr[data-job=\"{id}\"] a")).await;
    for (stage, job, host) in placed {
        let row = format!("#tasks tr[data-task=\"{job}\"]");
        crate::host::text_when(&browser, &format!("{row} td.host"), |t| {
            t == host || owner(job).is_some_and(|now| t == now)
        })
        .await;
        crate::host::text_when(&browser, &format!("{row} td:first-child"), |t| t == stage).await;
    }
    let _ = browser.close().await;
}

/// Waits until the NATS cluster's JetStream places streams of three
/// replicas (its three nodes joined and elected a meta leader): a probe
/// stream made and removed through `urls`.
pub(crate) fn wait_jetstream(urls: &[String]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let started = Instant::now();
        loop {
            if let Ok(client) = async_nats::connect(urls).await {
                let js = async_nats::jetstream::new(client);
                let probe = js
                    .create_stream(async_nats::jetstream::stream::Config {
                        name: "weir-probe".to_string(),
                        subjects: vec!["weir-probe".to_string()],
                        num_replicas: 3,
                        ..Default::default()
                    })
                    .await;
                if probe.is_ok() {
                    let _ = js.delete_stream("weir-probe").await;
                    return;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "the NATS cluster's JetStream never placed a stream of three replicas"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

#[test]
fn a_nats_node_killed_with_quorum_kept_loses_and_repeats_nothing() {
    let Some(nats) = weir_tests::nats::cluster() else {
        return;
    };
    wait_jetstream(&nats.urls);
    let dir = plugin_dir();
    let name = "quorum";
    let Some(cluster) = Movable::on(dir.path(), name, &nats.urls, 3) else {
        return;
    };
    let (mut hosts, ids) = cluster.hosts(dir.path(), 3);
    // The job's streams keep three copies; its connectors know every node.
    let url = cluster.url.clone();
    let lines = crate::nats::input_lines(48_000, 17);
    let expected = weir_tests::count_words(&lines.join("\n"));
    crate::nats::prepare_replicated_streams(&url, name, &lines, 3);
    // The sink publishes an epoch again while the node's streams elect
    // new leaders; the source's reads may still fail meanwhile (under load
    // for many seconds): the restart strategy takes the job back to its
    // newest checkpoint until the streams answer again.
    dir.write(
        "job.toml",
        crate::nats::count_job(&url, name, 2, 800, "checkpoints")
            + "\n[restart]\nstrategy = \"fixed-delay\"\nattempts = 120\ndelay = \"1s\"\n",
    );
    let id = hosts[0]
        .ok(&["run", "job.toml"], dir.path())
        .trim()
        .to_string();
    hosts[0].wait_checkpoints(&id, 2, Duration::from_secs(60));
    // The stage host 0 runs (asked of host 0 itself: no bucket is read for
    // it while a NATS node is down).
    let (_, stage, _) = placed_stages(&hosts[0], &id, Duration::from_secs(10))
        .into_iter()
        .find(|s| s.2 == ids[0])
        .expect("one stage on each host");

    // A NATS node SIGKILLed: two of three keep quorum; the stage
    // checkpoints on, and when its host dies too, it moves through the two
    // while the others run on.
    let outage = nats.outage();
    nats.kill(1);
    let before = hosts[0].job(&stage)["checkpoints_completed"]
        .as_u64()
        .unwrap_or(0);
    hosts[0].wait_checkpoints(&stage, before + 3, Duration::from_secs(60));
    hosts[0].kill();
    let moved = wait_moved(&hosts[1], &stage, &ids[0], Duration::from_secs(30));
    let owner = ids.iter().position(|i| *i == moved).expect("a member");
    hosts[owner].wait_checkpoints(&stage, 2, Duration::from_secs(60));
    nats.restart(1);
    drop(outage);
    finishes_exactly_once(&mut hosts, owner, &id, &url, name, &expected);
}

/// The JetStream streams of staged job `id`'s exchanges.
fn exchange_streams(url: &str, id: &str) -> Vec<String> {
    use futures::TryStreamExt;
    crate::support::runtime().block_on(async {
        let client = async_nats::connect(url).await.expect("NATS");
        async_nats::jetstream::new(client)
            .stream_names()
            .try_collect::<Vec<String>>()
            .await
            .expect("stream names")
            .into_iter()
            .filter(|n| n.starts_with(&format!("weir-{id}_")))
            .collect()
    })
}

/// Waits until cluster test `name`'s output stream holds `at_least`
/// updates.
fn wait_published(url: &str, name: &str, at_least: usize) {
    let started = Instant::now();
    while crate::nats::output(url, name).len() < at_least {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the staged job published little"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `weir <verb> <id>` (stop, savepoint) of a staged job through `host`:
/// the cluster savepoint it answers (an `s3://` one). Asked again while it
/// is refused for a task not running (under load a host's lease may
/// lapse, and its tasks restart elsewhere), for up to a minute.
fn cluster_savepoint_of(host: &Host, verb: &str, id: &str, dir: &Path) -> String {
    let started = Instant::now();
    let (taken, said) = loop {
        let taken = host.weir(&[verb, id], dir);
        let said = crate::host::stderr(&taken);
        if taken.status.success()
            || !said.contains("of the whole needs every task running")
            || started.elapsed() > Duration::from_secs(60)
        {
            break (taken, said);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(taken.status.success(), "{said}");
    let savepoint = String::from_utf8_lossy(&taken.stdout).trim().to_string();
    assert!(
        savepoint.starts_with("s3://")
            && said.contains(&format!("cluster savepoint {savepoint} (")),
        "{said}"
    );
    savepoint
}

#[test]
fn a_staged_job_savepoint_taken_while_it_runs_is_one_cut_that_restores_on_one_host() {
    let dir = plugin_dir();
    let name = "staged-cut";
    let Some(cluster) = Movable::new(dir.path(), name) else {
        return;
    };
    let url = cluster.url.clone();
    let (mut hosts, _) = cluster.hosts(dir.path(), 2);
    // JetStream in → split → (by key) count → JetStream out, at 2 × 800
    // lines/s: `lines` task 0 reads 12,000 lines (about 15 s), task 1
    // 20,000 (about 25 s, its partitions hold more). One savepoint is
    // taken midway, with records in flight in both exchanges; another
    // once task 0 finished, while task 1 runs on.
    let mut expected = count_input(&url, name, 24_000, 43);
    let more = crate::nats::input_lines(8_000, 44);
    crate::nats::append_lines(&url, name, &[1, 3, 5], &more);
    for (word, n) in weir_tests::count_words(&more.join("\n")) {
        *expected.entry(word).or_default() += n;
    }
    let job = crate::nats::count_job(&url, name, 2, 800, "checkpoints");
    dir.write("job.toml", &job);
    let id = hosts[0]
        .ok(&["run", "job.toml"], dir.path())
        .trim()
        .to_string();
    let placed = placed_stages(&hosts[1], &id, Duration::from_secs(60));
    let task = |stage: &str, n: usize| {
        placed
            .iter()
            .find(|s| s.0 == stage && s.1.ends_with(&format!("-{n}")))
            .unwrap_or_else(|| panic!("task {n} of stage {stage}: {placed:?}"))
            .1
            .clone()
    };
    let (count, lines) = (task("count", 0), task("lines", 0));
    hosts[0].wait_checkpoints(&count, 3, Duration::from_secs(60));
    wait_published(&url, name, 1000);

    // A savepoint of the whole while it runs: every task's, one cut.
    let midway = cluster_savepoint_of(&hosts[1], "savepoint", &id, dir.path());
    // Once `lines` task 0 finished, its part is its final checkpoint
    // (copied: the task is not asked), the others' savepoints one cut —
    // its exchange writer's end counts as its mark of every cut.
    hosts[0].wait_status(&lines, "finished", Duration::from_secs(60));
    let running = hosts[0].job(&id);
    assert_eq!(
        running["job"]["lifecycle"]["status"], "running",
        "`lines` task 1 runs on: {running:#}"
    );
    let late = hosts[1].weir(&["savepoint", &id], dir.path());
    let said = crate::host::stderr(&late);
    assert!(
        late.status.success() && said.contains("finished before it: its final checkpoint"),
        "{said}"
    );
    let finished_part = String::from_utf8_lossy(&late.stdout).trim().to_string();
    // The job ran on, holding at each cut for a moment, and finishes with
    // every count once.
    hosts[0].wait_status(&id, "finished", Duration::from_secs(120));
    weir_tests::check_exact_updates(&crate::nats::output(&url, name), &expected)
        .unwrap_or_else(|e| panic!("the job that ran on: {e}"));
    // Every task finished: nothing is left to take a savepoint of.
    let ended = hosts[1].weir(&["savepoint", &id], dir.path());
    let said = crate::host::stderr(&ended);
    assert!(
        !ended.status.success()
            && said.contains(&format!("job {id} has finished (every task's input ended): there is nothing left to take a savepoint of")),
        "{said}"
    );

    // Each restored on one host, writing elsewhere, reads on from its cut:
    // each word's updates from where the savepoint stood to its total,
    // once each — nothing in flight between the tasks lost or taken twice.
    let total: u64 = expected.values().sum();
    for (n, savepoint) in [midway, finished_part].iter().enumerate() {
        let restored = format!("{name}-restored-{n}");
        crate::nats::prepare_streams(&url, &restored, &[]);
        dir.write(
            "restore.toml",
            job.replace(
                &format!("stream = \"{name}-out\"\nsubject = \"{name}.out\""),
                &format!("stream = \"{restored}-out\"\nsubject = \"{restored}.out\""),
            ),
        );
        let run = weir_env(
            &["run", "restore.toml", "-q", "-s", savepoint],
            dir.path(),
            &cluster.env,
        );
        assert!(
            run.status.success(),
            "the restore of {savepoint} on one host: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let output = crate::nats::output(&url, &restored);
        let resumed = weir_tests::check_updates_after_snapshot(&output, &expected)
            .unwrap_or_else(|e| panic!("restored from the cut {savepoint}: {e}"));
        assert!(
            resumed > 0 && (output.len() as u64) < total,
            "{savepoint} was taken midway: {resumed} words resumed midway, {} of {total} updates",
            output.len()
        );
    }
    for host in &mut hosts {
        host.terminate();
    }
}

#[test]
fn a_staged_job_stopped_whole_restores_on_one_host_and_back() {
    let dir = plugin_dir();
    let name = "staged-savepoint";
    let Some(cluster) = Movable::new(dir.path(), name) else {
        return;
    };
    let url = cluster.url.clone();
    let (mut hosts, _) = cluster.hosts(dir.path(), 2);
    // JetStream in → split → (by key) count → JetStream out, about 35 s of
    // input at 2 × 600 lines/s (enough for the stop, after a host joined
    // and took its share, to come midway), run in three parts: staged on
    // the cluster, on one host, staged again.
    let expected = count_input(&url, name, 42_000, 41);
    dir.write(
        "job.toml",
        crate::nats::count_job(&url, name, 2, 600, "checkpoints"),
    );
    let id = hosts[0]
        .ok(&["run", "job.toml"], dir.path())
        .trim()
        .to_string();
    let placed = placed_stages(&hosts[1], &id, Duration::from_secs(60));
    let count = placed
        .iter()
        .find(|s| s.0 == "count")
        .unwrap_or_else(|| panic!("a count stage: {placed:?}"))
        .1
        .clone();
    hosts[0].wait_status(&id, "running", Duration::from_secs(60));
    hosts[0].wait_checkpoints(&count, 3, Duration::from_secs(60));

    // A third host joins: at the next rebalance it takes a fair share of
    // the five tasks (each moved as a failover moves it, from its restore
    // point, its old owner fenced), and the job runs on.
    let third = cluster.host(dir.path(), 2);
    let third_id = own_id(&third);
    hosts.push(third);
    let started = Instant::now();
    loop {
        let now = stages(&hosts[0], &id);
        let mut load: BTreeMap<String, usize> = BTreeMap::new();
        for (_, _, host) in &now {
            *load.entry(host.clone().unwrap_or_default()).or_default() += 1;
        }
        let (most, least) = (
            load.values().max().copied().unwrap_or(0),
            load.values().min().copied().unwrap_or(0),
        );
        if load.contains_key(&third_id) && load.len() == 3 && most <= least + 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the joined host took no fair share: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    hosts[0].wait_status(&id, "running", Duration::from_secs(60));

    wait_published(&url, name, 1000);

    let exchanges = exchange_streams(&url, &id);
    assert_eq!(
        exchanges.len(),
        2,
        "split → count, count → out: {exchanges:?}"
    );

    // Stopped whole: every stage's savepoint in one cluster savepoint,
    // whose operators are the submitted job's (no exchange among them).
    let savepoint = cluster_savepoint_of(&hosts[1], "stop", &id, dir.path());
    let inspect = weir_env(
        &["savepoint", "inspect", &savepoint, "--json"],
        dir.path(),
        &cluster.env,
    );
    let shown: Value = serde_json::from_slice(&inspect.stdout)
        .unwrap_or_else(|e| panic!("inspect: {e}: {}", String::from_utf8_lossy(&inspect.stderr)));
    let mut uids: Vec<&str> = shown["operators"]
        .as_array()
        .expect("operators")
        .iter()
        .filter_map(|op| op["uid"].as_str())
        .collect();
    uids.sort();
    assert_eq!(uids, ["count", "lines", "out", "split"], "{shown:#}");
    let published = crate::nats::output(&url, name).len();
    let total: u64 = expected.values().sum();
    assert!(
        published > 0 && (published as u64) < total,
        "stopped midway ({published} of {total} updates)"
    );
    // Every stage ended: the job's exchanges go (no restore reads them).
    let started = Instant::now();
    loop {
        let left = exchange_streams(&url, &id);
        if left.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the stopped job's exchanges are still there: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Restored on one host (`weir run -s`), which reads on and stops with
    // a savepoint of its own (on S3) a few seconds later.
    let single = format!("s3://{}/{}/single", crate::s3::BUCKET, cluster.prefix);
    let mut child = crate::support::spawn_weir(
        &[
            "run",
            "job.toml",
            "-q",
            "-s",
            &savepoint,
            "--savepoint-dir",
            &single,
        ],
        dir.path(),
        &cluster.env,
    );
    let started = Instant::now();
    while crate::nats::output(&url, name).len() <= published {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the single-host run published nothing"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().expect("reaped");
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        use std::io::Read;
        let _ = err.read_to_string(&mut stderr);
    }
    assert!(status.success(), "the single-host run: {stderr}");
    let below = format!("{}/single", cluster.prefix);
    let found = crate::s3::objects(crate::s3::server().expect("S3"), &below);
    let single = found
        .iter()
        .find_map(|o| o.strip_suffix("/_metadata"))
        .map(|dir| format!("s3://{}/{dir}", crate::s3::BUCKET))
        .unwrap_or_else(|| panic!("a savepoint below {below}: {found:?}"));

    // And back: the single host's savepoint restores into the cluster,
    // staged again, and the job finishes with every count once.
    let back = hosts[0]
        .ok(&["run", "job.toml", "-s", &single], dir.path())
        .trim()
        .to_string();
    assert_ne!(back, id);
    finishes_exactly_once(&mut hosts, 1, &back, &url, name, &expected);
}
