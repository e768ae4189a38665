//! Upgrades on a running host under adverse conditions: with other work
//! on the machine, at every step of the procedure. The committed output
//! of each job is checked word by word: every word's updates run 1..N,
//! each once, across every upgrade, rollback and restart.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::host::{Host, check_exactly_once, plugin_dir, stderr, wordcount};

/// Processes that keep the machine's cores busy (`yes > /dev/null`), as
/// other work would; killed when dropped.
struct CpuHogs(Vec<Child>);

impl CpuHogs {
    fn start(count: usize) -> Self {
        Self(
            (0..count)
                .map(|_| {
                    Command::new("yes")
                        .stdout(Stdio::null())
                        .spawn()
                        .expect("`yes` starts")
                })
                .collect(),
        )
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        for hog in &mut self.0 {
            let _ = hog.kill();
            let _ = hog.wait();
        }
    }
}

/// Rounds of [`upgrades_under_contention_never_duplicate_or_lose_a_record`].
const CONTENTION_ROUNDS: usize = 10;

/// The scenario in which a rolled-back upgrade once committed a duplicate
/// under load (the failed version's sink took its upstream's failure for
/// the end of its input and committed what its probation held), run
/// round after round beside two CPU hogs: a job is upgraded to a version
/// that traps during its probation (rolled back), then to one that
/// passes, then stopped; its committed output must be exactly once.
#[test]
fn upgrades_under_contention_never_duplicate_or_lose_a_record() {
    let _hogs = CpuHogs::start(2);
    let dir = plugin_dir();
    // Probation passes after four checkpoints: the trapping version traps
    // (on its 1000th record, ~0.7 s of input) well before.
    dir.write("host.toml", "probation_checkpoints = 4\n");
    let config = dir.path().join("host.toml");
    let config = config.to_str().expect("UTF-8 path");
    let host = Host::start(&dir.path().join("data"), &["--config", config]);
    host.ok(
        &["plugin", "add", "split.wasm", "count.wasm", "count-v2.wasm"],
        dir.path(),
    );
    for round in 0..CONTENTION_ROUNDS {
        let name = format!("contended-{round}");
        dir.write(
            "job.toml",
            wordcount(&name, None, 1500, "split", "count@0.1.0", "300ms"),
        );
        let id = host.ok(&["run", "job.toml"], dir.path()).trim().to_string();
        host.wait_status(&id, "running", Duration::from_secs(60));
        host.wait_checkpoints(&id, 1, Duration::from_secs(60));
        let rolled = host.weir(
            &[
                "upgrade",
                &id,
                "--plugin",
                "count=count-v2-trap.wasm",
                "--probation",
                "60s",
            ],
            dir.path(),
        );
        let message = stderr(&rolled);
        assert!(
            !rolled.status.success() && message.contains("rolled back"),
            "round {round}: the trapping version is rolled back: {message}"
        );
        host.wait_status(&id, "running", Duration::from_secs(60));
        host.wait_checkpoints(&id, 1, Duration::from_secs(60));
        host.ok(
            &["upgrade", &id, "--plugin", "count=count@0.2.0"],
            dir.path(),
        );
        host.wait_status(&id, "running", Duration::from_secs(60));
        host.ok(&["stop", &id], dir.path());
        host.wait_status(&id, "stopped", Duration::from_secs(60));
        let counts = check_exactly_once(&dir.path().join(format!("out-{name}")));
        assert!(
            counts.values().sum::<u64>() > 1000,
            "round {round}: the job ran across both upgrades: {counts:?}"
        );
    }
}
