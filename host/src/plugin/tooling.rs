//! Tools for plugin authors in languages without a component toolchain of
//! their own (C, Zig, ...): `weir plugin bindings c` writes C bindings for
//! a world of the `weir:operator` package (wit-bindgen's C generator), and
//! `weir plugin componentize` turns a core Wasm module that implements a
//! world into a component (wit-component), embedding the world's type
//! information first if the module does not carry it. The WIT package is
//! the one this host was built with.

use std::path::{Path, PathBuf};

use wit_component::{ComponentEncoder, StringEncoding};
use wit_parser::{Resolve, WorldId};

/// The `weir:operator` WIT package this host implements.
pub const WIT: &str = include_str!("../../../wit/operator.wit");

/// The world plugins implement unless told otherwise.
pub const DEFAULT_WORLD: &str = "operator-plugin";

/// Errors of the plugin tools, naming the file or world at fault.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("world `{world}`: {message}")]
    World { world: String, message: String },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: cannot make a component: {message}")]
    Componentize { path: PathBuf, message: String },
}

fn world(name: &str) -> Result<(Resolve, WorldId), ToolError> {
    let error = |message: String| ToolError::World {
        world: name.to_string(),
        message,
    };
    let mut resolve = Resolve::default();
    let package = resolve
        .push_source("operator.wit", WIT)
        .map_err(|e| error(format!("{e:#}")))?;
    let world = resolve
        .select_world(&[package], Some(name))
        .map_err(|e| error(format!("{e:#}")))?;
    Ok((resolve, world))
}

/// Writes the C bindings of `world_name` into `dir`: `<world>.h`,
/// `<world>.c` and `<world>_component_type.o` (the world's type
/// information, to link into the module). Returns the files written.
pub fn bindings_c(world_name: &str, dir: &Path) -> Result<Vec<PathBuf>, ToolError> {
    let (mut resolve, world) = world(world_name)?;
    let mut files = wit_bindgen_core::Files::default();
    wit_bindgen_c::Opts::default()
        .build()
        .generate(&mut resolve, world, &mut files)
        .map_err(|e| ToolError::World {
            world: world_name.to_string(),
            message: format!("generating C bindings: {e:#}"),
        })?;
    std::fs::create_dir_all(dir).map_err(|e| ToolError::File {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut written = Vec::new();
    for (name, contents) in files.iter() {
        let path = dir.join(name);
        std::fs::write(&path, contents).map_err(|e| ToolError::File {
            path: path.clone(),
            message: e.to_string(),
        })?;
        written.push(path);
    }
    Ok(written)
}

/// Makes a component of the core module `bytes` (read from `path`), which
/// implements `world_name`. The world's type information is embedded
/// first unless the module carries a `component-type` section already.
pub fn componentize(path: &Path, bytes: &[u8], world_name: &str) -> Result<Vec<u8>, ToolError> {
    let error = |message: String| ToolError::Componentize {
        path: path.to_path_buf(),
        message,
    };
    if !bytes.starts_with(b"\0asm") {
        return Err(error("not a WebAssembly module".to_string()));
    }
    let mut module = bytes.to_vec();
    if !has_component_type(bytes) {
        let (resolve, world) = world(world_name)?;
        wit_component::embed_component_metadata(
            &mut module,
            &resolve,
            world,
            StringEncoding::UTF8,
            false,
        )
        .map_err(|e| error(format!("embedding the world: {e:#}")))?;
    }
    ComponentEncoder::default()
        .module(&module)
        .map_err(|e| error(format!("{e:#}")))?
        .validate(true)
        .encode()
        .map_err(|e| error(format!("{e:#}")))
}

/// Whether a core module has a custom section starting `component-type`.
fn has_component_type(bytes: &[u8]) -> bool {
    let mut at = 8;
    while at < bytes.len() {
        let id = bytes[at];
        at += 1;
        let Some((size, read)) = leb128_u32(&bytes[at..]) else {
            return false;
        };
        at += read;
        let end = at + size as usize;
        if end > bytes.len() {
            return false;
        }
        if id == 0
            && let Some((name_len, read)) = leb128_u32(&bytes[at..end])
        {
            let name_start = at + read;
            let name_end = name_start + name_len as usize;
            if name_end <= end && bytes[name_start..name_end].starts_with(b"component-type") {
                return true;
            }
        }
        at = end;
    }
    false
}

fn leb128_u32(bytes: &[u8]) -> Option<(u32, usize)> {
    let mut value = 0u32;
    for (i, byte) in bytes.iter().take(5).enumerate() {
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_bindings_are_written_for_the_operator_world() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = bindings_c(DEFAULT_WORLD, dir.path()).expect("bindings");
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert!(
            names.contains(&"operator_plugin.h".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"operator_plugin.c".to_string()),
            "{names:?}"
        );
        let header = std::fs::read_to_string(dir.path().join("operator_plugin.h")).expect("h");
        assert!(
            header.contains("weir_operator_state_value_get"),
            "the state import"
        );
        assert!(bindings_c("no-such-world", dir.path()).is_err());
    }

    #[test]
    fn a_module_without_the_exports_is_not_a_plugin() {
        // An empty module: the world's exports are missing.
        let error = componentize(Path::new("empty.wasm"), b"\0asm\x01\0\0\0", DEFAULT_WORLD)
            .expect_err("exports missing")
            .to_string();
        assert!(error.contains("empty.wasm"), "{error}");
        assert!(componentize(Path::new("x"), b"text", DEFAULT_WORLD).is_err());
    }
}
