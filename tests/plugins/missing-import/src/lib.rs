//! `missing-import-plugin`: a test plugin whose component imports
//! `weir:missing/nowhere`, an interface the host does not offer, on top of
//! the whole `weir:operator/operator-plugin` world. The host must refuse to
//! load it with an error naming the import. Otherwise a pass-through.

wit_bindgen::generate!({
    path: "../../../wit",
    inline: "
        package weir:missing;

        interface nowhere {
            ping: func() -> u32;
        }

        world missing-import-plugin {
            include weir:operator/operator-plugin@0.1.0;
            import nowhere;
        }
    ",
    world: "missing-import-plugin",
    // The operator interfaces live in another package than the inline world.
    generate_all,
});

use exports::weir::operator::{metadata, operator};
use weir::operator::output;
use weir::operator::types::{PluginInfo, Record, RecordBatch, Timer};

struct MissingImport;

impl operator::Guest for MissingImport {
    fn open(_config: String) -> Result<(), String> {
        // A real call, so the import stays in the component.
        let _ = std::hint::black_box(weir::missing::nowhere::ping());
        Ok(())
    }

    fn process(_input: u32, record: Record) -> Result<(), String> {
        output::emit(&record);
        Ok(())
    }

    fn process_batch(_input: u32, batch: RecordBatch) -> Result<(), String> {
        output::emit_batch(&batch);
        Ok(())
    }

    fn on_timer(_timer: Timer) -> Result<(), String> {
        Ok(())
    }

    fn close() -> Result<(), String> {
        Ok(())
    }
}

impl metadata::Guest for MissingImport {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "missing-import".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            states: Vec::new(),
            batch_input: false,
        }
    }
}

export!(MissingImport);
