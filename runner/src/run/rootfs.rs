//! The container's root filesystem, built in the container's own mount namespace: the
//! stratafs mount, then /proc, /sys, /dev, /tmp and volumes on it, then `pivot_root`.

use std::ffi::CString;
use std::fs;
use std::os::fd::RawFd;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::spec::Volume;

/// Makes every mount in our new mount namespace private, so that nothing we mount here
/// reaches the namespace of the filesystem server (which would then see its own mount).
pub fn make_private() -> Result<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making mounts private")
}

/// Mounts the FUSE connection `fd` (served by the runner) at `root`.
pub fn mount_stratafs(fd: RawFd, root: &Path) -> Result<()> {
    let data =
        format!("fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions");
    mount(
        Some("stratafs"),
        root,
        Some("fuse.stratafs"),
        MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .with_context(|| format!("mounting the layers at {}", root.display()))
}

fn ensure_dir(root: &Path, rel: &str) -> Result<PathBuf> {
    let p = root.join(rel.trim_start_matches('/'));
    if !p.is_dir() {
        fs::create_dir_all(&p).with_context(|| format!("creating /{rel} in the container"))?;
    }
    Ok(p)
}

/// /proc, /sys, /dev, /tmp and the volumes, on the container root at `root`.
pub fn populate(root: &Path, volumes: &[Volume]) -> Result<()> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let proc = ensure_dir(root, "proc")?;
    mount(
        Some("proc"),
        &proc,
        Some("proc"),
        nosuid_nodev_noexec,
        None::<&str>,
    )
    .context("mounting /proc")?;
    let sys = ensure_dir(root, "sys")?;
    let ro_sys = nosuid_nodev_noexec | MsFlags::MS_RDONLY;
    if mount(Some("sysfs"), &sys, Some("sysfs"), ro_sys, None::<&str>).is_err() {
        // sysfs cannot be mounted from a user namespace that does not own the network
        // namespace (--network host): show the host's, read-only.
        bind(Path::new("/sys"), &sys, true).context("binding /sys")?;
    }
    setup_dev(root)?;
    let tmp = ensure_dir(root, "tmp")?;
    mount(
        Some("tmpfs"),
        &tmp,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .context("mounting /tmp")?;
    for v in volumes {
        mount_volume(root, v)?;
    }
    Ok(())
}

fn setup_dev(root: &Path) -> Result<()> {
    let dev = ensure_dir(root, "dev")?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=65536k"),
    )
    .context("mounting /dev")?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        fs::write(&target, b"").with_context(|| format!("creating /dev/{name}"))?;
        bind(&Path::new("/dev").join(name), &target, false)
            .with_context(|| format!("binding /dev/{name}"))?;
    }
    let pts = dev.join("pts");
    fs::create_dir(&pts).context("creating /dev/pts")?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .context("mounting /dev/pts")?;
    symlink("pts/ptmx", dev.join("ptmx"))?;
    let shm = dev.join("shm");
    fs::create_dir(&shm).context("creating /dev/shm")?;
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .context("mounting /dev/shm")?;
    symlink("/proc/self/fd", dev.join("fd"))?;
    for (i, name) in ["stdin", "stdout", "stderr"].iter().enumerate() {
        symlink(format!("/proc/self/fd/{i}"), dev.join(name))?;
    }
    Ok(())
}

fn mount_volume(root: &Path, v: &Volume) -> Result<()> {
    let target = root.join(v.ctr.strip_prefix("/").unwrap_or(&v.ctr));
    let what = || format!("volume {}:{}", v.host.display(), v.ctr.display());
    if v.host.is_dir() {
        fs::create_dir_all(&target).with_context(what)?;
    } else {
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).with_context(what)?;
        }
        if !target.exists() {
            fs::write(&target, b"").with_context(what)?;
        }
    }
    bind(&v.host, &target, v.read_only).with_context(what)
}

/// Bind-mounts `src` (recursively) on `dst`; read-only by a remount that keeps the flags the
/// kernel locks in a user namespace (nosuid, nodev, noexec as they were).
fn bind(src: &Path, dst: &Path, read_only: bool) -> Result<()> {
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    if read_only {
        remount_read_only(dst)?;
    }
    Ok(())
}

/// Makes the mount at `path` read-only.
pub fn remount_read_only(path: &Path) -> Result<()> {
    let st = nix::sys::statvfs::statvfs(path)?;
    let f = st.flags();
    use nix::sys::statvfs::FsFlags;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (have, want) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(have) {
            flags |= want;
        }
    }
    mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
        .with_context(|| format!("making {} read-only", path.display()))
}

/// Makes `root` the root directory and detaches the old one, so that nothing of the host
/// (the filesystem server's files included) stays reachable.
pub fn pivot(root: &Path) -> Result<()> {
    nix::unistd::chdir(root).context("entering the container root")?;
    let dot = CString::new(".").expect("no NUL");
    // SAFETY: pivot_root(".", ".") stacks the old root on top of the new one.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        bail!("pivot_root: {}", std::io::Error::last_os_error());
    }
    umount2(".", MntFlags::MNT_DETACH).context("detaching the old root")?;
    nix::unistd::chdir("/").context("chdir /")?;
    Ok(())
}

/// Brings the loopback interface of a fresh network namespace up.
pub fn loopback_up() -> Result<()> {
    // SAFETY: a datagram socket only for interface ioctls.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: zeroed ifreq is valid; the name fits.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: ioctls on our socket with a valid ifreq.
    let r = unsafe {
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) < 0 {
            -1
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(sock, libc::SIOCSIFFLAGS, &req)
        }
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: our descriptor.
    unsafe { libc::close(sock) };
    if r < 0 {
        bail!("bringing lo up: {err}");
    }
    Ok(())
}
