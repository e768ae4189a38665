//! A real NATS server with JetStream for the connector tests: nats-server
//! 2.15.1, installed by `scripts/nats.sh` into `target/tools/nats`, started
//! once per test binary on a free loopback port (`servers`).

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
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
    let _ = servers::spawn_for_life(binary, args, dir.join("server.log"));
    servers::wait_listening(port, "nats-server", Duration::from_secs(20));
    Some(NatsServer {
        url: format!("nats://127.0.0.1:{port}"),
        dir,
    })
}

/// A cluster of three nats-server processes with routes between them
/// (JetStream clustered: streams and buckets may keep 3 replicas), for the
/// tests where a node dies and the cluster keeps quorum.
#[derive(Debug)]
pub struct NatsCluster {
    /// Each node's `nats://127.0.0.1:PORT`.
    pub urls: Vec<String>,
    nodes: Mutex<Vec<Node>>,
    /// Held by a test while it has a node down, so two tests never take
    /// the cluster's quorum together.
    outage: Mutex<()>,
}

#[derive(Debug)]
struct Node {
    binary: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    port: u16,
    pid: Option<u32>,
}

/// The three-node cluster, started on first use (None as [`server`]).
pub fn cluster() -> Option<&'static NatsCluster> {
    static CLUSTER: OnceLock<Option<NatsCluster>> = OnceLock::new();
    CLUSTER.get_or_init(start_cluster).as_ref()
}

fn start_cluster() -> Option<NatsCluster> {
    let binary = servers::install("nats.sh", "NATS (nats-server)")?;
    let dir = servers::data_dir("nats-cluster");
    let ports: Vec<(u16, u16)> = (0..3)
        .map(|_| (servers::free_port(), servers::free_port()))
        .collect();
    let mut nodes = Vec::new();
    for (i, (port, route)) in ports.iter().enumerate() {
        let routes: Vec<String> = ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (_, r))| format!("nats://127.0.0.1:{r}"))
            .collect();
        let args: Vec<String> = vec![
            "-js".into(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-n".into(),
            format!("node-{i}"),
            "-sd".into(),
            dir.join(format!("store-{i}"))
                .to_string_lossy()
                .into_owned(),
            "--cluster_name".into(),
            "weir-tests".into(),
            "--cluster".into(),
            format!("nats://127.0.0.1:{route}"),
            "--routes".into(),
            routes.join(","),
        ];
        nodes.push(Node {
            binary: binary.clone(),
            args,
            log: dir.join(format!("node-{i}.log")),
            port: *port,
            pid: None,
        });
    }
    for node in &mut nodes {
        node.pid = Some(servers::spawn_for_life(
            node.binary.clone(),
            node.args.clone(),
            node.log.clone(),
        ));
    }
    for node in &nodes {
        servers::wait_listening(
            node.port,
            "nats-server (cluster node)",
            Duration::from_secs(20),
        );
    }
    Some(NatsCluster {
        urls: nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect(),
        nodes: Mutex::new(nodes),
        outage: Mutex::new(()),
    })
}

impl NatsCluster {
    /// The right to take a node down: hold it from the kill to the
    /// restart (tests sharing the cluster run in parallel).
    pub fn outage(&self) -> std::sync::MutexGuard<'_, ()> {
        self.outage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// SIGKILLs node `i`.
    pub fn kill(&self, i: usize) {
        let mut nodes = self.nodes.lock().expect("not poisoned");
        if let Some(pid) = nodes[i].pid.take() {
            // SAFETY: a plain kill(2) of a process this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }

    /// Starts node `i` again (its store kept), and waits until it listens.
    pub fn restart(&self, i: usize) {
        let mut nodes = self.nodes.lock().expect("not poisoned");
        let node = &mut nodes[i];
        if node.pid.is_none() {
            node.pid = Some(servers::spawn_for_life(
                node.binary.clone(),
                node.args.clone(),
                node.log.clone(),
            ));
            servers::wait_listening(
                node.port,
                "nats-server (cluster node)",
                Duration::from_secs(20),
            );
        }
    }
}
