//! A real Kafka-protocol broker for the connector tests: noida-db 0.2.3
//! (one binary speaking the Kafka protocol, with idempotent and
//! transactional producers and read_committed), installed by
//! `scripts/kafka.sh` into `target/tools/kafka`, started once per test
//! binary on a free loopback port (`servers`). The outside checks go
//! through a second client, confluent-kafka (librdkafka) from PyPI,
//! installed by the same script and driven by `tests/kafka_client.py`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::{servers, workspace};

/// A running broker.
#[derive(Debug)]
pub struct KafkaServer {
    /// `127.0.0.1:PORT`.
    pub bootstrap: String,
    /// Its data and log.
    pub dir: PathBuf,
}

/// The broker, started on first use; None (after a loud message) when it
/// cannot be installed outside CI.
pub fn server() -> Option<&'static KafkaServer> {
    static SERVER: OnceLock<Option<KafkaServer>> = OnceLock::new();
    SERVER.get_or_init(start).as_ref()
}

fn start() -> Option<KafkaServer> {
    let binary = servers::install("kafka.sh", "Kafka (noida-db)")?;
    let port = servers::free_port();
    let dir = servers::data_dir("kafka");
    let args = server_args(port, &dir);
    servers::spawn_for_life(binary, args, dir.join("server.log"));
    servers::wait_listening(port, "noida-db (kafka)", Duration::from_secs(20));
    Some(KafkaServer {
        bootstrap: format!("127.0.0.1:{port}"),
        dir,
    })
}

/// noida-db's command line (as `scripts/kafka.sh --args` prints it): only
/// its Kafka listener, on `port`, its data in `dir`.
fn server_args(port: u16, dir: &std::path::Path) -> Vec<String> {
    vec![
        "start".into(),
        "--only".into(),
        "kafka".into(),
        "--host".into(),
        "127.0.0.1".into(),
        "--kafka-port".into(),
        port.to_string(),
        "--data-dir".into(),
        dir.join("data").to_string_lossy().into_owned(),
    ]
}

/// Runs `tests/kafka_client.py COMMAND ARGS` with `stdin`; its stdout.
fn client(args: &[&str], stdin: &str) -> String {
    let lib = workspace()
        .join("target")
        .join("tools")
        .join("kafka")
        .join("client");
    let script = workspace().join("tests").join("kafka_client.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .args(args)
        .env("PYTHONPATH", &lib)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let mut input = child.stdin.take().expect("piped");
    let stdin = stdin.to_string();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(stdin.as_bytes());
    });
    let output = child.wait_with_output().expect("the client ends");
    let _ = writer.join();
    assert!(
        output.status.success(),
        "kafka_client.py {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A record as the outside client reads or writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub partition: i32,
    pub key: Option<String>,
    pub value: String,
    pub timestamp: i64,
}

impl KafkaServer {
    /// Creates `topic` with `partitions` partitions (replacing one of
    /// that name).
    pub fn create_topic(&self, topic: &str, partitions: u32) {
        client(
            &["create", &self.bootstrap, topic, &partitions.to_string()],
            "",
        );
    }

    /// Produces `(partition, key, value)` records, plainly (`mode` None),
    /// in a committed (`Some("txn")`) or an aborted (`Some("abort")`)
    /// transaction.
    pub fn produce(&self, topic: &str, records: &[(i32, Option<&str>, &str)], mode: Option<&str>) {
        let mut lines = String::new();
        for (partition, key, value) in records {
            lines.push_str(&json_record(*partition, *key, value));
            lines.push('\n');
        }
        let command = if mode == Some("abort") {
            "abort"
        } else {
            "produce"
        };
        let mut args = vec![command, &self.bootstrap, topic];
        if mode == Some("txn") {
            args.push("txn");
        }
        client(&args, &lines);
    }

    /// `lines` produced round-robin over partitions 0..partitions.
    pub fn produce_lines(&self, topic: &str, partitions: u32, lines: &[String]) {
        let records: Vec<(i32, Option<&str>, &str)> = lines
            .iter()
            .enumerate()
            .map(|(i, line)| ((i as u32 % partitions) as i32, None, line.as_str()))
            .collect();
        self.produce(topic, &records, None);
    }

    /// Every record a read_committed consumer sees in `topic`, read to
    /// each partition's end.
    pub fn read_committed(&self, topic: &str) -> Vec<Record> {
        client(&["read", &self.bootstrap, topic], "")
            .lines()
            .map(parse_record)
            .collect()
    }

    /// The values of [`KafkaServer::read_committed`].
    pub fn read_values(&self, topic: &str) -> Vec<String> {
        self.read_committed(topic)
            .into_iter()
            .map(|r| r.value)
            .collect()
    }
}

fn json_record(partition: i32, key: Option<&str>, value: &str) -> String {
    serde_json::json!({ "partition": partition, "key": key, "value": value }).to_string()
}

/// Parses one line the client printed.
fn parse_record(line: &str) -> Record {
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    Record {
        partition: v["partition"].as_i64().unwrap_or_else(|| panic!("{line}")) as i32,
        key: v["key"].as_str().map(str::to_string),
        value: v["value"]
            .as_str()
            .unwrap_or_else(|| panic!("no value in {line}"))
            .to_string(),
        timestamp: v["timestamp"].as_i64().unwrap_or(-1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_lines_parse() {
        let record = parse_record(
            r#"{"partition": 2, "offset": 7, "key": null, "value": "a \"b\" \u00e9", "timestamp": 1700}"#,
        );
        assert_eq!(
            record,
            Record {
                partition: 2,
                key: None,
                value: "a \"b\" é".into(),
                timestamp: 1700
            }
        );
        let written: serde_json::Value =
            serde_json::from_str(&json_record(1, Some("k"), "v\"")).expect("JSON");
        assert_eq!(written["value"], "v\"");
    }
}
