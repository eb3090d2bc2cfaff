//! FUSE passthrough: which open files the kernel reads and writes directly, and the per-inode
//! I/O mode the kernel enforces.
//!
//! The kernel (6.9+) lets an inode be open either through its own page cache ("cached") or
//! through one backing file ("passthrough"), never both at once, and never through two
//! different backing files: an open that breaks this fails with EIO (on 6.18 so does an
//! `FOPEN_DIRECT_IO` open of an inode in passthrough mode). So each inode here is in one
//! mode while it has open files, and every open joins it: a cached inode gets cached opens,
//! and a passed-through inode gets its one backing file, which is the inode's upper copy.
//!
//! Backing files are keyed by the real file they point at (`st_dev`, `st_ino`), not by our
//! inode number alone: a lower file and its upper copy share our inode number, and a backing
//! file on the lower copy would send writes into the image layer. Only complete upper files
//! are offered for passthrough at all (see `Overlay::passthrough_file`).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuser::BackingId;
use parking_lot::Mutex;

/// How one open was answered.
#[derive(Debug, Clone)]
pub enum OpenMode {
    /// Through the kernel's page cache; `keep_cache` says whether pages cached by earlier
    /// opens are still valid.
    Cached {
        /// Keep the page cache from earlier opens.
        keep_cache: bool,
    },
    /// Directly on the backing file.
    Passthrough(Arc<BackingId>),
}

#[derive(Debug)]
enum State {
    Cached {
        opens: u32,
    },
    Passthrough {
        real: (u64, u64),
        backing: Arc<BackingId>,
        opens: u32,
    },
}

#[derive(Debug, Default)]
struct Inode {
    state: Option<State>,
    /// Writes went around the page cache (passthrough) since pages were last cached, so a
    /// later cached open must drop them.
    cache_stale: bool,
}

/// The I/O modes of all inodes with open files, and which mode each handle took.
#[derive(Debug)]
pub struct IoModes {
    enabled: AtomicBool,
    inodes: Mutex<HashMap<u64, Inode>>,
    handles: Mutex<HashMap<u64, u64>>,
}

impl IoModes {
    /// A table; passthrough is tried only when `enabled` (the kernel granted it).
    pub fn new(enabled: bool) -> IoModes {
        IoModes {
            enabled: AtomicBool::new(enabled),
            inodes: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
        }
    }

    /// Turns passthrough on or off (the kernel answers the init request after start-up).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Decides how handle `fh` of inode `ino` is opened. `real` gives the passthrough
    /// candidate (a descriptor and the real file's identity), `register` turns a descriptor
    /// into a kernel backing id.
    pub fn open(
        &self,
        ino: u64,
        fh: u64,
        real: impl FnOnce() -> Option<(OwnedFd, (u64, u64))>,
        register: impl FnOnce(&OwnedFd) -> std::io::Result<BackingId>,
    ) -> OpenMode {
        let mut inodes = self.inodes.lock();
        let node = inodes.entry(ino).or_default();
        let mode = match &mut node.state {
            Some(State::Cached { opens }) => {
                *opens += 1;
                OpenMode::Cached { keep_cache: true }
            }
            Some(State::Passthrough {
                real: have,
                backing,
                opens,
            }) => {
                // Any other open of the inode must use the same backing file. It is the
                // upper copy that every name of the inode now resolves to; an open naming
                // another real file (not expected: copy-up keeps one upper object per
                // inode) is logged and still joins, since the kernel would refuse it.
                if let Some((_, id)) = real() {
                    if id != *have {
                        tracing::warn!("inode {ino}: open of {id:?} joins backing {have:?}");
                    }
                }
                *opens += 1;
                OpenMode::Passthrough(backing.clone())
            }
            None => {
                let candidate = if self.enabled.load(Ordering::Relaxed) {
                    real()
                } else {
                    None
                };
                let backing = candidate.and_then(|(fd, id)| match register(&fd) {
                    Ok(b) => Some((Arc::new(b), id)),
                    Err(e) => {
                        // Not permitted (rootless) or not supported: stop trying.
                        tracing::debug!("passthrough unavailable: {e}");
                        self.enabled.store(false, Ordering::Relaxed);
                        None
                    }
                });
                match backing {
                    Some((backing, id)) => {
                        node.state = Some(State::Passthrough {
                            real: id,
                            backing: backing.clone(),
                            opens: 1,
                        });
                        node.cache_stale = true;
                        OpenMode::Passthrough(backing)
                    }
                    None => {
                        let keep_cache = !node.cache_stale;
                        node.cache_stale = false;
                        node.state = Some(State::Cached { opens: 1 });
                        OpenMode::Cached { keep_cache }
                    }
                }
            }
        };
        drop(inodes);
        self.handles.lock().insert(fh, ino);
        mode
    }

    /// Forgets handle `fh`; the inode's mode ends with its last open, and its backing id is
    /// closed then.
    pub fn release(&self, fh: u64) {
        let Some(ino) = self.handles.lock().remove(&fh) else {
            return;
        };
        let mut inodes = self.inodes.lock();
        let Some(node) = inodes.get_mut(&ino) else {
            return;
        };
        let last = match &mut node.state {
            Some(State::Cached { opens }) | Some(State::Passthrough { opens, .. }) => {
                *opens -= 1;
                *opens == 0
            }
            None => false,
        };
        if last {
            node.state = None;
            if !node.cache_stale {
                inodes.remove(&ino);
            }
        }
    }
}
