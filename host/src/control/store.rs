//! The plugin store of the running host: components validated and
//! precompiled on arrival, kept content-addressed by sha256 and indexed by
//! the `name@version` of their metadata.
//!
//! Layout under the data dir: `plugins/blobs/<sha256>.wasm` (the files),
//! `plugins/index.json` (`name@version` → digest, size, states, compile
//! time), `plugins/compiled/` (the engine's precompiled artifacts, keyed by
//! digest, reused across host restarts). An upload is validated and compiled
//! from memory before anything is written, so a rejected one leaves nothing
//! behind; the blob and then the index are written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::durable::{DataDir, DurableError};
use crate::plugin::{LoadedPlugin, PluginEngine, PluginError};

/// Largest plugin file accepted by default (256 MiB).
pub const DEFAULT_MAX_PLUGIN_BYTES: u64 = 256 << 20;

const INDEX: &str = "plugins/index.json";
const BLOBS: &str = "plugins/blobs";

/// A declared state, as the store lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoredState {
    pub name: String,
    /// `value`, `list` or `map`.
    pub kind: String,
    pub schema_version: u32,
    /// Its time-to-live as the plugin declares it, e.g. `1h (on create and
    /// write, processing time)`; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// A plugin in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoredPlugin {
    pub name: String,
    pub version: String,
    /// sha256 of the component file, hex.
    pub digest: String,
    /// Bytes of the component file.
    pub size: u64,
    pub states: Vec<StoredState>,
    /// Whether it exports schema migration.
    pub migrates: bool,
    /// Validating and precompiling it on arrival took this long.
    pub compile_ms: f64,
    /// When it was added (ms since the Unix epoch).
    pub added_ms: u64,
}

impl StoredPlugin {
    /// `name@version`.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Errors of the store. Each names the plugin or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{file}: {size} exceeds the plugin size limit of {limit}", size = crate::human::bytes(*.size), limit = crate::human::bytes(*.limit))]
    TooLarge { file: String, size: u64, limit: u64 },
    #[error(transparent)]
    Invalid(#[from] PluginError),
    #[error(
        "{file}: plugin {reference} is already in the store as another file (sha256 {existing}); give the new file a new version"
    )]
    Conflict {
        file: String,
        reference: String,
        existing: String,
    },
    #[error("no plugin {0} in the store")]
    NotFound(String),
    #[error("plugin {reference} is used by job(s) {}; stop or cancel them first", .jobs.join(", "))]
    InUse {
        reference: String,
        jobs: Vec<String>,
    },
    #[error("plugin store: {0}")]
    Storage(#[from] DurableError),
    #[error("plugin store index {INDEX} is damaged: {0}")]
    Index(String),
    /// The cluster's shared store did not answer (see
    /// [`super::cluster::plugins`]).
    #[error("{0}")]
    Cluster(String),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    version: u32,
    /// By `name@version`.
    plugins: BTreeMap<String, StoredPlugin>,
}

/// The store. Adds are serialized; reads are not blocked by a compile.
pub struct PluginStore {
    data: Arc<DataDir>,
    engine: Arc<PluginEngine>,
    index: Mutex<Index>,
    adding: Mutex<()>,
    pub max_bytes: u64,
}

impl std::fmt::Debug for PluginStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginStore").finish_non_exhaustive()
    }
}

impl PluginStore {
    /// Opens the store in the data dir (reading its index).
    pub fn open(
        data: Arc<DataDir>,
        engine: Arc<PluginEngine>,
        max_bytes: u64,
    ) -> Result<Self, StoreError> {
        data.create_dir_all(BLOBS)?;
        let index = match data.read(INDEX)? {
            Some(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Index(e.to_string()))?
            }
            None => Index {
                version: 1,
                ..Index::default()
            },
        };
        Ok(Self {
            data,
            engine,
            index: Mutex::new(index),
            adding: Mutex::new(()),
            max_bytes,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().expect("not poisoned")
    }

    /// Path of a stored component file.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.data
            .join(Path::new(BLOBS).join(format!("{digest}.wasm")))
    }

    /// Validates, precompiles and stores a component. `file` names it in
    /// messages. Returns the stored plugin and whether it is new (the same
    /// file again is not).
    pub fn add(&self, file: &str, bytes: &[u8]) -> Result<(StoredPlugin, bool), StoreError> {
        if bytes.len() as u64 > self.max_bytes {
            return Err(StoreError::TooLarge {
                file: file.to_string(),
                size: bytes.len() as u64,
                limit: self.max_bytes,
            });
        }
        let _adding = self.adding.lock().expect("not poisoned");
        let digest = hex::encode(Sha256::digest(bytes));
        if let Some(existing) = self.lock().plugins.values().find(|p| p.digest == digest) {
            return Ok((existing.clone(), false));
        }
        let started = Instant::now();
        let loaded = self
            .engine
            .load_bytes(Path::new(file), bytes, started)
            .inspect_err(|_| self.engine.forget(&digest))?;
        let stored = describe(&loaded, bytes.len() as u64, started);
        let reference = stored.reference();
        if let Some(existing) = self.lock().plugins.get(&reference) {
            self.engine.forget(&digest);
            return Err(StoreError::Conflict {
                file: file.to_string(),
                reference,
                existing: existing.digest.clone(),
            });
        }
        self.data
            .write(Path::new(BLOBS).join(format!("{digest}.wasm")), bytes)?;
        let mut index = self.lock();
        index.plugins.insert(reference.clone(), stored.clone());
        if let Err(error) = self.save(&index) {
            index.plugins.remove(&reference);
            let _ = self
                .data
                .remove_file(Path::new(BLOBS).join(format!("{digest}.wasm")));
            return Err(error);
        }
        tracing::info!(plugin = %reference, %digest, "plugin added to the store");
        Ok((stored, true))
    }

    fn save(&self, index: &Index) -> Result<(), StoreError> {
        let text =
            serde_json::to_vec_pretty(index).map_err(|e| StoreError::Index(e.to_string()))?;
        self.data.write(INDEX, &text)?;
        Ok(())
    }

    /// Every stored plugin, by name then version.
    pub fn list(&self) -> Vec<StoredPlugin> {
        let mut plugins: Vec<_> = self.lock().plugins.values().cloned().collect();
        plugins.sort_by(|a, b| {
            a.name
                .cmp(&b.name)
                .then_with(|| compare_versions(&a.version, &b.version))
        });
        plugins
    }

    /// Finds `NAME@VERSION`, `NAME` (its newest version) or
    /// `sha256:<digest>`.
    pub fn resolve(&self, reference: &str) -> Result<StoredPlugin, StoreError> {
        let index = self.lock();
        let found = if let Some(digest) = reference.strip_prefix("sha256:") {
            index.plugins.values().find(|p| p.digest == digest)
        } else if reference.contains('@') {
            index.plugins.get(reference)
        } else {
            index
                .plugins
                .values()
                .filter(|p| p.name == reference)
                .max_by(|a, b| compare_versions(&a.version, &b.version))
        };
        found
            .cloned()
            .ok_or_else(|| StoreError::NotFound(reference.to_string()))
    }

    /// Loads a stored plugin for a job (its precompiled artifact is cached).
    pub fn load(&self, digest: &str) -> Result<Arc<LoadedPlugin>, StoreError> {
        Ok(self.engine.load(&self.blob_path(digest))?)
    }

    /// Removes `NAME@VERSION`, unless `users` (the jobs using a digest)
    /// names a job.
    pub fn remove(
        &self,
        reference: &str,
        users: impl Fn(&str) -> Vec<String>,
    ) -> Result<StoredPlugin, StoreError> {
        let _adding = self.adding.lock().expect("not poisoned");
        let Some(stored) = self.lock().plugins.get(reference).cloned() else {
            return Err(StoreError::NotFound(reference.to_string()));
        };
        // Asked without the index locked: finding a job's plugins reads it.
        let jobs = users(&stored.digest);
        if !jobs.is_empty() {
            return Err(StoreError::InUse {
                reference: reference.to_string(),
                jobs,
            });
        }
        let mut index = self.lock();
        index.plugins.remove(reference);
        if let Err(error) = self.save(&index) {
            index.plugins.insert(reference.to_string(), stored);
            return Err(error);
        }
        if !index.plugins.values().any(|p| p.digest == stored.digest) {
            self.data
                .remove_file(Path::new(BLOBS).join(format!("{}.wasm", stored.digest)))?;
            self.engine.forget(&stored.digest);
        }
        tracing::info!(plugin = %reference, "plugin removed from the store");
        Ok(stored)
    }
}

fn describe(loaded: &LoadedPlugin, size: u64, started: Instant) -> StoredPlugin {
    StoredPlugin {
        name: loaded.info.name.clone(),
        version: loaded.info.version.clone(),
        digest: loaded.digest.clone(),
        size,
        states: loaded
            .info
            .states
            .iter()
            .map(|s| StoredState {
                name: s.name.clone(),
                kind: s.kind.to_string(),
                schema_version: s.schema_version,
                ttl: s.ttl.map(|ttl| ttl.to_string()),
            })
            .collect(),
        migrates: loaded.can_migrate(),
        compile_ms: started.elapsed().as_secs_f64() * 1000.0,
        added_ms: crate::dataflow::now_millis() as u64,
    }
}

/// Orders versions by their dot-separated parts, numerically where both
/// parts are numbers (`0.10.0` after `0.9.1`).
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let mut left = a.split(['.', '-', '+']);
    let mut right = b.split(['.', '-', '+']);
    loop {
        match (left.next(), right.next()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => {
                let order = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(x), Ok(y)) => x.cmp(&y),
                    _ => x.cmp(y),
                };
                if order != std::cmp::Ordering::Equal {
                    return order;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        use std::cmp::Ordering::*;
        assert_eq!(compare_versions("0.10.0", "0.9.1"), Greater);
        assert_eq!(compare_versions("1.0", "1.0.0"), Less);
        assert_eq!(compare_versions("2.0.0", "2.0.0"), Equal);
        assert_eq!(compare_versions("1.0.0-beta", "1.0.0-alpha"), Greater);
    }

    #[test]
    fn rejected_files_leave_nothing_behind() {
        let temp = tempfile::tempdir().expect("temp dir");
        let data = Arc::new(DataDir::open(temp.path()).expect("data dir"));
        let engine = Arc::new(
            PluginEngine::new(Some(temp.path().join("plugins/compiled"))).expect("engine"),
        );
        let store = PluginStore::open(data.clone(), engine, 64).expect("store");
        let too_large = store.add("big.wasm", &[0u8; 65]).expect_err("too large");
        assert!(
            too_large.to_string().contains("big.wasm: 65 bytes exceeds"),
            "{too_large}"
        );
        let invalid = store.add("junk.wasm", b"not wasm").expect_err("invalid");
        assert!(
            matches!(
                invalid,
                StoreError::Invalid(PluginError::NotAComponent { .. })
            ),
            "{invalid}"
        );
        assert!(invalid.to_string().contains("junk.wasm"), "{invalid}");
        assert!(store.list().is_empty());
        assert!(data.list(BLOBS).expect("list").is_empty());
        assert!(
            matches!(store.resolve("count"), Err(StoreError::NotFound(_))),
            "nothing to resolve"
        );
    }
}
