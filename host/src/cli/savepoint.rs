//! `weir savepoint`: `inspect PATH [--json]` shows what a savepoint (or a
//! retained checkpoint) holds, read from its `_metadata` alone, without any
//! plugin; `--dispose PATH` deletes a savepoint after checking it is one.
//! `weir savepoint JOB_ID [TARGET_DIR]` belongs to a running host.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::checkpoint::{metadata, remote, savepoint};
use crate::types::Location;

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SavepointArgs {
    #[command(subcommand)]
    pub command: Option<SavepointCommand>,
    /// Delete the savepoint at PATH (its directory or `_metadata`), after
    /// checking it is one.
    #[arg(long, value_name = "PATH")]
    pub dispose: Option<Location>,
    /// Trigger a savepoint of a job on a running host (`--host`).
    pub job_id: Option<String>,
    /// Where the running host writes it.
    pub target_dir: Option<PathBuf>,
    /// With JOB_ID: return once the host accepted it.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum SavepointCommand {
    /// Print the operators, plugins, states (kind, schema version, keys,
    /// bytes) and source positions of a savepoint or checkpoint.
    Inspect {
        /// The savepoint or `chk-N` directory, or its `_metadata` (or an
        /// `s3://` location of one).
        path: Location,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn execute(args: &SavepointArgs) -> Result<()> {
    match (&args.command, &args.dispose, &args.job_id) {
        (Some(SavepointCommand::Inspect { path, json }), _, _) => inspect(path, *json),
        (None, Some(Location::S3(url)), None) => {
            let scratch = tempfile_dir()?;
            let url = remote::block_on(remote::dispose(url, scratch.path()))?;
            eprintln!("disposed of the savepoint {url}");
            Ok(())
        }
        (None, Some(Location::Local(path)), None) => {
            let dir = savepoint::dispose(path)?;
            eprintln!("disposed of the savepoint {}", dir.display());
            Ok(())
        }
        (None, None, Some(job_id)) => bail!(
            "`weir savepoint {job_id}` asks a running host for a savepoint: give --host URL (or set WEIR_HOST); \
             for an embedded job use `weir run JOB --savepoint-dir DIR` and stop it with Ctrl-C or SIGTERM"
        ),
        _ => bail!("usage: weir savepoint inspect PATH [--json] | weir savepoint --dispose PATH"),
    }
}

/// A scratch directory for a remote `_metadata`, removed when dropped.
fn tempfile_dir() -> Result<ScratchDir> {
    let dir = std::env::temp_dir().join(format!(
        "weir-savepoint-{}-{}",
        std::process::id(),
        crate::checkpoint::storage::random_u64()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(ScratchDir(dir))
}

struct ScratchDir(PathBuf);

impl ScratchDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn inspect(location: &Location, json: bool) -> Result<()> {
    let scratch;
    let (read, shown) = match location {
        Location::S3(url) => {
            scratch = tempfile_dir()?;
            let (dir, read) = remote::block_on(remote::read_metadata(url, scratch.path()))?;
            (read, PathBuf::from(dir.url))
        }
        Location::Local(path) => {
            let read = metadata::read(path)?;
            let shown = read.base.clone();
            (read, shown)
        }
    };
    let mut inspection = savepoint::inspect(&read);
    inspection.path = shown;
    if json {
        outln!("{}", serde_json::to_string_pretty(&inspection)?)?;
        return Ok(());
    }
    let taken = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(inspection.completed_ms.max(0) as u64);
    outln!("{}  {}", inspection.kind, inspection.path.display())?;
    outln!(
        "job       {} (id {}), barrier {}, taken {}",
        inspection.job_name,
        inspection.job_id,
        inspection.checkpoint,
        humantime::format_rfc3339_seconds(taken)
    )?;
    outln!(
        "size      {} in {} files, max_parallelism {}",
        crate::human::bytes(inspection.bytes),
        read.metadata.files().count(),
        inspection.max_parallelism
    )?;
    for op in &inspection.operators {
        let role = format!("{:?}", op.role).to_lowercase();
        let mut line = format!("\n{}  ({role}, parallelism {})", op.uid, op.parallelism);
        if let Some(plugin) = &op.plugin {
            line.push_str(&format!(
                "\n  plugin  {} {}  sha256 {}",
                plugin.name, plugin.version, plugin.digest
            ));
        }
        outln!("{line}")?;
        for state in &op.states {
            let amount = match (state.keys, state.bytes) {
                (Some(keys), Some(bytes)) => format!("{keys} keys, {}", crate::human::bytes(bytes)),
                _ => "keys not counted (a checkpoint or native savepoint: the backend's files)"
                    .to_string(),
            };
            outln!(
                "  state   {}  {} state, schema version {}  {amount}",
                state.name,
                state.kind,
                state.schema_version
            )?;
        }
        if op.timer_bytes > 0 {
            outln!("  timers  {}", crate::human::bytes(op.timer_bytes))?;
        }
        if !op.positions.is_empty() {
            let positions: Vec<String> = op.positions.iter().map(u64::to_string).collect();
            outln!("  position per subtask  {}", positions.join(", "))?;
        }
        if !op.partitions.is_empty() {
            let partitions: Vec<String> = op
                .partitions
                .iter()
                .map(|(p, seq)| format!("{p}: {seq}"))
                .collect();
            outln!("  last sequence per partition  {}", partitions.join(", "))?;
        }
    }
    Ok(())
}
