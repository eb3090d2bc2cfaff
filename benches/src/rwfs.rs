//! The file system the writable layers live on: a fresh, journaled ext4 made for each run
//! in an image file in the scratch directory, loop-mounted, and detached at the end.
//!
//! Not the scratch directory's own file system, whatever it is. On these machines `/tmp`
//! is ext4 without a journal, which does not hand out an inode freed in the last 60 s
//! (360 s while its inode table block is dirty, as allocating next to it makes it) when
//! that block is cached (`recently_deleted` in `fs/ext4/ialloc.c`): the allocator steps
//! over each such inode for every inode it allocates. Measured there, 20,000 creates took
//! 0.45 s with no recent deletion and 10-13 s right after one; since every session deletes
//! the previous one's writable layer, create_small and untar measured that, whichever
//! implementation came next (the kernel's own create_small: 0.72 to 2.23 s in one run).
//! With a journal ext4 skips that check, and a file system made for the run starts with
//! no history: writes are measured the way container storage (journaled ext4 or xfs)
//! sees them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::sys;

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// The mounted file system; unmounts and detaches its loop device on drop.
#[derive(Debug)]
pub struct RwFs {
    /// Its mount point.
    pub dir: PathBuf,
    device: String,
}

impl RwFs {
    /// Makes `SCRATCH/rw.img` (`bytes`, sparse), formats it and mounts it on `SCRATCH/rw`.
    pub fn create(scratch: &Path, bytes: u64) -> Result<RwFs> {
        let image = scratch.join("rw.img");
        let dir = scratch.join("rw");
        detach_stale(&image);
        let _ = fs::remove_file(&image);
        let f = fs::File::create(&image).with_context(|| format!("create {}", image.display()))?;
        f.set_len(bytes)?;
        drop(f);
        // Inode tables and journal written now, not by a kernel thread during the run.
        sys::run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
                .arg(&image),
            TOOL_TIMEOUT,
        )?;
        // Direct I/O to the image: the file system's pages are cached once, in its own
        // page cache, as on a disk.
        let out = sys::run_ok(
            Command::new("losetup")
                .args(["--find", "--show", "--direct-io=on"])
                .arg(&image),
            TOOL_TIMEOUT,
        )?;
        let device = out.stdout.trim().to_string();
        let rw = RwFs { dir, device };
        fs::create_dir_all(&rw.dir)?;
        sys::run_ok(
            Command::new("mount").arg(&rw.device).arg(&rw.dir),
            TOOL_TIMEOUT,
        )?;
        // Also reachable for the rootless column's user.
        fs::set_permissions(&rw.dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        Ok(rw)
    }
}

impl Drop for RwFs {
    fn drop(&mut self) {
        if crate::mounts::is_mounted(&self.dir) {
            let _ = sys::run_cleanup(Command::new("umount").arg(&self.dir), TOOL_TIMEOUT);
        }
        let _ = sys::run_cleanup(
            Command::new("losetup").arg("-d").arg(&self.device),
            TOOL_TIMEOUT,
        );
        if let Some(parent) = self.dir.parent() {
            let _ = fs::remove_file(parent.join("rw.img"));
        }
    }
}

/// Detaches loop devices a killed earlier run left on `image` (its mount was undone by
/// `mounts::cleanup_stale`).
fn detach_stale(image: &Path) {
    let Ok(out) = sys::run_cleanup(Command::new("losetup").arg("-j").arg(image), TOOL_TIMEOUT)
    else {
        return;
    };
    for line in out.stdout.lines() {
        if let Some(dev) = line.split(':').next().filter(|d| d.starts_with("/dev/")) {
            eprintln!("cleanup: detaching stale {dev}");
            let _ = sys::run_cleanup(Command::new("losetup").arg("-d").arg(dev), TOOL_TIMEOUT);
        }
    }
}
