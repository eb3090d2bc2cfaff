//! Reading the upper layer itself: which entries of a directory are objects and which are
//! whiteouts, opaque markers, renamed directories and metadata-only copies, in every format
//! stratafs or kernel overlayfs writes (the rules are the library's, see `whiteout.rs`).

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{bail, Context, Result};
use strata_fs::sys;
use strata_fs::whiteout::{self, DirMarks};

use super::view::{os_err, show};

/// The overlay xattr namespaces, in the order we read them.
pub(super) const NAMESPACES: [&str; 2] = ["trusted", "user"];

/// One directory of the upper layer, classified.
pub(super) struct UpperDir {
    /// `O_PATH` descriptor of the directory.
    pub fd: OwnedFd,
    /// Nothing of the lower layers shows through it.
    pub opaque: bool,
    /// Real objects, sorted by name, with their real attributes.
    pub objects: Vec<(Box<[u8]>, libc::stat)>,
    /// Names hidden from the layers below, in whatever format.
    pub whiteouts: BTreeSet<Box<[u8]>>,
}

impl UpperDir {
    /// Opens and classifies the upper directory at `path` (empty for the root).
    pub fn open(root: BorrowedFd<'_>, path: &[u8]) -> Result<UpperDir> {
        let fd = open_dir(root, path).with_context(|| format!("upper {}", show(path)))?;
        let marks = whiteout::dir_marks(fd.as_fd());
        let mut dir = UpperDir {
            fd,
            opaque: marks.opaque,
            objects: Vec::new(),
            whiteouts: BTreeSet::new(),
        };
        let entries = sys::read_dir(dir.fd.as_fd())
            .map_err(os_err)
            .with_context(|| format!("listing upper {}", show(path)))?;
        for e in entries {
            dir.classify(e.name, marks, path)?;
        }
        dir.objects.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(dir)
    }

    fn classify(&mut self, name: Box<[u8]>, marks: DirMarks, path: &[u8]) -> Result<()> {
        if name.as_ref() == whiteout::OCI_OPAQUE {
            return Ok(()); // already in `marks`
        }
        if let Some(target) = name.strip_prefix(whiteout::OCI_PREFIX) {
            // A bare `.wh.` hides nothing.
            if !target.is_empty() {
                self.whiteouts.insert(target.into());
            }
            return Ok(());
        }
        let cname = cstring(&name)?;
        let st = match sys::stat_at(self.fd.as_fd(), &cname) {
            Ok(st) => st,
            Err(e) => {
                return Err(os_err(e)).with_context(|| format!("stat upper {}", show(path)));
            }
        };
        let xattr_whiteout = marks.xattr_whiteouts
            && whiteout::may_be_xattr_whiteout(&st)
            && whiteout::has_whiteout_xattr(self.fd.as_fd(), &cname);
        if whiteout::is_chardev_whiteout(&st) || xattr_whiteout {
            self.whiteouts.insert(name);
        } else {
            self.objects.push((name, st));
        }
        Ok(())
    }

    /// Whether the directory holds a real object called `name`.
    pub fn has_object(&self, name: &[u8]) -> bool {
        self.objects
            .binary_search_by(|(n, _)| n.as_ref().cmp(name))
            .is_ok()
    }

    /// Where the lower copies of subdirectory `name` are, if it is a renamed directory.
    pub fn redirect(&self, name: &[u8]) -> Result<Option<Redirect>> {
        let cname = cstring(name)?;
        let Some(v) = overlay_xattr(self.fd.as_fd(), &cname, "redirect") else {
            return Ok(None);
        };
        let v = v.strip_suffix(b"/").unwrap_or(&v);
        Ok(Some(match v.strip_prefix(b"/") {
            Some(abs) => Redirect::Absolute(abs.to_vec()),
            // The kernel writes a bare name for a rename inside one directory.
            None => Redirect::Relative(v.to_vec()),
        }))
    }

    /// The metadata-only mark of regular file `name`: the namespace it is in and the path
    /// (in its lower layer, no leading slash) of the file holding its data.
    pub fn metacopy(&self, name: &[u8], path: &[u8]) -> Result<Option<(&'static str, Vec<u8>)>> {
        let cname = cstring(name)?;
        if overlay_xattr(self.fd.as_fd(), &cname, "metacopy").is_some() {
            bail!(
                "{} is a metadata-only copy made by kernel overlayfs (metacopy=on), which \
                 strata commit does not read",
                show(path)
            );
        }
        for ns in NAMESPACES {
            let x = CString::new(format!("{ns}.overlay.strata.metacopy")).expect("no NUL");
            if let Ok(v) = sys::get_xattr_at(self.fd.as_fd(), &cname, &x) {
                let data = v.strip_prefix(b"/").unwrap_or(&v).to_vec();
                return Ok(Some((ns, data)));
            }
        }
        Ok(None)
    }
}

/// Where a renamed directory came from, as its `overlay.redirect` xattr says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Redirect {
    /// A path from the layer root (no leading slash).
    Absolute(Vec<u8>),
    /// A name in the lower copy of the same parent directory.
    Relative(Vec<u8>),
}

impl Redirect {
    /// The path in the lower layers, given where the parent's lower copies are.
    pub fn lower_path(&self, lower_parent: &[u8]) -> Vec<u8> {
        match self {
            Redirect::Absolute(p) => p.clone(),
            Redirect::Relative(name) => join(lower_parent, name),
        }
    }
}

/// Whether the lower object at `path` can show through the upper layer: no upper entry at
/// the path, and every upper ancestor a plain directory (not opaque, not renamed, no
/// whiteout for the next name).
pub(super) fn lower_shows_through(root: BorrowedFd<'_>, path: &[u8]) -> Result<bool> {
    let comps: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
    let mut dir = sys::dup(root).map_err(os_err)?;
    for (i, comp) in comps.iter().enumerate() {
        let cname = cstring(comp)?;
        if whiteout::has_oci_whiteout(dir.as_fd(), comp) {
            return Ok(false);
        }
        let st = match sys::stat_at(dir.as_fd(), &cname) {
            Ok(st) => st,
            // Nothing of the path is in the upper layer from here down.
            Err(libc::ENOENT) => return Ok(true),
            Err(e) => return Err(os_err(e)).with_context(|| format!("stat upper {}", show(path))),
        };
        let last = i + 1 == comps.len();
        if last || st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Ok(false); // an upper object or whiteout covers it
        }
        if overlay_xattr(dir.as_fd(), &cname, "redirect").is_some() {
            return Ok(false); // its lower copies are elsewhere now
        }
        let child = sys::open_child(dir.as_fd(), &cname, libc::O_PATH | libc::O_DIRECTORY)
            .map_err(os_err)?;
        if whiteout::dir_marks(child.as_fd()).opaque {
            return Ok(false);
        }
        dir = child;
    }
    Ok(true)
}

/// The value of the overlay marker xattr `what`, in either namespace (trusted first). User
/// xattrs of that name are stored escaped, so they never match.
pub(super) fn overlay_xattr(dir: BorrowedFd<'_>, name: &CStr, what: &str) -> Option<Vec<u8>> {
    NAMESPACES.iter().find_map(|ns| {
        let x = CString::new(format!("{ns}.overlay.{what}")).expect("no NUL");
        sys::get_xattr_at(dir, name, &x).ok()
    })
}

/// `O_PATH` descriptor of the directory at `path` below `root`, never leaving it.
pub(super) fn open_dir(root: BorrowedFd<'_>, path: &[u8]) -> Result<OwnedFd> {
    let flags = libc::O_PATH | libc::O_DIRECTORY;
    let fd = if path.is_empty() {
        sys::dup(root)
    } else {
        sys::open_beneath(root, &cstring(path)?, flags)
    };
    fd.map_err(os_err).context("open")
}

/// `parent/name` as a layer-relative path.
pub(super) fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = parent.to_vec();
    if !v.is_empty() {
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

/// A name or path as a C string.
pub(super) fn cstring(bytes: &[u8]) -> Result<CString> {
    CString::new(bytes).context("a name holds a NUL byte")
}
