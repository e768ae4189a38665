//! A real browser for the dashboard test: Debian's Chromium driven by its
//! ChromeDriver on a free loopback port, installed by
//! `scripts/browser.sh` when missing. Under CI (`CI` set) a browser that
//! cannot be installed fails the test; elsewhere it is skipped loudly.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::workspace;

/// A running ChromeDriver in a process group of its own; the group (the
/// driver and the Chromium it started, even for a session a failed test
/// never closed) is killed when dropped.
#[derive(Debug)]
pub struct ChromeDriver {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The arguments Chromium runs headless with on this kind of machine
/// (root, no GPU, no network beyond loopback).
pub const CHROMIUM_ARGS: [&str; 9] = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1600",
];

/// Installs the browser if needed and starts ChromeDriver (it listens on
/// loopback only by default); None (after a
/// loud message) when it cannot be installed outside CI.
pub fn chromedriver() -> Option<ChromeDriver> {
    let script = workspace().join("scripts").join("browser.sh");
    let output = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.code() == Some(3) && std::env::var_os("CI").is_none() {
        eprintln!(
            "\n!!!!!!!!\n!!! SKIPPING the dashboard test: chromium and chromium-driver could not be installed.\n!!! {}\n!!!!!!!!\n",
            log.trim()
        );
        return None;
    }
    assert!(
        output.status.success(),
        "installing the browser failed:\n{log}"
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new("chromedriver")
        .process_group(0)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = ChromeDriver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "chromedriver did not listen on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(driver)
}
