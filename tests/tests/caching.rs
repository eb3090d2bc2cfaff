//! What the kernel caches for a stratafs mount (names and attributes for a long time,
//! listings in its page cache, attributes with every listing) must never be seen stale:
//! every change behind the kernel's back is visible as soon as the request that made it
//! returns. Each test first makes the kernel cache what the change will touch, then
//! compares with kernel overlayfs (`redirect_dir=on,index=on`) over a copy of the same
//! stack.

use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use strata_tests::fsops::{
    drop_caches, evict, hold_page_cache, page_cached, read_dir_raw, DirStream,
};
use strata_tests::mount::signal;
use strata_tests::writes::*;
use strata_tests::*;

/// What `lstat` says that both mounts must agree on (no inode numbers or times), directory
/// link counts included.
#[derive(Debug, PartialEq, Clone)]
struct St {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: Option<u64>,
    nlink: u64,
}

fn st(p: &Path) -> io::Result<St> {
    let m = fs::symlink_metadata(p)?;
    Ok(St {
        kind: Kind::from_mode(m.mode()),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        // Directory sizes depend on the filesystem.
        size: (!m.is_dir()).then(|| m.size()),
        nlink: m.nlink(),
    })
}

/// `(ctime, ctime_nsec, blocks)` of `p`.
fn ctime_blocks(p: &Path) -> (i64, i64, u64) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    (m.ctime(), m.ctime_nsec(), m.blocks())
}

/// Sorted `(name, d_type)` of a listing.
fn listing(p: &Path) -> io::Result<Vec<(String, Kind)>> {
    let mut v: Vec<(String, Kind)> = read_dir_raw(p)?
        .into_iter()
        .map(|e| (e.name, e.kind))
        .collect();
    v.sort();
    Ok(v)
}

/// Walks the whole tree on both mounts, so that the kernel holds every name, attribute and
/// listing.
fn warm(t: &Twin) {
    t.compare("warming the caches");
}

#[test]
fn ancestors_copied_up_show_merged_link_counts() {
    let sc = Scratch::new();
    let t = Twin::new(&sc, 2, |ls| {
        ls[1]
            .file("a/b/c/f", "f\n")
            .dir("a/x")
            .dir("a/b/y")
            .file("top", "t\n");
    });
    warm(&t);
    for rel in ["a", "a/b", "a/b/c"] {
        t.both_ok(&format!("stat {rel} before"), |m| st(&m.join(rel)));
    }
    // Creating a/b/c/new copies a and a/b up without any request on them: they become
    // merged directories (link count 1), with the upper copies' ctimes.
    t.both_ok("create a/b/c/new", |m| {
        fs::write(m.join("a/b/c/new"), "n\n")
    });
    for rel in ["a", "a/b", "a/b/c"] {
        let s = t.both_ok(&format!("stat {rel} after"), |m| st(&m.join(rel)));
        assert_eq!(s.nlink, 1, "{rel}: a merged directory has link count 1");
        assert_eq!(
            ctime_blocks(&t.s(rel)).0,
            ctime_blocks(&t.su(rel)).0,
            "{rel}: stratafs shows the ctime of the upper copy"
        );
    }
    t.both_ok("list a", |m| listing(&m.join("a")));
    t.finish();
}

#[test]
fn copy_up_for_writing_shows_upper_attributes() {
    let sc = Scratch::new();
    let big = pattern(256 * 1024, 7);
    let t = Twin::new(&sc, 1, |ls| {
        ls[0].file("small", "small\n").file("big", &big);
    });
    warm(&t);
    // A metadata change of a big file copies up its metadata only (stratafs, like
    // metacopy): its data comes up at the first open for writing.
    t.both_ok("chmod big", |m| {
        fs::set_permissions(m.join("big"), fs::Permissions::from_mode(0o600))
    });
    for rel in ["small", "big"] {
        t.both_ok(&format!("stat {rel} before"), |m| st(&m.join(rel)));
        // Opened for writing (and closed without a write): copied up, nothing else.
        t.both_ok(&format!("open {rel} for writing"), |m| {
            open_fd(&m.join(rel), libc::O_WRONLY).map(drop)
        });
        t.both_ok(&format!("stat {rel} after"), |m| st(&m.join(rel)));
        let (sc_, sn, sb) = ctime_blocks(&t.s(rel));
        let (uc, un, ub) = ctime_blocks(&t.su(rel));
        assert_eq!(
            (sc_, sn, sb),
            (uc, un, ub),
            "{rel}: stratafs shows the upper copy's ctime and blocks after copy-up"
        );
    }
    t.finish();
}

#[test]
fn hard_links_share_what_the_kernel_caches() {
    // All names in one directory: FUSE's LINK request names the inode, not the name it was
    // reached by, so stratafs copies up whichever name it last resolved (with its parent),
    // where the kernel copies up the one the caller used.
    let sc = Scratch::new();
    let t = Twin::new(&sc, 1, |ls| {
        ls[0]
            .file("h/a", "a\n")
            .hardlink("h/b", "h/a")
            .hardlink("h/c", "h/a");
    });
    warm(&t);
    t.both_ok("append to h/a", |m| append(&m.join("h/a"), b"more\n"));
    for rel in ["h/a", "h/b", "h/c"] {
        t.both_ok(&format!("stat {rel}"), |m| st(&m.join(rel)));
        t.both_ok(&format!("read {rel}"), |m| fs::read(m.join(rel)));
    }
    t.both_ok("unlink h/a", |m| fs::remove_file(m.join("h/a")));
    for rel in ["h/b", "h/c"] {
        let s = t.both_ok(&format!("stat {rel} after unlink"), |m| st(&m.join(rel)));
        assert_eq!(s.nlink, 2, "{rel}: two names left");
    }
    t.both_ok("link h/b h/d", |m| link(&m.join("h/b"), &m.join("h/d")));
    t.both_ok("stat h/c after link", |m| st(&m.join("h/c")));
    t.both_ok("rename h/c over h/b", |m| {
        fs::rename(m.join("h/c"), m.join("h/b"))
    });
    t.both_ok("unlink h/b", |m| fs::remove_file(m.join("h/b")));
    t.both_ok("stat h/d after unlink", |m| st(&m.join("h/d")));
    t.finish();
}

/// Lookups that follow a cold listing of a big directory (stratafs resolves the listing's
/// names ahead of them in the background) find what is there when they come, also for
/// names removed, renamed or rewritten after the listing was read.
#[test]
fn lookups_after_a_cold_listing_see_later_changes() {
    let sc = Scratch::new();
    let t = Twin::new(&sc, 2, |ls| {
        for i in (0..3000).step_by(7) {
            ls[0].file(format!("big/f{i:05}"), "top\n");
        }
        for i in 0..3000 {
            ls[1].file(format!("big/f{i:05}"), format!("{i}\n"));
        }
    });
    let seen = t.both_ok("cold listing, changes, then lookups", |m| {
        let big = m.join("big");
        drop_caches(3);
        let mut names: Vec<String> = fs::read_dir(&big)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<io::Result<_>>()?;
        names.sort();
        // The first lookups find the layers' caches cold, which starts the lookahead.
        for n in &names[..20] {
            st(&big.join(n))?;
        }
        for (i, n) in names.iter().enumerate().skip(20) {
            match i % 10 {
                0 => fs::remove_file(big.join(n))?,
                3 => fs::rename(big.join(n), big.join(format!("moved-{n}")))?,
                6 => fs::write(big.join(n), "rewritten\n")?,
                _ => {}
            }
        }
        Ok(names
            .iter()
            .map(|n| (n.clone(), st(&big.join(n)).map_err(|e| e.raw_os_error())))
            .collect::<Vec<_>>())
    });
    let gone = seen.iter().filter(|(_, r)| r.is_err()).count();
    assert_eq!(gone, 596, "removed and renamed names are gone");
    // Now cold again and read with attributes (READDIRPLUS; a big directory's cold entries
    // are resolved by the lookahead's threads while each reply is made): every entry's
    // attributes are the ones after the changes.
    let listed = t.both_ok("cold listing with attributes, after the changes", |m| {
        let big = m.join("big");
        drop_caches(3);
        let mut out = Vec::new();
        for e in fs::read_dir(&big)? {
            let e = e?;
            out.push((e.file_name().to_string_lossy().into_owned(), st(&e.path())?));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    });
    assert_eq!(listed.len(), 3000 - 298, "removed names are not listed");
    let rewritten = listed.iter().filter(|(_, s)| s.size == Some(10)).count();
    assert_eq!(rewritten, 298, "rewritten files have their new size");
    t.finish();
}

#[test]
fn cached_listings_follow_every_change() {
    let sc = Scratch::new();
    let t = Twin::new(&sc, 2, |ls| {
        ls[0].file("d/top", "t\n").file("e/etop", "e\n");
        ls[1]
            .file("d/low", "l\n")
            .file("d/sub/x", "x\n")
            .file("e/elow", "l\n")
            .dir("e/edir");
    });
    type Op = (&'static str, fn(&Path) -> io::Result<()>);
    let ops: &[Op] = &[
        ("create d/new", |m| fs::write(m.join("d/new"), "n\n")),
        ("mkdir d/m", |m| fs::create_dir(m.join("d/m"))),
        ("symlink d/s", |m| {
            std::os::unix::fs::symlink("top", m.join("d/s"))
        }),
        ("link d/l", |m| link(&m.join("d/top"), &m.join("d/l"))),
        ("mkfifo d/p", |m| mkfifo(&m.join("d/p"), 0o644)),
        ("unlink d/low", |m| fs::remove_file(m.join("d/low"))),
        ("rename d/new e/new", |m| {
            fs::rename(m.join("d/new"), m.join("e/new"))
        }),
        ("rename dir e/edir d/edir", |m| {
            fs::rename(m.join("e/edir"), m.join("d/edir"))
        }),
        ("rename dir d/sub e/sub", |m| {
            fs::rename(m.join("d/sub"), m.join("e/sub"))
        }),
        ("exchange d/top e/etop", |m| {
            rename2(&m.join("d/top"), &m.join("e/etop"), libc::RENAME_EXCHANGE)
        }),
        ("rmdir d/m", |m| fs::remove_dir(m.join("d/m"))),
        ("mkdir d/low over its whiteout", |m| {
            fs::create_dir(m.join("d/low"))
        }),
        ("rename d/s over e/elow", |m| {
            fs::rename(m.join("d/s"), m.join("e/elow"))
        }),
    ];
    for (what, op) in ops {
        for dir in ["", "d", "e", "e/sub", "d/edir"] {
            t.same(&format!("list {dir:?} before {what}"), |m| {
                listing(&m.join(dir))
            });
        }
        t.both_ok(what, op);
        for dir in ["", "d", "e", "e/sub", "d/edir", "d/low"] {
            t.same(&format!("list {dir:?} after {what}"), |m| {
                listing(&m.join(dir))
            });
        }
    }
    t.finish();
}

#[test]
fn a_directory_stream_sees_changes_after_rewind() {
    let sc = Scratch::new();
    let t = Twin::new(&sc, 2, |ls| {
        ls[0].file("d/a", "a\n");
        ls[1].file("d/b", "b\n");
    });
    warm(&t);
    let names = |d: &mut DirStream| -> Vec<String> {
        let mut v = Vec::new();
        while let Some(e) = d.next_entry().unwrap() {
            if e.name != "." && e.name != ".." {
                v.push(e.name);
            }
        }
        v.sort();
        v
    };
    let mut ks = DirStream::open(&t.k("d")).unwrap();
    let mut ss = DirStream::open(&t.s("d")).unwrap();
    assert_eq!(names(&mut ks), names(&mut ss), "first read");
    t.both_ok("create d/c", |m| fs::write(m.join("d/c"), "c\n"));
    t.both_ok("unlink d/b", |m| fs::remove_file(m.join("d/b")));
    ks.rewind();
    ss.rewind();
    let (k, s) = (names(&mut ks), names(&mut ss));
    assert_eq!(k, ["a", "c"], "kernel overlayfs after rewinddir");
    assert_eq!(s, k, "stratafs after rewinddir");
    // And a new stream, which the kernel may serve from its cache of the listing.
    t.both_ok("list d again", |m| listing(&m.join("d")));
    drop((ks, ss));
    t.finish();
}

#[test]
fn a_stream_read_across_a_change_leaves_no_stale_listing() {
    // A directory longer than one listing request, so that a stream is read in parts.
    let sc = Scratch::new();
    let t = Twin::new(&sc, 2, |ls| {
        for i in 0..600 {
            ls[i % 2].file(format!("d/f{i:04}"), "x");
        }
    });
    warm(&t);
    for (side, dir) in [("kernel", t.k("d")), ("stratafs", t.s("d"))] {
        // A change first, so that the kernel no longer trusts its cache of the listing.
        fs::write(dir.join("g0"), "g").unwrap();
        let mut old = DirStream::open(&dir).unwrap();
        let mut seen = Vec::new();
        // Part of the listing through the old stream (the kernel starts caching it)...
        for _ in 0..300 {
            seen.push(old.next_entry().unwrap().expect("an entry").name);
        }
        // ...a change...
        fs::remove_file(dir.join("f0007")).unwrap();
        fs::remove_file(dir.join("f0591")).unwrap();
        fs::write(dir.join("new"), "n").unwrap();
        // ...a new stream reads it all (from its own start, while the old one is half-way)...
        let fresh = listing(&dir).unwrap();
        assert!(
            fresh.iter().any(|(n, _)| n == "new") && !fresh.iter().any(|(n, _)| n == "f0007"),
            "{side}: a new stream sees the change"
        );
        // ...and the old stream goes on. Every name that was there all along is listed
        // exactly once; of the names that came or went, nothing is promised.
        while let Some(e) = old.next_entry().unwrap() {
            seen.push(e.name);
        }
        drop(old);
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            seen.len(),
            "{side}: the old stream repeated a name"
        );
        for i in (0..600).filter(|i| ![7, 591].contains(i)) {
            let n = format!("f{i:04}");
            assert!(sorted.contains(&n), "{side}: the old stream missed {n}");
        }
    }
    // Whatever the old stream read must not have become what later streams see.
    t.both_ok("list d after both streams", |m| listing(&m.join("d")));
    t.both_ok("list d once more", |m| listing(&m.join("d")));
    t.finish();
}

/// The counts of the `nth` (from 1) line of a `STRATAFS_STATS` file labelled `label`, once
/// that line is there: `key=N` pairs (a count the line leaves out is 0).
fn stat_line(file: &Path, label: &str, nth: usize) -> Vec<(String, u64)> {
    let want = format!("stratafs requests ({label}):");
    let mut line = None;
    let found = wait_for(Duration::from_secs(10), || {
        line = fs::read_to_string(file).ok().and_then(|s| {
            s.lines()
                .filter(|l| l.starts_with(&want))
                .nth(nth - 1)
                .map(String::from)
        });
        line.is_some()
    });
    assert!(found, "no {want:?} line {nth} in {}", file.display());
    line.unwrap_or_default()
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

fn count(line: &[(String, u64)], key: &str) -> u64 {
    line.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v)
}

/// A small lower file comes with its open (the daemon stores its contents in the kernel's
/// page cache): reading it whole sends no READ, and a later stat no GETATTR for the atime
/// a READ would have dropped. A file above the limit is read with READs.
#[test]
fn small_lower_files_are_read_without_read_requests() {
    let sc = Scratch::new();
    let lower = sc.layer("lower");
    let big = pattern(300 * 1024, 3);
    let name = |i: usize| format!("many/f{i:02}");
    for i in 0..40 {
        lower.file(name(i), format!("file {i}\n").repeat(i * 50 + 1));
    }
    lower.file("big", &big);
    let (up, work, mnt) = (sc.mkdir("upper"), sc.mkdir("work"), sc.mkdir("mnt"));
    let stats = sc.join("stats");
    let mut g = Strata::new(&[lower.root()])
        .upper(&up, &work)
        .env("STRATAFS_STATS", &stats)
        .mount(&mnt);
    for i in 0..40 {
        fs::metadata(mnt.join(name(i))).unwrap();
    }
    signal(g.daemon_pid(), libc::SIGUSR1);
    let before = stat_line(&stats, "SIGUSR1", 1);
    for i in 0..40 {
        let p = mnt.join(name(i));
        assert_eq!(
            fs::read(&p).unwrap(),
            fs::read(lower.path(name(i))).unwrap()
        );
        fs::metadata(&p).unwrap();
    }
    signal(g.daemon_pid(), libc::SIGUSR1);
    let after = stat_line(&stats, "SIGUSR1", 2);
    let diff = |key| count(&after, key) - count(&before, key);
    assert_eq!(diff("notify_store"), 40, "files stored at open");
    assert_eq!(diff("open"), 40);
    assert_eq!(diff("read"), 0, "READs for small files");
    assert_eq!(diff("getattr"), 0, "GETATTRs after reads");
    assert_eq!(fs::read(mnt.join("big")).unwrap(), big);
    g.unmount().unwrap();
    let end = stat_line(&stats, "unmount", 1);
    assert_eq!(count(&end, "notify_store"), 40);
    assert!(count(&end, "read") > 0, "the big file is read with READs");

    // Without an upper layer, the top layer is a lower one too.
    let ro_stats = sc.join("ro-stats");
    let mut g = Strata::new(&[lower.root()])
        .env("STRATAFS_STATS", &ro_stats)
        .mount(&mnt);
    for i in 0..40 {
        assert_eq!(
            fs::read(mnt.join(name(i))).unwrap(),
            fs::read(lower.path(name(i))).unwrap()
        );
    }
    g.unmount().unwrap();
    let end = stat_line(&ro_stats, "unmount", 1);
    assert_eq!(
        count(&end, "notify_store"),
        40,
        "stored at open without an upper layer"
    );
    assert_eq!(count(&end, "read"), 0, "READs without an upper layer");
}

/// A cold listing of a big directory reads names, not the layers' inodes: the kernel asks
/// for a listing's first block with attributes whoever reads it, and stratafs ends that reply
/// at its first entry that had to wait for the disk. A reader that stats the names as it
/// reads them still gets them with their attributes, not by a lookup each; and every name
/// and attribute is the merged one.
#[test]
fn a_cold_big_listing_reads_attributes_only_for_readers_that_stat() {
    let sc = Scratch::new();
    let (top, low) = (sc.layer("top"), sc.layer("low"));
    let name = |i: usize| format!("f{i:05}");
    for i in 0..3000 {
        low.file(format!("big/{}", name(i)), format!("{i}\n"));
    }
    for i in (0..3000).step_by(5) {
        top.file(format!("big/{}", name(i)), "top\n");
    }
    let size = |n: &str| -> u64 {
        let i: usize = n[1..].parse().unwrap();
        if i % 5 == 0 {
            4
        } else {
            format!("{i}\n").len() as u64
        }
    };
    let (up, work, mnt) = (sc.mkdir("upper"), sc.mkdir("work"), sc.mkdir("mnt"));
    let stats = sc.join("stats");
    let mut g = Strata::new(&[top.root(), low.root()])
        .upper(&up, &work)
        .env("STRATAFS_STATS", &stats)
        .mount(&mnt);
    let big = mnt.join("big");
    fs::metadata(&big).unwrap();
    let mut dumps = 0;
    let mut dump = || {
        dumps += 1;
        signal(g.daemon_pid(), libc::SIGUSR1);
        stat_line(&stats, "SIGUSR1", dumps)
    };

    // Names first, then a stat of each (ls -l, find): the names come with one entry's
    // attributes at most; the stats look the others up.
    drop_caches(3);
    let start = dump();
    let mut names: Vec<String> = fs::read_dir(&big)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let listed = dump();
    names.sort();
    assert_eq!(names, (0..3000).map(name).collect::<Vec<_>>());
    for n in &names {
        assert_eq!(
            fs::symlink_metadata(big.join(n)).unwrap().len(),
            size(n),
            "{n}"
        );
    }
    let statted = dump();
    let d = |a: &[(String, u64)], b: &[(String, u64)], key| count(b, key) - count(a, key);
    assert_eq!(
        d(&start, &listed, "readdirplus"),
        1,
        "one block asked with attributes"
    );
    let lookups = d(&listed, &statted, "lookup");
    // Without the early end, the first reply carried some 200 entries' attributes.
    assert!(
        (2900..=3000).contains(&lookups),
        "{lookups} lookups after a names-only listing of 3000"
    );

    // A stat of each name as it is read (readdir + stat in one pass): after the first
    // reply, the kernel asks for attributes with the names, and looks nothing up.
    drop_caches(3);
    let mut seen = 0;
    for e in fs::read_dir(&big).unwrap() {
        let e = e.unwrap();
        let n = e.file_name().into_string().unwrap();
        assert_eq!(
            fs::symlink_metadata(e.path()).unwrap().len(),
            size(&n),
            "{n}"
        );
        seen += 1;
    }
    assert_eq!(seen, 3000);
    let end = dump();
    assert!(
        d(&statted, &end, "readdirplus") > 1,
        "later blocks with attributes"
    );
    let lookups = d(&statted, &end, "lookup");
    assert!(lookups < 50, "{lookups} lookups while stating as read");
    g.unmount().unwrap();
}

/// A program that reads a directory's small lower files one by one (tar, cp -r) finds them
/// in the page cache after the first cold one: stratafs then asks the disk for the
/// directory's other files at once, and, while small files are being read, for the files
/// of every directory listed. A program that only lists and stats reads nothing ahead.
#[test]
fn small_lower_files_are_read_ahead_for_readers_only() {
    let sc = Scratch::new();
    let lower = sc.layer("lower");
    let names = |dir: &'static str| (0..30).map(move |i| format!("{dir}/f{i:02}"));
    for (k, dir) in ["stat", "read", "listed"].into_iter().enumerate() {
        for (i, n) in names(dir).enumerate() {
            lower.file(n, pattern(8192 + i * 512, (k * 100 + i) as u64));
        }
    }
    let (up, work, mnt) = (sc.mkdir("upper"), sc.mkdir("work"), sc.mkdir("mnt"));
    let _g = Strata::new(&[lower.root()]).upper(&up, &work).mount(&mnt);
    let cached = |dir| {
        names(dir)
            .filter(|n| page_cached(&lower.path(n)).unwrap())
            .count()
    };
    let _held = hold_page_cache();
    for dir in ["stat", "read", "listed"] {
        for n in names(dir) {
            evict(&lower.path(n)).unwrap();
        }
    }
    assert_eq!(
        cached("stat") + cached("read") + cached("listed"),
        0,
        "the layer is cold"
    );
    fs::read_dir(mnt.join("stat")).unwrap().for_each(drop);
    for n in names("stat") {
        fs::metadata(mnt.join(n)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        cached("stat"),
        0,
        "files read ahead for a program that only stats"
    );

    // The first opens wait for the disk (more than a page cache read's 60 µs).
    for n in names("read").take(3) {
        assert_eq!(
            fs::read(mnt.join(&n)).unwrap(),
            fs::read(lower.path(&n)).unwrap()
        );
    }
    let all = wait_for(Duration::from_secs(10), || cached("read") == 30);
    assert!(
        all,
        "read/ read ahead: {} of 30 files cached",
        cached("read")
    );
    assert_eq!(cached("listed"), 0);
    fs::read_dir(mnt.join("listed")).unwrap().for_each(drop);
    let all = wait_for(Duration::from_secs(10), || cached("listed") == 30);
    assert!(
        all,
        "listed/ read ahead: {} of 30 files cached",
        cached("listed")
    );
    for n in names("read").chain(names("listed")) {
        assert_eq!(
            fs::read(mnt.join(&n)).unwrap(),
            fs::read(lower.path(&n)).unwrap()
        );
    }
}

/// Whatever changes a small lower file after its contents went to the kernel with an open
/// (a writer while the reader is still open, a truncate by name, an append, a chmod and
/// then a write) is what the reads show, as on kernel overlayfs.
#[test]
fn small_lower_files_given_at_open_never_go_stale() {
    let sc = Scratch::new();
    let t = Twin::new(&sc, 1, |ls| {
        ls[0]
            .file("held", "held by a reader\n")
            .file("trunc", "to be truncated by name\n")
            .file("append", "appended to\n")
            .file("mode", "chmod, then written\n");
    });
    let read = |rel: &'static str| move |m: &Path| fs::read(m.join(rel));
    for rel in ["held", "trunc", "append", "mode"] {
        t.both_ok(&format!("read {rel}"), read(rel));
    }
    // A reader stays open across a copy-up and a write through another open.
    let readers: Vec<fs::File> = [t.k("held"), t.s("held")]
        .iter()
        .map(|p| fs::File::open(p).unwrap())
        .collect();
    t.both_ok("write held", |m| {
        let f = fs::OpenOptions::new().write(true).open(m.join("held"))?;
        f.write_all_at(b"HELD", 0)
    });
    let seen: Vec<Vec<u8>> = readers
        .iter()
        .map(|f| {
            let mut b = vec![0u8; 64];
            let n = f.read_at(&mut b, 0).unwrap();
            b.truncate(n);
            b
        })
        .collect();
    assert_eq!(seen[0], b"HELD by a reader\n", "kernel overlayfs");
    assert_eq!(seen[1], seen[0], "the reader opened before the write");
    drop(readers);
    t.both_ok("read held again", read("held"));
    t.both_ok("truncate trunc by name", |m| {
        let c = std::ffi::CString::new(m.join("trunc").into_os_string().into_vec()).unwrap();
        // SAFETY: a valid C string.
        match unsafe { libc::truncate(c.as_ptr(), 5) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    });
    t.both_ok("size of trunc", |m| {
        fs::metadata(m.join("trunc")).map(|md| md.len())
    });
    t.both_ok("read trunc", read("trunc"));
    t.both_ok("append", |m| {
        let mut f = fs::OpenOptions::new().append(true).open(m.join("append"))?;
        f.write_all(b"and more\n")
    });
    t.both_ok("read append", read("append"));
    t.both_ok("chmod mode", |m| {
        fs::set_permissions(m.join("mode"), fs::Permissions::from_mode(0o600))
    });
    t.both_ok("write mode", |m| {
        let f = fs::OpenOptions::new().write(true).open(m.join("mode"))?;
        f.write_all_at(b"CHMOD", 0)
    });
    t.both_ok("read mode", read("mode"));
    t.finish();
}
