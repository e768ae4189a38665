//! Starting the real servers the connector tests need: install one with its
//! script (exit code 3: it cannot be installed, which skips the tests
//! loudly outside CI and fails them under CI), start it for the life of the
//! test process (the parent-death signal, armed from a thread that never
//! ends) on loopback, and wait until it listens.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::workspace;

/// Runs `scripts/<script>`, which prints the server binary's path; None
/// (after a loud message) when it cannot be installed outside CI.
pub fn install(script: &str, what: &str) -> Option<PathBuf> {
    let script = workspace().join("scripts").join(script);
    let output = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.code() == Some(3) && std::env::var_os("CI").is_none() {
        eprintln!(
            "\n!!!!!!!!\n!!! SKIPPING the {what} tests: it could not be installed.\n!!! {}\n!!!!!!!!\n",
            log.trim()
        );
        return None;
    }
    assert!(output.status.success(), "installing {what} failed:\n{log}");
    Some(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Starts `binary args` with its output in `log`; it is killed when the
/// test process ends. Its process id (a test may kill it sooner).
pub fn spawn_for_life(binary: PathBuf, args: Vec<String>, log: PathBuf) -> u32 {
    // The parent-death signal fires when the spawning *thread* ends, so a
    // thread that never ends spawns the server.
    let (started, spawned) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("test-server".into())
        .spawn(move || {
            let mut command = Command::new(&binary);
            command.args(&args).stdin(Stdio::null());
            match std::fs::File::create(&log).and_then(|f| Ok((f.try_clone()?, f))) {
                Ok((out, err)) => command.stdout(out).stderr(err),
                Err(_) => command.stdout(Stdio::null()).stderr(Stdio::null()),
            };
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
            let _ = started.send(child.map(|c| c.id()));
            if !failed {
                loop {
                    std::thread::park();
                }
            }
        })
        .expect("a thread for the server");
    spawned
        .recv()
        .expect("the spawning thread answers")
        .unwrap_or_else(|e| panic!("the server does not start: {e}"))
}

/// Waits until something listens on `port` (at most `limit`).
pub fn wait_listening(port: u16, what: &str, limit: Duration) {
    let since = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            since.elapsed() < limit,
            "{what} did not listen on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh directory for a server's data under `target/test-servers/`
/// (`<name>-<pid of this test process>`). The directories of test
/// processes that are gone are deleted first: a run's servers stop with
/// it, their data is of no use after it, and runs add up to gigabytes.
pub fn data_dir(name: &str) -> PathBuf {
    let servers = workspace().join("target").join("test-servers");
    for entry in std::fs::read_dir(&servers).into_iter().flatten().flatten() {
        let file_name = entry.file_name();
        let pid = file_name
            .to_str()
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = servers.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a server data dir");
    dir
}
