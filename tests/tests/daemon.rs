//! Daemon contract: exit 0 means the mount is live, the caller's pipes reach EOF, the daemon
//! detaches, `umount`/`fusermount3 -u`/SIGTERM/SIGINT end it cleanly, `-f`/`-d` stay in the
//! foreground.

use std::fs;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_tests::cmd::{kill_group, spawn_piped, wait_deadline};
use strata_tests::mount::signal;
use strata_tests::*;

const GONE: Duration = Duration::from_secs(10);

fn stack(sc: &Scratch) -> Strata {
    let (l1, l2) = basic_stack(sc, "l");
    Strata::new(&[l1.root(), l2.root()])
}

#[test]
fn exit_zero_means_live_immediately() {
    let sc = Scratch::new();
    let st = stack(&sc);
    for i in 0..3 {
        let mnt = sc.mkdir(format!("mnt{i}"));
        let out = run_stratafs(&st.args(&mnt));
        let _g = MountGuard::fuse(&mnt);
        assert!(out.success(), "{}", out.describe());
        // No sleep, no retry: the mount must be there the moment the launcher returned.
        assert!(
            is_mounted(&mnt),
            "launcher exited 0 before the mount was live"
        );
        assert_basic_view(&mnt);
    }
}

#[test]
fn stderr_and_stdout_reach_eof_when_launcher_exits() {
    let sc = Scratch::new();
    let st = stack(&sc);
    let mnt = sc.mkdir("mnt");
    let start = Instant::now();
    let mut child = spawn_piped(Command::new(stratafs_bin()).args(st.args(&mnt)));
    let mut err = child.stderr.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    let status = wait_deadline(&mut child, start + Duration::from_secs(30));
    let _g = MountGuard::fuse(&mnt);
    let Some(status) = status else {
        kill_group(&mut child);
        panic!("stratafs launcher did not exit within 30 s");
    };
    assert!(status.success(), "launcher failed: {status}");
    // Read both pipes to EOF on a helper thread; the daemon must not hold them.
    let bufs = with_timeout(
        "reading launcher stdout/stderr to EOF",
        Duration::from_secs(5),
        move || {
            use std::io::Read;
            let mut e = Vec::new();
            let mut o = Vec::new();
            err.read_to_end(&mut e).unwrap();
            out.read_to_end(&mut o).unwrap();
            (o, e)
        },
    );
    let _ = bufs;
    assert!(is_mounted(&mnt));
}

#[test]
fn daemon_is_detached_with_stdio_on_dev_null() {
    let sc = Scratch::new();
    let st = stack(&sc);
    let mnt = sc.mkdir("mnt");
    let g = st.mount(&mnt);
    let pid = g.daemon_pid();
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields after comm: state ppid pgrp session
    let sid: i32 = f[3].parse().unwrap();
    assert_eq!(
        sid, pid,
        "daemon {pid} should lead its own session (setsid); sid={sid}"
    );
    let me_sid = unsafe { libc::getsid(0) };
    assert_ne!(sid, me_sid, "daemon is still in the caller's session");
    for fd in 0..3 {
        let target = fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .unwrap_or_else(|e| panic!("daemon fd {fd}: {e}"));
        assert_eq!(
            target,
            std::path::Path::new("/dev/null"),
            "daemon fd {fd} should be /dev/null"
        );
    }
}

fn ends_daemon(how: &str) {
    let sc = Scratch::new();
    let st = stack(&sc);
    let mnt = sc.mkdir("mnt");
    let mut g = st.mount(&mnt);
    let pid = g.daemon_pid();
    assert_basic_view(&mnt);
    match how {
        "umount" => {
            run(Command::new("umount").arg(&mnt)).expect_success();
        }
        "fusermount3" => {
            run(Command::new("fusermount3").arg("-u").arg(&mnt)).expect_success();
        }
        "SIGTERM" => signal(pid, libc::SIGTERM),
        "SIGINT" => signal(pid, libc::SIGINT),
        _ => unreachable!(),
    }
    assert!(
        g.wait_gone(GONE),
        "after {how}: mounted={} daemon {pid} alive={}",
        is_mounted(&mnt),
        pid_alive(pid)
    );
    // A clean unmount leaves an ordinary, empty mountpoint behind.
    assert!(names(&mnt).is_empty(), "mountpoint not empty after {how}");
}

/// A daemon that ends after a new mount took its path must leave that mount alone (fuser
/// unmounts by path when its session ends). Made certain with a lazy unmount (as Podman
/// does) while a file is open: the old filesystem lives on until the file is closed, and
/// its daemon ends only then, with the new mount already on the path.
#[test]
fn remount_on_same_path_survives_old_daemon_exit() {
    let sc = Scratch::new();
    let st = stack(&sc);
    let mnt = sc.mkdir("mnt");
    let mut old = st.mount(&mnt);
    let mut old_pid = old.daemon_pid();
    for round in 0..3 {
        let held = fs::File::open(mnt.join("top.txt")).unwrap();
        run(Command::new("umount").arg("-l").arg(&mnt)).expect_success();
        let new = st.mount(&mnt);
        // Found by mount path, so the new guard lists the old daemon too.
        let new_pid = *new.pids().iter().find(|&&p| p != old_pid).unwrap();
        assert!(pid_alive(old_pid), "round {round}: old daemon ended early");
        drop(held);
        assert!(
            old.forget_unmounted(GONE),
            "round {round}: old daemon {old_pid} still there"
        );
        assert!(
            is_mounted(&mnt),
            "round {round}: the new mount was unmounted when the old daemon {old_pid} ended"
        );
        assert_basic_view(&mnt);
        old = new;
        old_pid = new_pid;
    }
}

#[test]
fn umount_ends_daemon() {
    ends_daemon("umount");
}

#[test]
fn fusermount3_u_ends_daemon() {
    ends_daemon("fusermount3");
}

#[test]
fn sigterm_unmounts_cleanly() {
    ends_daemon("SIGTERM");
}

#[test]
fn sigint_unmounts_cleanly() {
    ends_daemon("SIGINT");
}

fn foreground(flag: &str) {
    let sc = Scratch::new();
    let st = stack(&sc).flag(flag);
    let mnt = sc.mkdir("mnt");
    let log_path = sc.join("stderr.log");
    let log = fs::File::create(&log_path).unwrap();
    let child = Command::new(stratafs_bin())
        .args(st.args(&mnt))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .process_group(0)
        .spawn()
        .expect("spawn stratafs");
    let pid = child.id() as i32;
    let mut g = MountGuard::foreground(&mnt, child);
    assert!(
        wait_for(Duration::from_secs(10), || is_mounted(&mnt)),
        "{flag}: not mounted within 10 s; stderr: {}",
        fs::read_to_string(&log_path).unwrap_or_default()
    );
    assert_basic_view(&mnt);
    std::thread::sleep(Duration::from_millis(300));
    let c = g.child_mut().unwrap();
    assert!(
        c.try_wait().unwrap().is_none(),
        "{flag}: the started process exited while mounted (not foreground)"
    );
    if flag == "-d" {
        let logged = fs::read_to_string(&log_path).unwrap_or_default();
        assert!(
            !logged.trim().is_empty(),
            "-d wrote no debug output to stderr"
        );
    }
    signal(pid, libc::SIGTERM);
    let c = g.child_mut().unwrap();
    let st = wait_deadline(c, Instant::now() + GONE);
    assert!(st.is_some(), "{flag}: process did not exit on SIGTERM");
    assert!(
        wait_for(GONE, || !is_mounted(&mnt)),
        "{flag}: still mounted after the foreground process exited"
    );
}

#[test]
fn foreground_f_stays_until_killed() {
    foreground("-f");
}

#[test]
fn debug_d_stays_in_foreground_and_logs() {
    foreground("-d");
}
