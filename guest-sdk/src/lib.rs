//! `weir-sdk`: write Weir stream operators in Rust, compiled to WebAssembly
//! components (`wasm32-wasip2`). This crate owns the guest side of the
//! `weir:operator@0.1.0` contract (`wit/operator.wit`) and hides its
//! generated bindings behind a small API.
//!
//! # An operator
//!
//! ```ignore
//! use weir_sdk::{export_operator, Config, Context, Error, Metadata, Operator, Record, ValueState};
//!
//! struct Count {
//!     count: ValueState<u64>,
//! }
//!
//! impl Operator for Count {
//!     fn metadata() -> Metadata {
//!         Metadata::new("count", env!("CARGO_PKG_VERSION")).value_state("count", 1)
//!     }
//!
//!     fn open(_config: &Config) -> Result<Self, Error> {
//!         Ok(Count { count: ValueState::new("count") })
//!     }
//!
//!     fn process(&mut self, ctx: &mut Context, _input: u32, record: Record<'_>) -> Result<(), Error> {
//!         let n = self.count.get()?.unwrap_or(0) + 1;
//!         self.count.set(&n)?;
//!         ctx.emit(record.key(), format!("{} {n}", record.value_str()?));
//!         Ok(())
//!     }
//! }
//!
//! export_operator!(Count);
//! ```
//!
//! Build it as a `cdylib` with `cargo build --release --target wasm32-wasip2`;
//! the `.wasm` file is the component a job file points at.
//!
//! # Lifecycle
//!
//! The host calls [`Operator::metadata`] to learn the plugin's name and
//! states, [`Operator::open`] once with the job's config, then
//! [`Operator::process`] per record and [`Operator::on_timer`] per firing
//! timer, and [`Operator::close`] at the end of a bounded input. Any `Err`
//! fails the task with its message; the job's restart strategy then applies.
//!
//! Records reach the SDK in batches (the plugin reports `batch-input`); the
//! SDK calls `process` for each record in order and makes that record the
//! host's current record first, so state and timer calls are scoped to its
//! key and records of one key see each other's updates. Batches cross the
//! boundary in the flat layout (`flat-operator`, `emit-flat`: two copies a
//! batch); main-output emits are buffered and handed to the host once per
//! batch.
//!
//! # State encoding (a cross-language contract)
//!
//! [`ValueState`], [`ListState`] and [`MapState`] store every value **and
//! every map key** as JSON, exactly as `serde_json::to_vec` writes it:
//! compact (no whitespace), UTF-8 (non-ASCII characters are not `\u`-escaped),
//! struct fields in declaration order. Operators written in other languages
//! read and write the same state (e.g. across an upgrade that rewrites an
//! operator), so they must use the same encoding:
//!
//! * values may be any JSON the reader accepts (decoders ignore formatting);
//! * map keys are compared as bytes by the host, so they must be encoded
//!   canonically: Python `json.dumps(k, separators=(",", ":"),
//!   ensure_ascii=False).encode()`, JavaScript `JSON.stringify(k)`; keys
//!   should be integers, strings, or arrays/objects of those with a fixed
//!   field order;
//! * integers beyond 2^53 lose precision in JavaScript readers.
//!
//! Changing a state's Rust type in a way that changes its JSON means bumping
//! its `schema_version` in [`Metadata`].

mod adapter;
mod batch;
mod batch_state;
mod config;
mod context;
mod cursor;
mod error;
mod map;
mod metadata;
mod migrate;
mod record;
mod state;

pub use adapter::Adapter;
pub use config::Config;
pub use context::Context;
pub use error::Error;
#[doc(hidden)]
pub use map::InPlace;
pub use map::MapInPlace;
pub use metadata::{Metadata, StateTtl};
pub use migrate::{Migrate, migrate_value, unknown_migration};
pub use record::{OutRecord, Record, TimeDomain, Timer};
pub use state::{ListState, MapState, ValueState};

/// Lets the generated export macro name this crate as `weir_sdk` from inside.
extern crate self as weir_sdk;

/// The generated `wit-bindgen` bindings. Not part of the API.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "flat-operator-plugin",
        pub_export_macro: true,
        default_bindings_module: "weir_sdk::bindings",
        export_macro_name: "__export_operator_plugin",
    });
}

/// The generated bindings of the optional `migration` export. Not part of
/// the API.
#[doc(hidden)]
pub mod migration_bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "migration-plugin",
        pub_export_macro: true,
        default_bindings_module: "weir_sdk::migration_bindings",
        export_macro_name: "__export_migration_plugin",
    });
}

/// A stream operator. Implement it and export the type with
/// [`export_operator!`]. One instance lives per parallel task.
pub trait Operator: Sized + 'static {
    /// The plugin's name and version, and every state it uses.
    fn metadata() -> Metadata;

    /// Builds the operator from the job's `config` table. Create state
    /// handles here; state itself cannot be read or written in `open`
    /// (there is no current key).
    fn open(config: &Config) -> Result<Self, Error>;

    /// Handles one record from input edge `input` (the index in the job
    /// file's `inputs`). State and timer calls are scoped to its key.
    fn process(&mut self, ctx: &mut Context, input: u32, record: Record<'_>) -> Result<(), Error>;

    /// Handles a timer registered through the [`Context`]. State calls are
    /// scoped to `timer.key`.
    fn on_timer(&mut self, ctx: &mut Context, timer: Timer) -> Result<(), Error> {
        let _ = (ctx, timer);
        Ok(())
    }

    /// Called once when the input ends. No keyed state is available.
    fn close(&mut self, ctx: &mut Context) -> Result<(), Error> {
        let _ = ctx;
        Ok(())
    }

    /// Not part of the API: a [`MapInPlace`]'s batch pass, which the SDK
    /// runs instead of `process` per record when it returns `Some`.
    #[doc(hidden)]
    fn map_batch_in_place(
        &mut self,
        data: &mut [u8],
        entries: &[u32],
    ) -> Option<Result<(), Error>> {
        let _ = (data, entries);
        None
    }
}

/// Exports a type implementing [`MapInPlace`] as the component's
/// `weir:operator` implementation. Use it once per plugin crate, at the top
/// level.
#[macro_export]
macro_rules! export_map_in_place {
    ($map:ty) => {
        const _: fn() = || {
            fn assert_map<T: $crate::MapInPlace>() {}
            assert_map::<$map>();
        };
        $crate::export_operator!($crate::InPlace<$map>);
    };
}

/// Exports a type implementing [`Operator`] as the component's
/// `weir:operator` implementation. Use it once per plugin crate, at the top
/// level. `export_operator!(T, migrate)` also exports the schema-migration
/// interface, for a `T` that implements [`Migrate`].
#[macro_export]
macro_rules! export_operator {
    ($operator:ty, migrate) => {
        $crate::export_operator!($operator);
        const _: fn() = || {
            fn assert_migrate<T: $crate::Migrate>() {}
            assert_migrate::<$operator>();
        };
        #[doc(hidden)]
        type __WeirMigrationExport = $crate::Adapter<$operator>;
        $crate::migration_bindings::__export_migration_plugin!(
            __WeirMigrationExport with_types_in $crate::migration_bindings
        );
    };
    ($operator:ty) => {
        const _: fn() = || {
            fn assert_operator<T: $crate::Operator>() {}
            assert_operator::<$operator>();
        };
        #[doc(hidden)]
        type __WeirOperatorExport = $crate::Adapter<$operator>;
        $crate::bindings::__export_operator_plugin!(
            __WeirOperatorExport with_types_in $crate::bindings
        );
    };
}
