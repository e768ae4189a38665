//! The command line: clap definitions ([`Cli`]) and the commands behind them.
//! Parsing validates flags; the commands build the run configuration (which
//! may do I/O) and call the embedded runner.

mod progress;
mod savepoint;

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
    /// Where compiled plugins are cached (default: ~/.cache/weir; WEIR_CACHE_DIR).
    #[arg(long, global = true)]
    pub cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a job embedded, in this process, until its sources end or Ctrl-C.
    Run(RunArgs),
    /// Work with plugin files.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Inspect or dispose of savepoints (`inspect PATH`, `--dispose PATH`).
    Savepoint(savepoint::SavepointArgs),
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
    pub from_savepoint: Option<PathBuf>,
    /// Start even if the restore point holds state for uids (or state names)
    /// the job no longer has; that state is skipped (and logged).
    #[arg(short = 'n', long)]
    pub allow_non_restored_state: bool,
    /// On Ctrl-C or SIGTERM, stop with a savepoint written under DIR
    /// (`DIR/savepoint-<job>-<random>/`) instead of cancelling; its path is
    /// printed. A second Ctrl-C aborts.
    #[arg(long, value_name = "DIR")]
    pub savepoint_dir: Option<PathBuf>,
    /// With --savepoint-dir: first advance the watermark to the end, so
    /// every event-time timer fires before the savepoint (`stop --drain`).
    #[arg(long, requires = "savepoint_dir")]
    pub drain: bool,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
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
}

/// Runs the parsed command.
pub async fn execute(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Run(args) => run(&cli, args).await,
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
        Command::Savepoint(args) => savepoint::execute(args),
    }
}

/// Resolves at the first Ctrl-C or SIGTERM.
async fn stop_signal() {
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
    savepointer: Option<runner::Savepointer>,
}

async fn run(cli: &Cli, args: &RunArgs) -> Result<()> {
    let started = Instant::now();
    let graph = JobGraph::load(&args.job)?;
    let engine = cli.engine()?;
    let options = runner::RunOptions {
        restore: args.from_savepoint.clone(),
        allow_non_restored_state: args.allow_non_restored_state,
    };
    let job = runner::prepare_with(&engine, graph, &options)?;
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
                        target.display(),
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
        if let Some(progress) = &progress {
            progress.attach(running);
        }
    })
    .await;
    if let Some(progress) = progress {
        progress.stop();
    }
    let outcome = result?;
    progress::print_summary(&job, &metrics, &outcome, started.elapsed());
    if let Some(path) = &outcome.savepoint {
        eprintln!("  savepoint: {}", path.display());
        println!("{}", path.display());
    } else if let Some(error) = savepoint_failed.lock().expect("not poisoned").take() {
        anyhow::bail!("stop-with-savepoint failed: {error}");
    }
    Ok(())
}

fn inspect(cli: &Cli, file: &std::path::Path) -> Result<()> {
    let engine = cli.engine()?;
    let plugin = engine.load(file)?;
    let info = &plugin.info;
    println!("plugin    {} {}", info.name, info.version);
    println!("file      {}", file.display());
    println!("sha256    {}", plugin.digest);
    println!(
        "input     {}",
        if info.batch_input {
            "batch (process-batch)"
        } else {
            "per record (process)"
        }
    );
    if info.states.is_empty() {
        println!("states    none");
    }
    for state in &info.states {
        println!(
            "state     {} ({} state, schema version {})",
            state.name, state.kind, state.schema_version
        );
    }
    println!(
        "compiled  {:.1} ms{}",
        plugin.load_time.as_secs_f64() * 1000.0,
        if plugin.from_cache {
            " (from cache)"
        } else {
            ""
        }
    );
    Ok(())
}
