//! Cluster membership (`weir serve --cluster nats://…`): which hosts are
//! live and which one coordinates, kept in NATS JetStream key-value
//! buckets named after the cluster, so no home-made transport and no
//! ZooKeeper (design: "Beyond one machine"). A movable job moves off a
//! dead host ([`assign`]); one with key or rebalance edges runs as stages,
//! each a movable job of its own ([`staged`]).
//!
//! - `<name>-cluster`, key `identity`: what the cluster is (its name and
//!   its object storage), written once by the first host. A host whose
//!   config names other storage is refused: two clusters cannot share a
//!   name (the buckets' prefix).
//! - `<name>-members` (every entry expires `lease` after its last write):
//!   key `hosts.<id>` per host ([`Member`]), renewed every `lease / 5`;
//!   a host that stops renewing (SIGKILL, SIGSTOP, cut off) drops out when
//!   its entry expires. Key `coordinator` ([`Coordinator`]): taken with a
//!   create when absent, or with a compare-and-set on the revision of a
//!   holder's entry that stayed unchanged for a whole lease (by the
//!   taker's clock), and renewed with a compare-and-set on its revision, so
//!   at most one host holds it; its `term` (the revision it was taken at)
//!   grows with every change of hands: the fencing token.
//!
//! Joining refuses, each with a message naming what is wrong: NATS that
//! cannot be reached, a member running another Weir version, a cluster
//! with other storage under the same name, and a live host with the same
//! id (a restarted host waits out its own previous lease instead).

pub mod assign;
pub mod jobs;
pub mod plugins;
pub mod staged;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::now_ms;
use crate::checkpoint::remote::Remote;
use crate::types::Location;

/// This build's version: every host of a cluster runs the same.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long a member's entry outlives its last renewal (default).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(3);

/// How a host joins its cluster (`[cluster]` in the host's config, or
/// `weir serve --cluster URL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// NATS servers of the cluster (`nats://host:port`, credentials may be
    /// in them).
    pub nats: Vec<String>,
    /// The cluster's name: the prefix of its buckets.
    pub name: String,
    /// The cluster's object storage (`s3://bucket/prefix`), if any.
    pub s3: Option<String>,
    /// This host's id (default: kept in the data dir, made once).
    pub host_id: Option<String>,
    /// How long a silent host stays a member.
    pub lease: Duration,
    /// Copies JetStream keeps of each bucket (3 on a 3-node NATS cluster).
    pub replicas: usize,
}

/// Errors joining or reading the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster `{name}`: cannot reach its NATS at {urls}: {cause}")]
    Unreachable {
        name: String,
        urls: String,
        cause: String,
    },
    #[error("cluster `{name}`: {message}")]
    Buckets { name: String, message: String },
    #[error(
        "cluster `{name}`: host `{member}` runs weir {theirs}, this host weir {ours}; every host of a cluster runs the same version"
    )]
    Version {
        name: String,
        member: String,
        theirs: String,
        ours: String,
    },
    #[error(
        "cluster `{name}` keeps its checkpoints and savepoints on {theirs}, this host's config says {ours}: another cluster already uses the name `{name}` (its buckets' prefix); give this one another `[cluster] name`"
    )]
    Shared {
        name: String,
        theirs: String,
        ours: String,
    },
    #[error(
        "cluster `{name}`: host id `{id}` is live at {api} (it renewed its lease while this host waited for it to lapse); two hosts cannot share an id: give this one another `[cluster] host_id` or data dir"
    )]
    DuplicateId {
        name: String,
        id: String,
        api: String,
    },
    #[error(
        "cluster `{name}` has plugin {reference} as sha256 {theirs} (added by host `{host}`), this host's store as sha256 {ours}: remove it here (`weir plugin remove {reference}` on a host of its own) or give one of them another version"
    )]
    PluginConflict {
        name: String,
        reference: String,
        theirs: String,
        host: String,
        ours: String,
    },
    #[error("cluster `{name}`: its storage {cause}")]
    Storage { name: String, cause: String },
    #[error("cluster `{name}`: `[cluster] {key}` {message}")]
    Setting {
        name: String,
        key: &'static str,
        message: String,
    },
}

/// A member host, as its entry in `<name>-members` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Member {
    /// The host's id.
    pub id: String,
    /// Its API (`http://address:port`).
    pub api: String,
    /// The Weir version it runs.
    pub version: String,
    /// This process's start (a restarted host is a new instance).
    pub instance: String,
    pub started_ms: u64,
    /// Its latest renewal.
    pub renewed_ms: u64,
    /// Its jobs, and those of them running.
    pub jobs: usize,
    pub running: usize,
}

/// Who coordinates the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Coordinator {
    /// The coordinating host's id.
    pub host: String,
    /// The revision it took the lease at: grows with every change of
    /// hands (the fencing token).
    pub term: u64,
    pub since_ms: u64,
}

/// What the cluster is, written once by its first host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    name: String,
    s3: Option<String>,
    created_ms: u64,
    created_by: String,
}

/// `GET /api/hosts`: the cluster's members (or this host alone, without a
/// cluster) and its coordinator.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Hosts {
    /// The cluster's name; none for a host on its own.
    pub cluster: Option<String>,
    pub coordinator: Option<Coordinator>,
    /// Sorted by id.
    pub hosts: Vec<HostEntry>,
}

/// One member in [`Hosts`].
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostEntry {
    #[serde(flatten)]
    pub member: Member,
    /// It holds the coordinator lease.
    pub coordinator: bool,
    /// It is the host that answered.
    pub this: bool,
}

/// What this host's jobs amount to, asked at each renewal.
pub type Load = Arc<dyn Fn() -> (usize, usize) + Send + Sync>;

/// This host's membership: renewed by a task until [`Cluster::leave`].
pub struct Cluster {
    shared: Arc<Shared>,
    js: jetstream::Context,
    replicas: usize,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The shared plugin store, once [`Cluster::share_plugins`] opened it,
    /// and the task following its index.
    plugins: OnceLock<Arc<plugins::SharedPlugins>>,
    /// The job directory, once [`Cluster::share_jobs`] opened it.
    jobs: OnceLock<Arc<jobs::JobDirectory>>,
    /// The movable jobs' owners, once [`Cluster::open_assignments`] opened
    /// them.
    assignments: OnceLock<Arc<assign::Assignments>>,
    /// The cluster's object storage (`s3://bucket/prefix`), if it has one:
    /// movable jobs keep their checkpoints there.
    s3: Option<String>,
    /// The tasks following the plugin index and writing the directory.
    following: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The task following the assignments.
    following_assignments: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// This host's API.
    api: String,
    /// The cluster's NATS servers, comma-separated (as connectors take
    /// them: a staged job's exchanges are on them).
    nats: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.shared.name)
            .field("id", &self.shared.id)
            .finish_non_exhaustive()
    }
}

/// What the API and the renewing task share.
struct Shared {
    name: String,
    id: String,
    /// The cluster's lease.
    lease: Duration,
    members: kv::Store,
    local: Mutex<Local>,
}

/// This host's entry and lease as last written.
#[derive(Debug)]
struct Local {
    member: Member,
    /// The coordinator lease's current revision, while this host holds it.
    held: Option<(u64, Coordinator)>,
    /// Another host's lease as this host last saw it: its revision, and
    /// since when (this host's clock) it has not changed.
    watched: Option<(u64, tokio::time::Instant)>,
    /// When this host last failed to renew its entry (the members bucket
    /// did not answer: a NATS node died, its streams elect leaders).
    renewal_failed: Option<tokio::time::Instant>,
}

const HOSTS: &str = "hosts.";
const COORDINATOR: &str = "coordinator";

impl Cluster {
    /// Joins the cluster as host `id` whose API is at `api`: connects,
    /// creates or opens the buckets, checks the cluster's identity, the
    /// members' versions and that no live host has this id, writes this
    /// host's entry and starts renewing it.
    pub async fn join(
        settings: &ClusterSettings,
        id: &str,
        api: &str,
        load: Load,
    ) -> Result<Self, ClusterError> {
        let name = settings.name.clone();
        check_settings(settings)?;
        let js = connect(settings).await?;
        let buckets = |message: String| ClusterError::Buckets {
            name: name.clone(),
            message,
        };
        let identity = open_bucket(
            &js,
            kv::Config {
                bucket: format!("{name}-cluster"),
                description: format!("weir cluster {name}: what it is"),
                history: 1,
                num_replicas: settings.replicas,
                ..Default::default()
            },
        )
        .await
        .map_err(buckets)?;
        patiently(|| check_identity(&identity, settings, id)).await?;
        check_storage(settings).await?;
        let members = open_bucket(
            &js,
            kv::Config {
                bucket: format!("{name}-members"),
                description: format!("weir cluster {name}: live hosts and the coordinator lease"),
                history: 1,
                max_age: settings.lease,
                storage: jetstream::stream::StorageType::Memory,
                num_replicas: settings.replicas,
                ..Default::default()
            },
        )
        .await
        .map_err(buckets)?;
        // The lease is the cluster's, as its first host made the bucket.
        let lease = members
            .status()
            .await
            .map(|status| status.max_age())
            .ok()
            .filter(|age| !age.is_zero())
            .unwrap_or(settings.lease);
        let (jobs, running) = load();
        let member = Member {
            id: id.to_string(),
            api: api.to_string(),
            version: VERSION.to_string(),
            instance: crate::checkpoint::storage::random_hex(6),
            started_ms: now_ms(),
            renewed_ms: now_ms(),
            jobs,
            running,
        };
        let shared = Arc::new(Shared {
            name: name.clone(),
            id: id.to_string(),
            lease,
            members,
            local: Mutex::new(Local {
                member,
                held: None,
                watched: None,
                renewal_failed: None,
            }),
        });
        patiently(|| shared.check_versions()).await?;
        patiently(|| shared.wait_out_previous(lease)).await?;
        patiently(|| async {
            shared
                .renew(&load)
                .await
                .map_err(|e| buckets(format!("cannot write this host's entry: {e}")))
        })
        .await?;
        shared.take_or_keep_lease().await;
        info!(cluster = %name, host = %id, "joined the cluster");
        let (stop, mut stopped) = watch::channel(false);
        let period = lease / 5;
        let renewing = shared.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.wait_for(|s| *s) => return,
                }
                if let Err(error) = renewing.renew(&load).await {
                    renewing.lock().renewal_failed = Some(tokio::time::Instant::now());
                    warn!(cluster = %renewing.name, host = %renewing.id, %error, "cannot renew this host's lease");
                }
                renewing.take_or_keep_lease().await;
            }
        });
        Ok(Self {
            shared,
            js,
            replicas: settings.replicas,
            stop,
            task: Mutex::new(Some(task)),
            plugins: OnceLock::new(),
            jobs: OnceLock::new(),
            assignments: OnceLock::new(),
            s3: settings.s3.clone(),
            following: Mutex::new(Vec::new()),
            following_assignments: Mutex::new(None),
            api: api.to_string(),
            nats: settings.nats.join(","),
        })
    }

    /// Opens the cluster's plugin store for this host's `store` and keeps
    /// the two in step (see [`plugins`]); `users` says which of this
    /// host's jobs use a digest.
    pub async fn share_plugins(
        &self,
        store: Arc<crate::control::store::PluginStore>,
        users: plugins::Users,
    ) -> Result<(), ClusterError> {
        let shared = plugins::SharedPlugins::open(
            &self.js,
            &self.shared.name,
            &self.shared.id,
            self.replicas,
            store,
        )
        .await?;
        shared.reconcile().await?;
        let following = tokio::spawn(shared.clone().follow(users));
        self.following.lock().expect("not poisoned").push(following);
        let _ = self.plugins.set(shared);
        Ok(())
    }

    /// Opens the cluster's job directory and writes this host's jobs into
    /// it as they change (see [`jobs`]).
    pub async fn share_jobs(&self, local: jobs::LocalJobs) -> Result<(), ClusterError> {
        let directory = jobs::JobDirectory::open(
            &self.js,
            &self.shared.name,
            &self.shared.id,
            &self.api,
            self.replicas,
            self.assignments(),
        )
        .await?;
        directory.publish(local()).await;
        let following = tokio::spawn(directory.clone().follow(local));
        self.following.lock().expect("not poisoned").push(following);
        let _ = self.jobs.set(directory);
        Ok(())
    }

    /// Opens the movable jobs' assignments (see [`assign`]); nothing moves
    /// until [`Cluster::follow_assignments`].
    pub async fn open_assignments(&self) -> Result<(), ClusterError> {
        let assignments =
            assign::Assignments::open(&self.js, self.shared.clone(), self.replicas).await?;
        let _ = self.assignments.set(assignments);
        Ok(())
    }

    /// Starts following the assignments for `owner` (this host's jobs):
    /// adopting, releasing, and on the coordinator moving the jobs of dead
    /// hosts.
    pub fn follow_assignments(&self, owner: Arc<dyn assign::Owner>) {
        if let Some(assignments) = self.assignments.get() {
            let following = tokio::spawn(assignments.clone().follow(owner));
            *self.following_assignments.lock().expect("not poisoned") = Some(following);
        }
    }

    /// Stops adopting and releasing jobs: the host is shutting down (its
    /// jobs stop with savepoints the others resume from once it left).
    pub fn stop_following_assignments(&self) {
        if let Some(following) = self
            .following_assignments
            .lock()
            .expect("not poisoned")
            .take()
        {
            following.abort();
        }
    }

    /// The movable jobs' assignments, once opened.
    pub fn assignments(&self) -> Option<Arc<assign::Assignments>> {
        self.assignments.get().cloned()
    }

    /// Where a movable job's checkpoints and savepoints go: under the
    /// cluster's object storage (none: the cluster has none, jobs stay on
    /// their host).
    pub fn job_storage(&self, job: &str) -> Option<String> {
        self.s3
            .as_ref()
            .map(|s3| format!("{}/jobs/{job}", s3.trim_end_matches('/')))
    }

    /// The cluster's NATS servers, comma-separated.
    pub fn nats_url(&self) -> &str {
        &self.nats
    }

    /// How many copies the cluster's buckets (and a staged job's
    /// exchanges) keep.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// The cluster's job directory, once shared.
    pub fn jobs(&self) -> Option<Arc<jobs::JobDirectory>> {
        self.jobs.get().cloned()
    }

    /// The cluster's plugin store, once shared.
    pub fn plugins(&self) -> Option<Arc<plugins::SharedPlugins>> {
        self.plugins.get().cloned()
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// This host's id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Whether this host holds the coordinator lease (as of its latest
    /// renewal).
    pub fn is_coordinator(&self) -> bool {
        self.shared.lock().held.is_some()
    }

    /// The live members and the coordinator, as the buckets say now.
    pub async fn hosts(&self) -> Result<Hosts, ClusterError> {
        self.shared.hosts().await
    }

    /// Stops renewing, gives up the coordinator lease and removes this
    /// host's entry, so the others see it gone at once.
    pub async fn leave(&self) {
        self.stop_following_assignments();
        for following in self.following.lock().expect("not poisoned").drain(..) {
            following.abort();
        }
        let _ = self.stop.send(true);
        let task = self.task.lock().expect("not poisoned").take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let shared = &self.shared;
        let held = shared.lock().held.take();
        if let Some((revision, _)) = held {
            let _ = shared
                .members
                .delete_expect_revision(COORDINATOR, Some(revision))
                .await;
        }
        let _ = shared.members.delete(format!("{HOSTS}{}", shared.id)).await;
        info!(cluster = %shared.name, host = %shared.id, "left the cluster");
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().expect("not poisoned")
    }

    /// The live members and the coordinator, as the buckets say now.
    async fn hosts(&self) -> Result<Hosts, ClusterError> {
        let read_error = |e: String| ClusterError::Buckets {
            name: self.name.clone(),
            message: format!("cannot read bucket `{}-members`: {e}", self.name),
        };
        let mut keys = self
            .members
            .keys()
            .await
            .map_err(|e| read_error(e.to_string()))?;
        let mut members = Vec::new();
        let mut coordinator = None;
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| read_error(e.to_string()))?;
            let Some(bytes) = self
                .members
                .get(&key)
                .await
                .map_err(|e| read_error(e.to_string()))?
            else {
                continue; // expired meanwhile
            };
            if key == COORDINATOR {
                coordinator = serde_json::from_slice::<Coordinator>(&bytes).ok();
            } else if key.starts_with(HOSTS) {
                match serde_json::from_slice::<Member>(&bytes) {
                    Ok(member) => members.push(member),
                    Err(error) => {
                        warn!(cluster = %self.name, %key, %error, "an unreadable member entry")
                    }
                }
            }
        }
        members.sort_by(|a, b| a.id.cmp(&b.id));
        let hosts = members
            .into_iter()
            .map(|member| HostEntry {
                coordinator: coordinator.as_ref().is_some_and(|c| c.host == member.id),
                this: member.id == self.id,
                member,
            })
            .collect();
        Ok(Hosts {
            cluster: Some(self.name.clone()),
            coordinator,
            hosts,
        })
    }

    /// Whether the members bucket has taken this host's renewals for a
    /// whole lease: only then does another host's silence mean it died.
    /// While the bucket does not answer (a NATS node died and its streams
    /// elect new leaders) no host can renew, and entries expire; once it
    /// answers again, every live host renews within a lease.
    fn members_steady(&self) -> bool {
        steady(
            self.lock().renewal_failed,
            tokio::time::Instant::now(),
            self.lease,
        )
    }

    /// Writes this host's entry with its current load.
    async fn renew(&self, load: &Load) -> Result<(), String> {
        let (jobs, running) = load();
        let bytes = {
            let mut local = self.lock();
            local.member.jobs = jobs;
            local.member.running = running;
            local.member.renewed_ms = now_ms();
            serde_json::to_vec(&local.member).map_err(|e| e.to_string())?
        };
        self.members
            .put(format!("{HOSTS}{}", self.id), Bytes::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Renews the coordinator lease if this host holds it (a compare-and-
    /// set on its revision: lost if another took it), else takes it if
    /// it is free.
    async fn take_or_keep_lease(&self) {
        let held = self.lock().held.clone();
        match held {
            Some((revision, coordinator)) => {
                let bytes = Bytes::from(serde_json::to_vec(&coordinator).unwrap_or_default());
                match self.members.update(COORDINATOR, bytes, revision).await {
                    Ok(next) => self.lock().held = Some((next, coordinator)),
                    Err(error) => {
                        warn!(cluster = %self.name, host = %self.id, term = coordinator.term, %error, "lost the coordinator lease");
                        self.lock().held = None;
                    }
                }
            }
            None => {
                let Some(expected) = self.free_lease().await else {
                    return;
                };
                // The term is the revision the claim gets; written after.
                let claim = Coordinator {
                    host: self.id.clone(),
                    term: 0,
                    since_ms: now_ms(),
                };
                let bytes = Bytes::from(serde_json::to_vec(&claim).unwrap_or_default());
                let claimed = match expected {
                    0 => self.members.create(COORDINATOR, bytes).await.ok(),
                    revision => self.members.update(COORDINATOR, bytes, revision).await.ok(),
                };
                let Some(revision) = claimed else {
                    return;
                };
                let coordinator = Coordinator {
                    term: revision,
                    ..claim
                };
                let bytes = Bytes::from(serde_json::to_vec(&coordinator).unwrap_or_default());
                match self.members.update(COORDINATOR, bytes, revision).await {
                    Ok(next) => {
                        info!(cluster = %self.name, host = %self.id, term = revision, "took the coordinator lease");
                        let mut local = self.lock();
                        local.held = Some((next, coordinator));
                        local.watched = None;
                    }
                    Err(error) => {
                        warn!(cluster = %self.name, host = %self.id, %error, "lost the coordinator lease as it was taken");
                    }
                }
            }
        }
    }

    /// Whether the coordinator lease may be taken, and the revision to
    /// take it from (0: there is none, take it with a create). Another
    /// host's lease is free once its revision stayed the same for a whole
    /// lease by this host's own clock (its holder stopped renewing: no
    /// need to wait for the entry to expire, nor to trust its clock); the
    /// compare-and-set on that revision makes sure it was not renewed
    /// meanwhile.
    async fn free_lease(&self) -> Option<u64> {
        let entry = self.members.entry(COORDINATOR).await.ok()?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            self.lock().watched = None;
            return Some(0);
        };
        let now = tokio::time::Instant::now();
        let mut local = self.lock();
        match local.watched {
            Some((revision, since)) if revision == entry.revision => {
                (now.duration_since(since) >= self.lease).then_some(revision)
            }
            _ => {
                local.watched = Some((entry.revision, now));
                None
            }
        }
    }

    /// Refuses to join a cluster whose members run another version.
    async fn check_versions(&self) -> Result<(), ClusterError> {
        let hosts = self.hosts().await?;
        match hosts
            .hosts
            .iter()
            .find(|h| h.member.version != VERSION && h.member.id != self.id)
        {
            Some(other) => Err(ClusterError::Version {
                name: self.name.clone(),
                member: other.member.id.clone(),
                theirs: other.member.version.clone(),
                ours: VERSION.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// An entry under this host's id from another instance: a previous
    /// run of this host (killed: its lease lapses unrenewed) or another
    /// live host with the same id (it renews): waits up to a lease to
    /// tell which.
    async fn wait_out_previous(&self, lease: Duration) -> Result<(), ClusterError> {
        let key = format!("{HOSTS}{}", self.id);
        let instance = self.lock().member.instance.clone();
        let entry = |e: kv::EntryError| ClusterError::Buckets {
            name: self.name.clone(),
            message: format!("cannot read bucket `{}-members`: {e}", self.name),
        };
        let Some(first) = self.members.entry(&key).await.map_err(entry)? else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + lease + Duration::from_millis(500);
        loop {
            let current = self.members.entry(&key).await.map_err(entry)?;
            let Some(current) = current.filter(|e| e.operation == kv::Operation::Put) else {
                return Ok(());
            };
            if current.revision != first.revision {
                let member: Option<Member> = serde_json::from_slice(&current.value).ok();
                if member.as_ref().is_some_and(|m| m.instance != instance) {
                    return Err(ClusterError::DuplicateId {
                        name: self.name.clone(),
                        id: self.id.clone(),
                        api: member.map(|m| m.api).unwrap_or_default(),
                    });
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// How long joining asks again while the cluster's buckets do not answer.
const JOIN_PATIENCE: Duration = Duration::from_secs(30);

/// `step`, asked again while it fails reading or writing the buckets: a
/// bucket another host just made on a NATS cluster answers once its
/// stream elected a leader ("no responders" until then). Other errors
/// (another version, another cluster's storage, a taken id) stand.
async fn patiently<T, F, Fut>(mut step: F) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClusterError>>,
{
    let deadline = tokio::time::Instant::now() + JOIN_PATIENCE;
    loop {
        match step().await {
            Err(ClusterError::Buckets { name, message })
                if tokio::time::Instant::now() < deadline =>
            {
                warn!(cluster = %name, %message, "the cluster's buckets do not answer yet; asking again");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
}

/// See [`Shared::members_steady`]: no renewal failed within `lease` of
/// `now`.
fn steady(
    renewal_failed: Option<tokio::time::Instant>,
    now: tokio::time::Instant,
    lease: Duration,
) -> bool {
    renewal_failed.is_none_or(|failed| now.duration_since(failed) >= lease)
}

/// The bucket `config` names, as it is (another host made it: its
/// settings stand), or made.
async fn open_bucket(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, String> {
    let bucket = config.bucket.clone();
    if let Ok(store) = js.get_key_value(&bucket).await {
        return Ok(store);
    }
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Made by another host meanwhile?
        Err(error) => js
            .get_key_value(&bucket)
            .await
            .map_err(|_| format!("cannot make bucket `{bucket}`: {error}")),
    }
}

/// The cluster name and lease as the buckets need them.
/// Letters, digits, `-` and `_`, at least one: what a bucket name or a key
/// token may be made of (cluster names, host ids, job ids).
pub(super) fn is_plain_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn check_settings(settings: &ClusterSettings) -> Result<(), ClusterError> {
    let setting = |key, message: String| ClusterError::Setting {
        name: settings.name.clone(),
        key,
        message,
    };
    let name = &settings.name;
    if !is_plain_name(name) {
        return Err(setting(
            "name",
            format!("{name:?} is not a cluster name: letters, digits, `-` and `_` only"),
        ));
    }
    if settings.nats.is_empty() {
        return Err(setting("nats", "names no server".to_string()));
    }
    if settings.lease < Duration::from_secs(1) {
        return Err(setting(
            "lease",
            format!(
                "{} is too short: at least 1s (renewed every fifth of it)",
                crate::human::duration(settings.lease)
            ),
        ));
    }
    if let Some(s3) = &settings.s3
        && !matches!(Location::parse(s3), Ok(Location::S3(_)))
    {
        return Err(setting(
            "s3",
            format!("{s3:?} is not an object storage location (s3://bucket/prefix)"),
        ));
    }
    if let Some(id) = &settings.host_id
        && !is_plain_name(id)
    {
        return Err(setting(
            "host_id",
            format!("{id:?} is not a host id: letters, digits, `-` and `_` only"),
        ));
    }
    Ok(())
}

async fn connect(settings: &ClusterSettings) -> Result<jetstream::Context, ClusterError> {
    let urls = settings
        .nats
        .iter()
        .map(|u| crate::connectors::nats::redact(u))
        .collect::<Vec<_>>()
        .join(", ");
    let unreachable = |cause: String| ClusterError::Unreachable {
        name: settings.name.clone(),
        urls: urls.clone(),
        cause,
    };
    let options = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .name("weir-cluster");
    let client = async_nats::connect_with_options(settings.nats.as_slice(), options)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let js = jetstream::new(client);
    js.query_account()
        .await
        .map_err(|e| unreachable(format!("JetStream does not answer: {e}")))?;
    Ok(js)
}

/// Writes the cluster's identity if it has none; refuses a host whose
/// storage differs from the one recorded.
async fn check_identity(
    bucket: &kv::Store,
    settings: &ClusterSettings,
    id: &str,
) -> Result<(), ClusterError> {
    let name = &settings.name;
    let buckets = |message: String| ClusterError::Buckets {
        name: name.clone(),
        message,
    };
    let ours = Identity {
        name: name.clone(),
        s3: settings.s3.clone(),
        created_ms: now_ms(),
        created_by: id.to_string(),
    };
    let bytes = Bytes::from(serde_json::to_vec(&ours).unwrap_or_default());
    if bucket.create("identity", bytes).await.is_ok() {
        return Ok(());
    }
    let recorded = bucket
        .get("identity")
        .await
        .map_err(|e| buckets(format!("cannot read the cluster's identity: {e}")))?
        .ok_or_else(|| buckets("the cluster's identity vanished as it was read".to_string()))?;
    let theirs: Identity = serde_json::from_slice(&recorded)
        .map_err(|e| buckets(format!("the cluster's identity is unreadable: {e}")))?;
    if theirs.s3 != settings.s3 {
        let show = |s: &Option<String>| s.clone().unwrap_or_else(|| "no object storage".into());
        return Err(ClusterError::Shared {
            name: name.clone(),
            theirs: show(&theirs.s3),
            ours: show(&settings.s3),
        });
    }
    Ok(())
}

/// The cluster's object storage answers and its bucket exists.
async fn check_storage(settings: &ClusterSettings) -> Result<(), ClusterError> {
    let Some(Ok(Location::S3(url))) = settings.s3.as_deref().map(Location::parse) else {
        return Ok(());
    };
    let storage = |cause: String| ClusterError::Storage {
        name: settings.name.clone(),
        cause,
    };
    Remote::open(&url)
        .map_err(|e| storage(e.to_string()))?
        .check()
        .await
        .map_err(|e| storage(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_judged_only_once_renewals_went_through_for_a_lease() {
        let lease = Duration::from_secs(3);
        let now = tokio::time::Instant::now() + Duration::from_secs(60);
        assert!(steady(None, now, lease), "never failed");
        assert!(!steady(Some(now), now, lease), "failing now");
        assert!(
            !steady(Some(now - Duration::from_millis(2999)), now, lease),
            "recovered less than a lease ago"
        );
        assert!(steady(Some(now - lease), now, lease), "a lease ago");
    }
}
