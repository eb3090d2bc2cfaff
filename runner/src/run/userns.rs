//! The rootless user namespace: which ids it maps, writing the maps from outside, and
//! explaining why a namespace cannot be made.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// How the caller's ids map into the container.
#[derive(Debug, Clone)]
pub enum IdMap {
    /// Only the caller, as root (`setgroups` denied).
    Single {
        /// Caller's uid.
        uid: u32,
        /// Caller's gid.
        gid: u32,
    },
    /// The caller as root, and its subordinate ranges as ids 1.. (through newuidmap and
    /// newgidmap, which are set-id helpers).
    Subordinate {
        /// Caller's uid.
        uid: u32,
        /// Caller's gid.
        gid: u32,
        /// First subordinate uid and count.
        subuid: (u32, u32),
        /// First subordinate gid and count.
        subgid: (u32, u32),
        /// The helpers.
        newuidmap: PathBuf,
        /// The helpers.
        newgidmap: PathBuf,
    },
}

impl IdMap {
    /// The richest map the system grants the caller.
    pub fn for_caller() -> IdMap {
        // SAFETY: plain getters.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let name = user_name(uid);
        let helpers = (find_helper("newuidmap"), find_helper("newgidmap"));
        let ranges = (
            sub_range(Path::new("/etc/subuid"), uid, name.as_deref()),
            sub_range(Path::new("/etc/subgid"), gid, name.as_deref()),
        );
        match (helpers, ranges) {
            ((Some(newuidmap), Some(newgidmap)), (Some(subuid), Some(subgid))) => {
                IdMap::Subordinate {
                    uid,
                    gid,
                    subuid,
                    subgid,
                    newuidmap,
                    newgidmap,
                }
            }
            _ => IdMap::Single { uid, gid },
        }
    }

    /// Writes the maps of the user namespace that process `pid` has just created.
    pub fn write(&self, pid: i32) -> Result<()> {
        match self {
            IdMap::Single { uid, gid } => {
                let proc = PathBuf::from(format!("/proc/{pid}"));
                fs::write(proc.join("uid_map"), format!("0 {uid} 1\n"))
                    .context("writing uid_map")?;
                fs::write(proc.join("setgroups"), "deny\n").context("writing setgroups")?;
                fs::write(proc.join("gid_map"), format!("0 {gid} 1\n"))
                    .context("writing gid_map")?;
            }
            IdMap::Subordinate {
                uid,
                gid,
                subuid,
                subgid,
                newuidmap,
                newgidmap,
            } => {
                run_helper(newuidmap, pid, *uid, *subuid)?;
                run_helper(newgidmap, pid, *gid, *subgid)?;
            }
        }
        Ok(())
    }
}

fn run_helper(helper: &Path, pid: i32, own: u32, (start, count): (u32, u32)) -> Result<()> {
    let out = Command::new(helper)
        .args([pid.to_string(), "0".into(), own.to_string(), "1".into()])
        .args(["1".to_string(), start.to_string(), count.to_string()])
        .output()
        .with_context(|| format!("running {}", helper.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            helper.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn find_helper(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn user_name(uid: u32) -> Option<String> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
    })
}

/// The first range `/etc/subuid` (or subgid) grants `id` (by name or number).
fn sub_range(file: &Path, id: u32, name: Option<&str>) -> Option<(u32, u32)> {
    let text = fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.trim().split(':').collect();
        if f.len() != 3 || !(Some(f[0]) == name || f[0] == id.to_string()) {
            return None;
        }
        let (start, count) = (f[1].parse().ok()?, f[2].parse::<u32>().ok()?);
        (count > 0).then_some((start, count))
    })
}

/// Why `unshare(CLONE_NEWUSER)` failed with `errno`, and how to allow it.
pub fn blocked_reason(errno: i32) -> String {
    let read = |p: &str| fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        return "user namespaces are disabled (user.max_user_namespaces = 0); \
                enable with: sysctl -w user.max_user_namespaces=15000"
            .into();
    }
    if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return "unprivileged user namespaces are disabled \
                (kernel.unprivileged_userns_clone = 0); enable with: \
                sysctl -w kernel.unprivileged_userns_clone=1"
            .into();
    }
    if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
        return "AppArmor restricts unprivileged user namespaces \
                (kernel.apparmor_restrict_unprivileged_userns = 1); allow with: \
                sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or give strata an \
                AppArmor profile with `userns,`"
            .into();
    }
    format!(
        "cannot create a user namespace: {}",
        std::io::Error::from_raw_os_error(errno)
    )
}

/// Whether uid `id` is mapped in our user namespace.
pub fn is_mapped(map_file: &str, id: u32) -> bool {
    let Ok(text) = fs::read_to_string(map_file) else {
        return false;
    };
    text.lines().any(|l| {
        let f: Vec<u64> = l
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        f.len() == 3 && (f[0]..f[0] + f[2]).contains(&u64::from(id))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ranges_by_name_or_number() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("subuid");
        fs::write(&f, "alice:100000:65536\n1001:200000:1000\nbob:1:0\n").unwrap();
        assert_eq!(sub_range(&f, 5, Some("alice")), Some((100000, 65536)));
        assert_eq!(sub_range(&f, 1001, Some("carol")), Some((200000, 1000)));
        assert_eq!(sub_range(&f, 7, Some("bob")), None);
    }
}
