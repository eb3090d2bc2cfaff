//! The FUSE adapter: translates kernel requests into [`Overlay`] calls and answers them.
//! No overlay rule lives here.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, Notifier,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};

use crate::caller::Caller;
use crate::dirmerge::DirEntry;
use crate::overlay::{Attr, Creator, Inval, Overlay, SetAttr, SetTime};
use crate::passthrough::{IoModes, OpenMode};
use crate::stats::{Op, RequestStats};

/// Cache lifetime of names and attributes when the overlay is exact
/// ([`Overlay::caches_exact`]): they then change only through requests the kernel sees (and
/// after which it drops what it cached) or with a notification from us, so the kernel may
/// keep them as long as it likes. A day, like fuse-overlayfs's and virtiofs's
/// `cache=always`.
const LONG_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Otherwise names and attributes are trusted for a second, and directories' attributes
/// not at all: their link counts change behind the kernel's back (copy-up of a descendant's
/// parent merges them).
const SHORT_TTL: Duration = Duration::from_secs(1);

/// How long the kernel may trust what we tell it.
#[derive(Debug, Clone, Copy)]
struct Ttls {
    entry: Duration,
    attr: Duration,
    dir_attr: Duration,
}

impl Ttls {
    fn for_overlay(ov: &Overlay) -> Ttls {
        if ov.caches_exact() {
            Ttls {
                entry: LONG_TTL,
                attr: LONG_TTL,
                dir_attr: LONG_TTL,
            }
        } else {
            Ttls {
                entry: SHORT_TTL,
                attr: SHORT_TTL,
                dir_attr: Duration::ZERO,
            }
        }
    }

    /// Attribute lifetime for an object.
    fn attr(&self, a: &Attr) -> &Duration {
        if (a.st.st_mode & libc::S_IFMT) == libc::S_IFDIR {
            &self.dir_attr
        } else {
            &self.attr
        }
    }
}

/// Lets `ov` tell the kernel, through `notifier`, what changed behind its back (see
/// [`Overlay::set_invalidator`]).
pub fn connect_invalidations(ov: &Overlay, notifier: Notifier, stats: Option<Arc<RequestStats>>) {
    // Names are dropped from a thread of their own: the kernel takes the directory's lock
    // for that, which the request that found the change may hold until it is answered.
    let (names_tx, names_rx) = std::sync::mpsc::channel::<(u64, Box<[u8]>)>();
    {
        let notifier = notifier.clone();
        let stats = stats.clone();
        let spawned = std::thread::Builder::new()
            .name("invalidate".into())
            .spawn(move || {
                for (parent, name) in names_rx {
                    if let Some(s) = &stats {
                        s.bump(Op::NotifyInvalEntry);
                    }
                    let name = OsStr::from_bytes(&name);
                    if let Err(e) = notifier.inval_entry(INodeNo(parent), name) {
                        tracing::debug!(parent, error = %e, "name invalidation not delivered");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread for name invalidations");
        }
    }
    {
        let notifier = notifier.clone();
        let stats = stats.clone();
        ov.set_page_store(move |ino, data| {
            if let Some(s) = &stats {
                s.bump(Op::NotifyStore);
            }
            if let Err(e) = notifier.store(INodeNo(ino), 0, data) {
                tracing::debug!(ino, error = %e, "page store not delivered");
            }
        });
    }
    let names_tx = parking_lot::Mutex::new(names_tx);
    ov.set_invalidator(move |what| {
        // Attributes and listings are dropped at once, before the request that changed them
        // is answered, so that its caller never sees them stale. The kernel takes no lock
        // for that which a request in progress may hold: for attributes (a negative offset)
        // only the inode's spinlock; for a directory's listing also the locks of its cached
        // pages, which only a listing holds, and only while it copies entries (to its
        // reader's buffer: should that be a mapping of a file on this mount, the read that
        // causes goes to another worker thread). A directory whose listing changes through
        // a request is locked by the kernel for it, so no listing of it is in progress.
        let (ino, offset) = match what {
            Inval::Attrs(ino) => (ino, -1),
            Inval::Listing(ino) => (ino, 0),
            Inval::Entry(parent, name) => {
                let _ = names_tx.lock().send((parent, name));
                return;
            }
        };
        if let Some(s) = &stats {
            s.bump(Op::NotifyInvalInode);
        }
        if let Err(e) = notifier.inval_inode(INodeNo(ino), offset, 0) {
            tracing::debug!(ino, error = %e, "inode invalidation not delivered");
        }
    });
}

/// The `fuser::Filesystem` face of an [`Overlay`].
#[derive(Debug)]
pub struct StrataFuse {
    ov: Arc<Overlay>,
    max_write: Option<u32>,
    stats: Option<Arc<RequestStats>>,
    /// End the process when the session ends (see [`Self::exiting_when_done`]).
    exit_when_done: bool,
    ttl: Ttls,
    /// Whether to ask the kernel for FUSE passthrough.
    want_passthrough: bool,
    /// The kernel leaves dropping set-user-ID, set-group-ID and capabilities to us
    /// (FUSE_HANDLE_KILLPRIV_V2).
    kills_setid: bool,
    io: IoModes,
}

impl StrataFuse {
    /// Wraps an overlay; `max_write` is the `max_write=` option, if given; `passthrough`
    /// says whether to hand open upper files to the kernel (granted to root only).
    pub fn new(ov: Arc<Overlay>, max_write: Option<u32>, passthrough: bool) -> StrataFuse {
        StrataFuse {
            ttl: Ttls::for_overlay(&ov),
            ov,
            max_write,
            stats: None,
            exit_when_done: false,
            want_passthrough: passthrough,
            kills_setid: false,
            io: IoModes::new(false),
        }
    }

    /// Ends the process as soon as the session is over, before fuser would unmount the
    /// mountpoint by path. fuser 0.18 tries that even when the kernel already unmounted us
    /// (its `is_mounted` takes the dead connection's POLLERR for "mounted"), and by then the
    /// path may hold a new mount: `umount M; stratafs ... M` lost the second mount whenever
    /// the old daemon got there last. For a process that is only the daemon.
    pub fn exiting_when_done(mut self) -> StrataFuse {
        self.exit_when_done = true;
        self
    }

    /// Counts requests in `stats` (see [`crate::stats`]).
    pub fn with_stats(mut self, stats: Option<Arc<RequestStats>>) -> StrataFuse {
        self.stats = stats;
        self
    }

    fn entry(&self, reply: ReplyEntry, r: Result<Attr, i32>) {
        match r {
            Ok(a) => reply.entry_with_ttls(
                self.ttl.attr(&a),
                &self.ttl.entry,
                &file_attr(&a),
                Generation(0),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn count(&self, op: Op) {
        if let Some(s) = &self.stats {
            s.bump(op);
        }
    }

    /// The listing a read of directory `ino` at cookie `offset` answers from: the handle's,
    /// or with none (handle 0: opened without asking us), the directory's.
    fn listing(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
    ) -> Result<(Arc<[DirEntry]>, usize), i32> {
        if fh.0 == 0 {
            self.ov.dir_entries_of(ino.0, offset)
        } else {
            self.ov.dir_entries_at(fh.0, offset)
        }
    }

    /// How the kernel is to treat an open with flags `flags` answered in `mode`.
    fn open_flags(mode: &OpenMode, flags: i32) -> FopenFlags {
        let cached = match mode {
            // Layer contents change only through this mount, so cached pages stay valid
            // unless writes bypassed the cache since.
            OpenMode::Cached { keep_cache: true } => FopenFlags::FOPEN_KEEP_CACHE,
            OpenMode::Cached { keep_cache: false } => FopenFlags::empty(),
            OpenMode::Passthrough(_) => return FopenFlags::empty(),
        };
        if flags & libc::O_ACCMODE == libc::O_WRONLY {
            // Without passthrough (rootless), cached writes go through the kernel's page
            // cache for this inode on their way to us, and then into the upper layer's:
            // every byte lands in two caches. A write-only open can neither read nor map
            // the file, so its writes may go straight to us (the kernel still drops cached
            // pages they overwrite, for other opens). Writing 1 GiB rootless in the bench:
            // 224 -> 427 MB/s (the kernel overlay: 445).
            cached | FopenFlags::FOPEN_DIRECT_IO
        } else {
            cached
        }
    }
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn file_type(kind: u32) -> FileType {
    match kind {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let st = &a.st;
    FileAttr {
        ino: INodeNo(st.st_ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode & libc::S_IFMT),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

impl Filesystem for StrataFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let want = self.max_write.unwrap_or(1 << 20);
        if let Err(nearest) = config.set_max_write(want) {
            let _ = config.set_max_write(nearest);
        }
        // Lookups and listings in one directory need not wait for each other.
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        if self.ov.caches_exact() {
            // Listings carry each entry's attributes, so a walk needs no lookup per name.
            // Only where the kernel thinks they are wanted (READDIRPLUS_AUTO): a listing's
            // first block, and later blocks once names from the listing were looked up or
            // revalidated. Attributes cost a cold inode read per name in the layer, which a
            // names-only listing of a big directory (ls -f, readdir) never needs: there,
            // always-plus made a 100k-entry listing 17x slower than the kernel's.
            // Not when the cache lifetimes are short: an entry's lifetime (one second) and
            // a directory's attribute lifetime (none) differ there, which a listing entry
            // cannot say.
            let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
            let _ = config.add_capabilities(InitFlags::FUSE_READDIRPLUS_AUTO);
            // A symlink's target never changes (a new target is a new symlink, with its
            // own inode number), so the kernel may keep it in the symlink's page cache.
            let _ = config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS);
        }
        // Reads and writes of open upper files go straight to the backing file. Stack depth
        // 1: backing files sit on a plain filesystem, and the mount may itself be a layer of
        // one more overlay.
        if self.want_passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.io.set_enabled(true);
            // Without this, every write syscall costs a round trip: the kernel asks for
            // `security.capability` before each one (FUSE does not mark its superblock
            // SB_NOSEC), 11,323 of the 16,907 requests of a 100 MB untar. With it, the
            // kernel asks once per inode and leaves dropping set-user-ID on writes,
            // truncates and chowns to us: writes that reach us say when
            // (FUSE_WRITE_KILL_SUIDGID); other writes come as a setattr that changes
            // nothing, and truncates as a plain size change, so for both we ask about the
            // caller (`SetAttr::kill_setid_of`); a real chown drops them by itself. Only
            // where passthrough is on: there, the daemon is privileged and chowns for real.
            // Two corners differ from the kernel: a caller outside our pid namespace counts
            // as lacking CAP_FSETID, and `chown(f, -1, -1)` by a caller holding it keeps
            // the bits (the VFS drops them on any chown of a non-directory).
            if self.ov.chowns_for_real()
                && config
                    .add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
                    .is_ok()
            {
                self.kills_setid = true;
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.count(Op::Lookup);
        self.entry(reply, self.ov.lookup(parent.0, name));
    }

    fn destroy(&mut self) {
        if let Some(s) = &self.stats {
            s.dump("unmount");
        }
        if self.exit_when_done {
            // Every write was answered after it reached its layer: nothing is left to do.
            // SAFETY: _exit ends the process without running anything else.
            unsafe { libc::_exit(0) };
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.count(Op::Forget);
        self.ov.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.count(Op::Getattr);
        match self.ov.getattr(ino.0) {
            Ok(a) => reply.attr(self.ttl.attr(&a), &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.count(Op::Setattr);
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            kill_setid_of: self.kills_setid.then(|| caller(req)),
        };
        match self.ov.setattr(ino.0, &set, fh.map(|f| f.0)) {
            Ok(a) => reply.attr(self.ttl.attr(&a), &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.count(Op::Readlink);
        match self.ov.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.count(Op::Mknod);
        self.entry(
            reply,
            self.ov
                .mknod(parent.0, name, mode, rdev as u64, creator(req)),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.count(Op::Mkdir);
        self.entry(reply, self.ov.mkdir(parent.0, name, mode, creator(req)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.count(Op::Unlink);
        empty(reply, self.ov.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.count(Op::Rmdir);
        empty(reply, self.ov.rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.count(Op::Symlink);
        let target = target.as_os_str().as_bytes();
        self.entry(
            reply,
            self.ov.symlink(parent.0, link_name, target, creator(req)),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Rename);
        empty(
            reply,
            self.ov
                .rename(parent.0, name, newparent.0, newname, flags.bits()),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.count(Op::Link);
        self.entry(reply, self.ov.link(ino.0, newparent.0, newname));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.count(Op::Open);
        let fh = match self.ov.open(ino.0, flags.0) {
            Ok(fh) => fh,
            Err(e) => return reply.error(errno(e)),
        };
        let mode = self.io.open(
            ino.0,
            || self.ov.passthrough_file(fh),
            |fd| reply.open_backing(fd),
        );
        match &mode {
            OpenMode::Passthrough(b) => {
                reply.opened_passthrough(FileHandle(fh), Self::open_flags(&mode, flags.0), b)
            }
            _ => reply.opened(FileHandle(fh), Self::open_flags(&mode, flags.0)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.count(Op::Read);
        match self.ov.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.count(Op::Write);
        let kill = write_flags
            .contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            .then(|| caller(req));
        match self.ov.write(fh.0, offset, data, kill) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Flush);
        // Nothing to do at close: writes reach the layer before they are answered (or go
        // straight to it with passthrough), and locks stay in the kernel. ENOSYS tells the
        // kernel so once, and it stops sending FLUSH, a round trip it waits for at every
        // close (a third of the requests of creating a small file).
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Release);
        self.io.release(ino.0);
        self.ov.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Fsync);
        empty(reply, self.ov.fsync(fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.count(Op::Opendir);
        // When the overlay is exact, a listing changes only through requests on the
        // directory (create, mknod, mkdir, symlink, link, unlink, rmdir, rename), after
        // which the kernel bumps the directory's i_version and so drops its cached listing
        // at the next read from the start, or with a notification from us
        // (Overlay::caches_exact). Then no open needs us: ENOSYS makes the kernel open
        // every directory by itself from now on, with CACHE_DIR and KEEP_CACHE, and send
        // neither OPENDIR nor RELEASEDIR (two round trips per directory of a walk, most of
        // a warm walk's time); reads come without a handle.
        if self.ov.caches_exact() {
            return reply.error(Errno::ENOSYS);
        }
        match self.ov.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.count(Op::Readdir);
        let (entries, start) = match self.listing(ino, fh, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        // An entry's offset is its own position cookie: the next read goes on after it.
        for e in &entries[start..] {
            let name = OsStr::from_bytes(&e.name);
            if reply.add(INodeNo(e.ino), e.off, file_type(e.kind), name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.count(Op::Readdirplus);
        let (entries, start) = match self.listing(ino, fh, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        let mut added = false;
        // Offsets as in `readdir`.
        for (i, e) in entries.iter().enumerate().skip(start) {
            let name = OsStr::from_bytes(&e.name);
            let next = e.off;
            if &*e.name == b"." || &*e.name == b".." {
                // The kernel links no inode for these (it skips them before looking at the
                // attributes), so they take no lookup reference; only their d_ino is used.
                if reply.add(
                    INodeNo(e.ino),
                    next,
                    name,
                    &Duration::ZERO,
                    &dot_attr(e.ino),
                    Generation(0),
                ) {
                    break;
                }
                added = true;
                continue;
            }
            // Exactly what a lookup of the name answers now, with one lookup reference
            // counted: the kernel takes one for every entry it receives (and forgets it
            // like any other).
            let listed = match self.ov.lookup_listed(ino.0, &entries, i, offset == 0) {
                Ok(l) => l,
                // Gone since the listing was made: lookup and listing agree that it is.
                Err(libc::ENOENT) => continue,
                // The lookup fails: so does the listing, at this entry (a later request
                // starts here again), as a lookup of the name would.
                Err(err) => {
                    if added {
                        break;
                    }
                    return reply.error(errno(err));
                }
            };
            let a = &listed.attr;
            if reply.add(
                INodeNo(a.st.st_ino),
                next,
                name,
                &self.ttl.entry,
                &file_attr(a),
                Generation(0),
            ) {
                // It did not fit, so the kernel never sees it: give the reference back.
                self.ov.forget(a.st.st_ino, 1);
                break;
            }
            added = true;
            if listed.last {
                break;
            }
        }
        self.ov.listed_reply_made(ino.0);
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Releasedir);
        self.ov.release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Fsyncdir);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.count(Op::Statfs);
        match self.ov.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Setxattr);
        empty(reply, self.ov.setxattr(ino.0, name, value, flags));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.count(Op::Getxattr);
        match self.ov.getxattr(ino.0, name) {
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.count(Op::Listxattr);
        match self.ov.listxattr(ino.0) {
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.count(Op::Removexattr);
        empty(reply, self.ov.removexattr(ino.0, name));
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.count(Op::Access);
        match self.ov.access(ino.0, mask.bits()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.count(Op::Create);
        let (a, fh) = match self.ov.create(parent.0, name, mode, flags, creator(req)) {
            Ok(v) => v,
            Err(e) => return reply.error(errno(e)),
        };
        let ino = a.st.st_ino;
        let mode = self.io.open(
            ino,
            || self.ov.passthrough_file(fh),
            |fd| reply.open_backing(fd),
        );
        let flags = Self::open_flags(&mode, flags);
        match &mode {
            OpenMode::Passthrough(b) => reply.created_passthrough(
                &self.ttl.entry,
                &file_attr(&a),
                Generation(0),
                FileHandle(fh),
                flags,
                b,
            ),
            _ => reply.created(
                &self.ttl.entry,
                &file_attr(&a),
                Generation(0),
                FileHandle(fh),
                flags,
            ),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Fallocate);
        empty(reply, self.ov.fallocate(fh.0, offset, length, mode));
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.count(Op::Lseek);
        match self.ov.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.count(Op::CopyFileRange);
        match self
            .ov
            .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }
}

/// Attributes sent with the "." and ".." entries of a `readdirplus` reply, which the kernel
/// ignores but for the type and inode number.
fn dot_attr(ino: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        pid: req.pid(),
        gid: req.gid(),
    }
}

fn creator(req: &Request) -> Creator {
    Creator {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(st) => match st.duration_since(UNIX_EPOCH) {
            Ok(d) => SetTime::At(d.as_secs() as i64, d.subsec_nanos() as i64),
            Err(e) => {
                let d = e.duration();
                let (mut s, mut ns) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                if ns < 0 {
                    s -= 1;
                    ns += 1_000_000_000;
                }
                SetTime::At(s, ns)
            }
        },
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), i32>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

/// Answers a get/list xattr request: the size when asked for it, ERANGE when it does not fit.
fn xattr_reply(reply: ReplyXattr, value: &[u8], size: u32) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}
