//! The control API fuzzed from its own OpenAPI document: schemathesis
//! (installed by `scripts/schemathesis.sh`) reads `/api/openapi.json` from a
//! live `weir serve` and runs every check it has (`--checks all`: no 5xx,
//! statuses, content types and bodies as documented, well-formed requests
//! accepted, malformed ones refused, 405s with `Allow`, the token required
//! where the document says so). The test then reads every exchange from
//! schemathesis' HAR report and asserts that none was a 5xx and that every
//! 4xx said why in an `error` message, and that the host still answers.
//!
//! The host is a throwaway one (its own data dir, no plugins in its store)
//! and stays so: without a stored plugin no job file the fuzzer makes can
//! run, every job id is unknown, so no savepoint is written anywhere; the
//! test checks afterwards that no job and no plugin was created.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::host::Host;
use crate::support::{JobDir, http_raw};

/// Test cases per operation and phase: ~2,000 requests in all, well under
/// a minute against a debug build on 2 cores.
const MAX_EXAMPLES: &str = "50";

/// What the document cannot state: a job file's TOML and a component's
/// bytes are checked beyond any schema (the answer names what is wrong),
/// so a schema-valid request to these two may be refused with a 400.
const CONFIG: &str = r#"
[[operations]]
include-method = "POST"
include-path = "/api/jobs"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404", "409"]

[[operations]]
include-method = "POST"
include-path = "/api/plugins"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "409", "413"]
"#;

#[test]
fn fuzzed_requests_get_documented_answers_without_a_token() {
    fuzz(None);
}

#[test]
fn fuzzed_requests_get_documented_answers_with_a_token() {
    fuzz(Some("s3cret"));
}

fn fuzz(token: Option<&str>) {
    let Some(schemathesis) =
        weir_tests::servers::install("schemathesis.sh", "schemathesis (API fuzzing)")
    else {
        return;
    };
    let dir = JobDir::new();
    let token_file = token.map(|token| dir.write("token", token));
    let host = Host::start_with(&dir.path().join("data"), &[], token_file.as_deref());
    let work = dir.path().join("schemathesis");
    std::fs::create_dir_all(&work).expect("mkdir");
    let config = dir.write("schemathesis.toml", CONFIG);
    let har = work.join("exchanges.har");

    let mut command = Command::new(&schemathesis);
    command
        .current_dir(&work)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/api/openapi.json", host.url))
        .args(["--checks", "all", "--max-examples", MAX_EXAMPLES])
        .args(["--seed", "1", "--generation-database", "none"])
        .args(["--request-timeout", "30", "--no-color"])
        .args(["--report", "har", "--report-har-path"])
        .arg(&har);
    if let Some(token) = token {
        command.args(["--header", &format!("Authorization: Bearer {token}")]);
    }
    let output = command.output().expect("schemathesis runs");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found problems ({}):\n{report}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let exchanges = exchanges(&har);
    assert!(
        exchanges.len() > 500,
        "only {} requests were made:\n{report}",
        exchanges.len()
    );
    let mut problems = Vec::new();
    for (method, url, status, body) in &exchanges {
        if *status >= 500 {
            problems.push(format!("{method} {url}: {status} {body}"));
        } else if *status >= 400 && !says_why(body) {
            problems.push(format!(
                "{method} {url}: {status} without an `error` message: {body:?}"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} answers were wrong:\n{}",
        problems.len(),
        exchanges.len(),
        problems.join("\n")
    );
    let statuses = |status: u16| exchanges.iter().filter(|e| e.2 == status).count();
    assert!(
        statuses(400) > 0 && statuses(404) > 0 && statuses(405) > 0,
        "the fuzzer reached no validation: {report}"
    );
    if token.is_some() {
        assert!(statuses(401) > 0, "the token was never checked: {report}");
    }

    // The host still answers, and the fuzzer left nothing behind.
    for (path, expected) in [
        ("/api/health", None),
        ("/api/jobs", Some("[]")),
        ("/api/plugins", Some("[]")),
    ] {
        let (status, _, body) = http_raw(&host.url, "GET", path, token, &[]);
        assert_eq!(status, 200, "GET {path} after fuzzing: {body}");
        if let Some(expected) = expected {
            assert_eq!(body.trim(), expected, "GET {path} after fuzzing");
        }
    }
}

/// Every (method, url, status, body) schemathesis recorded.
fn exchanges(har: &Path) -> Vec<(String, String, u16, String)> {
    let text = std::fs::read_to_string(har)
        .unwrap_or_else(|e| panic!("reading the HAR report {}: {e}", har.display()));
    let document: Value = serde_json::from_str(&text).expect("the HAR report is JSON");
    document["log"]["entries"]
        .as_array()
        .expect("HAR log.entries")
        .iter()
        .map(|entry| {
            let text = |value: &Value| value.as_str().unwrap_or_default().to_string();
            (
                text(&entry["request"]["method"]),
                text(&entry["request"]["url"]),
                entry["response"]["status"]
                    .as_u64()
                    .and_then(|s| u16::try_from(s).ok())
                    .expect("HAR response.status"),
                text(&entry["response"]["content"]["text"]),
            )
        })
        .collect()
}

/// An error answer's body: JSON with a non-empty `error`.
fn says_why(body: &str) -> bool {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(|e| !e.trim().is_empty()))
        .unwrap_or(false)
}
