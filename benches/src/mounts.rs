//! The implementations under test, finding their binaries, mounting them, and a guard that
//! always unmounts.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::sys;

/// Bound for a mount command (launcher) to return.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for an unmount and for a daemon to exit afterwards.
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(15);

/// Which program serves a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// `mount -t overlay` (the reference).
    Kernel,
    /// Debian's fuse-overlayfs (1.x, C).
    FuseOverlayfs,
    /// fuse-overlayfs 2.x, the Rust rewrite (`cargo install fuse-overlayfs`).
    FuseOverlayfs2,
    /// stratafs as root.
    Stratafs,
    /// stratafs mounted by, and used by, an unprivileged user via fusermount3.
    StratafsRootless,
}

impl Kind {
    /// All kinds, in column order.
    pub const ALL: [Kind; 5] = [
        Kind::Kernel,
        Kind::FuseOverlayfs,
        Kind::FuseOverlayfs2,
        Kind::Stratafs,
        Kind::StratafsRootless,
    ];

    /// The name used on the command line and in JSON.
    pub fn id(self) -> &'static str {
        match self {
            Kind::Kernel => "kernel",
            Kind::FuseOverlayfs => "fuse-overlayfs",
            Kind::FuseOverlayfs2 => "fuse-overlayfs2",
            Kind::Stratafs => "stratafs",
            Kind::StratafsRootless => "stratafs-rootless",
        }
    }

    /// Parses [`Kind::id`].
    pub fn parse(s: &str) -> Result<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.id() == s)
            .with_context(|| {
                let ids: Vec<_> = Kind::ALL.iter().map(|k| k.id()).collect();
                format!("unknown implementation {s:?} (known: {})", ids.join(", "))
            })
    }
}

/// An unprivileged account.
#[derive(Debug, Clone, Serialize)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// Name of the unprivileged user of the rootless column.
pub const ROOTLESS_USER: &str = "stratatest";

impl User {
    /// Looks `name` up in /etc/passwd.
    pub fn lookup(name: &str) -> Option<User> {
        let text = fs::read_to_string("/etc/passwd").ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 || f[0] != name {
                return None;
            }
            Some(User {
                name: name.to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
            })
        })
    }

    /// The rootless user, created with `useradd` if missing; also makes `/dev/fuse`
    /// usable by every user (mode 0666, the distribution default).
    pub fn ensure_rootless() -> Result<User> {
        if User::lookup(ROOTLESS_USER).is_none() {
            sys::run_ok(
                Command::new("useradd").args([
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/bin/sh",
                    ROOTLESS_USER,
                ]),
                Duration::from_secs(30),
            )?;
        }
        let u = User::lookup(ROOTLESS_USER).context("user stratatest missing after useradd")?;
        let m = fs::metadata("/dev/fuse").context("/dev/fuse")?;
        use std::os::unix::fs::PermissionsExt;
        if m.permissions().mode() & 0o666 != 0o666 {
            fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o666))?;
        }
        Ok(u)
    }

    /// `setpriv` prefix that runs a program as this user with a clean environment.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--init-groups")
            .arg("--reset-env")
            .arg("--")
            .arg(program);
        c
    }

    /// `lchown`s `p` to this user.
    pub fn chown(&self, p: &Path) -> Result<()> {
        std::os::unix::fs::lchown(p, Some(self.uid), Some(self.gid))
            .with_context(|| format!("chown {}", p.display()))
    }
}

/// One implementation column.
#[derive(Debug, Clone, Serialize)]
pub struct Implementation {
    /// Which program.
    pub kind: Kind,
    /// Column heading, with the version (`fuse-overlayfs 1.10`).
    pub label: String,
    /// The FUSE daemon binary (none for the kernel).
    pub bin: Option<PathBuf>,
    /// The user that mounts and runs the workloads (none: root).
    pub user: Option<User>,
}

/// Finds the implementations in `wanted` (all known ones when empty). Missing ones are
/// returned as notes instead.
pub fn discover(wanted: &[Kind], rootless: bool) -> (Vec<Implementation>, Vec<String>) {
    let mut found = Vec::new();
    let mut notes = Vec::new();
    let kinds: Vec<Kind> = if wanted.is_empty() {
        Kind::ALL
            .into_iter()
            .filter(|k| rootless || *k != Kind::StratafsRootless)
            .collect()
    } else {
        wanted.to_vec()
    };
    let explicit = !wanted.is_empty();
    for kind in kinds {
        match find(kind) {
            Ok(i) => found.push(i),
            Err(e) => notes.push(format!(
                "{} skipped{}: {e:#}",
                kind.id(),
                if explicit { "" } else { " (not available)" }
            )),
        }
    }
    (found, notes)
}

/// The version `bin --version` prints on the line that starts with `name` (fuse-overlayfs
/// 1.x also prints fusermount3's and libfuse's versions).
fn version_of(bin: &Path, name: &str) -> Result<String> {
    let out = sys::run_bounded(Command::new(bin).arg("--version"), Duration::from_secs(10))?;
    let text = format!("{}\n{}", out.stdout, out.stderr);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(name))
        .with_context(|| {
            format!(
                "{} --version printed no line starting with {name}",
                bin.display()
            )
        })?;
    // "fuse-overlayfs: version 1.10", "stratafs 0.1.0"
    Ok(line
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_string())
}

fn find(kind: Kind) -> Result<Implementation> {
    let env_path = |var: &str| std::env::var_os(var).map(PathBuf::from);
    let cargo_bin = || -> Option<PathBuf> {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        Some(home.join("bin/fuse-overlayfs"))
    };
    let exists = |p: PathBuf| -> Result<PathBuf> {
        if p.is_file() {
            Ok(p)
        } else {
            bail!("{} does not exist", p.display())
        }
    };
    match kind {
        Kind::Kernel => {
            let fs_list = fs::read_to_string("/proc/filesystems").unwrap_or_default();
            if !fs_list.lines().any(|l| l.trim_end().ends_with("overlay")) {
                let _ = sys::run_bounded(
                    Command::new("modprobe").arg("overlay"),
                    Duration::from_secs(10),
                );
            }
            Ok(Implementation {
                kind,
                label: format!("kernel overlayfs ({})", sys::machine().kernel),
                bin: None,
                user: None,
            })
        }
        Kind::FuseOverlayfs | Kind::FuseOverlayfs2 => {
            let bin = if kind == Kind::FuseOverlayfs {
                env_path("FUSE_OVERLAYFS_BIN").unwrap_or_else(|| "/usr/bin/fuse-overlayfs".into())
            } else {
                env_path("FUSE_OVERLAYFS2_BIN")
                    .or_else(cargo_bin)
                    .context("no $HOME or $CARGO_HOME")?
            };
            let bin = exists(bin).map_err(|e| {
                if kind == Kind::FuseOverlayfs2 {
                    e.context(
                        "install it with `cargo install fuse-overlayfs` or set FUSE_OVERLAYFS2_BIN",
                    )
                } else {
                    e.context("apt-get install -y fuse-overlayfs, or set FUSE_OVERLAYFS_BIN")
                }
            })?;
            let v = version_of(&bin, "fuse-overlayfs")?;
            let major2 = v.starts_with('2');
            if (kind == Kind::FuseOverlayfs2) != major2 {
                bail!("{} is version {v}", bin.display());
            }
            Ok(Implementation {
                kind,
                label: format!("fuse-overlayfs {v}"),
                bin: Some(bin),
                user: None,
            })
        }
        Kind::Stratafs | Kind::StratafsRootless => {
            let bin = match env_path("STRATAFS_BIN") {
                Some(p) => p,
                None => std::env::current_exe()?
                    .parent()
                    .context("executable has no directory")?
                    .join("stratafs"),
            };
            let bin = exists(bin).map_err(|e| {
                e.context("build it first (cargo build --release --workspace) or set STRATAFS_BIN")
            })?;
            let v = version_of(&bin, "stratafs")?;
            let (label, user) = if kind == Kind::Stratafs {
                (format!("stratafs {v}"), None)
            } else {
                (
                    format!("stratafs {v} rootless"),
                    Some(User::ensure_rootless()?),
                )
            };
            Ok(Implementation {
                kind,
                label,
                bin: Some(bin),
                user,
            })
        }
    }
}

pub use strata_tests::mount::is_mounted;
use strata_tests::mount::{mountinfo, pids_with_arg};

/// Mount points of this process's namespace, in mount order.
pub fn mount_points() -> Vec<PathBuf> {
    mountinfo().into_iter().map(|m| m.mountpoint).collect()
}

/// Unmounts whatever a previous, killed run left mounted below `scratch` (only there).
pub fn cleanup_stale(scratch: &Path) {
    let mut stale: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|m| m.starts_with(scratch))
        .collect();
    stale.reverse();
    for m in stale {
        eprintln!("cleanup: unmounting stale {}", m.display());
        let pids = daemon_pids(&m);
        let _ = sys::run_cleanup(Command::new("umount").arg("-l").arg(&m), UNMOUNT_TIMEOUT);
        for p in pids {
            sys_kill(p, libc::SIGTERM);
        }
    }
}

fn sys_kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a pid we found serving our own mount.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Processes other than this one whose command line has `mnt` as an argument: the daemon
/// serving a FUSE mount (the launcher has exited by the time this is asked).
pub fn daemon_pids(mnt: &Path) -> Vec<i32> {
    pids_with_arg(mnt)
}

/// Directories of one mount: layers come from the stack, the rest is fresh per session.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// Lower layers, highest first.
    pub lowers: Vec<PathBuf>,
    /// Upper layer (fresh, empty).
    pub upper: PathBuf,
    /// Work dir (fresh, empty).
    pub work: PathBuf,
    /// Mount point (empty).
    pub mnt: PathBuf,
}

/// A live mount; unmounts on drop (also while unwinding), bounded, and makes sure the
/// daemon is gone.
pub struct Mount {
    /// Mount point.
    pub mnt: PathBuf,
    /// The FUSE daemon serving it (none for the kernel).
    pub daemon: Option<i32>,
    /// Time from spawning the mount command to the mount answering stat.
    pub mount_secs: f64,
    unmounted: bool,
}

/// Reads program `p` (looked up in `PATH` when it has no `/`) into the page cache; a
/// program that cannot be found or read is left alone (the mount then says what is wrong).
fn warm_program(p: &Path) {
    let found = if p.components().count() > 1 {
        Some(p.to_path_buf())
    } else {
        p.to_str().and_then(sys::which)
    };
    if let Some(Ok(mut f)) = found.map(fs::File::open) {
        let _ = std::io::copy(&mut f, &mut std::io::sink());
    }
}

/// Mounts `imp` over `dirs`. The daemon's own stderr goes to `log`.
pub fn mount(imp: &Implementation, dirs: &Dirs, log: &Path) -> Result<Mount> {
    if is_mounted(&dirs.mnt) {
        bail!("{} is already a mount point", dirs.mnt.display());
    }
    let lowerdir = dirs
        .lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let mut opts = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        dirs.upper.display(),
        dirs.work.display()
    );
    let mut cmd = match (imp.kind, &imp.bin, &imp.user) {
        (Kind::Kernel, _, _) => {
            opts.push_str(",redirect_dir=on,index=on");
            let mut c = Command::new("mount");
            c.args(["-t", "overlay", "overlay", "-o"]);
            c
        }
        (_, Some(bin), Some(user)) => {
            // Lowers are root's; showing the user as owner lets the kernel's permission
            // checks (default_permissions) allow writes, as in a user namespace.
            opts.push_str(&format!(
                ",squash_to_uid={},squash_to_gid={}",
                user.uid, user.gid
            ));
            let mut c = user.command(bin);
            c.arg("-o");
            c
        }
        (_, Some(bin), None) => {
            let mut c = Command::new(bin);
            c.arg("-o");
            c
        }
        (_, None, _) => bail!("{}: no binary", imp.label),
    };
    cmd.arg(&opts).arg(&dirs.mnt);
    let logf = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    // The cold workloads before this mount dropped the page cache, programs included: the
    // row would time reading each program from disk (a 20 MB binary with its debug info
    // took 23 ms to mount cold, 2.5 warm). Every column starts with its programs cached.
    warm_program(Path::new(cmd.get_program()));
    if let Some(bin) = &imp.bin {
        warm_program(bin);
    }
    if imp.user.is_some() {
        // An unprivileged daemon mounts through the set-user-ID helper.
        warm_program(Path::new("fusermount3"));
    }
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .spawn()
        .with_context(|| format!("start {cmd:?}"))?;
    let status = sys::wait_bounded(&mut child, MOUNT_TIMEOUT, &format!("{cmd:?}"))?;
    // Root may not look into a user's mount (no allow_other): the kernel refuses with
    // EACCES before asking the daemon, so there the mount table has to do.
    let answered = match fs::metadata(&dirs.mnt) {
        Ok(_) => true,
        Err(e) => imp.user.is_some() && e.raw_os_error() == Some(libc::EACCES),
    } && is_mounted(&dirs.mnt);
    let mount_secs = start.elapsed().as_secs_f64();
    let mut m = Mount {
        mnt: dirs.mnt.clone(),
        daemon: None,
        mount_secs,
        unmounted: false,
    };
    if !status.success() || !answered {
        let text = fs::read_to_string(log).unwrap_or_default();
        bail!("mount of {} failed ({status}): {}", imp.label, text.trim());
    }
    if imp.kind != Kind::Kernel {
        let pids = daemon_pids(&dirs.mnt);
        m.daemon = match pids.as_slice() {
            [p] => Some(*p),
            [] => bail!(
                "{}: no daemon process found for {}",
                imp.label,
                dirs.mnt.display()
            ),
            many => {
                // The process that holds /dev/fuse open is the server.
                many.iter()
                    .copied()
                    .find(|p| holds_dev_fuse(*p))
                    .or(Some(many[0]))
            }
        };
    }
    Ok(m)
}

fn holds_dev_fuse(pid: i32) -> bool {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    rd.flatten().any(|e| {
        fs::read_link(e.path())
            .map(|t| t == Path::new("/dev/fuse"))
            .unwrap_or(false)
    })
}

impl Mount {
    /// Unmounts (bounded); falls back to a lazy unmount and to killing the daemon.
    pub fn unmount(&mut self) -> Result<()> {
        if self.unmounted {
            return Ok(());
        }
        self.unmounted = true;
        let mut problems = Vec::new();
        if is_mounted(&self.mnt) {
            let r = sys::run_cleanup(Command::new("umount").arg(&self.mnt), UNMOUNT_TIMEOUT);
            let ok = matches!(&r, Ok(o) if o.status.success());
            if !ok {
                problems.push(match r {
                    Ok(o) => format!("umount: {}", o.stderr.trim()),
                    Err(e) => format!("umount: {e:#}"),
                });
                if let Some(p) = self.daemon {
                    sys_kill(p, libc::SIGKILL);
                }
                let _ = sys::run_cleanup(
                    Command::new("umount").arg("-l").arg(&self.mnt),
                    UNMOUNT_TIMEOUT,
                );
            }
        }
        if let Some(p) = self.daemon {
            let start = Instant::now();
            while sys::pid_alive(p) {
                if start.elapsed() > UNMOUNT_TIMEOUT {
                    problems.push(format!("daemon {p} still alive after unmount; killed"));
                    sys_kill(p, libc::SIGKILL);
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        if is_mounted(&self.mnt) {
            problems.push("still mounted".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("unmount {}: {}", self.mnt.display(), problems.join("; "))
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            eprintln!("warning: {e:#}");
        }
    }
}
