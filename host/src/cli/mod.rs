//! The command line: clap definitions ([`Cli`]) and the commands behind them.
//! Parsing validates flags; the commands build the run configuration (which
//! may do I/O) and call the embedded runner.

mod progress;

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
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Validate a plugin file and print what it declares (name, version, states).
    Inspect {
        /// The component file (*.wasm).
        file: PathBuf,
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
    }
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
    // Ctrl-C cancels the running attempt (and any attempt after it).
    let cancel_requested = Arc::new(AtomicBool::new(false));
    let canceller: Arc<Mutex<Option<tokio::sync::watch::Sender<bool>>>> = Arc::default();
    {
        let (requested, canceller) = (cancel_requested.clone(), canceller.clone());
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!(
                    "\nstopping: sources end, in-flight records drain (Ctrl-C again to abort)"
                );
                requested.store(true, Ordering::SeqCst);
                if let Some(cancel) = canceller.lock().expect("not poisoned").as_ref() {
                    let _ = cancel.send(true);
                }
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
    }
    let show_progress = !args.quiet && std::io::stderr().is_terminal();
    let mut progress: Option<progress::Progress> = None;
    let mut metrics = Vec::new();
    let result = runner::run(&job, &mut |running| {
        let cancel = running.canceller();
        if cancel_requested.load(Ordering::SeqCst) {
            let _ = cancel.send(true);
        }
        *canceller.lock().expect("not poisoned") = Some(cancel);
        metrics = running.metrics().to_vec();
        if show_progress {
            if let Some(old) = progress.take() {
                old.stop();
            }
            progress = Some(progress::Progress::start(
                metrics.clone(),
                running.checkpoint_metrics(),
            ));
        }
    })
    .await;
    if let Some(progress) = progress {
        progress.stop();
    }
    let outcome = result?;
    progress::print_summary(&job, &metrics, &outcome, started.elapsed());
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
