//! Command line: `--version`/`--help`, `-o` handling, escaped colons, unknown and generic
//! options, the `mount -t fuse.stratafs` helper path and the type shown in /proc/mounts.

use std::process::Command;

use strata_tests::mount::proc_mounts_type;
use strata_tests::*;

fn mounted(args: &[String], mnt: &std::path::Path) -> (MountGuard, CmdOutput) {
    let out = run_stratafs(args);
    let g = MountGuard::fuse(mnt);
    assert!(out.success(), "mount failed: {}", out.describe());
    assert!(
        is_mounted(mnt),
        "exit 0 but nothing mounted: {}",
        out.describe()
    );
    (g, out)
}

fn s(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn version_exits_zero_and_prints_version() {
    let out = run_stratafs(&["--version"]);
    assert!(out.success(), "{}", out.describe());
    let text = out.stdout_str() + &out.stderr_str();
    assert!(
        text.contains(env!("CARGO_PKG_VERSION")),
        "--version output lacks {}: {}",
        env!("CARGO_PKG_VERSION"),
        out.describe()
    );
}

#[test]
fn help_exits_zero_and_documents_lowerdir() {
    let out = run_stratafs(&["--help"]);
    assert!(out.success(), "{}", out.describe());
    let text = out.stdout_str() + &out.stderr_str();
    assert!(
        text.contains("lowerdir"),
        "--help does not mention lowerdir: {}",
        out.describe()
    );
}

#[test]
fn repeated_o_and_empty_items_are_tolerated() {
    let sc = Scratch::new();
    let (l1, l2) = basic_stack(&sc, "l");
    let mnt = sc.mkdir("mnt");
    let args = vec![
        "-o".to_string(),
        format!("{},,ro,", lowerdir_opt(&[l1.root(), l2.root()])),
        "-o".to_string(),
        "noatime,".to_string(),
        s(&mnt),
    ];
    let (_g, _) = mounted(&args, &mnt);
    assert_basic_view(&mnt);
}

#[test]
fn repeated_o_splits_lower_upper_and_work() {
    let sc = Scratch::new();
    let (l1, l2) = basic_stack(&sc, "l");
    let up = sc.mkdir("upper");
    let work = sc.mkdir("work");
    let mnt = sc.mkdir("mnt");
    let args = vec![
        "-o".to_string(),
        lowerdir_opt(&[l1.root(), l2.root()]),
        "-o".to_string(),
        format!("upperdir={}", up.display()),
        "-o".to_string(),
        format!("workdir={}", work.display()),
        s(&mnt),
    ];
    let (_g, _) = mounted(&args, &mnt);
    assert_basic_view(&mnt);
}

#[test]
fn escaped_colon_in_lowerdir_path() {
    let sc = Scratch::new();
    let top = sc.layer("la:yer");
    top.file("colon.txt", "colon\n");
    let bottom = sc.layer("plain");
    bottom.file("plain.txt", "plain\n");
    let mnt = sc.mkdir("mnt");
    let opt = lowerdir_opt(&[top.root(), bottom.root()]);
    assert!(opt.contains("la\\:yer"), "{opt}");
    let (_g, _) = mounted(&["-o".into(), opt, s(&mnt)], &mnt);
    assert_eq!(names(&mnt), ["colon.txt", "plain.txt"]);
    assert_eq!(
        std::fs::read_to_string(mnt.join("colon.txt")).unwrap(),
        "colon\n"
    );
}

#[test]
fn unknown_option_is_warned_and_ignored() {
    let sc = Scratch::new();
    let (l1, l2) = basic_stack(&sc, "l");
    let mnt = sc.mkdir("mnt");
    let args = vec![
        "-o".to_string(),
        format!(
            "{},frobnicate_xyzzy=1",
            lowerdir_opt(&[l1.root(), l2.root()])
        ),
        s(&mnt),
    ];
    let (_g, out) = mounted(&args, &mnt);
    assert!(
        out.stderr_str().contains("frobnicate_xyzzy"),
        "stderr should warn about the unknown option: {}",
        out.describe()
    );
    assert_basic_view(&mnt);
}

fn generic(opts: &str, want_flags: &[&str], unwanted_flags: &[&str]) {
    let sc = Scratch::new();
    let (l1, l2) = basic_stack(&sc, "l");
    let mnt = sc.mkdir("mnt");
    let args = vec![
        "-o".to_string(),
        format!("{},{opts}", lowerdir_opt(&[l1.root(), l2.root()])),
        s(&mnt),
    ];
    let (_g, _) = mounted(&args, &mnt);
    assert_basic_view(&mnt);
    let info = mount_at(&mnt).unwrap();
    let flags: Vec<&str> = info.mount_opts.split(',').collect();
    for f in want_flags {
        assert!(
            flags.contains(f),
            "-o {opts}: mount flags {flags:?} lack {f}"
        );
    }
    for f in unwanted_flags {
        assert!(
            !flags.contains(f),
            "-o {opts}: mount flags {flags:?} contain {f}"
        );
    }
}

#[test]
fn generic_options_allow_other_family_accepted() {
    generic(
        "allow_other,default_permissions,ro,nosuid,nodev,noexec,noatime,max_write=131072",
        &["ro", "nosuid", "nodev", "noexec", "noatime"],
        &[],
    );
}

#[test]
fn generic_options_allow_root_family_accepted() {
    generic(
        "allow_root,suid,dev,exec,atime",
        &[],
        &["nosuid", "nodev", "noexec", "noatime"],
    );
}

#[test]
fn source_argument_is_accepted_and_type_is_fuse_stratafs() {
    let sc = Scratch::new();
    let (l1, l2) = basic_stack(&sc, "l");
    let mnt = sc.mkdir("mnt");
    let args = vec![
        "my-source".to_string(),
        "-o".to_string(),
        lowerdir_opt(&[l1.root(), l2.root()]),
        s(&mnt),
    ];
    let (_g, _) = mounted(&args, &mnt);
    assert_basic_view(&mnt);
    assert_eq!(proc_mounts_type(&mnt).as_deref(), Some("fuse.stratafs"));
    assert_eq!(mount_at(&mnt).unwrap().fstype, "fuse.stratafs");
}

/// What `mount -t fuse.stratafs` runs: `mount.fuse3 stratafs MNT -o OPTS`, which looks the
/// program up on PATH. (mount(8) itself drops PATH from the environment before running the
/// helper, so the literal `mount -t` form is tested in a private mount namespace below.)
#[test]
fn mount_fuse3_helper_runs_stratafs_from_path() {
    let sc = Scratch::new();
    let (l1, l2) = basic_stack(&sc, "l");
    let mnt = sc.mkdir("mnt");
    let pb = PublicBin::new();
    let out = run(Command::new("mount.fuse3")
        .env("PATH", pb.path_env())
        .arg("stratafs")
        .arg(&mnt)
        .arg("-o")
        .arg(lowerdir_opt(&[l1.root(), l2.root()])));
    let g = MountGuard::fuse(&mnt);
    assert!(out.success(), "mount.fuse3 failed: {}", out.describe());
    assert!(
        !out.pipes_hung,
        "helper's pipes stayed open: {}",
        out.describe()
    );
    assert_eq!(g.pids().len(), 1, "stratafs daemon for {}", mnt.display());
    assert_eq!(proc_mounts_type(&mnt).as_deref(), Some("fuse.stratafs"));
    assert_basic_view(&mnt);
}

/// The literal `mount -t fuse.stratafs stratafs MNT -o lowerdir=...`, inside a private mount
/// namespace where the binary is bind-mounted onto /usr/local/sbin (first on the default
/// PATH the helper's shell uses). Nothing outside the namespace changes.
#[test]
fn mount_t_fuse_stratafs_in_private_namespace() {
    let sc = Scratch::new();
    let (l1, l2) = basic_stack(&sc, "l");
    let mnt = sc.mkdir("mnt");
    let pb = PublicBin::new();
    let script = r#"
set -eu
BINDIR=$1 MNT=$2 OPTS=$3
mount --bind "$BINDIR" /usr/local/sbin
mount -t fuse.stratafs stratafs "$MNT" -o "$OPTS"
echo "type=$(awk -v m="$MNT" '$2==m {print $3}' /proc/self/mounts)"
echo "ls=$(ls -A "$MNT" | tr '\n' ' ')"
echo "both=$(cat "$MNT/both.txt")"
umount "$MNT"
awk -v m="$MNT" '$2==m {f=1} END {exit f}' /proc/self/mounts && echo "unmounted=yes"
"#;
    let out = run(Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(pb.dir())
        .arg(&mnt)
        .arg(lowerdir_opt(&[l1.root(), l2.root()])));
    let gone = wait_for(std::time::Duration::from_secs(10), || {
        daemon_pids(&mnt).is_empty()
    });
    let _g = MountGuard::fuse(&mnt);
    assert!(out.success(), "{}", out.describe());
    let text = out.stdout_str();
    for want in [
        "type=fuse.stratafs",
        "ls=both.txt bottom.txt dir top.txt",
        "both=from top",
        "unmounted=yes",
    ] {
        assert!(
            text.lines().any(|l| l.trim() == want),
            "missing {want:?}: {}",
            out.describe()
        );
    }
    assert!(gone, "daemon still running after umount in the namespace");
    assert!(
        !is_mounted(&mnt),
        "mount leaked out of the private namespace"
    );
}
