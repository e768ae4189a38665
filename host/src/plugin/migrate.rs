//! The optional `migration` export (`weir:operator/migration`): rewriting
//! stored state values written at an older schema version while a job is
//! restored. [`find`] tells at load time whether a component has it;
//! [`Migrator`] runs it on a private instance (no keyed context, the
//! operator's limits) for every value of each state whose version changed:
//! the value of a value state, each element of a list, each value of a map.

use std::sync::Arc;

use wasmtime::Store;
use wasmtime::component::{Component, ComponentExportIndex, TypedFunc};

use super::engine::{LoadedPlugin, ticks};
use super::host::HostState;
use crate::checkpoint::metadata::OperatorSnapshot;
use crate::checkpoint::restore::{MigrateCells, changed_schemas};
use crate::job::Limits;
use crate::state::{StateKind, codec};

/// The export's name in a component.
pub const MIGRATION_INTERFACE: &str = "weir:operator/migration@0.1.0";

/// The `migrate` function of a component's migration export, if it has one.
pub fn find(component: &Component) -> Option<ComponentExportIndex> {
    let interface = component.get_export_index(None, MIGRATION_INTERFACE)?;
    component.get_export_index(Some(&interface), "migrate")
}

/// One state to migrate: its table in the new backend, name, kind and the
/// schema version its stored values were written at.
#[derive(Debug, Clone)]
pub struct StateMigration {
    pub table: usize,
    pub name: String,
    pub kind: StateKind,
    pub from_version: u32,
}

type MigrateFn = TypedFunc<(String, u32, Vec<u8>), (Result<Vec<u8>, String>,)>;

/// A plugin instance that migrates the values of some states of one
/// operator.
pub struct Migrator {
    uid: String,
    plugin: Arc<LoadedPlugin>,
    store: Store<HostState>,
    func: MigrateFn,
    limits: Limits,
    /// By table (new table order).
    states: Vec<Option<StateMigration>>,
    /// Values migrated so far.
    pub migrated: u64,
}

impl Migrator {
    /// Instantiates `plugin` for operator `uid` to migrate `states`. Fails,
    /// naming the operator, when the plugin has no migration export or it
    /// has the wrong type.
    pub fn new(
        uid: &str,
        plugin: Arc<LoadedPlugin>,
        limits: &Limits,
        states: Vec<StateMigration>,
    ) -> Result<Self, String> {
        let fail = |message: String| {
            format!(
                "operator `{uid}` (plugin `{}`): {message}",
                plugin.info.name
            )
        };
        let Some(index) = plugin.migrate else {
            return Err(fail(format!(
                "the plugin has no migrate export ({MIGRATION_INTERFACE})"
            )));
        };
        let mut store = Store::new(&plugin.engine, HostState::for_metadata(*limits));
        store.limiter(|state| &mut state.limits);
        store.set_epoch_deadline(ticks(limits.call_timeout));
        let instance = plugin
            .pre
            .instance_pre()
            .instantiate(&mut store)
            .map_err(|e| fail(format!("instantiating for migration failed: {e:#}")))?;
        let func = instance
            .get_typed_func::<(String, u32, Vec<u8>), (Result<Vec<u8>, String>,)>(
                &mut store, &index,
            )
            .map_err(|e| fail(format!("its migrate export has the wrong type: {e:#}")))?;
        let mut by_table = Vec::new();
        for state in states {
            if by_table.len() <= state.table {
                by_table.resize(state.table + 1, None);
            }
            let table = state.table;
            by_table[table] = Some(state);
        }
        Ok(Self {
            uid: uid.to_string(),
            plugin,
            store,
            func,
            limits: *limits,
            states: by_table,
            migrated: 0,
        })
    }

    /// The migrator that restoring `op`'s stored state for `plugin` (as
    /// operator `uid`) needs: None when no state's schema version changed.
    pub fn for_restore(
        uid: &str,
        plugin: &Arc<LoadedPlugin>,
        limits: &Limits,
        op: &OperatorSnapshot,
    ) -> Result<Option<Self>, String> {
        let states = &plugin.info.states;
        let migrations: Vec<StateMigration> = changed_schemas(op, states)
            .into_iter()
            .map(|(table, from_version)| StateMigration {
                table,
                name: states[table].name.clone(),
                kind: states[table].kind,
                from_version,
            })
            .collect();
        if migrations.is_empty() {
            return Ok(None);
        }
        Self::new(uid, plugin.clone(), limits, migrations).map(Some)
    }

    /// The states it migrates, e.g. `counts from v1`.
    pub fn describe(&self) -> Vec<String> {
        self.states
            .iter()
            .flatten()
            .map(|s| format!("{} from v{}", s.name, s.from_version))
            .collect()
    }

    fn call(&mut self, state: &StateMigration, value: Vec<u8>) -> Result<Vec<u8>, String> {
        self.store
            .set_epoch_deadline(ticks(self.limits.call_timeout));
        let fail = |message: String| {
            format!(
                "operator `{}` state `{}`: migrating from schema version {} with plugin `{}` failed: {message}",
                self.uid, state.name, state.from_version, self.plugin.info.name
            )
        };
        let result = self.func.call(
            &mut self.store,
            (state.name.clone(), state.from_version, value),
        );
        self.migrated += 1;
        match result {
            Ok((Ok(value),)) => Ok(value),
            Ok((Err(message),)) => Err(fail(message)),
            Err(trap) => Err(fail(format!("the plugin trapped: {trap:#}"))),
        }
    }
}

impl MigrateCells for Migrator {
    fn needs(&self, table: usize) -> bool {
        self.states.get(table).is_some_and(Option::is_some)
    }

    fn migrate(&mut self, table: usize, cell: Vec<u8>) -> Result<Vec<u8>, String> {
        let state = self.states[table].clone().expect("needs() said so");
        let corrupt =
            |e: codec::CodecError| format!("operator `{}` state `{}`: {e}", self.uid, state.name);
        match state.kind {
            StateKind::Value => self.call(&state, cell),
            StateKind::List => {
                let items = codec::decode_list(&cell).map_err(corrupt)?;
                let migrated = items
                    .into_iter()
                    .map(|item| self.call(&state, item))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(codec::encode_list(&migrated))
            }
            StateKind::Map => {
                let map = codec::decode_map(&cell).map_err(corrupt)?;
                let mut migrated = std::collections::BTreeMap::new();
                for (key, value) in map {
                    migrated.insert(key, self.call(&state, value)?);
                }
                Ok(codec::encode_map(&migrated))
            }
        }
    }
}
