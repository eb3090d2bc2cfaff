//! The daemon's own tables: one fast hasher for them (inode numbers, names in a listing), and
//! concurrent tables sized for this machine.
//!
//! SipHash, std's default, resists keys chosen to collide; these keys come from the layers'
//! filesystems, and hashing them sits on the request path (every lookup) and in every
//! listing (every name of every layer).

use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::OnceLock;

use dashmap::DashMap;

/// A concurrent table (open handles, inodes with open files), with four shards per CPU this
/// process may run on. dashmap's own default asks `available_parallelism`, which reads the
/// cgroup's CPU quota files: some 50 µs of every mount command, for a number that only
/// spreads lock contention.
pub fn table<K: Eq + Hash, V>() -> DashMap<K, V> {
    static SHARDS: OnceLock<usize> = OnceLock::new();
    let shards = *SHARDS.get_or_init(|| {
        // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity fills it.
        let cpus = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
                libc::CPU_COUNT(&set) as usize
            } else {
                1
            }
        };
        (cpus.max(1) * 4).next_power_of_two()
    });
    DashMap::with_shard_amount(shards)
}

/// Builds [`FoldHasher`]s, for `HashSet`/`HashMap`.
pub type BuildFoldHasher = BuildHasherDefault<FoldHasher>;

/// Folded multiply over whole words: each word is mixed in with a 64x64->128-bit multiply
/// whose halves are folded together, so every bit of the result depends on every bit of
/// the input (inode numbers keep the layer in the top bits and an often sequential number
/// in the low ones; names often differ only in their last bytes).
#[derive(Debug, Default)]
pub struct FoldHasher(u64);

impl Hasher for FoldHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.write_u64(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        let rest = words.remainder();
        let mut tail = [0u8; 8];
        tail[..rest.len()].copy_from_slice(rest);
        self.write_u64(u64::from_le_bytes(tail) ^ ((rest.len() as u64) << 59));
    }

    fn write_u64(&mut self, n: u64) {
        let m = u128::from(self.0 ^ n) * 0x9E37_79B9_7F4A_7C15;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::hash::BuildHasher;

    #[test]
    fn names_differing_in_one_late_byte_spread_over_the_low_bits() {
        let b = BuildFoldHasher::default();
        let low: HashSet<u64> = (0..256u32)
            .map(|i| {
                b.hash_one(format!("f000000{}", char::from(i as u8 % 64 + 48)).as_bytes()) & 0xFFF
            })
            .collect();
        assert!(low.len() > 40, "{}", low.len());
    }
}
