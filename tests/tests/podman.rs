//! stratafs as Podman's and Buildah's `mount_program`, end to end, as root and rootless.
//!
//! Each case gets its own containers/storage world in a scratch directory (graphroot,
//! runroot, `rootless_storage_path`, storage.conf and containers.conf passed through
//! `CONTAINERS_STORAGE_CONF`/`CONTAINERS_CONF`); the system's storage is never touched. The
//! base image is a busybox-static root filesystem imported with `podman import`, so no
//! registry is needed. Containers use runc, the cgroupfs manager and no network (the
//! machines these run on reject crun's cgroup layout and slirp4netns).
//!
//! What is checked, besides each command's output: the image layers are byte-identical
//! before and after (copy-on-write never writes a lower layer), and at the end nothing of
//! the world is mounted and no stratafs daemon for it is alive.
//!
//! Needs `podman`, `buildah`, `runc` and `busybox` (static) installed (`.ci/run` does it);
//! without them the tests fail, unless `STRATA_SKIP_PODMAN=1` says to skip.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use strata_tests::mount::mountinfo;
use strata_tests::user::as_user_command;
use strata_tests::*;

/// Bound for one podman/buildah command (a build step runs a container).
const PODMAN_TIMEOUT: Duration = Duration::from_secs(180);

/// Who runs Podman.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Root,
    Rootless,
}

/// One isolated containers/storage world and the user that drives it.
struct World {
    sc: Scratch,
    who: Who,
    user: Option<TestUser>,
}

fn tools_present() -> bool {
    ["podman", "buildah", "runc"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("busybox is installed (apt-get install busybox-static)")
}

/// Whether to run; panics with the reason when the tools are missing and skipping was not
/// asked for, so that a CI without Podman cannot pass silently.
fn should_run() -> bool {
    if tools_present() {
        return true;
    }
    if std::env::var_os("STRATA_SKIP_PODMAN").is_some() {
        eprintln!("skipping: podman/buildah/runc not installed and STRATA_SKIP_PODMAN is set");
        return false;
    }
    panic!("podman, buildah and runc are needed (apt-get install podman buildah runc busybox-static); set STRATA_SKIP_PODMAN=1 to skip")
}

/// Gives `user` subordinate ids if it has none (rootless Podman needs a range).
fn ensure_subids(user: &TestUser) {
    for (file, flag) in [
        ("/etc/subuid", "--add-subuids"),
        ("/etc/subgid", "--add-subgids"),
    ] {
        let listed = fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with(&format!("{}:", user.name)));
        if !listed {
            run(Command::new("usermod").args([flag, "200000-265535", &user.name])).expect_success();
        }
    }
}

impl World {
    fn new(who: Who) -> World {
        let sc = Scratch::new();
        let user = (who == Who::Rootless).then(|| {
            let u = ensure_test_user();
            ensure_dev_fuse_rw();
            ensure_subids(&u);
            u
        });
        let w = World { sc, who, user };
        let root = w.sc.path();
        for d in ["graph", "run", "xdg", "home", "ctx"] {
            w.sc.mkdir(d);
        }
        fs::set_permissions(root.join("xdg"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(
            root.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{g}\"\nrunroot = \"{r}\"\n\
                 rootless_storage_path = \"{g}\"\n\n[storage.options.overlay]\n\
                 mount_program = \"{p}\"\n",
                g = root.join("graph").display(),
                r = root.join("run").display(),
                p = stratafs_bin().display(),
            ),
        )
        .unwrap();
        // No limits of our own: raising rlimits is not permitted on these machines.
        fs::write(
            root.join("containers.conf"),
            "[containers]\ndefault_ulimits = []\nnetns = \"none\"\n\n[engine]\n\
             cgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        w.make_base_tar();
        if let Some(u) = &w.user {
            chown_tree(root, u);
        }
        w.podman(&["import", "base.tar", "localhost/strata-base"]);
        w
    }

    /// A busybox root filesystem as a tar, with a few files to change later.
    fn make_base_tar(&self) {
        let r = self.sc.mkdir("rootfs");
        for d in [
            "bin",
            "etc",
            "root",
            "tmp",
            "opt/tree/sub",
            "opt/keep",
            "var/lib",
        ] {
            fs::create_dir_all(r.join(d)).unwrap();
        }
        fs::set_permissions(r.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::copy(busybox(), r.join("bin/busybox")).unwrap();
        let applets = "sh ls cat echo mkdir rm touch mv cp ln chmod stat sleep id true \
                       false find sort wc test grep env printf hostname ps kill readlink";
        for a in applets.split_whitespace() {
            std::os::unix::fs::symlink("busybox", r.join("bin").join(a)).unwrap();
        }
        fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        fs::write(r.join("etc/group"), "root:x:0:\n").unwrap();
        fs::write(r.join("etc/motd"), "base motd\n").unwrap();
        fs::write(r.join("opt/readme"), "readme\n").unwrap();
        fs::write(r.join("opt/tree/a"), "a\n").unwrap();
        fs::write(r.join("opt/tree/sub/b"), "b\n").unwrap();
        fs::write(r.join("opt/keep/k1"), "k1\n").unwrap();
        fs::write(r.join("opt/keep/k2"), "k2\n").unwrap();
        fs::write(r.join("var/lib/data"), "data\n").unwrap();
        fs::hard_link(r.join("var/lib/data"), r.join("var/lib/data.link")).unwrap();
        run(Command::new("tar")
            .arg("-C")
            .arg(&r)
            .arg("-cf")
            .arg(self.sc.join("base.tar"))
            .arg("."))
        .expect_success();
    }

    fn command(&self, prog: &str) -> Command {
        let root = self.sc.path();
        let env = [
            ("HOME", root.join("home")),
            ("XDG_RUNTIME_DIR", root.join("xdg")),
            ("CONTAINERS_STORAGE_CONF", root.join("storage.conf")),
            ("CONTAINERS_CONF", root.join("containers.conf")),
            (
                "PATH",
                PathBuf::from("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
            ),
        ];
        let mut c = match &self.user {
            // setpriv resets the environment, so env(1) sets it again after the switch.
            Some(u) => {
                let mut c = as_user_command(u);
                c.arg("env");
                for (k, v) in &env {
                    c.arg(format!("{k}={}", v.display()));
                }
                c.arg(prog);
                c
            }
            None => {
                let mut c = Command::new(prog);
                c.envs(env.iter().map(|(k, v)| (k, v)));
                c
            }
        };
        c.current_dir(root);
        c
    }

    /// Runs `prog args`, bounded; returns the output whatever the status.
    fn try_tool(&self, prog: &str, args: &[&str]) -> CmdOutput {
        let mut c = self.command(prog);
        c.args(args);
        let out = run_timeout(&mut c, PODMAN_TIMEOUT);
        // The mount program's daemon must not hold the caller's pipes (Podman would hang).
        assert!(
            !out.pipes_hung,
            "{:?}: pipes held open: {}",
            self.who,
            out.describe()
        );
        out
    }

    /// Runs `podman args` and requires success; returns stdout.
    fn podman(&self, args: &[&str]) -> String {
        let out = self.try_tool("podman", args);
        assert!(out.success(), "{:?}: {}", self.who, out.describe());
        out.stdout_str()
    }

    /// Runs `buildah args` and requires success; returns stdout.
    fn buildah(&self, args: &[&str]) -> String {
        let out = self.try_tool("buildah", args);
        assert!(out.success(), "{:?}: {}", self.who, out.describe());
        out.stdout_str()
    }

    /// `sh -c script` in a fresh `--rm` container of `image`; returns stdout.
    fn sh(&self, image: &str, script: &str) -> String {
        self.podman(&["run", "--rm", image, "sh", "-c", script])
    }

    /// The diff directories of `image`'s layers (its own and its parents').
    fn image_layer_dirs(&self, image: &str) -> Vec<PathBuf> {
        let out = self.podman(&[
            "image",
            "inspect",
            "--format",
            "{{.GraphDriver.Data.UpperDir}}:{{.GraphDriver.Data.LowerDir}}",
            image,
        ]);
        out.trim()
            .split(':')
            .filter(|s| !s.is_empty() && *s != "<no value>")
            .map(PathBuf::from)
            .collect()
    }

    /// Removes everything (containers, images, volumes) and checks nothing is left mounted
    /// or running for this world.
    fn teardown_and_check(&self) {
        self.podman(&["rm", "-af", "-t", "0"]);
        let _ = self.try_tool("buildah", &["rm", "--all"]);
        self.podman(&["rmi", "-af"]);
        let _ = self.try_tool("podman", &["volume", "prune", "-f"]);
        let root = self.sc.path().to_path_buf();
        let mounted: Vec<_> = mountinfo()
            .into_iter()
            .filter(|m| m.mountpoint.starts_with(&root))
            .collect();
        assert!(
            mounted.is_empty(),
            "{:?}: still mounted: {mounted:?}",
            self.who
        );
        assert!(
            wait_for(Duration::from_secs(10), || live_daemons(&root).is_empty()),
            "{:?}: stratafs daemons still running: {:?}",
            self.who,
            live_daemons(&root)
        );
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Best effort after a failure: stop containers, end rootless Podman's pause process,
        // and kill any daemon of ours, before Scratch detaches and removes the directory.
        let _ = self.try_tool("podman", &["rm", "-af", "-t", "0"]);
        let _ = self.try_tool("buildah", &["rm", "--all"]);
        let root = self.sc.path().to_path_buf();
        for pid in live_daemons(&root) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Ok(pid) = fs::read_to_string(root.join("xdg/libpod/tmp/pause.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Live (not zombie) stratafs processes whose command line names a path under `root`.
fn live_daemons(root: &Path) -> Vec<i32> {
    let needle = root.to_string_lossy().into_owned();
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains("stratafs") || !cmdline.contains(&needle) {
            continue;
        }
        let state = fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = state
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if !zombie {
            v.push(pid);
        }
    }
    v
}

fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(|l| l.trim().to_string()).collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------
// The workflow
// ---------------------------------------------------------------------------------------

/// The changes a container makes to the base image, in every way overlay semantics have
/// special cases for: a new file, a deleted lower file (whiteout), a lower directory deleted
/// and made again (opaque) beside a whiteout, a renamed lower directory, a copied-up file
/// with a lower hard link, a chmod of a lower file.
/// Run once more by `podman start`, it only appends to a log, so the restart's effect shows.
const CHANGES: &str = "set -e
if test -e /root/new; then echo second >> /root/log; exit 0; fi
echo new > /root/new
rm /etc/motd
rm /opt/keep/k1
rm /opt/readme
rm -rf /opt/tree && mkdir -p /opt/tree/sub && echo again > /opt/tree/sub/c
mkdir /var/moved && mv /var/lib /var/moved/lib
echo changed >> /var/moved/lib/data
chmod 600 /etc/group
echo first >> /root/log";

/// What the changed tree must show, from inside a container (sorted lines).
const CHECK: &str = "cat /root/new; test ! -e /etc/motd && echo motd-gone; \
ls /opt/keep; test ! -e /opt/readme && echo readme-gone; ls -R /opt/tree | grep -v '^$'; test ! -e /var/lib && echo lib-gone; \
cat /var/moved/lib/data; cat /var/moved/lib/data.link; stat -c '%a' /etc/group; cat /root/log";

fn check_changed(w: &World, image: &str) {
    let got = w.sh(image, CHECK);
    let want = [
        "new",
        "motd-gone",
        "readme-gone",
        "k2",
        "/opt/tree:",
        "sub",
        "/opt/tree/sub:",
        "c",
        "lib-gone",
        "data",
        "changed",
        "data",
        "changed",
        "600",
        "first",
        "second",
    ];
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(lines(&got), want, "{:?}: tree of {image}:\n{got}", w.who);
}

fn workflow(who: Who) {
    if !should_run() {
        return;
    }
    let w = World::new(who);
    let base = "localhost/strata-base";
    let base_layers = w.image_layer_dirs(base);
    assert!(
        !base_layers.is_empty(),
        "{who:?}: base image has no layer dirs"
    );
    let before: Vec<_> = base_layers.iter().map(|d| snapshot_raw(d)).collect();

    // run --rm: changes vanish with the container.
    w.sh(base, "echo gone > /root/tmpfile && cat /root/tmpfile");
    assert_eq!(
        w.sh(base, "test -e /root/tmpfile && echo there || echo absent")
            .trim(),
        "absent"
    );

    // A named container, stopped and started again: its changes stay.
    w.podman(&["run", "--name", "c1", base, "sh", "-c", CHANGES]);
    let again = w.podman(&["start", "-a", "c1"]);
    assert!(again.is_empty(), "{who:?}: second start printed {again:?}");
    assert_eq!(
        w.podman(&["run", "--rm", base, "cat", "/etc/motd"]).trim(),
        "base motd",
        "{who:?}: the image changed"
    );

    // diff: computed by comparing trees, so lookups and listings must agree.
    let diff = lines(&w.podman(&["diff", "c1"]));
    for want in [
        "A /root/new",
        "A /root/log",
        "D /etc/motd",
        "D /opt/keep/k1",
        "D /opt/readme",
        "A /opt/tree/sub/c",
        "D /opt/tree/a",
        "D /opt/tree/sub/b",
        "A /var/moved",
        "D /var/lib",
        "C /etc/group",
    ] {
        assert!(
            diff.iter().any(|l| l == want),
            "{who:?}: podman diff lacks {want:?}: {diff:#?}"
        );
    }
    assert!(
        !diff.iter().any(|l| l.ends_with("/opt/keep/k2")),
        "{who:?}: untouched file in diff: {diff:#?}"
    );

    // commit, then run the committed image.
    w.podman(&["commit", "c1", "localhost/strata-committed"]);
    check_changed(&w, "localhost/strata-committed");
    let history = w.podman(&["image", "history", "-q", "localhost/strata-committed"]);
    assert_eq!(history.lines().count(), 2, "{who:?}: history:\n{history}");

    // export: the container's merged tree as a tar.
    let export = w.sc.join("c1.tar");
    w.podman(&["export", "-o", export.to_str().unwrap(), "c1"]);
    let listing = run(Command::new("tar").arg("-tf").arg(&export)).expect_success();
    let names = listing.stdout_str();
    assert!(names
        .lines()
        .any(|l| l.trim_end_matches('/') == "./root/new" || l == "root/new"));
    assert!(
        !names.contains("etc/motd"),
        "{who:?}: export has a deleted file"
    );
    assert!(
        !names.contains("opt/tree/a"),
        "{who:?}: export has a hidden file"
    );

    // exec and cp in and out of a running container.
    w.podman(&["run", "-d", "--name", "c2", base, "sleep", "600"]);
    assert!(
        !live_daemons(w.sc.path()).is_empty(),
        "{who:?}: a running container, but no stratafs daemon for this world"
    );
    assert_eq!(
        w.podman(&["exec", "c2", "sh", "-c", "echo hi > /tmp/e && cat /tmp/e"])
            .trim(),
        "hi"
    );
    fs::write(w.sc.join("in.txt"), "copied in\n").unwrap();
    if let Some(u) = &w.user {
        chown_tree(&w.sc.join("in.txt"), u);
    }
    w.podman(&["cp", "in.txt", "c2:/root/in.txt"]);
    assert_eq!(
        w.podman(&["exec", "c2", "cat", "/root/in.txt"]),
        "copied in\n"
    );
    w.podman(&["cp", "c2:/var/lib/data", "out.txt"]);
    assert_eq!(fs::read_to_string(w.sc.join("out.txt")).unwrap(), "data\n");
    w.podman(&["rm", "-f", "-t", "0", "c2"]);

    // mount: the merged tree on the host (rootless: inside `podman unshare`).
    let script = "m=$(podman mount c1) && cat \"$m/root/new\" && ls \"$m/opt/keep\" && podman umount c1 >/dev/null";
    let out = match who {
        Who::Root => {
            let m = w.podman(&["mount", "c1"]).trim().to_string();
            let s = fs::read_to_string(Path::new(&m).join("root/new")).unwrap();
            w.podman(&["umount", "c1"]);
            s + "k2\n"
        }
        Who::Rootless => w.podman(&["unshare", "sh", "-c", script]),
    };
    assert_eq!(out, "new\nk2\n", "{who:?}: podman mount");
    // image mount: a read-only mount, without an upper and with an empty lower directory.
    let script = format!(
        "m=$(podman image mount {base}) && cat \"$m/etc/motd\" && \
         (touch \"$m/x\" 2>/dev/null && echo writable || echo read-only) && \
         podman image umount {base} >/dev/null"
    );
    let out = match who {
        Who::Root => {
            let o = w.try_tool("sh", &["-c", &script]);
            assert!(o.success(), "{}", o.describe());
            o.stdout_str()
        }
        Who::Rootless => w.podman(&["unshare", "sh", "-c", &script]),
    };
    assert_eq!(out, "base motd\nread-only\n", "{who:?}: podman image mount");

    // A build with several RUN and COPY steps.
    let ctx = w.sc.join("ctx");
    fs::write(ctx.join("file.txt"), "from context\n").unwrap();
    fs::create_dir_all(ctx.join("cdir/deeper")).unwrap();
    fs::write(ctx.join("cdir/deeper/x"), "x\n").unwrap();
    fs::write(
        ctx.join("Containerfile"),
        format!(
            "FROM {base}\n\
             RUN mkdir -p /b/sub && echo 1 > /b/sub/one && echo keep > /b/keep\n\
             COPY file.txt /b/file.txt\n\
             COPY cdir /cdir\n\
             RUN rm -rf /b/sub && mkdir /b/sub && echo 2 > /b/sub/two && rm /bin/false\n\
             RUN rm /b/keep && mv /opt/keep /opt/kept && echo done > /b/done\n"
        ),
    )
    .unwrap();
    if let Some(u) = &w.user {
        chown_tree(&ctx, u);
    }
    w.podman(&[
        "build",
        "--network=none",
        "-t",
        "localhost/strata-built",
        "ctx",
    ]);
    let got = w.sh(
        "localhost/strata-built",
        "ls /b /b/sub /opt/kept; cat /b/file.txt /cdir/deeper/x /b/done; \
         test ! -e /bin/false && test ! -e /opt/keep && echo gone",
    );
    let mut want: Vec<String> = [
        "/b:",
        "done",
        "file.txt",
        "sub",
        "/b/sub:",
        "two",
        "/opt/kept:",
        "k1",
        "k2",
        "from context",
        "x",
        "done",
        "gone",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    want.sort();
    let got_lines: Vec<String> = lines(&got).into_iter().filter(|l| !l.is_empty()).collect();
    assert_eq!(got_lines, want, "{who:?}: built image:\n{got}");
    let history = w.podman(&["image", "history", "-q", "localhost/strata-built"]);
    assert_eq!(history.lines().count(), 6, "{who:?}: history:\n{history}");

    // Volumes: a bind mount and a named volume.
    let vol = w.sc.mkdir("vol");
    fs::write(vol.join("in"), "host\n").unwrap();
    if let Some(u) = &w.user {
        chown_tree(&vol, u);
    }
    let bind = format!("{}:/vol", vol.display());
    w.podman(&[
        "run",
        "--rm",
        "-v",
        &bind,
        base,
        "sh",
        "-c",
        "cat /vol/in > /vol/out",
    ]);
    assert_eq!(fs::read_to_string(vol.join("out")).unwrap(), "host\n");
    w.podman(&["volume", "create", "strata-vol"]);
    w.podman(&[
        "run",
        "--rm",
        "-v",
        "strata-vol:/data",
        base,
        "sh",
        "-c",
        "echo kept > /data/f",
    ]);
    assert_eq!(
        w.podman(&[
            "run",
            "--rm",
            "-v",
            "strata-vol:/data",
            base,
            "cat",
            "/data/f"
        ]),
        "kept\n"
    );

    // --userns=keep-id (rootless): the image's root files still show as root, the
    // caller's own id is the container user, and what it writes is the caller's.
    if who == Who::Rootless {
        let uid = w.user.as_ref().unwrap().uid;
        let got = w.podman(&[
            "run",
            "--rm",
            "--userns=keep-id",
            "-v",
            &bind,
            base,
            "sh",
            "-c",
            "id -u; stat -c '%u %g' /bin/busybox /etc/passwd; touch /vol/keepid; \
             cat /etc/passwd | grep -c root",
        ]);
        assert_eq!(got, format!("{uid}\n0 0\n0 0\n1\n"), "{who:?}: keep-id");
        assert_eq!(fs::metadata(vol.join("keepid")).unwrap().uid(), uid);
    }

    // buildah from / run / commit.
    let ctr = w.buildah(&["from", base]).trim().to_string();
    w.buildah(&[
        "run",
        "--network",
        "none",
        &ctr,
        "--",
        "sh",
        "-c",
        "echo bud > /bud && rm /etc/motd",
    ]);
    w.buildah(&["commit", &ctr, "localhost/strata-buildah"]);
    w.buildah(&["rm", &ctr]);
    assert_eq!(
        w.sh(
            "localhost/strata-buildah",
            "cat /bud; test ! -e /etc/motd && echo gone"
        ),
        "bud\ngone\n"
    );

    // rmi and prune.
    w.podman(&["rm", "-f", "-t", "0", "c1"]);
    w.podman(&["rmi", "localhost/strata-committed"]);
    w.podman(&["rmi", "localhost/strata-buildah"]);
    w.podman(&["image", "prune", "-f"]);
    let images = w.podman(&["images", "--format", "{{.Repository}}"]);
    assert!(!images.contains("strata-committed"), "{who:?}: {images}");

    // The image layers were never written.
    for (dir, snap) in base_layers.iter().zip(&before) {
        let now = snapshot_raw(dir);
        assert_snapshots_eq("base layer before", snap, "after", &now);
    }
    w.teardown_and_check();
}

#[test]
fn workflow_root() {
    workflow(Who::Root);
}

#[test]
fn workflow_rootless() {
    workflow(Who::Rootless);
}
