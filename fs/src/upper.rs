//! The writable layer: which marker formats it can hold, the work directory where copy-ups
//! are built, and the private xattrs that record what the overlay did (origin, opacity).

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::sys::{self, SysResult};
use crate::whiteout;

/// How deletions are recorded in the upper layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhiteoutFormat {
    /// Character device 0:0 (kernel form; needs `CAP_MKNOD` over the upper filesystem).
    CharDev,
    /// `.wh.NAME` regular files (OCI form; works everywhere).
    Oci,
}

/// The xattr namespace the overlay may write its markers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrNs {
    /// `trusted.*` (root).
    Trusted,
    /// `user.*` (rootless).
    User,
    /// Neither works: opaque dirs use `.wh..wh..opq`, origins are not recorded.
    None,
}

/// The upper layer's work area and formats.
#[derive(Debug)]
pub struct Upper {
    /// Descriptor of `workdir/work`, where copy-ups are built.
    pub work: OwnedFd,
    /// Whiteout format written by deletions.
    pub whiteout: WhiteoutFormat,
    /// Namespace of the private xattrs.
    pub xattr_ns: XattrNs,
    /// Descriptor of `workdir/index`, where copied-up lower hard links live under their
    /// origin's identity (as kernel overlayfs's `index=on`); `None` without private xattrs.
    pub index: Option<OwnedFd>,
    /// Serialises updates of the overlay link counts kept on indexed files.
    pub index_lock: parking_lot::Mutex<()>,
    origin: Option<CString>,
    redirect: Option<CString>,
    nlink: Option<CString>,
    metacopy: Option<CString>,
    next_tmp: AtomicU64,
    /// Set once FICLONE into the upper filesystem failed for lack of support, so that later
    /// copy-ups go straight to copying.
    pub no_reflink: AtomicBool,
}

const WORK_SUBDIR: &CStr = c"work";
/// The whiteout in the work dir that deletions link to (the kernel's temp names are `#N`
/// too; ours are hex, so never this one).
const SHARED_WHITEOUT: &CStr = c"#whiteout";
const INDEX_SUBDIR: &CStr = c"index";

impl Upper {
    /// Prepares `workdir/work` (clearing what a crash left there) and probes what the upper
    /// filesystem can hold. `forced` selects a whiteout format instead of probing.
    pub fn open(
        upper: BorrowedFd<'_>,
        workdir: BorrowedFd<'_>,
        forced: Option<WhiteoutFormat>,
    ) -> SysResult<Upper> {
        let work = fresh_work_dir(workdir)?;
        let whiteout = match forced {
            Some(WhiteoutFormat::CharDev)
                if probe_chardev(work.as_fd()) != WhiteoutFormat::CharDev =>
            {
                return Err(libc::EPERM);
            }
            Some(f) => f,
            None => probe_chardev(work.as_fd()),
        };
        let xattr_ns = probe_xattr_ns(work.as_fd(), upper);
        let index = if xattr_ns == XattrNs::None {
            None
        } else {
            // SAFETY: valid fd and C string.
            let r = unsafe { libc::mkdirat(workdir.as_raw_fd(), INDEX_SUBDIR.as_ptr(), 0o700) };
            if r < 0 && sys::last_errno() != libc::EEXIST {
                return Err(sys::last_errno());
            }
            Some(sys::open_child(
                workdir,
                INDEX_SUBDIR,
                libc::O_PATH | libc::O_DIRECTORY,
            )?)
        };
        let mut up = Upper {
            work,
            whiteout,
            xattr_ns,
            index,
            index_lock: parking_lot::Mutex::new(()),
            origin: None,
            redirect: None,
            nlink: None,
            metacopy: None,
            next_tmp: AtomicU64::new(0),
            no_reflink: AtomicBool::new(false),
        };
        up.origin = up.private_xattr("strata.origin");
        up.redirect = up.private_xattr("redirect");
        up.nlink = up.private_xattr("strata.nlink");
        up.metacopy = up.private_xattr("strata.metacopy");
        Ok(up)
    }

    /// Whether metadata-only copies can be recorded.
    pub fn can_metacopy(&self) -> bool {
        self.metacopy.is_some() && self.origin.is_some()
    }

    /// For a metadata-only copy: the path (in its layer) of the lower file holding the data.
    pub fn read_metacopy(&self, dir: BorrowedFd<'_>, name: &CStr) -> Option<Box<[u8]>> {
        let x = self.metacopy.as_ref()?;
        let v = sys::get_xattr_at(dir, name, x).ok()?;
        Some(Box::from(v.strip_prefix(b"/")?))
    }

    /// Marks `name` in `dir` as a metadata-only copy whose data is at `lower_path`.
    pub fn write_metacopy(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        lower_path: &[u8],
    ) -> SysResult<()> {
        let x = self.metacopy.as_ref().ok_or(libc::ENOTSUP)?;
        let mut v = Vec::with_capacity(lower_path.len() + 1);
        v.push(b'/');
        v.extend_from_slice(lower_path);
        sys::set_xattr_at(dir, name, x, &v, 0)
    }

    /// Clears the metadata-only mark of `name` in `dir` (its data is now its own).
    pub fn remove_metacopy(&self, dir: BorrowedFd<'_>, name: &CStr) -> SysResult<()> {
        match &self.metacopy {
            Some(x) => sys::remove_xattr_at(dir, name, x),
            None => Ok(()),
        }
    }

    /// The index entry name of the lower object `(dev, ino)`.
    pub fn index_name(dev: u64, ino: u64) -> CString {
        CString::new(format!("{dev:x}-{ino:x}")).expect("no NUL")
    }

    /// The difference between the overlay's link count of an indexed file and its upper
    /// link count (the index entry itself, and lower names not yet linked up, make them
    /// differ), as recorded on the file; kept relative, like the kernel's `overlay.nlink`
    /// ("U-1"), so that plain link and unlink in the upper layer need no update.
    pub fn read_nlink_diff(&self, dir: BorrowedFd<'_>, name: &CStr) -> Option<i64> {
        let x = self.nlink.as_ref()?;
        let v = sys::get_xattr_at(dir, name, x).ok()?;
        let s = std::str::from_utf8(&v).ok()?;
        s.strip_prefix('U')?.parse().ok()
    }

    /// Records the link-count difference (see [`Upper::read_nlink_diff`]).
    pub fn write_nlink_diff(&self, dir: BorrowedFd<'_>, name: &CStr, diff: i64) -> SysResult<()> {
        let x = self.nlink.as_ref().ok_or(libc::ENOTSUP)?;
        sys::set_xattr_at(dir, name, x, format!("U{diff:+}").as_bytes(), 0)
    }

    /// The identity `(dev, ino)` an upper object was copied up from, if it records one.
    pub fn read_origin(&self, dir: BorrowedFd<'_>, name: &CStr) -> Option<(u64, u64)> {
        let x = self.origin.as_ref()?;
        let v = sys::get_xattr_at(dir, name, x).ok()?;
        let s = std::str::from_utf8(&v).ok()?;
        let (dev, ino) = s.split_once(':')?;
        Some((
            u64::from_str_radix(dev, 16).ok()?,
            u64::from_str_radix(ino, 16).ok()?,
        ))
    }

    /// Where a renamed upper directory's lower copies live (layer-relative, no leading slash),
    /// from its `overlay.redirect` xattr: an absolute path (what we write), or a single name
    /// relative to `parent_lower`, the lower path of its parent (the kernel writes that form
    /// for a rename within one directory).
    pub fn read_redirect(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        parent_lower: &[u8],
    ) -> Option<Box<[u8]>> {
        let x = self.redirect.as_ref()?;
        let v = sys::get_xattr_at(dir, name, x).ok()?;
        if let Some(p) = v.strip_prefix(b"/") {
            let p = p.strip_suffix(b"/").unwrap_or(p);
            return Some(Box::from(p));
        }
        if v.is_empty() || v.contains(&b'/') || v == b"." || v == b".." {
            return None;
        }
        let mut p = parent_lower.to_vec();
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(&v);
        Some(p.into())
    }

    /// Records that directory `name` in `dir` is the renamed `lower_path`.
    pub fn write_redirect(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        lower_path: &[u8],
    ) -> SysResult<()> {
        let x = self.redirect.as_ref().ok_or(libc::EXDEV)?;
        let mut v = Vec::with_capacity(lower_path.len() + 1);
        v.push(b'/');
        v.extend_from_slice(lower_path);
        sys::set_xattr_at(dir, name, x, &v, 0)
    }

    /// Records on an upper object the identity it was copied up from, so that it keeps its
    /// inode number (best effort: without a usable xattr namespace it is not recorded).
    pub fn write_origin(&self, dir: BorrowedFd<'_>, name: &CStr, dev: u64, ino: u64) {
        if let Some(x) = &self.origin {
            let _ = sys::set_xattr_at(dir, name, x, format!("{dev:x}:{ino:x}").as_bytes(), 0);
        }
    }

    /// A fresh name for a temporary object in the work directory.
    pub fn temp_name(&self) -> CString {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        CString::new(format!("#{n:x}")).expect("no NUL")
    }

    /// The name of private xattr `what` (e.g. "origin") in our namespace.
    pub fn private_xattr(&self, what: &str) -> Option<CString> {
        let ns = match self.xattr_ns {
            XattrNs::Trusted => "trusted",
            XattrNs::User => "user",
            XattrNs::None => return None,
        };
        Some(CString::new(format!("{ns}.overlay.{what}")).expect("no NUL"))
    }

    /// Records in `dir` that `name` is deleted, in the upper layer's whiteout format.
    pub fn make_whiteout(&self, dir: BorrowedFd<'_>, name: &[u8]) -> SysResult<()> {
        match self.whiteout {
            WhiteoutFormat::CharDev => {
                let c = sys::cstring(name)?;
                // A new name for the work dir's one whiteout inode, as kernel overlayfs
                // does: a new inode per deletion made the allocator of the upper
                // filesystem (ext4) the biggest cost of rm -rf.
                for renewed in [false, true] {
                    match sys::link_at(self.work.as_fd(), SHARED_WHITEOUT, dir, &c) {
                        Ok(()) => return Ok(()),
                        Err(libc::EEXIST) => return Err(libc::EEXIST),
                        // Gone (cleared by hand) or at the link limit: a fresh one.
                        Err(libc::ENOENT) | Err(libc::EMLINK) if !renewed => {
                            self.renew_shared_whiteout()?;
                        }
                        Err(_) => break,
                    }
                }
                sys::mknod_at(dir, &c, libc::S_IFCHR, 0)
            }
            WhiteoutFormat::Oci => {
                let c = sys::cstring(&whiteout::oci_whiteout_name(name))?;
                let fd = sys::create_child(dir, &c, libc::O_EXCL | libc::O_WRONLY, 0o600)?;
                drop(fd);
                Ok(())
            }
        }
    }

    /// Replaces the shared whiteout of the work dir by a fresh inode (the old one keeps its
    /// other names).
    fn renew_shared_whiteout(&self) -> SysResult<()> {
        let tmp = self.temp_name();
        sys::mknod_at(self.work.as_fd(), &tmp, libc::S_IFCHR, 0)?;
        let r = sys::rename_at(
            self.work.as_fd(),
            &tmp,
            self.work.as_fd(),
            SHARED_WHITEOUT,
            0,
        );
        if r.is_err() {
            let _ = sys::unlink_at(self.work.as_fd(), &tmp, 0);
        }
        r
    }

    /// Removes a whiteout for `name` in `dir`, in whichever format it is; true if one was there.
    pub fn remove_whiteout(&self, dir: BorrowedFd<'_>, name: &[u8]) -> SysResult<bool> {
        let c = sys::cstring(name)?;
        let mut removed = false;
        if let Ok(st) = sys::stat_at(dir, &c) {
            if whiteout::is_chardev_whiteout(&st)
                || whiteout::may_be_xattr_whiteout(&st) && whiteout::has_whiteout_xattr(dir, &c)
            {
                sys::unlink_at(dir, &c, 0)?;
                removed = true;
            }
        }
        let wh = sys::cstring(&whiteout::oci_whiteout_name(name))?;
        match sys::unlink_at(dir, &wh, 0) {
            Ok(()) => removed = true,
            Err(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        Ok(removed)
    }

    /// Marks directory `name` in `dir` opaque.
    pub fn make_opaque(&self, dir: BorrowedFd<'_>, name: &[u8]) -> SysResult<()> {
        let c = sys::cstring(name)?;
        if let Some(x) = self.private_xattr("opaque") {
            if sys::set_xattr_at(dir, &c, &x, b"y", 0).is_ok() {
                return Ok(());
            }
        }
        let child = sys::open_child(dir, &c, libc::O_PATH | libc::O_DIRECTORY)?;
        let fd = sys::create_child(child.as_fd(), c".wh..wh..opq", libc::O_WRONLY, 0o600)?;
        drop(fd);
        Ok(())
    }
}

/// `workdir/work`, empty: what a crash left in it is removed. An existing directory is
/// kept, so that a mount costs no directory removal and creation (journal work that a busy
/// filesystem makes slow).
fn fresh_work_dir(workdir: BorrowedFd<'_>) -> SysResult<OwnedFd> {
    if let Ok(st) = sys::stat_at(workdir, WORK_SUBDIR) {
        if (st.st_mode & libc::S_IFMT) == libc::S_IFDIR {
            let work = sys::open_child(workdir, WORK_SUBDIR, libc::O_PATH | libc::O_DIRECTORY)?;
            // Kernel overlayfs leaves it mode 000, which only root could work in.
            if st.st_mode & 0o7777 != 0o700 {
                sys::chmod_at(work.as_fd(), c"", 0o700)?;
            }
            clear_contents(work.as_fd())?;
            return Ok(work);
        }
    }
    clear_child(workdir, WORK_SUBDIR)?;
    sys::mkdir_at(workdir, WORK_SUBDIR, 0o700)?;
    sys::open_child(workdir, WORK_SUBDIR, libc::O_PATH | libc::O_DIRECTORY)
}

/// Removes `name` in `dir` and everything below it, never following symlinks.
pub fn clear_child(dir: BorrowedFd<'_>, name: &CStr) -> SysResult<()> {
    let st = match sys::stat_at(dir, name) {
        Ok(st) => st,
        Err(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if (st.st_mode & libc::S_IFMT) == libc::S_IFDIR {
        let child = sys::open_child(dir, name, libc::O_PATH | libc::O_DIRECTORY)?;
        clear_contents(child.as_fd())?;
        sys::unlink_at(dir, name, libc::AT_REMOVEDIR)
    } else {
        sys::unlink_at(dir, name, 0)
    }
}

/// Removes everything inside directory `dir`, never following symlinks.
fn clear_contents(dir: BorrowedFd<'_>) -> SysResult<()> {
    for e in sys::read_dir(dir)? {
        clear_child(dir, &sys::cstring(&e.name)?)?;
    }
    Ok(())
}

/// Whether the upper filesystem takes character-device whiteouts; the probe stays as the
/// work dir's shared whiteout.
fn probe_chardev(work: BorrowedFd<'_>) -> WhiteoutFormat {
    if sys::mknod_at(work, SHARED_WHITEOUT, libc::S_IFCHR, 0).is_ok() {
        WhiteoutFormat::CharDev
    } else {
        WhiteoutFormat::Oci
    }
}

/// Which namespace can hold the overlay's xattrs, tried on the work directory itself (no
/// file to create and delete).
fn probe_xattr_ns(work: BorrowedFd<'_>, _upper: BorrowedFd<'_>) -> XattrNs {
    for (ns, xname) in [
        (XattrNs::Trusted, c"trusted.overlay.probe"),
        (XattrNs::User, c"user.overlay.probe"),
    ] {
        if sys::set_xattr_at(work, c"", xname, b"1", 0).is_ok() {
            let _ = sys::remove_xattr_at(work, c"", xname);
            return ns;
        }
    }
    XattrNs::None
}
