//! The key write cases without privilege: as the plain user `stratatest` through
//! fusermount3, and as root inside `unshare --user --map-root-user --mount`. The merged tree
//! (owners left out) must match what the same operations give on kernel overlayfs as root,
//! also after a remount; whiteouts must exist in a form the upper can hold.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use strata_tests::user::run_as_timeout;
use strata_tests::writes::KERNEL_OPTS;
use strata_tests::*;

/// The operations, as a shell script taking the mount point: create, write to a lower file
/// (copy-up), unlink a lower file (whiteout), delete a lower dir and make a new one in its
/// place (opaque), rename(2) a lower dir (redirect; perl calls rename(2) directly, unlike
/// `mv`, which would fall back to copying on EXDEV), write to and remove names of a lower
/// hard link (index), chmod a large lower file (metadata-only copy-up).
const OPS: &str = r#"
set -eu
M=$1
echo new > "$M/new.txt"
echo more >> "$M/lower.txt"
rm "$M/gone.txt"
rm -r "$M/deldir"
mkdir "$M/deldir"
echo fresh > "$M/deldir/fresh"
perl -e 'rename($ARGV[0], $ARGV[1]) or die "rename(2) of a lower dir: $!\n"' "$M/ren" "$M/ren2"
echo n > "$M/ren2/sub/n"
echo linked >> "$M/hl1"
rm "$M/sub/hl3"
chmod 600 "$M/big.bin"
echo ops=done
"#;

/// Prints the merged tree without owners: path, type, mode, file size, link target, then
/// content checksums.
const LISTING: &str = r#"
set -eu
cd "$1"
find . -mindepth 1 \( -type f -printf '%P f %m %s %n\n' \) -o \( -type l -printf '%P l %l\n' \) -o -printf '%P %y %m\n' | LC_ALL=C sort
find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r md5sum
"#;

fn fill(l1: &Layer, l2: &Layer) {
    l2.file("lower.txt", "lower\n")
        .file("gone.txt", "gone\n")
        .file("both.txt", "bottom\n")
        .file("deldir/a", "a\n")
        .file("deldir/b", "b\n")
        .file("ren/x", "x\n")
        .file("ren/sub/y", "y\n")
        .file("hl1", "hard-linked\n")
        .hardlink("hl2", "hl1")
        .hardlink("sub/hl3", "hl1")
        .file("big.bin", pattern(300_000, 3));
    l1.file("both.txt", "top\n").file("top.txt", "top\n");
}

/// Layer copies for one side: `root/l1`, `root/l2`, `root/upper`, `root/work`, `root/mnt`.
struct Side {
    lowers: Vec<PathBuf>,
    upper: PathBuf,
    work: PathBuf,
    mnt: PathBuf,
}

fn side(sc: &Scratch, name: &str, user: Option<&TestUser>) -> Side {
    let root = sc.mkdir(name);
    let (l1, l2) = (Layer::new(root.join("l1")), Layer::new(root.join("l2")));
    fill(&l1, &l2);
    let s = Side {
        lowers: vec![root.join("l1"), root.join("l2")],
        upper: sc.mkdir(format!("{name}/upper")),
        work: sc.mkdir(format!("{name}/work")),
        mnt: sc.mkdir(format!("{name}/mnt")),
    };
    if let Some(u) = user {
        chown_tree(&root, u);
    }
    s
}

fn lowers_snap(s: &Side) -> Vec<Snapshot> {
    s.lowers.iter().map(|l| snapshot_raw(l)).collect()
}

fn assert_lowers_unchanged(before: &[Snapshot], s: &Side) {
    for (i, (b, l)) in before.iter().zip(&s.lowers).enumerate() {
        assert_snapshots_eq(
            &format!("l{} before", i + 1),
            b,
            &format!("l{} after", i + 1),
            &snapshot_raw(l),
        );
    }
}

fn sh_as(user: &TestUser, script: &str, arg: &Path) -> String {
    let out = run_as(user, &["sh", "-c", script, "sh", &arg.to_string_lossy()]);
    assert!(out.success(), "as {}: {}", user.name, out.describe());
    out.stdout_str()
}

/// The same operations on kernel overlayfs as root; returns the listing.
fn kernel_listing(sc: &Scratch) -> String {
    let k = side(sc, "kernel", None);
    let g = kernel_overlay(&k.mnt, &k.lowers, Some((&k.upper, &k.work)), KERNEL_OPTS);
    let out = run(Command::new("sh").args(["-c", OPS, "sh"]).arg(&k.mnt));
    assert!(out.success(), "ops on kernel overlayfs: {}", out.describe());
    let out = run(Command::new("sh").args(["-c", LISTING, "sh"]).arg(&k.mnt));
    assert!(
        out.success(),
        "listing kernel overlayfs: {}",
        out.describe()
    );
    drop(g);
    let text = out.stdout_str();
    // The reference itself must show the operations' effects.
    let paths: Vec<&str> = text.lines().filter_map(|l| l.split(' ').next()).collect();
    for p in ["new.txt", "deldir/fresh", "ren2/sub/n", "ren2/x", "top.txt"] {
        assert!(paths.contains(&p), "kernel listing lacks {p}:\n{text}");
    }
    for p in ["gone.txt", "deldir/a", "ren"] {
        assert!(!paths.contains(&p), "kernel listing has {p}:\n{text}");
    }
    text
}

fn assert_listings_eq(kernel: &str, strata: &str, what: &str) {
    if kernel != strata {
        let k: Vec<&str> = kernel.lines().collect();
        let s: Vec<&str> = strata.lines().collect();
        let only_k: Vec<&&str> = k.iter().filter(|l| !s.contains(l)).collect();
        let only_s: Vec<&&str> = s.iter().filter(|l| !k.contains(l)).collect();
        panic!(
            "{what}: merged tree differs from kernel overlayfs\n  only kernel: {only_k:#?}\n  \
             only stratafs: {only_s:#?}"
        );
    }
}

/// A whiteout for `name` in upper dir `dir`: (`"chardev"` | `"oci"`), or `None`.
fn whiteout_form(dir: &Path, name: &str) -> Option<&'static str> {
    if let Ok(md) = fs::symlink_metadata(dir.join(name)) {
        if md.file_type().is_char_device() && md.rdev() == 0 {
            return Some("chardev");
        }
    }
    fs::symlink_metadata(dir.join(format!(".wh.{name}")))
        .ok()
        .map(|_| "oci")
}

#[test]
fn plain_user_writes_through_fusermount3() {
    let user = ensure_test_user();
    ensure_dev_fuse_rw();
    let sc = Scratch::new();
    let want = kernel_listing(&sc);
    let s = side(&sc, "strata", Some(&user));
    let before = lowers_snap(&s);
    let bin = PublicBin::new();
    let opts = format!(
        "{},upperdir={},workdir={}",
        lowerdir_opt(&s.lowers),
        s.upper.display(),
        s.work.display()
    );
    let mnt = s.mnt.to_string_lossy().into_owned();
    let mount = || {
        let out = run_as(
            &user,
            &[bin.path().to_string_lossy().as_ref(), "-o", &opts, &mnt],
        );
        let g = MountGuard::fuse(&s.mnt).unmount_as(&user);
        assert!(
            out.success(),
            "rootless mount with upper: {}",
            out.describe()
        );
        g
    };
    let mut g = mount();
    let out = sh_as(&user, OPS, &s.mnt);
    assert!(out.contains("ops=done"), "{out}");
    let got = sh_as(&user, LISTING, &s.mnt);
    assert_listings_eq(&want, &got, "plain user");
    // The deleted lower file left a whiteout the user could create.
    let form = whiteout_form(&s.upper, "gone.txt");
    assert!(
        form.is_some(),
        "no whiteout for gone.txt in the upper (neither char 0:0 nor .wh.gone.txt): {:?}",
        names(&s.upper)
    );
    eprintln!("plain user whiteout form: {form:?}");
    g.unmount().expect("user unmount");
    drop(g);
    let mut g = mount();
    let again = sh_as(&user, LISTING, &s.mnt);
    assert_listings_eq(&want, &again, "plain user, after remount");
    g.unmount().expect("user unmount");
    drop(g);
    assert_lowers_unchanged(&before, &s);
}

const NS_SCRIPT: &str = r#"
set -eu
BIN=$1 MNT=$2 L1=$3 L2=$4 UP=$5 WK=$6 OPS=$7 LISTING=$8
cleanup() { umount -l "$MNT" 2>/dev/null || true; }
trap cleanup EXIT
"$BIN" -o "lowerdir=$L1:$L2,upperdir=$UP,workdir=$WK" "$MNT"
sh -c "$OPS" sh "$MNT"
echo "--- listing1"
sh -c "$LISTING" sh "$MNT"
echo "--- end"
if [ -c "$UP/gone.txt" ]; then echo "wh=$(stat -c %t:%T "$UP/gone.txt")"; fi
if [ -e "$UP/.wh.gone.txt" ]; then echo "wh=oci"; fi
umount "$MNT"
"$BIN" -o "lowerdir=$L1:$L2,upperdir=$UP,workdir=$WK" "$MNT"
echo "--- listing2"
sh -c "$LISTING" sh "$MNT"
echo "--- end"
umount "$MNT"
echo "done=yes"
"#;

fn section(out: &str, name: &str) -> String {
    let start = format!("--- {name}\n");
    let i = out
        .find(&start)
        .unwrap_or_else(|| panic!("no section {name} in:\n{out}"))
        + start.len();
    let j = out[i..].find("--- end\n").expect("section end") + i;
    out[i..j].to_string()
}

#[test]
fn root_in_user_namespace_writes() {
    let user = ensure_test_user();
    ensure_dev_fuse_rw();
    let sc = Scratch::new();
    let want = kernel_listing(&sc);
    let s = side(&sc, "strata", Some(&user));
    let before = lowers_snap(&s);
    let bin = PublicBin::new();
    let p = |p: &Path| p.to_string_lossy().into_owned();
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
            &p(&bin.path()),
            &p(&s.mnt),
            &p(&s.lowers[0]),
            &p(&s.lowers[1]),
            &p(&s.upper),
            &p(&s.work),
            OPS,
            LISTING,
        ],
        Duration::from_secs(60),
    );
    // Nothing may outlive the namespace's script.
    let gone = wait_for(Duration::from_secs(10), || daemon_pids(&s.mnt).is_empty());
    for pid in daemon_pids(&s.mnt) {
        strata_tests::mount::signal(pid, libc::SIGKILL);
    }
    assert!(
        out.success(),
        "script in user namespace failed: {}",
        out.describe()
    );
    let text = out.stdout_str();
    let kv: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(kv.get("done"), Some(&"yes"), "{}", out.describe());
    assert_listings_eq(&want, &section(&text, "listing1"), "root in userns");
    assert_listings_eq(
        &want,
        &section(&text, "listing2"),
        "root in userns, after remount",
    );
    assert_eq!(
        kv.get("wh"),
        Some(&"0:0"),
        "root in a user namespace can create char 0:0 whiteouts; upper has {:?}",
        names(&s.upper)
    );
    assert!(gone, "stratafs daemon outlived the namespace script");
    assert!(!is_mounted(&s.mnt));
    assert_lowers_unchanged(&before, &s);
}
