//! Handing the kernel a small lower file's contents with its open.
//!
//! Reading a small file through FUSE costs two round trips after the OPEN: the READ that
//! fills the kernel's page cache, and then a GETATTR the next time the file is stat'ed,
//! because the kernel drops the atime it knew at the end of every READ. Programs that
//! read many small files (tar, a Python import, a container's start-up) wait for both,
//! file after file. Kernel overlayfs reads them from the layer's page cache.
//!
//! So the OPEN of a small lower file for reading stores the whole file in the kernel's
//! page cache (FUSE_NOTIFY_STORE) before it is answered, and the kernel is told to keep
//! that cache: the reads that follow find their pages and send no READ, so no atime is
//! dropped either. The daemon reads what the READ would have read, at the same time.
//!
//! A lower file's contents cannot change without a copy-up first, and a copy-up swaps the
//! node's location under its `copy_lock`. Storing with that lock held, for a node still
//! in a lower layer, so never puts older contents over newer ones: every change to the
//! file reaches the kernel after the store. Each node is considered once, at its first
//! buffered read-only open (a lower file's size and layer do not change, and an upper file
//! never goes back down); pages the kernel evicts later are read with READs as before.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::readahead::COLD_READ;
use super::Overlay;
use crate::inode::{split_path, Node};
use crate::sys;

/// The largest file stored at open: the first READ the kernel sends for a file asks for
/// this much (its read-ahead window), so a file this small is read whole either way.
pub const MAX_PREFILL: u64 = 128 * 1024;

/// Puts bytes into the kernel's page cache of the given inode from offset 0 (a store the
/// kernel refuses only costs the READs it would have saved).
type StoreFn = dyn Fn(u64, &[u8]) + Send + Sync;

/// Where small lower files go at open (see [`Overlay::set_page_store`]).
pub struct PageStore(Box<StoreFn>);

impl std::fmt::Debug for PageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageStore")
    }
}

impl Overlay {
    /// Sets where small lower files go at open (see the module documentation); without
    /// it, they are read with READs.
    pub fn set_page_store(&self, f: impl Fn(u64, &[u8]) + Send + Sync + 'static) {
        let _ = self.page_store.set(PageStore(Box::new(f)));
    }

    /// Stores the contents of `file`, just opened read-only on `node`'s lower copy with
    /// `flags`, in the kernel's page cache if it is small and the node was not considered
    /// before.
    pub(super) fn prefill(&self, node: &Node, file: &std::fs::File, flags: i32) {
        let Some(store) = self.page_store.get() else {
            return;
        };
        // O_DIRECT reads skip the page cache.
        if flags & libc::O_DIRECT != 0 || node.prefill_considered.load(Ordering::Relaxed) {
            return;
        }
        let _copy = node.copy_lock.lock();
        if node.prefill_considered.swap(true, Ordering::Relaxed)
            || Some(node.loc.read().data_layer()) == self.stack.upper()
        {
            return;
        }
        let Ok(st) = sys::stat_fd(file.as_fd()) else {
            return;
        };
        let size = st.st_size as u64;
        if size == 0 || size > MAX_PREFILL || (st.st_mode & libc::S_IFMT) != libc::S_IFREG {
            return;
        }
        let mut buf = vec![0u8; size as usize];
        let started = Instant::now();
        if file.read_exact_at(&mut buf, 0).is_ok() {
            if started.elapsed() >= COLD_READ {
                let loc = node.loc.read();
                let (layer, path) = loc.data_at();
                let (dir, name) = split_path(path);
                self.readahead.cold(layer, dir, name);
            } else {
                self.readahead.warm();
            }
            (store.0)(node.ino, &buf);
        }
    }
}
