//! A bounded cache of directory descriptors, so that lookups in a layer directory cost one
//! `fstatat` instead of a path walk, without holding a descriptor per cached inode.

use std::ffi::CStr;
use std::hash::{BuildHasher, Hash, Hasher};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use lru::LruCache;
use parking_lot::Mutex;

use crate::namefilter::NameFilter;
use crate::sys::{self, SysResult};

const SHARDS: usize = 16;

type Key = (u16, Box<[u8]>);

/// An open layer directory, and once it was read to its end, what it holds if its layer is
/// read-only (see [`crate::namefilter`]).
#[derive(Debug)]
pub struct LayerDir {
    fd: OwnedFd,
    /// Its layer does not change under the mount, so a listing of it stays true.
    fixed: bool,
    names: OnceLock<NameFilter>,
}

impl LayerDir {
    /// A directory of a read-only layer if `fixed`.
    pub fn new(fd: OwnedFd, fixed: bool) -> LayerDir {
        LayerDir {
            fd,
            fixed,
            names: OnceLock::new(),
        }
    }

    /// A listing of the directory would be kept: its layer is read-only and it has none yet.
    pub fn wants_names(&self) -> bool {
        self.fixed && self.names.get().is_none()
    }

    /// The directory was read to its end and held exactly `names`.
    pub fn listed<'a>(&self, names: impl ExactSizeIterator<Item = &'a [u8]>) {
        if self.wants_names() {
            let _ = self.names.set(NameFilter::new(names));
        }
    }

    /// The descriptor.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// `fstatat` of entry `name` (`cname` as a C string), answered `ENOENT` without asking
    /// when the directory's listing says it has no such entry.
    pub fn stat_child(&self, name: &[u8], cname: &CStr) -> SysResult<libc::stat> {
        if self.lacks(name) {
            return Err(libc::ENOENT);
        }
        sys::stat_at(self.fd.as_fd(), cname)
    }

    /// `name` is surely not in the directory (false when not known).
    pub fn lacks(&self, name: &[u8]) -> bool {
        self.names.get().is_some_and(|f| !f.may_hold(name))
    }
}

impl AsFd for LayerDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `O_PATH` descriptors of layer directories, keyed by (layer, path in the layer).
#[derive(Debug)]
pub struct DirFdCache {
    shards: Vec<Mutex<LruCache<Key, Arc<LayerDir>>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl DirFdCache {
    /// A cache holding at most `capacity` descriptors in all.
    pub fn new(capacity: usize) -> DirFdCache {
        let per = NonZeroUsize::new((capacity / SHARDS).max(1)).expect("nonzero");
        DirFdCache {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(per)))
                .collect(),
            hasher: Default::default(),
        }
    }

    fn shard(&self, layer: u16, path: &[u8]) -> &Mutex<LruCache<Key, Arc<LayerDir>>> {
        let mut h = self.hasher.build_hasher();
        layer.hash(&mut h);
        path.hash(&mut h);
        &self.shards[h.finish() as usize % SHARDS]
    }

    /// The cached directory, or the one `open` makes (which is then cached).
    pub fn get_or_open<E>(
        &self,
        layer: u16,
        path: &[u8],
        open: impl FnOnce() -> Result<LayerDir, E>,
    ) -> Result<Arc<LayerDir>, E> {
        let shard = self.shard(layer, path);
        let key: Key = (layer, Box::from(path));
        if let Some(fd) = shard.lock().get(&key) {
            return Ok(fd.clone());
        }
        // Open outside the lock: a racing opener costs one extra descriptor briefly.
        let fd = Arc::new(open()?);
        shard.lock().put(key, fd.clone());
        Ok(fd)
    }

    /// Forgets every cached descriptor of `path` and below in `layer` (after a rename or
    /// removal in a writable layer).
    pub fn invalidate_tree(&self, layer: u16, path: &[u8]) {
        for shard in &self.shards {
            let mut s = shard.lock();
            let stale: Vec<Key> = s
                .iter()
                .filter(|((l, p), _)| {
                    *l == layer
                        && (p.as_ref() == path
                            || (p.starts_with(path) && p.get(path.len()) == Some(&b'/'))
                            || path.is_empty())
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in stale {
                s.pop(&k);
            }
        }
    }
}
