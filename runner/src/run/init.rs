//! PID 1 of the container: starts the command with its credentials and capabilities, reaps
//! every orphan, forwards signals to the command, and exits with the command's status.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{bail, Result};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::spec::Spec;
use super::userns;

/// Signals the init passes on to the command.
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Capabilities the command keeps (Podman's default set); all others leave the bounding set.
const DEFAULT_CAPS: [u32; 11] = [
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    18, // CAP_SYS_CHROOT
    31, // CAP_SETFCAP
];

/// The set of forwarded signals plus SIGCHLD, which the init waits for instead of handling.
pub fn waited_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set
}

/// Runs the command and returns the exit status the container reports: its exit code,
/// 128+N when signal N ended it, 127 when it does not exist, 126 when it cannot be executed.
pub fn run(spec: &Spec, foreground_tty: bool) -> Result<i32> {
    let (uid, gid) = credentials(spec)?;
    if !std::path::Path::new(&spec.workdir).is_dir() {
        bail!(
            "working directory {} does not exist in the container",
            spec.workdir
        );
    }
    let set = waited_signals();
    set.thread_block()?;
    let mut cmd = Command::new(&spec.command[0]);
    cmd.args(&spec.command[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.workdir);
    if foreground_tty {
        cmd.process_group(0);
    }
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || prepare_child(uid, gid, foreground_tty));
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let name = spec.command[0].to_string_lossy();
            let (code, what) = match e.raw_os_error() {
                Some(libc::ENOENT) => (127, "command not found".to_string()),
                Some(libc::EACCES) | Some(libc::ENOEXEC) | Some(libc::EISDIR) => {
                    (126, format!("cannot execute: {e}"))
                }
                _ => (126, format!("cannot start: {e}")),
            };
            eprintln!("strata: {name}: {what}");
            return Ok(code);
        }
    };
    let pid = Pid::from_raw(child.id() as i32);
    loop {
        let sig = set.wait()?;
        if sig != Signal::SIGCHLD {
            let _ = kill(pid, sig);
            continue;
        }
        // Reap everything that ended: the command, and orphans re-parented to us.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, code)) if p == pid => return Ok(code),
                Ok(WaitStatus::Signaled(p, s, _)) if p == pid => return Ok(128 + s as i32),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

/// The command's uid and gid; checks that they exist in our user namespace.
fn credentials(spec: &Spec) -> Result<(Option<u32>, Option<u32>)> {
    let Some(u) = spec.user else {
        return Ok((None, None));
    };
    let gid = u.gid.unwrap_or_else(|| passwd_gid(u.uid).unwrap_or(u.uid));
    if !userns::is_mapped("/proc/self/uid_map", u.uid) {
        bail!(
            "--user {}: uid {} is not mapped in the container (without subordinate ids in \
             /etc/subuid, only root is)",
            u.uid,
            u.uid
        );
    }
    if !userns::is_mapped("/proc/self/gid_map", gid) {
        bail!("--user: gid {gid} is not mapped in the container");
    }
    Ok((Some(u.uid), Some(gid)))
}

/// The primary group of `uid` in the container's /etc/passwd.
fn passwd_gid(uid: u32) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[2] == uid.to_string()).then(|| f[3].parse().ok())?
    })
}

/// In the forked child, before exec: terminal, no_new_privs, capabilities, credentials.
fn prepare_child(uid: Option<u32>, gid: Option<u32>, foreground_tty: bool) -> io::Result<()> {
    // SAFETY (whole function): plain system calls on our own process.
    unsafe {
        // The init waits for these signals with them blocked; the command must not inherit
        // that (nor exec would clear it).
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        check(libc::sigprocmask(
            libc::SIG_SETMASK,
            &none,
            std::ptr::null_mut(),
        ))?;
        if foreground_tty {
            // Terminal signals (^C, ^Z) go to the command's group only, once.
            libc::signal(libc::SIGTTOU, libc::SIG_IGN);
            libc::tcsetpgrp(0, libc::getpid());
            libc::signal(libc::SIGTTOU, libc::SIG_DFL);
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        let last = last_cap();
        for cap in 0..=last {
            if !DEFAULT_CAPS.contains(&cap) {
                check(libc::prctl(
                    libc::PR_CAPBSET_DROP,
                    cap as libc::c_ulong,
                    0,
                    0,
                    0,
                ))?;
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        if let Some(g) = gid {
            // Denied (EPERM) in a single-id namespace, where there are no groups to drop.
            let groups = [g];
            libc::setgroups(1, groups.as_ptr());
            check(libc::setresgid(g, g, g))?;
        }
        if let Some(u) = uid {
            check(libc::setresuid(u, u, u))?;
        }
        limit_caps()?;
    }
    Ok(())
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Highest capability number the kernel knows (fixed fallback: CAP_CHECKPOINT_RESTORE).
fn last_cap() -> u32 {
    // Read before exec-time restrictions matter; /proc is mounted by now.
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Reduces the effective and permitted sets to the default set and empties the inheritable
/// one (after a switch to a non-root uid they are empty already).
fn limit_caps() -> io::Result<()> {
    let mut mask = [0u32; 2];
    for c in DEFAULT_CAPS {
        mask[(c / 32) as usize] |= 1 << (c % 32);
    }
    let mut hdr = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget/capset with a v3 header and two data words.
    unsafe {
        check(libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) as libc::c_int)?;
        for (d, m) in data.iter_mut().zip(mask) {
            d.effective &= m;
            d.permitted &= m;
            d.inheritable = 0;
        }
        check(libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) as libc::c_int)
    }
}
