//! `uppercase-plugin`: a test plugin built on weir-sdk; a stateless map that
//! ASCII-uppercases each record's value, keeping its key and timestamp.

use weir_sdk::{Config, Context, Error, Metadata, Operator, Record, export_operator};

struct Uppercase;

impl Operator for Uppercase {
    fn metadata() -> Metadata {
        Metadata::new("uppercase", env!("CARGO_PKG_VERSION"))
    }

    fn open(_config: &Config) -> Result<Self, Error> {
        Ok(Uppercase)
    }

    fn process(&mut self, ctx: &mut Context, _input: u32, record: Record<'_>) -> Result<(), Error> {
        ctx.emit(record.key(), record.value().to_ascii_uppercase());
        Ok(())
    }
}

export_operator!(Uppercase);
