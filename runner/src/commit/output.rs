//! Writing the new layer: objects with their owner, mode, xattrs and times, OCI whiteouts and
//! opaque markers, hard links. Directory owner, mode and times are applied last, deepest
//! first, so that filling a directory cannot change them (nor a read-only mode stop it).

use std::ffi::CStr;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use strata_fs::inode::split_path;
use strata_fs::{sys, whiteout};

use super::upper::{cstring, open_dir};
use super::view::{os_err, show};

/// A directory whose metadata is applied by [`Output::finish`].
struct PendingDir {
    path: Vec<u8>,
    st: libc::stat,
}

/// The output layer being written.
pub(super) struct Output {
    root: OwnedFd,
    pending: Vec<PendingDir>,
    /// The parent directory used last: most objects go into the same one as the previous.
    cached: Option<(Vec<u8>, OwnedFd)>,
}

impl Output {
    /// Opens the (existing, empty) output directory.
    pub fn open(path: &Path) -> Result<Output> {
        let root = File::open(path).with_context(|| format!("output {}", path.display()))?;
        Ok(Output {
            root: OwnedFd::from(root),
            pending: Vec::new(),
            cached: None,
        })
    }

    /// Descriptor of the output directory at `path`.
    fn dir(&mut self, path: &[u8]) -> Result<BorrowedFd<'_>> {
        if self.cached.as_ref().is_none_or(|(p, _)| p != path) {
            let fd = open_dir(self.root.as_fd(), path)
                .with_context(|| format!("output directory {}", show(path)))?;
            self.cached = Some((path.to_vec(), fd));
        }
        Ok(self.cached.as_ref().expect("just set").1.as_fd())
    }

    /// Whether the output already holds `path`.
    pub fn exists(&mut self, path: &[u8]) -> Result<bool> {
        let (parent, name) = split_path(path);
        let name = cstring(name)?;
        match open_dir(self.root.as_fd(), parent) {
            Ok(fd) => Ok(sys::stat_at(fd.as_fd(), &name).is_ok()),
            Err(_) => Ok(false),
        }
    }

    /// Sets up the root directory's metadata (it already exists).
    pub fn root(&mut self, st: &libc::stat, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        set_xattrs(self.root.as_fd(), c"", xattrs).context("output root")?;
        self.pending.push(PendingDir {
            path: Vec::new(),
            st: *st,
        });
        Ok(())
    }

    /// Creates directory `path`; its owner, mode and times come at [`Output::finish`].
    pub fn mkdir(
        &mut self,
        path: &[u8],
        st: &libc::stat,
        xattrs: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<()> {
        let (parent, name) = split_path(path);
        let cname = cstring(name)?;
        let dir = self.dir(parent)?;
        // Owner-writable until finish, whatever its final mode.
        sys::mkdir_at(dir, &cname, 0o700)
            .map_err(os_err)
            .with_context(|| format!("mkdir {}", show(path)))?;
        set_xattrs(dir, &cname, xattrs).with_context(|| show(path))?;
        self.pending.push(PendingDir {
            path: path.to_vec(),
            st: *st,
        });
        Ok(())
    }

    /// Writes regular file `path`; `fill` puts the data in.
    pub fn file(
        &mut self,
        path: &[u8],
        st: &libc::stat,
        xattrs: &[(Vec<u8>, Vec<u8>)],
        fill: impl FnOnce(&File) -> Result<()>,
    ) -> Result<()> {
        let (parent, name) = split_path(path);
        let cname = cstring(name)?;
        let dir = self.dir(parent)?;
        let fd = sys::create_child(dir, &cname, libc::O_EXCL | libc::O_WRONLY, 0o600)
            .map_err(os_err)
            .with_context(|| format!("creating {}", show(path)))?;
        fill(&File::from(fd))?;
        finish_object(dir, &cname, st, xattrs).with_context(|| show(path))
    }

    /// Writes symlink `path -> target`.
    pub fn symlink(
        &mut self,
        path: &[u8],
        target: &[u8],
        st: &libc::stat,
        xattrs: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<()> {
        let (parent, name) = split_path(path);
        let cname = cstring(name)?;
        let dir = self.dir(parent)?;
        sys::symlink_at(&cstring(target)?, dir, &cname)
            .map_err(os_err)
            .with_context(|| format!("symlink {}", show(path)))?;
        finish_object(dir, &cname, st, xattrs).with_context(|| show(path))
    }

    /// Recreates the fifo, socket or device node `path`.
    pub fn special(
        &mut self,
        path: &[u8],
        st: &libc::stat,
        xattrs: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<()> {
        let (parent, name) = split_path(path);
        let cname = cstring(name)?;
        let dir = self.dir(parent)?;
        let kind = st.st_mode & libc::S_IFMT;
        sys::mknod_at(dir, &cname, kind | 0o600, st.st_rdev)
            .map_err(os_err)
            .with_context(|| format!("mknod {}", show(path)))?;
        finish_object(dir, &cname, st, xattrs).with_context(|| show(path))
    }

    /// Makes `path` another name of the already written `existing`.
    pub fn link(&mut self, existing: &[u8], path: &[u8]) -> Result<()> {
        let (oparent, oname) = split_path(existing);
        let odir = open_dir(self.root.as_fd(), oparent)?;
        let (parent, name) = split_path(path);
        let cname = cstring(name)?;
        let dir = self.dir(parent)?;
        sys::link_at(odir.as_fd(), &cstring(oname)?, dir, &cname)
            .map_err(os_err)
            .with_context(|| format!("link {} to {}", show(path), show(existing)))
    }

    /// Records that `name` in directory `dir` is deleted: an empty `.wh.NAME` of mode 0.
    pub fn whiteout(&mut self, dir: &[u8], name: &[u8]) -> Result<()> {
        self.marker(dir, &whiteout::oci_whiteout_name(name))
    }

    /// Makes directory `dir` opaque: an empty `.wh..wh..opq` of mode 0 inside.
    pub fn opaque(&mut self, dir: &[u8]) -> Result<()> {
        self.marker(dir, whiteout::OCI_OPAQUE)
    }

    fn marker(&mut self, dir: &[u8], name: &[u8]) -> Result<()> {
        if name.len() > 255 {
            bail!(
                "{}/{}: the name is too long for an OCI whiteout",
                show(dir),
                String::from_utf8_lossy(name)
            );
        }
        let cname = cstring(name)?;
        let fd = self.dir(dir)?;
        let created = sys::create_child(fd, &cname, libc::O_EXCL | libc::O_WRONLY, 0);
        created
            .map(drop)
            .map_err(os_err)
            .with_context(|| format!("creating {}/{}", show(dir), String::from_utf8_lossy(name)))
    }

    /// Applies the directories' owner, mode and times, deepest first.
    pub fn finish(&mut self) -> Result<()> {
        self.cached = None;
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_by_key(|d| std::cmp::Reverse(depth(&d.path)));
        for d in pending {
            let fd = open_dir(self.root.as_fd(), &d.path)?;
            set_owner_mode_times(fd.as_fd(), c"", &d.st)
                .with_context(|| format!("output directory {}", show(&d.path)))?;
        }
        Ok(())
    }
}

/// Owner, mode, xattrs, then times: chown clears set-id bits and capabilities, and every
/// change but the times themselves moves ctime only.
fn finish_object(
    dir: BorrowedFd<'_>,
    name: &CStr,
    st: &libc::stat,
    xattrs: &[(Vec<u8>, Vec<u8>)],
) -> Result<()> {
    chown(dir, name, st)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
        sys::chmod_at(dir, name, st.st_mode & 0o7777)
            .map_err(os_err)
            .context("chmod")?;
    }
    set_xattrs(dir, name, xattrs)?;
    set_times(dir, name, st)
}

fn set_owner_mode_times(dir: BorrowedFd<'_>, name: &CStr, st: &libc::stat) -> Result<()> {
    chown(dir, name, st)?;
    sys::chmod_at(dir, name, st.st_mode & 0o7777)
        .map_err(os_err)
        .context("chmod")?;
    set_times(dir, name, st)
}

fn chown(dir: BorrowedFd<'_>, name: &CStr, st: &libc::stat) -> Result<()> {
    sys::chown_at(dir, name, st.st_uid, st.st_gid)
        .map_err(os_err)
        .with_context(|| format!("chown to {}:{}", st.st_uid, st.st_gid))
}

fn set_xattrs(dir: BorrowedFd<'_>, name: &CStr, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
    for (x, v) in xattrs {
        sys::set_xattr_at(dir, name, &cstring(x)?, v, 0)
            .map_err(os_err)
            .with_context(|| format!("setxattr {}", String::from_utf8_lossy(x)))?;
    }
    Ok(())
}

fn set_times(dir: BorrowedFd<'_>, name: &CStr, st: &libc::stat) -> Result<()> {
    sys::set_times_from(dir, name, st)
        .map_err(os_err)
        .context("setting times")
}

/// Number of names in a layer-relative path (0 for the root).
fn depth(path: &[u8]) -> usize {
    match path {
        [] => 0,
        p => 1 + p.iter().filter(|&&b| b == b'/').count(),
    }
}

/// The output directory while the commit runs: made empty again (or removed, if the commit
/// created it) unless [`OutputGuard::keep`] is called, so a failed commit leaves no
/// half-written layer behind.
pub(super) struct OutputGuard {
    path: PathBuf,
    /// The mode of an output directory that existed before, to give back on failure.
    previous: Option<fs::Permissions>,
    keep: bool,
}

impl OutputGuard {
    /// Checks that `path` does not exist or is an empty directory, and creates it if needed.
    pub fn prepare(path: &Path) -> Result<OutputGuard> {
        let previous = match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(path)
                    .with_context(|| format!("creating output {}", path.display()))?;
                None
            }
            Err(e) => return Err(e).with_context(|| format!("output {}", path.display())),
            Ok(md) if !md.is_dir() => {
                bail!("output {} exists and is not a directory", path.display())
            }
            Ok(md) => {
                let mut entries =
                    fs::read_dir(path).with_context(|| format!("output {}", path.display()))?;
                if entries.next().is_some() {
                    bail!("output {} is not empty", path.display());
                }
                Some(md.permissions())
            }
        };
        Ok(OutputGuard {
            path: path.to_path_buf(),
            previous,
            keep: false,
        })
    }

    /// The commit succeeded: leave the output as it is.
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for OutputGuard {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let Some(previous) = self.previous.take() else {
            let _ = fs::remove_dir_all(&self.path);
            return;
        };
        // Owner-writable while emptying it (finish() may have applied a read-only mode),
        // then the caller's directory gets its own mode back.
        let _ = fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700));
        if let Ok(entries) = fs::read_dir(&self.path) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = match e.file_type() {
                    Ok(t) if t.is_dir() => fs::remove_dir_all(&p),
                    _ => fs::remove_file(&p),
                };
            }
        }
        let _ = fs::set_permissions(&self.path, previous);
    }
}
