//! The table of nodes the kernel holds, by inode number.
//!
//! After a walk it has an entry for every entry of the tree, so each slot is one pointer:
//! the number is read from the node itself instead of being stored beside it (a map from
//! number to node takes twice the room, ~16 bytes more per inode at hashbrown's load).

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::fasthash::{BuildFoldHasher, FoldHasher};
use crate::inode::{Node, ROOT_INO};

/// Shards, so that lookups on different workers rarely wait for each other.
const SHARDS: usize = 16;

/// A held node, hashed and compared by its inode number.
#[derive(Debug)]
struct Held(Arc<Node>);

impl Borrow<u64> for Held {
    fn borrow(&self) -> &u64 {
        &self.0.ino
    }
}

impl Hash for Held {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.ino.hash(h);
    }
}

impl PartialEq for Held {
    fn eq(&self, other: &Held) -> bool {
        self.0.ino == other.0.ino
    }
}

impl Eq for Held {}

type Shard = RwLock<HashSet<Held, BuildFoldHasher>>;

/// All nodes the kernel currently holds a reference to, by inode number.
#[derive(Debug)]
pub struct NodeTable {
    shards: Box<[Shard]>,
}

impl Default for NodeTable {
    fn default() -> NodeTable {
        NodeTable {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

impl NodeTable {
    fn shard(&self, ino: u64) -> &Shard {
        let mut h = FoldHasher::default();
        h.write_u64(ino);
        // Bits the shard's own table does not use: neither its bucket index (low bits) nor
        // its tag byte (top seven).
        &self.shards[(h.finish() >> 48) as usize % SHARDS]
    }

    /// Inserts the root node, which is never forgotten.
    pub fn insert_root(&self, node: Node) {
        debug_assert_eq!(node.ino, ROOT_INO);
        self.shard(ROOT_INO).write().replace(Held(Arc::new(node)));
    }

    /// The node with inode number `ino`, if the kernel holds it.
    pub fn get(&self, ino: u64) -> Option<Arc<Node>> {
        self.shard(ino).read().get(&ino).map(|h| h.0.clone())
    }

    /// Returns the node for `ino`, creating it with `make` if absent, and counts one lookup.
    /// Both happen under the shard lock so that a racing `forget` cannot drop the node
    /// between them.
    pub fn lookup(&self, ino: u64, make: impl FnOnce() -> Node) -> Arc<Node> {
        let mut shard = self.shard(ino).write();
        if let Some(h) = shard.get(&ino) {
            h.0.lookups.fetch_add(1, Ordering::Relaxed);
            return h.0.clone();
        }
        let node = Arc::new(make());
        debug_assert_eq!(node.ino, ino);
        node.lookups.store(1, Ordering::Relaxed);
        shard.insert(Held(node.clone()));
        node
    }

    /// Drops `n` lookups of `ino`; the node goes away when none remain.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut shard = self.shard(ino).write();
        let gone = shard
            .get(&ino)
            .is_some_and(|h| h.0.lookups.fetch_sub(n, Ordering::Relaxed) <= n);
        if gone {
            shard.remove(&ino);
        }
    }

    /// Calls `f` on every held node (for path rewrites after a directory rename).
    pub fn for_each(&self, mut f: impl FnMut(&Arc<Node>)) {
        for shard in self.shards.iter() {
            for h in shard.read().iter() {
                f(&h.0);
            }
        }
    }

    /// Number of nodes held (for tests and memory accounting).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// Whether no node is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inode::Location;

    fn node(ino: u64) -> Node {
        Node::new(ino, libc::S_IFREG, Location::new(Box::from(&b"a"[..]), 0))
    }

    #[test]
    fn forget_drops_after_last_lookup() {
        let t = NodeTable::default();
        t.lookup(7, || node(7));
        t.lookup(7, || unreachable!());
        t.forget(7, 1);
        assert!(t.get(7).is_some());
        t.forget(7, 1);
        assert!(t.get(7).is_none());
        assert!(t.is_empty());
    }

    #[test]
    fn holds_many_nodes_by_number() {
        let t = NodeTable::default();
        t.insert_root(Node::new(
            ROOT_INO,
            libc::S_IFDIR,
            Location::new(Box::default(), 0),
        ));
        let inos: Vec<u64> = (0..5000u64)
            .map(|i| ((1 + i % 3) << 48) | (i * 7 + 2))
            .collect();
        for &i in &inos {
            assert_eq!(t.lookup(i, || node(i)).ino, i);
        }
        assert_eq!(t.len(), inos.len() + 1);
        for &i in &inos {
            assert_eq!(t.get(i).map(|n| n.ino), Some(i));
        }
        let mut seen = 0;
        t.for_each(|_| seen += 1);
        assert_eq!(seen, inos.len() + 1);
        for &i in &inos {
            t.forget(i, 1);
        }
        t.forget(ROOT_INO, 1);
        assert_eq!(t.len(), 1);
        assert!(t.get(ROOT_INO).is_some());
    }
}
