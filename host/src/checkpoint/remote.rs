//! Checkpoints on object storage: a `[checkpoint] dir` (or restore point)
//! of the form `s3://bucket/prefix`, through the `object_store` crate.
//! The endpoint, region and credentials come from the environment as the
//! AWS tools read them (`AWS_ENDPOINT_URL`, `AWS_REGION`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...); an `http://`
//! endpoint is allowed (a store on loopback).
//!
//! The local checkpoint code is unchanged: a job writes its checkpoints
//! into a local *staging* directory with the layout of the remote one, and
//! [`JobCheckpoints`](super::coordinator::JobCheckpoints) mirrors each
//! completed checkpoint: every file it references that is not there yet
//! (shared files once), then `_metadata` with a conditional put that never
//! overwrites; retention deletes remotely what it deletes locally. A
//! restore from `s3://…` downloads `_metadata` and the files it references
//! into a local directory ([`fetch`]), where they are checked as any
//! restore's files are.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::metadata::{self, SnapshotKind};
use crate::types::S3Url;

/// The directory of the checkpoint or savepoint at `url` (its directory,
/// or its `_metadata`).
fn snapshot_dir(url: &S3Url) -> S3Url {
    let prefix = match url.prefix.rsplit_once('/') {
        Some((dir, metadata::METADATA_FILE)) => dir.to_string(),
        _ if url.prefix == metadata::METADATA_FILE => String::new(),
        _ => url.prefix.clone(),
    };
    S3Url {
        bucket: url.bucket.clone(),
        prefix,
    }
}

/// Uploads and downloads in flight at once.
const PARALLEL: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(
        "{url}: a checkpoint lies in chk-<n>/ below its job's directory, not at the bucket's root"
    )]
    NoJobDirectory { url: String },
    #[error("{url}: {cause}")]
    Store { url: String, cause: String },
    #[error("{url}: {path} is not there")]
    Missing { url: String, path: String },
    #[error("{url}: {path} is already there (a checkpoint is never overwritten)")]
    Exists { url: String, path: String },
    #[error("{path}: {cause}")]
    Local {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// An `s3://bucket/prefix` location.
#[derive(Debug, Clone)]
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    /// `s3://bucket/prefix`, without a trailing slash.
    pub url: String,
    prefix: ObjectPath,
}

impl Remote {
    /// Opens `location` with the environment's settings.
    pub fn open(location: &S3Url) -> Result<Self, RemoteError> {
        let url = location.to_string();
        let bucket = location.bucket.as_str();
        let prefix = location.prefix.as_str();
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let endpoint = std::env::var("AWS_ENDPOINT_URL_S3")
            .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .ok();
        if endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"))
        {
            builder = builder.with_allow_http(true);
        }
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            builder = builder.with_region("us-east-1");
        }
        let store = builder.build().map_err(|e| RemoteError::Store {
            url: url.clone(),
            cause: e.to_string(),
        })?;
        Ok(Self {
            store: Arc::new(store),
            url,
            prefix: ObjectPath::from(prefix),
        })
    }

    /// The location `relative` below this one.
    pub fn join(&self, relative: &str) -> Self {
        let mut joined = self.clone();
        joined.url = format!("{}/{}", self.url, relative.trim_matches('/'));
        joined.prefix = self.object(relative);
        joined
    }

    fn object(&self, relative: &str) -> ObjectPath {
        let mut path = self.prefix.clone();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            path = path.clone().join(part);
        }
        path
    }

    fn store_error(&self, error: impl std::fmt::Display) -> RemoteError {
        RemoteError::Store {
            url: self.url.clone(),
            cause: first_line(&error.to_string()),
        }
    }

    /// Checks that the bucket exists and the credentials are accepted.
    pub async fn check(&self) -> Result<(), RemoteError> {
        let mut listing = self.store.list(Some(&self.prefix));
        match listing.next().await {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => {
                let text = e.to_string();
                let cause = if text.contains("NoSuchBucket") || text.contains("404 Not Found") {
                    "the bucket does not exist (HTTP 404 when listing it)".to_string()
                } else if text.contains("403 Forbidden") {
                    "the credentials were refused (HTTP 403 when listing the bucket)".to_string()
                } else {
                    first_line(&text)
                };
                Err(RemoteError::Store {
                    url: self.url.clone(),
                    cause,
                })
            }
        }
    }

    /// Uploads the local file `local` as `relative`.
    pub async fn upload(&self, local: &Path, relative: &str) -> Result<(), RemoteError> {
        let bytes = tokio::fs::read(local)
            .await
            .map_err(|cause| RemoteError::Local {
                path: local.to_path_buf(),
                cause,
            })?;
        self.store
            .put(&self.object(relative), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.store_error(e))
    }

    /// Uploads local files (`(local, relative)`), several at once.
    pub async fn upload_all(&self, files: Vec<(PathBuf, String)>) -> Result<(), RemoteError> {
        futures::stream::iter(files)
            .map(|(local, relative)| async move {
                match self.upload(&local, &relative).await {
                    // A sink's spool file is deleted once its records were
                    // published, which may happen while a checkpoint that
                    // lists it uploads: then no restore needs it.
                    Err(RemoteError::Local { cause, .. })
                        if relative.starts_with("pending/")
                            && cause.kind() == std::io::ErrorKind::NotFound =>
                    {
                        Ok(())
                    }
                    other => other,
                }
            })
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    /// Writes `relative` only if it does not exist yet. An object already
    /// there with exactly these bytes is this put's own, landed by an
    /// attempt the client retried after a lost answer.
    pub async fn put_new(&self, relative: &str, bytes: Vec<u8>) -> Result<(), RemoteError> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let object = self.object(relative);
        match self
            .store
            .put_opts(&object, PutPayload::from(bytes.clone()), options)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let there = match self.store.get(&object).await {
                    Ok(found) => found.bytes().await.ok(),
                    Err(_) => None,
                };
                match there {
                    Some(there) if there.as_ref() == bytes.as_slice() => Ok(()),
                    _ => Err(RemoteError::Exists {
                        url: self.url.clone(),
                        path: relative.to_string(),
                    }),
                }
            }
            Err(e) => Err(self.store_error(e)),
        }
    }

    /// Downloads `relative` into the local file `local`.
    pub async fn download(&self, relative: &str, local: &Path) -> Result<(), RemoteError> {
        let bytes = self.get(relative).await?;
        let io = |cause| RemoteError::Local {
            path: local.to_path_buf(),
            cause,
        };
        if let Some(parent) = local.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io)?;
        }
        tokio::fs::write(local, &bytes).await.map_err(io)
    }

    /// The bytes of `relative`.
    pub async fn get(&self, relative: &str) -> Result<bytes::Bytes, RemoteError> {
        match self.store.get(&self.object(relative)).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RemoteError::Missing {
                    url: self.url.clone(),
                    path: relative.to_string(),
                });
            }
            Err(e) => return Err(self.store_error(format!("{relative}: {e}"))),
        }
        .bytes()
        .await
        .map_err(|e| self.store_error(format!("{relative}: {e}")))
    }

    /// Deletes `relative` (a missing object is not an error).
    pub async fn delete(&self, relative: &str) -> Result<(), RemoteError> {
        match self.store.delete(&self.object(relative)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.store_error(e)),
        }
    }

    /// Every object below `relative`, as paths relative to this location.
    pub async fn list(&self, relative: &str) -> Result<Vec<String>, RemoteError> {
        let below = self.object(relative);
        let found: Vec<_> = self
            .store
            .list(Some(&below))
            .try_collect()
            .await
            .map_err(|e| self.store_error(e))?;
        let prefix = format!("{}/", self.prefix.as_ref());
        Ok(found
            .into_iter()
            .map(|meta| {
                let full = meta.location.as_ref();
                full.strip_prefix(&prefix)
                    .or_else(|| self.prefix.as_ref().is_empty().then_some(full))
                    .unwrap_or(full)
                    .to_string()
            })
            .collect())
    }

    /// Deletes every object below `relative`.
    pub async fn delete_all(&self, relative: &str) -> Result<(), RemoteError> {
        for object in self.list(relative).await? {
            self.delete(&object).await?;
        }
        Ok(())
    }
}

fn first_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or(text)
        .chars()
        .take(300)
        .collect()
}

/// Runs `work` to completion from synchronous code: on the current tokio
/// runtime (from a thread that may block), or on a runtime of its own.
pub fn block_on<T: Send>(work: impl Future<Output = T> + Send) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| handle.block_on(work))
        }
        Ok(_) => std::thread::scope(|scope| {
            scope
                .spawn(|| own_runtime().block_on(work))
                .join()
                .expect("the download thread does not panic")
        }),
        Err(_) => own_runtime().block_on(work),
    }
}

fn own_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Downloads the checkpoint or savepoint at `url` (its directory, or its
/// `_metadata`) into `into`: `_metadata` and every file it references
/// (and a `nats` sink's spool files). Returns the local `_metadata`, laid
/// out so that its relative paths resolve as they did remotely.
pub async fn fetch(url: &S3Url, into: &Path) -> Result<PathBuf, super::CheckpointError> {
    let url = snapshot_dir(url);
    let dir = Remote::open(&url)?;
    let local_metadata = into.join("_metadata.download");
    dir.download("_metadata", &local_metadata).await?;
    let read = metadata::read(&local_metadata)?;
    let _ = std::fs::remove_file(&local_metadata);
    // A checkpoint's paths are relative to its job's directory (the parent
    // of chk-<n>), a savepoint's to its own directory.
    let (base, local_base, local_dir) = match read.metadata.kind {
        SnapshotKind::Savepoint => (dir.clone(), into.to_path_buf(), into.to_path_buf()),
        _ => {
            let (parent, name) = job_dir(&url)?;
            (Remote::open(&parent)?, into.to_path_buf(), into.join(name))
        }
    };
    futures::stream::iter(referenced(&read.metadata))
        .map(|relative| {
            let (base, local_base) = (&base, &local_base);
            async move {
                let local = local_base.join(&relative);
                match base.download(&relative, &local).await {
                    // A spool file is deleted once published.
                    Err(RemoteError::Missing { .. }) if relative.starts_with("pending/") => Ok(()),
                    other => other,
                }
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<()>>()
        .await?;
    let path = local_dir.join("_metadata");
    dir.download("_metadata", &path).await?;
    Ok(path)
}

/// The job directory a checkpoint's paths are relative to (the parent of
/// its `chk-<n>` directory `url`), and that directory's name.
fn job_dir(url: &S3Url) -> Result<(S3Url, &str), RemoteError> {
    let (parent, name) = url.prefix.rsplit_once('/').unwrap_or(("", &url.prefix));
    if name.is_empty() {
        return Err(RemoteError::NoJobDirectory {
            url: url.to_string(),
        });
    }
    let parent = S3Url {
        bucket: url.bucket.clone(),
        prefix: parent.to_string(),
    };
    Ok((parent, name))
}

/// Every file `metadata` references (its subtasks' state, deltas, timers
/// and spool files), once each, relative to its base.
fn referenced(metadata: &metadata::CheckpointMetadata) -> Vec<String> {
    let mut wanted: Vec<String> = metadata
        .operators
        .values()
        .flat_map(|op| &op.subtasks)
        .flat_map(|s| {
            s.files
                .iter()
                .chain(&s.deltas)
                .chain(&s.timers)
                .map(|f| f.path.clone())
                .chain(
                    s.pending
                        .iter()
                        .filter(|p| p.starts_with("pending/"))
                        .cloned(),
                )
        })
        .filter(|p| metadata::is_inside(p))
        .collect();
    wanted.sort();
    wanted.dedup();
    wanted
}

/// Copies the checkpoint (or savepoint) at `from` (its directory or
/// `_metadata`) into `into` as a self-contained savepoint: every file it
/// references, at the same path relative to `into` as to its base (a
/// checkpoint's shared files among them), then its `_metadata`, a
/// savepoint's, written last and only if none is there. A spool file
/// already published and deleted is not needed, as on a restore.
pub async fn copy_as_savepoint(from: &S3Url, into: &S3Url) -> Result<(), super::CheckpointError> {
    let url = snapshot_dir(from);
    let dir = Remote::open(&url)?;
    let bytes = dir.get(metadata::METADATA_FILE).await?;
    let mut read = metadata::decode(
        &bytes,
        Path::new(&format!("{}/{}", dir.url, metadata::METADATA_FILE)),
    )?;
    let base = match read.kind {
        SnapshotKind::Savepoint => dir,
        SnapshotKind::Checkpoint => Remote::open(&job_dir(&url)?.0)?,
    };
    let target = Remote::open(into)?;
    futures::stream::iter(referenced(&read))
        .map(|relative| {
            let (base, target) = (&base, &target);
            async move {
                match base.get(&relative).await {
                    Ok(bytes) => target.put_new(&relative, bytes.to_vec()).await,
                    Err(RemoteError::Missing { .. }) if relative.starts_with("pending/") => Ok(()),
                    Err(e) => Err(e),
                }
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<()>>()
        .await?;
    read.kind = SnapshotKind::Savepoint;
    let bytes = metadata::encode(&read)
        .map_err(|e| super::CheckpointError::io(Path::new(&target.url), e))?;
    target.put_new(metadata::METADATA_FILE, bytes).await?;
    Ok(())
}

/// Reads the `_metadata` of the checkpoint or savepoint at `url` (its
/// directory or `_metadata`), through a copy in `scratch`.
pub async fn read_metadata(
    url: &S3Url,
    scratch: &Path,
) -> Result<(Remote, metadata::ReadMetadata), super::CheckpointError> {
    let dir = Remote::open(&snapshot_dir(url))?;
    let local = scratch.join(metadata::METADATA_FILE);
    dir.download(metadata::METADATA_FILE, &local).await?;
    Ok((dir, metadata::read(&local)?))
}

/// The `_metadata` of the checkpoint or savepoint at `url` (its directory
/// or `_metadata`), read and checked in memory.
pub async fn metadata(url: &S3Url) -> Result<metadata::CheckpointMetadata, super::CheckpointError> {
    let dir = Remote::open(&snapshot_dir(url))?;
    let bytes = dir.get(metadata::METADATA_FILE).await?;
    metadata::decode(
        &bytes,
        Path::new(&format!("{}/{}", dir.url, metadata::METADATA_FILE)),
    )
}

/// Deletes the savepoint at `url` after checking it is one: its files,
/// then `_metadata`. Returns its location.
pub async fn dispose(url: &S3Url, scratch: &Path) -> Result<String, super::CheckpointError> {
    let (dir, read) = read_metadata(url, scratch).await?;
    if read.metadata.kind != SnapshotKind::Savepoint {
        return Err(super::CheckpointError::Corrupt {
            path: PathBuf::from(&dir.url),
            message: "this is a checkpoint, not a savepoint; the host retires checkpoints itself"
                .to_string(),
        });
    }
    for file in read.metadata.files() {
        if metadata::is_inside(&file.path) {
            dir.delete(&file.path).await?;
        }
    }
    dir.delete(metadata::METADATA_FILE).await?;
    Ok(dir.url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_into_bucket_and_prefix() {
        let url = |text: &str| match crate::types::Location::parse(text).expect("parses") {
            crate::types::Location::S3(url) => url,
            other => panic!("not s3: {other}"),
        };
        let remote = Remote::open(&url("s3://bucket/a/b/")).expect("opens");
        assert_eq!(remote.url, "s3://bucket/a/b");
        assert_eq!(
            remote.object("chk-1/_metadata").as_ref(),
            "a/b/chk-1/_metadata"
        );
        assert_eq!(remote.join("job").url, "s3://bucket/a/b/job");
        assert_eq!(
            snapshot_dir(&url("s3://b/j/chk-1/_metadata")),
            url("s3://b/j/chk-1")
        );
        assert_eq!(snapshot_dir(&url("s3://b/j/chk-1/")), url("s3://b/j/chk-1"));
    }
}
