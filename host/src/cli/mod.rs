//! The command line: clap definitions ([`Cli`]) and the commands behind them.
//! Parsing validates flags; the commands build the run configuration (which
//! may do I/O) and call the embedded runner.
//!
//! What a command prints on stdout goes through [`outln!`]: a reader that
//! closed it (`weir list | head -1`) ends the command quietly
//! ([`StdoutClosed`]), where `println!` would panic.

/// `println!` that returns `Err(StdoutClosed)` when stdout's reader is
/// gone instead of panicking; use with `?`.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_line(format_args!($($arg)*))
    };
}

mod metrics;
mod progress;
mod remote;
mod savepoint;
mod serve;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::job::JobGraph;
use crate::plugin::PluginEngine;
use crate::runner;
use crate::types::Location;

#[derive(Debug, Parser)]
#[command(
    name = "weir",
    version,
    about = "Stream processing with WebAssembly component operators"
)]
pub struct Cli {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log lines as text for people, or as one JSON object per line (with
    /// the job, operator, subtask and checkpoint spans) for machines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Where compiled plugins are cached (default: ~/.cache/weir; WEIR_CACHE_DIR).
    #[arg(long, global = true)]
    pub cache_dir: Option<PathBuf>,
    /// A running host (`weir serve`) to talk to, e.g. http://127.0.0.1:8081.
    #[arg(long, global = true, env = "WEIR_HOST", value_name = "URL")]
    pub host: Option<String>,
    /// The bearer token: `weir serve` requires it of clients, clients send it.
    #[arg(long, global = true, env = "WEIR_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// How `--log-format` writes log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a job embedded, in this process, until its sources end or Ctrl-C.
    Run(RunArgs),
    /// Work with plugin files.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Inspect or dispose of savepoints (`inspect PATH`, `--dispose PATH`),
    /// or take one of a job on a running host (`JOB_ID [TARGET_DIR]`).
    Savepoint(savepoint::SavepointArgs),
    /// Run the host: HTTP control API, plugin store, many jobs, upgrades.
    Serve(serve::ServeArgs),
    /// List the jobs of a running host.
    List {
        #[arg(long)]
        json: bool,
    },
    /// List the hosts of a running host's cluster (id, API, version, jobs,
    /// the coordinator); a host on its own lists itself.
    Hosts {
        #[arg(long)]
        json: bool,
    },
    /// Show a job of a running host: operators, checkpoints, restarts,
    /// savepoints, upgrades, status history.
    Job {
        job_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job of a running host.
    Cancel {
        job_id: String,
        /// Return once the host accepted it.
        #[arg(long)]
        detach: bool,
    },
    /// Stop a job of a running host with a savepoint.
    Stop {
        job_id: String,
        /// Where the savepoint goes (default: the host's savepoints dir).
        #[arg(long, value_name = "DIR")]
        savepoint_path: Option<PathBuf>,
        /// Advance the watermark to the end first (every timer fires).
        #[arg(long)]
        drain: bool,
        /// Return once the host accepted it.
        #[arg(long)]
        detach: bool,
    },
    /// Hot-upgrade a job of a running host: check, savepoint, swap,
    /// restore, probation; rolled back automatically if it fails.
    Upgrade(remote::UpgradeArgs),
    /// Rescale operators of a job of a running host (an upgrade that
    /// changes only parallelism): savepoint, restart at the new
    /// parallelism, probation; in a cluster, only the stages named stop.
    Rescale {
        job_id: String,
        /// UID=N: the operator's (in a cluster: its stage's) parallelism.
        #[arg(long = "parallelism", value_name = "UID=N", required = true)]
        parallelism: Vec<String>,
        /// Longest probation (e.g. 60s).
        #[arg(long, value_name = "DURATION")]
        probation: Option<String>,
        /// Return once the rescale is accepted.
        #[arg(long)]
        detach: bool,
    },
    /// Fork a job of a running host: a savepoint of it (it runs on) starts
    /// a second job with the changes given, writing to its own sinks.
    Fork(remote::ForkArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The job file (TOML).
    pub job: PathBuf,
    /// No progress line, only the summary.
    #[arg(short, long)]
    pub quiet: bool,
    /// Restore from a retained checkpoint or a savepoint: its directory
    /// (`chk-N`) or its `_metadata` file.
    #[arg(short = 's', long = "from-savepoint", value_name = "PATH")]
    pub from_savepoint: Option<Location>,
    /// Start even if the restore point holds state for uids (or state names)
    /// the job no longer has; that state is skipped (and logged).
    #[arg(short = 'n', long)]
    pub allow_non_restored_state: bool,
    /// On Ctrl-C or SIGTERM, stop with a savepoint written under DIR
    /// (`DIR/savepoint-<job>-<random>/`) instead of cancelling; its path is
    /// printed. A second Ctrl-C aborts.
    #[arg(long, value_name = "DIR")]
    pub savepoint_dir: Option<Location>,
    /// With --savepoint-dir: first advance the watermark to the end, so
    /// every event-time timer fires before the savepoint (`stop --drain`).
    #[arg(long, requires = "savepoint_dir")]
    pub drain: bool,
    /// Serve the job's metrics (Prometheus text format) at
    /// http://ADDR:PORT/metrics while it runs.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Deploy plugin files to a running host's store (validated and
    /// precompiled on arrival).
    Add {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// List a running host's plugins (name, version, digest, size, states,
    /// compile time, jobs using them).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove NAME@VERSION from a running host's store (refused while a job
    /// uses it).
    Remove { reference: String },
    /// Validate a plugin file and print what it declares (name, version, states).
    Inspect {
        /// The component file (*.wasm).
        file: PathBuf,
    },
    /// Write bindings of the weir:operator WIT package for a guest language
    /// without its own generator (C: `<world>.h`, `<world>.c`,
    /// `<world>_component_type.o`).
    Bindings {
        /// The language (`c`).
        #[arg(value_parser = ["c"])]
        language: String,
        /// The directory to write them to.
        dir: PathBuf,
        /// The world (`operator-plugin`, or `migrating-operator-plugin` for
        /// a plugin that exports schema migration).
        #[arg(long, default_value = crate::plugin::tooling::DEFAULT_WORLD)]
        world: String,
    },
    /// Make a plugin (a component) of a core Wasm module that implements a
    /// world of the weir:operator package (built by clang, zig, ...).
    Componentize {
        /// The core module (*.wasm).
        module: PathBuf,
        /// The component to write.
        #[arg(short, long)]
        output: PathBuf,
        /// The world the module implements (embedded unless the module
        /// carries its type information).
        #[arg(long, default_value = crate::plugin::tooling::DEFAULT_WORLD)]
        world: String,
    },
}

impl Cli {
    /// The log filter the verbosity asks for (RUST_LOG overrides it).
    pub fn log_filter(&self) -> &'static str {
        match self.verbose {
            0 => "warn",
            1 => "info",
            _ => "debug",
        }
    }

    pub fn engine(&self) -> Result<PluginEngine> {
        let cache = self
            .cache_dir
            .clone()
            .or_else(PluginEngine::default_cache_dir);
        PluginEngine::new(cache).context("starting the WebAssembly engine")
    }

    /// The token from `--token-file`, if given.
    fn token(&self) -> Result<Option<String>> {
        self.token_file
            .as_deref()
            .map(crate::control::HostSettings::read_token)
            .transpose()
            .map_err(Into::into)
    }

    /// A client of the running host named by `--host` or `WEIR_HOST`.
    fn client(&self) -> Result<remote::Client> {
        let Some(host) = &self.host else {
            anyhow::bail!(
                "this command talks to a running host: give --host URL (or set WEIR_HOST), e.g. --host http://127.0.0.1:8081"
            );
        };
        remote::Client::new(host, self.token()?)
    }
}

/// Stdout's reader is gone (a closed pipe): the command stops writing and
/// ends quietly, as a success (`main` checks for it).
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed by its reader")]
pub struct StdoutClosed;

/// Writes one line to stdout (see [`outln!`]).
pub(crate) fn write_line(line: std::fmt::Arguments<'_>) -> Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        other => other.context("cannot write to stdout"),
    }
}

/// Runs the parsed command.
pub async fn execute(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Run(args) if cli.host.is_some() => {
            if args.savepoint_dir.is_some() {
                anyhow::bail!(
                    "--savepoint-dir is for embedded runs; on a host, stop the job with `weir stop JOB_ID --savepoint-path DIR`"
                );
            }
            remote::submit(
                &cli.client()?,
                &args.job,
                args.from_savepoint.as_ref(),
                args.allow_non_restored_state,
            )
            .await
        }
        Command::Run(args) => run(&cli, args).await,
        Command::Serve(args) => serve::execute(&cli, args).await,
        Command::List { json } => remote::list(&cli.client()?, *json).await,
        Command::Hosts { json } => remote::hosts(&cli.client()?, *json).await,
        Command::Job { job_id, json } => remote::show(&cli.client()?, job_id, *json).await,
        Command::Cancel { job_id, detach } => remote::cancel(&cli.client()?, job_id, *detach).await,
        Command::Stop {
            job_id,
            savepoint_path,
            drain,
            detach,
        } => {
            remote::savepoint(
                &cli.client()?,
                job_id,
                savepoint_path.as_deref(),
                Some(*drain),
                *detach,
            )
            .await
        }
        Command::Upgrade(args) => remote::upgrade(&cli.client()?, args).await,
        Command::Rescale {
            job_id,
            parallelism,
            probation,
            detach,
        } => {
            let args = remote::UpgradeArgs {
                job_id: job_id.clone(),
                plugins: Vec::new(),
                parallelism: parallelism.clone(),
                job_file: None,
                allow_non_restored_state: false,
                probation: probation.clone(),
                probation_checkpoints: None,
                detach: *detach,
            };
            remote::upgrade(&cli.client()?, &args).await
        }
        Command::Fork(args) => remote::fork(&cli.client()?, args).await,
        Command::Plugin(PluginCommand::Add { files }) => {
            remote::plugin_add(&cli.client()?, files).await
        }
        Command::Plugin(PluginCommand::List { json }) => {
            remote::plugin_list(&cli.client()?, *json).await
        }
        Command::Plugin(PluginCommand::Remove { reference }) => {
            remote::plugin_remove(&cli.client()?, reference).await
        }
        Command::Plugin(PluginCommand::Inspect { file }) => inspect(&cli, file),
        Command::Plugin(PluginCommand::Bindings { dir, world, .. }) => {
            for file in crate::plugin::tooling::bindings_c(world, dir)? {
                eprintln!("wrote {}", file.display());
            }
            Ok(())
        }
        Command::Plugin(PluginCommand::Componentize {
            module,
            output,
            world,
        }) => {
            let bytes = std::fs::read(module)
                .with_context(|| format!("cannot read {}", module.display()))?;
            let component = crate::plugin::tooling::componentize(module, &bytes, world)?;
            std::fs::write(output, &component)
                .with_context(|| format!("cannot write {}", output.display()))?;
            eprintln!(
                "wrote {} ({} bytes, world {world})",
                output.display(),
                component.len()
            );
            Ok(())
        }
        Command::Savepoint(args) => match &args.job_id {
            Some(job_id) if args.command.is_none() && args.dispose.is_none() => {
                remote::savepoint(
                    &cli.client()?,
                    job_id,
                    args.target_dir.as_deref(),
                    None,
                    args.detach,
                )
                .await
            }
            _ => savepoint::execute(&cli, args),
        },
    }
}

/// Resolves at the first Ctrl-C or SIGTERM.
pub(crate) async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// The running attempt, as the signal handler reaches it.
#[derive(Default)]
struct Attempt {
    cancel: Option<tokio::sync::watch::Sender<bool>>,
    savepointer: Option<crate::checkpoint::coordinator::Savepointer>,
}

async fn run(cli: &Cli, args: &RunArgs) -> Result<()> {
    let started = Instant::now();
    let graph = JobGraph::load(&args.job)?;
    let engine = cli.engine()?;
    let options = runner::RunOptions {
        restore: args.from_savepoint.clone(),
        allow_non_restored_state: args.allow_non_restored_state,
        ..Default::default()
    };
    let job = runner::prepare_with(&engine, graph, &options)?;
    runner::check_connectors(&job).await?;
    let exposed: Arc<Mutex<metrics::Exposed>> = Arc::new(Mutex::new(metrics::Exposed::new(&job)));
    if let Some(address) = &args.metrics {
        let url = metrics::serve(address, exposed.clone()).await?;
        eprintln!("metrics at {url}");
    }
    eprintln!("job `{}` started, job id {}", job.graph.name, job.job_id);
    // Ctrl-C or SIGTERM stops the running attempt: with a savepoint when
    // asked for one, else by cancelling it (and any attempt after it).
    let stop_requested = Arc::new(AtomicBool::new(false));
    let attempt: Arc<Mutex<Attempt>> = Arc::default();
    let savepoint_failed: Arc<Mutex<Option<String>>> = Arc::default();
    {
        let (requested, attempt) = (stop_requested.clone(), attempt.clone());
        let target = args.savepoint_dir.clone();
        let drain = args.drain;
        let failed = savepoint_failed.clone();
        tokio::spawn(async move {
            stop_signal().await;
            requested.store(true, Ordering::SeqCst);
            let (cancel, savepointer) = {
                let attempt = attempt.lock().expect("not poisoned");
                (attempt.cancel.clone(), attempt.savepointer.clone())
            };
            match (&target, savepointer) {
                (Some(target), Some(savepointer)) => {
                    eprintln!(
                        "\nstopping with a savepoint in {}{} (Ctrl-C again to abort)",
                        target,
                        if drain { ", draining first" } else { "" }
                    );
                    let target = target.clone();
                    tokio::spawn(async move {
                        if let Err(error) = savepointer.savepoint(target, Some(drain)).await {
                            eprintln!("weir: the savepoint failed: {error}; cancelling the job");
                            *failed.lock().expect("not poisoned") = Some(error);
                            if let Some(cancel) = cancel {
                                let _ = cancel.send(true);
                            }
                        }
                    });
                }
                _ => {
                    eprintln!(
                        "\nstopping: sources end, in-flight records drain (Ctrl-C again to abort)"
                    );
                    if let Some(cancel) = cancel {
                        let _ = cancel.send(true);
                    }
                }
            }
            stop_signal().await;
            std::process::exit(130);
        });
    }
    let show_progress = !args.quiet && std::io::stderr().is_terminal();
    let progress = show_progress.then(|| progress::Progress::start(job.restore_progress.clone()));
    let mut metrics = Vec::new();
    let result = runner::run(&job, &mut |running| {
        let cancel = running.canceller();
        if stop_requested.load(Ordering::SeqCst) {
            // A restart after the stop was asked for: just end.
            let _ = cancel.send(true);
        }
        *attempt.lock().expect("not poisoned") = Attempt {
            cancel: Some(cancel),
            savepointer: Some(running.savepointer()),
        };
        metrics = running.metrics().to_vec();
        exposed.lock().expect("not poisoned").attach(running);
        if let Some(progress) = &progress {
            progress.attach(running);
        }
    })
    .await;
    if let Some(progress) = progress {
        progress.stop();
    }
    let outcome = result?;
    if outcome.cancelled
        && outcome.savepoint.is_none()
        && job.graph.checkpoint.on_cancel == crate::job::OnCancel::Delete
    {
        let dir = runner::checkpoint_root(&job.graph).join(&job.job_id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| {
                format!(
                    "[checkpoint] on_cancel = \"delete\": cannot delete {}",
                    dir.display()
                )
            })?;
            eprintln!("  checkpoints deleted ([checkpoint] on_cancel = \"delete\")");
        }
        if let Some(url) = runner::checkpoint_remote(&job.graph) {
            let remote = crate::checkpoint::remote::Remote::open(url)?.join(&job.job_id);
            crate::checkpoint::remote::block_on(remote.delete_all("")).with_context(|| {
                format!(
                    "[checkpoint] on_cancel = \"delete\": cannot delete {}",
                    remote.url
                )
            })?;
            eprintln!(
                "  checkpoints deleted from {} ([checkpoint] on_cancel = \"delete\")",
                remote.url
            );
        }
    }
    progress::print_summary(&job, &metrics, &outcome, started.elapsed());
    if let Some(path) = &outcome.savepoint {
        eprintln!("  savepoint: {path}");
        outln!("{path}")?;
    } else if let Some(error) = savepoint_failed.lock().expect("not poisoned").take() {
        anyhow::bail!("stop-with-savepoint failed: {error}");
    }
    Ok(())
}

fn inspect(cli: &Cli, file: &std::path::Path) -> Result<()> {
    let engine = cli.engine()?;
    let plugin = engine.load(file)?;
    let info = &plugin.info;
    outln!("plugin    {} {}", info.name, info.version)?;
    outln!("file      {}", file.display())?;
    outln!("sha256    {}", plugin.digest)?;
    outln!(
        "input     {}",
        if info.batch_input {
            "batch (process-batch)"
        } else {
            "per record (process)"
        }
    )?;
    if info.states.is_empty() {
        outln!("states    none")?;
    }
    for state in &info.states {
        let ttl = state
            .ttl
            .as_ref()
            .map(|t| format!(", TTL {t}"))
            .unwrap_or_default();
        outln!(
            "state     {} ({} state, schema version {}{ttl})",
            state.name,
            state.kind,
            state.schema_version
        )?;
    }
    outln!(
        "compiled  {:.1} ms{}",
        plugin.load_time.as_secs_f64() * 1000.0,
        if plugin.from_cache {
            " (from cache)"
        } else {
            ""
        }
    )?;
    Ok(())
}
