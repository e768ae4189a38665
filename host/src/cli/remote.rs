//! The client verbs of a running host (`--host URL` or `WEIR_HOST`):
//! `weir run --host`, `list`, `job`, `cancel`, `stop`, `savepoint JOB`,
//! `upgrade`, `plugin add/list/remove`. Each is one or two API calls; long
//! operations are followed until they finish unless `--detach`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::control::api::{ErrorBody, PluginEntry};
use crate::control::fork::ForkRequest;
use crate::control::jobs::{SavepointRequest, SubmitRequest, UpgradeRequest};
use crate::control::record::{JobDetail, JobRecord, JobSummary, Operation, OperationStatus};
use crate::control::store::StoredPlugin;
use crate::types::Location;

/// A client of one host.
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// `host`: `http://127.0.0.1:8081` or `127.0.0.1:8081`.
    pub fn new(host: &str, token: Option<String>) -> Result<Self> {
        let base = if host.contains("://") {
            host.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", host.trim_end_matches('/'))
        };
        let http = reqwest::Client::builder()
            .build()
            .context("cannot create the HTTP client")?;
        Ok(Self { base, token, http })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> Result<T> {
        let response = request
            .send()
            .await
            .map_err(|e| anyhow!("cannot reach the host at {}: {}", self.base, root_cause(&e)))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| anyhow!("reading the host's answer: {}", root_cause(&e)))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            bail!("{message} (HTTP {})", status.as_u16());
        }
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the host's answer is not what this client expects: {}",
                String::from_utf8_lossy(&bytes)
            )
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        self.send(self.request(reqwest::Method::POST, path).json(body))
            .await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.request(reqwest::Method::DELETE, path)).await
    }

    /// Uploads a plugin file to the store.
    pub async fn add_plugin(&self, file: &Path) -> Result<StoredPlugin> {
        let bytes = tokio::fs::read(file)
            .await
            .with_context(|| format!("cannot read plugin file {}", file.display()))?;
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let request = self
            .request(reqwest::Method::POST, "/api/plugins")
            .query(&[("file", name)])
            .header(reqwest::header::CONTENT_TYPE, "application/wasm")
            .body(bytes);
        self.send(request).await
    }

    /// Follows an operation until it finishes.
    pub async fn wait(&self, job: &str, operation: &str) -> Result<Operation> {
        loop {
            let current: Operation = self
                .get(&format!("/api/jobs/{job}/operations/{operation}"))
                .await?;
            if current.status != OperationStatus::Running {
                return Ok(current);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn root_cause(error: &dyn std::error::Error) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// An absolute path for the host (it resolves nothing against the
/// client's directory).
fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}

/// [`absolute`] of an optional path, as the API's requests carry it.
fn absolute_text(path: Option<&Path>) -> Result<Option<String>> {
    Ok(path
        .map(absolute)
        .transpose()?
        .map(|p| p.display().to_string()))
}

/// A job file as the host takes it: its text, where its relative paths
/// resolve, and its plugin files uploaded to the store first.
async fn job_request(client: &Client, job: &Path) -> Result<SubmitRequest> {
    let text = std::fs::read_to_string(job)
        .with_context(|| format!("cannot read job file {}", job.display()))?;
    let job = absolute(job)?;
    let base_dir = job.parent().unwrap_or(Path::new("/")).to_path_buf();
    let file = crate::job::JobFile::parse(&text, &job)?;
    let mut plugins = BTreeMap::new();
    for operator in &file.operators {
        let path = base_dir.join(&operator.plugin);
        if plugins.contains_key(&operator.plugin) || !path.is_file() {
            continue;
        }
        let stored = client.add_plugin(&path).await?;
        eprintln!(
            "uploaded {} as {} (sha256 {})",
            operator.plugin,
            stored.reference(),
            &stored.digest[..12]
        );
        plugins.insert(operator.plugin.clone(), stored.digest);
    }
    Ok(SubmitRequest {
        job_file: text,
        file_name: job.file_name().map(|n| n.to_string_lossy().into_owned()),
        base_dir,
        plugins,
        from_savepoint: None,
        allow_non_restored_state: false,
    })
}

/// `weir run JOB --host`: uploads the job's plugin files, submits the job,
/// prints its id.
pub async fn submit(
    client: &Client,
    job: &Path,
    from_savepoint: Option<&Location>,
    allow_non_restored_state: bool,
) -> Result<()> {
    let from_savepoint = match from_savepoint {
        Some(Location::Local(path)) => absolute_text(Some(path))?,
        Some(remote) => Some(remote.to_string()),
        None => None,
    };
    let request = SubmitRequest {
        from_savepoint,
        allow_non_restored_state,
        ..job_request(client, job).await?
    };
    let record: JobRecord = client.post("/api/jobs", &request).await?;
    eprintln!("job `{}` submitted, job id {}", record.name, record.id);
    outln!("{}", record.id)?;
    Ok(())
}

fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub async fn list(client: &Client, json: bool) -> Result<()> {
    let jobs: Vec<JobSummary> = client.get("/api/jobs").await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&jobs)?)?;
        return Ok(());
    }
    if jobs.is_empty() {
        outln!("no jobs")?;
    }
    for job in jobs {
        let host = match (&job.host, job.host_live) {
            (Some(h), Some(false)) => format!("  on {h} (not live)"),
            (Some(h), _) => format!("  on {h}"),
            (None, _) if !job.stages.is_empty() => {
                format!("  as stages {}", job.stages.join(" "))
            }
            (None, _) => String::new(),
        };
        outln!(
            "{}  {:<12} {:<20} since {}  {}{host}",
            job.id,
            job.status.as_str(),
            job.name,
            time(job.since_ms),
            job.plugins.join(" ")
        )?;
    }
    Ok(())
}

pub async fn hosts(client: &Client, json: bool) -> Result<()> {
    let hosts: crate::control::cluster::Hosts = client.get("/api/hosts").await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&hosts)?)?;
        return Ok(());
    }
    match (&hosts.cluster, &hosts.coordinator) {
        (Some(name), Some(c)) => outln!(
            "cluster {name}: {} hosts, coordinator {} (term {}, since {})",
            hosts.hosts.len(),
            c.host,
            c.term,
            time(c.since_ms)
        )?,
        (Some(name), None) => outln!(
            "cluster {name}: {} hosts, no coordinator right now",
            hosts.hosts.len()
        )?,
        (None, _) => outln!("a host on its own (no cluster)")?,
    }
    for host in &hosts.hosts {
        let m = &host.member;
        let role = match (host.coordinator, host.this) {
            (true, true) => "coordinator, this host",
            (true, false) => "coordinator",
            (false, true) => "this host",
            (false, false) => "",
        };
        outln!(
            "{:<16} {:<28} weir {:<8} {} jobs ({} running)  up since {}  {role}",
            m.id,
            m.api,
            m.version,
            m.jobs,
            m.running,
            time(m.started_ms)
        )?;
    }
    Ok(())
}

pub async fn show(client: &Client, id: &str, json: bool) -> Result<()> {
    let detail: JobDetail = client.get(&format!("/api/jobs/{id}")).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&detail)?)?;
        return Ok(());
    }
    let job = &detail.job;
    outln!("job       {} ({})", job.name, job.id)?;
    outln!(
        "status    {} since {}",
        job.lifecycle.status(),
        time(
            job.lifecycle
                .history()
                .last()
                .map_or(job.submitted_ms, |t| t.time_ms)
        )
    )?;
    if !detail.operators.is_empty() {
        outln!("operators")?;
    }
    for op in &detail.operators {
        let plugin = op
            .plugin
            .as_ref()
            .map(|p| format!("  {} ({})", p.plugin, &p.digest[..12.min(p.digest.len())]))
            .unwrap_or_default();
        let states: Vec<String> = op
            .state_keys
            .iter()
            .map(|(name, keys)| format!("`{name}` {keys} keys"))
            .collect();
        outln!(
            "  {:<12} {:<8} p={}  in {}  out {}{plugin}{}",
            op.uid,
            op.role,
            op.parallelism,
            op.records_in,
            op.records_out,
            if states.is_empty() {
                String::new()
            } else {
                format!("  state {}", states.join(", "))
            }
        )?;
    }
    for stage in &detail.stages {
        outln!(
            "stage {:<12} task {}/{}  job {}  {:<12} on {}  {} checkpoints  runs {}",
            stage.name,
            stage.task,
            stage.tasks,
            stage.job,
            stage.status.map_or("unknown", |s| s.as_str()),
            stage.host.as_deref().unwrap_or("no host yet"),
            stage.checkpoints_completed,
            stage.uids.join(", ")
        )?;
    }
    outln!(
        "checkpoints  {} completed, {} failed (current run)",
        detail.checkpoints_completed,
        detail.checkpoints_failed
    )?;
    for c in detail.checkpoints.iter().rev().take(5) {
        outln!(
            "  chk-{:<6} {}  {:.0} ms  alignment {:.1} ms  {}",
            c.id,
            time(c.completed_ms),
            c.duration_ms,
            c.alignment_ms,
            crate::human::bytes(c.bytes)
        )?;
    }
    if !job.restarts.is_empty() {
        outln!("restarts  {}", job.restarts.len())?;
    }
    if let Some(error) = &job.last_error {
        outln!("last error  {error}")?;
    }
    for s in &job.savepoints {
        outln!("savepoint {}  {}", time(s.time_ms), s.path)?;
    }
    if let Some(from) = &job.forked_from {
        outln!(
            "forked from {}  {}  savepoint {}",
            from.job,
            time(from.time_ms),
            from.savepoint
        )?;
    }
    for fork in &job.forks {
        outln!(
            "fork      {}  {}  savepoint {}",
            fork.job,
            time(fork.time_ms),
            fork.savepoint
        )?;
    }
    for u in &job.upgrades {
        outln!(
            "upgrade   {}  {}  {}{}{}",
            time(u.time_ms),
            u.change,
            u.outcome,
            u.downtime_ms
                .map(|d| format!("  downtime {d:.0} ms"))
                .unwrap_or_default(),
            u.error
                .as_ref()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        )?;
    }
    for o in &job.operations {
        outln!(
            "operation {}  {:<9} {:<9} {}{}",
            o.id,
            format!("{:?}", o.kind).to_lowercase(),
            format!("{:?}", o.status).to_lowercase(),
            time(o.requested_ms),
            o.error
                .as_ref()
                .or(o.outcome.as_ref())
                .map(|text| format!("  {text}"))
                .unwrap_or_default()
        )?;
    }
    outln!("history")?;
    for t in job.lifecycle.history() {
        outln!("  {}  {:<12} {}", time(t.time_ms), t.to.as_str(), t.cause)?;
    }
    Ok(())
}

/// Prints an operation's outcome; an error if it failed.
fn report(operation: &Operation) -> Result<()> {
    if let Some(path) = &operation.savepoint {
        eprintln!("savepoint {path}");
        outln!("{path}")?;
    }
    if let Some(downtime) = operation.downtime_ms {
        eprintln!("downtime  {downtime:.0} ms");
    }
    if let Some(outcome) = &operation.outcome {
        eprintln!("{outcome}");
    }
    match (&operation.status, &operation.error) {
        (OperationStatus::Failed, Some(error)) => bail!("{error}"),
        (OperationStatus::Failed, None) => bail!("operation {} failed", operation.id),
        _ => Ok(()),
    }
}

/// Follows an accepted operation, or prints its id with `--detach`.
pub async fn follow(client: &Client, job: &str, operation: Operation, detach: bool) -> Result<()> {
    if detach {
        eprintln!(
            "operation {} accepted; follow it with `weir job {job}`",
            operation.id
        );
        outln!("{}", operation.id)?;
        return Ok(());
    }
    let done = client.wait(job, &operation.id).await?;
    report(&done)
}

/// `weir savepoint JOB [DIR]` (`stop`: None) and `weir stop JOB`
/// (`stop`: whether to drain first).
pub async fn savepoint(
    client: &Client,
    job: &str,
    target: Option<&Path>,
    stop: Option<bool>,
    detach: bool,
) -> Result<()> {
    let request = SavepointRequest {
        target_dir: absolute_text(target)?,
        drain: stop.unwrap_or(false),
        aligned: false,
        cut: None,
    };
    let endpoint = if stop.is_some() { "stop" } else { "savepoints" };
    let operation = client
        .post(&format!("/api/jobs/{job}/{endpoint}"), &request)
        .await?;
    follow(client, job, operation, detach).await
}

pub async fn cancel(client: &Client, job: &str, detach: bool) -> Result<()> {
    let operation = client
        .post(&format!("/api/jobs/{job}/cancel"), &serde_json::json!({}))
        .await?;
    follow(client, job, operation, detach).await
}

/// `weir upgrade`'s arguments.
#[derive(Debug, clap::Args)]
pub struct UpgradeArgs {
    pub job_id: String,
    /// UID=NAME@VERSION, UID=NAME or UID=FILE (a file is uploaded first).
    #[arg(long = "plugin", value_name = "UID=PLUGIN")]
    pub plugins: Vec<String>,
    /// UID=N: the operator's new parallelism.
    #[arg(long = "parallelism", value_name = "UID=N")]
    pub parallelism: Vec<String>,
    /// A new job file (same uids; its plugins resolve as on `weir run --host`).
    #[arg(long, value_name = "FILE")]
    pub job_file: Option<PathBuf>,
    /// Skip savepoint state of uids or states the new version no longer has.
    #[arg(short = 'n', long)]
    pub allow_non_restored_state: bool,
    /// Longest probation (e.g. 60s); it ends early once the new version
    /// completed 2 checkpoints.
    #[arg(long, value_name = "DURATION")]
    pub probation: Option<String>,
    /// Completed checkpoints that end the probation early (default: the
    /// host's, 2).
    #[arg(long, value_name = "N")]
    pub probation_checkpoints: Option<u64>,
    /// Return once the upgrade is accepted.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Debug, clap::Args)]
pub struct ForkArgs {
    pub job_id: String,
    /// The fork's job file (its sinks must write elsewhere than the
    /// job's; its plugins resolve as on `weir run --host`). Default: the
    /// job's own.
    #[arg(long, value_name = "FILE")]
    pub job_file: Option<PathBuf>,
    /// UID=NAME@VERSION, UID=NAME or UID=FILE: the plugin the fork runs
    /// instead (a file is uploaded first).
    #[arg(long = "plugin", value_name = "UID=PLUGIN")]
    pub plugins: Vec<String>,
    /// The fork's name (default: the job's, with `-fork`).
    #[arg(long)]
    pub name: Option<String>,
    /// Skip savepoint state of uids or states the fork no longer has.
    #[arg(short = 'n', long)]
    pub allow_non_restored_state: bool,
}

/// `--plugin UID=…` values as the API takes them (files uploaded first).
async fn plugin_references(
    client: &Client,
    pairs: &[String],
) -> Result<std::collections::BTreeMap<String, String>> {
    let mut references = std::collections::BTreeMap::new();
    for pair in pairs {
        let (uid, value) = split_pair("plugin", pair)?;
        let path = Path::new(value);
        let reference = if path.is_file() {
            let stored = client.add_plugin(path).await?;
            eprintln!("uploaded {value} as {}", stored.reference());
            format!("sha256:{}", stored.digest)
        } else {
            value.to_string()
        };
        references.insert(uid.to_string(), reference);
    }
    Ok(references)
}

pub async fn fork(client: &Client, args: &ForkArgs) -> Result<()> {
    let request = ForkRequest {
        job_file: match &args.job_file {
            Some(file) => Some(job_request(client, file).await?),
            None => None,
        },
        plugins: plugin_references(client, &args.plugins).await?,
        name: args.name.clone(),
        allow_non_restored_state: args.allow_non_restored_state,
    };
    let record: JobRecord = client
        .post(&format!("/api/jobs/{}/fork", args.job_id), &request)
        .await?;
    let from = record
        .forked_from
        .as_ref()
        .map_or_else(String::new, |f| format!(" from savepoint {}", f.savepoint));
    eprintln!(
        "job `{}` forked from {}{from}, job id {}",
        record.name, args.job_id, record.id
    );
    outln!("{}", record.id)?;
    Ok(())
}

fn split_pair<'a>(flag: &str, pair: &'a str) -> Result<(&'a str, &'a str)> {
    pair.split_once('=')
        .filter(|(uid, value)| !uid.is_empty() && !value.is_empty())
        .ok_or_else(|| anyhow!("--{flag} {pair:?}: expected UID=VALUE"))
}

pub async fn upgrade(client: &Client, args: &UpgradeArgs) -> Result<()> {
    let mut request = UpgradeRequest {
        allow_non_restored_state: args.allow_non_restored_state,
        probation: args.probation.clone(),
        probation_checkpoints: args.probation_checkpoints,
        ..UpgradeRequest::default()
    };
    request.plugins = plugin_references(client, &args.plugins).await?;
    for pair in &args.parallelism {
        let (uid, value) = split_pair("parallelism", pair)?;
        let n = value
            .parse()
            .map_err(|_| anyhow!("--parallelism {pair:?}: N must be a positive number"))?;
        request.parallelism.insert(uid.to_string(), n);
    }
    if let Some(file) = &args.job_file {
        request.job_file = Some(job_request(client, file).await?);
    }
    let operation = client
        .post(&format!("/api/jobs/{}/upgrade", args.job_id), &request)
        .await?;
    follow(client, &args.job_id, operation, args.detach).await
}

pub async fn plugin_add(client: &Client, files: &[PathBuf]) -> Result<()> {
    for file in files {
        let stored = client.add_plugin(file).await?;
        outln!(
            "{}  sha256 {}  {}  compiled in {:.0} ms",
            stored.reference(),
            stored.digest,
            crate::human::bytes(stored.size),
            stored.compile_ms
        )?;
    }
    Ok(())
}

pub async fn plugin_list(client: &Client, json: bool) -> Result<()> {
    let plugins: Vec<PluginEntry> = client.get("/api/plugins").await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&plugins)?)?;
        return Ok(());
    }
    if plugins.is_empty() {
        outln!("no plugins")?;
    }
    for entry in plugins {
        let p = &entry.plugin;
        let states: Vec<String> = p
            .states
            .iter()
            .map(|s| match &s.ttl {
                Some(ttl) => format!("{} ({} v{}, TTL {ttl})", s.name, s.kind, s.schema_version),
                None => format!("{} ({} v{})", s.name, s.kind, s.schema_version),
            })
            .collect();
        outln!(
            "{:<24} {}  {:>9}  compiled {:>5.0} ms  states: {}  jobs: {}",
            p.reference(),
            &p.digest[..12],
            crate::human::bytes(p.size),
            p.compile_ms,
            if states.is_empty() {
                "none".to_string()
            } else {
                states.join(", ")
            },
            if entry.jobs.is_empty() {
                "none".to_string()
            } else {
                entry.jobs.join(", ")
            }
        )?;
    }
    Ok(())
}

pub async fn plugin_remove(client: &Client, reference: &str) -> Result<()> {
    let removed: StoredPlugin = client.delete(&format!("/api/plugins/{reference}")).await?;
    eprintln!("removed {}", removed.reference());
    Ok(())
}
