//! Symlinks in layers never make the daemon serve host content as layer content: absolute
//! and `..` symlinks stay symlinks, lower-layer symlinks are not merged into directories or
//! used to place whiteouts, and a layer root given through a symlinked path works.

use std::fs;
use std::path::Path;

use strata_tests::*;

fn is_symlink(p: &Path) -> bool {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
        .file_type()
        .is_symlink()
}

#[test]
fn escaping_symlinks_stay_symlinks() {
    let sc = Scratch::new();
    let l1 = sc.layer("l1");
    let l2 = sc.layer("l2");
    l1.symlink("etc", "/etc")
        .symlink("x", "../../..")
        .symlink("abs", "/")
        .symlink("lnk", "realdir")
        .file("realdir/inside", "inside\n");
    l2.file("realdir/lower", "lower\n")
        .symlink("deep/up", "../../../../../../..");
    let mnt = sc.mkdir("mnt");
    let g = Strata::new(&[l1.root(), l2.root()]).mount(&mnt);
    let m = g.path();
    for (n, t) in [
        ("etc", "/etc"),
        ("x", "../../.."),
        ("abs", "/"),
        ("lnk", "realdir"),
        ("deep/up", "../../../../../../.."),
    ] {
        assert!(
            is_symlink(&m.join(n)),
            "{n} should be a symlink through the mount"
        );
        assert_eq!(
            fs::read_link(m.join(n)).unwrap(),
            Path::new(t),
            "readlink {n}"
        );
    }
    // Following is done by the kernel in the caller's namespace: MNT/etc/passwd is the host's.
    assert_eq!(
        fs::read(m.join("etc/passwd")).unwrap(),
        fs::read("/etc/passwd").unwrap(),
        "MNT/etc/passwd should resolve (kernel symlink following) to /etc/passwd"
    );
    // A dir symlink as an intermediate component resolves inside the mount.
    assert_eq!(
        fs::read_to_string(m.join("lnk/inside")).unwrap(),
        "inside\n"
    );
    assert_eq!(fs::read_to_string(m.join("lnk/lower")).unwrap(), "lower\n");
    assert_eq!(names(&m.join("lnk")), ["inside", "lower"]);
    assert_no_markers(&snapshot(m));
}

#[test]
fn lower_symlink_to_host_dir_is_not_merged_or_served() {
    let sc = Scratch::new();
    // Host directory outside every layer, with a secret and files a whiteout might "hide".
    let host = sc.mkdir("hostdir");
    fs::write(host.join("secret"), "SECRET\n").unwrap();
    fs::write(host.join("victim"), "victim\n").unwrap();
    fs::create_dir_all(host.join("b")).unwrap();
    fs::write(host.join("b/hostfile"), "host\n").unwrap();
    let host_before = snapshot_raw(&host);

    let l1 = sc.layer("l1");
    let l2 = sc.layer("l2");
    let l3 = sc.layer("l3");
    // d: a plain symlink to the host dir in the only layer that has it.
    l2.symlink("d", &host);
    // m: a real dir on top of a symlink to the host dir: no merge with the host's entries,
    // and the whiteouts in it must not reach through the symlink.
    l1.file("m/own", "own\n")
        .whiteout("m/victim", Whiteout::Oci)
        .whiteout("m/secret", Whiteout::CharDev);
    l2.symlink("m", &host);
    // a/b: the lower `a` is a symlink to the host; the upper `a/b` is real.
    l1.file("a/b/file1", "f1\n");
    l2.symlink("a", &host);
    // r: symlink on top, real dir below: the symlink wins.
    l1.symlink("r", &host);
    l3.file("r/lowerfile", "lower\n");

    let mnt = sc.mkdir("mnt");
    let g = Strata::new(&[l1.root(), l2.root(), l3.root()]).mount(&mnt);
    let mp = g.path();
    assert!(is_symlink(&mp.join("d")), "MNT/d must be a symlink");
    assert_eq!(fs::read_link(mp.join("d")).unwrap(), host);
    assert!(
        is_symlink(&mp.join("r")),
        "MNT/r must be a symlink (top layer wins)"
    );
    assert_eq!(
        names(&mp.join("m")),
        ["own"],
        "MNT/m must not merge the host dir"
    );
    assert_absent(&mp.join("m/secret"));
    assert_absent(&mp.join("m/victim"));
    assert_eq!(
        names(&mp.join("a")),
        ["b"],
        "MNT/a must not merge the host dir"
    );
    assert_eq!(
        names(&mp.join("a/b")),
        ["file1"],
        "MNT/a/b must not merge host's b"
    );
    assert_absent(&mp.join("a/secret"));
    assert_absent(&mp.join("a/b/hostfile"));
    let snap = snapshot(mp);
    for (p, e) in &snap {
        if e.kind == Kind::File {
            assert_ne!(e.size, Some(7), "{p}: looks like the host secret");
        }
        assert!(
            !p.contains("secret") && !p.contains("hostfile"),
            "host entry served: {p}"
        );
    }
    assert_no_markers(&snap);
    drop(g);
    assert_snapshots_eq(
        "host before",
        &host_before,
        "host after",
        &snapshot_raw(&host),
    );
}

#[test]
fn layer_root_given_through_symlinked_path() {
    let sc = Scratch::new();
    let (l1, l2) = basic_stack(&sc, "real");
    let links = sc.mkdir("links");
    std::os::unix::fs::symlink(l1.root(), links.join("top")).unwrap();
    std::os::unix::fs::symlink(l2.root(), links.join("bottom")).unwrap();
    // Also a symlinked parent directory.
    std::os::unix::fs::symlink(sc.path(), sc.join("via")).unwrap();
    let mnt = sc.mkdir("mnt");
    let g = Strata::new(&[links.join("top"), sc.join("via/links/bottom")]).mount(&mnt);
    assert_basic_view(g.path());
}
