//! Mounting stratafs and kernel overlayfs, and tearing mounts down reliably.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::bin::stratafs_bin;
use crate::cmd::{self, kill_group, run_timeout, wait_deadline, wait_for, CmdOutput};
use crate::user::{run_as, TestUser};

/// Bound for the `stratafs` launcher to return.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for a mount to vanish / a daemon to exit during teardown.
pub const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Default lifetime of a mount before its watchdog kills the daemon and detaches the mount,
/// so that a hung FUSE request turns into a test failure instead of a hung test run.
/// Override with `STRATA_E2E_WATCHDOG_SECS`.
pub fn watchdog_limit() -> Duration {
    let secs = std::env::var("STRATA_E2E_WATCHDOG_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    Duration::from_secs(secs)
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone)]
pub struct MountInfo {
    /// Mount point.
    pub mountpoint: PathBuf,
    /// Filesystem type (`fuse.stratafs`, `overlay`, ...).
    pub fstype: String,
    /// Mount source.
    pub source: String,
    /// Per-mount options (`rw,nosuid,...`).
    pub mount_opts: String,
    /// Superblock options.
    pub super_opts: String,
    /// `major:minor` of the mount's device.
    pub dev: String,
}

fn unescape(s: &str) -> OsString {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    OsStr::from_bytes(&out).to_os_string()
}

/// All mounts of this process's mount namespace, in mount order.
pub fn mountinfo() -> Vec<MountInfo> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    let mut v = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(dash) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.len() < dash + 3 || f.len() < 6 {
            continue;
        }
        v.push(MountInfo {
            mountpoint: PathBuf::from(unescape(f[4])),
            dev: f[2].to_string(),
            mount_opts: f[5].to_string(),
            fstype: f[dash + 1].to_string(),
            source: unescape(f[dash + 2]).to_string_lossy().into_owned(),
            super_opts: f.get(dash + 3).unwrap_or(&"").to_string(),
        });
    }
    v
}

/// The topmost mount at `path`, if any.
pub fn mount_at(path: &Path) -> Option<MountInfo> {
    mountinfo().into_iter().rev().find(|m| m.mountpoint == path)
}

/// Whether something is mounted exactly at `path`.
pub fn is_mounted(path: &Path) -> bool {
    mount_at(path).is_some()
}

/// The filesystem type `/proc/mounts` shows for `path` (last entry wins).
pub fn proc_mounts_type(path: &Path) -> Option<String> {
    let text = fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() >= 3 && Path::new(&unescape(f[1])) == path).then(|| f[2].to_string())
        })
        .next_back()
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(s) => {
            // "pid (comm) S ..." — comm may contain spaces and parentheses.
            let state = s
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
    }
}

/// Live processes other than this one with `arg` (or `arg/`) among their arguments, such as
/// the daemon serving a mount at `arg`.
pub fn pids_with_arg(arg: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let want = arg.as_os_str().as_bytes();
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                cmdline
                    .split(|b| *b == 0)
                    .any(|a| a == want || a.strip_suffix(b"/") == Some(want))
            })
        })
        .filter(|&pid| pid_alive(pid))
        .collect()
}

/// The names process `pid` goes by: the file name of its `argv[0]` and of its executable
/// (without the " (deleted)" of a replaced binary).
pub fn program_names(pid: i32) -> Vec<OsString> {
    let mut names = Vec::new();
    if let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) {
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        names.extend(
            Path::new(OsStr::from_bytes(argv0))
                .file_name()
                .map(OsStr::to_os_string),
        );
    }
    if let Ok(exe) = fs::read_link(format!("/proc/{pid}/exe")) {
        let name = exe.file_name().map(OsStr::as_bytes).unwrap_or_default();
        let name = name.strip_suffix(b" (deleted)").unwrap_or(name);
        names.push(OsStr::from_bytes(name).to_os_string());
    }
    names
}

/// Processes (other than this one) running a program named `stratafs*` (or named like
/// `$STRATAFS_BIN`) with `mnt` as one of its arguments: the daemon serving a mount.
pub fn daemon_pids(mnt: &Path) -> Vec<i32> {
    // A binary under test given by $STRATAFS_BIN may have another name.
    let other_name: Option<OsString> = std::env::var_os("STRATAFS_BIN")
        .and_then(|p| Path::new(&p).file_name().map(|n| n.to_os_string()));
    let named =
        |n: &OsString| n.as_bytes().starts_with(b"stratafs") || Some(n) == other_name.as_ref();
    pids_with_arg(mnt)
        .into_iter()
        .filter(|&pid| program_names(pid).iter().any(named))
        .collect()
}

/// Sends `sig` to `pid`.
pub fn signal(pid: i32, sig: i32) {
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Whether this process is root.
pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Owns a mount; on drop (also while unwinding) unmounts it lazily and waits, bounded, for the
/// mount to vanish and for its daemon to exit (killing the daemon if it lingers).
pub struct MountGuard {
    mnt: PathBuf,
    pids: Vec<i32>,
    fuse: bool,
    unmount_as: Option<TestUser>,
    child: Option<Child>,
    watchdog: Option<mpsc::Sender<()>>,
}

impl MountGuard {
    /// Guard for a FUSE mount at `mnt`; the daemon pids are looked up now.
    pub fn fuse(mnt: &Path) -> Self {
        let mut g = MountGuard {
            mnt: mnt.to_path_buf(),
            pids: daemon_pids(mnt),
            fuse: true,
            unmount_as: None,
            child: None,
            watchdog: None,
        };
        g.arm_watchdog(watchdog_limit());
        g
    }

    /// Guard for a FUSE mount served by a foreground `child` (`stratafs -f`).
    pub fn foreground(mnt: &Path, child: Child) -> Self {
        let mut g = Self::fuse(mnt);
        if !g.pids.contains(&(child.id() as i32)) {
            g.pids.push(child.id() as i32);
        }
        g.child = Some(child);
        g
    }

    /// Guard for a kernel mount (overlay, tmpfs): no daemon.
    pub fn kernel(mnt: &Path) -> Self {
        MountGuard {
            mnt: mnt.to_path_buf(),
            pids: Vec::new(),
            fuse: false,
            unmount_as: None,
            child: None,
            watchdog: None,
        }
    }

    /// Unmount with `fusermount3 -u -z` as `user` (a user's FUSE mount).
    pub fn unmount_as(mut self, user: &TestUser) -> Self {
        self.unmount_as = Some(user.clone());
        self
    }

    /// Replaces the watchdog with one that fires after `limit`.
    pub fn arm_watchdog(&mut self, limit: Duration) {
        self.watchdog = None; // disconnects the previous one
        if !self.fuse {
            return;
        }
        let (tx, rx) = mpsc::channel::<()>();
        let mnt = self.mnt.clone();
        let pids = self.pids.clone();
        thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!(
                    "WATCHDOG: mount {} still alive after {limit:?}; killing daemon {pids:?} \
                     and detaching it (a FUSE request probably hung)",
                    mnt.display()
                );
                for p in &pids {
                    signal(*p, libc::SIGKILL);
                }
                let _ = run_timeout(Command::new("umount").arg("-l").arg(&mnt), TEARDOWN_TIMEOUT);
            }
        });
        self.watchdog = Some(tx);
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// `mountpoint/rel`.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Daemon pids found when the guard was made.
    pub fn pids(&self) -> &[i32] {
        &self.pids
    }

    /// The single daemon pid; panics unless exactly one was found.
    pub fn daemon_pid(&self) -> i32 {
        assert_eq!(
            self.pids.len(),
            1,
            "expected exactly one stratafs daemon for {}, found {:?}",
            self.mnt.display(),
            self.pids
        );
        self.pids[0]
    }

    /// The foreground child, if any.
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Whether the mount is still there.
    pub fn is_mounted(&self) -> bool {
        is_mounted(&self.mnt)
    }

    fn reap_child(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.try_wait();
        }
    }

    /// Whether every daemon pid has exited.
    pub fn daemons_gone(&mut self) -> bool {
        self.reap_child();
        self.pids.iter().all(|p| !pid_alive(*p))
    }

    /// For a mount unmounted by hand whose path may already hold another mount: waits
    /// (bounded) for the daemon alone to exit (killing it if it lingers) and gives the guard
    /// up without touching the path. True when the daemon exited by itself in time.
    pub fn forget_unmounted(mut self, limit: Duration) -> bool {
        self.watchdog = None;
        let gone = wait_for(limit, || self.daemons_gone());
        if !gone {
            for p in &self.pids {
                signal(*p, libc::SIGKILL);
            }
        }
        self.reap_child();
        // Drop would unmount by path, which is no longer this guard's mount.
        std::mem::forget(self);
        gone
    }

    /// Waits (bounded) until the mount has vanished and the daemon has exited.
    pub fn wait_gone(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let unmounted = wait_for(limit, || !is_mounted(&self.mnt));
        let left = deadline.saturating_duration_since(Instant::now());
        let mut gone = false;
        let _ = wait_for(left.max(Duration::from_millis(100)), || {
            gone = self.daemons_gone();
            gone
        });
        unmounted && gone
    }

    /// Unmounts now (lazily) and waits for mount and daemon to be gone. Returns a description
    /// of what went wrong, if anything.
    pub fn unmount(&mut self) -> Result<(), String> {
        self.watchdog = None;
        let mut problems = Vec::new();
        if is_mounted(&self.mnt) {
            if let Some(u) = &self.unmount_as {
                let out = run_as(u, &["fusermount3", "-u", "-z", &self.mnt.to_string_lossy()]);
                if !out.success() {
                    problems.push(format!("user unmount failed: {}", out.describe()));
                }
            }
            if is_mounted(&self.mnt) {
                let out = if is_root() {
                    run_timeout(
                        Command::new("umount").arg("-l").arg(&self.mnt),
                        TEARDOWN_TIMEOUT,
                    )
                } else {
                    run_timeout(
                        Command::new("fusermount3")
                            .arg("-u")
                            .arg("-z")
                            .arg(&self.mnt),
                        TEARDOWN_TIMEOUT,
                    )
                };
                if !out.success() && is_mounted(&self.mnt) {
                    problems.push(format!("unmount failed: {}", out.describe()));
                }
            }
        }
        if !wait_for(TEARDOWN_TIMEOUT, || !is_mounted(&self.mnt)) {
            problems.push(format!("{} still mounted", self.mnt.display()));
        }
        let mut gone = false;
        wait_for(TEARDOWN_TIMEOUT, || {
            gone = self.daemons_gone();
            gone
        });
        if !gone {
            let alive: Vec<i32> = self
                .pids
                .iter()
                .copied()
                .filter(|p| pid_alive(*p))
                .collect();
            problems.push(format!(
                "daemon(s) {alive:?} still running {TEARDOWN_TIMEOUT:?} after unmount; killed"
            ));
            for p in alive {
                signal(p, libc::SIGKILL);
            }
        }
        if let Some(mut c) = self.child.take() {
            if wait_deadline(&mut c, Instant::now() + TEARDOWN_TIMEOUT).is_none() {
                kill_group(&mut c);
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            eprintln!("MountGuard({}): {e}", self.mnt.display());
        }
    }
}

/// `lowerdir=TOP:...:BOTTOM`, with `:` in a path escaped as `\:`.
pub fn lowerdir_opt<P: AsRef<Path>>(lowers: &[P]) -> String {
    let parts: Vec<String> = lowers
        .iter()
        .map(|p| p.as_ref().to_string_lossy().replace(':', "\\:"))
        .collect();
    format!("lowerdir={}", parts.join(":"))
}

/// Runs `stratafs ARGS...` (the binary under test) with a bounded wait.
pub fn run_stratafs<S: AsRef<OsStr>>(args: &[S]) -> CmdOutput {
    run_timeout(&mut cmd::command(stratafs_bin(), args), MOUNT_TIMEOUT)
}

/// Runs `stratafs ARGS...` in daemon mode; the last argument is the mount point. Ok only when
/// it exits 0; on failure anything it left mounted is cleaned up and the output returned.
pub fn mount_stratafs<S: AsRef<OsStr>>(args: &[S]) -> Result<MountGuard, CmdOutput> {
    mount_stratafs_env(args, &[])
}

/// [`mount_stratafs`] with extra environment variables for the daemon.
fn mount_stratafs_env<S: AsRef<OsStr>>(
    args: &[S],
    envs: &[(String, String)],
) -> Result<MountGuard, CmdOutput> {
    let mnt = PathBuf::from(args.last().expect("mount point argument").as_ref());
    let mut c = cmd::command(stratafs_bin(), args);
    c.envs(envs.iter().map(|(k, v)| (k, v)));
    let out = run_timeout(&mut c, MOUNT_TIMEOUT);
    if out.success() {
        Ok(MountGuard::fuse(&mnt))
    } else {
        drop(MountGuard::fuse(&mnt));
        Err(out)
    }
}

/// A stratafs mount description: layers, upper/work and extra `-o` options.
#[derive(Debug, Clone, Default)]
pub struct Strata {
    lowers: Vec<PathBuf>,
    upper: Option<(PathBuf, PathBuf)>,
    opts: Vec<String>,
    flags: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Strata {
    /// Lower layers, leftmost highest.
    pub fn new<P: AsRef<Path>>(lowers: &[P]) -> Self {
        Strata {
            lowers: lowers.iter().map(|p| p.as_ref().to_path_buf()).collect(),
            ..Default::default()
        }
    }

    /// Adds `upperdir=` and `workdir=`.
    pub fn upper(mut self, upper: impl AsRef<Path>, work: impl AsRef<Path>) -> Self {
        self.upper = Some((upper.as_ref().to_path_buf(), work.as_ref().to_path_buf()));
        self
    }

    /// Adds an extra `-o` option.
    pub fn opt(mut self, o: &str) -> Self {
        self.opts.push(o.to_string());
        self
    }

    /// Sets an environment variable for the daemon (`STRATAFS_STATS`, ...).
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        let value = value.as_ref().to_string_lossy().into_owned();
        self.envs.push((key.to_string(), value));
        self
    }

    /// Adds a flag before the options (`-d`, ...).
    pub fn flag(mut self, f: &str) -> Self {
        self.flags.push(f.to_string());
        self
    }

    /// The single `-o` option string.
    pub fn option_string(&self) -> String {
        let mut o = vec![lowerdir_opt(&self.lowers)];
        if let Some((u, w)) = &self.upper {
            o.push(format!("upperdir={}", u.display()));
            o.push(format!("workdir={}", w.display()));
        }
        o.extend(self.opts.iter().cloned());
        o.join(",")
    }

    /// Full argument list for mounting at `mnt`.
    pub fn args(&self, mnt: &Path) -> Vec<OsString> {
        let mut a: Vec<OsString> = self.flags.iter().map(OsString::from).collect();
        a.push("-o".into());
        a.push(self.option_string().into());
        a.push(mnt.as_os_str().to_os_string());
        a
    }

    /// Mounts in daemon mode, or returns the launcher's output. With the environment variable
    /// `STRATA_E2E_FOREGROUND=1` it runs `stratafs -f` instead (stderr inherited) and waits for
    /// the mount to appear: a debugging aid, and a way to test the filesystem while the
    /// daemon-mode launcher is broken.
    pub fn try_mount(&self, mnt: &Path) -> Result<MountGuard, CmdOutput> {
        if std::env::var_os("STRATA_E2E_FOREGROUND").is_some_and(|v| v != "0") {
            return self.mount_foreground(mnt);
        }
        mount_stratafs_env(&self.args(mnt), &self.envs)
    }

    fn mount_foreground(&self, mnt: &Path) -> Result<MountGuard, CmdOutput> {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(stratafs_bin());
        c.arg("-f")
            .args(self.args(mnt))
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .process_group(0);
        let cmdline = cmd::render(&c);
        let start = Instant::now();
        let mut child = c.spawn().expect("spawn stratafs -f");
        let mut status = None;
        let up = wait_for(MOUNT_TIMEOUT, || {
            status = child.try_wait().ok().flatten();
            status.is_some() || is_mounted(mnt)
        });
        if up && status.is_none() && is_mounted(mnt) {
            return Ok(MountGuard::foreground(mnt, child));
        }
        let timed_out = status.is_none();
        if timed_out {
            kill_group(&mut child);
        }
        drop(MountGuard::fuse(mnt));
        Err(CmdOutput {
            cmdline,
            status: status.unwrap_or(std::os::unix::process::ExitStatusExt::from_raw(9)),
            stdout: Vec::new(),
            stderr: b"(stderr inherited)".to_vec(),
            timed_out,
            pipes_hung: false,
            elapsed: start.elapsed(),
        })
    }

    /// Mounts in daemon mode; panics (with stderr) on failure or if not mounted afterwards.
    pub fn mount(&self, mnt: &Path) -> MountGuard {
        let g = self
            .try_mount(mnt)
            .unwrap_or_else(|out| panic!("stratafs mount failed: {}", out.describe()));
        assert!(
            g.is_mounted(),
            "stratafs exited 0 but nothing is mounted at {}",
            mnt.display()
        );
        g
    }
}

/// Mounts kernel overlayfs at `mnt` (read-only when `upper` is `None`); panics on failure.
pub fn kernel_overlay<P: AsRef<Path>>(
    mnt: &Path,
    lowers: &[P],
    upper: Option<(&Path, &Path)>,
    extra: &[&str],
) -> MountGuard {
    let mut o = vec![lowerdir_opt(lowers)];
    if let Some((u, w)) = upper {
        o.push(format!("upperdir={}", u.display()));
        o.push(format!("workdir={}", w.display()));
    }
    o.extend(extra.iter().map(|s| s.to_string()));
    let out = cmd::run(
        Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(o.join(","))
            .arg(mnt),
    );
    let guard = MountGuard::kernel(mnt);
    if !out.success() {
        let dmesg = cmd::sh("dmesg | tail -n 5").stdout_str();
        panic!(
            "kernel overlay mount failed: {}\ndmesg:\n{dmesg}",
            out.describe()
        );
    }
    guard
}

/// Mounts a small tmpfs at `mnt`; panics on failure.
pub fn mount_tmpfs(mnt: &Path) -> MountGuard {
    fs::create_dir_all(mnt).unwrap();
    cmd::run(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "strata-e2e-tmpfs"])
            .arg(mnt),
    )
    .expect_success();
    MountGuard::kernel(mnt)
}
