//! `strata commit`: turns a stopped container's writable layer into a read-only layer
//! directory in OCI form (what `docker commit` does).
//!
//! The upper directory is walked to find what changed; each changed object's content and
//! metadata are read through the library's merged view, which resolves metadata-only copies
//! and indexed hard links. Deletions become `.wh.NAME`, opaque directories get
//! `.wh..wh..opq`, and no overlay xattr is written. OCI has no renames, so a renamed lower
//! directory comes out as an opaque directory with its full merged contents (its old name is
//! a whiteout already). Lower names of a hard link modified through another name come out
//! as hard links of the committed copy.
//!
//! Opening the stack clears `DIR/work/work`, as mounting it would: commit a stopped
//! container only.

mod index;
mod output;
mod upper;
mod view;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use strata_fs::inode::ROOT_INO;
use strata_fs::{sys, whiteout};

use index::Index;
use output::{Output, OutputGuard};
use upper::{cstring, join, lower_shows_through, UpperDir, NAMESPACES};
use view::{copy_chunks, file_reader, invisible, is_dir, os_err, show, Attr, View};

/// Command line of `strata commit`.
#[derive(Args, Debug)]
#[command(
    after_help = "Commit a stopped container only: reading the layer prepares its \
workdir (DIR/work/work is cleared) as mounting it would."
)]
pub struct CommitArgs {
    /// The container directory (DIR/diff is its upper layer, DIR/work the overlay workdir),
    /// or a bare upper layer directory.
    #[arg(long, value_name = "DIR")]
    pub upper: PathBuf,
    /// Where the new layer goes; must not exist or be an empty directory.
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// A read-only layer below the upper, highest first (repeat it; the order of
    /// lowerdir=TOP:...:BOTTOM). Needed when the upper refers to them: renamed directories,
    /// metadata-only copies, hard links.
    #[arg(long = "layer", value_name = "DIR")]
    pub layers: Vec<PathBuf>,
}

/// Runs `strata commit`.
pub fn run(args: &CommitArgs) -> Result<()> {
    let input = Input::resolve(args)?;
    input.check_output(&args.output)?;
    let guard = OutputGuard::prepare(&args.output)?;
    commit(&input, &args.output)?;
    guard.keep();
    Ok(())
}

/// The directories a commit reads, checked.
struct Input {
    upper: PathBuf,
    workdir: PathBuf,
    /// The given layers.
    layers: Vec<PathBuf>,
    /// The layers the views are opened with: the given ones, or one empty directory (a view
    /// needs a lower layer).
    view_lowers: Vec<PathBuf>,
    /// Temporary directories removed when the commit ends.
    _temp: Vec<tempfile::TempDir>,
}

impl Input {
    fn resolve(args: &CommitArgs) -> Result<Input> {
        let dir = existing_dir("upper", &args.upper)?;
        let mut temp = Vec::new();
        let diff = dir.join("diff");
        let (upper, work) = if diff.is_dir() {
            (diff, dir.join("work"))
        } else {
            (dir.clone(), PathBuf::new())
        };
        let workdir = if work.is_dir() {
            work
        } else {
            // A workdir must be on the upper's filesystem: beside it.
            let parent = upper.parent().context("the upper layer cannot be /")?;
            let t = tempfile::Builder::new()
                .prefix(".strata-commit-work-")
                .tempdir_in(parent)
                .with_context(|| format!("creating a workdir in {}", parent.display()))?;
            let p = t.path().to_path_buf();
            temp.push(t);
            p
        };
        let layers = args
            .layers
            .iter()
            .map(|l| existing_dir("layer", l))
            .collect::<Result<Vec<_>>>()?;
        let view_lowers = if layers.is_empty() {
            let t = tempfile::Builder::new()
                .prefix("strata-commit-empty-")
                .tempdir()
                .context("creating an empty lower layer")?;
            let p = t.path().to_path_buf();
            temp.push(t);
            vec![p]
        } else {
            layers.clone()
        };
        Ok(Input {
            upper,
            workdir,
            layers,
            view_lowers,
            _temp: temp,
        })
    }

    /// The output must not be inside the writable layer or its workdir (checked before it
    /// is created, so a refused output is never made).
    fn check_output(&self, output: &Path) -> Result<()> {
        let out = match fs::canonicalize(output) {
            Ok(p) => p,
            // Not there yet: where it will be.
            Err(_) => match (output.parent(), output.file_name()) {
                (Some(parent), Some(name)) => {
                    let parent = if parent.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        parent
                    };
                    let parent = fs::canonicalize(parent)
                        .with_context(|| format!("output {}", output.display()))?;
                    parent.join(name)
                }
                _ => bail!("output {} is not a directory path", output.display()),
            },
        };
        // Lower layers may contain it (the host's / is a common base layer): the commit
        // only reads their objects by the paths the upper names, and the output is new.
        for d in [&self.upper, &self.workdir] {
            if out.starts_with(d) {
                bail!("output {} is inside {}", output.display(), d.display());
            }
        }
        Ok(())
    }
}

/// `path`, canonical, or an error naming `role` if it is not a directory.
fn existing_dir(role: &str, path: &Path) -> Result<PathBuf> {
    match fs::metadata(path) {
        Ok(md) if md.is_dir() => {
            fs::canonicalize(path).with_context(|| format!("{role} {}", path.display()))
        }
        Ok(_) => bail!("{role} {} is not a directory", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{role} {} does not exist", path.display())
        }
        Err(e) => Err(e).with_context(|| format!("{role} {}", path.display())),
    }
}

fn commit(input: &Input, output: &Path) -> Result<()> {
    let full = View::open(&input.view_lowers, Some((&input.upper, &input.workdir)))?;
    let lower = View::open(&input.view_lowers, None)?;
    let mut index = Index::load(&input.workdir)?;
    if !index.entries.is_empty() {
        require_layers(
            &input.layers,
            "the workdir's index holds copies of lower hard links",
        )?;
        index.scan(&input.layers)?;
    }
    let mut alias_of = HashMap::new();
    for (i, e) in index.entries.iter().enumerate() {
        for n in &e.names {
            alias_of.insert(lower.ino_of(n.dev, n.ino), i);
        }
    }
    let mut c = Committer {
        upper_root: open_dir_path(&input.upper)?,
        lib_ns: library_namespace(&input.workdir),
        layers: &input.layers,
        full,
        lower,
        index,
        alias_of,
        out: Output::open(output)?,
        links: HashMap::new(),
        committed: HashMap::new(),
        deferred: Vec::new(),
    };
    c.run()
}

/// Which view an object was read through (inode numbers are per view).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Side {
    /// The upper layer over the lower ones.
    Full,
    /// The lower layers alone.
    Lower,
}

/// One commit in progress.
struct Committer<'a> {
    upper_root: OwnedFd,
    /// The xattr namespace the library reads its private marks in, as this user.
    lib_ns: &'static str,
    layers: &'a [PathBuf],
    full: View,
    lower: View,
    index: Index,
    /// Lower-view inode number of each indexed lower file → its index entry.
    alias_of: HashMap<u64, usize>,
    out: Output,
    /// First output path of each multiply linked object.
    links: HashMap<(Side, u64), Vec<u8>>,
    /// Output path of each upper file by real identity, to find the copy an index entry is.
    committed: HashMap<(u64, u64), Vec<u8>>,
    /// Lower names of indexed files met below renamed directories: (entry, output path).
    deferred: Vec<(usize, Vec<u8>)>,
}

impl Committer<'_> {
    fn run(&mut self) -> Result<()> {
        let root = self.full.root()?;
        let xattrs = self.full.xattrs(ROOT_INO, b"")?;
        self.out.root(&root, &xattrs)?;
        self.walk_upper(b"", ROOT_INO, false)?;
        self.link_index_names()?;
        self.out.finish()
    }

    /// Emits the changes recorded in upper directory `path` (`ino` in the full view), and
    /// below it.
    fn walk_upper(&mut self, path: &[u8], ino: u64, forced_opaque: bool) -> Result<()> {
        let dir = UpperDir::open(self.upper_root.as_fd(), path)?;
        let opaque = dir.opaque || forced_opaque;
        if opaque {
            self.out.opaque(path)?;
        } else {
            // A whiteout beside an object of the same name only hides the lower layers'
            // copies: the object replaces them anyway (or its directory is opaque).
            for name in dir.whiteouts.iter().filter(|n| !dir.has_object(n)) {
                self.out.whiteout(path, name)?;
            }
        }
        for (name, st) in &dir.objects {
            let child = join(path, name);
            let attr = self.full.lookup(ino, path, name)?;
            let attr = attr.ok_or_else(|| invisible(&child))?;
            if is_dir(st) {
                self.emit_dir(Side::Full, &child, &attr)?;
                match dir.redirect(name)? {
                    Some(r) => self.emit_renamed(&child, attr.st_ino, &r.lower_path(path))?,
                    None => {
                        let hide = dir.whiteouts.contains(name);
                        self.walk_upper(&child, attr.st_ino, hide)?
                    }
                }
            } else {
                self.emit_upper_file(&dir, &child, name, st, &attr)?;
            }
            self.full.forget(attr.st_ino);
        }
        Ok(())
    }

    /// A renamed lower directory: opaque, with everything the merged view shows in it.
    fn emit_renamed(&mut self, path: &[u8], ino: u64, from: &[u8]) -> Result<()> {
        let why = format!("{} is a renamed directory of a lower layer", show(path));
        require_layers(self.layers, &why)?;
        let lower = self.lower_dir(from)?.ok_or_else(|| {
            anyhow!(
                "{} was renamed from /{}, which none of the --layer directories holds",
                show(path),
                String::from_utf8_lossy(from)
            )
        })?;
        self.out.opaque(path)?;
        self.merge_dir(path, Some(ino), from, Some(lower))
    }

    /// Emits the full contents of directory `path`: the upper copy's objects (`upper_ino` in
    /// the full view), over the lower copy at `lower_path` (`lower_ino` in the lower view).
    fn merge_dir(
        &mut self,
        path: &[u8],
        upper_ino: Option<u64>,
        lower_path: &[u8],
        lower_ino: Option<u64>,
    ) -> Result<()> {
        let udir = match upper_ino {
            Some(_) => Some(UpperDir::open(self.upper_root.as_fd(), path)?),
            None => None,
        };
        let lower_ino = lower_ino.filter(|_| !udir.as_ref().is_some_and(|d| d.opaque));
        if let (Some(dir), Some(ino)) = (&udir, upper_ino) {
            self.merge_upper_objects(dir, path, ino, lower_path, lower_ino)?;
        }
        if let Some(lino) = lower_ino {
            let shadowed = |n: &[u8]| {
                udir.as_ref()
                    .is_some_and(|d| d.has_object(n) || d.whiteouts.contains(n))
            };
            for name in self.lower.list(lino, lower_path)? {
                if !shadowed(&name) {
                    self.emit_lower(path, lower_path, lino, &name)?;
                }
            }
        }
        Ok(())
    }

    /// The upper objects of a directory being emitted in full (see [`Self::merge_dir`]).
    fn merge_upper_objects(
        &mut self,
        dir: &UpperDir,
        path: &[u8],
        ino: u64,
        lower_path: &[u8],
        lower_ino: Option<u64>,
    ) -> Result<()> {
        for (name, st) in &dir.objects {
            let child = join(path, name);
            let attr = self.full.lookup(ino, path, name)?;
            let attr = attr.ok_or_else(|| invisible(&child))?;
            if !is_dir(st) {
                self.emit_upper_file(dir, &child, name, st, &attr)?;
                self.full.forget(attr.st_ino);
                continue;
            }
            self.emit_dir(Side::Full, &child, &attr)?;
            let (from, below) = match dir.redirect(name)? {
                Some(r) => {
                    let from = r.lower_path(lower_path);
                    let below = self.lower_dir(&from)?;
                    (from, below)
                }
                None => {
                    let below = match lower_ino {
                        Some(l) => self.lower.lookup(l, lower_path, name)?,
                        None => None,
                    };
                    (
                        join(lower_path, name),
                        below.filter(is_dir).map(|a| a.st_ino),
                    )
                }
            };
            // `.wh.NAME` beside it: its lower copies are hidden.
            let below = below.filter(|_| !dir.whiteouts.contains(name));
            self.merge_dir(&child, Some(attr.st_ino), &from, below)?;
            self.full.forget(attr.st_ino);
        }
        Ok(())
    }

    /// Emits lower object `name` of the lower directory `lower_path` (`lino`) at `path/name`.
    fn emit_lower(&mut self, path: &[u8], lower_path: &[u8], lino: u64, name: &[u8]) -> Result<()> {
        let child = join(path, name);
        let attr = self.lower.lookup(lino, lower_path, name)?;
        let attr =
            attr.ok_or_else(|| anyhow!("{} vanished from the lower layers", show(&child)))?;
        if is_dir(&attr) {
            self.emit_dir(Side::Lower, &child, &attr)?;
            self.merge_dir(&child, None, &join(lower_path, name), Some(attr.st_ino))?;
        } else if let Some(&entry) = self.alias_of.get(&attr.st_ino) {
            // Shows the indexed copy: linked to it once that is written.
            self.deferred.push((entry, child));
        } else {
            self.emit_nondir(Side::Lower, &child, &attr)?;
        }
        self.lower.forget(attr.st_ino);
        Ok(())
    }

    /// The lower view's inode number of directory `path`, if the lower layers have one.
    fn lower_dir(&self, path: &[u8]) -> Result<Option<u64>> {
        let a = self.lower.lookup_path(path)?;
        Ok(a.filter(is_dir).map(|a| a.st_ino))
    }

    /// Emits the non-directory upper object `name` of `dir` (real attributes `st`).
    fn emit_upper_file(
        &mut self,
        dir: &UpperDir,
        path: &[u8],
        name: &[u8],
        st: &libc::stat,
        attr: &Attr,
    ) -> Result<()> {
        let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
        if regular {
            self.check_metacopy(dir, name, path)?;
        }
        self.emit_nondir(Side::Full, path, attr)?;
        if regular && st.st_nlink > 1 {
            let id = (st.st_dev, st.st_ino);
            self.committed.entry(id).or_insert_with(|| path.to_vec());
        }
        Ok(())
    }

    /// A metadata-only copy must be readable through the view: its data in a given layer,
    /// its mark in the namespace the library reads.
    fn check_metacopy(&self, dir: &UpperDir, name: &[u8], path: &[u8]) -> Result<()> {
        let Some((ns, data)) = dir.metacopy(name, path)? else {
            return Ok(());
        };
        let why = format!("{} is a metadata-only copy of a lower file", show(path));
        require_layers(self.layers, &why)?;
        if ns != self.lib_ns {
            bail!(
                "{} is a metadata-only copy marked in {ns}.overlay.*, which this user's \
                 strata-fs does not read ({}); commit as the user that ran the container",
                show(path),
                self.lib_ns
            );
        }
        let rel = Path::new(OsStr::from_bytes(&data));
        let found = self
            .layers
            .iter()
            .any(|l| fs::symlink_metadata(l.join(rel)).is_ok_and(|m| m.is_file()));
        if !found {
            bail!(
                "the data of {} (/{}) is in none of the --layer directories",
                show(path),
                rel.display()
            );
        }
        Ok(())
    }

    /// Emits directory `path` (its contents come separately).
    fn emit_dir(&mut self, side: Side, path: &[u8], attr: &Attr) -> Result<()> {
        let view = match side {
            Side::Full => &self.full,
            Side::Lower => &self.lower,
        };
        let xattrs = view.xattrs(attr.st_ino, path)?;
        self.out.mkdir(path, attr, &xattrs)
    }

    /// Emits a non-directory read through `side`'s view, or a hard link to its first name.
    fn emit_nondir(&mut self, side: Side, path: &[u8], attr: &Attr) -> Result<()> {
        let key = (side, attr.st_ino);
        let linked = attr.st_nlink > 1;
        if linked {
            if let Some(first) = self.links.get(&key) {
                return self.out.link(first, path);
            }
        }
        let view = match side {
            Side::Full => &self.full,
            Side::Lower => &self.lower,
        };
        let ino = attr.st_ino;
        let xattrs = view.xattrs(ino, path)?;
        match attr.st_mode & libc::S_IFMT {
            libc::S_IFREG => self
                .out
                .file(path, attr, &xattrs, |f| view.copy_data(ino, path, f))?,
            libc::S_IFLNK => {
                let target = view.readlink(ino, path)?;
                self.out.symlink(path, &target, attr, &xattrs)?
            }
            _ => self.out.special(path, attr, &xattrs)?,
        }
        if linked {
            self.links.insert(key, path.to_vec());
        }
        Ok(())
    }

    /// Gives every visible lower name of each indexed file the committed copy.
    fn link_index_names(&mut self) -> Result<()> {
        for i in 0..self.index.entries.len() {
            let mut paths = Vec::new();
            for n in &self.index.entries[i].names {
                if self.lower_name_visible(&n.path, n.dev, n.ino)? {
                    paths.push(n.path.clone());
                }
            }
            paths.dedup();
            paths.extend(
                self.deferred
                    .iter()
                    .filter(|d| d.0 == i)
                    .map(|d| d.1.clone()),
            );
            let id = self.index.entries[i].upper_id;
            let mut target = self.committed.get(&id).cloned();
            for path in paths {
                if self.out.exists(&path)? {
                    continue;
                }
                self.ensure_parents(&path)?;
                match &target {
                    Some(t) => self.out.link(t, &path)?,
                    None => {
                        // No upper name links to it: the first lower name gets the copy.
                        self.emit_index_copy(i, &path)?;
                        target = Some(path);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether the lower file `(dev, ino)` at `path` shows at `path` in the merged view: no
    /// upper change covers it and no higher lower layer hides it.
    fn lower_name_visible(&self, path: &[u8], dev: u64, ino: u64) -> Result<bool> {
        if !lower_shows_through(self.upper_root.as_fd(), path)? {
            return Ok(false);
        }
        let a = self.lower.lookup_path(path)?;
        Ok(a.is_some_and(|a| a.st_ino == self.lower.ino_of(dev, ino)))
    }

    /// Creates the missing parent directories of `path`, as the lower layers have them (the
    /// upper layer has none of them, or the name would not show through).
    fn ensure_parents(&mut self, path: &[u8]) -> Result<()> {
        let mut end = 0;
        while let Some(i) = path[end..].iter().position(|&b| b == b'/') {
            end += i;
            let dir = &path[..end];
            if !self.out.exists(dir)? {
                let a = self.lower.lookup_path(dir)?.filter(is_dir);
                let a = a.ok_or_else(|| anyhow!("{} is not a lower directory", show(dir)))?;
                self.emit_dir(Side::Lower, dir, &a)?;
            }
            end += 1;
        }
        Ok(())
    }

    /// Writes index entry `i` itself at `path`.
    fn emit_index_copy(&mut self, i: usize, path: &[u8]) -> Result<()> {
        let index = self.index.dir.as_ref().context("no index directory")?;
        let name = &self.index.entries[i].name;
        let st = sys::stat_at(index.as_fd(), name).map_err(os_err)?;
        let xattrs = raw_xattrs(index.as_fd(), name)?;
        let data = sys::open_child(index.as_fd(), name, libc::O_RDONLY).map_err(os_err)?;
        let data = File::from(data);
        self.out
            .file(path, &st, &xattrs, |f| copy_chunks(file_reader(&data), f))
            .with_context(|| format!("index entry {}", name.to_string_lossy()))
    }
}

/// The xattrs a user would see on `name` in `dir` (overlay marks left out, escaped names
/// turned back).
fn raw_xattrs(dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = sys::list_xattr_at(dir, name).map_err(os_err)?;
    let mut out = Vec::new();
    for stored in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if let Some(visible) = whiteout::visible_xattr_name(stored) {
            let v = sys::get_xattr_at(dir, name, &cstring(stored)?).map_err(os_err)?;
            out.push((visible.into_owned(), v));
        }
    }
    Ok(out)
}

/// Fails with one line saying why the lower layers are needed, when none were given.
fn require_layers(layers: &[PathBuf], why: &str) -> Result<()> {
    if layers.is_empty() {
        bail!("{why}: give the lower layers with --layer (highest first)");
    }
    Ok(())
}

/// The namespace the library keeps its private xattrs in for this user: the first of
/// `trusted`, `user` it can write in the workdir (the probe `Upper::open` makes).
fn library_namespace(workdir: &Path) -> &'static str {
    let Ok(work) = open_dir_path(&workdir.join("work")) else {
        return "none";
    };
    let probe = c"strata-commit-probe";
    let flags = libc::O_WRONLY | libc::O_EXCL;
    let Ok(fd) = sys::create_child(work.as_fd(), probe, flags, 0o600) else {
        return "none";
    };
    drop(fd);
    let ns = NAMESPACES.into_iter().find(|ns| {
        let x = cstring(format!("{ns}.overlay.probe").as_bytes()).expect("no NUL");
        sys::set_xattr_at(work.as_fd(), probe, &x, b"1", 0).is_ok()
    });
    let _ = sys::unlink_at(work.as_fd(), probe, 0);
    ns.unwrap_or("none")
}

fn open_dir_path(path: &Path) -> Result<OwnedFd> {
    let f = File::open(path).with_context(|| path.display().to_string())?;
    Ok(OwnedFd::from(f))
}
