//! The running host (`weir serve`): the layer above the embedded runner
//! that platform teams run for weeks. It drives the same engine path as
//! `weir run` ([`crate::runner`]); what it adds:
//!
//! - [`api`]: the HTTP/JSON control API (axum), bearer-token checked, its
//!   OpenAPI document generated from the code; handlers are thin and map
//!   [`ControlError`] to status codes in one place.
//! - [`store`]: the plugin store (validated and precompiled on arrival,
//!   content-addressed by sha256, indexed by `name@version`).
//! - [`watch`]: the watched plugin directory (`plugins/incoming/`).
//! - [`jobs`]: the job manager (submit, list, operations, resume at start,
//!   stop at shutdown).
//! - [`driver`]: one task per job, the only owner of its transitions: a
//!   state machine of steps that each read the job's commands and run
//!   events while they work.
//! - [`run`]: one run of the engine for a job, as a task reporting to its
//!   driver.
//! - [`lifecycle`]: the job state machine (statuses, transitions, which
//!   operations each status accepts).
//! - the procedures, each reading top to bottom in its module:
//!   [`savepoint`], [`stop`] (stop, cancel, the host's shutdown) and
//!   [`upgrade`] (check, standby, stop, restore, probation, rollback).
//! - [`views`]: what the API shows of a job's current run.
//! - [`record`]: what is persisted per job (also the API's answers).
//! - [`durable`]: the data dir as a cap-std handle; atomic, durable writes.
//! - [`json`]: what the API's request types need beyond serde's and
//!   utoipa's derives (whole numbers written `2.0`, bounds on map values).
//! - [`cluster`]: membership of a cluster of hosts (`--cluster`): live
//!   hosts and the coordinator lease in NATS JetStream key-value buckets;
//!   the plugin store the hosts share ([`cluster::plugins`]).
//!
//! A job stays in its place: every path a job names (file sources and
//! sinks, `from_savepoint`, savepoint targets) must lie inside the host's
//! job roots ([`crate::roots`], `[jobs] roots`), checked by
//! `jobs::build_graph` and the savepoint requests; file sources and sinks
//! open their files, and the checkpoint coordinator a savepoint target's
//! directory, through the roots' cap-std handles.
//!
//! Data dir layout: `plugins/` (`blobs/`, `index.json`, `compiled/`,
//! `incoming/`, `rejected/`), `jobs/<job id>/` (`job.toml`, `job.json`),
//! `checkpoints/<run id>/`, `savepoints/`, `state/` (working state).

pub mod api;
pub mod cluster;
mod confine;
pub mod dashboard;
pub mod driver;
pub mod durable;
pub mod fork;
pub mod jobs;
pub mod json;
pub mod lifecycle;
pub mod record;
pub mod run;
pub mod savepoint;
mod staged;
pub mod stop;
pub mod store;
pub mod upgrade;
pub mod views;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::plugin::PluginEngine;
use crate::roots::Roots;
use durable::DataDir;
use jobs::JobManager;
use store::PluginStore;

/// Errors of the control layer; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// 400: a malformed request or job file.
    #[error("{0}")]
    BadRequest(String),
    /// 401.
    #[error("missing or wrong bearer token (send `Authorization: Bearer <token>`)")]
    Unauthorized,
    /// 404: no such job, plugin or operation.
    #[error("{0}")]
    NotFound(String),
    /// 405: the route has no such method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409: the job is busy or in the wrong status; a plugin is in use.
    #[error("{0}")]
    Conflict(String),
    /// 413: a plugin larger than the limit.
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// 503: what the answer needs (the cluster's NATS) does not answer.
    #[error("{0}")]
    Unavailable(String),
    /// 500.
    #[error("{0}")]
    Internal(String),
}

/// Errors starting the host.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "refusing to listen on {0} without a bearer token: anyone who can reach it could run code; give --token-file (or `token_file` in the config)"
    )]
    TokenRequired(SocketAddr),
    #[error("cannot listen on {address}: {cause}")]
    Listen {
        address: SocketAddr,
        cause: std::io::Error,
    },
    #[error("data dir: {0}")]
    DataDir(#[from] durable::DurableError),
    #[error("config file {file}: {message}")]
    Config { file: PathBuf, message: String },
    #[error("token file {file}: {message}")]
    Token { file: PathBuf, message: String },
    #[error(transparent)]
    Roots(#[from] crate::roots::RootError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Plugin(#[from] crate::plugin::PluginError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
}

/// What running jobs do when the host gets SIGTERM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownMode {
    /// Stop with a savepoint; the next start resumes from it.
    #[default]
    Savepoint,
    /// Cancel; the next start resumes from the newest checkpoint.
    Cancel,
}

/// `weir serve --config FILE` (TOML). Command-line flags win.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    /// Another watched plugin directory instead of `plugins/incoming/`.
    pub watch: Option<PathBuf>,
    #[serde(default)]
    pub on_shutdown: ShutdownMode,
    /// Largest plugin accepted, e.g. "256MiB".
    pub max_plugin_size: Option<crate::job::file::ByteSize>,
    /// Default upgrade probation, e.g. "60s".
    #[serde(default, with = "crate::job::file::humantime_serde_opt")]
    pub probation: Option<Duration>,
    /// Checkpoints that end an upgrade's probation early (default 2).
    pub probation_checkpoints: Option<u64>,
    #[serde(default)]
    pub jobs: JobsConfig,
    /// `[limits]`: state quotas of every job's operators that set none.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[cluster]`: join a cluster of hosts.
    pub cluster: Option<ClusterConfig>,
}

/// `[limits]` of the host's config: host-wide defaults of the state
/// quotas (see [`crate::state::quota`]); a job's `[limits]` and an
/// operator's `limits` override them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub value_bytes: Option<crate::job::file::ByteSize>,
    pub state_bytes: Option<crate::job::file::ByteSize>,
}

/// `[cluster]` of the host's config (see [`cluster::ClusterSettings`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS servers (`nats://host:port`).
    #[serde(default)]
    pub nats: Vec<String>,
    /// The cluster's name, its buckets' prefix (default `weir`).
    pub name: Option<String>,
    /// The cluster's object storage, `s3://bucket/prefix`.
    pub s3: Option<String>,
    /// This host's id (default: made once, kept in the data dir).
    pub host_id: Option<String>,
    /// How long a silent host stays a member (default 3s).
    #[serde(default, with = "crate::job::file::humantime_serde_opt")]
    pub lease: Option<Duration>,
    /// Copies JetStream keeps of each bucket (default 1; 3 on a 3-node
    /// NATS cluster).
    pub replicas: Option<usize>,
}

impl ClusterConfig {
    /// The settings, defaults filled in; `nats` from the command line
    /// (`--cluster`) replaces the config's when given.
    pub fn settings(&self, nats: &[String], name: Option<&str>) -> cluster::ClusterSettings {
        cluster::ClusterSettings {
            nats: if nats.is_empty() {
                self.nats.clone()
            } else {
                nats.to_vec()
            },
            name: name
                .map(str::to_string)
                .or(self.name.clone())
                .unwrap_or_else(|| "weir".to_string()),
            s3: self.s3.clone(),
            host_id: self.host_id.clone(),
            lease: self.lease.unwrap_or(cluster::DEFAULT_LEASE),
            replicas: self.replicas.unwrap_or(1),
        }
    }
}

/// `[jobs]` of the host's config: what a job may reach.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// The directories a job may name paths in: file sources and sinks,
    /// `from_savepoint`, savepoint targets (default: the data dir).
    pub roots: Option<Vec<PathBuf>>,
    /// Whether a job may grant a plugin the host's environment variables
    /// (`wasi = ["env"]`); refused by default: they hold the host's
    /// credentials.
    #[serde(default)]
    pub allow_wasi_env: bool,
}

impl ConfigFile {
    pub fn load(path: &std::path::Path) -> Result<Self, ServeError> {
        let text = std::fs::read_to_string(path).map_err(|e| ServeError::Config {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ServeError::Config {
            file: path.to_path_buf(),
            message: e.message().to_string(),
        })
    }
}

/// Settings of a running host.
#[derive(Debug, Clone)]
pub struct HostSettings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub token: Option<String>,
    pub watch: Option<PathBuf>,
    pub on_shutdown: ShutdownMode,
    pub max_plugin_bytes: u64,
    pub probation: Duration,
    pub probation_checkpoints: u64,
    /// The job roots (see [`crate::roots`]); None: the data dir.
    pub roots: Option<Vec<PathBuf>>,
    /// Jobs may grant plugins `wasi = ["env"]`.
    pub allow_wasi_env: bool,
    /// The cluster this host joins; None: a host on its own.
    pub cluster: Option<cluster::ClusterSettings>,
    /// State quotas of operators whose job sets none (`[limits]`).
    pub state_limits: crate::state::quota::StateLimits,
}

impl HostSettings {
    /// Defaults: 127.0.0.1:8081, `weir-data/`, no token (loopback only).
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            data_dir,
            token: None,
            watch: None,
            on_shutdown: ShutdownMode::Savepoint,
            max_plugin_bytes: store::DEFAULT_MAX_PLUGIN_BYTES,
            probation: Duration::from_secs(60),
            probation_checkpoints: 2,
            roots: None,
            allow_wasi_env: false,
            cluster: None,
            state_limits: Default::default(),
        }
    }

    /// Reads the token from a file (surrounding whitespace trimmed).
    pub fn read_token(file: &std::path::Path) -> Result<String, ServeError> {
        let text = std::fs::read_to_string(file).map_err(|e| ServeError::Token {
            file: file.to_path_buf(),
            message: e.to_string(),
        })?;
        let token = text.trim().to_string();
        if token.is_empty() {
            return Err(ServeError::Token {
                file: file.to_path_buf(),
                message: "it is empty".to_string(),
            });
        }
        Ok(token)
    }
}

/// What every part of the host shares.
pub struct HostContext {
    pub data: Arc<DataDir>,
    pub engine: Arc<PluginEngine>,
    pub store: Arc<PluginStore>,
    /// Where jobs may name paths, opened (canonical).
    pub roots: Arc<Roots>,
    pub settings: HostSettings,
    /// This host's membership of its cluster, once it joined one.
    pub cluster: std::sync::OnceLock<Arc<cluster::Cluster>>,
}

impl std::fmt::Debug for HostContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostContext")
            .field("data", &self.data.path())
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    crate::dataflow::now_millis() as u64
}

/// A started host.
#[derive(Debug)]
pub struct RunningHost {
    pub address: SocketAddr,
    pub jobs: Arc<JobManager>,
    pub context: Arc<HostContext>,
    /// This host's membership of its cluster, if it is in one.
    pub cluster: Option<Arc<cluster::Cluster>>,
    server: tokio::task::JoinHandle<()>,
    stop_server: tokio::sync::watch::Sender<bool>,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl RunningHost {
    /// Opens the data dir, resumes its live jobs, and serves the API.
    pub async fn start(settings: HostSettings) -> Result<Self, ServeError> {
        if settings.token.is_none() && !settings.listen.ip().is_loopback() {
            return Err(ServeError::TokenRequired(settings.listen));
        }
        let data = Arc::new(DataDir::open(&settings.data_dir)?);
        let roots = Arc::new(match &settings.roots {
            Some(roots) => Roots::open(roots)?,
            None => Roots::open(&[data.path().to_path_buf()])?,
        });
        // Working state is per run and rebuilt from checkpoints; a killed
        // host leaves its runs' behind.
        let working = data.join("state");
        if working.exists()
            && let Err(error) = std::fs::remove_dir_all(&working)
        {
            tracing::warn!(dir = %working.display(), %error, "cannot clear the working state");
        }
        for dir in ["plugins/incoming", "plugins/rejected", "jobs", "savepoints"] {
            data.create_dir_all(dir)?;
        }
        let engine = Arc::new(PluginEngine::new(Some(data.join("plugins/compiled")))?);
        let store = Arc::new(
            PluginStore::open(data.clone(), engine.clone(), settings.max_plugin_bytes)
                .map_err(ControlError::from)?,
        );
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .map_err(|source| ServeError::Listen {
                address: settings.listen,
                cause: source,
            })?;
        let address = listener.local_addr().map_err(|source| ServeError::Listen {
            address: settings.listen,
            cause: source,
        })?;
        let context = Arc::new(HostContext {
            data,
            engine,
            store,
            roots,
            settings,
            cluster: std::sync::OnceLock::new(),
        });
        let jobs = Arc::new(JobManager::new(context.clone()));
        let cluster = match &context.settings.cluster {
            Some(settings) => Some(Arc::new(
                join_cluster(&context, settings, address, &jobs).await?,
            )),
            None => None,
        };
        if let Some(cluster) = &cluster {
            let _ = context.cluster.set(cluster.clone());
        }
        let resumed = jobs.resume_all().await?;
        if resumed > 0 {
            tracing::info!(resumed, "resumed the jobs that were live");
        }
        if let Some(cluster) = &cluster {
            cluster.follow_assignments(Arc::new(jobs::ClusterOwner(Arc::downgrade(&jobs))));
            // Runs as long as the host: it acts only while this host is
            // the coordinator.
            staged::steward(cluster.clone(), context.settings.token.clone());
        }
        let watch_dir = context
            .settings
            .watch
            .clone()
            .unwrap_or_else(|| context.data.join("plugins/incoming"));
        let shared = cluster.as_ref().and_then(|c| c.plugins());
        let watcher = Some(watch::spawn(context.clone(), watch_dir, shared));
        let router = api::router(context.clone(), jobs.clone(), cluster.clone(), address);
        let (stop_server, mut stopped) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            if let Err(error) = axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(%error, "the API server stopped");
            }
        });
        tracing::info!(%address, data_dir = %context.data.path().display(), roots = %context.roots.describe(), "weir serve: listening");
        Ok(Self {
            address,
            jobs,
            context,
            cluster,
            server,
            stop_server,
            watcher,
        })
    }

    /// Stops every live job as configured (savepoint or cancel), then the
    /// API.
    pub async fn shutdown(mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.abort();
        }
        if let Some(cluster) = &self.cluster {
            cluster.stop_following_assignments();
        }
        let with_savepoint = self.context.settings.on_shutdown == ShutdownMode::Savepoint;
        self.jobs.shutdown(with_savepoint).await;
        if let Some(cluster) = &self.cluster {
            cluster.leave().await;
        }
        let _ = self.stop_server.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.server).await;
    }
}

/// Joins the cluster as this host: its id from the settings, else the one
/// kept in the data dir (`cluster-host-id`, made once), so a restarted
/// host is the same member.
async fn join_cluster(
    context: &HostContext,
    settings: &cluster::ClusterSettings,
    address: SocketAddr,
    jobs: &Arc<JobManager>,
) -> Result<cluster::Cluster, ServeError> {
    let id = match &settings.host_id {
        Some(id) => id.clone(),
        None => match context.data.read("cluster-host-id")? {
            Some(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
            None => {
                let id = format!("host-{}", crate::checkpoint::storage::random_hex(4));
                context.data.write("cluster-host-id", id.as_bytes())?;
                id
            }
        },
    };
    let weak = Arc::downgrade(jobs);
    let load: cluster::Load = Arc::new(move || weak.upgrade().map_or((0, 0), |jobs| jobs.load()));
    let cluster = cluster::Cluster::join(settings, &id, &format!("http://{address}"), load).await?;
    let weak = Arc::downgrade(jobs);
    let users: cluster::plugins::Users = Arc::new(move |digest| {
        weak.upgrade()
            .map(|jobs| jobs.users_of(digest))
            .unwrap_or_default()
    });
    let weak = Arc::downgrade(jobs);
    let local: cluster::jobs::LocalJobs =
        Arc::new(move || weak.upgrade().map(|jobs| jobs.list()).unwrap_or_default());
    let shared = async {
        cluster.share_plugins(context.store.clone(), users).await?;
        cluster.open_assignments().await?;
        cluster.share_jobs(local).await
    };
    if let Err(error) = shared.await {
        cluster.leave().await;
        return Err(error.into());
    }
    Ok(cluster)
}
