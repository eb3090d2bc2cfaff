//! The options containers/storage passes to a `mount_program`, one by one, on a direct
//! stratafs mount as root: the option line Podman writes for `--userns=keep-id` (empty
//! entries, `volatile`, a quoted SELinux `context=` with a comma, mappings with a leading
//! colon, a symlinked layer path), owner translation both ways, `squash_to_*`,
//! `xattr_permissions=2` with `user.containers.override_stat`, a read-only mount with an
//! empty lower directory, and access for other users.

use std::fs;
use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::process::Command;

use strata_tests::mount::mount_at;
use strata_tests::*;

fn owner(p: &std::path::Path) -> (u32, u32) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    (m.uid(), m.gid())
}

fn xattr(p: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let out = run(Command::new("getfattr")
        .args(["--absolute-names", "--only-values", "-n", name])
        .arg(p));
    out.success().then_some(out.stdout)
}

/// The keep-id line: stored 0..1001 show as 1..1002, stored 1001 (the user) shows as 0.
const KEEP_ID: &str = ":0:1:1001:1001:0:1:1002:1002:64535";

#[test]
fn podman_keep_id_line_maps_owners_both_ways() {
    let sc = Scratch::new();
    let lower = sc.layer("lower");
    lower
        .dir("d")
        .file("d/root_file", "r\n")
        .file("d/user_file", "u\n")
        .file("d/far", "f\n");
    chown(lower.path("d/user_file"), Some(1001), Some(1001)).unwrap();
    chown(lower.path("d/far"), Some(70000), Some(70000)).unwrap();
    let empty = sc.mkdir("empty");
    // containers/storage names layers through symlinks (overlay/l/XXXX -> ../ID/diff).
    std::os::unix::fs::symlink(lower.root(), sc.join("link")).unwrap();
    let up = sc.mkdir("upper");
    let work = sc.mkdir("work");
    let mnt = sc.mkdir("mnt");
    let opts = format!(
        "lowerdir={}::{}:,upperdir={},workdir={},,volatile,\
         context=\"system_u:object_r:container_file_t:s0:c1,c2\",\
         uidmapping={KEEP_ID},gidmapping={KEEP_ID}",
        sc.join("link").display(),
        empty.display(),
        up.display(),
        work.display()
    );
    let out = run_stratafs(&["-o", &opts, mnt.to_str().unwrap()]);
    let _g = MountGuard::fuse(&mnt);
    assert!(out.success(), "{}", out.describe());
    assert!(
        out.stderr_str().trim().is_empty(),
        "every option is known, so no warning: {}",
        out.describe()
    );
    assert_eq!(owner(&mnt.join("d/root_file")), (1, 1));
    assert_eq!(owner(&mnt.join("d/user_file")), (0, 0));
    assert_eq!(owner(&mnt.join("d/far")), (65534, 65534));

    // Root (shown 0) creates: stored as the user 1001. A chown to shown 5 stores 4.
    fs::write(mnt.join("d/new"), "n\n").unwrap();
    assert_eq!(owner(&mnt.join("d/new")), (0, 0));
    assert_eq!(owner(&up.join("d/new")), (1001, 1001));
    chown(mnt.join("d/new"), Some(5), Some(5)).unwrap();
    assert_eq!(owner(&mnt.join("d/new")), (5, 5));
    assert_eq!(owner(&up.join("d/new")), (4, 4));
    // Copy-up keeps the stored owner.
    fs::write(mnt.join("d/root_file"), "changed\n").unwrap();
    assert_eq!(owner(&up.join("d/root_file")), (0, 0));
    assert_eq!(owner(&mnt.join("d/root_file")), (1, 1));
    // fsync under volatile succeeds.
    let f = fs::OpenOptions::new()
        .append(true)
        .open(mnt.join("d/new"))
        .unwrap();
    f.sync_all().unwrap();
}

#[test]
fn squash_options_show_one_owner() {
    let sc = Scratch::new();
    let lower = sc.layer("lower");
    lower.file("f", "x").dir("d");
    chown(lower.path("f"), Some(1234), Some(4321)).unwrap();
    for (i, (opt, want)) in [
        ("squash_to_root", (0, 0)),
        ("squash_to_uid=7,squash_to_gid=8", (7, 8)),
        ("squash_to_uid=9", (9, 4321)),
    ]
    .into_iter()
    .enumerate()
    {
        let up = sc.mkdir(format!("up{i}"));
        let work = sc.mkdir(format!("work{i}"));
        let mnt = sc.mkdir(format!("mnt{i}"));
        let _g = Strata::new(&[lower.root()])
            .upper(&up, &work)
            .opt(opt)
            .mount(&mnt);
        assert_eq!(owner(&mnt.join("f")), want, "{opt}");
        fs::write(mnt.join("d/new"), "n").unwrap();
        let shown = owner(&mnt.join("d/new"));
        assert_eq!(shown.0, want.0, "{opt}: new file");
        // A chown is accepted and stored; the view stays squashed.
        chown(mnt.join("d/new"), Some(55), Some(55)).unwrap();
        assert_eq!(owner(&up.join("d/new")), (55, 55), "{opt}");
        assert_eq!(owner(&mnt.join("d/new")).0, want.0, "{opt}");
    }
}

#[test]
fn xattr_permissions_keep_owner_and_mode_in_override_xattr() {
    let sc = Scratch::new();
    let lower = sc.layer("lower");
    lower.dir("d").file_mode("d/f", "x", 0o644);
    let set = |p: &std::path::Path, v: &str| {
        run(Command::new("setfattr")
            .args(["-n", "user.containers.override_stat", "-v", v])
            .arg(p))
        .expect_success();
    };
    // The layer declares the override on its root; its file says 5:6 and mode 0700.
    set(lower.root(), "0:0:0755");
    set(&lower.path("d/f"), "5:6:0700");
    let up = sc.mkdir("upper");
    let work = sc.mkdir("work");
    let mnt = sc.mkdir("mnt");
    let _g = Strata::new(&[lower.root()])
        .upper(&up, &work)
        .opt("xattr_permissions=2")
        .mount(&mnt);
    let m = fs::metadata(mnt.join("d/f")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (5, 6, 0o700));
    let listed = run(Command::new("getfattr")
        .args(["-d", "-m", "-"])
        .arg(mnt.join("d/f")));
    assert!(
        !listed.stdout_str().contains("override_stat"),
        "override xattr visible: {}",
        listed.describe()
    );

    // A new file and a chmod/chown through the mount go to the override, not the inode.
    fs::write(mnt.join("d/new"), "n").unwrap();
    chown(mnt.join("d/new"), Some(33), Some(44)).unwrap();
    fs::set_permissions(mnt.join("d/new"), fs::Permissions::from_mode(0o4711)).unwrap();
    let m = fs::metadata(mnt.join("d/new")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (33, 44, 0o4711));
    let real = fs::metadata(up.join("d/new")).unwrap();
    assert_eq!(
        (real.uid(), real.gid()),
        (0, 0),
        "the inode keeps the writer's ids"
    );
    assert_ne!(real.mode() & 0o7777, 0o4711);
    let v = xattr(&up.join("d/new"), "user.containers.override_stat").expect("override set");
    assert_eq!(String::from_utf8_lossy(&v), "33:44:04711");
}

#[test]
fn read_only_without_upper_and_with_an_empty_lower() {
    let sc = Scratch::new();
    let (l1, l2) = basic_stack(&sc, "l");
    let empty = sc.mkdir("empty");
    let mnt = sc.mkdir("mnt");
    let _g = Strata::new(&[empty.as_path(), l1.root(), l2.root()]).mount(&mnt);
    assert_basic_view(&mnt);
    let err = fs::write(mnt.join("new"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
}

#[test]
fn a_privileged_mount_serves_other_users() {
    let sc = Scratch::new();
    let (l1, l2) = basic_stack(&sc, "l");
    let mnt = sc.mkdir("mnt");
    let _g = Strata::new(&[l1.root(), l2.root()]).mount(&mnt);
    let info = mount_at(&mnt).expect("mounted");
    assert!(info.super_opts.contains("allow_other"), "{info:?}");
    let user = ensure_test_user();
    let out = run_as(&user, &["ls", mnt.to_str().unwrap()]);
    assert!(out.success(), "{}", out.describe());
}
