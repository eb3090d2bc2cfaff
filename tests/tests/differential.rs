//! Differential test: seeded random operation sequences applied to kernel overlayfs
//! (`redirect_dir=on,index=on`, the oracle) and to stratafs, on two identical layer stacks
//! (two lower layers with whiteouts, an opaque dir, hard links, a fifo, xattrs; a
//! pre-populated upper). Every operation's result (value or errno) is compared; the full
//! merged trees are compared before, periodically during, and after the sequence, then again
//! after unmount + remount (persistence); both stacks' lower layers must be unchanged.
//!
//!     cargo build -p strata-fs && cargo test -p strata-tests --test differential -- --nocapture
//!
//! Environment knobs:
//! - `STRATA_DIFF_SEEDS=S`   number of sequences (seeds 1..=S), default 20
//! - `STRATA_DIFF_SEED=X`    run only seed X
//! - `STRATA_DIFF_OPS=N`     operations per sequence, default 500 (a shorter run of the same
//!   seed is a prefix of a longer one: `STRATA_DIFF_OPS=<op#+1>` stops right after an op)
//! - `STRATA_DIFF_SELFCHECK=1` mount kernel overlayfs on both sides (comparator sanity check)
//! - `STRATA_DIFF_KINDS=a,b` only generate these operation kinds (see `KINDS`)
//! - `STRATA_DIFF_TRACE=1`   print every operation with both results
//! - `STRATA_DIFF_OPTS=a,b`   more `-o` options for stratafs (e.g. `nopassthrough`, to check
//!   the paths served without FUSE passthrough)
//! - `STRATA_DIFF_KEEP=1`    keep the (unmounted) scratch directory `/tmp/strata-diff-*`
//! - `STRATA_DIFF_REPORT=K`  how many divergences to print in full, default 20
//! - `STRATA_DIFF_TREE_EVERY=K` while no divergence has been seen, compare the full trees
//!   every K operations (default 20, 0 = off): finds silent divergences (same results,
//!   different state) close to the operation that caused them
//! - `STRATA_DIFF_LOWER_HARDLINKS=0` build the lower layers with copies instead of hard
//!   links (to tell index=on hard-link effects from others)
//! - `STRATA_DIFF_OP_TIMEOUT=SECS` watchdog for one operation, default 20: a hung stratafs
//!   request gets its daemon killed and the mount detached
//!
//! A divergence is "clean" when no mutating operation (or tree comparison) diverged before
//! it in its sequence, i.e. it is not merely a consequence of an earlier one.
//!
//! Deliberately not compared: st_dev, atime, ctime, directory sizes and directory st_nlink,
//! absolute inode numbers (only relative facts: hard-link grouping, st_ino kept through
//! copy-up/rename/link), readdir d_ino (kernel overlayfs is not self-consistent there), and
//! mtimes that are not known to be deterministic (mtimes are compared for the initial tree
//! and after utimensat with explicit times, until something modifies the object).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::{CStr, CString};
use std::fmt::{self, Write as _};
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use strata_tests::mount::{is_mounted, mountinfo, pid_alive, pids_with_arg, program_names};

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Operation kinds and their generator weights.
const KINDS: &[(&str, u32)] = &[
    ("create", 5),
    ("write_trunc", 6),
    ("append", 5),
    ("pwrite", 5),
    ("truncate", 4),
    ("read", 7),
    ("mkdir", 5),
    ("rmdir", 4),
    ("unlink", 6),
    ("rename", 10),
    ("symlink", 3),
    ("readlink", 2),
    ("link", 4),
    ("chmod", 3),
    ("chown", 3),
    ("utimes", 3),
    ("setxattr", 4),
    ("getxattr", 3),
    ("removexattr", 2),
    ("listxattr", 2),
    ("mkfifo", 1),
    ("stat", 8),
    ("readdir", 5),
    ("access", 2),
    ("hold_open", 5),
    ("hold_read", 3),
    ("hold_write", 2),
    ("hold_fstat", 1),
    ("hold_close", 1),
];

const HELD_SLOTS: usize = 4;

struct Cfg {
    seeds: Vec<u64>,
    ops: usize,
    selfcheck: bool,
    trace: bool,
    keep: bool,
    kinds: Vec<(&'static str, u32)>,
    max_report: usize,
    op_timeout: Duration,
    tree_every: usize,
    lower_links: bool,
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

impl Cfg {
    fn from_env() -> Cfg {
        let seeds = match env_num("STRATA_DIFF_SEED") {
            Some(s) => vec![s],
            None => (1..=env_num("STRATA_DIFF_SEEDS").unwrap_or(20)).collect(),
        };
        let kinds = match std::env::var("STRATA_DIFF_KINDS") {
            Ok(list) if !list.trim().is_empty() => {
                let want: Vec<&str> = list.split(',').map(str::trim).collect();
                for w in &want {
                    assert!(
                        KINDS.iter().any(|(k, _)| k == w),
                        "STRATA_DIFF_KINDS: unknown kind {w:?}; kinds: {:?}",
                        KINDS.iter().map(|k| k.0).collect::<Vec<_>>()
                    );
                }
                KINDS
                    .iter()
                    .copied()
                    .filter(|(k, _)| want.contains(k))
                    .collect()
            }
            _ => KINDS.to_vec(),
        };
        Cfg {
            seeds,
            ops: env_num("STRATA_DIFF_OPS").unwrap_or(500) as usize,
            selfcheck: env_flag("STRATA_DIFF_SELFCHECK"),
            trace: env_flag("STRATA_DIFF_TRACE"),
            keep: env_flag("STRATA_DIFF_KEEP"),
            kinds,
            max_report: env_num("STRATA_DIFF_REPORT").unwrap_or(20) as usize,
            op_timeout: Duration::from_secs(env_num("STRATA_DIFF_OP_TIMEOUT").unwrap_or(20)),
            tree_every: env_num("STRATA_DIFF_TREE_EVERY").unwrap_or(20) as usize,
            lower_links: env_num("STRATA_DIFF_LOWER_HARDLINKS").unwrap_or(1) != 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PRNG (splitmix64 seeding, xorshift64*)
// ---------------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 1 } else { z })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<T: Copy>(&mut self, s: &[T]) -> T {
        s[self.below(s.len())]
    }

    fn chance(&mut self, pct: usize) -> bool {
        self.below(100) < pct
    }
}

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// Deterministic write payload.
#[derive(Clone, Copy, Debug)]
struct Data {
    len: usize,
    fill: u8,
}

impl Data {
    fn bytes(&self) -> Vec<u8> {
        (0..self.len)
            .map(|i| self.fill.wrapping_add((i % 251) as u8))
            .collect()
    }
}

impl fmt::Display for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes fill={}>", self.len, self.fill)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ts {
    Set(i64, i64),
    Now,
    Omit,
}

impl Ts {
    fn timespec(self) -> libc::timespec {
        let (s, n) = match self {
            Ts::Set(s, n) => (s, n),
            Ts::Now => (0, libc::UTIME_NOW),
            Ts::Omit => (0, libc::UTIME_OMIT),
        };
        libc::timespec {
            tv_sec: s as libc::time_t,
            tv_nsec: n as _,
        }
    }
}

impl fmt::Display for Ts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ts::Set(s, n) => write!(f, "{s}.{n:09}"),
            Ts::Now => write!(f, "UTIME_NOW"),
            Ts::Omit => write!(f, "UTIME_OMIT"),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum RenameMode {
    Plain,
    NoReplace,
    Exchange,
}

#[derive(Clone, Copy, Debug)]
enum HoldMode {
    Rd,
    Rw,
    Append,
}

impl HoldMode {
    fn name(self) -> &'static str {
        match self {
            HoldMode::Rd => "O_RDONLY",
            HoldMode::Rw => "O_RDWR",
            HoldMode::Append => "O_WRONLY|O_APPEND",
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        p: String,
        mode: u32,
        excl: bool,
    },
    WriteTrunc {
        p: String,
        data: Data,
        creat: bool,
    },
    Append {
        p: String,
        data: Data,
    },
    Pwrite {
        p: String,
        off: i64,
        data: Data,
    },
    Truncate {
        p: String,
        len: i64,
    },
    Read {
        p: String,
    },
    Mkdir {
        p: String,
        mode: u32,
    },
    Rmdir {
        p: String,
    },
    Unlink {
        p: String,
    },
    Rename {
        from: String,
        to: String,
        mode: RenameMode,
    },
    Symlink {
        target: String,
        p: String,
    },
    Readlink {
        p: String,
    },
    Link {
        from: String,
        to: String,
    },
    Chmod {
        p: String,
        mode: u32,
    },
    Chown {
        p: String,
        uid: u32,
        gid: u32,
        nofollow: bool,
    },
    Utimes {
        p: String,
        atime: Ts,
        mtime: Ts,
        nofollow: bool,
    },
    SetXattr {
        p: String,
        name: String,
        value: Vec<u8>,
        flags: i32,
        follow: bool,
    },
    GetXattr {
        p: String,
        name: String,
        follow: bool,
    },
    RemoveXattr {
        p: String,
        name: String,
        follow: bool,
    },
    ListXattr {
        p: String,
        follow: bool,
    },
    Mkfifo {
        p: String,
        mode: u32,
    },
    Stat {
        p: String,
        follow: bool,
    },
    Readdir {
        p: String,
    },
    Access {
        p: String,
        mode: i32,
    },
    HoldOpen {
        slot: usize,
        p: String,
        mode: HoldMode,
    },
    HoldRead {
        slot: usize,
        off: i64,
        len: usize,
    },
    HoldWrite {
        slot: usize,
        off: i64,
        data: Data,
    },
    HoldFstat {
        slot: usize,
    },
    HoldClose {
        slot: usize,
    },
}

fn q(p: &str) -> String {
    if p.is_empty() {
        "\".\"".into()
    } else {
        format!("{p:?}")
    }
}

fn id_str(id: u32) -> String {
    if id == u32::MAX {
        "-1".into()
    } else {
        id.to_string()
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Create { p, mode, excl } => write!(
                f,
                "open({}, O_CREAT|O_WRONLY{}, {mode:04o}); close",
                q(p),
                if *excl { "|O_EXCL" } else { "" }
            ),
            Op::WriteTrunc { p, data, creat } => write!(
                f,
                "open({}, O_WRONLY|O_TRUNC{}); write({data}); close",
                q(p),
                if *creat { "|O_CREAT" } else { "" }
            ),
            Op::Append { p, data } => {
                write!(f, "open({}, O_WRONLY|O_APPEND); write({data}); close", q(p))
            }
            Op::Pwrite { p, off, data } => {
                write!(
                    f,
                    "open({}, O_WRONLY); pwrite({data}, off={off}); close",
                    q(p)
                )
            }
            Op::Truncate { p, len } => write!(f, "truncate({}, {len})", q(p)),
            Op::Read { p } => write!(f, "read_whole_file({})", q(p)),
            Op::Mkdir { p, mode } => write!(f, "mkdir({}, {mode:04o})", q(p)),
            Op::Rmdir { p } => write!(f, "rmdir({})", q(p)),
            Op::Unlink { p } => write!(f, "unlink({})", q(p)),
            Op::Rename { from, to, mode } => write!(
                f,
                "renameat2({}, {}, {})",
                q(from),
                q(to),
                match mode {
                    RenameMode::Plain => "0",
                    RenameMode::NoReplace => "RENAME_NOREPLACE",
                    RenameMode::Exchange => "RENAME_EXCHANGE",
                }
            ),
            Op::Symlink { target, p } => write!(f, "symlink({target:?}, {})", q(p)),
            Op::Readlink { p } => write!(f, "readlink({})", q(p)),
            Op::Link { from, to } => write!(f, "link({}, {})", q(from), q(to)),
            Op::Chmod { p, mode } => write!(f, "chmod({}, {mode:04o})", q(p)),
            Op::Chown {
                p,
                uid,
                gid,
                nofollow,
            } => write!(
                f,
                "{}({}, {}, {})",
                if *nofollow { "lchown" } else { "chown" },
                q(p),
                id_str(*uid),
                id_str(*gid)
            ),
            Op::Utimes {
                p,
                atime,
                mtime,
                nofollow,
            } => write!(
                f,
                "utimensat({}, atime={atime}, mtime={mtime}{})",
                q(p),
                if *nofollow {
                    ", AT_SYMLINK_NOFOLLOW"
                } else {
                    ""
                }
            ),
            Op::SetXattr {
                p,
                name,
                value,
                flags,
                follow,
            } => write!(
                f,
                "{}setxattr({}, {name:?}, {}, {})",
                if *follow { "" } else { "l" },
                q(p),
                show_bytes(value, 12),
                match *flags {
                    libc::XATTR_CREATE => "XATTR_CREATE",
                    libc::XATTR_REPLACE => "XATTR_REPLACE",
                    _ => "0",
                }
            ),
            Op::GetXattr { p, name, follow } => write!(
                f,
                "{}getxattr({}, {name:?})",
                if *follow { "" } else { "l" },
                q(p)
            ),
            Op::RemoveXattr { p, name, follow } => write!(
                f,
                "{}removexattr({}, {name:?})",
                if *follow { "" } else { "l" },
                q(p)
            ),
            Op::ListXattr { p, follow } => {
                write!(f, "{}listxattr({})", if *follow { "" } else { "l" }, q(p))
            }
            Op::Mkfifo { p, mode } => write!(f, "mkfifo({}, {mode:04o})", q(p)),
            Op::Stat { p, follow } => {
                write!(f, "{}({})", if *follow { "stat" } else { "lstat" }, q(p))
            }
            Op::Readdir { p } => write!(f, "readdir({})", q(p)),
            Op::Access { p, mode } => {
                let mut m = Vec::new();
                if mode & libc::R_OK != 0 {
                    m.push("R_OK");
                }
                if mode & libc::W_OK != 0 {
                    m.push("W_OK");
                }
                if mode & libc::X_OK != 0 {
                    m.push("X_OK");
                }
                if m.is_empty() {
                    m.push("F_OK");
                }
                write!(f, "access({}, {})", q(p), m.join("|"))
            }
            Op::HoldOpen { slot, p, mode } => {
                write!(f, "fd[{slot}] = open({}, {})", q(p), mode.name())
            }
            Op::HoldRead { slot, off, len } => write!(f, "pread(fd[{slot}], {len}, off={off})"),
            Op::HoldWrite { slot, off, data } => {
                write!(f, "pwrite(fd[{slot}], {data}, off={off})")
            }
            Op::HoldFstat { slot } => write!(f, "fstat(fd[{slot}])"),
            Op::HoldClose { slot } => write!(f, "close(fd[{slot}])"),
        }
    }
}

impl Op {
    fn kind(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::WriteTrunc { .. } => "write_trunc",
            Op::Append { .. } => "append",
            Op::Pwrite { .. } => "pwrite",
            Op::Truncate { .. } => "truncate",
            Op::Read { .. } => "read",
            Op::Mkdir { .. } => "mkdir",
            Op::Rmdir { .. } => "rmdir",
            Op::Unlink { .. } => "unlink",
            Op::Rename { .. } => "rename",
            Op::Symlink { .. } => "symlink",
            Op::Readlink { .. } => "readlink",
            Op::Link { .. } => "link",
            Op::Chmod { .. } => "chmod",
            Op::Chown { .. } => "chown",
            Op::Utimes { .. } => "utimes",
            Op::SetXattr { .. } => "setxattr",
            Op::GetXattr { .. } => "getxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::ListXattr { .. } => "listxattr",
            Op::Mkfifo { .. } => "mkfifo",
            Op::Stat { .. } => "stat",
            Op::Readdir { .. } => "readdir",
            Op::Access { .. } => "access",
            Op::HoldOpen { .. } => "hold_open",
            Op::HoldRead { .. } => "hold_read",
            Op::HoldWrite { .. } => "hold_write",
            Op::HoldFstat { .. } => "hold_fstat",
            Op::HoldClose { .. } => "hold_close",
        }
    }

    /// Paths the operation names (for the state shown with a divergence).
    fn paths(&self) -> Vec<&str> {
        match self {
            Op::Rename { from, to, .. } | Op::Link { from, to } => vec![from, to],
            Op::Create { p, .. }
            | Op::WriteTrunc { p, .. }
            | Op::Append { p, .. }
            | Op::Pwrite { p, .. }
            | Op::Truncate { p, .. }
            | Op::Read { p }
            | Op::Mkdir { p, .. }
            | Op::Rmdir { p }
            | Op::Unlink { p }
            | Op::Symlink { p, .. }
            | Op::Readlink { p }
            | Op::Chmod { p, .. }
            | Op::Chown { p, .. }
            | Op::Utimes { p, .. }
            | Op::SetXattr { p, .. }
            | Op::GetXattr { p, .. }
            | Op::RemoveXattr { p, .. }
            | Op::ListXattr { p, .. }
            | Op::Mkfifo { p, .. }
            | Op::Stat { p, .. }
            | Op::Readdir { p }
            | Op::Access { p, .. }
            | Op::HoldOpen { p, .. } => vec![p],
            _ => vec![],
        }
    }

    /// The held-file slot the operation uses.
    fn slot(&self) -> Option<usize> {
        match self {
            Op::HoldOpen { slot, .. }
            | Op::HoldRead { slot, .. }
            | Op::HoldWrite { slot, .. }
            | Op::HoldFstat { slot }
            | Op::HoldClose { slot } => Some(*slot),
            _ => None,
        }
    }

    /// Whether a divergence of this operation may leave the two sides in different states
    /// (tree or open files).
    fn changes_state(&self) -> bool {
        self.mutates() || matches!(self, Op::HoldClose { .. })
    }

    /// Whether the operation may change the tree (the oracle's tree is re-read after it).
    fn mutates(&self) -> bool {
        !matches!(
            self,
            Op::Read { .. }
                | Op::Readlink { .. }
                | Op::GetXattr { .. }
                | Op::ListXattr { .. }
                | Op::Stat { .. }
                | Op::Readdir { .. }
                | Op::Access { .. }
                | Op::HoldRead { .. }
                | Op::HoldFstat { .. }
                | Op::HoldClose { .. }
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Generator
// ---------------------------------------------------------------------------------------------

/// Names used at every level, in the initial tree and by the generator: operations collide.
const POOL: &[&str] = &["a", "b", "c", "d", "e", "f", "g", "l", "s", "x", "y"];
const FILE_MODES: &[u32] = &[0o644, 0o600, 0o755, 0o4755, 0o2750, 0o444, 0o000, 0o1777];
const DIR_MODES: &[u32] = &[0o755, 0o700, 0o1777, 0o555, 0o2775];
/// Relative targets only, at most two `..`: with the mount point at `<side>/p/q/mnt`, a link
/// that leaves the mount stays below `<side>/p` (and identically so on both sides).
const SYMLINK_TARGETS: &[&str] = &[
    "a",
    "x",
    "c",
    "b/c",
    "a/b",
    "a/b/c",
    "../a",
    "../x",
    "../../c",
    "nonexistent",
    "s",
    "d/b/c",
    "./e",
];
const DATA_LENS: &[usize] = &[0, 1, 5, 17, 17, 100, 100, 4096, 4097, 70_000];
const OFFSETS: &[i64] = &[0, 1, 3, 100, 4095, 4096, 65_536, 70_000, 200_000];
const TRUNC_LENS: &[i64] = &[0, 0, 1, 10, 100, 4096, 70_000, 150_000];
const IDS: &[(u32, u32)] = &[
    (1234, 5678),
    (0, 0),
    (1234, u32::MAX),
    (u32::MAX, 5678),
    (42, 43),
];
const SECS: &[i64] = &[0, 1, 1_000_000_000, 1_234_567_890, 1_700_000_000];
const NSECS: &[i64] = &[0, 1, 123_456_789, 999_999_999];
const XATTR_NAMES: &[&str] = &["user.t1", "user.t2", "user.t3", "user.big"];

#[derive(Clone, Debug)]
struct Known {
    path: String,
    kind: char,
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

const MAX_PARENT_DEPTH: usize = 4;

fn depth(p: &str) -> usize {
    if p.is_empty() {
        0
    } else {
        p.split('/').count()
    }
}

fn parent_of(p: &str) -> &str {
    p.rsplit_once('/').map(|(a, _)| a).unwrap_or("")
}

struct Gen<'a> {
    rng: &'a mut Rng,
    known: &'a [Known],
}

impl Gen<'_> {
    fn existing(&mut self, pred: impl Fn(&Known) -> bool) -> Option<String> {
        let c: Vec<&Known> = self.known.iter().filter(|k| pred(k)).collect();
        if c.is_empty() {
            None
        } else {
            Some(c[self.rng.below(c.len())].path.clone())
        }
    }

    /// A pool name in an existing directory less than `MAX_PARENT_DEPTH` deep (keeps the
    /// tree from growing ever deeper over long runs).
    fn new_path(&mut self) -> String {
        let parent = self
            .existing(|k| k.kind == 'd' && depth(&k.path) < MAX_PARENT_DEPTH)
            .unwrap_or_default();
        let name = self.rng.pick(POOL);
        join(&parent, name)
    }

    fn rand_path(&mut self) -> String {
        let depth = 1 + self.rng.below(3);
        (0..depth)
            .map(|_| self.rng.pick(POOL))
            .collect::<Vec<_>>()
            .join("/")
    }

    /// An existing non-root path, a new name in an existing directory, or a random path.
    fn any(&mut self) -> String {
        let r = self.rng.below(100);
        if r < 50 {
            if let Some(p) = self.existing(|k| !k.path.is_empty()) {
                return p;
            }
        }
        if r < 85 {
            self.new_path()
        } else {
            self.rand_path()
        }
    }

    /// Mostly an existing object of type `kind` (`pct` percent), else `any()`.
    fn of_kind(&mut self, kind: char, pct: usize) -> String {
        if self.rng.chance(pct) {
            if let Some(p) = self.existing(|k| k.kind == kind && !k.path.is_empty()) {
                return p;
            }
        }
        self.any()
    }

    /// An existing object (any type, root included rarely).
    fn existing_any(&mut self, pct: usize) -> String {
        if self.rng.chance(pct) {
            if let Some(p) = self.existing(|_| true) {
                return p;
            }
        }
        self.any()
    }

    fn mostly_new(&mut self, pct: usize) -> String {
        if self.rng.chance(pct) {
            self.new_path()
        } else {
            self.any()
        }
    }

    fn data(&mut self) -> Data {
        Data {
            len: self.rng.pick(DATA_LENS),
            fill: self.rng.next() as u8,
        }
    }

    fn ts(&mut self) -> Ts {
        match self.rng.below(10) {
            0..=6 => Ts::Set(self.rng.pick(SECS), self.rng.pick(NSECS)),
            7 | 8 => Ts::Omit,
            _ => Ts::Now,
        }
    }

    fn xattr_name(&mut self) -> String {
        if self.rng.chance(4) {
            // Probes of the overlay's own namespace: never visible through the mount.
            self.rng
                .pick(&["trusted.overlay.opaque", "trusted.overlay.redirect"])
                .to_string()
        } else {
            self.rng.pick(XATTR_NAMES).to_string()
        }
    }

    fn xattr_value(&mut self) -> Vec<u8> {
        match self.rng.below(6) {
            0 => Vec::new(),
            1 => b"v1".to_vec(),
            2 => b"value-two".to_vec(),
            3 => vec![b'z'; 300],
            4 => vec![0, 1, 255, 0],
            _ => b"y".to_vec(),
        }
    }
}

fn gen_op(rng: &mut Rng, known: &[Known], kinds: &[(&'static str, u32)]) -> Op {
    let total: u32 = kinds.iter().map(|k| k.1).sum();
    let mut r = rng.below(total as usize) as u32;
    let mut kind = kinds[0].0;
    for (k, w) in kinds {
        if r < *w {
            kind = k;
            break;
        }
        r -= w;
    }
    let mut g = Gen { rng, known };
    match kind {
        "create" => Op::Create {
            p: g.mostly_new(60),
            mode: g.rng.pick(FILE_MODES),
            excl: g.rng.chance(70),
        },
        "write_trunc" => Op::WriteTrunc {
            p: g.of_kind('f', 70),
            data: g.data(),
            creat: g.rng.chance(30),
        },
        "append" => Op::Append {
            p: g.of_kind('f', 75),
            data: g.data(),
        },
        "pwrite" => Op::Pwrite {
            p: g.of_kind('f', 75),
            off: g.rng.pick(OFFSETS),
            data: g.data(),
        },
        "truncate" => Op::Truncate {
            p: g.of_kind('f', 75),
            len: g.rng.pick(TRUNC_LENS),
        },
        "read" => Op::Read {
            p: g.of_kind('f', 75),
        },
        "mkdir" => Op::Mkdir {
            p: g.mostly_new(70),
            mode: g.rng.pick(DIR_MODES),
        },
        "rmdir" => Op::Rmdir {
            p: g.of_kind('d', 80),
        },
        "unlink" => {
            let p = if g.rng.chance(80) {
                g.existing(|k| k.kind != 'd').unwrap_or_else(|| g.any())
            } else {
                g.any()
            };
            Op::Unlink { p }
        }
        "rename" => {
            let dirs = g.rng.chance(30);
            let from = if dirs {
                g.of_kind('d', 85)
            } else {
                g.existing_any(85)
            };
            let to = match g.rng.below(10) {
                0..=3 if dirs => g.of_kind('d', 100),
                0..=3 => g.existing_any(100),
                4..=8 => g.new_path(),
                _ => g.rand_path(),
            };
            let mode = match g.rng.below(10) {
                0..=5 => RenameMode::Plain,
                6 | 7 => RenameMode::NoReplace,
                _ => RenameMode::Exchange,
            };
            Op::Rename { from, to, mode }
        }
        "symlink" => Op::Symlink {
            target: g.rng.pick(SYMLINK_TARGETS).to_string(),
            p: g.mostly_new(80),
        },
        "readlink" => Op::Readlink {
            p: g.of_kind('l', 70),
        },
        "link" => {
            let from = match g.rng.below(100) {
                0..=69 => g.of_kind('f', 100),
                70..=84 => g.existing_any(100),
                _ => g.any(),
            };
            Op::Link {
                from,
                to: g.mostly_new(80),
            }
        }
        "chmod" => Op::Chmod {
            p: g.existing_any(80),
            mode: if g.rng.chance(50) {
                g.rng.pick(FILE_MODES)
            } else {
                g.rng.pick(DIR_MODES)
            },
        },
        "chown" => {
            let (uid, gid) = g.rng.pick(IDS);
            Op::Chown {
                p: g.existing_any(85),
                uid,
                gid,
                nofollow: g.rng.chance(50),
            }
        }
        "utimes" => Op::Utimes {
            p: g.existing_any(85),
            atime: g.ts(),
            mtime: g.ts(),
            nofollow: g.rng.chance(30),
        },
        "setxattr" => Op::SetXattr {
            p: g.existing_any(85),
            name: g.xattr_name(),
            value: g.xattr_value(),
            flags: g.rng.pick(&[0, 0, libc::XATTR_CREATE, libc::XATTR_REPLACE]),
            follow: g.rng.chance(20),
        },
        "getxattr" => Op::GetXattr {
            p: g.existing_any(85),
            name: g.xattr_name(),
            follow: g.rng.chance(20),
        },
        "removexattr" => Op::RemoveXattr {
            p: g.existing_any(85),
            name: g.xattr_name(),
            follow: g.rng.chance(20),
        },
        "listxattr" => Op::ListXattr {
            p: g.existing_any(85),
            follow: g.rng.chance(20),
        },
        "mkfifo" => Op::Mkfifo {
            p: g.mostly_new(80),
            mode: g.rng.pick(&[0o644, 0o600, 0o666]),
        },
        "stat" => Op::Stat {
            p: g.existing_any(75),
            follow: g.rng.chance(30),
        },
        "readdir" => Op::Readdir {
            p: if g.rng.chance(75) {
                g.existing(|k| k.kind == 'd').unwrap_or_default()
            } else {
                g.any()
            },
        },
        "access" => Op::Access {
            p: g.existing_any(80),
            mode: g.rng.pick(&[
                libc::F_OK,
                libc::R_OK,
                libc::W_OK,
                libc::X_OK,
                libc::R_OK | libc::W_OK,
            ]),
        },
        "hold_open" => Op::HoldOpen {
            slot: g.rng.below(HELD_SLOTS),
            p: g.of_kind('f', 80),
            mode: g
                .rng
                .pick(&[HoldMode::Rd, HoldMode::Rd, HoldMode::Rw, HoldMode::Append]),
        },
        "hold_read" => Op::HoldRead {
            slot: g.rng.below(HELD_SLOTS),
            off: g.rng.pick(&[0, 0, 1, 100, 4096, 70_000]),
            len: g.rng.pick(&[1, 10, 5000, 100_000]),
        },
        "hold_write" => Op::HoldWrite {
            slot: g.rng.below(HELD_SLOTS),
            off: g.rng.pick(OFFSETS),
            data: g.data(),
        },
        "hold_fstat" => Op::HoldFstat {
            slot: g.rng.below(HELD_SLOTS),
        },
        "hold_close" => Op::HoldClose {
            slot: g.rng.below(HELD_SLOTS),
        },
        other => unreachable!("kind {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errname(e: i32) -> String {
    let n = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ESTALE => "ESTALE",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EDQUOT => "EDQUOT",
        libc::EINTR => "EINTR",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}

fn show_bytes(b: &[u8], max: usize) -> String {
    let mut s = String::from("\"");
    for &c in b.iter().take(max) {
        if (0x20..0x7f).contains(&c) && c != b'"' && c != b'\\' {
            s.push(c as char);
        } else {
            let _ = write!(s, "\\x{c:02x}");
        }
    }
    s.push('"');
    if b.len() > max {
        let _ = write!(s, "...");
    }
    s
}

/// Attributes compared for one object.
#[derive(Clone, Debug, PartialEq, Eq)]
struct StatV {
    kind: char,
    mode: u32,
    uid: u32,
    gid: u32,
    size: Option<u64>,
    nlink: Option<u64>,
    rdev: Option<u64>,
    /// Only kept when the oracle's object has a pinned mtime.
    mtime: Option<(i64, i64)>,
    /// Not compared (zeroed before comparison); used to decide `mtime`.
    ino: u64,
}

impl fmt::Display for StatV {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:04o} {}:{}",
            self.kind, self.mode, self.uid, self.gid
        )?;
        if let Some(s) = self.size {
            write!(f, " size={s}")?;
        }
        if let Some(n) = self.nlink {
            write!(f, " nlink={n}")?;
        }
        if let Some(r) = self.rdev {
            write!(f, " rdev={}:{}", libc::major(r), libc::minor(r))?;
        }
        if let Some((s, n)) = self.mtime {
            write!(f, " mtime={s}.{n:09}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Val {
    Unit,
    Checks(Vec<(&'static str, String)>),
    Data(Vec<u8>),
    Text(Vec<u8>),
    Stat(StatV),
    /// Sorted (name, d_type). d_ino is not compared: kernel overlayfs itself is not
    /// consistent about d_ino == st_ino (it differs between two identical mounts).
    Dir(Vec<(String, char)>),
    Names(Vec<String>),
}

type Res = Result<Val, i32>;

fn show_data(d: &[u8]) -> String {
    format!(
        "{} bytes fnv={:016x} head={}",
        d.len(),
        fnv(d),
        show_bytes(d, 24)
    )
}

impl fmt::Display for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Val::Unit => write!(f, "ok"),
            Val::Checks(c) => {
                let parts: Vec<String> = c.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "ok {{{}}}", parts.join(", "))
            }
            Val::Data(d) => write!(f, "ok data({})", show_data(d)),
            Val::Text(t) => write!(f, "ok {}", show_bytes(t, 200)),
            Val::Stat(s) => write!(f, "ok {s}"),
            Val::Dir(entries) => {
                let e: Vec<String> = entries.iter().map(|(n, k)| format!("{n}:{k}")).collect();
                write!(f, "ok [{}]", e.join(" "))
            }
            Val::Names(n) => write!(f, "ok {n:?}"),
        }
    }
}

fn show_res(r: &Res) -> String {
    match r {
        Ok(v) => v.to_string(),
        Err(e) => errname(*e),
    }
}

fn class(r: &Res) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => errname(*e),
    }
}

/// Extra explanation for two differing results.
fn diff_hint(a: &Res, b: &Res) -> Option<String> {
    match (a, b) {
        (Ok(Val::Data(x)), Ok(Val::Data(y))) => {
            let first = x.iter().zip(y.iter()).position(|(p, q)| p != q);
            Some(match first {
                Some(i) => format!(
                    "first differing byte at offset {i} ({:#04x} vs {:#04x})",
                    x[i], y[i]
                ),
                None => format!("common prefix equal; lengths {} vs {}", x.len(), y.len()),
            })
        }
        (Ok(Val::Dir(x)), Ok(Val::Dir(y))) => {
            let xs: BTreeSet<_> = x.iter().collect();
            let ys: BTreeSet<_> = y.iter().collect();
            let only_a: Vec<String> = xs
                .difference(&ys)
                .map(|(n, k)| format!("{n}:{k}"))
                .collect();
            let only_b: Vec<String> = ys
                .difference(&xs)
                .map(|(n, k)| format!("{n}:{k}"))
                .collect();
            Some(format!(
                "only in oracle: {only_a:?}; only in tested: {only_b:?}"
            ))
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Syscall helpers
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct St {
    kind: char,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u64,
    ino: u64,
    rdev: u64,
    mtime: (i64, i64),
}

fn kind_of(mode: u32) -> char {
    match mode & libc::S_IFMT {
        libc::S_IFREG => 'f',
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFIFO => 'p',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        libc::S_IFSOCK => 's',
        _ => '?',
    }
}

fn dtype_char(t: u8) -> char {
    match t {
        libc::DT_REG => 'f',
        libc::DT_DIR => 'd',
        libc::DT_LNK => 'l',
        libc::DT_FIFO => 'p',
        libc::DT_CHR => 'c',
        libc::DT_BLK => 'b',
        libc::DT_SOCK => 's',
        libc::DT_UNKNOWN => 'u',
        _ => '?',
    }
}

// The field types of `struct stat` differ between architectures.
#[allow(clippy::unnecessary_cast)]
fn st_from(s: &libc::stat) -> St {
    St {
        kind: kind_of(s.st_mode),
        mode: s.st_mode & 0o7777,
        uid: s.st_uid,
        gid: s.st_gid,
        size: s.st_size as u64,
        nlink: s.st_nlink as u64,
        ino: s.st_ino,
        rdev: s.st_rdev,
        mtime: (s.st_mtime as i64, s.st_mtime_nsec as i64),
    }
}

impl St {
    fn view(&self) -> StatV {
        let dir = self.kind == 'd';
        StatV {
            kind: self.kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            size: (!dir).then_some(self.size),
            nlink: (!dir).then_some(self.nlink),
            rdev: matches!(self.kind, 'c' | 'b').then_some(self.rdev),
            mtime: Some(self.mtime),
            ino: self.ino,
        }
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn c(s: &str) -> CString {
    CString::new(s).expect("string without NUL")
}

fn stat_path(p: &CStr, follow: bool) -> Result<St, i32> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let r = unsafe {
        if follow {
            libc::stat(p.as_ptr(), &mut st)
        } else {
            libc::lstat(p.as_ptr(), &mut st)
        }
    };
    if r == 0 {
        Ok(st_from(&st))
    } else {
        Err(errno())
    }
}

fn fstat_fd(fd: i32) -> Result<St, i32> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } == 0 {
        Ok(st_from(&st))
    } else {
        Err(errno())
    }
}

fn ok0(r: libc::c_int) -> Result<(), i32> {
    if r == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

fn open_fd(p: &CStr, flags: i32, mode: u32) -> Result<OwnedFd, i32> {
    let fd = unsafe {
        libc::open(
            p.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NONBLOCK,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        Err(errno())
    } else {
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

fn write_all(fd: i32, data: &[u8], off: Option<i64>) -> Result<u64, i32> {
    let mut done = 0usize;
    while done < data.len() {
        let rest = &data[done..];
        let r = unsafe {
            match off {
                Some(o) => libc::pwrite(
                    fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    (o + done as i64) as libc::off_t,
                ),
                None => libc::write(fd, rest.as_ptr().cast(), rest.len()),
            }
        };
        if r < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            break;
        }
        done += r as usize;
    }
    Ok(done as u64)
}

fn read_all(fd: i32, off: Option<i64>, limit: usize) -> Result<Vec<u8>, i32> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while out.len() < limit {
        let want = buf.len().min(limit - out.len());
        let r = unsafe {
            match off {
                Some(o) => libc::pread(
                    fd,
                    buf.as_mut_ptr().cast(),
                    want,
                    (o + out.len() as i64) as libc::off_t,
                ),
                None => libc::read(fd, buf.as_mut_ptr().cast(), want),
            }
        };
        if r < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            break;
        }
        out.extend_from_slice(&buf[..r as usize]);
    }
    Ok(out)
}

/// Raw readdir: (name, d_type), without "." and "..", in directory order.
fn list_dir(p: &CStr) -> Result<Vec<(String, u8)>, i32> {
    let d = unsafe { libc::opendir(p.as_ptr()) };
    if d.is_null() {
        return Err(errno());
    }
    let mut v = Vec::new();
    let res = loop {
        unsafe { *libc::__errno_location() = 0 };
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            let er = errno();
            break if er != 0 { Err(er) } else { Ok(()) };
        }
        let ent = unsafe { &*e };
        let name = unsafe { CStr::from_ptr(ent.d_name.as_ptr()) }.to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        v.push((String::from_utf8_lossy(name).into_owned(), ent.d_type));
    };
    unsafe { libc::closedir(d) };
    res.map(|()| v)
}

fn xattr_get(p: &CStr, name: &str, follow: bool) -> Result<Vec<u8>, i32> {
    let n = c(name);
    loop {
        let size = unsafe {
            if follow {
                libc::getxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0)
            } else {
                libc::lgetxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0)
            }
        };
        if size < 0 {
            return Err(errno());
        }
        let mut buf = vec![0u8; size as usize + 1];
        let r = unsafe {
            if follow {
                libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            } else {
                libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            }
        };
        if r < 0 {
            let e = errno();
            if e == libc::ERANGE {
                continue;
            }
            return Err(e);
        }
        buf.truncate(r as usize);
        return Ok(buf);
    }
}

fn xattr_list(p: &CStr, follow: bool) -> Result<Vec<String>, i32> {
    loop {
        let size = unsafe {
            if follow {
                libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0)
            } else {
                libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0)
            }
        };
        if size < 0 {
            return Err(errno());
        }
        let mut buf = vec![0u8; size as usize + 1];
        let r = unsafe {
            if follow {
                libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            } else {
                libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            }
        };
        if r < 0 {
            let e = errno();
            if e == libc::ERANGE {
                continue;
            }
            return Err(e);
        }
        buf.truncate(r as usize);
        let mut names: Vec<String> = buf
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        names.sort();
        return Ok(names);
    }
}

fn readlink_path(p: &CStr) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; 4096];
    let r = unsafe { libc::readlink(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(errno());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// "true"/"false", or why there is nothing to compare.
fn same_ino(before: Result<St, i32>, after: Result<St, i32>) -> String {
    match (before, after) {
        (Err(_), _) => "n/a".into(),
        (Ok(_), Err(e)) => format!("gone({})", errname(e)),
        (Ok(b), Ok(a)) => (b.ino == a.ino).to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Process / mount helpers
// ---------------------------------------------------------------------------------------------

static LOG_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Runs a command with a bounded wait; output goes to a file in `log_dir` (never a pipe: a
/// daemon that kept a pipe open would hang us). Ok(output) on exit 0.
fn run_bounded(cmd: &mut Command, limit: Duration, log_dir: &Path) -> Result<String, String> {
    let n = LOG_SEQ.fetch_add(1, Ordering::Relaxed);
    let log = log_dir.join(format!("cmd-{n}.log"));
    let out = fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("spawn {desc}: {e}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("wait {desc}: {e}")),
        }
    };
    let text = fs::read_to_string(&log).unwrap_or_default();
    let _ = fs::remove_file(&log);
    match status {
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "{desc} timed out after {limit:?}; output: {}",
                text.trim()
            ))
        }
        Some(s) if s.success() => Ok(text),
        Some(s) => Err(format!("{desc} failed ({s}): {}", text.trim())),
    }
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Mount points of this process's namespace, in mount order.
fn mountpoints() -> Vec<PathBuf> {
    mountinfo().into_iter().map(|m| m.mountpoint).collect()
}

/// The stratafs daemon(s) serving `mnt`: processes named like the binary with `mnt` among
/// their arguments.
fn find_daemons(mnt: &Path, bin: &Path) -> Vec<i32> {
    let Some(bin_name) = bin.file_name() else {
        return Vec::new();
    };
    pids_with_arg(mnt)
        .into_iter()
        .filter(|&pid| program_names(pid).iter().any(|n| n == bin_name))
        .collect()
}

/// Owns one mount; unmounts it (lazily when dropped) with bounded waits, and makes sure the
/// daemon serving it exits.
struct MountG {
    mnt: PathBuf,
    pids: Vec<i32>,
    log_dir: PathBuf,
    active: bool,
}

impl MountG {
    fn unmount(&mut self, lazy: bool) -> Result<(), String> {
        if !self.active {
            return Ok(());
        }
        self.active = false;
        let limit = Duration::from_secs(10);
        let mut errs = Vec::new();
        if is_mounted(&self.mnt) {
            let mut cmd = Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            if let Err(e) = run_bounded(cmd.arg(&self.mnt), limit, &self.log_dir) {
                errs.push(e);
                if !lazy && is_mounted(&self.mnt) {
                    let _ = run_bounded(
                        Command::new("umount").arg("-l").arg(&self.mnt),
                        limit,
                        &self.log_dir,
                    );
                }
            }
        }
        if !wait_until(limit, || !is_mounted(&self.mnt)) {
            errs.push(format!(
                "{} still mounted after {limit:?}",
                self.mnt.display()
            ));
        }
        if !wait_until(limit, || self.pids.iter().all(|p| !pid_alive(*p))) {
            let alive: Vec<i32> = self
                .pids
                .iter()
                .copied()
                .filter(|p| pid_alive(*p))
                .collect();
            errs.push(format!(
                "daemon {alive:?} still running {limit:?} after unmount; killed"
            ));
            for p in alive {
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }
}

impl Drop for MountG {
    fn drop(&mut self) {
        if let Err(e) = self.unmount(true) {
            eprintln!("differential: teardown of {}: {e}", self.mnt.display());
        }
    }
}

fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

struct WdState {
    started: AtomicU64,
    stop: AtomicBool,
    fired: AtomicBool,
    target: Mutex<Option<(PathBuf, Vec<i32>)>>,
}

/// Kills the stratafs daemon and detaches its mount when one operation takes too long, so
/// that a hung FUSE request becomes a divergence (ENOTCONN) instead of a hung test.
struct Watchdog {
    st: Arc<WdState>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Watchdog {
    fn new(limit: Duration, log_dir: PathBuf) -> Watchdog {
        let st = Arc::new(WdState {
            started: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            fired: AtomicBool::new(false),
            target: Mutex::new(None),
        });
        let s2 = st.clone();
        let handle = thread::spawn(move || {
            while !s2.stop.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(100));
                let t = s2.started.load(Ordering::SeqCst);
                if t == 0 || now_ms() - t < limit.as_millis() as u64 {
                    continue;
                }
                if s2.fired.swap(true, Ordering::SeqCst) {
                    continue;
                }
                let target = s2.target.lock().unwrap().clone();
                if let Some((mnt, pids)) = target {
                    eprintln!(
                        "differential WATCHDOG: an operation on {} hung for {limit:?}; \
                         killing daemon {pids:?} and detaching the mount",
                        mnt.display()
                    );
                    for p in pids {
                        unsafe { libc::kill(p, libc::SIGKILL) };
                    }
                    let _ = run_bounded(
                        Command::new("umount").arg("-l").arg(&mnt),
                        Duration::from_secs(10),
                        &log_dir,
                    );
                }
            }
        });
        Watchdog {
            st,
            handle: Some(handle),
        }
    }

    fn set_target(&self, t: Option<(PathBuf, Vec<i32>)>) {
        *self.st.target.lock().unwrap() = t;
    }

    fn arm(&self) {
        self.st.started.store(now_ms(), Ordering::SeqCst);
    }

    fn disarm(&self) {
        self.st.started.store(0, Ordering::SeqCst);
    }

    fn fired(&self) -> bool {
        self.st.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.st.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scratch space and layer construction
// ---------------------------------------------------------------------------------------------

/// `/tmp/strata-diff-<random>`; removed on drop unless kept or something is still mounted
/// below it.
struct Scratch {
    base: PathBuf,
    keep: bool,
}

impl Scratch {
    fn new(keep: bool) -> Scratch {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut r = Rng::new(nanos ^ (u64::from(std::process::id()) << 32));
        for _ in 0..100 {
            let base = PathBuf::from(format!("/tmp/strata-diff-{:012x}", r.next() >> 16));
            if fs::create_dir(&base).is_ok() {
                fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).unwrap();
                return Scratch { base, keep };
            }
        }
        panic!("cannot create a /tmp/strata-diff-* directory");
    }

    /// Removes `dir` (below the base) unless something is mounted below it.
    fn remove(&self, dir: &Path) {
        if self.keep || !dir.starts_with(&self.base) {
            return;
        }
        if let Some(m) = mountpoints().iter().find(|m| m.starts_with(dir)) {
            eprintln!(
                "differential: not removing {}: {} is still mounted",
                dir.display(),
                m.display()
            );
            return;
        }
        let _ = fs::remove_dir_all(dir);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("differential: scratch kept at {}", self.base.display());
        }
        self.remove(&self.base.clone());
    }
}

/// Builds layer content below `root`.
struct LayerB {
    root: PathBuf,
}

impl LayerB {
    fn new(root: PathBuf) -> LayerB {
        fs::create_dir_all(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        LayerB { root }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn parents(&self, rel: &str) {
        let mut cur = self.root.clone();
        let parent = parent_of(rel);
        if parent.is_empty() {
            return;
        }
        for comp in parent.split('/') {
            cur.push(comp);
            if !cur.exists() {
                fs::create_dir(&cur).unwrap();
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
    }

    fn dir(&self, rel: &str, mode: u32) -> &Self {
        self.parents(rel);
        let p = self.p(rel);
        if !p.exists() {
            fs::create_dir(&p).unwrap();
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        self
    }

    fn file(&self, rel: &str, content: &[u8], mode: u32) -> &Self {
        self.parents(rel);
        fs::write(self.p(rel), content).unwrap();
        fs::set_permissions(self.p(rel), fs::Permissions::from_mode(mode)).unwrap();
        self
    }

    fn hardlink(&self, rel: &str, existing: &str) -> &Self {
        self.parents(rel);
        fs::hard_link(self.p(existing), self.p(rel)).unwrap();
        self
    }

    /// A hard link, or (when `link` is false) a copy with the same content, mode and
    /// xattrs.
    fn lower_link(&self, rel: &str, existing: &str, link: bool) -> &Self {
        if link {
            return self.hardlink(rel, existing);
        }
        self.parents(rel);
        fs::copy(self.p(existing), self.p(rel)).unwrap();
        let src = cstr(&self.p(existing));
        for name in xattr_list(&src, false).unwrap() {
            let v = xattr_get(&src, &name, false).unwrap();
            self.xattr(rel, &name, &v);
        }
        self
    }

    fn symlink(&self, rel: &str, target: &str) -> &Self {
        self.parents(rel);
        symlink(target, self.p(rel)).unwrap();
        self
    }

    fn mknod(&self, rel: &str, mode: u32) -> &Self {
        self.parents(rel);
        let p = cstr(&self.p(rel));
        ok0(unsafe { libc::mknod(p.as_ptr(), mode, 0) })
            .unwrap_or_else(|e| panic!("mknod {rel}: {}", errname(e)));
        let m = mode & 0o7777;
        ok0(unsafe { libc::chmod(p.as_ptr(), m) }).unwrap();
        self
    }

    fn fifo(&self, rel: &str, mode: u32) -> &Self {
        self.mknod(rel, libc::S_IFIFO | mode)
    }

    /// Kernel-format whiteout: a character device 0:0.
    fn whiteout(&self, rel: &str) -> &Self {
        self.mknod(rel, libc::S_IFCHR)
    }

    fn xattr(&self, rel: &str, name: &str, value: &[u8]) -> &Self {
        let p = cstr(&self.p(rel));
        let n = c(name);
        ok0(unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        })
        .unwrap_or_else(|e| panic!("setxattr {rel} {name}: {}", errname(e)));
        self
    }

    fn owner(&self, rel: &str, uid: u32, gid: u32) -> &Self {
        let p = cstr(&self.p(rel));
        ok0(unsafe { libc::lchown(p.as_ptr(), uid, gid) }).unwrap();
        self
    }

    /// Gives every object a fixed, distinct, nanosecond-precise atime/mtime (post-order, in
    /// sorted order: deterministic also for hard links).
    fn fix_times(&self, salt: &str) {
        fn walk(abs: &Path, rel: &str, salt: &str) {
            let md = fs::symlink_metadata(abs).unwrap();
            if md.is_dir() {
                let mut names: Vec<_> = fs::read_dir(abs)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                names.sort();
                for n in names {
                    let r = join(rel, &n.to_string_lossy());
                    walk(&abs.join(&n), &r, salt);
                }
            }
            let h = fnv(format!("{salt}/{rel}").as_bytes());
            let t = libc::timespec {
                tv_sec: (1_500_000_000 + (h % 10_000_000)) as libc::time_t,
                tv_nsec: ((h >> 24) % 1_000_000_000) as _,
            };
            let p = cstr(abs);
            ok0(unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    p.as_ptr(),
                    [t, t].as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })
            .unwrap();
        }
        walk(&self.root, "", salt);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i * 7 % 253) as u8))
        .collect()
}

/// The initial stack: `l2` (bottom), `l1` (top lower), and a pre-populated `upper`.
/// With `lower_links` false the lower layers hold copies instead of hard links.
fn build_stack(side: &Path, lower_links: bool) {
    let l2 = LayerB::new(side.join("l2"));
    l2.dir("a", 0o755)
        .file("a/b/c", b"bottom a/b/c\n", 0o644)
        .file("a/b/x", &pattern(5000, 1), 0o644)
        .file("a/x", b"hardlinked in the bottom layer\n", 0o644)
        .xattr("a/x", "user.t1", b"v1")
        .lower_link("a/y", "a/x", lower_links)
        .symlink("a/s", "x")
        .dir("b", 0o755)
        .xattr("b", "user.t2", b"dir xattr")
        .file("b/a", b"b/a bottom (whited out by the upper)\n", 0o644)
        .file("b/c/d", b"owned file\n", 0o600)
        .owner("b/c/d", 1234, 5678)
        .file("c", &pattern(100_000, 2), 0o644)
        .file("d/a", b"d/a hidden by the opaque d\n", 0o644)
        .file("d/b/c", b"d/b/c hidden\n", 0o644)
        .file("x", b"x whited out in l1\n", 0o644)
        .file("y/a", b"y/a whited out with its dir\n", 0o644)
        .fifo("f", 0o644)
        .symlink("s", "a/b/c")
        .file("l/a", b"l/a bottom\n", 0o640)
        .file("e", b"bottom e\n", 0o755)
        .file(
            "g/x",
            b"g/x bottom; g is also an upper-only dir name\n",
            0o644,
        );
    l2.fix_times("l2");

    let l1 = LayerB::new(side.join("l1"));
    l1.dir("a/b", 0o755)
        .file("a/b/c", b"top a/b/c\n", 0o644)
        .file("a/b/d", b"top a/b/d\n", 0o644)
        .file("a/c", b"setuid file in l1\n", 0o4755)
        .dir("d", 0o755)
        .xattr("d", "trusted.overlay.opaque", b"y")
        .file("d/c", b"top d/c\n", 0o644)
        .whiteout("x")
        .whiteout("y")
        .file("b/x", b"b/x: three links in l1\n", 0o644)
        .lower_link("b/y", "b/x", lower_links)
        .lower_link("b/g", "b/x", lower_links)
        .xattr("b/x", "user.t3", &[0, 1, 2, 255])
        .symlink("l/s", "../c")
        .file("l/b", &pattern(70_000, 5), 0o644)
        .file("e", b"top e\n", 0o644)
        .xattr("e", "user.t1", b"top")
        .xattr("e", "user.big", &[b'q'; 200])
        .owner("e", 42, 43);
    l1.fix_times("l1");

    let up = LayerB::new(side.join("upper"));
    up.dir("a", 0o755)
        .file("a/d", b"upper a/d\n", 0o644)
        .dir("b", 0o755)
        .whiteout("b/a")
        .file("g/a", b"upper-only g/a\n", 0o644)
        .hardlink("g/l", "g/a")
        .symlink("g/s", "../a/x")
        .dir("g/d", 0o700)
        .file("e2", b"unused", 0o644);
    fs::remove_file(up.p("e2")).unwrap();
    up.fix_times("upper");

    fs::create_dir_all(side.join("work")).unwrap();
    fs::create_dir_all(side.join("p/q/mnt")).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Sides
// ---------------------------------------------------------------------------------------------

struct Side {
    label: &'static str,
    dir: PathBuf,
    strata: Option<PathBuf>,
    mount: Option<MountG>,
    held: Vec<Option<OwnedFd>>,
}

impl Drop for Side {
    fn drop(&mut self) {
        // Close held files before the mount guard (dropped next) unmounts.
        self.held.clear();
    }
}

impl Side {
    fn new(label: &'static str, dir: PathBuf, strata: Option<PathBuf>) -> Side {
        fs::create_dir_all(&dir).unwrap();
        Side {
            label,
            dir,
            strata,
            mount: None,
            held: (0..HELD_SLOTS).map(|_| None).collect(),
        }
    }

    fn mnt(&self) -> PathBuf {
        self.dir.join("p/q/mnt")
    }

    fn lowers(&self) -> [PathBuf; 2] {
        [self.dir.join("l1"), self.dir.join("l2")]
    }

    fn path(&self, rel: &str) -> CString {
        if rel.is_empty() {
            cstr(&self.mnt())
        } else {
            cstr(&self.mnt().join(rel))
        }
    }

    fn mount(&mut self) -> Result<(), String> {
        let mnt = self.mnt();
        let [l1, l2] = self.lowers();
        let mut opts = format!(
            "lowerdir={}:{},upperdir={},workdir={}",
            l1.display(),
            l2.display(),
            self.dir.join("upper").display(),
            self.dir.join("work").display()
        );
        if let (Some(more), Some(_)) = (std::env::var_os("STRATA_DIFF_OPTS"), &self.strata) {
            opts.push(',');
            opts.push_str(&more.to_string_lossy());
        }
        let limit = Duration::from_secs(30);
        match &self.strata {
            Some(bin) => {
                let r = run_bounded(
                    Command::new(bin).arg("-o").arg(&opts).arg(&mnt),
                    limit,
                    &self.dir,
                );
                let g = MountG {
                    pids: find_daemons(&mnt, bin),
                    mnt: mnt.clone(),
                    log_dir: self.dir.clone(),
                    active: true,
                };
                if let Err(e) = r {
                    drop(g);
                    return Err(format!("stratafs mount failed: {e}"));
                }
                if !is_mounted(&mnt) {
                    drop(g);
                    return Err(format!(
                        "stratafs exited 0 but nothing is mounted at {}",
                        mnt.display()
                    ));
                }
                self.mount = Some(g);
            }
            None => {
                let r = run_bounded(
                    Command::new("mount")
                        .args(["-t", "overlay", "overlay", "-o"])
                        .arg(format!("{opts},redirect_dir=on,index=on"))
                        .arg(&mnt),
                    limit,
                    &self.dir,
                );
                let g = MountG {
                    pids: Vec::new(),
                    mnt: mnt.clone(),
                    log_dir: self.dir.clone(),
                    active: true,
                };
                if let Err(e) = r {
                    drop(g);
                    return Err(format!("kernel overlay mount failed: {e}"));
                }
                self.mount = Some(g);
            }
        }
        Ok(())
    }

    fn unmount(&mut self) -> Result<(), String> {
        for h in &mut self.held {
            *h = None;
        }
        match self.mount.take() {
            Some(mut g) => g.unmount(false),
            None => Ok(()),
        }
    }

    fn daemon_target(&self) -> Option<(PathBuf, Vec<i32>)> {
        match (&self.strata, &self.mount) {
            (Some(_), Some(g)) => Some((g.mnt.clone(), g.pids.clone())),
            _ => None,
        }
    }

    fn fd(&self, slot: usize) -> Result<i32, i32> {
        self.held[slot]
            .as_ref()
            .map(|f| f.as_raw_fd())
            .ok_or(libc::EBADF)
    }

    fn exec(&mut self, op: &Op) -> Res {
        match op {
            Op::Create { p, mode, excl } => {
                let fl = libc::O_CREAT | libc::O_WRONLY | if *excl { libc::O_EXCL } else { 0 };
                open_fd(&self.path(p), fl, *mode).map(|_| Val::Unit)
            }
            Op::WriteTrunc { p, data, creat } => {
                let cp = self.path(p);
                let before = stat_path(&cp, true);
                let fl = libc::O_WRONLY | libc::O_TRUNC | if *creat { libc::O_CREAT } else { 0 };
                let fd = open_fd(&cp, fl, 0o644)?;
                let n = write_all(fd.as_raw_fd(), &data.bytes(), None)?;
                drop(fd);
                Ok(Val::Checks(vec![
                    ("written", n.to_string()),
                    ("ino_kept", same_ino(before, stat_path(&cp, true))),
                ]))
            }
            Op::Append { p, data } => {
                let cp = self.path(p);
                let before = stat_path(&cp, true);
                let fd = open_fd(&cp, libc::O_WRONLY | libc::O_APPEND, 0)?;
                let n = write_all(fd.as_raw_fd(), &data.bytes(), None)?;
                drop(fd);
                Ok(Val::Checks(vec![
                    ("written", n.to_string()),
                    ("ino_kept", same_ino(before, stat_path(&cp, true))),
                ]))
            }
            Op::Pwrite { p, off, data } => {
                let cp = self.path(p);
                let before = stat_path(&cp, true);
                let fd = open_fd(&cp, libc::O_WRONLY, 0)?;
                let n = write_all(fd.as_raw_fd(), &data.bytes(), Some(*off))?;
                drop(fd);
                Ok(Val::Checks(vec![
                    ("written", n.to_string()),
                    ("ino_kept", same_ino(before, stat_path(&cp, true))),
                ]))
            }
            Op::Truncate { p, len } => {
                let cp = self.path(p);
                let before = stat_path(&cp, true);
                ok0(unsafe { libc::truncate(cp.as_ptr(), *len as libc::off_t) })?;
                Ok(Val::Checks(vec![(
                    "ino_kept",
                    same_ino(before, stat_path(&cp, true)),
                )]))
            }
            Op::Read { p } => {
                let fd = open_fd(&self.path(p), libc::O_RDONLY, 0)?;
                read_all(fd.as_raw_fd(), None, 8 << 20).map(Val::Data)
            }
            Op::Mkdir { p, mode } => {
                ok0(unsafe { libc::mkdir(self.path(p).as_ptr(), *mode) }).map(|()| Val::Unit)
            }
            Op::Rmdir { p } => {
                ok0(unsafe { libc::rmdir(self.path(p).as_ptr()) }).map(|()| Val::Unit)
            }
            Op::Unlink { p } => {
                ok0(unsafe { libc::unlink(self.path(p).as_ptr()) }).map(|()| Val::Unit)
            }
            Op::Rename { from, to, mode } => {
                let (cf, ct) = (self.path(from), self.path(to));
                let (bf, bt) = (stat_path(&cf, false), stat_path(&ct, false));
                let flags = match mode {
                    RenameMode::Plain => 0,
                    RenameMode::NoReplace => libc::RENAME_NOREPLACE,
                    RenameMode::Exchange => libc::RENAME_EXCHANGE,
                };
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_renameat2,
                        libc::AT_FDCWD,
                        cf.as_ptr(),
                        libc::AT_FDCWD,
                        ct.as_ptr(),
                        flags as libc::c_uint,
                    )
                };
                if r != 0 {
                    return Err(errno());
                }
                let mut checks = vec![("moved_ino_kept", same_ino(bf, stat_path(&ct, false)))];
                if let RenameMode::Exchange = mode {
                    checks.push(("exchanged_ino_kept", same_ino(bt, stat_path(&cf, false))));
                }
                Ok(Val::Checks(checks))
            }
            Op::Symlink { target, p } => {
                let t = c(target);
                ok0(unsafe { libc::symlink(t.as_ptr(), self.path(p).as_ptr()) }).map(|()| Val::Unit)
            }
            Op::Readlink { p } => readlink_path(&self.path(p)).map(Val::Text),
            Op::Link { from, to } => {
                let (cf, ct) = (self.path(from), self.path(to));
                let before = stat_path(&cf, false);
                ok0(unsafe { libc::link(cf.as_ptr(), ct.as_ptr()) })?;
                let after = stat_path(&cf, false);
                let new = stat_path(&ct, false);
                let same = match (&after, &new) {
                    (Ok(a), Ok(n)) => (a.ino == n.ino).to_string(),
                    _ => "n/a".into(),
                };
                let nlinks = match (&after, &new) {
                    (Ok(a), Ok(n)) => format!("{}/{}", a.nlink, n.nlink),
                    _ => "n/a".into(),
                };
                Ok(Val::Checks(vec![
                    ("source_ino_kept", same_ino(before, after)),
                    ("new_link_same_ino", same),
                    ("nlink(source/new)", nlinks),
                ]))
            }
            Op::Chmod { p, mode } => {
                let cp = self.path(p);
                let before = stat_path(&cp, true);
                ok0(unsafe { libc::chmod(cp.as_ptr(), *mode) })?;
                Ok(Val::Checks(vec![(
                    "ino_kept",
                    same_ino(before, stat_path(&cp, true)),
                )]))
            }
            Op::Chown {
                p,
                uid,
                gid,
                nofollow,
            } => {
                let cp = self.path(p);
                let before = stat_path(&cp, !nofollow);
                ok0(unsafe {
                    if *nofollow {
                        libc::lchown(cp.as_ptr(), *uid, *gid)
                    } else {
                        libc::chown(cp.as_ptr(), *uid, *gid)
                    }
                })?;
                Ok(Val::Checks(vec![(
                    "ino_kept",
                    same_ino(before, stat_path(&cp, !nofollow)),
                )]))
            }
            Op::Utimes {
                p,
                atime,
                mtime,
                nofollow,
            } => {
                let cp = self.path(p);
                let before = stat_path(&cp, !nofollow);
                let ts = [atime.timespec(), mtime.timespec()];
                let fl = if *nofollow {
                    libc::AT_SYMLINK_NOFOLLOW
                } else {
                    0
                };
                ok0(unsafe { libc::utimensat(libc::AT_FDCWD, cp.as_ptr(), ts.as_ptr(), fl) })?;
                Ok(Val::Checks(vec![(
                    "ino_kept",
                    same_ino(before, stat_path(&cp, !nofollow)),
                )]))
            }
            Op::SetXattr {
                p,
                name,
                value,
                flags,
                follow,
            } => {
                let cp = self.path(p);
                let n = c(name);
                let before = stat_path(&cp, *follow);
                ok0(unsafe {
                    if *follow {
                        libc::setxattr(
                            cp.as_ptr(),
                            n.as_ptr(),
                            value.as_ptr().cast(),
                            value.len(),
                            *flags,
                        )
                    } else {
                        libc::lsetxattr(
                            cp.as_ptr(),
                            n.as_ptr(),
                            value.as_ptr().cast(),
                            value.len(),
                            *flags,
                        )
                    }
                })?;
                Ok(Val::Checks(vec![(
                    "ino_kept",
                    same_ino(before, stat_path(&cp, *follow)),
                )]))
            }
            Op::GetXattr { p, name, follow } => {
                xattr_get(&self.path(p), name, *follow).map(Val::Data)
            }
            Op::RemoveXattr { p, name, follow } => {
                let cp = self.path(p);
                let n = c(name);
                let before = stat_path(&cp, *follow);
                ok0(unsafe {
                    if *follow {
                        libc::removexattr(cp.as_ptr(), n.as_ptr())
                    } else {
                        libc::lremovexattr(cp.as_ptr(), n.as_ptr())
                    }
                })?;
                Ok(Val::Checks(vec![(
                    "ino_kept",
                    same_ino(before, stat_path(&cp, *follow)),
                )]))
            }
            Op::ListXattr { p, follow } => xattr_list(&self.path(p), *follow).map(Val::Names),
            Op::Mkfifo { p, mode } => {
                ok0(unsafe { libc::mkfifo(self.path(p).as_ptr(), *mode) }).map(|()| Val::Unit)
            }
            Op::Stat { p, follow } => {
                stat_path(&self.path(p), *follow).map(|s| Val::Stat(s.view()))
            }
            Op::Readdir { p } => {
                let dir = self.path(p);
                let mut entries: Vec<(String, char)> = list_dir(&dir)?
                    .into_iter()
                    .map(|(n, t)| (n, dtype_char(t)))
                    .collect();
                entries.sort();
                Ok(Val::Dir(entries))
            }
            Op::Access { p, mode } => {
                ok0(unsafe { libc::access(self.path(p).as_ptr(), *mode) }).map(|()| Val::Unit)
            }
            Op::HoldOpen { slot, p, mode } => {
                self.held[*slot] = None;
                let fl = match mode {
                    HoldMode::Rd => libc::O_RDONLY,
                    HoldMode::Rw => libc::O_RDWR,
                    HoldMode::Append => libc::O_WRONLY | libc::O_APPEND,
                };
                let fd = open_fd(&self.path(p), fl, 0)?;
                self.held[*slot] = Some(fd);
                Ok(Val::Unit)
            }
            Op::HoldRead { slot, off, len } => {
                let fd = self.fd(*slot)?;
                read_all(fd, Some(*off), *len).map(Val::Data)
            }
            Op::HoldWrite { slot, off, data } => {
                let fd = self.fd(*slot)?;
                let before = fstat_fd(fd);
                let n = write_all(fd, &data.bytes(), Some(*off))?;
                Ok(Val::Checks(vec![
                    ("written", n.to_string()),
                    ("ino_kept", same_ino(before, fstat_fd(fd))),
                ]))
            }
            Op::HoldFstat { slot } => {
                let fd = self.fd(*slot)?;
                fstat_fd(fd).map(|s| Val::Stat(s.view()))
            }
            Op::HoldClose { slot } => match self.held[*slot].take() {
                Some(fd) => ok0(unsafe { libc::close(fd.into_raw_fd()) }).map(|()| Val::Unit),
                None => Err(libc::EBADF),
            },
        }
    }

    /// One-line state of `rel` (for divergence context).
    fn describe(&self, rel: &str) -> String {
        match stat_path(&self.path(rel), false) {
            Ok(s) => {
                let mut d = s.view().to_string();
                if s.kind == 'l' {
                    if let Ok(t) = readlink_path(&self.path(rel)) {
                        let _ = write!(d, " -> {}", show_bytes(&t, 60));
                    }
                }
                d
            }
            Err(e) => errname(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Trees
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Ent {
    st: St,
    target: Option<String>,
    content: Option<Result<(u64, u64), i32>>,
    xattrs: Result<Vec<(String, Vec<u8>)>, i32>,
    list_err: Option<i32>,
}

type Tree = BTreeMap<String, Result<Ent, i32>>;

#[derive(Clone, Copy, PartialEq)]
enum Xf {
    /// `user.*` only (merged views).
    User,
    /// Everything (raw layers).
    All,
    /// Type and inode only (the generator's view of the oracle).
    None,
}

fn walk(root: &Path, xf: Xf) -> Tree {
    fn visit(abs: &Path, rel: &str, xf: Xf, out: &mut Tree) {
        let cp = cstr(abs);
        let st = match stat_path(&cp, false) {
            Ok(s) => s,
            Err(e) => {
                out.insert(rel.to_string(), Err(e));
                return;
            }
        };
        let full = xf != Xf::None;
        let mut ent = Ent {
            st,
            target: None,
            content: None,
            xattrs: Ok(Vec::new()),
            list_err: None,
        };
        if full {
            if st.kind == 'l' {
                ent.target = Some(match readlink_path(&cp) {
                    Ok(t) => String::from_utf8_lossy(&t).into_owned(),
                    Err(e) => format!("<readlink: {}>", errname(e)),
                });
            }
            if st.kind == 'f' {
                ent.content = Some(
                    open_fd(&cp, libc::O_RDONLY, 0)
                        .and_then(|fd| read_all(fd.as_raw_fd(), None, 64 << 20))
                        .map(|d| (d.len() as u64, fnv(&d))),
                );
            }
            ent.xattrs = xattr_list(&cp, false).and_then(|names| {
                names
                    .into_iter()
                    .filter(|n| xf == Xf::All || n.starts_with("user."))
                    .map(|n| xattr_get(&cp, &n, false).map(|v| (n, v)))
                    .collect()
            });
        }
        let is_dir = st.kind == 'd';
        if is_dir {
            match list_dir(&cp) {
                Ok(mut names) => {
                    names.sort();
                    out.insert(rel.to_string(), Ok(ent));
                    for (n, _) in names {
                        visit(&abs.join(&n), &join(rel, &n), xf, out);
                    }
                    return;
                }
                Err(e) => ent.list_err = Some(e),
            }
        }
        out.insert(rel.to_string(), Ok(ent));
    }
    let mut t = Tree::new();
    visit(root, "", xf, &mut t);
    t
}

fn known_of(t: &Tree) -> Vec<Known> {
    t.iter()
        .filter_map(|(p, e)| {
            e.as_ref().ok().map(|e| Known {
                path: p.clone(),
                kind: e.st.kind,
            })
        })
        .collect()
}

/// path -> sorted list of all paths sharing its inode (non-directories).
fn link_groups(t: &Tree) -> BTreeMap<String, Vec<String>> {
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (p, e) in t {
        if let Ok(e) = e {
            if e.st.kind != 'd' {
                by_ino.entry(e.st.ino).or_default().push(p.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    for paths in by_ino.values() {
        for p in paths {
            out.insert(p.clone(), paths.clone());
        }
    }
    out
}

fn show_xattrs(x: &Result<Vec<(String, Vec<u8>)>, i32>) -> String {
    match x {
        Ok(v) => {
            let parts: Vec<String> = v
                .iter()
                .map(|(n, val)| format!("{n}={}", show_bytes(val, 16)))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        Err(e) => errname(*e),
    }
}

/// Differences between the oracle's tree `a` and `b`: (path, field, a, b).
fn compare_trees(
    a: &Tree,
    b: &Tree,
    pinned: &HashSet<u64>,
) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    let ga = link_groups(a);
    let gb = link_groups(b);
    let paths: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for p in paths {
        let shown = if p.is_empty() {
            ".".to_string()
        } else {
            p.clone()
        };
        let (ea, eb) = match (a.get(p), b.get(p)) {
            (Some(x), Some(y)) => (x, y),
            (x, y) => {
                let d = |e: Option<&Result<Ent, i32>>| match e {
                    None => "absent".to_string(),
                    Some(Ok(e)) => format!("present: {}", e.st.view()),
                    Some(Err(er)) => format!("present (lstat {})", errname(*er)),
                };
                out.push((shown, "presence".into(), d(x), d(y)));
                continue;
            }
        };
        let (ea, eb) = match (ea, eb) {
            (Ok(x), Ok(y)) => (x, y),
            (x, y) => {
                let d = |e: &Result<Ent, i32>| match e {
                    Ok(e) => e.st.view().to_string(),
                    Err(er) => format!("lstat {}", errname(*er)),
                };
                if x.as_ref().err() != y.as_ref().err() {
                    out.push((shown, "lstat".into(), d(x), d(y)));
                }
                continue;
            }
        };
        let mut field = |f: &str, x: String, y: String| {
            if x != y {
                out.push((shown.clone(), f.to_string(), x, y));
            }
        };
        let (sa, sb) = (ea.st, eb.st);
        field("type", sa.kind.to_string(), sb.kind.to_string());
        field(
            "mode",
            format!("{:04o}", sa.mode),
            format!("{:04o}", sb.mode),
        );
        field(
            "owner",
            format!("{}:{}", sa.uid, sa.gid),
            format!("{}:{}", sb.uid, sb.gid),
        );
        if sa.kind != 'd' && sb.kind != 'd' {
            field("size", sa.size.to_string(), sb.size.to_string());
            field("nlink", sa.nlink.to_string(), sb.nlink.to_string());
            field(
                "hardlink group",
                format!("{:?}", ga.get(p)),
                format!("{:?}", gb.get(p)),
            );
        }
        if matches!(sa.kind, 'c' | 'b') {
            field("rdev", sa.rdev.to_string(), sb.rdev.to_string());
        }
        if pinned.contains(&sa.ino) {
            field(
                "mtime",
                format!("{}.{:09}", sa.mtime.0, sa.mtime.1),
                format!("{}.{:09}", sb.mtime.0, sb.mtime.1),
            );
        }
        field(
            "symlink target",
            format!("{:?}", ea.target),
            format!("{:?}", eb.target),
        );
        let content = |c: &Option<Result<(u64, u64), i32>>| match c {
            None => "-".to_string(),
            Some(Ok((l, h))) => format!("{l} bytes fnv={h:016x}"),
            Some(Err(e)) => format!("read error {}", errname(*e)),
        };
        field("content", content(&ea.content), content(&eb.content));
        field("xattrs", show_xattrs(&ea.xattrs), show_xattrs(&eb.xattrs));
        field(
            "readdir",
            format!("{:?}", ea.list_err.map(errname)),
            format!("{:?}", eb.list_err.map(errname)),
        );
    }
    out
}

/// Everything about a raw layer directory, for the before/after check.
fn fingerprint(root: &Path) -> BTreeMap<String, String> {
    walk(root, Xf::All)
        .into_iter()
        .map(|(p, e)| {
            let d = match e {
                Err(er) => format!("lstat {}", errname(er)),
                Ok(e) => format!(
                    "{} ino={} nlink={} mtime={}.{:09} target={:?} content={:?} xattrs={} err={:?}",
                    e.st.view(),
                    e.st.ino,
                    e.st.nlink,
                    e.st.mtime.0,
                    e.st.mtime.1,
                    e.target,
                    e.content,
                    show_xattrs(&e.xattrs),
                    e.list_err
                ),
            };
            (p, d)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Divergences and report
// ---------------------------------------------------------------------------------------------

struct Div {
    seed: u64,
    /// Operation index, or None for end-of-sequence checks.
    idx: Option<usize>,
    phase: String,
    kind: String,
    what: String,
    a: String,
    b: String,
    class: String,
    notes: Vec<String>,
    first_in_seq: bool,
    /// No state-changing divergence came before it in its sequence: both sides were in the
    /// same state, so it is not a consequence of an earlier divergence.
    clean: bool,
}

/// What a caller reports; `SeqCtx::div` adds the bookkeeping.
struct DivIn {
    idx: Option<usize>,
    phase: &'static str,
    kind: String,
    what: String,
    a: String,
    b: String,
    class: String,
    notes: Vec<String>,
    /// The two sides may be in different states after this (a mutating operation, a tree
    /// difference, a failed mount).
    changes_state: bool,
}

#[derive(Default)]
struct Report {
    divs: Vec<Div>,
    total: usize,
    clean: usize,
    sequences: usize,
    ops: usize,
    per_seq: Vec<String>,
}

const MAX_STORED: usize = 20_000;

impl Report {
    fn push(&mut self, d: Div) {
        self.total += 1;
        if d.clean {
            self.clean += 1;
        }
        if self.divs.len() < MAX_STORED || d.first_in_seq {
            self.divs.push(d);
        }
    }

    fn print(&self, cfg: &Cfg, labels: (&str, &str)) {
        let (la, lb) = labels;
        let repro = |seed: u64, idx: Option<usize>| {
            let ops = idx.map(|i| i + 1).unwrap_or(cfg.ops);
            format!(
                "STRATA_DIFF_SEED={seed} STRATA_DIFF_OPS={ops}{} cargo test -p strata-tests \
                 --test differential -- --nocapture",
                if cfg.selfcheck {
                    " STRATA_DIFF_SELFCHECK=1"
                } else {
                    ""
                }
            )
        };
        let show = |d: &Div| {
            let mut s = String::new();
            let at = at_of(d.idx, &d.phase);
            let _ = writeln!(
                s,
                "DIVERGENCE seed={} {at} [{}]: {}",
                d.seed, d.kind, d.what
            );
            let _ = writeln!(s, "    {la:>9}: {}", d.a);
            let _ = writeln!(s, "    {lb:>9}: {}", d.b);
            for n in &d.notes {
                let _ = writeln!(s, "    {n}");
            }
            let _ = writeln!(s, "    reproduce: {}", repro(d.seed, d.idx));
            s
        };
        if !self.divs.is_empty() {
            eprintln!("\n===== first divergence of each sequence =====");
            for d in self.divs.iter().filter(|d| d.first_in_seq) {
                eprint!("{}", show(d));
            }
            let clean: Vec<&Div> = self
                .divs
                .iter()
                .filter(|d| d.clean && !d.first_in_seq)
                .take(cfg.max_report)
                .collect();
            if !clean.is_empty() {
                eprintln!(
                    "\n===== {} more divergence(s) while both sides were still in the same state =====",
                    clean.len()
                );
                for d in &clean {
                    eprint!("{}", show(d));
                }
            }
            let rest: Vec<&Div> = self
                .divs
                .iter()
                .filter(|d| !d.clean && !d.first_in_seq)
                .take(cfg.max_report.saturating_sub(clean.len()))
                .collect();
            if !rest.is_empty() {
                eprintln!(
                    "\n===== {} of {} divergence(s) after the states had diverged (maybe consequences) =====",
                    rest.len(),
                    self.total - self.clean
                );
                for d in &rest {
                    eprint!("{}", show(d));
                }
            }
            let mut by: BTreeMap<(String, String), [usize; 3]> = BTreeMap::new();
            for d in &self.divs {
                let e = by.entry((d.kind.clone(), d.class.clone())).or_default();
                e[0] += 1;
                e[1] += usize::from(d.clean);
                e[2] += usize::from(d.first_in_seq);
            }
            eprintln!(
                "\n===== divergences by kind ({la} vs {lb}) =====\n  {:<20} {:>6} {:>6} {:>6}",
                "kind / outcome", "total", "clean", "first"
            );
            let mut kind_tot: BTreeMap<&str, [usize; 3]> = BTreeMap::new();
            for ((k, _), n) in &by {
                let t = kind_tot.entry(k).or_default();
                for i in 0..3 {
                    t[i] += n[i];
                }
            }
            for (k, t) in &kind_tot {
                eprintln!("  {k:<20} {:>6} {:>6} {:>6}", t[0], t[1], t[2]);
                for ((k2, cls), n) in &by {
                    if k2 == k {
                        eprintln!("      {:>6} {:>6} {:>6}  {cls}", n[0], n[1], n[2]);
                    }
                }
            }
            if self.divs.len() < self.total {
                eprintln!(
                    "  (grouping covers the first {} divergences)",
                    self.divs.len()
                );
            }
        }
        eprintln!("\n===== per sequence =====");
        for l in &self.per_seq {
            eprintln!("  {l}");
        }
    }
}

/// Where a divergence was found: "op #7", "tree check after op #19", "tree after remount".
fn at_of(idx: Option<usize>, phase: &str) -> String {
    match idx {
        Some(i) if phase == "op" => format!("op #{i}"),
        Some(i) => format!("{phase} after op #{i}"),
        None => phase.to_string(),
    }
}

/// Per-sequence divergence bookkeeping.
struct SeqCtx<'a> {
    seed: u64,
    report: &'a mut Report,
    count: usize,
    clean: usize,
    first: Option<String>,
    /// Where the states of the two sides first (possibly) diverged.
    diverged_at: Option<String>,
    /// The last agreeing operations before the first divergence.
    recent: Vec<String>,
    /// Where the previous divergence was found.
    last_at: Option<String>,
}

impl SeqCtx<'_> {
    fn div(&mut self, d: DivIn) {
        let first_in_seq = self.count == 0;
        let clean = self.diverged_at.is_none();
        let mut notes = d.notes;
        let at = at_of(d.idx, d.phase);
        if first_in_seq {
            self.first = Some(format!("{at} ({})", d.kind));
            if d.phase == "op" && !self.recent.is_empty() {
                notes.push("preceding operations (results agreed):".into());
                for r in &self.recent {
                    notes.push(format!("  {r}"));
                }
            }
        } else if self.last_at.as_deref() == Some(at.as_str()) && d.phase != "op" {
            notes.push("(another difference found by the same comparison)".into());
        } else if let Some(since) = &self.diverged_at {
            notes.push(format!(
                "(states already differ since {since}; {} earlier divergence(s) in this sequence)",
                self.count
            ));
        } else {
            notes.push(format!(
                "(no mutating operation diverged before this; the {} earlier divergence(s) were \
                 on non-mutating operations)",
                self.count
            ));
        }
        if d.changes_state && self.diverged_at.is_none() {
            self.diverged_at = Some(format!("{at} ({})", d.kind));
        }
        self.last_at = Some(at);
        self.count += 1;
        self.clean += usize::from(clean);
        self.report.push(Div {
            seed: self.seed,
            idx: d.idx,
            phase: d.phase.to_string(),
            kind: d.kind,
            what: d.what,
            a: d.a,
            b: d.b,
            class: d.class,
            notes,
            first_in_seq,
            clean,
        });
    }

    /// A one-off failure of the harness's own steps (mount, unmount, lower layers).
    fn fail(&mut self, phase: &'static str, kind: &str, what: String, a: String, b: String) {
        self.div(DivIn {
            idx: None,
            phase,
            kind: kind.to_string(),
            class: format!("{kind} failed"),
            what,
            a,
            b,
            notes: Vec::new(),
            changes_state: true,
        });
    }

    /// Reports every difference between the trees; `first_notes` go with the first one.
    /// Returns whether there was any.
    fn tree_diffs(
        &mut self,
        idx: Option<usize>,
        phase: &'static str,
        a: &Tree,
        b: &Tree,
        pinned: &HashSet<u64>,
        mut first_notes: Vec<String>,
    ) -> bool {
        let diffs = compare_trees(a, b, pinned);
        let any = !diffs.is_empty();
        for (p, f, x, y) in diffs {
            self.div(DivIn {
                idx,
                phase,
                kind: format!("tree:{f}"),
                what: format!("{}: {f} of {}", at_of(idx, phase), q(&p)),
                a: x,
                b: y,
                class: "differs".into(),
                notes: std::mem::take(&mut first_notes),
                // Set below, so that all differences of one comparison count alike.
                changes_state: false,
            });
        }
        if any && self.diverged_at.is_none() {
            self.diverged_at = Some(format!("{} (tree)", at_of(idx, phase)));
        }
        any
    }
}

// ---------------------------------------------------------------------------------------------
// mtime pinning (decided on the oracle only)
// ---------------------------------------------------------------------------------------------

/// Inodes (of the oracle) whose mtime an operation may change.
fn touched_inos(side: &Side, op: &Op, clear_all: &mut bool) -> Vec<u64> {
    let mut v = Vec::new();
    let mut add = |p: &str, follow: bool| {
        if let Ok(s) = stat_path(&side.path(p), follow) {
            v.push(s.ino);
        }
    };
    match op {
        Op::Create { p, .. }
        | Op::WriteTrunc { p, .. }
        | Op::Append { p, .. }
        | Op::Pwrite { p, .. }
        | Op::Truncate { p, .. } => {
            if stat_path(&side.path(p), false).is_ok_and(|s| s.kind == 'l') {
                // May create the target anywhere: give up on every pin.
                *clear_all = true;
            }
            add(p, true);
            add(p, false);
            add(parent_of(p), true);
        }
        Op::Mkdir { p, .. }
        | Op::Mkfifo { p, .. }
        | Op::Symlink { p, .. }
        | Op::Unlink { p }
        | Op::Rmdir { p } => {
            add(p, false);
            add(parent_of(p), true);
        }
        Op::Link { to, .. } => add(parent_of(to), true),
        Op::Rename { from, to, .. } => {
            add(parent_of(from), true);
            add(parent_of(to), true);
        }
        Op::Utimes {
            p, mtime, nofollow, ..
        } if *mtime == Ts::Now => add(p, !nofollow),
        Op::HoldWrite { slot, .. } => {
            if let Some(fd) = &side.held[*slot] {
                if let Ok(s) = fstat_fd(fd.as_raw_fd()) {
                    v.push(s.ino);
                }
            }
        }
        _ => {}
    }
    v
}

// ---------------------------------------------------------------------------------------------
// One sequence
// ---------------------------------------------------------------------------------------------

fn run_sequence(seed: u64, cfg: &Cfg, scratch: &Scratch, bin: Option<&Path>, report: &mut Report) {
    let dir = scratch.base.join(format!("seed-{seed}"));
    let mut ctx = SeqCtx {
        seed,
        report,
        count: 0,
        clean: 0,
        first: None,
        diverged_at: None,
        recent: Vec::new(),
        last_at: None,
    };
    let label_b = if bin.is_some() {
        "stratafs"
    } else {
        "kernel#2"
    };
    let mut a = Side::new("kernel", dir.join("kernel"), None);
    let mut b = Side::new(label_b, dir.join(label_b), bin.map(Path::to_path_buf));
    for s in [&a, &b] {
        build_stack(&s.dir, cfg.lower_links);
    }
    let lower_before: Vec<[BTreeMap<String, String>; 2]> = [&a, &b]
        .iter()
        .map(|s| {
            let [l1, l2] = s.lowers();
            [fingerprint(&l1), fingerprint(&l2)]
        })
        .collect();

    let wd = Watchdog::new(cfg.op_timeout, dir.clone());
    a.mount().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    let mut executed = 0;
    // Oracle inodes whose mtime is deterministic (see run_ops).
    let mut pinned = HashSet::new();
    // The watchdog had to kill the daemon: no tree or persistence checks.
    let mut hung = false;
    match b.mount() {
        Err(e) => ctx.fail(
            "mount",
            "mount",
            format!("mount {}", b.label),
            "mounted".into(),
            e,
        ),
        Ok(()) => {
            wd.set_target(b.daemon_target());
            (executed, pinned, hung) = run_ops(seed, cfg, &mut a, &mut b, &wd, &mut ctx);
        }
    }

    // Persistence: unmount both, remount, compare again.
    for s in [&mut a, &mut b] {
        if let Err(e) = s.unmount() {
            ctx.fail(
                "unmount",
                "unmount",
                format!("umount {}", s.label),
                "-".into(),
                e,
            );
        }
    }
    wd.set_target(None);
    if !hung && (executed > 0 || cfg.ops == 0) {
        let ra = a.mount();
        let rb = b.mount();
        match (ra, rb) {
            (Ok(()), Ok(())) => {
                wd.set_target(b.daemon_target());
                let ta = walk(&a.mnt(), Xf::User);
                wd.arm();
                let tb = walk(&b.mnt(), Xf::User);
                wd.disarm();
                ctx.tree_diffs(None, "tree after remount", &ta, &tb, &pinned, Vec::new());
            }
            (ra, rb) => ctx.fail(
                "remount",
                "remount",
                "remount both sides".into(),
                format!("{ra:?}"),
                format!("{rb:?}"),
            ),
        }
        for s in [&mut a, &mut b] {
            if let Err(e) = s.unmount() {
                ctx.fail(
                    "unmount after remount",
                    "unmount",
                    format!("umount {}", s.label),
                    "-".into(),
                    e,
                );
            }
        }
    }
    wd.set_target(None);
    drop(wd);

    // Lower layers must be untouched.
    for (i, s) in [&a, &b].iter().enumerate() {
        let [l1, l2] = s.lowers();
        for (j, (now, before)) in [fingerprint(&l1), fingerprint(&l2)]
            .iter()
            .zip(lower_before[i].iter())
            .enumerate()
        {
            if now == before {
                continue;
            }
            let keys: BTreeSet<&String> = now.keys().chain(before.keys()).collect();
            let changed: Vec<String> = keys
                .into_iter()
                .filter(|k| now.get(*k) != before.get(*k))
                .take(10)
                .map(|k| format!("{k:?}: before {:?} / after {:?}", before.get(k), now.get(k)))
                .collect();
            ctx.div(DivIn {
                idx: None,
                phase: "lower layers",
                kind: "lower-modified".into(),
                what: format!("{} lower layer l{} changed", s.label, j + 1),
                a: "unchanged".into(),
                b: "changed".into(),
                class: format!("{} modified its lower layer", s.label),
                notes: changed,
                changes_state: true,
            });
        }
    }
    let count = ctx.count;
    let mut line = format!(
        "seed {seed}: {executed} ops, {count} divergences ({} clean)",
        ctx.clean
    );
    if let Some(f) = &ctx.first {
        let _ = write!(line, ", first at {f}");
    }
    if let Some(d) = &ctx.diverged_at {
        let _ = write!(line, ", states differ from {d}");
    }
    ctx.report.per_seq.push(line);
    ctx.report.sequences += 1;
    ctx.report.ops += executed;
    drop(a);
    drop(b);
    if count == 0 {
        scratch.remove(&dir);
    }
}

fn run_ops(
    seed: u64,
    cfg: &Cfg,
    a: &mut Side,
    b: &mut Side,
    wd: &Watchdog,
    ctx: &mut SeqCtx<'_>,
) -> (usize, HashSet<u64>, bool) {
    let mut rng = Rng::new(seed);
    let ta = walk(&a.mnt(), Xf::User);
    wd.arm();
    let tb = walk(&b.mnt(), Xf::User);
    wd.disarm();
    // Everything in the initial tree has a fixed mtime.
    let mut pinned: HashSet<u64> = ta
        .values()
        .filter_map(|e| e.as_ref().ok().map(|e| e.st.ino))
        .collect();
    if wd.fired() {
        ctx.fail(
            "tree before operations",
            "walk",
            format!("walking the initial tree of {}", b.label),
            "ok".into(),
            format!("hung for more than {:?} (daemon killed)", cfg.op_timeout),
        );
        return (0, pinned, true);
    }
    ctx.tree_diffs(
        None,
        "tree before operations",
        &ta,
        &tb,
        &pinned,
        Vec::new(),
    );
    let mut known = known_of(&ta);
    let mut slot_origin: Vec<Option<(usize, String, String)>> = vec![None; HELD_SLOTS];
    // Mutating operations since the last agreeing tree check, and that check.
    let mut log: Vec<String> = Vec::new();
    let mut last_tree_ok: Option<usize> = None;
    let mut done = 0;
    for idx in 0..cfg.ops {
        let op = gen_op(&mut rng, &known, &cfg.kinds);
        let mut clear_all = false;
        let mut unpin = touched_inos(a, &op, &mut clear_all);
        let ra_raw = a.exec(&op);
        // Armed for everything that touches the tested side (the divergence report also
        // stats its paths).
        wd.arm();
        let rb_raw = b.exec(&op);
        done += 1;
        if wd.fired() {
            ctx.div(DivIn {
                idx: Some(idx),
                phase: "op",
                kind: op.kind().to_string(),
                what: op.to_string(),
                a: show_res(&ra_raw),
                b: format!(
                    "no answer within {:?}: daemon killed, mount detached (the call then returned {})",
                    cfg.op_timeout,
                    show_res(&rb_raw)
                ),
                class: format!("{} hung (watchdog)", b.label),
                notes: vec!["sequence stopped here; STRATA_DIFF_OP_TIMEOUT=SECS changes the limit".into()],
                changes_state: true,
            });
            return (done, pinned, true);
        }
        unpin.extend(touched_inos(a, &op, &mut clear_all));
        if clear_all {
            pinned.clear();
        }
        for i in unpin {
            pinned.remove(&i);
        }
        if let (
            Op::Utimes {
                p,
                mtime: Ts::Set(..),
                nofollow,
                ..
            },
            Ok(_),
        ) = (&op, &ra_raw)
        {
            if let Ok(s) = stat_path(&a.path(p), !nofollow) {
                pinned.insert(s.ino);
            }
        }
        // mtime is compared only when the oracle's object is pinned; inode numbers never.
        let keep_mtime = matches!(&ra_raw, Ok(Val::Stat(s)) if pinned.contains(&s.ino));
        let finish = |r: Res| -> Res {
            r.map(|v| match v {
                Val::Stat(mut s) => {
                    if !keep_mtime {
                        s.mtime = None;
                    }
                    s.ino = 0;
                    Val::Stat(s)
                }
                v => v,
            })
        };
        let (ra, rb) = (finish(ra_raw), finish(rb_raw));
        if cfg.trace {
            let mark = if ra == rb { "  " } else { "!!" };
            eprintln!(
                "{mark} seed={seed} #{idx} {op}\n       {}: {}\n       {}: {}",
                a.label,
                show_res(&ra),
                b.label,
                show_res(&rb)
            );
        }
        if ra != rb {
            let mut notes = Vec::new();
            if let Some(h) = diff_hint(&ra, &rb) {
                notes.push(h);
            }
            for p in op.paths() {
                notes.push(format!(
                    "after: {} is {} on {}, {} on {}",
                    q(p),
                    a.describe(p),
                    a.label,
                    b.describe(p),
                    b.label
                ));
            }
            let class = match (&ra, &rb) {
                (Ok(_), Ok(_)) => "both ok, values differ".to_string(),
                _ => format!("{}: {} / {}: {}", a.label, class(&ra), b.label, class(&rb)),
            };
            if let Some(slot) = op.slot() {
                match &slot_origin[slot] {
                    Some((i, p, m)) => notes.push(format!(
                        "fd[{slot}] was opened at op #{i}: open({}, {m})",
                        q(p)
                    )),
                    None => notes.push(format!("fd[{slot}] has not been opened (or was closed)")),
                }
            }
            ctx.div(DivIn {
                idx: Some(idx),
                phase: "op",
                kind: op.kind().to_string(),
                what: op.to_string(),
                a: show_res(&ra),
                b: show_res(&rb),
                class,
                notes,
                changes_state: op.changes_state(),
            });
        } else if ctx.count == 0 {
            ctx.recent.push(format!("#{idx} {op} => {}", show_res(&ra)));
            if ctx.recent.len() > 8 {
                ctx.recent.remove(0);
            }
        }
        match &op {
            Op::HoldOpen { slot, p, mode } => {
                slot_origin[*slot] = Some((idx, p.clone(), mode.name().to_string()))
            }
            Op::HoldClose { slot } => slot_origin[*slot] = None,
            _ => {}
        }
        wd.disarm();
        if wd.fired() {
            ctx.fail(
                "op",
                "hung",
                format!("reporting op #{idx} ({op})"),
                "ok".into(),
                format!(
                    "a stat of the tested side hung for more than {:?} (daemon killed)",
                    cfg.op_timeout
                ),
            );
            return (done, pinned, true);
        }
        if op.mutates() {
            known = known_of(&walk(&a.mnt(), Xf::None));
            log.push(format!("#{idx} {op} => {}", show_res(&ra)));
        }
        // Periodic full comparison while nothing has diverged yet.
        if cfg.tree_every > 0 && (idx + 1) % cfg.tree_every == 0 && ctx.diverged_at.is_none() {
            let ta = walk(&a.mnt(), Xf::User);
            wd.arm();
            let tb = walk(&b.mnt(), Xf::User);
            wd.disarm();
            if wd.fired() {
                ctx.fail(
                    "tree check",
                    "walk",
                    format!("walking the tree of {} after op #{idx}", b.label),
                    "ok".into(),
                    format!("hung for more than {:?} (daemon killed)", cfg.op_timeout),
                );
                return (done, pinned, true);
            }
            let since = match last_tree_ok {
                Some(i) => format!("the tree check after op #{i}"),
                None => "the initial tree check".to_string(),
            };
            let mut notes = vec![format!(
                "{since} agreed; the mutating operations since then (results agreed on both sides):"
            )];
            let skip = log.len().saturating_sub(40);
            notes.extend(log.iter().skip(skip).map(|l| format!("  {l}")));
            if ctx.tree_diffs(Some(idx), "tree check", &ta, &tb, &pinned, notes) {
                // States differ from here on: no more periodic checks.
            } else {
                last_tree_ok = Some(idx);
                log.clear();
            }
        }
    }
    let ta = walk(&a.mnt(), Xf::User);
    wd.arm();
    let tb = walk(&b.mnt(), Xf::User);
    wd.disarm();
    if wd.fired() {
        ctx.fail(
            "tree after operations",
            "walk",
            format!("walking the final tree of {}", b.label),
            "ok".into(),
            format!("hung for more than {:?} (daemon killed)", cfg.op_timeout),
        );
        return (done, pinned, true);
    }
    ctx.tree_diffs(None, "tree after operations", &ta, &tb, &pinned, Vec::new());
    (done, pinned, false)
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[test]
fn differential() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("differential: skipped (needs root for kernel overlayfs and FUSE mounts)");
        return;
    }
    let cfg = Cfg::from_env();
    unsafe { libc::umask(0o022) };
    let bin = if cfg.selfcheck {
        None
    } else {
        Some(strata_tests::stratafs_bin())
    };
    let started = Instant::now();
    let scratch = Scratch::new(cfg.keep);
    let mut report = Report::default();
    for &seed in &cfg.seeds {
        run_sequence(seed, &cfg, &scratch, bin.as_deref(), &mut report);
    }
    let labels = (
        "kernel",
        if cfg.selfcheck {
            "kernel#2"
        } else {
            "stratafs"
        },
    );
    report.print(&cfg, labels);
    let mode = if cfg.selfcheck {
        " (selfcheck: kernel overlayfs on both sides)"
    } else {
        ""
    };
    let executed = if report.ops == report.sequences * cfg.ops {
        String::new()
    } else {
        format!(" ({} executed)", report.ops)
    };
    let summary = format!(
        "differential: {} sequences x {} ops, {} divergences{mode}{executed} in {:.1}s",
        report.sequences,
        cfg.ops,
        report.total,
        started.elapsed().as_secs_f64()
    );
    eprintln!("{summary}");
    assert_eq!(report.total, 0, "{summary}");
}
