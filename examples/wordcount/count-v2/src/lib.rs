//! `wordcount-count-v2`: the word count's `count` operator, version 2. Its
//! state `count` is a struct ([`Counted`]) where v1 kept a bare `u64`, so
//! its schema version is 2 and it exports a migration: a job savepointed
//! with v1 resumes with v2 and the counts carry on.

include!("operator.rs");

use weir_sdk::{Migrate, export_operator, migrate_value, unknown_migration};

impl Migrate for CountV2 {
    fn migrate(state: &str, from_version: u32, value: &[u8]) -> Result<Vec<u8>, Error> {
        match (state, from_version) {
            ("count", 1) => migrate_value(value, |count: u64| Counted {
                count,
                last_seen: None,
            }),
            _ => Err(unknown_migration(state, from_version)),
        }
    }
}

export_operator!(CountV2, migrate);
