//! `uppercase-plugin`: a test plugin built on weir-sdk; a stateless map that
//! ASCII-uppercases each record's value, keeping its key and timestamp.

use weir_sdk::{Config, Context, Error, Metadata, Operator, Record, export_operator};

struct Uppercase {
    /// Reused for every record, as the native twin in the throughput
    /// benchmark does.
    scratch: Vec<u8>,
}

impl Operator for Uppercase {
    fn metadata() -> Metadata {
        Metadata::new("uppercase", env!("CARGO_PKG_VERSION"))
    }

    fn open(_config: &Config) -> Result<Self, Error> {
        Ok(Uppercase {
            scratch: Vec::new(),
        })
    }

    fn process(&mut self, ctx: &mut Context, _input: u32, record: Record<'_>) -> Result<(), Error> {
        self.scratch.clear();
        self.scratch
            .extend(record.value().iter().map(u8::to_ascii_uppercase));
        ctx.emit(record.key(), &self.scratch);
        Ok(())
    }
}

export_operator!(Uppercase);
