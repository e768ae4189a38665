//! Where a job of the running host may read and write: the host's job
//! roots ([`Roots`]; `[jobs] roots` in `weir serve`'s config, by default
//! its data dir). A leaf module: std and cap-std only.
//!
//! Two checks, one before and one during the run:
//! - at submit, [`Roots::confine`] resolves a path the job names: the
//!   longest part that exists is canonicalised (its `..` and symlinks
//!   followed as the kernel would), the rest must be plain names; the
//!   result must lie inside a root, and the job runs with that resolved
//!   path;
//! - at run time the file source and sink open their files, and the
//!   checkpoint coordinator a savepoint target, only through a cap-std
//!   handle on the root that holds the path ([`open_file`], [`open_dir`]),
//!   so a symlink swapped in after the check cannot lead out either.
//!
//! `weir run` embedded has no roots (`None`): paths open as given.

use std::io;
use std::path::{Component, Path, PathBuf};

use cap_std::ambient_authority;
use cap_std::fs::Dir;

/// A root that cannot be used, naming it.
#[derive(Debug, thiserror::Error)]
#[error("job root {path}: {cause}")]
pub struct RootError {
    pub path: PathBuf,
    pub cause: io::Error,
}

/// The directories a job may name paths in, each canonical and held open.
#[derive(Debug)]
pub struct Roots {
    roots: Vec<Root>,
}

#[derive(Debug)]
struct Root {
    path: PathBuf,
    dir: Dir,
}

impl Roots {
    /// Canonicalises and opens each root; one that does not exist or is
    /// not a directory is an error naming it.
    pub fn open(paths: &[PathBuf]) -> Result<Self, RootError> {
        let mut roots = Vec::new();
        for path in paths {
            let error = |cause| RootError {
                path: path.clone(),
                cause,
            };
            let canonical = path.canonicalize().map_err(error)?;
            let dir = Dir::open_ambient_dir(&canonical, ambient_authority()).map_err(error)?;
            if !roots.iter().any(|r: &Root| r.path == canonical) {
                roots.push(Root {
                    path: canonical,
                    dir,
                });
            }
        }
        Ok(Self { roots })
    }

    /// The roots, canonical.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.roots.iter().map(|r| r.path.as_path())
    }

    /// The roots as a message names them: `/a, /b` (`none` for none).
    pub fn describe(&self) -> String {
        if self.roots.is_empty() {
            return "none".to_string();
        }
        self.paths()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `path` (absolute) resolved and checked to lie inside a root: the
    /// path to use from now on. `Err`: why not, naming the roots (the
    /// caller names the key and the path).
    pub fn confine(&self, path: &Path) -> Result<PathBuf, String> {
        let resolved = resolve(path)
            .map_err(|why| format!("{why} (the host's job roots: {})", self.describe()))?;
        if self.locate(&resolved).is_some() {
            return Ok(resolved);
        }
        let leads = if resolved == path {
            String::new()
        } else {
            format!("leads to {}, ", resolved.display())
        };
        Err(format!(
            "{leads}outside the host's job roots ({}; `[jobs] roots` in its config)",
            self.describe()
        ))
    }

    /// Whether `path` (absolute, resolved) lies inside a root.
    pub fn holds(&self, path: &Path) -> bool {
        self.locate(path).is_some()
    }

    /// The root holding `path` (the innermost) and the path inside it.
    fn locate<'a>(&'a self, path: &'a Path) -> Option<(&'a Dir, &'a Path)> {
        self.roots
            .iter()
            .filter_map(|root| Some((&root.dir, path.strip_prefix(&root.path).ok()?)))
            .min_by_key(|(_, inside)| inside.components().count())
    }

    fn locate_or_deny<'a>(&'a self, path: &'a Path) -> io::Result<(&'a Dir, &'a Path)> {
        self.locate(path).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("outside the host's job roots ({})", self.describe()),
            )
        })
    }
}

/// `path`'s longest existing ancestor canonicalised, the rest appended if
/// it holds only plain names.
fn resolve(path: &Path) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err("is not an absolute path".to_string());
    }
    let components: Vec<Component<'_>> = path.components().collect();
    let mut existing = components.len();
    while existing > 1 {
        let prefix: PathBuf = components[..existing].iter().collect();
        match std::fs::symlink_metadata(&prefix) {
            Ok(_) => break,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                existing -= 1;
            }
            Err(error) => return Err(format!("cannot be resolved: {}: {error}", prefix.display())),
        }
    }
    let prefix: PathBuf = components[..existing].iter().collect();
    let mut resolved = match prefix.canonicalize() {
        Ok(resolved) => resolved,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(format!(
                "cannot be checked: {} is a symlink to nothing",
                prefix.display()
            ));
        }
        Err(error) => return Err(format!("cannot be resolved: {}: {error}", prefix.display())),
    };
    for (index, component) in components.iter().enumerate().skip(existing) {
        match component {
            Component::Normal(name) => resolved.push(name),
            Component::CurDir => {}
            _ => {
                let missing: PathBuf = components[..index].iter().collect();
                return Err(format!(
                    "has `..` after {}, which does not exist",
                    missing.display()
                ));
            }
        }
    }
    Ok(resolved)
}

/// Opens `path` for reading: through the root that holds it, or as given
/// without roots.
pub fn open_file(roots: Option<&Roots>, path: &Path) -> io::Result<std::fs::File> {
    let Some(roots) = roots else {
        return std::fs::File::open(path);
    };
    let (dir, inside) = roots.locate_or_deny(path)?;
    Ok(dir.open(inside)?.into_std())
}

/// The directory `path` as a handle (created first, with its parents, if
/// `create`): through the root that holds it, or as given without roots.
/// Whatever is done inside it by plain names stays inside it.
pub fn open_dir(roots: Option<&Roots>, path: &Path, create: bool) -> io::Result<Dir> {
    let Some(roots) = roots else {
        if create {
            std::fs::create_dir_all(path)?;
        }
        return Dir::open_ambient_dir(path, ambient_authority());
    };
    let (dir, inside) = roots.locate_or_deny(path)?;
    if inside.as_os_str().is_empty() {
        return dir.try_clone();
    }
    if create {
        dir.create_dir_all(inside)?;
    }
    dir.open_dir(inside)
}

/// Syncs a directory opened with [`open_dir`] (makes renames in it
/// durable).
pub fn sync_dir(dir: &Dir) -> io::Result<()> {
    let mut options = cap_std::fs::OpenOptions::new();
    options.read(true);
    dir.open_with(".", &options)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Layout {
        _temp: tempfile::TempDir,
        base: PathBuf,
        root: PathBuf,
        outside: PathBuf,
    }

    /// `<base>/root/{in.txt, sub/, link-out -> ../outside, link-in -> sub}`
    /// and `<base>/outside/secret`.
    fn layout() -> Layout {
        let temp = tempfile::tempdir().expect("tempdir");
        let base = temp.path().canonicalize().expect("canonical");
        let root = base.join("root");
        let outside = base.join("outside");
        std::fs::create_dir_all(root.join("sub")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(root.join("in.txt"), "in").expect("write");
        std::fs::write(outside.join("secret"), "secret").expect("write");
        std::os::unix::fs::symlink(&outside, root.join("link-out")).expect("symlink");
        std::os::unix::fs::symlink("sub", root.join("link-in")).expect("symlink");
        Layout {
            _temp: temp,
            base,
            root,
            outside,
        }
    }

    #[test]
    fn paths_inside_resolve_and_paths_outside_are_refused() {
        let l = layout();
        let roots = Roots::open(std::slice::from_ref(&l.root)).expect("roots");
        assert_eq!(
            roots.confine(&l.root.join("in.txt")),
            Ok(l.root.join("in.txt"))
        );
        // Not there yet: fine, the existing part is checked.
        assert_eq!(
            roots.confine(&l.root.join("sub/new/deeper")),
            Ok(l.root.join("sub/new/deeper"))
        );
        // A symlink inside that stays inside resolves to its target.
        assert_eq!(
            roots.confine(&l.root.join("link-in/x")),
            Ok(l.root.join("sub/x"))
        );
        // `..` through existing directories is resolved, then checked.
        assert_eq!(
            roots.confine(&l.root.join("sub/../in.txt")),
            Ok(l.root.join("in.txt"))
        );
        let outside = roots
            .confine(Path::new("/etc/passwd"))
            .expect_err("outside");
        assert!(outside.contains(&l.root.display().to_string()), "{outside}");
        let through = roots
            .confine(&l.root.join("link-out/secret"))
            .expect_err("a symlink out");
        assert!(
            through.contains(&format!("leads to {}", l.outside.join("secret").display())),
            "{through}"
        );
        let dots = roots
            .confine(&l.root.join("sub/../../outside/secret"))
            .expect_err("`..` out");
        assert!(dots.starts_with("leads to"), "{dots}");
        let missing_dots = roots
            .confine(&l.root.join("missing/../../outside/x"))
            .expect_err("`..` after a missing part");
        assert!(
            missing_dots.contains(&format!(
                "has `..` after {}, which does not exist",
                l.root.join("missing").display()
            )),
            "{missing_dots}"
        );
        assert!(roots.confine(Path::new("relative/path")).is_err());
        assert!(Roots::open(&[l.base.join("nowhere")]).is_err());
    }

    #[test]
    fn handles_open_only_inside_their_root() {
        let l = layout();
        let roots = Roots::open(std::slice::from_ref(&l.root)).expect("roots");
        let mut text = String::new();
        io::Read::read_to_string(
            &mut open_file(Some(&roots), &l.root.join("in.txt")).expect("inside"),
            &mut text,
        )
        .expect("read");
        assert_eq!(text, "in");
        // A path that passed the check once but is a symlink out now.
        assert!(open_file(Some(&roots), &l.root.join("link-out/secret")).is_err());
        assert!(open_file(Some(&roots), &l.outside.join("secret")).is_err());
        assert!(open_dir(Some(&roots), &l.root.join("link-out"), true).is_err());
        let made = open_dir(Some(&roots), &l.root.join("made/here"), true).expect("create");
        made.write("part", "x").expect("write inside");
        assert!(l.root.join("made/here/part").is_file());
        assert!(open_dir(Some(&roots), &l.root, false).is_ok());
        // Without roots, paths open as given.
        assert!(open_file(None, &l.outside.join("secret")).is_ok());
    }
}
