//! Running external commands with a bounded wait.
//!
//! Every child gets its own process group, is killed (whole group) when its deadline passes,
//! and its pipes are read in background threads so that a grandchild holding them open (a
//! daemon that forgot to detach) cannot hang the caller: once the child has exited, the pipes
//! get a short grace period, after which whatever was read is returned and
//! [`CmdOutput::pipes_hung`] is set.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Default bound for a helper command (mount, umount, ls, ...).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a pipe may stay open after the child that owned it has exited.
pub const PIPE_GRACE: Duration = Duration::from_secs(5);

/// The result of [`run`]: like `std::process::Output`, plus what went wrong with the bounds.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// Rendering of the command line, for messages.
    pub cmdline: String,
    /// Exit status (a killed child shows the signal).
    pub status: ExitStatus,
    /// Everything read from stdout.
    pub stdout: Vec<u8>,
    /// Everything read from stderr.
    pub stderr: Vec<u8>,
    /// The child outlived its deadline and was killed.
    pub timed_out: bool,
    /// stdout or stderr stayed open longer than [`PIPE_GRACE`] after the child exited.
    pub pipes_hung: bool,
    /// Time from spawn to exit.
    pub elapsed: Duration,
}

impl CmdOutput {
    /// Exit status 0 and no timeout.
    pub fn success(&self) -> bool {
        self.status.success() && !self.timed_out
    }

    /// stdout as (lossy) UTF-8.
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as (lossy) UTF-8.
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// A one-paragraph description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "`{}` -> {}{}{} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.status,
            if self.timed_out {
                " (TIMED OUT, killed)"
            } else {
                ""
            },
            if self.pipes_hung {
                " (PIPES STILL OPEN after exit)"
            } else {
                ""
            },
            self.elapsed,
            self.stdout_str().trim_end(),
            self.stderr_str().trim_end()
        )
    }

    /// Panics with [`describe`](Self::describe) unless the command succeeded.
    pub fn expect_success(self) -> Self {
        assert!(self.success(), "command failed: {}", self.describe());
        self
    }
}

/// Renders a command for messages.
pub fn render(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// A pipe being drained in the background.
struct Drain {
    buf: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> Option<Drain> {
    let mut pipe = pipe?;
    let buf = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let b = buf.clone();
    thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => b.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
        let _ = tx.send(());
    });
    Some(Drain { buf, done: rx })
}

/// Waits for a drained pipe until `deadline`; returns its content and whether it hit EOF.
fn collect(d: Option<Drain>, deadline: Instant) -> (Vec<u8>, bool) {
    match d {
        None => (Vec::new(), true),
        Some(d) => {
            let left = deadline.saturating_duration_since(Instant::now());
            let eof = d.done.recv_timeout(left).is_ok();
            let data = d.buf.lock().unwrap().clone();
            (data, eof)
        }
    }
}

/// Kills the process group led by `child` and reaps the child.
pub fn kill_group(child: &mut Child) {
    unsafe {
        libc::killpg(child.id() as libc::pid_t, libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits for `child` until `deadline`; `None` if it is still running then.
pub fn wait_deadline(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(e) => panic!("waiting for child {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Spawns `cmd` (stdin null, stdout/stderr piped, own process group). Panics with a clear
/// message when the program cannot be started (a missing tool is a failure, not a skip).
pub fn spawn_piped(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot start `{}`: {e} (is the tool installed? CI installs fuse3, attr, \
             fuse-overlayfs, util-linux, passwd)",
            render(cmd)
        )
    })
}

/// Runs `cmd` to completion with a bound of `timeout`; kills it (and its process group) when
/// the bound passes. Never hangs on pipes held open by a detached grandchild.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let cmdline = render(cmd);
    let start = Instant::now();
    let mut child = spawn_piped(cmd);
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let (status, timed_out) = match wait_deadline(&mut child, start + timeout) {
        Some(st) => (st, false),
        None => {
            kill_group(&mut child);
            (
                child
                    .try_wait()
                    .ok()
                    .flatten()
                    .unwrap_or(ExitStatus::from_raw(9)),
                true,
            )
        }
    };
    let elapsed = start.elapsed();
    let grace = Instant::now() + PIPE_GRACE;
    let (stdout, eof1) = collect(out, grace);
    let (stderr, eof2) = collect(err, grace);
    CmdOutput {
        cmdline,
        status,
        stdout,
        stderr,
        timed_out,
        pipes_hung: !(eof1 && eof2),
        elapsed,
    }
}

/// [`run_timeout`] with [`CMD_TIMEOUT`].
pub fn run(cmd: &mut Command) -> CmdOutput {
    run_timeout(cmd, CMD_TIMEOUT)
}

/// Builds a `Command` from a program and arguments.
pub fn command<S: AsRef<OsStr>>(prog: impl AsRef<OsStr>, args: &[S]) -> Command {
    let mut c = Command::new(prog);
    c.args(args);
    c
}

/// Runs `sh -c script` with [`CMD_TIMEOUT`].
pub fn sh(script: &str) -> CmdOutput {
    run(Command::new("sh").arg("-c").arg(script))
}

/// Runs `sh -c script` and panics unless it succeeds.
pub fn sh_ok(script: &str) -> CmdOutput {
    sh(script).expect_success()
}

/// Runs `f` on another thread and panics if it takes longer than `limit`.
///
/// The thread is left behind on timeout (it may be blocked in a syscall on a FUSE mount);
/// the panic unwinds through the test's `MountGuard`s, whose unmount and daemon kill make
/// such a syscall return.
pub fn with_timeout<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => v,
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(_) => panic!("{what}: did not finish within {limit:?}"),
    }
}

/// Polls `cond` every 20 ms until it is true or `limit` passes; returns its last value.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
