//! The merged view: lookup through layers, listings (each name once, right d_type),
//! read/mmap/readlink/statfs/access, xattrs, EROFS for writes, every whiteout and opaque
//! format, and a 100k-entry directory with seekdir/telldir.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use strata_tests::fsops::{
    self, access, lgetxattr, llistxattr, lsetxattr, open_raw, read_dir_raw, read_via_mmap, statvfs,
    DirStream,
};
use strata_tests::*;

const BIG_LEN: usize = 100_000 + 123;

/// Three layers: L1 (top), L2, L3.
fn three_layers(sc: &Scratch) -> [Layer; 3] {
    let l1 = sc.layer("l1");
    let l2 = sc.layer("l2");
    let l3 = sc.layer("l3");
    l3.file("only3.txt", "three\n")
        .file("shared.txt", "from l3\n")
        .file("d/from3", "3\n")
        .file("d/sub/deep3", "deep3\n")
        .dir("only3dir/inner")
        .symlink("link3", "only3.txt");
    l2.file("only2.txt", "two\n")
        .file("shared.txt", "from l2\n")
        .file("d/from2", "2\n")
        .file("d/sub/deep2", "deep2\n")
        .file("big.bin", pattern(BIG_LEN, 7))
        .fifo("pipe")
        .file("x.txt", "xattrs\n")
        .xattr("x.txt", "user.alpha", "1")
        .xattr("x.txt", "user.beta", "two")
        .xattr("x.txt", "trusted.overlay.origin", "zz")
        .xattr("x.txt", "user.overlay.redirect", "/zz");
    l1.file("only1.txt", "one\n")
        .file("shared.txt", "from l1\n")
        .file("d/from1", "1\n")
        .symlink("sym", "only2.txt")
        .symlink("abs", "/nonexistent/target")
        .dir("emptydir")
        .file_mode("exec.sh", "#!/bin/sh\n", 0o755);
    [l1, l2, l3]
}

fn mount3(sc: &Scratch, l: &[Layer; 3]) -> MountGuard {
    let mnt = sc.mkdir("mnt");
    Strata::new(&[l[0].root(), l[1].root(), l[2].root()]).mount(&mnt)
}

#[test]
fn lookup_resolves_through_layers_top_wins() {
    let sc = Scratch::new();
    let l = three_layers(&sc);
    let g = mount3(&sc, &l);
    let m = g.path();
    assert_eq!(fs::read_to_string(m.join("only1.txt")).unwrap(), "one\n");
    assert_eq!(fs::read_to_string(m.join("only2.txt")).unwrap(), "two\n");
    assert_eq!(fs::read_to_string(m.join("only3.txt")).unwrap(), "three\n");
    assert_eq!(
        fs::read_to_string(m.join("shared.txt")).unwrap(),
        "from l1\n"
    );
    for (f, c) in [("d/from1", "1\n"), ("d/from2", "2\n"), ("d/from3", "3\n")] {
        assert_eq!(fs::read_to_string(m.join(f)).unwrap(), c, "{f}");
    }
    assert_eq!(
        fs::read_to_string(m.join("d/sub/deep3")).unwrap(),
        "deep3\n"
    );
    assert!(m.join("only3dir/inner").is_dir());
    assert_absent(&m.join("nope"));
    assert_absent(&m.join("d/nope"));
    let md = fs::symlink_metadata(m.join("exec.sh")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o755);
    // Merged directories report st_nlink 1, as the kernel does.
    assert_eq!(
        fs::metadata(m.join("d")).unwrap().nlink(),
        1,
        "merged dir nlink"
    );
    assert_eq!(fs::metadata(m).unwrap().nlink(), 1, "merged root nlink");
    // Walk the whole view: lookup/readdir agreement, no markers.
    assert_no_markers(&snapshot(m));
}

#[test]
fn merged_listing_has_each_name_once_with_dtype() {
    let sc = Scratch::new();
    let l = three_layers(&sc);
    let g = mount3(&sc, &l);
    let ents = read_dir_raw(g.path()).unwrap();
    let mut got = BTreeMap::new();
    for e in &ents {
        assert!(
            got.insert(e.name.clone(), e.kind).is_none(),
            "{} listed twice",
            e.name
        );
    }
    let want: BTreeMap<String, Kind> = [
        ("abs", Kind::Symlink),
        ("big.bin", Kind::File),
        ("d", Kind::Dir),
        ("emptydir", Kind::Dir),
        ("exec.sh", Kind::File),
        ("link3", Kind::Symlink),
        ("only1.txt", Kind::File),
        ("only2.txt", Kind::File),
        ("only3.txt", Kind::File),
        ("only3dir", Kind::Dir),
        ("pipe", Kind::Fifo),
        ("shared.txt", Kind::File),
        ("sym", Kind::Symlink),
        ("x.txt", Kind::File),
    ]
    .into_iter()
    .map(|(n, k)| (n.to_string(), k))
    .collect();
    assert_eq!(got, want, "root listing (name -> d_type)");
    let d: BTreeMap<String, Kind> = read_dir_raw(&g.join("d"))
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.kind))
        .collect();
    let want_d: BTreeMap<String, Kind> = [
        ("from1", Kind::File),
        ("from2", Kind::File),
        ("from3", Kind::File),
        ("sub", Kind::Dir),
    ]
    .into_iter()
    .map(|(n, k)| (n.to_string(), k))
    .collect();
    assert_eq!(d, want_d);
    assert_eq!(names(&g.join("d/sub")), ["deep2", "deep3"]);
    assert!(names(&g.join("emptydir")).is_empty());
    // Every name's readdir d_ino is the ino lstat reports.
    for e in &ents {
        let md = fs::symlink_metadata(g.join(&e.name)).unwrap();
        assert_eq!(e.ino, md.ino(), "{}: d_ino != st_ino", e.name);
    }
}

#[test]
fn readlink_read_mmap_statfs_access() {
    let sc = Scratch::new();
    let l = three_layers(&sc);
    let g = mount3(&sc, &l);
    let m = g.path();
    assert_eq!(
        fs::read_link(m.join("sym")).unwrap(),
        Path::new("only2.txt")
    );
    assert_eq!(
        fs::read_link(m.join("abs")).unwrap(),
        Path::new("/nonexistent/target")
    );
    assert_eq!(
        fs::read_link(m.join("link3")).unwrap(),
        Path::new("only3.txt")
    );
    assert!(fs::symlink_metadata(m.join("sym"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        fs::read_to_string(m.join("sym")).unwrap(),
        "two\n",
        "follow sym"
    );

    let want = pattern(BIG_LEN, 7);
    let got = fs::read(m.join("big.bin")).unwrap();
    assert!(
        got == want,
        "read(big.bin) differs from the layer's content"
    );
    let mapped = read_via_mmap(&m.join("big.bin")).unwrap();
    assert!(
        mapped == want,
        "mmap(big.bin) differs from the layer's content"
    );
    let f = fs::File::open(m.join("big.bin")).unwrap();
    let mut buf = vec![0u8; 5000];
    let n = f.read_at(&mut buf, 70_000).unwrap();
    assert_eq!(n, 5000);
    assert_eq!(&buf[..], &want[70_000..75_000], "pread at offset 70000");
    let n = f.read_at(&mut buf, BIG_LEN as u64 - 10).unwrap();
    assert_eq!(n, 10, "short read at EOF");

    let sv = statvfs(m).expect("statvfs on the mount");
    assert!(
        sv.f_bsize > 0 && sv.f_namemax > 0,
        "statvfs: bsize {} namemax {}",
        sv.f_bsize,
        sv.f_namemax
    );
    let sf = nix::sys::statfs::statfs(m).expect("statfs on the mount");
    assert_eq!(
        sf.filesystem_type().0 as i64,
        0x65735546,
        "f_type should be FUSE_SUPER_MAGIC"
    );

    access(&m.join("only3.txt"), libc::R_OK).expect("access(R_OK) on a lower file");
    access(&m.join("d"), libc::R_OK | libc::X_OK).expect("access(R_OK|X_OK) on a merged dir");
    access(&m.join("exec.sh"), libc::X_OK).expect("access(X_OK) on an executable");
    assert_errno(
        access(&m.join("missing"), libc::F_OK),
        libc::ENOENT,
        "access on a missing name",
    );
}

#[test]
fn user_xattrs_visible_overlay_xattrs_hidden() {
    let sc = Scratch::new();
    let l = three_layers(&sc);
    l[0].opaque("opq", Opaque::TrustedXattr)
        .xattr("opq", "user.color", "red")
        .opaque("uopq", Opaque::UserXattr)
        .xattr("uopq", "user.shape", "round")
        .whiteout("wx/hidden", Whiteout::TrustedXattr)
        .whiteout("wx/hidden2", Whiteout::UserXattr)
        .file("wx/kept", "k");
    l[1].file("opq/lower", "l")
        .file("wx/hidden", "h")
        .file("wx/hidden2", "h");
    let g = mount3(&sc, &l);
    let m = g.path();
    let mut x = llistxattr(&m.join("x.txt")).unwrap();
    x.sort();
    assert_eq!(x, ["user.alpha", "user.beta"], "listxattr(x.txt)");
    assert_eq!(lgetxattr(&m.join("x.txt"), "user.alpha").unwrap(), b"1");
    assert_eq!(lgetxattr(&m.join("x.txt"), "user.beta").unwrap(), b"two");
    assert_errno(
        lgetxattr(&m.join("x.txt"), "user.missing"),
        libc::ENODATA,
        "getxattr user.missing",
    );
    assert_errno(
        lgetxattr(&m.join("x.txt"), "trusted.overlay.origin"),
        libc::ENODATA,
        "getxattr trusted.overlay.origin",
    );
    assert_errno(
        lgetxattr(&m.join("x.txt"), "user.overlay.redirect"),
        libc::ENODATA,
        "getxattr user.overlay.redirect",
    );
    assert_eq!(llistxattr(&m.join("opq")).unwrap(), ["user.color"]);
    assert_eq!(llistxattr(&m.join("uopq")).unwrap(), ["user.shape"]);
    for (p, n) in [
        ("opq", "trusted.overlay.opaque"),
        ("uopq", "user.overlay.opaque"),
        ("wx", "trusted.overlay.opaque"),
        ("wx", "user.overlay.opaque"),
    ] {
        assert_errno(
            lgetxattr(&m.join(p), n),
            libc::ENODATA,
            &format!("getxattr {n} on {p}"),
        );
    }
    assert!(
        llistxattr(&m.join("wx")).unwrap().is_empty(),
        "wx has only markers"
    );
    assert_eq!(
        names(&m.join("opq")),
        Vec::<String>::new(),
        "opaque dir hides lower"
    );
    assert_eq!(names(&m.join("wx")), ["kept"]);
    // Symlinks: listxattr works and shows nothing.
    assert!(llistxattr(&m.join("sym")).unwrap().is_empty());
    // Size probes (size 0) and too-small buffers, as getfattr and libattr use them. The
    // list probe must count only the visible names.
    let x = m.join("x.txt");
    let want_list = "user.alpha\0user.beta\0".len();
    assert_eq!(
        fsops::llistxattr_sized(&x, 0).unwrap(),
        want_list,
        "listxattr size probe"
    );
    assert_errno(
        fsops::llistxattr_sized(&x, 3),
        libc::ERANGE,
        "listxattr into 3 bytes",
    );
    assert_eq!(
        fsops::lgetxattr_sized(&x, "user.beta", 0).unwrap(),
        3,
        "getxattr size probe"
    );
    assert_errno(
        fsops::lgetxattr_sized(&x, "user.beta", 1),
        libc::ERANGE,
        "getxattr into 1 byte",
    );
    assert_eq!(
        fsops::llistxattr_sized(&m.join("wx"), 0).unwrap(),
        0,
        "markers-only list probe"
    );
}

#[test]
fn unusual_names_round_trip() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let sc = Scratch::new();
    let l1 = sc.layer("l1");
    let l2 = sc.layer("l2");
    let raw = OsStr::from_bytes(b"bad\xffname");
    let long = "L".repeat(255);
    let target = "t/".repeat(1500) + "end";
    l1.file(raw, "raw\n")
        .file(&long, "long\n")
        .file("new\nline", "nl\n")
        .file(".whatever", "not a marker\n")
        .file(".wh", "not a marker either\n")
        .symlink("longlink", &target);
    l2.file("d/x", "x").file(".whatever", "lower\n");
    let mnt = sc.mkdir("mnt");
    let g = Strata::new(&[l1.root(), l2.root()]).mount(&mnt);
    let m = g.path();
    let mut got: Vec<Vec<u8>> = fs::read_dir(m)
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    got.sort();
    let mut want: Vec<Vec<u8>> = [
        b".wh".to_vec(),
        b".whatever".to_vec(),
        b"bad\xffname".to_vec(),
        b"d".to_vec(),
        long.as_bytes().to_vec(),
        b"longlink".to_vec(),
        b"new\nline".to_vec(),
    ]
    .to_vec();
    want.sort();
    assert_eq!(got, want, "listing with unusual names");
    assert_eq!(fs::read(m.join(raw)).unwrap(), b"raw\n");
    assert_eq!(fs::read(m.join(&long)).unwrap(), b"long\n");
    assert_eq!(fs::read(m.join("new\nline")).unwrap(), b"nl\n");
    assert_eq!(fs::read(m.join(".whatever")).unwrap(), b"not a marker\n");
    assert_eq!(
        fs::read_link(m.join("longlink")).unwrap(),
        Path::new(&target)
    );
    assert_eq!(
        fs::symlink_metadata(m.join("longlink")).unwrap().len(),
        target.len() as u64,
        "symlink st_size is the target length"
    );
    assert_errno(
        fs::symlink_metadata(m.join("L".repeat(256))),
        libc::ENAMETOOLONG,
        "256-byte name",
    );
}

#[test]
fn concurrent_readers_see_consistent_content() {
    let sc = Scratch::new();
    let l1 = sc.layer("l1");
    let l2 = sc.layer("l2");
    for d in 0..8 {
        for f in 0..50 {
            let layer = if f % 2 == 0 { &l1 } else { &l2 };
            layer.file(
                format!("d{d}/f{f}"),
                pattern(1000 + f * 37, (d * 100 + f) as u64),
            );
        }
    }
    let mnt = sc.mkdir("mnt");
    let g = Strata::new(&[l1.root(), l2.root()]).mount(&mnt);
    let root = g.path().to_path_buf();
    let errors = with_timeout(
        "8 concurrent readers",
        Duration::from_secs(120),
        move || {
            let handles: Vec<_> = (0..8)
                .map(|t| {
                    let root = root.clone();
                    std::thread::spawn(move || {
                        let mut errs = Vec::new();
                        for round in 0..3 {
                            for k in 0..8 {
                                let d = (t + k + round) % 8;
                                let dir = root.join(format!("d{d}"));
                                let n = fs::read_dir(&dir).map(|r| r.count()).unwrap_or(0);
                                if n != 50 {
                                    errs.push(format!("thread {t}: d{d} lists {n} entries"));
                                }
                                for f in 0..50 {
                                    let want = pattern(1000 + f * 37, (d * 100 + f) as u64);
                                    match fs::read(dir.join(format!("f{f}"))) {
                                        Ok(v) if v == want => {}
                                        Ok(v) => errs.push(format!(
                                            "thread {t}: d{d}/f{f}: {} bytes, wrong content",
                                            v.len()
                                        )),
                                        Err(e) => errs.push(format!("thread {t}: d{d}/f{f}: {e}")),
                                    }
                                }
                            }
                        }
                        errs
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        },
    );
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
}

fn check_erofs(m: &Path) {
    use libc::{O_APPEND, O_CREAT, O_RDWR, O_TRUNC, O_WRONLY};
    assert_errno(
        open_raw(&m.join("newfile"), O_CREAT | O_WRONLY),
        libc::EROFS,
        "create newfile",
    );
    assert_errno(
        fs::create_dir(m.join("newdir")),
        libc::EROFS,
        "mkdir newdir",
    );
    assert_errno(
        fs::remove_file(m.join("only2.txt")),
        libc::EROFS,
        "unlink only2.txt",
    );
    assert_errno(
        open_raw(&m.join("only2.txt"), O_WRONLY),
        libc::EROFS,
        "open only2.txt O_WRONLY",
    );
    assert_errno(
        open_raw(&m.join("only1.txt"), O_RDWR),
        libc::EROFS,
        "open only1.txt O_RDWR",
    );
    assert_errno(
        open_raw(&m.join("only3.txt"), O_WRONLY | O_APPEND),
        libc::EROFS,
        "O_APPEND",
    );
    assert_errno(
        open_raw(&m.join("only3.txt"), O_WRONLY | O_TRUNC),
        libc::EROFS,
        "O_TRUNC",
    );
    assert_errno(
        fs::remove_dir(m.join("emptydir")),
        libc::EROFS,
        "rmdir emptydir",
    );
    assert_errno(
        fs::rename(m.join("only1.txt"), m.join("renamed")),
        libc::EROFS,
        "rename",
    );
    assert_errno(
        std::os::unix::fs::symlink("x", m.join("newlink")),
        libc::EROFS,
        "symlink",
    );
    assert_errno(
        fs::set_permissions(
            m.join("only1.txt"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        ),
        libc::EROFS,
        "chmod",
    );
    assert_errno(
        lsetxattr(&m.join("only1.txt"), "user.new", b"v"),
        libc::EROFS,
        "setxattr",
    );
    // Nothing changed.
    assert_eq!(fs::read_to_string(m.join("only2.txt")).unwrap(), "two\n");
    assert_absent(&m.join("newfile"));
    assert_absent(&m.join("newdir"));
}

#[test]
fn writes_answer_erofs_without_upper() {
    let sc = Scratch::new();
    let l = three_layers(&sc);
    let before: Vec<Snapshot> = l.iter().map(|x| snapshot_raw(x.root())).collect();
    let g = mount3(&sc, &l);
    check_erofs(g.path());
    drop(g);
    for (i, x) in l.iter().enumerate() {
        assert_snapshots_eq("before", &before[i], "after", &snapshot_raw(x.root()));
    }
}

/// With an upper layer but the `ro` option, the mount refuses every change and the upper
/// layer stays untouched.
#[test]
fn writes_answer_erofs_with_upper_and_ro_option() {
    let sc = Scratch::new();
    let l = three_layers(&sc);
    let up = sc.mkdir("upper");
    let work = sc.mkdir("work");
    let mnt = sc.mkdir("mnt");
    let g = Strata::new(&[l[0].root(), l[1].root(), l[2].root()])
        .upper(&up, &work)
        .opt("ro")
        .mount(&mnt);
    use libc::{O_CREAT, O_WRONLY};
    let m = g.path();
    assert_errno(
        open_raw(&m.join("newfile"), O_CREAT | O_WRONLY),
        libc::EROFS,
        "create",
    );
    assert_errno(fs::create_dir(m.join("newdir")), libc::EROFS, "mkdir");
    assert_errno(fs::remove_file(m.join("only2.txt")), libc::EROFS, "unlink");
    assert_errno(
        open_raw(&m.join("only2.txt"), O_WRONLY),
        libc::EROFS,
        "open O_WRONLY",
    );
    assert_eq!(fs::read_to_string(m.join("only2.txt")).unwrap(), "two\n");
    drop(g);
    assert!(
        names(&up).is_empty(),
        "upper was written to: {:?}",
        names(&up)
    );
}

fn wname(k: Whiteout) -> &'static str {
    match k {
        Whiteout::CharDev => "chardev",
        Whiteout::Oci => "oci",
        Whiteout::TrustedXattr => "trusted",
        Whiteout::UserXattr => "user",
    }
}

fn oname(k: Opaque) -> &'static str {
    match k {
        Opaque::TrustedXattr => "trusted",
        Opaque::UserXattr => "user",
        Opaque::Oci => "oci",
    }
}

#[test]
fn every_whiteout_and_opaque_format_hides_and_is_invisible() {
    let sc = Scratch::new();
    let l1 = sc.layer("l1");
    let l2 = sc.layer("l2");
    let l3 = sc.layer("l3");
    for k in Whiteout::ALL {
        let d = format!("w_{}", wname(k));
        l3.file(format!("{d}/deep"), "deep")
            .file(format!("{d}/keep3"), "k3");
        l2.file(format!("{d}/file"), "f")
            .file(format!("{d}/dir/child"), "c")
            .dir(format!("{d}/dir/grand/child"))
            .symlink(format!("{d}/lnk"), "file")
            .file(format!("{d}/keep"), "k");
        l1.file(format!("{d}/own1"), "o")
            .whiteout(format!("{d}/file"), k)
            .whiteout(format!("{d}/dir"), k)
            .whiteout(format!("{d}/deep"), k)
            .whiteout(format!("{d}/lnk"), k);
    }
    for k in Opaque::ALL {
        let d = format!("o_{}", oname(k));
        l1.opaque(&d, k).file(format!("{d}/mine"), "m");
        l2.file(format!("{d}/theirs"), "t")
            .file(format!("{d}/sub/x"), "x");
        l3.file(format!("{d}/older"), "o");
        // An opaque dir below the top hides only what is below it.
        let d2 = format!("o2_{}", oname(k));
        l1.file(format!("{d2}/top"), "t");
        l2.opaque(&d2, k).file(format!("{d2}/mid"), "m");
        l3.file(format!("{d2}/bottom"), "b");
    }
    // OCI: `.wh.foo` next to `foo` in the same layer hides only the lower `foo`.
    l1.whiteout("same/foo", Whiteout::Oci)
        .file("same/foo", "l1");
    l2.file("same/foo", "l2").file("same/bar", "bar");
    // A whiteout in the bottom layer hides nothing and is still invisible.
    l3.whiteout("bottomwh/nothing", Whiteout::CharDev)
        .whiteout("bottomwh/nothing2", Whiteout::Oci)
        .file("bottomwh/real", "r");

    let mnt = sc.mkdir("mnt");
    let g = Strata::new(&[l1.root(), l2.root(), l3.root()]).mount(&mnt);
    let m = g.path();
    for k in Whiteout::ALL {
        let d = m.join(format!("w_{}", wname(k)));
        assert_eq!(
            names(&d),
            ["keep", "keep3", "own1"],
            "{k:?} whiteouts in {}",
            d.display()
        );
        for hidden in [
            "file",
            "dir",
            "deep",
            "lnk",
            "dir/child",
            "dir/grand",
            ".wh.file",
            ".wh.dir",
        ] {
            assert_absent(&d.join(hidden));
        }
    }
    for k in Opaque::ALL {
        let d = m.join(format!("o_{}", oname(k)));
        assert_eq!(names(&d), ["mine"], "{k:?} opaque dir {}", d.display());
        assert_absent(&d.join("theirs"));
        assert_absent(&d.join("sub"));
        assert_absent(&d.join("older"));
        assert_absent(&d.join(".wh..wh..opq"));
        let d2 = m.join(format!("o2_{}", oname(k)));
        assert_eq!(
            names(&d2),
            ["mid", "top"],
            "{k:?} opaque mid-layer dir {}",
            d2.display()
        );
        assert_absent(&d2.join("bottom"));
    }
    assert_eq!(names(&m.join("same")), ["bar", "foo"]);
    assert_eq!(fs::read_to_string(m.join("same/foo")).unwrap(), "l1");
    assert_absent(&m.join("same/.wh.foo"));
    assert_eq!(names(&m.join("bottomwh")), ["real"]);
    assert_absent(&m.join("bottomwh/nothing"));
    assert_absent(&m.join("bottomwh/.wh.nothing2"));
    let snap = snapshot(m);
    assert_no_markers(&snap);
}

#[test]
fn hundred_thousand_entries_list_once_and_seekdir_resumes() {
    const N: usize = 100_000;
    let sc = Scratch::new();
    let l1 = sc.layer("l1");
    let l2 = sc.layer("l2");
    let name = |i: usize| format!("f{i:05}");
    // l1: 0..60000, l2: 40000..100000 (20000 names in both).
    fs::create_dir_all(l1.path("big")).unwrap();
    for i in 0..60_000 {
        fs::File::create(l1.path(format!("big/{}", name(i)))).unwrap();
    }
    fs::create_dir_all(l2.path("big")).unwrap();
    for i in 40_000..N {
        fs::File::create(l2.path(format!("big/{}", name(i)))).unwrap();
    }
    let mnt = sc.mkdir("mnt");
    let g = Strata::new(&[l1.root(), l2.root()]).mount(&mnt);
    let dir = g.join("big");
    let entries = with_timeout(
        "listing 100k entries",
        Duration::from_secs(120),
        move || {
            let mut d = DirStream::open(&dir).unwrap();
            let mut v = Vec::new();
            while let Some(e) = d.next_entry().unwrap() {
                if e.name != "." && e.name != ".." {
                    v.push(e);
                }
            }
            // seekdir/telldir: for a few positions, seek back and compare the following names.
            let mut bad = Vec::new();
            for &i in &[0usize, 1, 999, 4096, 50_000, 77_777, N - 2] {
                let pos = v[i].pos_after;
                d.seek(pos);
                for k in 1..=5 {
                    let want = v.get(i + k).map(|e| e.name.clone());
                    let got = loop {
                        match d.next_entry().unwrap() {
                            Some(e) if e.name == "." || e.name == ".." => continue,
                            other => break other.map(|e| e.name),
                        }
                    };
                    if got != want {
                        bad.push(format!("after seekdir to telldir() of entry {i}: step {k}: got {got:?}, want {want:?}"));
                        break;
                    }
                }
            }
            d.seek(v[N - 1].pos_after);
            if let Some(e) = d.next_entry().unwrap() {
                bad.push(format!("seekdir past the last entry returned {:?}", e.name));
            }
            d.rewind();
            let first = loop {
                match d.next_entry().unwrap() {
                    Some(e) if e.name == "." || e.name == ".." => continue,
                    other => break other.map(|e| e.name),
                }
            };
            if first.as_deref() != Some(v[0].name.as_str()) {
                bad.push(format!(
                    "rewinddir: first entry {first:?}, want {:?}",
                    v[0].name
                ));
            }
            (v, bad)
        },
    );
    let (v, bad) = entries;
    let listed: Vec<&str> = v.iter().map(|e| e.name.as_str()).collect();
    let set: BTreeSet<&str> = listed.iter().copied().collect();
    assert_eq!(
        listed.len(),
        set.len(),
        "{} names listed more than once",
        listed.len() - set.len()
    );
    let want: BTreeSet<String> = (0..N).map(name).collect();
    let got: BTreeSet<String> = set.iter().map(|s| s.to_string()).collect();
    let missing: Vec<&String> = want.difference(&got).take(10).collect();
    let extra: Vec<&String> = got.difference(&want).take(10).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "listing: {} names, missing (first 10) {missing:?}, extra {extra:?}",
        listed.len()
    );
    assert!(
        v.iter().all(|e| e.kind == Kind::File),
        "every entry should have d_type DT_REG"
    );
    assert!(bad.is_empty(), "seekdir/telldir:\n  {}", bad.join("\n  "));
    // Spot-check lookups agree with the listing.
    for i in [0, 39_999, 40_000, 59_999, 60_000, N - 1] {
        fsops::access(&g.join(format!("big/{}", name(i))), libc::F_OK)
            .unwrap_or_else(|e| panic!("{} listed but not found: {e}", name(i)));
    }
}

/// What a lookup of each name finds: its content, or that it is absent.
fn found(dir: &Path, names: &[String]) -> Vec<(String, Option<String>)> {
    names
        .iter()
        .map(|n| (n.clone(), fs::read_to_string(dir.join(n)).ok()))
        .collect()
}

/// Read-only layers answer lookups after a listing from what the listing saw (most names
/// are in no layer but one); what a lookup finds must not change with it: names in every
/// layer, names whited out in each format above them, `.wh.` names themselves, and names in
/// no layer, in a directory big enough that most lookups come after the listing's end.
#[test]
fn lookups_after_a_listing_find_what_lookups_before_it_find() {
    let sc = Scratch::new();
    let [l1, l2, l3] = [sc.layer("l1"), sc.layer("l2"), sc.layer("l3")];
    let mut names = Vec::new();
    for i in 0..3000 {
        let n = format!("e{i:05}");
        l3.file(format!("d/{n}"), format!("3 {n}"));
        match i % 10 {
            0 => drop(l2.file(format!("d/{n}"), format!("2 {n}"))),
            1 => drop(l1.file(format!("d/{n}"), format!("1 {n}"))),
            2 => drop(l1.whiteout(format!("d/{n}"), Whiteout::Oci)),
            3 => drop(l2.whiteout(format!("d/{n}"), Whiteout::Oci)),
            4 => drop(l2.whiteout(format!("d/{n}"), Whiteout::CharDev)),
            5 => drop(
                l2.whiteout(format!("d/{n}"), Whiteout::Oci)
                    .file(format!("d/{n}"), format!("2 {n}")),
            ),
            _ => {}
        }
        names.push(n.clone());
        names.push(format!(".wh.{n}"));
        names.push(format!("x{i:05}"));
    }
    l1.file("d/top", "top").file("d/.wh.nothing", "");
    names.extend(["top", "nothing", ".wh.nothing"].map(String::from));
    let layers = [l1.root(), l2.root(), l3.root()];
    let unlisted = {
        let mnt = sc.mkdir("m1");
        let g = Strata::new(&layers).mount(&mnt);
        found(&g.join("d"), &names)
    };
    let mnt = sc.mkdir("m2");
    let g = Strata::new(&layers).mount(&mnt);
    let listed: BTreeSet<String> = fsops::names(&g.join("d")).into_iter().collect();
    let after = found(&g.join("d"), &names);
    let present: BTreeSet<String> = unlisted
        .iter()
        .filter(|(_, c)| c.is_some())
        .map(|(n, _)| n.clone())
        .collect();
    // 3000 bottom names, less the 400 whited out in l1 (i%10 == 2) and l2 (3, 4), plus top.
    assert_eq!(present.len(), 2101, "names found before any listing");
    let unlisted_only: Vec<&String> = present.difference(&listed).take(5).collect();
    let listed_only: Vec<&String> = listed.difference(&present).take(5).collect();
    assert!(
        unlisted_only.is_empty() && listed_only.is_empty(),
        "found by lookups but not listed: {unlisted_only:?}; listed but not found: {listed_only:?}"
    );
    let changed: Vec<_> = unlisted
        .iter()
        .zip(&after)
        .filter(|(before, now)| before != now)
        .take(5)
        .collect();
    assert!(changed.is_empty(), "(before, after a listing): {changed:?}");
}
