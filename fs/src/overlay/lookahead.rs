//! Lookahead for the lookups that follow a listing.
//!
//! A program that reads a whole directory and then stats its names (find, a sorted walk, a
//! backup tool) sends one LOOKUP per name after the listing's last block: the kernel asks
//! for attributes along with a listing (READDIRPLUS) only while lookups interleave with it.
//! When the layers are not in the page cache, each of those lookups waits for the disk in
//! turn, behind a round trip.
//!
//! So when a lookup in a directory that was just listed had to wait, one background thread
//! resolves the listing's other names ahead of the lookups, by inode number from the one
//! looked up on (the order find uses in big directories, the layers' on-disk order, and
//! close to creation order, which name-sorted walks often follow). Needing no round trips,
//! it soon gets ahead of the lookups in any order, so that their layer entries and inodes
//! are cached when asked for. It only reads, through the same resolution a lookup does, and
//! drops the result: it can make a lookup faster, never different. One directory is worked
//! on at a time, the newest.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::{let_go, Overlay};
use crate::dirmerge::DirEntry;
use crate::inode::Location;

/// A lookup that took at least this long went to the disk: its neighbours will too. A
/// lookup answered from the page cache takes a few microseconds.
const COLD_LOOKUP: Duration = Duration::from_micros(20);

/// Listings read to their end that are remembered for a lookahead.
const RECENT: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(2) {
    Some(n) => n,
    None => unreachable!(),
};

/// Listings smaller than this are not worth a lookahead: the kernel had attributes for most
/// of their names from the listing's first block.
const MIN_ENTRIES: usize = 64;

/// The lookahead's state, shared with its thread.
#[derive(Debug, Default)]
pub(crate) struct Lookahead {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Listings read to their end and not looked into since, by directory.
    recent: Mutex<lru::LruCache<u64, Arc<[DirEntry]>>>,
    /// The directory being worked on.
    job: Mutex<Option<Job>>,
    wake: Condvar,
    /// A thread serves this lookahead.
    running: AtomicBool,
    /// The overlay is gone: the thread ends.
    closed: AtomicBool,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            recent: Mutex::new(lru::LruCache::new(RECENT)),
            job: Mutex::new(None),
            wake: Condvar::new(),
            running: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }
}

#[derive(Debug)]
struct Job {
    dir: u64,
    parent: Arc<Location>,
    listing: Arc<[DirEntry]>,
    /// Indexes into `listing`, by inode number; made by the thread.
    order: Vec<u32>,
    /// Where in `order` the work began.
    first: usize,
    /// How many names of `order`, from `first` on and round, are done.
    next: usize,
    /// The name whose lookup started the work.
    first_name: Option<Box<[u8]>>,
}

impl Job {
    /// The next name to resolve: the first call orders the names by inode number, from the
    /// one first looked up on and round.
    fn next_name(&mut self) -> Option<Box<[u8]>> {
        let listing = &self.listing;
        if self.order.is_empty() {
            let mut order: Vec<u32> = (0..listing.len() as u32).collect();
            order.sort_unstable_by_key(|&i| listing[i as usize].ino);
            let first = self.first_name.take();
            self.first = first
                .and_then(|n| order.iter().position(|&i| listing[i as usize].name == n))
                .unwrap_or(0);
            self.order = order;
        }
        while self.next < self.order.len() {
            let i = self.order[(self.first + self.next) % self.order.len()];
            self.next += 1;
            let e = &listing[i as usize];
            if &*e.name != b"." && &*e.name != b".." {
                return Some(e.name.clone());
            }
        }
        None
    }
}

impl Drop for Lookahead {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_all();
    }
}

impl Lookahead {
    /// Directory `dir`'s listing `l` was read to its end.
    pub(crate) fn listed(&self, dir: u64, l: Arc<[DirEntry]>) {
        if !self.shared.running.load(Ordering::Relaxed) || l.len() < MIN_ENTRIES {
            let_go(l);
            return;
        }
        let old = self.shared.recent.lock().push(dir, l);
        if let Some((_, old)) = old {
            let_go(old);
        }
    }

    /// A lookup of `name` in directory `dir` (at `parent`) took `took`.
    pub(crate) fn looked_up(&self, dir: u64, parent: &Location, name: &OsStr, took: Duration) {
        let s = &self.shared;
        if !s.running.load(Ordering::Relaxed) {
            return;
        }
        if took < COLD_LOOKUP || s.job.lock().as_ref().is_some_and(|j| j.dir == dir) {
            return;
        }
        let Some(listing) = s.recent.lock().pop(&dir) else {
            return;
        };
        let new = Job {
            dir,
            parent: Arc::new(parent.clone()),
            listing,
            order: Vec::new(),
            first: 0,
            next: 0,
            first_name: Some(Box::from(name.as_bytes())),
        };
        let old = s.job.lock().replace(new);
        s.wake.notify_one();
        if let Some(old) = old {
            let_go(old.listing);
        }
    }
}

impl Overlay {
    /// Starts the lookahead's thread (see the module notes). Without it, lookups work the same,
    /// only without help.
    pub fn start_lookahead(self: &Arc<Self>) {
        let shared = self.lookahead.shared.clone();
        if shared.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let ov = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("lookahead".into())
            .spawn(move || work(&shared, &ov));
        if let Err(e) = spawned {
            self.lookahead
                .shared
                .running
                .store(false, Ordering::Release);
            tracing::warn!(error = %e, "no lookahead thread");
        }
    }
}

/// The thread: resolves the next name of the current job, until the overlay is gone.
fn work(s: &Shared, ov: &Weak<Overlay>) {
    loop {
        let (parent, name) = {
            let mut job = s.job.lock();
            loop {
                if s.closed.load(Ordering::Acquire) {
                    return;
                }
                match job.as_mut().map(|j| (j.parent.clone(), j.next_name())) {
                    Some((parent, Some(name))) => break (parent, name),
                    Some((_, None)) => {
                        if let Some(done) = job.take() {
                            drop(job);
                            let_go(done.listing);
                            job = s.job.lock();
                        }
                    }
                    None => s.wake.wait(&mut job),
                }
            }
        };
        let Some(ov) = ov.upgrade() else {
            return;
        };
        // Only the page cache's warmth is wanted; the lookup itself will say what it finds.
        let _ = ov.resolve(&parent, &name);
    }
}
