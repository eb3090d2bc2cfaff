//! Asking the disk for a directory's files ahead of their opens.
//!
//! A program that reads every file of a directory (tar, cp -r, a backup, a container's first
//! start) opens them one after another. When the layers are not in the page cache, each open
//! of a small lower file waits for that file's disk read (see `prefill`), and only then is the
//! next file asked for: one read in flight at a time, behind a round trip each.
//!
//! So when such a read had to wait, one background thread asks for the other regular files of
//! the same layer directory with `readahead(2)`, which queues the reads without waiting for
//! them: the disk works on many at once, and the opens that follow find their files in the
//! page cache. While the program goes on opening small files, every directory it lists is
//! read ahead the same way as the listing is made, before the opens come: a tree of small
//! directories (4 files each in the benchmark's tar) would otherwise wait for the disk at the
//! first open of each. A program that lists without opening (find, ls -l, du) never starts
//! it.
//!
//! It never touches the kernel's view of the overlay, only the layers' page cache, so it can
//! make an open faster, never different. Each directory is read ahead once while it stays
//! among the recently read ones, at most [`MAX_FILES`] files of at most [`MAX_PREFILL`]
//! bytes each.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::prefill::MAX_PREFILL;
use super::Overlay;
use crate::sys;

/// A small file's read that took at least this long went to the disk: so will its
/// neighbours'. From the page cache, reading 128 KiB takes about 15 µs here.
pub(super) const COLD_READ: Duration = Duration::from_micros(60);

/// The most files one directory's readahead asks for (each at most [`MAX_PREFILL`] bytes:
/// a larger file's first READ asks for as much).
const MAX_FILES: usize = 512;

/// Directories remembered as read ahead, so that each is read ahead once.
const REMEMBERED: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(256) {
    Some(n) => n,
    None => unreachable!(),
};

/// How long after an open of a small lower file listings are read ahead.
const READING: Duration = Duration::from_secs(1);

/// Directories waiting for the thread; the oldest is dropped beyond this (the program has
/// moved on from it).
const QUEUED: usize = 8;

/// A layer directory: its layer and its path in the layer.
type DirKey = (u16, Box<[u8]>);

/// A layer directory to read ahead.
#[derive(Debug)]
struct Job {
    layer: u16,
    /// The directory's path in the layer.
    dir: Box<[u8]>,
    /// The file whose open found it cold, already read (empty: none).
    skip: Box<[u8]>,
}

/// The readahead's state, shared with its thread.
#[derive(Debug)]
struct Shared {
    jobs: Mutex<VecDeque<Job>>,
    wake: Condvar,
    /// Directories read ahead (or queued), by layer and path.
    done: Mutex<lru::LruCache<DirKey, ()>>,
    running: AtomicBool,
    closed: AtomicBool,
    /// Until when (microseconds from `epoch`) listings are read ahead: the program is
    /// reading small files.
    reading_until: AtomicU64,
    epoch: Instant,
}

impl Shared {
    /// Microseconds since `epoch`.
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Queues directory `dir` of `layer` unless it was read ahead lately.
    fn queue(&self, layer: u16, dir: &[u8], skip: &[u8]) {
        let key: DirKey = (layer, dir.into());
        if self.done.lock().put(key, ()).is_some() {
            return;
        }
        let mut jobs = self.jobs.lock();
        if jobs.len() == QUEUED {
            jobs.pop_front();
        }
        jobs.push_back(Job {
            layer,
            dir: dir.into(),
            skip: skip.into(),
        });
        drop(jobs);
        self.wake.notify_one();
    }
}

/// Reads layer directories' files ahead of their opens (see the module notes).
#[derive(Debug)]
pub(crate) struct Readahead {
    shared: Arc<Shared>,
}

impl Default for Readahead {
    fn default() -> Readahead {
        Readahead {
            shared: Arc::new(Shared {
                jobs: Mutex::new(VecDeque::new()),
                wake: Condvar::new(),
                done: Mutex::new(lru::LruCache::new(REMEMBERED)),
                running: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                reading_until: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        }
    }
}

impl Drop for Readahead {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_all();
    }
}

impl Readahead {
    /// The read of file `name` in directory `dir` of `layer` had to wait for the disk.
    pub(crate) fn cold(&self, layer: u16, dir: &[u8], name: &[u8]) {
        let s = &self.shared;
        if !s.running.load(Ordering::Relaxed) {
            return;
        }
        s.reading_until
            .store(s.now() + READING.as_micros() as u64, Ordering::Relaxed);
        s.queue(layer, dir, name);
    }

    /// A small lower file was read from the page cache: if the program is reading small
    /// files, it still is.
    pub(crate) fn warm(&self) {
        let s = &self.shared;
        let until = s.reading_until.load(Ordering::Relaxed);
        let now = s.now();
        if until > now {
            s.reading_until
                .store(now + READING.as_micros() as u64, Ordering::Relaxed);
        }
    }

    /// A listing of a directory with these lower copies (layer, path in it) is being made.
    pub(crate) fn listing<'a>(&self, copies: impl Iterator<Item = (u16, &'a [u8])>) {
        let s = &self.shared;
        if s.reading_until.load(Ordering::Relaxed) <= s.now() {
            return;
        }
        for (layer, dir) in copies {
            s.queue(layer, dir, b"");
        }
    }
}

impl Overlay {
    /// Starts the readahead's thread (see the module notes). Without it, opens work the
    /// same, only without help.
    pub(super) fn start_readahead(self: &Arc<Self>) {
        let shared = self.readahead.shared.clone();
        if shared.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let ov = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("readahead".into())
            .spawn(move || work(&shared, &ov));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no readahead thread");
            self.readahead
                .shared
                .running
                .store(false, Ordering::Release);
        }
    }
}

/// The thread: reads ahead the next queued directory, until the overlay is gone.
fn work(s: &Shared, ov: &Weak<Overlay>) {
    loop {
        let job = {
            let mut jobs = s.jobs.lock();
            loop {
                if s.closed.load(Ordering::Acquire) {
                    return;
                }
                match jobs.pop_front() {
                    Some(j) => break j,
                    None => s.wake.wait(&mut jobs),
                }
            }
        };
        let Some(ov) = ov.upgrade() else {
            return;
        };
        let Ok(dir) = ov.layer_dir(job.layer, &job.dir) else {
            continue;
        };
        drop(ov);
        let Ok(entries) = sys::read_dir(dir.as_fd()) else {
            continue;
        };
        let files = entries
            .iter()
            .filter(|e| e.d_type == libc::DT_REG && e.name != job.skip)
            .take(MAX_FILES);
        for e in files {
            if s.closed.load(Ordering::Relaxed) {
                return;
            }
            let Ok(name) = sys::cstring(&e.name) else {
                continue;
            };
            if let Ok(fd) = sys::open_child(dir.as_fd(), &name, libc::O_RDONLY | libc::O_NONBLOCK) {
                // SAFETY: readahead on our own descriptor; it only queues reads into the
                // page cache (clamped to the file's size), and failure is harmless.
                unsafe { libc::readahead(fd.as_raw_fd(), 0, MAX_PREFILL as usize) };
            }
        }
    }
}
