//! The layer stack every implementation mounts: built once, cached under the scratch
//! directory (keyed by [`StackSpec::key`]), and never modified afterwards.
//!
//! Layout of the merged view (`L2` over `L1`):
//! - `usr/...`: a copy of part of the host's `/usr` (`/usr/share`, then `/usr/lib`), in L1;
//!   L2 overrides some files, whites out others (char 0:0 devices), whites out one whole
//!   directory, makes one directory opaque (`trusted.overlay.opaque=y`, plus
//!   `user.overlay.opaque=y` for unprivileged readers) and adds `usr/l2-only/`.
//! - `bigdir/`: many empty files in L1; L2 adds new names, overrides some and whites out
//!   some, so the listing is a real merge.
//! - `bigfile`: one large file of pseudo-random bytes (not sparse) in L1.
//!
//! Outside the layers the stack directory holds `untar.tar` (files from the host's
//! `/usr/lib`) for the untar workload, and `manifest.json`, written last.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::sys::{self, Fnv};

/// Bumped whenever the stack's construction changes, so that cached stacks are rebuilt.
const STACK_VERSION: u32 = 1;

/// Regular files larger than this are not copied from `/usr`.
const MAX_COPY_FILE: u64 = 2 << 20;

/// Size parameters of a stack and of the workloads that depend on it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StackSpec {
    /// Quick or full.
    pub quick: bool,
    /// Entries (files, directories, symlinks) copied from `/usr` into L1.
    pub usr_entries: usize,
    /// Files in L1's `bigdir/`.
    pub bigdir_entries: usize,
    /// New names L2 adds to `bigdir/`.
    pub bigdir_new: usize,
    /// `bigdir/` names L2 overrides (and, as many again, whites out).
    pub bigdir_changed: usize,
    /// Size of `bigfile` in bytes.
    pub bigfile_bytes: u64,
    /// Approximate size of `untar.tar` in bytes.
    pub untar_bytes: u64,
    /// Files the create workload makes.
    pub create_files: usize,
    /// Lower files the small copy-up workload appends to.
    pub copyup_files: usize,
}

impl StackSpec {
    /// The full-size stack of the issue: tens of thousands of files, a 100k-entry merged
    /// directory, a 1 GiB file.
    pub fn full() -> Self {
        StackSpec {
            quick: false,
            usr_entries: 60_000,
            bigdir_entries: 100_000,
            bigdir_new: 3_000,
            bigdir_changed: 500,
            bigfile_bytes: 1 << 30,
            untar_bytes: 100 << 20,
            create_files: 20_000,
            copyup_files: 2_000,
        }
    }

    /// The quick-mode stack (everything smaller, same shape).
    pub fn quick() -> Self {
        StackSpec {
            quick: true,
            usr_entries: 15_000,
            bigdir_entries: 20_000,
            bigdir_new: 1_000,
            bigdir_changed: 200,
            bigfile_bytes: 256 << 20,
            untar_bytes: 25 << 20,
            create_files: 5_000,
            copyup_files: 500,
        }
    }

    /// Cache key: construction version plus every size.
    pub fn key(&self) -> String {
        format!(
            "v{STACK_VERSION}-{}-u{}-d{}-n{}-c{}-f{}-t{}",
            if self.quick { "quick" } else { "full" },
            self.usr_entries,
            self.bigdir_entries,
            self.bigdir_new,
            self.bigdir_changed,
            self.bigfile_bytes >> 20,
            self.untar_bytes >> 20,
        )
    }
}

/// What was built, and the paths the workloads use (relative to the merged root unless
/// said otherwise). Written as `manifest.json` once the stack is complete.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// The spec the stack was built from.
    pub spec: StackSpec,
    /// The lower layer (absolute).
    pub l1: PathBuf,
    /// The second layer, above `l1` (absolute).
    pub l2: PathBuf,
    /// Tarball for the untar workload (absolute).
    pub tarball: PathBuf,
    /// Its size in bytes.
    pub tarball_bytes: u64,
    /// Entries under `usr/` in L1.
    pub usr_entries: usize,
    /// Bytes of regular files under `usr/` in L1.
    pub usr_bytes: u64,
    /// L1 files L2 overrides.
    pub overridden: usize,
    /// L1 files L2 whites out.
    pub whited_out: usize,
    /// L1 directory L2 whites out as a whole.
    pub whiteout_dir: String,
    /// L1 directory L2 makes opaque.
    pub opaque_dir: String,
    /// Entries the merged `bigdir/` lists.
    pub bigdir_merged: usize,
    /// The big file.
    pub bigfile: String,
    /// Subtree the tar workload archives.
    pub tar_subtree: String,
    /// Entries in it (L1).
    pub tar_subtree_entries: usize,
    /// Lower subtree the rm workload deletes.
    pub rm_subtree: String,
    /// Entries in it (L1).
    pub rm_subtree_entries: usize,
    /// Lower files the small copy-up workload appends to.
    pub copyup_files: Vec<String>,
    /// Fingerprint of both layers (every entry's path, mode, size, inode, mtime, ctime).
    pub fingerprint: String,
    /// Seconds it took to build.
    pub build_secs: f64,
}

/// Returns the stack for `spec` under `scratch`, building it unless a complete, unchanged
/// one is cached there.
pub fn ensure(scratch: &Path, spec: &StackSpec) -> Result<Manifest> {
    let dir = scratch.join(format!("stack-{}", spec.key()));
    let manifest_path = dir.join("manifest.json");
    if let Ok(text) = fs::read_to_string(&manifest_path) {
        match serde_json::from_str::<Manifest>(&text) {
            Ok(m) if m.spec == *spec => {
                eprintln!("stack: checking cached {}", dir.display());
                let fp = fingerprint(&m.l1, &m.l2)?;
                if fp == m.fingerprint {
                    return Ok(m);
                }
                eprintln!("stack: cached layers changed since they were built; rebuilding");
            }
            _ => eprintln!("stack: unreadable manifest; rebuilding"),
        }
    }
    sys::remove_tree(&dir)?;
    let start = Instant::now();
    eprintln!(
        "stack: building {} (once; later runs reuse it)",
        dir.display()
    );
    let mut m = build(&dir, spec)?;
    m.build_secs = start.elapsed().as_secs_f64();
    let text = serde_json::to_string_pretty(&m)?;
    fs::write(&manifest_path, text)
        .with_context(|| format!("write {}", manifest_path.display()))?;
    eprintln!("stack: built in {:.1}s", m.build_secs);
    Ok(m)
}

/// One entry of L1's `usr/` tree.
struct Entry {
    rel: String,
    is_dir: bool,
    is_file: bool,
    size: u64,
    /// Entries below a directory (itself excluded).
    subtree: usize,
    depth: usize,
}

fn build(dir: &Path, spec: &StackSpec) -> Result<Manifest> {
    let l1 = dir.join("l1");
    let l2 = dir.join("l2");
    for d in [dir, &l1, &l2] {
        mkdir(d)?;
    }
    // L1: /usr/share then /usr/lib.
    let mut budget = spec.usr_entries;
    mkdir(&l1.join("usr"))?;
    for src in ["share", "lib"] {
        if budget == 0 {
            break;
        }
        copy_tree(
            &Path::new("/usr").join(src),
            &l1.join("usr").join(src),
            &mut budget,
        )?;
    }
    let entries = list_tree(&l1.join("usr"), "usr")?;
    let usr_bytes = entries.iter().filter(|e| e.is_file).map(|e| e.size).sum();

    // Directories for the whole-dir whiteout, the opaque dir, tar and rm.
    let total = entries.len();
    let pick_dir = |lo: usize, hi: usize, target: usize, avoid: &[&str]| -> Option<String> {
        entries
            .iter()
            .filter(|e| e.is_dir && e.depth >= 3 && e.subtree >= lo && e.subtree <= hi)
            .filter(|e| {
                avoid
                    .iter()
                    .all(|a| !is_under(&e.rel, a) && !is_under(a, &e.rel))
            })
            .min_by_key(|e| e.subtree.abs_diff(target))
            .map(|e| e.rel.clone())
    };
    let whiteout_dir = pick_dir(20, 400, 60, &[]).context("no directory to white out")?;
    let opaque_dir = pick_dir(20, 400, 80, &[&whiteout_dir]).context("no dir to make opaque")?;
    let tar_subtree = pick_dir(1, total, total / 5, &[&whiteout_dir, &opaque_dir])
        .context("no subtree to tar")?;
    let rm_subtree = pick_dir(
        1,
        total,
        total / 20,
        &[&whiteout_dir, &opaque_dir, &tar_subtree],
    )
    .context("no subtree to remove")?;
    let count_of = |rel: &str| {
        entries
            .iter()
            .find(|e| e.rel == rel)
            .map(|e| e.subtree)
            .unwrap_or(0)
    };

    // L2 over usr/: overrides and whiteouts of single files.
    let special = [whiteout_dir.as_str(), opaque_dir.as_str()];
    let files: Vec<&Entry> = entries.iter().filter(|e| e.is_file).collect();
    let mut changed = BTreeSet::new();
    let (mut overridden, mut whited_out) = (0, 0);
    for (i, e) in files.iter().enumerate() {
        if special.iter().any(|s| is_under(&e.rel, s)) {
            continue;
        }
        let target = l2.join(&e.rel);
        if i % 97 == 13 {
            mkdir_p(target.parent().expect("has parent"))?;
            let line = format!("L2 override of {}\n", e.rel);
            fs::write(&target, line.repeat(i % 50 + 1))?;
            set_mode(&target, 0o644)?;
            overridden += 1;
            changed.insert(e.rel.clone());
        } else if i % 89 == 7 {
            mkdir_p(target.parent().expect("has parent"))?;
            whiteout(&target)?;
            whited_out += 1;
            changed.insert(e.rel.clone());
        }
    }
    let wd = l2.join(&whiteout_dir);
    mkdir_p(wd.parent().expect("has parent"))?;
    whiteout(&wd)?;
    let od = l2.join(&opaque_dir);
    mkdir_p(&od)?;
    for (name, value) in [
        ("trusted.overlay.opaque", "y"),
        ("user.overlay.opaque", "y"),
    ] {
        setxattr(&od, name, value)?;
    }
    for i in 0..3 {
        fs::write(od.join(format!("l2-file-{i}")), format!("opaque {i}\n"))?;
    }
    mkdir_p(&l2.join("usr/l2-only"))?;
    for i in 0..200 {
        fs::write(
            l2.join(format!("usr/l2-only/file-{i:03}")),
            format!("{i}\n").repeat(i + 1),
        )?;
    }

    // bigdir/: L1 names, L2 additions, overrides and whiteouts.
    let b1 = l1.join("bigdir");
    let b2 = l2.join("bigdir");
    mkdir(&b1)?;
    mkdir(&b2)?;
    for i in 0..spec.bigdir_entries {
        File::create(b1.join(format!("e{i:06}")))?;
    }
    for i in 0..spec.bigdir_new {
        File::create(b2.join(format!("n{i:06}")))?;
    }
    let step = (spec.bigdir_entries / (2 * spec.bigdir_changed).max(1)).max(1);
    let mut bd_whiteouts = 0;
    for k in 0..2 * spec.bigdir_changed {
        let i = k * step;
        if i >= spec.bigdir_entries {
            break;
        }
        let p = b2.join(format!("e{i:06}"));
        if k % 2 == 0 {
            fs::write(&p, b"x")?;
        } else {
            whiteout(&p)?;
            bd_whiteouts += 1;
        }
    }
    let bigdir_merged = spec.bigdir_entries + spec.bigdir_new - bd_whiteouts;

    // bigfile: pseudo-random bytes, written out (not sparse).
    write_random(&l1.join("bigfile"), spec.bigfile_bytes)?;

    // Small copy-up targets: small L1-only files outside the special and rm/tar dirs,
    // spread evenly.
    let candidates: Vec<&&Entry> = files
        .iter()
        .filter(|e| e.size <= 64 << 10 && !changed.contains(&e.rel))
        .filter(|e| {
            [
                whiteout_dir.as_str(),
                opaque_dir.as_str(),
                rm_subtree.as_str(),
            ]
            .iter()
            .all(|s| !is_under(&e.rel, s))
        })
        .collect();
    if candidates.len() < spec.copyup_files {
        bail!(
            "only {} small lower files for {} copy-ups; raise usr_entries",
            candidates.len(),
            spec.copyup_files
        );
    }
    let copyup_files: Vec<String> = (0..spec.copyup_files)
        .map(|k| {
            candidates[k * candidates.len() / spec.copyup_files]
                .rel
                .clone()
        })
        .collect();

    let tarball = dir.join("untar.tar");
    make_tarball(&tarball, &dir.join("untar.list"), spec.untar_bytes)?;
    let tarball_bytes = fs::metadata(&tarball)?.len();
    // Everything must be readable by an unprivileged user (the rootless column).
    for p in [dir, &l1, &l2] {
        set_mode(p, 0o755)?;
    }
    set_mode(&tarball, 0o644)?;

    let fingerprint = fingerprint(&l1, &l2)?;
    Ok(Manifest {
        spec: spec.clone(),
        l1,
        l2,
        tarball,
        tarball_bytes,
        usr_entries: total,
        usr_bytes,
        overridden,
        whited_out,
        tar_subtree_entries: count_of(&tar_subtree),
        rm_subtree_entries: count_of(&rm_subtree),
        whiteout_dir,
        opaque_dir,
        bigdir_merged,
        bigfile: "bigfile".into(),
        tar_subtree,
        rm_subtree,
        copyup_files,
        fingerprint,
        build_secs: 0.0,
    })
}

/// `rel` equals `dir` or lies below it.
fn is_under(rel: &str, dir: &str) -> bool {
    rel == dir || (rel.starts_with(dir) && rel.as_bytes().get(dir.len()) == Some(&b'/'))
}

fn mkdir(p: &Path) -> Result<()> {
    match fs::create_dir(p) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(e).with_context(|| format!("mkdir {}", p.display()))
        }
        _ => set_mode(p, 0o755),
    }
}

fn mkdir_p(p: &Path) -> Result<()> {
    if p.is_dir() {
        return Ok(());
    }
    if let Some(parent) = p.parent() {
        mkdir_p(parent)?;
    }
    mkdir(p)
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", p.display()))
}

/// A kernel-format whiteout: character device 0:0.
fn whiteout(p: &Path) -> Result<()> {
    let c = CString::new(p.as_os_str().as_bytes())?;
    // SAFETY: c is a valid NUL-terminated path.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mknod whiteout {}", p.display()));
    }
    Ok(())
}

fn setxattr(p: &Path, name: &str, value: &str) -> Result<()> {
    let c = CString::new(p.as_os_str().as_bytes())?;
    let n = CString::new(name)?;
    // SAFETY: valid C strings and a buffer of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setxattr {name} on {}", p.display()));
    }
    Ok(())
}

/// Copies `src` to `dst` depth first in name order, at most `budget` entries (the budget is
/// decreased). Regular files larger than [`MAX_COPY_FILE`], special files and unreadable
/// entries are skipped. Modes are normalised (0755 directories, 0644 or 0755 files) so
/// that an unprivileged user can read everything.
fn copy_tree(src: &Path, dst: &Path, budget: &mut usize) -> Result<()> {
    mkdir(dst)?;
    let Ok(rd) = fs::read_dir(src) else {
        return Ok(());
    };
    let mut names: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
    names.sort();
    for name in names {
        if *budget == 0 {
            return Ok(());
        }
        let (s, d) = (src.join(&name), dst.join(&name));
        let Ok(m) = fs::symlink_metadata(&s) else {
            continue;
        };
        let ft = m.file_type();
        if ft.is_dir() {
            *budget -= 1;
            copy_tree(&s, &d, budget)?;
        } else if ft.is_symlink() {
            if let Ok(t) = fs::read_link(&s) {
                std::os::unix::fs::symlink(&t, &d)
                    .with_context(|| format!("symlink {}", d.display()))?;
                *budget -= 1;
            }
        } else if ft.is_file() && m.len() <= MAX_COPY_FILE && fs::copy(&s, &d).is_ok() {
            let mode = if m.mode() & 0o111 != 0 { 0o755 } else { 0o644 };
            set_mode(&d, mode)?;
            *budget -= 1;
        }
    }
    Ok(())
}

/// Every entry below `root` (named `prefix/...`), with subtree sizes for directories.
fn list_tree(root: &Path, prefix: &str) -> Result<Vec<Entry>> {
    fn rec(dir: &Path, rel: &str, depth: usize, out: &mut Vec<Entry>) -> Result<usize> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .with_context(|| format!("read {}", dir.display()))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        let mut count = 0;
        for n in names {
            let p = dir.join(&n);
            let r = format!("{rel}/{}", n.to_string_lossy());
            let m = fs::symlink_metadata(&p)?;
            let idx = out.len();
            out.push(Entry {
                rel: r.clone(),
                is_dir: m.is_dir(),
                is_file: m.is_file(),
                size: m.len(),
                subtree: 0,
                depth: depth + 1,
            });
            count += 1;
            if m.is_dir() {
                let sub = rec(&p, &r, depth + 1, out)?;
                out[idx].subtree = sub;
                count += sub;
            }
        }
        Ok(count)
    }
    let mut out = Vec::new();
    rec(root, prefix, 1, &mut out)?;
    Ok(out)
}

/// Writes `bytes` of xorshift output to `path` in 1 MiB blocks.
fn write_random(path: &Path, bytes: u64) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    set_mode(path, 0o644)
}

/// A tarball of about `bytes` of the host's `/usr/lib` (directories and files, in name
/// order), made with GNU tar.
fn make_tarball(tarball: &Path, list: &Path, bytes: u64) -> Result<()> {
    fn rec(dir: &Path, rel: &str, left: &mut i64, out: &mut Vec<String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        let mut names: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
        names.sort();
        for n in names {
            if *left <= 0 {
                return;
            }
            let p = dir.join(&n);
            let r = format!("{rel}/{}", n.to_string_lossy());
            if r.contains('\n') {
                continue;
            }
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                out.push(r.clone());
                rec(&p, &r, left, out);
            } else if (m.is_file() && m.len() <= 8 << 20 && File::open(&p).is_ok())
                || m.file_type().is_symlink()
            {
                *left -= m.len() as i64 + 512;
                out.push(r);
            }
        }
    }
    let mut names = Vec::new();
    let mut left = bytes as i64;
    rec(Path::new("/usr/lib"), "lib", &mut left, &mut names);
    fs::write(list, names.join("\n") + "\n")?;
    sys::run_ok(
        Command::new("tar")
            .arg("-cf")
            .arg(tarball)
            .arg("-C")
            .arg("/usr")
            .arg("--no-recursion")
            .arg("-T")
            .arg(list),
        Duration::from_secs(600),
    )?;
    Ok(())
}

/// Fingerprint of both layers: every entry's relative path, mode, size, inode number, mtime
/// and ctime. Any change to a lower layer changes it.
pub fn fingerprint(l1: &Path, l2: &Path) -> Result<String> {
    fn rec(dir: &Path, rel: &str, h: &mut Fnv) -> Result<()> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .with_context(|| format!("read {}", dir.display()))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for n in names {
            let p = dir.join(&n);
            let m = fs::symlink_metadata(&p)?;
            let r = format!("{rel}/{}", n.to_string_lossy());
            h.write(
                format!(
                    "{r}\0{:o}\0{}\0{}\0{}.{}\0{}.{}\n",
                    m.mode(),
                    m.len(),
                    m.ino(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec()
                )
                .as_bytes(),
            );
            if m.is_dir() {
                rec(&p, &r, h)?;
            }
        }
        Ok(())
    }
    let mut h = Fnv::default();
    for (root, name) in [(l1, "l1"), (l2, "l2")] {
        let m = fs::symlink_metadata(root)?;
        h.write(format!("{name}\0{:o}\0{}.{}\n", m.mode(), m.ctime(), m.ctime_nsec()).as_bytes());
        rec(root, name, &mut h)?;
    }
    Ok(h.hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under() {
        assert!(is_under("usr/a/b", "usr/a"));
        assert!(is_under("usr/a", "usr/a"));
        assert!(!is_under("usr/ab", "usr/a"));
    }

    #[test]
    fn keys_differ() {
        assert_ne!(StackSpec::quick().key(), StackSpec::full().key());
    }
}
