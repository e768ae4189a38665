//! `wordcount-count-v2`: the word count's `count` operator, version 2. Its
//! state `count` is a struct ([`Counted`]) where v1 kept a bare `u64`, so
//! its schema version is 2 and it exports a migration: a job savepointed
//! with v1 resumes with v2 and the counts carry on.

include!("operator.rs");
include!("migrate.rs");

weir_sdk::export_operator!(CountV2, migrate);
