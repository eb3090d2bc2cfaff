//! What a request does not carry about the process that made it, and the kernel's own
//! privilege rules need: whether it may keep set-user-ID bits.
//!
//! With FUSE_HANDLE_KILLPRIV_V2 the kernel leaves dropping set-user-ID and set-group-ID on
//! truncate to us and says whether to in `FATTR_KILL_SUIDGID`, a flag fuser 0.18 does not
//! pass on. The kernel sets it when the caller lacks CAP_FSETID in the initial user
//! namespace (`capable()`), and drops set-group-ID also without group execution when the
//! caller is not in the file's group; this module answers both questions from `/proc`.

use std::fs;

/// Bit of CAP_FSETID in the capability masks of `/proc/PID/status`.
const CAP_FSETID_BIT: u64 = 1 << 4;

/// The process behind a request: its thread id and group id as the request gives them.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// Thread id in our pid namespace (0: not visible from it).
    pub pid: u32,
    /// Group id (the filesystem group id the kernel checks permissions with).
    pub gid: u32,
}

impl Caller {
    /// Whether the caller holds CAP_FSETID in the initial user namespace. Unknown counts
    /// as no, which drops the bits: pid 0 (the caller is outside our pid namespace), a
    /// process gone before we looked, an unreadable `/proc`.
    pub fn holds_fsetid(&self) -> bool {
        let Some(status) = self.status() else {
            return false;
        };
        let effective = field(&status, "CapEff:")
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0);
        if effective & CAP_FSETID_BIT == 0 {
            return false;
        }
        // Capabilities held in a user namespace below the initial one (a rootless
        // container's root) do not count for `capable()`. Only the initial namespace maps
        // every id to itself.
        fs::read_to_string(format!("/proc/{}/uid_map", self.pid)).is_ok_and(|m| is_identity_map(&m))
    }

    /// Whether group `gid` is the caller's group or one of its supplementary groups.
    /// Unknown supplementary groups count as not holding it.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid
            || self.status().is_some_and(|s| {
                field(&s, "Groups:")
                    .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
            })
    }

    fn status(&self) -> Option<String> {
        if self.pid == 0 {
            return None;
        }
        fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()
    }
}

fn field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(name))
}

fn is_identity_map(map: &str) -> bool {
    let mut lines = map.lines();
    let first: Vec<&str> = lines
        .next()
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    first == ["0", "0", "4294967295"] && lines.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_map_is_the_initial_namespace_only() {
        assert!(is_identity_map("         0          0 4294967295\n"));
        assert!(!is_identity_map("         0       1000          1\n"));
        assert!(!is_identity_map(
            "0 0 4294967295\n1 1 1\n" // not something the kernel writes, but not identity
        ));
        assert!(!is_identity_map(""));
    }

    #[test]
    fn this_process_and_an_absent_one() {
        let gid = nix::unistd::getegid().as_raw();
        let me = Caller {
            pid: std::process::id(),
            gid,
        };
        let root = nix::unistd::geteuid().is_root();
        let initial = fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| is_identity_map(&m));
        assert_eq!(me.holds_fsetid(), root && initial);
        assert!(me.in_group(gid));
        for g in nix::unistd::getgroups().unwrap() {
            assert!(me.in_group(g.as_raw()), "supplementary group {g}");
        }
        for pid in [0, u32::MAX - 1] {
            let gone = Caller { pid, gid };
            assert!(!gone.holds_fsetid());
            assert!(gone.in_group(gid) && !gone.in_group(gid.wrapping_add(12345)));
        }
    }
}
