//! A real NATS server with JetStream for the connector tests: nats-server
//! 2.15.1, installed by `scripts/nats.sh` into `target/tools/nats`, started
//! once per test binary on a free loopback port with its storage in a
//! temporary directory. It dies with the test process (the parent-death
//! signal, armed from a thread that lives as long as the process). Under CI
//! (`CI` set) a server that cannot be installed fails the test; elsewhere
//! the tests skip loudly.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::workspace;

/// The shared server.
#[derive(Debug)]
pub struct NatsServer {
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    /// Its JetStream storage (under `target/nats-store/`, per process).
    pub store: PathBuf,
}

/// The server, started on first use; None (after a loud message) when it
/// cannot be installed outside CI.
pub fn server() -> Option<&'static NatsServer> {
    static SERVER: OnceLock<Option<NatsServer>> = OnceLock::new();
    SERVER.get_or_init(|| start("open", &[])).as_ref()
}

/// The user and password [`secured`] accepts.
pub const USER: (&str, &str) = ("weir", "s3cret");

/// A second server that accepts only [`USER`] (for the credential checks).
pub fn secured() -> Option<&'static NatsServer> {
    static SERVER: OnceLock<Option<NatsServer>> = OnceLock::new();
    SERVER
        .get_or_init(|| start("secured", &["--user", USER.0, "--pass", USER.1]))
        .as_ref()
}

fn start(name: &str, extra: &[&str]) -> Option<NatsServer> {
    let script = workspace().join("scripts").join("nats.sh");
    let output = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.code() == Some(3) && std::env::var_os("CI").is_none() {
        eprintln!(
            "\n!!!!!!!!\n!!! SKIPPING the NATS tests: nats-server could not be installed.\n!!! {}\n!!!!!!!!\n",
            log.trim()
        );
        return None;
    }
    assert!(
        output.status.success(),
        "installing nats-server failed:\n{log}"
    );
    let binary = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let store = workspace()
        .join("target")
        .join("nats-store")
        .join(format!("{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    std::fs::create_dir_all(&store).expect("nats store dir");
    let mut args = vec![
        "-js".to_string(),
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-sd".into(),
        store.to_string_lossy().into_owned(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    // The parent-death signal fires when the spawning *thread* ends, so a
    // thread that never ends spawns the server.
    let (started, spawned) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("nats-server".into())
        .spawn(move || {
            let mut command = Command::new(&binary);
            command
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // SAFETY: prctl is async-signal-safe; nothing else runs between
            // fork and exec.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = command.spawn();
            let failed = child.is_err();
            let _ = started.send(child.map(|_| ()));
            if !failed {
                loop {
                    std::thread::park();
                }
            }
        })
        .expect("a thread for nats-server");
    spawned
        .recv()
        .expect("the spawning thread answers")
        .unwrap_or_else(|e| panic!("nats-server does not start: {e}"));
    let since = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "nats-server did not listen on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(NatsServer {
        url: format!("nats://127.0.0.1:{port}"),
        store,
    })
}
