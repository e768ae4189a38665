//! Plugins: Wasm components that implement operators.
//!
//! - [`engine`]: the [`PluginEngine`] — wasmtime configured for the component
//!   model (sync calls, epoch interruption), the linker with every host import,
//!   the compile cache (precompiled artifacts keyed by digest), and loading
//!   (validation of the component and its imports, reading its metadata).
//! - [`bindings`]: the one `bindgen!` of the `weir:operator` world.
//! - [`host`]: the store data ([`host::HostState`]) and one file per WIT
//!   import interface (`state`, `timers`, `output`, `log`).
//! - [`operator`]: [`WasmOperator`], a dataflow operator backed by a plugin
//!   instance, with the limits (memory, epoch deadline) applied per call.
//! - [`migrate`]: the optional migration export, run during a restore to
//!   rewrite state values of an older schema version.
//! - [`tooling`]: C bindings and componentizing core modules, for authors
//!   whose language has no component toolchain (`weir plugin bindings`,
//!   `weir plugin componentize`).
//!
//! Two error paths are kept apart: an `err` the guest returns (its own
//! failure, reported as is) and a trap (misuse of an import, a deadline, an
//! out-of-memory) that ends the instance. Both fail the task, never the host.

pub mod bindings;
pub mod engine;
pub mod flat;
pub mod host;
pub mod migrate;
pub mod operator;
pub mod tooling;

use std::path::PathBuf;

pub use engine::{LoadedPlugin, PluginEngine, PluginInfo};
pub use operator::WasmOperator;

/// Errors loading a plugin file. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot read plugin file {file}: {cause}")]
    Read {
        file: PathBuf,
        cause: std::io::Error,
    },
    #[error("plugin file {file} is not a valid WebAssembly component: {message}")]
    NotAComponent { file: PathBuf, message: String },
    #[error("plugin file {file} imports something the host does not offer: {message}")]
    MissingImport { file: PathBuf, message: String },
    #[error("plugin file {file} does not implement the weir:operator world: {message}")]
    WrongWorld { file: PathBuf, message: String },
    #[error("plugin file {file} has invalid metadata: {message}")]
    BadMetadata { file: PathBuf, message: String },
    /// The job file's `state_ttl` names a state the plugin does not declare.
    #[error(
        "state_ttl names state `{state}`, which plugin {plugin} ({file}) does not declare (its states: {declared})"
    )]
    UndeclaredTtlState {
        file: PathBuf,
        plugin: String,
        state: String,
        declared: String,
    },
    #[error("wasmtime engine: {0}")]
    Engine(String),
}
