//! `strata-bench`: kernel overlayfs, fuse-overlayfs (1.x and 2.x) and stratafs side by side
//! on the same layer stack. See `benches/README.md`.

mod bench;
mod mounts;
mod report;
mod requests;
mod rwfs;
mod stack;
mod sys;
mod workloads;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::bench::{Ctx, SessionOut};
use crate::mounts::Kind;
use crate::stack::StackSpec;

/// Benchmarks kernel overlayfs, fuse-overlayfs and stratafs on the same layer stack
/// (root only). Prints a markdown table of medians and ratios to kernel overlayfs; writes
/// everything as JSON.
#[derive(Parser, Debug)]
#[command(name = "strata-bench", version)]
struct Args {
    /// Smaller stack and shorter fio runs: finishes in under 3 minutes.
    #[arg(long)]
    quick: bool,
    /// Implementations, comma separated: kernel, fuse-overlayfs, fuse-overlayfs2, stratafs,
    /// stratafs-rootless. Default: every one available (stratafs-rootless only with
    /// --rootless).
    #[arg(long = "impl", value_delimiter = ',')]
    impls: Vec<String>,
    /// Also run stratafs as the unprivileged user `stratatest` (created if missing),
    /// mounting through fusermount3: the `stratafs-rootless` column.
    #[arg(long)]
    rootless: bool,
    /// Repetitions of every workload per implementation (default 3; quick mode 2).
    #[arg(long)]
    reps: Option<usize>,
    /// Workloads to run, comma separated (default: all; see --list).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Where to write the JSON results (default: SCRATCH/results-<mode>-<time>.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Scratch directory for the cached stack and the sessions.
    #[arg(long, default_value = "/tmp/bench-scratch")]
    scratch: PathBuf,
    /// Keep each session's listings and logs even when everything matched.
    #[arg(long)]
    keep: bool,
    /// List the workloads and exit.
    #[arg(long)]
    list: bool,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("__worker") {
        return worker(argv.get(2));
    }
    sys::install_signal_flag();
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("strata-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The hidden worker mode: runs one task read from a JSON file, prints its outcome.
fn worker(spec: Option<&String>) -> ExitCode {
    let r = (|| -> Result<String> {
        let path = spec.context("usage: strata-bench __worker TASK.json")?;
        let text = fs::read_to_string(path).with_context(|| format!("read {path}"))?;
        let task: workloads::Task = serde_json::from_str(&text).context("parse task")?;
        let out = workloads::run(&task)?;
        Ok(serde_json::to_string(&out)?)
    })();
    match r {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<ExitCode> {
    let started = Instant::now();
    let spec = if args.quick {
        StackSpec::quick()
    } else {
        StackSpec::full()
    };
    let fio_runtime = if args.quick { 1 } else { 10 };
    if args.list {
        let fake = stack::Manifest {
            spec: spec.clone(),
            l1: PathBuf::new(),
            l2: PathBuf::new(),
            tarball: PathBuf::new(),
            tarball_bytes: spec.untar_bytes,
            usr_entries: spec.usr_entries,
            usr_bytes: 0,
            overridden: 0,
            whited_out: 0,
            whiteout_dir: String::new(),
            opaque_dir: String::new(),
            bigdir_merged: spec.bigdir_entries + spec.bigdir_new,
            bigfile: "bigfile".into(),
            tar_subtree: "(a subtree)".into(),
            tar_subtree_entries: 0,
            rm_subtree: "(a subtree)".into(),
            rm_subtree_entries: 0,
            copyup_files: Vec::new(),
            fingerprint: String::new(),
            build_secs: 0.0,
        };
        for w in bench::catalogue(&fake, fio_runtime) {
            println!("{:<17} {} — {}", w.id, w.metric.unit(), w.description);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !sys::is_root() {
        bail!(
            "must run as root (it mounts kernel overlayfs, drops caches and reads other \
             processes' /proc); try: sudo -E cargo run --release -p strata-benches --bin strata-bench -- --quick"
        );
    }
    for tool in [
        "fio",
        "tar",
        "setpriv",
        "mount",
        "umount",
        "losetup",
        "mkfs.ext4",
    ] {
        if sys::which(tool).is_none() {
            bail!("{tool} not found on PATH (apt-get install -y fio tar util-linux e2fsprogs)");
        }
    }
    let wanted: Vec<Kind> = args
        .impls
        .iter()
        .map(|s| Kind::parse(s.trim()))
        .collect::<Result<_>>()?;
    let (impls, mut notes) = mounts::discover(&wanted, args.rootless);
    for n in &notes {
        eprintln!("note: {n}");
    }
    if impls.is_empty() {
        bail!("no implementation to run");
    }
    // Quick mode must stay under 3 minutes also on a busy machine: 3 repetitions of 3
    // columns took 177 s at load 2-4, so it does 2.
    let reps = args.reps.unwrap_or(if args.quick { 2 } else { 3 }).max(1);
    for i in &impls {
        eprintln!(
            "implementation {}: {}{}",
            i.kind.id(),
            i.label,
            i.bin
                .as_ref()
                .map(|b| format!(" ({})", b.display()))
                .unwrap_or_default()
        );
    }

    fs::create_dir_all(&args.scratch)
        .with_context(|| format!("mkdir {}", args.scratch.display()))?;
    fs::set_permissions(&args.scratch, fs::Permissions::from_mode(0o755))?;
    mounts::cleanup_stale(&args.scratch);
    let machine = sys::machine();
    let manifest = stack::ensure(&args.scratch, &spec)?;

    let all = bench::catalogue(&manifest, fio_runtime);
    let selected: BTreeSet<String> = if args.workloads.is_empty() {
        all.iter().map(|w| w.id.to_string()).collect()
    } else {
        for w in &args.workloads {
            if !all.iter().any(|x| x.id == w.as_str()) {
                bail!("unknown workload {w:?} (see --list)");
            }
        }
        args.workloads.iter().cloned().collect()
    };

    let stamp = machine.date.replace([':', '-'], "");
    let run_dir = args
        .scratch
        .join(format!("run-{stamp}-{}", std::process::id()));
    fs::create_dir_all(&run_dir)?;
    fs::set_permissions(&run_dir, fs::Permissions::from_mode(0o755))?;
    // The rootless user needs a worker binary it can reach.
    let me = std::env::current_exe().context("current executable")?;
    let worker_bin = if impls.iter().any(|i| i.user.is_some()) {
        let bin_dir = args.scratch.join("bin");
        fs::create_dir_all(&bin_dir)?;
        fs::set_permissions(&bin_dir, fs::Permissions::from_mode(0o755))?;
        let copy = bin_dir.join("strata-bench");
        let tmp = bin_dir.join(format!("strata-bench.{}", std::process::id()));
        fs::copy(&me, &tmp).context("copy the worker binary")?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        fs::rename(&tmp, &copy)?;
        copy
    } else {
        me
    };
    // Two big files (copy-up, sequential write) and the small ones, with room to spare.
    let rw = rwfs::RwFs::create(&args.scratch, 4 * spec.bigfile_bytes + (4 << 30))?;
    let ctx = Ctx {
        worker_timeout: Duration::from_secs(if args.quick { 180 } else { 1200 }),
        fio_runtime,
        content_every: (manifest.usr_entries / 1000).max(1),
        checks_first_rep_only: args.quick,
        manifest,
        run_dir: run_dir.clone(),
        rw_dir: rw.dir.clone(),
        worker_bin,
        selected,
    };

    let mut out = SessionOut::default();
    let mut failed_sessions = 0;
    'reps: for rep in 0..reps {
        for imp in &impls {
            eprintln!("[rep {}/{reps}] {}", rep + 1, imp.label);
            if let Err(e) = bench::session(&ctx, imp, rep, &mut out) {
                eprintln!("  session failed: {e:#}");
                notes.push(format!(
                    "{} rep {}: session failed: {e:#}",
                    imp.kind.id(),
                    rep
                ));
                failed_sessions += 1;
                if sys::interrupted() {
                    break 'reps;
                }
            }
        }
    }
    let interrupted = sys::interrupted();
    // Only the load before the run says whether others competed: by the end, the 1-minute
    // average is mostly the harness's own (4 fio jobs and 4 walkers on 2 vCPUs), which made
    // this note fire on every run. The end value is still printed with the machine.
    let load_start = machine
        .loadavg_start
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok());
    let load_end = sys::loadavg();
    if load_start.is_some_and(|v| v > 1.0) {
        notes.push(format!(
            "the machine was busy before the run (load average {}): other processes may have \
             competed for the {} vCPUs, so timings are noisy; rerun on an idle machine",
            machine.loadavg_start, machine.nproc
        ));
    }
    if interrupted {
        notes.push("interrupted: results are partial".into());
    }

    let fp = stack::fingerprint(&ctx.manifest.l1, &ctx.manifest.l2)?;
    let lowers_unchanged = fp == ctx.manifest.fingerprint;
    let reference = impls[0].kind;
    let mismatches = bench::compare(&out.checks, reference);
    let rows = report::summarize(&all, &out.samples, &impls);
    let leftover: Vec<PathBuf> = mounts::mount_points()
        .into_iter()
        .filter(|m| m.starts_with(&args.scratch) && *m != rw.dir)
        .collect();
    if !leftover.is_empty() {
        notes.push(format!("mounts left behind: {leftover:?}"));
    }
    let rep = report::Report {
        quick: args.quick,
        reps,
        machine: &machine,
        loadavg_end: load_end,
        manifest: &ctx.manifest,
        impls: &impls,
        rows: &rows,
        mismatches: &mismatches,
        lowers_unchanged,
        notes: &notes,
        elapsed_secs: started.elapsed().as_secs_f64(),
    };
    let md = rep.markdown();
    println!("{md}");
    let json_path = args.json.clone().unwrap_or_else(|| {
        args.scratch.join(format!(
            "results-{}-{stamp}.json",
            if args.quick { "quick" } else { "full" }
        ))
    });
    let json = rep.json(&all, &out.samples);
    let mut f =
        fs::File::create(&json_path).with_context(|| format!("create {}", json_path.display()))?;
    f.write_all(serde_json::to_string_pretty(&json)?.as_bytes())?;
    eprintln!("JSON written to {}", json_path.display());

    let ok = mismatches.is_empty() && lowers_unchanged && leftover.is_empty() && !interrupted;
    if ok && failed_sessions == 0 && !args.keep {
        sys::remove_tree(&run_dir)?;
    } else {
        eprintln!("session listings and logs kept in {}", run_dir.display());
    }
    if !mismatches.is_empty() {
        eprintln!(
            "strata-bench: {} same-data mismatch(es), see above",
            mismatches.len()
        );
    }
    if !lowers_unchanged {
        eprintln!("strata-bench: a lower layer was modified during the run");
    }
    Ok(if ok && failed_sessions == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
