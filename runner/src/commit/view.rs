//! A merged view of layers through the library's core overlay (no FUSE involved): lookups by
//! name or path, attributes, data, symlink targets and the xattrs a user would see.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use strata_fs::inode::{InoMapper, ROOT_INO};
use strata_fs::layers::LayerStack;
use strata_fs::options::MountConfig;
use strata_fs::overlay::{Overlay, OverlayOptions};

/// Bytes read per request when copying file data.
const CHUNK: u32 = 1 << 20;

/// The `io::Error` for an overlay `errno`.
pub(super) fn os_err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// A path as bytes, for messages.
pub(super) fn show(path: &[u8]) -> String {
    if path.is_empty() {
        "/".to_string()
    } else {
        String::from_utf8_lossy(path).into_owned()
    }
}

/// What a view says about one object: our inode number is in `st.st_ino`.
pub(super) type Attr = libc::stat;

/// A read-only merged view of `lowers` (top first), optionally with an upper layer on top.
pub(super) struct View {
    ov: Overlay,
    /// The same inode numbering as the overlay's, to predict the number of a known object.
    inos: InoMapper,
}

impl View {
    /// Opens the view. With an upper layer this prepares `work/work` (clears it), as a mount
    /// would.
    pub fn open(lowers: &[PathBuf], upper: Option<(&Path, &Path)>) -> Result<View> {
        let upper = upper.map(|(u, w)| (u.to_path_buf(), w.to_path_buf()));
        let cfg = MountConfig::for_layers(lowers.to_vec(), upper, PathBuf::from("/unused"));
        let stack = LayerStack::open(&cfg)?;
        // Overlay::new numbers inodes from the layers' devices in this order.
        let inos = InoMapper::with_devs(stack.layers().iter().map(|l| l.dev));
        let opts = OverlayOptions {
            read_only: true,
            ..OverlayOptions::default()
        };
        let ov = Overlay::new(stack, opts)
            .map_err(os_err)
            .context("opening the layer stack")?;
        Ok(View { ov, inos })
    }

    /// The inode number the view gives the real object `(dev, ino)` when it shows it.
    pub fn ino_of(&self, dev: u64, ino: u64) -> u64 {
        self.inos.ino(dev, ino)
    }

    /// Attributes of the root directory.
    pub fn root(&self) -> Result<Attr> {
        self.getattr(ROOT_INO, b"")
    }

    fn getattr(&self, ino: u64, path: &[u8]) -> Result<Attr> {
        let a = self.ov.getattr(ino).map_err(os_err);
        Ok(a.with_context(|| format!("stat {}", show(path)))?.st)
    }

    /// Looks `name` up in directory `parent` (whose path is `path`, for messages); `None`
    /// when the merged view has no such name. Pair with [`View::forget`].
    pub fn lookup(&self, parent: u64, path: &[u8], name: &[u8]) -> Result<Option<Attr>> {
        match self.ov.lookup(parent, OsStr::from_bytes(name)) {
            Ok(a) => Ok(Some(a.st)),
            Err(libc::ENOENT) | Err(libc::ENOTDIR) => Ok(None),
            Err(e) => Err(os_err(e)).with_context(|| {
                format!(
                    "looking up {} in {}",
                    String::from_utf8_lossy(name),
                    show(path)
                )
            }),
        }
    }

    /// Looks up a path (no leading slash; empty for the root) one name at a time.
    pub fn lookup_path(&self, path: &[u8]) -> Result<Option<Attr>> {
        let mut cur = self.root()?;
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            if !is_dir(&cur) {
                return Ok(None);
            }
            match self.lookup(cur.st_ino, path, comp)? {
                Some(a) => cur = a,
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// Drops the reference a lookup took.
    pub fn forget(&self, ino: u64) {
        if ino != ROOT_INO {
            self.ov.forget(ino, 1);
        }
    }

    /// The names in directory `ino` (without `.` and `..`), sorted.
    pub fn list(&self, ino: u64, path: &[u8]) -> Result<Vec<Box<[u8]>>> {
        let fh = self
            .ov
            .opendir(ino)
            .map_err(os_err)
            .with_context(|| format!("listing {}", show(path)))?;
        let entries = self.ov.dir_entries(fh).map_err(os_err);
        self.ov.release(fh);
        let mut names: Vec<Box<[u8]>> = entries?
            .iter()
            .map(|e| e.name.clone())
            .filter(|n| n.as_ref() != b"." && n.as_ref() != b"..")
            .collect();
        names.sort();
        Ok(names)
    }

    /// Target of symlink `ino`.
    pub fn readlink(&self, ino: u64, path: &[u8]) -> Result<Vec<u8>> {
        let t = self.ov.readlink(ino).map_err(os_err);
        t.with_context(|| format!("readlink {}", show(path)))
    }

    /// The xattrs a user sees on `ino` (escaped names already turned back), sorted by name.
    pub fn xattrs(&self, ino: u64, path: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let names = match self.ov.listxattr(ino) {
            Ok(n) => n,
            Err(libc::ENOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(os_err(e)).with_context(|| format!("listxattr {}", show(path))),
        };
        let mut out = Vec::new();
        for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            match self.ov.getxattr(ino, OsStr::from_bytes(name)) {
                Ok(v) => out.push((name.to_vec(), v)),
                Err(libc::ENODATA) => {} // removed since the listing
                Err(e) => {
                    return Err(os_err(e)).with_context(|| {
                        format!(
                            "getxattr {} of {}",
                            String::from_utf8_lossy(name),
                            show(path)
                        )
                    })
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Copies the data of regular file `ino` into `dst` (holes stay holes where the data
    /// reads as zeros).
    pub fn copy_data(&self, ino: u64, path: &[u8], dst: &File) -> Result<()> {
        let fh = self
            .ov
            .open(ino, libc::O_RDONLY)
            .map_err(os_err)
            .with_context(|| format!("opening {}", show(path)))?;
        let copied = copy_chunks(|off| self.ov.read(fh, off, CHUNK).map_err(os_err), dst);
        self.ov.release(fh);
        copied.with_context(|| format!("copying the data of {}", show(path)))
    }
}

/// Whether `st` is a directory.
pub(super) fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Copies everything `read(offset)` returns (until an empty read) into `dst`. Chunks of
/// zeros are skipped and the file is sized at the end, so sparse files stay sparse.
pub(super) fn copy_chunks(
    mut read: impl FnMut(u64) -> io::Result<Vec<u8>>,
    dst: &File,
) -> Result<()> {
    let mut off = 0u64;
    loop {
        let buf = read(off).context("read")?;
        if buf.is_empty() {
            break;
        }
        if buf.iter().any(|&b| b != 0) {
            dst.write_all_at(&buf, off).context("write")?;
        }
        off += buf.len() as u64;
    }
    dst.set_len(off).context("setting the size")
}

/// Reads a whole regular file through `file`, for [`copy_chunks`].
pub(super) fn file_reader(file: &File) -> impl FnMut(u64) -> io::Result<Vec<u8>> + '_ {
    move |off| {
        let mut buf = vec![0u8; CHUNK as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }
}

/// An error for a view that cannot show an object the upper layer holds.
pub(super) fn invisible(path: &[u8]) -> anyhow::Error {
    anyhow!(
        "{} is in the upper layer but not in the merged view",
        show(path)
    )
}
