//! What an operator declares about itself: name, version and states.

use crate::bindings::weir::operator::types::{PluginInfo, StateDescriptor, StateKind};

/// An operator's self-description, returned by
/// [`Operator::metadata`](crate::Operator::metadata). Every state the
/// operator uses must be declared here, with the version of its encoding.
#[derive(Debug, Clone)]
pub struct Metadata {
    name: String,
    version: String,
    states: Vec<StateDescriptor>,
}

impl Metadata {
    /// A plugin called `name` (as job files refer to it), at `version`.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
            states: Vec::new(),
        }
    }

    /// Declares a [`ValueState`](crate::ValueState) named `name`.
    /// `schema_version` is bumped whenever the encoding of its values changes.
    pub fn value_state(self, name: impl Into<String>, schema_version: u32) -> Self {
        self.state(name.into(), StateKind::Value, schema_version)
    }

    /// Declares a [`ListState`](crate::ListState) named `name`.
    pub fn list_state(self, name: impl Into<String>, schema_version: u32) -> Self {
        self.state(name.into(), StateKind::List, schema_version)
    }

    /// Declares a [`MapState`](crate::MapState) named `name`.
    pub fn map_state(self, name: impl Into<String>, schema_version: u32) -> Self {
        self.state(name.into(), StateKind::Map, schema_version)
    }

    fn state(mut self, name: String, kind: StateKind, schema_version: u32) -> Self {
        self.states.push(StateDescriptor {
            name,
            kind,
            schema_version,
        });
        self
    }

    /// The declared states' names, in declaration order (their indexes in
    /// the batched state calls).
    pub(crate) fn state_names(&self) -> Vec<String> {
        self.states.iter().map(|s| s.name.clone()).collect()
    }

    /// The WIT `plugin-info`; SDK operators always take batch input.
    pub(crate) fn into_plugin_info(self) -> PluginInfo {
        PluginInfo {
            name: self.name,
            version: self.version,
            states: self.states,
            batch_input: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_plugin_info() {
        let info = Metadata::new("tumbling-window", "0.1.0")
            .map_state("windows", 1)
            .value_state("late", 2)
            .list_state("seen", 3)
            .into_plugin_info();
        assert_eq!(info.name, "tumbling-window");
        assert_eq!(info.version, "0.1.0");
        assert!(info.batch_input);
        let states: Vec<_> = info
            .states
            .iter()
            .map(|s| (s.name.as_str(), s.kind, s.schema_version))
            .collect();
        assert_eq!(
            states,
            [
                ("windows", StateKind::Map, 1),
                ("late", StateKind::Value, 2),
                ("seen", StateKind::List, 3)
            ]
        );
    }
}
