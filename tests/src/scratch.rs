//! Per-test scratch directories under `/tmp/strata-e2e-XXXX`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd::run_timeout;
use crate::layer::Layer;
use crate::mount::{mountinfo, TEARDOWN_TIMEOUT};

/// A fresh world-readable (0755) directory `/tmp/strata-e2e-XXXX`. On drop, anything still
/// mounted below it is detached (`umount -l`) before it is removed, so removal never walks
/// into a live mount.
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
}

impl Scratch {
    /// Creates the directory.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("strata-e2e-")
            .tempdir_in("/tmp")
            .expect("create scratch dir in /tmp");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        Scratch { dir: Some(dir) }
    }

    /// The scratch directory.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    /// `scratch/rel`.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path().join(rel)
    }

    /// Creates `scratch/rel` (and parents) and returns it.
    pub fn mkdir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let p = self.join(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }

    /// A layer builder rooted at `scratch/rel`.
    pub fn layer(&self, rel: impl AsRef<Path>) -> Layer {
        Layer::new(self.join(rel))
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let root = self.path().to_path_buf();
        let mut below: Vec<PathBuf> = mountinfo()
            .into_iter()
            .map(|m| m.mountpoint)
            .filter(|m| m.starts_with(&root))
            .collect();
        below.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        below.dedup();
        for m in &below {
            eprintln!(
                "Scratch: {} still mounted at teardown; detaching",
                m.display()
            );
            let _ = run_timeout(Command::new("umount").arg("-l").arg(m), TEARDOWN_TIMEOUT);
        }
        if let Some(d) = self.dir.take() {
            if let Err(e) = d.close() {
                eprintln!("Scratch: removing {}: {e}", root.display());
            }
        }
    }
}
