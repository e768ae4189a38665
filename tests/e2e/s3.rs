//! Checkpoints on object storage against a real S3 endpoint (SeaweedFS,
//! `weir_tests::s3`): the helpers the other tests use (a bucket, the
//! newest checkpoint under a prefix) and the start's checks of a bad
//! bucket or bad credentials.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::support::{JobDir, toml_path, weir_env};
use weir_tests::plugins::WORDCOUNT_COUNT;
use weir_tests::s3::S3Server;

/// The bucket the tests use (created on first use).
pub const BUCKET: &str = "weir-tests";

fn store(server: &S3Server, bucket: &str) -> impl ObjectStore {
    server.client(bucket)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The S3 server with [`BUCKET`] in it; None when the server cannot be had
/// outside CI.
pub fn server() -> Option<&'static S3Server> {
    let server = weir_tests::s3::server()?;
    static BUCKET_MADE: std::sync::Once = std::sync::Once::new();
    BUCKET_MADE.call_once(|| server.bucket(BUCKET));
    Some(server)
}

/// The newest completed checkpoint under `s3://BUCKET/<prefix>` (as an
/// `s3://` location of its directory), by completion time.
pub fn newest_checkpoint(server: &S3Server, prefix: &str) -> Option<String> {
    let store = store(server, BUCKET);
    runtime().block_on(async {
        let objects: Vec<_> = store
            .list(Some(&ObjectPath::from(prefix)))
            .try_collect()
            .await
            .expect("listing the checkpoints");
        let scratch = tempfile::tempdir().expect("tempdir");
        let mut found = Vec::new();
        for object in objects {
            let path = object.location.to_string();
            if !path.ends_with("/_metadata") {
                continue;
            }
            let bytes = store
                .get(&object.location)
                .await
                .expect("get")
                .bytes()
                .await
                .expect("bytes");
            let local = scratch.path().join("_metadata");
            std::fs::write(&local, &bytes).expect("write");
            let read = weir::checkpoint::metadata::read(&local).expect("a checkpoint's metadata");
            let dir = path.trim_end_matches("/_metadata").to_string();
            found.push((read.metadata.completed_ms, read.metadata.checkpoint, dir));
        }
        found.sort();
        found
            .pop()
            .map(|(_, _, dir)| format!("s3://{BUCKET}/{dir}"))
    })
}

/// Every object key under `s3://BUCKET/<prefix>`.
pub fn objects(server: &S3Server, prefix: &str) -> Vec<String> {
    let store = store(server, BUCKET);
    runtime().block_on(async {
        let listed: Vec<_> = store
            .list(Some(&ObjectPath::from(prefix)))
            .try_collect()
            .await
            .expect("listing");
        listed.into_iter().map(|o| o.location.to_string()).collect()
    })
}

/// A unique prefix for one test's objects.
pub fn prefix(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        weir::runner::new_job_id()
    )
}

/// A generator → count → file job checkpointing to `dir`.
fn count_job(dir: &str) -> String {
    count_job_at(dir, 3000)
}

/// [`count_job`] with the generator at `rate` records per second.
fn count_job_at(dir: &str, rate: u32) -> String {
    format!(
        r#"
name = "s3-count"
max_parallelism = 32

[checkpoint]
interval = "100ms"
dir = "{dir}"
retained = 2

[[source]]
uid = "words"
kind = "generator"
count = 3000
rate = {rate}
keys = 50

[[operator]]
uid = "count"
plugin = {plugin}
inputs = [{{ from = "words", partition = "key" }}]
parallelism = 2

[[sink]]
uid = "out"
kind = "file"
path = "out"
inputs = ["count"]
"#,
        plugin = toml_path(WORDCOUNT_COUNT),
    )
}

#[test]
fn checkpoints_on_s3_are_mirrored_retained_and_restore_a_job() {
    let Some(server) = server() else { return };
    let job = JobDir::new();
    let prefix = prefix("mirror");
    job.job(&count_job(&format!("s3://{BUCKET}/{prefix}")));
    let env = server.env();
    let run = weir_env(&["run", "job.toml", "-q"], job.path(), &env);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stored = objects(server, &prefix);
    let metadata: Vec<&String> = stored
        .iter()
        .filter(|o| o.ends_with("/_metadata"))
        .collect();
    assert_eq!(metadata.len(), 2, "retained = 2 on S3: {stored:?}");
    assert!(
        stored.iter().any(|o| o.contains("/shared/")),
        "shared state files on S3: {stored:?}"
    );
    let staging: PathBuf = job.path().join("weir-data/state/checkpoint-staging");
    assert!(
        !staging.read_dir().is_ok_and(|mut d| d.next().is_some()),
        "the local staging is removed at the end"
    );
    // The finished job's newest checkpoint restores from S3 and commits
    // nothing twice.
    let before = weir_tests::read_parts(&job.path().join("out"));
    let newest = newest_checkpoint(server, &prefix).expect("a checkpoint on S3");
    let resumed = weir_env(&["run", "job.toml", "-q", "-s", &newest], job.path(), &env);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(weir_tests::read_parts(&job.path().join("out")), before);
    let mut expected = std::collections::BTreeMap::new();
    crate::checkpoints::generator_counts(3000, 50, 0, &mut expected);
    weir_tests::check_exact_updates(&before, &expected).expect("every update once");
}

#[test]
fn a_missing_bucket_or_refused_credentials_fail_the_start() {
    let Some(server) = server() else { return };
    let cases = [
        (
            format!("s3://no-such-bucket-{}/x", std::process::id()),
            server.env(),
            "the bucket does not exist",
        ),
        (
            format!("s3://{BUCKET}/x"),
            server
                .env()
                .into_iter()
                .map(|(k, v)| {
                    if k == "AWS_SECRET_ACCESS_KEY" {
                        (k, "wrong".to_string())
                    } else {
                        (k, v)
                    }
                })
                .collect(),
            "the credentials were refused",
        ),
    ];
    for (dir, env, wanted) in cases {
        let job = JobDir::new();
        job.job(&count_job(&dir));
        let run = weir_env(&["run", "job.toml", "-q"], job.path(), &env);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{dir}: the start fails");
        assert!(
            stderr.contains(&format!("[checkpoint] dir {dir}")) && stderr.contains(wanted),
            "{dir}: `{wanted}` in {stderr}"
        );
        assert!(!stderr.contains("started"), "{stderr}");
        assert!(
            !job.path().join("out").exists(),
            "nothing written: {stderr}"
        );
    }
}

/// Runs the job in `dir` for `for_ms`, then stops it with a savepoint in
/// `target` (SIGTERM); returns the savepoint's location as printed.
fn stop_with_savepoint(
    dir: &std::path::Path,
    target: &str,
    for_ms: u64,
    env: &[(&str, String)],
) -> String {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", "job.toml", "-q", "--savepoint-dir", target])
        .current_dir(dir)
        .env("WEIR_CACHE_DIR", weir_tests::compile_cache())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("weir starts");
    std::thread::sleep(Duration::from_millis(for_ms));
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let output = child.wait_with_output().expect("reaped");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stop with a savepoint: {stderr}");
    let printed = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        !printed.is_empty(),
        "the savepoint's location is printed: {stderr}"
    );
    printed
}

#[test]
fn savepoints_move_between_s3_and_the_local_disk() {
    let Some(server) = server() else { return };
    let env = server.env();
    let mut expected = std::collections::BTreeMap::new();
    crate::checkpoints::generator_counts(3000, 50, 0, &mut expected);

    // Local checkpoints, a savepoint on S3, restored into a local run.
    let job = JobDir::new();
    let prefix = prefix("savepoints");
    job.job(&count_job_at("checkpoints", 1000));
    let on_s3 = stop_with_savepoint(job.path(), &format!("s3://{BUCKET}/{prefix}"), 1200, &env);
    assert!(
        on_s3.starts_with(&format!("s3://{BUCKET}/{prefix}/savepoint-")),
        "{on_s3}"
    );
    let inspect = weir_env(
        &["savepoint", "inspect", &on_s3, "--json"],
        job.path(),
        &env,
    );
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("JSON");
    assert_eq!(shown["kind"], "savepoint", "{shown}");
    assert_eq!(shown["path"], on_s3.as_str(), "{shown}");
    job.job(&count_job_at("checkpoints", 100_000));
    let resumed = weir_env(&["run", "job.toml", "-q", "-s", &on_s3], job.path(), &env);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    weir_tests::check_exact_updates(&weir_tests::read_parts(&job.path().join("out")), &expected)
        .expect("every update once, across S3 → local");
    let disposed = weir_env(&["savepoint", "--dispose", &on_s3], job.path(), &env);
    assert!(
        disposed.status.success(),
        "{}",
        String::from_utf8_lossy(&disposed.stderr)
    );
    let savepoint_key = on_s3.trim_start_matches(&format!("s3://{BUCKET}/"));
    assert!(
        objects(server, savepoint_key).is_empty(),
        "disposed of on S3"
    );

    // A local savepoint restored into a run checkpointing to S3.
    let job = JobDir::new();
    job.job(&count_job_at("checkpoints", 1000));
    let local = stop_with_savepoint(job.path(), "savepoints", 1200, &env);
    job.job(&count_job_at(
        &format!("s3://{BUCKET}/{prefix}/checkpoints"),
        100_000,
    ));
    let resumed = weir_env(&["run", "job.toml", "-q", "-s", &local], job.path(), &env);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    weir_tests::check_exact_updates(&weir_tests::read_parts(&job.path().join("out")), &expected)
        .expect("every update once, across local → S3");
    assert!(
        objects(server, &format!("{prefix}/checkpoints"))
            .iter()
            .any(|o| o.ends_with("/_metadata")),
        "the resumed run checkpointed to S3"
    );

    // The local savepoint copied to S3 as it is restores from there.
    let copied = format!("{prefix}/copied");
    upload_dir(server, &job.path().join(&local), &copied);
    std::fs::remove_dir_all(job.path().join("out")).expect("clear the output");
    job.job(&count_job_at("checkpoints", 100_000));
    let from_s3 = format!("s3://{BUCKET}/{copied}");
    let resumed = weir_env(&["run", "job.toml", "-q", "-s", &from_s3], job.path(), &env);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let lines = weir_tests::read_parts(&job.path().join("out"));
    let mut after = std::collections::BTreeMap::new();
    for line in &lines {
        let (word, n) = line.rsplit_once(' ').expect("word count");
        let n: u64 = n.parse().expect("a count");
        let newest = after.entry(word.to_string()).or_insert(0);
        *newest = (*newest).max(n);
    }
    assert_eq!(
        after, expected,
        "the counts carry on from the copied savepoint"
    );
}

/// Uploads every file under `local` to `s3://BUCKET/<prefix>/…`.
fn upload_dir(server: &S3Server, local: &Path, prefix: &str) {
    fn walk(dir: &Path, into: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("readable").flatten() {
            if entry.path().is_dir() {
                walk(&entry.path(), into);
            } else {
                into.push(entry.path());
            }
        }
    }
    let mut files = Vec::new();
    walk(local, &mut files);
    let store = store(server, BUCKET);
    runtime().block_on(async {
        for file in files {
            let relative = file
                .strip_prefix(local)
                .expect("below")
                .to_string_lossy()
                .into_owned();
            let bytes = std::fs::read(&file).expect("read");
            store
                .put(
                    &ObjectPath::from(format!("{prefix}/{relative}")),
                    bytes.into(),
                )
                .await
                .expect("put");
        }
    });
}
