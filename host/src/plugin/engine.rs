//! The [`PluginEngine`]: one wasmtime engine per process, configured for
//! synchronous component calls with epoch interruption; the linker with every
//! import the host offers; the compile cache; and loading a plugin file into
//! a [`LoadedPlugin`] (validated, precompiled, metadata read).

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::{debug, info};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store};

use super::PluginError;
use super::bindings::{OperatorPlugin, OperatorPluginPre, WitStateKind};
use super::host::HostState;
use crate::job::{Limits, WasiGrant};
use crate::state::{StateDescriptor, StateKind};

/// How often the epoch advances; call deadlines are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// What a plugin declares about itself (its `metadata.describe` export).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub states: Vec<StateDescriptor>,
    pub batch_input: bool,
}

/// A validated, compiled plugin, ready to be instantiated per subtask.
#[derive(Clone)]
pub struct LoadedPlugin {
    pub file: PathBuf,
    /// sha256 of the component file, hex.
    pub digest: String,
    pub info: PluginInfo,
    pub(crate) pre: OperatorPluginPre<HostState>,
    pub(crate) engine: Engine,
    /// The `migrate` function of the optional migration export.
    pub(crate) migrate: Option<wasmtime::component::ComponentExportIndex>,
    /// The `process-flat` function of the optional flat export.
    pub(crate) flat: Option<wasmtime::component::ComponentExportIndex>,
    /// How long compiling (or loading the cached artifact) took.
    pub load_time: Duration,
    pub from_cache: bool,
}

impl LoadedPlugin {
    /// The plugin with its states' TTLs as an operator's `state_ttl` sets
    /// them (the same compiled plugin; only its declaration differs).
    /// Fails naming a state the plugin does not declare.
    pub fn with_state_ttl(
        self: &Arc<Self>,
        overrides: &std::collections::BTreeMap<String, crate::job::TtlOverride>,
    ) -> Result<Arc<Self>, PluginError> {
        if overrides.is_empty() {
            return Ok(self.clone());
        }
        let mut info = self.info.clone();
        for (name, ttl) in overrides {
            let Some(state) = info.states.iter_mut().find(|s| &s.name == name) else {
                let declared: Vec<&str> =
                    self.info.states.iter().map(|s| s.name.as_str()).collect();
                return Err(PluginError::UndeclaredTtlState {
                    file: self.file.clone(),
                    plugin: format!("{} {}", self.info.name, self.info.version),
                    state: name.clone(),
                    declared: match declared.is_empty() {
                        true => "none".to_string(),
                        false => declared.join(", "),
                    },
                });
            };
            state.ttl = ttl.apply(state.ttl);
        }
        Ok(Arc::new(Self {
            info,
            ..(**self).clone()
        }))
    }

    /// Whether the plugin exports schema migration.
    pub fn can_migrate(&self) -> bool {
        self.migrate.is_some()
    }

    /// Whether batches reach it through the flat export (`process-flat`)
    /// rather than `process-batch` or `process`.
    pub fn takes_flat_batches(&self) -> bool {
        self.flat.is_some() && self.info.batch_input
    }
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("file", &self.file)
            .field("digest", &self.digest)
            .field("info", &self.info)
            .finish()
    }
}

/// The wasmtime engine, linker and compile cache of this process.
pub struct PluginEngine {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: Option<PathBuf>,
    ticker_stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for PluginEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginEngine")
            .field("cache_dir", &self.cache_dir)
            .finish()
    }
}

impl Drop for PluginEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl PluginEngine {
    /// `cache_dir`: where precompiled artifacts are kept (`None`: no cache).
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, PluginError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        // Synchronous calls only: the component-model concurrency machinery
        // makes every call 2-3x slower.
        config.concurrency_support(false);
        config.epoch_interruption(true);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&config).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        OperatorPlugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let stop = ticker_stop.clone();
        std::thread::Builder::new()
            .name("weir-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        Ok(Self {
            engine,
            linker,
            cache_dir,
            ticker_stop,
        })
    }

    /// The default compile cache: `$WEIR_CACHE_DIR`, else `$XDG_CACHE_HOME/weir`,
    /// else `~/.cache/weir`.
    pub fn default_cache_dir() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("WEIR_CACHE_DIR") {
            return Some(PathBuf::from(dir));
        }
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
            return Some(PathBuf::from(dir).join("weir"));
        }
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache").join("weir"))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Reads, validates and compiles (or loads from the cache) a plugin
    /// file, then reads its metadata.
    pub fn load(&self, file: &Path) -> Result<Arc<LoadedPlugin>, PluginError> {
        let started = Instant::now();
        let bytes = std::fs::read(file).map_err(|source| PluginError::Read {
            file: file.to_path_buf(),
            cause: source,
        })?;
        self.load_bytes(file, &bytes, started)
    }

    /// Validates and compiles (or loads from the cache) a plugin's bytes,
    /// then reads its metadata. `file` names it in errors and is recorded
    /// as where it came from; `started`: when loading began (load time).
    pub fn load_bytes(
        &self,
        file: &Path,
        bytes: &[u8],
        started: Instant,
    ) -> Result<Arc<LoadedPlugin>, PluginError> {
        let digest = hex::encode(Sha256::digest(bytes));
        let (component, from_cache) = self.compile(file, bytes, &digest)?;
        let instance_pre =
            self.linker
                .instantiate_pre(&component)
                .map_err(|e| PluginError::MissingImport {
                    file: file.to_path_buf(),
                    message: format!("{e:#}"),
                })?;
        let pre = OperatorPluginPre::new(instance_pre).map_err(|e| PluginError::WrongWorld {
            file: file.to_path_buf(),
            message: format!("{e:#}"),
        })?;
        let info = describe(&self.engine, &pre, file)?;
        let migrate = super::migrate::find(&component);
        let flat = super::flat::find(&component);
        let load_time = started.elapsed();
        info!(
            plugin = %info.name,
            version = %info.version,
            file = %file.display(),
            from_cache,
            ms = load_time.as_secs_f64() * 1000.0,
            "plugin loaded"
        );
        Ok(Arc::new(LoadedPlugin {
            file: file.to_path_buf(),
            digest,
            info,
            pre,
            engine: self.engine.clone(),
            migrate,
            flat,
            load_time,
            from_cache,
        }))
    }

    /// Where the precompiled artifact of `digest` is cached, if caching.
    fn artifact_path(&self, digest: &str) -> Option<PathBuf> {
        self.cache_dir.as_ref().map(|dir| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            self.engine
                .precompile_compatibility_hash()
                .hash(&mut hasher);
            dir.join(format!("{digest}-{:016x}.cwasm", hasher.finish()))
        })
    }

    /// Removes the cached artifact of `digest` (a plugin the running host
    /// rejected or removed).
    pub fn forget(&self, digest: &str) {
        if let Some(path) = self.artifact_path(digest) {
            let _ = std::fs::remove_file(path);
        }
    }

    fn compile(
        &self,
        file: &Path,
        bytes: &[u8],
        digest: &str,
    ) -> Result<(Component, bool), PluginError> {
        let cached = self.artifact_path(digest);
        if let Some(path) = &cached
            && path.is_file()
        {
            // SAFETY: the artifact was written by `Component::serialize` of an
            // engine with the same compatibility hash (part of the file name),
            // in a cache directory only this host writes to.
            match unsafe { Component::deserialize_file(&self.engine, path) } {
                Ok(component) => return Ok((component, true)),
                Err(error) => {
                    debug!(path = %path.display(), %error, "ignoring unusable cached artifact")
                }
            }
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(PluginError::NotAComponent {
                file: file.to_path_buf(),
                message: "the file does not start with the WebAssembly magic bytes".to_string(),
            });
        }
        let component =
            Component::new(&self.engine, bytes).map_err(|e| PluginError::NotAComponent {
                file: file.to_path_buf(),
                message: format!("{e:#}"),
            })?;
        if let Some(path) = &cached {
            store_artifact(path, &component);
        }
        Ok((component, false))
    }

    /// Builds the WASI context a plugin gets: nothing unless granted.
    pub(crate) fn wasi_context(grants: &[WasiGrant]) -> wasmtime_wasi::WasiCtx {
        let mut builder = wasmtime_wasi::WasiCtxBuilder::new();
        builder
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        if grants.contains(&WasiGrant::Stdio) {
            builder.inherit_stderr();
            builder.stdout(wasmtime_wasi::cli::stderr());
        }
        if grants.contains(&WasiGrant::Env) {
            builder.inherit_env();
        }
        if !grants.contains(&WasiGrant::Clocks) {
            builder.wall_clock(FrozenClock).monotonic_clock(FrozenClock);
        }
        builder.build()
    }
}

fn store_artifact(path: &Path, component: &Component) {
    let result = (|| -> std::io::Result<()> {
        let bytes = component
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let temp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&temp, bytes)?;
        std::fs::rename(&temp, path)
    })();
    if let Err(error) = result {
        debug!(path = %path.display(), %error, "could not store compiled artifact");
    }
}

/// Instantiates the plugin once, without state, to read its metadata.
fn describe(
    engine: &Engine,
    pre: &OperatorPluginPre<HostState>,
    file: &Path,
) -> Result<PluginInfo, PluginError> {
    let bad = |message: String| PluginError::BadMetadata {
        file: file.to_path_buf(),
        message,
    };
    let mut host = HostState::for_metadata(Limits::default());
    host.ttl_declarations = Some(Vec::new());
    let mut store = Store::new(engine, host);
    store.limiter(|state| &mut state.limits);
    store.set_epoch_deadline(ticks(Limits::default().call_timeout));
    let plugin = pre
        .instantiate(&mut store)
        .map_err(|e| bad(format!("instantiating failed: {e:#}")))?;
    let raw = plugin
        .weir_operator_metadata()
        .call_describe(&mut store)
        .map_err(|e| bad(format!("describe trapped: {e:#}")))?;
    let mut names = HashSet::new();
    let mut states = Vec::new();
    for state in raw.states {
        if state.name.is_empty() {
            return Err(bad("a declared state has an empty name".to_string()));
        }
        if !names.insert(state.name.clone()) {
            return Err(bad(format!("state `{}` is declared twice", state.name)));
        }
        states.push(StateDescriptor {
            name: state.name,
            kind: match state.kind {
                WitStateKind::Value => StateKind::Value,
                WitStateKind::List => StateKind::List,
                WitStateKind::Map => StateKind::Map,
            },
            schema_version: state.schema_version,
            ttl: None,
        });
    }
    for (name, ttl) in store.data_mut().ttl_declarations.take().unwrap_or_default() {
        let Some(state) = states.iter_mut().find(|s| s.name == name) else {
            let declared: Vec<&str> = states.iter().map(|s| s.name.as_str()).collect();
            return Err(bad(format!(
                "declare-ttl names state `{name}`, which the plugin does not declare (declared: {declared:?})"
            )));
        };
        if state.ttl.is_some() {
            return Err(bad(format!("state `{name}`: declare-ttl is called twice")));
        }
        state.ttl = Some(ttl);
    }
    if raw.name.is_empty() {
        return Err(bad("the plugin name is empty".to_string()));
    }
    Ok(PluginInfo {
        name: raw.name,
        version: raw.version,
        states,
        batch_input: raw.batch_input,
    })
}

/// Epoch ticks for a call timeout.
pub(crate) fn ticks(timeout: Duration) -> u64 {
    (timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
}

/// A clock that always reads zero: plugins get no ambient time unless granted.
struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}
