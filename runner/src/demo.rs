//! `strata demo`: two image layers, one mount, the merged view printed side by side.

use std::fs;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Finds `stratafs`: beside this binary (a cargo build puts both in one directory), else PATH.
fn stratafs() -> PathBuf {
    if let Ok(me) = std::env::current_exe() {
        let sibling = me.with_file_name("stratafs");
        if sibling.is_file() {
            return sibling;
        }
    }
    PathBuf::from("stratafs")
}

fn write(root: &Path, rel: &str, body: &str) -> Result<()> {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().expect("relative path has a parent"))?;
    fs::write(&p, body).with_context(|| format!("writing {}", p.display()))
}

fn build_layers(base: &Path, app: &Path) -> Result<()> {
    write(base, "etc/motd", "hello from the base layer\n")?;
    write(base, "etc/os-release", "NAME=demo-base\n")?;
    write(base, "usr/share/doc/README", "base documentation\n")?;
    write(base, "usr/share/doc/OBSOLETE", "removed by the app layer\n")?;
    symlink("../usr/share/doc", base.join("etc/docs"))?;
    write(
        app,
        "etc/motd",
        "hello from the app layer (overrides the base)\n",
    )?;
    write(app, "app/config.toml", "listen = \"127.0.0.1:8080\"\n")?;
    // An OCI whiteout: the app layer deletes a file of the base layer.
    write(app, "usr/share/doc/.wh.OBSOLETE", "")?;
    Ok(())
}

fn show(title: &str, root: &Path) -> Result<()> {
    println!("== {title}");
    let mut paths = Vec::new();
    collect(root, root, &mut paths)?;
    paths.sort();
    for p in paths {
        let full = root.join(&p);
        let meta = fs::symlink_metadata(&full)?;
        if meta.file_type().is_symlink() {
            println!("  {p} -> {}", fs::read_link(&full)?.display());
        } else if meta.is_dir() {
            println!("  {p}/");
        } else if meta.file_type().is_char_device() && meta.rdev() == 0 {
            println!("  {p} (whiteout)");
        } else {
            let body = fs::read_to_string(&full).unwrap_or_default();
            println!("  {p}: {}", body.trim_end());
        }
    }
    Ok(())
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let rel = e.path().strip_prefix(root)?.to_string_lossy().into_owned();
        let is_dir = e.file_type()?.is_dir();
        out.push(rel);
        if is_dir {
            collect(root, &e.path(), out)?;
        }
    }
    Ok(())
}

/// Unmounts on drop, so the demo leaves nothing mounted even when it fails half way.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = Command::new("fusermount3")
            .args(["-u", "-q"])
            .arg(&self.0)
            .status();
    }
}

/// Runs the demo.
pub fn run() -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("strata-demo").tempdir()?;
    let (base, app, mnt) = (
        tmp.path().join("base"),
        tmp.path().join("app"),
        tmp.path().join("merged"),
    );
    let (upper, work) = (tmp.path().join("upper"), tmp.path().join("work"));
    for d in [&base, &app, &mnt, &upper, &work] {
        fs::create_dir_all(d)?;
    }
    build_layers(&base, &app)?;
    show("base layer (bottom)", &base)?;
    show("app layer (top)", &app)?;

    let bin = stratafs();
    let out = Command::new(&bin)
        .arg("-o")
        .arg(format!(
            "lowerdir={}:{},upperdir={},workdir={}",
            app.display(),
            base.display(),
            upper.display(),
            work.display()
        ))
        .arg(&mnt)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "stratafs failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let guard = Mounted(mnt.clone());
    show(
        &format!(
            "merged view at {} (stratafs -o lowerdir=app:base,upperdir=upper,...)",
            mnt.display()
        ),
        &mnt,
    )?;

    // A container's writes: the first write copies the file up; a delete leaves a whiteout.
    fs::write(mnt.join("etc/motd"), "hello from the container\n")?;
    fs::remove_file(mnt.join("etc/os-release"))?;
    fs::write(mnt.join("app/state"), "written at run time\n")?;
    println!("-- wrote etc/motd, removed etc/os-release, created app/state");
    show("merged view after the writes", &mnt)?;
    drop(guard);
    show("upper layer (the container's changes)", &upper)?;
    show("base layer, unchanged", &base)?;
    Ok(())
}
