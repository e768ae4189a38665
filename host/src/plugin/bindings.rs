//! The one `bindgen!` of the host: Rust types and traits for the
//! `weir:operator` world. Every import may trap (misuse of the API by the
//! guest ends the instance with an error naming what was misused).

wasmtime::component::bindgen!({
    world: "operator-plugin",
    path: "../wit",
    imports: { default: trappable },
});

pub use self::weir::operator::types::{
    BatchEntry as WitBatchEntry, PluginInfo as WitPluginInfo, Record as WitRecord,
    RecordBatch as WitRecordBatch, StateKind as WitStateKind, TimeDomain as WitTimeDomain,
    Timer as WitTimer,
};
