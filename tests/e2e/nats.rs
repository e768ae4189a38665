//! The `nats` connectors against a real nats-server with JetStream
//! (`weir_tests::nats`, one server for the test binary): the SIGKILL crash
//! test with JetStream in and out and checkpoints on S3 (SeaweedFS), a finished job resumed once more, a
//! restore at another source parallelism, and the start's checks of bad
//! connector settings.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, Context, consumer, stream};
use futures::StreamExt;
use weir::connectors::generator::{word, word_index};
use weir_tests::plugins::{WORDCOUNT_COUNT, WORDCOUNT_SPLIT};

use crate::checkpoints::delays;
use crate::support::{JobDir, runtime, spawn_weir, stop_with_savepoint, toml_path, weir, weir_env};

/// The shared server's URL; None when the server cannot be had outside CI.
fn server() -> Option<String> {
    weir_tests::nats::server().map(|s| s.url.clone())
}

/// A JetStream context on `url` (or any of a comma-separated list).
async fn context(url: &str) -> Context {
    let servers: Vec<String> = url.split(',').map(str::to_string).collect();
    let client = async_nats::connect(servers.as_slice())
        .await
        .expect("connects to the test server");
    jetstream::new(client)
}

/// (Re)creates stream `name` over `subjects`.
async fn fresh_stream(js: &Context, name: &str, subjects: &[String], window: Duration) {
    fresh_replicated_stream(js, name, subjects, window, 1).await;
}

/// [`fresh_stream`] keeping `replicas` copies (on a NATS cluster).
async fn fresh_replicated_stream(
    js: &Context,
    name: &str,
    subjects: &[String],
    window: Duration,
    replicas: usize,
) {
    let _ = js.delete_stream(name).await;
    js.create_stream(stream::Config {
        name: name.to_string(),
        subjects: subjects.to_vec(),
        duplicate_window: window,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("creating stream {name}: {e}"));
}

/// `lines` published round-robin over `<prefix>.<p>.<i>`, p < partitions.
async fn publish_lines(js: &Context, prefix: &str, partitions: usize, lines: &[String]) {
    let subjects = (0..lines.len()).map(|i| format!("{prefix}.{}.{i}", i % partitions));
    publish_all(js, subjects.zip(lines)).await;
}

/// Publishes each line to its subject, waiting for the acknowledgements a
/// thousand at a time (the client holds back a publish while too many are
/// unacknowledged).
async fn publish_all<'a>(js: &Context, messages: impl Iterator<Item = (String, &'a String)>) {
    let mut acks = Vec::new();
    for (subject, line) in messages {
        acks.push(
            js.publish(subject, line.clone().into())
                .await
                .expect("publish"),
        );
        if acks.len() >= 1000 {
            for ack in acks.drain(..) {
                ack.await.expect("acknowledged");
            }
        }
    }
    for ack in acks {
        ack.await.expect("acknowledged");
    }
}

/// Every message payload of stream `name`, in stream order.
/// A NATS node restarted just now may take a while (under load) before
/// its streams answer: asked again for up to 30 s.
async fn read_stream(js: &Context, name: &str) -> Vec<String> {
    read_messages(js, name, |message| {
        String::from_utf8_lossy(&message.payload).into_owned()
    })
    .await
}

/// Every message of stream `name`, each as `line` makes it (the stream
/// asked again for up to 30 s while it does not answer).
async fn read_messages(
    js: &Context,
    name: &str,
    line: impl Fn(&async_nats::jetstream::Message) -> String,
) -> Vec<String> {
    let started = std::time::Instant::now();
    let consumer = loop {
        let made = async {
            let stream = js.get_stream(name).await.map_err(|e| e.to_string())?;
            stream
                .create_consumer(consumer::pull::OrderedConfig::default())
                .await
                .map_err(|e| e.to_string())
        };
        match made.await {
            Ok(consumer) => break consumer,
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                eprintln!("reading stream {name}: {e}; asking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("reading stream {name}: {e}"),
        }
    };
    let total = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await.expect("messages");
    let mut out = Vec::new();
    while (out.len() as u64) < total {
        let message = messages
            .next()
            .await
            .expect("more messages")
            .expect("a message");
        out.push(line(&message));
    }
    out
}

/// `n` lines of four generator words each (60 distinct words).
pub(crate) fn input_lines(n: u64, seed: u64) -> Vec<String> {
    (0..n)
        .map(|i| {
            (0..4)
                .map(|j| word(word_index(i * 4 + j, 60, seed)))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// JetStream `<name>-in` (6 partitions) → split → count → `<name>-out`.
pub(crate) fn count_job(
    url: &str,
    name: &str,
    parallelism: u32,
    rate: u32,
    checkpoints: &str,
) -> String {
    format!(
        r#"
name = "nats-count"
max_parallelism = 32

[checkpoint]
interval = "150ms"
dir = "{checkpoints}"
retained = 2

[[source]]
uid = "lines"
kind = "nats"
url = "{url}"
stream = "{name}-in"
subject = "{name}.in"
partitions = 6
parallelism = {parallelism}
bounded = true
rate = {rate}

[[operator]]
uid = "split"
plugin = {split}
inputs = ["lines"]
parallelism = 2

[[operator]]
uid = "count"
plugin = {count}
inputs = [{{ from = "split", partition = "key" }}]
parallelism = 2

[[sink]]
uid = "out"
kind = "nats"
url = "{url}"
stream = "{name}-out"
subject = "{name}.out"
inputs = ["count"]
"#,
        split = toml_path(WORDCOUNT_SPLIT),
        count = toml_path(WORDCOUNT_COUNT),
    )
}

/// Creates `<name>-in` holding `lines` and an empty `<name>-out`.
pub(crate) fn prepare_streams(url: &str, name: &str, lines: &[String]) {
    prepare_replicated_streams(url, name, lines, 1);
}

/// [`prepare_streams`] with `replicas` copies of each stream.
pub(crate) fn prepare_replicated_streams(url: &str, name: &str, lines: &[String], replicas: usize) {
    runtime().block_on(async {
        let js = context(url).await;
        fresh_replicated_stream(
            &js,
            &format!("{name}-in"),
            &[format!("{name}.in.>")],
            Duration::from_secs(120),
            replicas,
        )
        .await;
        fresh_replicated_stream(
            &js,
            &format!("{name}-out"),
            &[format!("{name}.out")],
            Duration::from_secs(120),
            replicas,
        )
        .await;
        publish_lines(&js, &format!("{name}.in"), 6, lines).await;
    });
}

/// Appends `lines` to stream `<name>-in`, only to the partitions
/// `partitions` (of 6), in turn: a source subtask reading none of them
/// has less to read than the others.
pub(crate) fn append_lines(url: &str, name: &str, partitions: &[usize], lines: &[String]) {
    runtime().block_on(async {
        let js = context(url).await;
        let subjects = (0..lines.len())
            .map(|i| format!("{name}.in.{}.more{i}", partitions[i % partitions.len()]));
        publish_all(&js, subjects.zip(lines)).await;
    });
}

pub(crate) fn output(url: &str, name: &str) -> Vec<String> {
    runtime().block_on(async { read_stream(&context(url).await, &format!("{name}-out")).await })
}

/// Every message of stream `<name>-out`, one line each: its stream
/// sequence, its `Nats-Msg-Id` (which task, checkpoint and position
/// published it) and its payload — what a failed exactly-once check
/// leaves to read.
pub(crate) fn output_with_ids(url: &str, name: &str) -> Vec<String> {
    runtime().block_on(async {
        let js = context(url).await;
        read_messages(&js, &format!("{name}-out"), |message| {
            let sequence = message.info().map_or(0, |i| i.stream_sequence);
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map_or_else(String::new, |v| v.to_string());
            let payload = String::from_utf8_lossy(&message.payload);
            format!("{sequence}\t{id}\t{payload}")
        })
        .await
    })
}

/// The consumers of stream `<name>-in`: (name, messages not yet delivered).
fn input_consumers(url: &str, name: &str) -> Vec<(String, u64)> {
    runtime().block_on(async {
        let js = context(url).await;
        let stream = js
            .get_stream(format!("{name}-in"))
            .await
            .expect("the input stream");
        stream
            .consumers()
            .filter_map(|info| async move { info.ok() })
            .map(|info| (info.name, info.num_pending))
            .collect()
            .await
    })
}

/// `weir run` of the job, resumed from `newest` if there is one.
fn run_args(job: &Path, newest: Option<String>) -> Vec<String> {
    let mut args = vec![
        "run".to_string(),
        job.to_string_lossy().into_owned(),
        "-q".into(),
    ];
    if let Some(newest) = newest {
        args.push("-s".into());
        args.push(newest);
    }
    args
}

#[test]
fn jetstream_in_and_out_survive_sigkill_at_random_moments_exactly_once() {
    let Some(url) = server() else { return };
    let Some(s3) = crate::s3::server() else {
        return;
    };
    let job = JobDir::new();
    let name = "crash";
    let prefix = crate::s3::prefix("nats-crash");
    let newest = || crate::s3::newest_checkpoint(s3, &prefix);
    // Two subtasks at 1500 lines/s each for 10 s: 20 runs of 150–850 ms do
    // not finish it, the last run does.
    let lines = input_lines(30_000, 3);
    let expected = weir_tests::count_words(&lines.join("\n"));
    prepare_streams(&url, name, &lines);
    let path = job.job(&count_job(
        &url,
        name,
        2,
        1500,
        &format!("s3://{}/{prefix}", crate::s3::BUCKET),
    ));
    let seed = crate::support::seed("WEIR_CRASH_SEED", "nats crash test");
    let mut restores = 0;
    for (kill, delay) in delays(seed).take(20).enumerate() {
        let args = run_args(&path, newest());
        restores += usize::from(args.len() > 3);
        let mut child = spawn_weir(&args, job.path(), &s3.env());
        std::thread::sleep(delay);
        let ended_by_itself = child.try_wait().expect("wait").is_some();
        child.kill().ok(); // SIGKILL
        let output = child.wait_with_output().expect("reaped");
        assert!(
            !ended_by_itself || output.status.success(),
            "run {kill} failed on its own: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        if ended_by_itself {
            break;
        }
    }
    assert!(
        restores >= 10,
        "most runs resumed from a checkpoint ({restores})"
    );
    // Then near the end of the input, unpaced (a source emits what its
    // consumer delivered at once): each run killed once the consumers
    // delivered everything (the sources are ending), 0–400 ms later:
    // before, during or after the final checkpoint and its commit.
    std::fs::write(
        &path,
        count_job(
            &url,
            name,
            2,
            1_000_000,
            &format!("s3://{}/{prefix}", crate::s3::BUCKET),
        ),
    )
    .expect("rewrite");
    for (round, extra) in delays(seed ^ 0xE4D).take(3).enumerate() {
        let extra = Duration::from_millis(extra.as_millis() as u64 % 400);
        let before: Vec<String> = input_consumers(&url, name)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut child = spawn_weir(&run_args(&path, newest()), job.path(), &s3.env());
        let since = std::time::Instant::now();
        loop {
            let mine: Vec<u64> = input_consumers(&url, name)
                .into_iter()
                .filter(|(n, _)| !before.contains(n))
                .map(|(_, pending)| pending)
                .collect();
            let drained = !mine.is_empty() && mine.iter().all(|&p| p == 0);
            if drained
                || child.try_wait().expect("wait").is_some()
                || since.elapsed() > Duration::from_secs(60)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let drained_after = since.elapsed();
        std::thread::sleep(extra);
        let ended_by_itself = child.try_wait().expect("wait").is_some();
        child.kill().ok(); // SIGKILL
        eprintln!(
            "end-phase run {round}: input delivered after {drained_after:?}, killed {extra:?} later (had ended by itself: {ended_by_itself})"
        );
        let output = child.wait_with_output().expect("reaped");
        assert!(
            !ended_by_itself || output.status.success(),
            "end-phase run {round} failed on its own: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let args = run_args(&path, newest());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let finished = weir_env(&args, job.path(), &s3.env());
    assert!(
        finished.status.success(),
        "the final run ends well: {}",
        String::from_utf8_lossy(&finished.stderr)
    );
    weir_tests::check_exact_updates(&output(&url, name), &expected)
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    // The finished job resumed from its newest (final) checkpoint publishes
    // nothing again.
    let args = run_args(&path, newest());
    assert!(args.len() > 3, "the finished job left a checkpoint");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let again = weir_env(&args, job.path(), &s3.env());
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    weir_tests::check_exact_updates(&output(&url, name), &expected)
        .unwrap_or_else(|e| panic!("seed {seed}, resumed after the end: {e}"));
}

#[test]
fn a_savepoint_restores_the_source_at_another_parallelism_over_six_partitions() {
    let Some(url) = server() else { return };
    let job = JobDir::new();
    let name = "rescale";
    let lines = input_lines(9_000, 5);
    let expected = weir_tests::count_words(&lines.join("\n"));
    prepare_streams(&url, name, &lines);
    // Two subtasks at 1500 lines/s: stopped with a savepoint after ~1 s.
    let path = job.job(&count_job(&url, name, 2, 1500, "checkpoints"));
    let child = spawn_weir(
        &["run", "job.toml", "-q", "--savepoint-dir", "savepoints"],
        job.path(),
        &[],
    );
    std::thread::sleep(Duration::from_millis(1200));
    let savepoint = stop_with_savepoint(child, &job.path().join("savepoints"));
    let read = weir::checkpoint::metadata::read(&savepoint.join("_metadata"))
        .expect("the savepoint reads");
    let positions: BTreeMap<u32, u64> = read.metadata.operators["lines"]
        .subtasks
        .iter()
        .flat_map(|s| s.partitions.clone())
        .collect();
    assert_eq!(
        positions.len(),
        6,
        "every partition's position: {positions:?}"
    );
    let inspect = weir(
        &[
            "savepoint",
            "inspect",
            &savepoint.to_string_lossy(),
            "--json",
        ],
        job.path(),
    );
    let shown: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("JSON");
    let lines = shown["operators"]
        .as_array()
        .and_then(|ops| ops.iter().find(|op| op["uid"] == "lines"))
        .unwrap_or_else(|| panic!("the source in {shown}"));
    assert_eq!(
        lines["partitions"].as_object().map(|p| p.len()),
        Some(6),
        "inspect shows each partition's position: {lines}"
    );
    let published = output(&url, name).len();
    assert!(
        published > 0 && published < expected.values().sum::<u64>() as usize,
        "stopped midway ({published} updates)"
    );
    // Three subtasks now: partitions 0..6 reassigned.
    std::fs::write(&path, count_job(&url, name, 3, 100_000, "checkpoints")).expect("rewrite");
    let savepoint = savepoint.to_string_lossy().into_owned();
    let resumed = weir(&["run", "job.toml", "-q", "-s", &savepoint], job.path());
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    weir_tests::check_exact_updates(&output(&url, name), &expected)
        .unwrap_or_else(|e| panic!("after the restore at parallelism 3: {e}"));
}

#[test]
fn bad_nats_settings_fail_the_start_naming_the_connector() {
    let Some(url) = server() else { return };
    runtime().block_on(async {
        let js = context(&url).await;
        fresh_stream(
            &js,
            "bad-in",
            &["bad.in.>".into()],
            Duration::from_secs(120),
        )
        .await;
        // Keeps message ids for 1 s only.
        fresh_stream(&js, "bad-out", &["bad.out".into()], Duration::from_secs(1)).await;
    });
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let source = |url: &str, stream: &str| {
        format!(
            "[[source]]\nuid = \"lines\"\nkind = \"nats\"\nurl = \"{url}\"\nstream = \"{stream}\"\nsubject = \"bad.in\"\npartitions = 2\n"
        )
    };
    let sink = |url: &str, stream: &str, subject: &str| {
        format!(
            "[[sink]]\nuid = \"out\"\nkind = \"nats\"\nurl = \"{url}\"\nstream = \"{stream}\"\nsubject = \"{subject}\"\ninputs = [\"lines\"]\n"
        )
    };
    let header = "name = \"bad\"\n[checkpoint]\ninterval = \"1s\"\ndir = \"checkpoints\"\n[restart]\nstrategy = \"fixed-delay\"\nattempts = 3\ndelay = \"5s\"\n";
    let unreachable = format!("nats://127.0.0.1:{closed}");
    let cases = [
        (
            format!(
                "{header}{}{}",
                source(&unreachable, "bad-in"),
                sink(&url, "bad-out", "bad.out")
            ),
            vec![
                "source `lines`".to_string(),
                format!("cannot connect to {unreachable}"),
            ],
        ),
        (
            format!(
                "{header}{}{}",
                source(&url, "nowhere"),
                sink(&url, "bad-out", "bad.out")
            ),
            vec![
                "source `lines`".into(),
                "stream `nowhere` does not exist".into(),
            ],
        ),
        (
            format!(
                "{header}{}{}",
                source(&url, "bad-in"),
                sink(&url, "bad-out", "bad.elsewhere")
            ),
            vec![
                "sink `out`".into(),
                "does not store subject `bad.elsewhere`".into(),
            ],
        ),
        (
            format!(
                "{header}{}{}",
                source(&url, "bad-in"),
                sink(&url, "bad-out", "bad.out")
            ),
            vec![
                "sink `out`".into(),
                "duplicate_window".into(),
                "restart delay of 5 s".into(),
            ],
        ),
    ];
    let mut cases = cases.to_vec();
    if let Some(secured) = weir_tests::nats::secured() {
        let wrong = secured.url.replace("nats://", "nats://weir:wrong@");
        cases.push((
            format!(
                "{header}{}{}",
                source(&wrong, "bad-in"),
                sink(&url, "bad-out", "bad.out")
            ),
            vec![
                "source `lines`".into(),
                "cannot connect to nats://weir:***@".into(),
            ],
        ));
    }
    for (toml, wanted) in cases {
        let job = JobDir::new();
        job.job(&toml);
        let run = weir(&["run", "job.toml", "-q"], job.path());
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "the start fails: {toml}");
        for part in &wanted {
            assert!(stderr.contains(part.as_str()), "`{part}` in: {stderr}");
        }
        assert!(!stderr.contains("wrong"), "no password shown: {stderr}");
        assert_eq!(
            stderr.matches(wanted[1].as_str()).count(),
            1,
            "stated once: {stderr}"
        );
        assert!(
            !job.path().join("checkpoints").exists(),
            "nothing written: {stderr}"
        );
        assert!(!stderr.contains("started"), "not started: {stderr}");
    }
}

#[test]
fn header_keys_and_the_at_least_once_sink_deliver_every_update() {
    let Some(url) = server() else { return };
    let job = JobDir::new();
    // One word per message, its key in a header; no partition tokens needed
    // beyond `<subject>.<p>.<n>`.
    let words: Vec<String> = (0..2000).map(|i| word(word_index(i, 40, 11))).collect();
    let mut expected = BTreeMap::new();
    for w in &words {
        *expected.entry(w.clone()).or_insert(0u64) += 1;
    }
    runtime().block_on(async {
        let js = context(&url).await;
        fresh_stream(
            &js,
            "keys-in",
            &["keys.in.>".into()],
            Duration::from_secs(120),
        )
        .await;
        fresh_stream(
            &js,
            "keys-out",
            &["keys.out".into()],
            Duration::from_secs(120),
        )
        .await;
        let mut acks = Vec::new();
        for (i, w) in words.iter().enumerate() {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Word", w.as_str());
            acks.push(
                js.publish_with_headers(
                    format!("keys.in.{}.{i}", i % 2),
                    headers,
                    w.clone().into(),
                )
                .await
                .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("acknowledged");
        }
    });
    job.job(&format!(
        r#"
name = "header-keys"
[checkpoint]
interval = "200ms"
dir = "checkpoints"

[[source]]
uid = "words"
kind = "nats"
url = "{url}"
stream = "keys-in"
subject = "keys.in"
partitions = 2
parallelism = 2
key_header = "Word"
bounded = true

[[operator]]
uid = "count"
plugin = {count}
inputs = [{{ from = "words", partition = "key" }}]

[[sink]]
uid = "out"
kind = "nats"
url = "{url}"
stream = "keys-out"
subject = "keys.out"
delivery = "at-least-once"
inputs = ["count"]
"#,
        count = toml_path(WORDCOUNT_COUNT),
    ));
    let run = weir(&["run", "job.toml", "-q"], job.path());
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let lines = runtime().block_on(async { read_stream(&context(&url).await, "keys-out").await });
    weir_tests::check_exact_updates(&lines, &expected).expect("every update, keyed by the header");
}

/// The exactly-once sink rides through an outage of the node its stream
/// lives on: it publishes an unacknowledged epoch again (same message ids)
/// until the node is back, so a job without a restart strategy finishes,
/// and every count is in the stream once.
#[test]
fn the_sink_publishes_again_through_an_outage_of_its_streams_node() {
    let Some(nats) = weir_tests::nats::cluster() else {
        return;
    };
    crate::cluster::wait_jetstream(&nats.urls);
    let url = nats.urls.join(",");
    let name = "outage";
    // One replica: while its node is down, nothing acknowledges a publish.
    let leader = runtime().block_on(async {
        let js = context(&url).await;
        fresh_stream(
            &js,
            &format!("{name}-out"),
            &[format!("{name}.out")],
            Duration::from_secs(120),
        )
        .await;
        let mut stream = js
            .get_stream(format!("{name}-out"))
            .await
            .expect("the output stream");
        let info = stream.info().await.expect("stream info");
        info.cluster
            .as_ref()
            .and_then(|c| c.leader.clone())
            .expect("a clustered stream names its leader")
    });
    let node: usize = leader
        .strip_prefix("node-")
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("a node of the test cluster: {leader}"));
    let (count, keys, seed) = (30_000u64, 200, 7);
    let job = JobDir::new();
    let path = job.job(&format!(
        r#"
name = "nats-outage"
[checkpoint]
interval = "150ms"
dir = "checkpoints"

[[source]]
uid = "words"
kind = "generator"
count = {count}
keys = {keys}
seed = {seed}
rate = 5000

[[operator]]
uid = "count"
plugin = {plugin}
inputs = [{{ from = "words", partition = "key" }}]
parallelism = 2

[[sink]]
uid = "out"
kind = "nats"
url = "{url}"
stream = "{name}-out"
subject = "{name}.out"
inputs = ["count"]
"#,
        plugin = toml_path(WORDCOUNT_COUNT),
    ));
    let mut expected = BTreeMap::new();
    for i in 0..count {
        *expected
            .entry(word(word_index(i, keys, seed)))
            .or_insert(0u64) += 1;
    }
    let child = spawn_weir(&run_args(&path, None), job.path(), &[]);
    // Once the first epoch is out, the stream's node goes down for 3 s.
    let started = std::time::Instant::now();
    while output(&url, name).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the job never published"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    {
        let _outage = nats.outage();
        nats.kill(node);
        std::thread::sleep(Duration::from_secs(3));
        nats.restart(node);
    }
    let ran = child.wait_with_output().expect("reaped");
    let stderr = String::from_utf8_lossy(&ran.stderr);
    assert!(ran.status.success(), "the job finishes: {stderr}");
    assert!(
        stderr.contains("publishing the epoch again"),
        "the sink met the outage: {stderr}"
    );
    weir_tests::check_exact_updates(&output(&url, name), &expected)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Deletes the consumers of stream `<name>-in` not in `before` (as a
/// node's death or a leader election can), once there are `expected` of
/// them.
fn delete_new_input_consumers(url: &str, name: &str, before: &[String], expected: usize) {
    let started = std::time::Instant::now();
    let consumers = loop {
        let consumers: Vec<String> = input_consumers(url, name)
            .into_iter()
            .map(|(consumer, _)| consumer)
            .filter(|consumer| !before.contains(consumer))
            .collect();
        if consumers.len() >= expected {
            break consumers;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the source never read: {consumers:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    runtime().block_on(async {
        let js = context(url).await;
        let stream = js
            .get_stream(format!("{name}-in"))
            .await
            .expect("the input stream");
        for consumer in consumers {
            stream
                .delete_consumer(&consumer)
                .await
                .unwrap_or_else(|e| panic!("deleting consumer {consumer}: {e}"));
        }
    });
}

/// Waits until stream `<name>-out` holds `count` updates.
fn wait_output(url: &str, name: &str, count: usize) {
    let started = std::time::Instant::now();
    while output(url, name).len() < count {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the job published {} of {count} updates",
            output(url, name).len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A restored source whose partition readers are recreated before they
/// delivered anything (their consumers deleted, as a NATS node's death
/// can) reads on from its positions: the client recreates such a reader
/// from the stream's first message, and what comes before the position is
/// not read twice.
#[test]
fn a_restored_source_whose_readers_are_recreated_reads_nothing_twice() {
    let Some(url) = server() else { return };
    let job = JobDir::new();
    let name = "recreated";
    let first = input_lines(1_200, 11);
    let more = input_lines(600, 12);
    prepare_streams(&url, name, &first);
    let unbounded = |text: String| text.replace("bounded = true", "bounded = false");
    job.job(&unbounded(count_job(&url, name, 2, 100_000, "checkpoints")));
    let args = ["run", "job.toml", "-q", "--savepoint-dir", "savepoints"];
    let running = spawn_weir(&args, job.path(), &[]);
    wait_output(&url, name, first.len() * 4);
    let savepoint = stop_with_savepoint(running, &job.path().join("savepoints"))
        .to_string_lossy()
        .into_owned();
    // Restored at the end of every partition: nothing to deliver, so the
    // readers are recreated before their first message.
    let mut resumed = args.to_vec();
    resumed.extend(["-s", &savepoint]);
    let before: Vec<String> = input_consumers(&url, name)
        .into_iter()
        .map(|(consumer, _)| consumer)
        .collect();
    let running = spawn_weir(&resumed, job.path(), &[]);
    delete_new_input_consumers(&url, name, &before, 6);
    // The client recreates a deleted consumer after a backoff.
    std::thread::sleep(Duration::from_secs(3));
    append_lines(&url, name, &[0, 1, 2, 3, 4, 5], &more);
    let all: Vec<String> = first.iter().chain(&more).cloned().collect();
    wait_output(&url, name, all.len() * 4);
    // Anything read twice would be counted by now, or soon.
    std::thread::sleep(Duration::from_secs(2));
    stop_with_savepoint(running, &job.path().join("savepoints"));
    weir_tests::check_exact_updates(
        &output(&url, name),
        &weir_tests::count_words(&all.join("\n")),
    )
    .unwrap_or_else(|e| panic!("after the readers were recreated: {e}"));
}
