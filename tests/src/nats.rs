//! A real NATS server with JetStream for the connector tests: nats-server
//! 2.15.1, installed by `scripts/nats.sh` into `target/tools/nats`, started
//! once per test binary on a free loopback port (`servers`).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::servers;

/// A running server.
#[derive(Debug)]
pub struct NatsServer {
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    /// Its JetStream storage and log.
    pub dir: PathBuf,
}

/// The server, started on first use; None (after a loud message) when it
/// cannot be installed outside CI.
pub fn server() -> Option<&'static NatsServer> {
    static SERVER: OnceLock<Option<NatsServer>> = OnceLock::new();
    SERVER.get_or_init(|| start("nats", &[])).as_ref()
}

/// The user and password [`secured`] accepts.
pub const USER: (&str, &str) = ("weir", "s3cret");

/// A second server that accepts only [`USER`] (for the credential checks).
pub fn secured() -> Option<&'static NatsServer> {
    static SERVER: OnceLock<Option<NatsServer>> = OnceLock::new();
    SERVER
        .get_or_init(|| start("nats-secured", &["--user", USER.0, "--pass", USER.1]))
        .as_ref()
}

fn start(name: &str, extra: &[&str]) -> Option<NatsServer> {
    let binary = servers::install("nats.sh", "NATS (nats-server)")?;
    let port = servers::free_port();
    let dir = servers::data_dir(name);
    let mut args: Vec<String> = ["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.push(dir.join("store").to_string_lossy().into_owned());
    args.extend(extra.iter().map(|a| a.to_string()));
    servers::spawn_for_life(binary, args, dir.join("server.log"));
    servers::wait_listening(port, "nats-server", Duration::from_secs(20));
    Some(NatsServer {
        url: format!("nats://127.0.0.1:{port}"),
        dir,
    })
}
