//! The write path, one operation per test, against kernel overlayfs
//! (`redirect_dir=on,index=on`) over an identical copy of the same stack: the same operation
//! must give the same value or errno on both mounts, the merged trees must be equal (also
//! after unmount + remount over the same upper), and the lower layers must not change.

use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use strata_tests::fsops::{lremovexattr, statvfs};
use strata_tests::writes::*;
use strata_tests::*;

/// A fixed modification time for lower objects.
const T0: i64 = 1_600_000_000;

/// A valid v2 `security.capability` value: `cap_net_raw=ep`.
const CAP_NET_RAW_EP: &str = "0x0100000200200000000000000000000000000000";
const CAP_BYTES: [u8; 20] = [
    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// The stack most tests start from. l1 (top): `both.txt`, `dir/a`, `top.txt`.
/// l2 (bottom): `lower.txt` (0640, 1234:5678, `user.k=v`, fixed mtime), `both.txt`, `dir/b`,
/// `dir/sub/deep`, the lower-only dir `ldir/{x,y,sub/z}`, `emptydir/`, `wipe/f`, `lsym`.
fn std_fill(ls: &[Layer]) {
    let (l1, l2) = (&ls[0], &ls[1]);
    l2.file_mode("lower.txt", "lower\n", 0o640)
        .owner("lower.txt", 1234, 5678)
        .xattr("lower.txt", "user.k", "v")
        .file("both.txt", "from l2\n")
        .file("dir/b", "b\n")
        .file("dir/sub/deep", "deep\n")
        .file("ldir/x", "x\n")
        .file("ldir/y", "y\n")
        .file("ldir/sub/z", "z\n")
        .dir("emptydir")
        .file("wipe/f", "f\n")
        .symlink("lsym", "lower.txt");
    l1.file("both.txt", "from l1\n")
        .file("dir/a", "a\n")
        .file("top.txt", "top\n");
    set_times(&l2.path("lower.txt"), T0);
}

fn set_times(p: &Path, t: i64) {
    utimens(p, (t, 0), (t, 0)).unwrap_or_else(|e| panic!("utimens {}: {e}", p.display()));
}

fn twin(sc: &Scratch) -> Twin {
    Twin::new(sc, 2, std_fill)
}

/// What `stat` says, minus the inode number (which differs between the two mounts).
#[derive(Debug, PartialEq, Clone)]
struct St {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u64,
}

fn st(p: &Path) -> io::Result<St> {
    let m = fs::symlink_metadata(p)?;
    Ok(St {
        kind: Kind::from_mode(m.mode()),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: if m.is_dir() { 0 } else { m.size() },
        nlink: if m.is_dir() { 0 } else { m.nlink() },
    })
}

fn ino(p: &Path) -> u64 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
        .ino()
}

fn mtime(p: &Path) -> (i64, i64) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    (m.mtime(), m.mtime_nsec())
}

fn read(p: &Path) -> io::Result<Vec<u8>> {
    fs::read(p)
}

fn write_at(p: &Path, flags: i32, data: &[u8], off: i64) -> io::Result<usize> {
    let fd = open_fd(p, flags)?;
    pwrite(&fd, data, off)
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// Inode numbers of `rel` on both mounts.
fn inos(t: &Twin, rel: &str) -> (u64, u64) {
    (ino(&t.k(rel)), ino(&t.s(rel)))
}

fn assert_inos_kept(t: &Twin, rel: &str, before: (u64, u64), when: &str) {
    let after = inos(t, rel);
    assert_eq!(
        after.0, before.0,
        "kernel overlayfs: st_ino of {rel} changed {when}"
    );
    assert_eq!(
        after.1, before.1,
        "stratafs: st_ino of {rel} changed {when} (kernel keeps it)"
    );
}

fn assert_copied_up(t: &Twin, rel: &str) {
    assert!(exists(&t.ku(rel)), "kernel did not copy up {rel}");
    assert!(
        exists(&t.su(rel)),
        "stratafs did not copy {rel} up into the upper layer"
    );
}

// ---------------------------------------------------------------------------------------
// Creating objects.

#[test]
fn create_file() {
    let sc = Scratch::new();
    let t = twin(&sc);
    t.both_ok("create new.txt", |m| {
        fs::write(m.join("new.txt"), "hello\n")
    });
    t.both_ok("create in lower-only dir", |m| {
        fs::write(m.join("ldir/new"), "n\n")
    });
    t.both_ok("create in merged dir", |m| {
        fs::write(m.join("dir/new"), "n\n")
    });
    t.same("O_CREAT|O_EXCL over lower file", |m| {
        open_fd(
            &m.join("lower.txt"),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
        )
        .map(|_| ())
    });
    t.same("create below a missing dir", |m| {
        fs::write(m.join("nodir/new"), "n\n")
    });
    t.same("create below a file", |m| {
        fs::write(m.join("lower.txt/new"), "n\n")
    });
    t.both_ok("stat new.txt", |m| st(&m.join("new.txt")));
    t.both_ok("read ldir/new", |m| read(&m.join("ldir/new")));
    t.compare_uppers("after create");
    t.finish();
}

#[test]
fn parents_copied_up_with_lower_metadata() {
    let sc = Scratch::new();
    let t = Twin::new(&sc, 1, |ls| {
        let l = &ls[0];
        l.file("deep/er/old", "old\n")
            .mode("deep", 0o751)
            .owner("deep", 1234, 5678)
            .xattr("deep", "user.d", "1")
            .mode("deep/er", 0o700)
            .owner("deep/er", 42, 43)
            .xattr("deep/er", "user.e", "2");
        set_times(&l.path("deep/er"), T0);
        set_times(&l.path("deep"), T0 + 10);
    });
    let lower = |rel: &str| t.strata.lowers[0].join(rel);
    t.both_ok("create deep/er/new", |m| {
        fs::write(m.join("deep/er/new"), "new\n")
    });
    for rel in ["deep", "deep/er"] {
        let want = st(&lower(rel)).unwrap();
        for (side, up) in [("kernel", t.ku(rel)), ("stratafs", t.su(rel))] {
            assert_eq!(
                st(&up).unwrap_or_else(|e| panic!("{side}: upper {rel}: {e}")),
                want,
                "{side}: copied-up parent {rel} has other metadata than the lower dir"
            );
        }
        assert_eq!(
            lgetxattr_s(&t.su(rel)),
            lgetxattr_s(&lower(rel)),
            "stratafs: user xattrs of copied-up parent {rel}"
        );
    }
    // The grandparent's times are the lower's (the kernel restores them after inserting
    // the copied-up child).
    assert_eq!(
        mtime(&t.k("deep")),
        mtime(&lower("deep")),
        "kernel: mtime of deep after copy-up"
    );
    assert_eq!(
        mtime(&t.s("deep")),
        mtime(&t.k("deep")),
        "mtime of merged parent 'deep' after its child was copied up: stratafs vs kernel"
    );
    t.finish();
}

fn lgetxattr_s(p: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = strata_tests::fsops::llistxattr(p)
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with("user.") || n.starts_with("security."))
        .map(|n| {
            let val = strata_tests::fsops::lgetxattr(p, &n).unwrap();
            (n, val)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn mkdir() {
    let sc = Scratch::new();
    let t = twin(&sc);
    t.both_ok("mkdir newdir 0700", |m| {
        fs::create_dir(m.join("newdir"))?;
        fs::set_permissions(m.join("newdir"), fs::Permissions::from_mode(0o700))
    });
    t.both_ok("mkdir in lower-only dir", |m| {
        fs::create_dir(m.join("ldir/sub2"))
    });
    t.same("mkdir over lower dir", |m| fs::create_dir(m.join("ldir")));
    t.same("mkdir over lower file", |m| {
        fs::create_dir(m.join("lower.txt"))
    });
    t.same("mkdir below missing dir", |m| {
        fs::create_dir(m.join("no/dir"))
    });
    t.both_ok("stat newdir", |m| st(&m.join("newdir")));
    t.compare_uppers("after mkdir");
    t.finish();
}

#[test]
fn mknod_fifo() {
    let sc = Scratch::new();
    let t = twin(&sc);
    t.both_ok("mkfifo fifo", |m| mkfifo(&m.join("fifo"), 0o640));
    t.both_ok("mkfifo in lower-only dir", |m| {
        mkfifo(&m.join("ldir/fifo"), 0o600)
    });
    t.same("mkfifo over lower file", |m| {
        mkfifo(&m.join("lower.txt"), 0o600)
    });
    t.both_ok("stat fifo", |m| st(&m.join("fifo")));
    t.compare_uppers("after mknod");
    t.finish();
}

#[test]
fn symlink() {
    let sc = Scratch::new();
    let t = twin(&sc);
    t.both_ok("symlink sl", |m| {
        std::os::unix::fs::symlink("lower.txt", m.join("sl"))
    });
    t.both_ok("symlink in lower-only dir", |m| {
        std::os::unix::fs::symlink("/abs/target", m.join("ldir/sl"))
    });
    t.same("symlink over lower symlink", |m| {
        std::os::unix::fs::symlink("x", m.join("lsym"))
    });
    t.both_ok("readlink sl", |m| fs::read_link(m.join("sl")));
    t.both_ok("read through sl", |m| read(&m.join("sl")));
    t.finish();
}

#[test]
fn link_lower_file() {
    let sc = Scratch::new();
    let t = twin(&sc);
    let before = inos(&t, "lower.txt");
    t.both_ok("link lower.txt lower.link", |m| {
        link(&m.join("lower.txt"), &m.join("lower.link"))
    });
    t.both_ok("link into lower-only dir", |m| {
        link(&m.join("top.txt"), &m.join("ldir/top.link"))
    });
    t.same("link over existing", |m| {
        link(&m.join("lower.txt"), &m.join("both.txt"))
    });
    t.same("link of a directory", |m| {
        link(&m.join("ldir"), &m.join("ldir.link"))
    });
    t.both_ok("stat lower.txt", |m| st(&m.join("lower.txt")));
    t.both_ok("stat lower.link", |m| st(&m.join("lower.link")));
    assert_inos_kept(&t, "lower.txt", before, "by link()");
    let (k, s) = inos(&t, "lower.link");
    assert_eq!(k, before.0, "kernel: link has the original's st_ino");
    assert_eq!(
        s, before.1,
        "stratafs: link has another st_ino than the original"
    );
    t.finish();
}

#[test]
fn lower_hardlinks_stay_together_after_copy_up() {
    let sc = Scratch::new();
    let t = Twin::new(&sc, 1, |ls| {
        ls[0].file("h1", "shared\n").hardlink("h2", "h1");
    });
    let before = inos(&t, "h1");
    t.both_ok("append to h1", |m| append(&m.join("h1"), b"more\n"));
    t.both_ok("read h2", |m| read(&m.join("h2")));
    t.both_ok("stat h2", |m| st(&m.join("h2")));
    assert_inos_kept(&t, "h1", before, "by copy-up");
    let (k, s) = inos(&t, "h2");
    assert_eq!(k, before.0, "kernel: h2 still shares st_ino with h1");
    assert_eq!(s, before.1, "stratafs: h2 no longer shares st_ino with h1");
    t.finish();
}

// ---------------------------------------------------------------------------------------
// Copy-up on write intent.

#[test]
fn copy_up_keeps_ino_owner_mode_times_xattrs_and_caps() {
    let sc = Scratch::new();
    let t = Twin::new(&sc, 2, |ls| {
        std_fill(ls);
        let p = ls[1].path("lower.txt");
        sh_ok(&format!(
            "setfattr -n security.capability -v {CAP_NET_RAW_EP} '{}'",
            p.display()
        ));
        ls[1].xattr("lower.txt", "user.second", [0u8, 1, 2]);
        set_times(&p, T0);
    });
    let lower = t.strata.lowers[1].join("lower.txt");
    let before = inos(&t, "lower.txt");
    let want_st = t.both_ok("stat before", |m| st(&m.join("lower.txt")));
    let want_x = lgetxattr_s(&lower);
    assert!(
        want_x
            .iter()
            .any(|(n, v)| n == "security.capability" && v == &CAP_BYTES),
        "setup: lower file has the capability: {want_x:?}"
    );
    // Copy-up without changing anything: open for writing and close.
    t.both_ok("open O_WRONLY + close", |m| {
        open_fd(&m.join("lower.txt"), libc::O_WRONLY).map(|_| ())
    });
    assert_copied_up(&t, "lower.txt");
    assert_inos_kept(&t, "lower.txt", before, "by copy-up");
    assert_eq!(
        st(&t.s("lower.txt")).unwrap(),
        want_st,
        "stratafs: stat after copy-up"
    );
    assert_eq!(
        mtime(&t.s("lower.txt")),
        (T0, 0),
        "stratafs: mtime after copy-up (open for write without writing keeps it)"
    );
    assert_eq!(
        mtime(&t.k("lower.txt")),
        (T0, 0),
        "kernel: mtime after copy-up"
    );
    assert_eq!(
        mtime(&t.su("lower.txt")),
        (T0, 0),
        "stratafs: mtime of the upper copy"
    );
    for (side, up) in [
        ("kernel", t.ku("lower.txt")),
        ("stratafs", t.su("lower.txt")),
    ] {
        assert_eq!(
            st(&up).unwrap(),
            want_st,
            "{side}: owner/mode of the upper copy"
        );
        assert_eq!(
            lgetxattr_s(&up),
            want_x,
            "{side}: user.* and security.capability xattrs of the upper copy"
        );
    }
    t.both_ok("getxattr security.capability via the mount", |m| {
        strata_tests::fsops::lgetxattr(&m.join("lower.txt"), "security.capability")
    });
    // Writing keeps the inode; the kernel drops the capability on write (killpriv).
    t.both_ok("append", |m| append(&m.join("lower.txt"), b"more\n"));
    assert_inos_kept(&t, "lower.txt", before, "by a write after copy-up");
    t.same("getxattr security.capability after a write", |m| {
        strata_tests::fsops::lgetxattr(&m.join("lower.txt"), "security.capability")
    });
    t.both_ok("read", |m| read(&m.join("lower.txt")));
    t.finish();
}

#[test]
fn open_for_write_variants_copy_up() {
    let sc = Scratch::new();
    let t = twin(&sc);
    for (rel, flags) in [
        ("lower.txt", libc::O_RDWR),
        ("both.txt", libc::O_WRONLY | libc::O_TRUNC),
        ("dir/b", libc::O_WRONLY | libc::O_APPEND),
        ("ldir/sub/z", libc::O_RDWR | libc::O_APPEND),
    ] {
        let before = inos(&t, rel);
        t.both_ok(&format!("write {rel} with flags {flags:#o}"), |m| {
            write_at(&m.join(rel), flags, b"W", 1)
        });
        assert_copied_up(&t, rel);
        assert_inos_kept(&t, rel, before, "by copy-up");
        t.both_ok(&format!("read {rel}"), |m| read(&m.join(rel)));
    }
    // Opening read-only does not copy up.
    t.both_ok("open dir/sub/deep O_RDONLY", |m| {
        open_fd(&m.join("dir/sub/deep"), libc::O_RDONLY).map(|_| ())
    });
    assert!(
        !exists(&t.su("dir/sub/deep")),
        "stratafs copied up a file opened read-only"
    );
    t.compare_uppers("after the writes");
    t.finish();
}

#[test]
fn copy_up_of_sparse_64mib_file_stays_sparse() {
    const SIZE: u64 = 64 << 20;
    let sc = Scratch::new();
    let t = Twin::new(&sc, 1, |ls| {
        let p = ls[0].path("sparse.bin");
        let f = fs::File::create(&p).unwrap();
        f.set_len(SIZE).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&pattern(8192, 5), 32 << 20).unwrap();
        f.write_all_at(b"tail", SIZE - 4).unwrap();
    });
    let lower_blocks = fs::metadata(t.strata.lowers[0].join("sparse.bin"))
        .unwrap()
        .blocks();
    assert!(
        lower_blocks < 2048,
        "setup: lower file is sparse ({lower_blocks} blocks)"
    );
    let before = inos(&t, "sparse.bin");
    t.both_ok("append to sparse.bin", |m| {
        append(&m.join("sparse.bin"), b"appended")
    });
    assert_inos_kept(&t, "sparse.bin", before, "by copy-up");
    for (side, up) in [
        ("kernel", t.ku("sparse.bin")),
        ("stratafs", t.su("sparse.bin")),
    ] {
        let md = fs::metadata(&up).unwrap_or_else(|e| panic!("{side}: upper copy: {e}"));
        assert_eq!(md.len(), SIZE + 8, "{side}: size of the upper copy");
        assert!(
            md.blocks() < 16384,
            "{side}: upper copy of a sparse 64 MiB file uses {} blocks of 512 bytes: holes \
             were filled",
            md.blocks()
        );
    }
    for off in [0, (32 << 20) + 100, SIZE as i64 - 4, 4096] {
        t.both_ok(&format!("pread at {off}"), |m| {
            let fd = open_fd(&m.join("sparse.bin"), libc::O_RDONLY)?;
            pread(&fd, 16, off)
        });
    }
    t.finish();
}

#[test]
fn truncate() {
    let sc = Scratch::new();
    let t = twin(&sc);
    let before = inos(&t, "lower.txt");
    t.both_ok("truncate lower.txt to 3", |m| {
        strata_tests::writes::truncate(&m.join("lower.txt"), 3)
    });
    assert_copied_up(&t, "lower.txt");
    assert_inos_kept(&t, "lower.txt", before, "by truncate");
    t.both_ok("ftruncate both.txt to 100000", |m| {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(m.join("both.txt"))?;
        f.set_len(100_000)
    });
    t.both_ok("truncate dir/b to 0", |m| {
        strata_tests::writes::truncate(&m.join("dir/b"), 0)
    });
    t.same("truncate a directory", |m| {
        strata_tests::writes::truncate(&m.join("ldir"), 0)
    });
    t.same("truncate to a negative size", |m| {
        strata_tests::writes::truncate(&m.join("top.txt"), -1)
    });
    t.both_ok("stat lower.txt", |m| st(&m.join("lower.txt")));
    t.both_ok("read lower.txt", |m| read(&m.join("lower.txt")));
    t.finish();
}

#[test]
fn chmod() {
    let sc = Scratch::new();
    let t = twin(&sc);
    let before = inos(&t, "lower.txt");
    let dir_before = inos(&t, "ldir");
    let set = |p: &Path, mode: u32| fs::set_permissions(p, fs::Permissions::from_mode(mode));
    t.both_ok("chmod lower.txt 4755", |m| {
        set(&m.join("lower.txt"), 0o4755)
    });
    t.both_ok("chmod ldir 0700", |m| set(&m.join("ldir"), 0o700));
    t.both_ok("chmod dir/sub/deep 0", |m| set(&m.join("dir/sub/deep"), 0));
    assert_copied_up(&t, "lower.txt");
    assert_copied_up(&t, "ldir");
    assert_inos_kept(&t, "lower.txt", before, "by chmod");
    assert_inos_kept(&t, "ldir", dir_before, "by chmod");
    assert_eq!(
        mtime(&t.s("lower.txt")),
        (T0, 0),
        "stratafs: chmod changed the mtime"
    );
    for rel in ["lower.txt", "ldir", "dir/sub/deep"] {
        t.both_ok(&format!("stat {rel}"), |m| st(&m.join(rel)));
    }
    t.finish();
}

#[test]
fn chown() {
    let sc = Scratch::new();
    let t = twin(&sc);
    let before = inos(&t, "lower.txt");
    t.both_ok("chown lower.txt 42:43", |m| {
        lchown(&m.join("lower.txt"), 42, 43)
    });
    t.both_ok("lchown lsym 7:8", |m| lchown(&m.join("lsym"), 7, 8));
    t.both_ok("chown ldir 1:2", |m| lchown(&m.join("ldir"), 1, 2));
    t.both_ok("chown -1:99 dir/b", |m| {
        std::os::unix::fs::lchown(m.join("dir/b"), None, Some(99))
    });
    assert_inos_kept(&t, "lower.txt", before, "by chown");
    for rel in ["lower.txt", "lsym", "ldir", "dir/b"] {
        t.both_ok(&format!("stat {rel}"), |m| st(&m.join(rel)));
    }
    t.both_ok("readlink lsym", |m| fs::read_link(m.join("lsym")));
    t.finish();
}

#[test]
fn utimes() {
    let sc = Scratch::new();
    let t = twin(&sc);
    let before = inos(&t, "lower.txt");
    let times = |p: &Path| -> io::Result<(i64, i64, i64, i64)> {
        let m = fs::symlink_metadata(p)?;
        Ok((m.atime(), m.atime_nsec(), m.mtime(), m.mtime_nsec()))
    };
    t.both_ok("utimensat lower.txt", |m| {
        utimens(&m.join("lower.txt"), (1000, 5), (2000, 7))
    });
    assert_copied_up(&t, "lower.txt");
    assert_inos_kept(&t, "lower.txt", before, "by utimensat");
    t.both_ok("times of lower.txt", |m| times(&m.join("lower.txt")));
    t.both_ok("utimensat both.txt atime OMIT", |m| {
        utimens(&m.join("both.txt"), (0, libc::UTIME_OMIT), (3000, 0))
    });
    t.both_ok("mtime of both.txt", |m| {
        times(&m.join("both.txt")).map(|x| (x.2, x.3))
    });
    t.both_ok("utimensat ldir", |m| {
        utimens(&m.join("ldir"), (10, 0), (20, 0))
    });
    t.both_ok("times of ldir", |m| times(&m.join("ldir")));
    t.both_ok("utimensat dir/b NOW", |m| {
        utimens(&m.join("dir/b"), (0, libc::UTIME_NOW), (0, libc::UTIME_NOW))
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for (side, p) in [("kernel", t.k("dir/b")), ("stratafs", t.s("dir/b"))] {
        let (a, _, m, _) = times(&p).unwrap();
        assert!(
            (now - a).abs() <= 5 && (now - m).abs() <= 5,
            "{side}: UTIME_NOW gave atime {a} mtime {m}, now is {now}"
        );
    }
    t.same("utimensat of a missing file", |m| {
        utimens(&m.join("nothing"), (1, 0), (1, 0))
    });
    t.finish();
}

#[test]
fn xattrs_set_and_remove() {
    let sc = Scratch::new();
    let t = Twin::new(&sc, 2, |ls| {
        std_fill(ls);
        ls[1]
            .file("x.txt", "x\n")
            .xattr("x.txt", "user.a", "1")
            .xattr("x.txt", "user.b", "2");
    });
    let before = inos(&t, "x.txt");
    t.both_ok("setxattr user.c", |m| {
        lsetxattr(&m.join("x.txt"), "user.c", b"3")
    });
    assert_copied_up(&t, "x.txt");
    assert_inos_kept(&t, "x.txt", before, "by setxattr");
    t.both_ok("removexattr user.a", |m| {
        lremovexattr(&m.join("x.txt"), "user.a")
    });
    t.same("removexattr missing", |m| {
        lremovexattr(&m.join("x.txt"), "user.zz")
    });
    t.same("removexattr on an untouched lower file", |m| {
        lremovexattr(&m.join("lower.txt"), "user.nope")
    });
    t.both_ok("removexattr user.k of lower.txt", |m| {
        lremovexattr(&m.join("lower.txt"), "user.k")
    });
    t.same("setxattr XATTR_CREATE over existing", |m| {
        setxattr_flags(&m.join("x.txt"), "user.b", b"x", libc::XATTR_CREATE)
    });
    t.same("setxattr XATTR_REPLACE missing", |m| {
        setxattr_flags(&m.join("x.txt"), "user.new", b"x", libc::XATTR_REPLACE)
    });
    t.both_ok("setxattr on lower dir", |m| {
        lsetxattr(&m.join("ldir"), "user.dir", b"d")
    });
    t.both_ok("getxattr user.b", |m| {
        strata_tests::fsops::lgetxattr(&m.join("x.txt"), "user.b")
    });
    t.both_ok("listxattr x.txt", |m| {
        let mut v = strata_tests::fsops::llistxattr(&m.join("x.txt"))?;
        v.retain(|n| !n.starts_with("security."));
        v.sort();
        Ok(v)
    });
    t.finish();
}

fn setxattr_flags(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str())).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            flags,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn lsetxattr(p: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    strata_tests::fsops::lsetxattr(p, name, value)
}

// ---------------------------------------------------------------------------------------
// Removing objects.

#[test]
fn unlink_leaves_whiteouts_only_over_lower_names() {
    let sc = Scratch::new();
    let t = twin(&sc);
    t.both_ok("unlink lower.txt", |m| fs::remove_file(m.join("lower.txt")));
    t.both_ok("unlink top.txt", |m| fs::remove_file(m.join("top.txt")));
    t.both_ok("unlink ldir/x", |m| fs::remove_file(m.join("ldir/x")));
    t.both_ok("unlink lsym", |m| fs::remove_file(m.join("lsym")));
    t.both_ok("create+unlink new.txt", |m| {
        fs::write(m.join("new.txt"), "n")?;
        fs::remove_file(m.join("new.txt"))
    });
    t.both_ok("create+unlink dir/new", |m| {
        fs::write(m.join("dir/new"), "n")?;
        fs::remove_file(m.join("dir/new"))
    });
    t.both_ok("write then unlink both.txt", |m| {
        append(&m.join("both.txt"), b"x")?;
        fs::remove_file(m.join("both.txt"))
    });
    t.same("unlink missing", |m| fs::remove_file(m.join("lower.txt")));
    t.same("unlink a directory", |m| fs::remove_file(m.join("ldir")));
    for rel in ["lower.txt", "top.txt", "ldir/x", "lsym", "both.txt"] {
        assert!(is_whiteout(&t.su(rel)), "stratafs: no whiteout for {rel}");
        assert_absent(&t.s(rel));
    }
    for rel in ["new.txt", "dir/new"] {
        assert!(
            !exists(&t.su(rel)) && !is_whiteout(&t.su(rel)),
            "stratafs: something left in the upper for {rel}, which no lower layer has"
        );
    }
    t.compare_uppers("after unlink");
    t.finish();
}

#[test]
fn rmdir() {
    let sc = Scratch::new();
    let t = twin(&sc);
    t.both_ok("rmdir lower empty dir", |m| {
        fs::remove_dir(m.join("emptydir"))
    });
    t.both_ok("empty wipe/ then rmdir it", |m| {
        fs::remove_file(m.join("wipe/f"))?;
        fs::remove_dir(m.join("wipe"))
    });
    t.same("rmdir lower non-empty dir", |m| {
        fs::remove_dir(m.join("ldir"))
    });
    t.same("rmdir merged non-empty dir", |m| {
        fs::remove_dir(m.join("dir"))
    });
    t.same("rmdir merged dir whose lower part only is non-empty", |m| {
        fs::remove_file(m.join("dir/a"))?;
        fs::remove_dir(m.join("dir"))
    });
    t.same("rmdir a file", |m| fs::remove_dir(m.join("lower.txt")));
    t.same("rmdir missing", |m| fs::remove_dir(m.join("emptydir")));
    t.both_ok("mkdir+rmdir fresh", |m| {
        fs::create_dir(m.join("fresh"))?;
        fs::remove_dir(m.join("fresh"))
    });
    t.both_ok("rmdir dir/sub after emptying it", |m| {
        fs::remove_file(m.join("dir/sub/deep"))?;
        fs::remove_dir(m.join("dir/sub"))
    });
    for rel in ["emptydir", "wipe", "dir/sub"] {
        assert!(is_whiteout(&t.su(rel)), "stratafs: no whiteout for {rel}");
    }
    assert!(
        !exists(&t.su("fresh")),
        "stratafs: leftover for pure-upper dir"
    );
    t.compare_uppers("after rmdir");
    t.finish();
}

#[test]
fn mkdir_over_whiteout_is_opaque() {
    let sc = Scratch::new();
    let t = twin(&sc);
    t.both_ok("rm -r ldir; mkdir ldir; create ldir/fresh", |m| {
        let d = m.join("ldir");
        for f in ["x", "y", "sub/z"] {
            fs::remove_file(d.join(f))?;
        }
        fs::remove_dir(d.join("sub"))?;
        fs::remove_dir(&d)?;
        fs::create_dir(&d)?;
        fs::write(d.join("fresh"), "fresh\n")
    });
    t.both_ok("rm -r dir (merged); mkdir dir", |m| {
        let d = m.join("dir");
        for f in ["a", "b", "sub/deep"] {
            fs::remove_file(d.join(f))?;
        }
        fs::remove_dir(d.join("sub"))?;
        fs::remove_dir(&d)?;
        fs::create_dir(&d)
    });
    t.both_ok("rmdir emptydir; mkdir emptydir", |m| {
        fs::remove_dir(m.join("emptydir"))?;
        fs::create_dir(m.join("emptydir"))
    });
    assert_eq!(
        names(&t.s("ldir")),
        ["fresh"],
        "stratafs: ldir after mkdir over whiteout"
    );
    assert_eq!(
        names(&t.s("dir")),
        Vec::<String>::new(),
        "stratafs: dir after mkdir"
    );
    for rel in ["ldir", "dir", "emptydir"] {
        assert_eq!(
            strata_tests::fsops::lgetxattr(&t.ku(rel), "trusted.overlay.opaque").ok(),
            Some(b"y".to_vec()),
            "kernel: {rel} opaque"
        );
        assert_eq!(
            strata_tests::fsops::lgetxattr(&t.su(rel), "trusted.overlay.opaque").ok(),
            Some(b"y".to_vec()),
            "stratafs: upper {rel} is not marked opaque (trusted.overlay.opaque=y)"
        );
    }
    t.compare_uppers("after mkdir over whiteout");
    t.finish();
}

// ---------------------------------------------------------------------------------------
// Renames.

fn assert_gone(t: &Twin, rel: &str) {
    assert_absent(&t.k(rel));
    assert_absent(&t.s(rel));
}

#[test]
fn rename_file_over_file() {
    let sc = Scratch::new();
    let t = twin(&sc);
    let before = inos(&t, "lower.txt");
    t.both_ok("rename lower.txt -> both.txt", |m| {
        fs::rename(m.join("lower.txt"), m.join("both.txt"))
    });
    assert_gone(&t, "lower.txt");
    assert_inos_kept(&t, "both.txt", before, "by rename");
    t.both_ok("rename new -> top.txt", |m| {
        fs::write(m.join("new"), "new\n")?;
        fs::rename(m.join("new"), m.join("top.txt"))
    });
    t.both_ok("rename dir/a -> dir/b", |m| {
        fs::rename(m.join("dir/a"), m.join("dir/b"))
    });
    t.same("rename missing", |m| {
        fs::rename(m.join("lower.txt"), m.join("x"))
    });
    t.same("rename file over dir", |m| {
        fs::rename(m.join("top.txt"), m.join("emptydir"))
    });
    t.same("rename dir over file", |m| {
        fs::rename(m.join("emptydir"), m.join("top.txt"))
    });
    t.both_ok("read both.txt", |m| read(&m.join("both.txt")));
    t.compare_uppers("after renames");
    t.finish();
}

#[test]
fn rename_file_into_other_dir() {
    let sc = Scratch::new();
    let t = twin(&sc);
    t.both_ok("rename lower.txt -> ldir/moved.txt", |m| {
        fs::rename(m.join("lower.txt"), m.join("ldir/moved.txt"))
    });
    t.both_ok("rename dir/a -> ldir/sub/a", |m| {
        fs::rename(m.join("dir/a"), m.join("ldir/sub/a"))
    });
    t.both_ok("rename ldir/x -> x", |m| {
        fs::rename(m.join("ldir/x"), m.join("x"))
    });
    assert_gone(&t, "lower.txt");
    assert_gone(&t, "dir/a");
    assert_gone(&t, "ldir/x");
    t.both_ok("stat ldir/moved.txt", |m| st(&m.join("ldir/moved.txt")));
    t.compare_uppers("after renames");
    t.finish();
}

#[test]
fn rename_lower_dir() {
    let sc = Scratch::new();
    let t = twin(&sc);
    let before = inos(&t, "ldir");
    t.both_ok("rename ldir -> ldir2", |m| {
        rename2(&m.join("ldir"), &m.join("ldir2"), 0)
    });
    assert_gone(&t, "ldir");
    assert_inos_kept(&t, "ldir2", before, "by rename");
    assert_eq!(
        names(&t.s("ldir2")),
        ["sub", "x", "y"],
        "stratafs: renamed lower dir"
    );
    t.both_ok("rename ldir2/sub -> ldir2/sub2", |m| {
        rename2(&m.join("ldir2/sub"), &m.join("ldir2/sub2"), 0)
    });
    t.both_ok("create in renamed dir", |m| {
        fs::write(m.join("ldir2/sub2/new"), "new\n")
    });
    t.both_ok("mkdir ldir at the old name", |m| {
        fs::create_dir(m.join("ldir"))
    });
    assert_eq!(
        names(&t.s("ldir")),
        Vec::<String>::new(),
        "stratafs: new dir at old name"
    );
    t.both_ok("rename lower dir into another dir", |m| {
        rename2(&m.join("emptydir"), &m.join("ldir2/sub2/moved"), 0)
    });
    t.both_ok("read ldir2/sub2/z", |m| read(&m.join("ldir2/sub2/z")));
    t.finish();
}

#[test]
fn rename_merged_dir() {
    let sc = Scratch::new();
    let t = twin(&sc);
    t.both_ok("rename dir -> dir2", |m| {
        rename2(&m.join("dir"), &m.join("dir2"), 0)
    });
    assert_gone(&t, "dir");
    assert_eq!(
        names(&t.s("dir2")),
        ["a", "b", "sub"],
        "stratafs: renamed merged dir"
    );
    t.both_ok("rename dir2/sub -> ldir/sub3", |m| {
        rename2(&m.join("dir2/sub"), &m.join("ldir/sub3"), 0)
    });
    t.both_ok("unlink dir2/b", |m| fs::remove_file(m.join("dir2/b")));
    t.both_ok("mkdir dir at the old name", |m| {
        fs::create_dir(m.join("dir"))
    });
    t.both_ok("read ldir/sub3/deep", |m| read(&m.join("ldir/sub3/deep")));
    t.finish();
}

#[test]
fn rename_dir_over_empty_dir() {
    let sc = Scratch::new();
    let t = twin(&sc);
    t.both_ok("rename ldir -> emptydir (lower, empty)", |m| {
        rename2(&m.join("ldir"), &m.join("emptydir"), 0)
    });
    assert_gone(&t, "ldir");
    assert_eq!(
        names(&t.s("emptydir")),
        ["sub", "x", "y"],
        "stratafs: dir renamed over empty dir"
    );
    t.same("rename dir over non-empty merged dir", |m| {
        rename2(&m.join("emptydir"), &m.join("dir"), 0)
    });
    t.same("rename dir over non-empty lower dir", |m| {
        rename2(&m.join("wipe"), &m.join("emptydir"), 0)
    });
    t.both_ok("rename new dir over lower empty dir", |m| {
        fs::create_dir(m.join("newdir"))?;
        fs::create_dir(m.join("emptydir2"))?;
        rename2(&m.join("newdir"), &m.join("emptydir2"), 0)
    });
    t.finish();
}

#[test]
fn rename_dir_over_dir_emptied_through_the_mount() {
    let sc = Scratch::new();
    let t = twin(&sc);
    t.both_ok("unlink dir/sub/deep", |m| {
        fs::remove_file(m.join("dir/sub/deep"))
    });
    t.both_ok(
        "rename wipe -> dir/sub (merged view empty, upper holds a whiteout)",
        |m| rename2(&m.join("wipe"), &m.join("dir/sub"), 0),
    );
    t.both_ok("list dir/sub", |m| Ok(names(&m.join("dir/sub"))));
    t.finish();
}

#[test]
fn rename_new_dir_over_emptied_merged_dir_hides_lower_entries() {
    let sc = Scratch::new();
    let t = twin(&sc);
    t.both_ok("empty the merged dir 'dir' through the mount", |m| {
        fs::remove_file(m.join("dir/a"))?;
        fs::remove_file(m.join("dir/b"))?;
        fs::remove_file(m.join("dir/sub/deep"))?;
        fs::remove_dir(m.join("dir/sub"))
    });
    t.both_ok("mkdir newdir; create newdir/n; rename newdir -> dir", |m| {
        fs::create_dir(m.join("newdir"))?;
        fs::write(m.join("newdir/n"), "n\n")?;
        rename2(&m.join("newdir"), &m.join("dir"), 0)
    });
    let got = t.both_ok("list dir", |m| Ok(names(&m.join("dir"))));
    assert_eq!(got, ["n"], "lower entries show through the moved dir");
    t.compare_uppers("after the rename");
    t.finish();
}

#[test]
fn rename_noreplace() {
    let sc = Scratch::new();
    let t = twin(&sc);
    let nr = libc::RENAME_NOREPLACE;
    t.same("NOREPLACE over existing lower file", |m| {
        rename2(&m.join("lower.txt"), &m.join("both.txt"), nr)
    });
    t.same("NOREPLACE over existing dir", |m| {
        rename2(&m.join("ldir"), &m.join("emptydir"), nr)
    });
    t.both_ok("NOREPLACE to a free name", |m| {
        rename2(&m.join("lower.txt"), &m.join("fresh.txt"), nr)
    });
    t.both_ok("NOREPLACE over a whited-out name", |m| {
        fs::remove_file(m.join("top.txt"))?;
        rename2(&m.join("fresh.txt"), &m.join("top.txt"), nr)
    });
    t.both_ok("read top.txt", |m| read(&m.join("top.txt")));
    t.finish();
}

#[test]
fn rename_exchange_files() {
    let sc = Scratch::new();
    let t = twin(&sc);
    let x = libc::RENAME_EXCHANGE;
    let (a, b) = (inos(&t, "lower.txt"), inos(&t, "both.txt"));
    t.both_ok("EXCHANGE lower.txt <-> both.txt", |m| {
        rename2(&m.join("lower.txt"), &m.join("both.txt"), x)
    });
    assert_inos_kept(
        &t,
        "both.txt",
        a,
        "by exchange (now holds lower.txt's inode)",
    );
    assert_inos_kept(
        &t,
        "lower.txt",
        b,
        "by exchange (now holds both.txt's inode)",
    );
    t.both_ok("read lower.txt", |m| read(&m.join("lower.txt")));
    t.both_ok("read both.txt", |m| read(&m.join("both.txt")));
    t.both_ok("EXCHANGE upper file <-> file in lower-only dir", |m| {
        fs::write(m.join("new"), "new\n")?;
        rename2(&m.join("new"), &m.join("ldir/x"), x)
    });
    t.same("EXCHANGE with a missing name", |m| {
        rename2(&m.join("top.txt"), &m.join("missing"), x)
    });
    t.both_ok("read ldir/x", |m| read(&m.join("ldir/x")));
    t.compare_uppers("after exchange");
    t.finish();
}

#[test]
fn rename_exchange_dirs_with_lower_parts() {
    let sc = Scratch::new();
    let t = twin(&sc);
    t.both_ok("EXCHANGE ldir <-> dir", |m| {
        rename2(&m.join("ldir"), &m.join("dir"), libc::RENAME_EXCHANGE)
    });
    assert_eq!(names(&t.s("dir")), ["sub", "x", "y"]);
    assert_eq!(names(&t.s("ldir")), ["a", "b", "sub"]);
    t.finish();
}

// ---------------------------------------------------------------------------------------
// Open files.

#[test]
fn read_only_fd_sees_data_written_after_copy_up() {
    let sc = Scratch::new();
    let t = twin(&sc);
    let (k1, s1) = (
        open_fd(&t.k("lower.txt"), libc::O_RDONLY).unwrap(),
        open_fd(&t.s("lower.txt"), libc::O_RDONLY).unwrap(),
    );
    assert_same("fd1 read before", pread(&k1, 64, 0), pread(&s1, 64, 0)).unwrap();
    t.both_ok("fd2 O_WRONLY|O_TRUNC writes", |m| {
        write_at(
            &m.join("lower.txt"),
            libc::O_WRONLY | libc::O_TRUNC,
            b"NEW DATA!\n",
            0,
        )
    });
    let got = assert_same(
        "fd1 reads after fd2 wrote",
        pread(&k1, 64, 0),
        pread(&s1, 64, 0),
    );
    assert_eq!(got, Ok(b"NEW DATA!\n".to_vec()));
    assert_same(
        "fstat(fd1) size",
        fstat(&k1).map(|s| s.st_size),
        fstat(&s1).map(|s| s.st_size),
    )
    .unwrap();
    drop((k1, s1));
    t.finish();
}

#[test]
fn unlinked_open_file_keeps_working() {
    let sc = Scratch::new();
    let t = twin(&sc);
    let open2 = |rel: &str, flags: i32| {
        (
            open_fd(&t.k(rel), flags).unwrap(),
            open_fd(&t.s(rel), flags).unwrap(),
        )
    };
    // rw: a lower file copied up by the open; ro: a lower file never copied up; up: a file
    // created in the upper.
    let (krw, srw) = open2("lower.txt", libc::O_RDWR);
    let (kro, sro) = open2("both.txt", libc::O_RDONLY);
    t.both_ok("create new.txt", |m| {
        fs::write(m.join("new.txt"), "upper file\n")
    });
    let (kup, sup) = open2("new.txt", libc::O_RDWR);
    t.both_ok("unlink the three files", |m| {
        fs::remove_file(m.join("lower.txt"))?;
        fs::remove_file(m.join("both.txt"))?;
        fs::remove_file(m.join("new.txt"))
    });
    assert_gone(&t, "lower.txt");
    assert_gone(&t, "new.txt");
    let f = |s: libc::stat| (s.st_nlink, s.st_size, s.st_mode, s.st_uid);
    let mut d = Divergences::default();
    for (name, k, s) in [
        ("rw", &krw, &srw),
        ("ro", &kro, &sro),
        ("upper", &kup, &sup),
    ] {
        d.check(
            &format!("pread unlinked {name}"),
            pread(k, 64, 0),
            pread(s, 64, 0),
        );
        d.check(
            &format!("pwrite unlinked {name}"),
            pwrite(k, b"XYZ", 2),
            pwrite(s, b"XYZ", 2),
        );
        d.check(
            &format!("pread after pwrite, unlinked {name}"),
            pread(k, 64, 0),
            pread(s, 64, 0),
        );
        d.check(
            &format!("fstat unlinked {name}"),
            fstat(k).map(f),
            fstat(s).map(f),
        );
        d.check(
            &format!("ftruncate unlinked {name}"),
            fs::File::from(k.try_clone().unwrap()).set_len(1),
            fs::File::from(s.try_clone().unwrap()).set_len(1),
        );
        d.check(
            &format!("fstat after ftruncate, unlinked {name}"),
            fstat(k).map(f),
            fstat(s).map(f),
        );
        d.check(
            &format!("fsync unlinked {name}"),
            fs::File::from(k.try_clone().unwrap()).sync_all(),
            fs::File::from(s.try_clone().unwrap()).sync_all(),
        );
    }
    drop((krw, srw, kro, sro, kup, sup));
    d.assert_none();
    t.compare_uppers("after closing unlinked files");
    t.finish();
}

#[test]
fn shared_mmap_write_reaches_the_file() {
    let sc = Scratch::new();
    let mut t = twin(&sc);
    let mmap_write = |p: &Path| -> io::Result<()> {
        let fd = open_fd(p, libc::O_RDWR)?;
        let len = fstat(&fd)?.st_size as usize;
        unsafe {
            let a = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
            );
            if a == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            std::ptr::copy_nonoverlapping(b"MMAP".as_ptr(), a as *mut u8, 4);
            let r = libc::msync(a, len, libc::MS_SYNC);
            let e = io::Error::last_os_error();
            libc::munmap(a, len);
            if r < 0 {
                return Err(e);
            }
        }
        Ok(())
    };
    t.both_ok("mmap MAP_SHARED write to lower.txt", |m| {
        mmap_write(&m.join("lower.txt"))
    });
    let got = t.both_ok("read after munmap", |m| read(&m.join("lower.txt")));
    assert_eq!(got, b"MMAPr\n", "content after the mmap write");
    t.remount();
    let got = t.both_ok("read after remount", |m| read(&m.join("lower.txt")));
    assert_eq!(got, b"MMAPr\n", "content after remount");
    t.finish();
}

// ---------------------------------------------------------------------------------------
// Data operations.

#[test]
fn write_and_fsync() {
    let sc = Scratch::new();
    let t = twin(&sc);
    t.both_ok("pwrite + fsync + fdatasync", |m| {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(m.join("lower.txt"))?;
        f.write_all_at(b"0123456789", 3)?;
        f.sync_all()?;
        f.write_all_at(b"abc", 20)?;
        f.sync_data()
    });
    t.same("write to a read-only fd", |m| {
        let fd = open_fd(&m.join("both.txt"), libc::O_RDONLY)?;
        pwrite(&fd, b"x", 0)
    });
    t.both_ok("fsync a read-only fd of a lower file", |m| {
        fs::File::open(m.join("top.txt"))?.sync_all()
    });
    t.both_ok("read lower.txt", |m| read(&m.join("lower.txt")));
    t.finish();
}

#[test]
fn fallocate_modes() {
    let sc = Scratch::new();
    let t = Twin::new(&sc, 1, |ls| {
        ls[0]
            .file("data.bin", pattern(256 << 10, 9))
            .file("small", "s\n");
    });
    let before = inos(&t, "small");
    t.both_ok("fallocate mode 0 extends small", |m| {
        let fd = open_fd(&m.join("small"), libc::O_RDWR)?;
        fallocate(&fd, 0, 0, 1 << 20)
    });
    assert_inos_kept(&t, "small", before, "by fallocate");
    t.both_ok("fallocate KEEP_SIZE past EOF", |m| {
        let fd = open_fd(&m.join("data.bin"), libc::O_RDWR)?;
        fallocate(&fd, libc::FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20)
    });
    t.both_ok("fallocate PUNCH_HOLE|KEEP_SIZE", |m| {
        let fd = open_fd(&m.join("data.bin"), libc::O_RDWR)?;
        fallocate(
            &fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            64 << 10,
            64 << 10,
        )
    });
    t.both_ok("fallocate ZERO_RANGE", |m| {
        let fd = open_fd(&m.join("data.bin"), libc::O_RDWR)?;
        fallocate(&fd, libc::FALLOC_FL_ZERO_RANGE, 4096, 100)
    });
    t.same("fallocate on a read-only fd", |m| {
        let fd = open_fd(&m.join("data.bin"), libc::O_RDONLY)?;
        fallocate(&fd, 0, 0, 4096)
    });
    t.both_ok("stat small", |m| st(&m.join("small")));
    t.both_ok("stat data.bin", |m| st(&m.join("data.bin")));
    t.finish();
}

const SEEK_PROBES: [(i64, i32); 8] = [
    (0, libc::SEEK_HOLE),
    (4096, libc::SEEK_DATA),
    (1 << 20, libc::SEEK_HOLE),
    ((1 << 20) + 4096, libc::SEEK_DATA),
    ((3 << 20) + 100, libc::SEEK_HOLE),
    ((3 << 20) + 4096, libc::SEEK_DATA),
    (4 << 20, libc::SEEK_DATA),
    (4 << 20, libc::SEEK_HOLE),
];

fn seek_probes(p: &Path, flags: i32) -> io::Result<Vec<Result<i64, i32>>> {
    let fd = open_fd(p, flags)?;
    Ok(SEEK_PROBES
        .iter()
        .map(|(off, whence)| outcome(lseek(&fd, *off, *whence)))
        .collect())
}

#[test]
fn seek_data_and_hole() {
    let sc = Scratch::new();
    let t = Twin::new(&sc, 1, |ls| {
        let f = fs::File::create(ls[0].path("sparse")).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        f.write_all_at(&[2u8; 4096], 1 << 20).unwrap();
        f.write_all_at(&[3u8; 4096], 3 << 20).unwrap();
    });
    let lower = seek_probes(&t.strata.lowers[0].join("sparse"), libc::O_RDONLY).unwrap();
    let got = t.both_ok("SEEK_DATA/SEEK_HOLE on the lower file", |m| {
        seek_probes(&m.join("sparse"), libc::O_RDONLY)
    });
    assert_eq!(
        got, lower,
        "stratafs: SEEK_DATA/SEEK_HOLE differ from the lower file's"
    );
    assert!(!exists(&t.su("sparse")), "stratafs copied up on O_RDONLY");
    // After copy-up each mount reports its own upper copy's extents (the kernel copies in
    // 1 MiB chunks, so its holes are coarser; the values are not comparable across mounts).
    let s_after = seek_probes(&t.s("sparse"), libc::O_RDWR).unwrap();
    let k_after = seek_probes(&t.k("sparse"), libc::O_RDWR).unwrap();
    assert_copied_up(&t, "sparse");
    let k_upper = seek_probes(&t.ku("sparse"), libc::O_RDONLY).unwrap();
    let s_upper = seek_probes(&t.su("sparse"), libc::O_RDONLY).unwrap();
    assert_eq!(
        k_after, k_upper,
        "kernel: SEEK_* after copy-up are the upper copy's"
    );
    assert_eq!(
        s_after, s_upper,
        "stratafs: SEEK_DATA/SEEK_HOLE after copy-up differ from its upper copy's"
    );
    t.finish();
}

#[test]
fn overlay_xattrs_set_through_the_mount_are_escaped() {
    let sc = Scratch::new();
    let mut t = twin(&sc);
    t.allow_markers();
    t.both_ok("setxattr trusted.overlay.opaque=y on merged dir", |m| {
        lsetxattr(&m.join("dir"), "trusted.overlay.opaque", b"y")
    });
    t.both_ok("setxattr trusted.overlay.redirect on lower dir", |m| {
        lsetxattr(&m.join("ldir"), "trusted.overlay.redirect", b"/dir")
    });
    t.both_ok("getxattr trusted.overlay.opaque", |m| {
        strata_tests::fsops::lgetxattr(&m.join("dir"), "trusted.overlay.opaque")
    });
    t.both_ok("list dir (not opaque: lower entries still show)", |m| {
        Ok(names(&m.join("dir")))
    });
    t.both_ok("list ldir (no redirect followed)", |m| {
        Ok(names(&m.join("ldir")))
    });
    t.both_ok("removexattr trusted.overlay.redirect", |m| {
        lremovexattr(&m.join("ldir"), "trusted.overlay.redirect")
    });
    t.finish();
}

#[test]
fn copy_file_range_between_lower_files() {
    let sc = Scratch::new();
    let t = Twin::new(&sc, 1, |ls| {
        ls[0]
            .file("src", pattern(10_000, 1))
            .file("dst", pattern(3000, 2));
    });
    t.both_ok("copy_file_range src[100..5100] -> dst[2000..]", |m| {
        let s = open_fd(&m.join("src"), libc::O_RDONLY)?;
        let d = open_fd(&m.join("dst"), libc::O_WRONLY)?;
        copy_file_range(&s, 100, &d, 2000, 5000)
    });
    assert!(
        !exists(&t.su("src")),
        "stratafs copied up the read-only source"
    );
    t.same("copy_file_range into a read-only fd", |m| {
        let s = open_fd(&m.join("src"), libc::O_RDONLY)?;
        let d = open_fd(&m.join("dst"), libc::O_RDONLY)?;
        copy_file_range(&s, 0, &d, 0, 10)
    });
    t.both_ok("read dst", |m| read(&m.join("dst")));
    t.finish();
}

#[test]
fn statfs_reports_the_upper_fs() {
    let sc = Scratch::new();
    let lower = sc.layer("lower");
    lower.file("f", "f\n");
    // The upper on its own small tmpfs, so that it cannot be confused with the lower's fs.
    let kfs = mount_tmpfs(&sc.join("kfs"));
    let sfs = mount_tmpfs(&sc.join("sfs"));
    let (ku, kw, km) = (sc.mkdir("kfs/u"), sc.mkdir("kfs/w"), sc.mkdir("kmnt"));
    let (su, sw, sm) = (sc.mkdir("sfs/u"), sc.mkdir("sfs/w"), sc.mkdir("smnt"));
    let before = snapshot_raw(lower.root());
    let kg = kernel_overlay(&km, &[lower.root()], Some((&ku, &kw)), KERNEL_OPTS);
    let sg = Strata::new(&[lower.root()]).upper(&su, &sw).mount(&sm);
    fs::write(sg.join("new"), pattern(100_000, 3)).unwrap();
    fs::write(kg.join("new"), pattern(100_000, 3)).unwrap();
    let up = statvfs(&su).unwrap();
    let m = statvfs(&sm).unwrap();
    let k = statvfs(&km).unwrap();
    let lo = statvfs(lower.root()).unwrap();
    assert_ne!(lo.f_blocks, up.f_blocks, "setup: lower and upper fs differ");
    assert_eq!(
        k.f_blocks * k.f_frsize,
        up.f_blocks * up.f_frsize,
        "kernel: statfs size is the upper fs's"
    );
    assert_eq!(
        (m.f_blocks, m.f_frsize),
        (up.f_blocks, up.f_frsize),
        "stratafs: statfs f_blocks/f_frsize is not the upper fs's (kernel overlayfs gives \
         f_blocks {} f_frsize {})",
        k.f_blocks,
        k.f_frsize
    );
    assert_eq!(m.f_bsize, up.f_bsize, "stratafs: f_bsize");
    assert_eq!(m.f_files, up.f_files, "stratafs: f_files");
    drop(sg);
    drop(kg);
    drop((sfs, kfs));
    assert_snapshots_eq(
        "lower before",
        &before,
        "lower after",
        &snapshot_raw(lower.root()),
    );
}

#[test]
fn metadata_only_copy_up() {
    let sc = Scratch::new();
    let t = Twin::new(&sc, 1, |ls| {
        ls[0].file("big.bin", pattern(4 << 20, 4));
    });
    t.both_ok("chmod big.bin", |m| {
        fs::set_permissions(m.join("big.bin"), fs::Permissions::from_mode(0o600))
    });
    let md = fs::metadata(t.su("big.bin")).expect("stratafs: metadata copied up");
    assert_eq!(md.mode() & 0o7777, 0o600);
    // At most an xattr block: the 4 MiB of data stayed in the lower layer.
    assert!(
        md.blocks() * 512 <= 16 * 1024,
        "stratafs: chmod copied the data of a lower file up ({} blocks)",
        md.blocks()
    );
    t.both_ok("read big.bin", |m| {
        read(&m.join("big.bin")).map(|d| d.len())
    });
    t.finish();
}

/// A metadata-only copy behaves like a full one: every metadata change lands, reads see the
/// lower data, survive a remount, and the first write brings the data up under the same
/// inode number, also for a descriptor opened for reading before.
#[test]
fn metadata_only_copy_up_then_data() {
    let sc = Scratch::new();
    let mut t = Twin::new(&sc, 1, |ls| {
        ls[0].file("big.bin", pattern(1 << 20, 9));
        ls[0].file("small", b"small file\n");
    });
    t.both_ok("chown big.bin", |m| lchown(&m.join("big.bin"), 42, 43));
    t.both_ok("utimes big.bin", |m| {
        utimens(&m.join("big.bin"), (1_600_000_000, 5), (1_500_000_000, 7))
    });
    t.both_ok("setxattr big.bin", |m| {
        strata_tests::fsops::lsetxattr(&m.join("big.bin"), "user.k", b"v")
    });
    t.both_ok("chmod small", |m| {
        fs::set_permissions(m.join("small"), fs::Permissions::from_mode(0o640))
    });
    let ino = |m: &Path| fs::metadata(m.join("big.bin")).map(|md| md.ino());
    let before = ino(&t.s(""));
    t.compare("after the metadata changes");
    t.remount();
    t.compare("after remounting with metadata-only copies");
    assert_eq!(ino(&t.s("")).ok(), before.as_ref().ok().copied());
    let reader = |m: &Path| open_fd(&m.join("big.bin"), libc::O_RDONLY);
    let (kr, sr) = (reader(&t.k("")).unwrap(), reader(&t.s("")).unwrap());
    t.both_ok("write into big.bin", |m| {
        let fd = open_fd(&m.join("big.bin"), libc::O_WRONLY)?;
        pwrite(&fd, b"NEW DATA", 4096)
    });
    assert_eq!(
        pread(&sr, 16, 4092).unwrap(),
        pread(&kr, 16, 4092).unwrap(),
        "a reader opened before the data copy-up sees the write"
    );
    assert_eq!(
        ino(&t.s("")).ok(),
        before.ok(),
        "inode number kept by the data copy-up"
    );
    let md = fs::metadata(t.su("big.bin")).unwrap();
    assert!(
        md.blocks() * 512 >= 1 << 20,
        "data is in the upper layer now"
    );
    drop((kr, sr));
    t.finish();
}

/// `whiteout=oci` makes deletions write `.wh.NAME` files even where char 0:0 devices work;
/// the merged view and a remount are the same either way.
#[test]
fn whiteout_option_selects_the_format() {
    for (opt, oci) in [("whiteout=oci", true), ("whiteout=chardev", false)] {
        let sc = Scratch::new();
        let lower = sc.layer("lower");
        lower
            .file("gone", "gone\n")
            .file("d/x", "x\n")
            .file("keep", "k\n");
        let (upper, work, mnt) = (sc.mkdir("upper"), sc.mkdir("work"), sc.mkdir("mnt"));
        let strata = Strata::new(&[lower.root()]).upper(&upper, &work).opt(opt);
        let g = strata.mount(&mnt);
        fs::remove_file(g.join("gone")).unwrap();
        fs::remove_file(g.join("d/x")).unwrap();
        fs::remove_dir(g.join("d")).unwrap();
        let names = |p: &Path| {
            let mut v: Vec<String> = fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&mnt), ["keep"], "{opt}: merged view");
        drop(g);
        if oci {
            assert!(
                upper.join(".wh.gone").is_file(),
                "{opt}: {:?}",
                names(&upper)
            );
            assert!(upper.join(".wh.d").is_file(), "{opt}: {:?}", names(&upper));
            assert!(!upper.join("gone").exists(), "{opt}: {:?}", names(&upper));
        } else {
            assert!(
                is_whiteout(&upper.join("gone")),
                "{opt}: {:?}",
                names(&upper)
            );
            assert!(is_whiteout(&upper.join("d")), "{opt}: {:?}", names(&upper));
        }
        let g = strata.mount(&mnt);
        assert_eq!(names(&mnt), ["keep"], "{opt}: after remount");
        drop(g);
    }
}

/// An upper written by kernel overlayfs reads the same through stratafs: a directory renamed
/// within its parent carries the kernel's relative redirect ("sub"), a renamed one elsewhere
/// an absolute one.
#[test]
fn kernel_written_redirects_are_followed() {
    let sc = Scratch::new();
    let lower = sc.layer("lower");
    lower
        .file("d/sub/f", "f\n")
        .file("d/sub/deep/g", "g\n")
        .file("e/x/h", "h\n");
    let (upper, work, mnt) = (sc.mkdir("upper"), sc.mkdir("work"), sc.mkdir("mnt"));
    let k = kernel_overlay(&mnt, &[lower.root()], Some((&upper, &work)), KERNEL_OPTS);
    fs::rename(mnt.join("d/sub"), mnt.join("d/sub2")).unwrap();
    fs::rename(mnt.join("e/x"), mnt.join("d/x2")).unwrap();
    let want = snapshot(&mnt);
    drop(k);
    let g = Strata::new(&[lower.root()])
        .upper(&upper, &work)
        .mount(&mnt);
    assert_snapshots_eq(
        "kernel",
        &want,
        "stratafs on the kernel's upper",
        &snapshot(g.path()),
    );
}

/// Deletions name one whiteout inode of the work dir, as kernel overlayfs does (a new inode
/// per deletion made the upper filesystem's inode allocator the cost of rm -rf); they still
/// read as whiteouts, and a name created over one is a new object.
#[test]
fn whiteouts_share_one_inode() {
    let sc = Scratch::new();
    let t = twin(&sc);
    t.both_ok("rm lower files and a lower dir", |m| {
        fs::remove_file(m.join("lower.txt"))?;
        fs::remove_file(m.join("top.txt"))?;
        fs::remove_file(m.join("dir/b"))?;
        fs::remove_dir_all(m.join("ldir"))
    });
    t.both_ok("recreate over a whiteout", |m| {
        fs::write(m.join("top.txt"), "new\n")
    });
    t.compare_uppers("after deletions");
    for (side, up) in [("kernel", &t.kernel.upper), ("stratafs", &t.strata.upper)] {
        let inos: Vec<u64> = ["lower.txt", "dir/b", "ldir"]
            .iter()
            .map(|rel| {
                let md = fs::symlink_metadata(up.join(rel)).unwrap();
                assert!(
                    md.file_type().is_char_device() && md.rdev() == 0,
                    "{side}: {rel}"
                );
                md.ino()
            })
            .collect();
        assert!(inos.windows(2).all(|w| w[0] == w[1]), "{side}: {inos:?}");
        let top = fs::symlink_metadata(up.join("top.txt")).unwrap();
        assert!(top.is_file() && top.ino() != inos[0], "{side}: top.txt");
    }
    t.finish();
}

/// Runs `script` with `sh -c` as `user`; its failure is an error naming the script.
fn sh_as(user: &TestUser, script: &str) -> io::Result<()> {
    let out = run_as(user, &["sh", "-c", script]);
    if out.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{script}: {}",
            out.stderr_str().trim()
        )))
    }
}

/// As `user`, opens `file` for appending, waits until the caller made `file` set-user-ID
/// (`make_setid`), then writes through the descriptor it opened before: the write must
/// still drop the bit.
fn write_after_late_setid(
    user: &TestUser,
    file: &Path,
    sync: &Path,
    make_setid: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    let (ready, go) = (sync.join("ready"), sync.join("go"));
    let _ = fs::remove_file(&ready);
    let _ = fs::remove_file(&go);
    let script = format!(
        "exec 3>>'{f}' && touch '{r}' && i=0 && \
         while [ ! -e '{g}' ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done && \
         printf late >&3",
        f = file.display(),
        r = ready.display(),
        g = go.display()
    );
    let mut child = strata_tests::user::as_user_command(user)
        .args(["sh", "-c", &script])
        .spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !ready.exists() {
        if std::time::Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other("the writer did not open the file"));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let made = make_setid();
    fs::write(&go, b"")?;
    loop {
        if let Some(status) = child.try_wait()? {
            made?;
            return if status.success() {
                Ok(())
            } else {
                Err(io::Error::other(format!("the writer failed: {status}")))
            };
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other("the writer did not finish"));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn setid_bits_and_capabilities_after_writes_truncates_and_chowns() {
    let user = ensure_test_user();
    let sc = Scratch::new();
    let sync = sc.mkdir("sync");
    fs::set_permissions(&sync, fs::Permissions::from_mode(0o777)).unwrap();
    let files: &[(&str, u32)] = &[
        ("user_write_suid", 0o4777),
        ("user_write_sgid", 0o2777),
        ("user_write_sgid_noexec", 0o2766),
        ("user_write_sgid_noexec_in_group", 0o2766),
        ("user_write_cap", 0o777),
        ("user_truncate_suid", 0o6777),
        ("user_copy_range_suid", 0o4777),
        ("root_write_suid", 0o4777),
        ("root_truncate_suid", 0o4777),
        ("root_write_cap", 0o777),
        ("chown_suid", 0o6777),
        ("late_suid", 0o666),
    ];
    let t = Twin::new(&sc, 1, |ls| {
        for &(name, mode) in files {
            ls[0].file_mode(name, "data\n", mode);
        }
        for name in ["user_write_cap", "root_write_cap"] {
            ls[0].xattr(name, "security.capability", CAP_BYTES);
        }
        ls[0].owner("user_write_sgid_noexec_in_group", 0, user.gid);
    });
    let p = |m: &Path, rel: &str| m.join(rel).display().to_string();
    t.both_ok("appends by a user", |m| {
        for f in [
            "user_write_suid",
            "user_write_sgid",
            "user_write_sgid_noexec",
            "user_write_sgid_noexec_in_group",
            "user_write_cap",
        ] {
            sh_as(&user, &format!("printf more >> '{}'", p(m, f)))?;
        }
        Ok(())
    });
    t.both_ok("copy_file_range by a user", |m| {
        let script = format!(
            "import os\n\
             s = os.open('{}', os.O_RDONLY)\n\
             d = os.open('{}', os.O_WRONLY)\n\
             os.copy_file_range(s, d, 3, 0, 1)",
            p(m, "late_suid"),
            p(m, "user_copy_range_suid")
        );
        let out = run_as(&user, &["python3", "-c", &script]);
        if out.success() {
            Ok(())
        } else {
            Err(io::Error::other(out.stderr_str()))
        }
    });
    t.both_ok("truncate by a user", |m| {
        sh_as(
            &user,
            &format!("truncate -s 2 '{}'", p(m, "user_truncate_suid")),
        )
    });
    t.both_ok("append and truncate by root", |m| {
        append(&m.join("root_write_suid"), b"more")?;
        append(&m.join("root_write_cap"), b"more")?;
        fs::OpenOptions::new()
            .write(true)
            .open(m.join("root_truncate_suid"))?
            .set_len(2)
    });
    t.both_ok("chown by root", |m| lchown(&m.join("chown_suid"), 7, 8));
    t.both_ok(
        "chmod u+s while a user's writer is open, then its write",
        |m| {
            let f = m.join("late_suid");
            write_after_late_setid(&user, &f, &sync, || {
                fs::set_permissions(&f, fs::Permissions::from_mode(0o4777))
            })
        },
    );
    for &(name, _) in files {
        t.both_ok(&format!("stat {name}"), |m| st(&m.join(name)));
        t.same(&format!("security.capability of {name}"), |m| {
            strata_tests::fsops::lgetxattr(&m.join(name), "security.capability")
        });
    }
    // What the kernel does, spelled out, so that a change on both sides cannot pass.
    let mode = |rel: &str| st(&t.k(rel)).unwrap().mode;
    assert_eq!(mode("user_write_suid"), 0o777);
    assert_eq!(mode("user_write_sgid"), 0o777);
    // Without group execution set-group-ID is no privilege, but it still goes for a writer
    // outside the file's group.
    assert_eq!(mode("user_write_sgid_noexec"), 0o766);
    assert_eq!(mode("user_write_sgid_noexec_in_group"), 0o2766);
    assert_eq!(mode("user_truncate_suid"), 0o777);
    assert_eq!(mode("user_copy_range_suid"), 0o777);
    assert_eq!(mode("root_write_suid"), 0o4777);
    assert_eq!(mode("root_truncate_suid"), 0o4777);
    assert_eq!(mode("chown_suid"), 0o777);
    assert_eq!(mode("late_suid"), 0o777);
    assert!(strata_tests::fsops::lgetxattr(&t.k("user_write_cap"), "security.capability").is_err());
    t.finish();
}

#[test]
fn copy_up_from_another_filesystem_keeps_every_byte() {
    // The lower layer on a tmpfs, the upper on the scratch filesystem: copy_file_range
    // cannot cross them (EXDEV), so the copy takes the other path.
    let sc = Scratch::new();
    let lower = sc.join("tmpfs");
    let _tmpfs = mount_tmpfs(&lower);
    let dense: Vec<u8> = (0..(3u32 << 20) + 12345)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(lower.join("dense"), &dense).unwrap();
    let sparse = fs::File::create(lower.join("sparse")).unwrap();
    sparse.set_len(5 << 20).unwrap();
    sparse.write_all_at(&dense[..70_000], 1 << 20).unwrap();
    sparse.write_all_at(b"tail", (5 << 20) - 4).unwrap();
    drop(sparse);
    fs::write(lower.join("empty"), b"").unwrap();
    let up = sc.mkdir("upper");
    let work = sc.mkdir("work");
    let mnt = sc.mkdir("mnt");
    let _g = Strata::new(&[&lower]).upper(&up, &work).mount(&mnt);
    for name in ["dense", "sparse", "empty"] {
        let before = fs::read(lower.join(name)).unwrap();
        append(&mnt.join(name), b"+").unwrap();
        let mut want = before.clone();
        want.push(b'+');
        assert_eq!(
            fs::read(up.join(name)).unwrap(),
            want,
            "{name}: upper copy after an append"
        );
        assert_eq!(
            fs::read(mnt.join(name)).unwrap(),
            want,
            "{name}: via the mount"
        );
        assert_eq!(fs::read(lower.join(name)).unwrap(), before, "{name}: lower");
    }
}
