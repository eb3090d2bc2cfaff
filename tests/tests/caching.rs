//! What the kernel caches for a stratafs mount (names and attributes for a long time,
//! listings in its page cache, attributes with every listing) must never be seen stale:
//! every change behind the kernel's back is visible as soon as the request that made it
//! returns. Each test first makes the kernel cache what the change will touch, then
//! compares with kernel overlayfs (`redirect_dir=on,index=on`) over a copy of the same
//! stack.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use strata_tests::fsops::{drop_caches, read_dir_raw, DirStream};
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
