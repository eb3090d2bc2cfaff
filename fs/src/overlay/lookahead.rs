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
//! are cached when asked for. It stops when lookups in the directory stop.
//!
//! A READDIRPLUS reply of a big directory resolves some 200 entries one after another, in
//! cookie order, which scatters them over the layers' inode tables. When one of them had to
//! wait, all the threads resolve the ones after it while the reply is made, keeping several
//! disk reads in flight instead of one.
//!
//! The threads only read, through the same resolution a lookup does, and drop the result:
//! they can make a lookup faster, never different. At most one whole listing and one reply's
//! block are worked on at a time, the newest of each.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::{let_go, Attr, Overlay, OvlResult};
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

/// Threads that resolve ahead. Cold, each mostly waits for the disk, so several keep several
/// of its reads in flight: 400 cold lstats here take 36-42 ms one at a time, 24-27 ms from
/// four threads.
const THREADS: usize = 4;

/// The most names after a cold READDIRPLUS entry that are resolved for its reply: more than
/// one reply holds (glibc reads a directory 32 KiB at a time, and an entry with attributes
/// takes about 160 bytes of a reply).
const BLOCK: usize = 256;

/// Listings smaller than this get no help with a READDIRPLUS reply. Their entries came
/// from one directory of a layer, made together, so they often share inode table blocks and
/// the first cold entry brings in its neighbours; bigger ones are listed in cookie order,
/// which scatters them. Helping the small ones made a cold walk slower here.
const MIN_BLOCK_LISTING: usize = 1024;

/// A whole-listing job is dropped when no lookup came in its directory for this long.
const IDLE: Duration = Duration::from_millis(50);

/// The nice value of the thread that resolves whole listings, where it may raise itself
/// (root): it must stay ahead of the lookups it stands in for, so it should run as soon as
/// its disk read is in, not behind the walker and the workers it serves. Measured: a cold
/// walk of 162k names 4.82 -> 4.54 s (mean of five); with a lower priority than theirs it
/// falls behind (5.6 s).
const WHOLE_NICE: i32 = -10;

/// An entry of a READDIRPLUS reply, from [`Overlay::lookup_listed`].
#[derive(Debug)]
pub struct Listed {
    /// What a lookup of the name answers now, with one lookup reference counted.
    pub attr: Attr,
    /// The reply ends after this entry.
    pub last: bool,
}

/// The lookahead's state, shared with its threads.
#[derive(Debug, Default)]
pub(crate) struct Lookahead {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Listings read to their end and not looked into since, by directory.
    recent: Mutex<lru::LruCache<u64, Arc<[DirEntry]>>>,
    /// The work in hand.
    jobs: Mutex<Jobs>,
    wake: Condvar,
    /// Threads serve this lookahead.
    running: AtomicBool,
    /// The overlay is gone: the threads end.
    closed: AtomicBool,
    /// The directory of the whole-listing job (0: none), and when a lookup in it last came
    /// (microseconds from `epoch`): a job whose directory nobody looks into any more is
    /// dropped rather than left to read a directory the walker has moved on from.
    whole_dir: AtomicU64,
    whole_used: AtomicU64,
    epoch: Instant,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            recent: Mutex::new(lru::LruCache::new(RECENT)),
            jobs: Mutex::new(Jobs::default()),
            wake: Condvar::new(),
            running: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            whole_dir: AtomicU64::new(0),
            whole_used: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Shared {
    /// Microseconds since `epoch`.
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// A lookup came in directory `dir`.
    fn used(&self, dir: u64) {
        if self.whole_dir.load(Ordering::Relaxed) == dir {
            self.whole_used.store(self.now(), Ordering::Relaxed);
        }
    }

    /// The whole-listing job's directory saw no lookup for [`IDLE`].
    fn whole_idle(&self) -> bool {
        let used = self.whole_used.load(Ordering::Relaxed);
        self.now().saturating_sub(used) > IDLE.as_micros() as u64
    }
}

/// The work in hand: at most one job of each kind, the newest.
#[derive(Debug, Default)]
struct Jobs {
    /// A whole listing, served by the first thread only.
    whole: Option<Job>,
    /// A READDIRPLUS block, served by every thread.
    block: Option<Job>,
}

impl Jobs {
    /// The slot of a job of this span.
    fn slot(&mut self, span: &Span) -> &mut Option<Job> {
        match span {
            Span::Listing { .. } => &mut self.whole,
            Span::Block => &mut self.block,
        }
    }
}

/// What a job resolves.
#[derive(Debug)]
enum Span {
    /// A whole listing after its end was read, by inode number from the name first looked
    /// up on (ordered by the first thread to take a name).
    Listing { first_name: Option<Box<[u8]>> },
    /// Entries of a listing in listing order (made by the caller): what a READDIRPLUS
    /// reply being made will carry after a cold entry.
    Block,
}

#[derive(Debug)]
struct Job {
    dir: u64,
    parent: Arc<Location>,
    listing: Arc<[DirEntry]>,
    span: Span,
    /// Indexes into `listing`, in the order to resolve them.
    order: Vec<u32>,
    /// How many of `order` are taken.
    next: usize,
}

impl Job {
    /// The next name to resolve.
    fn next_name(&mut self) -> Option<Box<[u8]>> {
        let listing = &self.listing;
        if let Span::Listing { first_name } = &mut self.span {
            if let Some(first) = first_name.take() {
                let mut order: Vec<u32> = (0..listing.len() as u32).collect();
                order.sort_unstable_by_key(|&i| listing[i as usize].ino);
                let at = order
                    .iter()
                    .position(|&i| listing[i as usize].name == first)
                    .unwrap_or(0);
                order.rotate_left(at);
                self.order = order;
            }
        }
        while self.next < self.order.len() {
            let e = &listing[self.order[self.next] as usize];
            self.next += 1;
            if &*e.name != b"." && &*e.name != b".." {
                return Some(e.name.clone());
            }
        }
        None
    }

    /// This block job resolves entry `i` of `dir`'s listing `l` for a reply.
    fn covers(&self, dir: u64, l: &Arc<[DirEntry]>, i: usize) -> bool {
        // A block's order is ascending: its last index is its end.
        self.dir == dir
            && Arc::ptr_eq(&self.listing, l)
            && self.order.last().is_some_and(|&last| i as u32 <= last)
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
        s.used(dir);
        if took < COLD_LOOKUP || s.jobs.lock().whole.as_ref().is_some_and(|j| j.dir == dir) {
            return;
        }
        let Some(listing) = s.recent.lock().pop(&dir) else {
            return;
        };
        self.start(Job {
            dir,
            parent: Arc::new(parent.clone()),
            listing,
            span: Span::Listing {
                first_name: Some(Box::from(name.as_bytes())),
            },
            order: Vec::new(),
            next: 0,
        });
    }

    /// The lookup of entry `i` of directory `dir`'s listing `l` (at `parent`), made for a
    /// READDIRPLUS reply, took `took`. When it had to wait, so will the next entries': the
    /// threads resolve them while the reply is made.
    pub(crate) fn looked_up_listed(
        &self,
        dir: u64,
        parent: &Location,
        l: &Arc<[DirEntry]>,
        i: usize,
        took: Duration,
    ) {
        let s = &self.shared;
        if !s.running.load(Ordering::Relaxed) {
            return;
        }
        if took < COLD_LOOKUP {
            // Warm, perhaps thanks to the whole-listing job: it is still wanted.
            s.used(dir);
            return;
        }
        // The directory was listed to its end before: resolve all of it.
        self.looked_up(dir, parent, OsStr::from_bytes(&l[i].name), took);
        if l.len() < MIN_BLOCK_LISTING {
            return;
        }
        {
            let jobs = s.jobs.lock();
            // A whole-listing job for the directory resolves these too, in a better order;
            // helping it with a block as well only contends for the CPU (ls then ls -l of
            // 102,500 names, cold: 1.58 s with the whole listing alone, 1.78 with both).
            if jobs.whole.as_ref().is_some_and(|j| j.dir == dir)
                || jobs.block.as_ref().is_some_and(|j| j.covers(dir, l, i + 1))
            {
                return;
            }
        }
        let to = l.len().min(i + 1 + BLOCK);
        self.start(Job {
            dir,
            parent: Arc::new(parent.clone()),
            listing: l.clone(),
            span: Span::Block,
            order: (i as u32 + 1..to as u32).collect(),
            next: 0,
        });
    }

    /// The READDIRPLUS reply for directory `dir` is made: the rest of its block is not
    /// wanted (a reply after it comes without attributes unless lookups interleave).
    pub(crate) fn reply_made(&self, dir: u64) {
        let mut jobs = self.shared.jobs.lock();
        if jobs.block.as_ref().is_some_and(|j| j.dir == dir) {
            let done = jobs.block.take();
            drop(jobs);
            if let Some(done) = done {
                let_go(done.listing);
            }
        }
    }

    /// Makes `new` the job of its kind, in place of any other.
    fn start(&self, new: Job) {
        let s = &self.shared;
        if let Span::Listing { .. } = new.span {
            s.whole_used.store(s.now(), Ordering::Relaxed);
            s.whole_dir.store(new.dir, Ordering::Relaxed);
        }
        let old = s.jobs.lock().slot(&new.span).replace(new);
        // All: only the first thread takes a whole listing, and any may be the one woken.
        s.wake.notify_all();
        if let Some(old) = old {
            let_go(old.listing);
        }
    }
}

impl Overlay {
    /// Starts the lookahead's threads (see the module notes). Without them, lookups work the
    /// same, only without help.
    pub(super) fn start_lookahead(self: &Arc<Self>) {
        if self.lookahead.shared.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut started = 0;
        for n in 0..THREADS {
            let shared = self.lookahead.shared.clone();
            let ov = Arc::downgrade(self);
            match std::thread::Builder::new()
                .name(format!("lookahead-{n}"))
                .spawn(move || work(&shared, &ov, n == 0))
            {
                Ok(_) => started += 1,
                Err(e) => tracing::warn!(error = %e, "one lookahead thread fewer"),
            }
        }
        if started == 0 {
            self.lookahead
                .shared
                .running
                .store(false, Ordering::Release);
        }
    }

    /// Looks up entry `i` of `listing`, a listing of directory `parent`, for a reply that
    /// carries attributes (READDIRPLUS): as [`Overlay::lookup`] does, and when it had to wait
    /// for the disk, the lookahead resolves the entries after it meanwhile.
    ///
    /// `first_block`: the reply starts the listing. The kernel asks for a listing's first
    /// block with attributes whether or not anyone will stat its names, and later blocks only
    /// once names were looked up. In a big directory whose layers are cold, that first block
    /// costs some 200 inode reads scattered over the layer, a third of the time of a cold
    /// names-only listing of 102,500 names (`ls -f`, `os.listdir`). So such a reply ends at
    /// its first entry that had to wait: a reader that stats the names then looks the others
    /// up, 200 of the directory's thousands, resolved ahead by the lookahead as all its
    /// lookups are; one that only reads names pays no inode reads at all.
    pub fn lookup_listed(
        &self,
        parent: u64,
        listing: &Arc<[DirEntry]>,
        i: usize,
        first_block: bool,
    ) -> OvlResult<Listed> {
        let may_cut = first_block && listing.len() >= MIN_BLOCK_LISTING;
        let mut last = false;
        let attr = self.lookup_timed(parent, &listing[i].name, |ploc, took| {
            last = may_cut && took >= COLD_LOOKUP;
            if last {
                // No block to help with: the reply ends here.
                let name = OsStr::from_bytes(&listing[i].name);
                self.lookahead.looked_up(parent, ploc, name, took);
            } else {
                self.lookahead
                    .looked_up_listed(parent, ploc, listing, i, took);
            }
        })?;
        Ok(Listed { attr, last })
    }

    /// The READDIRPLUS reply for directory `dir` is made.
    pub fn listed_reply_made(&self, dir: u64) {
        self.lookahead.reply_made(dir);
    }
}

/// The thread: resolves the next name of the current job, until the overlay is gone.
fn work(s: &Shared, ov: &Weak<Overlay>, first: bool) {
    if first {
        // SAFETY: sets the calling thread's nice value; refused without CAP_SYS_NICE, and
        // then the thread runs as the others do.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, WHOLE_NICE) };
    }
    loop {
        let (parent, name) = {
            let mut jobs = s.jobs.lock();
            loop {
                if s.closed.load(Ordering::Acquire) {
                    return;
                }
                // A reply waits for its block. A whole listing goes by inode number, so
                // neighbours share inode table blocks: one thread keeps ahead of the
                // lookups, more only contend with them for the CPU (measured: a cold walk
                // 1.37 -> 1.66 of the kernel).
                let whole = first && jobs.block.is_none();
                let slot = if whole {
                    &mut jobs.whole
                } else {
                    &mut jobs.block
                };
                let next = match slot.as_mut() {
                    None => {
                        s.wake.wait(&mut jobs);
                        continue;
                    }
                    Some(_) if whole && s.whole_idle() => None,
                    Some(j) => j.next_name().map(|n| (j.parent.clone(), n)),
                };
                match next {
                    Some(step) => break step,
                    None => {
                        if let Some(done) = slot.take() {
                            drop(jobs);
                            let_go(done.listing);
                            jobs = s.jobs.lock();
                        }
                    }
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
