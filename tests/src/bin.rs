//! Locating the `stratafs` binary under test, and copies of it that other users can run.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The workspace root (parent of this crate's directory).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => {
            let t = PathBuf::from(t);
            if t.is_absolute() {
                t
            } else {
                workspace_dir().join(t)
            }
        }
        None => workspace_dir().join("target"),
    }
}

/// Path of the built `stratafs` binary: `$STRATAFS_BIN` if set, else the binary next to the
/// running test executable's profile directory (so `--release` test runs use the release
/// build), else `$CARGO_TARGET_DIR/debug/stratafs` or `<workspace>/target/debug/stratafs`.
///
/// Panics when it does not exist: `cargo test -p strata-tests` does not build it.
pub fn stratafs_bin() -> PathBuf {
    let bin = built_bin("stratafs", "STRATAFS_BIN");
    if std::env::var_os("STRATAFS_BIN").is_none() {
        warn_if_stale(&bin, "fs");
    }
    bin
}

/// Path of the built `strata` runner binary, found like [`stratafs_bin`] (`$STRATA_BIN`
/// overrides). Panics when it does not exist.
pub fn strata_bin() -> PathBuf {
    let bin = built_bin("strata", "STRATA_BIN");
    if std::env::var_os("STRATA_BIN").is_none() {
        warn_if_stale(&bin, "runner");
    }
    bin
}

/// `$env` if set, else `name` in the test executable's profile directory, else in
/// `<target>/debug`.
fn built_bin(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{env}={} does not exist; build it first: cargo build --workspace",
            p.display()
        );
        return p;
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/deps/<test-binary>
        if let Some(profile) = exe.parent().and_then(Path::parent) {
            candidates.push(profile.join(name));
        }
    }
    candidates.push(target_dir().join("debug").join(name));
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "{name} binary not found (looked at {candidates:?}); build it first: \
         cargo build --workspace (or set {env})"
    );
}

/// Prints a warning when a source file of crate directory `krate` is newer than the binary.
fn warn_if_stale(bin: &Path, krate: &str) {
    let Ok(bin_time) = fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let newest = newest_mtime(&workspace_dir().join(krate).join("src"));
    if let Some(n) = newest {
        if n > bin_time {
            eprintln!(
                "warning: {} is older than {krate}/src; run `cargo build --workspace` first",
                bin.display()
            );
        }
    }
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for e in fs::read_dir(dir).ok()?.flatten() {
        let m = e.metadata().ok()?;
        let t = if m.is_dir() {
            newest_mtime(&e.path())
        } else {
            m.modified().ok()
        };
        if t > newest {
            newest = t;
        }
    }
    newest
}

/// A copy of the binary in a fresh world-readable directory (`0755`), named `stratafs`, for
/// tests that run it as another user or find it on `PATH` (the `mount.fuse3` helper).
/// Removed on drop.
pub struct PublicBin {
    dir: tempfile::TempDir,
}

impl PublicBin {
    /// Copies the binary under test into `/tmp/strata-e2e-bin-XXXX/stratafs`.
    pub fn new() -> Self {
        let src = stratafs_bin();
        let dir = tempfile::Builder::new()
            .prefix("strata-e2e-bin-")
            .tempdir_in("/tmp")
            .expect("create bin temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let dst = dir.path().join("stratafs");
        fs::copy(&src, &dst).unwrap_or_else(|e| panic!("copy {} -> {dst:?}: {e}", src.display()));
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).unwrap();
        PublicBin { dir }
    }

    /// The directory holding the copy (put it first on `PATH`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The copied binary.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("stratafs")
    }

    /// `PATH` with this directory first.
    pub fn path_env(&self) -> String {
        format!(
            "{}:{}",
            self.dir().display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        )
    }
}

impl Default for PublicBin {
    fn default() -> Self {
        Self::new()
    }
}
