//! Counting the FUSE requests a workload makes the kernel send to a daemon.
//!
//! Round trips are what a FUSE overlay pays for (about 20 µs each on these machines when
//! the program and the daemon share a CPU, several times that when they do not), so the
//! count per workload says more than CPU time about where the time goes and what a change
//! saved. It is the same for every daemon: the kernel's `fuse:fuse_request_send` tracepoint,
//! recorded in a tracing instance of our own (so a trace someone else runs is left alone)
//! and filtered to the one connection behind the mount.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

const TRACEFS: &str = "/sys/kernel/tracing";

/// Per-CPU ring buffer, KiB. An event takes about 40 bytes, so this holds some 400,000
/// requests per CPU: more than any workload here sends.
const BUFFER_KB: u32 = 16 * 1024;

/// Requests counted during one task.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Requests {
    /// All requests.
    pub total: u64,
    /// Requests by opcode name (`LOOKUP`, `GETATTR`, ...).
    pub by_op: BTreeMap<String, u64>,
    /// The ring buffer overflowed: the counts are lower bounds.
    pub lost: bool,
}

/// A tracing instance recording the requests of one FUSE connection; removed on drop.
#[derive(Debug)]
pub struct RequestTrace {
    dir: PathBuf,
}

impl RequestTrace {
    /// An instance for the FUSE connection serving `mnt`. Fails when tracefs or the fuse
    /// events are not there (kernels before 6.13 have none).
    pub fn new(mnt: &Path) -> Result<RequestTrace> {
        let event = Path::new(TRACEFS).join("events/fuse/fuse_request_send");
        if !event.exists() {
            bail!(
                "no {} (tracefs not mounted, or a kernel without fuse tracepoints)",
                event.display()
            );
        }
        // From mountinfo, not stat: root may not stat another user's FUSE mount.
        let connection = connection_of(mnt)?;
        remove_stale_instances();
        let dir = Path::new(TRACEFS)
            .join("instances")
            .join(format!("strata-bench-{}-{connection}", std::process::id()));
        if dir.exists() {
            let _ = fs::remove_dir(&dir);
        }
        fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let t = RequestTrace { dir };
        t.write("tracing_on", "0")?;
        t.write("buffer_size_kb", &BUFFER_KB.to_string())?;
        t.write(
            "events/fuse/fuse_request_send/filter",
            &format!("connection == {connection}"),
        )?;
        t.write("events/fuse/fuse_request_send/enable", "1")?;
        Ok(t)
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        let p = self.dir.join(file);
        fs::write(&p, value).with_context(|| format!("write {value:?} to {}", p.display()))
    }

    /// Empties the buffer and starts recording.
    pub fn start(&self) -> Result<()> {
        self.write("tracing_on", "0")?;
        self.write("trace", "")?;
        self.write("tracing_on", "1")
    }

    /// Stops recording and counts what was recorded since `start`.
    pub fn stop(&self) -> Result<Requests> {
        self.write("tracing_on", "0")?;
        let p = self.dir.join("trace");
        let f = fs::File::open(&p).with_context(|| format!("open {}", p.display()))?;
        let mut r = Requests::default();
        for line in BufReader::new(f).lines() {
            let line = line.with_context(|| format!("read {}", p.display()))?;
            if line.starts_with('#') {
                // The header says "entries-in-buffer/entries-written: 5/9": 4 were lost.
                if let Some(v) = line.split("entries-in-buffer/entries-written: ").nth(1) {
                    let mut it = v.split_whitespace().next().unwrap_or("").split('/');
                    if let (Some(a), Some(b)) = (it.next(), it.next()) {
                        r.lost |= a != b;
                    }
                }
                continue;
            }
            if let Some(op) = opcode_name(&line) {
                r.total += 1;
                *r.by_op.entry(op.to_string()).or_default() += 1;
            }
        }
        Ok(r)
    }
}

/// Removes the instances of runs that were killed before they could (each holds its ring
/// buffers).
fn remove_stale_instances() {
    let Ok(entries) = fs::read_dir(Path::new(TRACEFS).join("instances")) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("strata-bench-")
            .and_then(|r| r.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir(e.path());
        }
    }
}

/// The kernel's dev_t of the filesystem mounted on `mnt` (major in the bits above 20), as
/// the tracepoint shows it.
fn connection_of(mnt: &Path) -> Result<u32> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    let want = mnt.to_string_lossy();
    // Fields: id parent major:minor root mount-point ...; the last mount on a path wins.
    let dev = info
        .lines()
        .rev()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 4 && f[4] == want).then(|| f[2].to_string())
        })
        .next()
        .with_context(|| format!("{} is not a mount point", mnt.display()))?;
    let (ma, mi) = dev
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .with_context(|| format!("device {dev:?} of {} in mountinfo", mnt.display()))?;
    Ok((ma << 20) | mi)
}

/// `GETATTR` from `... opcode 3 (FUSE_GETATTR) len 56`.
fn opcode_name(line: &str) -> Option<&str> {
    let rest = line.split(" (FUSE_").nth(1)?;
    rest.split(')').next()
}

impl Drop for RequestTrace {
    fn drop(&mut self) {
        let _ = self.write("tracing_on", "0");
        let _ = self.write("events/fuse/fuse_request_send/enable", "0");
        // An instance is removed with rmdir; its files go with it.
        let _ = fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcode_names_come_from_the_event_text() {
        let l = "  tar-14470 [001] 44614.748660: fuse_request_send: connection 39 req 4 opcode 3 (FUSE_GETATTR) len 56 ";
        assert_eq!(opcode_name(l), Some("GETATTR"));
        assert_eq!(opcode_name("# tracer: nop"), None);
    }
}
