//! The overlay itself: lookup through the layers, merged directories, attributes, reads and
//! xattrs. It knows nothing about FUSE; [`crate::fuse`] translates requests into these calls.
//! Errors are `errno` values, which is what every caller ends up answering.
//!
//! The read side lives here; [`copyup`] moves objects into the upper layer and [`write`]
//! holds the operations that change the tree.

mod copyup;
mod lookahead;
mod prefill;
mod readahead;
mod write;

pub use lookahead::Listed;
pub use write::{Creator, SetAttr, SetTime};

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::dirmerge::{self, DirEntry};
use crate::fdcache::{DirFdCache, LayerDir};
use crate::handles::{DirHandle, Handle, HandleTable, KeptListing, OpenFile};
use crate::idmap::IdMaps;
use crate::inode::{split_path, DirLayer, InoMapper, Location, LowerData, Node, ROOT_INO};
use crate::layers::LayerStack;
use crate::nodetable::NodeTable;
use crate::statoverride;
use crate::sys;
use crate::upper::{Upper, WhiteoutFormat};
use crate::whiteout;

/// Result of an overlay operation: a value or an `errno`.
pub type OvlResult<T> = Result<T, i32>;

/// What the `*at` calls on an object go through: its layer directory, or the object itself
/// when it is pinned by a descriptor.
type ObjectDir = Arc<dyn AsFd + Send + Sync>;

/// Directory descriptors kept open at most; the rest are reopened on demand.
const DIR_FD_CACHE: usize = 1024;

/// Listings of at least this many entries give their memory back to the system when their
/// handle closes. Such a listing (about 70 bytes an entry with its names) is made while the
/// kernel's nodes for its entries are allocated, so once freed it is a hole below them that
/// the heap cannot shrink past: after a walk of a 20k-entry directory that stayed ~1 MiB of
/// resident free memory.
const TRIM_AFTER_LISTING: usize = 4096;

/// Directories whose listings are kept between handle-less reads: as many as may be read at
/// once (one per worker and then some); each goes when read to its end.
const OPEN_LISTINGS: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(16) {
    Some(n) => n,
    None => unreachable!(),
};

/// The index in listing `l` of the first entry a read from position cookie `offset` returns.
fn entries_after(l: &[DirEntry], offset: u64) -> usize {
    l.partition_point(|e| e.off <= offset)
}

/// Drops a reference to a listing no longer kept, giving a big one's memory back to the
/// system when it was the last (see [`TRIM_AFTER_LISTING`]): a trim walks the heap's free
/// lists, milliseconds after a big walk, so it is not done while the listing is still held.
fn let_go(mut l: Arc<[DirEntry]>) {
    let freed = l.len() >= TRIM_AFTER_LISTING && Arc::get_mut(&mut l).is_some();
    drop(l);
    if freed {
        crate::heap::trim();
    }
}

/// Lower files at least this large get a metadata-only copy-up for metadata changes;
/// smaller ones are cheaper to copy whole than to copy twice.
pub(crate) const METACOPY_MIN: i64 = 64 * 1024;

/// The pseudo-layer of index entries: a [`Location`] in it names an entry of the work
/// directory's index (its `real` path is the entry's name), which is the upper copy of a
/// lower hard link not yet linked up under this name.
pub(crate) const INDEX_LAYER: u16 = u16::MAX;

/// Attributes as the mount reports them: the real object's, with our inode number and the
/// overlay's link count rules applied.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    /// The adjusted `stat`.
    pub st: libc::stat,
}

/// Choices that shape an overlay beyond its layers.
#[derive(Debug, Clone, Default)]
pub struct OverlayOptions {
    /// Refuse every change even with an upper layer.
    pub read_only: bool,
    /// Whiteout format to write; probed from the upper filesystem when `None`.
    pub whiteout: Option<WhiteoutFormat>,
    /// How stored owners are shown (`uidmapping=`, `gidmapping=`, `squash_to_*`).
    pub ids: IdMaps,
    /// fsync does nothing (`volatile`).
    pub volatile: bool,
}

/// A merged view over a [`LayerStack`].
#[derive(Debug)]
pub struct Overlay {
    stack: LayerStack,
    nodes: NodeTable,
    inos: InoMapper,
    dirfds: DirFdCache,
    handles: HandleTable,
    /// Listings being read without a handle (see [`dir_entries_of`](Self::dir_entries_of)),
    /// by directory, with the [`Node::listing_gen`] from before each was made.
    open_listings: parking_lot::Mutex<lru::LruCache<u64, KeptListing>>,
    /// Resolves names of a listing ahead of the lookups that follow it.
    lookahead: lookahead::Lookahead,
    /// Reads a directory's lower files ahead of their opens.
    readahead: readahead::Readahead,
    upper: Option<Upper>,
    read_only: bool,
    ids: IdMaps,
    volatile: bool,
    /// Some layer keeps owners in an override xattr, which users must not see.
    hides_override: bool,
    /// Told about objects whose attributes changed behind the kernel's back.
    invalidator: std::sync::OnceLock<Invalidator>,
    /// Takes small lower files into the kernel's page cache at open.
    page_store: std::sync::OnceLock<prefill::PageStore>,
}

/// What the kernel must drop from its caches because it changed without a request that the
/// kernel would have drawn that conclusion from (see [`Overlay::set_invalidator`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inval {
    /// The attributes of object `ino`.
    Attrs(u64),
    /// The attributes and the cached listing of directory `ino`.
    Listing(u64),
    /// The name `.1` in directory `.0`. The kernel takes the directory's lock to drop a name,
    /// which the request being served may hold: this one must be sent from another thread,
    /// after the reply.
    Entry(u64, Box<[u8]>),
}

/// A callback told what the kernel must drop (see [`Overlay::set_invalidator`]).
pub struct Invalidator(Box<dyn Fn(Inval) + Send + Sync>);

impl std::fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Invalidator")
    }
}

/// What a name in a directory resolves to.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    /// The layer holding the visible object.
    pub layer: u16,
    /// Its path in that layer, when not the merged path.
    pub real: Option<Box<[u8]>>,
    /// Its real attributes.
    pub st: libc::stat,
    /// Our inode number for it.
    pub ino: u64,
    /// For a directory, the copies that merge into it.
    pub merged: Vec<DirLayer>,
    /// For a metadata-only upper copy, where its data is.
    pub data: Option<LowerData>,
}

impl Resolved {
    fn is_dir(&self) -> bool {
        (self.st.st_mode & libc::S_IFMT) == libc::S_IFDIR
    }
}

impl Overlay {
    /// Builds the overlay and its root node; prepares the work directory when there is an
    /// upper layer.
    pub fn new(stack: LayerStack, opts: OverlayOptions) -> OvlResult<Overlay> {
        let upper = match (stack.upper(), &stack.workdir) {
            (Some(_), Some(work)) => {
                Some(Upper::open(stack.get(0).fd(), work.fd(), opts.whiteout)?)
            }
            _ => None,
        };
        let inos = InoMapper::with_devs(stack.layers().iter().map(|l| l.dev));
        let hides_override = stack.layers().iter().any(|l| l.stat_override.is_some());
        let ov = Overlay {
            stack,
            nodes: NodeTable::default(),
            inos,
            dirfds: DirFdCache::new(DIR_FD_CACHE),
            handles: HandleTable::default(),
            open_listings: parking_lot::Mutex::new(lru::LruCache::new(OPEN_LISTINGS)),
            lookahead: lookahead::Lookahead::default(),
            readahead: readahead::Readahead::default(),
            upper,
            read_only: opts.read_only,
            hides_override,
            ids: opts.ids,
            volatile: opts.volatile,
            invalidator: std::sync::OnceLock::new(),
            page_store: std::sync::OnceLock::new(),
        };
        let mut dirs = Vec::new();
        for (i, layer) in ov.stack.layers().iter().enumerate() {
            let marks = whiteout::dir_marks(layer.fd());
            dirs.push(DirLayer::at_merged(i as u16, marks.xattr_whiteouts));
            if marks.opaque {
                break;
            }
        }
        ov.nodes.insert_root(Node::new(
            ROOT_INO,
            libc::S_IFDIR,
            Location::new(Box::default(), 0).with_dir(Some(dirs.into())),
        ));
        Ok(ov)
    }

    /// The layers.
    pub fn stack(&self) -> &LayerStack {
        &self.stack
    }

    /// Number of inodes the kernel currently holds.
    pub fn cached_inodes(&self) -> usize {
        self.nodes.len()
    }

    /// Whether every change the kernel could have cached happens through a request on the
    /// object it concerns (which the kernel sees, and after which it drops what it cached),
    /// or is reported to the [`Invalidator`]: then names, attributes and listings may be
    /// cached for as long as the kernel likes.
    ///
    /// The layers below the upper one never change, and the upper changes only through this
    /// mount. What can still change behind the kernel's back, and how each is handled:
    /// - A directory copied up because something below it changed becomes merged (link
    ///   count 1) and gets the upper copy's ctime and size; its listing's ".." may name the
    ///   parent's upper copy now: reported ([`Inval::Listing`]).
    /// - A file copied up (for writing, or for a metadata change) gets the upper copy's
    ///   ctime and block count, and a hard link reached by another name sees the indexed
    ///   copy: reported too ([`Inval::Attrs`]; the kernel holds one inode for all names of a
    ///   hard link, since they share our inode number).
    /// - A directory moved to another parent has a new "..": its listing is reported.
    /// - A request that fails may have changed its directory before it failed: the
    ///   directory and the names are reported ([`Overlay::change_failed`]).
    /// - Names always keep their inode number: copy-up records the origin's identity, and
    ///   hard links go through the index. That needs private xattrs on the upper layer.
    ///   Without them (no index), copy-up gives a name a new inode number, which the kernel
    ///   would not learn of while it trusts its cached name: such mounts are not exact.
    pub fn caches_exact(&self) -> bool {
        match &self.upper {
            Some(u) if !self.read_only => u.index.is_some(),
            _ => true,
        }
    }

    /// Whether ownership changes reach the upper layer as real `chown`s, which drop
    /// set-user-ID and set-group-ID the way the kernel's rules ask: not so when ownership
    /// is kept in an xattr, or squashed to one owner.
    pub fn chowns_for_real(&self) -> bool {
        self.upper.is_some() && self.stack.get(0).stat_override.is_none() && !self.ids.squashing()
    }

    /// Sets the callback told what the kernel must drop from its caches (once; later calls
    /// are ignored). It runs on the thread that made the change, before that thread's
    /// request is answered, so it must not wait for other requests.
    pub fn set_invalidator(&self, f: impl Fn(Inval) + Send + Sync + 'static) {
        let _ = self.invalidator.set(Invalidator(Box::new(f)));
    }

    /// Tells the invalidator, if the kernel holds the inode concerned.
    pub(crate) fn invalidate(&self, what: Inval) {
        let ino = match &what {
            Inval::Attrs(i) | Inval::Listing(i) | Inval::Entry(i, _) => *i,
        };
        let Some(node) = self.nodes.get(ino) else {
            return;
        };
        if matches!(what, Inval::Listing(_)) {
            node.listing_gen.fetch_add(1, Ordering::AcqRel);
        }
        if let Some(inv) = self.invalidator.get() {
            (inv.0)(what);
        }
    }

    /// Object `ino` was copied up without a request on it that would tell the kernel.
    pub(crate) fn copied_up(&self, ino: u64, is_dir: bool) {
        self.invalidate(if is_dir {
            Inval::Listing(ino)
        } else {
            Inval::Attrs(ino)
        });
    }

    /// A request that changes `name` in directory `parent` failed, maybe after it changed
    /// something (the kernel assumes it changed nothing): the kernel drops what it cached
    /// of both.
    pub fn change_failed(&self, parent: u64, name: &OsStr) {
        self.invalidate(Inval::Listing(parent));
        self.invalidate(Inval::Entry(parent, Box::from(name.as_bytes())));
    }

    fn node(&self, ino: u64) -> OvlResult<Arc<Node>> {
        self.nodes.get(ino).ok_or(libc::ESTALE)
    }

    /// Descriptor of `layer`'s copy of directory `path`, from the cache or opened confined to
    /// the layer.
    fn layer_dir(&self, layer: u16, path: &[u8]) -> OvlResult<Arc<LayerDir>> {
        self.dirfds.get_or_open(layer, path, || {
            if layer == INDEX_LAYER {
                let index = self.upper.as_ref().and_then(|u| u.index.as_ref());
                return match index {
                    Some(fd) if path.is_empty() => Ok(LayerDir::new(sys::dup(fd.as_fd())?, false)),
                    _ => Err(libc::ENOENT),
                };
            }
            let l = self.stack.get(layer);
            let fd = if path.is_empty() {
                sys::dup(l.fd())?
            } else {
                sys::open_beneath(
                    l.fd(),
                    &sys::cstring(path)?,
                    libc::O_PATH | libc::O_DIRECTORY,
                )?
            };
            // A read-only layer's listing stays true, so the directory may keep one.
            Ok(LayerDir::new(fd, !l.writable))
        })
    }

    fn attr(&self, mut st: libc::stat, ino: u64, merged_dir: bool) -> Attr {
        st.st_ino = ino;
        // Like the kernel: a merged directory's link count cannot be known without counting
        // subdirectories in every layer, so it reports 1 ("unknown") as find(1) expects.
        if merged_dir {
            st.st_nlink = 1;
        }
        // Stored owners as the mount's users should see them: mapped into their user
        // namespace, or squashed to one owner.
        st.st_uid = self.ids.uid.shown(st.st_uid);
        st.st_gid = self.ids.gid.shown(st.st_gid);
        Attr { st }
    }

    /// Checks a name the kernel hands us for a lookup or a new entry.
    fn check_name(name: &[u8]) -> OvlResult<()> {
        if name.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
            return Err(libc::EINVAL);
        }
        Ok(())
    }

    /// Resolves `name` in the directory at `ploc` through the layers, top first. The rules
    /// here and in [`dirmerge::merge`] are the same, so lookup and readdir always agree.
    pub(crate) fn resolve(&self, ploc: &Location, name: &[u8]) -> OvlResult<Option<Resolved>> {
        Self::check_name(name)?;
        if whiteout::is_marker_name(name) {
            return Ok(None);
        }
        let dirs = ploc.dir().ok_or(libc::ENOTDIR)?;
        let cname = sys::cstring(name)?;
        let child_path = join(&ploc.path, name);

        // The topmost hit: layer, attributes, its directory's descriptor, its path there.
        type Hit = (u16, libc::stat, Arc<LayerDir>, Box<[u8]>);
        let mut top: Option<Hit> = None;
        let mut merged: Vec<DirLayer> = Vec::new();
        let mut redirect: Option<Box<[u8]>> = None;
        for (i, dl) in dirs.iter().enumerate() {
            let base = dl.path_in_layer(&ploc.path);
            let dfd = match self.layer_dir(dl.layer, base) {
                Ok(fd) => fd,
                Err(libc::ENOENT) | Err(libc::ENOTDIR) => continue,
                Err(e) => return Err(e),
            };
            let dir = dfd.as_fd();
            match dfd.stat_child(name, &cname) {
                Ok(st) => {
                    if whiteout::is_chardev_whiteout(&st)
                        || (dl.xattr_whiteouts
                            && whiteout::may_be_xattr_whiteout(&st)
                            && whiteout::has_whiteout_xattr(dir, &cname))
                    {
                        break;
                    }
                    let real = join(base, name);
                    if top.is_none() {
                        top = Some((dl.layer, st, dfd.clone(), real.clone()));
                    }
                    if (st.st_mode & libc::S_IFMT) != libc::S_IFDIR {
                        // A non-directory ends the stack: nothing below shows through.
                        break;
                    }
                    let cfd = self.layer_dir(dl.layer, &real)?;
                    let marks = whiteout::dir_marks(cfd.as_fd());
                    let in_place = real == child_path;
                    merged.push(DirLayer {
                        layer: dl.layer,
                        xattr_whiteouts: marks.xattr_whiteouts,
                        path: (!in_place).then(|| Arc::from(real)),
                    });
                    if marks.opaque {
                        break;
                    }
                    if dl.layer == 0 {
                        let up = self.upper.as_ref();
                        // The parent's own lower path, for a redirect relative to it.
                        let parent_lower = dirs
                            .iter()
                            .find(|d| d.layer != 0)
                            .map_or(&ploc.path[..], |d| d.path_in_layer(&ploc.path));
                        let r = up.and_then(|u| u.read_redirect(dir, &cname, parent_lower));
                        if let Some(r) = r {
                            // A renamed directory: its lower copies are where it came from.
                            redirect = Some(r);
                            break;
                        }
                    }
                }
                Err(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
            // A `.wh.NAME` hides the name in the layers below this one, not in this one; the
            // bottom layer has none below (most lookups of a new or lower-only directory).
            if i + 1 < dirs.len() && whiteout::layer_has_oci_whiteout(&dfd, name) {
                break;
            }
        }
        if let Some(target) = redirect {
            self.follow_redirect(&target, &child_path, &mut merged)?;
        }
        let Some((layer, mut st, dfd, real)) = top else {
            return Ok(None);
        };
        let ino = self.ino_of(layer, dfd.as_fd(), &cname, &st);
        if layer != 0 && self.indexes(&st) {
            // A lower hard link: once one of its names was copied up, every name shows the
            // indexed upper copy.
            let key = Upper::index_name(st.st_dev, st.st_ino);
            let index = self.layer_dir(INDEX_LAYER, b"")?;
            if let Ok(mut ist) = sys::stat_at(index.as_fd(), &key) {
                self.fix_nlink(INDEX_LAYER, index.as_fd(), &key, &mut ist);
                return Ok(Some(Resolved {
                    layer: INDEX_LAYER,
                    real: Some(Box::from(key.to_bytes())),
                    st: ist,
                    ino,
                    merged,
                    data: None,
                }));
            }
        }
        self.fix_nlink(layer, dfd.as_fd(), &cname, &mut st);
        let data = if layer == 0 {
            self.lower_data(dfd.as_fd(), &cname, &mut st)
        } else {
            None
        };
        Ok(Some(Resolved {
            layer,
            real: (real != child_path).then_some(real),
            st,
            ino,
            merged,
            data,
        }))
    }

    /// Adds the lower copies of a renamed directory, found at `target` (its path before the
    /// rename) in every lower layer, top first, down to the first opaque one.
    fn follow_redirect(
        &self,
        target: &[u8],
        merged_path: &[u8],
        merged: &mut Vec<DirLayer>,
    ) -> OvlResult<()> {
        let shared: Arc<[u8]> = Arc::from(target);
        for layer in 1..self.stack.len() as u16 {
            let fd = match self.layer_dir(layer, target) {
                Ok(fd) => fd,
                Err(libc::ENOENT) | Err(libc::ENOTDIR) | Err(libc::ELOOP) => continue,
                Err(e) => return Err(e),
            };
            let marks = whiteout::dir_marks(fd.as_fd());
            merged.push(DirLayer {
                layer,
                xattr_whiteouts: marks.xattr_whiteouts,
                path: (target != merged_path).then(|| shared.clone()),
            });
            if marks.opaque {
                break;
            }
        }
        Ok(())
    }

    /// Whether copy-up of the lower object `st` goes through the index: a hard-linked
    /// non-directory, when the upper layer can keep an index.
    pub(crate) fn indexes(&self, st: &libc::stat) -> bool {
        (st.st_mode & libc::S_IFMT) != libc::S_IFDIR
            && st.st_nlink > 1
            && self.upper.as_ref().is_some_and(|u| u.index.is_some())
    }

    /// Turns the upper link count of an indexed file at `dir/name` in `layer` into the
    /// overlay's: the index entry is not a name, and lower names not yet linked up are.
    pub(crate) fn fix_nlink(
        &self,
        layer: u16,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &CStr,
        st: &mut libc::stat,
    ) {
        // A pinned object (reached as itself, with an empty name) may be an indexed file
        // whose last upper name is gone.
        let candidate = layer == INDEX_LAYER
            || (layer == 0
                && (st.st_nlink > 1 || name.is_empty())
                && (st.st_mode & libc::S_IFMT) != libc::S_IFDIR);
        let Some(up) = self
            .upper
            .as_ref()
            .filter(|u| candidate && u.index.is_some())
        else {
            return;
        };
        if let Some(diff) = up.read_nlink_diff(dir, name) {
            st.st_nlink = (st.st_nlink as i64 + diff).max(0) as libc::nlink_t;
        }
    }

    /// For the upper file `dir/name` (attributes `st`): if it is a metadata-only copy, where
    /// its data is; `st` then gets the data's block count.
    pub(crate) fn lower_data(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &CStr,
        st: &mut libc::stat,
    ) -> Option<LowerData> {
        // A metadata-only copy holds no data (its blocks are at most an xattr block), so
        // only a large, mostly sparse file can be one: other files cost no xattr read.
        if (st.st_mode & libc::S_IFMT) != libc::S_IFREG
            || st.st_size < METACOPY_MIN
            || st.st_blocks * 512 >= st.st_size
        {
            return None;
        }
        let up = self.upper.as_ref()?;
        let path = up.read_metacopy(dir, name)?;
        let origin = up.read_origin(dir, name);
        let (parent, file) = split_path(&path);
        let cfile = sys::cstring(file).ok()?;
        for layer in 1..self.stack.len() as u16 {
            let Ok(pfd) = self.layer_dir(layer, parent) else {
                continue;
            };
            let Ok(lst) = sys::stat_at(pfd.as_fd(), &cfile) else {
                continue;
            };
            if origin.is_none_or(|o| o == (lst.st_dev, lst.st_ino)) {
                st.st_blocks = lst.st_blocks;
                return Some(LowerData { layer, path });
            }
        }
        tracing::warn!(
            path = %String::from_utf8_lossy(&path),
            "the data of a metadata-only copy is missing from the lower layers"
        );
        None
    }

    /// Our inode number for an object: from the identity it was copied up from, when the
    /// upper copy records one, so that copy-up never changes a number.
    fn ino_of(
        &self,
        layer: u16,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &CStr,
        st: &libc::stat,
    ) -> u64 {
        if layer == 0 {
            if let Some(up) = &self.upper {
                if let Some((dev, ino)) = up.read_origin(dir, name) {
                    return self.inos.ino(dev, ino);
                }
            }
        }
        self.inos.ino(st.st_dev, st.st_ino)
    }

    /// Looks `name` up in directory `parent` and counts one kernel reference to the result.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> OvlResult<Attr> {
        self.lookup_timed(parent, name.as_bytes(), |ploc, took| {
            self.lookahead.looked_up(parent, ploc, name, took)
        })
    }

    /// [`Overlay::lookup`], telling `timed` how long resolving the name took (the
    /// lookahead's cue that the layers are cold).
    fn lookup_timed(
        &self,
        parent: u64,
        name: &[u8],
        timed: impl FnOnce(&Location, std::time::Duration),
    ) -> OvlResult<Attr> {
        let pnode = self.node(parent)?;
        let ploc = pnode.loc.read().clone();
        let start = std::time::Instant::now();
        let r = self.resolve(&ploc, name);
        timed(&ploc, start.elapsed());
        let r = r?.ok_or(libc::ENOENT)?;
        Ok(self.remember(&ploc.path, name, r))
    }

    /// Registers (or finds) the node for a resolved entry, counts one kernel reference, and
    /// returns its attributes.
    pub(crate) fn remember(&self, parent_path: &[u8], name: &[u8], r: Resolved) -> Attr {
        let kind = r.st.st_mode & libc::S_IFMT;
        let is_dir = r.is_dir();
        let merged_dir = r.merged.len() > 1;
        let ino = r.ino;
        let loc = Location::new(join(parent_path, name), r.layer)
            .with_real(r.real)
            .with_dir(is_dir.then(|| r.merged.into()))
            .with_data(r.data);
        let mut st = r.st;
        self.apply_override(&loc, &mut st);
        // Moved into a new node rather than copied: a walk makes one node per entry, and a
        // copy would leave a freed path behind each.
        let mut fresh = Some(loc);
        let node = self.nodes.lookup(ino, || {
            Node::new(ino, kind, fresh.take().expect("made once"))
        });
        // The latest name wins: a hard link reached by another name, or an object moved in a
        // way we did not see, is found where it is now.
        if let Some(loc) = fresh {
            if node.loc.read().path != loc.path {
                let _guard = node.copy_lock.lock();
                *node.loc.write() = loc;
            }
        }
        self.attr(st, ino, merged_dir)
    }

    /// Applies the owner and mode override of `loc`'s layer, if it keeps them in an xattr.
    pub(crate) fn apply_override(&self, loc: &Location, st: &mut libc::stat) {
        let layer = if loc.layer == INDEX_LAYER {
            0
        } else {
            loc.layer
        };
        let Some(xname) = self.stack.get(layer).stat_override else {
            return;
        };
        if let Ok((dir, name)) = self.object_at(loc) {
            statoverride::apply(xname, dir.as_fd(), &name, st);
        }
    }

    /// Drops `n` kernel references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        self.nodes.forget(ino, n);
    }

    fn stat_loc(&self, loc: &Location) -> OvlResult<libc::stat> {
        let (dir, name) = self.object_at(loc)?;
        let mut st = sys::stat_at(dir.as_fd(), &name)?;
        self.fix_nlink(loc.layer, dir.as_fd(), &name, &mut st);
        self.apply_override(loc, &mut st);
        if let Some(d) = loc.data() {
            let (parent, name) = split_path(&d.path);
            if let Ok(dfd) = self.layer_dir(d.layer, parent) {
                if let Ok(lst) = sys::stat_at(dfd.as_fd(), &sys::cstring(name)?) {
                    st.st_blocks = lst.st_blocks;
                }
            }
        }
        Ok(st)
    }

    /// Current attributes of `ino` (also after its name is gone: the node is then pinned to
    /// its object).
    pub fn getattr(&self, ino: u64) -> OvlResult<Attr> {
        let node = self.node(ino)?;
        let loc = node.loc.read().clone();
        let st = self.stat_loc(&loc)?;
        Ok(self.attr(st, ino, loc.is_merged_dir()))
    }

    /// Target of symlink `ino`.
    pub fn readlink(&self, ino: u64) -> OvlResult<Vec<u8>> {
        let node = self.node(ino)?;
        if node.kind != libc::S_IFLNK {
            return Err(libc::EINVAL);
        }
        let loc = node.loc.read().clone();
        let (dir, name) = self.object_at(&loc)?;
        sys::readlink_at(dir.as_fd(), &name)
    }

    /// A descriptor on the object itself (`O_PATH` unless `flags` asks for more).
    fn open_object(&self, loc: &Location, flags: i32) -> OvlResult<OwnedFd> {
        if let Some(fd) = loc.pinned() {
            return sys::reopen_at(fd.as_fd(), c"", flags);
        }
        if loc.dir().is_some() && flags == libc::O_PATH {
            let fd = self.layer_dir(loc.layer, loc.real_path())?;
            return sys::dup(fd.as_fd());
        }
        let (parent, name) = loc.real_split();
        let dfd = self.layer_dir(loc.layer, parent)?;
        sys::open_child(dfd.as_fd(), &sys::cstring(name)?, flags)
    }

    /// Opens the lower file holding a metadata-only copy's data.
    fn open_data(&self, d: &LowerData, flags: i32) -> OvlResult<OwnedFd> {
        let (parent, name) = split_path(&d.path);
        let dfd = self.layer_dir(d.layer, parent)?;
        sys::open_child(dfd.as_fd(), &sys::cstring(name)?, flags)
    }

    /// Opens `loc`'s object for reading its data.
    fn open_for_read(&self, loc: &Location, flags: i32) -> OvlResult<OwnedFd> {
        match loc.data() {
            Some(d) => self.open_data(d, flags),
            None => self.open_object(loc, flags),
        }
    }

    /// Starts the threads that work ahead of requests: the lookahead for lookups and the
    /// readahead for opens. Without them, every request is answered the same, only slower.
    pub fn start_helpers(self: &Arc<Self>) {
        self.start_lookahead();
        self.start_readahead();
    }

    /// Opens file `ino`; returns the handle number. Opening for writing copies the file up.
    pub fn open(&self, ino: u64, flags: i32) -> OvlResult<u64> {
        let node = self.node(ino)?;
        if node.is_dir() {
            return Err(libc::EISDIR);
        }
        let accmode = flags & libc::O_ACCMODE;
        if accmode != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return self.open_for_write(node, flags);
        }
        let loc = node.loc.read().clone();
        let keep = flags & (libc::O_NONBLOCK | libc::O_DIRECT | libc::O_NOATIME);
        let fd = self.open_for_read(&loc, libc::O_RDONLY | keep)?;
        // The kernel reads ahead for the application in FUSE's page cache; the layer file's
        // own read-ahead must keep the disk busy ahead of those READs, so it gets the widest
        // window (random readers are still detected and not read ahead for).
        sys::advise_sequential(fd.as_fd());
        let file = File::from(fd);
        self.prefill(&node, &file, flags);
        Ok(self.handles.insert(Handle::File(OpenFile {
            node,
            file: parking_lot::RwLock::new((loc.data_layer(), file)),
            writable: false,
        })))
    }

    /// Swaps a read-only handle's lower descriptor for the upper copy once the file has been
    /// copied up, so that it sees writes made through other handles.
    fn refresh(&self, of: &OpenFile) -> OvlResult<()> {
        let (layer, loc) = {
            let loc = of.node.loc.read();
            (loc.data_layer(), loc.clone())
        };
        if of.file.read().0 == layer {
            return Ok(());
        }
        let fd = self.open_for_read(&loc, libc::O_RDONLY)?;
        *of.file.write() = (layer, File::from(fd));
        Ok(())
    }

    fn open_file(&self, fh: u64) -> OvlResult<Arc<Handle>> {
        let h = self.handles.get(fh).ok_or(libc::EBADF)?;
        match h.as_ref() {
            Handle::File(_) => Ok(h),
            Handle::Dir(_) => Err(libc::EISDIR),
        }
    }

    /// Runs `f` on the current descriptor of open file `fh` (the upper copy once the file
    /// has been copied up).
    pub(crate) fn with_current_fd<T>(
        &self,
        fh: u64,
        f: impl FnOnce(&File) -> OvlResult<T>,
    ) -> OvlResult<T> {
        let h = self.open_file(fh)?;
        let Handle::File(of) = h.as_ref() else {
            return Err(libc::EISDIR);
        };
        if !of.writable {
            self.refresh(of)?;
        }
        let file = of.file.read();
        f(&file.1)
    }

    /// The descriptor a FUSE passthrough of handle `fh` may read and write directly: only a
    /// complete upper file qualifies. A lower file never does: a reader must see writes
    /// made after a copy-up (they go to the upper copy), and a kernel passthrough cannot be
    /// moved to another file.
    pub fn passthrough_file(&self, fh: u64) -> Option<std::os::fd::OwnedFd> {
        let h = self.handles.get(fh)?;
        let Handle::File(of) = h.as_ref() else {
            return None;
        };
        let file = of.file.read();
        // The upper layer, or an index entry (an upper file not yet linked up under this
        // name: the same inode as the upper copy once it is).
        if (file.0 != 0 && file.0 != INDEX_LAYER) || self.upper.is_none() {
            return None;
        }
        file.1.as_fd().try_clone_to_owned().ok()
    }

    /// Reads up to `size` bytes at `offset` from open file `fh`.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> OvlResult<Vec<u8>> {
        self.with_current_fd(fh, |file| read_full(file, offset, size))
    }
}

/// Reads up to `size` bytes at `offset`, short only at end of file.
fn read_full(file: &File, offset: u64, size: u32) -> OvlResult<Vec<u8>> {
    let mut buf = vec![0u8; size as usize];
    let mut done = 0usize;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

impl Overlay {
    /// Closes handle `fh` (file or directory).
    pub fn release(&self, fh: u64) {
        let Some(h) = self.handles.remove(fh) else {
            return;
        };
        if let Handle::Dir(d) = h.as_ref() {
            if let Some((_, l)) = d.listing.lock().take() {
                let_go(l);
            }
        }
    }

    /// Opens directory `ino`. Its merged listing is made when the handle is first read, and
    /// again after the directory changed (see [`dir_entries_at`](Self::dir_entries_at)).
    pub fn opendir(&self, ino: u64) -> OvlResult<u64> {
        let node = self.node(ino)?;
        if node.loc.read().dir().is_none() {
            return Err(libc::ENOTDIR);
        }
        Ok(self.handles.insert(Handle::Dir(DirHandle {
            node,
            listing: parking_lot::Mutex::new(None),
        })))
    }

    /// The merged listing of directory `ino` as it is now, in position cookie order ("."
    /// and ".." first).
    fn listing(&self, ino: u64) -> OvlResult<Arc<[DirEntry]>> {
        let node = self.node(ino)?;
        let loc = node.loc.read().clone();
        let dirs = loc.dir().ok_or(libc::ENOTDIR)?;
        let mut entries = Vec::with_capacity(2);
        let parent_ino = if ino == ROOT_INO {
            ROOT_INO
        } else {
            self.parent_ino(&loc).unwrap_or(ino)
        };
        entries.push(DirEntry {
            name: Box::from(&b"."[..]),
            ino,
            kind: libc::S_IFDIR,
            off: 0,
        });
        entries.push(DirEntry {
            name: Box::from(&b".."[..]),
            ino: parent_ino,
            kind: libc::S_IFDIR,
            off: 0,
        });
        let upper = self.stack.upper();
        self.readahead.listing(
            dirs.iter()
                .filter(|dl| Some(dl.layer) != upper)
                .map(|dl| (dl.layer, dl.path_in_layer(&loc.path))),
        );
        let merged = dirmerge::merge(
            dirs,
            |dl| {
                let fd = self.layer_dir(dl.layer, dl.path_in_layer(&loc.path))?;
                Ok((fd, self.stack.get(dl.layer).dev))
            },
            &self.inos,
        )?;
        entries.extend(merged);
        dirmerge::order(&mut entries);
        Ok(entries.into())
    }

    fn parent_ino(&self, loc: &Location) -> OvlResult<u64> {
        if !loc.path.contains(&b'/') {
            return Ok(ROOT_INO);
        }
        let (parent, _) = loc.real_split();
        let st = sys::stat_fd(self.layer_dir(loc.layer, parent)?.as_fd())?;
        Ok(self.inos.ino(st.st_dev, st.st_ino))
    }

    /// The listing behind directory handle `fh` as it is now, and the index in it of the
    /// first entry a read from position cookie `offset` returns.
    ///
    /// The listing is made again whenever the directory changed (a handle keeps one only
    /// while it is current), and positions are cookies of the names
    /// ([`dirmerge::cookie`]), as with a disk filesystem: a reader that goes on after a
    /// change, or seeks to a position it was told, misses or repeats nothing but what was
    /// added or removed. That also holds when the kernel read part of the listing from its
    /// cache and asks us for the rest; and what we answer, which the kernel may add to that
    /// cache, is never older than the directory.
    pub fn dir_entries_at(&self, fh: u64, offset: u64) -> OvlResult<(Arc<[DirEntry]>, usize)> {
        let h = self.handles.get(fh).ok_or(libc::EBADF)?;
        let Handle::Dir(d) = h.as_ref() else {
            return Err(libc::ENOTDIR);
        };
        let mut kept = d.listing.lock();
        let (l, renewed) = self.listing_now(&d.node, kept.as_ref())?;
        if renewed.is_some() {
            *kept = renewed;
        }
        let start = entries_after(&l, offset);
        Ok((l, start))
    }

    /// Like [`dir_entries_at`](Self::dir_entries_at) for a read of directory `ino` without
    /// a handle: the kernel opens directories without asking when the overlay is exact (see
    /// `opendir` in the FUSE adapter), reads each listing once into its cache, in blocks
    /// from cookie `offset` on, and asks again only after the directory changed.
    ///
    /// The listing is kept from the first block to the read that finds its end, so that a
    /// big directory is merged once, not once per block.
    pub fn dir_entries_of(&self, ino: u64, offset: u64) -> OvlResult<(Arc<[DirEntry]>, usize)> {
        let node = self.node(ino)?;
        let kept = self.open_listings.lock().get(&ino).cloned();
        let (l, renewed) = self.listing_now(&node, kept.as_ref())?;
        if let Some(k) = renewed {
            self.open_listings.lock().put(ino, k);
        }
        let start = entries_after(&l, offset);
        if start >= l.len() {
            if let Some((_, done)) = self.open_listings.lock().pop(&ino) {
                self.lookahead.listed(ino, done);
            }
        }
        Ok((l, start))
    }

    /// The listing of directory `node` as it is now: `kept` while the directory has not
    /// changed since it was made, else a new one, returned a second time as what to keep.
    fn listing_now(
        &self,
        node: &Node,
        kept: Option<&KeptListing>,
    ) -> OvlResult<(Arc<[DirEntry]>, Option<KeptListing>)> {
        let gen = node.listing_gen.load(Ordering::Acquire);
        match kept {
            Some((made, l)) if *made == gen => Ok((l.clone(), None)),
            _ => {
                let l = self.listing(node.ino)?;
                Ok((l.clone(), Some((gen, l))))
            }
        }
    }

    /// The listing behind directory handle `fh`, "." and ".." included.
    pub fn dir_entries(&self, fh: u64) -> OvlResult<Arc<[DirEntry]>> {
        self.dir_entries_at(fh, 0).map(|(l, _)| l)
    }

    /// The merged listing of directory `dir` changed (after the change).
    pub(crate) fn listing_changed(&self, dir: u64) {
        if let Some(n) = self.nodes.get(dir) {
            n.listing_gen.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Filesystem statistics: those of the top layer, which receives new data.
    pub fn statfs(&self) -> OvlResult<libc::statvfs> {
        sys::statfs_fd(self.stack.get(0).fd())
    }

    /// Value of xattr `name` of `ino`; the overlay's own xattrs do not exist for users.
    pub fn getxattr(&self, ino: u64, name: &OsStr) -> OvlResult<Vec<u8>> {
        let node = self.node(ino)?;
        let loc = node.loc.read().clone();
        let (dir, cname) = self.object_at(&loc)?;
        if self.hides_override && statoverride::is_override_name(name.as_bytes()) {
            return Err(libc::ENODATA);
        }
        let stored = sys::cstring(&whiteout::stored_xattr_name(name.as_bytes()))?;
        sys::get_xattr_at(dir.as_fd(), &cname, &stored)
    }

    /// Names of the xattrs of `ino` (NUL-separated), without the overlay's own.
    pub fn listxattr(&self, ino: u64) -> OvlResult<Vec<u8>> {
        let node = self.node(ino)?;
        let loc = node.loc.read().clone();
        let (dir, cname) = self.object_at(&loc)?;
        let raw = sys::list_xattr_at(dir.as_fd(), &cname)?;
        let mut out = Vec::with_capacity(raw.len());
        for n in raw.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if self.hides_override && statoverride::is_override_name(n) {
                continue;
            }
            if let Some(v) = whiteout::visible_xattr_name(n) {
                out.extend_from_slice(&v);
                out.push(0);
            }
        }
        Ok(out)
    }

    /// The directory descriptor and name through which the `*at` calls reach `loc`'s object
    /// (a directory, or a pinned object, is reached as itself, with an empty name).
    fn object_at(&self, loc: &Location) -> OvlResult<(ObjectDir, std::ffi::CString)> {
        if let Some(fd) = loc.pinned() {
            Ok((fd.clone() as ObjectDir, std::ffi::CString::default()))
        } else if loc.dir().is_some() {
            Ok((
                self.layer_dir(loc.layer, loc.real_path())? as ObjectDir,
                std::ffi::CString::default(),
            ))
        } else {
            let (parent, name) = loc.real_split();
            Ok((
                self.layer_dir(loc.layer, parent)? as ObjectDir,
                sys::cstring(name)?,
            ))
        }
    }

    /// Permission check for `access(2)` when the kernel asks (it does not with
    /// `default_permissions`, which the mount always uses): existence, and no writes.
    pub fn access(&self, ino: u64, mask: i32) -> OvlResult<()> {
        self.node(ino)?;
        if mask & libc::W_OK != 0 && (self.upper.is_none() || self.read_only) {
            return Err(libc::EROFS);
        }
        Ok(())
    }
}

/// `parent/name` as a layer-relative path.
pub(crate) fn join(parent: &[u8], name: &[u8]) -> Box<[u8]> {
    if parent.is_empty() {
        return Box::from(name);
    }
    let mut v = Vec::with_capacity(parent.len() + 1 + name.len());
    v.extend_from_slice(parent);
    v.push(b'/');
    v.extend_from_slice(name);
    v.into()
}
