//! The unprivileged test user and running commands as that user.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::cmd::{self, run_timeout, CmdOutput, CMD_TIMEOUT};

/// Name of the unprivileged user the rootless tests run as.
pub const TEST_USER: &str = "stratatest";

/// Lock file serialising user creation across test processes.
const USER_LOCK: &str = "/tmp/strata-e2e-useradd.lock";

/// A local user account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestUser {
    /// Login name.
    pub name: String,
    /// Numeric user id.
    pub uid: u32,
    /// Numeric primary group id.
    pub gid: u32,
}

fn lookup(name: &str) -> Option<TestUser> {
    let u = nix::unistd::User::from_name(name).ok().flatten()?;
    Some(TestUser {
        name: name.to_string(),
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
    })
}

/// Returns the `stratatest` user, creating it (`useradd`) if needed. Idempotent and safe to
/// call from parallel tests and processes (in-process mutex plus an `flock` on a lock file).
pub fn ensure_test_user() -> TestUser {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(USER_LOCK)
        .unwrap_or_else(|e| panic!("open {USER_LOCK}: {e}"));
    // Blocking exclusive lock; released when `f` is closed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(
        rc,
        0,
        "flock {USER_LOCK}: {}",
        std::io::Error::last_os_error()
    );
    if let Some(u) = lookup(TEST_USER) {
        return u;
    }
    let out = cmd::run(Command::new("useradd").args([
        "--user-group",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/bin/sh",
        TEST_USER,
    ]));
    lookup(TEST_USER)
        .unwrap_or_else(|| panic!("could not create user {TEST_USER}: {}", out.describe()))
}

/// Makes `/dev/fuse` usable by every user (mode 0666, the distribution default), which
/// rootless mounts need.
pub fn ensure_dev_fuse_rw() {
    let p = Path::new("/dev/fuse");
    let mode = fs::metadata(p)
        .expect("/dev/fuse exists")
        .permissions()
        .mode();
    if mode & 0o666 != 0o666 {
        fs::set_permissions(p, fs::Permissions::from_mode(0o666)).expect("chmod 0666 /dev/fuse");
    }
}

/// Recursively `lchown`s `root` to `user`.
pub fn chown_tree(root: &Path, user: &TestUser) {
    std::os::unix::fs::lchown(root, Some(user.uid), Some(user.gid))
        .unwrap_or_else(|e| panic!("lchown {}: {e}", root.display()));
    let m = fs::symlink_metadata(root).unwrap();
    if m.is_dir() {
        for e in fs::read_dir(root).unwrap() {
            chown_tree(&e.unwrap().path(), user);
        }
    }
}

/// The `setpriv` prefix that runs a command as `user` with a clean environment.
pub fn as_user_command(user: &TestUser) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--init-groups")
        .arg("--reset-env")
        .arg("--");
    c
}

/// Runs `args` as `user` (via `setpriv`), bounded by `timeout`.
pub fn run_as_timeout<S: AsRef<OsStr>>(
    user: &TestUser,
    args: &[S],
    timeout: Duration,
) -> CmdOutput {
    let mut c = as_user_command(user);
    c.args(args);
    run_timeout(&mut c, timeout)
}

/// Runs `args` as `user` (via `setpriv`), bounded by the default command timeout.
pub fn run_as<S: AsRef<OsStr>>(user: &TestUser, args: &[S]) -> CmdOutput {
    run_as_timeout(user, args, CMD_TIMEOUT)
}
