//! A job stays in its place: the paths a job file (and a request) names,
//! checked against the host's job roots ([`crate::roots`]) before
//! anything runs, and the WASI grants the host allows. Every problem is
//! reported at once, each naming the key, the path and the roots; the job
//! then runs with the resolved paths and the roots, through whose handles
//! its file source and sink open their files.
//!
//! `[checkpoint] dir` and `[state] dir` are not checked: the host keeps
//! every job's checkpoints and working state in its own data dir, whatever
//! the job file says.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::HostContext;
use crate::job::file::{SinkKindName, SourceKindName};
use crate::job::{JobError, JobFile, JobGraph, NodeKind, SinkKind, SourceKind, WasiGrant};
use crate::types::Location;

/// What [`check`] found: the problems, and each file source's and sink's
/// path resolved inside the roots, by uid.
#[derive(Debug, Default)]
pub(super) struct Placement {
    problems: Vec<String>,
    resolved: BTreeMap<String, PathBuf>,
}

/// Checks the paths `file` names (relative ones against `base`, the job
/// file's directory) and its WASI grants.
pub(super) fn check(ctx: &HostContext, file: &JobFile, base: &Path) -> Placement {
    let mut placement = Placement::default();
    for source in &file.sources {
        if let (SourceKindName::File, Some(path)) = (source.kind, &source.path) {
            let key = format!("[[source]] uid {:?} path", source.uid);
            placement.place(ctx, &source.uid, &key, &base.join(path));
        }
    }
    for sink in &file.sinks {
        if let (SinkKindName::File, Some(path)) = (sink.kind, &sink.path) {
            let key = format!("[[sink]] uid {:?} path", sink.uid);
            placement.place(ctx, &sink.uid, &key, &base.join(path));
        }
    }
    if !ctx.settings.allow_wasi_env {
        for operator in &file.operators {
            if operator.wasi.contains(&WasiGrant::Env) {
                placement.problems.push(format!(
                    "[[operator]] uid {:?} wasi \"env\": the plugin would see the host's environment \
                     variables (its credentials); this host does not allow it \
                     (`[jobs] allow_wasi_env = true` in its config would)",
                    operator.uid
                ));
            }
        }
    }
    placement
}

impl Placement {
    fn place(&mut self, ctx: &HostContext, uid: &str, key: &str, path: &Path) {
        match confine_path(ctx, key, path) {
            Ok(resolved) => {
                self.resolved.insert(uid.to_string(), resolved);
            }
            Err(problem) => self.problems.push(problem),
        }
    }

    /// `from_savepoint` (a local path must lie inside the roots; object
    /// storage is not the host's filesystem), resolved.
    pub(super) fn restore_point(&mut self, ctx: &HostContext, from: &str) -> String {
        let problem = match Location::parse(from) {
            Ok(Location::S3(_)) => return from.to_string(),
            Ok(Location::Local(path)) => match confine_path(ctx, "from_savepoint", &path) {
                Ok(resolved) => return resolved.display().to_string(),
                Err(problem) => problem,
            },
            Err(error) => format!("from_savepoint: {error}"),
        };
        self.problems.push(problem);
        from.to_string()
    }

    /// The validated graph with the resolved paths and the roots, or
    /// every problem of both checks at once.
    pub(super) fn apply(
        self,
        ctx: &HostContext,
        validated: Result<JobGraph, JobError>,
        file: &Path,
    ) -> Result<JobGraph, JobError> {
        let mut graph = match validated {
            Ok(graph) if self.problems.is_empty() => graph,
            Ok(_) => {
                return Err(JobError::Invalid {
                    file: file.to_path_buf(),
                    problems: self.problems,
                });
            }
            Err(JobError::Invalid { file, mut problems }) => {
                problems.extend(self.problems);
                return Err(JobError::Invalid { file, problems });
            }
            Err(error) => return Err(error),
        };
        for node in &mut graph.nodes {
            let path = match &mut node.kind {
                NodeKind::Source(source) => match &mut source.kind {
                    SourceKind::File { path, .. } => path,
                    _ => continue,
                },
                NodeKind::Sink(SinkKind::File { path }) => path,
                _ => continue,
            };
            if let Some(resolved) = self.resolved.get(&node.uid) {
                path.clone_from(resolved);
            }
        }
        graph.roots = Some(ctx.roots.clone());
        Ok(graph)
    }
}

/// `path` resolved inside the roots, or the problem naming `key`, the
/// path and the roots.
pub(super) fn confine_path(ctx: &HostContext, key: &str, path: &Path) -> Result<PathBuf, String> {
    ctx.roots
        .confine(path)
        .map_err(|why| format!("{key} {}: {why}", path.display()))
}
