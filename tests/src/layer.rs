//! A small builder for layer directories: files, directories, links, special files, xattrs and
//! every whiteout/opaque format stratafs must honour.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::fsops::{lgetxattr, lsetxattr};

/// A whiteout format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteout {
    /// Character device 0:0 named like the hidden entry (kernel form).
    CharDev,
    /// `.wh.NAME` entry (OCI form).
    Oci,
    /// Zero-size file with `trusted.overlay.whiteout`; the parent gets
    /// `trusted.overlay.opaque=x` (the kernel needs it in readdir).
    TrustedXattr,
    /// Zero-size file with `user.overlay.whiteout`; the parent gets `user.overlay.opaque=x`.
    UserXattr,
}

impl Whiteout {
    /// Every format.
    pub const ALL: [Whiteout; 4] = [
        Whiteout::CharDev,
        Whiteout::Oci,
        Whiteout::TrustedXattr,
        Whiteout::UserXattr,
    ];
}

/// An opaque-directory format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opaque {
    /// xattr `trusted.overlay.opaque=y`.
    TrustedXattr,
    /// xattr `user.overlay.opaque=y`.
    UserXattr,
    /// A `.wh..wh..opq` entry inside the directory (OCI form).
    Oci,
}

impl Opaque {
    /// Every format.
    pub const ALL: [Opaque; 3] = [Opaque::TrustedXattr, Opaque::UserXattr, Opaque::Oci];
}

/// A layer directory being built. Every method takes a path relative to the layer root,
/// creates missing parent directories, and panics on failure.
#[derive(Debug, Clone)]
pub struct Layer {
    root: PathBuf,
}

fn mknod(path: &Path, mode: u32, major: u32, minor: u32) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let r = unsafe { libc::mknod(p.as_ptr(), mode, libc::makedev(major, minor)) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

impl Layer {
    /// Creates (if needed) and wraps the layer directory `root`.
    pub fn new(root: impl AsRef<Path>) -> Layer {
        let root = root.as_ref().to_path_buf();
        fs::create_dir_all(&root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
        Layer { root }
    }

    /// The layer directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Absolute path of `rel` in the layer.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root.join(rel)
    }

    fn prep(&self, rel: &Path) -> PathBuf {
        let p = self.root.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
        }
        p
    }

    /// A directory (and its parents).
    pub fn dir(&self, rel: impl AsRef<Path>) -> &Self {
        let p = self.root.join(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        self
    }

    /// A regular file with `content` (mode 0644).
    pub fn file(&self, rel: impl AsRef<Path>, content: impl AsRef<[u8]>) -> &Self {
        let p = self.prep(rel.as_ref());
        fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        self
    }

    /// A regular file with `content` and permission bits `mode`.
    pub fn file_mode(&self, rel: impl AsRef<Path>, content: impl AsRef<[u8]>, mode: u32) -> &Self {
        self.file(rel.as_ref(), content).mode(rel, mode)
    }

    /// `chmod` (not for symlinks).
    pub fn mode(&self, rel: impl AsRef<Path>, mode: u32) -> &Self {
        let p = self.root.join(rel);
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
        self
    }

    /// `lchown`.
    pub fn owner(&self, rel: impl AsRef<Path>, uid: u32, gid: u32) -> &Self {
        let p = self.root.join(rel);
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("lchown {}: {e}", p.display()));
        self
    }

    /// A symbolic link `rel -> target`.
    pub fn symlink(&self, rel: impl AsRef<Path>, target: impl AsRef<Path>) -> &Self {
        let p = self.prep(rel.as_ref());
        std::os::unix::fs::symlink(target.as_ref(), &p)
            .unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
        self
    }

    /// A hard link `rel` to the existing `existing` (both relative to the layer).
    pub fn hardlink(&self, rel: impl AsRef<Path>, existing: impl AsRef<Path>) -> &Self {
        let p = self.prep(rel.as_ref());
        fs::hard_link(self.root.join(existing), &p)
            .unwrap_or_else(|e| panic!("link {}: {e}", p.display()));
        self
    }

    /// A named pipe (mode 0644).
    pub fn fifo(&self, rel: impl AsRef<Path>) -> &Self {
        let p = self.prep(rel.as_ref());
        mknod(&p, libc::S_IFIFO | 0o644, 0, 0);
        self
    }

    /// A character device `major:minor` (mode 0644).
    pub fn chardev(&self, rel: impl AsRef<Path>, major: u32, minor: u32) -> &Self {
        let p = self.prep(rel.as_ref());
        mknod(&p, libc::S_IFCHR | 0o644, major, minor);
        self
    }

    /// An extended attribute on `rel` (not following symlinks).
    pub fn xattr(&self, rel: impl AsRef<Path>, name: &str, value: impl AsRef<[u8]>) -> &Self {
        let p = self.root.join(rel);
        lsetxattr(&p, name, value.as_ref())
            .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", p.display()));
        self
    }

    /// A whiteout hiding `rel` of the layers below, in format `kind`.
    pub fn whiteout(&self, rel: impl AsRef<Path>, kind: Whiteout) -> &Self {
        let rel = rel.as_ref();
        let p = self.prep(rel);
        match kind {
            Whiteout::CharDev => mknod(&p, libc::S_IFCHR | 0o644, 0, 0),
            Whiteout::Oci => {
                let name = rel.file_name().expect("whiteout needs a name");
                let mut wh = std::ffi::OsString::from(".wh.");
                wh.push(name);
                let w = p.with_file_name(wh);
                fs::write(&w, b"").unwrap();
            }
            Whiteout::TrustedXattr | Whiteout::UserXattr => {
                let ns = if kind == Whiteout::TrustedXattr {
                    "trusted"
                } else {
                    "user"
                };
                fs::write(&p, b"").unwrap();
                lsetxattr(&p, &format!("{ns}.overlay.whiteout"), b"").unwrap();
                let parent = p.parent().unwrap();
                let opq = format!("{ns}.overlay.opaque");
                if lgetxattr(parent, &opq).is_err() {
                    lsetxattr(parent, &opq, b"x").unwrap();
                }
            }
        }
        self
    }

    /// Makes directory `rel` (created if needed) opaque, in format `kind`.
    pub fn opaque(&self, rel: impl AsRef<Path>, kind: Opaque) -> &Self {
        self.dir(rel.as_ref());
        let p = self.root.join(rel);
        match kind {
            Opaque::TrustedXattr => lsetxattr(&p, "trusted.overlay.opaque", b"y").unwrap(),
            Opaque::UserXattr => lsetxattr(&p, "user.overlay.opaque", b"y").unwrap(),
            Opaque::Oci => fs::write(p.join(".wh..wh..opq"), b"").unwrap(),
        }
        self
    }
}

/// Deterministic pseudo-random bytes (xorshift), for file contents larger than a page.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
