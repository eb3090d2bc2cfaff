//! A bounded cache of directory descriptors, so that lookups in a layer directory cost one
//! `fstatat` instead of a path walk, without holding a descriptor per cached inode.

use std::hash::{BuildHasher, Hash, Hasher};
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;

const SHARDS: usize = 16;

type Key = (u16, Box<[u8]>);

/// `O_PATH` descriptors of layer directories, keyed by (layer, path in the layer).
#[derive(Debug)]
pub struct DirFdCache {
    shards: Vec<Mutex<LruCache<Key, Arc<OwnedFd>>>>,
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

    fn shard(&self, layer: u16, path: &[u8]) -> &Mutex<LruCache<Key, Arc<OwnedFd>>> {
        let mut h = self.hasher.build_hasher();
        layer.hash(&mut h);
        path.hash(&mut h);
        &self.shards[h.finish() as usize % SHARDS]
    }

    /// The cached descriptor, or the one `open` makes (which is then cached).
    pub fn get_or_open<E>(
        &self,
        layer: u16,
        path: &[u8],
        open: impl FnOnce() -> Result<OwnedFd, E>,
    ) -> Result<Arc<OwnedFd>, E> {
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
