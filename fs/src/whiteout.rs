//! Whiteout and opaque-directory formats: the one place that knows how each is spelled.
//!
//! Whiteouts (a name hidden from lower layers):
//! - a character device 0:0 with that name (kernel form);
//! - a `.wh.NAME` entry beside it (OCI form);
//! - a zero-size regular file with xattr `trusted.overlay.whiteout` or `user.overlay.whiteout`
//!   (kernel xattr form). As in the kernel, these are honoured only in a directory that
//!   announces them with `overlay.opaque=x`, so listings need no per-file xattr reads.
//!
//! Opaque directories (nothing below shows through): xattr `trusted.overlay.opaque=y`,
//! `user.overlay.opaque=y`, or a `.wh..wh..opq` entry inside.

use std::borrow::Cow;
use std::ffi::CStr;
use std::os::fd::BorrowedFd;

use crate::fdcache::LayerDir;
use crate::sys;

/// Prefix of OCI whiteout entries.
pub const OCI_PREFIX: &[u8] = b".wh.";
/// Name of the OCI opaque marker entry.
pub const OCI_OPAQUE: &[u8] = b".wh..wh..opq";

const OPAQUE_XATTRS: [&CStr; 2] = [c"trusted.overlay.opaque", c"user.overlay.opaque"];
const WHITEOUT_XATTRS: [&CStr; 2] = [c"trusted.overlay.whiteout", c"user.overlay.whiteout"];

/// Whether a name is one of the overlay's marker entries, which are never visible.
pub fn is_marker_name(name: &[u8]) -> bool {
    name.starts_with(OCI_PREFIX)
}

/// The `.wh.NAME` spelling of a whiteout for `name`.
pub fn oci_whiteout_name(name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(OCI_PREFIX.len() + name.len());
    v.extend_from_slice(OCI_PREFIX);
    v.extend_from_slice(name);
    v
}

const PRIVATE_PREFIXES: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];

/// Whether an xattr name, as stored in a layer, belongs to the overlay (its markers and our
/// own records live under these prefixes) and must be hidden from users.
pub fn is_private_xattr(name: &[u8]) -> bool {
    PRIVATE_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The name under which a user's xattr is stored in a layer. As in the kernel (6.7+), a user
/// may set `trusted.overlay.X` through the mount; it is stored escaped as
/// `trusted.overlay.overlay.X` so it cannot be taken for a marker.
pub fn stored_xattr_name(visible: &[u8]) -> Vec<u8> {
    for p in PRIVATE_PREFIXES {
        if let Some(rest) = visible.strip_prefix(p) {
            let mut v = p.to_vec();
            v.extend_from_slice(b"overlay.");
            v.extend_from_slice(rest);
            return v;
        }
    }
    visible.to_vec()
}

/// The name a user sees for an xattr stored in a layer, or `None` if it is the overlay's own.
pub fn visible_xattr_name(stored: &[u8]) -> Option<Cow<'_, [u8]>> {
    for p in PRIVATE_PREFIXES {
        if let Some(rest) = stored.strip_prefix(p) {
            // "trusted.overlay.overlay.X" is shown as "trusted.overlay.X".
            let escaped = rest.strip_prefix(&b"overlay."[..])?;
            let mut v = p.to_vec();
            v.extend_from_slice(escaped);
            return Some(Cow::Owned(v));
        }
    }
    Some(Cow::Borrowed(stored))
}

/// Whether a stat result is a kernel-form whiteout (character device 0:0).
pub fn is_chardev_whiteout(st: &libc::stat) -> bool {
    (st.st_mode & libc::S_IFMT) == libc::S_IFCHR && st.st_rdev == 0
}

/// Whether a stat result could be an xattr-form whiteout (zero-size regular file).
pub fn may_be_xattr_whiteout(st: &libc::stat) -> bool {
    (st.st_mode & libc::S_IFMT) == libc::S_IFREG && st.st_size == 0
}

/// Whether `name` in directory `dir` carries a whiteout xattr.
pub fn has_whiteout_xattr(dir: BorrowedFd<'_>, name: &CStr) -> bool {
    WHITEOUT_XATTRS
        .iter()
        .any(|x| sys::get_xattr_at(dir, name, x).is_ok())
}

/// Whether a `.wh.NAME` whiteout for `name` exists in `dir`.
pub fn has_oci_whiteout(dir: BorrowedFd<'_>, name: &[u8]) -> bool {
    match sys::cstring(&oci_whiteout_name(name)) {
        Ok(wh) => sys::stat_at(dir, &wh).is_ok(),
        Err(_) => false,
    }
}

/// [`has_oci_whiteout`] in a layer directory, which may know the answer without asking.
pub fn layer_has_oci_whiteout(dir: &LayerDir, name: &[u8]) -> bool {
    let wh = oci_whiteout_name(name);
    sys::cstring(&wh).is_ok_and(|c| dir.stat_child(&wh, &c).is_ok())
}

/// What a layer's copy of a directory says about the layers below it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirMarks {
    /// Nothing below this directory shows through.
    pub opaque: bool,
    /// The directory holds xattr-form whiteouts (`overlay.opaque=x`).
    pub xattr_whiteouts: bool,
}

/// Reads the opaque markers of the directory open at `dir`.
pub fn dir_marks(dir: BorrowedFd<'_>) -> DirMarks {
    let mut marks = DirMarks::default();
    // One listxattr answers "no overlay xattrs here" for almost every directory.
    if let Ok(names) = sys::list_xattr(dir) {
        for name in OPAQUE_XATTRS {
            if sys::xattr_listed(&names, name) {
                if let Ok(v) = sys::get_xattr(dir, name) {
                    match v.first() {
                        Some(b'y') => marks.opaque = true,
                        Some(b'x') => marks.xattr_whiteouts = true,
                        _ => {}
                    }
                }
            }
        }
    }
    if !marks.opaque {
        marks.opaque = sys::stat_at(dir, c".wh..wh..opq").is_ok();
    }
    marks
}
