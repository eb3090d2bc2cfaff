//! FUSE passthrough: as root, open upper files are read and written by the kernel directly;
//! a lower file never backs a passthrough (writes must not reach the image layer, and a
//! reader opened before a copy-up must see later writes, as with kernel overlayfs); mixed
//! opens of one inode never fail; rootless mounts fall back cleanly (and an unprivileged
//! creator writes a file whose mode denies it, through the creating open).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;

use strata_tests::fsops::SharedMapping;
use strata_tests::*;

fn read_at(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    let n = f.read_at(&mut b, off).unwrap();
    b.truncate(n);
    b
}

#[test]
fn lower_reader_sees_writes_after_copy_up_and_lower_stays() {
    let sc = Scratch::new();
    let lower = sc.layer("lower");
    lower.file("f", "lower data\n");
    let up = sc.mkdir("upper");
    let work = sc.mkdir("work");
    let mnt = sc.mkdir("mnt");
    let _g = Strata::new(&[lower.root()]).upper(&up, &work).mount(&mnt);

    let reader = File::open(mnt.join("f")).unwrap();
    assert_eq!(read_at(&reader, 0, 64), b"lower data\n");
    let mut writer = OpenOptions::new().write(true).open(mnt.join("f")).unwrap();
    writer.write_all(b"UPPER").unwrap();
    writer.flush().unwrap();
    // A second writer and reader while the first ones are open: no EIO from mode conflicts.
    let w2 = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("f"))
        .unwrap();
    w2.write_at(b"!", 10).unwrap();
    let r2 = File::open(mnt.join("f")).unwrap();
    assert_eq!(read_at(&r2, 0, 64), b"UPPER data!");
    assert_eq!(
        read_at(&reader, 0, 64),
        b"UPPER data!",
        "old reader is stale"
    );
    drop((reader, writer, w2, r2));
    assert_eq!(fs::read(lower.path("f")).unwrap(), b"lower data\n");
    assert_eq!(fs::read(up.join("f")).unwrap(), b"UPPER data!");
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"UPPER data!");
}

#[test]
fn upper_file_is_passed_through_as_root() {
    let sc = Scratch::new();
    let lower = sc.layer("lower");
    lower.file("keep", "k");
    let up = sc.mkdir("upper");
    let work = sc.mkdir("work");
    let mnt = sc.mkdir("mnt");
    let _g = Strata::new(&[lower.root()]).upper(&up, &work).mount(&mnt);
    fs::write(mnt.join("new"), b"0123456789").unwrap();

    let mut f = File::open(mnt.join("new")).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "0123456789");
    // Change the upper file behind the mount. A passthrough reads the real file, so the
    // open file shows the change; a page-cached open would still show the old bytes.
    OpenOptions::new()
        .write(true)
        .open(up.join("new"))
        .unwrap()
        .write_all_at(b"ABC", 0)
        .unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(
        s, "ABC3456789",
        "reads of an open upper file did not pass through"
    );
}

/// Mounts stratafs with `nopassthrough` over `lower` and a fresh upper layer; returns the
/// mount's guard, the upper directory and the mountpoint.
fn mount_nopassthrough(sc: &Scratch, lower: &Layer) -> (MountGuard, PathBuf, PathBuf) {
    let up = sc.mkdir("upper");
    let work = sc.mkdir("work");
    let mnt = sc.mkdir("mnt");
    let g = Strata::new(&[lower.root()])
        .upper(&up, &work)
        .opt("nopassthrough")
        .mount(&mnt);
    (g, up, mnt)
}

#[test]
fn nopassthrough_serves_from_the_daemon() {
    let sc = Scratch::new();
    let lower = sc.layer("lower");
    lower.file("keep", "k");
    let (_g, up, mnt) = mount_nopassthrough(&sc, &lower);
    fs::write(mnt.join("new"), b"0123456789").unwrap();
    let mut f = File::open(mnt.join("new")).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "0123456789");
    assert_eq!(fs::read(up.join("new")).unwrap(), b"0123456789");
}

#[test]
fn rootless_mount_falls_back_without_passthrough() {
    let user = ensure_test_user();
    ensure_dev_fuse_rw();
    let sc = Scratch::new();
    let lower = sc.layer("lower");
    lower.file("f", "lower\n");
    let up = sc.mkdir("upper");
    let work = sc.mkdir("work");
    let mnt = sc.mkdir("mnt");
    chown_tree(sc.path(), &user);
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.root().display(),
        up.display(),
        work.display()
    );
    let out = run_as(
        &user,
        &[
            stratafs_bin().to_str().unwrap(),
            "-o",
            &opts,
            mnt.to_str().unwrap(),
        ],
    );
    let g = MountGuard::fuse(&mnt).unmount_as(&user);
    assert!(out.success(), "{}", out.describe());
    let script = format!(
        "echo more >> {m}/f && cat {m}/f && head -c 3 {m}/f && \
         (umask 777 && echo placeholder > {m}/p) && stat -c ' %a %s' {m}/p",
        m = mnt.display()
    );
    let out = run_as(&user, &["sh", "-c", &script]);
    assert!(out.success(), "{}", out.describe());
    // The mode-0 file is written through its creating open, as tar does for placeholders.
    assert_eq!(out.stdout_str(), "lower\nmore\nlow 0 12\n");
    assert_eq!(fs::read(lower.path("f")).unwrap(), b"lower\n");
    drop(g);
}

#[test]
fn every_name_of_a_lower_hard_link_reads_while_a_writer_is_open() {
    let sc = Scratch::new();
    let lower = sc.layer("lower");
    lower.dir("a").dir("b").file("a/y", "lowerdata\n");
    fs::hard_link(lower.path("a/y"), lower.path("b/g")).unwrap();
    let up = sc.mkdir("upper");
    let work = sc.mkdir("work");
    let mnt = sc.mkdir("mnt");
    let _g = Strata::new(&[lower.root()]).upper(&up, &work).mount(&mnt);
    assert_eq!(fs::read(mnt.join("a/y")).unwrap(), b"lowerdata\n");
    let mut w = OpenOptions::new()
        .append(true)
        .open(mnt.join("a/y"))
        .unwrap();
    // The other name resolves to the index entry, the first to the linked-up copy: one
    // inode, one backing file, and no open may fail.
    for name in ["b/g", "a/y", "b/g"] {
        assert_eq!(fs::read(mnt.join(name)).unwrap(), b"lowerdata\n", "{name}");
    }
    w.write_all(b"more\n").unwrap();
    for name in ["b/g", "a/y"] {
        assert_eq!(
            fs::read(mnt.join(name)).unwrap(),
            b"lowerdata\nmore\n",
            "{name}"
        );
    }
    drop(w);
    assert_eq!(fs::read(lower.path("b/g")).unwrap(), b"lowerdata\n");
}

/// Without passthrough, a write-only open writes around the page cache (every byte would
/// otherwise land in two caches); readers holding cached pages, through `read` and through
/// a shared mapping, must still see those writes, before and after the writer closes.
#[test]
fn cached_readers_see_writes_of_a_write_only_open() {
    let sc = Scratch::new();
    let lower = sc.layer("lower");
    lower.file("f", "a".repeat(3 * 4096));
    let (_g, up, mnt) = mount_nopassthrough(&sc, &lower);
    let path = mnt.join("f");

    let reader = File::open(&path).unwrap();
    assert_eq!(read_at(&reader, 4096, 4), b"aaaa");
    let map = SharedMapping::new(&reader, 3 * 4096).unwrap();
    assert_eq!(map.bytes()[4096..4100], *b"aaaa");

    let writer = OpenOptions::new().write(true).open(&path).unwrap();
    writer.write_all_at(b"WXYZ", 4096).unwrap();
    assert_eq!(
        read_at(&reader, 4096, 4),
        b"WXYZ",
        "reader kept stale pages"
    );
    assert_eq!(
        map.bytes()[4096..4100],
        *b"WXYZ",
        "mapping kept stale pages"
    );

    // A reader opened while the writer is open, then a write past the old end.
    let r2 = File::open(&path).unwrap();
    assert_eq!(read_at(&r2, 4096, 4), b"WXYZ");
    writer.write_all_at(b"tail", 3 * 4096).unwrap();
    drop(writer);
    assert_eq!(read_at(&r2, 3 * 4096, 8), b"tail");
    assert_eq!(r2.metadata().unwrap().len(), 3 * 4096 + 4);
    assert_eq!(read_at(&reader, 4094, 6), b"aaWXYZ");
    drop((map, reader, r2));
    let on_disk = fs::read(up.join("f")).unwrap();
    assert_eq!(&on_disk[4096..4100], b"WXYZ");
    assert_eq!(&on_disk[3 * 4096..], b"tail");
    assert_eq!(
        fs::read(lower.path("f")).unwrap(),
        "a".repeat(3 * 4096).as_bytes()
    );
}

/// A write by a user without CAP_FSETID drops set-user-ID and set-group-ID (with group
/// execute), as on kernel overlayfs, whichever way the write reaches the layer: through a
/// backing file, the kernel's cache (read-write open), or straight to the daemon (write-only
/// open without passthrough, where the kernel leaves the job to us).
#[test]
fn unprivileged_writes_drop_setuid_as_on_the_kernel() {
    let user = ensure_test_user();
    let sc = Scratch::new();
    let lower = sc.layer("lower");
    lower.file_mode("s", "data\n", 0o6777);
    let writes = [
        ("append (write-only)", "printf X >> {}"),
        ("read-write", "printf Y 1<> {}"),
    ];
    for (side, opts) in [
        ("kernel", None),
        ("stratafs", Some("")),
        ("stratafs", Some("nopassthrough")),
    ] {
        for (what, script) in writes {
            let dir = sc.mkdir(format!("{side}-{}-{}", opts.unwrap_or(""), what.len()));
            let (up, work, mnt) = (dir.join("u"), dir.join("w"), dir.join("m"));
            for d in [&up, &work, &mnt] {
                fs::create_dir(d).unwrap();
            }
            let _g = match opts {
                None => kernel_overlay(
                    &mnt,
                    &[lower.root()],
                    Some((&up, &work)),
                    &["redirect_dir=on", "index=on"],
                ),
                Some(o) => {
                    let s = Strata::new(&[lower.root()]).upper(&up, &work);
                    if o.is_empty() {
                        s.mount(&mnt)
                    } else {
                        s.opt(o).mount(&mnt)
                    }
                }
            };
            let f = mnt.join("s");
            let out = run_as(
                &user,
                &["sh", "-c", &script.replace("{}", f.to_str().unwrap())],
            );
            assert!(out.success(), "{side} {opts:?} {what}: {}", out.describe());
            let mode = fs::metadata(&f).unwrap().mode() & 0o7777;
            assert_eq!(
                mode, 0o777,
                "{side} {opts:?} {what}: mode {mode:o} through the mount"
            );
            drop(_g);
            let mode = fs::metadata(up.join("s")).unwrap().mode() & 0o7777;
            assert_eq!(
                mode, 0o777,
                "{side} {opts:?} {what}: mode {mode:o} in the upper layer"
            );
        }
    }
    assert_eq!(
        fs::metadata(lower.path("s")).unwrap().mode() & 0o7777,
        0o6777
    );
}
