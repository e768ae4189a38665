//! Test support for Weir's end-to-end tests: the paths of the guest plugins
//! the build script compiled (real toolchain, real components), and small
//! helpers that do not depend on the `weir` crate itself (so they can serve
//! as its dev-dependency).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub mod browser;
pub mod kafka;
pub mod languages;
pub mod nats;
pub mod s3;
pub mod servers;

/// Paths of the built plugins, one constant per guest crate.
pub mod plugins {
    include!(concat!(env!("OUT_DIR"), "/plugins.rs"));
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

/// A compile cache shared by the tests of one build, so each plugin is
/// compiled once.
pub fn compile_cache() -> PathBuf {
    workspace().join("target").join("weir-test-cache")
}

/// The word count of `text`, computed independently of Weir: words are
/// maximal runs of characters that are neither whitespace nor ASCII
/// punctuation, lowercased.
pub fn count_words(text: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for word in text
        .split(|c: char| c.is_whitespace() || c.is_ascii_punctuation())
        .filter(|w| !w.is_empty())
    {
        *counts.entry(word.to_lowercase()).or_insert(0) += 1;
    }
    counts
}

/// Reads every `part-*` file of a file sink's directory, in name order.
pub fn read_parts(dir: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("part-"))
        })
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_else(|e| panic!("reading {}: {e}", f.display()))
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// From `word count` update lines, the last (largest) count of each word.
pub fn final_counts(lines: &[String]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in lines {
        let (word, count) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a `word count` line: {line:?}"));
        let count: u64 = count
            .parse()
            .unwrap_or_else(|_| panic!("bad count in {line:?}"));
        let entry = counts.entry(word.to_string()).or_insert(0);
        *entry = (*entry).max(count);
    }
    counts
}

/// Deterministic text with punctuation, mixed case and repeated words.
pub fn sample_text(lines: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "the",
        "Stream",
        "flows",
        "over",
        "a",
        "weir",
        "and",
        "water",
        "keeps",
        "its",
        "state",
        "checkpoint",
        "barrier",
        "Key",
        "group",
        "operator",
        "plugin",
        "wasm",
        "rust",
        "river",
    ];
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = String::new();
    for _ in 0..lines {
        let words = 1 + next() % 12;
        for i in 0..words {
            if i > 0 {
                out.push(if next() % 7 == 0 { '\t' } else { ' ' });
            }
            out.push_str(WORDS[(next() % WORDS.len() as u64) as usize]);
            match next() % 10 {
                0 => out.push(','),
                1 => out.push('.'),
                2 => out.push_str("!?"),
                _ => {}
            }
        }
        out.push('\n');
    }
    out
}

/// Checks that `lines` are exactly the `word count` updates of a count that
/// saw `expected` occurrences per word: `w 1` … `w N` once each, nothing
/// else. Returns what is missing and what is duplicated or foreign.
pub fn check_exact_updates(
    lines: &[String],
    expected: &BTreeMap<String, u64>,
) -> Result<(), String> {
    let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
    for line in lines {
        *seen.entry(line.as_str()).or_insert(0) += 1;
    }
    let mut problems = Vec::new();
    let mut wanted = 0u64;
    for (word, total) in expected {
        for n in 1..=*total {
            wanted += 1;
            let line = format!("{word} {n}");
            match seen.remove(line.as_str()) {
                Some(1) => {}
                Some(times) => problems.push(format!("`{line}` {times} times")),
                None => problems.push(format!("`{line}` missing")),
            }
        }
    }
    for (line, times) in seen {
        problems.push(format!("unexpected `{line}` ({times} times)"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        let kinds = |end: &str| problems.iter().filter(|p| p.ends_with(end)).count();
        let (missing, repeated) = (kinds("missing"), kinds(" times"));
        let unexpected = problems
            .iter()
            .filter(|p| p.starts_with("unexpected"))
            .count();
        // The first few of each kind: what is lost and what stands in.
        let mut shown: Vec<&String> = problems
            .iter()
            .filter(|p| p.ends_with("missing"))
            .take(6)
            .collect();
        shown.extend(problems.iter().filter(|p| !p.ends_with("missing")).take(6));
        Err(format!(
            "{} of {wanted} expected updates wrong ({missing} missing, {repeated} repeated, {unexpected} unexpected), {} lines read: {}",
            problems.len(),
            lines.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// Checks that `lines` are the `word count` updates of a count restored
/// from a consistent snapshot of one that saw `expected` occurrences per
/// word, and ran to the end: for each word, `w k` … `w N` once each for
/// some k (none if the word did not occur after the snapshot), nothing
/// else — a record lost before the snapshot leaves `w N` out, one counted
/// twice shows `w N+1`. Returns how many words resumed midway (k > 1).
pub fn check_updates_after_snapshot(
    lines: &[String],
    expected: &BTreeMap<String, u64>,
) -> Result<usize, String> {
    let mut seen: BTreeMap<&str, BTreeMap<u64, u64>> = BTreeMap::new();
    let mut problems = Vec::new();
    for line in lines {
        match line
            .rsplit_once(' ')
            .and_then(|(w, n)| Some((w, n.parse::<u64>().ok()?)))
        {
            Some((word, n)) => *seen.entry(word).or_default().entry(n).or_insert(0) += 1,
            None => problems.push(format!("unexpected `{line}`")),
        }
    }
    let mut midway = 0;
    for (word, counts) in &seen {
        let Some(&total) = expected.get(*word) else {
            problems.push(format!("unexpected word `{word}`"));
            continue;
        };
        let first = *counts.keys().next().expect("not empty");
        if first > 1 {
            midway += 1;
        }
        for n in first..=total.max(first) {
            match counts.get(&n) {
                Some(1) => {}
                Some(times) => problems.push(format!("`{word} {n}` {times} times")),
                None => problems.push(format!("`{word} {n}` missing")),
            }
        }
        if let Some((&beyond, _)) = counts.range(total + 1..).next() {
            problems.push(format!("`{word} {beyond}` beyond its {total} occurrences"));
        }
    }
    if problems.is_empty() {
        Ok(midway)
    } else {
        let shown: Vec<_> = problems.iter().take(10).cloned().collect();
        Err(format!(
            "{} updates wrong of {} lines read: {}",
            problems.len(),
            lines.len(),
            shown.join(", ")
        ))
    }
}
