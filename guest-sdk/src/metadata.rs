//! What an operator declares about itself: name, version, states and
//! their time-to-lives.

use std::time::Duration;

use crate::bindings::weir::operator::types::{PluginInfo, StateDescriptor, StateKind};

/// An operator's self-description, returned by
/// [`Operator::metadata`](crate::Operator::metadata). Every state the
/// operator uses must be declared here, with the version of its encoding.
#[derive(Debug, Clone)]
pub struct Metadata {
    name: String,
    version: String,
    states: Vec<StateDescriptor>,
    /// (state name, its TTL), declared to the host by `describe`.
    ttls: Vec<(String, StateTtl)>,
}

/// A state's time-to-live: a cell (a key's value, its whole list or map)
/// not updated for this long expires, and reads as absent. A job file's
/// `state_ttl` overrides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateTtl {
    after: Duration,
    on_read: bool,
    event_time: bool,
}

impl StateTtl {
    /// Expires a cell `after` its last write, in processing time.
    pub fn after(after: Duration) -> Self {
        Self {
            after,
            on_read: false,
            event_time: false,
        }
    }

    /// Reading a cell refreshes it too (Flink's `OnReadAndWrite`).
    pub fn refreshed_on_read(self) -> Self {
        Self {
            on_read: true,
            ..self
        }
    }

    /// Measured by the watermark instead of the host's wall clock.
    pub fn in_event_time(self) -> Self {
        Self {
            event_time: true,
            ..self
        }
    }
}

impl Metadata {
    /// A plugin called `name` (as job files refer to it), at `version`.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
            states: Vec::new(),
            ttls: Vec::new(),
        }
    }

    /// Gives the state declared last a time-to-live:
    /// `.value_state("seen", 1).ttl(StateTtl::after(Duration::from_secs(3600)))`.
    ///
    /// # Panics
    /// Before any state is declared.
    pub fn ttl(mut self, ttl: StateTtl) -> Self {
        let state = self
            .states
            .last()
            .expect("Metadata::ttl follows the state it applies to")
            .name
            .clone();
        self.ttls.push((state, ttl));
        self
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

    /// Tells the host the declared TTLs (`declare-ttl`; only while it
    /// calls `describe`).
    pub(crate) fn declare_ttls(&self) {
        use crate::bindings::weir::operator::state::{TtlUpdate, declare_ttl};
        use crate::bindings::weir::operator::types::TimeDomain;
        for (state, ttl) in &self.ttls {
            let millis = u64::try_from(ttl.after.as_millis()).unwrap_or(u64::MAX);
            let update = match ttl.on_read {
                true => TtlUpdate::OnReadAndWrite,
                false => TtlUpdate::OnCreateAndWrite,
            };
            let domain = match ttl.event_time {
                true => TimeDomain::EventTime,
                false => TimeDomain::ProcessingTime,
            };
            declare_ttl(state, millis, update, domain);
        }
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

    #[test]
    fn a_ttl_applies_to_the_state_declared_before_it() {
        let ttl = StateTtl::after(Duration::from_secs(10)).refreshed_on_read();
        let metadata = Metadata::new("count", "0.1.0")
            .value_state("count", 1)
            .value_state("seen", 1)
            .ttl(ttl);
        assert_eq!(metadata.ttls, vec![("seen".to_string(), ttl)]);
    }
}
