//! The run: sessions interleaved across implementations (rep 1: A B C, rep 2: A B C, ...),
//! each session a fresh mount with a fresh upper layer running every selected workload in a
//! fixed order, plus the same-data checks.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::mounts::{self, Dirs, Implementation, Kind};
use crate::requests::{RequestTrace, Requests};
use crate::stack::Manifest;
use crate::sys;
use crate::workloads::{Outcome, Task};

/// What a workload's number is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Seconds; lower is better; ratio = impl / kernel.
    Secs,
    /// MB/s (10^6 bytes per second); higher is better; ratio = impl / kernel.
    Mbps,
    /// MiB of daemon memory (no kernel value).
    Mib,
    /// Bytes of daemon memory per walked inode (no kernel value).
    BytesPerInode,
    /// Microseconds per operation; a diagnostic with no target, so no ratio.
    MicrosPerOp,
}

impl Metric {
    /// Unit with the better direction, for the table.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Secs => "s ↓",
            Metric::Mbps => "MB/s ↑",
            Metric::Mib => "MiB ↓",
            Metric::BytesPerInode => "B/inode ↓",
            Metric::MicrosPerOp => "µs/op ↓",
        }
    }

    /// Whether a ratio to the kernel makes sense.
    pub fn has_ratio(self) -> bool {
        matches!(self, Metric::Secs | Metric::Mbps)
    }
}

/// Preparation right before a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Prep {
    /// Nothing: runs on whatever the previous step left in the caches (warm).
    None,
    /// `sync`, so that the previous step's writeback does not land in this one.
    Sync,
    /// `sync; echo 3 > /proc/sys/vm/drop_caches` (cold).
    DropCaches,
}

/// One row of the results.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// Identifier (`--workloads` takes these).
    pub id: &'static str,
    /// What it does, with sizes.
    pub description: String,
    /// What the number is.
    pub metric: Metric,
    /// What happens right before it.
    pub prep: Prep,
}

/// Forced stat calls in `round_trip`.
const ROUND_TRIPS: usize = 20_000;

/// All workloads in the order a session runs them.
pub fn catalogue(m: &Manifest, runtime: u64) -> Vec<Workload> {
    let s = &m.spec;
    let mib = |b: u64| b >> 20;
    let walked = m.usr_entries + m.bigdir_merged;
    let w = |id, description: String, metric, cold: bool| Workload {
        id,
        description,
        metric,
        prep: if cold { Prep::DropCaches } else { Prep::None },
    };
    let synced = |mut w: Workload| {
        w.prep = Prep::Sync;
        w
    };
    vec![
        w(
            "mount",
            "mount: spawn until the mount answers stat".into(),
            Metric::Secs,
            false,
        ),
        w(
            "walk_cold",
            format!("lstat walk of the whole tree (~{walked} entries), cold"),
            Metric::Secs,
            true,
        ),
        w(
            "rss_after_walk",
            "daemon RSS after the cold walk".into(),
            Metric::Mib,
            false,
        ),
        w(
            "rss_per_inode",
            "daemon RSS after the cold walk / inodes walked".into(),
            Metric::BytesPerInode,
            false,
        ),
        w(
            "walk_warm",
            "same walk again, warm".into(),
            Metric::Secs,
            false,
        ),
        w(
            "round_trip",
            format!(
                "{ROUND_TRIPS} stat calls of one file that must ask the filesystem \
                 (statx AT_STATX_FORCE_SYNC): one GETATTR round trip each, warm"
            ),
            Metric::MicrosPerOp,
            false,
        ),
        w(
            "walk_parallel4",
            "same walk by 4 threads sharing a directory queue, cold".into(),
            Metric::Secs,
            true,
        ),
        w(
            "readdir_big",
            format!(
                "readdir of the {}-entry merged bigdir/, cold",
                m.bigdir_merged
            ),
            Metric::Secs,
            true,
        ),
        w(
            "readdir_stat_big",
            format!(
                "readdir + lstat of each entry of bigdir/ ({}), cold",
                m.bigdir_merged
            ),
            Metric::Secs,
            true,
        ),
        w(
            "seq_read_cold",
            format!(
                "sequential read of the {} MiB file, 1 MiB reads, cold",
                mib(s.bigfile_bytes)
            ),
            Metric::Mbps,
            true,
        ),
        w(
            "seq_read_warm",
            "same read again, warm".into(),
            Metric::Mbps,
            false,
        ),
        w(
            "randread_4k_j1",
            format!("fio 4 KiB random reads (psync) of the big file, 1 job, {runtime} s, warm"),
            Metric::Mbps,
            false,
        ),
        w(
            "randread_4k_j4",
            format!("fio 4 KiB random reads, 4 jobs, {runtime} s, warm"),
            Metric::Mbps,
            false,
        ),
        w(
            "tar_subtree",
            format!(
                "tar -c of {} ({} entries) into a pipe, cold",
                m.tar_subtree, m.tar_subtree_entries
            ),
            Metric::Secs,
            true,
        ),
        synced(w(
            "create_small",
            format!("create {} files of 1 KiB (1000 per dir)", s.create_files),
            Metric::Secs,
            false,
        )),
        w(
            "copyup_small",
            format!(
                "copy-up: append 1 byte to {} small lower files, cold",
                s.copyup_files
            ),
            Metric::Secs,
            true,
        ),
        w(
            "copyup_big",
            format!(
                "copy-up: open the {} MiB lower file for write, write 1 byte, cold",
                mib(s.bigfile_bytes)
            ),
            Metric::Secs,
            true,
        ),
        synced(w(
            "seq_write",
            format!(
                "sequential write of a new {} MiB file, 1 MiB writes, close (no fsync)",
                mib(s.bigfile_bytes)
            ),
            Metric::Mbps,
            false,
        )),
        synced(w(
            "untar",
            format!(
                "tar -x of a {} MiB archive of /usr/lib files",
                mib(m.tarball_bytes)
            ),
            Metric::Secs,
            false,
        )),
        w(
            "rm_subtree",
            format!(
                "rm -rf of lower subtree {} ({} entries), cold",
                m.rm_subtree, m.rm_subtree_entries
            ),
            Metric::Secs,
            true,
        ),
    ]
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Workload id.
    pub workload: String,
    /// Implementation id.
    #[serde(rename = "impl")]
    pub imp: String,
    /// Repetition (0-based).
    pub rep: usize,
    /// The number, in the workload's metric (absent on error).
    pub value: Option<f64>,
    /// What the worker reported.
    pub outcome: Option<Outcome>,
    /// Daemon CPU time (user + system) spent during the workload, seconds.
    pub daemon_cpu_secs: Option<f64>,
    /// FUSE requests the kernel sent during the workload.
    pub requests: Option<Requests>,
    /// What went wrong.
    pub error: Option<String>,
}

/// One digest to compare across implementations and repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Which view: `walk`, `verify`, `bigdir`, `tar`, `final`.
    pub name: String,
    /// Implementation id.
    #[serde(rename = "impl")]
    pub imp: String,
    /// Repetition.
    pub rep: usize,
    /// The digest.
    pub digest: String,
    /// The listing behind it, when one was written.
    pub list: Option<PathBuf>,
}

/// Settings shared by all sessions.
pub struct Ctx {
    /// The stack.
    pub manifest: Manifest,
    /// Directory of this run's sessions.
    pub run_dir: PathBuf,
    /// Where the sessions' writable layers go (see `rwfs`).
    pub rw_dir: PathBuf,
    /// The worker binary (this executable, or a copy the rootless user can run).
    pub worker_bin: PathBuf,
    /// Workloads to run.
    pub selected: BTreeSet<String>,
    /// Bound for one worker.
    pub worker_timeout: Duration,
    /// fio run time in seconds.
    pub fio_runtime: u64,
    /// Hash the content of about one regular file in n in the verify steps.
    pub content_every: usize,
    /// Run the untimed content checks in the first repetition only (quick mode).
    pub checks_first_rep_only: bool,
}

/// Everything one session produced.
#[derive(Default)]
pub struct SessionOut {
    /// Measurements.
    pub samples: Vec<Sample>,
    /// Digests.
    pub checks: Vec<Check>,
}

/// What a task cost the daemon.
#[derive(Debug, Default)]
struct Cost {
    /// CPU seconds (user + system).
    cpu: Option<f64>,
    /// FUSE requests.
    requests: Option<Requests>,
}

/// State of one running session.
struct Session<'a> {
    ctx: &'a Ctx,
    imp: &'a Implementation,
    rep: usize,
    outdir: PathBuf,
    mount: mounts::Mount,
    /// Counts the mount's FUSE requests (none for the kernel, or without tracefs).
    trace: Option<RequestTrace>,
    workloads: Vec<Workload>,
    task_no: usize,
    last_wall: f64,
    /// Whether this session runs the untimed content checks.
    checks_on: bool,
    out: &'a mut SessionOut,
}

impl Session<'_> {
    fn selected(&self, w: &str) -> bool {
        self.ctx.selected.contains(w)
    }

    fn sample(
        &mut self,
        workload: &str,
        value: Option<f64>,
        o: Option<Outcome>,
        cost: Cost,
        err: Option<String>,
    ) {
        self.out.samples.push(Sample {
            workload: workload.to_string(),
            imp: self.imp.kind.id().to_string(),
            rep: self.rep,
            value,
            outcome: o,
            daemon_cpu_secs: cost.cpu,
            requests: cost.requests,
            error: err,
        });
    }

    fn check(&mut self, name: &str, digest: String, list: Option<PathBuf>) {
        self.out.checks.push(Check {
            name: name.into(),
            imp: self.imp.kind.id().into(),
            rep: self.rep,
            digest,
            list,
        });
    }

    /// Runs `task` in a worker after `prep`; returns its outcome and what it cost the daemon.
    fn run_task(&mut self, name: &str, task: &Task, prep: Prep) -> Result<(Outcome, Cost)> {
        sys::check_interrupted()?;
        let wall = Instant::now();
        self.task_no += 1;
        let spec_path = self
            .outdir
            .join(format!("task-{:02}-{name}.json", self.task_no));
        fs::write(&spec_path, serde_json::to_string(task)?)?;
        match prep {
            Prep::None => {}
            // SAFETY: sync(2) has no preconditions.
            Prep::Sync => unsafe { libc::sync() },
            Prep::DropCaches => sys::drop_caches()?,
        }
        let daemon = self.mount.daemon;
        let cpu0 = daemon.and_then(sys::cpu_secs);
        let tracing = self.trace.as_ref().is_some_and(|t| match t.start() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("  (requests not counted: {e:#})");
                false
            }
        });
        let r = run_worker(self.ctx, self.imp, &spec_path);
        let cpu1 = daemon.and_then(sys::cpu_secs);
        let requests = match (&self.trace, tracing) {
            (Some(t), true) => t
                .stop()
                .map_err(|e| eprintln!("  (requests not counted: {e:#})"))
                .ok(),
            _ => None,
        };
        let cost = Cost {
            cpu: cpu0.zip(cpu1).map(|(a, b)| b - a),
            requests,
        };
        self.last_wall = wall.elapsed().as_secs_f64();
        r.map(|o| (o, cost))
    }

    /// Runs a workload if selected and records it.
    fn measure(&mut self, name: &'static str, task: Task) -> Option<Outcome> {
        if !self.selected(name) {
            return None;
        }
        let w = self.workloads.iter().find(|x| x.id == name);
        let (prep, metric) = w
            .map(|w| (w.prep, w.metric))
            .unwrap_or((Prep::None, Metric::Secs));
        match self.run_task(name, &task, prep) {
            Ok((o, cost)) => {
                let value = match metric {
                    Metric::Mbps => o.mbps,
                    Metric::MicrosPerOp => Some(o.secs * 1e6 / o.count.max(1) as f64),
                    _ => Some(o.secs),
                };
                let shown = match metric {
                    Metric::Mbps => format!("{:.0} MB/s", value.unwrap_or(0.0)),
                    Metric::MicrosPerOp => format!("{:.1} µs/op", value.unwrap_or(0.0)),
                    _ => format!("{:.3} s", o.secs),
                };
                eprintln!("  {name:<17} {shown:<12} [step {:.1} s]", self.last_wall);
                self.sample(name, value, Some(o.clone()), cost, None);
                Some(o)
            }
            Err(e) => {
                let msg = format!("{e:#}");
                eprintln!("  {name:<17} ERROR {msg}");
                self.sample(name, None, None, Cost::default(), Some(msg));
                None
            }
        }
    }

    /// An untimed check task; its digest is recorded under `name`.
    fn verify(&mut self, name: &str, list: PathBuf, prep: Prep) {
        let task = Task::Verify {
            root: self.mount.mnt.clone(),
            content_every: self.ctx.content_every,
            bigfile: Some(self.ctx.manifest.bigfile.clone()),
            list_out: Some(list.clone()),
        };
        match self.run_task(name, &task, prep) {
            Ok((o, _)) => {
                eprintln!(
                    "  {name:<17} (untimed check) [step {:.1} s]",
                    self.last_wall
                );
                self.check(name, o.digest.unwrap_or_default(), Some(list))
            }
            Err(e) => {
                eprintln!("  {name:<17} ERROR {e:#}");
                // After Ctrl-C a missing check is no mismatch.
                if !sys::interrupted() {
                    self.check(name, format!("ERROR {e:#}"), None)
                }
            }
        }
    }

    fn run_all(&mut self) {
        let man = self.ctx.manifest.clone();
        let spec = man.spec.clone();
        let root = self.mount.mnt.clone();
        let at = |rel: &str| root.join(rel);

        // Reads.
        let walk_list = self.outdir.join("walk.list");
        let task = Task::Walk {
            root: root.clone(),
            list_out: Some(walk_list.clone()),
        };
        if let Some(o) = self.measure("walk_cold", task) {
            self.check(
                "walk",
                o.digest.clone().unwrap_or_default(),
                Some(walk_list),
            );
            if let Some(rss) = self.mount.daemon.and_then(sys::rss_bytes) {
                let inodes = (o.count + 1) as f64;
                let mib = rss as f64 / 1048576.0;
                if self.selected("rss_after_walk") {
                    self.sample("rss_after_walk", Some(mib), None, Cost::default(), None);
                }
                if self.selected("rss_per_inode") {
                    self.sample(
                        "rss_per_inode",
                        Some(rss as f64 / inodes),
                        None,
                        Cost::default(),
                        None,
                    );
                }
                eprintln!(
                    "  rss after walk    {mib:.1} MiB ({:.0} B/inode)",
                    rss as f64 / inodes
                );
            }
        }
        // The content check runs in every session whatever is selected.
        if self.checks_on {
            self.verify("verify", self.outdir.join("verify.list"), Prep::None);
        }
        let task = Task::Walk {
            root: root.clone(),
            list_out: None,
        };
        if let Some(o) = self.measure("walk_warm", task) {
            self.check("walk", o.digest.unwrap_or_default(), None);
        }
        let task = Task::StatSync {
            file: at(&man.bigfile),
            count: ROUND_TRIPS,
        };
        self.measure("round_trip", task);
        let task = Task::ParallelWalk {
            root: root.clone(),
            threads: 4,
        };
        if let Some(o) = self.measure("walk_parallel4", task) {
            self.check("walk_count", o.count.to_string(), None);
        }
        if let Some(o) = self.measure("readdir_big", Task::Readdir { dir: at("bigdir") }) {
            self.check("bigdir_count", o.count.to_string(), None);
        }
        if let Some(o) = self.measure("readdir_stat_big", Task::ReaddirStat { dir: at("bigdir") }) {
            self.check("bigdir_count", o.count.to_string(), None);
        }
        for name in ["seq_read_cold", "seq_read_warm"] {
            if let Some(o) = self.measure(
                name,
                Task::SeqRead {
                    file: at(&man.bigfile),
                },
            ) {
                self.check("bigfile_bytes", o.bytes.to_string(), None);
            }
        }
        for (name, jobs) in [("randread_4k_j1", 1), ("randread_4k_j4", 4)] {
            let task = Task::RandRead {
                file: at(&man.bigfile),
                jobs,
                runtime: self.ctx.fio_runtime,
            };
            self.measure(name, task);
        }
        let task = Task::Tar {
            root: root.clone(),
            subtree: man.tar_subtree.clone(),
        };
        if let Some(o) = self.measure("tar_subtree", task) {
            self.check("tar_bytes", o.bytes.to_string(), None);
        }

        // Writes.
        let task = Task::Create {
            dir: at("created"),
            files: spec.create_files,
            size: 1024,
        };
        self.measure("create_small", task);
        let task = Task::CopyUpSmall {
            root: root.clone(),
            files: man.copyup_files.clone(),
        };
        self.measure("copyup_small", task);
        self.measure(
            "copyup_big",
            Task::CopyUpBig {
                file: at(&man.bigfile),
            },
        );
        let task = Task::SeqWrite {
            file: at("written.bin"),
            bytes: spec.bigfile_bytes,
        };
        self.measure("seq_write", task);
        let task = Task::Untar {
            tarball: man.tarball.clone(),
            dest: at("untarred"),
        };
        self.measure("untar", task);
        self.measure(
            "rm_subtree",
            Task::Remove {
                path: at(&man.rm_subtree),
            },
        );

        // The merged tree after the writes, with contents.
        if self.checks_on {
            self.verify("final", self.outdir.join("final.list"), Prep::DropCaches);
        }
    }
}

/// Runs one session: a fresh upper, mount, every selected workload, untimed checks, unmount.
pub fn session(ctx: &Ctx, imp: &Implementation, rep: usize, out: &mut SessionOut) -> Result<()> {
    let id = imp.kind.id();
    let started = Instant::now();
    let dir = ctx.run_dir.join(format!("{id}-r{rep}"));
    let layers = ctx.rw_dir.join(format!("{id}-r{rep}"));
    let dirs = Dirs {
        lowers: vec![ctx.manifest.l2.clone(), ctx.manifest.l1.clone()],
        upper: layers.join("upper"),
        work: layers.join("work"),
        mnt: dir.join("mnt"),
    };
    let outdir = dir.join("out");
    for d in [&dir, &layers, &dirs.upper, &dirs.work, &dirs.mnt, &outdir] {
        fs::create_dir_all(d).with_context(|| format!("mkdir {}", d.display()))?;
        if let Some(u) = &imp.user {
            u.chown(d)?;
        }
    }
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    let mount = mounts::mount(imp, &dirs, &dir.join("daemon.log"))?;
    eprintln!("  mount             {:.3} s", mount.mount_secs);
    let trace = match mount.daemon {
        Some(_) => RequestTrace::new(&mount.mnt)
            .map_err(|e| eprintln!("  (requests not counted: {e:#})"))
            .ok(),
        None => None,
    };
    let mut s = Session {
        ctx,
        imp,
        rep,
        outdir,
        mount,
        trace,
        workloads: catalogue(&ctx.manifest, ctx.fio_runtime),
        task_no: 0,
        last_wall: 0.0,
        checks_on: rep == 0 || !ctx.checks_first_rep_only,
        out,
    };
    if s.selected("mount") {
        let v = s.mount.mount_secs;
        s.sample("mount", Some(v), None, Cost::default(), None);
    }
    s.run_all();
    let r = s.mount.unmount();
    drop(s);
    r?;
    // Upper layers can hold gigabytes; keep only the listings.
    sys::remove_tree(&layers)?;
    eprintln!("  session took {:.1} s", started.elapsed().as_secs_f64());
    sys::check_interrupted()
}

/// Runs the worker on the task in `spec_path` (as the implementation's user) and parses
/// its outcome.
fn run_worker(ctx: &Ctx, imp: &Implementation, spec_path: &Path) -> Result<Outcome> {
    let mut cmd = match &imp.user {
        Some(u) => u.command(&ctx.worker_bin),
        None => Command::new(&ctx.worker_bin),
    };
    cmd.arg("__worker").arg(spec_path).current_dir("/");
    let out = sys::run_bounded(&mut cmd, ctx.worker_timeout)?;
    if !out.status.success() {
        bail!("worker failed ({}): {}", out.status, out.stderr.trim());
    }
    let line = out
        .stdout
        .lines()
        .last()
        .context("worker printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("parse worker output {line:?}"))
}

/// A digest that differs from the reference implementation's.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    /// Check name.
    pub check: String,
    /// Implementation id.
    #[serde(rename = "impl")]
    pub imp: String,
    /// Repetition.
    pub rep: usize,
    /// Reference implementation id.
    pub reference: String,
    /// The reference digest and this one.
    pub digests: (String, String),
    /// First differing lines of the listings (`-` reference, `+` this one).
    pub diff: Vec<String>,
}

/// Compares every check with the reference's (the kernel's first repetition, else the first
/// implementation's) of the same name.
pub fn compare(checks: &[Check], reference: Kind) -> Vec<Mismatch> {
    let mut out = Vec::new();
    let names: BTreeSet<&str> = checks.iter().map(|c| c.name.as_str()).collect();
    for name in names {
        let of_name: Vec<&Check> = checks.iter().filter(|c| c.name == name).collect();
        let Some(r) = of_name
            .iter()
            .find(|c| c.imp == reference.id())
            .or_else(|| of_name.first())
        else {
            continue;
        };
        // The reference list is the first one with a listing among the reference's checks.
        let r_list = of_name
            .iter()
            .find(|c| c.imp == r.imp && c.list.is_some())
            .and_then(|c| c.list.clone());
        for c in &of_name {
            if c.digest != r.digest {
                let diff = match (&r_list, &c.list) {
                    (Some(a), Some(b)) => diff_lists(a, b, 30),
                    _ => Vec::new(),
                };
                out.push(Mismatch {
                    check: name.to_string(),
                    imp: c.imp.clone(),
                    rep: c.rep,
                    reference: r.imp.clone(),
                    digests: (r.digest.clone(), c.digest.clone()),
                    diff,
                });
            }
        }
    }
    out
}

/// Lines only in `a` (`- `) or only in `b` (`+ `), at most `max`, both files sorted the same
/// way (they are: listings are in walk order of sorted names).
fn diff_lists(a: &Path, b: &Path, max: usize) -> Vec<String> {
    let (Ok(ta), Ok(tb)) = (fs::read_to_string(a), fs::read_to_string(b)) else {
        return vec!["(listing unreadable)".into()];
    };
    let sa: BTreeSet<&str> = ta.lines().collect();
    let sb: BTreeSet<&str> = tb.lines().collect();
    let mut d: Vec<String> = sa
        .difference(&sb)
        .map(|l| format!("- {l}"))
        .chain(sb.difference(&sa).map(|l| format!("+ {l}")))
        .collect();
    d.sort_by(|x, y| x[2..].cmp(&y[2..]));
    let total = d.len();
    d.truncate(max);
    if total > max {
        d.push(format!("... {} more differing lines", total - max));
    }
    d
}
