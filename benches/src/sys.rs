//! Small system helpers: running commands with a deadline, dropping caches, reading
//! `/proc`, machine facts, the digest hash, and the Ctrl-C flag.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT, SIGTERM and SIGHUP set a flag instead of killing the process, so that the
/// harness can unwind and unmount everything it mounted. See [`check_interrupted`].
pub fn install_signal_flag() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
}

/// Whether a termination signal arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails with "interrupted" once a termination signal arrived.
pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted by a signal");
    }
    Ok(())
}

/// The first file named `tool` in a directory of `PATH`.
pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|c| c.is_file())
    })
}

/// Waits for `child` at most `limit`; kills it (SIGKILL) when the deadline passes or a
/// termination signal arrives. Returns the exit status, or an error naming `what`.
pub fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> Result<ExitStatus> {
    wait_until(child, limit, what, true)
}

/// [`wait_bounded`], optionally going on after a termination signal (for cleanup).
fn wait_until(
    child: &mut Child,
    limit: Duration,
    what: &str,
    interruptible: bool,
) -> Result<ExitStatus> {
    let start = Instant::now();
    // Woken by the exit itself: the mount row times commands of a few milliseconds, which
    // a polling interval would round up to its own steps (5 ms steps made every mount
    // take 5.x ms, and a rootless one 16).
    let exited = ExitWatch::new(child.id());
    loop {
        if let Some(st) = child
            .try_wait()
            .with_context(|| format!("wait for {what}"))?
        {
            return Ok(st);
        }
        let stop = interruptible && interrupted();
        if start.elapsed() > limit || stop {
            let _ = child.kill();
            let _ = child.wait();
            if stop {
                bail!("{what}: interrupted by a signal");
            }
            bail!("{what}: still running after {limit:?}, killed");
        }
        // Short enough to notice a termination signal or the deadline soon.
        exited.wait(Duration::from_millis(50));
    }
}

/// A pidfd of a child, readable once it has exited; without pidfds (before Linux 5.3),
/// plain 1 ms sleeps.
struct ExitWatch(Option<std::os::fd::OwnedFd>);

impl ExitWatch {
    fn new(pid: u32) -> Self {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return ExitWatch(None);
        }
        // SAFETY: the descriptor was just returned to us and is owned by nobody else.
        ExitWatch(Some(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32)
        }))
    }

    /// Returns when the child has exited, a signal arrived, or `most` has passed.
    fn wait(&self, most: Duration) {
        let Some(fd) = &self.0 else {
            thread::sleep(Duration::from_millis(1));
            return;
        };
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(fd),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; an error (EINTR) just means "look again".
        unsafe { libc::poll(&mut pfd, 1, most.as_millis() as libc::c_int) };
    }
}

/// Output of [`run_bounded`].
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything the command wrote to stdout.
    pub stdout: String,
    /// Everything the command wrote to stderr.
    pub stderr: String,
}

/// Runs `cmd` with stdin from /dev/null and stdout/stderr captured (read on threads), at
/// most `limit`. Errors when it cannot be started or outlives the limit; a non-zero exit is
/// returned, not an error.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Output> {
    run_inner(cmd, limit, true)
}

/// [`run_bounded`] that a termination signal does not cut short: for unmounting.
pub fn run_cleanup(cmd: &mut Command, limit: Duration) -> Result<Output> {
    run_inner(cmd, limit, false)
}

fn run_inner(cmd: &mut Command, limit: Duration, interruptible: bool) -> Result<Output> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {what}"))?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let status = wait_until(&mut child, limit, &what, interruptible)?;
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs `cmd` bounded by `limit` and fails unless it exits 0.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    let out = run_bounded(cmd, limit)?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, out.stderr.trim());
    }
    Ok(out)
}

/// `sync`, then drops the page cache, dentries and inodes (`echo 3 > drop_caches`).
pub fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3\n").context("write /proc/sys/vm/drop_caches")
}

pub use strata_tests::mount::{is_root, pid_alive};

/// User plus system CPU time of process `pid` (all its threads) in seconds.
pub fn cpu_secs(pid: i32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    // Fields after the comm: state(3) ... utime(14) stime(15); index 0 here is field 3.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tck = if tck > 0 { tck as f64 } else { 100.0 };
    Some((utime + stime) as f64 / tck)
}

/// Resident set size of `pid` in bytes (`VmRSS`).
pub fn rss_bytes(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Facts about the machine, printed with the results.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub nproc: usize,
    /// CPU model name.
    pub cpu: String,
    /// Total memory in bytes.
    pub mem_bytes: u64,
    /// `uname -r`.
    pub kernel: String,
    /// UTC start time, RFC 3339.
    pub date: String,
    /// 1-minute load average when the run started.
    pub loadavg_start: String,
}

/// Reads the machine facts.
pub fn machine() -> Machine {
    let nproc = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let mem_bytes = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let date = now_utc();
    Machine {
        nproc,
        cpu,
        mem_bytes,
        kernel,
        date,
        loadavg_start: loadavg(),
    }
}

/// The load averages from `/proc/loadavg` (first three fields).
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// 64-bit FNV-1a, the digest of walks and contents. Only compared within one run, so any
/// stable hash does; this one needs no dependency.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Adds `bytes`.
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// The hash so far.
    pub fn value(&self) -> u64 {
        self.0
    }

    /// The hash so far, as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Removes `path` recursively if it exists (a missing path is fine).
pub fn remove_tree(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("stat {}", path.display())),
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(path).with_context(|| format!("remove {}", path.display()))
        }
        Ok(_) => fs::remove_file(path).with_context(|| format!("remove {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_known_value() {
        let mut h = Fnv::default();
        h.write(b"a");
        assert_eq!(h.hex(), "af63dc4c8601ec8c");
    }

    #[test]
    fn date_format() {
        let d = now_utc();
        assert_eq!(d.len(), 20);
        assert!(d.ends_with('Z'));
    }
}
