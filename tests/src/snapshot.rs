//! Tree snapshots (walked with `lstat`, never following symlinks) and readable diffs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::fsops::{lgetxattr, llistxattr, Kind};

/// What a snapshot records about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// File type.
    pub kind: Kind,
    /// Permission bits (`st_mode & 07777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// `st_nlink`.
    pub nlink: u64,
    /// Size, for regular files and symlinks.
    pub size: Option<u64>,
    /// Content hash (FNV-1a 64), for regular files.
    pub hash: Option<String>,
    /// Symlink target.
    pub target: Option<String>,
    /// Device numbers, for device nodes.
    pub rdev: Option<(u32, u32)>,
    /// Recorded xattrs, sorted by name, values rendered printable.
    pub xattrs: Vec<(String, String)>,
    /// For non-directories: the first path (in walk order) with the same `st_ino`.
    pub link_group: Option<String>,
    /// Modification time (seconds), only in raw snapshots.
    pub mtime: Option<i64>,
}

/// A tree: relative path (`.` for the root) → entry.
pub type Snapshot = BTreeMap<String, Entry>;

/// What to record and check while walking.
#[derive(Debug, Clone, Copy)]
pub struct SnapOpts {
    /// Record every xattr (raw layers), not only `user.*` and leaked `trusted.overlay.*`.
    pub all_xattrs: bool,
    /// Panic unless every listed name `lstat`s fine, with the type readdir reported, and no
    /// name is listed twice.
    pub check_agreement: bool,
    /// Record modification times.
    pub mtime: bool,
}

/// FNV-1a 64-bit hash.
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn render_value(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => format!("{s:?}"),
        _ => format!(
            "0x{}",
            v.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

fn kind_of(ft: &fs::FileType) -> Kind {
    if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_char_device() {
        Kind::CharDev
    } else if ft.is_block_device() {
        Kind::BlockDev
    } else if ft.is_socket() {
        Kind::Socket
    } else {
        Kind::Unknown
    }
}

struct Walker {
    opts: SnapOpts,
    snap: Snapshot,
    inodes: HashMap<u64, String>,
    problems: Vec<String>,
}

impl Walker {
    fn record(&mut self, abs: &Path, rel: &str, md: &fs::Metadata) {
        let kind = Kind::from_mode(md.mode());
        let mut e = Entry {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            nlink: md.nlink(),
            size: None,
            hash: None,
            target: None,
            rdev: None,
            xattrs: Vec::new(),
            link_group: None,
            mtime: self.opts.mtime.then(|| md.mtime()),
        };
        match kind {
            Kind::File => {
                e.size = Some(md.len());
                match fs::read(abs) {
                    Ok(data) => {
                        if data.len() as u64 != md.len() {
                            self.problems.push(format!(
                                "{rel}: st_size {} but read returned {} bytes",
                                md.len(),
                                data.len()
                            ));
                        }
                        e.hash = Some(format!("{:016x}", fnv1a(&data)));
                    }
                    Err(err) => self.problems.push(format!("{rel}: read failed: {err}")),
                }
            }
            Kind::Symlink => {
                e.size = Some(md.len());
                match fs::read_link(abs) {
                    Ok(t) => e.target = Some(t.to_string_lossy().into_owned()),
                    Err(err) => self.problems.push(format!("{rel}: readlink failed: {err}")),
                }
            }
            Kind::CharDev | Kind::BlockDev => {
                let r = md.rdev();
                e.rdev = Some((libc::major(r), libc::minor(r)));
            }
            _ => {}
        }
        if kind != Kind::Dir {
            let first = self
                .inodes
                .entry(md.ino())
                .or_insert_with(|| rel.to_string())
                .clone();
            e.link_group = Some(first);
        }
        match llistxattr(abs) {
            Ok(names) => {
                let mut xs = Vec::new();
                for n in names {
                    let keep = self.opts.all_xattrs
                        || n.starts_with("user.")
                        || n.starts_with("trusted.overlay.");
                    if !keep {
                        continue;
                    }
                    let v = match lgetxattr(abs, &n) {
                        Ok(v) => render_value(&v),
                        Err(err) => format!("<getxattr error: {err}>"),
                    };
                    xs.push((n, v));
                }
                xs.sort();
                e.xattrs = xs;
            }
            Err(err) if err.raw_os_error() == Some(libc::ENOTSUP) => {}
            Err(err) => self
                .problems
                .push(format!("{rel}: listxattr failed: {err}")),
        }
        self.snap.insert(rel.to_string(), e);
    }

    fn walk(&mut self, abs: &Path, rel: &str) {
        let rd = match fs::read_dir(abs) {
            Ok(rd) => rd,
            Err(err) => {
                self.problems.push(format!("{rel}: readdir failed: {err}"));
                return;
            }
        };
        let mut listed: Vec<(String, Option<Kind>)> = Vec::new();
        for ent in rd {
            match ent {
                Ok(ent) => {
                    let name = ent.file_name().to_string_lossy().into_owned();
                    // DirEntry::file_type uses d_type (lstat only when DT_UNKNOWN).
                    let k = ent.file_type().ok().map(|t| kind_of(&t));
                    listed.push((name, k));
                }
                Err(err) => {
                    self.problems
                        .push(format!("{rel}: readdir entry failed: {err}"));
                    break;
                }
            }
        }
        listed.sort();
        let mut seen = BTreeSet::new();
        for (name, dkind) in listed {
            if !seen.insert(name.clone()) {
                self.problems
                    .push(format!("{rel}: name {name:?} listed more than once"));
                continue;
            }
            let child_abs = abs.join(&name);
            let child_rel = if rel == "." {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let md = match fs::symlink_metadata(&child_abs) {
                Ok(md) => md,
                Err(err) => {
                    self.problems.push(format!(
                        "{child_rel}: listed by readdir but lstat fails: {err}"
                    ));
                    continue;
                }
            };
            let lkind = Kind::from_mode(md.mode());
            if let Some(dk) = dkind {
                if dk != lkind {
                    self.problems.push(format!(
                        "{child_rel}: readdir says {dk:?}, lstat says {lkind:?}"
                    ));
                }
            }
            self.record(&child_abs, &child_rel, &md);
            if lkind == Kind::Dir {
                self.walk(&child_abs, &child_rel);
            }
        }
    }
}

/// Snapshots the tree at `root` with explicit options. With `check_agreement`, panics listing
/// every lookup/readdir disagreement found.
pub fn snapshot_with(root: &Path, opts: SnapOpts) -> Snapshot {
    let mut w = Walker {
        opts,
        snap: Snapshot::new(),
        inodes: HashMap::new(),
        problems: Vec::new(),
    };
    let md = fs::symlink_metadata(root).unwrap_or_else(|e| panic!("lstat {}: {e}", root.display()));
    w.record(root, ".", &md);
    if md.is_dir() {
        w.walk(root, ".");
    }
    if opts.check_agreement && !w.problems.is_empty() {
        panic!(
            "walking {} found {} problem(s):\n  {}",
            root.display(),
            w.problems.len(),
            w.problems.join("\n  ")
        );
    }
    w.snap
}

/// Snapshot of a mounted view: `user.*` xattrs (and any leaked `trusted.overlay.*`), with the
/// lookup/readdir agreement check.
pub fn snapshot(root: &Path) -> Snapshot {
    snapshot_with(
        root,
        SnapOpts {
            all_xattrs: false,
            check_agreement: true,
            mtime: false,
        },
    )
}

/// Snapshot of a raw layer directory: every xattr and mtimes (to prove it was not modified).
pub fn snapshot_raw(root: &Path) -> Snapshot {
    snapshot_with(
        root,
        SnapOpts {
            all_xattrs: true,
            check_agreement: true,
            mtime: true,
        },
    )
}

fn field_diffs(a: &Entry, b: &Entry) -> Vec<String> {
    let mut d = Vec::new();
    macro_rules! cmp {
        ($f:ident) => {
            if a.$f != b.$f {
                d.push(format!("{}: {:?} != {:?}", stringify!($f), a.$f, b.$f));
            }
        };
    }
    cmp!(kind);
    if a.mode != b.mode {
        d.push(format!("mode: {:o} != {:o}", a.mode, b.mode));
    }
    cmp!(uid);
    cmp!(gid);
    cmp!(nlink);
    cmp!(size);
    cmp!(hash);
    cmp!(target);
    cmp!(rdev);
    cmp!(xattrs);
    cmp!(link_group);
    cmp!(mtime);
    d
}

/// Human-readable differences between two snapshots (empty when equal).
pub fn diff_snapshots(a: &Snapshot, b: &Snapshot) -> Vec<String> {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut out = Vec::new();
    for k in keys {
        match (a.get(k), b.get(k)) {
            (Some(x), None) => out.push(format!("only in left:  {k} ({:?})", x.kind)),
            (None, Some(y)) => out.push(format!("only in right: {k} ({:?})", y.kind)),
            (Some(x), Some(y)) => {
                for f in field_diffs(x, y) {
                    out.push(format!("differs:       {k}: {f}"));
                }
            }
            (None, None) => unreachable!(),
        }
    }
    out
}

/// Renders a snapshot, one line per entry, for failure messages.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    for (k, e) in s {
        let _ = writeln!(
            out,
            "{k}: {:?} {:o} {}:{} n{}{}{}{}",
            e.kind,
            e.mode,
            e.uid,
            e.gid,
            e.nlink,
            e.target
                .as_ref()
                .map(|t| format!(" -> {t}"))
                .unwrap_or_default(),
            e.size.map(|s| format!(" size {s}")).unwrap_or_default(),
            if e.xattrs.is_empty() {
                String::new()
            } else {
                format!(" {:?}", e.xattrs)
            }
        );
    }
    out
}

/// Panics with a readable diff unless the snapshots are equal.
pub fn assert_snapshots_eq(left: &str, a: &Snapshot, right: &str, b: &Snapshot) {
    let d = diff_snapshots(a, b);
    if !d.is_empty() {
        let shown: Vec<&String> = d.iter().take(200).collect();
        panic!(
            "snapshots differ (left = {left}, right = {right}), {} difference(s):\n  {}\n{}",
            d.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  "),
            if d.len() > 200 { "  ...\n" } else { "" }
        );
    }
}

/// Panics if the snapshot shows any overlay marker: a `.wh.`-prefixed name or a
/// `trusted.overlay.*` / `user.overlay.*` xattr.
pub fn assert_no_markers(s: &Snapshot) {
    let mut bad = Vec::new();
    for (k, e) in s {
        let name = k.rsplit('/').next().unwrap();
        if name.starts_with(".wh.") {
            bad.push(format!("{k}: whiteout/opaque marker name visible"));
        }
        if e.kind == Kind::CharDev && e.rdev == Some((0, 0)) {
            bad.push(format!("{k}: char 0:0 whiteout visible"));
        }
        for (n, _) in &e.xattrs {
            if n.starts_with("trusted.overlay.") || n.starts_with("user.overlay.") {
                bad.push(format!("{k}: overlay xattr {n} visible"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "overlay markers leak through the mount:\n  {}",
        bad.join("\n  ")
    );
}
