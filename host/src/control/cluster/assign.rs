//! Job failover: which host owns each movable job of the cluster, moving a
//! job off a host whose lease lapsed, and fencing its old owner.
//!
//! A job is *movable* when nothing of it lives on one host's disk (its
//! sources and sinks are NATS, Kafka, generators or discards) and the
//! cluster has object storage: its checkpoints and savepoints go there
//! (`<s3>/jobs/<job id>/`), and its [`Assignment`] — the job's spec, its
//! owner, a **generation** and the restore point its owner last committed —
//! lives in the key-value bucket `<name>-assignments` (key `a.<job id>`).
//!
//! - The host a job is submitted to creates its assignment (generation 1),
//!   naming itself, or for a stage of a staged job ([`super::staged`])
//!   the live host with the fewest tasks of its stage, then the fewest
//!   jobs ([`Assignments::place`]), whose follower adopts it.
//! - The coordinator (see [`super`]) looks at the members every tick: a
//!   host whose entry is gone, or has not been renewed for a whole lease by
//!   the coordinator's own clock, is dead; each live job it owned goes to
//!   the live host with the fewest tasks of its stage (a stage's tasks
//!   apart, so one host's death takes as few of them as it can), then the
//!   fewest jobs, with a compare-and-set that bumps the generation. Jobs
//!   of live hosts stay where they are (sticky), except that for a minute
//!   after a host joined, while one live host runs two jobs more than
//!   another, the coordinator moves one running job at a time off the
//!   busiest to the least busy (one whose stage has no task there first)
//!   (`Assignments::rebalance`, at most every few seconds), the same
//!   way: a new generation, the old owner fenced and releasing it, the
//!   new one restoring its restore point. Nothing moves until the
//!   coordinator's own renewals have succeeded for a whole lease:
//!   while the members bucket does not answer (a NATS node died) no host
//!   can renew, which is no sign of death.
//! - Every host follows the bucket: it adopts a job assigned to it that it
//!   does not run (restoring from the assignment's restore point, under a
//!   generation it takes with a compare-and-set, so a previous process of
//!   the same host is fenced too), and
//!   releases a job it runs that is assigned elsewhere (cancelled: its
//!   output after the last commit is discarded).
//! - Fencing: before the sinks commit a completed checkpoint or savepoint,
//!   its owner writes it as the job's restore point with a compare-and-set
//!   on the assignment's revision, which must still name this host and its
//!   generation ([`Fence`], the coordinator's
//!   [`CommitGate`](crate::checkpoint::coordinator::CommitGate)). A host
//!   that was stopped (SIGSTOP) while its job moved finds the generation
//!   changed at its next checkpoint: its attempt ends fenced, committing
//!   nothing, and the job is released. The new owner restores exactly the
//!   restore point the old one committed last, never one it wrote after
//!   losing the job.
//! - A job that ended on its owner (finished, cancelled, stopped by a user,
//!   failed for good) is marked `ended` and never moves; one stopped by its
//!   host's shutdown (a savepoint to resume from) moves like any other.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{ClusterError, HOSTS, Shared};
use crate::checkpoint::coordinator::{CommitGate, GateRefusal};
use crate::control::record::JobSpec;
use crate::job::JobFile;
use crate::job::file::{SinkKindName, SourceKindName};
use crate::types::Location;

/// A boxed future, as the [`Owner`] trait returns them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A movable job's entry in `<name>-assignments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub job: String,
    pub name: String,
    pub submitted_ms: u64,
    /// What it runs (its checkpoints' directory on the cluster's storage
    /// among it).
    pub spec: JobSpec,
    pub allow_non_restored_state: bool,
    /// What its first run restored (a submission with a savepoint).
    pub initial_restore: Option<String>,
    /// The host that owns it.
    pub host: String,
    /// Bumped at every move: a host runs the job under one generation and
    /// commits only while it is current.
    pub generation: u64,
    /// Where the job resumes from: the newest checkpoint or savepoint its
    /// owner committed (none yet: from the beginning, or
    /// `initial_restore`).
    pub restore: Option<String>,
    /// It ended on its owner: it never moves again.
    pub ended: bool,
    /// Why it is on `host`, in a line.
    pub reason: String,
}

/// A job as this host has it, for the follower to compare with the
/// assignments.
#[derive(Debug, Clone)]
pub struct LocalJob {
    pub id: String,
    /// The generation it runs under (none: not a movable cluster job).
    pub generation: Option<u64>,
    /// A driver runs it.
    pub driven: bool,
    /// It ended for good here (not stopped by the host's shutdown).
    pub ended: bool,
}

/// What the follower asks of this host's jobs (the job manager).
pub trait Owner: Send + Sync {
    fn local_jobs(&self) -> Vec<LocalJob>;
    /// Whether this host can run `spec` now (its plugins are in this
    /// host's store: on a NATS cluster a plugin can reach a host a moment
    /// after the job does).
    fn can_run(&self, spec: &JobSpec) -> Result<(), String>;
    /// Starts `assignment`'s job here, from its restore point.
    fn adopt(&self, assignment: Assignment) -> BoxFuture<'_, Result<(), String>>;
    /// Ends the job here without committing anything more, and forgets it
    /// (it runs elsewhere now).
    fn release(&self, id: String, reason: String) -> BoxFuture<'_, ()>;
}

/// Whether a job file's job can move between hosts: nothing of it is on
/// one host's disk or network (no file or socket source, no file sink).
pub fn movable(file: &JobFile) -> bool {
    let sources = file.sources.iter().all(|s| {
        matches!(
            s.kind,
            SourceKindName::Nats
                | SourceKindName::Kafka
                | SourceKindName::Generator
                | SourceKindName::Exchange
        )
    });
    let sinks = file.sinks.iter().all(|s| {
        matches!(
            s.kind,
            SinkKindName::Nats
                | SinkKindName::Kafka
                | SinkKindName::Blackhole
                | SinkKindName::Exchange
        )
    });
    sources && sinks
}

fn key(job: &str) -> String {
    format!("a.{job}")
}

/// The cluster's assignments, as one host sees and writes them.
pub struct Assignments {
    shared: Arc<Shared>,
    bucket: kv::Store,
    /// Each member's entry revision as this host last saw it, and since
    /// when (this host's clock) it has not changed.
    seen: Mutex<HashMap<String, (u64, Instant)>>,
    /// The assignments as last read, by job.
    cache: Mutex<BTreeMap<String, Assignment>>,
    /// The cluster's JetStream (where staged jobs' exchanges are).
    js: jetstream::Context,
    /// When the coordinator last looked for exchanges to delete.
    tidied: Mutex<Option<Instant>>,
    /// When the coordinator last looked at the hosts' load, the members
    /// it knew then (none: not looked yet), and until when it evens the
    /// load out (a host joined).
    balanced: Mutex<Balancing>,
}

/// The coordinator's rebalancing: see [`Assignments::rebalance`].
#[derive(Debug, Default)]
struct Balancing {
    looked: Option<Instant>,
    members: Option<std::collections::BTreeSet<String>>,
    until: Option<Instant>,
    /// Since when, by the looks, the load has been uneven.
    uneven_since: Option<Instant>,
}

impl std::fmt::Debug for Assignments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assignments")
            .field("cluster", &self.shared.name)
            .finish_non_exhaustive()
    }
}

/// How often a host compares the assignments with its jobs (and the
/// coordinator looks for dead hosts).
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// How often the coordinator looks for staged jobs whose exchanges can go.
const TIDY_EVERY: Duration = Duration::from_secs(2);

/// How often the coordinator may move a job to even out the hosts' load.
const REBALANCE_EVERY: Duration = Duration::from_secs(5);

/// How long after a host joined the coordinator evens out the load.
const REBALANCE_FOR: Duration = Duration::from_secs(60);

impl Assignments {
    pub(super) async fn open(
        js: &jetstream::Context,
        shared: Arc<Shared>,
        replicas: usize,
    ) -> Result<Arc<Self>, ClusterError> {
        let name = shared.name.clone();
        let bucket = super::open_bucket(
            js,
            kv::Config {
                bucket: format!("{name}-assignments"),
                description: format!(
                    "weir cluster {name}: which host owns each movable job, and its restore point"
                ),
                history: 1,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await
        .map_err(|message| ClusterError::Buckets { name, message })?;
        Ok(Arc::new(Self {
            shared,
            bucket,
            js: js.clone(),
            seen: Mutex::default(),
            cache: Mutex::default(),
            tidied: Mutex::new(None),
            balanced: Mutex::default(),
        }))
    }

    fn error(&self, e: impl std::fmt::Display) -> ClusterError {
        ClusterError::Buckets {
            name: self.shared.name.clone(),
            message: format!("bucket `{}-assignments`: {e}", self.shared.name),
        }
    }

    /// This host's id.
    pub fn host(&self) -> &str {
        &self.shared.id
    }

    /// The cluster's staged jobs (kept in the same bucket).
    pub fn staged(&self) -> super::staged::StagedJobs {
        super::staged::StagedJobs::new(&self.shared.name, self.bucket.clone())
    }

    /// Hosts for new jobs `jobs`, in turn: each to the live member with the
    /// fewest tasks of its stage, then the fewest live assigned jobs
    /// ([`Loads::take`]), not counting the jobs they replace (`replacing`:
    /// a rescale's old tasks, about to be marked ended — counted, they
    /// would skew the new tasks onto the other hosts, and the rebalance
    /// would then move a job of a stage the rescale never touched).
    pub async fn place(
        &self,
        jobs: &[String],
        replacing: &[String],
    ) -> Result<Vec<String>, ClusterError> {
        let live = self.live_members().await?;
        let mut all = self.all().await?;
        all.retain(|(a, _)| !replacing.contains(&a.job));
        let mut loads = Loads::of(&all, &live);
        let hosts = jobs
            .iter()
            .map(|job| match loads.take(stage_of(job).as_deref()) {
                Some(host) => host.to_string(),
                None => self.shared.id.clone(),
            })
            .collect();
        Ok(hosts)
    }

    /// Records a new job: generation 1, owned by `assignment.host` (this
    /// host for a job submitted here; another host's follower adopts a
    /// stage of a staged job placed there).
    pub async fn create(&self, assignment: &Assignment) -> Result<(), ClusterError> {
        let bytes = Bytes::from(serde_json::to_vec(assignment).map_err(|e| self.error(e))?);
        self.bucket
            .create(key(&assignment.job), bytes)
            .await
            .map_err(|e| self.error(e))?;
        self.cache
            .lock()
            .expect("not poisoned")
            .insert(assignment.job.clone(), assignment.clone());
        Ok(())
    }

    /// Job `job`'s assignment and its revision.
    async fn get(&self, job: &str) -> Result<Option<(Assignment, u64)>, ClusterError> {
        let entry = self
            .bucket
            .entry(key(job))
            .await
            .map_err(|e| self.error(e))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| {
                serde_json::from_slice::<Assignment>(&e.value)
                    .ok()
                    .map(|a| (a, e.revision))
            }))
    }

    /// Job `job`'s assignment, if it has one.
    pub async fn assignment(&self, job: &str) -> Result<Option<Assignment>, ClusterError> {
        Ok(self.get(job).await?.map(|(a, _)| a))
    }

    /// Creates `assignment` unless job `assignment.job` has one already
    /// (an earlier try of the same step): `false` then.
    pub async fn create_once(&self, assignment: &Assignment) -> Result<bool, ClusterError> {
        if self.get(&assignment.job).await?.is_some() {
            return Ok(false);
        }
        match self.create(assignment).await {
            Ok(()) => Ok(true),
            Err(_) if self.get(&assignment.job).await?.is_some() => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Every assignment, with its revision.
    async fn all(&self) -> Result<Vec<(Assignment, u64)>, ClusterError> {
        let mut keys = self.bucket.keys().await.map_err(|e| self.error(e))?;
        let mut all = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| self.error(e))?;
            if let Some(job) = key.strip_prefix("a.")
                && let Some(found) = self.get(job).await?
            {
                all.push(found);
            }
        }
        *self.cache.lock().expect("not poisoned") = all
            .iter()
            .map(|(a, _)| (a.job.clone(), a.clone()))
            .collect();
        Ok(all)
    }

    /// The host that owns job `job`, as last read (none: not a movable
    /// job, or not read yet).
    pub fn owner_of(&self, job: &str) -> Option<String> {
        self.cache
            .lock()
            .expect("not poisoned")
            .get(job)
            .map(|a| a.host.clone())
    }

    /// The host that owns job `job` and its generation, as last read.
    pub fn owner_and_generation(&self, job: &str) -> Option<(String, u64)> {
        self.cache
            .lock()
            .expect("not poisoned")
            .get(job)
            .map(|a| (a.host.clone(), a.generation))
    }

    /// Changes job `job`'s assignment with `change` if it still names
    /// this host at `generation`: a compare-and-set on its revision,
    /// retried when something else changed it meanwhile. `Err`: the job
    /// is not this host's at that generation any more (the reason).
    async fn change_own(
        &self,
        job: &str,
        generation: u64,
        change: impl Fn(&mut Assignment),
    ) -> Result<(), GateRefusal> {
        for _ in 0..5 {
            let (mut assignment, revision) = match self.get(job).await {
                Ok(Some(found)) => found,
                Ok(None) => {
                    return Err(GateRefusal::Fenced(format!(
                        "job {job} has no assignment in the cluster any more"
                    )));
                }
                Err(error) => return Err(GateRefusal::Unavailable(error.to_string())),
            };
            if assignment.host != self.shared.id || assignment.generation != generation {
                return Err(GateRefusal::Fenced(format!(
                    "job {job} moved to host `{}` (generation {}); this host `{}` ran generation {generation}",
                    assignment.host, assignment.generation, self.shared.id
                )));
            }
            change(&mut assignment);
            let bytes = Bytes::from(
                serde_json::to_vec(&assignment)
                    .map_err(|e| GateRefusal::Unavailable(e.to_string()))?,
            );
            match self.bucket.update(key(job), bytes, revision).await {
                Ok(_) => {
                    self.cache
                        .lock()
                        .expect("not poisoned")
                        .insert(job.to_string(), assignment);
                    return Ok(());
                }
                // Changed meanwhile: read it again.
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(error) => {
                    return Err(GateRefusal::Unavailable(format!(
                        "cannot write bucket `{}-assignments`: {error}",
                        self.shared.name
                    )));
                }
            }
        }
        Err(GateRefusal::Unavailable(format!(
            "job {job}: its assignment kept changing while this host wrote it"
        )))
    }

    /// The gate a run of job `job` under `generation`, running `spec`,
    /// commits through.
    pub fn fence(
        self: &Arc<Self>,
        job: &str,
        generation: u64,
        spec: JobSpec,
    ) -> Arc<dyn CommitGate> {
        Arc::new(Fence {
            assignments: self.clone(),
            job: job.to_string(),
            generation,
            spec,
        })
    }

    /// On the coordinator, every [`TIDY_EVERY`]: deletes the exchange
    /// streams of each staged job whose stages all ended for good (each
    /// stream `weir-<job id>_…`, see `job::stages`), then records it.
    async fn delete_ended_exchanges(&self, all: &[(Assignment, u64)]) {
        {
            let mut tidied = self.tidied.lock().expect("not poisoned");
            if tidied.is_some_and(|at| at.elapsed() < TIDY_EVERY) {
                return;
            }
            *tidied = Some(Instant::now());
        }
        let staged = match self.staged().list().await {
            Ok(staged) => staged,
            Err(error) => {
                warn!(%error, "cannot list the staged jobs");
                return;
            }
        };
        let ended = |job: &str| all.iter().any(|(a, _)| a.job == job && a.ended);
        let done: Vec<_> = staged
            .iter()
            .filter(|s| !s.exchanges_deleted && s.stages.iter().all(|st| ended(&st.job)))
            .collect();
        if done.is_empty() {
            return;
        }
        let names: Vec<String> = match self.js.stream_names().try_collect().await {
            Ok(names) => names,
            Err(error) => {
                warn!(%error, "cannot list the streams");
                return;
            }
        };
        for job in done {
            let prefix = format!("weir-{}_", job.job);
            let mut deleted = true;
            for name in names.iter().filter(|n| n.starts_with(&prefix)) {
                match self.js.delete_stream(name).await {
                    Ok(_) => {
                        info!(job = %job.job, stream = %name, "every stage ended: its exchange deleted")
                    }
                    Err(error) => {
                        warn!(job = %job.job, stream = %name, %error, "cannot delete an ended job's exchange");
                        deleted = false;
                    }
                }
            }
            if deleted && let Err(error) = self.staged().exchanges_deleted(&job.job).await {
                warn!(job = %job.job, %error, "cannot record the job's exchanges deleted");
            }
        }
    }

    /// Follows the assignments until aborted: adopts, releases, marks ended
    /// jobs, and (on the coordinator) moves the jobs of dead hosts.
    pub(super) async fn follow(self: Arc<Self>, owner: Arc<dyn Owner>) {
        let mut tick = tokio::time::interval(FOLLOW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(error) = self.step(owner.as_ref()).await {
                warn!(cluster = %self.shared.name, %error, "cannot follow the job assignments");
            }
        }
    }

    /// One look: see [`Self::follow`].
    async fn step(&self, owner: &dyn Owner) -> Result<(), ClusterError> {
        let live = self.live_members().await?;
        let mut all = self.all().await?;
        let coordinator = self.shared.lock().held.is_some();
        if coordinator && self.shared.members_steady() {
            let moved = self.move_from_dead(&mut all, &live).await;
            if !moved {
                self.rebalance(&mut all, &live).await;
            }
        }
        if coordinator {
            self.delete_ended_exchanges(&all).await;
        }
        let local: HashMap<String, LocalJob> = owner
            .local_jobs()
            .into_iter()
            .map(|j| (j.id.clone(), j))
            .collect();
        let me = self.shared.id.as_str();
        for (assignment, _) in &all {
            let here = local.get(&assignment.job);
            if assignment.host == me {
                let runs_it = here.is_some_and(|j| {
                    j.driven && j.generation == Some(assignment.generation) && !j.ended
                });
                let ended_here = here.is_some_and(|j| {
                    j.generation == Some(assignment.generation) && j.ended && !j.driven
                });
                if ended_here && !assignment.ended {
                    let result = self
                        .change_own(&assignment.job, assignment.generation, |a| a.ended = true)
                        .await;
                    if let Err(error) = result {
                        warn!(job = %assignment.job, ?error, "cannot mark the job ended");
                    }
                } else if !assignment.ended
                    && !runs_it
                    && !ended_here
                    && !here.is_some_and(|j| j.driven)
                {
                    if let Err(reason) = owner.can_run(&assignment.spec) {
                        warn!(job = %assignment.job, %reason, "cannot take up the job yet");
                        continue;
                    }
                    // Taken up under a generation of its own, so that any
                    // earlier run of it here (a previous process of this
                    // host) is fenced; a run of it still going here ends
                    // fenced first.
                    let claimed = self
                        .change_own(&assignment.job, assignment.generation, |a| {
                            a.generation += 1
                        })
                        .await;
                    let claimed = match claimed {
                        Ok(()) => self
                            .cache
                            .lock()
                            .expect("not poisoned")
                            .get(&assignment.job)
                            .cloned(),
                        Err(error) => {
                            warn!(job = %assignment.job, ?error, "cannot take up the job");
                            None
                        }
                    };
                    if let Some(claimed) = claimed {
                        info!(job = %claimed.job, generation = claimed.generation, reason = %claimed.reason, "adopting the job");
                        if let Err(error) = owner.adopt(claimed).await {
                            warn!(job = %assignment.job, %error, "cannot adopt the job");
                        }
                    }
                }
            } else if let Some(job) = here
                && job.generation.is_some()
            {
                let reason = format!(
                    "job {} moved to host `{}` (generation {}): {}",
                    assignment.job, assignment.host, assignment.generation, assignment.reason
                );
                info!(job = %assignment.job, %reason, "releasing the job");
                owner.release(assignment.job.clone(), reason).await;
            }
        }
        Ok(())
    }

    /// The members that are live: their entry is there and was renewed
    /// within a lease by this host's clock.
    async fn live_members(&self) -> Result<Vec<String>, ClusterError> {
        let members = &self.shared.members;
        let read = |e: String| ClusterError::Buckets {
            name: self.shared.name.clone(),
            message: format!("cannot read bucket `{}-members`: {e}", self.shared.name),
        };
        let mut keys = members.keys().await.map_err(|e| read(e.to_string()))?;
        let mut revisions = HashMap::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| read(e.to_string()))?;
            let Some(id) = key.strip_prefix(HOSTS) else {
                continue;
            };
            if let Some(entry) = members
                .entry(&key)
                .await
                .map_err(|e| read(e.to_string()))?
                .filter(|e| e.operation == kv::Operation::Put)
            {
                revisions.insert(id.to_string(), entry.revision);
            }
        }
        let now = Instant::now();
        let lease = self.shared.lease;
        let mut seen = self.seen.lock().expect("not poisoned");
        seen.retain(|id, _| revisions.contains_key(id));
        let mut live = Vec::new();
        for (id, revision) in revisions {
            let since = match seen.get(&id) {
                Some((last, since)) if *last == revision => *since,
                _ => {
                    seen.insert(id.clone(), (revision, now));
                    now
                }
            };
            if now.duration_since(since) < lease || id == self.shared.id {
                live.push(id);
            }
        }
        // This host is live while it runs this, even if its own entry
        // lapsed (its renewals starved of CPU): a coordinator never moves
        // its own jobs off itself.
        if !live.contains(&self.shared.id) {
            live.push(self.shared.id.clone());
        }
        live.sort();
        Ok(live)
    }

    /// The coordinator's part: every live job of a host not in `live`
    /// goes to the live host with the fewest tasks of its stage, then the
    /// fewest jobs (a compare-and-set that bumps its generation).
    async fn move_from_dead(&self, all: &mut [(Assignment, u64)], live: &[String]) -> bool {
        if live.is_empty() {
            return false;
        }
        let mut loads = Loads::of(all, live);
        let mut moves = Vec::new();
        for (i, (assignment, _)) in all.iter().enumerate() {
            if assignment.ended || loads.jobs.contains_key(assignment.host.as_str()) {
                continue;
            }
            let to = loads
                .take(stage_of(&assignment.job).as_deref())
                .expect("live is not empty");
            moves.push((i, to.to_string()));
        }
        let moved = !moves.is_empty();
        for (i, to) in moves {
            let from = all[i].0.host.clone();
            let reason = format!(
                "failed over from host `{from}` (its lease lapsed), by coordinator `{}`",
                self.shared.id
            );
            self.move_to(&mut all[i], &to, reason).await;
        }
        moved
    }

    /// Gives `entry`'s job to host `to` under a new generation (a
    /// compare-and-set on its revision: its old owner is fenced from the
    /// next commit on); `false` if it changed meanwhile.
    async fn move_to(&self, entry: &mut (Assignment, u64), to: &str, reason: String) -> bool {
        let (assignment, revision) = entry;
        let from = assignment.host.clone();
        let mut moved = assignment.clone();
        moved.host = to.to_string();
        moved.generation += 1;
        moved.reason = reason;
        let bytes = Bytes::from(serde_json::to_vec(&moved).unwrap_or_default());
        match self
            .bucket
            .update(key(&assignment.job), bytes, *revision)
            .await
        {
            Ok(next) => {
                info!(job = %moved.job, %from, %to, generation = moved.generation, reason = %moved.reason, "moved the job");
                *assignment = moved;
                *revision = next;
                true
            }
            Err(error) => {
                warn!(job = %assignment.job, %error, "cannot move the job (changed meanwhile)");
                false
            }
        }
    }

    /// On the coordinator, at most every [`REBALANCE_EVERY`], for
    /// [`REBALANCE_FOR`] after a host joined: while one live host runs two
    /// jobs more than another, moves one of its running jobs that has
    /// committed a restore point to the least loaded, as a failover does
    /// (a new generation: the old owner is fenced and releases it, the new
    /// one restores its restore point). One at a time, so the cluster
    /// settles between moves; never otherwise (a placement skewed for a
    /// moment, as while a rescale's old tasks are being marked ended,
    /// moves nothing).
    async fn rebalance(&self, all: &mut [(Assignment, u64)], live: &[String]) {
        {
            let mut balancing = self.balanced.lock().expect("not poisoned");
            let now = Instant::now();
            let members: std::collections::BTreeSet<String> = live.iter().cloned().collect();
            let joined = balancing
                .members
                .as_ref()
                .is_some_and(|known| members.iter().any(|m| !known.contains(m)));
            balancing.members = Some(members);
            if joined {
                balancing.until = Some(now + REBALANCE_FOR);
            }
            if balancing.until.is_none_or(|until| now > until)
                || balancing
                    .looked
                    .is_some_and(|at| at.elapsed() < REBALANCE_EVERY)
            {
                return;
            }
            balancing.looked = Some(now);
        }
        let mut load: BTreeMap<&str, usize> = live.iter().map(|h| (h.as_str(), 0)).collect();
        for (assignment, _) in all.iter() {
            if !assignment.ended
                && let Some(count) = load.get_mut(assignment.host.as_str())
            {
                *count += 1;
            }
        }
        let (Some((&most, &high)), Some((&least, &low))) = (
            load.iter()
                .max_by_key(|(host, count)| (**count, std::cmp::Reverse(**host))),
            load.iter().min_by_key(|(host, count)| (**count, **host)),
        ) else {
            return;
        };
        // Uneven for a whole interval: a placement skewed for a moment
        // (a rescale's old tasks being marked ended) moves nothing.
        let since = {
            let mut balancing = self.balanced.lock().expect("not poisoned");
            if high < low + 2 {
                balancing.uneven_since = None;
                return;
            }
            *balancing.uneven_since.get_or_insert_with(Instant::now)
        };
        if since.elapsed() < REBALANCE_EVERY {
            return;
        }
        // Running there, with a restore point: nothing in the middle of
        // an upgrade, a stop or a start is moved.
        let directory = match self
            .js
            .get_key_value(super::jobs::bucket_name(&self.shared.name))
            .await
        {
            Ok(directory) => directory,
            Err(error) => {
                warn!(%error, "cannot read the job directory to rebalance");
                return;
            }
        };
        let mut candidates: Vec<usize> = all
            .iter()
            .enumerate()
            .filter(|(_, (a, _))| !a.ended && a.host == most && a.restore.is_some())
            .map(|(i, _)| i)
            .collect();
        // A job whose stage has no task on the least loaded host first
        // (a stage's tasks apart), then by id.
        let beside = |i: usize| {
            let stage = stage_of(&all[i].0.job);
            stage.is_some()
                && all
                    .iter()
                    .any(|(a, _)| !a.ended && a.host == least && stage_of(&a.job) == stage)
        };
        candidates.sort_by(|a, b| (beside(*a), &all[*b].0.job).cmp(&(beside(*b), &all[*a].0.job)));
        for i in candidates {
            let assignment = &all[i].0;
            let running = super::jobs::entry_in(&directory, &assignment.job)
                .await
                .ok()
                .flatten()
                .is_some_and(|entry| {
                    entry.host == most
                        && entry.summary.status == crate::control::lifecycle::JobStatus::Running
                });
            if !running {
                continue;
            }
            let reason = format!(
                "rebalanced from host `{most}` ({high} jobs) to `{least}` ({low}), by coordinator `{}`",
                self.shared.id
            );
            self.move_to(&mut all[i], least, reason).await;
            return;
        }
    }
}

/// A task's stage, as its job id names it (`<staged job>-<stage n>-…`);
/// none for a movable job that is not a task (its id has no `-`).
pub fn stage_of(job: &str) -> Option<String> {
    let mut parts = job.splitn(3, '-');
    let (staged, stage, _) = (parts.next()?, parts.next()?, parts.next()?);
    Some(format!("{staged}-{stage}"))
}

/// The live hosts' load, as placement weighs it: live jobs per host, and
/// each stage's tasks per host.
struct Loads<'a> {
    jobs: BTreeMap<&'a str, usize>,
    tasks: BTreeMap<(String, &'a str), usize>,
}

impl<'a> Loads<'a> {
    fn of(all: &[(Assignment, u64)], live: &'a [String]) -> Self {
        let mut loads = Loads {
            jobs: live.iter().map(|h| (h.as_str(), 0)).collect(),
            tasks: BTreeMap::new(),
        };
        for (assignment, _) in all.iter().filter(|(a, _)| !a.ended) {
            let Some(host) = live
                .iter()
                .map(String::as_str)
                .find(|h| *h == assignment.host)
            else {
                continue;
            };
            *loads.jobs.get_mut(host).expect("a live host") += 1;
            if let Some(stage) = stage_of(&assignment.job) {
                *loads.tasks.entry((stage, host)).or_default() += 1;
            }
        }
        loads
    }

    /// The host for one more job of `stage`, counted there: the fewest of
    /// its stage's tasks first — a stage's tasks apart, so that a host's
    /// death takes as few of one stage's tasks as it can — then the fewest
    /// jobs, then by id. None without a live host.
    fn take(&mut self, stage: Option<&str>) -> Option<&'a str> {
        let siblings = |tasks: &BTreeMap<(String, &'a str), usize>, host: &'a str| {
            stage.map_or(0, |s| {
                tasks.get(&(s.to_string(), host)).copied().unwrap_or(0)
            })
        };
        let (&host, _) = self
            .jobs
            .iter()
            .min_by_key(|(host, count)| (siblings(&self.tasks, host), **count, **host))?;
        *self.jobs.get_mut(host).expect("a live host") += 1;
        if let Some(stage) = stage {
            *self.tasks.entry((stage.to_string(), host)).or_default() += 1;
        }
        Some(host)
    }
}

/// The commit gate of a run of a movable job: see the module's "Fencing".
#[derive(Debug)]
pub struct Fence {
    assignments: Arc<Assignments>,
    job: String,
    generation: u64,
    /// What the run runs: written with each restore point it admits, so
    /// the job moves as the version that wrote its restore point (an
    /// upgrade's new version only once its probation released a commit).
    spec: JobSpec,
}

/// How long the gate keeps asking while the bucket does not answer (a
/// NATS node died and its streams elect new leaders) before the
/// checkpoint counts as failed.
const GATE_PATIENCE: Duration = Duration::from_secs(15);

impl CommitGate for Fence {
    fn admit(
        &self,
        _checkpoint: u64,
        restore_point: Location,
    ) -> Pin<Box<dyn Future<Output = Result<(), GateRefusal>> + Send + '_>> {
        Box::pin(async move {
            let point = restore_point.to_string();
            let deadline = Instant::now() + GATE_PATIENCE;
            let mut pause = Duration::from_millis(50);
            loop {
                let result = self
                    .assignments
                    .change_own(&self.job, self.generation, |a| {
                        a.restore = Some(point.clone());
                        a.spec = self.spec.clone();
                    })
                    .await;
                match result {
                    Err(GateRefusal::Unavailable(reason)) if Instant::now() < deadline => {
                        warn!(job = %self.job, %reason, "the commit gate cannot reach the cluster's assignments; asking again");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                    other => return other,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(source: &str, sink: &str) -> JobFile {
        let text = format!(
            "name = \"j\"\n[[source]]\nuid = \"in\"\n{source}\n[[sink]]\nuid = \"out\"\ninputs = [\"in\"]\n{sink}\n"
        );
        JobFile::parse(&text, std::path::Path::new("job.toml")).expect("parses")
    }

    #[test]
    fn only_jobs_with_nothing_on_one_hosts_disk_move() {
        let nats_in = "kind = \"nats\"\nurl = \"nats://x:4222\"\nstream = \"s\"\nsubject = \"a\"";
        let nats_out = "kind = \"nats\"\nurl = \"nats://x:4222\"\nstream = \"o\"\nsubject = \"b\"";
        assert!(movable(&file(nats_in, nats_out)));
        assert!(movable(&file(
            "kind = \"generator\"",
            "kind = \"blackhole\""
        )));
        assert!(!movable(&file(
            "kind = \"file\"\npath = \"in.txt\"",
            nats_out
        )));
        assert!(!movable(&file(nats_in, "kind = \"file\"\npath = \"out\"")));
        assert!(!movable(&file(
            "kind = \"socket\"\naddress = \"127.0.0.1:9\"",
            nats_out
        )));
        assert!(!movable(&file(nats_in, "kind = \"stdout\"")));
    }

    fn assigned(job: &str, host: &str, ended: bool) -> (Assignment, u64) {
        let spec = JobSpec {
            job_file: String::new(),
            file_name: "job.toml".into(),
            base_dir: "/".into(),
            resolved: BTreeMap::new(),
            overrides: BTreeMap::new(),
            parallelism: BTreeMap::new(),
            storage: None,
            task: None,
        };
        let assignment = Assignment {
            job: job.into(),
            name: "j".into(),
            submitted_ms: 0,
            spec,
            allow_non_restored_state: false,
            initial_restore: None,
            host: host.into(),
            generation: 1,
            restore: None,
            ended,
            reason: String::new(),
        };
        (assignment, 1)
    }

    #[test]
    fn a_stages_tasks_go_apart_before_jobs_go_to_the_least_loaded() {
        assert_eq!(stage_of("abc-1-0").as_deref(), Some("abc-1"));
        assert_eq!(stage_of("abc-1-f00d-2").as_deref(), Some("abc-1"));
        assert_eq!(stage_of("abc"), None, "a movable job that is no task");
        let live: Vec<String> = ["a", "b", "c"].map(String::from).into();
        // b runs task 0 of stage s-1 and two other jobs; c runs task 1 and
        // one; a runs two jobs (an ended one does not count).
        let all = [
            assigned("s-1-0", "b", false),
            assigned("x", "b", false),
            assigned("y", "b", false),
            assigned("s-1-1", "c", false),
            assigned("z", "c", false),
            assigned("u", "a", false),
            assigned("v", "a", false),
            assigned("s-1-9", "a", true),
        ];
        let mut loads = Loads::of(&all, &live);
        assert_eq!(
            loads.take(Some("s-1")),
            Some("a"),
            "none of its stage there"
        );
        // Each host runs one task of s-1 now: the least loaded (c, 2 jobs).
        assert_eq!(loads.take(Some("s-1")), Some("c"));
        // A job of no stage, or of another: the least loaded, by id.
        assert_eq!(loads.take(None), Some("a"));
        assert_eq!(loads.take(Some("t-0")), Some("b"));
        assert_eq!(loads.jobs, BTreeMap::from([("a", 4), ("b", 4), ("c", 3)]));
        // A new stage's three tasks on three hosts with unequal loads.
        let mut fresh = Loads::of(&all, &live);
        let placed: Vec<_> = (0..3).filter_map(|_| fresh.take(Some("s-2"))).collect();
        assert_eq!(placed, ["a", "c", "b"], "apart, the least loaded first");
        assert_eq!(Loads::of(&all, &[]).take(None), None, "no live host");
    }
}
