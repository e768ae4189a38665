//! `weir savepoint`: `inspect PATH [--json]` shows what a savepoint (or a
//! retained checkpoint) holds, read from its `_metadata` alone, without any
//! plugin; `read PATH --uid UID` prints an operator's keyed state as data
//! (JSON lines or CSV); `--dispose PATH` deletes a savepoint after
//! checking it is one.
//! `weir savepoint JOB_ID [TARGET_DIR]` belongs to a running host.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::checkpoint::{cells, metadata, remote, savepoint};
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
    /// Print an operator's keyed state, one cell a line: its state, key
    /// group, key and value (decoded JSON where the SDK wrote JSON, base64
    /// otherwise), without loading any plugin.
    Read {
        /// The savepoint or `chk-N` directory, or its `_metadata`.
        path: PathBuf,
        /// The operator whose state to print.
        #[arg(long)]
        uid: String,
        /// Only this state.
        #[arg(long, value_name = "NAME")]
        state: Option<String>,
        /// Only this key (its UTF-8 text).
        #[arg(long, value_name = "K")]
        key: Option<String>,
        #[arg(long, value_enum, default_value_t = ReadFormat::Jsonl)]
        format: ReadFormat,
    },
    /// Build a savepoint from data: one state of one operator from JSON
    /// lines as `read` prints them, restorable with `weir run -s`.
    Write(WriteArgs),
}

/// `weir savepoint write`'s arguments.
#[derive(Debug, clap::Args)]
pub struct WriteArgs {
    /// The operator the state is for.
    #[arg(long)]
    pub uid: String,
    /// The state written.
    #[arg(long, value_name = "NAME")]
    pub state: String,
    /// JSON lines (`-`: standard input), each `{"state", "key" (or
    /// `key_base64`), "key_group" (checked), "value" (or `value_base64`)}`.
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    /// The operator's plugin: the state's kind and schema version come
    /// from its declaration (else: a `value` state, schema version 1).
    #[arg(long, value_name = "FILE")]
    pub plugin: Option<PathBuf>,
    /// Subtasks the state is split into (any parallelism restores it).
    #[arg(long, default_value_t = 1)]
    pub parallelism: u32,
    /// The job's `max_parallelism` (a restore requires the same).
    #[arg(long, default_value_t = 128)]
    pub max_parallelism: u32,
    /// The directory the savepoint directory is made in.
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    pub output: PathBuf,
    /// Lines of an older schema version (as `read` prints them) are
    /// migrated with the plugin's migrate export, offline.
    #[arg(long, requires = "plugin")]
    pub transform: bool,
}

/// How `weir savepoint read` prints cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadFormat {
    /// One JSON object a line: `state`, `key_group`, `key` (or
    /// `key_base64`), `value` (or `value_base64`).
    Jsonl,
    /// `state,key_group,key,value` with a header; a key or value that is
    /// not text/JSON is written `base64:…`.
    Csv,
}

pub fn execute(cli: &super::Cli, args: &SavepointArgs) -> Result<()> {
    match (&args.command, &args.dispose, &args.job_id) {
        (Some(SavepointCommand::Write(write)), _, _) => write_state(cli, write),
        (Some(SavepointCommand::Inspect { path, json }), _, _) => inspect(path, *json),
        (
            Some(SavepointCommand::Read {
                path,
                uid,
                state,
                key,
                format,
            }),
            _,
            _,
        ) => read_state(path, uid, state.as_deref(), key.as_deref(), *format),
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
        _ => bail!(
            "usage: weir savepoint inspect PATH [--json] | weir savepoint read PATH --uid UID | weir savepoint --dispose PATH"
        ),
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
            let ttl = state
                .ttl
                .as_ref()
                .map(|t| format!(", TTL {t}"))
                .unwrap_or_default();
            outln!(
                "  state   {}  {} state, schema version {}{ttl}  {amount}",
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

/// `weir savepoint read`: checks the uid and state against `_metadata`
/// (naming what there is when they are not), then streams the cells.
fn read_state(
    path: &Path,
    uid: &str,
    state: Option<&str>,
    key: Option<&str>,
    format: ReadFormat,
) -> Result<()> {
    use std::io::Write;
    let read = metadata::read(path)?;
    let shown = read.base.display().to_string();
    let Some(op) = read.metadata.operators.get(uid) else {
        let uids: Vec<&str> = read
            .metadata
            .operators
            .iter()
            .filter(|(_, op)| !op.states.is_empty())
            .map(|(uid, _)| uid.as_str())
            .collect();
        bail!(
            "{shown}: no operator `{uid}`; the operators with keyed state are: {}",
            if uids.is_empty() {
                "none".to_string()
            } else {
                uids.join(", ")
            }
        );
    };
    if let Some(name) = state
        && !op.states.iter().any(|s| s.name == name)
    {
        let names: Vec<&str> = op.states.iter().map(|s| s.name.as_str()).collect();
        bail!(
            "{shown}: operator `{uid}` has no state `{name}`; its states are: {}",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
    }
    savepoint::verify_files(&read)?;
    let scratch = tempfile_dir()?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut closed: Option<std::io::Error> = None;
    if format == ReadFormat::Csv {
        writeln!(out, "state,key_group,key,value").map_err(stdout_error)?;
    }
    let selection = cells::Selection {
        uid,
        state,
        key: key.map(str::as_bytes),
    };
    let mut visit = |cell: cells::Cell<'_>| {
        let line = cells::CellLine::of(&cell);
        let written = match format {
            ReadFormat::Jsonl => serde_json::to_writer(&mut out, &line)
                .map_err(std::io::Error::from)
                .and_then(|()| out.write_all(b"\n")),
            ReadFormat::Csv => write_csv(&mut out, &line),
        };
        written.map_err(|error| {
            let message = error.to_string();
            closed = Some(error);
            crate::checkpoint::CheckpointError::io(Path::new("stdout"), message)
        })
    };
    let result = cells::read_cells(&read, op, selection, scratch.path(), &mut visit);
    if let Some(error) = closed {
        return Err(stdout_error(error));
    }
    result?;
    out.flush().map_err(stdout_error)?;
    Ok(())
}

fn stdout_error(error: std::io::Error) -> anyhow::Error {
    match error.kind() {
        std::io::ErrorKind::BrokenPipe => super::StdoutClosed.into(),
        _ => anyhow::Error::new(error).context("cannot write to stdout"),
    }
}

/// One CSV row of a cell (RFC 4180 quoting).
fn write_csv(out: &mut impl std::io::Write, line: &cells::CellLine) -> std::io::Result<()> {
    let quote = |field: &str| {
        if field.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", field.replace('"', "\"\""))
        } else {
            field.to_string()
        }
    };
    let key = match (&line.key, &line.key_base64) {
        (Some(text), _) => text.clone(),
        (None, Some(b64)) => format!("base64:{b64}"),
        (None, None) => String::new(),
    };
    let value = match (&line.value, &line.value_base64) {
        (Some(json), _) => json.to_string(),
        (None, Some(b64)) => format!("base64:{b64}"),
        (None, None) => String::new(),
    };
    writeln!(
        out,
        "{},{},{},{}",
        quote(&line.state),
        line.key_group,
        quote(&key),
        quote(&value)
    )
}

/// `weir savepoint write`: every line checked first (each problem named by
/// its line, all of them at once), then the savepoint written.
fn write_state(cli: &super::Cli, args: &WriteArgs) -> Result<()> {
    use crate::checkpoint::bootstrap::{self, Bootstrap};
    use crate::checkpoint::metadata::{PluginRef, StateRef};
    use std::io::BufRead;
    if args.parallelism == 0 || args.parallelism > args.max_parallelism {
        bail!(
            "--parallelism {} must be 1..={} (--max-parallelism)",
            args.parallelism,
            args.max_parallelism
        );
    }
    if args.max_parallelism == 0
        || args.max_parallelism > crate::types::key_group::MAX_MAX_PARALLELISM
    {
        bail!(
            "--max-parallelism {} must be 1..={}",
            args.max_parallelism,
            crate::types::key_group::MAX_MAX_PARALLELISM
        );
    }
    let mut loaded_plugin = None;
    let (state, plugin) = match &args.plugin {
        Some(file) => {
            let loaded = cli.engine()?.load(file)?;
            loaded_plugin = Some(loaded.clone());
            let Some(declared) = loaded.info.states.iter().find(|s| s.name == args.state) else {
                let names: Vec<&str> = loaded.info.states.iter().map(|s| s.name.as_str()).collect();
                bail!(
                    "{}: plugin {} {} declares no state `{}`; its states are: {}",
                    file.display(),
                    loaded.info.name,
                    loaded.info.version,
                    args.state,
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                );
            };
            let state = StateRef {
                name: declared.name.clone(),
                kind: declared.kind.to_string(),
                schema_version: declared.schema_version,
                ttl: declared.ttl,
            };
            let plugin = PluginRef {
                name: loaded.info.name.clone(),
                version: loaded.info.version.clone(),
                digest: loaded.digest.clone(),
            };
            (state, Some(plugin))
        }
        None => (
            StateRef {
                name: args.state.clone(),
                kind: "value".to_string(),
                schema_version: 1,
                ttl: None,
            },
            None,
        ),
    };
    let spec = Bootstrap {
        uid: args.uid.clone(),
        state,
        plugin,
        parallelism: args.parallelism,
        max_parallelism: args.max_parallelism,
        transform: args.transform,
    };
    if args.transform && loaded_plugin.as_ref().is_some_and(|p| p.migrate.is_none()) {
        bail!(
            "--transform: plugin {} has no migrate export ({}) to migrate older values with",
            args.plugin.as_deref().unwrap_or(Path::new("?")).display(),
            crate::plugin::migrate::MIGRATION_INTERFACE
        );
    }
    // `--transform`: a migrator per schema version the lines come in.
    let mut migrators: std::collections::HashMap<u32, crate::plugin::migrate::Migrator> =
        std::collections::HashMap::new();
    let mut migrate = |from: u32, value: Vec<u8>| -> Result<Vec<u8>, String> {
        use crate::checkpoint::restore::MigrateCells;
        let plugin = loaded_plugin
            .clone()
            .expect("--transform requires --plugin");
        let migrator = match migrators.entry(from) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let kind = plugin
                    .info
                    .states
                    .iter()
                    .find(|s| s.name == args.state)
                    .map(|s| s.kind)
                    .unwrap_or(crate::state::StateKind::Value);
                entry.insert(crate::plugin::migrate::Migrator::new(
                    &args.uid,
                    plugin,
                    &crate::job::Limits::default(),
                    vec![crate::plugin::migrate::StateMigration {
                        table: 0,
                        name: args.state.clone(),
                        kind,
                        from_version: from,
                    }],
                )?)
            }
        };
        migrator.migrate(0, value)
    };
    let shown = args.from.display().to_string();
    let input: Box<dyn BufRead> = if args.from.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(&args.from).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
        Box::new(std::io::BufReader::with_capacity(1 << 20, file))
    };
    let mut cells = std::collections::BTreeMap::new();
    let mut problems = Vec::new();
    // A TTL state's cells are stamped: with the line's `updated_ms`, else now.
    let now = crate::state::ttl::wall_millis();
    let ttl = spec.state.ttl;
    for (index, text) in input.lines().enumerate() {
        let text = text.map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
        if text.trim().is_empty() {
            continue;
        }
        let parsed = bootstrap::parse_line(&spec, index + 1, &text).and_then(|mut cell| {
            if let Some(from) = cell.migrate_from {
                cell.value = migrate(from, std::mem::take(&mut cell.value))
                    .map_err(|e| format!("line {}: {e}", index + 1))?;
            }
            Ok(cell)
        });
        match parsed {
            Ok(bootstrap::ParsedCell {
                key_group: group,
                key,
                value,
                updated_ms,
                ..
            }) => {
                let value = match ttl {
                    Some(_) => crate::state::ttl::stamped(updated_ms.unwrap_or(now), &value),
                    None => value,
                };
                if cells.insert((group, key.clone()), value).is_some() {
                    problems.push(format!(
                        "line {}: key {:?} comes a second time",
                        index + 1,
                        String::from_utf8_lossy(&key)
                    ));
                }
            }
            Err(problem) => problems.push(problem),
        }
        if problems.len() >= 20 {
            problems.push("… (stopped after 20 problems)".to_string());
            break;
        }
    }
    if !problems.is_empty() {
        bail!("{shown}:\n  {}", problems.join("\n  "));
    }
    let dir = bootstrap::write(&spec, &cells, &args.output)?;
    eprintln!(
        "wrote {} keys of `{}` state `{}` in {} subtask file(s)",
        cells.len(),
        spec.uid,
        spec.state.name,
        spec.parallelism
    );
    outln!("{}", dir.display())?;
    Ok(())
}
