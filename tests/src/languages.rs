//! Plugins written in other languages (Python, JavaScript, C, ...), built by
//! their example's own `build.sh` with the real toolchain, which the script
//! installs from the registries when it is missing. A build is cached under
//! `target/lang/` by a hash of everything it reads (the example, the
//! language's SDK, the WIT package), so a test run builds each once.
//!
//! A build script exits with 3 when it cannot install its toolchain. Under
//! CI (`CI` set) that fails the test like any other failure; on a developer
//! machine the test is skipped with a loud message naming the toolchain.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use crate::workspace;

/// A guest language with an example `count` operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Language {
    pub name: &'static str,
    /// `examples/<example>/build.sh` builds it.
    pub example: &'static str,
    /// A second argument for the build script (which variant to build),
    /// or "" for its default.
    pub variant: &'static str,
    /// Its SDK under `guest-sdk/`, if it has one.
    pub sdk: Option<&'static str>,
    /// What the build script installs (named when it cannot).
    pub toolchain: &'static str,
}

pub const PYTHON: Language = Language {
    name: "Python",
    example: "python-count",
    variant: "",
    sdk: Some("python"),
    toolchain: "python3 with pip (componentize-py from PyPI)",
};

/// Python `count` v2: a struct state migrated from v1 (`count_v2.py`).
pub const PYTHON_V2: Language = Language {
    variant: "count_v2",
    ..PYTHON
};

pub const JAVASCRIPT: Language = Language {
    name: "JavaScript",
    example: "js-count",
    variant: "",
    sdk: Some("js"),
    toolchain: "node and npm (ComponentizeJS, rolldown from the npm registry)",
};

pub const C: Language = Language {
    name: "C",
    example: "c-count",
    variant: "",
    sdk: None,
    toolchain: "clang, lld, wasi-libc and clang's wasm32 runtime (Debian packages clang-14, lld-14, wasi-libc, libclang-rt-14-dev-wasm32)",
};

pub const ZIG: Language = Language {
    name: "Zig",
    example: "zig-count",
    variant: "",
    sdk: None,
    toolchain: "Zig (PyPI: ziglang)",
};

/// Every file under `dir`, sorted, skipping installed toolchains.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "node_modules" || name == "__pycache__" || name == "zig-cache" {
            continue;
        }
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn inputs_hash(language: &Language) -> u64 {
    let root = workspace();
    let mut paths = Vec::new();
    files(&root.join("examples").join(language.example), &mut paths);
    if let Some(sdk) = language.sdk {
        files(&root.join("guest-sdk").join(sdk), &mut paths);
    }
    files(&root.join("wit"), &mut paths);
    paths.sort();
    let mut hasher = DefaultHasher::new();
    for path in paths {
        path.strip_prefix(&root).unwrap_or(&path).hash(&mut hasher);
        std::fs::read(&path).unwrap_or_default().hash(&mut hasher);
    }
    hasher.finish()
}

/// The built plugin of `language` (building it if its inputs changed), or
/// None when its toolchain cannot be installed outside CI. `weir` is the
/// `weir` binary the build scripts use (`weir plugin bindings` and
/// `weir plugin componentize`).
pub fn plugin(language: Language, weir: &Path) -> Option<PathBuf> {
    type Built = Vec<(Language, Option<PathBuf>)>;
    static BUILT: OnceLock<Mutex<Built>> = OnceLock::new();
    let built = BUILT.get_or_init(Mutex::default);
    // One build at a time: the toolchains are heavy on a 2-core machine.
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, path)) = built.iter().find(|(l, _)| *l == language) {
        return path.clone();
    }
    let root = workspace();
    let out = root.join("target").join("lang").join(format!(
        "{}{}-{:016x}.wasm",
        language.example,
        language.variant,
        inputs_hash(&language)
    ));
    let path = if out.is_file() {
        Some(out)
    } else {
        build(&language, &root, &out, weir)
    };
    built.push((language, path.clone()));
    path
}

fn build(language: &Language, root: &Path, out: &Path, weir: &Path) -> Option<PathBuf> {
    let script = root
        .join("examples")
        .join(language.example)
        .join("build.sh");
    let started = std::time::Instant::now();
    let output = Command::new("bash")
        .arg(&script)
        .arg(out)
        .args((!language.variant.is_empty()).then_some(language.variant))
        .current_dir(root)
        .env("WEIR", weir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.code() == Some(3) && std::env::var_os("CI").is_none() {
        eprintln!(
            "\n!!!!!!!!\n!!! SKIPPING the {} tests: its toolchain ({}) could not be installed.\n!!! {}\n!!!!!!!!\n",
            language.name,
            language.toolchain,
            log.trim()
        );
        return None;
    }
    assert!(
        output.status.success() && out.is_file(),
        "building the {} plugin ({}) failed:\n{log}",
        language.name,
        script.display()
    );
    eprintln!(
        "built the {} plugin in {:.1}s: {}",
        language.name,
        started.elapsed().as_secs_f64(),
        out.display()
    );
    Some(out.to_path_buf())
}
