//! The watched plugin directory (`<data dir>/plugins/incoming/`, or
//! `--watch DIR`): a file dropped there is added to the store exactly like
//! `weir plugin add` (and shared with the host's cluster, if any), then
//! removed; a bad one moves to
//! `<data dir>/plugins/rejected/` beside `<name>.reason.txt` saying why.
//!
//! The directory is polled (every 250 ms); a file is taken once its size
//! stayed the same between two polls, so a copy in progress is not read
//! half-written. Names starting with `.` are ignored (write there, then
//! rename into place, for an atomic drop).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::HostContext;
use super::cluster::plugins::{self, SharedPlugins};

const POLL: Duration = Duration::from_millis(250);

/// Starts watching `dir`; what it takes is shared through `shared`.
pub fn spawn(
    ctx: Arc<HostContext>,
    dir: PathBuf,
    shared: Option<Arc<SharedPlugins>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(error) = std::fs::create_dir_all(&dir) {
            warn!(dir = %dir.display(), %error, "cannot create the watched plugin directory");
        }
        let mut sizes: HashMap<String, u64> = HashMap::new();
        let mut tick = tokio::time::interval(POLL);
        loop {
            tick.tick().await;
            let mut seen = HashMap::new();
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Ok(metadata) = entry.metadata() else {
                    continue;
                };
                if name.starts_with('.') || !metadata.is_file() {
                    continue;
                }
                let size = metadata.len();
                if sizes.get(&name) == Some(&size) {
                    take(&ctx, shared.as_deref(), &entry.path(), name).await;
                } else {
                    seen.insert(name, size);
                }
            }
            sizes = seen;
        }
    })
}

/// Adds one dropped file, or rejects it.
async fn take(ctx: &HostContext, shared: Option<&SharedPlugins>, path: &Path, name: String) {
    let result = match std::fs::read(path) {
        Ok(bytes) => plugins::add(&ctx.store, shared, name.clone(), bytes.into())
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    };
    match result {
        Ok((plugin, created)) => {
            info!(file = name, plugin = %plugin.reference(), created, "plugin added from the watched directory");
            if let Err(error) = std::fs::remove_file(path) {
                warn!(file = %path.display(), %error, "cannot remove the added plugin file");
            }
        }
        Err(reason) => {
            warn!(file = name, %reason, "plugin rejected from the watched directory");
            if let Err(error) = reject(ctx, path, &name, &reason) {
                warn!(file = %path.display(), %error, "cannot move the rejected plugin file");
            }
        }
    }
}

fn reject(ctx: &HostContext, path: &Path, name: &str, reason: &str) -> Result<(), String> {
    let rejected = Path::new("plugins/rejected");
    ctx.data
        .create_dir_all(rejected)
        .map_err(|e| e.to_string())?;
    ctx.data
        .write(
            rejected.join(format!("{name}.reason.txt")),
            format!("{reason}\n").as_bytes(),
        )
        .map_err(|e| e.to_string())?;
    let target = ctx.data.join(rejected.join(name));
    if std::fs::rename(path, &target).is_err() {
        // Another file system: copy, then remove.
        std::fs::copy(path, &target).map_err(|e| e.to_string())?;
        std::fs::remove_file(path).map_err(|e| e.to_string())?;
    }
    Ok(())
}
