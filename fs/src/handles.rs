//! Open file and directory handles: what a FUSE `fh` stands for.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

use parking_lot::RwLock;

use crate::dirmerge::DirEntry;
use crate::inode::Node;

/// An open regular file.
#[derive(Debug)]
pub struct OpenFile {
    /// The node it was opened on.
    pub node: Arc<Node>,
    /// The layer the descriptor lives in and the descriptor. A read-only descriptor on a lower
    /// layer is swapped for one on the upper copy once the file is copied up, so readers
    /// never see stale data.
    pub file: RwLock<(u16, File)>,
    /// Whether it was opened for writing (then it always lives in the upper layer).
    pub writable: bool,
}

/// An open handle.
#[derive(Debug)]
pub enum Handle {
    /// A regular file.
    File(OpenFile),
    /// An open directory.
    Dir(DirHandle),
}

/// An open directory, with its merged listing once read (an open that the kernel serves
/// from its cache of the listing costs no merge).
#[derive(Debug)]
pub struct DirHandle {
    /// The directory.
    pub node: Arc<Node>,
    /// The listing, once read.
    pub listing: parking_lot::Mutex<Option<KeptListing>>,
}

/// A directory's listing, ordered by position cookie, with the directory's listing
/// generation ([`Node::listing_gen`]) from before it was made: it is current while that has
/// not changed.
pub type KeptListing = (u64, Arc<[DirEntry]>);

/// All open handles, by number.
#[derive(Debug)]
pub struct HandleTable {
    next: AtomicU64,
    map: DashMap<u64, Arc<Handle>>,
}

impl Default for HandleTable {
    fn default() -> HandleTable {
        HandleTable {
            next: AtomicU64::new(0),
            map: crate::fasthash::table(),
        }
    }
}

impl HandleTable {
    /// Stores a handle and returns its number.
    pub fn insert(&self, h: Handle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.map.insert(fh, Arc::new(h));
        fh
    }

    /// The handle numbered `fh`.
    pub fn get(&self, fh: u64) -> Option<Arc<Handle>> {
        self.map.get(&fh).map(|h| h.clone())
    }

    /// Takes the handle numbered `fh` out of the table.
    pub fn remove(&self, fh: u64) -> Option<Arc<Handle>> {
        self.map.remove(&fh).map(|(_, h)| h)
    }
}
