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
//! A lower file and its upper copy share our inode number, and a backing file on the lower
//! copy would send writes into the image layer; so only complete upper files are offered
//! for passthrough at all (see `Overlay::passthrough_file`). Copy-up keeps one upper object
//! per inode, so the one backing file of an inode is always that object.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use fuser::BackingId;

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
    Cached { opens: u32 },
    Passthrough { backing: Arc<BackingId>, opens: u32 },
}

#[derive(Debug, Default)]
struct Inode {
    state: Option<State>,
    /// Writes went around the page cache (passthrough) since pages were last cached, so a
    /// later cached open must drop them.
    cache_stale: bool,
}

/// The I/O modes of all inodes with open files.
#[derive(Debug)]
pub struct IoModes {
    enabled: AtomicBool,
    inodes: DashMap<u64, Inode>,
}

impl IoModes {
    /// A table; passthrough is tried only when `enabled` (the kernel granted it).
    pub fn new(enabled: bool) -> IoModes {
        IoModes {
            enabled: AtomicBool::new(enabled),
            inodes: crate::fasthash::table(),
        }
    }

    /// Turns passthrough on or off (the kernel answers the init request after start-up).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Decides how a new open of inode `ino` is answered. `real` gives the passthrough
    /// candidate (a descriptor on the upper file), `register` turns a descriptor into a
    /// kernel backing id; both are asked only when the inode has no open file yet.
    pub fn open(
        &self,
        ino: u64,
        real: impl FnOnce() -> Option<OwnedFd>,
        register: impl FnOnce(&OwnedFd) -> std::io::Result<BackingId>,
    ) -> OpenMode {
        let mut node = self.inodes.entry(ino).or_default();
        match &mut node.state {
            Some(State::Cached { opens }) => {
                *opens += 1;
                OpenMode::Cached { keep_cache: true }
            }
            // Any other open of the inode must use the same backing file (the kernel refuses
            // anything else): the upper copy that every name of the inode resolves to, since
            // copy-up keeps one upper object per inode.
            Some(State::Passthrough { backing, opens, .. }) => {
                *opens += 1;
                OpenMode::Passthrough(backing.clone())
            }
            None => {
                let candidate = if self.enabled.load(Ordering::Relaxed) {
                    real()
                } else {
                    None
                };
                let backing = candidate.and_then(|fd| match register(&fd) {
                    Ok(b) => Some(Arc::new(b)),
                    Err(e) => {
                        // Not permitted (rootless) or not supported: stop trying.
                        tracing::debug!("passthrough unavailable: {e}");
                        self.enabled.store(false, Ordering::Relaxed);
                        None
                    }
                });
                match backing {
                    Some(backing) => {
                        node.state = Some(State::Passthrough {
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
        }
    }

    /// Counts the release of one open of inode `ino` (FUSE names the inode in every
    /// release); the inode's mode ends with its last open, and its backing id is closed then.
    pub fn release(&self, ino: u64) {
        let mut forget = false;
        if let Some(mut node) = self.inodes.get_mut(&ino) {
            let last = match &mut node.state {
                Some(State::Cached { opens }) | Some(State::Passthrough { opens, .. }) => {
                    *opens -= 1;
                    *opens == 0
                }
                None => false,
            };
            if last {
                node.state = None;
                forget = !node.cache_stale;
            }
        }
        if forget {
            self.inodes
                .remove_if(&ino, |_, n| n.state.is_none() && !n.cache_stale);
        }
    }
}
