//! What a listed read-only layer directory can answer without a system call: that a name is
//! not in it.
//!
//! A lookup asks every layer of a merged directory for the name, and every layer above the
//! bottom one for a `.wh.NAME` whiteout too, so in a stack of n layers a name found at the
//! bottom costs 2n - 1 `fstatat`s, all but one of them misses. A read-only layer cannot
//! change under the mount, so once one of its directories was read to the end (to merge a
//! listing), a Bloom filter of its names answers most of those misses from memory: never
//! "absent" for a name that is there, "maybe" for about one absent name in a hundred.

use std::hash::{BuildHasher, Hasher};

use crate::fasthash::BuildFoldHasher;

/// Filter bits per name: with [`PROBES`] probes, about 1% of absent names answer "maybe".
const BITS_PER_NAME: usize = 10;

/// Bits tested per name.
const PROBES: u32 = 4;

/// A Bloom filter of the names of one directory.
#[derive(Debug)]
pub struct NameFilter {
    words: Box<[u64]>,
}

impl NameFilter {
    /// The filter of a directory holding exactly `names`.
    pub fn new<'a>(names: impl ExactSizeIterator<Item = &'a [u8]>) -> NameFilter {
        let bits = (names.len() * BITS_PER_NAME).next_power_of_two().max(64);
        let mut words = vec![0u64; bits / 64].into_boxed_slice();
        let mask = bits as u64 - 1;
        for name in names {
            for bit in probes(name, mask) {
                words[(bit / 64) as usize] |= 1 << (bit % 64);
            }
        }
        NameFilter { words }
    }

    /// False only when `name` is not in the directory.
    pub fn may_hold(&self, name: &[u8]) -> bool {
        let mask = (self.words.len() * 64) as u64 - 1;
        probes(name, mask).all(|bit| self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }
}

/// The bits of `name` in a filter of `mask + 1` bits (a power of two): double hashing of
/// one 64-bit hash, which serves a Bloom filter as well as independent hashes do.
fn probes(name: &[u8], mask: u64) -> impl Iterator<Item = u64> {
    let mut h = BuildFoldHasher::default().build_hasher();
    h.write(name);
    let h = h.finish();
    let (first, step) = (h & 0xFFFF_FFFF, (h >> 32) | 1);
    (0..PROBES).map(move |i| first.wrapping_add(u64::from(i).wrapping_mul(step)) & mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize, prefix: &str) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("{prefix}{i:06}").into_bytes())
            .collect()
    }

    #[test]
    fn every_name_held_is_found_and_few_absent_ones_are() {
        for n in [0, 1, 7, 1000, 100_000] {
            let held = names(n, "e");
            let f = NameFilter::new(held.iter().map(|v| &v[..]));
            assert!(
                held.iter().all(|v| f.may_hold(v)),
                "a held name was missed (n={n})"
            );
            let absent = names(10_000, ".wh.e");
            let maybe = absent.iter().filter(|v| f.may_hold(v)).count();
            // 10 bits and 4 probes per name: about 1.2% expected, more for tiny filters.
            assert!(
                maybe < 300,
                "{maybe} of 10000 absent names answered maybe (n={n})"
            );
        }
    }
}
