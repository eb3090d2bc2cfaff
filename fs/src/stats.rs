//! Request counters: how many requests of each kind the kernel sent, to prove what the
//! caching levers save. Off unless `STRATAFS_STATS` is set; then one relaxed atomic add per
//! request.
//!
//! `STRATAFS_STATS=1` (or any value not starting with `/`) prints the counts on stderr;
//! `STRATAFS_STATS=/some/file` appends them to that file (a daemon detached from its caller
//! has no stderr). Counts are written when the mount ends and, for `stratafs`, on SIGUSR1.
//! They are cumulative: subtract two dumps to count one phase.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! ops {
    ($($op:ident => $name:literal,)*) => {
        /// The requests that are counted.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        #[allow(missing_docs)]
        pub enum Op {
            $($op,)*
        }

        const NAMES: &[&str] = &[$($name,)*];
    };
}

ops! {
    Lookup => "lookup",
    // Inodes forgotten (the kernel batches them; fuser hides the batches).
    Forget => "forget",
    Getattr => "getattr",
    Setattr => "setattr",
    Readlink => "readlink",
    Mknod => "mknod",
    Mkdir => "mkdir",
    Unlink => "unlink",
    Rmdir => "rmdir",
    Symlink => "symlink",
    Rename => "rename",
    Link => "link",
    Open => "open",
    Read => "read",
    Write => "write",
    Flush => "flush",
    Release => "release",
    Fsync => "fsync",
    Opendir => "opendir",
    Readdir => "readdir",
    Readdirplus => "readdirplus",
    Releasedir => "releasedir",
    Fsyncdir => "fsyncdir",
    Statfs => "statfs",
    Setxattr => "setxattr",
    Getxattr => "getxattr",
    Listxattr => "listxattr",
    Removexattr => "removexattr",
    Access => "access",
    Create => "create",
    Fallocate => "fallocate",
    Lseek => "lseek",
    CopyFileRange => "copy_file_range",
    // Not requests: notifications the daemon sent to the kernel.
    NotifyInvalInode => "notify_inval_inode",
    NotifyInvalEntry => "notify_inval_entry",
    NotifyStore => "notify_store",
}

/// Per-opcode request counts.
#[derive(Debug)]
pub struct RequestStats {
    counts: Box<[AtomicU64]>,
    /// Where dumps go: `None` for stderr, else a file to append to.
    sink: Option<std::path::PathBuf>,
}

impl RequestStats {
    /// Counters as configured by `STRATAFS_STATS`, or `None` when it is unset or empty.
    pub fn from_env() -> Option<RequestStats> {
        let v = std::env::var_os("STRATAFS_STATS")?;
        if v.is_empty() || v == "0" {
            return None;
        }
        let sink = std::path::Path::new(&v)
            .is_absolute()
            .then(|| std::path::PathBuf::from(&v));
        Some(RequestStats {
            counts: NAMES.iter().map(|_| AtomicU64::new(0)).collect(),
            sink,
        })
    }

    /// Counts one `op`.
    pub fn bump(&self, op: Op) {
        self.counts[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// One line: `stratafs requests: total=N lookup=N ...` (nonzero counts only; the total
    /// leaves out notifications, which are not requests).
    pub fn line(&self, label: &str) -> String {
        let mut total = 0u64;
        let mut parts = String::new();
        for (i, name) in NAMES.iter().enumerate() {
            let n = self.counts[i].load(Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            if !name.starts_with("notify_") {
                total += n;
            }
            let _ = write!(parts, " {name}={n}");
        }
        format!("stratafs requests ({label}): total={total}{parts}")
    }

    /// Writes [`line`](Self::line) where `STRATAFS_STATS` asked.
    pub fn dump(&self, label: &str) {
        let line = self.line(label);
        match &self.sink {
            None => eprintln!("{line}"),
            Some(path) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path);
                if let Ok(mut f) = f {
                    let _ = writeln!(f, "{line}");
                }
            }
        }
    }
}
