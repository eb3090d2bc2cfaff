//! Running a mount: validation, detaching, readiness, signals and unmount.
//!
//! The contract callers such as containers/storage rely on: the started process exits 0 only
//! once the mount answers requests; on failure it prints one line and exits non-zero with
//! nothing mounted; the daemon that keeps serving holds none of the caller's stdio open.

use std::fmt::Display;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;

use fuser::{Config, MountOption, Session, SessionACL};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::{fork, ForkResult};

use crate::fuse::{connect_invalidations, StrataFuse};
use crate::layers::LayerStack;
use crate::options::MountConfig;
use crate::overlay::{Overlay, OverlayOptions};
use crate::stats::RequestStats;
use crate::upper::WhiteoutFormat;

/// FUSE worker threads, each with its own device descriptor.
const WORKER_THREADS: usize = 4;

/// Read-ahead window of the mount, in KiB: four requests of the largest size (`max_write`,
/// 1 MiB). The kernel gives a FUSE mount 128 KiB, so a sequential read of a lower file
/// costs a round trip per 128 KiB and never has a second request in flight. A cold read of
/// a lower file waits on the disk inside each READ (about 1 ms per MiB here): with a 1 MiB
/// window at most two are in flight, and a cold 1 GiB read ran at 1.1 GB/s where the
/// kernel's overlay read 2.3; with 4 MiB (and the sequential hint on the lower file) 1.8.
const READ_AHEAD_KB: u32 = 4096;

/// Tells fuser where the set-user-ID mount helper is when we are unprivileged (setting
/// `FUSERMOUNT_PATH`, unless the caller did): fuser otherwise finds it by running
/// `fusermount3 -h`, one more exec of a set-user-ID program for every rootless mount. Same
/// search order as fuser's (`fusermount3`, then `fusermount`, along `PATH`); when neither is
/// found, fuser's own search runs as before.
fn name_mount_helper() {
    if nix::unistd::geteuid().is_root() || std::env::var_os("FUSERMOUNT_PATH").is_some() {
        return;
    }
    let Some(path) = std::env::var_os("PATH") else {
        return;
    };
    for name in ["fusermount3", "fusermount"] {
        for dir in std::env::split_paths(&path) {
            let helper = dir.join(name);
            // fuser insists on UTF-8 here, and the daemon changes to "/" before mounting.
            let usable = helper.is_absolute() && helper.to_str().is_some();
            let runnable = usable
                && helper.is_file()
                && nix::unistd::access(&helper, nix::unistd::AccessFlags::X_OK).is_ok();
            if runnable {
                std::env::set_var("FUSERMOUNT_PATH", helper);
                return;
            }
        }
    }
}

/// Prints one error line and returns the failure exit code.
pub fn fail(e: &dyn Display) -> ExitCode {
    eprintln!("stratafs: {e}");
    ExitCode::FAILURE
}

/// Validates `cfg`, mounts, and serves until unmounted.
pub fn run(mut cfg: MountConfig) -> ExitCode {
    for opt in &cfg.unknown {
        eprintln!("stratafs: warning: unknown option ignored: {opt}");
    }
    if let Err(e) = check_mountpoint(&cfg.mountpoint) {
        return fail(&e);
    }
    // The daemon changes to "/", so a relative mountpoint must be resolved first.
    match std::fs::canonicalize(&cfg.mountpoint) {
        Ok(p) => cfg.mountpoint = p,
        Err(e) => return fail(&format!("mountpoint {}: {e}", cfg.mountpoint.display())),
    }
    let stack = match LayerStack::open(&cfg) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    if cfg.debug {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("debug")),
            )
            .init();
    }
    // While the process is single-threaded, so that the environment may be changed.
    name_mount_helper();
    if cfg.foreground {
        return match serve(&cfg, stack, None) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    // Fork before any thread exists; the parent waits for the child's word on the pipe.
    let (rd, wr) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => return fail(&format!("cannot create pipe: {e}")),
    };
    // SAFETY: the process is single-threaded here, so the child may run arbitrary code.
    match unsafe { fork() } {
        Err(e) => fail(&format!("cannot fork: {e}")),
        Ok(ForkResult::Parent { .. }) => {
            drop(wr);
            // One line: "ok", or the reason the mount failed. EOF means the child died.
            let mut msg = String::new();
            let _ = BufReader::new(File::from(rd)).read_line(&mut msg);
            match msg.strip_prefix("ok") {
                Some(_) => ExitCode::SUCCESS,
                None if msg.trim().is_empty() => fail(&"daemon exited before the mount was ready"),
                None => fail(&msg.trim()),
            }
        }
        Ok(ForkResult::Child) => {
            drop(rd);
            let _ = nix::unistd::setsid();
            let _ = std::env::set_current_dir("/");
            let mut notify = File::from(wr);
            match serve(&cfg, stack, Some(&mut notify)) {
                Ok(()) => std::process::exit(0),
                Err(e) => {
                    let _ = notify.write_all(format!("{e}\n").as_bytes());
                    std::process::exit(1)
                }
            }
        }
    }
}

fn check_mountpoint(p: &Path) -> Result<(), String> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("mountpoint {}: is not a directory", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("mountpoint {}: does not exist", p.display()))
        }
        Err(e) => Err(format!("mountpoint {}: {e}", p.display())),
    }
}

fn fuse_config(cfg: &MountConfig, writable: bool) -> Config {
    let f = &cfg.fuse;
    let fsname = f
        .fsname
        .clone()
        .or_else(|| {
            cfg.source
                .as_ref()
                .map(|s| s.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "stratafs".to_string());
    let mut opts = vec![
        MountOption::FSName(fsname),
        MountOption::CUSTOM("subtype=stratafs".to_string()),
        // The kernel checks permissions against our attributes, as overlayfs does.
        MountOption::DefaultPermissions,
    ];
    if f.read_only || !writable {
        opts.push(MountOption::RO);
    }
    let flag =
        |v: Option<bool>, on: MountOption, off: MountOption| v.map(|b| if b { on } else { off });
    opts.extend(flag(f.suid, MountOption::Suid, MountOption::NoSuid));
    opts.extend(flag(f.dev, MountOption::Dev, MountOption::NoDev));
    opts.extend(flag(f.exec, MountOption::Exec, MountOption::NoExec));
    opts.extend(flag(f.atime, MountOption::Atime, MountOption::NoAtime));
    let mut config = Config::default();
    config.mount_options = opts;
    // Privileged (as root, or as root of a user namespace such as rootless Podman's), the
    // mount serves every user, as fuse-overlayfs does: containers with their own id
    // mappings (`--userns=keep-id`) reach it as other users. Unprivileged, fusermount3 would
    // refuse allow_other without user_allow_other in /etc/fuse.conf.
    let privileged = nix::unistd::geteuid().is_root();
    config.acl = if f.allow_other || privileged {
        SessionACL::All
    } else if f.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(WORKER_THREADS);
    config.clone_fd = true;
    config
}

/// Mounts and serves. With `notify`, reports readiness there (after detaching stdio).
fn serve(cfg: &MountConfig, stack: LayerStack, notify: Option<&mut File>) -> Result<(), String> {
    // Termination signals are taken by one thread with sigwait; block them before any other
    // thread exists so that every thread inherits the mask.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    // With request counting on, SIGUSR1 dumps the counts so far.
    let stats = RequestStats::from_env().map(Arc::new);
    if stats.is_some() {
        signals.add(Signal::SIGUSR1);
    }
    signals
        .thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;
    // Layers may hold many directories; use every descriptor we are allowed.
    raise_nofile_limit();
    crate::heap::one_arena();
    // Modes of new files come from the kernel with the caller's umask already applied.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());

    let writable = stack.upper().is_some();
    let opts = OverlayOptions {
        read_only: cfg.fuse.read_only,
        whiteout: cfg.whiteout,
        ids: cfg.id_maps(),
        volatile: cfg.volatile,
    };
    let ov = Arc::new(Overlay::new(stack, opts).map_err(|e| {
        let err = std::io::Error::from_raw_os_error(e);
        match cfg.whiteout {
            Some(WhiteoutFormat::CharDev) if e == libc::EPERM => format!(
                "whiteout=chardev: the upper layer cannot hold character-device whiteouts ({err})"
            ),
            _ => format!("cannot prepare the layers: {err}"),
        }
    })?);
    let mountpoint = cfg.mountpoint.clone();
    let session = Session::new(
        StrataFuse::new(ov.clone(), cfg.fuse.max_write, !cfg.fuse.no_passthrough)
            .with_stats(stats.clone())
            .exiting_when_done(),
        &mountpoint,
        &fuse_config(cfg, writable),
    )
    .map_err(|e| format!("cannot mount on {}: {}", mountpoint.display(), one_line(&e)))?;
    // The mount is up: `Session::new` answered the kernel's INIT, and requests made from now
    // on wait in the kernel for the workers that `run` starts, as with libfuse's daemonize.
    // Saying so before any thread starts keeps their start, and a round trip to check that
    // the mount answers, out of the mount command: mount and first stat 2.9 -> 2.5 ms here
    // (median of 20; kernel overlayfs 2.0, fuse-overlayfs 2.0.0 2.3).
    if let Some(notify) = notify {
        detach_stdio();
        let _ = notify.write_all(b"ok\n");
    }
    // Before any request is served.
    connect_invalidations(&ov, session.notifier(), stats.clone());

    // One thread starts what only makes the mount faster, then takes the signals (which
    // wait, blocked, for its first sigwait): one thread start fewer before the workers'.
    {
        let mnt = mountpoint.clone();
        let ov = ov.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                // After the word, not before: the window is a sysfs write after a stat of
                // the mount (which waits for the workers to start), and the helpers'
                // threads cost a sixth of a millisecond.
                widen_read_ahead(&mnt);
                ov.start_helpers();
                loop {
                    match signals.wait() {
                        Ok(Signal::SIGUSR1) => {
                            if let Some(s) = &stats {
                                s.dump("SIGUSR1");
                            }
                        }
                        Ok(_) => {
                            let _ = unmount(&mnt);
                            break;
                        }
                        Err(_) => break,
                    }
                }
            })
            .map_err(|e| format!("cannot start signal thread: {e}"))?;
    }

    session
        .run()
        .map_err(|e| format!("serving {} failed: {}", mountpoint.display(), one_line(&e)))
}

/// Serves `ov` on `fd`, a `/dev/fuse` descriptor that another process mounts (with
/// `mount(2)` and `fd=N`), until that mount goes away. For callers that mount in a namespace
/// of their own, such as the `strata` runner.
pub fn serve_fd(ov: Arc<Overlay>, fd: OwnedFd) -> std::io::Result<()> {
    crate::heap::one_arena();
    let mut config = Config::default();
    config.n_threads = Some(WORKER_THREADS);
    config.clone_fd = true;
    let stats = RequestStats::from_env().map(Arc::new);
    let fs = StrataFuse::new(ov.clone(), None, true).with_stats(stats.clone());
    let session = Session::from_fd(fs, fd, SessionACL::All, config)?;
    connect_invalidations(&ov, session.notifier(), stats);
    ov.start_helpers();
    session.run()
}

/// Raises the mount's read-ahead window to [`READ_AHEAD_KB`] when allowed: only the init
/// namespace's root may write `/sys/class/bdi`, and the INIT reply can only lower the window.
/// Elsewhere (rootless) the kernel's default stays, which costs speed, not correctness.
fn widen_read_ahead(mnt: &Path) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let Ok(st) = nix::sys::stat::stat(mnt) else {
        return;
    };
    let dev = st.st_dev;
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    if let Err(e) = std::fs::write(&knob, READ_AHEAD_KB.to_string()) {
        tracing::debug!("read-ahead stays at the kernel's default: {knob}: {e}");
    }
}

fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let null: OwnedFd = null.into();
        for target in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors, which we own.
            unsafe { libc::dup2(null.as_raw_fd(), target) };
        }
    }
}

fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/set of our own limit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn one_line(e: &dyn Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// Detaches the mount at `mnt`: directly when we may, else through `fusermount3 -u -z`.
pub fn unmount(mnt: &Path) -> Result<(), String> {
    match nix::mount::umount2(mnt, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EPERM) => {
            let status = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(mnt)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("cannot run fusermount3: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("fusermount3 -u {} failed: {status}", mnt.display()))
            }
        }
        Err(e) => Err(format!("cannot unmount {}: {e}", mnt.display())),
    }
}
