// The migration of `wordcount-count-v2` (v1's bare count into
// `Counted`), shared (through `include!`) with the test plugin that traps
// after restoring.

impl weir_sdk::Migrate for CountV2 {
    fn migrate(state: &str, from_version: u32, value: &[u8]) -> Result<Vec<u8>, Error> {
        match (state, from_version) {
            ("count", 1) => weir_sdk::migrate_value(value, |count: u64| Counted {
                count,
                last_seen: None,
            }),
            _ => Err(weir_sdk::unknown_migration(state, from_version)),
        }
    }
}
