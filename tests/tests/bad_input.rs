//! Bad input: each case exits non-zero with exactly one non-empty line on stderr and leaves
//! nothing mounted and no daemon behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use strata_tests::*;

/// Runs stratafs with `args` (mount point last) and checks the failure contract.
fn rejected(args: &[String], mnt: &Path) {
    let out = run_stratafs(args);
    // Cleans up whatever might have been mounted, after the checks below.
    let _g = MountGuard::fuse(mnt);
    assert!(
        !out.timed_out,
        "stratafs hung on bad input: {}",
        out.describe()
    );
    assert!(
        !out.status.success(),
        "bad input accepted (exit 0): {}",
        out.describe()
    );
    assert!(
        !out.pipes_hung,
        "stderr/stdout left open: {}",
        out.describe()
    );
    let err = out.stderr_str();
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines.len() == 1 && !lines[0].trim().is_empty(),
        "stderr should be exactly one non-empty line, got {} line(s): {}",
        lines.len(),
        out.describe()
    );
    assert!(
        !is_mounted(mnt),
        "something is mounted at {} after a failure",
        mnt.display()
    );
    assert!(
        wait_for(Duration::from_secs(2), || daemon_pids(mnt).is_empty()),
        "a stratafs process for {} is still running after a failure: {:?}",
        mnt.display(),
        daemon_pids(mnt)
    );
}

struct Env {
    sc: Scratch,
    lower: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    mnt: PathBuf,
    file: PathBuf,
}

fn env() -> Env {
    let sc = Scratch::new();
    let lower = sc.layer("lower");
    lower.file("f", "f\n");
    let upper = sc.mkdir("upper");
    let work = sc.mkdir("work");
    let mnt = sc.mkdir("mnt");
    let file = sc.join("plainfile");
    fs::write(&file, "not a dir").unwrap();
    Env {
        lower: lower.root().to_path_buf(),
        upper,
        work,
        mnt,
        file,
        sc,
    }
}

fn d(p: &Path) -> String {
    p.display().to_string()
}

fn o(opts: String, mnt: &Path) -> Vec<String> {
    vec!["-o".into(), opts, d(mnt)]
}

#[test]
fn no_options_at_all() {
    let e = env();
    rejected(&[d(&e.mnt)], &e.mnt);
}

#[test]
fn no_lowerdir_with_upper_and_work() {
    let e = env();
    rejected(
        &o(
            format!("upperdir={},workdir={}", d(&e.upper), d(&e.work)),
            &e.mnt,
        ),
        &e.mnt,
    );
}

#[test]
fn empty_lowerdir() {
    let e = env();
    rejected(&o("lowerdir=".into(), &e.mnt), &e.mnt);
}

#[test]
fn lower_layer_missing() {
    let e = env();
    let missing = e.sc.join("missing");
    rejected(
        &o(format!("lowerdir={}:{}", d(&e.lower), d(&missing)), &e.mnt),
        &e.mnt,
    );
}

#[test]
fn lower_layer_not_a_directory() {
    let e = env();
    rejected(
        &o(format!("lowerdir={}:{}", d(&e.lower), d(&e.file)), &e.mnt),
        &e.mnt,
    );
}

#[test]
fn upper_missing() {
    let e = env();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        d(&e.lower),
        d(&e.sc.join("nope")),
        d(&e.work)
    );
    rejected(&o(opts, &e.mnt), &e.mnt);
}

#[test]
fn upper_not_a_directory() {
    let e = env();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        d(&e.lower),
        d(&e.file),
        d(&e.work)
    );
    rejected(&o(opts, &e.mnt), &e.mnt);
}

#[test]
fn work_missing() {
    let e = env();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        d(&e.lower),
        d(&e.upper),
        d(&e.sc.join("nope"))
    );
    rejected(&o(opts, &e.mnt), &e.mnt);
}

#[test]
fn work_not_a_directory() {
    let e = env();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        d(&e.lower),
        d(&e.upper),
        d(&e.file)
    );
    rejected(&o(opts, &e.mnt), &e.mnt);
}

#[test]
fn upper_without_work() {
    let e = env();
    rejected(
        &o(
            format!("lowerdir={},upperdir={}", d(&e.lower), d(&e.upper)),
            &e.mnt,
        ),
        &e.mnt,
    );
}

#[test]
fn work_without_upper() {
    let e = env();
    rejected(
        &o(
            format!("lowerdir={},workdir={}", d(&e.lower), d(&e.work)),
            &e.mnt,
        ),
        &e.mnt,
    );
}

#[test]
fn work_on_another_filesystem_than_upper() {
    let e = env();
    let t = e.sc.join("tmpfs");
    let _tmpfs = mount_tmpfs(&t);
    let work = t.join("work");
    fs::create_dir(&work).unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        d(&e.lower),
        d(&e.upper),
        d(&work)
    );
    rejected(&o(opts, &e.mnt), &e.mnt);
}

#[test]
fn work_inside_upper() {
    let e = env();
    let work = e.upper.join("w");
    fs::create_dir(&work).unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        d(&e.lower),
        d(&e.upper),
        d(&work)
    );
    rejected(&o(opts, &e.mnt), &e.mnt);
}

#[test]
fn upper_inside_work() {
    let e = env();
    let upper = e.work.join("u");
    fs::create_dir(&upper).unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        d(&e.lower),
        d(&upper),
        d(&e.work)
    );
    rejected(&o(opts, &e.mnt), &e.mnt);
}

#[test]
fn mountpoint_missing() {
    let e = env();
    let mnt = e.sc.join("no-such-mnt");
    rejected(&o(format!("lowerdir={}", d(&e.lower)), &mnt), &mnt);
}

#[test]
fn mountpoint_not_a_directory() {
    let e = env();
    rejected(&o(format!("lowerdir={}", d(&e.lower)), &e.file), &e.file);
}

#[test]
fn mountpoint_argument_absent() {
    let e = env();
    let out = run_stratafs(&["-o".to_string(), format!("lowerdir={}", d(&e.lower))]);
    assert!(
        !out.timed_out && !out.status.success(),
        "{}",
        out.describe()
    );
    assert!(
        !out.stderr_str().trim().is_empty(),
        "no error message: {}",
        out.describe()
    );
}

#[test]
fn max_write_not_a_number() {
    let e = env();
    rejected(
        &o(format!("lowerdir={},max_write=abc", d(&e.lower)), &e.mnt),
        &e.mnt,
    );
}

#[test]
fn failure_in_foreground_mode_too() {
    let e = env();
    let missing = e.sc.join("missing");
    let mut args = vec!["-f".to_string()];
    args.extend(o(format!("lowerdir={}", d(&missing)), &e.mnt));
    rejected(&args, &e.mnt);
}

#[test]
fn unknown_whiteout_format() {
    let e = env();
    rejected(
        &o(
            format!(
                "lowerdir={},upperdir={},workdir={},whiteout=xattr",
                d(&e.lower),
                d(&e.upper),
                d(&e.work)
            ),
            &e.mnt,
        ),
        &e.mnt,
    );
}
