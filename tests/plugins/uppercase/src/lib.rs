//! `uppercase-plugin`: a test plugin built on weir-sdk; a stateless map that
//! ASCII-uppercases each record's value in place, keeping its key and
//! timestamp.

use weir_sdk::{Config, Error, MapInPlace, Metadata, export_map_in_place};

struct Uppercase;

impl MapInPlace for Uppercase {
    fn metadata() -> Metadata {
        Metadata::new("uppercase", env!("CARGO_PKG_VERSION"))
    }

    fn open(_config: &Config) -> Result<Self, Error> {
        Ok(Uppercase)
    }

    fn map_in_place(&mut self, _key: Option<&[u8]>, value: &mut [u8]) -> Result<(), Error> {
        value.make_ascii_uppercase();
        Ok(())
    }
}

export_map_in_place!(Uppercase);
