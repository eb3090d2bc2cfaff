//! The measured operations. Each [`Task`] runs in a worker process (`strata-bench
//! __worker SPEC`), as root or, for the rootless column, as the unprivileged user, and
//! reports an [`Outcome`] as JSON on stdout. Only the operation itself is timed, never the
//! process start.

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::sys::Fnv;

/// One measured operation, with everything it needs (absolute paths).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op")]
pub enum Task {
    /// Depth-first walk with an lstat of every entry, digest of the sorted tree.
    Walk {
        /// Root of the walk.
        root: PathBuf,
        /// Where to write the sorted listing (after timing), for diffs.
        list_out: Option<PathBuf>,
    },
    /// The same walk by `threads` threads sharing a queue of directories.
    ParallelWalk {
        /// Root of the walk.
        root: PathBuf,
        /// Walker threads.
        threads: usize,
    },
    /// `count` stat calls of one file that bypass the kernel's attribute cache.
    StatSync {
        /// The file (stat once untimed first, so its lookup is not counted).
        file: PathBuf,
        /// Calls.
        count: usize,
    },
    /// Reading one directory's names (getdents only).
    Readdir {
        /// The directory.
        dir: PathBuf,
    },
    /// Reading one directory and lstat of every entry.
    ReaddirStat {
        /// The directory.
        dir: PathBuf,
    },
    /// Reading a file from start to end in 1 MiB reads.
    SeqRead {
        /// The file.
        file: PathBuf,
    },
    /// fio: 4 KiB random reads (psync) of a file for a fixed time.
    RandRead {
        /// The file.
        file: PathBuf,
        /// fio jobs.
        jobs: usize,
        /// Seconds to run.
        runtime: u64,
    },
    /// Creating `files` new files of `size` bytes, 1000 to a directory.
    Create {
        /// The new directory to create them in.
        dir: PathBuf,
        /// Number of files.
        files: usize,
        /// Bytes per file.
        size: usize,
    },
    /// Appending one byte to each of the given lower files (data copy-up).
    CopyUpSmall {
        /// Merged root.
        root: PathBuf,
        /// Paths relative to `root`.
        files: Vec<String>,
    },
    /// Opening a large lower file for writing and writing one byte (full copy-up).
    CopyUpBig {
        /// The file.
        file: PathBuf,
    },
    /// Writing a new file of `bytes` in 1 MiB writes, then closing it (no fsync).
    SeqWrite {
        /// The new file.
        file: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// `tar -cf - SUBTREE` from `root`, output read and counted by the worker.
    Tar {
        /// Directory tar runs in.
        root: PathBuf,
        /// Subtree relative to `root`.
        subtree: String,
    },
    /// `tar -xf TARBALL` into a new directory.
    Untar {
        /// The archive (outside the mount).
        tarball: PathBuf,
        /// The new directory to extract into.
        dest: PathBuf,
    },
    /// `rm -rf` of a directory (std's `remove_dir_all`).
    Remove {
        /// The directory.
        path: PathBuf,
    },
    /// Untimed check: the sorted tree with symlink targets, contents of every
    /// `content_every`-th regular file, and four 1 MiB chunks of `bigfile`.
    Verify {
        /// Root of the tree.
        root: PathBuf,
        /// Hash the content of about one regular file in n (chosen by a hash of the
        /// path); 0 = none.
        content_every: usize,
        /// Big file (relative to `root`) whose chunks are hashed, if any.
        bigfile: Option<String>,
        /// Where to write the listing.
        list_out: Option<PathBuf>,
    },
}

/// What a task measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// Wall time of the operation in seconds.
    pub secs: f64,
    /// Entries seen or made.
    pub count: u64,
    /// Bytes read or written.
    pub bytes: u64,
    /// Digest of what was seen, for the same-data check.
    pub digest: Option<String>,
    /// Throughput in MB/s (10^6 bytes per second), for data tasks.
    pub mbps: Option<f64>,
    /// I/O operations per second (fio).
    pub iops: Option<f64>,
}

/// Runs `task` and returns what it measured.
pub fn run(task: &Task) -> Result<Outcome> {
    // Created files get the same modes everywhere.
    // SAFETY: umask(2) has no preconditions.
    unsafe { libc::umask(0o022) };
    match task {
        Task::Walk { root, list_out } => {
            let start = Instant::now();
            let mut w = TreeDigest::new(false, 0, list_out.is_some());
            w.walk(root, "")?;
            let secs = start.elapsed().as_secs_f64();
            if let Some(p) = list_out {
                w.write_list(p)?;
            }
            Ok(Outcome {
                secs,
                count: w.count,
                digest: Some(w.hash.hex()),
                ..Default::default()
            })
        }
        Task::ParallelWalk { root, threads } => parallel_walk(root, *threads),
        Task::StatSync { file, count } => stat_sync(file, *count),
        Task::Readdir { dir } => timed(|| {
            let mut n = 0;
            for e in fs::read_dir(dir).with_context(|| format!("opendir {}", dir.display()))? {
                e?;
                n += 1;
            }
            Ok((n, 0))
        }),
        Task::ReaddirStat { dir } => timed(|| {
            let mut n = 0;
            for e in fs::read_dir(dir).with_context(|| format!("opendir {}", dir.display()))? {
                e?.metadata()?;
                n += 1;
            }
            Ok((n, 0))
        }),
        Task::SeqRead { file } => with_mbps(timed(|| {
            let mut f = File::open(file).with_context(|| format!("open {}", file.display()))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            Ok((1, total))
        })),
        Task::RandRead {
            file,
            jobs,
            runtime,
        } => fio_randread(file, *jobs, *runtime),
        Task::Create { dir, files, size } => timed(|| {
            let data = vec![b'c'; *size];
            fs::create_dir(dir).with_context(|| format!("mkdir {}", dir.display()))?;
            let mut sub = PathBuf::new();
            for i in 0..*files {
                if i % 1000 == 0 {
                    sub = dir.join(format!("d{:03}", i / 1000));
                    fs::create_dir(&sub)?;
                }
                let p = sub.join(format!("f{i:06}"));
                let mut f = File::create(&p).with_context(|| format!("create {}", p.display()))?;
                f.write_all(&data)?;
            }
            Ok((*files as u64, (*files * *size) as u64))
        }),
        Task::CopyUpSmall { root, files } => timed(|| {
            for rel in files {
                let p = root.join(rel);
                let mut f = OpenOptions::new()
                    .append(true)
                    .open(&p)
                    .with_context(|| format!("open for append {}", p.display()))?;
                f.write_all(b"+")?;
            }
            Ok((files.len() as u64, 0))
        }),
        Task::CopyUpBig { file } => timed(|| {
            let f = OpenOptions::new()
                .write(true)
                .open(file)
                .with_context(|| format!("open for write {}", file.display()))?;
            f.write_at(b"X", 0)?;
            let len = f.metadata()?.len();
            drop(f);
            Ok((1, len))
        }),
        Task::SeqWrite { file, bytes } => with_mbps(timed(|| {
            let mut buf = vec![0u8; 1 << 20];
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (i * 131 % 251) as u8;
            }
            let mut f = File::create(file).with_context(|| format!("create {}", file.display()))?;
            let mut left = *bytes;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                f.write_all(&buf[..n])?;
                left -= n as u64;
            }
            drop(f);
            Ok((1, *bytes))
        })),
        Task::Tar { root, subtree } => with_mbps(tar_create(root, subtree)),
        Task::Untar { tarball, dest } => timed(|| {
            fs::create_dir(dest).with_context(|| format!("mkdir {}", dest.display()))?;
            let out = Command::new("tar")
                .arg("-C")
                .arg(dest)
                .args(["--no-same-owner", "--no-same-permissions", "-xf"])
                .arg(tarball)
                .stdin(Stdio::null())
                .output()
                .context("run tar -x")?;
            if !out.status.success() {
                bail!(
                    "tar -x failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok((1, fs::metadata(tarball)?.len()))
        }),
        Task::Remove { path } => timed(|| {
            fs::remove_dir_all(path).with_context(|| format!("rm -rf {}", path.display()))?;
            Ok((1, 0))
        }),
        Task::Verify {
            root,
            content_every,
            bigfile,
            list_out,
        } => {
            let start = Instant::now();
            let mut w = TreeDigest::new(true, *content_every, list_out.is_some());
            w.walk(root, "")?;
            if let Some(b) = bigfile {
                w.hash_chunks(&root.join(b), b)?;
            }
            if let Some(p) = list_out {
                w.write_list(p)?;
            }
            Ok(Outcome {
                secs: start.elapsed().as_secs_f64(),
                count: w.count,
                digest: Some(w.hash.hex()),
                ..Default::default()
            })
        }
    }
}

/// `statx(AT_STATX_FORCE_SYNC)` of `file`, `count` times: on FUSE, one GETATTR each.
fn stat_sync(file: &Path, count: usize) -> Result<Outcome> {
    let c = CString::new(file.as_os_str().as_bytes())
        .with_context(|| format!("NUL in {}", file.display()))?;
    let call = |flags: i32| {
        // SAFETY: `c` is a valid C string and `st` a writable statx buffer.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::statx(
                libc::AT_FDCWD,
                c.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW | flags,
                libc::STATX_BASIC_STATS,
                &mut st,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("statx {}", file.display()));
        }
        Ok(())
    };
    call(0)?;
    timed(|| {
        for _ in 0..count {
            call(libc::AT_STATX_FORCE_SYNC)?;
        }
        Ok((count as u64, 0))
    })
}

/// Times `f`, which returns (count, bytes).
fn timed(f: impl FnOnce() -> Result<(u64, u64)>) -> Result<Outcome> {
    let start = Instant::now();
    let (count, bytes) = f()?;
    Ok(Outcome {
        secs: start.elapsed().as_secs_f64(),
        count,
        bytes,
        ..Default::default()
    })
}

/// Adds MB/s from bytes and seconds.
fn with_mbps(o: Result<Outcome>) -> Result<Outcome> {
    let mut o = o?;
    if o.secs > 0.0 {
        o.mbps = Some(o.bytes as f64 / o.secs / 1e6);
    }
    Ok(o)
}

/// The sorted tree as lines `path type mode size [target] [content-hash]`, hashed.
/// Owners, times, link counts and directory sizes are left out: they legitimately differ
/// between implementations (and for the rootless column).
struct TreeDigest {
    hash: Fnv,
    count: u64,
    readlink: bool,
    content_every: usize,
    list: Option<Vec<String>>,
}

impl TreeDigest {
    fn new(readlink: bool, content_every: usize, keep_list: bool) -> Self {
        TreeDigest {
            hash: Fnv::default(),
            count: 0,
            readlink,
            content_every,
            list: keep_list.then(Vec::new),
        }
    }

    fn add(&mut self, line: String) {
        self.hash.write(line.as_bytes());
        self.hash.write(b"\n");
        if let Some(l) = &mut self.list {
            l.push(line);
        }
    }

    fn walk(&mut self, dir: &Path, rel: &str) -> Result<()> {
        let mut entries: Vec<fs::DirEntry> = fs::read_dir(dir)
            .with_context(|| format!("opendir {}", dir.display()))?
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("readdir {}", dir.display()))?;
        entries.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for e in &entries {
            let name = e.file_name();
            let r = if rel.is_empty() {
                name.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", name.to_string_lossy())
            };
            let m = e
                .metadata()
                .with_context(|| format!("lstat {}", e.path().display()))?;
            self.count += 1;
            let ft = m.file_type();
            let mode = m.mode() & 0o7777;
            let mut line = if ft.is_dir() {
                subdirs.push((e.path(), r.clone()));
                format!("{r} d {mode:o}")
            } else if ft.is_file() {
                format!("{r} f {mode:o} {}", m.len())
            } else if ft.is_symlink() {
                format!("{r} l {mode:o} {}", m.len())
            } else if ft.is_char_device() || ft.is_block_device() {
                format!("{r} dev {mode:o} {:x}", m.rdev())
            } else {
                format!("{r} other {mode:o}")
            };
            if self.readlink && ft.is_symlink() {
                let t = fs::read_link(e.path())?;
                line.push_str(&format!(" -> {}", t.display()));
            }
            if ft.is_file() && self.content_every > 0 {
                // Sampled by path, so that one extra or missing file does not shift which
                // files are hashed.
                let mut ph = Fnv::default();
                ph.write(r.as_bytes());
                if ph.value() % self.content_every as u64 == 0 {
                    line.push_str(&format!(" #{}", hash_file(&e.path())?));
                }
            }
            self.add(line);
        }
        drop(entries);
        for (p, r) in subdirs {
            self.walk(&p, &r)?;
        }
        Ok(())
    }

    fn hash_chunks(&mut self, file: &Path, rel: &str) -> Result<()> {
        let f = File::open(file).with_context(|| format!("open {}", file.display()))?;
        let len = f.metadata()?.len();
        let chunk = 1u64 << 20;
        let mut buf = vec![0u8; chunk as usize];
        for k in 0..4u64 {
            let off = (len.saturating_sub(chunk)) * k / 3;
            let n = f.read_at(&mut buf, off)?;
            let mut h = Fnv::default();
            h.write(&buf[..n]);
            self.add(format!("{rel} chunk@{off} {n} #{}", h.hex()));
        }
        Ok(())
    }

    fn write_list(&self, p: &Path) -> Result<()> {
        let l = self.list.as_deref().unwrap_or(&[]);
        fs::write(p, l.join("\n") + "\n").with_context(|| format!("write {}", p.display()))
    }
}

fn hash_file(p: &Path) -> Result<String> {
    let mut f = File::open(p).with_context(|| format!("open {}", p.display()))?;
    let mut h = Fnv::default();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.write(&buf[..n]);
    }
    Ok(h.hex())
}

/// `threads` walkers sharing a queue of directories; each lstat()s every entry it lists.
fn parallel_walk(root: &Path, threads: usize) -> Result<Outcome> {
    struct Queue {
        dirs: VecDeque<PathBuf>,
        busy: usize,
        error: Option<String>,
    }
    let q = Mutex::new(Queue {
        dirs: VecDeque::from([root.to_path_buf()]),
        busy: 0,
        error: None,
    });
    let cv = Condvar::new();
    let count = AtomicU64::new(0);
    let start = Instant::now();
    thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let dir = {
                    let mut g = q.lock().unwrap_or_else(|e| e.into_inner());
                    loop {
                        if g.error.is_some() {
                            return;
                        }
                        if let Some(d) = g.dirs.pop_front() {
                            g.busy += 1;
                            break d;
                        }
                        if g.busy == 0 {
                            cv.notify_all();
                            return;
                        }
                        g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                };
                let res = (|| -> std::io::Result<Vec<PathBuf>> {
                    let mut sub = Vec::new();
                    for e in fs::read_dir(&dir)? {
                        let e = e?;
                        let m = e.metadata()?;
                        count.fetch_add(1, Ordering::Relaxed);
                        if m.is_dir() {
                            sub.push(e.path());
                        }
                    }
                    Ok(sub)
                })();
                let mut g = q.lock().unwrap_or_else(|e| e.into_inner());
                g.busy -= 1;
                match res {
                    Ok(sub) => g.dirs.extend(sub),
                    Err(e) => g.error = Some(format!("{}: {e}", dir.display())),
                }
                cv.notify_all();
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    if let Some(e) = q.into_inner().unwrap_or_else(|e| e.into_inner()).error {
        bail!("parallel walk: {e}");
    }
    Ok(Outcome {
        secs,
        count: count.into_inner(),
        ..Default::default()
    })
}

fn tar_create(root: &Path, subtree: &str) -> Result<Outcome> {
    let start = Instant::now();
    // Output goes through a pipe: GNU tar skips reading file data when writing /dev/null.
    let mut child = Command::new("tar")
        .arg("-C")
        .arg(root)
        .arg("-cf")
        .arg("-")
        .arg(subtree)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run tar -c")?;
    let mut out = child.stdout.take().expect("piped");
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let st = child.wait()?;
    let secs = start.elapsed().as_secs_f64();
    if !st.success() {
        bail!("tar -c failed ({st}): {}", err.trim());
    }
    Ok(Outcome {
        secs,
        count: 1,
        bytes: total,
        digest: Some(format!("{total} bytes")),
        ..Default::default()
    })
}

fn fio_randread(file: &Path, jobs: usize, runtime: u64) -> Result<Outcome> {
    let out = Command::new("fio")
        .arg("--name=randread")
        .arg(format!("--filename={}", file.display()))
        .args([
            "--rw=randread",
            "--bs=4k",
            "--ioengine=psync",
            "--invalidate=0",
            "--readonly",
            "--group_reporting",
            "--time_based",
            "--output-format=json",
        ])
        .arg(format!("--numjobs={jobs}"))
        .arg(format!("--runtime={runtime}"))
        .stdin(Stdio::null())
        .output()
        .context("run fio (apt-get install -y fio)")?;
    if !out.status.success() {
        bail!(
            "fio failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON object.
    let json = text.find('{').map(|i| &text[i..]).unwrap_or(&text);
    let v: serde_json::Value = serde_json::from_str(json).context("parse fio JSON")?;
    let read = &v["jobs"][0]["read"];
    let iops = read["iops"].as_f64().context("fio JSON: no read.iops")?;
    let bw = read["bw_bytes"]
        .as_f64()
        .context("fio JSON: no read.bw_bytes")?;
    let ms = read["runtime"].as_f64().unwrap_or(runtime as f64 * 1000.0);
    let ios = read["total_ios"].as_u64().unwrap_or(0);
    Ok(Outcome {
        secs: ms / 1000.0,
        count: ios,
        bytes: read["io_bytes"].as_u64().unwrap_or(0),
        mbps: Some(bw / 1e6),
        iops: Some(iops),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_digest_ignores_readdir_order_and_sees_changes() {
        let d = std::env::temp_dir().join(format!("strata-bench-ut-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("a/b")).unwrap();
        fs::write(d.join("a/f"), "x").unwrap();
        let dig = |root: &Path| {
            let o = run(&Task::Walk {
                root: root.to_path_buf(),
                list_out: None,
            })
            .unwrap();
            (o.count, o.digest.unwrap())
        };
        let (n1, h1) = dig(&d);
        assert_eq!(n1, 3);
        assert_eq!(dig(&d).1, h1);
        fs::write(d.join("a/f"), "xy").unwrap();
        assert_ne!(dig(&d).1, h1);
        let p = run(&Task::ParallelWalk {
            root: d.clone(),
            threads: 3,
        })
        .unwrap();
        assert_eq!(p.count, 3);
        fs::remove_dir_all(&d).unwrap();
    }
}
