//! Rootless mounts: as the unprivileged user `stratatest` through fusermount3, and as root
//! inside `unshare --user --map-root-user --mount` (daemon mode and `-f` in the background).

use std::collections::BTreeMap;
use std::os::unix::fs::lchown;
use std::path::Path;
use std::time::Duration;

use strata_tests::user::run_as_timeout;
use strata_tests::*;

/// Layers in rootless formats (OCI whiteouts, user.overlay opaque), owned by `user` except
/// `rootfile`, which stays root's.
fn rootless_stack(sc: &Scratch, user: &TestUser) -> (Layer, Layer) {
    let l1 = sc.layer("l1");
    let l2 = sc.layer("l2");
    l1.file("top.txt", "top\n")
        .whiteout("gone", Whiteout::Oci)
        .whiteout("gone2", Whiteout::UserXattr)
        .opaque("opq", Opaque::UserXattr)
        .file("opq/mine", "mine\n");
    l2.file("bottom.txt", "bottom\n")
        .file("gone", "gone\n")
        .file("gone2", "gone\n")
        .file("opq/theirs", "theirs\n")
        .file("rootfile", "root\n");
    chown_tree(l1.root(), user);
    chown_tree(l2.root(), user);
    lchown(l2.path("rootfile"), Some(0), Some(0)).unwrap();
    (l1, l2)
}

fn ok_as(user: &TestUser, args: &[&str]) -> String {
    let out = run_as(user, args);
    assert!(out.success(), "as {}: {}", user.name, out.describe());
    out.stdout_str()
}

#[test]
fn plain_user_mounts_through_fusermount3() {
    let user = ensure_test_user();
    ensure_dev_fuse_rw();
    let sc = Scratch::new();
    let (l1, l2) = rootless_stack(&sc, &user);
    let mnt = sc.mkdir("mnt");
    chown_tree(&mnt, &user);
    let bin = PublicBin::new();
    let m = mnt.to_string_lossy().into_owned();
    let out = run_as(
        &user,
        &[
            bin.path().to_string_lossy().as_ref(),
            "-o",
            &lowerdir_opt(&[l1.root(), l2.root()]),
            &m,
        ],
    );
    let mut g = MountGuard::fuse(&mnt).unmount_as(&user);
    assert!(out.success(), "rootless mount failed: {}", out.describe());
    assert!(
        !out.pipes_hung,
        "launcher pipes left open: {}",
        out.describe()
    );
    let info = mount_at(&mnt).expect("mounted");
    assert_eq!(info.fstype, "fuse.stratafs");
    assert_eq!(
        ok_as(&user, &["ls", "-A", &m]),
        "bottom.txt\nopq\nrootfile\ntop.txt\n",
        "merged listing as {}",
        user.name
    );
    assert_eq!(ok_as(&user, &["cat", &format!("{m}/top.txt")]), "top\n");
    assert_eq!(
        ok_as(&user, &["cat", &format!("{m}/bottom.txt")]),
        "bottom\n"
    );
    assert_eq!(ok_as(&user, &["ls", "-A", &format!("{m}/opq")]), "mine\n");
    assert_eq!(
        ok_as(&user, &["stat", "-c", "%u %g", &format!("{m}/top.txt")]).trim(),
        format!("{} {}", user.uid, user.gid)
    );
    assert_eq!(
        ok_as(&user, &["stat", "-c", "%u", &format!("{m}/rootfile")]).trim(),
        "0"
    );
    let gone = run_as(&user, &["stat", &format!("{m}/gone")]);
    assert!(
        !gone.success(),
        "whited-out name visible: {}",
        gone.describe()
    );
    let daemons = g.pids().to_vec();
    assert_eq!(daemons.len(), 1, "daemon pids: {daemons:?}");
    let owner = std::fs::read_to_string(format!("/proc/{}/status", daemons[0])).unwrap();
    let uid_line = owner
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    assert!(
        uid_line.split_whitespace().nth(2) == Some(&user.uid.to_string()),
        "daemon should run as {} (euid {}): {uid_line}",
        user.name,
        user.uid
    );
    ok_as(&user, &["fusermount3", "-u", &m]);
    assert!(
        g.wait_gone(Duration::from_secs(10)),
        "after fusermount3 -u: mounted={} daemons alive={:?}",
        is_mounted(&mnt),
        daemons
            .iter()
            .filter(|p| pid_alive(**p))
            .collect::<Vec<_>>()
    );
}

const NS_SCRIPT: &str = r#"
set -eu
BIN=$1 MNT=$2 L1=$3 L2=$4 MNT2=$5
is_mounted() { awk -v m="$1" '$2==m {f=1} END {exit !f}' /proc/self/mounts; }
echo "uid=$(id -u)"
"$BIN" -o "lowerdir=$L1:$L2" "$MNT"
is_mounted "$MNT" && echo "mounted=yes"
echo "type=$(awk -v m="$MNT" '$2==m {print $3}' /proc/self/mounts)"
echo "ls=$(ls -A "$MNT" | tr '\n' ' ')"
echo "top=$(cat "$MNT/top.txt")"
echo "opq=$(ls -A "$MNT/opq" | tr '\n' ' ')"
echo "owner_top=$(stat -c %u "$MNT/top.txt")"
echo "owner_root=$(stat -c %u "$MNT/rootfile")"
umount "$MNT"
is_mounted "$MNT" || echo "unmounted=yes"
"$BIN" -f -o "lowerdir=$L1:$L2" "$MNT2" </dev/null >/dev/null 2>&1 &
pid=$!
i=0
while ! is_mounted "$MNT2"; do
  i=$((i+1))
  if [ $i -gt 100 ]; then echo "fg=timeout"; kill -9 $pid; exit 1; fi
  sleep 0.1
done
echo "fg_ls=$(ls -A "$MNT2" | tr '\n' ' ')"
kill -TERM $pid
wait $pid || echo "fg_status=$?"
is_mounted "$MNT2" || echo "fg_unmounted=yes"
"#;

#[test]
fn root_in_user_namespace_mounts_and_unmounts() {
    let user = ensure_test_user();
    ensure_dev_fuse_rw();
    let sc = Scratch::new();
    let (l1, l2) = rootless_stack(&sc, &user);
    let mnt = sc.mkdir("mnt");
    let mnt2 = sc.mkdir("mnt2");
    chown_tree(&mnt, &user);
    chown_tree(&mnt2, &user);
    let bin = PublicBin::new();
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let out = run_as_timeout(
        &user,
        &[
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            NS_SCRIPT,
            "sh",
            &s(&bin.path()),
            &s(&mnt),
            &s(l1.root()),
            &s(l2.root()),
            &s(&mnt2),
        ],
        Duration::from_secs(60),
    );
    // Nothing may outlive the namespace's script.
    let left = |m: &Path| daemon_pids(m);
    let gone = wait_for(Duration::from_secs(10), || {
        left(&mnt).is_empty() && left(&mnt2).is_empty()
    });
    for p in left(&mnt).into_iter().chain(left(&mnt2)) {
        strata_tests::mount::signal(p, libc::SIGKILL);
    }
    assert!(
        out.success(),
        "script in user namespace failed: {}",
        out.describe()
    );
    let kv: BTreeMap<String, String> = out
        .stdout_str()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect();
    let get = |k: &str| {
        kv.get(k)
            .cloned()
            .unwrap_or_else(|| format!("<missing {k}>"))
    };
    let ctx = out.describe();
    assert_eq!(get("uid"), "0", "{ctx}");
    assert_eq!(get("mounted"), "yes", "{ctx}");
    assert_eq!(get("type"), "fuse.stratafs", "{ctx}");
    assert_eq!(get("ls"), "bottom.txt opq rootfile top.txt", "{ctx}");
    assert_eq!(get("top"), "top", "{ctx}");
    assert_eq!(get("opq"), "mine", "{ctx}");
    assert_eq!(
        get("owner_top"),
        "0",
        "user-owned file shows as root in the namespace: {ctx}"
    );
    assert_eq!(
        get("owner_root"),
        "65534",
        "unmapped owner shows as nobody: {ctx}"
    );
    assert_eq!(get("unmounted"), "yes", "{ctx}");
    assert_eq!(get("fg_ls"), "bottom.txt opq rootfile top.txt", "{ctx}");
    assert_eq!(get("fg_unmounted"), "yes", "{ctx}");
    assert!(gone, "stratafs processes outlived the namespace script");
    assert!(!is_mounted(&mnt) && !is_mounted(&mnt2));
}
