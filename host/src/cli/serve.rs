//! `weir serve`: builds the host's settings from the config file and the
//! flags (flags win), starts it, prints where it listens, and on SIGTERM or
//! Ctrl-C stops every running job (with a savepoint unless configured to
//! cancel) before exiting.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;

use super::Cli;
use crate::control::{ConfigFile, HostSettings, RunningHost, ShutdownMode};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// A TOML config file (listen, data_dir, token_file, watch, on_shutdown,
    /// max_plugin_size, probation, probation_checkpoints, `[jobs]`: roots,
    /// allow_wasi_env, `[limits]`: value_bytes, state_bytes, `[cluster]`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the API listens (default 127.0.0.1:8081; port 0 picks a free one).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Holds the plugin store, the jobs, checkpoints and savepoints
    /// (default: weir-data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Another watched plugin directory instead of <data dir>/plugins/incoming.
    #[arg(long, value_name = "DIR")]
    pub watch: Option<PathBuf>,
    /// A directory jobs may name paths in (file sources and sinks,
    /// savepoints); repeat for several. Replaces `[jobs] roots` of the
    /// config (default: the data dir).
    #[arg(long = "root", value_name = "DIR")]
    pub roots: Vec<PathBuf>,
    /// What running jobs do on SIGTERM: stop with a savepoint (resumed at
    /// the next start) or cancel (resumed from their newest checkpoint).
    #[arg(long, value_parser = ["savepoint", "cancel"])]
    pub on_shutdown: Option<String>,
    /// Join a cluster of hosts through this NATS server (`nats://host:port`);
    /// repeat for several. Replaces `[cluster] nats` of the config.
    #[arg(long = "cluster", value_name = "URL")]
    pub cluster: Vec<String>,
    /// The cluster's name, its JetStream buckets' prefix (default `weir`,
    /// or `[cluster] name`).
    #[arg(long, value_name = "NAME")]
    pub cluster_name: Option<String>,
}

pub async fn execute(cli: &Cli, args: &ServeArgs) -> Result<()> {
    let config = match &args.config {
        Some(file) => ConfigFile::load(file)?,
        None => ConfigFile::default(),
    };
    let data_dir = args
        .data_dir
        .clone()
        .or(config.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from("weir-data"));
    let mut settings = HostSettings::new(data_dir);
    if let Some(listen) = args.listen.or(config.listen) {
        settings.listen = listen;
    }
    let token_file = cli.token_file.clone().or(config.token_file.clone());
    settings.token = token_file
        .as_deref()
        .map(HostSettings::read_token)
        .transpose()?;
    settings.watch = args.watch.clone().or(config.watch.clone());
    settings.on_shutdown = match args.on_shutdown.as_deref() {
        Some("cancel") => ShutdownMode::Cancel,
        Some(_) => ShutdownMode::Savepoint,
        None => config.on_shutdown,
    };
    if let Some(size) = config.max_plugin_size {
        settings.max_plugin_bytes = size.0;
    }
    if let Some(probation) = config.probation {
        settings.probation = probation;
    }
    if let Some(checkpoints) = config.probation_checkpoints {
        settings.probation_checkpoints = checkpoints;
    }
    settings.roots = if args.roots.is_empty() {
        config.jobs.roots.clone()
    } else {
        Some(args.roots.clone())
    };
    settings.allow_wasi_env = config.jobs.allow_wasi_env;
    settings.state_limits = crate::state::quota::StateLimits {
        value_bytes: config.limits.value_bytes.map(|b| b.0),
        state_bytes: config.limits.state_bytes.map(|b| b.0),
    };
    settings.cluster = match &config.cluster {
        Some(cluster) => Some(cluster.settings(&args.cluster, args.cluster_name.as_deref())),
        None if !args.cluster.is_empty() => Some(
            crate::control::ClusterConfig::default()
                .settings(&args.cluster, args.cluster_name.as_deref()),
        ),
        None if args.cluster_name.is_some() => {
            anyhow::bail!("--cluster-name needs --cluster URL (or `[cluster] nats` in the config)")
        }
        None => None,
    };
    let host = RunningHost::start(settings).await?;
    if let Some(cluster) = &host.cluster {
        eprintln!(
            "weir serve: host `{}` of cluster `{}`{}",
            cluster.id(),
            cluster.name(),
            if cluster.is_coordinator() {
                " (the coordinator)"
            } else {
                ""
            }
        );
    }
    eprintln!(
        "weir serve: listening on http://{} (data dir {}{})",
        host.address,
        host.context.data.path().display(),
        if host.context.settings.token.is_some() {
            ", bearer token required"
        } else {
            ""
        }
    );
    // A closed stdout does not stop the host.
    let _ = writeln!(std::io::stdout(), "listening on http://{}", host.address);
    let _ = std::io::stdout().flush();
    super::stop_signal().await;
    eprintln!(
        "weir serve: shutting down ({})",
        match host.context.settings.on_shutdown {
            ShutdownMode::Savepoint => "stopping every running job with a savepoint",
            ShutdownMode::Cancel => "cancelling every running job",
        }
    );
    host.shutdown().await;
    Ok(())
}
