//! `wordcount-count-v2` (schema version 2 of state `count`) exported
//! without the migration export: restoring v1 state into it must fail,
//! naming the operator and state.

include!("../../../../examples/wordcount/count-v2/src/operator.rs");

weir_sdk::export_operator!(CountV2);
