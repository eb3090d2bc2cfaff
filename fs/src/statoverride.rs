//! Owners and modes kept in an xattr instead of the inode (`xattr_permissions=`).
//!
//! Rootless containers/storage (with `force_mask`) writes layers whose real owner and mode
//! are whatever an unprivileged user could set, and records the intended ones as
//! `UID:GID:MODE` (mode in octal) in an "override" xattr. A layer opts in by carrying the
//! xattr on its root directory; the upper layer opts in with `xattr_permissions=1|2`. Only
//! directories and regular files carry overrides, as with fuse-overlayfs.

use std::ffi::CStr;
use std::os::fd::BorrowedFd;

use crate::sys;

/// fuse-overlayfs's privileged form (`xattr_permissions=1`).
pub const PRIVILEGED: &CStr = c"security.fuseoverlayfs.override_stat";
/// containers/storage's form (`xattr_permissions=2`).
pub const CONTAINERS: &CStr = c"user.containers.override_stat";
/// fuse-overlayfs 1.x's unprivileged form (read only).
pub const USER: &CStr = c"user.fuseoverlayfs.override_stat";

/// The xattr that `xattr_permissions=N` writes in the upper layer.
pub fn for_option(n: u8) -> Option<&'static CStr> {
    match n {
        1 => Some(PRIVILEGED),
        2 => Some(CONTAINERS),
        _ => None,
    }
}

/// The override xattr a layer root declares, if any.
pub fn detect(root: BorrowedFd<'_>) -> Option<&'static CStr> {
    // One listing instead of a read per name: each costs a walk of `/proc/self/fd`, and
    // every mount asks this of every layer.
    let names = sys::list_xattr(root).ok()?;
    [PRIVILEGED, CONTAINERS, USER]
        .into_iter()
        .find(|x| sys::xattr_listed(&names, x))
}

/// Whether an xattr name is one of the override names (never shown through the mount).
pub fn is_override_name(name: &[u8]) -> bool {
    [PRIVILEGED, CONTAINERS, USER]
        .iter()
        .any(|x| x.to_bytes() == name)
}

/// Parses `UID:GID:MODE[:...]`; later fields (a file type some writers add) are ignored.
pub fn parse(v: &[u8]) -> Option<(u32, u32, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let s = s.trim_end_matches('\0');
    let mut f = s.split(':');
    let uid = f.next()?.parse().ok()?;
    let gid = f.next()?.parse().ok()?;
    let mode = u32::from_str_radix(f.next()?, 8).ok()?;
    Some((uid, gid, mode & 0o7777))
}

/// The value recording `uid`, `gid` and permission bits `mode`.
pub fn format(uid: u32, gid: u32, mode: u32) -> Vec<u8> {
    format!("{uid}:{gid}:0{:o}", mode & 0o7777).into_bytes()
}

fn carries_override(st: &libc::stat) -> bool {
    matches!(st.st_mode & libc::S_IFMT, libc::S_IFDIR | libc::S_IFREG)
}

/// Applies the override stored on object `name` in `dir` (if it has one) to `st`.
pub fn apply(xname: &CStr, dir: BorrowedFd<'_>, name: &CStr, st: &mut libc::stat) {
    if !carries_override(st) {
        return;
    }
    if let Some((uid, gid, mode)) = sys::get_xattr_at(dir, name, xname)
        .ok()
        .and_then(|v| parse(&v))
    {
        st.st_uid = uid;
        st.st_gid = gid;
        st.st_mode = (st.st_mode & libc::S_IFMT) | mode;
    }
}

/// Records a new owner and/or mode for object `name` in `dir`, starting from what it shows
/// now (`st`, with any override already applied). Other kinds of objects (symlinks, devices)
/// get a real chown/chmod, as fuse-overlayfs does for them.
pub fn store(
    xname: &CStr,
    dir: BorrowedFd<'_>,
    name: &CStr,
    st: &libc::stat,
    uid: Option<u32>,
    gid: Option<u32>,
    mode: Option<u32>,
) -> sys::SysResult<()> {
    if !carries_override(st) {
        if uid.is_some() || gid.is_some() {
            sys::chown_at(dir, name, uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
        }
        return Ok(());
    }
    let v = format(
        uid.unwrap_or(st.st_uid),
        gid.unwrap_or(st.st_gid),
        mode.unwrap_or(st.st_mode),
    );
    sys::set_xattr_at(dir, name, xname, &v, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_foreign_forms() {
        assert_eq!(parse(&format(1000, 100, 0o4755)), Some((1000, 100, 0o4755)));
        assert_eq!(parse(b"0:0:755"), Some((0, 0, 0o755)));
        assert_eq!(parse(b"0:0:0644:file"), Some((0, 0, 0o644)));
        assert_eq!(parse(b"0:0"), None);
        assert_eq!(parse(b"a:0:644"), None);
        assert!(is_override_name(b"user.containers.override_stat"));
        assert!(!is_override_name(b"user.other"));
    }
}
