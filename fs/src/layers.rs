//! The layer stack: one directory file descriptor per layer, checked once at start-up.
//!
//! Layers are numbered top first: the upper layer (when there is one) is layer 0, then the
//! lower layers in `lowerdir` order. All later access to a layer goes through its root
//! descriptor with the confined calls in [`crate::sys`].

use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::options::MountConfig;
use crate::statoverride;

/// Why the layer directories cannot be used; each names the offending path.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// A directory could not be opened or is not a directory.
    #[error("{role} {path}: {problem}")]
    BadDir {
        /// Which option named it (`lowerdir`, `upperdir`, ...).
        role: &'static str,
        /// The path as given.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// `workdir` and `upperdir` live on different filesystems.
    #[error(
        "workdir {work} is not on the same filesystem as upperdir {upper} (copy-up renames from one to the other)"
    )]
    WorkdirOtherFs {
        /// The work directory.
        work: PathBuf,
        /// The upper directory.
        upper: PathBuf,
    },
    /// One of `workdir`/`upperdir` contains the other.
    #[error(
        "{inner_role} {inner} is inside {outer_role} {outer}; they must be separate directories"
    )]
    Nested {
        /// The inner directory's option.
        inner_role: &'static str,
        /// The inner directory.
        inner: PathBuf,
        /// The outer directory's option.
        outer_role: &'static str,
        /// The outer directory.
        outer: PathBuf,
    },
    /// Too many layers for the inode numbering.
    #[error("too many layers: {0} (at most 4096)")]
    TooMany(usize),
}

/// One layer directory.
#[derive(Debug)]
pub struct Layer {
    /// The path it was given as (for messages).
    pub path: PathBuf,
    /// `O_PATH | O_DIRECTORY` descriptor of the layer root.
    pub root: OwnedFd,
    /// Device number of the layer root's filesystem.
    pub dev: u64,
    /// Whether this is the writable upper layer.
    pub writable: bool,
    /// The xattr holding owners and modes that override the inode's, when the layer uses
    /// one (see [`crate::statoverride`]).
    pub stat_override: Option<&'static std::ffi::CStr>,
}

impl Layer {
    /// The root descriptor, for `*at` calls.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }
}

/// The opened layers, top first.
#[derive(Debug)]
pub struct LayerStack {
    layers: Vec<Layer>,
    /// The work directory (only with an upper layer).
    pub workdir: Option<Layer>,
}

impl LayerStack {
    /// Opens and checks every directory named by `cfg`.
    pub fn open(cfg: &MountConfig) -> Result<LayerStack, StackError> {
        let mut layers = Vec::with_capacity(cfg.lowerdirs.len() + 1);
        let mut workdir = None;
        if let (Some(upper), Some(work)) = (&cfg.upperdir, &cfg.workdir) {
            let mut up = open_dir("upperdir", upper, true)?;
            if let Some(x) = statoverride::for_option(cfg.xattr_permissions) {
                up.stat_override = Some(x);
            }
            let wk = open_dir("workdir", work, true)?;
            if up.dev != wk.dev {
                return Err(StackError::WorkdirOtherFs {
                    work: work.clone(),
                    upper: upper.clone(),
                });
            }
            check_not_nested(("upperdir", upper), ("workdir", work))?;
            layers.push(up);
            workdir = Some(wk);
        }
        for lower in &cfg.lowerdirs {
            layers.push(open_dir("lowerdir", lower, false)?);
        }
        if layers.len() > 4096 {
            return Err(StackError::TooMany(layers.len()));
        }
        Ok(LayerStack { layers, workdir })
    }

    /// All layers, top first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Layer number `i` (0 is the top).
    pub fn get(&self, i: u16) -> &Layer {
        &self.layers[i as usize]
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether there are no layers (never true for an opened stack).
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The writable layer's index, if there is one.
    pub fn upper(&self) -> Option<u16> {
        self.layers.first().filter(|l| l.writable).map(|_| 0)
    }
}

fn open_dir(role: &'static str, path: &Path, writable: bool) -> Result<Layer, StackError> {
    let bad = |problem: String| StackError::BadDir {
        role,
        path: path.to_path_buf(),
        problem,
    };
    // The path given on the command line may itself be a symlink (containers/storage passes
    // symlinked layer paths); only what lies inside a layer is confined.
    let meta = fs::metadata(path).map_err(|e| bad(describe(&e)))?;
    if !meta.is_dir() {
        return Err(bad("is not a directory".into()));
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| bad(describe(&e)))?;
    let root = OwnedFd::from(file);
    Ok(Layer {
        path: path.to_path_buf(),
        stat_override: statoverride::detect(root.as_fd()),
        root,
        dev: meta.dev(),
        writable,
    })
}

fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "does not exist".to_string(),
        io::ErrorKind::NotADirectory => "is not a directory".to_string(),
        io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    }
}

fn check_not_nested(a: (&'static str, &Path), b: (&'static str, &Path)) -> Result<(), StackError> {
    let ca = fs::canonicalize(a.1).unwrap_or_else(|_| a.1.to_path_buf());
    let cb = fs::canonicalize(b.1).unwrap_or_else(|_| b.1.to_path_buf());
    if cb.starts_with(&ca) {
        return Err(StackError::Nested {
            inner_role: b.0,
            inner: b.1.to_path_buf(),
            outer_role: a.0,
            outer: a.1.to_path_buf(),
        });
    }
    if ca.starts_with(&cb) {
        return Err(StackError::Nested {
            inner_role: a.0,
            inner: a.1.to_path_buf(),
            outer_role: b.0,
            outer: b.1.to_path_buf(),
        });
    }
    Ok(())
}
