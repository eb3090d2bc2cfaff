//! Rewriting a copy of a layer into the forms kernel overlayfs understands, so that the same
//! stack can be mounted by the kernel for comparison.
//!
//! The kernel does not know OCI `.wh.NAME` / `.wh..wh..opq` entries, reads only one xattr
//! namespace per mount (`trusted.overlay.*`, or `user.overlay.*` with `userxattr`), and
//! honours xattr whiteouts only in lower layers.

use std::fs;
use std::path::Path;

use crate::fsops::{lgetxattr, lremovexattr, lsetxattr};

/// The overlay xattr namespace a kernel mount reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrNs {
    /// `trusted.overlay.*` (default mount).
    Trusted,
    /// `user.overlay.*` (`-o userxattr`).
    User,
}

impl XattrNs {
    fn prefix(self) -> &'static str {
        match self {
            XattrNs::Trusted => "trusted",
            XattrNs::User => "user",
        }
    }

    fn other(self) -> XattrNs {
        match self {
            XattrNs::Trusted => XattrNs::User,
            XattrNs::User => XattrNs::Trusted,
        }
    }
}

fn chardev_whiteout(p: &Path) {
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str())).unwrap();
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(0, 0)) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn is_xattr_whiteout(p: &Path, ns: XattrNs) -> bool {
    let Ok(md) = fs::symlink_metadata(p) else {
        return false;
    };
    md.is_file()
        && md.len() == 0
        && lgetxattr(p, &format!("{}.overlay.whiteout", ns.prefix())).is_ok()
}

/// Rewrites the layer at `root` in place for a kernel mount reading namespace `ns`:
/// OCI whiteouts become char 0:0 devices, OCI opaque markers and the other namespace's
/// opaque xattrs become `ns` opaque xattrs, the other namespace's xattr whiteouts become
/// char 0:0 devices. With `upper`, `ns` xattr whiteouts become char 0:0 devices too (and
/// `opaque=x` markers go away).
pub fn normalize_for_kernel(root: &Path, ns: XattrNs, upper: bool) {
    let mine = ns.prefix();
    let theirs = ns.other().prefix();
    let mut names: Vec<_> = fs::read_dir(root)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", root.display()))
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    let mut make_opaque = false;
    for n in names {
        let p = root.join(&n);
        let s = n.to_string_lossy().into_owned();
        if s == ".wh..wh..opq" {
            fs::remove_file(&p).unwrap();
            make_opaque = true;
        } else if let Some(target) = s.strip_prefix(".wh.") {
            fs::remove_file(&p).unwrap();
            let t = root.join(target);
            if fs::symlink_metadata(&t).is_err() {
                chardev_whiteout(&t);
            }
        } else if is_xattr_whiteout(&p, ns.other()) || (upper && is_xattr_whiteout(&p, ns)) {
            fs::remove_file(&p).unwrap();
            chardev_whiteout(&p);
        } else if fs::symlink_metadata(&p).unwrap().is_dir() {
            normalize_for_kernel(&p, ns, upper);
        }
    }
    let mine_opq = format!("{mine}.overlay.opaque");
    let theirs_opq = format!("{theirs}.overlay.opaque");
    if let Ok(v) = lgetxattr(root, &theirs_opq) {
        lremovexattr(root, &theirs_opq).unwrap();
        if v == b"y" {
            make_opaque = true;
        }
    }
    if upper && lgetxattr(root, &mine_opq).ok().as_deref() == Some(b"x") {
        lremovexattr(root, &mine_opq).unwrap();
    }
    if make_opaque {
        lsetxattr(root, &mine_opq, b"y").unwrap();
    }
}
