//! The README's two commands share their heaviest compile: `scripts/demo.sh`
//! builds `weir` alone, `scripts/test.sh` builds it with its dev-dependencies
//! and the test packages, and cargo reuses a dependency only when both
//! resolve it with the same features. These tests ask cargo for both feature
//! resolutions and fail, naming the crates, when the demo's build would
//! compile a crate the test build cannot reuse (the fix: declare the feature
//! in host/Cargo.toml's build-sharing block).

use std::collections::BTreeSet;
use std::process::Command;

/// `cargo tree`'s packages and their features (one `name version [features]`
/// line each) for the given selection, as the build of that selection
/// resolves them.
fn resolved_features(args: &[&str]) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let output = Command::new(&cargo)
        .current_dir(weir_tests::workspace())
        .args(["tree", "--locked", "--offline", "--prefix", "none"])
        .args(["--format", "{p} [{f}]"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cargo} tree: {e}"));
    assert!(
        output.status.success(),
        "cargo tree {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("cargo tree prints UTF-8")
        .lines()
        .map(|line| line.trim_end_matches(" (*)").to_string())
        .filter(|line| !line.is_empty())
        .collect()
}

/// The lines of `demo` that `test` lacks: crates the demo's build would
/// compile with features the test build does not use.
fn unshared(demo: &BTreeSet<String>, test: &BTreeSet<String>) -> Vec<String> {
    demo.difference(test).cloned().collect()
}

#[test]
fn the_demo_build_of_the_host_is_reused_by_the_test_build() {
    // scripts/demo.sh: `cargo build -p weir`.
    let demo = resolved_features(&["-p", "weir", "--edges", "normal,build"]);
    // scripts/test.sh: `cargo test -p weir -p weir-sdk -p weir-tests`.
    let test = resolved_features(&[
        "-p",
        "weir",
        "-p",
        "weir-sdk",
        "-p",
        "weir-tests",
        "--edges",
        "normal,build,dev",
    ]);
    assert!(
        demo.iter().any(|line| line.starts_with("wasmtime v")),
        "cargo tree -p weir lists no wasmtime: {demo:?}"
    );
    let unshared = unshared(&demo, &test);
    assert!(
        unshared.is_empty(),
        "`cargo build -p weir` resolves these crates with features the test build does not \
         (so both compile them); declare the test build's features in host/Cargo.toml:\n{}",
        unshared.join("\n")
    );
}

#[test]
fn the_demo_build_of_the_plugins_is_reused_by_the_test_build() {
    // scripts/demo.sh builds the three wordcount plugins.
    let demo = resolved_features(&[
        "--target",
        "wasm32-wasip2",
        "--edges",
        "normal,build",
        "-p",
        "wordcount-split",
        "-p",
        "wordcount-count",
        "-p",
        "wordcount-count-v2",
    ]);
    // tests/build.rs builds every guest of the workspace.
    let test = resolved_features(&[
        "--target",
        "wasm32-wasip2",
        "--edges",
        "normal,build",
        "--workspace",
        "--exclude",
        "weir",
        "--exclude",
        "weir-tests",
    ]);
    let unshared = unshared(&demo, &test);
    assert!(
        unshared.is_empty(),
        "the demo's plugin build resolves these crates with features the test build of every \
         guest does not:\n{}",
        unshared.join("\n")
    );
}
