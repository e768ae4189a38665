//! The crate's layers, lowest first: a module may use modules of a lower
//! layer, never one of its own layer or above (ARCHITECTURE.md lists the
//! same table). The test below reads every source file and fails naming
//! the file, line and module when a lower layer reaches up; `dataflow` and
//! `checkpoint` in particular share only `protocol`.

/// Each top-level module and its layer.
pub const LAYERS: &[(&str, u8)] = &[
    // Leaves: plain types, units, fault-test pauses, job roots.
    ("types", 0),
    ("human", 0),
    ("failpoints", 0),
    ("roots", 0),
    // What a job is and where its state lives.
    ("state", 1),
    ("job", 1),
    // What subtasks and the checkpoint coordinator tell each other.
    ("protocol", 2),
    // The engine's two halves, apart.
    ("dataflow", 3),
    ("checkpoint", 3),
    // What runs in the engine: plugins, connectors.
    ("plugin", 4),
    ("connectors", 4),
    // Running a job (`weir run`), and its metrics' exposition.
    ("runner", 5),
    ("prometheus", 5),
    // The running host (`weir serve`).
    ("control", 6),
    // The command line.
    ("cli", 7),
    ("layers", 7),
];

/// The layer of top-level module `name`.
pub fn layer(name: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == name).map(|&(_, l)| l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn sources(dir: &Path, into: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                sources(&path, into);
            } else if path.extension().is_some_and(|e| e == "rs") {
                into.push(path);
            }
        }
    }

    /// The top-level module a file of `src/` belongs to.
    fn module_of(src: &Path, file: &Path) -> String {
        let relative = file.strip_prefix(src).expect("inside src");
        let first = relative
            .components()
            .next()
            .expect("a component")
            .as_os_str()
            .to_string_lossy()
            .into_owned();
        first.trim_end_matches(".rs").to_string()
    }

    /// Every `crate::<module>` named in code (comments left out).
    fn uses(text: &str) -> Vec<(usize, String)> {
        let mut found = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(at) = rest.find("crate::") {
                let name: String = rest[at + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.push((number + 1, name));
                }
                rest = &rest[at + 7..];
            }
            // `use crate::{a, b}` names several.
            if let Some(at) = code.find("crate::{") {
                let list = &code[at + 8..];
                let list = list.split('}').next().unwrap_or("");
                for part in list.split(',') {
                    let name: String = part
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        found.push((number + 1, name));
                    }
                }
            }
        }
        found
    }

    #[test]
    fn every_top_level_module_has_a_layer() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        for file in files {
            let module = module_of(&src, &file);
            if module == "lib" || module == "main" {
                continue;
            }
            assert!(
                layer(&module).is_some(),
                "{}: module `{module}` is in no layer of layers::LAYERS",
                file.display()
            );
        }
    }

    #[test]
    fn lower_layers_never_import_upper_ones() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut problems = Vec::new();
        for file in files {
            let module = module_of(&src, &file);
            let Some(own) = layer(&module) else { continue };
            let text = std::fs::read_to_string(&file).expect("read a source file");
            for (line, used) in uses(&text) {
                if used == module {
                    continue;
                }
                let Some(theirs) = layer(&used) else { continue };
                if theirs >= own {
                    problems.push(format!(
                        "{}:{line}: `{module}` (layer {own}) uses `{used}` (layer {theirs})",
                        file.display()
                    ));
                }
            }
        }
        assert!(
            problems.is_empty(),
            "layers import one way only:\n{}",
            problems.join("\n")
        );
    }

    #[test]
    fn the_check_sees_an_upward_use() {
        let found =
            uses("use crate::runner::PreparedJob; // crate::control\nuse crate::{job, state};");
        let names: Vec<&str> = found.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["runner", "job", "state"]);
    }
}
