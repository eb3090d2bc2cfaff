//! The inode table: our inode numbers, the nodes the kernel holds, and their lookup counts.
//!
//! Inode numbers are derived from the real object's identity, `(layer device, st_ino)`, the
//! way kernel overlayfs's `xino` does: the device gets a small slot number that goes in the top
//! 16 bits. So a number is the same every time a file is looked up (even after the kernel
//! forgot it and we dropped the node), hard links inside a layer share one number, and a
//! later copy-up can keep the number by remembering the origin's identity.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::RwLock;

/// FUSE's fixed inode number of the mount root.
pub const ROOT_INO: u64 = 1;

const SLOT_SHIFT: u32 = 48;
const LOW_MASK: u64 = (1 << SLOT_SHIFT) - 1;
/// Numbers for real inode numbers too large to share a word with a slot start here.
const OVERFLOW_BASE: u64 = 0xFFFF << SLOT_SHIFT;

/// Maps real identities to our inode numbers.
#[derive(Debug)]
pub struct InoMapper {
    slots: RwLock<Vec<u64>>,
    overflow: DashMap<(u64, u64), u64>,
    next_overflow: AtomicU64,
}

impl Default for InoMapper {
    fn default() -> InoMapper {
        InoMapper {
            slots: RwLock::default(),
            overflow: crate::fasthash::table(),
            next_overflow: AtomicU64::new(0),
        }
    }
}

impl InoMapper {
    /// A mapper whose first slots go to `devs` in order (the layers' devices, top first), so
    /// that numbers do not depend on the order in which files are first looked up and stay
    /// the same across remounts of the same stack.
    pub fn with_devs(devs: impl IntoIterator<Item = u64>) -> InoMapper {
        let m = InoMapper::default();
        for d in devs {
            m.slot(d);
        }
        m
    }

    /// Our inode number for the object `(dev, ino)`.
    pub fn ino(&self, dev: u64, ino: u64) -> u64 {
        self.numbered(self.slot(dev), dev, ino)
    }

    /// Numbering for the objects of one device: [`ino`](Self::ino) with the device's slot
    /// found once, for callers that number many objects of one layer (listings).
    pub fn for_dev(&self, dev: u64) -> impl Fn(u64) -> u64 + '_ {
        let slot = self.slot(dev);
        move |ino| self.numbered(slot, dev, ino)
    }

    fn numbered(&self, slot: u64, dev: u64, ino: u64) -> u64 {
        if ino <= LOW_MASK && slot < 0xFFFE {
            return ((slot + 1) << SLOT_SHIFT) | ino;
        }
        *self
            .overflow
            .entry((dev, ino))
            .or_insert_with(|| OVERFLOW_BASE + self.next_overflow.fetch_add(1, Ordering::Relaxed))
    }

    fn slot(&self, dev: u64) -> u64 {
        if let Some(i) = self.slots.read().iter().position(|&d| d == dev) {
            return i as u64;
        }
        let mut slots = self.slots.write();
        if let Some(i) = slots.iter().position(|&d| d == dev) {
            return i as u64;
        }
        slots.push(dev);
        (slots.len() - 1) as u64
    }
}

/// One layer's copy of a merged directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirLayer {
    /// Layer index (0 is the top).
    pub layer: u16,
    /// Whether this copy holds xattr-form whiteouts that listings must check.
    pub xattr_whiteouts: bool,
    /// Where this copy lives in its layer, when that differs from the merged path (below a
    /// renamed directory, whose lower copies stay where they were).
    pub path: Option<Arc<[u8]>>,
}

impl DirLayer {
    /// A copy at the merged path itself.
    pub fn at_merged(layer: u16, xattr_whiteouts: bool) -> DirLayer {
        DirLayer {
            layer,
            xattr_whiteouts,
            path: None,
        }
    }

    /// This copy's path in its layer, given the directory's merged path.
    pub fn path_in_layer<'a>(&'a self, merged: &'a [u8]) -> &'a [u8] {
        self.path.as_deref().unwrap_or(merged)
    }
}

/// Where a node's object lives. Mutable because copy-up and rename move objects.
///
/// Every cached inode has one, so the parts most objects lack are kept behind one optional
/// box (see [`Rare`]): a plain file or symlink costs the path and a word.
#[derive(Debug, Clone)]
pub struct Location {
    /// Path relative to the layer roots, without leading slash; empty for the root.
    pub path: Box<[u8]>,
    /// The layer holding the object (for a directory, its topmost copy).
    pub layer: u16,
    rare: Option<Box<Rare>>,
}

/// The parts of a [`Location`] that most objects lack. `None` in [`Location`] when all are
/// empty.
#[derive(Debug, Clone, Default)]
struct Rare {
    real: Option<Box<[u8]>>,
    dir: Option<Box<[DirLayer]>>,
    data: Option<LowerData>,
    pinned: Option<Arc<std::os::fd::OwnedFd>>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.real.is_none() && self.dir.is_none() && self.data.is_none() && self.pinned.is_none()
    }
}

/// The lower file that holds the data of a metadata-only upper copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LowerData {
    /// Its layer.
    pub layer: u16,
    /// Its path in that layer.
    pub path: Box<[u8]>,
}

/// Splits a layer-relative path into parent path and final name.
pub fn split_path(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

impl Location {
    /// An object at `path` in `layer`, reached by that path, neither a directory nor
    /// metadata-only; the `with_*` and `set_*` methods add the rest.
    pub fn new(path: Box<[u8]>, layer: u16) -> Location {
        Location {
            path,
            layer,
            rare: None,
        }
    }

    /// This location with [`real`](Self::real) set to `real`.
    pub fn with_real(mut self, real: Option<Box<[u8]>>) -> Location {
        self.set_real(real);
        self
    }

    /// This location with [`dir`](Self::dir) set to `dir`.
    pub fn with_dir(mut self, dir: Option<Box<[DirLayer]>>) -> Location {
        self.set_dir(dir);
        self
    }

    /// This location with [`data`](Self::data) set to `data`.
    pub fn with_data(mut self, data: Option<LowerData>) -> Location {
        self.set_data(data);
        self
    }

    /// The object's path in `layer` when it differs from `path` (a lower object below a
    /// renamed directory, or an index entry's name).
    pub fn real(&self) -> Option<&[u8]> {
        self.rare.as_ref()?.real.as_deref()
    }

    /// For directories: every layer's copy that merges into it, top first, ending at the
    /// first opaque one.
    pub fn dir(&self) -> Option<&[DirLayer]> {
        self.rare.as_ref()?.dir.as_deref()
    }

    /// For a metadata-only upper copy: where its data still lives.
    pub fn data(&self) -> Option<&LowerData> {
        self.rare.as_ref()?.data.as_ref()
    }

    /// An `O_PATH` descriptor on the (upper) object, set when `path` stopped naming it (the
    /// name was unlinked or replaced while the kernel still holds the node: an open file, or
    /// a hard link reached by another name). The object is then reached through it.
    pub fn pinned(&self) -> Option<&Arc<std::os::fd::OwnedFd>> {
        self.rare.as_ref()?.pinned.as_ref()
    }

    /// Sets [`real`](Self::real).
    pub fn set_real(&mut self, real: Option<Box<[u8]>>) {
        self.update(|r| r.real = real);
    }

    /// Sets [`dir`](Self::dir).
    pub fn set_dir(&mut self, dir: Option<Box<[DirLayer]>>) {
        self.update(|r| r.dir = dir);
    }

    /// Sets [`data`](Self::data).
    pub fn set_data(&mut self, data: Option<LowerData>) {
        self.update(|r| r.data = data);
    }

    /// Sets [`pinned`](Self::pinned).
    pub fn set_pinned(&mut self, pinned: Option<Arc<std::os::fd::OwnedFd>>) {
        self.update(|r| r.pinned = pinned);
    }

    /// Changes the rare parts, allocating them only when something is set and freeing them
    /// when nothing is left.
    fn update(&mut self, f: impl FnOnce(&mut Rare)) {
        match &mut self.rare {
            Some(r) => {
                f(r);
                if r.is_empty() {
                    self.rare = None;
                }
            }
            None => {
                let mut r = Rare::default();
                f(&mut r);
                if !r.is_empty() {
                    self.rare = Some(Box::new(r));
                }
            }
        }
    }

    /// The merged parent path and the final name; the root has neither.
    pub fn split(&self) -> (&[u8], &[u8]) {
        split_path(&self.path)
    }

    /// The object's path in its layer.
    pub fn real_path(&self) -> &[u8] {
        self.real().unwrap_or(&self.path)
    }

    /// The parent path and name of the object in its layer.
    pub fn real_split(&self) -> (&[u8], &[u8]) {
        split_path(self.real_path())
    }

    /// The layer that reads of the object's data go to.
    pub fn data_layer(&self) -> u16 {
        self.data_at().0
    }

    /// The layer that reads of the object's data go to, and the data's path in it.
    pub fn data_at(&self) -> (u16, &[u8]) {
        match self.data() {
            Some(d) => (d.layer, &d.path),
            None => (self.layer, self.real_path()),
        }
    }

    /// Whether more than one layer contributes to this directory.
    pub fn is_merged_dir(&self) -> bool {
        self.dir().is_some_and(|d| d.len() > 1)
    }
}

/// An object the kernel knows by inode number.
#[derive(Debug)]
pub struct Node {
    /// Our inode number.
    pub ino: u64,
    /// File type bits (`S_IFMT` part of the mode).
    pub kind: u32,
    pub(crate) lookups: AtomicU64,
    /// Where it lives.
    pub loc: RwLock<Location>,
    /// Serialises copy-up of this node (and changes of its location).
    pub copy_lock: parking_lot::Mutex<()>,
    /// An open already decided whether to hand the kernel this file's contents (see
    /// `overlay::prefill`).
    pub prefill_considered: AtomicBool,
    /// For a directory: counts changes of its merged listing, so that an open handle can
    /// tell that its snapshot of the listing is older than the directory.
    pub listing_gen: AtomicU64,
}

impl Node {
    /// A node with no lookups yet.
    pub fn new(ino: u64, kind: u32, loc: Location) -> Node {
        Node {
            ino,
            kind,
            lookups: AtomicU64::new(0),
            loc: RwLock::new(loc),
            copy_lock: parking_lot::Mutex::new(()),
            prefill_considered: AtomicBool::new(false),
            listing_gen: AtomicU64::new(0),
        }
    }

    /// Counts one more kernel reference (for replies that create an entry, such as mkdir).
    pub fn add_lookup(&self) {
        self.lookups.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether this node is a directory.
    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_stable_and_distinct_per_device() {
        let m = InoMapper::default();
        let a = m.ino(10, 5);
        assert_eq!(a, m.ino(10, 5));
        assert_ne!(a, m.ino(11, 5));
        assert_ne!(a, ROOT_INO);
        let big = m.ino(10, u64::MAX - 3);
        assert_eq!(big, m.ino(10, u64::MAX - 3));
        assert_ne!(big, m.ino(10, u64::MAX - 4));
    }

    #[test]
    fn nodes_stay_small() {
        // One per cached inode: 72 bytes plus the Arc's counts is a 96-byte malloc chunk.
        assert!(
            std::mem::size_of::<Node>() <= 72,
            "{}",
            std::mem::size_of::<Node>()
        );
    }

    #[test]
    fn rare_parts_are_freed_when_emptied() {
        let mut loc = Location::new(Box::from(&b"a"[..]), 1).with_real(None);
        assert!(loc.rare.is_none());
        loc.set_real(Some(Box::from(&b"b"[..])));
        assert_eq!(loc.real_path(), b"b");
        loc.set_real(None);
        assert!(loc.rare.is_none());
        assert_eq!(loc.real_path(), b"a");
    }
}
