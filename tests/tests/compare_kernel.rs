//! The same layer stack mounted by kernel overlayfs and by stratafs must look identical
//! (types, modes, owners, sizes, contents, symlink targets, device numbers, user xattrs,
//! hard-link groups, nlink), for every whiteout/opaque format family, read-only and with an
//! upper layer. Lower layers must be left untouched.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use strata_tests::*;

/// Formats used by one layer: two whiteout kinds (alternated) and an opaque kind.
#[derive(Clone, Copy)]
struct Fmt {
    wh: [Whiteout; 2],
    op: Opaque,
}

const fn pure(wh: Whiteout, op: Opaque) -> Fmt {
    Fmt { wh: [wh, wh], op }
}

/// Fills l1 (top), l2, l3 (bottom) with the comparison stack. Whiteouts are only placed in
/// directories that also exist below (the kernel lists whiteouts of non-merged directories).
fn fill(l1: &Layer, l2: &Layer, l3: &Layer, f1: Fmt, f2: Fmt, ns: XattrNs) {
    l3.file("base.txt", "base3\n")
        .file("shared.txt", "3\n")
        .file("dir/a3", "a3\n")
        .file("dir/sub/s3", "s3\n")
        .file("dir/sub/keep3", "keep3\n")
        .file("gone_file", "gone\n")
        .file("gone_dir/inner/f", "f\n")
        .file("gone_deep", "deep\n")
        .file("opq/o3", "o3\n")
        .file("opq/osub/x", "x\n")
        .file("opq2/b3", "b3\n")
        .file("replaced_by_file/child", "child\n")
        .file("replaced_by_dir", "was a file\n")
        .file_mode("perm/secret", "secret\n", 0o600)
        .owner("perm/secret", 1234, 5678)
        .chardev("devs/nul", 1, 3)
        .file("links/h1", "linked\n")
        .hardlink("links/h2", "links/h1")
        .file("xattr.txt", "x\n")
        .xattr("xattr.txt", "user.k", "v")
        .xattr("xattr.txt", "user.bin", [0u8, 1, 2, 255])
        .file("l2wh/x", "x\n")
        .file("l2wh/y", "y\n")
        .file("re/old", "old\n")
        .file("big.bin", pattern(70_000, 3));
    l2.file("shared.txt", "2\n")
        .file("dir/a2", "a2\n")
        .file("dir/sub/s2", "s2\n")
        .file("dir/mid_gone", "mid\n")
        .file("opq/o2", "o2\n")
        .opaque("opq2", f2.op)
        .file("opq2/m2", "m2\n")
        .fifo("fifo")
        .symlink("sym_rel", "base.txt")
        .symlink("sym_abs", "/etc/hostname")
        .symlink("sym_dangling", "nowhere")
        .symlink("dir/sub/up", "../../base.txt")
        .file_mode("owned", "owned\n", 0o640)
        .owner("owned", 1000, 1000)
        .dir("owned2")
        .mode("owned2", 0o711)
        .owner("owned2", 7, 8)
        .whiteout("l2wh/x", f2.wh[0])
        .file("hl/one", "hl\n")
        .hardlink("hl/two", "hl/one")
        .hardlink("hl/three", "hl/one")
        .whiteout("re", f2.wh[1])
        .file("gone_mid", "gone mid\n");
    l1.file_mode("shared.txt", "1\n", 0o600)
        .file_mode("top.txt", "top\n", 0o755)
        .owner("top.txt", 42, 43)
        .xattr("top.txt", "user.top", "yes")
        .file("dir/a1", "a1\n")
        .xattr("dir", "user.dirattr", "1")
        .whiteout("dir/mid_gone", f1.wh[0])
        .whiteout("dir/sub/s3", f1.wh[1])
        .whiteout("gone_file", f1.wh[0])
        .whiteout("gone_dir", f1.wh[1])
        .whiteout("gone_deep", f1.wh[0])
        .whiteout("gone_mid", f1.wh[1])
        .opaque("opq", f1.op)
        .file("opq/o1", "o1\n")
        .file("replaced_by_file", "now a file\n")
        .file("replaced_by_dir/new", "new\n")
        .whiteout("hl/three", f1.wh[0])
        .dir("empty")
        .file("re/n", "n\n")
        .file_mode("suid.bin", "suid\n", 0o4755)
        .dir("tmpdir")
        .mode("tmpdir", 0o1777);
    // A dir, a file below it, a dir below that: the file stops the merge.
    l1.file("stop/top", "t\n");
    l2.file("stop", "file in the middle\n");
    l3.file("stop/below", "b\n");
    // Zero-size files without whiteout xattrs are ordinary files.
    l1.file("empty.txt", "");
    l3.file("empty.txt", "not empty\n");
    l2.file("dir/empty2", "");
    // Names close to the markers, and unusual names.
    l1.file(".whatever", "w\n")
        .file(".wh", "wh\n")
        .file("dir/.wh_not", "x\n")
        .file("name with spaces", "s\n")
        .file("ünïcödé", "u\n")
        .file("n".repeat(255), "long\n");
    l2.file(".whatever", "lower\n");
    if ns == XattrNs::Trusted {
        // A whiteout xattr on a non-empty file does not make it a whiteout.
        l1.file("dir/notwh", "abc")
            .xattr("dir/notwh", "trusted.overlay.whiteout", "");
        l2.file("dir/notwh", "lower");
    }
}

fn cp_a(from: &Path, to: &Path) {
    run(Command::new("cp").arg("-a").arg(from).arg(to)).expect_success();
}

fn layers(root: &Path) -> [PathBuf; 3] {
    [root.join("l1"), root.join("l2"), root.join("l3")]
}

fn compare(f1: Fmt, f2: Fmt, ns: XattrNs) {
    let sc = Scratch::new();
    let s = sc.mkdir("s");
    let [s1, s2, s3] = layers(&s);
    fill(
        &Layer::new(&s1),
        &Layer::new(&s2),
        &Layer::new(&s3),
        f1,
        f2,
        ns,
    );
    // Kernel copies, rewritten into forms the kernel reads.
    let k_ro = sc.join("k_ro");
    let k_up = sc.join("k_up");
    cp_a(&s, &k_ro);
    cp_a(&s, &k_up);
    for l in layers(&k_ro).iter() {
        normalize_for_kernel(l, ns, false);
    }
    for (i, l) in layers(&k_up).iter().enumerate() {
        normalize_for_kernel(l, ns, i == 0);
    }
    let ns_opts: &[&str] = match ns {
        XattrNs::Trusted => &["redirect_dir=on", "index=on"],
        XattrNs::User => &["userxattr"],
    };
    let ro_opts: &[&str] = match ns {
        XattrNs::Trusted => &[],
        XattrNs::User => &["userxattr"],
    };
    // Every path any stratafs layer holds; those the kernel does not show must be absent.
    let mut raw_paths = BTreeSet::new();
    let before: Vec<Snapshot> = [&s1, &s2, &s3].iter().map(|l| snapshot_raw(l)).collect();
    for snap in &before {
        raw_paths.extend(snap.keys().cloned());
    }

    // Read-only: all three as lower layers.
    {
        let kl = layers(&k_ro);
        let kmnt = sc.mkdir("kmnt_ro");
        let kg = kernel_overlay(&kmnt, &kl, None, ro_opts);
        let smnt = sc.mkdir("smnt_ro");
        let sg = Strata::new(&[&s1, &s2, &s3]).mount(&smnt);
        check_same("read-only", kg.path(), sg.path(), &raw_paths);
    }
    // With an upper layer: l1 is the upper.
    {
        let kl = layers(&k_up);
        let kwork = sc.mkdir("k_work");
        let kmnt = sc.mkdir("kmnt_up");
        let kg = kernel_overlay(&kmnt, &kl[1..], Some((&kl[0], &kwork)), ns_opts);
        let swork = sc.mkdir("s_work");
        let smnt = sc.mkdir("smnt_up");
        let sg = Strata::new(&[&s2, &s3]).upper(&s1, &swork).mount(&smnt);
        check_same("with upper", kg.path(), sg.path(), &raw_paths);
    }
    // The lower layers are untouched (content, metadata, xattrs, mtimes).
    for (i, l) in [&s2, &s3].iter().enumerate() {
        assert_snapshots_eq(
            &format!("l{} before", i + 2),
            &before[i + 1],
            &format!("l{} after", i + 2),
            &snapshot_raw(l),
        );
    }
}

fn check_same(what: &str, kernel: &Path, strata: &Path, raw_paths: &BTreeSet<String>) {
    let k = snapshot(kernel);
    let s = snapshot(strata);
    // Sanity of the reference view itself, so that a comparison cannot pass vacuously.
    for p in [
        "dir/a1",
        "base.txt",
        "stop/top",
        ".whatever",
        ".wh",
        "empty.txt",
        "re/n",
    ] {
        assert!(k.contains_key(p), "kernel view lacks {p}");
    }
    for p in [
        "gone_file",
        "gone_dir",
        "stop/below",
        "opq/o2",
        "re/old",
        "hl/three",
    ] {
        assert!(!k.contains_key(p), "kernel view shows {p}");
    }
    assert_eq!(k["empty.txt"].size, Some(0));
    assert_snapshots_eq(
        &format!("kernel overlayfs ({what})"),
        &k,
        &format!("stratafs ({what})"),
        &s,
    );
    assert_no_markers(&s);
    for p in raw_paths {
        if !k.contains_key(p) {
            assert_absent(&strata.join(p));
        }
    }
}

#[test]
fn kernel_format_chardev_and_trusted_opaque() {
    let f = pure(Whiteout::CharDev, Opaque::TrustedXattr);
    compare(f, f, XattrNs::Trusted);
}

#[test]
fn oci_format_wh_files() {
    let f = pure(Whiteout::Oci, Opaque::Oci);
    compare(f, f, XattrNs::Trusted);
}

#[test]
fn trusted_xattr_whiteouts() {
    let f = pure(Whiteout::TrustedXattr, Opaque::TrustedXattr);
    compare(f, f, XattrNs::Trusted);
}

#[test]
fn user_xattr_forms_with_userxattr() {
    let f = pure(Whiteout::UserXattr, Opaque::UserXattr);
    compare(f, f, XattrNs::User);
}

#[test]
fn mixed_formats_across_three_layers() {
    let f1 = Fmt {
        wh: [Whiteout::Oci, Whiteout::UserXattr],
        op: Opaque::UserXattr,
    };
    let f2 = Fmt {
        wh: [Whiteout::TrustedXattr, Whiteout::CharDev],
        op: Opaque::Oci,
    };
    compare(f1, f2, XattrNs::Trusted);
}
