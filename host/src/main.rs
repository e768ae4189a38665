//! The `weir` binary: parses the command line, installs logging, and runs
//! the command on a multi-threaded tokio runtime. Errors are printed with
//! their causes; the exit code is 1 (0, quietly, when stdout's reader
//! closed it).

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = weir::cli::Cli::parse();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(cli.log_filter()));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        weir::cli::LogFormat::Text => logs.init(),
        weir::cli::LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the tokio runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(weir::cli::execute(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // `weir list | head -1`: the reader has all it wanted.
        Err(error) if error.chain().any(|e| e.is::<weir::cli::StdoutClosed>()) => {
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
