//! Operations that change the merged tree. Every change happens in the upper layer, after
//! copying up what it touches; deletions of names that lower layers hold leave whiteouts.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::{join, Attr, Inval, Overlay, OvlResult, Resolved, INDEX_LAYER};
use crate::caller::Caller;
use crate::dirmerge;
use crate::handles::{Handle, OpenFile};
use crate::inode::{DirLayer, Location, Node};
use crate::statoverride;
use crate::sys;
use crate::upper::{clear_child, WhiteoutFormat};
use crate::whiteout;

/// A time to set: a value, or "now".
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    /// The current time.
    Now,
    /// Seconds and nanoseconds since the epoch.
    At(i64, i64),
}

/// The attribute changes of one `setattr`.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size.
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<SetTime>,
    /// New modification time.
    pub mtime: Option<SetTime>,
    /// Set when the kernel leaves dropping set-user-ID and set-group-ID to us
    /// (FUSE_HANDLE_KILLPRIV_V2): the caller, whose CAP_FSETID and groups decide. A size
    /// change then drops them, and so does a request that changes nothing: that is how the
    /// kernel passes on its `file_remove_privs` before a write it does not send us (a
    /// passthrough write, `copy_file_range`), and only for callers without CAP_FSETID.
    pub kill_setid_of: Option<Caller>,
}

impl SetAttr {
    /// Whether no attribute changes.
    fn changes_nothing(&self) -> bool {
        self.mode.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.size.is_none()
            && self.atime.is_none()
            && self.mtime.is_none()
    }
}

/// Who creates a new entry.
#[derive(Debug, Clone, Copy)]
pub struct Creator {
    /// The caller's uid.
    pub uid: u32,
    /// The caller's gid.
    pub gid: u32,
}

fn timespec(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(SetTime::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(SetTime::At(s, ns)) => libc::timespec {
            tv_sec: s,
            tv_nsec: ns,
        },
    }
}

impl Overlay {
    fn parent_loc(&self, parent: u64) -> OvlResult<Location> {
        let p = self.node(parent)?;
        let loc = p.loc.read().clone();
        if loc.dir().is_none() {
            return Err(libc::ENOTDIR);
        }
        Ok(loc)
    }

    /// Checks that `name` may be created in directory `parent` and is free there; returns the
    /// parent's location.
    fn free_name(&self, parent: u64, name: &[u8]) -> OvlResult<Location> {
        Self::check_name(name)?;
        if whiteout::is_marker_name(name) {
            // The name would read back as a whiteout marker.
            return Err(libc::EPERM);
        }
        let ploc = self.parent_loc(parent)?;
        if self.resolve(&ploc, name)?.is_some() {
            return Err(libc::EEXIST);
        }
        Ok(ploc)
    }

    /// Whether a layer below the upper one holds `name` in the directory at `ploc`, so that
    /// removing the name must leave a whiteout.
    fn lower_has(&self, ploc: &Location, name: &[u8]) -> OvlResult<bool> {
        let cname = sys::cstring(name)?;
        for dl in ploc.dir().unwrap_or_default() {
            if dl.layer == 0 {
                continue;
            }
            let dfd = match self.layer_dir(dl.layer, dl.path_in_layer(&ploc.path)) {
                Ok(fd) => fd,
                Err(libc::ENOENT) | Err(libc::ENOTDIR) => continue,
                Err(e) => return Err(e),
            };
            match dfd.stat_child(name, &cname) {
                Ok(st) => {
                    let wh = whiteout::is_chardev_whiteout(&st)
                        || (dl.xattr_whiteouts
                            && whiteout::may_be_xattr_whiteout(&st)
                            && whiteout::has_whiteout_xattr(dfd.as_fd(), &cname));
                    return Ok(!wh);
                }
                Err(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
            if whiteout::layer_has_oci_whiteout(&dfd, name) {
                return Ok(false);
            }
        }
        Ok(false)
    }

    /// Creates a new entry `name` in `parent` with `make`, owned by `who`. Returns the new
    /// entry's attributes, with one kernel reference counted.
    fn create_entry(
        &self,
        parent: u64,
        name: &OsStr,
        who: Creator,
        is_dir: bool,
        want_mode: u32,
        make: impl FnOnce(&OwnedFd, &CStr) -> OvlResult<()>,
    ) -> OvlResult<Attr> {
        let upper = self.upper()?;
        let name = name.as_bytes();
        let ploc = self.free_name(parent, name)?;
        let pfd = self.ensure_upper_dir(&ploc.path)?;
        let cname = sys::cstring(name)?;
        let st = self.changing(&[(parent, name)], || {
            self.make_entry(
                upper,
                &ploc,
                pfd.fd(),
                name,
                &cname,
                who,
                is_dir,
                want_mode,
                make,
            )
        })?;
        self.listing_changed(parent);
        let ino = self.inos.ino(st.st_dev, st.st_ino);
        let merged = if is_dir {
            vec![DirLayer::at_merged(0, false)]
        } else {
            Vec::new()
        };
        Ok(self.remember(
            &ploc.path,
            name,
            Resolved {
                layer: 0,
                real: None,
                st,
                ino,
                merged,
                data: None,
            },
        ))
    }

    /// Runs `f`, the part of a request that changes the names `dirs` (directory, name): if
    /// it fails, it may have changed something already, which the kernel, told the request
    /// failed, would not expect.
    fn changing<T>(&self, dirs: &[(u64, &[u8])], f: impl FnOnce() -> OvlResult<T>) -> OvlResult<T> {
        let r = f();
        if r.is_err() {
            for (dir, name) in dirs {
                self.change_failed(*dir, OsStr::from_bytes(name));
            }
        }
        r
    }

    /// The changing part of [`create_entry`](Self::create_entry): makes `name` in the upper
    /// copy `pfd` of the directory at `ploc`, and returns its attributes.
    #[allow(clippy::too_many_arguments)]
    fn make_entry(
        &self,
        upper: &crate::upper::Upper,
        ploc: &Location,
        pfd: &OwnedFd,
        name: &[u8],
        cname: &CStr,
        who: Creator,
        is_dir: bool,
        want_mode: u32,
        make: impl FnOnce(&OwnedFd, &CStr) -> OvlResult<()>,
    ) -> OvlResult<libc::stat> {
        let had_whiteout = upper.remove_whiteout(pfd.as_fd(), name)?;
        make(pfd, cname)?;
        let pst = sys::stat_fd(pfd.as_fd())?;
        // A set-group-id directory hands its (stored) group down, as the kernel does on
        // create; otherwise the caller's ids are stored through the mapping.
        let gid = if pst.st_mode & libc::S_ISGID != 0 {
            pst.st_gid
        } else {
            self.ids.gid.stored(who.gid)
        };
        let uid = self.ids.uid.stored(who.uid);
        let st0 = sys::stat_at(pfd.as_fd(), cname)?;
        if let Some(xname) = self.stack.get(0).stat_override {
            // The owner and the asked-for mode go in the override; the inode keeps the
            // daemon's own ids, which is all an unprivileged writer can give it.
            let mode = if (st0.st_mode & libc::S_IFMT) == libc::S_IFDIR {
                want_mode & 0o7777
            } else {
                st0.st_mode & 0o7777 | (want_mode & 0o6000)
            };
            statoverride::store(
                xname,
                pfd.as_fd(),
                cname,
                &st0,
                Some(uid),
                Some(gid),
                Some(mode),
            )?;
        } else if (st0.st_uid, st0.st_gid) != (uid, gid) {
            match sys::chown_at(pfd.as_fd(), cname, uid, gid) {
                Ok(()) | Err(libc::EPERM) | Err(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
            // chown clears set-id bits; the caller asked for them, so put them back.
            if (st0.st_mode & libc::S_IFMT) != libc::S_IFLNK && want_mode & 0o6000 != 0 {
                sys::chmod_at(pfd.as_fd(), cname, want_mode & 0o7777)?;
            }
        } else if !(is_dir && had_whiteout) {
            // Created with the caller's own ids (a daemon serving its own user) and nothing
            // more to record: the first stat is the final one.
            return Ok(st0);
        }
        // A new directory where a lower one was deleted must not show the old contents.
        if is_dir && had_whiteout && self.lower_has(ploc, name)? {
            upper.make_opaque(pfd.as_fd(), name)?;
        }
        sys::stat_at(pfd.as_fd(), cname)
    }

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        who: Creator,
    ) -> OvlResult<(Attr, u64)> {
        // The handle is the creating open itself: reopening would fail for an unprivileged
        // caller when the new mode lacks owner read or write (tar's mode-0 placeholders),
        // and the kernel lets the creator use what it created whatever the mode.
        let extra = flags & (libc::O_NONBLOCK | libc::O_DIRECT | libc::O_SYNC | libc::O_DSYNC);
        let mut created = None;
        let attr = self.create_entry(parent, name, who, false, mode, |pfd, cname| {
            created = Some(sys::create_child(
                pfd.as_fd(),
                cname,
                libc::O_EXCL | libc::O_RDWR | extra,
                mode & 0o7777,
            )?);
            Ok(())
        })?;
        // The entry exists now, and the kernel holds a reference to it only if this succeeds.
        let opened = self.node(attr.st.st_ino).and_then(|node| {
            let fd = created.ok_or(libc::EIO)?;
            Ok(self.handles.insert(Handle::File(OpenFile {
                node,
                file: parking_lot::RwLock::new((0, File::from(fd))),
                writable: true,
            })))
        });
        match opened {
            Ok(fh) => Ok((attr, fh)),
            Err(e) => {
                self.forget(attr.st.st_ino, 1);
                self.change_failed(parent, name);
                Err(e)
            }
        }
    }

    /// Creates a special file (fifo, socket, device) or an empty regular file.
    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u64,
        who: Creator,
    ) -> OvlResult<Attr> {
        self.create_entry(parent, name, who, false, mode, |pfd, cname| {
            sys::mknod_at(pfd.as_fd(), cname, mode, rdev)
        })
    }

    /// Creates a directory.
    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, who: Creator) -> OvlResult<Attr> {
        self.create_entry(parent, name, who, true, mode, |pfd, cname| {
            sys::mkdir_at(pfd.as_fd(), cname, mode & 0o7777)
        })
    }

    /// Creates a symlink.
    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &[u8],
        who: Creator,
    ) -> OvlResult<Attr> {
        let target = sys::cstring(target)?;
        self.create_entry(parent, name, who, false, 0o777, |pfd, cname| {
            sys::symlink_at(&target, pfd.as_fd(), cname)
        })
    }

    /// Makes `newname` in `newparent` another name of `ino`.
    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> OvlResult<Attr> {
        let upper = self.upper()?;
        let node = self.node(ino)?;
        if node.is_dir() {
            return Err(libc::EPERM);
        }
        let name = newname.as_bytes();
        let ploc = self.free_name(newparent, name)?;
        self.copy_up(&node)?;
        let loc = node.loc.read().clone();
        let pfd = self.ensure_upper_dir(&ploc.path)?;
        let cname = sys::cstring(name)?;
        let mut st = self.changing(&[(newparent, name)], || {
            upper.remove_whiteout(pfd.as_fd(), name)?;
            match loc.pinned() {
                Some(fd) => sys::link_fd(fd.as_fd(), pfd.as_fd(), &cname)?,
                None => {
                    let (sparent, sname) = loc.split();
                    let sfd = self.layer_dir(0, sparent)?;
                    sys::link_at(sfd.as_fd(), &sys::cstring(sname)?, pfd.as_fd(), &cname)?;
                }
            }
            sys::stat_at(pfd.as_fd(), &cname)
        })?;
        self.listing_changed(newparent);
        node.add_lookup();
        self.fix_nlink(0, pfd.as_fd(), &cname, &mut st);
        Ok(self.attr(st, ino, false))
    }

    /// Removes the non-directory `name` from `parent`.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> OvlResult<()> {
        let upper = self.upper()?;
        let name = name.as_bytes();
        let ploc = self.parent_loc(parent)?;
        let r = self.resolve(&ploc, name)?.ok_or(libc::ENOENT)?;
        if r.is_dir() {
            return Err(libc::EISDIR);
        }
        let path = join(&ploc.path, name);
        let layer = self.link_up_before_removal(&path, &r)?;
        // A name found below the upper layer gets a whiteout whatever else is down there.
        let lower = layer == 0 && self.lower_has(&ploc, name)?;
        let pfd = self.ensure_upper_dir(&ploc.path)?;
        let cname = sys::cstring(name)?;
        self.changing(&[(parent, name)], || {
            if layer == 0 {
                // Keep the object reachable for open handles before its name goes away.
                self.detach(r.ino, &path, pfd.as_fd(), &cname);
                if lower {
                    self.replace_with_whiteout(pfd.as_fd(), name, &cname)
                } else {
                    sys::unlink_at(pfd.as_fd(), &cname, 0)
                }
            } else {
                upper.make_whiteout(pfd.as_fd(), name)
            }
        })?;
        self.listing_changed(parent);
        Ok(())
    }

    /// Before the name `path` of a lower hard link goes away: link it up first (as the
    /// kernel does with `index=on`), so that the overlay link count kept on the indexed copy
    /// drops with the upper name. Returns the layer that now holds the name.
    fn link_up_before_removal(&self, path: &[u8], r: &Resolved) -> OvlResult<u16> {
        let hard_link = r.layer == INDEX_LAYER || (r.layer != 0 && self.indexes(&r.st));
        if !hard_link {
            return Ok(r.layer);
        }
        let node = self.node_for_name(path, r);
        self.copy_up(&node)?;
        Ok(0)
    }

    /// Replaces the upper entry `name` in `dir` with a whiteout, atomically where the format
    /// allows (the lower object must never show through in between).
    fn replace_with_whiteout(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &[u8],
        cname: &CStr,
    ) -> OvlResult<()> {
        let upper = self.upper()?;
        match upper.whiteout {
            WhiteoutFormat::CharDev => {
                let work = upper.work.as_fd();
                let tmp = upper.temp_name();
                upper.make_whiteout(work, tmp.to_bytes())?;
                let r = sys::rename_at(work, &tmp, dir, cname, 0);
                if r.is_err() {
                    let _ = sys::unlink_at(work, &tmp, 0);
                }
                r
            }
            WhiteoutFormat::Oci => {
                upper.make_whiteout(dir, name)?;
                sys::unlink_at(dir, cname, 0)
            }
        }
    }

    /// Removes the empty directory `name` from `parent`.
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> OvlResult<()> {
        let upper = self.upper()?;
        let name = name.as_bytes();
        let ploc = self.parent_loc(parent)?;
        let r = self.resolve(&ploc, name)?.ok_or(libc::ENOENT)?;
        if !r.is_dir() {
            return Err(libc::ENOTDIR);
        }
        let child_path = join(&ploc.path, name);
        if self.dir_has_entries(&child_path, &r.merged)? {
            return Err(libc::ENOTEMPTY);
        }
        let lower = r.layer == 0 && self.lower_has(&ploc, name)?;
        let pfd = self.ensure_upper_dir(&ploc.path)?;
        let cname = sys::cstring(name)?;
        let work = upper.work.as_fd();
        self.changing(&[(parent, name)], || {
            if r.layer == 0 {
                self.detach(r.ino, &child_path, pfd.as_fd(), &cname);
                let tmp = upper.temp_name();
                if lower && upper.whiteout == WhiteoutFormat::CharDev {
                    upper.make_whiteout(work, tmp.to_bytes())?;
                    if let Err(e) =
                        sys::rename_at(work, &tmp, pfd.as_fd(), &cname, libc::RENAME_EXCHANGE)
                    {
                        let _ = sys::unlink_at(work, &tmp, 0);
                        return Err(e);
                    }
                } else {
                    if lower {
                        upper.make_whiteout(pfd.as_fd(), name)?;
                    }
                    sys::rename_at(pfd.as_fd(), &cname, work, &tmp, 0)?;
                }
                // The old directory (with its whiteouts) now sits in the work dir.
                let _ = clear_child(work, &tmp);
                self.dirfds.invalidate_tree(0, &child_path);
            } else {
                upper.make_whiteout(pfd.as_fd(), name)?;
            }
            Ok(())
        })?;
        self.listing_changed(parent);
        Ok(())
    }

    /// Whether the merged directory at `path` (copies `layers`) lists anything.
    fn dir_has_entries(&self, path: &[u8], layers: &[DirLayer]) -> OvlResult<bool> {
        let entries = dirmerge::merge(
            layers,
            |dl| {
                let fd = self.layer_dir(dl.layer, dl.path_in_layer(path))?;
                Ok((fd, self.stack.get(dl.layer).dev))
            },
            &self.inos,
        )?;
        Ok(!entries.is_empty())
    }

    /// Before the upper object at merged `path` (`dir/name` in the upper layer) loses that
    /// name: if the kernel holds its node under that name, pin the node to the object so
    /// that open files and other names of it go on working.
    fn detach(&self, ino: u64, path: &[u8], dir: std::os::fd::BorrowedFd<'_>, name: &CStr) {
        let Some(node) = self.nodes.get(ino) else {
            return;
        };
        let _guard = node.copy_lock.lock();
        let mut loc = node.loc.write();
        if *loc.path != *path || loc.layer != 0 || loc.pinned().is_some() {
            return;
        }
        if let Ok(fd) = sys::open_child(dir, name, libc::O_PATH) {
            loc.set_pinned(Some(Arc::new(fd)));
        }
    }

    /// Renames `name` in `parent` to `newname` in `newparent` (`flags`: RENAME_NOREPLACE,
    /// RENAME_EXCHANGE).
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> OvlResult<()> {
        let upper = self.upper()?;
        let (name, newname) = (name.as_bytes(), newname.as_bytes());
        Self::check_name(newname)?;
        if whiteout::is_marker_name(newname) {
            return Err(libc::EPERM);
        }
        let ploc = self.parent_loc(parent)?;
        let nploc = self.parent_loc(newparent)?;
        let src = self.resolve(&ploc, name)?.ok_or(libc::ENOENT)?;
        let dst = self.resolve(&nploc, newname)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & libc::RENAME_NOREPLACE != 0 && dst.is_some() {
            return Err(libc::EEXIST);
        }
        if exchange && dst.is_none() {
            return Err(libc::ENOENT);
        }
        if let Some(d) = &dst {
            if d.ino == src.ino {
                return Ok(()); // same object (or hard links of it): nothing to do
            }
            if !exchange {
                match (src.is_dir(), d.is_dir()) {
                    (true, false) => return Err(libc::ENOTDIR),
                    (false, true) => return Err(libc::EISDIR),
                    (true, true)
                        if self.dir_has_entries(&join(&nploc.path, newname), &d.merged)? =>
                    {
                        return Err(libc::ENOTEMPTY);
                    }
                    _ => {}
                }
            }
        }
        // A directory with lower parts moves by recording where its lower copies are (a
        // redirect), as the kernel does with redirect_dir=on. Exchanging such directories is
        // not supported yet and answers EXDEV, which callers handle by copying.
        let lower_part = |r: &Resolved| r.merged.iter().find(|d| d.layer != 0).cloned();
        let src_lower_dir = if src.is_dir() { lower_part(&src) } else { None };
        let dst_lower_dir = match (&dst, exchange) {
            (Some(d), true) if d.is_dir() => lower_part(d),
            _ => None,
        };
        let old_path = join(&ploc.path, name);
        let new_path = join(&nploc.path, newname);
        let src_node = self.node_for_name(&old_path, &src);
        self.copy_up_meta(&src_node)?;
        let dst_node = match (&dst, exchange) {
            (Some(d), true) => {
                let n = self.node_for_name(&new_path, d);
                self.copy_up_meta(&n)?;
                Some(n)
            }
            _ => None,
        };
        let pfd = self.ensure_upper_dir(&ploc.path)?;
        let npfd = self.ensure_upper_dir(&nploc.path)?;
        let (cname, cnew) = (sys::cstring(name)?, sys::cstring(newname)?);
        self.changing(&[(parent, name), (newparent, newname)], || {
            let mut redirected = false;
            if let Some(dl) = &src_lower_dir {
                if upper.read_redirect(pfd.as_fd(), &cname, b"").is_none() {
                    upper.write_redirect(pfd.as_fd(), &cname, dl.path_in_layer(&old_path))?;
                }
                redirected = true;
            }
            if exchange {
                if let Some(dl) = &dst_lower_dir {
                    if upper.read_redirect(npfd.as_fd(), &cnew, b"").is_none() {
                        upper.write_redirect(npfd.as_fd(), &cnew, dl.path_in_layer(&new_path))?;
                    }
                }
                sys::rename_at(
                    pfd.as_fd(),
                    &cname,
                    npfd.as_fd(),
                    &cnew,
                    libc::RENAME_EXCHANGE,
                )?;
                // A directory without lower parts now stands where lower layers may hold the
                // name: it must not merge with them (a redirected one looks only where it came
                // from).
                if src.is_dir() && src_lower_dir.is_none() && self.lower_has(&nploc, newname)? {
                    upper.make_opaque(npfd.as_fd(), newname)?;
                }
                let dst_is_dir = dst.as_ref().is_some_and(|d| d.is_dir());
                if dst_is_dir && dst_lower_dir.is_none() && self.lower_has(&ploc, name)? {
                    upper.make_opaque(pfd.as_fd(), name)?;
                }
            } else {
                let src_lower = self.lower_has(&ploc, name)?;
                let dst_lower = self.lower_has(&nploc, newname)?;
                if src.is_dir() {
                    // A directory cannot replace a whiteout device; drop the marker first.
                    upper.remove_whiteout(npfd.as_fd(), newname)?;
                }
                if let Some(d) = &dst {
                    if self.link_up_before_removal(&new_path, d)? == 0 {
                        self.detach(d.ino, &new_path, npfd.as_fd(), &cnew);
                        if d.is_dir() {
                            // Its merged view is empty, but the upper copy may still hold
                            // whiteouts; the real rename would refuse a non-empty target.
                            let work = upper.work.as_fd();
                            let tmp = upper.temp_name();
                            sys::rename_at(npfd.as_fd(), &cnew, work, &tmp, 0)?;
                            let _ = clear_child(work, &tmp);
                            self.dirfds.invalidate_tree(0, &new_path);
                        }
                    }
                }
                let use_rw = src_lower && upper.whiteout == WhiteoutFormat::CharDev;
                let rflags = if use_rw { libc::RENAME_WHITEOUT } else { 0 };
                match sys::rename_at(pfd.as_fd(), &cname, npfd.as_fd(), &cnew, rflags) {
                    Ok(()) => {}
                    Err(libc::EINVAL) if use_rw => {
                        sys::rename_at(pfd.as_fd(), &cname, npfd.as_fd(), &cnew, 0)?;
                        upper.make_whiteout(pfd.as_fd(), name)?;
                    }
                    Err(e) => return Err(e),
                }
                if src_lower && !use_rw {
                    upper.make_whiteout(pfd.as_fd(), name)?;
                }
                // A directory moved over a name that lower layers hold must not merge with them;
                // a redirected one already looks only where it came from.
                if src.is_dir() && dst_lower && !redirected {
                    upper.make_opaque(npfd.as_fd(), newname)?;
                }
            }
            Ok(())
        })?;
        self.dirfds.invalidate_tree(0, &old_path);
        self.dirfds.invalidate_tree(0, &new_path);
        self.move_paths(&src_node, dst_node.as_ref(), &old_path, &new_path);
        self.listing_changed(parent);
        self.listing_changed(newparent);
        if parent != newparent {
            // A directory moved to another parent lists another "..", which the kernel would
            // not learn of: the request names the parents, not the directory.
            if src.is_dir() {
                self.invalidate(Inval::Listing(src.ino));
            }
            if let Some(d) = dst.as_ref().filter(|d| exchange && d.is_dir()) {
                self.invalidate(Inval::Listing(d.ino));
            }
        }
        Ok(())
    }

    /// The node that stands for the entry `r` at merged `path`: the held node when it lives
    /// at that path, else (a hard link reached by another name, or a node the kernel has
    /// forgotten) a free-standing one, so that copy-up and rename act on this very name.
    fn node_for_name(&self, path: &[u8], r: &Resolved) -> Arc<Node> {
        if let Some(n) = self.nodes.get(r.ino) {
            if *n.loc.read().path == *path {
                return n;
            }
        }
        Arc::new(Node::new(
            r.ino,
            r.st.st_mode & libc::S_IFMT,
            Location::new(Box::from(path), r.layer)
                .with_real(r.real.clone())
                .with_dir(r.is_dir().then(|| r.merged.clone().into()))
                .with_data(r.data.clone()),
        ))
    }

    /// After a rename in the upper layer: `node` and every held node below it move from
    /// `old` to `new` in the merged view (and, for an exchange, `other` and its descendants
    /// the other way), while their lower copies stay where they are.
    fn move_paths(&self, node: &Arc<Node>, other: Option<&Arc<Node>>, old: &[u8], new: &[u8]) {
        let under = |p: &[u8], root: &[u8]| p.starts_with(root) && p.get(root.len()) == Some(&b'/');
        let rebase = |p: &[u8], from: &[u8], to: &[u8]| -> Box<[u8]> {
            let mut v = to.to_vec();
            v.extend_from_slice(&p[from.len()..]);
            v.into()
        };
        self.nodes.for_each(|n| {
            if Arc::ptr_eq(n, node) || other.is_some_and(|o| Arc::ptr_eq(n, o)) {
                return;
            }
            let mut l = n.loc.write();
            let moved = if node.is_dir() && under(&l.path, old) {
                Some(rebase(&l.path, old, new))
            } else if other.is_some_and(|o| o.is_dir()) && under(&l.path, new) {
                Some(rebase(&l.path, new, old))
            } else {
                None
            };
            if let Some(p) = moved {
                let was = std::mem::replace(&mut l.path, p);
                pin_lower_paths(&mut l, &was);
            }
        });
        for (n, to) in [(Some(node), new), (other, old)] {
            if let Some(n) = n {
                let mut l = n.loc.write();
                let was = std::mem::replace(&mut l.path, Box::from(to));
                pin_lower_paths(&mut l, &was);
            }
        }
    }

    /// Opens `node` for writing, copying it up first.
    pub(super) fn open_for_write(&self, node: Arc<Node>, flags: i32) -> OvlResult<u64> {
        self.upper()?;
        self.copy_up(&node)?;
        let loc = node.loc.read().clone();
        // Offsets come from the kernel, so appends need no O_APPEND here.
        let keep = flags
            & (libc::O_ACCMODE
                | libc::O_TRUNC
                | libc::O_NONBLOCK
                | libc::O_DIRECT
                | libc::O_SYNC
                | libc::O_DSYNC
                | libc::O_NOATIME);
        let mut acc = keep;
        if acc & libc::O_ACCMODE == libc::O_WRONLY {
            // Reads for the page cache may come through a write-only handle.
            acc = (acc & !libc::O_ACCMODE) | libc::O_RDWR;
        }
        let fd = self.open_object(&loc, acc)?;
        Ok(self.handles.insert(Handle::File(OpenFile {
            node,
            file: parking_lot::RwLock::new((0, File::from(fd))),
            writable: true,
        })))
    }

    /// Writes `data` at `offset` through handle `fh`; `kill_setid_of`: the writer, who
    /// lacks CAP_FSETID, so the write drops set-user-ID and set-group-ID first.
    pub fn write(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
        kill_setid_of: Option<Caller>,
    ) -> OvlResult<u32> {
        if let Some(caller) = kill_setid_of {
            self.kill_suid(fh, caller)?;
        }
        self.with_writable_fd(fh, |file| {
            file.write_all_at(data, offset)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
        })?;
        Ok(data.len() as u32)
    }

    /// Clears set-user-ID and set-group-ID as a write by `caller` without CAP_FSETID does on
    /// any filesystem (see [`setid_bits_to_kill`]). With FUSE_HANDLE_KILLPRIV_V2 the kernel
    /// leaves this to us (FUSE_WRITE_KILL_SUIDGID), and our own write, as root, would keep
    /// them.
    fn kill_suid(&self, fh: u64, caller: Caller) -> OvlResult<()> {
        let h = self.open_file(fh)?;
        let Handle::File(of) = h.as_ref() else {
            return Err(libc::EISDIR);
        };
        if !of.writable {
            return Err(libc::EBADF);
        }
        let ino = of.node.ino;
        // The mode as the overlay shows it, from the descriptor this write goes to: every
        // write of a rootless caller asks for this, so no path lookup.
        let mut st = sys::stat_fd(of.file.read().1.as_fd())?;
        self.apply_override(&of.node.loc.read(), &mut st);
        let mode = st.st_mode & 0o7777;
        if mode & (libc::S_ISUID | libc::S_ISGID) == 0 {
            return Ok(());
        }
        let kill = setid_bits_to_kill(mode, self.ids.gid.shown(st.st_gid), caller);
        if mode & kill == 0 {
            return Ok(());
        }
        let set = SetAttr {
            mode: Some(mode & !kill),
            ..SetAttr::default()
        };
        self.setattr(ino, &set, Some(fh))?;
        // The kernel keeps the mode it cached: this request is a write, not a setattr.
        self.invalidate(Inval::Attrs(ino));
        Ok(())
    }

    /// Flushes handle `fh` to stable storage.
    pub fn fsync(&self, fh: u64, datasync: bool) -> OvlResult<()> {
        let h = self.open_file(fh)?;
        if self.volatile {
            return Ok(());
        }
        let Handle::File(of) = h.as_ref() else {
            return Ok(());
        };
        let file = of.file.read();
        let r = if datasync {
            file.1.sync_data()
        } else {
            file.1.sync_all()
        };
        r.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
    }

    fn with_writable_fd<T>(&self, fh: u64, f: impl FnOnce(&File) -> OvlResult<T>) -> OvlResult<T> {
        let h = self.open_file(fh)?;
        let Handle::File(of) = h.as_ref() else {
            return Err(libc::EISDIR);
        };
        if !of.writable {
            return Err(libc::EBADF);
        }
        let file = of.file.read();
        f(&file.1)
    }

    /// `fallocate(2)` through handle `fh`.
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> OvlResult<()> {
        self.with_writable_fd(fh, |file| {
            // SAFETY: plain fallocate on our descriptor.
            let r =
                unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, length as i64) };
            if r < 0 {
                Err(sys::last_errno())
            } else {
                Ok(())
            }
        })
    }

    /// `lseek(2)` with `SEEK_DATA`/`SEEK_HOLE` (and the plain whences) on handle `fh`.
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> OvlResult<i64> {
        self.with_current_fd(fh, |file| {
            // SAFETY: plain lseek on our descriptor.
            let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
            if r < 0 {
                Err(sys::last_errno())
            } else {
                Ok(r)
            }
        })
    }

    /// Copies a range between two open handles.
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> OvlResult<u32> {
        // FUSE replies carry a 32-bit count.
        let len = len.min(1 << 30) as usize;
        let copied = self.with_current_fd(fh_in, |fin| {
            self.with_writable_fd(fh_out, |fout| {
                let (mut i, mut o) = (off_in as i64, off_out as i64);
                // SAFETY: valid descriptors and offsets we own. In the kernel, between the
                // real files: no data passes through us, and filesystems may share extents.
                let n = unsafe {
                    libc::copy_file_range(fin.as_raw_fd(), &mut i, fout.as_raw_fd(), &mut o, len, 0)
                };
                if n >= 0 {
                    return Ok(Some(n as u32));
                }
                match sys::last_errno() {
                    libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP => Ok(None),
                    e => Err(e),
                }
            })
        })?;
        if let Some(n) = copied {
            return Ok(n);
        }
        let data = self.read(fh_in, off_in, len.min(1 << 24) as u32)?;
        // Set-user-ID was dropped before this was sent (`SetAttr::kill_setid_of`).
        self.write(fh_out, off_out, &data, None)
    }

    /// Changes attributes of `ino` (through handle `fh` for the size when given).
    pub fn setattr(&self, ino: u64, set: &SetAttr, fh: Option<u64>) -> OvlResult<Attr> {
        self.upper()?;
        let node = self.node(ino)?;
        let kill_mode = match set.kill_setid_of {
            Some(caller) if set.mode.is_none() && (set.size.is_some() || set.changes_nothing()) => {
                let loc = node.loc.read().clone();
                self.mode_without_setid(&loc, caller)?
            }
            _ => None,
        };
        if set.changes_nothing() && kill_mode.is_none() && set.kill_setid_of.is_some() {
            // Nothing to drop: no copy-up for it.
            return self.getattr(ino);
        }
        if set.size.is_some() {
            self.copy_up(&node)?;
        } else {
            self.copy_up_meta(&node)?;
        }
        let loc = node.loc.read().clone();
        let (dir, cname) = self.object_at(&loc)?;
        if let Some(size) = set.size {
            if node.is_dir() {
                return Err(libc::EISDIR);
            }
            let via_handle = fh.and_then(|fh| {
                self.with_writable_fd(fh, |f| {
                    f.set_len(size)
                        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
                })
                .ok()
            });
            if via_handle.is_none() {
                let f = File::from(sys::reopen_at(dir.as_fd(), &cname, libc::O_WRONLY)?);
                f.set_len(size)
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
            }
        }
        let uid = set.uid.map(|u| self.ids.uid.stored(u));
        let gid = set.gid.map(|g| self.ids.gid.stored(g));
        let mode = set.mode.or(kill_mode);
        if let Some(xname) = self.stack.get(0).stat_override {
            if uid.is_some() || gid.is_some() || mode.is_some() {
                let mut st = sys::stat_at(dir.as_fd(), &cname)?;
                self.apply_override(&loc, &mut st);
                statoverride::store(xname, dir.as_fd(), &cname, &st, uid, gid, mode)?;
            }
        } else {
            if uid.is_some() || gid.is_some() {
                match sys::chown_at(
                    dir.as_fd(),
                    &cname,
                    uid.unwrap_or(u32::MAX),
                    gid.unwrap_or(u32::MAX),
                ) {
                    // With squashing the mount shows one owner whatever is stored, so a chown
                    // the filesystem refuses is not the caller's failure (fuse-overlayfs agrees).
                    Err(libc::EPERM) | Err(libc::EINVAL) if self.ids.squashing() => {}
                    r => r?,
                }
            }
            if let Some(mode) = mode {
                if node.kind != libc::S_IFLNK {
                    sys::chmod_at(dir.as_fd(), &cname, mode & 0o7777)?;
                }
            }
        }
        if set.atime.is_some() || set.mtime.is_some() {
            sys::utimens_at(
                dir.as_fd(),
                &cname,
                &[timespec(set.atime), timespec(set.mtime)],
            )?;
        }
        self.getattr(ino)
    }

    /// The permission bits of the object at `loc` as a write or truncate by `caller` leaves
    /// them (the VFS rule: see [`setid_bits_to_kill`]), or `None` when they do not change.
    /// Asks about the caller only when there is something to drop.
    fn mode_without_setid(&self, loc: &Location, caller: Caller) -> OvlResult<Option<u32>> {
        let (dir, cname) = self.object_at(loc)?;
        let mut st = sys::stat_at(dir.as_fd(), &cname)?;
        self.apply_override(loc, &mut st);
        let mode = st.st_mode & 0o7777;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG
            || mode & (libc::S_ISUID | libc::S_ISGID) == 0
            || caller.holds_fsetid()
        {
            return Ok(None);
        }
        let kill = setid_bits_to_kill(mode, self.ids.gid.shown(st.st_gid), caller);
        Ok((mode & kill != 0).then_some(mode & !kill))
    }

    /// Sets xattr `name` of `ino`.
    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> OvlResult<()> {
        self.upper()?;
        let node = self.node(ino)?;
        self.copy_up_meta(&node)?;
        let loc = node.loc.read().clone();
        let (dir, cname) = self.object_at(&loc)?;
        let stored =
            CString::new(whiteout::stored_xattr_name(name.as_bytes())).map_err(|_| libc::EINVAL)?;
        sys::set_xattr_at(dir.as_fd(), &cname, &stored, value, flags)
    }

    /// Removes xattr `name` of `ino`.
    pub fn removexattr(&self, ino: u64, name: &OsStr) -> OvlResult<()> {
        self.upper()?;
        let node = self.node(ino)?;
        let stored =
            CString::new(whiteout::stored_xattr_name(name.as_bytes())).map_err(|_| libc::EINVAL)?;
        {
            // Removing an xattr that does not exist changes nothing: no copy-up for it.
            let loc = node.loc.read().clone();
            let (dir, cname) = self.object_at(&loc)?;
            sys::get_xattr_at(dir.as_fd(), &cname, &stored)?;
        }
        self.copy_up_meta(&node)?;
        let loc = node.loc.read().clone();
        let (dir, cname) = self.object_at(&loc)?;
        sys::remove_xattr_at(dir.as_fd(), &cname, &stored)
    }
}

/// Before a node's merged path changes from `was`: record that its lower parts stay at their
/// current paths.
fn pin_lower_paths(l: &mut Location, was: &[u8]) {
    if l.layer != 0 && l.real().is_none() {
        l.set_real(Some(Box::from(was)));
    }
    if let Some(dirs) = l.dir() {
        let pinned: Vec<DirLayer> = dirs
            .iter()
            .map(|d| {
                let mut d = d.clone();
                if d.layer != 0 && d.path.is_none() {
                    d.path = Some(Arc::from(was));
                }
                d
            })
            .collect();
        l.set_dir(Some(pinned.into()));
    }
}

/// The bits a write or truncate by `caller`, who lacks CAP_FSETID, drops from permission
/// bits `mode` of a file of group `gid`: set-user-ID, and set-group-ID where group
/// execution makes it a privilege or the caller is not in the group
/// (`setattr_should_drop_sgid`).
fn setid_bits_to_kill(mode: u32, gid: u32, caller: Caller) -> u32 {
    if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || !caller.in_group(gid)) {
        libc::S_ISUID | libc::S_ISGID
    } else {
        libc::S_ISUID
    }
}
