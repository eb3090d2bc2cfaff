//! `strata run`: one command in fresh namespaces on a stratafs view of the layers.
//!
//! Three processes, each with one job:
//! - the **runner** (the caller's process) checks the request, makes the directories, writes
//!   the user-namespace maps from outside, forwards signals, and cleans up after;
//! - the **server**, in the new user namespace, serves the layers with stratafs on a
//!   `/dev/fuse` descriptor. It stays outside the container: its root is the host's, and the
//!   mount exists only in the container's mount namespace, so the server never sees (nor
//!   recurses into) its own mount, and the container cannot reach the server;
//! - the **init**, PID 1 of a new pid namespace, mounts the descriptor in a new mount
//!   namespace, builds the root filesystem, `pivot_root`s, starts the command, reaps and
//!   forwards signals.
//!
//! The runner exits with the command's status; 125 is a failure of strata itself.

mod init;
mod rootfs;
pub mod spec;
mod userns;

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use spec::{RunArgs, Spec};
use strata_fs::layers::LayerStack;
use strata_fs::options::MountConfig;
use strata_fs::overlay::{Overlay, OverlayOptions};
use userns::IdMap;

/// Exit status for failures of strata itself (as Podman).
const FAILED: i32 = 125;

/// Runs `strata run`; returns the exit status.
pub fn run(args: RunArgs) -> i32 {
    match run_checked(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("strata: {e:#}");
            FAILED
        }
    }
}

/// Where the container's writable layer and mount point live.
struct Dirs {
    /// Temporary directory of this run, removed when dropped.
    _run: tempfile::TempDir,
    /// The upper layer.
    diff: PathBuf,
    /// Its workdir.
    work: PathBuf,
    /// Mount point of the container root.
    root: PathBuf,
    /// Whether `diff`/`work` go away with the run.
    ephemeral: bool,
}

impl Dirs {
    fn create(spec: &Spec) -> Result<Dirs> {
        let run = tempfile::Builder::new()
            .prefix("strata-run-")
            .tempdir()
            .context("creating the run directory")?;
        let (diff, work, ephemeral) = match &spec.upper {
            Some(dir) => (dir.join("diff"), dir.join("work"), false),
            None => (run.path().join("diff"), run.path().join("work"), true),
        };
        for d in [&diff, &work] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let root = run.path().join("root");
        fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
        Ok(Dirs {
            _run: run,
            diff,
            work,
            root,
            ephemeral,
        })
    }
}

/// The server's pid, for the runner's signal handler.
static SERVER: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_to_server(sig: libc::c_int) {
    let pid = SERVER.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Whether this process ignores `sig`.
fn ignored(sig: Signal) -> bool {
    // SAFETY: a query (no new action) into a zeroed struct.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig as libc::c_int, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

fn run_checked(args: RunArgs) -> Result<i32> {
    let spec = Spec::from_args(args)?;
    // SAFETY: plain getter.
    let rootless = unsafe { libc::geteuid() } != 0;
    let idmap = rootless.then(IdMap::for_caller);
    let dirs = Dirs::create(&spec)?;
    let fg_tty = foreground_tty();
    let (from_server, to_runner) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (from_runner, to_server) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let handler = SigAction::new(
        SigHandler::Handler(forward_to_server),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in init::FORWARDED {
        // A signal the caller ignores (nohup's SIGHUP) stays ignored, here and, through
        // fork and exec, in the command, as for any other child of the caller.
        if ignored(s) {
            continue;
        }
        // SAFETY: the handler only calls kill.
        unsafe { sigaction(s, &handler) }?;
    }
    // SAFETY: single-threaded here; the child only runs our code and exits.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            drop((from_server, to_server));
            let code = server(
                &spec,
                idmap.is_some(),
                &dirs,
                to_runner,
                from_runner,
                fg_tty,
            );
            std::process::exit(code);
        }
        ForkResult::Parent { child } => {
            drop((to_runner, from_runner));
            SERVER.store(child.as_raw(), Ordering::Relaxed);
            let mapped = match &idmap {
                Some(map) => map_server(map, child, from_server, to_server),
                None => Ok(()),
            };
            let code = wait_exit(child);
            restore_tty(fg_tty);
            mapped?;
            drop(dirs);
            Ok(code)
        }
    }
}

/// Waits for the server to create its user namespace, then writes its maps.
fn map_server(map: &IdMap, server: Pid, from: OwnedFd, to: OwnedFd) -> Result<()> {
    let mut from = fs::File::from(from);
    let mut to = fs::File::from(to);
    let mut b = [0u8; 1];
    if from.read(&mut b)? != 1 || b[0] != b'U' {
        return Ok(()); // the server failed and said why
    }
    match map.write(server.as_raw()) {
        Ok(()) => {
            to.write_all(b"M")?;
            Ok(())
        }
        Err(e) => {
            let _ = to.write_all(b"X");
            Err(e.context("setting up the user namespace"))
        }
    }
}

/// Waits for `pid` and turns its end into an exit status.
fn wait_exit(pid: Pid) -> i32 {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, s, _)) => return 128 + s as i32,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return FAILED,
        }
    }
}

/// Whether our stdin is a terminal whose foreground group is ours: then the command takes
/// the foreground, so that ^C reaches it (once) and not strata.
fn foreground_tty() -> bool {
    // SAFETY: plain terminal queries.
    unsafe { libc::isatty(0) == 1 && libc::tcgetpgrp(0) == libc::getpgrp() }
}

fn restore_tty(fg_tty: bool) {
    if fg_tty {
        // SAFETY: taking the terminal back for our group, ignoring SIGTTOU meanwhile.
        unsafe {
            libc::signal(libc::SIGTTOU, libc::SIG_IGN);
            libc::tcsetpgrp(0, libc::getpgrp());
            libc::signal(libc::SIGTTOU, libc::SIG_DFL);
        }
    }
}

/// The server process: user namespace, layers, the container's init, then the filesystem
/// until the init ends; removes an ephemeral writable layer last.
fn server(
    spec: &Spec,
    rootless: bool,
    dirs: &Dirs,
    to_runner: OwnedFd,
    from_runner: OwnedFd,
    fg_tty: bool,
) -> i32 {
    // SAFETY: plain prctl; nothing may outlive the runner.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let signals = init::waited_signals();
    let _ = signals.thread_block();
    let result = (|| -> Result<i32> {
        if rootless {
            enter_user_namespace(to_runner, from_runner)?;
        }
        serve_container(spec, rootless, dirs, fg_tty)
    })();
    let code = result.unwrap_or_else(|e| {
        eprintln!("strata: {e:#}");
        FAILED
    });
    if dirs.ephemeral {
        // Inside the namespace: files owned by subordinate ids can be removed from here.
        let _ = fs::remove_dir_all(&dirs.diff);
        let _ = fs::remove_dir_all(&dirs.work);
    }
    code
}

fn enter_user_namespace(to_runner: OwnedFd, from_runner: OwnedFd) -> Result<()> {
    let mut to = fs::File::from(to_runner);
    let mut from = fs::File::from(from_runner);
    if let Err(e) = unshare(CloneFlags::CLONE_NEWUSER) {
        let _ = to.write_all(b"E");
        bail!("{}", userns::blocked_reason(e as i32));
    }
    to.write_all(b"U")?;
    let mut b = [0u8; 1];
    if from.read(&mut b)? != 1 || b[0] != b'M' {
        bail!("the user namespace was not set up");
    }
    Ok(())
}

/// Opens the layers, starts the init in its namespaces, serves the filesystem, and returns
/// the init's exit status.
fn serve_container(spec: &Spec, rootless: bool, dirs: &Dirs, fg_tty: bool) -> Result<i32> {
    let ov = Arc::new(open_overlay(spec, dirs, rootless)?);
    let fuse: OwnedFd = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .context("opening /dev/fuse")?
        .into();
    let mut flags = CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC;
    if !spec.host_network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    let fuse_raw = fuse.as_raw_fd();
    // The init says when it has mounted the descriptor: reading it before fails (EPERM).
    let (mounted_rx, mounted_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mounted_tx_raw = mounted_tx.as_raw_fd();
    // A fork into the new namespaces (clone without a stack): unshare(CLONE_NEWPID) here
    // would forbid this process the threads that serve the filesystem.
    // SAFETY: no other thread exists yet in this process; the child runs only our code.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags.bits() as libc::c_long | libc::SIGCHLD as libc::c_long,
            0 as libc::c_long,
            0 as libc::c_long,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        let hint = match (rootless, e.raw_os_error()) {
            (true, Some(n)) => format!(" ({})", userns::blocked_reason(n)),
            _ => String::new(),
        };
        bail!("creating the container's namespaces: {e}{hint}");
    }
    match pid {
        0 => {
            drop(mounted_rx);
            let code = container(spec, fuse_raw, mounted_tx_raw, &dirs.root, fg_tty);
            std::process::exit(code);
        }
        pid => {
            let child = Pid::from_raw(pid as i32);
            drop(mounted_tx);
            let mut b = [0u8; 1];
            if fs::File::from(mounted_rx).read(&mut b).unwrap_or(0) != 1 {
                // The init failed before mounting and said why.
                return Ok(wait_exit(child));
            }
            std::thread::Builder::new()
                .name("fuse".into())
                .spawn(move || {
                    if let Err(e) = strata_fs::daemon::serve_fd(ov, fuse) {
                        eprintln!("strata: serving the layers: {e}");
                    }
                })
                .context("starting the filesystem")?;
            let signals = init::waited_signals();
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || loop {
                    if let Ok(sig) = signals.wait() {
                        if sig != Signal::SIGCHLD {
                            let _ = kill(child, sig);
                        }
                    }
                })
                .context("starting the signal thread")?;
            Ok(wait_exit(child))
        }
    }
}

fn open_overlay(spec: &Spec, dirs: &Dirs, rootless: bool) -> Result<Overlay> {
    let cfg = MountConfig::for_layers(
        spec.layers.clone(),
        Some((dirs.diff.clone(), dirs.work.clone())),
        dirs.root.clone(),
    );
    let stack = LayerStack::open(&cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Without privilege, files of ids that are not mapped (the host's root, for a host
    // directory as a layer) would lock the container's root out of them.
    let squash = rootless.then_some(0);
    let mut opts = OverlayOptions::default();
    opts.ids.uid.squash = squash;
    opts.ids.gid.squash = squash;
    Overlay::new(stack, opts).map_err(|e| {
        anyhow::anyhow!(
            "preparing the writable layer {}: {}",
            dirs.diff.display(),
            std::io::Error::from_raw_os_error(e)
        )
    })
}

/// The init: mount namespace, root filesystem, `pivot_root`, then the command.
fn container(spec: &Spec, fuse: i32, mounted: i32, root: &Path, fg_tty: bool) -> i32 {
    // SAFETY: plain prctl; the container dies with the server.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let result = (|| -> Result<i32> {
        unshare(CloneFlags::CLONE_NEWNS).context("creating the mount namespace")?;
        rootfs::make_private()?;
        rootfs::mount_stratafs(fuse, root)?;
        // SAFETY: our copies of the descriptors; the server keeps its own.
        unsafe {
            libc::close(fuse);
            libc::write(mounted, b"m".as_ptr().cast(), 1);
            libc::close(mounted);
        }
        nix::unistd::sethostname(&spec.hostname).context("setting the host name")?;
        if !spec.host_network {
            rootfs::loopback_up()?;
        }
        rootfs::populate(root, &spec.volumes)?;
        if spec.read_only {
            rootfs::remount_read_only(root)?;
        }
        rootfs::pivot(root)?;
        init::run(spec, fg_tty)
    })();
    result.unwrap_or_else(|e| {
        eprintln!("strata: {e:#}");
        FAILED
    })
}
