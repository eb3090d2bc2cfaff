//! `strata commit`: a container's upper layer, written for real through a stratafs or kernel
//! overlayfs mount, becomes an OCI layer. Mounting that layer over the original lower layers
//! (no upper) must show the same tree as the container's mount did: paths, types, modes,
//! owners, sizes, contents, symlink targets, xattrs, mtimes and hard links. The layer itself
//! must use the OCI forms only (`.wh.NAME`, `.wh..wh..opq`) and hold no overlay xattrs.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use strata_tests::fsops::{lgetxattr, lremovexattr, lsetxattr};
use strata_tests::snapshot::{snapshot_with, SnapOpts};
use strata_tests::writes::{lchown, link, mkfifo, utimens};
use strata_tests::*;

/// Bound for one `strata commit`.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);

/// A fixed modification time for objects the tests touch.
const T0: i64 = 1_500_000_000;

/// Which filesystem writes the container's upper layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    Stratafs,
    Kernel,
}

/// One container: a layer stack to build, what the container does through its mount, and
/// what to check in the committed layer.
struct Case {
    fill: fn(&[Layer]),
    ops: fn(&Path),
    check: fn(&Path, Writer),
    /// Link counts of lower hard links also count names the merged view hides, which a
    /// committed layer cannot reproduce: compare link groups only.
    ignore_nlink: bool,
}

/// Runs `strata ARGS...` with a bounded wait.
fn strata(args: &[OsString]) -> CmdOutput {
    run_timeout(&mut cmd::command(strata_bin(), args), COMMIT_TIMEOUT)
}

fn commit_args(container: &Path, out: &Path, layers: &[PathBuf]) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["commit".into(), "--upper".into(), container.into()];
    a.extend(["--output".into(), out.into()]);
    for l in layers {
        a.extend(["--layer".into(), l.into()]);
    }
    a
}

/// Commits and panics unless it succeeds silently.
fn commit_ok(container: &Path, out: &Path, layers: &[PathBuf]) {
    let o = strata(&commit_args(container, out, layers)).expect_success();
    assert!(
        o.stderr.is_empty(),
        "commit wrote to stderr: {}",
        o.describe()
    );
}

/// Asserts the command failed with exactly one non-empty stderr line; returns that line.
fn one_line_failure(o: &CmdOutput) -> String {
    assert!(!o.timed_out, "strata hung: {}", o.describe());
    assert!(!o.status.success(), "bad input accepted: {}", o.describe());
    let err = o.stderr_str();
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines.len() == 1 && !lines[0].trim().is_empty(),
        "stderr should be one non-empty line: {}",
        o.describe()
    );
    assert!(
        !err.contains("panicked"),
        "strata panicked: {}",
        o.describe()
    );
    lines[0].to_string()
}

/// A merged view with mtimes; directory link counts are left out (a merged directory
/// reports 1, the same directory alone in one layer its real count), and with
/// `ignore_nlink` every link count.
fn view(root: &Path, ignore_nlink: bool) -> Snapshot {
    let opts = SnapOpts {
        all_xattrs: false,
        check_agreement: true,
        mtime: true,
    };
    let mut s = snapshot_with(root, opts);
    for e in s.values_mut() {
        if e.kind == Kind::Dir || ignore_nlink {
            e.nlink = 0;
        }
    }
    s
}

/// Asserts the committed layer uses OCI forms only: whiteouts and opaque markers are empty
/// regular files of mode 0, no char 0:0 device, no overlay xattr.
fn assert_oci_only(out: &Path) {
    let raw = snapshot_raw(out);
    let mut bad = Vec::new();
    for (path, e) in &raw {
        let name = path.rsplit('/').next().unwrap();
        if name.starts_with(".wh.") && (e.kind != Kind::File || e.size != Some(0) || e.mode != 0) {
            bad.push(format!("{path}: marker is not an empty mode-0 file: {e:?}"));
        }
        if e.kind == Kind::CharDev && e.rdev == Some((0, 0)) {
            bad.push(format!("{path}: char 0:0 whiteout"));
        }
        for (x, _) in &e.xattrs {
            if x.starts_with("trusted.overlay.") || x.starts_with("user.overlay.") {
                bad.push(format!("{path}: overlay xattr {x}"));
            }
        }
    }
    assert!(bad.is_empty(), "not an OCI layer:\n  {}", bad.join("\n  "));
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// The layers (top first) of a case, built under `scratch/layers`.
fn build_layers(sc: &Scratch, fill: fn(&[Layer])) -> Vec<PathBuf> {
    let layers: Vec<Layer> = (1..=2).map(|i| sc.layer(format!("layers/l{i}"))).collect();
    fill(&layers);
    layers.iter().map(|l| l.root().to_path_buf()).collect()
}

/// Mounts the container (`scratch/c`: `c/diff` upper, `c/work` workdir) with `writer`,
/// runs the case's operations, snapshots the merged view and unmounts.
fn run_container(sc: &Scratch, case: &Case, writer: Writer, lowers: &[PathBuf]) -> Snapshot {
    let (diff, work, mnt) = (sc.mkdir("c/diff"), sc.mkdir("c/work"), sc.mkdir("mnt"));
    let mut guard = match writer {
        Writer::Stratafs => Strata::new(lowers).upper(&diff, &work).mount(&mnt),
        Writer::Kernel => kernel_overlay(
            &mnt,
            lowers,
            Some((&diff, &work)),
            &["redirect_dir=on", "index=on"],
        ),
    };
    (case.ops)(&mnt);
    let before = view(&mnt, case.ignore_nlink);
    guard.unmount().expect("unmount the container");
    before
}

/// The whole round trip: container writes, commit, the committed layer mounted over the
/// original lower layers shows the same tree.
fn round_trip(case: &Case, writer: Writer) {
    let sc = Scratch::new();
    let lowers = build_layers(&sc, case.fill);
    let before = run_container(&sc, case, writer, &lowers);
    commit_and_compare(&sc, case, writer, &lowers, &before);
}

/// Commits `scratch/c`, checks the layer, mounts it over `lowers` and compares the view
/// with `before`, the container's.
fn commit_and_compare(
    sc: &Scratch,
    case: &Case,
    writer: Writer,
    lowers: &[PathBuf],
    before: &Snapshot,
) {
    let out = sc.join("out");
    commit_ok(&sc.join("c"), &out, lowers);
    assert_oci_only(&out);
    (case.check)(&out, writer);
    let mut stack = vec![out.clone()];
    stack.extend(lowers.iter().cloned());
    let mnt = sc.mkdir("check");
    let _g = Strata::new(&stack).mount(&mnt);
    let after = view(&mnt, case.ignore_nlink);
    assert_snapshots_eq(
        &format!("container's merged view ({writer:?})"),
        before,
        "committed layer over the lower layers",
        &after,
    );
}

// ---------------------------------------------------------------------------------------
// Case 1: files and directories created, changed and deleted.

/// l1 (top): `etc/conf`, `app/bin`. l2: `etc/{conf,keep,gone}`, `dir/a`, `dir/sub/b`,
/// `wipe/{x,sub/y}`, `xa` (with `user.k`), `lsym`, `fifo`.
fn changes_fill(ls: &[Layer]) {
    let (l1, l2) = (&ls[0], &ls[1]);
    l2.file("etc/conf", "base conf\n")
        .file("etc/keep", "keep\n")
        .file("etc/gone", "gone\n")
        .file("dir/a", "a\n")
        .file("dir/sub/b", "b\n")
        .file("wipe/x", "x\n")
        .file("wipe/sub/y", "y\n")
        .file("xa", "xattrs\n")
        .xattr("xa", "user.k", "v")
        .xattr("xa", "user.keep", "kept")
        .symlink("lsym", "etc/conf")
        .fifo("fifo");
    l1.file("etc/conf", "top conf\n")
        .file_mode("app/bin", "#!/bin/sh\n", 0o755);
}

fn changes_ops(m: &Path) {
    fs::write(m.join("etc/conf"), "changed by the container\n").unwrap();
    fs::remove_file(m.join("etc/gone")).unwrap();
    fs::rename(m.join("etc/keep"), m.join("etc/kept")).unwrap();
    fs::create_dir_all(m.join("new/deep")).unwrap();
    fs::write(m.join("new/deep/file"), "new\n").unwrap();
    std::os::unix::fs::symlink("../etc/conf", m.join("new/link")).unwrap();
    mkfifo(&m.join("new/pipe"), 0o640).unwrap();
    let dev = std::ffi::CString::new(m.join("new/null").into_os_string().into_encoded_bytes());
    assert_eq!(
        unsafe {
            libc::mknod(
                dev.unwrap().as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(1, 3),
            )
        },
        0,
        "mknod new/null"
    );
    fs::write(m.join("new/n1"), "two names\n").unwrap();
    link(&m.join("new/n1"), &m.join("new/n2")).unwrap();
    // rm -r + mkdir: an opaque directory.
    fs::remove_dir_all(m.join("wipe")).unwrap();
    fs::create_dir(m.join("wipe")).unwrap();
    fs::write(m.join("wipe/fresh"), "fresh\n").unwrap();
    // Owner, then set-id mode (chown clears set-id bits), times, xattrs.
    lchown(&m.join("dir/a"), 1234, 5678).unwrap();
    fs::set_permissions(m.join("dir/a"), fs::Permissions::from_mode(0o4750)).unwrap();
    fs::set_permissions(m.join("app"), fs::Permissions::from_mode(0o2750)).unwrap();
    utimens(&m.join("dir/a"), (T0, 1), (T0, 2)).unwrap();
    // Nothing reads a fifo, so its atime survives to the commit too.
    utimens(&m.join("new/pipe"), (T0 + 5, 3), (T0 + 6, 4)).unwrap();
    lsetxattr(&m.join("dir/sub/b"), "user.new", b"value").unwrap();
    lremovexattr(&m.join("xa"), "user.k").unwrap();
    fs::remove_file(m.join("lsym")).unwrap();
    std::os::unix::fs::symlink("etc/kept", m.join("lsym")).unwrap();
    utimens(&m.join("dir"), (T0, 0), (T0, 0)).unwrap();
}

fn changes_check(out: &Path, _: Writer) {
    for wh in ["etc/.wh.gone", "etc/.wh.keep", "wipe/.wh..wh..opq"] {
        assert!(exists(&out.join(wh)), "{wh} missing from the layer");
    }
    for absent in [
        "etc/keep",
        "wipe/x",
        "wipe/sub",
        "app/bin",
        "dir/.wh..wh..opq",
    ] {
        assert!(
            !exists(&out.join(absent)),
            "{absent} should not be in the layer"
        );
    }
    let a = fs::metadata(out.join("dir/a")).unwrap();
    assert_eq!((a.mode() & 0o7777, a.uid(), a.gid()), (0o4750, 1234, 5678));
    assert_eq!((a.mtime(), a.mtime_nsec()), (T0, 2));
    let p = fs::symlink_metadata(out.join("new/pipe")).unwrap();
    let times = (p.atime(), p.atime_nsec(), p.mtime(), p.mtime_nsec());
    assert_eq!(times, (T0 + 5, 3, T0 + 6, 4), "fifo atime and mtime");
    assert_eq!(
        fs::metadata(out.join("dir")).unwrap().mtime(),
        T0,
        "directory mtime"
    );
    assert_eq!(
        fs::metadata(out.join("app")).unwrap().mode() & 0o7777,
        0o2750
    );
    let (n1, n2) = (out.join("new/n1"), out.join("new/n2"));
    assert_eq!(
        fs::metadata(&n1).unwrap().ino(),
        fs::metadata(&n2).unwrap().ino(),
        "hard links in the upper stay hard links"
    );
    assert_eq!(lgetxattr(&out.join("xa"), "user.keep").unwrap(), b"kept");
}

#[test]
fn changes_through_stratafs() {
    round_trip(&CHANGES, Writer::Stratafs);
}

const CHANGES: Case = Case {
    fill: changes_fill,
    ops: changes_ops,
    check: changes_check,
    ignore_nlink: false,
};

// ---------------------------------------------------------------------------------------
// Case 2: renamed lower directories and a metadata-only copy.

/// l1: `ldir/{x,sub/z,hl1,hl2}` (hl1/hl2 one file), `other/deep/q`, `big.bin` (256 KiB).
/// l2: `ldir/base` (merges into ldir), `other/deep/r`.
fn renames_fill(ls: &[Layer]) {
    let (l1, l2) = (&ls[0], &ls[1]);
    l1.file("ldir/x", "x\n")
        .file("ldir/sub/z", "z\n")
        .file("ldir/hl1", "linked\n")
        .hardlink("ldir/hl2", "ldir/hl1")
        .file("other/deep/q", "q\n")
        .file("big.bin", pattern(256 << 10, 7));
    l2.file("ldir/base", "from l2\n")
        .file("other/deep/r", "r\n");
}

fn renames_ops(m: &Path) {
    fs::rename(m.join("ldir"), m.join("ldir2")).unwrap();
    fs::write(m.join("ldir2/sub/z"), "z changed\n").unwrap();
    fs::write(m.join("ldir2/new"), "new\n").unwrap();
    fs::remove_file(m.join("ldir2/x")).unwrap();
    fs::rename(m.join("other/deep"), m.join("moved")).unwrap();
    fs::create_dir(m.join("ldir")).unwrap();
    lchown(&m.join("big.bin"), 42, 43).unwrap();
    fs::set_permissions(m.join("big.bin"), fs::Permissions::from_mode(0o600)).unwrap();
}

fn renames_check(out: &Path, _: Writer) {
    for opq in ["ldir2/.wh..wh..opq", "moved/.wh..wh..opq"] {
        assert!(
            exists(&out.join(opq)),
            "renamed directory not opaque: {opq}"
        );
    }
    assert!(exists(&out.join("other/.wh.deep")), "old name of moved dir");
    let base = fs::read(out.join("ldir2/base")).unwrap();
    assert_eq!(base, b"from l2\n", "lower contents of the renamed dir");
    assert_eq!(fs::read(out.join("moved/r")).unwrap(), b"r\n");
    assert!(
        !exists(&out.join("ldir2/x")),
        "deleted entry of the renamed dir"
    );
    let (h1, h2) = (out.join("ldir2/hl1"), out.join("ldir2/hl2"));
    assert_eq!(
        fs::metadata(h1).unwrap().ino(),
        fs::metadata(h2).unwrap().ino()
    );
    let big = out.join("big.bin");
    assert_eq!(
        fs::read(&big).unwrap(),
        pattern(256 << 10, 7),
        "data of big.bin"
    );
    let md = fs::metadata(&big).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o600, 42, 43));
}

const RENAMES: Case = Case {
    fill: renames_fill,
    ops: renames_ops,
    check: renames_check,
    ignore_nlink: false,
};

#[test]
fn renamed_dirs_and_metadata_only_copy_through_stratafs() {
    let sc = Scratch::new();
    let lowers = build_layers(&sc, RENAMES.fill);
    let before = run_container(&sc, &RENAMES, Writer::Stratafs, &lowers);
    let big = fs::metadata(sc.join("c/diff/big.bin")).unwrap();
    assert!(
        big.blocks() * 512 < 64 << 10,
        "chmod did not make a metadata-only copy ({} blocks); the test checks nothing",
        big.blocks()
    );
    // Without the lower layers the renamed directory cannot be resolved.
    let out = sc.join("out-no-layers");
    let o = strata(&commit_args(&sc.join("c"), &out, &[]));
    let line = one_line_failure(&o);
    assert!(
        line.contains("--layer"),
        "error should name --layer: {line}"
    );
    assert!(
        !exists(&out),
        "a failed commit left {} behind",
        out.display()
    );
    commit_and_compare(&sc, &RENAMES, Writer::Stratafs, &lowers, &before);
}

// ---------------------------------------------------------------------------------------
// Case 3: lower hard links modified through one name.

/// l2: `h1`, `h2`, `d/h3`, `e/h4` (one file), `other`. l1: another file at `h2`, which
/// hides that name of the link.
fn hardlinks_fill(ls: &[Layer]) {
    let (l1, l2) = (&ls[0], &ls[1]);
    l2.file("h1", "shared\n")
        .hardlink("h2", "h1")
        .hardlink("d/h3", "h1")
        .hardlink("e/h4", "h1")
        .file("other", "other\n");
    l1.file("h2", "not a link\n");
}

fn hardlinks_ops(m: &Path) {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.join("h1"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"appended through h1\n").unwrap();
    drop(f);
    assert_eq!(
        fs::read(m.join("d/h3")).unwrap(),
        b"shared\nappended through h1\n",
        "the overlay shows the change through the other names"
    );
    fs::remove_file(m.join("e/h4")).unwrap();
}

fn hardlinks_check(out: &Path, _: Writer) {
    let h1 = fs::metadata(out.join("h1")).unwrap();
    let h3 = fs::metadata(out.join("d/h3")).unwrap();
    assert_eq!(
        h1.ino(),
        h3.ino(),
        "d/h3 is a hard link of the committed h1"
    );
    assert!(!exists(&out.join("h2")), "h2 shows l1's own file");
    assert!(exists(&out.join("e/.wh.h4")));
}

const HARDLINKS: Case = Case {
    fill: hardlinks_fill,
    ops: hardlinks_ops,
    check: hardlinks_check,
    ignore_nlink: true,
};

#[test]
fn lower_hardlinks_through_stratafs() {
    round_trip(&HARDLINKS, Writer::Stratafs);
}

// ---------------------------------------------------------------------------------------
// Case 4: the same containers, written by kernel overlayfs.

#[test]
fn uppers_written_by_kernel_overlayfs() {
    for case in [&CHANGES, &RENAMES, &HARDLINKS] {
        round_trip(case, Writer::Kernel);
    }
}

// ---------------------------------------------------------------------------------------
// Details and bad input.

/// A user's `trusted.overlay.X` is stored escaped in the upper layer and comes out as
/// `trusted.overlay.X`; a bare upper directory (no `diff/`) works without lower layers.
#[test]
fn escaped_overlay_xattrs_and_bare_upper() {
    let sc = Scratch::new();
    let lower = sc.layer("lower");
    lower.file("f", "f\n");
    let (upper, work, mnt) = (sc.mkdir("upper"), sc.mkdir("work"), sc.mkdir("mnt"));
    let g = Strata::new(&[lower.root()])
        .upper(&upper, &work)
        .mount(&mnt);
    lsetxattr(&mnt.join("f"), "trusted.overlay.mine", b"v").unwrap();
    drop(g);
    assert_eq!(
        lgetxattr(&upper.join("f"), "trusted.overlay.overlay.mine").unwrap(),
        b"v",
        "stored escaped"
    );
    let out = sc.join("out");
    commit_ok(&upper, &out, &[]);
    assert_eq!(
        lgetxattr(&out.join("f"), "trusted.overlay.mine").unwrap(),
        b"v"
    );
    assert!(lgetxattr(&out.join("f"), "trusted.overlay.overlay.mine").is_err());
    let leftovers: Vec<_> = fs::read_dir(sc.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".strata-commit"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary workdir left: {leftovers:?}"
    );
}

#[test]
fn bad_input_is_one_line() {
    let sc = Scratch::new();
    let container = sc.mkdir("c/diff").parent().unwrap().to_path_buf();
    sc.mkdir("c/work");
    let missing = strata(&commit_args(&sc.join("nope"), &sc.join("out1"), &[]));
    let line = one_line_failure(&missing);
    assert!(line.contains("nope"), "names the missing upper: {line}");
    assert!(!exists(&sc.join("out1")));

    let full = sc.mkdir("full");
    fs::write(full.join("already"), "here\n").unwrap();
    let o = strata(&commit_args(&container, &full, &[]));
    let line = one_line_failure(&o);
    assert!(line.contains("not empty"), "{line}");
    assert!(
        exists(&full.join("already")),
        "a non-empty output was touched"
    );

    let mut args = commit_args(&container, &sc.join("out2"), &[]);
    args.push("--bogus".into());
    one_line_failure(&strata(&args));
    one_line_failure(&strata(&[
        "commit".into(),
        "--upper".into(),
        container.into(),
    ]));
    let bad_layer = commit_args(&sc.join("c"), &sc.join("out3"), &[sc.join("no-layer")]);
    let line = one_line_failure(&strata(&bad_layer));
    assert!(line.contains("no-layer"), "{line}");
    assert!(!exists(&sc.join("out2")) && !exists(&sc.join("out3")));
}

/// The seeds' `docker commit`: a container with a kept writable layer changes files, the
/// layer is committed, and a new container on the committed layer plus the old stack sees
/// the changes, deletions included, while the old stack alone does not.
#[test]
fn run_commit_then_run_on_the_committed_layer() {
    let sc = Scratch::new();
    let app = sc.layer("app");
    app.file("app/config", "v1\n").file("app/old", "old\n");
    let container = sc.join("container");
    let out = sc.join("committed");
    let args = |v: &[&str]| -> Vec<OsString> { v.iter().map(OsString::from).collect() };
    let app_s = app.root().to_string_lossy().into_owned();
    let cont_s = container.to_string_lossy().into_owned();
    let script = "echo v2 > /app/config && rm /app/old && mkdir -p /app/new && echo n > /app/new/f";
    strata(&args(&[
        "run", "--upper", &cont_s, "--layer", &app_s, "--layer", "/", "--", "sh", "-c", script,
    ]))
    .expect_success();
    commit_ok(
        &container,
        &out,
        &[app.root().to_path_buf(), PathBuf::from("/")],
    );
    let out_s = out.to_string_lossy().into_owned();
    let show = "cat /app/config; ls /app; cat /app/new/f";
    let o = strata(&args(&[
        "run", "--layer", &out_s, "--layer", &app_s, "--layer", "/", "--", "sh", "-c", show,
    ]))
    .expect_success();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "v2\nconfig\nnew\nn\n");
    let o = strata(&args(&[
        "run",
        "--layer",
        &app_s,
        "--layer",
        "/",
        "--",
        "sh",
        "-c",
        "cat /app/config; ls /app",
    ]))
    .expect_success();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "v1\nconfig\nold\n");
}
