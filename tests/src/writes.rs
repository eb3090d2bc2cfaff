//! Helpers for the write-path tests: a *twin* (the same layer stack copied twice, one copy
//! mounted by kernel overlayfs with `redirect_dir=on,index=on`, the other by stratafs, each
//! with its own upper and work directory), comparison of operation results and merged trees,
//! the shape of an upper layer, and thin wrappers for syscalls std does not offer.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt::Debug;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd::run;
use crate::fsops::{errno_name, lgetxattr, Kind};
use crate::layer::Layer;
use crate::mount::{kernel_overlay, MountGuard, Strata};
use crate::scratch::Scratch;
use crate::snapshot::{assert_no_markers, assert_snapshots_eq, snapshot, snapshot_raw, Snapshot};

/// Options of the reference kernel mount.
pub const KERNEL_OPTS: &[&str] = &["redirect_dir=on", "index=on"];

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `renameat2(AT_FDCWD, from, AT_FDCWD, to, flags)`.
pub fn rename2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
}

/// `mknod(path, S_IFIFO | mode, 0)`.
pub fn mkfifo(path: &Path, mode: u32) -> io::Result<()> {
    let p = cpath(path);
    check(unsafe { libc::mknod(p.as_ptr(), libc::S_IFIFO | mode, 0) })
}

/// `utimensat(AT_FDCWD, path, [atime, mtime], 0)`; pass `libc::UTIME_NOW` / `UTIME_OMIT` in
/// `tv_nsec` for the special values.
pub fn utimens(path: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let p = cpath(path);
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), 0) })
}

/// `truncate(path, len)`.
pub fn truncate(path: &Path, len: i64) -> io::Result<()> {
    let p = cpath(path);
    check(unsafe { libc::truncate(p.as_ptr(), len) })
}

/// `lchown(path, uid, gid)`.
pub fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

/// `link(old, new)`.
pub fn link(old: &Path, new: &Path) -> io::Result<()> {
    fs::hard_link(old, new)
}

/// `open(path, flags, 0644)` returning the descriptor.
pub fn open_fd(path: &Path, flags: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let p = cpath(path);
    let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, 0o644 as libc::c_uint) };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }
}

/// Appends `data` to `p` through an `O_APPEND` descriptor, returning the count written.
pub fn append(p: &Path, data: &[u8]) -> io::Result<usize> {
    let fd = open_fd(p, libc::O_WRONLY | libc::O_APPEND)?;
    pwrite(&fd, data, 0)
}

/// `pread(fd, len, off)`, returning the bytes read.
pub fn pread(fd: &impl std::os::fd::AsRawFd, len: usize, off: i64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let r = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            len,
            off,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// `pwrite(fd, data, off)`, returning the count written.
pub fn pwrite(fd: &impl std::os::fd::AsRawFd, data: &[u8], off: i64) -> io::Result<usize> {
    let r = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            data.as_ptr() as *const libc::c_void,
            data.len(),
            off,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// `lseek(fd, off, whence)`.
pub fn lseek(fd: &impl std::os::fd::AsRawFd, off: i64, whence: i32) -> io::Result<i64> {
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `fallocate(fd, mode, off, len)`.
pub fn fallocate(fd: &impl std::os::fd::AsRawFd, mode: i32, off: i64, len: i64) -> io::Result<()> {
    check(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off, len) })
}

/// `fstat(fd)`.
pub fn fstat(fd: &impl std::os::fd::AsRawFd) -> io::Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// `copy_file_range(in, &in_off, out, &out_off, len, 0)`, returning the count copied.
pub fn copy_file_range(
    src: &impl std::os::fd::AsRawFd,
    src_off: i64,
    dst: &impl std::os::fd::AsRawFd,
    dst_off: i64,
    len: usize,
) -> io::Result<usize> {
    let (mut a, mut b) = (src_off, dst_off);
    let r =
        unsafe { libc::copy_file_range(src.as_raw_fd(), &mut a, dst.as_raw_fd(), &mut b, len, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// An io result reduced to something comparable: the value or the errno.
pub fn outcome<T>(r: io::Result<T>) -> Result<T, i32> {
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

fn render_outcome<T: Debug>(r: &Result<T, i32>) -> String {
    match r {
        Ok(v) => format!("Ok({v:?})"),
        Err(e) => format!("Err({})", errno_name(*e)),
    }
}

/// Panics unless the kernel's and stratafs's results of the same operation agree.
pub fn assert_same<T: Debug + PartialEq>(
    what: &str,
    kernel: io::Result<T>,
    strata: io::Result<T>,
) -> Result<T, i32> {
    let (k, s) = (outcome(kernel), outcome(strata));
    assert!(
        k == s,
        "{what}: kernel overlayfs gives {}, stratafs gives {}",
        render_outcome(&k),
        render_outcome(&s)
    );
    s
}

/// Collects kernel-vs-stratafs disagreements of several independent operations, so that one
/// failure does not hide the others.
#[derive(Debug, Default)]
pub struct Divergences(Vec<String>);

impl Divergences {
    /// Records a disagreement between `kernel` and `strata`.
    pub fn check<T: Debug + PartialEq>(
        &mut self,
        what: &str,
        kernel: io::Result<T>,
        strata: io::Result<T>,
    ) {
        let (k, s) = (outcome(kernel), outcome(strata));
        if k != s {
            self.0.push(format!(
                "{what}: kernel overlayfs gives {}, stratafs gives {}",
                render_outcome(&k),
                render_outcome(&s)
            ));
        }
    }

    /// Panics listing every recorded disagreement.
    pub fn assert_none(&self) {
        assert!(
            self.0.is_empty(),
            "{} divergence(s) from kernel overlayfs:\n  {}",
            self.0.len(),
            self.0.join("\n  ")
        );
    }
}

/// One side of a twin: its lower layers (top first), upper, work and mount point.
#[derive(Debug, Clone)]
pub struct Stack {
    /// Lower layers, leftmost highest.
    pub lowers: Vec<PathBuf>,
    /// Upper directory.
    pub upper: PathBuf,
    /// Work directory.
    pub work: PathBuf,
    /// Mount point.
    pub mnt: PathBuf,
}

impl Stack {
    fn new(root: &Path, nlayers: usize) -> Stack {
        let s = Stack {
            lowers: (1..=nlayers).map(|i| root.join(format!("l{i}"))).collect(),
            upper: root.join("upper"),
            work: root.join("work"),
            mnt: root.join("mnt"),
        };
        for d in [&s.upper, &s.work, &s.mnt] {
            fs::create_dir_all(d).unwrap();
        }
        s
    }

    /// Raw snapshots (every xattr, mtimes) of the lower layers.
    pub fn lower_snaps(&self) -> Vec<Snapshot> {
        self.lowers.iter().map(|l| snapshot_raw(l)).collect()
    }
}

/// The shape of an upper layer: relative path → type, plus device numbers for character
/// devices (whiteouts), plus `opaque` for opaque directories whose name some lower layer
/// has (where opaqueness changes what shows through).
/// Kernel bookkeeping (`origin`, `impure`, `redirect` values) is left out.
pub fn upper_shape(root: &Path, lowers: &[PathBuf]) -> BTreeMap<String, String> {
    fn walk(abs: &Path, rel: &str, lowers: &[PathBuf], out: &mut BTreeMap<String, String>) {
        let mut names: Vec<_> = fs::read_dir(abs)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", abs.display()))
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let p = abs.join(&n);
            let r = if rel.is_empty() {
                n.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", n.to_string_lossy())
            };
            let md = fs::symlink_metadata(&p).unwrap();
            let kind = Kind::from_mode(md.mode());
            let mut desc = format!("{kind:?}");
            if kind == Kind::CharDev {
                let d = md.rdev();
                desc.push_str(&format!(" {}:{}", libc::major(d), libc::minor(d)));
            }
            // Opaqueness only matters where a lower layer has the name (the kernel also marks
            // new directories in merged parents opaque, which changes nothing visible).
            let in_lower = lowers
                .iter()
                .any(|l| fs::symlink_metadata(l.join(&r)).is_ok());
            if kind == Kind::Dir && in_lower {
                for ns in ["trusted", "user"] {
                    if let Ok(v) = lgetxattr(&p, &format!("{ns}.overlay.opaque")) {
                        if v == b"y" {
                            desc.push_str(" opaque");
                        }
                    }
                }
            }
            out.insert(r.clone(), desc);
            if kind == Kind::Dir {
                walk(&p, &r, lowers, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", lowers, &mut out);
    out
}

/// Whether `path` is a whiteout in an upper layer: a char 0:0 device, or `.wh.NAME` next to
/// it.
pub fn is_whiteout(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(md) = fs::symlink_metadata(path) {
        if md.file_type().is_char_device() && md.rdev() == 0 {
            return true;
        }
    }
    let name = path.file_name().expect("name");
    let mut wh = std::ffi::OsString::from(".wh.");
    wh.push(name);
    fs::symlink_metadata(path.with_file_name(wh)).is_ok()
}

/// Hashes (FNV-1a) the first `len` bytes of a file; `None` when it cannot be read.
pub fn hash_prefix(path: &Path, len: u64) -> Option<u64> {
    use std::io::Read;
    let f = fs::File::open(path).ok()?;
    let mut data = Vec::new();
    f.take(len).read_to_end(&mut data).ok()?;
    Some(crate::snapshot::fnv1a(&data))
}

/// A layer stack copied twice: `scratch/k/` mounted by kernel overlayfs (`redirect_dir=on,
/// index=on`), `scratch/s/` by stratafs. Dropping it unmounts both.
pub struct Twin {
    /// The kernel overlayfs side.
    pub kernel: Stack,
    /// The stratafs side.
    pub strata: Stack,
    lower_before: Vec<Snapshot>,
    markers_ok: bool,
    kg: Option<MountGuard>,
    sg: Option<MountGuard>,
}

fn cp_a(from: &Path, to: &Path) {
    run(Command::new("cp").arg("-a").arg(from).arg(to)).expect_success();
}

impl Twin {
    /// Builds `nlayers` lower layers with `fill` (top first) under `scratch/seed`, copies
    /// them (`cp -a`) for both sides, and mounts both.
    pub fn new(sc: &Scratch, nlayers: usize, fill: impl FnOnce(&[Layer])) -> Twin {
        let seed = sc.mkdir("seed");
        let layers: Vec<Layer> = (1..=nlayers)
            .map(|i| Layer::new(seed.join(format!("l{i}"))))
            .collect();
        fill(&layers);
        let kernel = Stack::new(&sc.join("k"), nlayers);
        let strata = Stack::new(&sc.join("s"), nlayers);
        for side in [&kernel, &strata] {
            for (l, dst) in layers.iter().zip(&side.lowers) {
                cp_a(l.root(), dst);
            }
        }
        let lower_before = strata.lower_snaps();
        assert_snapshots_eq(
            "kernel lowers",
            &merge_snaps(&kernel.lower_snaps()),
            "stratafs lowers",
            &merge_snaps(&lower_before),
        );
        let mut t = Twin {
            kernel,
            strata,
            lower_before,
            markers_ok: false,
            kg: None,
            sg: None,
        };
        t.mount();
        t
    }

    /// Mounts whatever side is not mounted.
    pub fn mount(&mut self) {
        if self.kg.is_none() {
            let k = &self.kernel;
            self.kg = Some(kernel_overlay(
                &k.mnt,
                &k.lowers,
                Some((&k.upper, &k.work)),
                KERNEL_OPTS,
            ));
        }
        if self.sg.is_none() {
            self.sg = Some(self.strata_mount());
        }
    }

    /// A stratafs mount description for the stratafs side.
    pub fn strata_desc(&self) -> Strata {
        let s = &self.strata;
        Strata::new(&s.lowers).upper(&s.upper, &s.work)
    }

    fn strata_mount(&self) -> MountGuard {
        self.strata_desc().mount(&self.strata.mnt)
    }

    /// Unmounts both sides (panics when an unmount goes wrong).
    pub fn unmount(&mut self) {
        for g in [self.sg.take(), self.kg.take()].into_iter().flatten() {
            let mut g = g;
            if let Err(e) = g.unmount() {
                panic!("unmounting {}: {e}", g.path().display());
            }
        }
    }

    /// Unmounts and mounts both sides again over the same layers.
    pub fn remount(&mut self) {
        self.unmount();
        self.mount();
    }

    /// Unmounts and mounts only the stratafs side again.
    pub fn remount_strata(&mut self) {
        if let Some(mut g) = self.sg.take() {
            if let Err(e) = g.unmount() {
                panic!("unmounting stratafs: {e}");
            }
        }
        self.sg = Some(self.strata_mount());
    }

    /// The stratafs mount's guard (daemon pid etc.).
    pub fn strata_guard(&self) -> &MountGuard {
        self.sg.as_ref().expect("stratafs mounted")
    }

    /// `kernel mount/rel`.
    pub fn k(&self, rel: impl AsRef<Path>) -> PathBuf {
        join_rel(&self.kernel.mnt, rel.as_ref())
    }

    /// `stratafs mount/rel`.
    pub fn s(&self, rel: impl AsRef<Path>) -> PathBuf {
        join_rel(&self.strata.mnt, rel.as_ref())
    }

    /// `kernel upper/rel`.
    pub fn ku(&self, rel: impl AsRef<Path>) -> PathBuf {
        join_rel(&self.kernel.upper, rel.as_ref())
    }

    /// `stratafs upper/rel`.
    pub fn su(&self, rel: impl AsRef<Path>) -> PathBuf {
        join_rel(&self.strata.upper, rel.as_ref())
    }

    /// Runs `op` on the kernel mount and then on the stratafs mount (with the mount point as
    /// argument) and asserts both give the same value or errno; returns stratafs's.
    pub fn both<T: Debug + PartialEq>(
        &self,
        what: &str,
        op: impl Fn(&Path) -> io::Result<T>,
    ) -> Result<T, i32> {
        let k = op(&self.kernel.mnt);
        let s = op(&self.strata.mnt);
        assert_same(what, k, s)
    }

    /// Like [`both`](Self::both), for operations whose outcome (often an error) is all that
    /// matters.
    pub fn same<T: Debug + PartialEq>(&self, what: &str, op: impl Fn(&Path) -> io::Result<T>) {
        let _ = self.both(what, op);
    }

    /// Like [`both`](Self::both), and asserts that the operation succeeded.
    pub fn both_ok<T: Debug + PartialEq>(
        &self,
        what: &str,
        op: impl Fn(&Path) -> io::Result<T>,
    ) -> T {
        match self.both(what, op) {
            Ok(v) => v,
            Err(e) => panic!("{what}: failed on both mounts with {}", errno_name(e)),
        }
    }

    /// Snapshots both merged trees and asserts they are equal and show no overlay markers.
    pub fn compare(&self, when: &str) -> Snapshot {
        let k = snapshot(&self.kernel.mnt);
        let s = snapshot(&self.strata.mnt);
        assert_snapshots_eq(
            &format!("kernel overlayfs ({when})"),
            &k,
            &format!("stratafs ({when})"),
            &s,
        );
        if !self.markers_ok {
            assert_no_markers(&s);
        }
        s
    }

    /// Stops [`compare`](Self::compare) from rejecting overlay xattrs in the merged view
    /// (for tests that set escaped `trusted.overlay.*` xattrs through the mount).
    pub fn allow_markers(&mut self) {
        self.markers_ok = true;
    }

    /// Asserts both upper layers have the same shape ([`upper_shape`]).
    pub fn compare_uppers(&self, when: &str) {
        let k = upper_shape(&self.kernel.upper, &self.kernel.lowers);
        let s = upper_shape(&self.strata.upper, &self.strata.lowers);
        if k != s {
            let mut d = Vec::new();
            for key in k
                .keys()
                .chain(s.keys())
                .collect::<std::collections::BTreeSet<_>>()
            {
                match (k.get(key), s.get(key)) {
                    (a, b) if a == b => {}
                    (a, b) => d.push(format!("{key}: kernel {a:?}, stratafs {b:?}")),
                }
            }
            panic!("upper layers differ ({when}):\n  {}", d.join("\n  "));
        }
    }

    /// Asserts the stratafs side's lower layers are exactly as before (contents, metadata,
    /// xattrs, mtimes).
    pub fn assert_lowers_unchanged(&self) {
        let after = self.strata.lower_snaps();
        for (i, (b, a)) in self.lower_before.iter().zip(&after).enumerate() {
            assert_snapshots_eq(
                &format!("lower l{} before", i + 1),
                b,
                &format!("lower l{} after", i + 1),
                a,
            );
        }
    }

    /// The usual end of a test: compare the merged trees, remount stratafs over the same
    /// upper and compare again, unmount both cleanly, check the lower layers.
    pub fn finish(mut self) {
        self.compare("after the operation");
        self.remount();
        self.compare("after remounting both");
        self.unmount();
        self.assert_lowers_unchanged();
    }
}

fn join_rel(base: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() || rel == Path::new(".") {
        base.to_path_buf()
    } else {
        base.join(rel)
    }
}

fn merge_snaps(v: &[Snapshot]) -> Snapshot {
    let mut out = Snapshot::new();
    for (i, s) in v.iter().enumerate() {
        for (k, e) in s {
            out.insert(format!("l{}/{k}", i + 1), e.clone());
        }
    }
    out
}
