//! The host's data dir as a cap-std directory handle ([`DataDir`]): every
//! file the running host keeps (plugin index, job records, operations) is
//! read and written through it, by paths relative to it that cannot leave
//! it, and every write is temp + fsync + rename + fsync of the directory,
//! so a crash leaves the old file or the new one, never half of one.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use cap_std::ambient_authority;
use cap_std::fs::Dir;

/// An I/O error on a file of the data dir, naming it.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {cause}")]
pub struct DurableError {
    pub path: PathBuf,
    pub cause: std::io::Error,
}

/// The host's data dir.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
    dir: Dir,
}

impl DataDir {
    /// Opens (creating) the data dir.
    pub fn open(root: &Path) -> Result<Self, DurableError> {
        let error = |source| DurableError {
            path: root.to_path_buf(),
            cause: source,
        };
        std::fs::create_dir_all(root).map_err(error)?;
        let root = root.canonicalize().map_err(error)?;
        let dir = Dir::open_ambient_dir(&root, ambient_authority()).map_err(error)?;
        Ok(Self { root, dir })
    }

    /// The data dir's absolute path (for the engine's own files:
    /// checkpoints, working state).
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `relative` as an absolute path (for messages and for code that
    /// does not take a directory handle).
    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.root.join(relative)
    }

    fn error(&self, relative: &Path) -> impl Fn(std::io::Error) -> DurableError {
        let path = self.root.join(relative);
        move |source| DurableError {
            path: path.clone(),
            cause: source,
        }
    }

    pub fn create_dir_all(&self, relative: impl AsRef<Path>) -> Result<(), DurableError> {
        let relative = relative.as_ref();
        self.dir
            .create_dir_all(relative)
            .map_err(self.error(relative))
    }

    /// Writes `bytes` to `relative` atomically and durably.
    pub fn write(&self, relative: impl AsRef<Path>, bytes: &[u8]) -> Result<(), DurableError> {
        let relative = relative.as_ref();
        let error = self.error(relative);
        let parent = relative.parent().unwrap_or(Path::new(""));
        let name = relative
            .file_name()
            .ok_or_else(|| error(std::io::Error::other("not a file name")))?;
        let temp = parent.join(format!(
            ".{}.tmp{}",
            name.to_string_lossy(),
            crate::checkpoint::storage::random_hex(4)
        ));
        let result = (|| {
            let mut file = self.dir.create(&temp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            drop(file);
            self.dir.rename(&temp, &self.dir, relative)?;
            self.sync_dir(parent)
        })();
        if result.is_err() {
            let _ = self.dir.remove_file(&temp);
        }
        result.map_err(error)
    }

    /// Moves `from` to `to` (both inside the data dir) and syncs `to`'s
    /// directory.
    pub fn rename(&self, from: impl AsRef<Path>, to: impl AsRef<Path>) -> Result<(), DurableError> {
        let (from, to) = (from.as_ref(), to.as_ref());
        self.dir
            .rename(from, &self.dir, to)
            .and_then(|()| self.sync_dir(to.parent().unwrap_or(Path::new(""))))
            .map_err(self.error(to))
    }

    fn sync_dir(&self, relative: &Path) -> std::io::Result<()> {
        let relative = if relative.as_os_str().is_empty() {
            Path::new(".")
        } else {
            relative
        };
        // A directory opened for reading (not a path-only handle) can be
        // synced: that makes a rename in it durable.
        let mut options = cap_std::fs::OpenOptions::new();
        options.read(true);
        self.dir.open_with(relative, &options)?.sync_all()
    }

    /// The whole file, or None if it does not exist.
    pub fn read(&self, relative: impl AsRef<Path>) -> Result<Option<Vec<u8>>, DurableError> {
        let relative = relative.as_ref();
        match self.dir.open(relative) {
            Ok(mut file) => {
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes).map_err(self.error(relative))?;
                Ok(Some(bytes))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(self.error(relative)(error)),
        }
    }

    /// Removes a file; a missing one is fine.
    pub fn remove_file(&self, relative: impl AsRef<Path>) -> Result<(), DurableError> {
        let relative = relative.as_ref();
        match self.dir.remove_file(relative) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(self.error(relative)(error))
            }
            _ => Ok(()),
        }
    }

    /// Names of the entries of a directory (none if it does not exist).
    pub fn list(&self, relative: impl AsRef<Path>) -> Result<Vec<String>, DurableError> {
        let relative = relative.as_ref();
        let entries = match self.dir.read_dir(relative) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(self.error(relative)(error)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(self.error(relative))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    /// Size of a file, if it is one.
    pub fn file_size(&self, relative: impl AsRef<Path>) -> Option<u64> {
        self.dir
            .metadata(relative.as_ref())
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_and_reads_back() {
        let temp = tempfile::tempdir().expect("temp dir");
        let data = DataDir::open(temp.path()).expect("open");
        data.create_dir_all("jobs/a").expect("mkdir");
        data.write("jobs/a/job.json", b"one").expect("write");
        data.write("jobs/a/job.json", b"two").expect("overwrite");
        assert_eq!(
            data.read("jobs/a/job.json").expect("read"),
            Some(b"two".to_vec())
        );
        assert_eq!(data.list("jobs/a").expect("list"), vec!["job.json"]);
        assert_eq!(data.read("jobs/b").expect("read missing"), None);
    }

    #[test]
    fn paths_cannot_leave_the_data_dir() {
        let temp = tempfile::tempdir().expect("temp dir");
        let data = DataDir::open(&temp.path().join("data")).expect("open");
        assert!(data.write("../escaped", b"x").is_err());
        assert!(!temp.path().join("escaped").exists());
        assert!(data.read("/etc/passwd").is_err());
    }
}
