//! The `stdout`, `file` and `blackhole` sinks. Each writes a record's value
//! as one line (`file`, `stdout`) or only counts it (`blackhole`). The
//! `file` sink is exactly-once (two-phase commit on checkpoints); `stdout`
//! prints as records arrive (at-least-once across a restart).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cap_std::fs::Dir;

use crate::dataflow::{FailureKind, OperatorError, Sink};
use crate::roots::{self, Roots};
use crate::types::{CheckpointId, RecordBatch};

/// Prints each record's value as a line on stdout.
#[derive(Debug, Default)]
pub struct StdoutSink;

impl Sink for StdoutSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), OperatorError> {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        for record in batch.iter() {
            out.write_all(record.value)
                .and_then(|()| out.write_all(b"\n"))
                .map_err(|e| OperatorError::new(FailureKind::Connector, format!("stdout: {e}")))?;
        }
        out.flush()
            .map_err(|e| OperatorError::new(FailureKind::Connector, format!("stdout: {e}")))
    }

    fn finish(&mut self) -> Result<(), OperatorError> {
        Ok(())
    }
}

/// The exactly-once `file` sink: each record's value as a line. Data goes
/// to a hidden in-progress file, `.part-<job>-<subtask>-<n>.inprogress`
/// (`<job>`: the first 8 characters of the job id, `n`: the checkpoint that
/// will cover it). At barrier n the file is fsynced and becomes pending; when
/// checkpoint n completes it is renamed to `part-<job>-<subtask>-<n>`
/// (atomic), so readers only ever see committed output. At the end of a
/// job the rest is committed, or discarded when the job was cancelled.
/// [`recover_file_sink`] settles the files of a failed attempt on restore.
/// Every file is created, renamed and removed by name through a handle on
/// the directory (opened through the job root that holds it on the
/// running host, [`crate::roots`]).
pub struct FileSink {
    /// The directory, for messages.
    path: PathBuf,
    dir: Dir,
    prefix: String,
    /// The checkpoint the current file belongs to.
    next: u64,
    current: Option<(String, BufWriter<File>)>,
    /// (checkpoint, in-progress name) written but not committed.
    pending: Vec<(u64, String)>,
}

/// Prefix of a job's part files: `part-<first 8 of the job id>`.
pub fn part_prefix(job_id: &str) -> String {
    format!("part-{}", &job_id[..job_id.len().min(8)])
}

/// The committed name of an in-progress file name.
fn committed_name(in_progress: &str) -> Option<&str> {
    in_progress.strip_prefix('.')?.strip_suffix(".inprogress")
}

fn sink_error(path: &Path, error: impl std::fmt::Display) -> OperatorError {
    OperatorError::new(
        FailureKind::Connector,
        format!("file sink {}: {error}", path.display()),
    )
}

impl FileSink {
    /// Subtask `subtask` of job `job_id` writing into `dir` (created if
    /// need be, through the root of `roots` that holds it, if any); its
    /// first file belongs to checkpoint `first` (one past the restored
    /// checkpoint).
    pub fn create(
        dir: &Path,
        roots: Option<&Roots>,
        job_id: &str,
        subtask: u32,
        first: u64,
    ) -> Result<Self, OperatorError> {
        let handle = roots::open_dir(roots, dir, true).map_err(|e| sink_error(dir, e))?;
        Ok(Self {
            path: dir.to_path_buf(),
            dir: handle,
            prefix: format!("{}-{subtask}", part_prefix(job_id)),
            next: first.max(1),
            current: None,
            pending: Vec::new(),
        })
    }

    fn close_current(&mut self, checkpoint: u64) -> Result<(), OperatorError> {
        if let Some((name, mut out)) = self.current.take() {
            let path = self.path.join(&name);
            out.flush().map_err(|e| sink_error(&path, e))?;
            out.get_ref().sync_all().map_err(|e| sink_error(&path, e))?;
            self.pending.push((checkpoint, name));
        }
        Ok(())
    }

    fn commit_through(&mut self, checkpoint: u64) -> Result<(), OperatorError> {
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(n, _)| *n <= checkpoint);
        self.pending = rest;
        for (_, name) in &due {
            let target = committed_name(name).expect("own in-progress names");
            self.dir
                .rename(name, &self.dir, target)
                .map_err(|e| sink_error(&self.path.join(name), e))?;
        }
        if !due.is_empty() {
            sync_dir(&self.dir);
        }
        Ok(())
    }
}

impl Sink for FileSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), OperatorError> {
        if self.current.is_none() {
            let name = format!(".{}-{}.inprogress", self.prefix, self.next);
            let file = self
                .dir
                .create(&name)
                .map_err(|e| sink_error(&self.path.join(&name), e))?
                .into_std();
            self.current = Some((name, BufWriter::with_capacity(256 << 10, file)));
        }
        let (name, out) = self.current.as_mut().expect("opened above");
        for record in batch.iter() {
            out.write_all(record.value)
                .and_then(|()| out.write_all(b"\n"))
                .map_err(|e| sink_error(&self.path.join(name.as_str()), e))?;
        }
        Ok(())
    }

    fn prepare_commit(&mut self, checkpoint: CheckpointId) -> Result<Vec<String>, OperatorError> {
        self.close_current(checkpoint.0)?;
        self.next = checkpoint.0 + 1;
        Ok(self.pending.iter().map(|(_, name)| name.clone()).collect())
    }

    fn commit(&mut self, checkpoint: CheckpointId) -> Result<(), OperatorError> {
        self.commit_through(checkpoint.0)
    }

    fn finish(&mut self) -> Result<(), OperatorError> {
        self.close_current(u64::MAX)
    }

    fn end(&mut self, commit: bool) -> Result<(), OperatorError> {
        if commit {
            return self.commit_through(u64::MAX);
        }
        for (_, name) in std::mem::take(&mut self.pending) {
            let _ = self.dir.remove_file(name);
        }
        Ok(())
    }
}

/// Best effort: a rename that is not yet durable is redone by recovery.
fn sync_dir(dir: &Dir) {
    let _ = roots::sync_dir(dir);
}

/// Settles a file sink's directory `dir` (opened through the root of
/// `roots` that holds it, if any) before a restored attempt starts:
/// commits the files the restored checkpoint lists as pending (its
/// completion may not have reached the sink before the failure), and
/// deletes every other in-progress file of the jobs `job_ids` (written
/// after that checkpoint; the attempt replays them). A listed file that is
/// gone fails, unless `missing_ok` (a savepoint: committed when it
/// completed, perhaps on another machine), which logs it. Returns how many
/// files it committed.
pub fn recover_file_sink(
    dir: &Path,
    roots: Option<&Roots>,
    job_ids: &[&str],
    pending: &[String],
    missing_ok: bool,
) -> Result<usize, OperatorError> {
    for name in pending {
        if committed_name(name).is_none() || name.contains('/') {
            return Err(sink_error(dir, format!("bad pending file name {name:?}")));
        }
    }
    // A directory not there yet holds nothing to settle.
    let handle = match roots::open_dir(roots, dir, false) {
        Ok(handle) => Some(handle),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => return Err(sink_error(dir, error)),
    };
    let exists = |name: &str| handle.as_ref().is_some_and(|h| h.exists(name));
    let mut committed = 0;
    for name in pending {
        let target = committed_name(name).expect("checked above");
        if let Some(handle) = handle.as_ref().filter(|_| exists(name)) {
            handle
                .rename(name, handle, target)
                .map_err(|e| sink_error(&dir.join(name), e))?;
            committed += 1;
            continue;
        }
        if exists(target) {
            continue; // committed before the failure
        }
        if missing_ok {
            tracing::warn!(
                dir = %dir.display(),
                file = %target,
                "a file the savepoint covers is not in the sink's directory (committed when the savepoint completed, then moved?)"
            );
        } else {
            return Err(sink_error(
                &dir.join(name),
                "the restored checkpoint lists it as written but not yet committed, and it is gone \
                 (was the sink's `path` changed, or the file deleted?)",
            ));
        }
    }
    let Some(handle) = handle else {
        return Ok(committed);
    };
    let prefixes: Vec<String> = job_ids
        .iter()
        .map(|id| format!(".{}-", part_prefix(id)))
        .collect();
    if let Ok(entries) = handle.entries() {
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".inprogress") && prefixes.iter().any(|p| name.starts_with(p)) {
                let _ = handle.remove_file(&name);
            }
        }
    }
    sync_dir(&handle);
    Ok(committed)
}

/// Discards records, counting them and their bytes.
#[derive(Debug, Default, Clone)]
pub struct BlackholeSink {
    pub records: Arc<AtomicU64>,
    pub bytes: Arc<AtomicU64>,
}

impl Sink for BlackholeSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), OperatorError> {
        self.records
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.bytes
            .fetch_add(batch.data_len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), OperatorError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(values: &[&str]) -> RecordBatch {
        let mut batch = RecordBatch::new();
        for v in values {
            batch.push(None, v.as_bytes(), None);
        }
        batch
    }

    fn visible(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn commits_only_completed_checkpoints_and_recovers_a_failed_attempt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let job = "abcdef0123456789";
        let mut sink = FileSink::create(dir.path(), None, job, 0, 1).expect("create");
        sink.write(&batch(&["a", "b"])).expect("write");
        let pending = sink.prepare_commit(CheckpointId(1)).expect("prepare");
        assert_eq!(pending, vec![".part-abcdef01-0-1.inprogress".to_string()]);
        sink.write(&batch(&["c"])).expect("write");
        let pending = sink.prepare_commit(CheckpointId(2)).expect("prepare");
        assert_eq!(pending.len(), 2, "1 is not committed yet");
        sink.commit(CheckpointId(1)).expect("commit");
        assert!(visible(dir.path()).contains(&"part-abcdef01-0-1".to_string()));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("part-abcdef01-0-1")).expect("read"),
            "a\nb\n"
        );
        sink.write(&batch(&["d"])).expect("write");
        // The attempt fails here: checkpoint 2 completed (its _metadata lists
        // the pending file) but the sink never heard; `d` was never covered.
        drop(sink);
        let restored_pending = pending;
        let committed =
            recover_file_sink(dir.path(), None, &[job], &restored_pending, false).expect("recover");
        assert_eq!(committed, 1, "checkpoint 2's file committed on restore");
        assert_eq!(
            visible(dir.path()),
            vec![
                "part-abcdef01-0-1".to_string(),
                "part-abcdef01-0-2".to_string()
            ],
            "the in-progress file holding `d` is gone"
        );
        // Recovering twice is harmless.
        recover_file_sink(dir.path(), None, &[job], &restored_pending, false).expect("idempotent");

        // A cancelled end discards, a finished end commits.
        let mut sink = FileSink::create(dir.path(), None, job, 1, 3).expect("create");
        sink.write(&batch(&["e"])).expect("write");
        sink.finish().expect("finish");
        sink.end(false).expect("discard");
        assert_eq!(visible(dir.path()).len(), 2);
        let mut sink = FileSink::create(dir.path(), None, job, 1, 3).expect("create");
        sink.write(&batch(&["e"])).expect("write");
        sink.finish().expect("finish");
        sink.end(true).expect("commit");
        assert!(visible(dir.path()).contains(&"part-abcdef01-1-3".to_string()));
    }
}
