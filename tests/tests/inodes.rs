//! Inode numbers and devices: st_ino stable across lookups and cache drops, unique per
//! object, shared by hard links (with the right nlink), st_dev the mount's for every object;
//! daemon memory and fds bounded over a 20k-file walk.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use strata_tests::fsops::drop_caches;
use strata_tests::*;

/// relpath -> (ino, dev, nlink, is_dir) for every object below `root` (root included).
fn inode_map(root: &Path) -> BTreeMap<String, (u64, u64, u64, bool)> {
    fn walk(abs: &Path, rel: &str, out: &mut BTreeMap<String, (u64, u64, u64, bool)>) {
        let md =
            fs::symlink_metadata(abs).unwrap_or_else(|e| panic!("lstat {}: {e}", abs.display()));
        out.insert(
            rel.to_string(),
            (md.ino(), md.dev(), md.nlink(), md.is_dir()),
        );
        if md.is_dir() {
            for e in fs::read_dir(abs).unwrap() {
                let e = e.unwrap();
                let n = e.file_name().to_string_lossy().into_owned();
                let r = if rel == "." {
                    n.clone()
                } else {
                    format!("{rel}/{n}")
                };
                walk(&e.path(), &r, out);
            }
        }
    }
    let mut m = BTreeMap::new();
    walk(root, ".", &mut m);
    m
}

fn stack(sc: &Scratch) -> [Layer; 3] {
    let l1 = sc.layer("l1");
    let l2 = sc.layer("l2");
    let l3 = sc.layer("l3");
    l3.file("h3/x", "x")
        .hardlink("h3/y", "h3/x")
        .file("shared/bottom", "b")
        .file("gone", "g");
    l2.file("h/a", "a")
        .hardlink("h/b", "h/a")
        .hardlink("other/c", "h/a")
        .hardlink("h/over", "h/a")
        .file("shared/mid", "m")
        .symlink("shared/sl", "mid")
        .fifo("shared/fifo")
        .dir("emptydir");
    l1.file("h/over", "top version")
        .file("shared/top", "t")
        .whiteout("h3/y", Whiteout::CharDev)
        .whiteout("gone", Whiteout::Oci);
    [l1, l2, l3]
}

fn mount(sc: &Scratch, l: &[Layer; 3]) -> MountGuard {
    let mnt = sc.mkdir("mnt");
    Strata::new(&[l[0].root(), l[1].root(), l[2].root()]).mount(&mnt)
}

#[test]
fn st_ino_stable_unique_and_survives_drop_caches() {
    let sc = Scratch::new();
    let l = stack(&sc);
    let g = mount(&sc, &l);
    let first = inode_map(g.path());
    let again = inode_map(g.path());
    assert_eq!(first, again, "st_ino changed between two walks");
    drop_caches(2);
    std::thread::sleep(Duration::from_millis(100));
    let after = inode_map(g.path());
    assert_eq!(
        first, after,
        "st_ino changed after drop_caches (kernel forgot the inodes)"
    );
    // Distinct objects have distinct inode numbers (hard links excepted).
    let mut by_ino: BTreeMap<u64, Vec<&String>> = BTreeMap::new();
    for (p, (ino, ..)) in &first {
        by_ino.entry(*ino).or_default().push(p);
    }
    let links = ["h/a", "h/b", "other/c"];
    for (ino, paths) in by_ino {
        if paths.len() > 1 {
            assert!(
                paths.iter().all(|p| links.contains(&p.as_str())),
                "unrelated objects share st_ino {ino}: {paths:?}"
            );
        }
    }
}

#[test]
fn hard_links_share_ino_and_report_nlink() {
    let sc = Scratch::new();
    let l = stack(&sc);
    let g = mount(&sc, &l);
    let m = g.path();
    for round in 0..2 {
        let a = fs::symlink_metadata(m.join("h/a")).unwrap();
        let b = fs::symlink_metadata(m.join("h/b")).unwrap();
        let c = fs::symlink_metadata(m.join("other/c")).unwrap();
        assert_eq!(
            a.ino(),
            b.ino(),
            "round {round}: h/a and h/b are hard links"
        );
        assert_eq!(
            a.ino(),
            c.ino(),
            "round {round}: h/a and other/c are hard links"
        );
        // The layer file has 4 names (h/a, h/b, other/c, h/over); the kernel reports the
        // real link count even though h/over is hidden by the upper layer's file.
        assert_eq!(a.nlink(), 4, "round {round}: nlink of h/a");
        assert_eq!(b.nlink(), 4);
        let over = fs::symlink_metadata(m.join("h/over")).unwrap();
        assert_ne!(
            over.ino(),
            a.ino(),
            "h/over comes from the top layer, not the link"
        );
        assert_eq!(over.nlink(), 1);
        assert_eq!(fs::read_to_string(m.join("h/over")).unwrap(), "top version");
        let x = fs::symlink_metadata(m.join("h3/x")).unwrap();
        assert_eq!(
            x.nlink(),
            2,
            "h3/x: real nlink although its link is whited out"
        );
        assert_absent(&m.join("h3/y"));
        assert_absent(&m.join("gone"));
        drop_caches(2);
    }
}

#[test]
fn st_dev_is_the_mounts_for_every_object() {
    let sc = Scratch::new();
    let l = stack(&sc);
    let g = mount(&sc, &l);
    let dev = fs::metadata(g.path()).unwrap().dev();
    let layer_dev = fs::metadata(l[0].root()).unwrap().dev();
    assert_ne!(dev, layer_dev, "the mount should have its own device");
    for (p, (_, d, _, _)) in inode_map(g.path()) {
        assert_eq!(d, dev, "{p}: st_dev {d:#x} != mount's {dev:#x}");
    }
    // fstat of an open file agrees too.
    let f = fs::File::open(g.join("h/a")).unwrap();
    assert_eq!(f.metadata().unwrap().dev(), dev);
}

#[test]
fn open_handles_survive_drop_caches() {
    use std::io::{Read, Seek, SeekFrom};
    let sc = Scratch::new();
    let l = stack(&sc);
    let g = mount(&sc, &l);
    let mut f = fs::File::open(g.join("shared/mid")).unwrap();
    let d = fs::File::open(g.join("shared")).unwrap();
    let before = f.metadata().unwrap();
    let lst = fs::symlink_metadata(g.join("shared/mid")).unwrap();
    assert_eq!(
        before.ino(),
        lst.ino(),
        "fstat and lstat disagree on st_ino"
    );
    drop_caches(2);
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "m");
    f.seek(SeekFrom::Start(0)).unwrap();
    assert_eq!(
        f.metadata().unwrap().ino(),
        before.ino(),
        "fstat after drop_caches"
    );
    assert_eq!(
        d.metadata().unwrap().ino(),
        fs::metadata(g.join("shared")).unwrap().ino()
    );
    assert_eq!(
        fs::symlink_metadata(g.join("shared/mid")).unwrap().ino(),
        before.ino()
    );
}

fn vm_rss_kib(pid: i32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

#[test]
fn rss_and_fd_count_bounded_over_20k_file_walk() {
    let sc = Scratch::new();
    let l1 = sc.layer("l1");
    let l2 = sc.layer("l2");
    for d in 0..100 {
        fs::create_dir_all(l1.path(format!("d{d:03}"))).unwrap();
        fs::create_dir_all(l2.path(format!("d{d:03}"))).unwrap();
        for f in 0..100 {
            fs::write(l1.path(format!("d{d:03}/a{f:03}")), format!("{d}/{f}")).unwrap();
            fs::write(l2.path(format!("d{d:03}/b{f:03}")), format!("{d}/{f}")).unwrap();
        }
    }
    let mnt = sc.mkdir("mnt");
    let g = Strata::new(&[l1.root(), l2.root()]).mount(&mnt);
    let pid = g.daemon_pid();
    let root = g.path().to_path_buf();
    let mut samples = Vec::new();
    for round in 0..2 {
        let r = root.clone();
        let (n, maxfd) = with_timeout("walking 20k files", Duration::from_secs(120), move || {
            let mut n = 0usize;
            let mut maxfd = 0usize;
            for d in fs::read_dir(&r).unwrap() {
                let d = d.unwrap().path();
                for f in fs::read_dir(&d).unwrap() {
                    let p = f.unwrap().path();
                    let md = fs::symlink_metadata(&p).unwrap();
                    assert!(md.is_file());
                    let data = fs::read(&p).unwrap();
                    assert!(!data.is_empty());
                    n += 1;
                    if n % 1000 == 0 {
                        maxfd = maxfd.max(fd_count(pid));
                    }
                }
            }
            (n, maxfd)
        });
        assert_eq!(n, 20_000, "round {round}: files seen");
        let rss = vm_rss_kib(pid);
        let fds = fd_count(pid).max(maxfd);
        samples.push((rss, fds));
        assert!(
            fds < 2000,
            "round {round}: daemon has {fds} open fds (bound 2000)"
        );
        assert!(
            rss < 512 * 1024,
            "round {round}: daemon RSS {rss} KiB (bound 512 MiB)"
        );
        drop_caches(2);
    }
    let (r1, _) = samples[0];
    let (r2, _) = samples[1];
    assert!(
        r2 <= r1 + 64 * 1024,
        "daemon RSS grew from {r1} KiB to {r2} KiB over a second identical walk"
    );
}
