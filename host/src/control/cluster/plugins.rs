//! The cluster's plugin store: every host holds every plugin any host
//! took in. A plugin added on one host (`weir plugin add`, the watched
//! directory) goes, after the host validated and precompiled it, into the
//! JetStream object store `<name>-plugins` under its sha256, and its
//! reference into the key-value bucket `<name>-plugin-index` (key `r.<hex
//! of NAME@VERSION>`, value [`IndexEntry`]). The reference is claimed with
//! a create, so two hosts cannot give one `NAME@VERSION` two different
//! files: the second is refused (409) and removed again. Every host
//! watches the index: a new reference it lacks is fetched, its sha256
//! checked and added to its own store (validated and precompiled there);
//! a withdrawn one is removed unless a job of that host still uses it.

use std::sync::Arc;

use async_nats::jetstream::{self, kv, object_store};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::io::AsyncReadExt;

use tracing::{debug, info, warn};

use super::ClusterError;
use crate::control::now_ms;
use crate::control::store::{PluginStore, StoreError, StoredPlugin};

/// A reference in the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// `NAME@VERSION`.
    pub reference: String,
    /// The component file's sha256 (hex): its object's name.
    pub digest: String,
    pub size: u64,
    /// The host that added it first.
    pub added_by: String,
    pub added_ms: u64,
}

/// Which jobs of this host use a digest (a plugin they use is not
/// removed).
pub type Users = Arc<dyn Fn(&str) -> Vec<String> + Send + Sync>;

/// Why a plugin could not be shared.
#[derive(Debug)]
pub enum PublishError {
    /// The cluster has its `NAME@VERSION` as another file.
    Conflict(IndexEntry),
    /// The cluster's NATS did not take it.
    Storage(String),
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Conflict(existing) => write!(
                f,
                "the cluster has {} as another file (sha256 {}, added by host `{}`)",
                existing.reference, existing.digest, existing.added_by
            ),
            Self::Storage(message) => f.write_str(message),
        }
    }
}

/// The shared store, as one host sees it.
pub struct SharedPlugins {
    cluster: String,
    host: String,
    objects: object_store::ObjectStore,
    index: kv::Store,
    store: Arc<PluginStore>,
}

impl std::fmt::Debug for SharedPlugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedPlugins")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

/// The index key of `reference`: `r.` and its UTF-8 bytes in hex (a key
/// holds letters, digits and a few signs only; a reference has `@`).
fn key(reference: &str) -> String {
    format!("r.{}", hex::encode(reference.as_bytes()))
}

impl SharedPlugins {
    /// Opens (or makes) the object store and the index of cluster `name`.
    pub(super) async fn open(
        js: &jetstream::Context,
        name: &str,
        host: &str,
        replicas: usize,
        store: Arc<PluginStore>,
    ) -> Result<Arc<Self>, ClusterError> {
        let buckets = |message: String| ClusterError::Buckets {
            name: name.to_string(),
            message,
        };
        let bucket = format!("{name}-plugins");
        let objects = match js.get_object_store(&bucket).await {
            Ok(objects) => objects,
            Err(_) => match js
                .create_object_store(object_store::Config {
                    bucket: bucket.clone(),
                    description: Some(format!("weir cluster {name}: plugin files by sha256")),
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
            {
                Ok(objects) => objects,
                Err(error) => js
                    .get_object_store(&bucket)
                    .await
                    .map_err(|_| buckets(format!("cannot make bucket `{bucket}`: {error}")))?,
            },
        };
        let index = super::open_bucket(
            js,
            kv::Config {
                bucket: format!("{name}-plugin-index"),
                description: format!("weir cluster {name}: plugin references"),
                history: 1,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await
        .map_err(buckets)?;
        Ok(Arc::new(Self {
            cluster: name.to_string(),
            host: host.to_string(),
            objects,
            index,
            store,
        }))
    }

    /// Puts a plugin this host took in into the shared store: its file
    /// (by sha256), then its reference.
    pub async fn publish(&self, plugin: &StoredPlugin) -> Result<(), PublishError> {
        let reference = plugin.reference();
        let storage = |message: String| {
            PublishError::Storage(format!(
                "cluster `{}`: cannot share plugin {reference}: {message}",
                self.cluster
            ))
        };
        if let Some(existing) = self.entry(&reference).await.map_err(storage)? {
            return match existing.digest == plugin.digest {
                true => Ok(()),
                false => Err(PublishError::Conflict(existing)),
            };
        }
        let bytes = std::fs::read(self.store.blob_path(&plugin.digest))
            .map_err(|e| storage(format!("cannot read its file: {e}")))?;
        self.objects
            .put(plugin.digest.as_str(), &mut bytes.as_slice())
            .await
            .map_err(|e| storage(format!("cannot store its file: {e}")))?;
        let entry = IndexEntry {
            reference: reference.clone(),
            digest: plugin.digest.clone(),
            size: plugin.size,
            added_by: self.host.clone(),
            added_ms: now_ms(),
        };
        let value = Bytes::from(serde_json::to_vec(&entry).unwrap_or_default());
        match self.index.create(key(&reference), value).await {
            Ok(_) => {
                info!(cluster = %self.cluster, plugin = %reference, "plugin shared with the cluster");
                Ok(())
            }
            // Claimed meanwhile by another host: the same file is fine.
            Err(_) => match self.entry(&reference).await.map_err(storage)? {
                Some(existing) if existing.digest == plugin.digest => Ok(()),
                Some(existing) => Err(PublishError::Conflict(existing)),
                None => Err(storage("its reference vanished as it was claimed".into())),
            },
        }
    }

    /// Withdraws `reference` from the cluster (every host removes it
    /// unless one of its jobs uses it).
    pub async fn withdraw(&self, reference: &str) -> Result<(), StoreError> {
        if self.entry(reference).await.ok().flatten().is_none() {
            return Ok(());
        }
        self.index.delete(key(reference)).await.map_err(|e| {
            StoreError::Cluster(format!(
                "cluster `{}`: cannot withdraw plugin {reference}: {e}",
                self.cluster
            ))
        })
    }

    async fn entry(&self, reference: &str) -> Result<Option<IndexEntry>, String> {
        match self.index.get(key(reference)).await {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("its index entry is unreadable: {e}")),
            Ok(None) => Ok(None),
            Err(error) => Err(format!("cannot read the index: {error}")),
        }
    }

    /// Shares every plugin this host had before it joined. A plugin the
    /// cluster has under the same `NAME@VERSION` as another file refuses
    /// the join: the hosts would run different code under one name.
    pub(super) async fn reconcile(&self) -> Result<(), ClusterError> {
        for plugin in self.store.list() {
            match self.publish(&plugin).await {
                Ok(()) => {}
                Err(PublishError::Conflict(existing)) => {
                    return Err(ClusterError::PluginConflict {
                        name: self.cluster.clone(),
                        reference: existing.reference,
                        theirs: existing.digest,
                        host: existing.added_by,
                        ours: plugin.digest,
                    });
                }
                Err(PublishError::Storage(message)) => {
                    return Err(ClusterError::Buckets {
                        name: self.cluster.clone(),
                        message,
                    });
                }
            }
        }
        Ok(())
    }

    /// Follows the index until the host leaves: what other hosts add is
    /// fetched and added here, what they withdraw removed.
    pub(super) async fn follow(self: Arc<Self>, users: Users) {
        let mut watch = match self.index.watch_with_history("r.>").await {
            Ok(watch) => watch,
            Err(error) => {
                warn!(cluster = %self.cluster, %error, "cannot follow the cluster's plugin index");
                return;
            }
        };
        while let Some(change) = watch.next().await {
            let change = match change {
                Ok(change) => change,
                Err(error) => {
                    warn!(cluster = %self.cluster, %error, "the cluster's plugin index");
                    continue;
                }
            };
            match change.operation {
                kv::Operation::Put => {
                    let Ok(entry) = serde_json::from_slice::<IndexEntry>(&change.value) else {
                        warn!(cluster = %self.cluster, key = %change.key, "an unreadable plugin index entry");
                        continue;
                    };
                    // On a NATS cluster the index can reach this host
                    // before the file's copy does: asked again a while.
                    let this = self.clone();
                    tokio::spawn(async move { this.fetch_patiently(&entry).await });
                }
                kv::Operation::Delete | kv::Operation::Purge => {
                    let Some(reference) = change
                        .key
                        .strip_prefix("r.")
                        .and_then(|h| hex::decode(h).ok())
                        .and_then(|b| String::from_utf8(b).ok())
                    else {
                        continue;
                    };
                    let store = self.store.clone();
                    let users = users.clone();
                    let removed = tokio::task::spawn_blocking(move || {
                        store
                            .remove(&reference, |digest| users(digest))
                            .map(|_| reference)
                    })
                    .await;
                    match removed {
                        Ok(Ok(reference)) => {
                            info!(cluster = %self.cluster, plugin = %reference, "plugin withdrawn by the cluster: removed")
                        }
                        Ok(Err(StoreError::NotFound(_))) => {}
                        Ok(Err(error)) => {
                            warn!(cluster = %self.cluster, %error, "plugin withdrawn by the cluster: kept")
                        }
                        Err(error) => warn!(cluster = %self.cluster, %error, "removing a plugin"),
                    }
                }
            }
        }
    }

    /// Adds `entry`'s plugin to this host's store if it lacks it: its
    /// file fetched, its sha256 checked, then validated and precompiled.
    /// [`Self::fetch`], tried again with backoff for about half a minute
    /// before giving up (a file not there yet, a store electing a leader).
    async fn fetch_patiently(&self, entry: &IndexEntry) {
        let mut pause = Duration::from_millis(200);
        for attempt in 1..=12 {
            match self.fetch(entry).await {
                Ok(()) => return,
                Err(error) if attempt == 12 => {
                    warn!(cluster = %self.cluster, plugin = %entry.reference, %error, "cannot take in a plugin of the cluster");
                }
                Err(error) => {
                    debug!(cluster = %self.cluster, plugin = %entry.reference, %error, attempt, "cannot take in a plugin of the cluster yet; asking again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(4));
                }
            }
        }
    }

    async fn fetch(&self, entry: &IndexEntry) -> Result<(), String> {
        if self
            .store
            .resolve(&entry.reference)
            .is_ok_and(|p| p.digest == entry.digest)
        {
            return Ok(());
        }
        let mut object = self
            .objects
            .get(entry.digest.as_str())
            .await
            .map_err(|e| format!("cannot fetch its file: {e}"))?;
        let mut bytes = Vec::with_capacity(entry.size as usize);
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| format!("cannot fetch its file: {e}"))?;
        let digest = hex::encode(Sha256::digest(&bytes));
        if digest != entry.digest {
            return Err(format!(
                "its file's sha256 is {digest}, the index says {}",
                entry.digest
            ));
        }
        let store = self.store.clone();
        let file = format!("{} (from cluster `{}`)", entry.reference, self.cluster);
        let (plugin, created) = tokio::task::spawn_blocking(move || store.add(&file, &bytes))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if created {
            info!(cluster = %self.cluster, plugin = %plugin.reference(), from = %entry.added_by, "plugin taken in from the cluster");
        }
        Ok(())
    }
}

/// Adds a plugin file to this host's store and, in a cluster, shares it:
/// what the API and the watched directory call. A file the cluster has
/// under its reference as another file is refused and removed again.
pub async fn add(
    store: &Arc<PluginStore>,
    shared: Option<&SharedPlugins>,
    file: String,
    bytes: Bytes,
) -> Result<(StoredPlugin, bool), StoreError> {
    let adding = store.clone();
    let name = file.clone();
    let (plugin, created) = tokio::task::spawn_blocking(move || adding.add(&name, &bytes))
        .await
        .map_err(|e| StoreError::Cluster(e.to_string()))??;
    let Some(shared) = shared else {
        return Ok((plugin, created));
    };
    match shared.publish(&plugin).await {
        Ok(()) => Ok((plugin, created)),
        Err(PublishError::Storage(message)) => Err(StoreError::Cluster(message)),
        Err(PublishError::Conflict(existing)) => {
            if created {
                let removing = store.clone();
                let reference = plugin.reference();
                let _ = tokio::task::spawn_blocking(move || {
                    removing.remove(&reference, |_| Vec::new())
                })
                .await;
            }
            Err(StoreError::Conflict {
                file,
                reference: existing.reference,
                existing: format!(
                    "{} in cluster `{}`, added by host `{}`",
                    existing.digest, shared.cluster, existing.added_by
                ),
            })
        }
    }
}
