//! The checkpoint coordinator of one job.
//!
//! [`JobCheckpoints`] lives as long as the job (across restarts): the next
//! checkpoint id, the retained completed checkpoints and the reference
//! counts of their shared files. A [`Coordinator`] runs per attempt: it
//! triggers checkpoint n at every source subtask (`interval`, at most one in
//! flight, `min_pause` after the previous one; at once when a source's
//! input ended while others read on), collects one
//! [`TaskReport::Ack`] per subtask, then writes `_metadata` atomically and
//! only then tells the sinks ([`CommitSignal`](crate::protocol::CommitSignal)). A checkpoint that times out
//! or that a subtask declines is aborted; more than `tolerable_failures` in
//! a row fail the attempt. When every sink has finished it tells them to
//! commit the rest (the job ended) or to discard it (the job was cancelled:
//! it resumes from its latest checkpoint). A [`CommitGate`], when the
//! attempt has one, is asked between the `_metadata` and the sinks: a
//! refusal fences the attempt (it ends, committing nothing more).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::CheckpointError;
use super::metadata::{self, CheckpointMetadata, OperatorSnapshot, ReadMetadata, SnapshotKind};
use super::retention::SharedRegistry;
use crate::protocol::{
    CoordinatorError, CoordinatorOutcome, CoordinatorWiring, CutAt, Role, SnapshotStats,
    SourcePace, StopAfter, SubtaskSnapshot, TaskReport, TransferProgress, Trigger,
};
use crate::roots::Roots;
use crate::types::{
    Barrier, BarrierKind, BaseRule, CheckpointId, Location, OutDir, S3Url, SavepointForm,
    SavepointTarget,
};

/// Asked once a checkpoint or savepoint completed and before the sinks
/// hear of it: whether this attempt may still commit. The running host in
/// a cluster answers it with a compare-and-set on the job's assignment
/// (its generation must still be this host's), recording `restore_point`
/// as where the job resumes from; a refusal (another host owns the job
/// now) ends the attempt as fenced, its output uncommitted.
pub trait CommitGate: Send + Sync + std::fmt::Debug {
    fn admit(
        &self,
        checkpoint: u64,
        restore_point: Location,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), GateRefusal>> + Send + '_>>;
}

/// Why a [`CommitGate`] refused a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateRefusal {
    /// Another owner runs the job now: the attempt ends, never to restart
    /// here.
    Fenced(String),
    /// The gate could not tell (its store did not answer): the checkpoint
    /// counts as failed, a later one may commit.
    Unavailable(String),
}

/// A completed checkpoint or savepoint, as [`Coordinator::complete`] wrote it.
struct Completed {
    id: u64,
    /// The savepoint the job stops with.
    stopped: Option<Location>,
    /// Where it is (the remote copy, if any).
    location: Location,
    /// Written, but not yet this job's newest restore point: the commit
    /// gate decides ([`JobCheckpoints::register`] or
    /// [`JobCheckpoints::discard`]). None: registered already (no gate).
    unregistered: Option<(ReadMetadata, bool)>,
}

/// Checkpoint settings as the coordinator uses them.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    /// None: no periodic checkpoints.
    pub interval: Option<Duration>,
    pub timeout: Duration,
    pub min_pause: Duration,
    pub tolerable_failures: u32,
}

/// Counters the progress line shows, and the recent completed checkpoints
/// (the running host lists them with the job).
#[derive(Debug, Default)]
pub struct CheckpointMetrics {
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    /// Given up without a fault: the job's sources ended first.
    pub aborted: AtomicU64,
    /// Id of the newest completed checkpoint (0: none).
    pub latest: AtomicU64,
    /// The newest completed checkpoints, oldest first (at most
    /// [`CheckpointMetrics::HISTORY`]).
    pub history: Mutex<std::collections::VecDeque<CheckpointRecord>>,
}

impl CheckpointMetrics {
    /// How many completed checkpoints `history` keeps.
    pub const HISTORY: usize = 100;

    fn record(&self, record: CheckpointRecord) {
        let mut history = self.history.lock().expect("not poisoned");
        if history.len() == Self::HISTORY {
            history.pop_front();
        }
        history.push_back(record);
    }

    /// The recorded checkpoints, oldest first.
    pub fn recent(&self) -> Vec<CheckpointRecord> {
        self.history
            .lock()
            .expect("not poisoned")
            .iter()
            .cloned()
            .collect()
    }
}

/// One completed checkpoint, as the running host shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointRecord {
    pub id: u64,
    /// Wall-clock time it completed (ms since the Unix epoch).
    pub completed_ms: u64,
    /// From the trigger to `_metadata`.
    pub duration: Duration,
    /// The longest alignment of any subtask.
    pub alignment: Duration,
    /// The longest synchronous part of any subtask's snapshot.
    pub sync: Duration,
    /// The longest asynchronous part (upload) of any subtask's snapshot.
    pub asynchronous: Duration,
    /// Bytes the checkpoint references.
    pub bytes: u64,
    /// Bytes written for it (not reused from earlier checkpoints).
    pub new_bytes: u64,
}

#[derive(Debug)]
struct Inner {
    next_id: u64,
    registry: SharedRegistry,
    latest: Option<ReadMetadata>,
    /// Mirrored: shared files and spool files already on the remote.
    uploaded: std::collections::HashSet<String>,
}

/// The checkpoints of one job: `<checkpoint dir>/<job id>`, mirrored to
/// object storage when the checkpoint dir is remote (then `job_dir` is
/// the local staging directory).
#[derive(Debug)]
pub struct JobCheckpoints {
    pub job_dir: PathBuf,
    inner: Mutex<Inner>,
    pub metrics: Arc<CheckpointMetrics>,
    remote: Option<super::remote::Remote>,
}

impl JobCheckpoints {
    /// `first_id`: the first checkpoint id to use (a restored job continues
    /// after the checkpoint it restored).
    pub fn new(job_dir: PathBuf, retained: usize, first_id: u64) -> Self {
        Self {
            job_dir,
            inner: Mutex::new(Inner {
                next_id: first_id.max(1),
                registry: SharedRegistry::new(retained),
                latest: None,
                uploaded: Default::default(),
            }),
            metrics: Arc::default(),
            remote: None,
        }
    }

    /// Mirrors every completed checkpoint to `remote` (the job's directory
    /// on object storage).
    pub fn with_remote(mut self, remote: super::remote::Remote) -> Self {
        self.remote = Some(remote);
        self
    }

    /// Where checkpoint `id` of this job is: its directory on the remote,
    /// or locally.
    pub fn location(&self, id: u64) -> Location {
        let name = super::checkpoint_dir_name(CheckpointId(id));
        match &self.remote {
            Some(remote) => Location::parse(&format!("{}/{name}", remote.url))
                .unwrap_or_else(|_| Location::Local(self.job_dir.join(&name))),
            None => Location::Local(self.job_dir.join(name)),
        }
    }

    /// Where a completed checkpoint of this job is, for messages: its
    /// `_metadata` on the remote, or locally.
    pub fn shown(&self, read: &ReadMetadata) -> String {
        match &self.remote {
            Some(remote) => format!(
                "{}/{}/{}",
                remote.url,
                super::checkpoint_dir_name(CheckpointId(read.metadata.checkpoint)),
                metadata::METADATA_FILE
            ),
            None => read.path.display().to_string(),
        }
    }

    /// Uploads what checkpoint `metadata` references and the remote lacks,
    /// then its `_metadata` (written locally already) with a put that
    /// never overwrites. Spool files the checkpoint no longer lists are
    /// deleted remotely (published).
    fn mirror(
        &self,
        remote: &super::remote::Remote,
        metadata: &CheckpointMetadata,
        chk: &str,
    ) -> Result<(), CheckpointError> {
        let mut uploads = Vec::new();
        let mut spooled = std::collections::HashSet::new();
        let uploaded = self.lock().uploaded.clone();
        for subtask in metadata.operators.values().flat_map(|op| &op.subtasks) {
            let files = subtask
                .files
                .iter()
                .chain(&subtask.deltas)
                .chain(&subtask.timers);
            for file in files {
                if !(file.is_shared() && uploaded.contains(&file.path)) {
                    uploads.push(file.path.clone());
                }
            }
            for name in subtask.pending.iter().filter(|p| p.starts_with("pending/")) {
                spooled.insert(name.clone());
                if !uploaded.contains(name) && self.job_dir.join(name).is_file() {
                    uploads.push(name.clone());
                }
            }
        }
        uploads.sort();
        uploads.dedup();
        let files = uploads
            .iter()
            .map(|p| (self.job_dir.join(p), p.clone()))
            .collect();
        let metadata_name = format!("{chk}/{}", metadata::METADATA_FILE);
        let bytes = std::fs::read(self.job_dir.join(&metadata_name))
            .map_err(|e| CheckpointError::io(self.job_dir.join(&metadata_name), e))?;
        let published: Vec<String> = uploaded
            .iter()
            .filter(|p| p.starts_with("pending/") && !spooled.contains(*p))
            .cloned()
            .collect();
        super::remote::block_on(async {
            remote.upload_all(files).await?;
            remote.put_new(&metadata_name, bytes).await?;
            for name in &published {
                remote.delete(name).await?;
            }
            Ok::<_, super::remote::RemoteError>(())
        })?;
        let mut inner = self.lock();
        inner.uploaded.extend(
            uploads
                .into_iter()
                .filter(|p| p.starts_with("shared/") || p.starts_with("pending/")),
        );
        for name in &published {
            inner.uploaded.remove(name);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("not poisoned")
    }

    fn next_id(&self) -> CheckpointId {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        CheckpointId(id)
    }

    /// The newest completed checkpoint of this job, if any.
    pub fn latest(&self) -> Option<ReadMetadata> {
        self.lock().latest.clone()
    }

    /// Writes `_metadata`, then retires checkpoints beyond retention and the
    /// shared files only they used. Blocking.
    fn complete(&self, metadata: CheckpointMetadata) -> Result<ReadMetadata, CheckpointError> {
        let read = self.write_completed(metadata)?;
        self.register(read.clone());
        Ok(read)
    }

    /// A checkpoint written by [`Self::write_completed`] that its commit
    /// gate refused: removed here and remotely, never restored (a restart
    /// of this run restores the newest registered one).
    fn discard(&self, read: &ReadMetadata) {
        let name = super::checkpoint_dir_name(CheckpointId(read.metadata.checkpoint));
        let _ = std::fs::remove_dir_all(self.job_dir.join(&name));
        if let Some(remote) = &self.remote
            && let Err(error) = super::remote::block_on(remote.delete_all(&name))
        {
            warn!(%error, checkpoint = read.metadata.checkpoint, "cannot remove a refused checkpoint remotely");
        }
    }

    /// Writes `_metadata` (and mirrors the checkpoint), without making it
    /// the newest: see [`Self::register`]. Blocking.
    fn write_completed(
        &self,
        metadata: CheckpointMetadata,
    ) -> Result<ReadMetadata, CheckpointError> {
        let dir = self.job_dir.join(super::checkpoint_dir_name(CheckpointId(
            metadata.checkpoint,
        )));
        std::fs::create_dir_all(&dir).map_err(|e| CheckpointError::io(&dir, e))?;
        let out = OutDir::open(&dir).map_err(|e| CheckpointError::io(&dir, e))?;
        let path = metadata::write(&out, &metadata)?;
        if let Some(remote) = &self.remote {
            let chk = super::checkpoint_dir_name(CheckpointId(metadata.checkpoint));
            if let Err(error) = self.mirror(remote, &metadata, &chk) {
                // Not complete anywhere: the local copy goes too.
                let _ = std::fs::remove_file(&path);
                return Err(error);
            }
        }
        Ok(ReadMetadata {
            path,
            base: self.job_dir.clone(),
            metadata,
        })
    }

    /// Makes a written checkpoint the newest (what a restart restores),
    /// then retires checkpoints beyond retention and the shared files only
    /// they used. Blocking.
    fn register(&self, read: ReadMetadata) {
        let mut inner = self.lock();
        let retired = inner
            .registry
            .complete(read.metadata.checkpoint, read.metadata.shared_files());
        inner.latest = Some(read.clone());
        drop(inner);
        for &id in &retired.checkpoints {
            let old = self
                .job_dir
                .join(super::checkpoint_dir_name(CheckpointId(id)));
            if let Err(error) = std::fs::remove_dir_all(&old) {
                warn!(dir = %old.display(), %error, "cannot remove a retired checkpoint");
            }
        }
        for file in &retired.shared {
            let _ = std::fs::remove_file(self.job_dir.join(file));
        }
        if let Some(remote) = &self.remote {
            {
                let mut inner = self.lock();
                for file in &retired.shared {
                    inner.uploaded.remove(file);
                }
            }
            let removed = super::remote::block_on(async {
                for &id in &retired.checkpoints {
                    remote
                        .delete_all(&super::checkpoint_dir_name(CheckpointId(id)))
                        .await?;
                }
                for file in &retired.shared {
                    remote.delete(file).await?;
                }
                Ok::<_, super::remote::RemoteError>(())
            });
            if let Err(error) = removed {
                warn!(%error, "cannot remove a retired checkpoint remotely");
            }
        }
    }

    /// Before an attempt starts (nothing in flight): removes checkpoint
    /// directories that never completed and shared files no retained
    /// checkpoint references (left by aborted checkpoints or a failed
    /// attempt).
    pub fn collect_garbage(&self) {
        let inner = self.lock();
        let retained: Vec<String> = inner
            .registry
            .retained()
            .map(|id| super::checkpoint_dir_name(CheckpointId(id)))
            .collect();
        if let Ok(entries) = std::fs::read_dir(&self.job_dir) {
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("chk-") && !retained.contains(&name) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let shared_dir = self.job_dir.join("shared");
        if let Ok(entries) = std::fs::read_dir(&shared_dir) {
            let present: Vec<String> = entries
                .filter_map(Result::ok)
                .map(|e| format!("shared/{}", e.file_name().to_string_lossy()))
                .collect();
            for orphan in inner.registry.orphans(present.iter().map(String::as_str)) {
                let _ = std::fs::remove_file(self.job_dir.join(orphan));
            }
        }
    }
}

/// A user's request for a savepoint of the running attempt.
#[derive(Debug)]
pub struct SavepointRequest {
    /// Where the savepoint directory is created.
    pub target: Location,
    /// Stop the job once the savepoint completed (stop-with-savepoint);
    /// `Some(true)`: drain first (every event-time timer fires).
    pub stop: Option<bool>,
    /// A stop whose sources send the barrier only once they are ready for
    /// an aligned stop: a stage of a staged job, once every stage writing
    /// to it stopped, so the stages' savepoints form one cut.
    pub aligned: bool,
    /// A task's part of a cluster savepoint taken without a stop: the
    /// cut's name (see [`SavepointTarget::cut`]).
    pub cut: Option<Arc<str>>,
    /// The form of the savepoint's state.
    pub form: SavepointForm,
    /// Before the savepoint's barrier, up to this many checkpoints (when
    /// checkpointing is on) that every operator subtask takes as a base,
    /// writing its cache to its backend while the job runs on, so the
    /// savepoint has little left to write: each round has less than the
    /// one before; they end once one took under [`PREPARED_UNDER`].
    pub prepare: u32,
    /// Where the savepoint is, or why there is none.
    pub reply: oneshot::Sender<Result<Location, String>>,
}

/// What the coordinator of a running attempt is asked for.
#[derive(Debug)]
pub enum Request {
    Savepoint(SavepointRequest),
    /// A checkpoint now (as soon as nothing is in flight), answered with
    /// it once it completed, or why it did not.
    Checkpoint(oneshot::Sender<Result<ReadMetadata, String>>),
    /// Hold (or stop holding) new bases: checkpoints are deltas of the
    /// current chain where there is one ([`BaseRule::Held`]).
    HoldBases(bool),
    /// Sources read at this percentage of their speed ([`SourcePace`]).
    PaceSources(u32),
}

/// A checkpoint that prepares a savepoint and took less than this (its
/// slowest subtask's snapshot) is the last one before the savepoint.
pub const PREPARED_UNDER: Duration = Duration::from_millis(50);

struct Pending {
    id: CheckpointId,
    started: Instant,
    acks: HashMap<(String, u32), (SubtaskSnapshot, SnapshotStats)>,
    /// Set when this barrier is a savepoint.
    savepoint: Option<PendingSavepoint>,
    /// The savepoint this checkpoint prepares: taken once it is done.
    then: Option<SavepointRequest>,
    /// Asked for this checkpoint (see [`Request::Checkpoint`]).
    waiters: Waiters,
}

impl Pending {
    fn checkpoint(id: CheckpointId, then: Option<SavepointRequest>) -> Self {
        Self {
            id,
            started: Instant::now(),
            acks: HashMap::new(),
            savepoint: None,
            then,
            waiters: Vec::new(),
        }
    }
}

/// A failed checkpoint that prepared a savepoint: the savepoint is taken
/// anyway, next, without further preparation.
fn requeue_follow_up(
    pending: &mut Option<Pending>,
    queued: &mut std::collections::VecDeque<SavepointRequest>,
) {
    if let Some(mut next) = pending.as_mut().and_then(|p| p.then.take()) {
        next.prepare = 0;
        queued.push_front(next);
    }
}

struct PendingSavepoint {
    dir: OutDir,
    /// A savepoint for object storage: `dir` is its local staging copy,
    /// uploaded here once complete.
    remote: Option<(super::remote::Remote, S3Url)>,
    stop: bool,
    reply: oneshot::Sender<Result<Location, String>>,
    /// Tells each stopping source whether the savepoint completed.
    outcomes: Vec<oneshot::Sender<bool>>,
}

/// Those who asked for a checkpoint ([`Request::Checkpoint`]).
type Waiters = Vec<oneshot::Sender<Result<ReadMetadata, String>>>;

/// Tells each waiter how its checkpoint ended.
fn answer(waiters: Waiters, outcome: &Result<ReadMetadata, String>) {
    for waiter in waiters {
        let _ = waiter.send(outcome.clone());
    }
}

/// Sources read at full speed again when dropped: a slowed input ends
/// with the attempt that slowed it, however it ends.
struct ResetPace<'a>(&'a SourcePace);

impl Drop for ResetPace<'_> {
    fn drop(&mut self) {
        self.0.set(100);
    }
}

/// The coordinator of one attempt.
pub struct Coordinator {
    pub settings: CoordinatorSettings,
    /// None: checkpointing is off (only savepoints and the end-of-job
    /// commit happen).
    pub store: Option<Arc<JobCheckpoints>>,
    /// `_metadata` of this job without subtasks: ids, name, per-uid plugin
    /// and states. Each completed checkpoint fills in the subtasks.
    pub template: CheckpointMetadata,
    /// The pace the job's sources read at (set when asked).
    pub pace: Arc<SourcePace>,
    /// Keys and bytes of the savepoint being written (progress).
    pub savepoint_progress: Arc<TransferProgress>,
    /// The first id when checkpointing is off (savepoints still need ids
    /// that grow across runs: sinks name their files by them).
    pub first_id: u64,
    /// While this reads `true`, completed checkpoints are not announced to
    /// the sinks (they keep their files pending); once it turns `false`,
    /// the newest is. The running host holds commits during an upgrade's
    /// probation, so a version that fails it leaves no committed output.
    pub commit_hold: Option<watch::Receiver<bool>>,
    /// The job id savepoint directories are named after
    /// (`savepoint-<first 6>-…`), when it is not the template's: the
    /// running host names them after the job, not the run.
    pub savepoint_job_id: Option<String>,
    /// Where savepoints for object storage are staged before they are
    /// uploaded.
    pub savepoint_staging: PathBuf,
    /// The running host's job roots: a local savepoint target inside them
    /// is written through their handles (None: `weir run`, paths as given).
    pub roots: Option<Arc<Roots>>,
    /// Asked before the sinks hear of a completed checkpoint (a cluster's
    /// fencing); None: every completed checkpoint commits.
    pub commit_gate: Option<Arc<dyn CommitGate>>,
}

/// One attempt's checkpointing as it goes: what is in flight, queued,
/// held, and how the job's tasks stand. [`Coordinator::run`] feeds it the
/// events of the attempt, one handler each.
struct Checkpointing<'c> {
    coordinator: &'c Coordinator,
    wiring: CoordinatorWiring,
    requests: Option<mpsc::UnboundedReceiver<Request>>,
    /// The checkpoint or savepoint in flight (at most one).
    pending: Option<Pending>,
    /// Savepoints asked for, taken once nothing is in flight.
    queued: std::collections::VecDeque<SavepointRequest>,
    /// Asked for a checkpoint: the next one triggered answers them.
    waiters: Waiters,
    next_local_id: u64,
    stopped_with: Option<Location>,
    last_trigger: Instant,
    last_done: Instant,
    /// A source has gone: nothing more can be triggered.
    sources_finished: bool,
    /// Sources whose input ended (they wait for the final checkpoint).
    inputs_ended: std::collections::HashSet<(String, u32)>,
    /// A source's input ended since the last checkpoint (others read on):
    /// the next one is due at once, so what followed from it (an
    /// exchange's end among it) is committed without waiting an interval.
    input_ended_since: bool,
    /// Every source's input ended and the final checkpoint was triggered
    /// (or, checkpointing off, the sources were let go).
    final_triggered: bool,
    /// The final checkpoint's id, once triggered.
    final_id: Option<CheckpointId>,
    /// Every sink finished (to commit) before the final checkpoint
    /// completed: their end is sent once it did.
    end_deferred: bool,
    sinks_finished: usize,
    failures_in_a_row: u32,
    /// Checkpoints are deltas wherever a chain exists (an upgrade's
    /// standby follows it).
    bases_held: bool,
    /// The commit hold, while it lasts, and the newest checkpoint it held.
    hold: Option<watch::Receiver<bool>>,
    held: u64,
    /// Where the newest held checkpoint is (for the commit gate).
    held_at: Option<Location>,
    /// The commit gate refused a checkpoint, saying why: the attempt ends.
    fenced: Option<String>,
}

/// What happened in one turn of the coordinator's loop.
enum Event {
    Released(bool),
    Request(Option<Request>),
    Report(Option<TaskReport>),
    TriggerDue,
    TimedOut,
}

impl Coordinator {
    /// Runs until every task has gone, answering the attempt's requests
    /// (savepoints, checkpoints on demand, held bases, source pace).
    /// `Ok(Some(dir))` when the job was stopped with the savepoint `dir`;
    /// an error when checkpoints failed more often in a row than tolerated
    /// or the final checkpoint failed.
    pub async fn run(
        self,
        wiring: CoordinatorWiring,
        requests: mpsc::UnboundedReceiver<Request>,
    ) -> CoordinatorOutcome {
        let _pace = ResetPace(&self.pace);
        let mut run = Checkpointing {
            coordinator: &self,
            wiring,
            requests: Some(requests),
            pending: None,
            queued: Default::default(),
            waiters: Waiters::new(),
            next_local_id: self.first_id.max(1),
            stopped_with: None,
            last_trigger: Instant::now(),
            last_done: Instant::now(),
            sources_finished: false,
            inputs_ended: Default::default(),
            input_ended_since: false,
            final_triggered: false,
            final_id: None,
            end_deferred: false,
            sinks_finished: 0,
            failures_in_a_row: 0,
            bases_held: false,
            hold: self.commit_hold.clone(),
            held: 0,
            held_at: None,
            fenced: None,
        };
        loop {
            if run.start_queued_savepoint() || run.trigger_final() {
                continue;
            }
            run.answer_waiters_if_none_can_come();
            let failed = match run.next_event().await {
                Event::Released(released) => {
                    run.released(released).await;
                    None
                }
                Event::Request(Some(request)) => {
                    run.request(request);
                    None
                }
                Event::Request(None) => {
                    run.requests = None;
                    None
                }
                Event::Report(Some(report)) => run.report(report).await,
                Event::Report(None) => break,
                Event::TriggerDue => {
                    run.trigger_periodic();
                    None
                }
                Event::TimedOut => Some(format!(
                    "timed out after {}",
                    crate::human::duration(self.settings.timeout)
                )),
            };
            if let Some(reason) = run.fenced.take() {
                run.coordinator.abort(run.pending.take(), &reason, false);
                return Err(CoordinatorError::Fenced { reason });
            }
            if let Some(reason) = failed {
                run.failed(reason)?;
            }
        }
        Ok(run.finish())
    }
}

impl Checkpointing<'_> {
    fn enabled(&self) -> bool {
        self.coordinator.store.is_some() && self.coordinator.settings.interval.is_some()
    }

    /// The next id: the store's, or (checkpointing off) a local one.
    fn next_id(&mut self) -> CheckpointId {
        match &self.coordinator.store {
            Some(store) => store.next_id(),
            None => {
                self.next_local_id += 1;
                CheckpointId(self.next_local_id - 1)
            }
        }
    }

    /// What a checkpoint's barrier asks of operator subtasks now.
    fn base_rule(&self) -> BaseRule {
        match self.bases_held {
            true => BaseRule::Held,
            false => BaseRule::Chain,
        }
    }

    /// A queued savepoint goes first, as soon as nothing is in flight:
    /// its preparing checkpoints, or its barrier. Whether it did anything.
    fn start_queued_savepoint(&mut self) -> bool {
        if self.pending.is_some() {
            return false;
        }
        let Some(request) = self.queued.pop_front() else {
            return false;
        };
        if self.sources_finished {
            let _ = request
                .reply
                .send(Err("the job's sources have ended: no savepoint".to_string()));
        } else if request.prepare > 0
            && let Some(store) = &self.coordinator.store
        {
            let id = store.next_id();
            debug!(
                checkpoint = id.0,
                rounds_left = request.prepare,
                "checkpoint preparing a savepoint"
            );
            self.last_trigger = Instant::now();
            match self.trigger(Barrier::checkpoint(id, BaseRule::Forced)) {
                true => self.pending = Some(Pending::checkpoint(id, Some(request))),
                false => {
                    self.sources_finished = true;
                    self.queued.push_front(request);
                }
            }
        } else {
            let id = self.next_id();
            self.pending = self.trigger_savepoint(id, request);
            self.last_trigger = Instant::now();
        }
        true
    }

    /// Every source's input ended: the final checkpoint covers the whole
    /// output (FLIP-147), then the sources end. Without checkpoints they
    /// end at once. Whether it did anything.
    fn trigger_final(&mut self) -> bool {
        let ready = self.pending.is_none()
            && !self.final_triggered
            && !self.sources_finished
            && !self.wiring.triggers.is_empty()
            && self.inputs_ended.len() == self.wiring.triggers.len();
        if !ready {
            return false;
        }
        self.final_triggered = true;
        match &self.coordinator.store {
            Some(store) if self.enabled() => {
                let id = store.next_id();
                self.final_id = Some(id);
                self.last_trigger = Instant::now();
                if self.trigger(Barrier {
                    id,
                    kind: BarrierKind::Final,
                }) {
                    info!(
                        checkpoint = id.0,
                        "the sources' input ended: final checkpoint"
                    );
                    self.pending = Some(Pending::checkpoint(id, None));
                } else {
                    self.sources_finished = true;
                }
            }
            _ => {
                // No checkpoint to wait for: the sources end now.
                self.wiring.triggers.clear();
                self.sources_finished = true;
            }
        }
        true
    }

    /// Those waiting for a checkpoint that will never be triggered hear so.
    fn answer_waiters_if_none_can_come(&mut self) {
        if self.waiters.is_empty()
            || (self.enabled() && !self.sources_finished && !self.final_triggered)
        {
            return;
        }
        let why = match self.enabled() {
            false => "checkpointing is off",
            true => "the job's sources have ended",
        };
        answer(std::mem::take(&mut self.waiters), &Err(why.to_string()));
    }

    /// Waits for the next thing to handle.
    async fn next_event(&mut self) -> Event {
        let settings = &self.coordinator.settings;
        let next_trigger = match (&self.pending, settings.interval) {
            (None, _) if !self.waiters.is_empty() => Some(Instant::now()),
            (None, Some(interval))
                if self.enabled() && !self.sources_finished && !self.final_triggered =>
            {
                let due = match self.input_ended_since {
                    true => Instant::now(),
                    false => self.last_trigger + interval,
                };
                Some(due.max(self.last_done + settings.min_pause))
            }
            _ => None,
        };
        let deadline = self.pending.as_ref().map(|p| p.started + settings.timeout);
        let requests_open = self.requests.is_some();
        tokio::select! {
            released = wait_released(&mut self.hold) => Event::Released(released),
            request = recv_request(&mut self.requests), if requests_open => Event::Request(request),
            report = self.wiring.reports.recv() => Event::Report(report),
            _ = sleep_until(next_trigger) => Event::TriggerDue,
            _ = sleep_until(deadline) => Event::TimedOut,
        }
    }

    /// The commit hold ended: what it held is announced (if released),
    /// once the commit gate, if any, admitted the newest held checkpoint
    /// as the job's restore point. Fenced: the attempt ends, nothing
    /// announced. The gate not answering: the next checkpoint commits
    /// what was held.
    async fn released(&mut self, released: bool) {
        self.hold = None;
        let held = self.held;
        if !released || held == 0 {
            return;
        }
        if let (Some(gate), Some(location)) = (&self.coordinator.commit_gate, self.held_at.take()) {
            match gate.admit(held, location).await {
                Ok(()) => {}
                Err(GateRefusal::Fenced(reason)) => {
                    warn!(checkpoint = held, %reason, "fenced: the held checkpoints commit nothing");
                    self.fenced = Some(reason);
                    return;
                }
                Err(GateRefusal::Unavailable(reason)) => {
                    warn!(checkpoint = held, %reason, "the held checkpoints' commit could not be checked: the next checkpoint commits them");
                    return;
                }
            }
        }
        self.wiring
            .commit
            .send_modify(|s| s.completed = s.completed.max(held));
    }

    /// A checkpoint written for a commit gate: made this run's newest
    /// restore point if `keep`, else removed (never restored).
    async fn settle(&self, unregistered: Option<(ReadMetadata, bool)>, keep: bool) {
        let (Some(store), Some((read, savepoint))) = (&self.coordinator.store, unregistered) else {
            return;
        };
        let store = store.clone();
        let _ = tokio::task::spawn_blocking(move || match (keep, savepoint) {
            (true, false) => store.register(read),
            (true, true) => store.lock().latest = Some(read),
            (false, false) => store.discard(&read),
            (false, true) => {}
        })
        .await;
    }

    fn request(&mut self, request: Request) {
        match request {
            Request::Savepoint(request) => self.queued.push_back(request),
            Request::Checkpoint(waiter) => self.waiters.push(waiter),
            Request::HoldBases(held) => self.bases_held = held,
            Request::PaceSources(percent) => self.coordinator.pace.set(percent),
        }
    }

    /// A subtask's report; returns why the checkpoint in flight failed, if
    /// it did.
    async fn report(&mut self, report: TaskReport) -> Option<String> {
        match report {
            TaskReport::Ack {
                checkpoint,
                snapshot,
                stats,
            } => self.ack(checkpoint, *snapshot, stats).await,
            TaskReport::Decline {
                checkpoint,
                uid,
                subtask,
                reason,
            } => self
                .pending
                .as_ref()
                .is_some_and(|p| p.id == checkpoint)
                .then(|| format!("`{uid}` (subtask {subtask}) declined: {reason}")),
            TaskReport::InputEnded { uid, subtask } => {
                self.inputs_ended.insert((uid, subtask));
                // All of them: the final checkpoint follows instead.
                self.input_ended_since = self.inputs_ended.len() < self.wiring.triggers.len();
                None
            }
            TaskReport::Finished {
                uid,
                subtask,
                role: Role::Source,
            } => {
                self.source_finished(uid, subtask);
                None
            }
            TaskReport::Finished {
                role: Role::Sink, ..
            } => {
                self.sink_finished();
                None
            }
            TaskReport::Finished {
                role: Role::Operator,
                ..
            } => None,
        }
    }

    /// A subtask's part of checkpoint n; once every subtask's is in, the
    /// checkpoint completes.
    async fn ack(
        &mut self,
        checkpoint: CheckpointId,
        snapshot: SubtaskSnapshot,
        stats: SnapshotStats,
    ) -> Option<String> {
        let pending = self.pending.as_mut().filter(|p| p.id == checkpoint)?;
        pending
            .acks
            .insert((snapshot.uid.clone(), snapshot.subtask), (snapshot, stats));
        if pending.acks.len() < self.wiring.subtasks.len() {
            return None;
        }
        let mut done = self.pending.take().expect("pending above");
        let is_savepoint = done.savepoint.is_some();
        if let Some(mut next) = done.then.take() {
            let slowest = done
                .acks
                .values()
                .map(|(_, s)| s.sync + s.asynchronous)
                .max()
                .unwrap_or_default();
            next.prepare = if slowest < PREPARED_UNDER {
                0
            } else {
                next.prepare - 1
            };
            self.queued.push_front(next);
        }
        match self.coordinator.complete(done).await {
            Ok(mut completed) => {
                let holding = self.hold.as_ref().is_some_and(|h| *h.borrow());
                if self.coordinator.commit_gate.is_some() && holding {
                    // Held (an upgrade's probation): the newest restore
                    // point of this run, but not yet the job's — a move
                    // meanwhile restores what came before the hold. The
                    // gate is asked once the hold is released.
                    self.settle(completed.unregistered.take(), true).await;
                    self.held_at = Some(completed.location.clone());
                } else if let Some(gate) = &self.coordinator.commit_gate {
                    let admitted = gate.admit(completed.id, completed.location.clone()).await;
                    // Admitted: the job's newest restore point (a restart
                    // of this run restores it); refused: removed, so a
                    // restart never commits what the gate did not admit.
                    self.settle(completed.unregistered.take(), admitted.is_ok())
                        .await;
                    match admitted {
                        Ok(()) => {}
                        Err(GateRefusal::Fenced(reason)) => {
                            warn!(checkpoint = completed.id, %reason, "fenced: the checkpoint completed but commits nothing");
                            self.fenced = Some(reason);
                            return None;
                        }
                        Err(GateRefusal::Unavailable(reason)) if !is_savepoint => {
                            return Some(format!("its commit could not be checked: {reason}"));
                        }
                        Err(GateRefusal::Unavailable(reason)) => {
                            warn!(savepoint = completed.id, %reason, "the savepoint completed but its commit could not be checked: the sinks commit it with the next checkpoint");
                            return None;
                        }
                    }
                }
                self.completed(completed.id, completed.stopped, is_savepoint, holding);
                None
            }
            Err(error) if is_savepoint => {
                warn!(%error, "savepoint failed");
                None
            }
            Err(error) => Some(error),
        }
    }

    /// Checkpoint (or savepoint) `id` completed: sinks hear of it unless
    /// commits were `held` when it began completing.
    fn completed(&mut self, id: u64, stopped: Option<Location>, is_savepoint: bool, held: bool) {
        if !is_savepoint {
            self.failures_in_a_row = 0;
        }
        self.stopped_with = self.stopped_with.take().or(stopped);
        self.last_done = Instant::now();
        if held {
            // Announced once the hold's release is seen (the loop's next
            // turn, if it came while this one completed).
            self.held = self.held.max(id);
        } else {
            self.wiring
                .commit
                .send_modify(|s| s.completed = s.completed.max(id));
        }
        if self.end_deferred && self.final_id == Some(CheckpointId(id)) {
            self.end_deferred = false;
            self.wiring.commit.send_modify(|s| s.end = Some(true));
        }
    }

    /// A source has gone: a checkpoint it took no part in can never
    /// complete.
    fn source_finished(&mut self, uid: String, subtask: u32) {
        self.sources_finished = true;
        if self
            .pending
            .as_ref()
            .is_some_and(|p| !p.acks.contains_key(&(uid, subtask)))
        {
            requeue_follow_up(&mut self.pending, &mut self.queued);
            self.coordinator.abort(
                self.pending.take(),
                "a source ended before taking part",
                false,
            );
            self.last_done = Instant::now();
        }
    }

    /// Once every sink finished: commit the rest (the job ended; after the
    /// final checkpoint, if it is in flight) or discard it (cancelled).
    fn sink_finished(&mut self) {
        self.sinks_finished += 1;
        if self.sinks_finished != self.wiring.sink_subtasks {
            return;
        }
        let cancelled = *self.wiring.cancelled.borrow();
        let commit = !(cancelled && self.enabled());
        if !commit {
            info!(
                "job cancelled: output after the latest checkpoint is discarded; resume from that checkpoint"
            );
        }
        if commit && self.final_pending() {
            // Committed by the final checkpoint, not before.
            self.end_deferred = true;
        } else {
            self.wiring.commit.send_modify(|s| s.end = Some(commit));
        }
    }

    /// The periodic (or asked-for) checkpoint is due.
    fn trigger_periodic(&mut self) {
        let store = self.coordinator.store.as_ref().expect("enabled");
        let id = store.next_id();
        self.last_trigger = Instant::now();
        self.input_ended_since = false;
        if self.trigger(Barrier::checkpoint(id, self.base_rule())) {
            let mut checkpoint = Pending::checkpoint(id, None);
            checkpoint.waiters = std::mem::take(&mut self.waiters);
            self.pending = Some(checkpoint);
        } else {
            self.sources_finished = true;
        }
    }

    /// The checkpoint (or savepoint) in flight failed for `reason`.
    fn failed(&mut self, reason: String) -> Result<(), CoordinatorError> {
        let id = self.pending.as_ref().map_or(0, |p| p.id.0);
        if self.final_pending() {
            // The sources have ended: no later checkpoint can cover the
            // output, so the job fails and resumes from its latest
            // checkpoint rather than commit it uncovered.
            self.coordinator.abort(self.pending.take(), &reason, true);
            return Err(CoordinatorError::FinalCheckpoint { id, reason });
        }
        let savepoint = self.pending.as_ref().is_some_and(|p| p.savepoint.is_some());
        requeue_follow_up(&mut self.pending, &mut self.queued);
        self.coordinator.abort(self.pending.take(), &reason, true);
        self.last_done = Instant::now();
        if savepoint {
            // A failed savepoint leaves the job running; it is not a
            // checkpoint failure.
            return Ok(());
        }
        self.failures_in_a_row += 1;
        let tolerable = self.coordinator.settings.tolerable_failures;
        if self.failures_in_a_row > tolerable {
            return Err(CoordinatorError::TooManyFailures {
                id,
                reason,
                failures: self.failures_in_a_row,
                tolerable,
            });
        }
        Ok(())
    }

    /// Every task has gone: what is in flight or queued is answered.
    fn finish(mut self) -> Option<Location> {
        if self.pending.as_ref().is_some_and(|p| p.savepoint.is_some()) {
            // Its directory holds no `_metadata`: remove it.
            self.coordinator.abort(
                self.pending.take(),
                "the job ended before it completed",
                false,
            );
        }
        for request in self.queued {
            let _ = request.reply.send(Err(
                "the job ended before the savepoint was taken".to_string()
            ));
        }
        answer(
            self.waiters,
            &Err("the job ended before the checkpoint".to_string()),
        );
        self.stopped_with
    }

    /// Whether the checkpoint in flight is the final one.
    fn final_pending(&self) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| Some(p.id) == self.final_id)
    }

    /// Sends `barrier` to every source; false when a source has gone.
    fn trigger(&self, barrier: Barrier) -> bool {
        let mut delivered = true;
        for trigger in &self.wiring.triggers {
            delivered &= trigger
                .send(Trigger {
                    barrier: barrier.clone(),
                    stop: None,
                    cut: None,
                })
                .is_ok();
        }
        delivered
    }

    /// Creates the savepoint directory and sends its barrier (id `id`) to
    /// every source. None when it could not start (the request is
    /// answered; a source that has gone ends triggering).
    fn trigger_savepoint(
        &mut self,
        id: CheckpointId,
        request: SavepointRequest,
    ) -> Option<Pending> {
        let mut sources_finished = self.sources_finished;
        let pending = self.coordinator.trigger_savepoint(
            id,
            request,
            &self.wiring.triggers,
            &mut sources_finished,
        );
        self.sources_finished = sources_finished;
        pending
    }
}

/// The next request, while the channel is open.
async fn recv_request(requests: &mut Option<mpsc::UnboundedReceiver<Request>>) -> Option<Request> {
    match requests {
        Some(requests) => requests.recv().await,
        None => std::future::pending().await,
    }
}

impl Coordinator {
    /// Creates the savepoint directory and sends barrier `id` to every
    /// source as a savepoint. None when it could not start (the request is
    /// answered; `sources_finished` is set if a source has gone).
    fn trigger_savepoint(
        &self,
        id: CheckpointId,
        request: SavepointRequest,
        triggers: &[mpsc::UnboundedSender<Trigger>],
        sources_finished: &mut bool,
    ) -> Option<Pending> {
        let (remote, local_target) = match &request.target {
            Location::S3(url) => match super::remote::Remote::open(url) {
                Ok(remote) => (Some((remote, url.clone())), &self.savepoint_staging),
                Err(error) => {
                    let _ = request.reply.send(Err(error.to_string()));
                    return None;
                }
            },
            Location::Local(dir) => (None, dir),
        };
        let dir = match super::savepoint::create_dir(
            self.roots.as_deref(),
            local_target,
            self.savepoint_job_id
                .as_deref()
                .unwrap_or(&self.template.job_id),
        ) {
            Ok(dir) => dir,
            Err(error) => {
                let _ = request.reply.send(Err(error.to_string()));
                return None;
            }
        };
        // Remotely: `<target>/<the directory's name>`.
        let remote = remote.map(|(r, url)| {
            let name = dir
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (r.join(&name), url.join(&name))
        });
        self.savepoint_progress.start();
        info!(savepoint = id.0, dir = %dir.path().display(), stop = request.stop.is_some(), "savepoint triggered");
        let barrier = Barrier {
            id,
            kind: BarrierKind::Savepoint(Arc::new(SavepointTarget {
                dir: dir.clone(),
                form: request.form,
                cut: request.cut.clone(),
            })),
        };
        let mut outcomes = Vec::new();
        let mut delivered = true;
        for trigger in triggers {
            let stop = request.stop.map(|drain| {
                let (sender, outcome) = oneshot::channel();
                outcomes.push(sender);
                StopAfter {
                    drain,
                    aligned: request.aligned,
                    outcome,
                }
            });
            let cut = request.cut.clone().map(|name| {
                let (sender, outcome) = oneshot::channel();
                outcomes.push(sender);
                CutAt { name, outcome }
            });
            delivered &= trigger
                .send(Trigger {
                    barrier: barrier.clone(),
                    stop,
                    cut,
                })
                .is_ok();
        }
        let pending = Pending {
            id,
            started: Instant::now(),
            acks: HashMap::new(),
            savepoint: Some(PendingSavepoint {
                dir,
                remote,
                stop: request.stop.is_some(),
                reply: request.reply,
                outcomes,
            }),
            then: None,
            waiters: Vec::new(),
        };
        if delivered {
            Some(pending)
        } else {
            *sources_finished = true;
            self.abort(Some(pending), "a source has ended", false);
            None
        }
    }

    /// Gives up the pending checkpoint or savepoint; `fault`: it failed
    /// (else it was aborted: the job's sources ended first).
    fn abort(&self, pending: Option<Pending>, reason: &str, fault: bool) {
        let Some(pending) = pending else { return };
        if let Some(savepoint) = pending.savepoint {
            warn!(savepoint = pending.id.0, reason, "savepoint aborted");
            self.savepoint_progress.finish();
            for outcome in savepoint.outcomes {
                let _ = outcome.send(false);
            }
            let _ = savepoint
                .reply
                .send(Err(format!("savepoint {} failed: {reason}", pending.id.0)));
            let dir = savepoint.dir;
            tokio::task::spawn_blocking(move || {
                let _ = dir.remove();
            });
            return;
        }
        warn!(checkpoint = pending.id.0, reason, "checkpoint aborted");
        answer(
            pending.waiters,
            &Err(format!("checkpoint {} failed: {reason}", pending.id.0)),
        );
        if let Some(store) = &self.store {
            let counter = match fault {
                true => &store.metrics.failed,
                false => &store.metrics.aborted,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let dir = store.job_dir.join(super::checkpoint_dir_name(pending.id));
            tokio::task::spawn_blocking(move || {
                let _ = std::fs::remove_dir_all(dir);
            });
        }
    }

    /// Writes `_metadata` (on a blocking thread, which finishes even if the
    /// attempt is torn down meanwhile) and logs the checkpoint. Returns its
    /// id and, for a stop-with-savepoint, the savepoint directory.
    async fn complete(&self, mut pending: Pending) -> Result<Completed, String> {
        let mut metadata = self.template.clone();
        metadata.checkpoint = pending.id.0;
        metadata.completed_ms = crate::types::now_millis();
        let mut stats = SnapshotStats::default();
        for ((uid, _), (snapshot, subtask_stats)) in std::mem::take(&mut pending.acks) {
            stats.alignment = stats.alignment.max(subtask_stats.alignment);
            stats.sync = stats.sync.max(subtask_stats.sync);
            stats.asynchronous = stats.asynchronous.max(subtask_stats.asynchronous);
            stats.bytes += subtask_stats.bytes;
            stats.new_bytes += subtask_stats.new_bytes;
            if let Some(operator) = metadata.operators.get_mut(&uid) {
                operator.subtasks.push(snapshot);
            }
        }
        for operator in metadata.operators.values_mut() {
            operator.subtasks.sort_by_key(|s| s.subtask);
        }
        if let Some(savepoint) = pending.savepoint.take() {
            return self
                .complete_savepoint(pending, savepoint, metadata, stats)
                .await;
        }
        let store = self
            .store
            .clone()
            .expect("only enabled coordinators trigger");
        let writer = store.clone();
        let gated = self.commit_gate.is_some();
        let written = tokio::task::spawn_blocking(move || match gated {
            true => writer.write_completed(metadata),
            false => writer.complete(metadata),
        })
        .await
        .map_err(|e| format!("writing _metadata: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
        answer(std::mem::take(&mut pending.waiters), &written);
        let written = written?;
        store.metrics.completed.fetch_add(1, Ordering::Relaxed);
        store.metrics.latest.store(pending.id.0, Ordering::Relaxed);
        store.metrics.record(CheckpointRecord {
            id: pending.id.0,
            completed_ms: crate::types::now_millis() as u64,
            duration: pending.started.elapsed(),
            alignment: stats.alignment,
            sync: stats.sync,
            asynchronous: stats.asynchronous,
            bytes: stats.bytes,
            new_bytes: stats.new_bytes,
        });
        info!(
            checkpoint = pending.id.0,
            duration_ms = pending.started.elapsed().as_millis() as u64,
            alignment_ms = stats.alignment.as_millis() as u64,
            sync_ms = stats.sync.as_millis() as u64,
            async_ms = stats.asynchronous.as_millis() as u64,
            size = stats.bytes,
            incremental_size = stats.new_bytes,
            "checkpoint completed"
        );
        Ok(Completed {
            id: pending.id.0,
            stopped: None,
            location: store.location(pending.id.0),
            unregistered: gated.then_some((written, false)),
        })
    }

    /// Writes a savepoint's `_metadata` into its own directory, answers the
    /// request and lets stopping sources end. A completed savepoint is also
    /// the point a later failure of this job restores from (its sinks
    /// committed what it covers).
    async fn complete_savepoint(
        &self,
        pending: Pending,
        savepoint: PendingSavepoint,
        mut metadata: CheckpointMetadata,
        stats: SnapshotStats,
    ) -> Result<Completed, String> {
        metadata.kind = SnapshotKind::Savepoint;
        let dir = savepoint.dir.clone();
        let remote = savepoint.remote.as_ref().map(|(remote, _)| remote.clone());
        let written = tokio::task::spawn_blocking(move || {
            let read = metadata::write(&dir, &metadata).map(|path| ReadMetadata {
                path,
                base: dir.path().to_path_buf(),
                metadata,
            })?;
            if let Some(remote) = &remote
                && let Err(error) = super::remote::block_on(upload_savepoint(remote, dir.path()))
            {
                // Not complete anywhere: the local copy goes too.
                let _ = std::fs::remove_file(&read.path);
                return Err(error.into());
            }
            Ok::<_, CheckpointError>(read)
        })
        .await
        .map_err(|e| format!("writing _metadata: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
        let read = match written {
            Ok(read) => read,
            Err(error) => {
                self.abort(
                    Some(Pending {
                        savepoint: Some(savepoint),
                        ..pending
                    }),
                    &error,
                    true,
                );
                return Err(error);
            }
        };
        self.savepoint_progress.finish();
        let gated = self.commit_gate.is_some();
        let unregistered = match (&self.store, gated) {
            (Some(_), true) => Some((read, true)),
            (Some(store), false) => {
                store.lock().latest = Some(read);
                None
            }
            (None, _) => None,
        };
        info!(
            savepoint = pending.id.0,
            dir = %savepoint.dir.path().display(),
            duration_ms = pending.started.elapsed().as_millis() as u64,
            size = stats.bytes,
            "savepoint completed"
        );
        for outcome in savepoint.outcomes {
            let _ = outcome.send(true);
        }
        // Where it is for the user: the remote location, if any (the local
        // staging copy stays the restore point of this run).
        let location = match &savepoint.remote {
            Some((_, url)) => Location::S3(url.clone()),
            None => Location::Local(savepoint.dir.path().to_path_buf()),
        };
        let _ = savepoint.reply.send(Ok(location.clone()));
        Ok(Completed {
            id: pending.id.0,
            stopped: savepoint.stop.then(|| location.clone()),
            location,
            unregistered,
        })
    }
}

/// Asks a running attempt's coordinator for savepoints (and checkpoints,
/// held bases, a slower pace).
#[derive(Debug, Clone)]
pub struct Savepointer(mpsc::UnboundedSender<Request>);

impl Savepointer {
    /// A savepointer and the coordinator's end of it (see
    /// [`Coordinator::run`]).
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<Request>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (Self(sender), receiver)
    }
}

impl Savepointer {
    /// Takes a savepoint under `target`; with `stop`, the job then stops
    /// (`Some(true)`: drained first). Resolves to the savepoint directory.
    pub async fn savepoint(
        &self,
        target: impl Into<Location>,
        stop: Option<bool>,
    ) -> Result<Location, String> {
        self.request(target.into(), stop, SavepointForm::Canonical, 0)
            .await
    }

    /// [`Savepointer::savepoint`] in native form: each subtask's state as
    /// its backend's files (a full base), restored file for file where the
    /// key-group range is unchanged. Quick to write and to reopen; the
    /// running host's shutdown takes these.
    pub async fn native_savepoint(
        &self,
        target: impl Into<Location>,
        stop: Option<bool>,
    ) -> Result<Location, String> {
        self.request(target.into(), stop, SavepointForm::Native, 0)
            .await
    }

    /// A native stop-with-savepoint (no drain) whose state is written
    /// ahead while the job runs on: first up to `rounds` checkpoints that
    /// every operator subtask takes as a base, each with less to write
    /// than the one before, so the stop itself has little left. What the
    /// running host's upgrades take: their downtime is the stop's.
    pub async fn prepared_stop(
        &self,
        target: impl Into<Location>,
        rounds: u32,
    ) -> Result<Location, String> {
        self.request(target.into(), Some(false), SavepointForm::Native, rounds)
            .await
    }

    /// A stop-with-savepoint (no drain) in [`SavepointForm::Incremental`]
    /// form: each subtask's checkpoint chain plus the changes since its
    /// last checkpoint. What an upgrade whose standby follows the chain
    /// takes.
    pub async fn incremental_stop(&self, target: impl Into<Location>) -> Result<Location, String> {
        self.request(target.into(), Some(false), SavepointForm::Incremental, 0)
            .await
    }

    /// Takes a checkpoint now (as soon as none is in flight); resolves to
    /// it once it completed.
    pub async fn checkpoint(&self) -> Result<ReadMetadata, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.0
            .send(Request::Checkpoint(reply))
            .map_err(|_| "the job has ended: no checkpoint".to_string())?;
        answer
            .await
            .map_err(|_| "the job ended before the checkpoint completed".to_string())?
    }

    /// Sources read at `percent` of their speed (100: as fast as they
    /// can); back to full speed when the attempt ends.
    pub fn pace_sources(&self, percent: u32) {
        let _ = self.0.send(Request::PaceSources(percent));
    }

    /// Bases no longer held, sources at full speed again (what the end of
    /// the attempt does anyway).
    pub fn release_holds(&self) {
        self.hold_bases(false);
        self.pace_sources(100);
    }

    /// While `held`, checkpoints are deltas of each subtask's current base
    /// (see [`BaseRule::Held`]).
    pub fn hold_bases(&self, held: bool) {
        let _ = self.0.send(Request::HoldBases(held));
    }

    /// A stop-with-savepoint (no drain) whose sources each send the
    /// barrier only once ready for an aligned stop
    /// ([`SavepointRequest::aligned`]): a stage of a staged job stopped
    /// as a whole.
    pub async fn aligned_stop(&self, target: impl Into<Location>) -> Result<Location, String> {
        self.ask(
            target.into(),
            Some(false),
            (true, None),
            SavepointForm::Canonical,
            0,
        )
        .await
    }

    /// A savepoint whose sources each send the barrier only once they
    /// reached cluster savepoint `cut` ([`SavepointTarget::cut`]): a
    /// task's part of a staged job's savepoint taken while it runs on.
    pub async fn cut_savepoint(
        &self,
        target: impl Into<Location>,
        cut: &str,
    ) -> Result<Location, String> {
        self.ask(
            target.into(),
            None,
            (false, Some(Arc::from(cut))),
            SavepointForm::Canonical,
            0,
        )
        .await
    }

    async fn request(
        &self,
        target: Location,
        stop: Option<bool>,
        form: SavepointForm,
        prepare: u32,
    ) -> Result<Location, String> {
        self.ask(target, stop, (false, None), form, prepare).await
    }

    async fn ask(
        &self,
        target: Location,
        stop: Option<bool>,
        (aligned, cut): (bool, Option<Arc<str>>),
        form: SavepointForm,
        prepare: u32,
    ) -> Result<Location, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.0
            .send(Request::Savepoint(SavepointRequest {
                target,
                stop,
                aligned,
                cut,
                form,
                prepare,
                reply,
            }))
            .map_err(|_| "the job has ended: no savepoint".to_string())?;
        answer
            .await
            .map_err(|_| "the job ended before the savepoint completed".to_string())?
    }
}

/// Uploads a completed savepoint directory: every file, then `_metadata`
/// with a put that never overwrites.
async fn upload_savepoint(
    remote: &super::remote::Remote,
    dir: &std::path::Path,
) -> Result<(), super::remote::RemoteError> {
    fn walk(
        dir: &std::path::Path,
        prefix: &str,
        into: &mut Vec<(PathBuf, String)>,
    ) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            if entry.file_type()?.is_dir() {
                walk(&entry.path(), &format!("{name}/"), into)?;
            } else if name != metadata::METADATA_FILE {
                into.push((entry.path(), name));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, "", &mut files).map_err(|cause| super::remote::RemoteError::Local {
        path: dir.to_path_buf(),
        cause,
    })?;
    remote.upload_all(files).await?;
    let path = dir.join(metadata::METADATA_FILE);
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|cause| super::remote::RemoteError::Local { path, cause })?;
    remote.put_new(metadata::METADATA_FILE, bytes).await
}

/// Resolves when a commit hold ends: `true` once it reads `false` (commit
/// what was held), `false` when its sender is gone (the hold stays: what
/// was held is never announced). Pending forever without a hold.
async fn wait_released(hold: &mut Option<watch::Receiver<bool>>) -> bool {
    let Some(receiver) = hold else {
        return std::future::pending().await;
    };
    let released = receiver.wait_for(|held| !*held).await.is_ok();
    if !released {
        std::future::pending::<()>().await;
    }
    true
}

/// The per-uid part of `_metadata` that does not change between checkpoints.
pub fn operator_template(role: Role, parallelism: u32) -> OperatorSnapshot {
    OperatorSnapshot {
        role,
        parallelism,
        plugin: None,
        states: Vec::new(),
        subtasks: Vec::new(),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::CommitSignal;
    use std::collections::BTreeMap;

    struct Harness {
        triggers: mpsc::UnboundedReceiver<Trigger>,
        /// The triggers of source subtasks 1.. (see [`start_sources`]).
        other_triggers: Vec<mpsc::UnboundedReceiver<Trigger>>,
        reports: mpsc::UnboundedSender<TaskReport>,
        commit: watch::Receiver<CommitSignal>,
        _cancel: watch::Sender<bool>,
        savepoints: Savepointer,
        run: tokio::task::JoinHandle<CoordinatorOutcome>,
        store: Arc<JobCheckpoints>,
        pace: Arc<SourcePace>,
    }

    impl Harness {
        async fn next_trigger(&mut self) -> CheckpointId {
            self.triggers.recv().await.expect("triggered").barrier.id
        }

        fn send(&self, request: Request) {
            self.savepoints.0.send(request).expect("sent");
        }
    }

    fn is_savepoint(trigger: &Trigger) -> bool {
        matches!(trigger.barrier.kind, BarrierKind::Savepoint(_))
    }

    fn base_rule(trigger: &Trigger) -> Option<BaseRule> {
        match trigger.barrier.kind {
            BarrierKind::Checkpoint { base } => Some(base),
            _ => None,
        }
    }

    /// A coordinator for a job of one source subtask and one sink subtask.
    fn start(dir: &std::path::Path, timeout: Duration, tolerable_failures: u32) -> Harness {
        start_with(
            dir,
            timeout,
            tolerable_failures,
            Some(Duration::from_millis(10)),
        )
    }

    fn start_with(
        dir: &std::path::Path,
        timeout: Duration,
        tolerable_failures: u32,
        interval: Option<Duration>,
    ) -> Harness {
        start_held(dir, timeout, tolerable_failures, interval, None, None)
    }

    fn start_held(
        dir: &std::path::Path,
        timeout: Duration,
        tolerable_failures: u32,
        interval: Option<Duration>,
        commit_hold: Option<watch::Receiver<bool>>,
        commit_gate: Option<Arc<dyn CommitGate>>,
    ) -> Harness {
        start_sources(
            dir,
            timeout,
            tolerable_failures,
            interval,
            (commit_hold, commit_gate),
            1,
        )
    }

    /// A coordinator for a job of `sources` source subtasks and one sink
    /// subtask.
    fn start_sources(
        dir: &std::path::Path,
        timeout: Duration,
        tolerable_failures: u32,
        interval: Option<Duration>,
        (commit_hold, commit_gate): (Option<watch::Receiver<bool>>, Option<Arc<dyn CommitGate>>),
        sources: u32,
    ) -> Harness {
        let store = Arc::new(JobCheckpoints::new(dir.join("job"), 2, 1));
        let pace = Arc::new(SourcePace::default());
        let (mut senders, mut receivers): (Vec<_>, Vec<_>) =
            (0..sources).map(|_| mpsc::unbounded_channel()).unzip();
        let triggers = receivers.remove(0);
        let (reports, report_receiver) = mpsc::unbounded_channel();
        let (commit, commit_receiver) = watch::channel(CommitSignal::default());
        let (cancel, cancelled) = watch::channel(false);
        let (savepoints, savepoint_requests) = Savepointer::channel();
        let mut operators = BTreeMap::new();
        operators.insert("src".to_string(), operator_template(Role::Source, sources));
        operators.insert("out".to_string(), operator_template(Role::Sink, 1));
        let coordinator = Coordinator {
            settings: CoordinatorSettings {
                interval,
                timeout,
                min_pause: Duration::ZERO,
                tolerable_failures,
            },
            store: Some(store.clone()),
            template: CheckpointMetadata {
                kind: SnapshotKind::Checkpoint,
                job_id: "job123456".into(),
                job_name: "test".into(),
                checkpoint: 0,
                completed_ms: 0,
                max_parallelism: 8,
                operators,
                exchanges: Default::default(),
            },
            pace: pace.clone(),
            savepoint_progress: Arc::default(),
            first_id: 1,
            commit_hold,
            savepoint_job_id: None,
            savepoint_staging: dir.join("savepoint-staging"),
            roots: None,
            commit_gate,
        };
        let mut subtasks: Vec<(String, u32)> = (0..sources).map(|i| ("src".into(), i)).collect();
        subtasks.push(("out".into(), 0));
        let wiring = CoordinatorWiring {
            triggers: std::mem::take(&mut senders),
            reports: report_receiver,
            commit,
            cancelled,
            subtasks,
            sink_subtasks: 1,
        };
        Harness {
            triggers,
            other_triggers: receivers,
            reports,
            commit: commit_receiver,
            _cancel: cancel,
            savepoints,
            run: tokio::spawn(coordinator.run(wiring, savepoint_requests)),
            store,
            pace,
        }
    }

    fn ack(reports: &mpsc::UnboundedSender<TaskReport>, id: CheckpointId, uid: &str) {
        ack_taking(reports, id, uid, Duration::ZERO);
    }

    /// `uid` declines checkpoint `id`.
    fn decline(
        reports: &mpsc::UnboundedSender<TaskReport>,
        id: CheckpointId,
        uid: &str,
        reason: &str,
    ) {
        reports
            .send(TaskReport::Decline {
                checkpoint: id,
                uid: uid.into(),
                subtask: 0,
                reason: reason.into(),
            })
            .expect("coordinator listens");
    }

    /// Acks checkpoint `id` for `uid`, its snapshot having taken `took`.
    fn ack_taking(
        reports: &mpsc::UnboundedSender<TaskReport>,
        id: CheckpointId,
        uid: &str,
        took: Duration,
    ) {
        ack_as(reports, id, uid, 0, took);
    }

    /// Subtask `subtask` of `uid` acks checkpoint `id`.
    fn ack_subtask(
        reports: &mpsc::UnboundedSender<TaskReport>,
        id: CheckpointId,
        uid: &str,
        subtask: u32,
    ) {
        ack_as(reports, id, uid, subtask, Duration::ZERO);
    }

    fn ack_as(
        reports: &mpsc::UnboundedSender<TaskReport>,
        id: CheckpointId,
        uid: &str,
        subtask: u32,
        took: Duration,
    ) {
        reports
            .send(TaskReport::Ack {
                checkpoint: id,
                snapshot: Box::new(SubtaskSnapshot {
                    uid: uid.into(),
                    subtask,
                    position: (uid == "src").then_some(id.0 * 10),
                    ..SubtaskSnapshot::default()
                }),
                stats: SnapshotStats {
                    asynchronous: took,
                    ..SnapshotStats::default()
                },
            })
            .expect("coordinator listens");
    }

    #[tokio::test]
    async fn held_commits_are_announced_only_once_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (release, hold) = watch::channel(true);
        let mut h = start_held(
            dir.path(),
            Duration::from_secs(10),
            0,
            Some(Duration::from_millis(10)),
            Some(hold),
            None,
        );
        for _ in 0..2 {
            let id = h.next_trigger().await;
            ack(&h.reports, id, "src");
            ack(&h.reports, id, "out");
        }
        // Both completed (their `_metadata` exist), neither announced.
        let third = h.next_trigger().await;
        assert_eq!(h.store.metrics.completed.load(Ordering::Relaxed), 2);
        assert_eq!(h.commit.borrow().completed, 0, "held");
        release.send(false).expect("coordinator listens");
        h.commit
            .wait_for(|s| s.completed == 2)
            .await
            .expect("the newest held checkpoint is announced");
        ack(&h.reports, third, "src");
        ack(&h.reports, third, "out");
        h.commit
            .wait_for(|s| s.completed == third.0)
            .await
            .expect("after the release, commits flow");
        let records = h.store.metrics.recent();
        assert_eq!(records.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[tokio::test]
    async fn a_source_whose_input_ended_makes_the_next_checkpoint_due_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = start_sources(
            dir.path(),
            Duration::from_secs(30),
            0,
            Some(Duration::from_secs(60)),
            (None, None),
            2,
        );
        let soon = Duration::from_secs(5);
        let quiet = |h: &mut Harness| {
            h.triggers.try_recv().is_err() && h.other_triggers[0].try_recv().is_err()
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(quiet(&mut h), "nothing due before the interval");
        // Source subtask 1's input ended while subtask 0 reads on: its end
        // goes downstream with a checkpoint now, not in a minute.
        h.reports
            .send(TaskReport::InputEnded {
                uid: "src".into(),
                subtask: 1,
            })
            .expect("coordinator listens");
        let id = tokio::time::timeout(soon, h.next_trigger())
            .await
            .expect("a checkpoint at once");
        let other = tokio::time::timeout(soon, h.other_triggers[0].recv())
            .await
            .expect("both sources triggered")
            .expect("triggered");
        assert_eq!(other.barrier.id, id);
        for subtask in 0..2 {
            ack_subtask(&h.reports, id, "src", subtask);
        }
        ack(&h.reports, id, "out");
        h.commit
            .wait_for(|s| s.completed == id.0)
            .await
            .expect("completed");
        // Once taken, the interval holds again.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(quiet(&mut h), "the next checkpoint waits for its interval");
    }

    /// Admits checkpoints up to `until`; refuses the next as `refusal`.
    #[derive(Debug)]
    struct Gate {
        until: u64,
        refusal: GateRefusal,
        asked: Mutex<Vec<(u64, Location)>>,
    }

    impl CommitGate for Gate {
        fn admit(
            &self,
            checkpoint: u64,
            restore_point: Location,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), GateRefusal>> + Send + '_>>
        {
            self.asked
                .lock()
                .expect("not poisoned")
                .push((checkpoint, restore_point));
            let answer = match checkpoint <= self.until {
                true => Ok(()),
                false => Err(self.refusal.clone()),
            };
            Box::pin(async move { answer })
        }
    }

    /// A coordinator whose commits go through `gate`.
    fn start_gated(dir: &std::path::Path, tolerable_failures: u32, gate: Arc<Gate>) -> Harness {
        start_held(
            dir,
            Duration::from_secs(10),
            tolerable_failures,
            Some(Duration::from_millis(10)),
            None,
            Some(gate),
        )
    }

    #[tokio::test]
    async fn a_fenced_checkpoint_is_never_announced_and_ends_the_attempt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gate = Arc::new(Gate {
            until: 1,
            refusal: GateRefusal::Fenced("moved to host b".into()),
            asked: Mutex::default(),
        });
        let mut h = start_gated(dir.path(), 5, gate.clone());
        for _ in 0..2 {
            let id = h.next_trigger().await;
            ack(&h.reports, id, "src");
            ack(&h.reports, id, "out");
        }
        let outcome = h.run.await.expect("the coordinator ends");
        assert_eq!(
            outcome,
            Err(CoordinatorError::Fenced {
                reason: "moved to host b".into()
            }),
            "fenced at once, whatever the tolerable failures"
        );
        assert_eq!(
            h.commit.borrow().completed,
            1,
            "checkpoint 2 never announced"
        );
        let asked = gate.asked.lock().expect("not poisoned").clone();
        assert_eq!(
            asked,
            [
                (1, Location::Local(dir.path().join("job/chk-1"))),
                (2, Location::Local(dir.path().join("job/chk-2")))
            ],
            "asked with where each checkpoint is"
        );
        // The refused checkpoint is gone: a restart restores checkpoint 1.
        assert_eq!(
            h.store.latest().map(|r| r.metadata.checkpoint),
            Some(1),
            "the newest restore point is the newest admitted"
        );
        assert!(!dir.path().join("job/chk-2").exists(), "refused, removed");
    }

    #[tokio::test]
    async fn held_checkpoints_are_put_to_the_gate_only_at_the_release_the_newest_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let asked = |gate: &Gate| gate.asked.lock().expect("not poisoned").clone();
        for (until, fenced) in [(u64::MAX, false), (0, true)] {
            let gate = Arc::new(Gate {
                until,
                refusal: GateRefusal::Fenced("moved to host b".into()),
                asked: Mutex::default(),
            });
            let job = dir.path().join(format!("until-{until}"));
            let (release, hold) = watch::channel(true);
            let mut h = start_held(
                &job,
                Duration::from_secs(10),
                5,
                Some(Duration::from_millis(10)),
                Some(hold),
                Some(gate.clone()),
            );
            for _ in 0..2 {
                let id = h.next_trigger().await;
                ack(&h.reports, id, "src");
                ack(&h.reports, id, "out");
            }
            let third = h.next_trigger().await;
            // Both completed and this run's newest restore point; the job's
            // stays what it was (the gate not asked), nothing announced.
            assert_eq!(h.store.latest().map(|r| r.metadata.checkpoint), Some(2));
            assert!(asked(&gate).is_empty(), "{:?}", asked(&gate));
            assert_eq!(h.commit.borrow().completed, 0, "held");
            release.send(false).expect("coordinator listens");
            if fenced {
                let outcome = h.run.await.expect("the coordinator ends");
                assert!(
                    matches!(outcome, Err(CoordinatorError::Fenced { .. })),
                    "{outcome:?}"
                );
                assert_eq!(h.commit.borrow().completed, 0, "nothing held announced");
            } else {
                h.commit
                    .wait_for(|s| s.completed == 2)
                    .await
                    .expect("announced once admitted");
                ack(&h.reports, third, "src");
                ack(&h.reports, third, "out");
                h.commit
                    .wait_for(|s| s.completed == third.0)
                    .await
                    .expect("after the release, each checkpoint through the gate");
            }
            let expected: Vec<(u64, Location)> = match fenced {
                true => vec![(2, Location::Local(job.join("job/chk-2")))],
                false => vec![
                    (2, Location::Local(job.join("job/chk-2"))),
                    (3, Location::Local(job.join("job/chk-3"))),
                ],
            };
            assert_eq!(asked(&gate), expected, "the newest held, once, then each");
        }
    }

    #[tokio::test]
    async fn a_gate_that_cannot_answer_counts_as_a_failed_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gate = Arc::new(Gate {
            until: 0,
            refusal: GateRefusal::Unavailable("NATS does not answer".into()),
            asked: Mutex::default(),
        });
        let mut h = start_gated(dir.path(), 1, gate);
        let id = h.next_trigger().await;
        ack(&h.reports, id, "src");
        ack(&h.reports, id, "out");
        let id = h.next_trigger().await;
        ack(&h.reports, id, "src");
        ack(&h.reports, id, "out");
        let outcome = h.run.await.expect("the coordinator ends");
        assert!(
            matches!(outcome, Err(CoordinatorError::TooManyFailures { failures: 2, ref reason, .. }) if reason.contains("NATS does not answer")),
            "{outcome:?}"
        );
        assert_eq!(h.commit.borrow().completed, 0, "nothing announced");
        assert!(
            h.store.latest().is_none(),
            "nothing a restart would restore"
        );
    }

    #[tokio::test]
    async fn completes_writes_metadata_commits_and_retains() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = start(dir.path(), Duration::from_secs(10), 0);
        for _ in 0..3 {
            let id = h.next_trigger().await;
            ack(&h.reports, id, "src");
            ack(&h.reports, id, "out");
            h.commit
                .wait_for(|s| s.completed == id.0)
                .await
                .expect("sinks hear of it");
        }
        let latest = h.store.latest().expect("completed");
        assert_eq!(latest.metadata.checkpoint, 3);
        assert_eq!(
            latest.metadata.operators["src"].subtasks[0].position,
            Some(30)
        );
        assert!(dir.path().join("job/chk-3/_metadata").is_file());
        assert!(!dir.path().join("job/chk-1").exists(), "retained = 2");
        assert!(dir.path().join("job/chk-2/_metadata").is_file());
        // The sink finishes: the job's end is committed.
        sink_finished(&h);
        h.commit
            .wait_for(|s| s.end == Some(true))
            .await
            .expect("end");
        drop(h.reports);
        h.run.await.expect("joins").expect("no failure");
    }

    #[tokio::test]
    async fn a_timed_out_checkpoint_is_aborted_and_fails_the_job_past_the_tolerance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = start(dir.path(), Duration::from_millis(30), 1);
        // First checkpoint: only the source acks; it times out (tolerated).
        let first = h.next_trigger().await;
        ack(&h.reports, first, "src");
        // Second: times out too; two in a row exceed tolerable_failures = 1.
        let second = h.next_trigger().await;
        assert!(second > first);
        let error = h.run.await.expect("joins").expect_err("fails").to_string();
        assert!(error.contains("timed out"), "{error}");
        assert!(error.contains("tolerable_failures = 1"), "{error}");
        assert!(h.store.latest().is_none());
        assert_eq!(h.commit.borrow().completed, 0, "nothing committed");
        assert!(!dir.path().join("job/chk-1/_metadata").exists());
    }

    /// The source's input ends: returns the final checkpoint's id (the
    /// regular one in flight, if any, is acked first).
    async fn end_input(h: &mut Harness) -> CheckpointId {
        h.reports
            .send(TaskReport::InputEnded {
                uid: "src".into(),
                subtask: 0,
            })
            .expect("send");
        loop {
            let trigger = h.triggers.recv().await.expect("triggered");
            if trigger.is_last() {
                return trigger.barrier.id;
            }
            ack(&h.reports, trigger.barrier.id, "src");
            ack(&h.reports, trigger.barrier.id, "out");
        }
    }

    fn sink_finished(h: &Harness) {
        h.reports
            .send(TaskReport::Finished {
                uid: "out".into(),
                subtask: 0,
                role: Role::Sink,
            })
            .expect("send");
    }

    #[tokio::test]
    async fn the_sinks_end_waits_for_the_final_checkpoint_an_operator_acks_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = start(dir.path(), Duration::from_secs(10), 0);
        let last = end_input(&mut h).await;
        // The sink acked and finished while an upstream snapshot was still
        // being written (operators ack from a blocking thread).
        ack(&h.reports, last, "out");
        sink_finished(&h);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(h.commit.borrow().end, None, "nothing commits uncovered");
        ack(&h.reports, last, "src");
        let signal = *h
            .commit
            .wait_for(|s| s.end.is_some())
            .await
            .expect("the end follows the final checkpoint");
        assert_eq!(signal.completed, last.0);
        assert_eq!(signal.end, Some(true));
        drop(h.reports);
        h.run.await.expect("joins").expect("no failure");
    }

    #[tokio::test]
    async fn a_failed_final_checkpoint_fails_the_job_whatever_the_tolerance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = start(dir.path(), Duration::from_secs(10), 5);
        let last = end_input(&mut h).await;
        ack(&h.reports, last, "src");
        sink_finished(&h);
        decline(&h.reports, last, "out", "disk full");
        let error = h.run.await.expect("joins").expect_err("fails").to_string();
        assert!(
            error.contains(&format!("final checkpoint {}", last.0)),
            "{error}"
        );
        assert!(error.contains("disk full"), "{error}");
        assert_eq!(h.commit.borrow().end, None, "nothing committed at the end");
    }

    #[tokio::test]
    async fn a_declined_checkpoint_is_aborted_and_the_next_one_completes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = start(dir.path(), Duration::from_secs(10), 1);
        let first = h.next_trigger().await;
        decline(&h.reports, first, "out", "disk full");
        let second = h.next_trigger().await;
        ack(&h.reports, second, "src");
        ack(&h.reports, second, "out");
        h.commit
            .wait_for(|s| s.completed == second.0)
            .await
            .expect("completes");
        // A late ack of the aborted checkpoint changes nothing.
        ack(&h.reports, first, "src");
        assert_eq!(h.store.latest().expect("one").metadata.checkpoint, second.0);
        assert_eq!(h.store.metrics.failed.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_checkpoint_asked_for_is_taken_at_once_and_answered_when_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Periodic checkpoints a minute apart: the one seen is the one asked.
        let mut h = start_with(
            dir.path(),
            Duration::from_secs(10),
            0,
            Some(Duration::from_secs(60)),
        );
        let (reply, answer) = oneshot::channel();
        h.send(Request::Checkpoint(reply));
        h.send(Request::HoldBases(true));
        h.send(Request::PaceSources(50));
        let id = tokio::time::timeout(Duration::from_secs(5), h.next_trigger())
            .await
            .expect("triggered at once");
        ack(&h.reports, id, "src");
        ack(&h.reports, id, "out");
        let read = answer.await.expect("answered").expect("completed");
        assert_eq!(read.metadata.checkpoint, id.0);
        assert!(read.path.exists(), "its _metadata is written");
        assert_eq!(h.pace.get(), 50, "sources paced as asked");
        // A failed one answers with why; bases are held as asked.
        let (reply, answer) = oneshot::channel();
        h.send(Request::Checkpoint(reply));
        let trigger = h.triggers.recv().await.expect("triggered");
        assert_eq!(base_rule(&trigger), Some(BaseRule::Held));
        let id = trigger.barrier.id;
        decline(&h.reports, id, "out", "disk full");
        let error = answer.await.expect("answered").expect_err("failed");
        assert!(error.contains("disk full"), "{error}");
        // The attempt ended (no tolerance left): the pace ends with it.
        let _ = h.run.await.expect("coordinator ended");
        assert_eq!(h.pace.get(), 100);
    }

    fn request(
        h: &Harness,
        target: &std::path::Path,
        stop: Option<bool>,
    ) -> oneshot::Receiver<Result<Location, String>> {
        request_prepared(h, target, stop, 0)
    }

    fn request_prepared(
        h: &Harness,
        target: &std::path::Path,
        stop: Option<bool>,
        prepare: u32,
    ) -> oneshot::Receiver<Result<Location, String>> {
        let (reply, answer) = oneshot::channel();
        h.savepoints
            .0
            .send(Request::Savepoint(SavepointRequest {
                target: Location::Local(target.to_path_buf()),
                stop,
                aligned: false,
                cut: None,
                form: SavepointForm::Canonical,
                prepare,
                reply,
            }))
            .expect("coordinator listens");
        answer
    }

    #[tokio::test]
    async fn stop_with_savepoint_writes_it_apart_stops_the_sources_and_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = start_with(dir.path(), Duration::from_secs(10), 0, None);
        let target = dir.path().join("savepoints");
        let answer = request(&h, &target, Some(true));
        let trigger = h.triggers.recv().await.expect("triggered");
        let stop = trigger.stop.expect("a stop");
        assert!(stop.drain);
        ack(&h.reports, trigger.barrier.id, "src");
        ack(&h.reports, trigger.barrier.id, "out");
        let location = answer.await.expect("answered").expect("completed");
        let path = location.local().expect("local").to_path_buf();
        assert!(stop.outcome.await.expect("told"), "the source may stop");
        assert_eq!(path.parent(), Some(target.as_path()));
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with("savepoint-job123-"), "{name}");
        let read = metadata::read(&path).expect("a savepoint");
        assert_eq!(read.metadata.kind, SnapshotKind::Savepoint);
        assert_eq!(read.base, path);
        assert_eq!(
            read.metadata.operators["src"].subtasks[0].position,
            Some(trigger.barrier.id.0 * 10)
        );
        h.commit
            .wait_for(|s| s.completed == trigger.barrier.id.0)
            .await
            .expect("sinks commit the savepoint");
        // A savepoint is not one of the job's checkpoints (no chk-N), but a
        // later failure restores from it.
        assert!(!dir.path().join("job").join("chk-1").exists());
        assert_eq!(h.store.latest().expect("latest").path, read.path);
        sink_finished(&h);
        drop(h.reports);
        let stopped = h.run.await.expect("joins").expect("no failure");
        assert_eq!(stopped, Some(location));
    }

    #[tokio::test]
    async fn a_failed_savepoint_is_reported_removed_and_the_sources_read_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = start_with(dir.path(), Duration::from_secs(10), 0, None);
        let target = dir.path().join("savepoints");
        let answer = request(&h, &target, Some(false));
        let trigger = h.triggers.recv().await.expect("triggered");
        decline(&h.reports, trigger.barrier.id, "out", "disk full");
        let error = answer.await.expect("answered").expect_err("failed");
        assert!(error.contains("disk full"), "{error}");
        let stop = trigger.stop.expect("a stop");
        assert!(!stop.outcome.await.expect("told"), "the source reads on");
        // Its directory is removed (on a blocking thread).
        for _ in 0..100 {
            if std::fs::read_dir(&target).map_or(true, |mut d| d.next().is_none()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(std::fs::read_dir(&target).expect("dir").next().is_none());
        // Not a checkpoint failure: the coordinator carries on.
        let again = request(&h, &target, None);
        let second = h.next_trigger().await;
        assert!(second > trigger.barrier.id);
        ack(&h.reports, second, "src");
        ack(&h.reports, second, "out");
        again.await.expect("answered").expect("completed");
        drop(h.reports);
        assert_eq!(h.run.await.expect("joins").expect("no failure"), None);
    }

    #[tokio::test]
    async fn a_prepared_savepoint_follows_base_checkpoints_until_one_is_quick() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = start_with(dir.path(), Duration::from_secs(10), 0, None);
        let target = dir.path().join("savepoints");
        let answer = request_prepared(&h, &target, Some(false), 3);
        // A slow first round, then a quick one: two checkpoints, both bases.
        for took in [PREPARED_UNDER * 4, PREPARED_UNDER / 5] {
            let trigger = h.triggers.recv().await.expect("triggered");
            assert!(trigger.stop.is_none(), "a checkpoint, not the savepoint");
            assert_eq!(base_rule(&trigger), Some(BaseRule::Forced));
            ack_taking(&h.reports, trigger.barrier.id, "src", took);
            ack_taking(&h.reports, trigger.barrier.id, "out", took);
        }
        let trigger = h.triggers.recv().await.expect("triggered");
        assert!(
            trigger.stop.is_some(),
            "then the savepoint, stopping the job"
        );
        assert_eq!(trigger.barrier.id, CheckpointId(3));
        assert!(is_savepoint(&trigger));
        ack(&h.reports, trigger.barrier.id, "src");
        ack(&h.reports, trigger.barrier.id, "out");
        answer.await.expect("answered").expect("completed");
        // The two rounds are ordinary completed checkpoints.
        assert_eq!(h.store.metrics.completed.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_failed_preparing_checkpoint_still_leads_to_the_savepoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = start_with(dir.path(), Duration::from_secs(10), 5, None);
        let target = dir.path().join("savepoints");
        let answer = request_prepared(&h, &target, None, 3);
        let trigger = h.triggers.recv().await.expect("triggered");
        assert!(trigger.stop.is_none());
        decline(&h.reports, trigger.barrier.id, "out", "disk full");
        let trigger = h.triggers.recv().await.expect("triggered");
        assert!(is_savepoint(&trigger), "no further round");
        let savepoint = trigger.barrier.id;
        ack(&h.reports, savepoint, "src");
        ack(&h.reports, savepoint, "out");
        answer.await.expect("answered").expect("completed");
    }
}
